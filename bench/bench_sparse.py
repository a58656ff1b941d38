#!/usr/bin/env python3
"""Sparse residual block vs the fastest dense torch; prints JSON rows.

Same as ``sparse-detector bench sparse``; see ``sparse_detector_ros/tools/bench_sparse.py``.
Example: ``python bench/bench_sparse.py --quick``.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparse_detector_ros.tools import bench_sparse  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench_sparse.add_arguments(parser)
    return bench_sparse.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
