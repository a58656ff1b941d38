"""Road centre lines made of straight and circular pieces, with lanes, parking strips and sidewalks.

A :class:`Road` is a chain of :class:`Line` and :class:`Arc` pieces joined with matching
heading. Positions along it are given in road coordinates ``(s, l)``: ``s`` is the arc length
along the centre line from its start [m], ``l`` the signed lateral offset, positive to the
left of the direction of travel (REP-103: heading about +z, left = +90 deg).

Cross-section, from the centre line outwards on each side (right-hand traffic)::

    | lane (lane_width) | parking strip (parking_width, opt.) | sidewalk (sidewalk_width) |
    0                  lane_width                            half_width                + sidewalk

Vehicles travelling towards +s use the right lane (``l < 0``), towards -s the left lane.
Everything here is vectorised over query points; no Python loop per point.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def wrap_angle(a):
    """Wrap angles to [-pi, pi)."""
    return (np.asarray(a) + np.pi) % (2.0 * np.pi) - np.pi


@dataclass(frozen=True)
class Line:
    """Straight piece from ``start`` with ``heading`` [rad], ``length`` metres long."""
    start: tuple[float, float]
    heading: float
    length: float

    def end_pose(self) -> tuple[float, float, float]:
        x, y = self.start
        return (x + self.length * np.cos(self.heading), y + self.length * np.sin(self.heading),
                self.heading)

    def pose(self, s):
        s = np.asarray(s, dtype=np.float64)
        c, si = np.cos(self.heading), np.sin(self.heading)
        return self.start[0] + s * c, self.start[1] + s * si, np.full_like(s, self.heading)

    def project(self, qx, qy):
        """Return (s, l, d): clamped arc length, signed lateral offset, distance to the piece."""
        c, si = np.cos(self.heading), np.sin(self.heading)
        vx, vy = qx - self.start[0], qy - self.start[1]
        s = vx * c + vy * si
        l = -vx * si + vy * c
        sc = np.clip(s, 0.0, self.length)
        d = np.hypot(s - sc, l)
        return sc, l, d


@dataclass(frozen=True)
class Arc:
    """Circular piece: starts at ``start`` with heading ``heading``; signed ``curvature``
    [1/m] (positive turns left), ``length`` metres of arc."""
    start: tuple[float, float]
    heading: float
    curvature: float
    length: float

    @property
    def radius(self) -> float:  # signed: positive when the centre is on the left
        return 1.0 / self.curvature

    @property
    def center(self) -> tuple[float, float]:
        r = self.radius
        return (self.start[0] - r * np.sin(self.heading), self.start[1] + r * np.cos(self.heading))

    def end_pose(self) -> tuple[float, float, float]:
        x, y, h = self.pose(np.array([self.length]))
        return float(x[0]), float(y[0]), float(h[0])

    def pose(self, s):
        s = np.asarray(s, dtype=np.float64)
        r = self.radius
        cx, cy = self.center
        h = self.heading + self.curvature * s
        return cx + r * np.sin(h), cy - r * np.cos(h), h

    def project(self, qx, qy):
        r = self.radius
        cx, cy = self.center
        vx, vy = qx - cx, qy - cy
        dist_c = np.hypot(vx, vy)
        phi = np.arctan2(vy, vx)
        hq = phi + (np.pi / 2 if self.curvature > 0 else -np.pi / 2)
        half = 0.5 * self.curvature * self.length
        dh = wrap_angle(hq - self.heading - half) + half
        s = dh / self.curvature
        l = np.sign(self.curvature) * (abs(r) - dist_c)
        sc = np.clip(s, 0.0, self.length)
        inside = sc == s
        ex, ey, _ = self.pose(sc)
        d = np.where(inside, np.abs(l), np.hypot(qx - ex, qy - ey))
        return sc, l, d


@dataclass
class Road:
    """A road: chained pieces plus its cross-section (see module docstring)."""
    pieces: list
    lane_width: float = 3.5
    parking: tuple[bool, bool] = (False, False)   # (right side, left side)
    parking_width: float = 2.2
    sidewalk_width: float = 3.0
    name: str = "road"
    _offsets: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        self._offsets = np.concatenate([[0.0], np.cumsum([p.length for p in self.pieces])])

    @classmethod
    def chain(cls, start, heading, spec, **kw) -> "Road":
        """Build from ``spec``: a list of ``("line", length)`` / ``("arc", curvature, length)``."""
        pieces, (x, y), h = [], start, heading
        for item in spec:
            if item[0] == "line":
                p = Line((x, y), h, float(item[1]))
            else:
                p = Arc((x, y), h, float(item[1]), float(item[2]))
            pieces.append(p)
            x, y, h = p.end_pose()
        return cls(pieces, **kw)

    @property
    def length(self) -> float:
        return float(self._offsets[-1])

    def side_half_width(self, side: int) -> float:
        """Carriageway half width on one side (+1 left, -1 right)."""
        park = self.parking[1] if side > 0 else self.parking[0]
        return self.lane_width + (self.parking_width if park else 0.0)

    @property
    def half_width(self) -> float:
        return max(self.side_half_width(-1), self.side_half_width(1))

    def pose(self, s, l=0.0):
        """World (x, y, heading) of road coordinates (s, l); s is clamped to [0, length]."""
        s = np.clip(np.asarray(s, dtype=np.float64), 0.0, self.length)
        l = np.broadcast_to(np.asarray(l, dtype=np.float64), s.shape)
        idx = np.clip(np.searchsorted(self._offsets, s, side="right") - 1, 0, len(self.pieces) - 1)
        x = np.empty_like(s)
        y = np.empty_like(s)
        h = np.empty_like(s)
        for i, p in enumerate(self.pieces):
            m = idx == i
            if np.any(m):
                x[m], y[m], h[m] = p.pose(s[m] - self._offsets[i])
        return x - l * np.sin(h), y + l * np.cos(h), h

    def project(self, qx, qy):
        """Nearest centre-line point of each query: (s, l, distance)."""
        qx = np.asarray(qx, dtype=np.float64)
        qy = np.asarray(qy, dtype=np.float64)
        best_d = np.full(qx.shape, np.inf)
        best_s = np.zeros(qx.shape)
        best_l = np.zeros(qx.shape)
        for off, p in zip(self._offsets, self.pieces):
            s, l, d = p.project(qx, qy)
            m = d < best_d
            best_d = np.where(m, d, best_d)
            best_s = np.where(m, s + off, best_s)
            best_l = np.where(m, l, best_l)
        return best_s, best_l, best_d

    def carriageway_distance(self, qx, qy):
        """How far outside the carriageway (lanes + parking) each point is; <= 0 inside."""
        s, l, d = self.project(qx, qy)
        hw = np.where(l >= 0, self.side_half_width(1), self.side_half_width(-1))
        at_end = (s <= 0) | (s >= self.length)
        return np.where(at_end, d, np.abs(l)) - hw

    def sample(self, step: float = 1.0):
        """Centre-line samples every ``step`` metres: (x, y, heading, s)."""
        s = np.linspace(0.0, self.length, max(2, int(np.ceil(self.length / step)) + 1))
        x, y, h = self.pose(s)
        return x, y, h, s
