"""Vectorised ray casting of a spinning LiDAR against the ground plane, oriented boxes,
vertical cylinders and spheres.

The caster keeps a depth buffer over the ``beams x columns`` ray grid. For each primitive it
works only on the block of rays that can hit it: the azimuth sector of the primitive's
bounding circle and the elevation band of its height range (both found with a few scalar
operations), so a primitive costs a handful of numpy operations over a small block of rays
and never a Python loop per ray. Nearest hit wins, which gives occlusion for free: a car
shows only its faces towards the sensor and leaves an empty shadow behind it.

All geometry is in the sensor frame (REP-103: x forward, y left, z up); rays start at the
origin.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from .lidar import LidarModel

# Surface codes: what each point hit (per-point label in frames, exports and tests).
SURFACES = ("none", "road", "sidewalk", "marking", "terrain", "building", "wall", "pole",
            "vegetation", "trunk", "vehicle", "pedestrian", "cyclist")
SURFACE = {name: i for i, name in enumerate(SURFACES)}

#: owner id of ground hits (actors are >= 0, static scenery is -1).
GROUND = -2
STATIC = -1


@dataclass
class Primitives:
    """Scene geometry as structure-of-arrays, one table per primitive kind.

    boxes: ``box`` (N, 7) = cx, cy, cz, half_length, half_width, half_height, yaw
    cylinders (vertical): ``cyl`` (N, 5) = cx, cy, z_bottom, z_top, radius
    spheres: ``sph`` (N, 4) = cx, cy, cz, radius
    Each kind also has ``*_refl`` (diffuse reflectivity 0..1), ``*_owner`` (actor index or
    -1 for scenery), ``*_surf`` (surface code) and ``*_poro`` (porosity: chance that a ray
    passes through, for foliage).
    """
    box: np.ndarray = field(default_factory=lambda: np.zeros((0, 7)))
    box_refl: np.ndarray = field(default_factory=lambda: np.zeros(0))
    box_owner: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    box_surf: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int8))
    box_poro: np.ndarray = field(default_factory=lambda: np.zeros(0))
    cyl: np.ndarray = field(default_factory=lambda: np.zeros((0, 5)))
    cyl_refl: np.ndarray = field(default_factory=lambda: np.zeros(0))
    cyl_owner: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    cyl_surf: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int8))
    cyl_poro: np.ndarray = field(default_factory=lambda: np.zeros(0))
    sph: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    sph_refl: np.ndarray = field(default_factory=lambda: np.zeros(0))
    sph_owner: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    sph_surf: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int8))
    sph_poro: np.ndarray = field(default_factory=lambda: np.zeros(0))

    KINDS = ("box", "cyl", "sph")
    ATTRS = ("", "_refl", "_owner", "_surf", "_poro")

    def __len__(self) -> int:
        return len(self.box) + len(self.cyl) + len(self.sph)

    @staticmethod
    def concat(parts: list["Primitives"]) -> "Primitives":
        out = Primitives()
        for k in Primitives.KINDS:
            for a in Primitives.ATTRS:
                arrs = [getattr(p, k + a) for p in parts]
                setattr(out, k + a, np.concatenate(arrs) if arrs else getattr(out, k + a))
        return out

    def select(self, kind: str, mask) -> "Primitives":
        out = Primitives()
        for a in self.ATTRS:
            setattr(out, kind + a, getattr(self, kind + a)[mask])
        return out

    def transformed(self, x: float, y: float, z: float, yaw: float) -> "Primitives":
        """Apply the rigid motion 'rotate by yaw about +z, then translate by (x, y, z)'."""
        c, s = np.cos(yaw), np.sin(yaw)
        out = Primitives(**{k + a: getattr(self, k + a) for k in self.KINDS for a in self.ATTRS})

        def move(px, py):
            return x + c * px - s * py, y + s * px + c * py

        b = self.box.copy()
        b[:, 0], b[:, 1] = move(self.box[:, 0], self.box[:, 1])
        b[:, 2] += z
        b[:, 6] += yaw
        cy = self.cyl.copy()
        cy[:, 0], cy[:, 1] = move(self.cyl[:, 0], self.cyl[:, 1])
        cy[:, 2:4] += z
        sp = self.sph.copy()
        sp[:, 0], sp[:, 1] = move(self.sph[:, 0], self.sph[:, 1])
        sp[:, 2] += z
        out.box, out.cyl, out.sph = b, cy, sp
        return out

    def inverse_transformed(self, x: float, y: float, z: float, yaw: float) -> "Primitives":
        """Express world geometry in a frame at (x, y, z, yaw) -- e.g. the sensor frame."""
        c, s = np.cos(yaw), np.sin(yaw)
        tx, ty = -(c * x + s * y), -(-s * x + c * y)
        return self.transformed(tx, ty, -z, -yaw)

    def bounds(self, kind: str):
        """(cx, cy, bounding radius, z_low, z_high) per primitive of one kind."""
        if kind == "box":
            a = self.box
            rad = np.hypot(a[:, 3], a[:, 4])
            return a[:, 0], a[:, 1], rad, a[:, 2] - a[:, 5], a[:, 2] + a[:, 5]
        if kind == "cyl":
            a = self.cyl
            return a[:, 0], a[:, 1], a[:, 4], a[:, 2], a[:, 3]
        a = self.sph
        return a[:, 0], a[:, 1], a[:, 3], a[:, 2] - a[:, 3], a[:, 2] + a[:, 3]


@dataclass
class RayGrid:
    """Per-lidar constant ray data, rows sorted by elevation ascending."""
    dx: np.ndarray
    dy: np.ndarray
    dz: np.ndarray
    inv_dz: np.ndarray
    dxy2: np.ndarray
    elev: np.ndarray        # (B,) ascending
    ring_of_row: np.ndarray  # (B,)
    dtheta: float


@lru_cache(maxsize=8)
def ray_grid(lidar: LidarModel) -> RayGrid:
    el, order = lidar.sorted_beams()
    ring = np.empty_like(order)
    ring[:] = order  # row r (sorted) is ring order[r] in the sensor's numbering
    az = lidar.azimuths()
    ce, se = np.cos(el)[:, None], np.sin(el)[:, None]
    dx = (ce * np.cos(az)[None, :]).astype(np.float32)
    dy = (ce * np.sin(az)[None, :]).astype(np.float32)
    dz = np.broadcast_to(se, dx.shape).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv_dz = np.where(dz != 0, 1.0 / dz, np.float32(1e30)).astype(np.float32)
    for a in (dx, dy, dz, inv_dz):
        a.setflags(write=False)
    dxy2 = (dx * dx + dy * dy).astype(np.float32)
    dxy2.setflags(write=False)
    return RayGrid(dx, dy, dz, inv_dz, dxy2, el, ring, 2 * np.pi / lidar.columns)


def _column_segments(az_c, half, dtheta, W):
    """Column slices [(c0, c1), ...] that cover azimuths az_c +- half (with wrap-around)."""
    if half >= np.pi - dtheta:
        return [(0, W)]
    lo = int(np.floor((az_c - half + np.pi) / dtheta - 0.5))
    hi = int(np.ceil((az_c + half + np.pi) / dtheta - 0.5)) + 1
    if lo < 0:
        return [(lo + W, W), (0, hi)] if hi > 0 else [(lo + W, hi + W)]
    if hi > W:
        return [(lo, W), (0, hi - W)] if lo < W else [(lo - W, hi - W)]
    return [(lo, hi)]


def _blocks(prims: Primitives, kind: str, grid: RayGrid, max_range: float, W: int,
            cull: bool = True):
    """Yield (index, row slice, column slice) of the ray blocks each primitive can touch
    (``cull=False``: every primitive against all rays -- the reference for tests)."""
    cx, cy, rad, zlo, zhi = prims.bounds(kind)
    if len(cx) == 0:
        return
    if not cull:
        for i in range(len(cx)):
            yield i, slice(0, len(grid.elev)), slice(0, W)
        return
    d = np.hypot(cx, cy)
    keep = (d - rad) < max_range
    az = np.arctan2(cy, cx)
    with np.errstate(divide="ignore", invalid="ignore"):
        half = np.where(d > rad, np.arcsin(np.clip(rad / np.maximum(d, 1e-9), 0, 1)), np.pi)
    rmin = np.maximum(d - rad, 0.0)
    rmax = d + rad
    el_hi = np.maximum(np.arctan2(zhi, rmin), np.arctan2(zhi, rmax))
    el_lo = np.minimum(np.arctan2(zlo, rmin), np.arctan2(zlo, rmax))
    b0 = np.searchsorted(grid.elev, el_lo - 1e-9, side="left")
    b1 = np.searchsorted(grid.elev, el_hi + 1e-9, side="right")
    keep &= b1 > b0
    for i in np.flatnonzero(keep):
        rows = slice(int(b0[i]), int(b1[i]))
        for c0, c1 in _column_segments(az[i], half[i] + grid.dtheta, grid.dtheta, W):
            yield i, rows, slice(c0, c1)


@dataclass
class DepthBuffer:
    t: np.ndarray       # range of the nearest hit (inf: none)
    cos: np.ndarray     # |cos| of the incidence angle
    owner: np.ndarray   # actor index, STATIC or GROUND
    surf: np.ndarray    # surface code
    refl: np.ndarray    # diffuse reflectivity

    def update(self, sub, t, cos, hit, owner, surf, refl):
        better = hit & (t < self.t[sub])
        if not better.any():
            return
        np.copyto(self.t[sub], t, where=better)
        np.copyto(self.cos[sub], cos, where=better)
        self.owner[sub][better] = owner
        self.surf[sub][better] = surf
        self.refl[sub][better] = refl


def _porous(hit, poro, rng):
    if poro > 0:
        hit &= rng.random(hit.shape, dtype=np.float32) >= poro
    return hit


def cast_rays(prims: Primitives, lidar: LidarModel, ground_z: float, rng: np.random.Generator,
              cull: bool = True) -> DepthBuffer:
    """Nearest hit of every ray against ground plane ``z = ground_z`` and ``prims`` (sensor
    frame). Returns the depth buffer with rows sorted by elevation (see :func:`ray_grid`)."""
    g = ray_grid(lidar)
    B, W = lidar.shape
    rmin = np.float32(lidar.min_range)
    f32 = np.float32
    with np.errstate(divide="ignore", invalid="ignore"):
        tg = (f32(ground_z) * g.inv_dz).astype(np.float32)
    ground = (g.dz < 0) & (tg <= lidar.max_range * 1.05)
    buf = DepthBuffer(
        t=np.where(ground, tg, np.inf).astype(np.float32),
        cos=np.abs(g.dz).astype(np.float32),
        owner=np.full((B, W), GROUND, np.int32),
        surf=np.zeros((B, W), np.int8),
        refl=np.zeros((B, W), np.float32),
    )
    # --- oriented boxes (slab test in the box frame)
    bx = prims.box
    for i, rows, cols in _blocks(prims, "box", g, lidar.max_range, W, cull):
        sub = (rows, cols)
        cx, cy, cz, hx, hy, hz, yaw = (float(v) for v in bx[i])
        c, s = f32(np.cos(yaw)), f32(np.sin(yaw))
        dx, dy = g.dx[sub], g.dy[sub]
        ldx = dx * c + dy * s
        ldy = dy * c - dx * s
        lcx, lcy = cx * c + cy * s, -cx * s + cy * c  # box centre in its own axes
        with np.errstate(divide="ignore", invalid="ignore"):
            ix = f32(1.0) / ldx
            iy = f32(1.0) / ldy
        t1 = (f32(lcx - hx)) * ix
        t2 = (f32(lcx + hx)) * ix
        tminx = np.minimum(t1, t2)
        tmax = np.maximum(t1, t2)
        t1 = (f32(lcy - hy)) * iy
        t2 = (f32(lcy + hy)) * iy
        tminy = np.minimum(t1, t2)
        np.minimum(tmax, np.maximum(t1, t2), out=tmax)
        izv = g.inv_dz[sub]
        t1 = f32(cz - hz) * izv
        t2 = f32(cz + hz) * izv
        tminz = np.minimum(t1, t2)
        np.minimum(tmax, np.maximum(t1, t2), out=tmax)
        tnear = np.maximum(np.maximum(tminx, tminy), tminz)
        hit = (tnear <= tmax) & (tnear > rmin)
        if not hit.any():
            continue
        hit = _porous(hit, prims.box_poro[i], rng)
        cos = np.where(tnear == tminx, np.abs(ldx), np.where(tnear == tminy, np.abs(ldy),
                                                               np.abs(g.dz[sub])))
        buf.update(sub, tnear, cos, hit, prims.box_owner[i], prims.box_surf[i], prims.box_refl[i])
    # --- vertical cylinders (side + caps)
    cyl = prims.cyl
    for i, rows, cols in _blocks(prims, "cyl", g, lidar.max_range, W, cull):
        sub = (rows, cols)
        cx, cy, z0, z1, r = (float(v) for v in cyl[i])
        dx, dy, dz = g.dx[sub], g.dy[sub], g.dz[sub]
        a = g.dxy2[sub]
        # closest approach in xy, then the chord: stable for thin and far cylinders
        t0 = (f32(cx) * dx + f32(cy) * dy) / a
        px, py = t0 * dx - f32(cx), t0 * dy - f32(cy)
        disc = f32(r * r) - (px * px + py * py)
        half = np.sqrt(np.maximum(disc, 0) / a)
        ts = t0 - half
        zs = ts * dz
        hit_s = (disc >= 0) & (ts > rmin) & (zs >= z0) & (zs <= z1)
        sq = np.sqrt(np.maximum(disc, 0) * a)   # r * |cos(incidence)|
        izv = g.inv_dz[sub]
        tc = np.where(dz > 0, f32(z0), f32(z1)) * izv
        px, py = tc * dx - f32(cx), tc * dy - f32(cy)
        hit_c = (tc > rmin) & (px * px + py * py <= f32(r * r))
        t = np.where(hit_s, ts, np.inf).astype(np.float32)
        use_c = hit_c & (tc < t)
        t = np.where(use_c, tc, t)
        hit = hit_s | hit_c
        if not hit.any():
            continue
        hit = _porous(hit, prims.cyl_poro[i], rng)
        cos = np.where(use_c, np.abs(dz), np.clip(sq / f32(r), 0, 1))
        buf.update(sub, t, cos, hit, prims.cyl_owner[i], prims.cyl_surf[i], prims.cyl_refl[i])
    # --- spheres
    sph = prims.sph
    for i, rows, cols in _blocks(prims, "sph", g, lidar.max_range, W, cull):
        sub = (rows, cols)
        cx, cy, cz, r = (float(v) for v in sph[i])
        dx, dy, dz = g.dx[sub], g.dy[sub], g.dz[sub]
        t0 = f32(cx) * dx + f32(cy) * dy + f32(cz) * dz     # closest approach, then chord
        px, py, pz = t0 * dx - f32(cx), t0 * dy - f32(cy), t0 * dz - f32(cz)
        disc = f32(r * r) - (px * px + py * py + pz * pz)
        sq = np.sqrt(np.maximum(disc, 0))
        t = t0 - sq
        hit = (disc >= 0) & (t > rmin)
        if not hit.any():
            continue
        hit = _porous(hit, prims.sph_poro[i], rng)
        buf.update(sub, t, sq / f32(r), hit, prims.sph_owner[i], prims.sph_surf[i],
                   prims.sph_refl[i])
    return buf


def surface_distance(prims: Primitives, ground_z: float, points: np.ndarray,
                     chunk: int = 4096) -> np.ndarray:
    """Distance of each point (N, >=3) to the nearest surface of the scene: the ground plane
    and the faces of every box, cylinder and sphere (exact distance fields). For checks."""
    p = np.asarray(points, dtype=np.float64)[:, :3]
    out = np.abs(p[:, 2] - ground_z)
    for s in range(0, len(p), chunk):
        q = p[s:s + chunk]
        best = out[s:s + chunk]
        if len(prims.box):
            b = prims.box
            dx = q[:, None, 0] - b[None, :, 0]
            dy = q[:, None, 1] - b[None, :, 1]
            c, sn = np.cos(b[:, 6])[None], np.sin(b[:, 6])[None]
            d = np.stack([np.abs(c * dx + sn * dy) - b[None, :, 3],
                          np.abs(-sn * dx + c * dy) - b[None, :, 4],
                          np.abs(q[:, None, 2] - b[None, :, 2]) - b[None, :, 5]], -1)
            sd = np.linalg.norm(np.maximum(d, 0), axis=-1) + np.minimum(d.max(-1), 0)
            best = np.minimum(best, np.abs(sd).min(1))
        if len(prims.cyl):
            cy = prims.cyl
            dr = (np.hypot(q[:, None, 0] - cy[None, :, 0], q[:, None, 1] - cy[None, :, 1])
                  - cy[None, :, 4])
            mid, half = (cy[:, 2] + cy[:, 3]) / 2, (cy[:, 3] - cy[:, 2]) / 2
            dz = np.abs(q[:, None, 2] - mid[None]) - half[None]
            d = np.stack([dr, dz], -1)
            sd = np.linalg.norm(np.maximum(d, 0), axis=-1) + np.minimum(d.max(-1), 0)
            best = np.minimum(best, np.abs(sd).min(1))
        if len(prims.sph):
            sp = prims.sph
            dist = np.linalg.norm(q[:, None, :] - sp[None, :, :3], axis=-1) - sp[None, :, 3]
            best = np.minimum(best, np.abs(dist).min(1))
        out[s:s + chunk] = best
    return out
