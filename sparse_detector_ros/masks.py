"""Computation masks on the BEV grid: where the sparse backbone has to run.

Every mask is a raster in the grid convention of :mod:`.bev` (row = x index, col = y index,
cell centres at ``x_min + (i + 0.5) * cell``), on the sensor's BEV grid (``config.GridConfig``)
or on a coarser grid of ``stride`` BEV cells per mask cell (``cell = stride * resolution``, mask
cell ``(i, j)`` covering BEV rows ``i*stride .. (i+1)*stride - 1`` and the same for columns).
Masks are ``(H // stride, W // stride)`` bool numpy arrays.

Kinds of mask (more to come: occupancy, net, union):

* :func:`dense_mask` — every cell active (the dense baseline);
* :func:`road_raster` — the map prior: the road of a nav2 map seen from the sensor's pose.

nav2 maps. :func:`load_map` reads a ``map_server`` pair (YAML + image) into a :class:`NavMap`
and :func:`save_map` writes one. The YAML keys are ``image`` (relative to the YAML file, or
absolute), ``resolution`` [m], ``origin`` ``[x, y, yaw]`` (pose of the outer corner of cell
``(0, 0)`` in ``map``), ``negate``, ``occupied_thresh``, ``free_thresh`` and optionally ``mode``
(``trinary`` (default), ``scale`` or ``raw``). Occupancy is computed as ``map_server`` does:
the grey value ``g`` of a pixel (mean of its colour channels, and of its opacity too in
``trinary`` mode when the image has one) gives ``p = (255 - g) / 255``
(``g / 255`` with ``negate``); ``p > occupied_thresh`` is occupied (100), ``p < free_thresh`` is
free (0), the rest unknown (-1) (``scale``: scaled to 0..100 in between, unknown where the pixel
is transparent; ``raw``: the grey value itself, unknown above 100).

In the image the top row is the largest y and the left column the smallest x. A
:class:`NavMap` keeps its rasters in the project convention instead (row = x index from the
origin, col = y index); :func:`raster_from_image` and :func:`image_from_raster` are the one
place where the two meet.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import GridConfig

FREE, OCCUPIED, UNKNOWN = 0, 100, -1
MODES = ("trinary", "scale", "raw")
REQUIRED_KEYS = ("image", "resolution", "origin", "negate", "occupied_thresh", "free_thresh")


@dataclass(frozen=True, eq=False)
class NavMap:
    """A nav2 map in the project raster convention.

    ``image``: ``(X, Y)`` uint8 grey values as stored in the map image; ``occupancy``: ``(X, Y)``
    int8, ``0`` free .. ``100`` occupied, ``-1`` unknown; row ``i`` / col ``j`` cover
    ``[i*res, (i+1)*res) x [j*res, (j+1)*res)`` in the map's own axes, whose corner is at
    ``origin = (x, y, yaw)`` in ``map`` (rotated by ``yaw``); ``meta``: the YAML content.
    """

    image: np.ndarray
    occupancy: np.ndarray
    origin: tuple[float, float, float]
    resolution: float
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        """``(X, Y)``: cells along the map's x and y axes."""
        return self.image.shape

    def road(self, min_value: int | None = None) -> np.ndarray:
        """``(X, Y)`` bool: the cells that count as road.

        ``min_value=None``: nav2 free cells (occupancy 0). An int: cells whose stored grey value
        is ``>= min_value`` (``negate`` not applied), e.g. 250 keeps the simulator's road (255)
        and drops its sidewalks (230).
        """
        if min_value is None:
            return self.occupancy == FREE
        if not 0 <= min_value <= 255:
            raise ValueError(f"min_value must be a grey value in [0, 255], got {min_value!r}")
        return self.image >= min_value


# --------------------------------------------------------------------------- image <-> raster

def raster_from_image(image: np.ndarray) -> np.ndarray:
    """``(rows, cols, ...)`` map image (top row = largest y) -> ``(X, Y, ...)`` project raster
    (row = x index, col = y index); a copy."""
    return np.ascontiguousarray(np.swapaxes(np.asarray(image)[::-1], 0, 1))


def image_from_raster(raster: np.ndarray) -> np.ndarray:
    """Inverse of :func:`raster_from_image`."""
    return np.ascontiguousarray(np.swapaxes(np.asarray(raster), 0, 1)[::-1])


# --------------------------------------------------------------------------- nav2 I/O

