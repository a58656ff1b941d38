"""Sparse residual block: ``out = x + tilemask * F(x)``, computing ``F`` only on active tiles.

``F`` (the *branch*) is an ``nn.Sequential`` of

* stride-1 ``nn.Conv2d`` layers with an odd effective kernel ``d*(k-1)+1``, "same" zero
  padding (any dilation, any groups, with or without bias), and
* pointwise layers (:data:`POINTWISE`: ``BatchNorm2d`` with running statistics, ReLU, SiLU,
  Sigmoid, ...), anywhere, including before the first conv (pre-activation).

Four are provided: :func:`bottleneck_branch` (1x1 -> 3x3 -> 1x1) and :func:`basic_branch`
(3x3 -> 3x3), each conv followed by batch norm and all but the last by ReLU, and their
pre-activation (ResNet-v2) forms :func:`preact_bottleneck_branch` and
:func:`preact_basic_branch` (BN -> ReLU -> conv, the order SBNet benchmarked).
:func:`check_branch` rejects, at construction and naming the layer, everything the sparse path
cannot compute exactly: strided convs (use :class:`~.strided.SparseStridedConv` between
stages), even effective kernels, padding other than "same" zeros, batch norm without running
statistics (it would normalise over the tile stack), pooling and any other non-pointwise layer,
a branch whose channels do not add up to a residual, and an in-place first layer (it would
overwrite ``x`` on the dense path).

Sparse path (SBNet, see :mod:`.torch_backend` for the geometry):

1. ``reduce_mask(mask, B, B)`` lists the active ``B x B`` output tiles;
2. ``gather`` cuts each with a halo ``h`` = the branch's receptive-field radius
   (:func:`receptive_halo`) into a ``(K, C, B+2h, B+2h)`` stack;
3. the branch runs on the stack with *valid* (unpadded) convolutions, shrinking it to ``B``
   (:func:`run_valid`). The dense branch zero-pads every conv's input, so before each conv
   whose window reaches past its centre the stack's cells that lie outside the map are zeroed
   -- unless nothing since the gather (which reads them as 0) or since the last zeroing can
   have made them non-zero: a spatial conv, a conv with bias, batch norm with a shift, Sigmoid
   all can; a bias-free 1x1 conv and activations with ``f(0) = 0``
   (:data:`ZERO_PRESERVING`) cannot. 1x1 convs need no zeroing: an output cell reads only its
   own input cell, so off-map values stay off the map, where the next zeroing (or ``scatter``,
   which drops off-map cells) disposes of them. So edge tiles match the dense result exactly,
   with pointwise layers before the first conv too;
4. ``scatter(add=True)`` adds the result into (a copy of) ``x``.

Above ``dense_crossover`` active-tile fraction the block runs the dense branch instead and
masks it (same result, see ``sparse-detector bench sparse`` for the measured crossover). The
defaults of ``tile_size``, ``threshold``, ``pooling``, ``dense_crossover`` and ``backend`` are
those of :class:`~sparse_detector_ros.config.SparseConfig` (the ``sparse.*`` parameters).

Layout: channels_last is the default, chosen by measurement (``sparse-detector bench sparse``,
"layout" rows; 2-core AMD EPYC, torch 2.13 CPU, 2 threads, bottleneck C -> C/2 -> C, B = 16,
10 % active). The sparse block took 4.7 / 8.2 / 19.4 ms on a channels_last map of 512x512 and
32 / 64 / 128 channels, and 15.9 / 52.3 / 97.2 ms on an NCHW map. The dense block took
33.6 / 90.5 / 221 ms in channels_last and 68.9 / 192 / 405 ms in NCHW. So the block keeps its
tile stacks channels_last (oneDNN's fast path). When ``x`` is stored channels_last, the block
gathers and scatters through the NHWC ops on the free ``x.permute(0, 2, 3, 1)`` view, which
copies whole channel vectors, one row per cell. A plain NCHW ``x`` also works: the block uses
the NCHW ops and converts the stack, which is slower.

In-place use (``inplace=True``, inference) saves a full copy of the map. On CPU the tiles go
through gather, convs and scatter in chunks of about 8 MiB (see ``chunk_bytes``).

Per-call index work: the blocks of a stage run on the same active tiles, so ``active_tiles``
returns a :class:`~.plan.TilePlan` (still the ``(indices, K, total)`` tuple) that caches the
gather / scatter element positions (torch backend), the off-map masks of step 3 and the
host-side bounds of the tile indices; handed to every module of the stage (``tiles=``), each is
computed once per frame instead of once per module, and a plan whose tiles stay inside the map
needs no off-map masks at all (decided on the host, without a device sync).

Training: in ``train()`` mode batch norm uses batch statistics, so the block runs the
dense-masked reference (:meth:`SparseResidualBlock.dense_reference`), which the tests prove
equal to the sparse path in ``eval()`` mode. The sparse path itself is differentiable too.
For inference call :meth:`SparseResidualBlock.fuse` (every batch norm that follows a conv folded
into it, weights channels_last; a batch norm before the first conv stays, still exact).
"""
from __future__ import annotations

