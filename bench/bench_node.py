#!/usr/bin/env python3
"""End-to-end latency of the real node through DDS, dense vs the default mask; prints JSON rows.

Same as ``sparse-detector bench node``; see ``sparse_detector_ros/tools/bench_node.py`` for the
rows. Needs the installed node (scripts/setup.sh); one minute per mask mode by default::

    python bench/bench_node.py --jsonl node.jsonl
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparse_detector_ros.tools import bench_node  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench_node.add_arguments(parser)
    return bench_node.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
