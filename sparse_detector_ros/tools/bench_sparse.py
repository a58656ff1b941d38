"""``sparse-detector bench sparse``: the sparse residual block against the fastest dense torch.

For every map size, channel count, tile size and active fraction it prints one JSON row::

    {"bench": "sparse", "size": 512, "channels": 64, "tile": 16, "halo": 1, "active": 0.1,
     "dense_ms": ..., "dense_variant": "channels_last", "sparse_ms": ..., "path": "sparse",
     "sparse_path_ms": ..., "speedup": ..., "ideal": ..., "efficiency": ..., ...}

* ``dense_ms``: ``x + F(x)`` with the fastest dense variant found on this machine for that
  size and channel count (NCHW, channels_last, mkldnn; all with batch norm folded into the
  convs, under ``torch.inference_mode``, same thread count as the sparse path).
* ``sparse_ms``: the :class:`~sparse_detector_ros.sparse.SparseResidualBlock` forward (fused,
  channels_last, adding in place into its input): reduce_mask + gather + valid convs +
  scatter-add, or the dense path when the active fraction is above ``--crossover``.
  ``sparse_path_ms`` is the sparse path forced at every fraction.
* ``active``: the measured fraction of active ``B x B`` tiles. Masks look like BEV computation
  masks: thresholded smoothed noise plus a few road-like strips, with the threshold chosen so
  that the stated fraction of tiles is active.
* ``ideal = 1 / (active * ((B + 2h) / B)^2)`` (halo overhead included), ``efficiency =
  speedup / ideal``.

Dense and sparse are timed interleaved, repeat by repeat, in an order rotated every repeat, each
call on a freshly written copy of its input (the copy is not timed), and the minimum over
``--repeats`` is reported (robust to other processes sharing the CPU). After the rows come ``"crossover"`` rows:
per size / channels / tile, the active fraction at which the forced sparse path stops beating
dense (linear interpolation of the time ratio; ``1.0`` or more means it never stops), and a
``"layout"`` row per size / channels (the sparse block on an NCHW-stored vs a
channels_last-stored map, and the dense variants) and a final ``"summary"`` row.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time


def add_arguments(parser) -> None:
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 256],
                        help="square map sizes in cells (default: 512 256)")
    parser.add_argument("--channels", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.4, 1.0],
                        help="active-tile fractions")
    parser.add_argument("--tiles", type=int, nargs="+", default=[8, 16, 32],
                        help="output tile sizes B")
    parser.add_argument("--branch", choices=("bottleneck", "basic"), default="bottleneck",
                        help="residual branch: bottleneck 1x1-3x3-1x1 (halo 1) or basic "
                             "3x3-3x3 (halo 2)")
    parser.add_argument("--mid-ratio", type=float, default=0.5,
                        help="bottleneck width / channels (default 0.5)")
    parser.add_argument("--crossover", type=float, default=None,
                        help="block's dense_crossover (default: sparse.dense_crossover, 0.8)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (min is kept)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for dense and sparse (default: all cores)")
    parser.add_argument("--dense-variants", nargs="+",
                        default=["nchw", "channels_last", "mkldnn"],
                        choices=("nchw", "channels_last", "mkldnn"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-layout-check", dest="layout_check", action="store_false",
                        help="skip the NCHW vs channels_last comparison rows")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: one small map, 16 channels, 2 tiles, 2 fractions, "
                             "1 repeat")


def bev_mask(H: int, W: int, tile: int, frac: float, seed: int):
    """A BEV-like computation mask (1, H, W) with ``frac`` of its ``tile x tile`` tiles active:
    smoothed noise (blobs of ~H/16 cells) plus two road-like strips, thresholded so that the
    requested fraction of tiles holds a cell above the threshold."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 1, max(2, H // 16) + 2, max(2, W // 16) + 2, generator=g)
    fine = torch.rand(1, 1, max(2, H // 4) + 2, max(2, W // 4) + 2, generator=g)
    field = (F.interpolate(coarse, size=(H, W), mode="bicubic", align_corners=False)
             + 0.25 * F.interpolate(fine, size=(H, W), mode="bilinear", align_corners=False))[0, 0]
    yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float32),
                            torch.arange(W, dtype=torch.float32), indexing="ij")
    for _ in range(2):   # roads: a band of width ~H/40 along a random line
        a = float(torch.rand(1, generator=g)) * math.pi
        cy, cx = float(torch.rand(1, generator=g)) * H, float(torch.rand(1, generator=g)) * W
        d = (yy - cy) * math.cos(a) - (xx - cx) * math.sin(a)
        field = field + 0.6 * torch.exp(-(d / max(1.0, H / 40)) ** 2)
    Ty, Tx = -(-H // tile), -(-W // tile)
    pad = (0, Tx * tile - W, 0, Ty * tile - H)
    tmax = F.max_pool2d(F.pad(field[None, None], pad, value=-math.inf), tile)[0, 0].flatten()
    k = max(0, min(tmax.numel(), round(frac * tmax.numel())))
    if k == 0:
        return torch.zeros(1, H, W)
    s = torch.sort(tmax, descending=True).values
    thr = float(s[k - 1]) - 1e-6 if k == s.numel() else 0.5 * float(s[k - 1] + s[k])
    return (field > thr).float()[None]


def _make_branch(kind: str, channels: int, mid_ratio: float):
    from sparse_detector_ros.sparse import basic_branch, bottleneck_branch

    if kind == "basic":
        return basic_branch(channels)
    return bottleneck_branch(channels, max(1, round(channels * mid_ratio)))


def _randomize(branch, seed: int):
    import torch
    import torch.nn as nn

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in branch:
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return branch.eval()


def _dense_variants(branch, x, names):
    """name -> (callable, input) for ``x + F(x)``, BN folded, each in its best form."""
    import copy

    import torch

    from sparse_detector_ros.sparse import fold_bn

    folded = fold_bn(branch)
    out = {}
    if "nchw" in names:
        f = copy.deepcopy(folded)
        xi = x.contiguous()
        out["nchw"] = (lambda xi, f=f: f(xi).add_(xi), xi)
    if "channels_last" in names:
        f = copy.deepcopy(folded).to(memory_format=torch.channels_last)
        xi = x.contiguous(memory_format=torch.channels_last)
        out["channels_last"] = (lambda xi, f=f: f(xi).add_(xi), xi)
    if "mkldnn" in names and torch.backends.mkldnn.is_available():
        try:
            import torch.utils.mkldnn as mk

            f = mk.to_mkldnn(copy.deepcopy(folded))
            xi = x.to_mkldnn()
            f(xi)
            out["mkldnn"] = (lambda xi, f=f: f(xi) + xi, xi)
        except (RuntimeError, NotImplementedError):
            pass
    return out


def _timer(fn, setup=None):
    """One timed call (ms); ``setup`` runs untimed before it and its result is passed in."""
    arg = setup() if setup is not None else None
    t0 = time.perf_counter()
    fn(arg) if setup is not None else fn()
    return (time.perf_counter() - t0) * 1e3


def _crossover(points):
    """points: [(active, sparse_ms / dense_ms)] sorted by active. First fraction where the
    ratio reaches 1 (linear interpolation); >= 1.0 extrapolated if it never does."""
    pts = sorted(points)
    for (a0, r0), (a1, r1) in zip(pts, pts[1:]):
        if r0 < 1.0 <= r1:
            return a0 + (1.0 - r0) * (a1 - a0) / (r1 - r0)
    if pts and pts[0][1] >= 1.0:
        return pts[0][0]
    if len(pts) >= 2 and pts[-1][1] > pts[-2][1]:   # extrapolate the last segment
        (a0, r0), (a1, r1) = pts[-2], pts[-1]
        return a1 + (1.0 - r1) * (a1 - a0) / (r1 - r0)
    return math.inf


def run(args) -> int:
    import torch

    from sparse_detector_ros.config import SparseConfig
    from sparse_detector_ros.sparse import SparseResidualBlock, receptive_halo

    if args.quick:
        args.sizes, args.channels, args.tiles = [64], [16], [8, 16]
        args.fractions, args.repeats, args.warmup = [0.1, 1.0], 1, 1
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    crossover = SparseConfig().dense_crossover if args.crossover is None else args.crossover
    out = sys.stdout

    def emit(row):
        out.write(json.dumps(row) + "\n")
        out.flush()

    cross_rows = []
    best_rows = []
    with torch.inference_mode():
        for size in args.sizes:
            for C in args.channels:
                torch.manual_seed(args.seed)
                branch = _randomize(_make_branch(args.branch, C, args.mid_ratio), args.seed)
                hy, _ = receptive_halo(branch)
                g = torch.Generator().manual_seed(args.seed + size + C)
                x0 = torch.randn(1, C, size, size, generator=g)
                variants = _dense_variants(branch, x0, args.dense_variants)
                # pick the fastest dense variant for this size / channel count
                vt = {name: math.inf for name in variants}
                for name, (fn, xi) in variants.items():
                    for _ in range(args.warmup):
                        fn(xi.clone())
                for _ in range(max(1, args.repeats)):      # round robin, min of each
                    for name, (fn, xi) in variants.items():
                        vt[name] = min(vt[name], _timer(fn, xi.clone))
                dname = min(vt, key=vt.get)
                dense_fn, dense_x = variants[dname]
                block = SparseResidualBlock(branch, 8, dense_crossover=crossover,
                                            backend="torch").fuse()
                forced = SparseResidualBlock(branch, 8, dense_crossover=math.inf,
                                             backend="torch").fuse()
                forced.branch = block.branch
                x_cl = x0.contiguous(memory_format=torch.channels_last)
                per_tile = {}
                for B in args.tiles:
                    block.tile_size = forced.tile_size = B
                    for frac in args.fractions:
                        mask = bev_mask(size, size, B, frac, args.seed + B)
                        _, k, total = block.active_tiles(mask)
                        active = k / total

                        def fresh():
                            return x_cl.clone()

                        def run_block(xi):
                            block(xi, mask, inplace=True)

                        def run_forced(xi):
                            forced(xi, mask, inplace=True)

                        jobs = [(dense_fn, dense_x.clone), (run_block, fresh),
                                (run_forced, fresh)]
                        for _ in range(args.warmup):
                            for fn, setup in jobs:
                                fn(setup())
                        times: list[list[float]] = [[], [], []]
                        for rep in range(max(1, args.repeats)):
                            # interleaved, order rotated every repeat (no cache-order bias);
                            # every call gets a freshly written copy of its input (untimed)
                            for j in range(3):
                                jj = (j + rep) % 3
                                times[jj].append(_timer(jobs[jj][0], jobs[jj][1]))
                        dense_ms, sparse_ms, forced_ms = (min(t) for t in times)
                        ideal = (1.0 / (active * ((B + 2 * hy) / B) ** 2)) if active > 0 \
                            else math.inf
                        speedup = dense_ms / sparse_ms
                        row = {
                            "bench": "sparse", "size": size, "channels": C,
                            "branch": args.branch, "tile": B, "halo": hy,
                            "target_active": frac, "active": round(active, 4),
                            "dense_ms": round(dense_ms, 3), "dense_variant": dname,
                            "sparse_ms": round(sparse_ms, 3),
                            "path": "dense" if active > crossover else "sparse",
                            "sparse_path_ms": round(forced_ms, 3),
                            "speedup": round(speedup, 3),
                            "ideal": round(ideal, 3) if math.isfinite(ideal) else None,
                            "efficiency": round(speedup / ideal, 3) if math.isfinite(ideal)
                            else None,
                            "threads": threads, "crossover_setting": crossover,
                        }
                        emit(row)
                        per_tile.setdefault(B, []).append((active, forced_ms / dense_ms))
                        best_rows.append(row)
                # layout: the same block on an NCHW-stored vs a channels_last-stored map
                if args.layout_check:
                    B = 16 if 16 in args.tiles else args.tiles[0]
                    frac = 0.1 if 0.1 in args.fractions else args.fractions[0]
                    forced.tile_size = B
                    mask = bev_mask(size, size, B, frac, args.seed + B)
                    x_nchw = x0.contiguous()
                    lt = {"nchw": [], "channels_last": []}
                    for rep in range(args.warmup + max(1, args.repeats)):
                        a = _timer(lambda xi: forced(xi, mask, inplace=True), x_nchw.clone)
                        b = _timer(lambda xi: forced(xi, mask, inplace=True), x_cl.clone)
                        if rep >= args.warmup:
                            lt["nchw"].append(a)
                            lt["channels_last"].append(b)
                    emit({"bench": "sparse", "kind": "layout", "size": size, "channels": C,
                          "tile": B, "target_active": frac,
                          "sparse_ms": {k: round(min(v), 3) for k, v in lt.items()},
                          "dense_ms": {k: round(v, 3) for k, v in vt.items()
                                       if k in ("nchw", "channels_last")}})
                for B, pts in per_tile.items():
                    c = _crossover(pts)
                    r = {"bench": "sparse", "kind": "crossover", "size": size, "channels": C,
                         "tile": B, "crossover": round(c, 3) if math.isfinite(c) else None}
                    cross_rows.append(r)
                    emit(r)
                emit({"bench": "sparse", "kind": "dense_variants", "size": size,
                      "channels": C, "ms": {k: round(v, 3) for k, v in vt.items()},
                      "fastest": dname})
    # summary: best tile at ~10 % active, worst slowdown at 100 %, recommended crossover
    summary = {"bench": "sparse", "kind": "summary", "threads": threads,
               "crossover_setting": crossover, "configs": []}
    for size in args.sizes:
        for C in args.channels:
            rows = [r for r in best_rows if r["size"] == size and r["channels"] == C]
            near10 = [r for r in rows if abs(r["target_active"] - 0.1) < 1e-9]
            full = [r for r in rows if r["target_active"] >= 1.0]
            entry = {"size": size, "channels": C}
            if near10:
                b = max(near10, key=lambda r: r["speedup"])
                entry.update(best_tile_at_10=b["tile"], speedup_at_10=b["speedup"],
                             efficiency_at_10=b["efficiency"])
            if full:
                entry["slowdown_at_100"] = round(max(1.0 / r["speedup"] for r in full) - 1, 3)
            cr = [r["crossover"] for r in cross_rows if r["size"] == size and r["channels"] == C
                  and r["crossover"] is not None]
            entry["crossover_best_tile"] = max(cr) if cr else None
            summary["configs"].append(entry)
    emit(summary)
    return 0
