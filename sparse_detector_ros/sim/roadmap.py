"""The scene's ground as a raster: surface classes for the ray caster (road, sidewalk,
markings, terrain) and the nav2 ``map_server`` pair (YAML + PNG) for the map-prior mask.

Rasters follow the project grid convention (see ``bev.py``: row = x index, col = y index):
``surface[i, j]`` is the cell centred at ``origin + ((i + 0.5) res, (j + 0.5) res)`` in the
``map`` frame. Reading and writing the nav2 pair (``masks.load_map`` / ``masks.save_map``) is
the one place where rasters meet the image's own row order.

nav2 occupancy values in the PNG (``negate: 0``, ``mode: trinary``): drivable road 255
(free), sidewalks and crossings 230 (also free, but told apart from the road), everything
else 0 (occupied). A reader that wants the road only keeps pixels >= ``ROAD_MIN_VALUE``
(``masks.road_raster(..., min_value=ROAD_MIN_VALUE)``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..masks import save_map
from .raycast import SURFACE

ROAD_VALUE, WALKABLE_VALUE, OFF_VALUE = 255, 230, 0
#: smallest grey value of a road pixel: ``min_value`` for ``masks.road_raster``, road only
ROAD_MIN_VALUE = 250
#: diffuse reflectivity of each ground surface code
GROUND_REFLECTIVITY = {SURFACE["road"]: 0.08, SURFACE["sidewalk"]: 0.22,
                       SURFACE["marking"]: 0.7, SURFACE["terrain"]: 0.15}


@dataclass
class RoadMap:
    surface: np.ndarray        # (X, Y) uint8 surface codes (road, sidewalk, marking, terrain)
    origin: tuple[float, float]
    resolution: float

    @property
    def shape(self):
        """``(X, Y)``: cells along x and along y."""
        return self.surface.shape

    @property
    def drivable(self) -> np.ndarray:
        s = self.surface
        return (s == SURFACE["road"]) | (s == SURFACE["marking"])

    @property
    def walkable(self) -> np.ndarray:
        return self.surface == SURFACE["sidewalk"]

    def occupancy_image(self) -> np.ndarray:
        """``(X, Y)`` uint8 nav2 grey values in the project convention (row = x index)."""
        img = np.full(self.shape, OFF_VALUE, np.uint8)
        img[self.walkable] = WALKABLE_VALUE
        img[self.drivable] = ROAD_VALUE
        return img

    def lookup(self, x, y) -> np.ndarray:
        """Surface code at map-frame points (terrain outside the raster)."""
        i = np.floor((np.asarray(x) - self.origin[0]) / self.resolution).astype(np.int64)
        j = np.floor((np.asarray(y) - self.origin[1]) / self.resolution).astype(np.int64)
        X, Y = self.shape
        ok = (i >= 0) & (i < X) & (j >= 0) & (j < Y)
        out = np.full(np.shape(x), SURFACE["terrain"], np.uint8)
        out[ok] = self.surface[i[ok], j[ok]]
        return out

    @classmethod
    def from_scene(cls, scene, resolution: float = 0.2) -> "RoadMap":
        x0, y0, x1, y1 = scene.bounds
        X = int(np.ceil((x1 - x0) / resolution))
        Y = int(np.ceil((y1 - y0) / resolution))
        surf = np.full((X, Y), SURFACE["terrain"], np.uint8)
        roads = scene.roads
        road_mask = np.zeros((X, Y), bool)
        walk_mask = np.zeros((X, Y), bool)
        mark_mask = np.zeros((X, Y), bool)
        windows = []
        for road in roads:
            rx, ry, _, _ = road.sample(2.0)
            pad = road.half_width + road.sidewalk_width + 2
            i0 = max(0, int((rx.min() - pad - x0) / resolution))
            i1 = min(X, int((rx.max() + pad - x0) / resolution) + 1)
            j0 = max(0, int((ry.min() - pad - y0) / resolution))
            j1 = min(Y, int((ry.max() + pad - y0) / resolution) + 1)
            gx = x0 + (np.arange(i0, i1) + 0.5) * resolution
            gy = y0 + (np.arange(j0, j1) + 0.5) * resolution
            GX, GY = np.meshgrid(gx, gy, indexing="ij")
            s, l, d = road.project(GX, GY)
            hw = np.where(l >= 0, road.side_half_width(1), road.side_half_width(-1))
            ends = (s <= 0) | (s >= road.length)
            out = np.where(ends, d, np.abs(l)) - hw
            win = (slice(i0, i1), slice(j0, j1))
            windows.append((win, GX, GY, s, l, out))
            road_mask[win] |= out <= 0
            walk_mask[win] |= (out > 0) & (out <= road.sidewalk_width)
        # markings: dashed centre line, lane/parking edge lines, zebra crossings
        for k, (road, (win, GX, GY, s, l, out)) in enumerate(zip(roads, windows)):
            inside_other = np.zeros(out.shape, bool)
            for j, other in enumerate(roads):
                if j != k:
                    inside_other |= other.carriageway_distance(GX, GY) <= 0.5
            centre = (np.abs(l) < 0.12) & ((s % 9.0) < 3.5)
            edge = np.zeros(out.shape, bool)
            for side in (-1, 1):
                park = road.parking[1] if side > 0 else road.parking[0]
                if park:
                    edge |= np.abs(side * l - road.lane_width) < 0.1
            m = (centre | edge) & (out <= 0) & ~inside_other
            mark_mask[win] |= m
        for isec in scene.intersections:
            for idx, (k, j) in enumerate((isec["roads"], isec["roads"][::-1])):
                road, other = roads[k], roads[j]
                win, GX, GY, s, l, out = windows[k]
                s_c = isec["s"][0] if k == isec["roads"][0] else isec["s"][1]
                ds = np.abs(s - s_c)
                band = ((ds > other.half_width + 0.8)
                        & (ds < other.half_width + other.sidewalk_width - 0.3))
                zebra = band & (out <= 0) & ((np.abs(l) % 1.0) < 0.5)
                mark_mask[win] |= zebra
        surf[walk_mask] = SURFACE["sidewalk"]
        surf[road_mask] = SURFACE["road"]
        surf[mark_mask & road_mask] = SURFACE["marking"]
        return cls(surf, (x0, y0), float(resolution))

    # ------------------------------------------------------------------ nav2 map_server I/O
    def save(self, yaml_path, image_name: str | None = None) -> Path:
        """Write ``<name>.yaml`` and its PNG next to it (nav2 ``map_server`` format, read back
        by ``masks.load_map``)."""
        return save_map(yaml_path, self.occupancy_image(), (self.origin[0], self.origin[1], 0.0),
                        self.resolution, image_name=image_name)
