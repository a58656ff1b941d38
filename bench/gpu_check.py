#!/usr/bin/env python3
"""GPU check of the CuPy kernels: cupy backend vs torch backend vs dense, one JSON document.

On a machine with a CUDA GPU (and CuPy), for one BEV-sized map it runs every op of the sparse
engine through both backends and compares them (``max_abs_err``; reduce_mask: identical
indices), times them with CUDA events (median ms over ``--repeats``, after ``--warmup``), and
does the same for the sparse residual block (``sparse_detector_ros.sparse.blocks``, when
present) against its dense reference. ``dense_ms`` of an op is a full-map copy of the same
tensor (memory-bandwidth yardstick); scatter timings include the ``clone`` of ``base`` they
write into. Exit status: 0 all equal, 1 a mismatch or an error,
2 no GPU / no CuPy (with a message on stderr).

    python bench/gpu_check.py                 # 1 x 64 x 512 x 512, tile 16, 10 % active
    python bench/gpu_check.py --size 1024 --channels 128 --density 0.2
    python bench/gpu_check.py --cpu-smoke     # self-test of this script on the CPU (torch
                                              # backend in both slots; checks no kernel)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from sparse_detector_ros.sparse import cupy_backend, torch_backend  # noqa: E402


def _timer(device: torch.device, warmup: int, repeats: int):
    def run(fn) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize(device)
                times.append(a.elapsed_time(b))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return round(statistics.median(times), 4)
    return run


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    if a.numel() == 0:
        return 0.0
    return float((a.double() - b.double()).abs().max())


def _mask(N: int, H: int, W: int, density: float, device, seed: int) -> torch.Tensor:
    """Blobby 0/1 mask: ``density`` of 8x8 cell blocks on (random, so tiles are partly filled)."""
    g = torch.Generator().manual_seed(seed)
    coarse = (torch.rand(N, -(-H // 8), -(-W // 8), generator=g) < density).float()
    fine = (torch.rand(N, H, W, generator=g) < 0.5).float()
    m = coarse.repeat_interleave(8, 1).repeat_interleave(8, 2)[:, :H, :W] * fine
    return m.to(device)


def check_ops(cb, tb, device, args, timeit) -> list[dict]:
    N, C, H, W, B, h = args.batch, args.channels, args.size, args.size, args.tile, 1
    g = torch.Generator().manual_seed(args.seed)
    mask = _mask(N, H, W, args.density, device, args.seed)
    x = torch.randn(N, C, H, W, generator=g).to(device)
    xl = x.permute(0, 2, 3, 1).contiguous()
    rows = []

    def row(op, fn):
        try:
            rows.append({"op": op, **fn()})
        except Exception as e:  # keep going: report every op
            rows.append({"op": op, "error": f"{type(e).__name__}: {e}"})

    def reduce():
        out = {}
        for pooling in ("max", "avg"):
            ci, ck = cb.reduce_mask(mask, B, B, 0, 0.1, pooling)
            ti, tk = tb.reduce_mask(mask, B, B, 0, 0.1, pooling)
            out[pooling] = {"K": ck, "equal": bool(ck == tk and torch.equal(ci.cpu(), ti.cpu()))}
        out["ms"] = {"cupy": timeit(lambda: cb.reduce_mask(mask, B, B)),
                     "torch": timeit(lambda: tb.reduce_mask(mask, B, B))}
        out["ok"] = all(out[p]["equal"] for p in ("max", "avg"))
        return out

    row("reduce_mask", reduce)
    idx, K = tb.reduce_mask(mask, B, B)
    tile, off = B + 2 * h, -h
    for layout, t in (("NCHW", x), ("NHWC", xl)):
        def gather(layout=layout, t=t):
            err = _err(cb.gather(t, idx, tile, B, off, layout),
                       tb.gather(t, idx, tile, B, off, layout))
            errs = {}
            for dt in (torch.float16, torch.bfloat16):
                td = t.to(dt)
                errs[str(dt)] = _err(cb.gather(td, idx, tile, B, off, layout),
                                     tb.gather(td, idx, tile, B, off, layout))
            return {"layout": layout, "K": K, "max_abs_err": err, "max_abs_err_16bit": errs,
                    "ok": err == 0 and all(v == 0 for v in errs.values()),
                    "ms": {"cupy": timeit(lambda: cb.gather(t, idx, tile, B, off, layout)),
                           "torch": timeit(lambda: tb.gather(t, idx, tile, B, off, layout)),
                           "dense": timeit(lambda: t.clone())}}
        row("gather", gather)

        def scatter(layout=layout, t=t):
            tiles = tb.gather(t, idx, tile, B, off, layout)
            out = {"layout": layout, "K": K}
            ok = True
            for add in (False, True):
                # overwrite: the B x B centres (non-overlapping); add: the overlapping halo tiles
                src = (tiles[:, :, h:h + B, h:h + B] if layout == "NCHW"
                       else tiles[:, h:h + B, h:h + B])
                s, o = (src.contiguous(), 0) if not add else (tiles, off)
                c = cb.scatter(s, idx, t, B, o, add=add, inplace=False, layout=layout)
                r = tb.scatter(s, idx, t, B, o, add=add, inplace=False, layout=layout)
                err = _err(c, r)
                ok = ok and err <= (1e-5 if add else 0.0)
                key = "add" if add else "overwrite"
                out[key] = {"max_abs_err": err, "ms": {
                    "cupy": timeit(lambda: cb.scatter(s, idx, t.clone(), B, o, add=add,
                                                      layout=layout)),
                    "torch": timeit(lambda: tb.scatter(s, idx, t.clone(), B, o, add=add,
                                                       layout=layout)),
                    "dense": timeit(lambda: t.clone())}}
            out["ok"] = ok
            return out
        row("scatter", scatter)
    return rows


def check_block(device, args, timeit, backends) -> dict:
    try:
        from sparse_detector_ros.sparse import blocks
    except ImportError as e:
        return {"skipped": f"sparse_detector_ros.sparse.blocks not importable: {e}"}
    try:
        torch.manual_seed(args.seed)
        block = blocks.SparseResidualBlock(blocks.bottleneck_branch(args.channels),
                                           tile_size=args.tile, dense_crossover=1.0)
        block = block.to(device).fuse()
        N, C, H = args.batch, args.channels, args.size
        x = torch.randn(N, C, H, H, device=device).contiguous(memory_format=torch.channels_last)
        mask = _mask(N, H, H, args.density, device, args.seed)
        out = {}
        with torch.inference_mode():
            ref = block.dense_reference(x, mask)
            out["dense_ms"] = timeit(lambda: block.dense_reference(x, mask))
            ok = True
            for name in backends:
                block.backend = name
                y = block(x, mask)
                err = _err(y, ref)
                ok = ok and err <= 1e-3
                out[name] = {"path": block.last_path,
                             "active": round(block.last_active_fraction, 4),
                             "max_abs_err_vs_dense": err, "ms": timeit(lambda: block(x, mask))}
        out["ok"] = ok
        return out
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}", "ok": False}


def check_network(device, args, timeit, backends) -> dict:
    """The shipped detector network (``SparseBEVNet`` with its description's sizes, seeded
    random weights) on one random BEV and mask: the sparse network on ``device`` with each
    backend against the same sparse network on the CPU with the torch backend (same algorithm:
    equal everywhere to float tolerance), and timed sparse vs dense (all-ones mask)."""
    from sparse_detector_ros.config import SparseConfig
    from sparse_detector_ros.model import load_description
    from sparse_detector_ros.model.network import SparseBEVNet

    desc = load_description()
    H, W = desc.grid.shape
    g = torch.Generator().manual_seed(args.seed)
    bev = (torch.rand(1, desc.channels, H, W, generator=g) < 0.05).float()
    mask = _mask(1, H, W, args.density, torch.device("cpu"), args.seed)

    def build(backend: str) -> SparseBEVNet:
        torch.manual_seed(0)
        return SparseBEVNet(desc, SparseConfig(backend=backend, dense_crossover=1.0)).fuse()

    out: dict = {}
    ok = True
    with torch.inference_mode():
        ref, ref_active = build("torch")(bev, mask)
        for name in backends:
            net = build(name).to(device)
            b, m = bev.to(device), mask.to(device)
            head, active = net(b, m)
            err = max(float((head[k].cpu() - ref[k]).abs().max()) for k in head)
            same_active = bool(torch.equal(active.cpu(), ref_active))
            ones = torch.ones_like(m)
            out[name] = {"active": round(net.stem.last_active_fraction, 4),
                         "max_abs_err_vs_cpu_torch": err, "same_active_cells": same_active,
                         "sparse_ms": timeit(lambda: net(b, m)),
                         "dense_ms": timeit(lambda: net(b, ones))}
            ok = ok and err <= 1e-3 and same_active
    out["ok"] = ok
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tile", type=int, default=16)
    p.add_argument("--density", type=float, default=0.1, help="fraction of 8x8 blocks on")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu-smoke", action="store_true",
                   help="run this script's logic on the CPU with the torch backend in the cupy "
                        "slot (tests the script, not the kernels)")
    args = p.parse_args(argv)

    if args.cpu_smoke:
        device, cb, backends = torch.device("cpu"), torch_backend, ("torch",)
    else:
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA GPU visible to torch (torch.cuda.is_available() is False); "
                  "nothing to check. Run it on a machine with a GPU, CUDA torch and "
                  "cupy-cuda12x/13x.", file=sys.stderr)
            return 2
        if not cupy_backend.available():
            print("gpu_check: the CuPy backend is not usable (is cupy-cuda12x/13x installed for "
                  "this CUDA?); cupy_backend.available() is False.", file=sys.stderr)
            return 2
        device, cb, backends = torch.device("cuda"), cupy_backend, ("cupy", "torch")

    timeit = _timer(device, args.warmup, args.repeats)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "config": vars(args)}
    try:
        import cupy
        report["cupy"] = cupy.__version__
    except Exception:
        report["cupy"] = None
    with torch.inference_mode():
        report["ops"] = check_ops(cb, torch_backend, device, args, timeit)
    report["block"] = check_block(device, args, timeit, backends)
    try:
        report["network"] = check_network(device, args, timeit, backends)
    except Exception as e:  # report, do not hide the op results
        report["network"] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    report["ok"] = (all(r.get("ok", False) for r in report["ops"])
                    and report["block"].get("ok", True) and report["network"]["ok"])
    print(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
