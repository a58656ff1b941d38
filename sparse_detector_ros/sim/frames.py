"""One LiDAR frame of a scene: ray-cast points with noise, dropout and intensity, plus ground
truth boxes, ego pose and per-point labels.

Sensor model per return (all vectorised):

* range noise: Gaussian with ``lidar.range_noise`` sigma along the ray, clipped at 3 sigma,
  so every point lies within 3 sigma of a scene surface;
* dropout: a return survives with probability ``(1 - dropout) * p_detect`` where
  ``p_detect`` rises with the received signal ``reflectivity * (0.2 + 0.8 cos(incidence)) /
  range^2`` (scaled so that a 10 % target facing the sensor at ``range_at_10pct`` is seen
  half the time) -- dark, grazing and far surfaces lose returns first;
* intensity (float32 0..255, like Velodyne drivers): reflectivity times an incidence term,
  softly falling with range, with 8 % multiplicative noise.

The scan is instantaneous (as a motion-compensated cloud would be); the per-point ``time``
field is the firing time of its column within the 0.1 s revolution.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..boxes import count_points_in_boxes
from .lidar import LidarModel
from .raycast import GROUND, SURFACE, Primitives, cast_rays, ray_grid
from .roadmap import GROUND_REFLECTIVITY
from .world import FRAME_RATE, Scene

_GROUND_REFL = np.zeros(len(SURFACE), np.float32)
for _code, _r in GROUND_REFLECTIVITY.items():
    _GROUND_REFL[_code] = _r


@dataclass
class Frame:
    """One frame. Points and boxes in the sensor frame ``lidar``.

    points (N, 4) float32 x, y, z, intensity; ring (N,) uint16; time (N,) float32 [s];
    column (N,) int32 (firing order of the column); owner (N,) int32 (actor index, -1
    scenery, -2 ground); surface (N,) uint8 (:data:`raycast.SURFACES` code).
    boxes (K, 7) float32 (x, y, z, length, width, height, yaw); labels (K,) class names;
    subtypes (K,); ids (K,) actor ids; num_points (K,) LiDAR points on each object: points
    inside its box grown by the noise margin, with the floor raised just above the noisy
    ground (:func:`counting_boxes` with :func:`count_margin`), so range noise neither drops
    surface returns nor lets ground returns in;
    velocities (K, 2) in the sensor frame [m/s].
    ego_pose: (x, y, z, yaw) of base_link in ``map``; ego_twist: (vx, vy, yaw_rate) in
    base_link; stamp: seconds since the start of the sequence.
    """
    index: int
    stamp: float
    points: np.ndarray
    ring: np.ndarray
    time: np.ndarray
    column: np.ndarray
    owner: np.ndarray
    surface: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    subtypes: np.ndarray
    ids: np.ndarray
    num_points: np.ndarray
    velocities: np.ndarray
    ego_pose: np.ndarray
    ego_twist: np.ndarray
    lidar: LidarModel
    range_true: np.ndarray | None = None


def counting_boxes(boxes, margin: float, lift: float | None = None) -> np.ndarray:
    """(K, 7) boxes grown by ``margin`` on the sides and the top, with the floor raised by
    ``lift`` (default ``margin``): the region whose points a frame's ``num_points`` counts
    (with :func:`sparse_detector_ros.boxes.count_points_in_boxes`)."""
    lift = margin if lift is None else lift
    b = np.array(boxes, dtype=np.float64).reshape(-1, 7)
    b[:, 2] += (margin + lift) / 2
    b[:, 3:5] += 2 * margin
    b[:, 5] += margin - lift
    return b


def count_margin(lidar: LidarModel) -> tuple[float, float]:
    """(margin, lift) of the ground-truth point count: range noise is clipped at 3 sigma, so
    surface returns stray at most 3 sigma from their face (margin) and ground returns at
    most 3 sigma * |sin(lowest elevation)| above the ground (lift); +1 mm for rounding."""
    sigma3 = 3.0 * lidar.range_noise
    low = float(np.min(lidar.elevations))
    return sigma3 + 1e-3, sigma3 * abs(np.sin(min(low, 0.0))) + 1e-3


def sensor_pose(scene: Scene, lidar: LidarModel, t: float):
    """(x, y, z, yaw) of the sensor in ``map`` at time ``t``."""
    x, y, yaw = scene.ego.pose(scene.roads, t)
    return float(x), float(y), float(lidar.mount_height), float(yaw)


def scene_primitives(scene: Scene, t: float, centre, radius: float) -> Primitives:
    """World-frame geometry at time ``t`` within ``radius`` of ``centre`` (x, y)."""
    cx, cy = centre
    parts = []
    st = scene.static
    for kind in Primitives.KINDS:
        x, y, r, _, _ = st.bounds(kind)
        near = np.hypot(x - cx, y - cy) - r < radius
        parts.append(st.select(kind, near))
    for a in scene.actors:
        x, y, yaw = a.pose(scene.roads, t)
        if np.hypot(x - cx, y - cy) < radius + 10.0:
            parts.append(a.shape.transformed(float(x), float(y), 0.0, float(yaw)))
    return Primitives.concat(parts)


def render_frame(scene: Scene, lidar: LidarModel, index: int, *, keep_truth: bool = False
                 ) -> Frame:
    """Frame ``index`` (time ``index / 10`` s) of ``scene`` as seen by ``lidar``."""
    t = index / FRAME_RATE
    rng = np.random.default_rng(np.random.SeedSequence([scene.seed, int(index), 11]))
    sx, sy, sz, syaw = sensor_pose(scene, lidar, t)
    world = scene_primitives(scene, t, (sx, sy), lidar.max_range)
    local = world.inverse_transformed(sx, sy, sz, syaw)
    buf = cast_rays(local, lidar, -sz, rng)
    g = ray_grid(lidar)
    B, W = lidar.shape
    # output order: columns in firing order (clockwise from the rear), rings inside a column
    col_order = np.argsort(lidar.column_times(), kind="stable")
    row_of_ring = np.argsort(g.ring_of_row)
    def grid(a):
        return a[row_of_ring][:, col_order].T.reshape(-1)   # (W * B,), column-major in time
    rng_t = grid(buf.t)
    hit = np.isfinite(rng_t) & (rng_t <= lidar.max_range) & (rng_t >= lidar.min_range)
    idx = np.flatnonzero(hit)
    r_true = rng_t[idx].astype(np.float64)
    dx, dy, dz = (grid(a)[idx].astype(np.float64) for a in (g.dx, g.dy, g.dz))
    owner = grid(buf.owner)[idx]
    surf = grid(buf.surf)[idx].astype(np.uint8)
    refl = grid(buf.refl)[idx].astype(np.float64)
    cos = grid(buf.cos)[idx].astype(np.float64)
    # ground surface from the road map
    is_g = owner == GROUND
    if is_g.any():
        lx, ly = r_true[is_g] * dx[is_g], r_true[is_g] * dy[is_g]
        c, s = np.cos(syaw), np.sin(syaw)
        gs = scene.roadmap().lookup(sx + c * lx - s * ly, sy + s * lx + c * ly)
        surf[is_g] = gs
        refl[is_g] = _GROUND_REFL[gs]
    # dropout
    signal = refl * (0.2 + 0.8 * cos) * (lidar.range_at_10pct / np.maximum(r_true, 0.1)) ** 2 / 0.1
    p_det = 1.0 / (1.0 + np.exp(-np.log(np.maximum(signal, 1e-9)) / 0.35))
    keep = rng.random(len(idx)) < (1.0 - lidar.dropout) * p_det
    # range noise, clipped at 3 sigma
    noise = np.clip(rng.normal(0.0, lidar.range_noise, len(idx)), -3 * lidar.range_noise,
                    3 * lidar.range_noise)
    r = r_true + noise
    inten = 255.0 * refl * (0.35 + 0.65 * cos) * (0.75 + 0.25 / (1.0 + (r_true / 60.0) ** 2))
    inten *= np.exp(rng.normal(0.0, 0.08, len(idx)))
    inten = np.clip(inten, 0, 255)
    sel = np.flatnonzero(keep)
    pts = np.empty((len(sel), 4), np.float32)
    pts[:, 0] = r[sel] * dx[sel]
    pts[:, 1] = r[sel] * dy[sel]
    pts[:, 2] = r[sel] * dz[sel]
    pts[:, 3] = inten[sel]
    flat = idx[sel]
    column = (flat // B).astype(np.int32)       # index in firing order
    ring = (flat % B).astype(np.uint16)
    times = np.sort(lidar.column_times())[column].astype(np.float32)
    owner = owner[sel]
    surf = surf[sel]
    # ground truth
    boxes, labels, subtypes, ids, vels = [], [], [], [], []
    c, s = np.cos(syaw), np.sin(syaw)
    for a in scene.actors:
        ax, ay, ayaw = (float(v) for v in a.pose(scene.roads, t))
        dxw, dyw = ax - sx, ay - sy
        bx, by = c * dxw + s * dyw, -s * dxw + c * dyw
        if np.hypot(bx, by) > lidar.max_range:
            continue
        L, Wd, H = a.size
        yaw = (ayaw - syaw + np.pi) % (2 * np.pi) - np.pi
        boxes.append((bx, by, H / 2 - sz, L, Wd, H, yaw))
        vx, vy, _ = (float(v) for v in a.velocity(scene.roads, t))
        vels.append((c * vx + s * vy, -s * vx + c * vy))
        labels.append(a.cls)
        subtypes.append(a.subtype)
        ids.append(a.id)
    boxes = np.asarray(boxes, np.float32).reshape(-1, 7)
    num = count_points_in_boxes(pts, counting_boxes(boxes, *count_margin(lidar)))
    ex, ey, eyaw = (float(v) for v in scene.ego.pose(scene.roads, t))
    evx, evy, ewz = (float(v) for v in scene.ego.velocity(scene.roads, t))
    twist = np.array([c * evx + s * evy, -s * evx + c * evy, ewz])
    return Frame(
        index=int(index), stamp=float(t), points=pts, ring=ring, time=times, column=column,
        owner=owner, surface=surf, boxes=boxes, labels=np.asarray(labels, dtype=object),
        subtypes=np.asarray(subtypes, dtype=object), ids=np.asarray(ids, np.int32),
        num_points=num.astype(np.int32), velocities=np.asarray(vels, np.float32).reshape(-1, 2),
        ego_pose=np.array([ex, ey, 0.0, eyaw]), ego_twist=twist, lidar=lidar,
        range_true=r_true[sel].astype(np.float32) if keep_truth else None,
    )
