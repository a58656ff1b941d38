"""Points -> bird's-eye-view (BEV) feature grid, in torch, on CPU or CUDA.

Grid convention (used everywhere in the project)::

    row i = floor((x - x_min) / resolution),  0 <= i < H = (x_max - x_min) / resolution
    col j = floor((y - y_min) / resolution),  0 <= j < W = (y_max - y_min) / resolution

so cell ``(i, j)`` covers ``x in [x_min + i*res, x_min + (i+1)*res)`` and the same for y, in the
cloud's own frame (REP-103: x forward, y left, z up). The default grid is +-51.2 m at 0.2 m
(512 x 512 cells, 360 degrees around the sensor), z from -3 m to 2 m: it holds the range where a
64-beam spinning LiDAR still puts several points on a car, 0.2 m resolves a pedestrian (about
0.5 m across) into a few cells, and 512 is divisible by every tile size the sparse engine uses
(8, 16, 32), so tiles line up with the map border.

Features, shape ``(1, C, H, W)`` float32, ``C = z_slices + 2``:

* channels ``0 .. z_slices-1``: occupancy of height slice ``k`` (1.0 when any point of the cell
  has ``z`` in ``[z_min + k*dz, z_min + (k+1)*dz)``, ``dz = (z_max - z_min) / z_slices``),
  lowest slice first;
* channel ``z_slices``: maximum intensity in the cell divided by ``intensity_max``, clipped to
  ``[0, 1]``;
* channel ``z_slices + 1``: point density ``min(1, log(1 + n) / log(density_saturation))``
  with ``n`` the number of points in the cell.

Points outside the x/y/z ranges (and points with NaN/Inf coordinates) are dropped. The
computation is vectorized (scatter/bincount, no Python loop over points) and deterministic.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from .config import GridConfig


# The rasterizer wraps read-only message buffers without copying and never writes to them;
# torch's warning about non-writable arrays does not apply.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable",
                        category=UserWarning)


class Rasterizer:
    """Callable ``points (N, >=4) -> (bev (1, C, H, W), n_kept)`` for one grid and device.

    ``points`` is a numpy array or a torch tensor with columns ``x, y, z, intensity``; numpy
    input is wrapped without a copy and moved to ``device`` in one transfer.
    """

    def __init__(self, grid: GridConfig, device: str | torch.device = "cpu"):
        self.grid = grid
        self.device = torch.device(device)
        self.height, self.width = grid.shape
        self.channels = grid.channels
        self._inv_res = 1.0 / grid.resolution
        self._inv_dz = grid.z_slices / (grid.z_max - grid.z_min)
        self._inv_log_sat = 1.0 / math.log(grid.density_saturation)

    def __call__(self, points: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, int]:
        g = self.grid
        pts = _as_tensor(points).to(self.device, non_blocking=True)
        if pts.ndim != 2 or pts.shape[1] < 4:
            raise ValueError(f"points must have shape (N, 4) [x, y, z, intensity], got "
                             f"{tuple(pts.shape)}")
        pts = pts[:, :4].float()
        hw = self.height * self.width
        # Cell coordinates as floats; comparisons on them also drop NaN/Inf.
        fx = (pts[:, 0] - g.x_min) * self._inv_res
        fy = (pts[:, 1] - g.y_min) * self._inv_res
        fz = (pts[:, 2] - g.z_min) * self._inv_dz
        keep = (fx >= 0) & (fx < self.height) & (fy >= 0) & (fy < self.width)
        keep &= (fz >= 0) & (fz < g.z_slices)
        idx = keep.nonzero().squeeze(1)
        cell = fx[idx].long() * self.width + fy[idx].long()
        zslice = fz[idx].long().clamp_(max=g.z_slices - 1)
        # A NaN intensity (finite coordinates) counts as 0 rather than poisoning the cell.
        inten = torch.nan_to_num(pts[idx, 3] * (1.0 / g.intensity_max), nan=0.0).clamp_(0.0, 1.0)
        n_kept = int(idx.numel())

        bev = torch.zeros(self.channels * hw, dtype=torch.float32, device=self.device)
        bev.index_fill_(0, zslice * hw + cell, 1.0)
        view = bev.view(self.channels, hw)
        view[g.z_slices].scatter_reduce_(0, cell, inten, reduce="amax", include_self=True)
        count = torch.bincount(cell, minlength=hw).to(torch.float32)
        view[g.z_slices + 1] = (torch.log1p(count) * self._inv_log_sat).clamp_(max=1.0)
        return bev.view(1, self.channels, self.height, self.width), n_kept


def rasterize(points: np.ndarray | torch.Tensor, grid: GridConfig,
              device: str | torch.device = "cpu") -> torch.Tensor:
    """One-shot form of :class:`Rasterizer`: returns the ``(1, C, H, W)`` BEV tensor."""
    return Rasterizer(grid, device)(points)[0]


def _as_tensor(points: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(points, torch.Tensor):
        return points
    arr = np.asarray(points)
    if arr.dtype != np.float32:
        arr = arr.astype(np.float32)
    if arr.strides[-1] != arr.itemsize or arr.strides[0] % arr.itemsize or arr.strides[0] < 0:
        arr = np.ascontiguousarray(arr)
    return torch.from_numpy(arr)  # zero-copy, also of a read-only buffer (see the filter above)
