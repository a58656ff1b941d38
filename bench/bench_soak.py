#!/usr/bin/env python3
"""Soak: many frames through the pipeline (RSS growth, p99 drift); prints JSON rows.

Same as ``sparse-detector bench soak``; see ``sparse_detector_ros/tools/bench_soak.py`` for the
rows. The default 10,000 frames take about 10 minutes on a 2-core CPU; ``--frames`` shortens it::

    python bench/bench_soak.py --jsonl soak.jsonl
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparse_detector_ros.tools import bench_soak  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench_soak.add_arguments(parser)
    return bench_soak.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
