"""Tiling-based sparse convolution (SBNet): the backbone runs only on active BEV tiles.

Public API::

    reduce_mask(mask, tile, stride, offset=0, threshold=0.0, pooling="max") -> (indices, K)
    gather(x, indices, tile, stride, offset=0, layout="NCHW") -> tiles
    scatter(tiles, indices, base, stride, offset=0, add=False, inplace=True, layout="NCHW")
    get_backend(name="auto", device=None) -> backend module ("auto" | "cupy" | "torch")

plus the residual blocks of :mod:`.blocks` (``out = x + tilemask * F(x)``), the strided
(downsampling) conv of :mod:`.strided`, the shared tile geometry checks of :mod:`.geometry` and
the :class:`~.plan.TilePlan` (a stage's active tiles plus the index tensors its modules derive
from them, computed once and shared).
See :mod:`.torch_backend` for shapes and the tile geometry. ``cupy`` is never imported at module
load: :func:`get_backend` imports the CuPy backend lazily and falls back to torch (one warning on
logger ``sparse_detector_ros.sparse``).
"""
from .ops import BACKENDS, gather, get_backend, reduce_mask, scatter
from .blocks import (SparseResidualBlock, basic_branch, bottleneck_branch, check_branch, fold_bn,
                     preact_basic_branch, preact_bottleneck_branch, receptive_halo, tile_mask)
from .strided import SparseStridedConv, downsample_branch, downsample_mask
from .plan import TilePlan

__all__ = ["reduce_mask", "gather", "scatter", "get_backend", "BACKENDS", "SparseResidualBlock",
           "basic_branch", "bottleneck_branch", "preact_basic_branch", "preact_bottleneck_branch",
           "check_branch", "fold_bn", "receptive_halo", "tile_mask", "SparseStridedConv",
           "downsample_branch", "downsample_mask", "TilePlan"]
