"""The ROS-free per-frame pipeline: points (+ pose) -> 3D boxes, with per-stage timings.

:class:`Detector` is the one entry point from an ``(N, 4)`` point array to detections, used by
the node, the evaluation, the bag tools and the benchmarks::

    rasterize (bev.py) -> mask (masks.py) -> backbone (sparse stages) -> head (neck + head)
    -> boxes (peak picking, NMS: model/decode.py)

:class:`Pipeline` adds the ``decode`` stage in front (PointCloud2-like message -> points) for
the node, and moves the points from the cloud's frame into the detection frame (the frame the
model was trained in) with a :class:`frames.MountTransform` (``transform.*``); boxes stay in the
detection frame (the node converts them back with the same transform, ``ros_io``).
:data:`STAGES` is the one list of stages: :class:`StageTimer` refuses to time a stage that is not
in it, a frame's ``stage_ms`` holds exactly the stages that ran, in this order, and the node's
diagnostics report every stage of ``stage_ms`` (``stats.FrameStats``).

Live reconfiguration: :meth:`Detector.reconfigure` (and :meth:`Pipeline.reconfigure`) apply new
``detector.*`` and ``mask.*`` values between two frames; callers running frames on another
thread serialise the two (the node holds one lock around both).
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
from .config import Config, ConfigError, TransformConfig
from .frames import MountTransform
from .masks import ComputationMask, MapPrior, MaskNet, MaskResult
from .sparse import ops as sparse_ops
from .model.decode import Detections, decode
from .model.description import ModelDescription, ModelError, load_checkpoint
from .model.network import SparseBEVNet, load_state
from .pointcloud import CloudError
from .pointcloud import decode as decode_cloud

STAGES = ("decode", "rasterize", "mask", "backbone", "head", "boxes")
LOGGER = logging.getLogger("sparse_detector_ros.pipeline")


def resolve_device(requested: str) -> tuple[torch.device, str | None]:
    """``auto | cpu | cuda`` -> (device, warning or None). A missing GPU falls back to the CPU
    (with ``cuda`` that is a fault the node reports in its diagnostics; with ``auto``, "the
    GPU when there is one", it is the expected choice on a machine without one)."""
    if requested == "cpu":
        return torch.device("cpu"), None
    if torch.cuda.is_available():
        return torch.device("cuda"), None
    return torch.device("cpu"), (f"node.device is '{requested}' but no CUDA GPU is available: "
                                 "running on the CPU")


def backend_fallback(backend: str, device: torch.device | str) -> str:
    """Why the sparse backend ``backend`` (``sparse.backend``) does not run as asked on
    ``device``: "" when it does, else the reason the torch backend stands in for the CuPy
    kernels (``auto`` on a CUDA device whose CuPy is missing or broken: the import error, or
    no GPU usable by CuPy). ``auto`` on the CPU means torch, which is not a fallback.

    Raises :class:`ConfigError` for ``cupy`` where CuPy cannot run (an explicit request: use
    ``auto`` to fall back to torch instead)."""
    dev = torch.device(device)
    if backend == "torch" or (backend == "auto" and dev.type != "cuda"):
        return ""
    if backend == "cupy" and dev.type != "cuda":
        raise ConfigError(f"parameter 'sparse.backend' = 'cupy' needs a CUDA device, but the "
                          f"detector runs on {dev}: use 'auto' (CuPy on a GPU, else torch)")
    try:
        sparse_ops.get_backend("cupy", dev)
        return ""
    except RuntimeError as exc:
        reason = str(exc).removeprefix("backend 'cupy' is not usable: ")
    if backend == "cupy":
        raise ConfigError(f"parameter 'sparse.backend' = 'cupy' cannot be used: {reason}; use "
                          "'auto' to fall back to the torch backend")
    return (f"sparse.backend 'auto': the CuPy kernels are unavailable on {dev} ({reason}): "
            "running the slower torch backend")


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


@dataclass
class NetworkOutput:
    """What :meth:`Detector.network` computed for one frame: the ``head`` dict (format of
    :mod:`.model.decode`) and its ``active`` cells (1, Ho, Wo) bool, the ``bev`` tensor, the
    points inside the grid, and the computation mask (:class:`masks.MaskResult`)."""
    head: dict[str, torch.Tensor]
    active: torch.Tensor
    bev: torch.Tensor
    points_kept: int
    mask: MaskResult


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
    pose ``(x, y, yaw)`` in the map frame. :meth:`reconfigure` applies new ``detector.*`` and
    ``mask.*`` values between frames.
    """
    #: config sections fixed when the detector is built (the network is built from them)
    FIXED_SECTIONS = ("model.", "sparse.")

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
                try:
                    load_state(modules, ckpt["state_dict"])
                except (ValueError, RuntimeError, TypeError, AttributeError) as exc:
                    # the right description embedded, but tensors of another network
                    why = " ".join(str(exc).split())
                    why = why if len(why) <= 500 else why[:500] + " ..."
                    raise ModelError(f"weights '{model.weights_path}' do not fit the network of "
                                     f"model description '{model.source}': {why}") from None
                self.trained = True
        self.modules = modules
        self.net: SparseBEVNet = modules["net"]
        self.net.fuse().to(self.device)
        self.mask_net = modules["mask_net"].eval().to(self.device)
        # channels_last: the backbone's layout, no copy of the map before the stem
        self.rasterizer = Rasterizer(self.grid, self.device, channels_last=True)
        # the map prior's map comes from mask.map_yaml (set_map_prior replaces it)
        self.masker = ComputationMask(config.mask, self.grid, mask_net=self.mask_net)

    def set_map_prior(self, prior: MapPrior | None) -> None:
        """Use another map for the map-prior mask (e.g. the map of another scene)."""
        self.masker.map_prior = prior

    @property
    def backend(self) -> str:
        """The sparse gather/scatter backend ``sparse.backend`` resolves to on this device:
        ``torch`` or ``cupy`` (or ``unavailable: <why>``)."""
        try:
            mod = sparse_ops.get_backend(self.config.sparse.backend, self.device)
        except RuntimeError as e:
            return f"unavailable: {e}"
        return mod.__name__.rsplit(".", 1)[-1].removesuffix("_backend")

    def reconfigure(self, config: Config) -> None:
        """Apply ``config``'s ``detector.*`` (thresholds, top_k, nms_iou) and ``mask.*``
        values from the next :meth:`detect` on. A new ``mask.*`` builds a new
        :class:`masks.ComputationMask`; its map is re-read only when ``mask.map_yaml``,
        ``mask.map_margin`` or ``mask.map_road_min_value`` changed (else the current map,
        including one given by :meth:`set_map_prior`, is kept).

        Raises :class:`ConfigError` (and changes nothing) for a value this detector cannot
        take: a ``model.*``/``sparse.*`` change (fixed when it was built), thresholds that do not
        fit the model's classes, a map that cannot be read. Other sections (``node.*``,
        ``transform.*``) are not the detector's and are ignored.
        """
        changed = self.config.changes(config)
        fixed = [name for name in changed if name.startswith(self.FIXED_SECTIONS)]
        if fixed:
            raise ConfigError(f"parameter '{fixed[0]}' = {changed[fixed[0]]!r} cannot change "
                              "on a running detector: it is set at start-up only")
        thresholds = config.detector.thresholds_for(self.model.classes)
        masker = self.masker
        if config.mask != self.config.mask:
            old, new = self.config.mask, config.mask
            same_map = (old.map_yaml, old.map_margin, old.map_road_min_value) == (
                new.map_yaml, new.map_margin, new.map_road_min_value)
            masker = ComputationMask(new, self.grid, mask_net=self.mask_net,
                                     map_prior=self.masker.map_prior if same_map else None)
        self.config, self.thresholds, self.masker = config, thresholds, masker

    @torch.inference_mode()
    def network(self, points: np.ndarray | torch.Tensor, pose: Sequence[float] | None = None,
                timer: StageTimer | None = None) -> NetworkOutput:
        """The stages of :meth:`detect` before the boxes (rasterize, mask, backbone, head) on
        one cloud: the head's outputs, for :meth:`boxes` (or a caller that decodes them several
        ways, e.g. a calibration)."""
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
        return NetworkOutput(head=head, active=active, bev=bev, points_kept=kept, mask=m)

    @torch.no_grad()
    def boxes(self, out: NetworkOutput, iou_weight: float | None = None) -> Detections:
        """The detections of :meth:`network`'s output, decoded with the ``detector.*``
        parameters (``iou_weight``: another rescoring weight than ``detector.iou_weight``)."""
        d = self.config.detector
        return decode(out.head, self.grid, self.net.out_stride, self.thresholds,
                      top_k=d.top_k, nms_iou=d.nms_iou, active=out.active,
                      iou_weight=d.iou_weight if iou_weight is None else iou_weight,
                      box_radius=d.box_radius)[0]

    @torch.inference_mode()
    def detect(self, points: np.ndarray | torch.Tensor, pose: Sequence[float] | None = None,
               timer: StageTimer | None = None) -> FrameResult:
        """Detections in the sensor frame for one cloud ``(N, >=4)`` [x, y, z, intensity]."""
        timer = timer or StageTimer(self.device)
        out = self.network(points, pose, timer)
        with timer("boxes"):
            dets = self.boxes(out)
        frac = self.net.stem.last_active_fraction
        return FrameResult(points_received=len(points), points_kept=out.points_kept,
                           detections=dets, active_fraction=float(frac if frac is not None
                                                                  else 1.0),
                           mask_mode=out.mask.mode, mask_fallback=out.mask.fallback,
                           stage_ms=timer.ordered(), bev=out.bev, active=out.active[0])


def mount_transform(config: TransformConfig) -> MountTransform:
    """The :class:`frames.MountTransform` of the ``transform.*`` parameters."""
    return MountTransform(config.translation, config.rpy)


def warm_up_points(grid, n: int = 20000, seed: int = 0) -> np.ndarray:
    """``(n, 4)`` float32 random points spread over ``grid`` (x, y inside the extent, z between
    ``z_min`` and ``z_max``, intensity up to ``intensity_max``): a frame that runs every stage."""
    rng = np.random.default_rng(seed)
    pts = np.empty((n, 4), np.float32)
    pts[:, 0] = rng.uniform(grid.x_min, grid.x_max, n)
    pts[:, 1] = rng.uniform(grid.y_min, grid.y_max, n)
    pts[:, 2] = rng.uniform(grid.z_min, grid.z_max, n)
    pts[:, 3] = rng.uniform(0.0, grid.intensity_max, n)
    return pts


class Pipeline:
    """PointCloud2-like message -> :class:`FrameResult`: decode, move the points into the
    detection frame, then :class:`Detector`.

    ``config`` holds the runtime parameters, ``model`` the model description (its BEV grid is
    what the weights were trained on). ``mount``: the pose of the cloud's frame in the detection
    frame (default: from ``config.transform``; identity = detect in the cloud's frame). The
    boxes of :meth:`process` are in the detection frame; ``mount.boxes_to_cloud`` takes them
    back to the cloud's frame."""

    def __init__(self, config: Config, model: ModelDescription,
                 device: torch.device | str = "cpu", mount: MountTransform | None = None):
        self.config = config
        self.model = model
        self.device = torch.device(device)
        self.mount = mount if mount is not None else mount_transform(config.transform)
        self.detector = Detector(config, model, self.device)

    def reconfigure(self, config: Config) -> None:
        """:meth:`Detector.reconfigure`, and a new mount transform when ``transform.*``
        changed. Raises :class:`ConfigError` (changing nothing) for a value that cannot be
        applied."""
        mount = (mount_transform(config.transform) if config.transform != self.config.transform
                 else self.mount)
        self.detector.reconfigure(config)
        self.config, self.mount = config, mount

    def warm_up(self, n_points: int = 20000, seed: int = 0) -> float:
        """Run one frame of random points (:func:`warm_up_points`, detection frame, no pose)
        through the detector, so that the first real frame does not pay for lazy
        initialisation (allocator, kernels, caches); returns its wall time [ms]."""
        t0 = time.perf_counter()
        self.detector.detect(warm_up_points(self.model.grid, n_points, seed))
        return (time.perf_counter() - t0) * 1e3

    def process(self, cloud: Any, pose: Sequence[float] | None = None) -> FrameResult:
        """Run all stages on one PointCloud2-like message (points moved into the detection
        frame by :attr:`mount`, timed as part of ``decode``); ``pose``: ``(x, y, yaw)`` of the
        detection frame in the map frame, for the map-prior mask. Raises
        ``pointcloud.CloudError`` for a malformed cloud or one without any valid point (nothing
        else is changed)."""
        timer = StageTimer(self.device)
        with timer("decode"):
            points = decode_cloud(cloud)
            if len(points) == 0:
                total = int(cloud.width) * int(cloud.height)
                raise CloudError("empty", f"point cloud has no valid points ({total} before "
                                 "removing NaN/Inf)")
            points = self.mount.points_to_detection(points)
        result = self.detector.detect(points, pose, timer)
        result.points_received = int(cloud.width) * int(cloud.height)
        return result
