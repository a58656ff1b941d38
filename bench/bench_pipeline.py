#!/usr/bin/env python3
"""The whole detector per stage, dense against every computation mask; prints JSON rows.

Same as ``sparse-detector bench pipeline``; see ``sparse_detector_ros/tools/bench_pipeline.py``
for the rows. The table of docs/pipeline.md and the README's headline come from::

    python bench/bench_pipeline.py --markdown --jsonl docs/bench_pipeline.jsonl
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparse_detector_ros.tools import bench_pipeline  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench_pipeline.add_arguments(parser)
    return bench_pipeline.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
