#!/usr/bin/env python3
"""Sparse residual block vs the fastest dense torch; prints JSON rows.

Same as ``sparse-detector bench sparse``; see ``sparse_detector_ros/tools/bench_sparse.py`` for
the rows (times as min / median / max over the repeats, the ideal counted in multiply-
accumulates). Smoke test: ``python bench/bench_sparse.py --quick``. The tables of the docs
come from a full run on a quiet machine (about 5 minutes on 2 cores)::

    python bench/bench_sparse.py --repeats 15 > /tmp/bench_sparse.jsonl
    cp /tmp/bench_sparse.jsonl docs/bench_sparse.jsonl
    python scripts/bench_tables.py
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