def occupancy_from_grey(grey: np.ndarray, *, negate: bool, occupied_thresh: float,
                        free_thresh: float, mode: str = "trinary",
                        alpha: np.ndarray | None = None) -> np.ndarray:
    """nav2 ``map_server`` occupancy (int8: 0 free .. 100 occupied, -1 unknown) of grey values
    ``0..255`` (any shape); ``alpha`` (same shape, 0..255) matters in ``scale`` mode only."""
    if mode not in MODES:
        raise ValueError(f"map mode {mode!r} is not supported: allowed {', '.join(MODES)}")
    g = np.asarray(grey, np.float64)
    if mode == "raw":
        v = np.rint(g)
        return np.where(v <= OCCUPIED, v, UNKNOWN).astype(np.int8)
    p = g / 255.0 if negate else (255.0 - g) / 255.0
    occ = np.full(g.shape, UNKNOWN, np.int8)
    if mode == "scale":
        scaled = np.rint((p - free_thresh) / (occupied_thresh - free_thresh) * 100.0)
        between = (p >= free_thresh) & (p <= occupied_thresh)
        occ[between] = np.clip(scaled[between], 0, 100).astype(np.int8)
    occ[p > occupied_thresh] = OCCUPIED
    occ[p < free_thresh] = FREE
    if mode == "scale" and alpha is not None:
        occ[np.asarray(alpha) < 255] = UNKNOWN
    return occ


def load_map(yaml_path: str | Path) -> NavMap:
    """Read a nav2 ``map_server`` pair (YAML + image) into a :class:`NavMap`."""
    import yaml
    from PIL import Image

    yaml_path = Path(yaml_path)
    meta = yaml.safe_load(yaml_path.read_text())
    if not isinstance(meta, dict):
        raise ValueError(f"map file {yaml_path} is not a YAML mapping")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise ValueError(f"map file {yaml_path} lacks the key(s) {', '.join(missing)}: a nav2 map "
                         f"needs {', '.join(REQUIRED_KEYS)}")
    resolution = float(meta["resolution"])
    if not (math.isfinite(resolution) and resolution > 0):
        raise ValueError(f"map file {yaml_path}: resolution = {meta['resolution']!r} must be > 0")
    origin = [float(v) for v in meta["origin"]]
    if len(origin) == 2:
        origin.append(0.0)
    if len(origin) != 3:
        raise ValueError(f"map file {yaml_path}: origin = {meta['origin']!r} must be [x, y, yaw]")
    image_path = Path(meta["image"])
    if not image_path.is_absolute():
        image_path = yaml_path.parent / image_path
    mode = str(meta.get("mode", "trinary"))
    with Image.open(image_path) as im:
        has_alpha = "A" in im.getbands() or "transparency" in im.info
        if im.mode == "L" and not has_alpha:          # the common grey map: no conversion
            grey, alpha = np.asarray(im), None
        else:
            rgba = np.asarray(im.convert("RGBA")).astype(np.float64)
            alpha = rgba[..., 3] if has_alpha else None
            # map_server averages the colour channels, and in trinary mode the opacity too
            grey = rgba.mean(-1) if has_alpha and mode == "trinary" else rgba[..., :3].mean(-1)
    occ = occupancy_from_grey(grey, negate=bool(meta["negate"]),
                              occupied_thresh=float(meta["occupied_thresh"]),
                              free_thresh=float(meta["free_thresh"]), mode=mode, alpha=alpha)
    grey = grey if grey.dtype == np.uint8 else np.rint(grey).astype(np.uint8)
    return NavMap(image=raster_from_image(grey),
                  occupancy=raster_from_image(occ), origin=tuple(origin),
                  resolution=resolution, meta=meta)


def nav2_yaml(image: str, resolution: float, origin, *, mode: str = "trinary", negate: int = 0,
              occupied_thresh: float = 0.65, free_thresh: float = 0.196) -> str:
    """The ``map_server`` YAML text; ``origin`` is ``(x, y)`` or ``(x, y, yaw)``."""
    ox, oy, oyaw = (tuple(float(v) for v in origin) + (0.0,))[:3]
    return (f"image: {image}\n"
            f"mode: {mode}\n"
            f"resolution: {float(resolution)!r}\n"
            f"origin: [{ox!r}, {oy!r}, {oyaw!r}]\n"
            f"negate: {int(negate)}\n"
            f"occupied_thresh: {float(occupied_thresh)!r}\n"
            f"free_thresh: {float(free_thresh)!r}\n")


def save_map(yaml_path: str | Path, raster: np.ndarray, origin, resolution: float, *,
             image_name: str | None = None, **yaml_keys) -> Path:
    """Write a nav2 ``map_server`` pair: ``raster`` ``(X, Y)`` uint8 grey values in the project
    convention as ``<image_name>`` (default: the YAML name with ``.png``) beside ``yaml_path``,
    and the YAML (``yaml_keys``: see :func:`nav2_yaml`). Returns ``yaml_path``."""
    from PIL import Image

    raster = np.asarray(raster)
    if raster.ndim != 2 or raster.dtype != np.uint8:
        raise ValueError(f"raster must be a 2-D uint8 array of grey values, got "
                         f"{raster.dtype} {raster.shape}")
    yaml_path = Path(yaml_path)
    image_name = image_name or yaml_path.with_suffix(".png").name
    Image.fromarray(image_from_raster(raster)).save(yaml_path.parent / image_name)
    yaml_path.write_text(nav2_yaml(image_name, resolution, origin, **yaml_keys))
    return yaml_path


