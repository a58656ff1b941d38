"""Tile geometry and argument checks shared by the sparse ops' backends and the sparse blocks.

Everything here is public and backend-free: :mod:`.torch_backend`, :mod:`.cupy_backend`,
:mod:`.blocks` and :mod:`.strided` import these functions instead of reaching into each other.

Tile grid (see :mod:`.torch_backend` for the full picture): tile size ``(th, tw)``, stride
``(sh, sw)``, offset ``(oy, ox)``; on an ``H x W`` map the grid has ``ceil(H/sh) x ceil(W/sw)``
tiles and tile ``(ty, tx)`` covers rows ``[ty*sh + oy, ty*sh + oy + th)`` and columns
``[tx*sw + ox, tx*sw + ox + tw)``.
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["IntPair", "pair", "grid_shape", "check_geometry", "check_indices", "check_layout",
           "map_shape", "reduce_mask_geometry", "scatter_geometry", "conv_output_size",
           "in_map_cells"]

IntPair = int | Sequence[int]


def pair(v: IntPair, name: str = "value") -> tuple[int, int]:
    """``3 -> (3, 3)``; ``(2, 3) -> (2, 3)``; anything else raises ``ValueError``."""
    if isinstance(v, torch.Tensor):
        v = v.tolist()
    if isinstance(v, int) and not isinstance(v, bool):
        return int(v), int(v)
    try:
        a, b = v  # type: ignore[misc]
        return int(a), int(b)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an int or an (h, w) pair, got {v!r}") from None


def grid_shape(hw: tuple[int, int], stride: IntPair) -> tuple[int, int]:
    """``(Ty, Tx) = (ceil(H / sh), ceil(W / sw))``."""
    sh, sw = pair(stride, "stride")
    return -(-hw[0] // sh), -(-hw[1] // sw)


def check_geometry(tile: IntPair, stride: IntPair, offset: IntPair
                   ) -> tuple[int, int, int, int, int, int]:
    """Validated ``(th, tw, sh, sw, oy, ox)``: tile and stride ``>= 1``, any offset."""
    th, tw = pair(tile, "tile")
    sh, sw = pair(stride, "stride")
    oy, ox = pair(offset, "offset")
    if th < 1 or tw < 1:
        raise ValueError(f"tile must be >= 1, got {(th, tw)}")
    if sh < 1 or sw < 1:
        raise ValueError(f"stride must be >= 1, got {(sh, sw)}")
    return th, tw, sh, sw, oy, ox


def check_indices(indices: torch.Tensor) -> None:
    """``indices`` must be a ``(K, 3)`` tensor of rows ``[n, ty, tx]``."""
    if indices.dim() != 2 or indices.shape[1] != 3:
        raise ValueError(f"indices must be (K, 3) rows [n, ty, tx], got {tuple(indices.shape)}")


def check_layout(layout: str) -> str:
    """``layout`` itself when it is ``"NCHW"`` or ``"NHWC"``, else ``ValueError``."""
    if layout not in ("NCHW", "NHWC"):
        raise ValueError(f"layout must be 'NCHW' or 'NHWC', got {layout!r}")
    return layout


def map_shape(x: torch.Tensor, layout: str) -> tuple[int, int, int, int]:
    """``(N, C, H, W)`` of a 4-D map stored ``(N, C, H, W)`` (NCHW) or ``(N, H, W, C)``
    (NHWC)."""
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D ({layout}), got shape {tuple(x.shape)}")
    if layout == "NCHW":
        N, C, H, W = x.shape
    else:
        N, H, W, C = x.shape
    return N, C, H, W


def reduce_mask_geometry(mask, tile, stride, offset, pooling):
    """Validated ``((N, H, W, Ty, Tx), (th, tw, sh, sw, oy, ox))`` of a ``reduce_mask`` call:
    ``mask`` a float ``(N, H, W)`` tensor, ``pooling`` ``"max"`` or ``"avg"``."""
    if mask.dim() != 3:
        raise ValueError(f"mask must be (N, H, W), got shape {tuple(mask.shape)}")
    if not mask.is_floating_point():
        raise TypeError(f"mask must be a float tensor, got {mask.dtype}")
    if pooling not in ("max", "avg"):
        raise ValueError(f"pooling must be 'max' or 'avg', got {pooling!r}")
    th, tw, sh, sw, oy, ox = check_geometry(tile, stride, offset)
    N, H, W = mask.shape
    return (N, H, W, *grid_shape((H, W), (sh, sw))), (th, tw, sh, sw, oy, ox)


def scatter_geometry(tiles, indices, base, stride, offset, layout):
    """Validated ``((K, C, bh, bw, N, H, W), (sh, sw, oy, ox))`` of a ``scatter`` call (the tile
    size ``(bh, bw)`` comes from ``tiles``' shape)."""
    check_layout(layout)
    check_indices(indices)
    if tiles.dim() != 4 or base.dim() != 4:
        raise ValueError("tiles and base must be 4-D")
    _, _, sh, sw, oy, ox = check_geometry(1, stride, offset)
    if layout == "NCHW":
        K, C, bh, bw = tiles.shape
        N, Cb, H, W = base.shape
    else:
        K, bh, bw, C = tiles.shape
        N, H, W, Cb = base.shape
    if C != Cb:
        raise ValueError(f"tiles have {C} channels but base has {Cb}")
    if K != indices.shape[0]:
        raise ValueError(f"{K} tiles but {indices.shape[0]} indices")
    return (K, C, bh, bw, N, H, W), (sh, sw, oy, ox)


def conv_output_size(hw: tuple[int, int], kernel: IntPair, stride: IntPair = 1,
                     padding: IntPair = 0, dilation: IntPair = 1) -> tuple[int, int]:
    """Output ``(Ho, Wo)`` of a zero-padded convolution (or pooling) on an ``H x W`` map:
    ``(H + 2p - d*(k-1) - 1) // s + 1`` per axis, as ``torch.nn.Conv2d``. Raises
    ``ValueError`` when the padded map is smaller than the (dilated) kernel."""
    k, s, p, d = (pair(v, n) for v, n in ((kernel, "kernel"), (stride, "stride"),
                                           (padding, "padding"), (dilation, "dilation")))
    out = []
    for i in range(2):
        span = d[i] * (k[i] - 1) + 1
        if hw[i] + 2 * p[i] < span:
            raise ValueError(f"map {tuple(hw)} padded by {p} is smaller than the kernel {k} "
                             f"(dilation {d})")
        out.append((hw[i] + 2 * p[i] - span) // s[i] + 1)
    return out[0], out[1]


def in_map_cells(indices: torch.Tensor, tile: IntPair, stride: IntPair, offset: IntPair,
                 hw: tuple[int, int], device: torch.device | None = None
                 ) -> torch.Tensor | None:
    """``(K, th, tw)`` bool: which elements of the listed tiles lie on the ``H x W`` map (same
    tile geometry as ``gather``), or ``None`` when all of them do (the common case, checked
    cheaply on the grid rows and columns first)."""
    th, tw, sh, sw, oy, ox = check_geometry(tile, stride, offset)
    check_indices(indices)
    H, W = hw
    dev = device if device is not None else indices.device
    ty = indices[:, 1].to(device=dev, dtype=torch.int64)
    tx = indices[:, 2].to(device=dev, dtype=torch.int64)
    rows = ty[:, None] * sh + oy + torch.arange(th, device=dev)
    cols = tx[:, None] * sw + ox + torch.arange(tw, device=dev)
    vr = (rows >= 0) & (rows < H)
    vc = (cols >= 0) & (cols < W)
    if bool(vr.all()) and bool(vc.all()):
        return None
    return vr[:, :, None] & vc[:, None, :]
