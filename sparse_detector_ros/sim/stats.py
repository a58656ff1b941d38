"""Scan statistics: points, objects, points per car by range, time per scan."""
from __future__ import annotations

import time

import numpy as np

from . import shapes
from .frames import render_frame
from .lidar import LidarModel
from .raycast import cast_rays
from .world import Scene


def isolated_car_points(lidar: LidarModel, ranges=(10.0, 30.0, 50.0), size=(4.5, 1.8, 1.5),
                        yaw_deg=30.0) -> dict:
    """Returns on a lone car (no noise, no dropout) at each range, seen at ``yaw_deg``
    relative to the line of sight -- the textbook points-per-car figure."""
    out = {}
    for r in ranges:
        p = shapes.vehicle(*size, "car", 0.3, 0).transformed(
            float(r), 0.0, -lidar.mount_height, np.deg2rad(yaw_deg))
        buf = cast_rays(p, lidar, -lidar.mount_height, np.random.default_rng(0))
        out[f"{r:g}m"] = int(np.sum((buf.owner == 0) & np.isfinite(buf.t)))
    return out


def scan_statistics(scene: Scene, lidar: LidarModel, frame_index: int = 0, repeats: int = 3
                    ) -> dict:
    """Statistics of one frame, with the mean wall time of ``repeats`` renders (after one
    warm-up render that also builds the road map and the ray table)."""
    frame = render_frame(scene, lidar, frame_index)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        render_frame(scene, lidar, frame_index)
        times.append(time.perf_counter() - t0)
    d = np.hypot(frame.boxes[:, 0], frame.boxes[:, 1])
    cars = frame.labels == "car"
    by_range = {}
    for r in (10, 30, 50):
        m = cars & (np.abs(d - r) <= 5)
        by_range[f"{r}m"] = dict(cars=int(m.sum()),
                                 mean_points=round(float(frame.num_points[m].mean()), 1)
                                 if m.any() else None,
                                 max_points=int(frame.num_points[m].max()) if m.any() else None)
    labels, counts = np.unique(frame.labels.astype(str), return_counts=True)
    return dict(
        lidar=lidar.name, beams=lidar.beams, columns=lidar.columns, scene_seed=scene.seed,
        frame=frame_index, points=int(len(frame.points)),
        rays=int(lidar.beams * lidar.columns),
        objects=int(len(frame.boxes)), objects_by_class=dict(zip(labels.tolist(), counts.tolist())),
        objects_with_points=int(np.sum(frame.num_points > 0)),
        points_per_car_in_scene=by_range,
        points_per_isolated_car=isolated_car_points(lidar),
        seconds_per_scan=round(float(np.mean(times)), 4),
        seconds_per_scan_min=round(float(np.min(times)), 4),
    )
