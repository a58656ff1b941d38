"""Pure-torch backend of the tiled sparse convolution ops: ``reduce_mask``, ``gather``, ``scatter``.

This is the reference implementation of the op API shared with the CuPy backend
(``cupy_backend.py``, whose kernels are tested against these functions). It runs on CPU and CUDA
tensors, is fully vectorized (index arithmetic plus ``index_select`` / ``index_add_`` /
``index_copy_`` / ``take`` / ``put_``; there is no Python loop over tiles) and needs nothing but
torch. The argument and geometry checks both backends share live in :mod:`.geometry`.

Tile geometry
-------------
A *tile grid* is given by a tile size ``(th, tw)``, a stride ``(sh, sw)`` and an offset
``(oy, ox)`` (ints may be given for square values). For a map of ``H x W`` cells the grid has
``Ty = ceil(H / sh)`` rows and ``Tx = ceil(W / sw)`` columns, and tile ``(ty, tx)`` covers the
rows ``[ty*sh + oy, ty*sh + oy + th)`` and the columns ``[tx*sw + ox, tx*sw + ox + tw)``. Parts of
a tile outside the map read as zeros (``gather``) and are dropped (``scatter``, ``reduce_mask``).

SBNet geometry for a block with output tile ``B`` and halo ``h`` (the receptive-field radius of
the block's convolutions)::

    indices, K = reduce_mask(mask, tile=B, stride=B)            # which B x B output tiles run
    tiles = gather(x, indices, tile=B + 2*h, stride=B, offset=-h)   # (K, C, B+2h, B+2h)
    y = valid_convs(tiles)                                       # unpadded convs: B+2h -> B
    out = scatter(y, indices, base, stride=B, offset=0, add=True)  # tile size from y

i.e. the gather stride is ``tile - 2*halo``: neighbouring input tiles overlap by ``2*h`` cells
while the output tiles partition the map.

Precomputed positions
---------------------
``gather`` and ``scatter`` derive each element's flat cell index from ``indices`` and the grid on
every call (and, when a tile reaches past the border, which elements are off the map). A caller
that moves the same tiles many times -- every module of a backbone stage does -- can compute them
once with :func:`tile_index` and pass the :class:`TileIndex` to :func:`gather_at` /
:func:`scatter_at`, which give the same results (:class:`~.plan.TilePlan` caches them per stage).
The CuPy backend has no such functions: its kernels compute the positions themselves.

Layouts
-------
``gather`` and ``scatter`` take ``layout="NCHW"`` (``x`` is ``(N, C, H, W)``, tiles are
``(K, C, th, tw)``) or ``layout="NHWC"`` (``x`` is ``(N, H, W, C)``, tiles ``(K, th, tw, C)``).
The NHWC path moves whole channel vectors (one row copy per cell) and is the faster one on CPU;
a NCHW tensor stored ``channels_last`` is an NHWC tensor after ``permute(0, 2, 3, 1)`` (a free
view), which is how :class:`~sparse_detector_ros.sparse.blocks.SparseResidualBlock` uses it.
Outputs are contiguous in the requested layout.

Autograd
--------
``gather`` and ``scatter`` are differentiable with respect to ``x`` / ``tiles`` / ``base``
(they are built from differentiable torch indexing ops; ``scatter(inplace=True)`` modifies
``base`` in place, so ``base`` must not be a leaf that requires grad). ``reduce_mask`` returns
integer indices and is not differentiable. Training normally uses the dense-masked reference
path of the block, which the tests prove equal to the sparse path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .geometry import (IntPair, check_geometry, check_indices, check_layout, map_shape,
                       reduce_mask_geometry, scatter_geometry)

__all__ = ["reduce_mask", "gather", "scatter", "TileIndex", "tile_index", "gather_at",
           "scatter_at", "index_bounds", "tiles_inside", "block_max"]


# --------------------------------------------------------------------------------------------
# reduce_mask
# --------------------------------------------------------------------------------------------

def reduce_mask(mask: torch.Tensor, tile: IntPair, stride: IntPair, offset: IntPair = 0,
                threshold: float = 0.0, pooling: str = "max") -> tuple[torch.Tensor, int]:
    """Active tiles of a computation mask.

    Args:
        mask: ``(N, H, W)`` float tensor (any float dtype).
        tile, stride, offset: tile grid (see the module docstring); the grid has
            ``ceil(H/sh) x ceil(W/sw)`` tiles.
        threshold: a tile is active iff its pooled value is ``> threshold``, compared in
            float64 (the Python float ``threshold`` is not rounded to the mask's dtype).
        pooling: ``"max"`` (max over the window) or ``"avg"`` (mean over the window's in-map
            cells). A window with no in-map cell is never active. The mean is computed in
            float64 whatever the mask's dtype: the window is summed in float64 in row-major
            order and divided by its in-map cell count, exactly as the CUDA kernel
            (``kernels/reduce_mask.cu``) does, so both backends pick the same tiles, ties
            included. For 0/1 masks (and any mask whose window sums fit float64's 53 bits) the
            sum is exact, so the decision does not depend on the summation order at all.

    Returns:
        ``(indices, count)``: ``indices`` is an int32 ``(K, 3)`` tensor of rows ``[n, ty, tx]``
        in lexicographic order on ``mask``'s device, ``count`` the Python int ``K``
        (``K = 0`` gives a ``(0, 3)`` tensor). Not differentiable.
    """
    (N, H, W, Ty, Tx), (th, tw, sh, sw, oy, ox) = reduce_mask_geometry(mask, tile, stride,
                                                                       offset, pooling)
    m = mask.detach()
    if pooling == "avg":
        m = m.double()      # float64 sum and mean (see the docstring): same as the kernel
    elif m.dtype not in (torch.float32, torch.float64):
        m = m.float()
    if (pooling == "max" and oy == 0 and ox == 0 and th == sh and tw == sw
            and H % th == 0 and W % tw == 0):
        # common case (the block's output grid on a divisible map): block maxima
        pooled = block_max(m, th, tw)
    else:
        pooled = _pool(m, H, W, Ty, Tx, th, tw, sh, sw, oy, ox, pooling)
    indices = torch.nonzero(pooled.double() > float(threshold)).to(torch.int32)
    return indices, int(indices.shape[0])


def block_max(m: torch.Tensor, th: int, tw: int) -> torch.Tensor:
    """Maximum over the non-overlapping ``th x tw`` blocks of ``m`` ``(N, H, W)`` with ``H``
    and ``W`` multiples of ``th`` and ``tw``: ``(N, H / th, W / tw)``, the values of
    ``F.max_pool2d(m[:, None], (th, tw))[:, 0]`` (NaN propagates as there), computed as
    reductions over reshaped views: on CPU several times faster than ``max_pool2d``, which
    parallelises over ``N * C`` only (a mask has one channel). A factor 2 is one elementwise
    ``torch.maximum`` of two strided views; larger factors are ``amax`` reductions."""
    N, H, W = m.shape
    if H % th or W % tw:
        raise ValueError(f"block_max: map {(H, W)} is not a multiple of the block {(th, tw)}")
    r = m.reshape(N, H // th, th, W)
    r = torch.maximum(r[:, :, 0], r[:, :, 1]) if th == 2 else r.amax(2)
    r = r.reshape(N, H // th, W // tw, tw)
    return torch.maximum(r[..., 0], r[..., 1]) if tw == 2 else r.amax(3)


def _pool(m, H, W, Ty, Tx, th, tw, sh, sw, oy, ox, pooling):
    """(N, Ty, Tx) pooled values; windows with no in-map cell give -inf (max) / nan (avg)."""
    # Crop / pad the map so that window (ty, tx) starts at (ty*sh, tx*sw) of the padded map and
    # the last window fits: rows needed [oy, (Ty-1)*sh + oy + th).
    need_h = (Ty - 1) * sh + th
    need_w = (Tx - 1) * sw + tw
    top, left = oy, ox                      # first needed row/col in map coordinates
    pad_t, pad_l = max(0, -top), max(0, -left)
    fill = float("-inf") if pooling == "max" else 0.0
    src = m[:, max(0, top):, max(0, left):]
    src = src[:, :max(0, need_h - pad_t), :max(0, need_w - pad_l)]
    pad_b = need_h - pad_t - src.shape[1]
    pad_r = need_w - pad_l - src.shape[2]
    if pooling == "max":
        if src.numel() == 0:
            return torch.full((m.shape[0], Ty, Tx), float("-inf"), dtype=m.dtype, device=m.device)
        p = F.pad(src, (pad_l, pad_r, pad_t, pad_b),
                  value=fill) if (pad_l or pad_r or pad_t or pad_b) else src
        return F.max_pool2d(p.unsqueeze(1), (th, tw), (sh, sw)).squeeze(1)[:, :Ty, :Tx]
    # avg over in-map cells: window sum / window in-map count.
    ones = torch.ones((1, 1) + tuple(src.shape[1:]), dtype=m.dtype, device=m.device)
    if src.numel() == 0:
        return torch.full((m.shape[0], Ty, Tx), float("nan"), dtype=m.dtype, device=m.device)
    p = F.pad(src.unsqueeze(1), (pad_l, pad_r, pad_t, pad_b))
    o = F.pad(ones, (pad_l, pad_r, pad_t, pad_b))
    s = F.avg_pool2d(p, (th, tw), (sh, sw), divisor_override=1).squeeze(1)[:, :Ty, :Tx]
    c = F.avg_pool2d(o, (th, tw), (sh, sw), divisor_override=1).squeeze(1)[:, :Ty, :Tx]
    return torch.where(c > 0, s / c.clamp_min(1), torch.full_like(s, float("nan")))


# --------------------------------------------------------------------------------------------
# precomputed element positions (shared index arithmetic of gather and scatter)
# --------------------------------------------------------------------------------------------

class TileIndex:
    """Where the elements of a stack of tiles lie on a map: what :func:`gather` and
    :func:`scatter` compute from ``indices`` and the tile grid on every call, computed once by
    :func:`tile_index` and reusable by :func:`gather_at` / :func:`scatter_at` for any number
    of channels, layouts and calls on a map of the same ``(N, H, W)``.

    Attributes:
        shape: ``(N, H, W)`` of the map.
        tile: ``(th, tw)``.
        flat: ``(K, th, tw)`` int64, flat cell index ``(n*H + r)*W + c`` of each element,
            clamped onto the map for elements off it.
        valid: ``(K, th, tw)`` bool, which elements lie on the map (batch index in ``[0, N)``,
            row and column inside); ``None`` when all of them do.
    """

    __slots__ = ("shape", "tile", "flat", "valid", "_off", "_on")

    def __init__(self, shape: tuple[int, int, int], tile: tuple[int, int], flat: torch.Tensor,
                 valid: torch.Tensor | None):
        self.shape = shape
        self.tile = tile
        self.flat = flat
        self.valid = valid
        self._off: torch.Tensor | None = None
        self._on: torch.Tensor | None = None

    @property
    def count(self) -> int:
        """``K``, the number of tiles."""
        return int(self.flat.shape[0])

    def off_map(self) -> torch.Tensor:
        """``(M,)`` int64 positions in ``flat.reshape(-1)`` of the elements off the map
        (computed once; empty when ``valid`` is ``None``)."""
        if self._off is None:
            self._off = (self.flat.new_zeros((0,)) if self.valid is None
                         else torch.nonzero(~self.valid.reshape(-1)).flatten())
        return self._off

    def on_map(self) -> torch.Tensor:
        """``(P,)`` int64 positions in ``flat.reshape(-1)`` of the elements on the map (computed
        once; only meaningful when ``valid`` is not ``None``)."""
        if self._on is None:
            self._on = (torch.arange(self.flat.numel(), device=self.flat.device)
                        if self.valid is None
                        else torch.nonzero(self.valid.reshape(-1)).flatten())
        return self._on

    def rows(self, start: int, stop: int) -> "TileIndex":
        """The index of tiles ``start:stop`` (views, no copy)."""
        valid = self.valid[start:stop] if self.valid is not None else None
        return TileIndex(self.shape, self.tile, self.flat[start:stop], valid)


def index_bounds(indices: torch.Tensor) -> tuple[list[int], list[int]] | None:
    """Column-wise smallest and largest ``[n, ty, tx]`` of ``indices`` as host lists (one
    device-to-host copy), ``None`` for ``K = 0``."""
    if indices.shape[0] == 0:
        return None
    lo, hi = indices.aminmax(dim=0)
    return lo.tolist(), hi.tolist()


def tiles_inside(bounds: tuple[list[int], list[int]] | None, shape: tuple[int, ...],
                 tile: IntPair, stride: IntPair, offset: IntPair = 0) -> bool:
    """Host-side test that every element of every tile lies on the map, from
    :func:`index_bounds`: no tensor work. ``shape`` is ``(N, H, W)`` (the batch index is
    checked too) or ``(H, W)`` (rows and columns only). ``True`` for ``K = 0``."""
    if bounds is None:
        return True
    th, tw, sh, sw, oy, ox = check_geometry(tile, stride, offset)
    lo, hi = bounds
    if len(shape) == 3:
        if lo[0] < 0 or hi[0] >= shape[0]:
            return False
        shape = shape[1:]
    H, W = shape
    return (lo[1] * sh + oy >= 0 and lo[2] * sw + ox >= 0
            and hi[1] * sh + oy + th <= H and hi[2] * sw + ox + tw <= W)


def tile_index(indices: torch.Tensor, shape: tuple[int, int, int], tile: IntPair,
               stride: IntPair, offset: IntPair = 0, device: torch.device | None = None,
               bounds: tuple[list[int], list[int]] | None = None) -> TileIndex:
    """The :class:`TileIndex` of the tiles ``indices`` (``(K, 3)`` rows ``[n, ty, tx]``) of
    the grid ``tile``/``stride``/``offset`` on an ``(N, H, W)`` map, on ``device`` (default:
    ``indices``' device). ``bounds``: :func:`index_bounds` of ``indices`` when the caller
    already has it (saves the device-to-host copy that decides whether any element is off the
    map); ``None``: computed here."""
    check_indices(indices)
    th, tw, sh, sw, oy, ox = check_geometry(tile, stride, offset)
    N, H, W = (int(v) for v in shape)
    dev = device if device is not None else indices.device
    if bounds is None:
        bounds = index_bounds(indices)
    idx = indices.to(device=dev, dtype=torch.int64)
    if tiles_inside(bounds, (N, H, W), (th, tw), (sh, sw), (oy, ox)):
        # every element on the map: flat = corner of the tile + offset of the element in it
        corner = (idx * torch.tensor([H * W, sh * W, sw], device=dev)).sum(1) + (oy * W + ox)
        inner = (torch.arange(th, device=dev) * W)[:, None] + torch.arange(tw, device=dev)
        return TileIndex((N, H, W), (th, tw), corner[:, None, None] + inner, None)
    # Rows with a batch index outside [0, N) or cells off the map read as zero / are dropped,
    # as in the CuPy kernels.
    n = idx[:, 0]
    rows = idx[:, 1:2] * sh + (oy + torch.arange(th, device=dev))
    cols = idx[:, 2:3] * sw + (ox + torch.arange(tw, device=dev))
    vn = (n >= 0) & (n < N)
    vr = (rows >= 0) & (rows < H)
    vc = (cols >= 0) & (cols < W)
    valid = vn[:, None, None] & vr[:, :, None] & vc[:, None, :]
    n = n.clamp(0, N - 1)
    rows = rows.clamp(0, H - 1)
    cols = cols.clamp(0, W - 1)
    flat = ((n * H)[:, None] + rows)[:, :, None] * W + cols[:, None, :]
    return TileIndex((N, H, W), (th, tw), flat, valid)


def _check_index(index: TileIndex, N: int, H: int, W: int, what: str) -> None:
    if not isinstance(index, TileIndex):
        raise TypeError(f"index must be a TileIndex (from tile_index), got "
                        f"{type(index).__name__}")
    if index.shape != (N, H, W):
        raise ValueError(f"{what}: the TileIndex was built for a map (N, H, W) = "
                         f"{index.shape}, got a map of {(N, H, W)}")


# --------------------------------------------------------------------------------------------
# gather
# --------------------------------------------------------------------------------------------

def gather(x: torch.Tensor, indices: torch.Tensor, tile: IntPair, stride: IntPair,
           offset: IntPair = 0, layout: str = "NCHW") -> torch.Tensor:
    """Copy the listed tiles of ``x`` into a stack of tiles.

    Args:
        x: ``(N, C, H, W)`` for ``layout="NCHW"`` or ``(N, H, W, C)`` for ``"NHWC"``.
        indices: ``(K, 3)`` integer rows ``[n, ty, tx]`` (e.g. from :func:`reduce_mask`).
        tile, stride, offset: tile grid; element ``(i, j)`` of tile ``k`` is
            ``x[n, :, ty*sh + oy + i, tx*sw + ox + j]``, zero where that cell is outside the map.

    Returns:
        ``(K, C, th, tw)`` (NCHW) or ``(K, th, tw, C)`` (NHWC), contiguous, same dtype and
        device as ``x``. Differentiable with respect to ``x``.
    """
    layout = check_layout(layout)
    check_indices(indices)
    N, C, H, W = map_shape(x, layout)
    th, tw, sh, sw, oy, ox = check_geometry(tile, stride, offset)
    if indices.shape[0] == 0:
        shape = (0, C, th, tw) if layout == "NCHW" else (0, th, tw, C)
        return x.new_zeros(shape)
    index = tile_index(indices, (N, H, W), (th, tw), (sh, sw), (oy, ox), x.device)
    return gather_at(x, index, layout)


def gather_at(x: torch.Tensor, index: TileIndex, layout: str = "NCHW") -> torch.Tensor:
    """:func:`gather` with the element positions precomputed by :func:`tile_index` (for a map
    of ``x``'s ``(N, H, W)``; ``ValueError`` otherwise). Same result, shapes and layouts."""
    layout = check_layout(layout)
    N, C, H, W = map_shape(x, layout)
    _check_index(index, N, H, W, "gather_at")
    K = index.count
    th, tw = index.tile
    if K == 0:
        shape = (0, C, th, tw) if layout == "NCHW" else (0, th, tw, C)
        return x.new_zeros(shape)
    flat, valid = index.flat, index.valid
    if layout == "NHWC":
        # one contiguous C-vector per cell: a row gather
        rows = x.reshape(N * H * W, C).index_select(0, flat.reshape(-1))
        if valid is not None:   # zero the (few) out-of-map cells: clamped reads
            bad = index.off_map()
            rows = rows.index_fill(0, bad, 0) if rows.requires_grad else rows.index_fill_(0, bad, 0)
        return rows.view(K, th, tw, C)
    # NCHW: element-wise gather on the flat tensor, index (K, C, th, tw)
    HW = H * W
    n_of = torch.div(flat, HW, rounding_mode="floor")
    cell = flat - n_of * HW
    ch = torch.arange(C, device=x.device).view(1, C, 1, 1)
    lin = (n_of[:, None] * C + ch) * HW + cell[:, None]
    out = x.contiguous().take(lin)
    if valid is not None:
        inv = ~valid[:, None].expand(K, C, th, tw)
        out = out.masked_fill(inv, 0) if out.requires_grad else out.masked_fill_(inv, 0)
    return out


# --------------------------------------------------------------------------------------------
# scatter
# --------------------------------------------------------------------------------------------

def scatter(tiles: torch.Tensor, indices: torch.Tensor, base: torch.Tensor, stride: IntPair,
            offset: IntPair = 0, add: bool = False, inplace: bool = True,
            layout: str = "NCHW") -> torch.Tensor:
    """Write (or add) a stack of tiles back into a map.

    Args:
        tiles: ``(K, C, bh, bw)`` (NCHW) or ``(K, bh, bw, C)`` (NHWC); the tile size is taken
            from this shape.
        indices: ``(K, 3)`` integer rows ``[n, ty, tx]``.
        base: the map, ``(N, C, H, W)`` (NCHW) or ``(N, H, W, C)`` (NHWC).
        stride, offset: tile grid; element ``(i, j)`` of tile ``k`` goes to
            ``base[n, :, ty*sh + oy + i, tx*sw + ox + j]`` when that cell is inside the map
            (elements outside the map are dropped).
        add: accumulate into ``base`` (overlapping tiles sum) instead of overwriting. With
            ``add=False`` and overlapping tiles, which tile's value survives is unspecified.
        inplace: write into ``base`` itself (returned); ``False`` writes into a copy of ``base``.

    Returns:
        ``base`` (or its updated copy). Differentiable with respect to ``tiles`` and ``base``.
    """
    layout = check_layout(layout)
    (K, C, bh, bw, N, H, W), (sh, sw, oy, ox) = scatter_geometry(tiles, indices, base, stride,
                                                                 offset, layout)
    if K == 0:
        return base if inplace else base.clone()
    index = tile_index(indices, (N, H, W), (bh, bw), (sh, sw), (oy, ox), base.device)
    return scatter_at(tiles, index, base, add, inplace, layout)


def scatter_at(tiles: torch.Tensor, index: TileIndex, base: torch.Tensor, add: bool = False,
               inplace: bool = True, layout: str = "NCHW") -> torch.Tensor:
    """:func:`scatter` with the element positions precomputed by :func:`tile_index` (for a map
    of ``base``'s ``(N, H, W)`` and ``tiles``' tile size; ``ValueError`` otherwise). Same
    result, shapes and layouts."""
    layout = check_layout(layout)
    if tiles.dim() != 4:
        raise ValueError("tiles and base must be 4-D")
    N, Cb, H, W = map_shape(base, layout)
    _check_index(index, N, H, W, "scatter_at")
    if layout == "NCHW":
        K, C, bh, bw = tiles.shape
    else:
        K, bh, bw, C = tiles.shape
    if C != Cb:
        raise ValueError(f"tiles have {C} channels but base has {Cb}")
    if (K, bh, bw) != (index.count, *index.tile):
        raise ValueError(f"tiles of shape {tuple(tiles.shape)} ({layout}) do not match the "
                         f"TileIndex: {index.count} tiles of {index.tile}")
    out = base if inplace else base.clone()
    if K == 0:
        return out
    tiles = tiles.to(out.dtype)
    flat, valid = index.flat, index.valid
    if layout == "NHWC":
        src = tiles.reshape(K * bh * bw, C)
        idx = flat.reshape(-1)
        if valid is not None:
            keep = index.on_map()
            src, idx = src.index_select(0, keep), idx.index_select(0, keep)
        if out.is_contiguous():
            view = out.view(N * H * W, C)
            (view.index_add_ if add else view.index_copy_)(0, idx, src)
        else:  # e.g. a channels_last NCHW tensor permuted to NHWC with odd strides
            _put_rows(out, idx, src, add)
        return out
    HW = H * W
    n_of = torch.div(flat, HW, rounding_mode="floor")
    cell = flat - n_of * HW
    ch = torch.arange(C, device=out.device).view(1, C, 1, 1)
    lin = (n_of[:, None] * C + ch) * HW + cell[:, None]
    src = tiles
    if valid is not None:
        keep = valid[:, None].expand(K, C, bh, bw)
        lin, src = lin[keep], src[keep]
    if out.is_contiguous():
        out.put_(lin, src.contiguous(), accumulate=add)
    else:
        tmp = out.contiguous()
        tmp.put_(lin, src.contiguous(), accumulate=add)
        out.copy_(tmp)
    return out


def _put_rows(out: torch.Tensor, idx: torch.Tensor, src: torch.Tensor, add: bool) -> None:
    """Row scatter into a non-contiguous NHWC tensor through a contiguous temporary."""
    N, H, W, C = out.shape
    tmp = out.contiguous()
    view = tmp.view(N * H * W, C)
    (view.index_add_ if add else view.index_copy_)(0, idx, src)
    out.copy_(tmp)
