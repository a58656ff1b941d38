"""The detector network: a sparse BEV backbone (SBNet blocks on the masked tiles), a neck and a
CenterPoint-style head. Every size comes from the model description's ``architecture``.

Layout (defaults of :data:`ARCH_DEFAULTS`, BEV 512 x 512 x 7 at 0.2 m)::

    BEV (N, 7, 512, 512), mask (N, 512, 512)
     └ stem: 3x3 stride-2 conv -> BN -> ReLU, sparse (SparseStridedConv)      256², 32 ch
     └ stage 1: 2 bottleneck residual blocks, sparse (SparseResidualBlock)     256², 32
     └ down: 3x3 stride-2 conv -> BN -> ReLU, sparse; stage 2: 2 blocks        128², 64
     └ down; stage 3: 2 blocks                                                   64², 128
    neck: stages from ``head_stage`` on, brought to the head stage's resolution (stride-2^k
          transposed conv -> BN -> ReLU) and concatenated                       128², 64+32
    head: shared 3x3 conv -> BN -> ReLU, sparse (stride 1), then one 1x1 conv per output:
          heatmap (one logit per class), offset (2), z (1), size (3: log l, w, h), rot (2: sin,
          cos yaw), for ``heading: axis`` axis (2: sin, cos of 2 yaw), for ``iou_head: 1`` iou
          (1): the format :mod:`.decode` reads, on the grid of stride ``out_stride``.

Every layer that touches a full-resolution map is sparse: the stem, the residual stages and the
downsampling convs run on the active tiles only (the mask is max-pooled to each stage's
resolution), and so does the head's 3x3 conv. Only the neck's transposed convs and the 1x1
output convs run on the whole (4x smaller) head map; their cost is counted in
:meth:`SparseBEVNet.macs`.

``forward(bev, mask)`` returns the head dict and the head-resolution ``active`` mask (cells of
active head tiles; :func:`.decode.decode` ignores peaks elsewhere). In ``train()`` mode the
sparse modules run their dense-masked reference (same values on active tiles, gradients
everywhere); in ``eval()`` mode the sparse path runs. A mask of ones gives the dense network.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

import torch
import torch.nn as nn

from ..config import SparseConfig
from ..sparse import SparseResidualBlock, bottleneck_branch, tile_mask
from ..sparse.strided import SparseStridedConv, downsample_branch
from .description import ModelDescription

__all__ = ["ARCH_DEFAULTS", "HEADINGS", "HEAD_OUTPUTS", "SparseBEVNet", "architecture",
           "head_outputs"]

#: The architecture sizes and their defaults (the model description may set any of them).
ARCH_DEFAULTS: dict[str, Any] = {
    "stem_stride": 2,                 # the stem conv's stride (1 or 2)
    "stage_channels": (32, 64, 128),  # stage k runs at stride stem_stride * 2^k
    "stage_blocks": (2, 2, 2),        # bottleneck residual blocks per stage
    "bottleneck_ratio": 0.5,          # bottleneck width / stage width
    "head_stage": 1,                  # the stage whose resolution the head runs at
    "neck_channels": 32,              # channels of each upsampled deeper stage
    "head_channels": 32,              # channels of the shared 3x3 head conv
    "heatmap_prior": 0.1,             # initial heatmap probability (bias of its 1x1 conv)
    "heading": "sincos",              # "sincos": rot only; "axis": also the box axis (see below)
    "iou_head": 0,                    # 1: an "iou" output, the predicted IoU of the cell's box
}
#: heading encodings: ``sincos`` regresses ``(sin yaw, cos yaw)`` only; ``axis`` adds the output
#: ``axis`` = ``(sin 2 yaw, cos 2 yaw)``, the box's axis, the same for yaw and yaw + pi (a box's
#: footprint does not change when it turns round), so that a network torn between a car's front
#: and back still regresses a tight footprint; ``rot`` then only picks the direction
#: (:mod:`.decode`).
HEADINGS = ("sincos", "axis")
#: the smallest tile of a deeper stage (see SparseBEVNet)
MIN_TILE = 4
#: output name -> channels (``heatmap`` has one channel per class)
HEAD_OUTPUTS = {"heatmap": None, "offset": 2, "z": 1, "size": 3, "rot": 2}


def head_outputs(arch: Mapping[str, Any]) -> dict[str, int | None]:
    """The head's outputs for an :func:`architecture`: :data:`HEAD_OUTPUTS`, plus ``axis`` (2)
    for ``heading: axis`` and ``iou`` (1: a logit, the predicted BEV IoU of the box decoded at
    the cell with its object; :mod:`.decode` rescores with it) for ``iou_head: 1``."""
    return {**HEAD_OUTPUTS, **({"axis": 2} if arch.get("heading") == "axis" else {}),
            **({"iou": 1} if arch.get("iou_head") else {})}


def architecture(description: ModelDescription) -> dict[str, Any]:
    """:data:`ARCH_DEFAULTS` updated with the description's ``architecture``; ValueError naming
    an unknown key or an inconsistent size."""
    arch = dict(ARCH_DEFAULTS)
    unknown = sorted(set(description.architecture) - set(arch))
    if unknown:
        raise ValueError(f"model description '{description.source}': unknown architecture "
                         f"key(s) {', '.join(unknown)}: allowed {', '.join(arch)}")
    arch.update(description.architecture)
    arch["stage_channels"] = tuple(int(c) for c in arch["stage_channels"])
    arch["stage_blocks"] = tuple(int(b) for b in arch["stage_blocks"])
    n = len(arch["stage_channels"])
    if n < 1 or len(arch["stage_blocks"]) != n or not 0 <= arch["head_stage"] < n:
        raise ValueError(f"model description '{description.source}': architecture needs "
                         "stage_channels and stage_blocks of equal length and 0 <= head_stage "
                         f"< {n}, got {arch}")
    if arch["stem_stride"] not in (1, 2):
        raise ValueError(f"architecture.stem_stride must be 1 or 2, got {arch['stem_stride']}")
    if arch["iou_head"] not in (0, 1):
        raise ValueError(f"model description '{description.source}': architecture.iou_head must "
                         f"be 0 or 1, got {arch['iou_head']!r}")
    if arch["heading"] not in HEADINGS:
        raise ValueError(f"model description '{description.source}': architecture.heading must "
                         f"be one of {', '.join(HEADINGS)}, got {arch['heading']!r}")
    return arch


class SparseBEVNet(nn.Module):
    """Backbone + neck + head of :mod:`this module <sparse_detector_ros.model.network>`.

    Args:
        description: the model description (grid -> input channels, classes -> heatmap
            channels, architecture sizes).
        sparse: the runtime ``sparse.*`` configuration (tile size, threshold, pooling, dense
            crossover, backend) of every sparse module.
    """

    def __init__(self, description: ModelDescription, sparse: SparseConfig | None = None):
        super().__init__()
        sparse = sparse or SparseConfig()
        arch = architecture(description)
        self.arch = arch
        self.classes = description.classes
        chans, blocks = arch["stage_channels"], arch["stage_blocks"]
        self.head_stage = arch["head_stage"]
        self.out_stride = arch["stem_stride"] * 2 ** self.head_stage
        # Tiles cover the same ground at every stage: sparse.tile_size cells at the first
        # stage, half as many at each stage after a stride-2 step (at least MIN_TILE), so a
        # deeper stage does not round its mask up to ever larger squares.
        self.tiles = [max(MIN_TILE, sparse.tile_size >> k) for k in range(len(chans))]
        cfg = [replace(sparse, tile_size=t) for t in self.tiles]
        self.stem = SparseStridedConv.from_config(
            downsample_branch(description.channels, chans[0], 3, arch["stem_stride"]), cfg[0])
        self.downs = nn.ModuleList(
            SparseStridedConv.from_config(downsample_branch(chans[k - 1], chans[k]), cfg[k])
            for k in range(1, len(chans)))
        mid = [max(1, round(c * arch["bottleneck_ratio"])) for c in chans]
        self.stages = nn.ModuleList(
            nn.ModuleList(SparseResidualBlock.from_config(bottleneck_branch(c, m), cfg[k])
                          for _ in range(b))
            for k, (c, m, b) in enumerate(zip(chans, mid, blocks)))
        h = self.head_stage
        self.ups = nn.ModuleList()
        for k in range(h + 1, len(chans)):
            f = 2 ** (k - h)
            self.ups.append(nn.Sequential(
                nn.ConvTranspose2d(chans[k], arch["neck_channels"], f, f, bias=False),
                nn.BatchNorm2d(arch["neck_channels"]), nn.ReLU(inplace=True)))
        neck_out = chans[h] + arch["neck_channels"] * len(self.ups)
        self.head_conv = SparseStridedConv.from_config(nn.Sequential(
            nn.Conv2d(neck_out, arch["head_channels"], 3, 1, 1, bias=False),
            nn.BatchNorm2d(arch["head_channels"]), nn.ReLU(inplace=True)), cfg[h])
        self.outputs = nn.ModuleDict({
            name: nn.Conv2d(arch["head_channels"], c or len(self.classes), 1)
            for name, c in head_outputs(arch).items()})
        prior = float(arch["heatmap_prior"])
        nn.init.constant_(self.outputs["heatmap"].bias, float(torch.logit(torch.tensor(prior))))

    # ------------------------------------------------------------------ modules
    def sparse_modules(self) -> list[nn.Module]:
        """Every sparse module, in execution order."""
        mods: list[nn.Module] = [self.stem]
        for k, stage in enumerate(self.stages):
            if k:
                mods.append(self.downs[k - 1])
            mods.extend(stage)
        mods.append(self.head_conv)
        return mods

    def fuse(self) -> "SparseBEVNet":
        """Inference form: batch norms folded into the sparse modules' convs, channels_last
        weights, eval mode."""
        for m in self.sparse_modules():
            m.fuse()
        return self.to(memory_format=torch.channels_last).eval()

    # ------------------------------------------------------------------ forward
    def backbone(self, bev: torch.Tensor, mask: torch.Tensor
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[tuple]]:
        """Stage outputs, the mask at each stage's resolution and each stage's active tiles
        (``(indices, K, total)``; computed once per stage and shared by its downsampling conv,
        its blocks and, at the head stage, the head)."""
        x = bev.contiguous(memory_format=torch.channels_last)
        m = mask if mask.dim() == 3 else mask[:, 0]
        m = m.to(dtype=x.dtype)
        feats, masks, tiles = [], [], []
        for k, stage in enumerate(self.stages):
            down = self.stem if k == 0 else self.downs[k - 1]
            m_out = down.out_mask(m)
            t = down.active_tiles_of(m_out)
            x = down(x, m, tiles=t)
            m = m_out
            for block in stage:
                x = block(x, m, inplace=not self.training, tiles=t)
            feats.append(x)
            masks.append(m)
            tiles.append(t)
        return feats, masks, tiles

    def neck(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """The deeper stages brought to the head stage's resolution (cropped where the map size
        is odd) and concatenated with it."""
        h = self.head_stage
        H, W = feats[h].shape[2:]
        parts = [feats[h]] + [up(f)[:, :, :H, :W] for up, f in zip(self.ups, feats[h + 1:])]
        return torch.cat(parts, 1) if len(parts) > 1 else parts[0]

    def head(self, x: torch.Tensor, mask: torch.Tensor, tiles: tuple | None = None
             ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Head outputs and the ``active`` cells (N, Ho, Wo) bool of the head's tiles
        (``tiles``: the head stage's, from :meth:`backbone`)."""
        tiles = tiles if tiles is not None else self.head_conv.active_tiles(mask)
        y = self.head_conv(x, mask, tiles=tiles)
        active = tile_mask(tiles[0], tuple(mask.shape), self.head_conv.tile_size,
                           torch.bool)[:, 0]
        return {name: conv(y) for name, conv in self.outputs.items()}, active

    def forward(self, bev: torch.Tensor, mask: torch.Tensor
                ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``bev`` (N, C, H, W), ``mask`` (N, H, W) at the BEV resolution (1 = compute).
        Returns ``(head, active)``: the head dict (see :mod:`.decode`) on the output grid
        (stride ``out_stride``) and its active cells."""
        feats, masks, tiles = self.backbone(bev, mask)
        h = self.head_stage
        return self.head(self.neck(feats), masks[h], tiles[h])

    # ------------------------------------------------------------------ cost
    def macs(self, hw: tuple[int, int]) -> dict[str, int]:
        """Dense multiply-accumulates per frame of an ``H x W`` BEV, by part: ``sparse`` (the
        modules that run on active tiles only) and ``dense`` (neck and 1x1 outputs)."""
        def convs(layers, o) -> int:
            return sum(o[0] * o[1] * c.in_channels * c.out_channels
                       * c.kernel_size[0] * c.kernel_size[1] // c.groups
                       for c in layers if isinstance(c, nn.Conv2d))

        sparse = 0
        stage_hw = []
        o = hw
        for k, stage in enumerate(self.stages):
            down = self.stem if k == 0 else self.downs[k - 1]
            o = down.output_size(o)
            stage_hw.append(o)
            sparse += convs(down.layers, o) + sum(convs(b.branch, o) for b in stage)
        o = stage_hw[self.head_stage]
        sparse += convs(self.head_conv.layers, o)
        dense = sum(o[0] * o[1] * up[0].in_channels * up[0].out_channels for up in self.ups)
        dense += convs(self.outputs.values(), o)
        return {"sparse": sparse, "dense": dense}


def load_state(net: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """``load_state_dict`` (strict), with one message naming the missing / unexpected keys."""
    missing, unexpected = net.load_state_dict(dict(state), strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not fit the network: missing {list(missing)[:5]}, "
                         f"unexpected {list(unexpected)[:5]}")