import copy
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import SparseConfig
from . import ops
from .geometry import conv_output_size, grid_shape, in_map_cells, pair
from .plan import TilePlan, tile_mask

__all__ = ["SparseResidualBlock", "basic_branch", "bottleneck_branch", "preact_basic_branch",
           "preact_bottleneck_branch", "fold_bn", "receptive_halo", "tile_mask", "check_branch",
           "check_pointwise", "conv_padding", "run_valid", "tiles_per_chunk", "gather_stack",
           "scatter_stack", "check_mask", "check_common", "POINTWISE", "ZERO_PRESERVING",
           "DEFAULTS", "CPU_CHUNK_BYTES"]

#: The ``sparse.*`` defaults (config.py): the blocks' constructor defaults.
DEFAULTS = SparseConfig()

# Tiles are processed in chunks whose gathered stack fits this budget on CPU: the chunk's
# activations stay in cache and allocations stay small (large fresh allocations page-fault).
# Measured (512x512, B=16, 100 % active, 2 threads): one batch of all tiles 99 / 166 / 393 ms,
# chunks of 128 tiles 36 / 95 / 227 ms for 32 / 64 / 128 channels.
CPU_CHUNK_BYTES = 8 << 20

#: Layers a branch may hold besides convs: each output cell depends on its own input cell only
#: (``BatchNorm2d`` only with running statistics, i.e. in ``eval()`` mode). Exact types: a
#: subclass may compute something else.
POINTWISE = (nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.SiLU, nn.GELU,
             nn.Identity, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.ELU, nn.Mish)

#: The pointwise layers with ``f(0) = 0`` exactly: zeros off the map stay zeros through them.
ZERO_PRESERVING = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.SiLU, nn.GELU, nn.Identity,
                   nn.Tanh, nn.Hardswish, nn.ELU, nn.Mish)


# ------------------------------------------------------------------------------- branches

