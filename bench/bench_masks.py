"""Computation-mask costs, active-tile fractions and recall on synthetic scans; prints JSON lines.

    python bench/bench_masks.py [--scans 5] [--repeats 20] [--preset hdl64e] [--device cpu]
                                [--backbone]

Scan ``k`` is frame 0 of ``generate_scene(k, duration=1.0)`` (about 120k points with hdl64e),
its nav2 road map written by ``RoadMap.save`` and the sensor pose taken from the frame. One JSON
object a line:

* ``{"kind": "mask", "mask": ..., "scan": k, ...}`` per mask and scan: ``ms`` (the best of
  ``--repeats`` calls: the machine is shared, the minimum is the cost without interference),
  ``tiles16`` (active-tile fraction at tile 16 on the BEV grid, the sparse engine's
  ``reduce_mask``), ``tiles16_ds4`` (the same on the 4x-downsampled mask, as the backbone's
  stage at stride 4 sees it), ``recall`` (objects with >= 5 points whose centre cell is active)
  and ``objects``;
* ``{"kind": "summary", "mask": ...}`` per mask: min / median / max over the scans of ``ms`` and
  ``tiles16``, and the pooled recall;
* with ``--backbone``: ``{"kind": "backbone", "ms": ...}``, the dense network
  (``model.network.SparseBEVNet`` with an all-ones mask) on the same BEV, the yardstick of the
  "mask cost <= 10 % of the dense backbone" target.

The masks: ``dense``; ``occupancy`` with the ``mask.*`` defaults and with the dilation given by
``--dilation`` (default 10, the measured recall knee); ``map_prior`` (every free cell, margin
``mask.map_margin``) and ``map_prior_road`` (road only, ``min_value`` 250, margin 4 m);
``net`` (an untrained :class:`MaskNet`: the cost only; its recall is meaningless);
``union`` (map prior | occupancy). Only the mask is timed, not the rasterisation nor the map
loading (done once, and the map growth once, before the timed calls).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sparse_detector_ros.bev import Rasterizer  # noqa: E402
from sparse_detector_ros.config import GridConfig, MaskConfig  # noqa: E402
from sparse_detector_ros.masks import (ComputationMask, MapPrior, MaskNet,  # noqa: E402
                                       active_tile_fraction)
from sparse_detector_ros.sim import generate_scene, get_lidar, render_frame  # noqa: E402
from sparse_detector_ros.sim.roadmap import ROAD_MIN_VALUE  # noqa: E402
from sparse_detector_ros.sparse import downsample_mask  # noqa: E402


def best_ms(fn, repeats: int) -> float:
    fn()                                                      # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * min(times)


def centre_hits(mask: torch.Tensor, frame, grid: GridConfig) -> tuple[int, int]:
    """(objects with >= 5 points whose centre cell is active, such objects on the grid)."""
    b = frame.boxes
    i = np.floor((b[:, 0] - grid.x_min) / grid.resolution).astype(int)
    j = np.floor((b[:, 1] - grid.y_min) / grid.resolution).astype(int)
    H, W = grid.shape
    sel = (frame.num_points >= 5) & (i >= 0) & (i < H) & (j >= 0) & (j < W)
    m = mask[0].cpu().numpy() > 0
    return int(m[i[sel], j[sel]].sum()), int(sel.sum())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scans", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--preset", default="hdl64e")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dilation", type=int, default=10)
    ap.add_argument("--backbone", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    grid = GridConfig()
    lidar = get_lidar(args.preset)
    rasterizer = Rasterizer(grid, device)
    base = MaskConfig()
    net = MaskNet(grid.channels).to(device).eval()
    configs = {
        "dense": replace(base, mode="dense"),
        "occupancy": replace(base, mode="occupancy"),
        f"occupancy_d{args.dilation}": replace(base, mode="occupancy",
                                               occupancy_dilation=args.dilation),
        "map_prior": replace(base, mode="map_prior"),
        "map_prior_road": replace(base, mode="map_prior", map_margin=4.0),
        "net": replace(base, mode="net"),
        "union": replace(base, mode="union", union="map_prior,occupancy",
                         occupancy_dilation=args.dilation),
    }
    rows: dict[str, list[dict]] = {name: [] for name in configs}
    tmp = Path(tempfile.mkdtemp(prefix="bench_masks_"))
    bev = None
    for k in range(args.scans):
        scene = generate_scene(k, duration=1.0)
        frame = render_frame(scene, lidar, 0)
        yaml_path = scene.roadmap().save(tmp / f"map{k}.yaml")
        pose = (float(frame.ego_pose[0]), float(frame.ego_pose[1]), float(frame.ego_pose[3]))
        points = torch.from_numpy(frame.points).to(device)
        bev, _ = rasterizer(points)
        for name, cfg in configs.items():
            prior = None
            if cfg.mode in ("map_prior", "union"):
                road = name == "map_prior_road"
                prior = MapPrior.from_yaml(yaml_path, ROAD_MIN_VALUE if road else None,
                                           margin=cfg.map_margin)
            cm = ComputationMask(cfg, grid, mask_net=net if cfg.mode == "net" else None,
                                 map_prior=prior)
            res = cm(points, bev, pose)

            def run(cm=cm):
                cm(points, bev, pose)
                if device.type == "cuda":
                    torch.cuda.synchronize()
            ms = best_ms(run, args.repeats)
            hit, n = centre_hits(res.mask, frame, grid)
            row = dict(kind="mask", mask=name, scan=k, points=int(len(frame.points)),
                       ms=round(ms, 3), tiles16=round(res.active_tile_fraction(16), 4),
                       tiles16_ds4=round(active_tile_fraction(downsample_mask(res.mask, 4), 16),
                                         4),
                       active_cells=round(float(res.mask.mean()), 4), recall=hit, objects=n,
                       mode=res.mode, fallback=res.fallback)
            rows[name].append(row)
            print(json.dumps(row), flush=True)
    for name, rs in rows.items():
        ms = [r["ms"] for r in rs]
        tf = [r["tiles16"] for r in rs]
        hit, n = sum(r["recall"] for r in rs), sum(r["objects"] for r in rs)
        print(json.dumps(dict(
            kind="summary", mask=name, scans=len(rs), device=str(device),
            threads=torch.get_num_threads(),
            ms=dict(min=min(ms), median=statistics.median(ms), max=max(ms)),
            tiles16=dict(min=min(tf), median=statistics.median(tf), max=max(tf)),
            tiles16_ds4_median=statistics.median(r["tiles16_ds4"] for r in rs),
            recall=round(hit / n, 4) if n else None, objects=n)), flush=True)
    if args.backbone and bev is not None:
        from sparse_detector_ros.model.description import ModelDescription
        from sparse_detector_ros.model.network import SparseBEVNet
        model = SparseBEVNet(ModelDescription(grid=grid)).to(device).fuse()
        x = bev.contiguous(memory_format=torch.channels_last)
        ones = torch.ones(bev.shape[0], *grid.shape, device=device)

        def dense():
            with torch.no_grad():
                model(x, ones)
            if device.type == "cuda":
                torch.cuda.synchronize()
        print(json.dumps(dict(kind="backbone", ms=round(best_ms(dense, 3), 3),
                              device=str(device))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
