"""The scene's ground as a raster: surface classes for the ray caster (road, sidewalk,
markings, terrain) and the nav2 ``map_server`` pair (YAML + PNG) for the map-prior mask.

Raster convention inside the project: ``surface[row, col]`` with row = y index, col = x
index, cell ``(row, col)`` centred at ``origin + ((col + 0.5) res, (row + 0.5) res)`` in the
``map`` frame. The PNG is written the way ``map_server`` reads it: top image row = largest y.

nav2 occupancy values in the PNG (``negate: 0``, ``mode: trinary``): drivable road 255
(free), sidewalks and crossings 230 (also free, but told apart from the road), everything
else 0 (occupied). A reader that wants the road only keeps pixels >= 250.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .raycast import SURFACE

ROAD_VALUE, WALKABLE_VALUE, OFF_VALUE = 255, 230, 0
#: diffuse reflectivity of each ground surface code
GROUND_REFLECTIVITY = {SURFACE["road"]: 0.08, SURFACE["sidewalk"]: 0.22,
                       SURFACE["marking"]: 0.7, SURFACE["terrain"]: 0.15}


@dataclass
class RoadMap:
    surface: np.ndarray        # (H, W) uint8 surface codes (road, sidewalk, marking, terrain)
    origin: tuple[float, float]
    resolution: float

    @property
    def shape(self):
        return self.surface.shape

    @property
    def drivable(self) -> np.ndarray:
        s = self.surface
        return (s == SURFACE["road"]) | (s == SURFACE["marking"])

    @property
    def walkable(self) -> np.ndarray:
        return self.surface == SURFACE["sidewalk"]

    def occupancy_image(self) -> np.ndarray:
        """(H, W) uint8 nav2 image in the project's row order (row 0 = smallest y)."""
        img = np.full(self.shape, OFF_VALUE, np.uint8)
        img[self.walkable] = WALKABLE_VALUE
        img[self.drivable] = ROAD_VALUE
        return img

    def lookup(self, x, y) -> np.ndarray:
        """Surface code at map-frame points (terrain outside the raster)."""
        col = np.floor((np.asarray(x) - self.origin[0]) / self.resolution).astype(np.int64)
        row = np.floor((np.asarray(y) - self.origin[1]) / self.resolution).astype(np.int64)
        H, W = self.shape
        ok = (row >= 0) & (row < H) & (col >= 0) & (col < W)
        out = np.full(np.shape(x), SURFACE["terrain"], np.uint8)
        out[ok] = self.surface[row[ok], col[ok]]
        return out

    @classmethod
    def from_scene(cls, scene, resolution: float = 0.2) -> "RoadMap":
        x0, y0, x1, y1 = scene.bounds
        W = int(np.ceil((x1 - x0) / resolution))
        H = int(np.ceil((y1 - y0) / resolution))
        surf = np.full((H, W), SURFACE["terrain"], np.uint8)
        roads = scene.roads
        road_mask = np.zeros((H, W), bool)
        walk_mask = np.zeros((H, W), bool)
        mark_mask = np.zeros((H, W), bool)
        windows = []
        for road in roads:
            rx, ry, _, _ = road.sample(2.0)
            pad = road.half_width + road.sidewalk_width + 2
            c0 = max(0, int((rx.min() - pad - x0) / resolution))
            c1 = min(W, int((rx.max() + pad - x0) / resolution) + 1)
            r0 = max(0, int((ry.min() - pad - y0) / resolution))
            r1 = min(H, int((ry.max() + pad - y0) / resolution) + 1)
            gx = x0 + (np.arange(c0, c1) + 0.5) * resolution
            gy = y0 + (np.arange(r0, r1) + 0.5) * resolution
            X, Y = np.meshgrid(gx, gy)
            s, l, d = road.project(X, Y)
            hw = np.where(l >= 0, road.side_half_width(1), road.side_half_width(-1))
            ends = (s <= 0) | (s >= road.length)
            out = np.where(ends, d, np.abs(l)) - hw
            win = (slice(r0, r1), slice(c0, c1))
            windows.append((win, X, Y, s, l, out))
            road_mask[win] |= out <= 0
            walk_mask[win] |= (out > 0) & (out <= road.sidewalk_width)
        # markings: dashed centre line, lane/parking edge lines, zebra crossings
        for k, (road, (win, X, Y, s, l, out)) in enumerate(zip(roads, windows)):
            inside_other = np.zeros(out.shape, bool)
            for j, other in enumerate(roads):
                if j != k:
                    inside_other |= other.carriageway_distance(X, Y) <= 0.5
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
                win, X, Y, s, l, out = windows[k]
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
        """Write ``<name>.yaml`` and its PNG next to it (nav2 ``map_server`` format)."""
        from PIL import Image
        yaml_path = Path(yaml_path)
        image_name = image_name or yaml_path.with_suffix(".png").name
        img = self.occupancy_image()[::-1]   # top row = largest y
        Image.fromarray(np.ascontiguousarray(img), mode="L").save(yaml_path.parent / image_name)
        meta = nav2_yaml(image_name, self.resolution, (self.origin[0], self.origin[1], 0.0))
        yaml_path.write_text(meta)
        return yaml_path