def bottleneck_branch(channels: int, mid: int | None = None) -> nn.Sequential:
    """1x1 (C->mid) BN ReLU, 3x3 (mid->mid) BN ReLU, 1x1 (mid->C) BN. Halo 1."""
    mid = mid or max(1, channels // 2)
    return nn.Sequential(
        nn.Conv2d(channels, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
        nn.Conv2d(mid, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
        nn.Conv2d(mid, channels, 1, bias=False), nn.BatchNorm2d(channels))


def basic_branch(channels: int, mid: int | None = None) -> nn.Sequential:
    """3x3 (C->mid) BN ReLU, 3x3 (mid->C) BN. Halo 2."""
    mid = mid or channels
    return nn.Sequential(
        nn.Conv2d(channels, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid),
        nn.ReLU(inplace=True),
        nn.Conv2d(mid, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels))


def preact_bottleneck_branch(channels: int, mid: int | None = None) -> nn.Sequential:
    """Pre-activation (ResNet-v2) bottleneck: BN ReLU 1x1 (C->mid), BN ReLU 3x3 (mid->mid),
    BN ReLU 1x1 (mid->C). Halo 1. The leading BN stays a BN after :func:`fold_bn`."""
    mid = mid or max(1, channels // 2)
    return nn.Sequential(
        nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.Conv2d(channels, mid, 1, bias=False),
        nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
        nn.Conv2d(mid, mid, 3, padding=1, bias=False),
        nn.BatchNorm2d(mid), nn.ReLU(inplace=True), nn.Conv2d(mid, channels, 1, bias=False))


def preact_basic_branch(channels: int, mid: int | None = None) -> nn.Sequential:
    """Pre-activation (ResNet-v2) basic branch: BN ReLU 3x3 (C->mid), BN ReLU 3x3 (mid->C).
    Halo 2."""
    mid = mid or channels
    return nn.Sequential(
        nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
        nn.Conv2d(channels, mid, 3, padding=1, bias=False),
        nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
        nn.Conv2d(mid, channels, 3, padding=1, bias=False))


def _convs(branch: Iterable[nn.Module]) -> list[nn.Conv2d]:
    return [m for m in branch if type(m) is nn.Conv2d]


def _span(conv: nn.Conv2d) -> tuple[int, int]:
    """Effective (dilated) kernel size ``d*(k-1)+1`` per axis."""
    (ky, kx), (dy, dx) = conv.kernel_size, conv.dilation
    return dy * (ky - 1) + 1, dx * (kx - 1) + 1


def conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
    """The conv's zero padding ``(py, px)`` as numbers (``"valid"`` -> 0, ``"same"`` -> half
    the odd effective kernel; an even one raises ``ValueError``)."""
    if conv.padding == "valid":
        return 0, 0
    if conv.padding == "same":
        sy, sx = _span(conv)
        if sy % 2 == 0 or sx % 2 == 0:
            raise ValueError(f"{conv!r}: padding='same' with an even effective kernel {(sy, sx)}"
                             f" pads asymmetrically; not supported")
        return (sy - 1) // 2, (sx - 1) // 2
    return pair(conv.padding, "padding")


def check_pointwise(m: nn.Module, index: int, where: str = "branch") -> None:
    """Raise ``TypeError`` / ``ValueError`` naming layer ``index`` of ``where`` unless ``m`` is
    a supported pointwise layer (:data:`POINTWISE`; batch norm with running statistics)."""
    if type(m) not in POINTWISE:
        raise TypeError(
            f"{where} layer {index} ({m!r}) is not supported: the sparse path runs only "
            f"nn.Conv2d and the pointwise layers {', '.join(t.__name__ for t in POINTWISE)} "
            f"(exact types) on tile stacks")
    if isinstance(m, nn.BatchNorm2d) and (m.running_mean is None or m.running_var is None):
        raise ValueError(
            f"{where} layer {index} ({m!r}) has no running statistics "
            f"(track_running_stats=False): it would normalise over the tile stack, not "
            f"pointwise")


def check_first_not_inplace(layers: list[nn.Module], where: str) -> None:
    for i, m in enumerate(layers):
        if type(m) is nn.Identity:
            continue
        if getattr(m, "inplace", False):
            raise ValueError(f"{where} layer {i} ({m!r}) is the first layer and works in place: "
                             f"it would overwrite the input x (dense path); use inplace=False "
                             f"for it")
        return


def _check_channels(layers: list[nn.Module], where: str) -> tuple[int | None, int | None]:
    """Channels in and out of the layer sequence, checking that consecutive layers agree."""
    c_in = c = None
    for i, m in enumerate(layers):
        if type(m) is nn.Conv2d:
            if c is not None and m.in_channels != c:
                raise ValueError(f"{where} layer {i} ({m!r}) takes {m.in_channels} channels but "
                                 f"gets {c}")
            c_in = c_in if c_in is not None else m.in_channels
            c = m.out_channels
        elif isinstance(m, nn.BatchNorm2d):
            if c is not None and m.num_features != c:
                raise ValueError(f"{where} layer {i} ({m!r}) takes {m.num_features} channels "
                                 f"but gets {c}")
            c_in = c_in if c_in is not None else m.num_features
            c = m.num_features
    return c_in, c


def check_branch(branch: nn.Sequential) -> None:
    """Raise ``TypeError`` / ``ValueError`` (naming the layer) unless the sparse path computes
    ``branch`` exactly as the dense one: see the module docstring for what is accepted."""
    where = "branch"
    if not isinstance(branch, nn.Sequential):
        raise TypeError("branch must be an nn.Sequential of Conv2d and pointwise layers, got "
                        f"{type(branch).__name__}")
    layers = list(branch)
    for i, m in enumerate(layers):
        if type(m) is nn.Conv2d:
            sy, sx = _span(m)
            if m.stride != (1, 1):
                raise ValueError(
                    f"{where} layer {i} ({m!r}) has stride {m.stride}: a residual branch keeps "
                    f"the resolution; downsample between stages with SparseStridedConv")
            if sy % 2 == 0 or sx % 2 == 0:
                raise ValueError(f"{where} layer {i} ({m!r}) has an even effective kernel "
                                 f"{(sy, sx)}: 'same' padding would be asymmetric")
            if m.padding_mode != "zeros":
                raise ValueError(f"{where} layer {i} ({m!r}) uses padding_mode="
                                 f"{m.padding_mode!r}; only zero padding is supported")
            same = ((sy - 1) // 2, (sx - 1) // 2)
            if m.padding != "same" and conv_padding(m) != same:
                raise ValueError(f"{where} layer {i} ({m!r}) must use 'same' padding {same}")
        else:
            check_pointwise(m, i, where)
    if not _convs(layers):
        raise ValueError("branch has no nn.Conv2d")
    check_first_not_inplace(layers, where)
    c_in, c_out = _check_channels(layers, where)
    if c_in != c_out:
        raise ValueError(f"branch maps {c_in} channels to {c_out}: a residual branch must "
                         f"keep the channel count")


def receptive_halo(branch: nn.Sequential) -> tuple[int, int]:
    """Receptive-field radius ``(hy, hx)`` of a stride-1 branch: the sum over its convs of
    ``dilation * (kernel - 1) / 2``. A 3x3 conv adds 1, a 1x1 conv 0."""
    hy = hx = 0
    for m in _convs(branch):
        hy += m.dilation[0] * (m.kernel_size[0] - 1) // 2
        hx += m.dilation[1] * (m.kernel_size[1] - 1) // 2
    return hy, hx


def fold_bn(branch: nn.Sequential) -> nn.Sequential:
    """Copy of ``branch`` with every ``BatchNorm2d`` that directly follows a ``Conv2d`` folded
    into that conv (``w' = w * g / sqrt(var + eps)``, ``b' = (b - mean) * g / sqrt(var + eps)
    + beta``, running statistics). Equal to ``branch.eval()`` to float rounding. A batch norm
    *before* a conv (pre-activation) is kept as is: folding it into the conv would turn the
    conv's zero padding into ``-shift / scale`` and break the map's borders."""
    layers: list[nn.Module] = []
    mods = list(branch)
    i = 0
    while i < len(mods):
        m = mods[i]
        nxt = mods[i + 1] if i + 1 < len(mods) else None
        if type(m) is nn.Conv2d and type(nxt) is nn.BatchNorm2d:
            layers.append(_fold_pair(m, nxt))
            i += 2
            continue
        layers.append(copy.deepcopy(m))
        i += 1
    return nn.Sequential(*layers).eval()


@torch.no_grad()
def _fold_pair(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    out = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                    conv.padding, conv.dilation, conv.groups, bias=True,
                    padding_mode=conv.padding_mode, device=conv.weight.device,
                    dtype=conv.weight.dtype)
    var = bn.running_var if bn.running_var is not None else torch.ones_like(bn.weight)
    mean = bn.running_mean if bn.running_mean is not None else torch.zeros_like(bn.weight)
    gamma = bn.weight if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + bn.eps)
    out.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
    b = conv.bias if conv.bias is not None else torch.zeros_like(mean)
    out.bias.copy_((b - mean) * scale + beta)
    return out


# ------------------------------------------------------------------ shared sparse machinery

def _zero_off_map(t: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Zero the cells of the (K, C, th, tw) stack where ``valid`` (K, th, tw) is False."""
    if t.requires_grad:
        return torch.where(valid[:, None], t, t.new_zeros(()))
    rows = t.permute(0, 2, 3, 1)
    if rows.is_contiguous():
        # channels_last: one row of C values per cell; zero just the off-map rows
        bad = torch.nonzero(~valid.reshape(-1)).flatten()
        rows.view(-1, t.shape[1]).index_fill_(0, bad, 0)
        return t
    return t.masked_fill_(~valid[:, None], 0)


def run_valid(layers: Iterable[nn.Module], t: torch.Tensor, indices: torch.Tensor,
              stride: int | tuple[int, int], offset: int | tuple[int, int],
              hw: tuple[int, int], *, plan: TilePlan | None = None,
              start: int = 0) -> torch.Tensor:
    """Run ``layers`` (convs and pointwise layers) on a gathered stack of tiles, unpadded, so
    that every in-map cell gets the value the dense, zero-padded ``layers`` give it.

    Args:
        layers: ``nn.Conv2d`` (run as ``F.conv2d`` with the conv's stride, dilation and groups
            and no padding) and pointwise layers (called as they are).
        t: ``(K, C, th, tw)`` stack as ``gather`` returns it (off-map cells 0): element
            ``(i, j)`` of tile ``k`` holds map cell ``(ty*sh + oy + i, tx*sw + ox + j)``.
        indices: the ``(K, 3)`` rows ``[n, ty, tx]`` of the gather.
        stride, offset: the gather's tile stride and offset (input resolution).
        hw: the map size ``(H, W)`` of the gathered map.
        plan, start: optional :class:`~.plan.TilePlan` whose tiles ``start:start + K`` are
            ``indices``: the off-map cells are then taken from its cache (and not looked for
            at all when no tile of the plan crosses the border).

    Before every conv that reads its zero padding (effective kernel > 1 or padding > 0) the
    stack's off-map cells are zeroed, unless no layer since the gather or the last zeroing can
    have made them non-zero (bias-free 1x1 convs and :data:`ZERO_PRESERVING` layers cannot).
    After a conv with padding ``p`` and stride ``s`` the stack is on the conv's output map:
    stride ``sh / s``, offset ``(oy + p) / s`` (both must divide; the blocks' geometries do).
    Returns the final stack; its off-map cells hold arbitrary values (``scatter`` drops them).
    """
    sh, sw = pair(stride, "stride")
    oy, ox = pair(offset, "offset")
    H, W = hw
    clean = True        # off-map cells are known to be 0
    for m in layers:
        if type(m) is nn.Conv2d:
            py, px = conv_padding(m)
            sy, sx = _span(m)
            if not clean and (sy > 1 or sx > 1 or py or px):
                if plan is not None:
                    valid = plan.in_map_cells(t.shape[-2:], (sh, sw), (oy, ox), (H, W),
                                              t.device, start, start + t.shape[0])
                else:
                    valid = in_map_cells(indices, t.shape[-2:], (sh, sw), (oy, ox), (H, W),
                                         t.device)
                if valid is not None:
                    t = _zero_off_map(t, valid)
                clean = True
            ky, kx = m.stride
            if sh % ky or sw % kx or (oy + py) % ky or (ox + px) % kx:
                raise ValueError(f"{m!r}: the tile grid (stride {(sh, sw)}, offset {(oy, ox)}) "
                                 f"does not map onto the conv's output grid")
            t = F.conv2d(t, m.weight, m.bias, m.stride, 0, m.dilation, m.groups)
            if H + 2 * py < sy or W + 2 * px < sx:   # raises, naming the sizes
                conv_output_size((H, W), m.kernel_size, m.stride, (py, px), m.dilation)
            H, W = (H + 2 * py - sy) // ky + 1, (W + 2 * px - sx) // kx + 1
            sh, sw, oy, ox = sh // ky, sw // kx, (oy + py) // ky, (ox + px) // kx
            clean = clean and sy == 1 and sx == 1 and m.bias is None and not (py or px)
        else:
            t = m(t)
            clean = clean and type(m) in ZERO_PRESERVING
    return t


def tiles_per_chunk(chunk_bytes: int | str | None, device: torch.device, per_tile_bytes: int,
                    k: int) -> int:
    """Tiles per chunk so that a chunk's gathered stack stays within ``chunk_bytes``
    (``"auto"``: :data:`CPU_CHUNK_BYTES` and at least 16 tiles on CPU, one chunk on a GPU;
    ``None``: one chunk)."""
    if chunk_bytes is None or (chunk_bytes == "auto" and device.type != "cpu"):
        return max(1, k)
    budget = CPU_CHUNK_BYTES if chunk_bytes == "auto" else int(chunk_bytes)
    return max(16 if chunk_bytes == "auto" else 1, budget // max(1, per_tile_bytes))


def _stored_nhwc(x: torch.Tensor) -> bool:
    """``x`` (N, C, H, W) is stored channels_last (and not also plain contiguous)."""
    return x.permute(0, 2, 3, 1).is_contiguous() and not x.is_contiguous()


def _plan_index(be, plan, tile, stride, offset, x, start, k):
    """The plan's cached element positions for ``be``'s ``gather_at`` / ``scatter_at``, or
    ``None`` when there is no plan or ``be`` has no such ops (the CuPy kernels compute the
    positions themselves)."""
    if plan is None or not hasattr(be, "gather_at"):
        return None
    return plan.tile_index(tile, stride, offset, (x.shape[0], x.shape[2], x.shape[3]),
                           x.device, start, start + k)


def gather_stack(be, x: torch.Tensor, indices: torch.Tensor, tile, stride, offset, *,
                 plan: TilePlan | None = None, start: int = 0) -> torch.Tensor:
    """``be.gather`` of ``x`` (N, C, H, W) as a ``(K, C, th, tw)`` stack stored channels_last:
    through the NHWC op on the free permuted view when ``x`` is stored channels_last, else the
    NCHW op and a conversion. With a ``plan`` whose tiles ``start:start + K`` are ``indices``,
    a backend with ``gather_at`` (torch) uses the plan's cached element positions."""
    index = _plan_index(be, plan, tile, stride, offset, x, start, indices.shape[0])
    nhwc = _stored_nhwc(x)
    src, layout = (x.permute(0, 2, 3, 1), "NHWC") if nhwc else (x, "NCHW")
    if index is not None:
        t = be.gather_at(src, index, layout)
    else:
        t = be.gather(src, indices, tile, stride, offset, layout)
    if nhwc:
        return t.permute(0, 3, 1, 2)
    return t.contiguous(memory_format=torch.channels_last)


def scatter_stack(be, y: torch.Tensor, indices: torch.Tensor, base: torch.Tensor, stride,
                  offset, add: bool, *, plan: TilePlan | None = None, start: int = 0) -> None:
    """``be.scatter`` of the ``(K, C, bh, bw)`` stack ``y`` into ``base`` (N, C, H, W) in
    place, through the NHWC op when ``base`` is stored channels_last. ``plan``, ``start``: as
    :func:`gather_stack`."""
    index = _plan_index(be, plan, y.shape[-2:], stride, offset, base, start, indices.shape[0])
    if _stored_nhwc(base):
        src, dst, layout = y.permute(0, 2, 3, 1), base.permute(0, 2, 3, 1), "NHWC"
    else:
        src, dst, layout = y.contiguous(), base, "NCHW"
    if index is not None:
        be.scatter_at(src, index, dst, add=add, inplace=True, layout=layout)
    else:
        be.scatter(src, indices, dst, stride, offset, add=add, inplace=True, layout=layout)


def check_mask(x: torch.Tensor, mask: torch.Tensor) -> None:
    """``x`` (N, C, H, W) and ``mask`` (N, H, W) or (N, 1, H, W) of the same size."""
    if x.dim() != 4:
        raise ValueError(f"x must be (N, C, H, W), got {tuple(x.shape)}")
    msh = mask.shape if mask.dim() == 3 else mask.shape[:1] + mask.shape[2:]
    if mask.dim() not in (3, 4) or (mask.dim() == 4 and mask.shape[1] != 1) \
            or tuple(msh) != (x.shape[0], x.shape[2], x.shape[3]):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match x {tuple(x.shape)}: "
                         f"expected (N, H, W) or (N, 1, H, W)")


def check_common(tile_size: int, pooling: str, backend: str) -> None:
    """The arguments every sparse block shares."""
    if tile_size < 1:
        raise ValueError(f"tile_size must be >= 1, got {tile_size}")
    if pooling not in ("max", "avg"):
        raise ValueError(f"pooling must be 'max' or 'avg', got {pooling!r}")
    if backend not in ops.BACKENDS:
        raise ValueError(f"backend must be one of {ops.BACKENDS}, got {backend!r}")


# ------------------------------------------------------------------------------ the block

def plan_tiles(mask: torch.Tensor, tile_size: int, threshold: float, pooling: str,
               backend: str) -> TilePlan:
    """The :class:`TilePlan` of the active ``tile_size`` tiles of a float ``(N, H, W)`` mask
    (``reduce_mask`` with stride = tile, offset 0), shared by the blocks and the strided conv."""
    be = ops.get_backend(backend, mask.device)
    idx, k = be.reduce_mask(mask, tile_size, tile_size, 0, threshold, pooling)
    N, H, W = mask.shape
    Ty, Tx = grid_shape((H, W), tile_size)
    return TilePlan(idx, k, N * Ty * Tx, (N, H, W), tile_size)


class SparseResidualBlock(nn.Module):
    """``out = x + tilemask * branch(x)``, the branch run only on active tiles.

    Args:
        branch: ``nn.Sequential`` of stride-1 "same"-padded convs, batch norms and pointwise
            activations, in any order (e.g. :func:`bottleneck_branch`,
            :func:`preact_bottleneck_branch`); checked by :func:`check_branch`.
        tile_size: output tile size ``B`` (``sparse.tile_size``).
        threshold, pooling: tile activity from the mask (``sparse.threshold`` /
            ``sparse.pooling``; see :func:`~sparse_detector_ros.sparse.reduce_mask`).
        dense_crossover: above this active-tile fraction the dense branch runs instead
            (``sparse.dense_crossover``).
        backend: ``auto`` | ``cupy`` | ``torch`` for reduce_mask / gather / scatter.
        chunk_bytes: tiles are gathered, convolved and scattered in chunks of at most this
            many bytes of gathered input (``"auto"``: 8 MiB on CPU, one chunk on GPU;
            ``None``: one chunk). Results do not depend on it.

    Defaults are those of :class:`~sparse_detector_ros.config.SparseConfig`.

    ``forward(x, mask, inplace=False, tiles=None)``: ``x`` is ``(N, C, H, W)`` (channels_last
    storage is fastest), ``mask`` ``(N, H, W)`` or ``(N, 1, H, W)`` at the same resolution. With
    ``inplace=True`` the result is added into ``x`` itself (inference, saves a copy of the map).
    ``tiles``: the stage's :class:`~.plan.TilePlan` (from :meth:`active_tiles` or the stage's
    :meth:`SparseStridedConv.active_tiles`), shared by the modules of a stage.
    Returns a tensor with ``x``'s shape and memory format. ``last_path`` tells which path the
    last call took (``"sparse"``, ``"dense"`` or ``"dense_reference"``) and
    ``last_active_fraction`` its active-tile fraction.
    """

    def __init__(self, branch: nn.Sequential, tile_size: int = DEFAULTS.tile_size,
                 threshold: float = DEFAULTS.threshold, pooling: str = DEFAULTS.pooling,
                 dense_crossover: float = DEFAULTS.dense_crossover,
                 backend: str = DEFAULTS.backend, chunk_bytes: int | str | None = "auto"):
        super().__init__()
        check_branch(branch)
        check_common(tile_size, pooling, backend)
        self.branch = branch
        self.tile_size = int(tile_size)
        self.threshold = float(threshold)
        self.pooling = pooling
        self.dense_crossover = float(dense_crossover)
        self.backend = backend
        self.halo = receptive_halo(branch)
        self.chunk_bytes = chunk_bytes
        self.last_active_fraction: float | None = None
        self.last_path: str | None = None

    @classmethod
    def from_config(cls, branch: nn.Sequential, cfg, **kwargs) -> "SparseResidualBlock":
        """Build from a :class:`~sparse_detector_ros.config.SparseConfig` (``kwargs``: the
        other constructor arguments, e.g. ``chunk_bytes``)."""
        return cls(branch, cfg.tile_size, cfg.threshold, cfg.pooling, cfg.dense_crossover,
                   cfg.backend, **kwargs)

    def fuse(self) -> "SparseResidualBlock":
        """Inference form: fold batch norm into the convs, channels_last weights, eval mode."""
        self.branch = fold_bn(self.branch).to(memory_format=torch.channels_last)
        return self.eval()

    # ------------------------------------------------------------------ paths

    def active_tiles(self, mask: torch.Tensor) -> TilePlan:
        """``(indices, K, total_tiles)`` of the B x B output tile grid, as a
        :class:`~.plan.TilePlan` for the mask's map (hand it to every block of the stage)."""
        if mask.dim() == 4:
            mask = mask[:, 0]
        if not mask.is_floating_point():
            mask = mask.float()
        return plan_tiles(mask, self.tile_size, self.threshold, self.pooling, self.backend)

    def dense_reference(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x + tilemask * branch(x)`` computed densely (training path, and the test oracle)."""
        idx, _, _ = self.active_tiles(mask)
        tm = tile_mask(idx, (x.shape[0], x.shape[2], x.shape[3]), self.tile_size, x.dtype)
        return x + tm * self.branch(x)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, inplace: bool = False,
                tiles: tuple[torch.Tensor, int, int] | None = None) -> torch.Tensor:
        """``x + tilemask * branch(x)``. ``tiles``: the result of :meth:`active_tiles` for this
        mask (a :class:`~.plan.TilePlan`, or a plain ``(indices, K, total)`` tuple), to share
        one ``reduce_mask`` -- and, with a plan, its cached index tensors -- among the blocks of
        a stage. A plan made for another map size or tile size raises ``ValueError``."""
        check_mask(x, mask)
        if self.training:
            self.last_path = "dense_reference"
            return self.dense_reference(x, mask)
        shape = (x.shape[0], x.shape[2], x.shape[3])
        plan = (TilePlan.of(tiles, shape, self.tile_size) if tiles is not None
                else self.active_tiles(mask))
        idx, k, total = plan
        frac = k / total if total else 0.0
        self.last_active_fraction = frac
        if frac > self.dense_crossover:
            self.last_path = "dense"
            return self._dense(x, plan, inplace)
        self.last_path = "sparse"
        return self._sparse(x, plan, inplace)

    def _dense(self, x, plan: TilePlan, inplace):
        _, k, total = plan
        y = self.branch(x)
        if k != total:
            tm = plan.tile_mask(y.dtype, y.device)
            y = y.mul_(tm) if not y.requires_grad else y * tm
        if inplace:
            return x.add_(y)
        return y.add_(x) if not y.requires_grad else y + x

    def _sparse(self, x, plan: TilePlan, inplace):
        idx, k, _ = plan
        base = x if inplace else x.clone()
        if k == 0:
            return base
        B = self.tile_size
        hy, hx = self.halo
        H, W = x.shape[2], x.shape[3]
        be = ops.get_backend(self.backend, x.device)
        tile, off = (B + 2 * hy, B + 2 * hx), (-hy, -hx)
        chunk = tiles_per_chunk(self.chunk_bytes, x.device,
                                x.shape[1] * tile[0] * tile[1] * x.element_size(), k)
        if inplace and chunk < k:
            # A tile's halo reaches `reach` tile rows up and down; with tiles in lexicographic
            # order, a finished chunk may be added into x only once every tile within `reach`
            # rows after its last tile has been gathered (they read x's original values).
            reach = -(-max(hy, hx) // B) if max(hy, hx) else 0
            keys = plan.host_rows()
        pending: list = []
        for s in range(0, k, chunk):
            i = idx[s:s + chunk] if chunk < k else idx
            t = gather_stack(be, x, i, tile, B, off, plan=plan, start=s)
            y = run_valid(self.branch, t, i, B, off, (H, W), plan=plan, start=s)
            if not inplace or chunk >= k:
                scatter_stack(be, y, i, base, B, 0, add=True, plan=plan, start=s)
                continue
            pending.append((keys[min(s + chunk, k) - 1], s, i, y))
            nxt = keys[s + chunk] if s + chunk < k else None
            while pending and (nxt is None or nxt[0] > pending[0][0][0]
                               or nxt[1] - pending[0][0][1] > reach):
                _, ps, pi, py = pending.pop(0)
                scatter_stack(be, py, pi, base, B, 0, add=True, plan=plan, start=ps)
        return base
