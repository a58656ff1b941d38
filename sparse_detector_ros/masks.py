"""Computation masks on the BEV grid: where the sparse backbone has to run.

Every mask is a raster in the grid convention of :mod:`.bev` (row = x index, col = y index,
cell centres at ``x_min + (i + 0.5) * cell``), on the sensor's BEV grid (``config.GridConfig``)
or on a coarser grid of ``stride`` BEV cells per mask cell (``cell = stride * resolution``, mask
cell ``(i, j)`` covering BEV rows ``i*stride .. (i+1)*stride - 1`` and the same for columns).

Kinds of mask, selected by the runtime parameter ``mask.mode`` (:class:`ComputationMask`):

* ``dense`` (:func:`dense_mask`) -- every cell active (the dense reference);
* ``occupancy`` (:func:`occupancy_mask`) -- cells holding points above the local ground,
  dilated;
* ``map_prior`` (:class:`MapPrior`) -- the road of a nav2 map seen from the sensor's pose,
  grown by a margin (:func:`road_raster` is the ungrown road);
* ``net`` (:class:`MaskNet`, :func:`net_mask`) -- the SBNet low-resolution segmentation
  network on the 4x-downsampled BEV, thresholded for recall (:func:`net_target` makes its
  training target);
* ``union`` -- the logical or of two of the above (``mask.union``).

:func:`active_tile_fraction` says which share of the sparse engine's tiles a mask activates (it
pools with the engine's own ``reduce_mask``). The numpy rasters (:func:`road_raster`,
:func:`dense_mask`, :func:`map_in_sensor_frame`) are ``(H // stride, W // stride)`` arrays; the
runtime masks are torch bool ``(H, W)`` tensors and :class:`ComputationMask` returns the
``(N, H, W)`` float32 mask the sparse engine takes (1 = active).

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
import torch
import torch.nn as nn
import torch.nn.functional as F

from .boxes import points_in_boxes
from .config import ConfigError, GridConfig, MaskConfig
from .sparse import reduce_mask

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
    """Read a nav2 ``map_server`` pair (YAML + image) into a :class:`NavMap`.

    Raises ValueError naming the file and what is wrong for anything that is not a readable
    map: a missing or unreadable YAML or image file, YAML that does not parse, a missing key,
    a value of the wrong type, an image that is corrupt or truncated."""
    import yaml
    from PIL import Image

    yaml_path = Path(yaml_path)
    try:
        text = yaml_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ValueError(f"map file {yaml_path} cannot be read: {why}") from None
    try:
        meta = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ValueError(f"map file {yaml_path} is not valid YAML{where}: "
                         f"{getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"map file {yaml_path} is not a YAML mapping")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise ValueError(f"map file {yaml_path} lacks the key(s) {', '.join(missing)}: a nav2 map "
                         f"needs {', '.join(REQUIRED_KEYS)}")

    def number(key: str) -> float:
        try:
            return float(meta[key])
        except (TypeError, ValueError):
            raise ValueError(f"map file {yaml_path}: {key} = {meta[key]!r} must be a "
                             "number") from None

    resolution = number("resolution")
    if not (math.isfinite(resolution) and resolution > 0):
        raise ValueError(f"map file {yaml_path}: resolution = {meta['resolution']!r} must be > 0")
    try:
        origin = [float(v) for v in meta["origin"]]
    except (TypeError, ValueError):
        origin = []
    if len(origin) == 2:
        origin.append(0.0)
    if len(origin) != 3 or not all(math.isfinite(v) for v in origin):
        raise ValueError(f"map file {yaml_path}: origin = {meta['origin']!r} must be [x, y, yaw]")
    occupied_thresh, free_thresh = number("occupied_thresh"), number("free_thresh")
    if not isinstance(meta["image"], str) or not meta["image"]:
        raise ValueError(f"map file {yaml_path}: image = {meta['image']!r} must be a file name")
    image_path = Path(meta["image"])
    if not image_path.is_absolute():
        image_path = yaml_path.parent / image_path
    mode = str(meta.get("mode", "trinary"))
    try:
        with Image.open(image_path) as im:
            has_alpha = "A" in im.getbands() or "transparency" in im.info
            if im.mode == "L" and not has_alpha:          # the common grey map: no conversion
                grey, alpha = np.asarray(im), None
            else:
                rgba = np.asarray(im.convert("RGBA")).astype(np.float64)
                alpha = rgba[..., 3] if has_alpha else None
                # map_server averages the colour channels, and in trinary mode the opacity too
                grey = rgba.mean(-1) if has_alpha and mode == "trinary" else rgba[..., :3].mean(-1)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ValueError(f"map file {yaml_path}: image {image_path} cannot be read (missing, "
                         f"corrupt or truncated?): {why}") from None
    occ = occupancy_from_grey(grey, negate=bool(meta["negate"]),
                              occupied_thresh=occupied_thresh,
                              free_thresh=free_thresh, mode=mode, alpha=alpha)
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


# --------------------------------------------------------------------------- torch helpers

def points_tensor(points, device: str | torch.device = "cpu") -> torch.Tensor:
    """``(N, >=4)`` numpy array or tensor -> ``(N, >=4)`` float32 tensor on ``device`` (numpy
    arrays are wrapped without a copy when they are float32 and writable)."""
    if isinstance(points, torch.Tensor):
        pts = points
    else:
        arr = np.asarray(points)
        if arr.dtype != np.float32 or not arr.flags.writeable:
            arr = arr.astype(np.float32)           # a copy: torch only wraps writable memory
        pts = torch.from_numpy(arr)
    if pts.ndim != 2 or pts.shape[1] < 4:
        raise ValueError(f"points must have shape (N, 4) [x, y, z, intensity], got "
                         f"{tuple(pts.shape)}")
    return pts.to(device=device, dtype=torch.float32, non_blocking=True)


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Grow a ``(..., H, W)`` bool mask by ``radius`` cells (square ``2r+1`` kernel: a cell is
    active when any cell within ``radius`` rows and ``radius`` columns is); ``radius = 0``
    returns ``mask``. Separable, along the rows then the columns, each by doubling: a step
    or-s the mask with itself shifted both ways by ``s`` (at most one more than the reach so
    far, so the reach grows without gaps), about ``2 log2(r)`` shifted copies instead of
    ``2r`` (on a 512 x 512 CPU mask ~100x faster than ``max_pool2d``)."""
    r = int(radius)
    if r < 0:
        raise ValueError(f"radius = {radius!r} must be >= 0")
    if r == 0:
        return mask
    return _grow(_grow(mask.bool(), r, -2), r, -1)


