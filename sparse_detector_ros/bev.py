"""Points -> bird's-eye-view (BEV) feature grid, in torch, on CPU or CUDA.

Grid convention. This is the one place it is written down; every raster of the project (BEV
features, computation masks, the map prior of :mod:`.masks`, the simulator's road map) follows
it::

    row i = floor((x - x_min) / resolution),  0 <= i < H = (x_max - x_min) / resolution
    col j = floor((y - y_min) / resolution),  0 <= j < W = (y_max - y_min) / resolution

so cell ``(i, j)`` covers ``x in [x_min + i*res, x_min + (i+1)*res)`` and the same for y, and
its centre is ``(x_min + (i + 0.5) * res, y_min + (j + 0.5) * res)``. For the BEV and the masks
the frame is the cloud's own (REP-103: x forward, y left, z up); a world-frame map uses the same
rule with its origin in place of ``(x_min, y_min)``. Arrays are indexed ``[..., row, col]``,
i.e. ``[..., x, y]``: a picture of the raster with row 0 at the top shows +x pointing down and
+y pointing right. The default grid is +-51.2 m at 0.2 m
(512 x 512 cells, 360 degrees around the sensor), z from -3 m to 2 m: it holds the range where a
64-beam spinning LiDAR still puts several points on a car, 0.2 m resolves a pedestrian (about
0.5 m across) into a few cells, and 512 is divisible by every tile size the sparse engine uses
(8, 16, 32), so tiles line up with the map border.

Features, shape ``(B, C, H, W)`` float32 (NCHW, ``B = 1`` for one cloud), ``C = z_slices + 2``:

* channels ``0 .. z_slices-1``: occupancy of height slice ``k`` (1.0 when any point of the cell
  has ``z`` in ``[z_min + k*dz, z_min + (k+1)*dz)``, ``dz = (z_max - z_min) / z_slices``),
  lowest slice first;
* channel ``z_slices``: maximum intensity in the cell divided by ``intensity_max``, clipped to
  ``[0, 1]``;
* channel ``z_slices + 1``: point density ``min(1, log(1 + n) / log(density_saturation))``
  with ``n`` the number of points in the cell.

Points outside the x/y/z ranges (and points with NaN/Inf coordinates) are dropped. The
computation is vectorized (scatter/bincount, no Python loop over points, one pass for a whole
batch) and deterministic.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from .config import GridConfig

# torch warns (once per process) when it wraps a read-only NumPy array. The rasterizer wraps
# read-only message buffers without copying and never writes to them, so the warning does not
# apply; it is silenced only around that call (see _as_tensor), not for the process.
_NOT_WRITABLE = "The given NumPy array is not writable"


class Rasterizer:
    """Points -> BEV features for one grid and device.

    * ``rasterizer(points) -> (bev (1, C, H, W), n_kept: int)`` for one cloud;
    * ``rasterizer.batch([points_0, ..., points_{B-1}]) -> (bev (B, C, H, W), n_kept: list)``
      for a batch, in one vectorised pass; equal to stacking the single-cloud results.

    ``points`` is a numpy array or a torch tensor ``(N, >=4)`` with columns
    ``x, y, z, intensity`` (further columns are ignored); numpy input is wrapped without a copy
    and moved to ``device`` in one transfer.

    ``channels_last=True`` writes the same values straight into channels_last storage (the
    layout of the sparse backbone: ``bev.permute(0, 2, 3, 1)`` is contiguous), which saves the
    network a copy of the whole map (~1 ms for the default grid on a 2-core CPU).
    """

    def __init__(self, grid: GridConfig, device: str | torch.device = "cpu", *,
                 channels_last: bool = False):
        self.grid = grid
        self.device = torch.device(device)
        self.channels_last = bool(channels_last)
        self.height, self.width = grid.shape
        self.channels = grid.channels
        self._inv_res = 1.0 / grid.resolution
        self._inv_dz = grid.z_slices / (grid.z_max - grid.z_min)
        self._inv_log_sat = 1.0 / math.log(grid.density_saturation)

    def __call__(self, points: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, int]:
        pts = _checked(_as_tensor(points), "points").to(self.device, non_blocking=True)
        bev, kept = self._rasterize(pts[:, :4].float(), None, 1)
        return bev, int(kept.numel())

    def batch(self, clouds: Sequence[np.ndarray | torch.Tensor]
              ) -> tuple[torch.Tensor, list[int]]:
        """``B`` clouds -> ``(bev (B, C, H, W), n_kept)``, ``n_kept[b]`` the points of cloud ``b``
        inside the grid. Sample ``b`` of the result equals ``self(clouds[b])[0][0]``."""
        if isinstance(clouds, (np.ndarray, torch.Tensor)) or len(clouds) == 0:
            what = (f"an array of shape {tuple(clouds.shape)}" if hasattr(clouds, "shape")
                    else "an empty sequence")
            raise ValueError(f"clouds must be a non-empty list of (N, 4) point arrays, got {what}")
        parts = [_checked(_as_tensor(p), f"clouds[{b}]")[:, :4]
                 for b, p in enumerate(clouds)]
        counts = torch.tensor([len(p) for p in parts], dtype=torch.long)
        if len({p.device for p in parts}) == 1:   # one concatenation, one transfer
            pts = torch.cat([p.float() for p in parts]).to(self.device, non_blocking=True)
        else:
            pts = torch.cat([p.to(self.device, torch.float32) for p in parts])
        sample = torch.repeat_interleave(torch.arange(len(parts)), counts).to(self.device)
        bev, kept = self._rasterize(pts, sample, len(parts))
        n_kept = torch.bincount(sample[kept], minlength=len(parts))
        return bev, n_kept.tolist()

    def _rasterize(self, pts: torch.Tensor, sample: torch.Tensor | None, batch: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """``pts (N, 4)`` float32 on the device, ``sample (N,)`` int64 batch index (None: all 0)
        -> ``(bev (batch, C, H, W), kept (K,) indices of the points inside the grid)``."""
        g = self.grid
        hw = self.height * self.width
        # Cell coordinates as floats; comparisons on them also drop NaN/Inf.
        fx = (pts[:, 0] - g.x_min) * self._inv_res
        fy = (pts[:, 1] - g.y_min) * self._inv_res
        fz = (pts[:, 2] - g.z_min) * self._inv_dz
        keep = (fx >= 0) & (fx < self.height) & (fy >= 0) & (fy < self.width)
        keep &= (fz >= 0) & (fz < g.z_slices)
        idx = keep.nonzero().squeeze(1)
        # cell index within one sample, and the flat offset of the sample's first channel
        cell = fx[idx].long() * self.width + fy[idx].long()
        b = None if sample is None else sample[idx]
        base = 0 if b is None else b * (self.channels * hw)
        zslice = fz[idx].long().clamp_(max=g.z_slices - 1)
        # A NaN intensity (finite coordinates) counts as 0 rather than poisoning the cell.
        inten = torch.nan_to_num(pts[idx, 3] * (1.0 / g.intensity_max), nan=0.0).clamp_(0.0, 1.0)

        C = self.channels
        bev = torch.zeros(batch * C * hw, dtype=torch.float32, device=self.device)
        # flat position of channel k of a point's cell: base + cell * cell_step + k * channel_step
        cell_step, channel_step = (C, 1) if self.channels_last else (1, hw)
        at = base + cell * cell_step
        bev.index_fill_(0, at + zslice * channel_step, 1.0)
        bev.scatter_reduce_(0, at + g.z_slices * channel_step, inten, reduce="amax",
                            include_self=True)
        bev = (bev.view(batch, self.height, self.width, C).permute(0, 3, 1, 2)
               if self.channels_last else bev.view(batch, C, self.height, self.width))
        sample_cell = cell if b is None else b * hw + cell
        count = torch.bincount(sample_cell, minlength=batch * hw).to(torch.float32)
        bev[:, g.z_slices + 1] = (torch.log1p(count) * self._inv_log_sat).clamp_(max=1.0).view(
            batch, self.height, self.width)
        return bev, idx


def rasterize(points: np.ndarray | torch.Tensor, grid: GridConfig,
              device: str | torch.device = "cpu") -> torch.Tensor:
    """One-shot form of :class:`Rasterizer`: returns the ``(1, C, H, W)`` BEV tensor."""
    return Rasterizer(grid, device)(points)[0]


def rasterize_batch(clouds: Sequence[np.ndarray | torch.Tensor], grid: GridConfig,
                    device: str | torch.device = "cpu") -> torch.Tensor:
    """One-shot form of :meth:`Rasterizer.batch`: returns the ``(B, C, H, W)`` BEV tensor."""
    return Rasterizer(grid, device).batch(clouds)[0]


def _as_tensor(points: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A torch view of ``points`` (tensors pass through). A float32 NumPy array whose rows are
    evenly strided is wrapped without a copy, read-only buffers too; other arrays are converted
    to float32 / made contiguous first. The tensor must not be written to."""
    if isinstance(points, torch.Tensor):
        return points
    arr = np.asarray(points)
    if arr.dtype != np.float32:
        arr = arr.astype(np.float32)
    if arr.ndim == 2 and (arr.strides[-1] != arr.itemsize or arr.strides[0] % arr.itemsize
                          or arr.strides[0] < 0):
        arr = np.ascontiguousarray(arr)
    if arr.flags.writeable:
        return torch.from_numpy(arr)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NOT_WRITABLE, category=UserWarning)
        return torch.from_numpy(arr)


def _checked(pts: torch.Tensor, name: str) -> torch.Tensor:
    if pts.ndim != 2 or pts.shape[1] < 4:
        raise ValueError(f"{name} must have shape (N, 4) [x, y, z, intensity], got "
                         f"{tuple(pts.shape)}")
    return pts
