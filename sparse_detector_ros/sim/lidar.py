"""Spinning LiDAR model: beam elevations, azimuth grid, range, mounting, noise, dropout.

Presets are shaped like common sensors from their public data-sheet facts (beam count,
vertical field of view, nominal range, 10 Hz spin). Beam layouts are simplified where the
real sensor is irregular (the HDL-64E keeps its two blocks with their two spacings).

Ray grid: ``beams x columns``. Column ``j`` looks at azimuth
``-pi + (j + 0.5) * 2 pi / columns`` (ascending, REP-103: counter-clockwise from +x).
The head spins clockwise seen from above, as Velodyne and Ouster heads do, starting at the
rear; the per-point ``time`` field is the firing time within the scan, in seconds.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np


def _deg(a):
    return np.deg2rad(np.asarray(a, dtype=np.float64))


def _hdl64e_elevations():
    upper = np.linspace(2.0, -8.33, 32)
    lower = np.linspace(-8.83, -24.33, 32)
    return np.concatenate([upper, lower])


@dataclass(frozen=True)
class LidarModel:
    """A spinning LiDAR. Angles in radians, distances in metres.

    ``elevations``: one angle per beam, in ring order (``ring_order="bottom_up"``: ring 0 is the
    lowest beam, as Velodyne drivers number them; ``"top_down"``: ring 0 is the highest, as
    Ouster drivers do).
    """
    name: str
    elevations: tuple[float, ...]
    columns: int = 2048
    max_range: float = 120.0
    min_range: float = 0.8
    mount_height: float = 1.73     # sensor origin above base_link (ground level) [m]
    range_noise: float = 0.02      # 1-sigma range noise [m]; clipped at 3 sigma
    dropout: float = 0.01          # random loss of returns, independent of the target
    range_at_10pct: float = 100.0  # range at which a 10 % diffuse target is seen half the time
    spin_rate: float = 10.0        # [Hz]; scan period = 1 / spin_rate
    ring_order: str = "bottom_up"

    @property
    def beams(self) -> int:
        return len(self.elevations)

    @property
    def period(self) -> float:
        return 1.0 / self.spin_rate

    @property
    def shape(self) -> tuple[int, int]:
        return (self.beams, self.columns)

    def with_(self, **kw) -> "LidarModel":
        """A copy with some settings changed (``columns=512``, ``max_range=60``, ...)."""
        if "elevations" in kw:
            kw["elevations"] = tuple(float(e) for e in kw["elevations"])
        return replace(self, **kw)

    def azimuths(self) -> np.ndarray:
        return -np.pi + (np.arange(self.columns) + 0.5) * (2 * np.pi / self.columns)

    def column_times(self) -> np.ndarray:
        """Firing time of each column [s]: clockwise spin starting at the rear (azimuth +pi)."""
        az = self.azimuths()
        return ((np.pi - az) % (2 * np.pi)) / (2 * np.pi) * self.period

    def sorted_beams(self) -> tuple[np.ndarray, np.ndarray]:
        """(elevations ascending, ring index of each) -- the caster works bottom-up."""
        el = np.asarray(self.elevations)
        order = np.argsort(el, kind="stable")
        return el[order], order


def _make(name, elevations_deg, **kw) -> LidarModel:
    el = _deg(elevations_deg)
    ring_order = kw.pop("ring_order", "bottom_up")
    el = np.sort(el) if ring_order == "bottom_up" else np.sort(el)[::-1]
    return LidarModel(name=name, elevations=tuple(float(e) for e in el), ring_order=ring_order,
                      **kw)


#: Sensor presets by name. ``columns`` is the azimuth count per revolution at 10 Hz.
PRESETS: dict[str, LidarModel] = {
    # 16 beams, +-15 deg in 2 deg steps, 0.2 deg azimuth at 10 Hz, 100 m.
    "vlp16": _make("vlp16", np.linspace(-15, 15, 16), columns=1800, max_range=100.0,
                   range_at_10pct=100.0),
    # 32 beams, +10.67 .. -30.67 deg (1.33 deg steps), 0.16 deg azimuth at 10 Hz, 100 m.
    "hdl32e": _make("hdl32e", np.linspace(-30.67, 10.67, 32), columns=2250, max_range=100.0,
                    range_at_10pct=80.0),
    # 64 beams in two blocks, +2 .. -24.33 deg, ~0.18 deg azimuth at 10 Hz, 120 m.
    "hdl64e": _make("hdl64e", _hdl64e_elevations(), columns=2048, max_range=120.0,
                    range_at_10pct=80.0),
    # Ouster OS1: 45 deg vertical field of view (+-22.5 deg), uniform, 2048 columns, ~120 m.
    "os1-64": _make("os1-64", np.linspace(-22.5, 22.5, 64), columns=2048, max_range=120.0,
                    range_at_10pct=90.0, ring_order="top_down"),
    "os1-128": _make("os1-128", np.linspace(-22.5, 22.5, 128), columns=2048, max_range=120.0,
                     range_at_10pct=90.0, ring_order="top_down"),
    # Livox Mid-360-like: 360 deg x (-7 .. +52 deg), ~200k points/s, 40 m at 10 %. The real
    # sensor scans a non-repetitive pattern with 4 lasers; here it is a regular 32 x 640 grid
    # (same field of view and point rate) and the ``line`` field numbers 4 bands.
    "mid360": _make("mid360", np.linspace(-7.0, 52.0, 32), columns=640, max_range=70.0,
                    range_at_10pct=40.0, min_range=0.2),
}

DEFAULT_PRESET = "hdl64e"


def get_lidar(preset: str = DEFAULT_PRESET, **overrides) -> LidarModel:
    """A preset by name (``vlp16``, ``hdl32e``, ``hdl64e``, ``os1-64``, ``os1-128``,
    ``mid360``), optionally
    with settings changed, e.g. ``get_lidar("os1-64", columns=512, mount_height=1.9)``."""
    key = preset.lower()
    if key not in PRESETS:
        raise ValueError(f"unknown LiDAR preset {preset!r}: choose one of {', '.join(PRESETS)}")
    lidar = PRESETS[key]
    return lidar.with_(**overrides) if overrides else lidar
