"""Seeded street scenes: a road network, scenery along it, parked and moving traffic,
pedestrians and cyclists, and the ego vehicle's drive.

:func:`generate_scene` is deterministic for a seed. The scene is static geometry (world
frame ``map``) plus actors whose pose is a function of time, so any frame of a sequence can
be rendered on its own (see :mod:`.frames`).

Class convention: every vehicle is class ``"car"``; ``subtype`` says ``"car"``, ``"van"`` or
``"truck"`` (vans and trucks are bigger). Pedestrians are ``"pedestrian"`` and bicycles with
their riders ``"cyclist"``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import shapes
from .raycast import SURFACE, Primitives
from .roads import Line, Road

CLASSES = ("car", "pedestrian", "cyclist")
FRAME_RATE = 10.0  # Hz
LEAD_IN = 100.0    # metres of main road before the ego's start region


@dataclass
class Actor:
    """A traffic participant moving along a road in road coordinates.

    ``s(t) = s0 + v_s t`` (clamped to the road), ``l(t) = clip(l0 + v_l t, *l_range)``; its
    heading is the road heading plus ``yaw_offset``. Size ``(length, width, height)``.
    """
    id: int
    cls: str
    subtype: str
    size: tuple[float, float, float]
    road: int
    s0: float
    l0: float
    v_s: float = 0.0
    v_l: float = 0.0
    l_range: tuple[float, float] = (-1e9, 1e9)
    yaw_offset: float = 0.0
    shape: Primitives | None = field(default=None, repr=False)
    discs: np.ndarray | None = field(default=None, repr=False)  # (n, 3): x, y, r (local)

    def pose(self, roads: list[Road], t):
        """World (x, y, yaw) at time(s) ``t`` [s]."""
        t = np.asarray(t, dtype=np.float64)
        road = roads[self.road]
        s = np.clip(self.s0 + self.v_s * t, 0.0, road.length)
        l = np.clip(self.l0 + self.v_l * t, *self.l_range)
        x, y, h = road.pose(s, l)
        return x, y, h + self.yaw_offset

    def velocity(self, roads, t, dt=0.05):
        """World (vx, vy, yaw_rate) by central difference."""
        x0, y0, a0 = self.pose(roads, np.asarray(t) - dt)
        x1, y1, a1 = self.pose(roads, np.asarray(t) + dt)
        da = (a1 - a0 + np.pi) % (2 * np.pi) - np.pi
        return (x1 - x0) / (2 * dt), (y1 - y0) / (2 * dt), da / (2 * dt)


@dataclass
class Scene:
    seed: int
    roads: list[Road]
    intersections: list[dict]
    static: Primitives
    actors: list[Actor]
    ego: Actor
    duration: float
    bounds: tuple[float, float, float, float]   # x_min, y_min, x_max, y_max of the map
    _roadmap: object = field(default=None, repr=False)

    @property
    def num_frames(self) -> int:
        return int(round(self.duration * FRAME_RATE)) + 1

    def roadmap(self, resolution: float = 0.2):
        """The rasterised road map (:class:`.roadmap.RoadMap`), computed once."""
        if self._roadmap is None or self._roadmap.resolution != resolution:
            from .roadmap import RoadMap
            self._roadmap = RoadMap.from_scene(self, resolution)
        return self._roadmap


# ----------------------------------------------------------------------------- sizes

def _vehicle_size(rng, subtype):
    if subtype == "truck":
        return rng.uniform(6.5, 9.5), rng.uniform(2.3, 2.55), rng.uniform(2.9, 3.6)
    if subtype == "van":
        return rng.uniform(4.8, 5.9), rng.uniform(1.9, 2.1), rng.uniform(1.9, 2.5)
    return rng.uniform(3.5, 5.2), rng.uniform(1.6, 1.95), rng.uniform(1.38, 1.65)


def _vehicle_subtype(rng):
    u = rng.random()
    return "truck" if u < 0.05 else "van" if u < 0.18 else "car"


def _discs(length, width, margin):
    n = max(1, int(np.ceil(length / width)) + (1 if length > width else 0))
    xs = np.linspace(-length / 2 + width / 2, length / 2 - width / 2, n) if n > 1 else np.zeros(1)
    return np.stack([xs, np.zeros(n), np.full(n, width / 2 + margin)], axis=1)


class _Placer:
    """Time-aware collision checks: a new actor is accepted only if, at every sample time of
    the sequence, its footprint discs keep clear of every actor placed before."""

    def __init__(self, roads, duration):
        self.roads = roads
        self.times = np.linspace(0.0, duration, max(1, int(np.ceil(duration / 0.2)) + 1))
        self.centres = np.zeros((0, len(self.times), 2))   # all discs of all actors
        self.radii = np.zeros(0)
        self.lo = np.zeros((0, 2))      # swept bounding box of each disc
        self.hi = np.zeros((0, 2))

    def _world_discs(self, actor):
        x, y, yaw = actor.pose(self.roads, self.times)
        d = actor.discs
        c, s = np.cos(yaw)[None, :], np.sin(yaw)[None, :]
        wx = x[None, :] + c * d[:, :1] - s * d[:, 1:2]
        wy = y[None, :] + s * d[:, :1] + c * d[:, 1:2]
        return np.stack([wx, wy], axis=-1), d[:, 2]

    def try_add(self, actor) -> bool:
        cen, rad = self._world_discs(actor)
        lo = (cen - rad[:, None, None]).min(axis=(0, 1))
        hi = (cen + rad[:, None, None]).max(axis=(0, 1))
        if len(self.radii):
            # only discs whose swept bounding box meets this actor's need the full check
            near = np.all((self.lo <= hi) & (self.hi >= lo), axis=1)
            if near.any():
                diff = cen[:, None, :, :] - self.centres[None, near, :, :]
                dist = np.sqrt((diff ** 2).sum(-1))                   # (n_new, n_near, T)
                if np.any(dist < (rad[:, None] + self.radii[None, near])[..., None]):
                    return False
        self.centres = np.concatenate([self.centres, cen])
        self.radii = np.concatenate([self.radii, rad])
        self.lo = np.concatenate([self.lo, (cen - rad[:, None, None]).min(axis=1)])
        self.hi = np.concatenate([self.hi, (cen + rad[:, None, None]).max(axis=1)])
        return True


# ----------------------------------------------------------------------------- network

def _network(rng, need_length):
    """Main road (straight or with one curve) and 1-3 perpendicular cross streets."""
    a = LEAD_IN + rng.uniform(40, 110)
    spec = [("line", a)]
    curved = rng.random() < 0.75
    if curved:
        radius = rng.uniform(25, 70)
        angle = np.deg2rad(rng.uniform(25, 90))
        spec.append(("arc", rng.choice([-1, 1]) / radius, angle * radius))
    used = sum(item[-1] for item in spec)
    spec.append(("line", max(80.0, need_length - used)))

    def section(main=False):
        return dict(lane_width=float(rng.uniform(3.2, 3.75)),
                    parking=(bool(rng.random() < 0.8), bool(rng.random() < 0.7)),
                    sidewalk_width=float(rng.uniform(2.8, 4.5)))

    main = Road.chain((-LEAD_IN, 0.0), 0.0, spec, name="main", **section(True))
    roads, intersections = [main], []
    # cross streets on straight pieces, behind and ahead of the ego's start
    s = rng.uniform(20, 60)
    while s < main.length - 40 and len(roads) < 5:
        off = np.searchsorted(main._offsets, s, side="right") - 1
        piece = main.pieces[min(off, len(main.pieces) - 1)]
        if isinstance(piece, Line):
            x, y, h = (float(v[0]) for v in main.pose(np.array([s])))
            ch = h + np.pi / 2 + rng.uniform(-0.12, 0.12)
            left, right = rng.uniform(50, 110), rng.uniform(50, 110)
            kind = rng.random()
            if kind < 0.2:
                right = 0.0      # T junction opening to the left
            elif kind < 0.35:
                left = 0.0       # ... or to the right
            start = (x - right * np.cos(ch), y - right * np.sin(ch))
            cross = Road([Line(start, ch, left + right)], name=f"cross{len(roads)}", **section())
            roads.append(cross)
            intersections.append(dict(roads=(0, len(roads) - 1), s=(s, right),
                                      point=(x, y)))
            s += rng.uniform(70, 160)
        else:
            s += 10.0
    return roads, intersections


def _outside_all(roads, x, y, margin_sidewalk=0.0, skip=None):
    """True where the points keep ``margin_sidewalk`` metres clear of every road's sidewalk
    outer edge (negative margins let them into sidewalks); ``skip`` exempts one road."""
    ok = np.ones(np.shape(x), bool)
    for k, r in enumerate(roads):
        if k == skip:
            continue
        ok &= r.carriageway_distance(x, y) > r.sidewalk_width + margin_sidewalk
    return ok


# ----------------------------------------------------------------------------- scenery

def _scenery(rng, roads):
    parts = []
    S = SURFACE
    for k, road in enumerate(roads):
        for side in (-1, 1):
            hw = road.side_half_width(side)
            sw = road.sidewalk_width
            # buildings, walls and empty lots with bushes along the frontage
            s = rng.uniform(0, 6)
            while s < road.length:
                f = rng.uniform(8, 30)
                u = rng.random()
                sm = s + f / 2
                x, y, h = (float(v[0]) for v in road.pose(np.array([sm])))
                if u < 0.72:       # building
                    depth = rng.uniform(8, 20)
                    height = rng.uniform(4, 16) if rng.random() < 0.85 else rng.uniform(16, 30)
                    setback = rng.uniform(0.3, 5)
                    lc = side * (hw + sw + setback + depth / 2)
                    spec = (-f / 2, f / 2, -depth / 2, depth / 2, 0.0, height)
                    refl, surf = rng.uniform(0.15, 0.5), S["building"]
                elif u < 0.86:     # wall or fence along the sidewalk
                    th = rng.uniform(0.2, 0.35)
                    height = rng.uniform(1.2, 2.6)
                    lc = side * (hw + sw + 0.2 + th / 2)
                    spec = (-f / 2, f / 2, -th / 2, th / 2, 0.0, height)
                    refl, surf = rng.uniform(0.2, 0.45), S["wall"]
                else:              # empty lot: a few bushes
                    spec = None
                    nb = rng.integers(1, 5)
                    ss = sm + rng.uniform(-f / 2, f / 2, nb)
                    ll = side * (hw + sw + rng.uniform(0.5, 4.0, nb))
                    bx, by, _ = road.pose(ss, ll)
                    rr = rng.uniform(0.4, 1.3, nb)
                    ok = _outside_all(roads, bx, by, 0.2 - rr)
                    if ok.any():
                        zc = rr * rng.uniform(0.2, 0.6, nb)
                        parts.append(shapes.spheres(np.stack([bx, by, zc, rr], 1)[ok],
                                                    0.22, S["vegetation"], poro=0.3))
                if spec is not None:
                    cxl, cyl = x - lc * np.sin(h), y + lc * np.cos(h)
                    depth_ = spec[3] - spec[2]
                    gx, gy = np.meshgrid(np.linspace(spec[0], spec[1], int(f / 2.5) + 2),
                                         np.linspace(spec[2], spec[3], int(depth_ / 2.5) + 2))
                    c, si = np.cos(h), np.sin(h)
                    wx, wy = cxl + c * gx - si * gy, cyl + si * gx + c * gy
                    if np.all(_outside_all(roads, wx, wy, 0.15)):
                        b = shapes.boxes([spec], refl, surf).transformed(cxl, cyl, 0.0, h)
                        parts.append(b)
                s += f + (rng.uniform(0, 6) if rng.random() < 0.4 else 0.0)
            # street furniture in the kerb-side strip of the sidewalk
            s = rng.uniform(2, 10)
            while s < road.length:
                lx = side * (hw + 0.55)
                x, y, _ = road.pose(np.array([s]), lx)
                if _outside_all(roads, x, y, 1.5, skip=k)[0]:
                    if rng.random() < 0.6:     # tree: trunk + porous crown
                        th = rng.uniform(2.6, 4.0)      # crown bottom >= ~2 m
                        cr = rng.uniform(1.2, 2.6)
                        parts.append(shapes.cylinders([(x[0], y[0], 0.0, th + 0.3 * cr,
                                                        rng.uniform(0.12, 0.28))],
                                                      0.12, S["trunk"]))
                        parts.append(shapes.spheres([(x[0], y[0], th + 0.8 * cr, cr)], 0.25,
                                                    S["vegetation"], poro=0.35))
                    else:                      # pole: street light or sign
                        x2, y2, _ = road.pose(np.array([s]), side * (hw + 0.3))
                        parts.append(shapes.cylinders([(x2[0], y2[0], 0.0, rng.uniform(3, 9),
                                                        rng.uniform(0.06, 0.14))],
                                                      0.4, S["pole"]))
                s += rng.uniform(9, 28)
    return Primitives.concat(parts) if parts else Primitives()


# ----------------------------------------------------------------------------- actors

def _actors(rng, roads, intersections, placer, density):
    actors = []

    def paint() -> float:
        return float(rng.choice([rng.uniform(0.06, 0.15), rng.uniform(0.15, 0.6)]))

    def add(cls, subtype, size, road, s0, l0, v_s=0.0, v_l=0.0, l_range=(-1e9, 1e9), yaw=0.0):
        L, W, H = size
        aid = len(actors)
        if cls == "car":
            shape = shapes.vehicle(L, W, H, subtype, paint(), aid)
            discs = _discs(L, W, 0.25)
        elif cls == "pedestrian":
            shape = shapes.pedestrian(L, W, H, rng.uniform(0.1, 0.45), aid)
            discs = np.array([[0.0, 0.0, max(L, W) / 2 + 0.05]])
        else:
            shape = shapes.cyclist(L, W, H, rng.uniform(0.1, 0.45), aid)
            discs = _discs(L, W, 0.1)
        a = Actor(aid, cls, subtype, (L, W, H), road, s0, l0, v_s, v_l, l_range, yaw, shape, discs)
        # keep actors off other roads' surfaces unless they are travelling on a road
        if placer.try_add(a):
            actors.append(a)
            return True
        return False

    def in_junction(k, s, l, margin=2.0):
        x, y, _ = roads[k].pose(np.atleast_1d(s), l)
        return not _outside_all(roads, x, y, margin, skip=k)[0]

    for k, road in enumerate(roads):
        lw = road.lane_width
        # parked cars along the kerb
        for side, parked in ((-1, road.parking[0]), (1, road.parking[1])):
            if not parked:
                continue
            s = rng.uniform(1, 8)
            while s < road.length - 6:
                sub = _vehicle_subtype(rng)
                if sub == "truck" and rng.random() < 0.6:
                    sub = "van"
                L, W, H = _vehicle_size(rng, sub)
                l = side * (lw + road.parking_width / 2 + rng.uniform(-0.1, 0.05))
                sm = s + L / 2
                if not in_junction(k, sm, l, 1.0) and not in_junction(k, s, l, 1.0) \
                        and not in_junction(k, s + L, l, 1.0):
                    facing = 0.0 if side < 0 else (np.pi if rng.random() < 0.85 else 0.0)
                    add("car", sub, (L, W, H), k, sm, l, yaw=facing + rng.uniform(-0.04, 0.04))
                gap = rng.uniform(0.8, 6.0) / density
                if rng.random() < 0.3:
                    gap += rng.uniform(8, 30)
                s += L + gap
        # moving cars in both lanes
        n = rng.poisson(road.length / 100 * 2.0 * density)
        for _ in range(n * 2):
            if n <= 0:
                break
            direction = rng.choice([-1, 1])
            sub = _vehicle_subtype(rng)
            L, W, H = _vehicle_size(rng, sub)
            speed = rng.uniform(5, 13) if sub != "truck" else rng.uniform(4, 9)
            if rng.random() < 0.15:
                speed = 0.0    # waiting in traffic
            s0 = rng.uniform(0, road.length)
            l0 = -direction * lw / 2 + rng.uniform(-0.2, 0.2)
            if add("car", sub, (L, W, H), k, s0, l0, v_s=direction * speed,
                   yaw=0.0 if direction > 0 else np.pi):
                n -= 1
        # cyclists along the right edge of each lane
        n = rng.poisson(road.length / 100 * 0.6 * density)
        for _ in range(n * 3):
            if n <= 0:
                break
            direction = rng.choice([-1, 1])
            size = (rng.uniform(1.6, 1.9), rng.uniform(0.55, 0.7), rng.uniform(1.6, 1.85))
            if add("cyclist", "bicycle", size, k, rng.uniform(0, road.length),
                   -direction * (lw - 0.7), v_s=direction * rng.uniform(3, 7),
                   yaw=0.0 if direction > 0 else np.pi):
                n -= 1
        # pedestrians on the sidewalks (walking or standing)
        for side in (-1, 1):
            hw, sw = road.side_half_width(side), road.sidewalk_width
            n = rng.poisson(road.length / 100 * 3.0 * density)
            for _ in range(n * 3):
                if n <= 0:
                    break
                s0 = rng.uniform(0, road.length)
                l0 = side * (hw + rng.uniform(1.2, sw - 0.35))
                size = (rng.uniform(0.5, 0.85), rng.uniform(0.5, 0.7), rng.uniform(1.5, 1.95))
                if rng.random() < 0.3:
                    v, yaw = 0.0, rng.uniform(-np.pi, np.pi)
                else:
                    d = rng.choice([-1, 1])
                    v, yaw = d * rng.uniform(0.8, 1.6), 0.0 if d > 0 else np.pi
                if add("pedestrian", "adult", size, k, s0, l0, v_s=v, yaw=yaw):
                    n -= 1
    # pedestrians on crosswalks (walking across, stopping on the far sidewalk)
    for isec in intersections:
        for k_road, k_other in (isec["roads"], isec["roads"][::-1]):
            road, other = roads[k_road], roads[k_other]
            s_c = isec["s"][0] if k_road == isec["roads"][0] else isec["s"][1]
            for arm in (-1, 1):
                if rng.random() > 0.35 * density:
                    continue
                s0 = s_c + arm * (other.half_width + rng.uniform(0.8, other.sidewalk_width - 0.8))
                if not 0 < s0 < road.length:
                    continue
                lim = road.half_width + 1.5
                d = rng.choice([-1, 1])
                size = (rng.uniform(0.5, 0.85), rng.uniform(0.5, 0.7), rng.uniform(1.5, 1.95))
                add("pedestrian", "adult", size, k_road, s0, -d * rng.uniform(0, lim),
                    v_l=d * rng.uniform(1.0, 1.5), l_range=(-lim, lim), yaw=d * np.pi / 2)
    return actors


def generate_scene(seed: int, duration: float = 5.0, density: float = 1.0) -> Scene:
    """A street scene for ``seed`` with an ego drive of ``duration`` seconds (frames at 10 Hz).

    ``density`` scales the number of traffic participants. Deterministic for a seed.
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 4]))
    ego_speed = rng.uniform(6.0, 12.0)
    ego_s0 = LEAD_IN + rng.uniform(15.0, 70.0)   # road continues well behind the ego
    roads, intersections = _network(rng, ego_s0 + ego_speed * duration + 140.0)
    main = roads[0]
    placer = _Placer(roads, duration)
    ego = Actor(-1, "car", "car", (4.7, 1.9, 1.5), 0, ego_s0,
                -main.lane_width / 2, v_s=ego_speed, discs=_discs(4.7, 1.9, 0.6))
    placer.try_add(ego)
    static = _scenery(rng, roads)
    actors = _actors(rng, roads, intersections, placer, density)
    xs, ys = [], []
    for r in roads:
        x, y, _, _ = r.sample(2.0)
        xs.append(x)
        ys.append(y)
    xs, ys = np.concatenate(xs), np.concatenate(ys)
    m = 50.0
    bounds = (float(xs.min() - m), float(ys.min() - m), float(xs.max() + m), float(ys.max() + m))
    return Scene(int(seed), roads, intersections, static, actors, ego, float(duration), bounds)
