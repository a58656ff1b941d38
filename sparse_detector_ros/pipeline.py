"""The ROS-free per-frame pipeline: PointCloud2-like message -> points -> BEV, with per-stage
timings. Later stages (mask, sparse backbone, head, box decoding) plug in here; the node only
calls :meth:`Pipeline.process` and publishes what it returns.

:data:`STAGES` is the one list of stages: :class:`StageTimer` refuses to time a stage that is
not in it, a frame's ``stage_ms`` holds exactly the stages that ran, in this order, and the
node's diagnostics report every stage of ``stage_ms`` (``stats.FrameStats``).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from .bev import Rasterizer
from .config import Config
from .model.description import ModelDescription, load_checkpoint
from .pointcloud import CloudError, decode

STAGES = ("decode", "rasterize")


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


@dataclass
class FrameResult:
    """What one frame produced. ``stage_ms`` maps each stage that ran (names from
    :data:`STAGES`, in that order) to its wall time."""
    points_received: int
    points_kept: int
    bev: torch.Tensor
    stage_ms: dict[str, float] = field(default_factory=dict)


class Pipeline:
    """Decode + rasterize (the walking skeleton of the detector).

    ``config`` holds the runtime parameters, ``model`` the model description (its BEV grid is
    what the weights were trained on)."""

    def __init__(self, config: Config, model: ModelDescription,
                 device: torch.device | str = "cpu"):
        self.config = config
        self.model = model
        self.device = torch.device(device)
        self.rasterizer = Rasterizer(model.grid, self.device)
        # Weights trained on another grid are refused here, before any frame (ModelError).
        # The network that runs them comes with the detector; until then only the check runs.
        self.checkpoint = load_checkpoint(model) if model.weights else None

    def process(self, cloud: Any) -> FrameResult:
        """Run all stages on one PointCloud2-like message. Raises ``pointcloud.CloudError`` for
        a malformed cloud or one without any valid point (nothing else is changed)."""
        timer = StageTimer(self.device)
        with timer("decode"):
            points = decode(cloud)
            if len(points) == 0:
                total = int(cloud.width) * int(cloud.height)
                raise CloudError("empty", f"point cloud has no valid points ({total} before "
                                 "removing NaN/Inf)")
        with timer("rasterize"):
            bev, kept = self.rasterizer(points)
        return FrameResult(points_received=int(cloud.width) * int(cloud.height),
                           points_kept=kept, bev=bev,
                           stage_ms={s: timer.ms[s] for s in STAGES if s in timer.ms})
