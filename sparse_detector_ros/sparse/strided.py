"""Sparse strided (downsampling) convolution: ``y = tilemask_out * layers(x)``, computed only on
the active tiles of the *output* map.

A backbone halves its resolution between stages with a strided conv (3x3 stride 2 padding 1, or
2x2 stride 2), usually followed by batch norm and an activation. :class:`SparseStridedConv` runs
that on the active output tiles only, so the downsampling does not fall back to a dense pass
over the full-resolution map.

``layers`` is an ``nn.Sequential`` holding exactly one ``nn.Conv2d`` (any kernel, stride,
dilation and groups; zero padding given as numbers, ``"valid"``, or ``"same"`` at stride 1),
with pointwise layers (:data:`~.blocks.POINTWISE`) before it (pre-activation) and after it (batch
norm, activation). :func:`downsample_branch` builds conv -> BN -> ReLU.

Geometry, per axis (conv kernel ``k``, dilation ``d``, stride ``s``, padding ``p``, span
``e = d*(k-1) + 1``; output tile size ``B``):

* the output map has ``Ho = (H + 2p - e) // s + 1`` cells, as ``nn.Conv2d``;
* output cell ``r`` reads input cells ``[r*s - p, r*s - p + e)``, so output tile ``ty`` (cells
  ``[ty*B, ty*B + B)``) reads the input window of ``B*s + e - s`` cells starting at
  ``ty*B*s - p``::

    mask_out = downsample_mask(mask, s, (Ho, Wo))                 # (N, Ho, Wo)
    indices, K = reduce_mask(mask_out, B, B)                      # active output tiles
    tiles = gather(x, indices, tile=B*s + e - s, stride=B*s, offset=-p)
    y = layers(tiles), the conv unpadded with stride s           # (K, C_out, B, B)
    out = scatter(y, indices, zeros(N, C_out, Ho, Wo), stride=B)

  (For 3x3 / stride 2 / padding 1: windows of ``2B + 1`` cells at stride ``2B``, offset -1; for
  2x2 / stride 2 / padding 0: ``2B`` cells at stride ``2B``, offset 0.) Input cells of a window
  outside the map are zeroed before the conv (the dense conv's padding) whenever a layer before
  it can have made them non-zero (see :func:`~.blocks.run_valid`).

The output is *masked*: inactive output tiles are 0. The next stage works on the downsampled
mask: :func:`downsample_mask` (cell ``(r, c)`` is the max of the mask over the input cells
``[r*s, r*s + s) x [c*s, c*s + s)``, so output tile ``B x B`` is active exactly when input tile
``B*s x B*s`` is, with max pooling) is what this module uses itself, and
:meth:`SparseStridedConv.out_mask` returns it for the next stage; its
:meth:`~SparseStridedConv.active_tiles` can be handed to the next stage's residual blocks
(``tiles=``) when they use the same tile size, threshold and pooling.

Exactness: on every active output tile the sparse path equals ``act(bn(conv(x)))`` computed
densely with zero padding (``test/test_sparse_block.py``). Above ``dense_crossover`` the dense
layers run and are masked; in ``train()`` mode the dense-masked reference runs
(:meth:`SparseStridedConv.dense_reference`). :meth:`SparseStridedConv.fuse` folds a batch norm
that follows the conv into it. There is no in-place mode: the output is a new, smaller map.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .blocks import (DEFAULTS, check_common, check_first_not_inplace, check_mask,
                     check_pointwise, conv_padding, fold_bn, gather_stack, plan_tiles, run_valid,
                     scatter_stack, tile_mask, tiles_per_chunk)
from .geometry import conv_output_size, grid_shape, pair
from .plan import TilePlan
from .torch_backend import block_max

__all__ = ["SparseStridedConv", "downsample_branch", "downsample_mask", "check_strided"]


def downsample_branch(in_channels: int, out_channels: int, kernel: int = 3,
                      stride: int = 2) -> nn.Sequential:
    """Conv (``kernel``, ``stride``, padding ``(kernel - 1) // 2``, no bias) -> BN -> ReLU:
    3x3 / stride 2 / padding 1 by default, 2x2 / stride 2 / padding 0 with ``kernel=2``."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride, (kernel - 1) // 2, bias=False),
        nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def downsample_mask(mask: torch.Tensor, stride: int | tuple[int, int],
                    out_hw: tuple[int, int] | None = None) -> torch.Tensor:
    """The computation mask at the resolution of a stride-``s`` conv's output.

    Args:
        mask: ``(N, H, W)`` or ``(N, 1, H, W)``; non-float masks are converted to float32.
        stride: ``s`` or ``(sh, sw)``.
        out_hw: ``(Ho, Wo)`` of the conv's output (default ``ceil(H/s), ceil(W/s)``).

    Returns:
        ``(N, Ho, Wo)``: cell ``(r, c)`` is the max of ``mask`` over the input cells
        ``[r*sh, r*sh + sh) x [c*sw, c*sw + sw)`` clipped to the map, 0 where that window is
        entirely off the map.
    """
    if mask.dim() == 4:
        mask = mask[:, 0]
    if mask.dim() != 3:
        raise ValueError(f"mask must be (N, H, W) or (N, 1, H, W), got {tuple(mask.shape)}")
    if not mask.is_floating_point():
        mask = mask.float()
    sh, sw = pair(stride, "stride")
    if sh < 1 or sw < 1:
        raise ValueError(f"stride must be >= 1, got {(sh, sw)}")
    N, H, W = mask.shape
    if out_hw is None:
        out_hw = grid_shape((H, W), (sh, sw))
    Ho, Wo = out_hw
    if H == 0 or W == 0:
        return mask.new_zeros((N, Ho, Wo))
    if H % sh == 0 and W % sw == 0:    # the common case, several times faster on CPU
        pooled = block_max(mask, sh, sw)
    else:
        pooled = F.max_pool2d(mask[:, None], (sh, sw), (sh, sw), ceil_mode=True)[:, 0]
    pooled = pooled[:, :Ho, :Wo]
    if pooled.shape[1] < Ho or pooled.shape[2] < Wo:
        pooled = F.pad(pooled, (0, Wo - pooled.shape[2], 0, Ho - pooled.shape[1]))
    return pooled


def check_strided(layers: nn.Sequential) -> nn.Conv2d:
    """The conv of ``layers``, after checking (errors name the layer) that ``layers`` is an
    ``nn.Sequential`` of exactly one ``nn.Conv2d`` with zero padding and pointwise layers."""
    where = "layers"
    if not isinstance(layers, nn.Sequential):
        raise TypeError("layers must be an nn.Sequential of one Conv2d and pointwise layers, "
                        f"got {type(layers).__name__}")
    convs = [(i, m) for i, m in enumerate(layers) if type(m) is nn.Conv2d]
    if len(convs) != 1:
        raise ValueError(f"layers must hold exactly one nn.Conv2d, got {len(convs)} "
                         f"(chain several SparseStridedConv / SparseResidualBlock instead)")
    i, conv = convs[0]
    if conv.padding_mode != "zeros":
        raise ValueError(f"{where} layer {i} ({conv!r}) uses padding_mode="
                         f"{conv.padding_mode!r}; only zero padding is supported")
    try:
        conv_padding(conv)
    except ValueError as e:
        raise ValueError(f"{where} layer {i}: {e}") from None
    c = conv.in_channels
    for j, m in enumerate(layers):
        if m is conv:
            c = conv.out_channels
            continue
        check_pointwise(m, j, where)
        if isinstance(m, nn.BatchNorm2d) and m.num_features != c:
            raise ValueError(f"{where} layer {j} ({m!r}) takes {m.num_features} channels but "
                             f"gets {c}")
    check_first_not_inplace(list(layers), where)
    return conv


class SparseStridedConv(nn.Module):
    """``tilemask_out * layers(x)`` for a strided conv (plus pointwise layers), computed only on
    the active ``B x B`` tiles of the output map.

    Args:
        layers: ``nn.Sequential`` of one ``nn.Conv2d`` and pointwise layers before / after it
            (e.g. :func:`downsample_branch`); checked by :func:`check_strided`.
        tile_size: output tile size ``B``, in output cells (``sparse.tile_size``).
        threshold, pooling: tile activity from the downsampled mask (``sparse.threshold`` /
            ``sparse.pooling``).
        dense_crossover: above this active-tile fraction the dense layers run instead.
        backend: ``auto`` | ``cupy`` | ``torch`` for reduce_mask / gather / scatter.
        chunk_bytes: as :class:`~.blocks.SparseResidualBlock` (results do not depend on it).

    Defaults are those of :class:`~sparse_detector_ros.config.SparseConfig`.

    ``forward(x, mask, tiles=None)``: ``x`` ``(N, C, H, W)`` (channels_last storage is
    fastest), ``mask`` ``(N, H, W)`` or ``(N, 1, H, W)`` at ``x``'s resolution; ``tiles`` the
    :class:`~.plan.TilePlan` of :meth:`active_tiles` (for the *output* map), shared with the
    residual blocks that follow at the output resolution. Returns ``(N, C_out, Ho, Wo)`` in
    ``x``'s memory format, 0 on inactive output tiles.
    """

    def __init__(self, layers: nn.Sequential, tile_size: int = DEFAULTS.tile_size,
                 threshold: float = DEFAULTS.threshold, pooling: str = DEFAULTS.pooling,
                 dense_crossover: float = DEFAULTS.dense_crossover,
                 backend: str = DEFAULTS.backend, chunk_bytes: int | str | None = "auto"):
        super().__init__()
        conv = check_strided(layers)
        check_common(tile_size, pooling, backend)
        self.layers = layers
        self.tile_size = int(tile_size)
        self.threshold = float(threshold)
        self.pooling = pooling
        self.dense_crossover = float(dense_crossover)
        self.backend = backend
        self.chunk_bytes = chunk_bytes
        self.kernel_size = tuple(conv.kernel_size)
        self.stride = tuple(conv.stride)
        self.dilation = tuple(conv.dilation)
        self.padding = conv_padding(conv)
        self.out_channels = conv.out_channels
        self.last_active_fraction: float | None = None
        self.last_path: str | None = None

    @classmethod
    def from_config(cls, layers: nn.Sequential, cfg, **kwargs) -> "SparseStridedConv":
        """Build from a :class:`~sparse_detector_ros.config.SparseConfig`."""
        return cls(layers, cfg.tile_size, cfg.threshold, cfg.pooling, cfg.dense_crossover,
                   cfg.backend, **kwargs)

    def fuse(self) -> "SparseStridedConv":
        """Inference form: fold the batch norm after the conv into it, channels_last weights,
        eval mode."""
        self.layers = fold_bn(self.layers).to(memory_format=torch.channels_last)
        return self.eval()

    # ------------------------------------------------------------------ geometry

    def output_size(self, hw: tuple[int, int]) -> tuple[int, int]:
        """``(Ho, Wo)`` of the conv on an ``H x W`` map."""
        return conv_output_size(tuple(hw), self.kernel_size, self.stride, self.padding,
                                self.dilation)

    def window(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """``(tile, stride, offset)`` of the input gather for ``B x B`` output tiles."""
        B = self.tile_size
        (sy, sx), (py, px) = self.stride, self.padding
        ey, ex = (d * (k - 1) + 1 for k, d in zip(self.kernel_size, self.dilation))
        return (B * sy + ey - sy, B * sx + ex - sx), (B * sy, B * sx), (-py, -px)

    def out_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """The mask ``(N, H, W)`` / ``(N, 1, H, W)`` at the output resolution ``(N, Ho, Wo)``
        (:func:`downsample_mask`): the next stage's mask."""
        return downsample_mask(mask, self.stride, self.output_size(mask.shape[-2:]))

    def active_tiles(self, mask: torch.Tensor) -> TilePlan:
        """``(indices, K, total_tiles)`` of the ``B x B`` output tile grid, from the mask at the
        *input* resolution, as a :class:`~.plan.TilePlan` for the *output* map (hand it to this
        module and to the next stage's blocks)."""
        return self.active_tiles_of(self.out_mask(mask))

    def active_tiles_of(self, out_mask: torch.Tensor) -> TilePlan:
        """:meth:`active_tiles` from the mask already at the *output* resolution (``(N, Ho,
        Wo)``, from :meth:`out_mask`): for a caller that keeps that mask anyway."""
        return plan_tiles(out_mask, self.tile_size, self.threshold, self.pooling, self.backend)

    # ------------------------------------------------------------------ paths

    def dense_reference(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``tilemask_out * layers(x)`` computed densely (training path, and the test oracle)."""
        idx, _, _ = self.active_tiles(mask)
        y = self.layers(x)
        return tile_mask(idx, (y.shape[0], y.shape[2], y.shape[3]), self.tile_size,
                         y.dtype) * y

    def forward(self, x: torch.Tensor, mask: torch.Tensor,
                tiles: tuple[torch.Tensor, int, int] | None = None) -> torch.Tensor:
        """``tilemask_out * layers(x)``. ``tiles``: :meth:`active_tiles` of this mask, if
        already computed (a :class:`~.plan.TilePlan` for the output map, or a plain
        ``(indices, K, total)`` tuple); a plan made for another output map size or tile size
        raises ``ValueError``."""
        check_mask(x, mask)
        if self.training:
            self.last_path = "dense_reference"
            return self.dense_reference(x, mask)
        if tiles is not None:
            Ho, Wo = self.output_size(x.shape[2:])
            plan = TilePlan.of(tiles, (x.shape[0], Ho, Wo), self.tile_size)
        else:
            plan = self.active_tiles(mask)
        idx, k, total = plan
        frac = k / total if total else 0.0
        self.last_active_fraction = frac
        if frac > self.dense_crossover:
            self.last_path = "dense"
            y = self.layers(x)
            if k != total:
                tm = plan.tile_mask(y.dtype, y.device)
                y = y.mul_(tm) if not y.requires_grad else y * tm
            return y
        self.last_path = "sparse"
        return self._sparse(x, plan)

    def _sparse(self, x: torch.Tensor, plan: TilePlan) -> torch.Tensor:
        idx, k, _ = plan
        N, C, H, W = x.shape
        Ho, Wo = self.output_size((H, W))
        channels_last = (x.is_contiguous(memory_format=torch.channels_last)
                         and not x.is_contiguous())
        out = torch.empty((N, self.out_channels, Ho, Wo), dtype=x.dtype, device=x.device,
                          memory_format=torch.channels_last if channels_last
                          else torch.contiguous_format).zero_()
        if k == 0:
            return out
        B = self.tile_size
        be = ops.get_backend(self.backend, x.device)
        tile, stride, off = self.window()
        chunk = tiles_per_chunk(self.chunk_bytes, x.device,
                                C * tile[0] * tile[1] * x.element_size(), k)
        for s in range(0, k, chunk):
            i = idx[s:s + chunk] if chunk < k else idx
            t = gather_stack(be, x, i, tile, stride, off, plan=plan, start=s)
            y = run_valid(self.layers, t, i, stride, off, (H, W), plan=plan, start=s)
            scatter_stack(be, y, i, out, B, 0, add=False, plan=plan, start=s)
        return out