def _grow(mask: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    """``mask`` (bool) or-ed over a window of ``r`` cells on each side along ``dim``."""
    n = mask.shape[dim]
    out, reach = mask.clone(), 0
    while reach < r:
        s = min(reach + 1, r - reach)
        if s >= n:              # the rest of the window lies off the map
            break
        prev = out.clone()
        out.narrow(dim, s, n - s).bitwise_or_(prev.narrow(dim, 0, n - s))
        out.narrow(dim, 0, n - s).bitwise_or_(prev.narrow(dim, s, n - s))
        reach += s
    return out


def cells_per(length: float, resolution: float, name: str) -> int:
    """``length / resolution`` as an int, or ValueError naming ``name`` when it is not a
    positive whole multiple (to 1e-6)."""
    n = length / resolution
    if not (math.isfinite(n) and round(n) >= 1 and abs(n - round(n)) <= 1e-6 * max(1.0, n)):
        raise ValueError(f"{name} = {length!r} m must be a positive whole multiple of the grid "
                         f"resolution {resolution!r} m")
    return int(round(n))


# --------------------------------------------------------------------------- occupancy

#: the local ground may rise at most this much per metre of ground cell above the lowest ground
#: cell of its 3 x 3 neighbourhood (a 10 % grade over two cells): a cell whose lowest point is
#: higher holds objects only, and takes that bound as its ground
GROUND_RISE = 0.2


def occupancy_mask(points, grid: GridConfig, *, min_points: int = 2, min_height: float = 0.25,
                   ground_cell: float = 3.2, dilation: int = 3,
                   device: str | torch.device = "cpu") -> torch.Tensor:
    """Cells holding points above the local ground: ``(H, W)`` torch bool on ``device``.

    ``points``: ``(N, >=4)`` numpy array or tensor ``x, y, z, intensity`` in the sensor frame.
    The local ground of a point is the lowest ``z`` of all points in its ground cell, a square of
    ``ground_cell`` metres (a whole multiple of ``grid.resolution``; ground cell ``(a, b)``
    holds the BEV cells ``[a*g, (a+1)*g) x [b*g, (b+1)*g)``, ``g = ground_cell / resolution``),
    but at most ``GROUND_RISE * ground_cell`` above the lowest ground cell of its 3 x 3
    neighbourhood (a cell seen only through a van's roof would otherwise take the roof for the
    ground).
    A point counts when ``z > ground + min_height`` and ``z`` lies in the BEV's height range
    ``[z_min, z_max)`` (the backbone sees nothing else); a BEV cell is occupied when it holds
    ``>= min_points`` counted points; the occupied cells are grown by ``dilation`` cells
    (:func:`dilate`). Points outside the grid's x/y extent or with a non-finite coordinate are
    ignored. Vectorised: one ``scatter_reduce`` (ground), one ``bincount`` (counts).

    The defaults are those of ``mask.occupancy_*`` (:class:`~.config.MaskConfig`). A ground cell
    of a few metres follows slopes of a few per cent (a 5 % grade rises 0.16 m over 3.2 m,
    below the 0.25 m default ``min_height``); bigger cells tolerate objects that hide the ground
    of a whole cell.
    """
    if int(min_points) < 1:
        raise ValueError(f"min_points = {min_points!r} must be >= 1")
    if not (math.isfinite(min_height) and min_height >= 0):
        raise ValueError(f"min_height = {min_height!r} must be >= 0")
    g = cells_per(ground_cell, grid.resolution, "ground_cell")
    pts = points_tensor(points, device)
    H, W = grid.shape
    Hg, Wg = -(-H // g), -(-W // g)
    inv = 1.0 / grid.resolution
    fx = (pts[:, 0] - grid.x_min) * inv
    fy = (pts[:, 1] - grid.y_min) * inv
    z = pts[:, 2]
    # comparisons are False for NaN, so non-finite points fall out here
    keep = (fx >= 0) & (fx < H) & (fy >= 0) & (fy < W) & (z.abs() < float("inf"))
    # cell indices as whole floats (float32 holds them exactly below 2^24 cells, else float64):
    # float ops instead of int64 divisions (cheaper)
    wide = torch.float64 if H * W >= 1 << 24 else torch.float32
    i = fx.to(wide).clamp_(0, H - 1).floor_()
    j = fy.to(wide).clamp_(0, W - 1).floor_()
    # ignored points go to one extra bin at the end (no boolean indexing: cheaper)
    coarse = torch.where(keep, (i / g).floor_().mul_(Wg).add_((j / g).floor_()),
                         float(Hg * Wg)).to(torch.int64)
    ground = torch.full((Hg * Wg + 1,), float("inf"), device=pts.device)
    ground.scatter_reduce_(0, coarse, z, reduce="amin", include_self=True)
    # a ground cell far above its neighbours holds objects only (their roofs hide its ground)
    near = -F.max_pool2d(-ground[:-1].view(1, 1, Hg, Wg), 3, 1, 1).view(-1)
    ground[:-1] = torch.minimum(ground[:-1], near + GROUND_RISE * ground_cell)
    counted = keep & (z > ground[coarse] + float(min_height))
    counted &= (z >= grid.z_min) & (z < grid.z_max)
    cell = torch.where(counted, i.mul_(W).add_(j), float(H * W)).to(torch.int64)
    occupied = torch.bincount(cell, minlength=H * W + 1)[:H * W] >= int(min_points)
    return dilate(occupied.view(H, W), dilation)


# --------------------------------------------------------------------------- map prior

def grow_region(region: np.ndarray, radius: float) -> np.ndarray:
    """Cells within ``radius`` of a region, on a padded raster.

    ``region``: ``(X, Y)`` bool, each True cell a unit square; ``radius`` in cells. Returns
    ``(X + 2P, Y + 2P)`` bool, ``P = floor(radius + 0.5)`` (the input sits at offset ``P``):
    True where the distance from the cell's *centre* to the nearest True *square* is
    ``<= radius`` (a disk, exact: ``max(0, |di| - 0.5)^2 + max(0, |dj| - 0.5)^2 <= radius^2``).
    Separable: two passes of ``2P + 1`` shifted minima (torch, float32), memory ``O(X Y)``.
    """
    region = np.asarray(region, bool)
    if region.ndim != 2:
        raise ValueError(f"region must be 2-D (X, Y), got shape {region.shape}")
    if not (math.isfinite(radius) and radius >= 0):
        raise ValueError(f"radius = {radius!r} must be >= 0")
    P = int(math.floor(radius + 0.5))
    r = torch.from_numpy(np.pad(region, P))
    if P == 0:
        return r.numpy()
    X, Y = r.shape
    inf = torch.tensor(float("inf"))
    # pass 1, along y: squared gap to the nearest True square in the same row
    gap = torch.full((X, Y), float("inf"))
    for d in range(-P, P + 1):
        cost = max(0.0, abs(d) - 0.5) ** 2
        lo, hi = max(0, -d), Y - max(0, d)                 # out[:, lo:hi] reads r[:, lo+d:hi+d]
        gap[:, lo:hi] = torch.minimum(gap[:, lo:hi], torch.where(r[:, lo + d:hi + d], cost, inf))
    # pass 2, along x: add the squared gap across rows
    dist2 = gap.clone()
    for d in range(-P, P + 1):
        if d == 0:
            continue
        cost = max(0.0, abs(d) - 0.5) ** 2
        lo, hi = max(0, -d), X - max(0, d)
        dist2[lo:hi] = torch.minimum(dist2[lo:hi], gap[lo + d:hi + d] + cost)
    return (dist2 <= radius * radius).numpy()


class MapPrior:
    """The map-prior mask: the road of a nav2 map around the sensor, grown by a margin.

    ``MapPrior.from_yaml(path, min_value=None, margin=2.0, stride=2)`` loads the map once;
    ``prior(pose, grid) -> (H, W)`` torch bool: BEV cells of ``grid`` (sensor frame) whose centre
    lies within ``margin`` metres of the road, for the sensor at ``pose = (x, y, yaw)`` in the
    map's frame. Road = :meth:`NavMap.road` with ``min_value`` (None: every free cell, sidewalks
    included on maps that keep them free; 250 on the simulator's maps: the carriageway only).

    How. The road is grown once in the map's own raster (:func:`grow_region`, a disk, cached per
    reach) and each call only resamples the grown raster at the BEV cell centres (nearest map
    cell, as :func:`road_raster`). To keep every cell within ``margin`` of the road despite the
    resampling, the reach of the growth is ``margin + map_res / sqrt(2)`` (half a map cell's
    diagonal) ``+ (stride - 1) * res / sqrt(2)`` (with ``stride > 1`` the raster is sampled at
    the centres of ``stride x stride`` blocks of BEV cells and each block takes its sample), so
    the mask is a superset of "within ``margin``", by at most about one map cell plus
    ``(stride - 1)`` BEV cells. Cells off the (padded) map are inactive. ``stride = 2`` (the
    default) measured 0.7 ms a call on a 512 x 512 grid (2-core CPU), ``stride = 1`` 2.4 ms,
    for the same active-tile fraction at tile 16; growing the map (once) about 0.1-0.3 s for
    a 370 m x 250 m map at 0.2 m.
    """

    def __init__(self, navmap: NavMap, *, margin: float = 2.0, min_value: int | None = None,
                 stride: int = 2):
        if not (math.isfinite(margin) and margin >= 0):
            raise ValueError(f"margin = {margin!r} must be >= 0 m")
        if not (isinstance(stride, (int, np.integer)) and stride >= 1):
            raise ValueError(f"stride = {stride!r} must be a positive integer")
        self.navmap = navmap
        self.margin = float(margin)
        self.min_value = min_value
        self.stride = int(stride)
        self.road = navmap.road(min_value)
        self.cache: tuple[float, np.ndarray, tuple[float, float, float]] | None = None

    @classmethod
    def from_yaml(cls, path: str | Path, min_value: int | None = None, *, margin: float = 2.0,
                  stride: int = 2) -> "MapPrior":
        """Load a nav2 ``map_server`` YAML (:func:`load_map`) once."""
        return cls(load_map(path), margin=margin, min_value=min_value, stride=stride)

    def reach(self, grid: GridConfig) -> float:
        """Growth radius [m] that keeps every BEV cell within ``margin`` of the road (see the
        class docstring)."""
        return (self.margin + self.navmap.resolution / math.sqrt(2)
                + (self.stride - 1) * grid.resolution / math.sqrt(2))

    def grown(self, reach: float) -> tuple[np.ndarray, tuple[float, float, float]]:
        """``(raster, origin)``: the road grown by ``reach`` metres on the padded map raster and
        the origin ``(x, y, yaw)`` of the padded raster; computed once per reach."""
        if self.cache is None or self.cache[0] != reach:
            res = self.navmap.resolution
            raster = grow_region(self.road, reach / res)
            P = (raster.shape[0] - self.road.shape[0]) // 2
            ox, oy, oyaw = self.navmap.origin
            c, s = math.cos(oyaw), math.sin(oyaw)
            origin = (ox - P * res * (c - s), oy - P * res * (s + c), oyaw)
            self.cache = (reach, raster, origin)
        return self.cache[1], self.cache[2]

    def __call__(self, pose, grid: GridConfig, *, device: str | torch.device = "cpu"
                 ) -> torch.Tensor:
        """``(H, W)`` torch bool on ``device``: the grown road seen from ``pose`` ``(x, y,
        yaw)`` (sensor in the map's frame) on ``grid``."""
        s = self.stride
        H, W = grid.shape
        if H % s or W % s:
            raise ValueError(f"stride = {s} of the map prior must divide the grid shape "
                             f"{H} x {W}")
        raster, origin = self.grown(self.reach(grid))
        m = map_in_sensor_frame(raster, origin, self.navmap.resolution, pose, grid, stride=s,
                                fill=False)
        out = torch.from_numpy(m)
        if s > 1:
            out = out[:, None, :, None].expand(H // s, s, W // s, s).reshape(H, W)
        return out.to(device)


# --------------------------------------------------------------------------- net mask

class MaskNet(nn.Module):
    """The SBNet low-resolution segmentation network: which cells of the BEV hold objects.

    ``forward(bev) -> logits``: ``bev`` ``(N, C, H, W)`` float (any memory format) ->
    ``(N, 1, ceil(H/f), ceil(W/f))`` logits, ``f = factor`` (4): the BEV is pooled by ``f``
    (``pool`` ``"max"``: a cell with one point stays visible; ``"avg"``), then
    ``3x3 conv (C -> width) -> BN -> ReLU -> 3x3 conv (width -> width) -> BN -> ReLU ->
    1x1 conv -> 1 logit``. The convs run in channels_last (measured faster on CPU). The logit
    bias starts at ``logit(prior)``. Threshold with :func:`net_mask`; train on
    :func:`net_target` (for recall: a low threshold, ``mask.net_threshold``).
    """

    def __init__(self, in_channels: int, width: int = 16, factor: int = 4, pool: str = "max",
                 prior: float = 0.5):
        super().__init__()
        if pool not in ("max", "avg"):
            raise ValueError(f"pool = {pool!r}: allowed 'max', 'avg'")
        if int(factor) < 1:
            raise ValueError(f"factor = {factor!r} must be >= 1")
        if not 0.0 < prior < 1.0:
            raise ValueError(f"prior = {prior!r} must be in (0, 1)")
        self.in_channels = int(in_channels)
        self.factor = int(factor)
        self.pool = pool
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, 1, 1))
        nn.init.constant_(self.body[-1].bias, math.log(prior / (1.0 - prior)))
        self.to(memory_format=torch.channels_last)

    def forward(self, bev: torch.Tensor) -> torch.Tensor:
        if bev.ndim != 4 or bev.shape[1] != self.in_channels:
            raise ValueError(f"bev must be (N, {self.in_channels}, H, W), got "
                             f"{tuple(bev.shape)}")
        return self.body(pool_by(bev, self.factor, self.pool)
                         .contiguous(memory_format=torch.channels_last))


def pool_by(x: torch.Tensor, factor: int, pool: str = "max") -> torch.Tensor:
    """``(N, C, H, W)`` -> ``(N, C, ceil(H/f), ceil(W/f))``: the max (``pool="max"``) or mean
    (``"avg"``) of each ``f x f`` block, over its in-map cells at the border. Equal to
    ``F.max_pool2d`` / ``F.avg_pool2d`` with ``ceil_mode=True``; on a contiguous NCHW map whose
    sides ``f`` divides, two reductions over reshaped views instead (measured 5x faster on CPU
    for a 512 x 512 x 7 BEV), and the same over the channels_last storage of a channels_last
    map (the result is then channels_last too)."""
    f = int(factor)
    if f == 1:
        return x
    N, C, H, W = x.shape
    nhwc = x.permute(0, 2, 3, 1)
    if not (H % f or W % f) and nhwc.is_contiguous() and not x.is_contiguous():
        v = nhwc.view(N, H // f, f, W // f, f, C)
        y = v.amax(2).amax(3) if pool == "max" else v.mean(2).mean(3)
        return y.permute(0, 3, 1, 2)
    if H % f or W % f or not x.is_contiguous():
        op = F.max_pool2d if pool == "max" else F.avg_pool2d
        return op(x, f, f, ceil_mode=True)
    if pool == "max":
        return x.view(N, C, H // f, f, W).amax(3).view(N, C, H // f, W // f, f).amax(-1)
    return x.view(N, C, H // f, f, W).mean(3).view(N, C, H // f, W // f, f).mean(-1)


def net_mask(logits: torch.Tensor, threshold: float, out_hw: tuple[int, int]) -> torch.Tensor:
    """``(N, 1, h, w)`` (or ``(N, h, w)``) logits of :class:`MaskNet` -> ``(N, H, W)`` bool:
    ``sigmoid(logit) > threshold``, each low-resolution cell repeated over the
    ``f x f`` BEV cells it covers (nearest upsampling, ``f = ceil(H / h)``), cropped to
    ``out_hw = (H, W)``."""
    if logits.ndim == 4:
        logits = logits[:, 0]
    if logits.ndim != 3:
        raise ValueError(f"logits must be (N, 1, h, w) or (N, h, w), got {tuple(logits.shape)}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold = {threshold!r} must be in [0, 1]")
    H, W = out_hw
    N, h, w = logits.shape
    f = -(-H // h)
    if f < 1 or -(-W // w) != f or h * f - H >= f or w * f - W >= f:
        raise ValueError(f"logits of {h} x {w} cells do not cover the grid {H} x {W} with one "
                         "whole factor")
    return repeat_cells(torch.sigmoid(logits.float()) > threshold, f, out_hw)


def repeat_cells(low: torch.Tensor, factor: int, out_hw: tuple[int, int]) -> torch.Tensor:
    """``(N, h, w)`` cells of a ``factor``-downsampled grid -> ``(N, H, W)``: each value
    repeated over the ``factor x factor`` cells it covers (nearest upsampling), cropped to
    ``out_hw = (H, W)``."""
    N, h, w = low.shape
    f = int(factor)
    H, W = out_hw
    return low[:, :, None, :, None].expand(N, h, f, w, f).reshape(N, h * f, w * f)[:, :H, :W]


def net_target(boxes, grid: GridConfig, stride: int = 4, margin: float | None = None
               ) -> torch.Tensor:
    """Training target of :class:`MaskNet`: ``(H / stride, W / stride)`` float32, 1 on the
    cells of the ``stride``-downsampled grid that an object covers.

    ``boxes``: ``(K, 7)`` ``(x, y, z, l, w, h, yaw)`` in the sensor frame (numpy or torch). A cell
    is 1 when its centre (:func:`cell_centres`) lies inside a box grown by ``margin`` metres on
    each side in x/y (heights ignored; default: half a cell, ``stride * resolution / 2``, so
    roughly every cell a box touches), and the cell holding each box centre is always 1 (a
    pedestrian smaller than a cell still gets its cell). Boxes off the grid add nothing.
    """
    h, w = mask_shape(grid, stride)
    cell = stride * grid.resolution
    margin = cell / 2 if margin is None else float(margin)
    if not (math.isfinite(margin) and margin >= 0):
        raise ValueError(f"margin = {margin!r} must be >= 0 m")
    b = torch.as_tensor(np.asarray(boxes.cpu() if isinstance(boxes, torch.Tensor) else boxes),
                        dtype=torch.float64).reshape(-1, 7)
    target = torch.zeros((h, w), dtype=torch.float32)
    if len(b) == 0:
        return target
    xs, ys = (torch.from_numpy(a) for a in cell_centres(grid, stride))
    grown = b.clone()
    grown[:, 2] = 0.0
    grown[:, 3:5] += 2 * margin
    grown[:, 5] = 1.0
    # only the cells near some box: a window of the grid around each box's circumscribed circle
    reach = 0.5 * torch.hypot(grown[:, 3], grown[:, 4])
    i0 = ((b[:, 0] - reach - grid.x_min) / cell).floor().clamp(0, h).long()
    i1 = ((b[:, 0] + reach - grid.x_min) / cell).ceil().clamp(0, h).long()
    j0 = ((b[:, 1] - reach - grid.y_min) / cell).floor().clamp(0, w).long()
    j1 = ((b[:, 1] + reach - grid.y_min) / cell).ceil().clamp(0, w).long()
    for k in range(len(b)):
        if i1[k] <= i0[k] or j1[k] <= j0[k]:
            continue
        gx, gy = torch.meshgrid(xs[i0[k]:i1[k]], ys[j0[k]:j1[k]], indexing="ij")
        pts = torch.stack([gx.reshape(-1), gy.reshape(-1), torch.zeros(gx.numel(),
                                                                       dtype=torch.float64)], 1)
        inside = points_in_boxes(pts, grown[k:k + 1])[0].view(gx.shape)
        target[i0[k]:i1[k], j0[k]:j1[k]][inside] = 1.0
    ci = ((b[:, 0] - grid.x_min) / cell).floor().long()
    cj = ((b[:, 1] - grid.y_min) / cell).floor().long()
    ok = (ci >= 0) & (ci < h) & (cj >= 0) & (cj < w)
    target[ci[ok], cj[ok]] = 1.0
    return target


# --------------------------------------------------------------------------- the runtime mask

def active_tile_fraction(mask: torch.Tensor, tile: int, threshold: float = 0.0,
                         pooling: str = "max") -> float:
    """Fraction of the ``tile x tile`` tiles (``ceil(H/tile) x ceil(W/tile)`` per sample) that
    the sparse engine activates for ``mask`` ``(N, H, W)`` or ``(H, W)`` (any dtype): computed
    with the engine's own ``reduce_mask`` (``threshold``, ``pooling`` as ``sparse.*``)."""
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3:
        raise ValueError(f"mask must be (N, H, W) or (H, W), got {tuple(mask.shape)}")
    if not mask.is_floating_point():
        mask = mask.float()
    N, H, W = mask.shape
    total = N * (-(-H // tile)) * (-(-W // tile))
    _, k = reduce_mask(mask, tile, tile, 0, threshold, pooling)
    return k / total if total else 0.0


@dataclass
class MaskResult:
    """What :class:`ComputationMask` returns.

    ``mask``: ``(N, H, W)`` float32 on the BEV's device, 1 = active, 0 = inactive; ``mode``: the
    mask actually computed (``dense``, ``occupancy``, ``map_prior``, ``net`` or ``union``);
    ``parts``: the masks joined (one name, or two for ``union``); ``fallback``: why the
    configured mask could not be used this frame (e.g. no pose for the map prior), else ``""``.
    """
    mask: torch.Tensor
    mode: str
    parts: tuple[str, ...]
    fallback: str = ""

    def active_tile_fraction(self, tile: int, threshold: float = 0.0,
                             pooling: str = "max") -> float:
        """:func:`active_tile_fraction` of :attr:`mask`."""
        return active_tile_fraction(self.mask, tile, threshold, pooling)


def road_min_value(config: MaskConfig) -> int | None:
    """``mask.map_road_min_value`` as :class:`MapPrior` takes it (-1: None, every free cell)."""
    return None if config.map_road_min_value < 0 else config.map_road_min_value


class ComputationMask:
    """The computation mask of ``mask.mode`` (:class:`~.config.MaskConfig`) on ``grid``.

    Args:
        config: the ``mask.*`` parameters.
        grid: the model's BEV grid.
        mask_net: the :class:`MaskNet` (needed by ``net`` and by a ``union`` with ``net``; a
            ConfigError naming the parameter otherwise). Run in eval mode, without gradients.
        map_prior: the :class:`MapPrior`; default: loaded from ``mask.map_yaml`` (with
            ``mask.map_margin`` and ``mask.map_road_min_value``) when the mode uses the map and
            the path is set.

    ``mask(points, bev, pose=None) -> MaskResult``: ``points`` one ``(P, 4)`` cloud (numpy or
    torch, sensor frame) or a sequence of ``N`` clouds, ``bev`` ``(N, C, H, W)`` (its
    rasterisation); ``pose`` ``(x, y, yaw)`` of the sensor in the map's frame, or a sequence of
    ``N`` of them, or None. The map prior needs a map and a pose for every sample; without them
    ``mask.map_fallback`` (``dense`` or ``occupancy``) stands in for it and
    :attr:`MaskResult.fallback` says why.

    A ``mask.map_yaml`` that cannot be read (missing, corrupt: :func:`load_map`) is a
    ConfigError naming it while ``mask.map_required`` is true (the default); with false the
    map prior runs without a map, i.e. ``mask.map_fallback`` stands in and the fallback reason
    is the read error (:attr:`map_error`).
    """

    def __init__(self, config: MaskConfig, grid: GridConfig, mask_net: MaskNet | None = None,
                 map_prior: MapPrior | None = None):
        self.config = config
        self.grid = grid
        self.mask_net = mask_net
        mode = config.mode
        self.parts: tuple[str, ...] = (tuple(config.union.split(",")) if mode == "union"
                                       else (mode,))
        if "net" in self.parts and mask_net is None:
            name, value = (("mask.union", config.union) if mode == "union"
                           else ("mask.mode", mode))
            raise ConfigError(f"parameter '{name}' = {value!r} needs the mask network "
                              "(a MaskNet module, shipped with the model); none was given")
        if mask_net is not None and mask_net.in_channels != grid.channels:
            raise ValueError(f"the MaskNet takes {mask_net.in_channels} channels but the grid "
                             f"has {grid.channels}")
        #: why the map of mask.map_yaml could not be read ("" when it was, or was not asked)
        self.map_error = ""
        if map_prior is None and "map_prior" in self.parts and config.map_yaml:
            try:
                map_prior = MapPrior.from_yaml(config.map_yaml, road_min_value(config),
                                               margin=config.map_margin)
            except (OSError, ValueError) as e:
                message = (f"parameter 'mask.map_yaml' = {config.map_yaml!r}: the map could not "
                           f"be read: {e}")
                if config.map_required:
                    raise ConfigError(message + " (set mask.map_required to false to run with "
                                      "mask.map_fallback instead)") from e
                self.map_error = message
        self.map_prior = map_prior

    def __call__(self, points, bev: torch.Tensor, pose=None) -> MaskResult:
        if bev.ndim != 4 or tuple(bev.shape[2:]) != self.grid.shape:
            raise ValueError(f"bev must be (N, C, {self.grid.shape[0]}, {self.grid.shape[1]}), "
                             f"got {tuple(bev.shape)}")
        N = bev.shape[0]
        clouds = per_sample(points, N, "points", lambda p: hasattr(p, "shape"))
        poses = per_sample(pose, N, "pose", is_single_pose)
        parts, fallback = list(self.parts), ""
        if "map_prior" in parts:
            if self.map_prior is None:
                fallback = self.map_error or "no map: parameter 'mask.map_yaml' is empty"
            elif any(p is None for p in poses):
                fallback = "no sensor pose in the map frame"
            if fallback:
                parts[parts.index("map_prior")] = self.config.map_fallback
                fallback += f"; using mask.map_fallback = {self.config.map_fallback!r}"
        parts = list(dict.fromkeys(parts))              # occupancy | occupancy = occupancy
        if "dense" in parts:
            parts = ["dense"]
        device = bev.device
        mask = None
        for part in parts:
            m = self._part(part, clouds, bev, poses)
            mask = m if mask is None else mask | m
        mode = parts[0] if len(parts) == 1 else "union"
        return MaskResult(mask.to(device, torch.float32), mode, tuple(parts), fallback)

    # ------------------------------------------------------------------ parts

    def _part(self, part: str, clouds, bev: torch.Tensor, poses) -> torch.Tensor:
        """``(N, H, W)`` bool on ``bev``'s device."""
        N, device, g, c = bev.shape[0], bev.device, self.grid, self.config
        H, W = g.shape
        if part == "dense":
            return torch.ones((N, H, W), dtype=torch.bool, device=device)
        if part == "occupancy":
            return torch.stack([occupancy_mask(
                p, g, min_points=c.occupancy_min_points, min_height=c.occupancy_min_height,
                ground_cell=c.occupancy_ground_cell, dilation=c.occupancy_dilation,
                device=device) for p in clouds])
        if part == "map_prior":
            return torch.stack([self.map_prior(p, g, device=device) for p in poses])
        if part == "net":
            with torch.no_grad():
                was_training = self.mask_net.training
                self.mask_net.eval()
                try:
                    logits = self.mask_net(bev)
                finally:
                    self.mask_net.train(was_training)
            return net_mask(logits, c.net_threshold, (H, W))
        raise ValueError(f"unknown mask {part!r}")


def is_single_pose(p) -> bool:
    """True for None or one flat pose ``(x, y, yaw)`` (list, tuple, 1-D array or tensor), False
    for a sequence of poses."""
    if p is None:
        return True
    if isinstance(p, (np.ndarray, torch.Tensor)):
        return p.ndim == 1
    return all(isinstance(v, (int, float, np.number))
               or (isinstance(v, (np.ndarray, torch.Tensor)) and v.ndim == 0) for v in p)


def per_sample(value, n: int, name: str, is_item) -> list:
    """``[value]`` when ``is_item(value)`` (one item, for a batch of one), else ``list(value)``
    checked to hold ``n`` items; ValueError naming ``name`` otherwise."""
    if is_item(value):
        if n != 1:
            raise ValueError(f"one {name} for a batch of {n}: give a sequence of {n}")
        return [value]
    items = list(value)
    if len(items) != n:
        raise ValueError(f"{len(items)} {name} for a batch of {n}")
    return items
