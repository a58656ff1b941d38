"""The ROS-free per-frame pipeline: points (+ pose) -> 3D boxes, with per-stage timings.

:class:`Detector` is the one entry point from an ``(N, 4)`` point array to detections, used by
the node, the evaluation, the bag tools and the benchmarks::

    rasterize (bev.py) -> mask (masks.py) -> backbone (sparse stages) -> head (neck + head)
    -> boxes (peak picking, NMS: model/decode.py)

:class:`Pipeline` adds the ``decode`` stage in front (PointCloud2-like message -> points) for
the node. :data:`STAGES` is the one list of stages: :class:`StageTimer` refuses to time a stage
that is not in it, a frame's ``stage_ms`` holds exactly the stages that ran, in this order, and
the node's diagnostics report every stage of ``stage_ms`` (``stats.FrameStats``).
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn

from .bev import Rasterizer
from .config import Config
from .masks import ComputationMask, MapPrior, MaskNet
from .model.decode import Detections, decode
from .model.description import ModelDescription, load_checkpoint
from .model.network import SparseBEVNet, load_state
from .pointcloud import CloudError
from .pointcloud import decode as decode_cloud

STAGES = ("decode", "rasterize", "mask", "backbone", "head", "boxes")
LOGGER = logging.getLogger("sparse_detector_ros.pipeline")


def resolve_device(requested: str) -> tuple[torch.device, str | None]:
    """``auto | cpu | cuda`` -> (device, warning or None). A missing GPU falls back to the CPU."""
    if requested == "cpu":
        return torch.device("cpu"), None
    if torch.cuda.is_available():
        return torch.device("cuda"), None
    return torch.device("cpu"), (f"node.device is '{requested}' but no CUDA GPU is available: "
                                 "running on the CPU")


class StageTimer:
    """Wall time per stage in milliseconds, for the stages of :data:`STAGES` only.

    ``with timer("rasterize"): ...`` adds the block's time to ``timer.ms["rasterize"]``; on a
    CUDA device the block's queued work is waited for before the clock stops.
    """

    def __init__(self, device: torch.device, stages: tuple[str, ...] = STAGES):
        self.device = device
        self.stages = stages
        self.ms: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        if stage not in self.stages:
            raise KeyError(f"stage {stage!r} is not in the pipeline's stages {self.stages}")
        t0 = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.ms[stage] = self.ms.get(stage, 0.0) + (time.perf_counter() - t0) * 1e3

    def ordered(self) -> dict[str, float]:
        return {s: self.ms[s] for s in self.stages if s in self.ms}


@dataclass
class FrameResult:
    """What one frame produced. ``stage_ms`` maps each stage that ran (names from
    :data:`STAGES`, in that order) to its wall time; ``active_fraction`` is the share of the
    backbone's first-stage tiles that ran; ``mask_mode`` the mask actually used and
    ``mask_fallback`` why it is not the configured one ("" when it is). ``active`` (Ho, Wo)
    bool: the head's active cells on the output grid of stride ``net.out_stride`` (row = x
    index, col = y index, as ``bev.py``): where the network computed, hence could detect."""
    points_received: int
    points_kept: int
    detections: Detections
    active_fraction: float
    mask_mode: str
    mask_fallback: str = ""
    stage_ms: dict[str, float] = field(default_factory=dict)
    bev: torch.Tensor | None = None
    active: torch.Tensor | None = None


def build_modules(model: ModelDescription, config: Config) -> nn.ModuleDict:
    """The trainable modules of a model: ``net`` (:class:`SparseBEVNet`) and ``mask_net``
    (:class:`masks.MaskNet`); a checkpoint's ``state_dict`` is theirs."""
    return nn.ModuleDict({"net": SparseBEVNet(model, config.sparse),
                          "mask_net": MaskNet(model.channels)})


