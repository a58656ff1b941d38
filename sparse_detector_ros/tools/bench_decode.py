"""``sparse-detector bench decode``: PointCloud2 decode and BEV rasterize times, as JSON.

For 30k / 120k / 240k-point clouds in the Velodyne, Ouster and Livox driver layouts it encodes a
spinning-LiDAR-like cloud once, then times :func:`pointcloud.decode` (dense and
``is_dense = false`` clouds) and :class:`bev.Rasterizer` on the CPU (median of ``--repeats``).
"""
from __future__ import annotations

import json
import platform
import time

SIZES = (30_000, 120_000, 240_000)
LAYOUTS = ("velodyne", "ouster", "livox")


def add_arguments(parser) -> None:
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per row (median)")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS))
    parser.add_argument("--device", default="cpu", help="rasterize device (cpu or cuda)")


def synthetic_scan(n: int, seed: int = 0):
    """A cloud shaped like one spinning-LiDAR sweep: rings on the ground plus vertical clutter."""
    import numpy as np

    rng = np.random.default_rng(seed)
    beams = 64
    elev = np.deg2rad(rng.uniform(-24.9, 2.0, beams))
    ring = rng.integers(0, beams, n)
    az = rng.uniform(-np.pi, np.pi, n)
    ground_r = np.clip(1.73 / np.tan(np.maximum(-elev[ring], 1e-3)), 2.0, 120.0)
    r = np.where(rng.random(n) < 0.6, ground_r, rng.uniform(3.0, 80.0, n))
    z = np.where(r == ground_r, -1.73, r * np.tan(elev[ring]))
    pts = np.stack([r * np.cos(az), r * np.sin(az), z, rng.uniform(0, 255, n)], 1)
    t = (az + np.pi) / (2 * np.pi) * 0.1
    return pts.astype(np.float32), ring.astype(np.uint16), t


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return round(times[len(times) // 2] * 1e3, 3)


def run(args) -> int:
    import numpy as np
    import torch

    from ..bev import Rasterizer
    from ..config import GridConfig
    from ..pointcloud import LAYOUTS as ALL_LAYOUTS
    from ..pointcloud import decode, encode

    grid = GridConfig()
    raster = Rasterizer(grid, args.device)
    rows = []
    for layout in args.layouts:
        names = {f.name for f in ALL_LAYOUTS[layout].fields}
        for n in args.sizes:
            pts, ring, t = synthetic_scan(n)
            extra = {}
            if "ring" in names:
                extra["ring"] = ring
            if "line" in names:
                extra["line"] = ring.astype(np.uint8)
            if "time" in names:
                extra["time"] = t
            if "t" in names:
                extra["t"] = (t * 1e9).astype(np.uint32)
            cloud = encode(pts, layout, extra)
            decoded = decode(cloud)
            assert np.array_equal(decoded, pts)
            sparse_cloud = encode(pts, layout, extra, is_dense=False)
            sync = torch.cuda.synchronize if raster.device.type == "cuda" else (lambda: None)

            def raster_once():
                raster(decoded)
                sync()

            rows.append({
                "layout": layout, "points": n, "point_step": cloud.point_step,
                "decode_ms": _median_ms(lambda: decode(cloud), args.repeats),
                "decode_not_dense_ms": _median_ms(lambda: decode(sparse_cloud), args.repeats),
                "rasterize_ms": _median_ms(raster_once, args.repeats),
                "kept": raster(decoded)[1],
            })
    print(json.dumps({
        "bench": "decode",
        "grid": {"shape": list(grid.shape), "channels": grid.channels,
                 "resolution": grid.resolution},
        "rasterize_device": str(raster.device),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(), "processor": platform.processor(),
        "repeats": args.repeats,
        "targets": {"decode_ms_at_200k": 2.0, "rasterize_ms_at_120k_cpu": 10.0},
        "rows": rows,
    }, indent=2))
    return 0