def nav2_yaml(image: str, resolution: float, origin) -> str:
    """The map_server YAML text (keys: image, mode, resolution, origin, negate,
    occupied_thresh, free_thresh)."""
    return (f"image: {image}\n"
            f"mode: trinary\n"
            f"resolution: {resolution:.6g}\n"
            f"origin: [{origin[0]:.6g}, {origin[1]:.6g}, {origin[2]:.6g}]\n"
            f"negate: 0\n"
            f"occupied_thresh: 0.65\n"
            f"free_thresh: 0.196\n")


def load_map(yaml_path) -> tuple[np.ndarray, dict]:
    """Read a map_server pair back: ``(occupancy, meta)`` where occupancy is int8 (H, W) in
    the project's row order (row 0 = smallest y): 0 free, 100 occupied, -1 unknown, computed
    the way map_server does for ``trinary`` mode."""
    import yaml
    from PIL import Image
    yaml_path = Path(yaml_path)
    meta = yaml.safe_load(yaml_path.read_text())
    img = np.asarray(Image.open(yaml_path.parent / meta["image"]).convert("L"), dtype=np.float64)
    p = img / 255.0 if meta.get("negate", 0) else (255.0 - img) / 255.0
    occ = np.full(img.shape, -1, np.int8)
    occ[p > meta["occupied_thresh"]] = 100
    occ[p < meta["free_thresh"]] = 0
    return occ[::-1].copy(), meta


def map_in_sensor_frame(image: np.ndarray, origin, resolution: float, sensor_pose,
                        x_range=(-51.2, 51.2), y_range=(-51.2, 51.2), cell: float = 0.4
                        ) -> np.ndarray:
    """Resample a map image (project row order: row 0 = smallest y, e.g. a dataset item's
    ``map["image"]`` or :meth:`RoadMap.occupancy_image`) onto a BEV grid of the sensor frame.

    ``sensor_pose`` = (x, y, yaw) of the sensor in ``map`` (``Frame.ego_pose[[0, 1, 3]]``:
    the lidar sits straight above base_link). Returns ``(H, W)`` of the image's dtype with
    row ``i`` = x index and column ``j`` = y index (as ``bev.py``), cell centres at
    ``x_min + (i + 0.5) cell``; cells outside the map are 0 (occupied)."""
    img = np.asarray(image)
    xs = x_range[0] + (np.arange(int(round((x_range[1] - x_range[0]) / cell))) + 0.5) * cell
    ys = y_range[0] + (np.arange(int(round((y_range[1] - y_range[0]) / cell))) + 0.5) * cell
    X, Y = np.meshgrid(xs, ys, indexing="ij")
    px, py, yaw = (float(v) for v in sensor_pose)
    c, s = np.cos(yaw), np.sin(yaw)
    col = np.floor((px + c * X - s * Y - origin[0]) / resolution).astype(np.int64)
    row = np.floor((py + s * X + c * Y - origin[1]) / resolution).astype(np.int64)
    H, W = img.shape[:2]
    ok = (row >= 0) & (row < H) & (col >= 0) & (col < W)
    out = np.zeros(X.shape, img.dtype)
    out[ok] = img[row[ok], col[ok]]
    return out
