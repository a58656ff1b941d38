"""``sparse-detector``: the project's command line (benchmarks, synthetic data, demo).

Each subcommand lives in its own module under ``sparse_detector_ros.tools`` that defines
``add_arguments(parser)`` and ``run(args) -> int``; heavy imports happen inside ``run`` so that
``sparse-detector --help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). `bench` has its own sub-subcommands.
COMMANDS = {
    "demo": ("sparse_detector_ros.tools.demo",
             "start the node, stream synthetic LiDAR into it over DDS, print its diagnostics"),
    "bench": ("sparse_detector_ros.tools.bench", "benchmarks that print JSON"),
    "sim": ("sparse_detector_ros.tools.sim_cli",
            "synthetic LiDAR world: scenes, scans, ground truth, rosbag2 export, preview"),
    "cache": ("sparse_detector_ros.tools.cache_cli",
              "render and store a compact training cache from the synthetic world"),
    "train": ("sparse_detector_ros.tools.train_cli",
              "train the detector and its mask net on a training cache"),
    "eval": ("sparse_detector_ros.tools.eval_cli",
             "detection quality (KITTI R40 AP, distance AP, mask recall) on held-out synthetic "
             "scenes, per LiDAR preset and mask mode"),
    "bag": ("sparse_detector_ros.tools.bag_cli",
            "run the detector over a rosbag2 and write a bag with its objects, markers, mask "
            "and diagnostics"),
    "replay": ("sparse_detector_ros.tools.replay_cli",
               "play a rosbag2 over ROS 2 with /clock from the bag's time (no rosbag2 needed)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparse-detector",
        description="sparse_detector_ros tools: benchmarks, synthetic LiDAR data, demo.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(module)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
