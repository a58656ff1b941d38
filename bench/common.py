"""What the calibration and error scripts of ``bench/`` share: the model and runtime arguments,
the detector they describe, and the scans of a split's scenes.

Scripts import it as ``common`` (``python bench/<script>.py`` puts ``bench/`` on the path).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def add_arguments(ap, *, scenes: int = 8, frames: int = 3) -> None:
    """``--model``, ``--params-file``, ``--scenes``, ``--frames`` and ``--threads``."""
    ap.add_argument("--model", default="", help="model description (default: shipped)")
    ap.add_argument("--params-file", default=None,
                    help="runtime parameter file (mask mode, sparse.tile_size, ...)")
    ap.add_argument("--scenes", type=int, default=scenes)
    ap.add_argument("--frames", type=int, default=frames, help="frames per scene, 5 apart")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")


def detector(args):
    """``(model, config, detector)`` of the parsed :func:`add_arguments` (torch threads set)."""
    import torch

    from sparse_detector_ros.config import Config
    from sparse_detector_ros.model import load_description
    from sparse_detector_ros.pipeline import Detector

    torch.set_num_threads(args.threads)
    model = load_description(args.model)
    config = Config.from_yaml(args.params_file) if args.params_file else Config()
    return model, config, Detector(config, model)


def scans(split: str, scenes: int, frames: int, preset: str) -> Iterator:
    """The frames 0, 5, ... (``frames`` of them) of the first ``scenes`` scenes of ``split``,
    scanned by the LiDAR ``preset`` (:class:`sparse_detector_ros.sim.Frame`)."""
    from sparse_detector_ros.sim import FRAME_RATE, generate_scene, get_lidar, render_frame
    from sparse_detector_ros.sim.splits import seeds

    lidar = get_lidar(preset)
    for seed in seeds(split, scenes):
        scene = generate_scene(seed, duration=5 * (frames - 1) / FRAME_RATE)
        for i in range(frames):
            yield render_frame(scene, lidar, 5 * i)


def pose(frame) -> tuple[float, float, float]:
    """The frame's sensor pose ``(x, y, yaw)`` in the map frame (for the map-prior mask)."""
    return tuple(float(v) for v in frame.ego_pose[[0, 1, 3]])