class Detector:
    """Points (+ pose) -> detections: one call, per-stage timings, the active-tile fraction.

    Args:
        config: runtime parameters (``sparse.*``, ``mask.*``, ``detector.*``).
        model: the model description; its weights are loaded (and checked against it) when it
            names any, else the network keeps a seeded random initialisation
            (``self.trained`` is False: the boxes mean nothing, the timings do).
        device: torch device.
        modules: already built modules (training and evaluation pass theirs; default: built
            from ``model`` and loaded from its weights).

    :meth:`detect` takes points in the sensor frame and, for the map-prior mask, the sensor's
    pose ``(x, y, yaw)`` in the map frame.
    """

    def __init__(self, config: Config, model: ModelDescription,
                 device: torch.device | str = "cpu", modules: nn.ModuleDict | None = None):
        self.config = config
        self.model = model
        self.device = torch.device(device)
        self.grid = model.grid
        self.thresholds = config.detector.thresholds_for(model.classes)
        self.trained = modules is not None
        if modules is None:
            # the contract first: weights trained on another grid are refused (ModelError)
            ckpt = load_checkpoint(model) if model.weights else None
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                modules = build_modules(model, config)
            if ckpt is not None:
                load_state(modules, ckpt["state_dict"])
                self.trained = True
        self.modules = modules
        self.net: SparseBEVNet = modules["net"]
        self.net.fuse().to(self.device)
        self.mask_net = modules["mask_net"].eval().to(self.device)
        self.rasterizer = Rasterizer(self.grid, self.device)
        # the map prior's map comes from mask.map_yaml (set_map_prior replaces it)
        self.masker = ComputationMask(config.mask, self.grid, mask_net=self.mask_net)

    def set_map_prior(self, prior: MapPrior | None) -> None:
        """Use another map for the map-prior mask (e.g. the map of another scene)."""
        self.masker.map_prior = prior

    @torch.inference_mode()
    def detect(self, points: np.ndarray | torch.Tensor, pose: Sequence[float] | None = None,
               timer: StageTimer | None = None) -> FrameResult:
        """Detections in the sensor frame for one cloud ``(N, >=4)`` [x, y, z, intensity]."""
        timer = timer or StageTimer(self.device)
        net = self.net
        with timer("rasterize"):
            bev, kept = self.rasterizer(points)
        with timer("mask"):
            m = self.masker(points, bev, pose)
        with timer("backbone"):
            feats, masks, tiles = net.backbone(bev, m.mask)
        with timer("head"):
            h = net.head_stage
            head, active = net.head(net.neck(feats), masks[h], tiles[h])
        with timer("boxes"):
            dets = decode(head, self.grid, net.out_stride, self.thresholds,
                          top_k=self.config.detector.top_k, nms_iou=self.config.detector.nms_iou,
                          active=active)[0]
        frac = net.stem.last_active_fraction
        return FrameResult(points_received=len(points), points_kept=kept, detections=dets,
                           active_fraction=float(frac if frac is not None else 1.0),
                           mask_mode=m.mode, mask_fallback=m.fallback,
                           stage_ms=timer.ordered(), bev=bev, active=active[0])


class Pipeline:
    """PointCloud2-like message -> :class:`FrameResult`: decode, then :class:`Detector`.

    ``config`` holds the runtime parameters, ``model`` the model description (its BEV grid is
    what the weights were trained on)."""

    def __init__(self, config: Config, model: ModelDescription,
                 device: torch.device | str = "cpu"):
        self.config = config
        self.model = model
        self.device = torch.device(device)
        self.detector = Detector(config, model, self.device)

    def process(self, cloud: Any, pose: Sequence[float] | None = None) -> FrameResult:
        """Run all stages on one PointCloud2-like message. Raises ``pointcloud.CloudError`` for
        a malformed cloud or one without any valid point (nothing else is changed)."""
        timer = StageTimer(self.device)
        with timer("decode"):
            points = decode_cloud(cloud)
            if len(points) == 0:
                total = int(cloud.width) * int(cloud.height)
                raise CloudError("empty", f"point cloud has no valid points ({total} before "
                                 "removing NaN/Inf)")
        result = self.detector.detect(points, pose, timer)
        result.points_received = int(cloud.width) * int(cloud.height)
        return result
