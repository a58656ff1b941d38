"""Synthetic LiDAR world timings; prints JSON (one object) to stdout.

    python bench/bench_sim.py [--seed 0] [--repeats 5] [--presets hdl64e,os1-128]

Per preset: mean/min wall time of one scan (ray casting + noise + intensity + ground truth),
points and rays; plus scene generation and road-map rasterisation times.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from sparse_detector_ros.sim import PRESETS, generate_scene, get_lidar, render_frame  # noqa: E402
from sparse_detector_ros.sim.stats import isolated_car_points  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--presets", default=",".join(PRESETS))
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    scene = generate_scene(args.seed, duration=2.0)
    t1 = time.perf_counter()
    scene.roadmap()
    t2 = time.perf_counter()
    out = dict(machine=dict(python=platform.python_version(), cpus=os.cpu_count(),
                            numpy=np.__version__),
               scene=dict(seed=args.seed, generate_s=round(t1 - t0, 4),
                          roadmap_s=round(t2 - t1, 4), actors=len(scene.actors),
                          primitives=len(scene.static)),
               scans=[])
    for name in args.presets.split(","):
        lidar = get_lidar(name)
        frame = render_frame(scene, lidar, 0)        # warm-up (ray table)
        times = []
        for i in range(args.repeats):
            s = time.perf_counter()
            render_frame(scene, lidar, i % 21)
            times.append(time.perf_counter() - s)
        out["scans"].append(dict(
            preset=name, beams=lidar.beams, columns=lidar.columns,
            rays=lidar.beams * lidar.columns, points=int(len(frame.points)),
            objects=int(len(frame.boxes)), mean_s=round(float(np.mean(times)), 4),
            min_s=round(float(np.min(times)), 4),
            isolated_car_points=isolated_car_points(lidar)))
    json.dump(out, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
