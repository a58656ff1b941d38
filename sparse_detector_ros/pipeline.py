"""The ROS-free per-frame pipeline: PointCloud2-like message -> points -> BEV, with per-stage
timings. Later stages (mask, sparse backbone, head, box decoding) plug in here; the node only
calls :meth:`Pipeline.process` and publishes what it returns.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .bev import Rasterizer
from .config import Config
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


@dataclass
class FrameResult:
    """What one frame produced. ``stage_ms`` maps each stage name to its wall time."""
    points_received: int
    points_kept: int
    bev: torch.Tensor
    stage_ms: dict[str, float] = field(default_factory=dict)


class Pipeline:
    """Decode + rasterize (the walking skeleton of the detector)."""

    def __init__(self, config: Config, device: torch.device | str = "cpu"):
        self.config = config
        self.device = torch.device(device)
        self.rasterizer = Rasterizer(config.grid, self.device)

    def process(self, cloud: Any) -> FrameResult:
        """Run all stages on one PointCloud2-like message. Raises ``pointcloud.CloudError`` for
        a malformed cloud or one without any valid point (nothing else is changed)."""
        t0 = time.perf_counter()
        points = decode(cloud)
        if len(points) == 0:
            total = int(cloud.width) * int(cloud.height)
            raise CloudError("empty", f"point cloud has no valid points ({total} before "
                             "removing NaN/Inf)")
        t1 = time.perf_counter()
        bev, kept = self.rasterizer(points)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t2 = time.perf_counter()
        return FrameResult(points_received=int(cloud.width) * int(cloud.height),
                           points_kept=kept, bev=bev,
                           stage_ms={"decode": (t1 - t0) * 1e3, "rasterize": (t2 - t1) * 1e3})