# --------------------------------------------------------------------------- masks

def mask_shape(grid: GridConfig, stride: int = 1) -> tuple[int, int]:
    """``(H // stride, W // stride)``; ``stride`` must divide both sides of ``grid.shape``."""
    H, W = grid.shape
    if not (isinstance(stride, (int, np.integer)) and stride >= 1
            and H % stride == 0 and W % stride == 0):
        raise ValueError(f"stride = {stride!r} must be a positive integer dividing the grid "
                         f"shape {H} x {W}")
    return H // int(stride), W // int(stride)


def cell_centres(grid: GridConfig, stride: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Sensor-frame centres of the mask cells: ``xs (H // stride,)``, ``ys (W // stride,)``
    float64, ``xs[i] = x_min + (i + 0.5) * stride * resolution``, the same for ``ys``."""
    h, w = mask_shape(grid, stride)
    cell = grid.resolution * stride
    return (grid.x_min + (np.arange(h) + 0.5) * cell, grid.y_min + (np.arange(w) + 0.5) * cell)


def dense_mask(grid: GridConfig, stride: int = 1) -> np.ndarray:
    """Every cell active: ``(H // stride, W // stride)`` bool of ones."""
    return np.ones(mask_shape(grid, stride), bool)


def map_in_sensor_frame(raster: np.ndarray, origin, resolution: float, sensor_pose,
                        grid: GridConfig, *, stride: int = 1, fill=0) -> np.ndarray:
    """Resample a world-frame raster onto the sensor's BEV grid (nearest cell).

    ``raster``: ``(X, Y)`` (any dtype) in the project convention, its cell ``(0, 0)`` at
    ``origin`` ``(x, y)`` or ``(x, y, yaw)`` in ``map``, ``resolution`` m a cell (e.g.
    :attr:`NavMap.image`); ``sensor_pose``: ``(x, y, yaw)`` of the sensor in ``map``. Returns
    ``(H // stride, W // stride)`` of ``raster``'s dtype: mask cell ``(i, j)`` holds the raster
    cell under its centre (see :func:`cell_centres`), ``fill`` where that is outside the raster.
    """
    raster = np.asarray(raster)
    if raster.ndim != 2:
        raise ValueError(f"raster must be 2-D (X, Y), got shape {raster.shape}")
    if not (math.isfinite(resolution) and resolution > 0):
        raise ValueError(f"resolution = {resolution!r} must be > 0")
    pose = np.asarray(sensor_pose, np.float64).reshape(-1)
    if pose.shape != (3,) or not np.isfinite(pose).all():
        raise ValueError(f"sensor_pose must be finite (x, y, yaw), got {sensor_pose!r}")
    o = np.asarray(origin, np.float64).reshape(-1)
    if o.shape not in ((2,), (3,)) or not np.isfinite(o).all():
        raise ValueError(f"origin must be finite (x, y) or (x, y, yaw), got {origin!r}")
    oyaw = o[2] if len(o) == 3 else 0.0
    xs, ys = cell_centres(grid, stride)
    px, py, yaw = pose
    # sensor -> map -> the raster's own axes, in one rotation by (yaw - origin yaw)
    c, s = math.cos(yaw - oyaw), math.sin(yaw - oyaw)
    co, so = math.cos(oyaw), math.sin(oyaw)
    dx, dy = px - o[0], py - o[1]
    u0, v0 = co * dx + so * dy, -so * dx + co * dy          # sensor position, raster axes
    inv = 1.0 / resolution
    i = np.floor((u0 + c * xs[:, None] - s * ys[None, :]) * inv)
    j = np.floor((v0 + s * xs[:, None] + c * ys[None, :]) * inv)
    X, Y = raster.shape
    ok = (i >= 0) & (i < X) & (j >= 0) & (j < Y)
    out = np.full(i.shape, fill, raster.dtype)
    out[ok] = raster[i[ok].astype(np.intp), j[ok].astype(np.intp)]
    return out


def road_raster(navmap: NavMap, sensor_pose, grid: GridConfig, *, stride: int = 1,
                min_value: int | None = None) -> np.ndarray:
    """The map prior: ``(H // stride, W // stride)`` bool, True where the cell centre lies on
    road of ``navmap`` (see :meth:`NavMap.road` for ``min_value``) seen from ``sensor_pose``
    ``(x, y, yaw)`` in ``map``; cells off the map are False."""
    return map_in_sensor_frame(navmap.road(min_value), navmap.origin, navmap.resolution,
                               sensor_pose, grid, stride=stride, fill=False)
