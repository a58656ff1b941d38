"""``sparse-detector bench sparse``: the sparse residual block against the fastest dense torch.

For every map size, channel count, tile size and active fraction it prints one JSON row
(times in ms, each a spread ``{"min": .., "median": .., "max": ..}`` over ``--repeats``)::

    {"bench": "sparse", "size": 512, "channels": 64, "mid": 32, "branch": "bottleneck",
     "tile": 16, "halo": 1, "target_active": 0.1, "active": 0.1, "active_tiles": 102,
     "total_tiles": 1024, "dense_ms": {...}, "dense_variant": "channels_last",
     "sparse_ms": {...}, "path": "sparse", "sparse_path_ms": {...}, "speedup": ...,
     "sparse_path_speedup": ..., "dense_macs": ..., "sparse_macs": ..., "ideal": ...,
     "efficiency": ..., "sparse_path_efficiency": ..., "repeats": 5, ...}

* ``dense_ms``: ``x + F(x)`` with the fastest dense variant (by median) found on this machine
  for that size and channel count (NCHW, channels_last, mkldnn; all with batch norm folded
  into the convs, under ``torch.inference_mode``, same thread count as the sparse path).
* ``sparse_ms``: the :class:`~sparse_detector_ros.sparse.SparseResidualBlock` forward (fused,
  channels_last, adding in place into its input): reduce_mask + gather + valid convs +
  scatter-add, or the dense path when the active fraction is above ``--crossover``
  (``path``: ``"sparse"`` or ``"dense"``). ``sparse_path_ms`` is the sparse path forced at
  every fraction.
* ``active``: the measured fraction of active ``B x B`` tiles (``active_tiles`` /
  ``total_tiles``). Masks look like BEV computation masks: thresholded smoothed noise plus a
  few road-like strips, with the threshold chosen so that the stated fraction is active.
* Speed-ups come from the medians as printed: ``speedup = dense_ms["median"] /
  sparse_ms["median"]``, ``sparse_path_speedup = dense_ms["median"] /
  sparse_path_ms["median"]`` (so every row can be checked from its own numbers).
* The ideal is counted in multiply-accumulates (:mod:`.macs`): ``dense_macs`` is the dense
  branch on the whole map, ``sparse_macs`` what the sparse path computes on the active tiles,
  the halo charged only on the convs that really compute it (a bottleneck's first 1x1 runs on
  ``(B+2)^2`` cells, its 3x3 and last 1x1 write ``B^2``). ``ideal = dense_macs /
  sparse_macs``, ``efficiency = speedup / ideal``. Rows that ran the dense path
  (``path == "dense"``) report ``ideal`` and ``efficiency`` as ``null``: a dense run has no
  sparse efficiency. ``sparse_path_efficiency = sparse_path_speedup * sparse_macs /
  dense_macs`` is reported on every row with an active tile, so the crossover stays visible.

Dense, block and forced sparse are timed interleaved, repeat by repeat, in an order rotated
every repeat, each call on a freshly written copy of its input (the copy is not timed), after
``--warmup`` untimed rounds. The first row (``"kind": "run"``) records the settings, torch
and the CPU. After the rows of a size / channel count come a ``"layout"`` row (the sparse
block on an NCHW-stored vs a channels_last-stored map), ``"crossover"`` rows per tile (the
active fraction at which the forced sparse path stops beating dense, linear interpolation of
the median time ratio ``sparse_path_ms / dense_ms``; above 1 when extrapolated, ``null``
if the ratio never rises to 1) and a
``"dense_variants"`` row; a final ``"summary"`` row closes the run (with its ``wall_s``).
``scripts/bench_tables.py`` turns the JSON lines into the markdown tables of the docs.
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time

from sparse_detector_ros.tools import macs as macs_mod

__all__ = ["add_arguments", "run", "bev_mask", "spread", "crossover_fraction", "crossover_of",
           "row_macs", "cpu_name"]


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
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed repeats; min / median / max are reported (default 5, "
                             "at least 1)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
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
                             "3 repeats")


def spread(values) -> dict:
    """``{"min", "median", "max"}`` of a non-empty sequence of times (ms, 3 decimals)."""
    v = list(values)
    if not v:
        raise ValueError("spread of no values")
    return {"min": round(min(v), 3), "median": round(statistics.median(v), 3),
            "max": round(max(v), 3)}


def row_macs(branch, size: int, tile: int, active_tiles: int) -> dict:
    """The MAC fields of a row: ``dense_macs`` (dense branch on the ``size x size`` map),
    ``sparse_macs`` (``active_tiles`` times the per-tile MACs of the sparse path) and
    ``ideal = dense_macs / sparse_macs`` (``None`` without an active tile)."""
    specs = macs_mod.conv_specs(branch)
    dense = macs_mod.dense_macs(specs, size, size)
    sparse = active_tiles * macs_mod.tile_macs(specs, tile)
    return {"dense_macs": dense, "sparse_macs": sparse,
            "ideal": dense / sparse if sparse else None}


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo`` "model name" on Linux), else ``platform`` data."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


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


def crossover_fraction(points) -> float:
    """points: ``[(active, sparse_ms / dense_ms)]``. The first active fraction where the time
    ratio reaches 1 (linear interpolation between the two points around it); the first
    point's fraction if sparse is already slower there; the last segment extrapolated if the
    ratio never reaches 1 but grows; ``inf`` if it never grows to 1."""
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


def crossover_of(rows) -> float:
    """The crossover of one size / channel count / tile from its data rows: the
    :func:`crossover_fraction` of ``(active_tiles / total_tiles, sparse_path_ms["median"] /
    dense_ms["median"])``: the forced sparse path, whatever path the block took."""
    return crossover_fraction([(r["active_tiles"] / r["total_tiles"],
                                r["sparse_path_ms"]["median"] / r["dense_ms"]["median"])
                               for r in rows])


def _r3(x):
    return round(x, 3) if x is not None and math.isfinite(x) else None


def run(args) -> int:
    import torch

    from sparse_detector_ros.config import SparseConfig
    from sparse_detector_ros.sparse import SparseResidualBlock, receptive_halo

    t_start = time.perf_counter()
    if args.quick:
        args.sizes, args.channels, args.tiles = [64], [16], [8, 16]
        args.fractions, args.repeats, args.warmup = [0.1, 1.0], 3, 1
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    repeats = args.repeats
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    crossover = SparseConfig().dense_crossover if args.crossover is None else args.crossover
    out = sys.stdout

    def emit(row):
        out.write(json.dumps(row) + "\n")
        out.flush()

    emit({"bench": "sparse", "kind": "run", "branch": args.branch, "mid_ratio": args.mid_ratio,
          "sizes": args.sizes, "channels": args.channels, "tiles": args.tiles,
          "fractions": args.fractions, "repeats": repeats, "warmup": args.warmup,
          "threads": threads, "crossover_setting": crossover, "seed": args.seed,
          "torch": torch.__version__, "cpu": cpu_name(), "cpu_count": os.cpu_count()})
    cross_rows = []
    best_rows = []
    with torch.inference_mode():
        for size in args.sizes:
            for C in args.channels:
                torch.manual_seed(args.seed)
                branch = _randomize(_make_branch(args.branch, C, args.mid_ratio), args.seed)
                mid = branch[0].out_channels
                hy, _ = receptive_halo(branch)
                g = torch.Generator().manual_seed(args.seed + size + C)
                x0 = torch.randn(1, C, size, size, generator=g)
                variants = _dense_variants(branch, x0, args.dense_variants)
                # pick the fastest dense variant (by median) for this size / channel count
                vt: dict[str, list[float]] = {name: [] for name in variants}
                for name, (fn, xi) in variants.items():
                    for _ in range(args.warmup):
                        fn(xi.clone())
                for _ in range(repeats):      # round robin
                    for name, (fn, xi) in variants.items():
                        vt[name].append(_timer(fn, xi.clone))
                vs = {name: spread(t) for name, t in vt.items()}
                dname = min(vs, key=lambda n: vs[n]["median"])
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
                        for rep in range(repeats):
                            # interleaved, order rotated every repeat (no cache-order bias);
                            # every call gets a freshly written copy of its input (untimed)
                            for j in range(3):
                                jj = (j + rep) % 3
                                times[jj].append(_timer(jobs[jj][0], jobs[jj][1]))
                        dense_s, sparse_s, forced_s = (spread(t) for t in times)
                        path = "dense" if active > crossover else "sparse"
                        # speed-ups from the reported (rounded) medians: the row checks out
                        dmed, smed, fmed = (s["median"] for s in (dense_s, sparse_s, forced_s))
                        speedup = dmed / smed
                        forced_speedup = dmed / fmed
                        m = row_macs(branch, size, B, k)
                        ideal = m["ideal"]
                        row = {
                            "bench": "sparse", "size": size, "channels": C, "mid": mid,
                            "branch": args.branch, "tile": B, "halo": hy,
                            "target_active": frac, "active": round(active, 4),
                            "active_tiles": k, "total_tiles": total,
                            "dense_ms": dense_s, "dense_variant": dname,
                            "sparse_ms": sparse_s, "path": path,
                            "sparse_path_ms": forced_s,
                            "speedup": _r3(speedup),
                            "sparse_path_speedup": _r3(forced_speedup),
                            "dense_macs": m["dense_macs"], "sparse_macs": m["sparse_macs"],
                            "ideal": _r3(ideal) if path == "sparse" else None,
                            "efficiency": _r3(speedup / ideal)
                            if path == "sparse" and ideal else None,
                            "sparse_path_efficiency": _r3(forced_speedup / ideal)
                            if ideal else None,
                            "repeats": repeats, "threads": threads,
                            "crossover_setting": crossover,
                        }
                        emit(row)
                        per_tile.setdefault(B, []).append(row)
                        best_rows.append(row)
                # layout: the same block on an NCHW-stored vs a channels_last-stored map
                if args.layout_check:
                    B = 16 if 16 in args.tiles else args.tiles[0]
                    frac = 0.1 if 0.1 in args.fractions else args.fractions[0]
                    forced.tile_size = B
                    mask = bev_mask(size, size, B, frac, args.seed + B)
                    x_nchw = x0.contiguous()
                    lt = {"nchw": [], "channels_last": []}
                    for rep in range(args.warmup + repeats):
                        a = _timer(lambda xi: forced(xi, mask, inplace=True), x_nchw.clone)
                        b = _timer(lambda xi: forced(xi, mask, inplace=True), x_cl.clone)
                        if rep >= args.warmup:
                            lt["nchw"].append(a)
                            lt["channels_last"].append(b)
                    emit({"bench": "sparse", "kind": "layout", "size": size, "channels": C,
                          "tile": B, "target_active": frac,
                          "sparse_ms": {k: spread(v) for k, v in lt.items()},
                          "dense_ms": {k: v for k, v in vs.items()
                                       if k in ("nchw", "channels_last")}})
                for B, trows in per_tile.items():
                    c = crossover_of(trows)
                    r = {"bench": "sparse", "kind": "crossover", "size": size, "channels": C,
                         "tile": B, "crossover": _r3(c)}
                    cross_rows.append(r)
                    emit(r)
                emit({"bench": "sparse", "kind": "dense_variants", "size": size,
                      "channels": C, "ms": vs, "fastest": dname})
    # summary: best tile at ~10 % active, worst slowdown at 100 %, best-tile crossover
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
    summary["wall_s"] = round(time.perf_counter() - t_start, 1)
    emit(summary)
    return 0
