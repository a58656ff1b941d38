#!/usr/bin/env python3
"""Rewrite the sparse benchmark tables of docs/sparse_engine.md and README.md from the JSON lines
of ``sparse-detector bench sparse`` (default docs/bench_sparse.jsonl).

    python bench/bench_sparse.py --repeats 15 > /tmp/bench_sparse.jsonl
    cp /tmp/bench_sparse.jsonl docs/bench_sparse.jsonl
    python scripts/bench_tables.py            # rewrite the blocks between the markers
    python scripts/bench_tables.py --check    # exit 1 if a block differs from the JSONL

Only the text between ``<!-- bench-sparse:begin -->`` / ``<!-- bench-sparse:end -->`` (docs)
and ``<!-- bench-sparse-headline:begin -->`` / ``...:end -->`` (README) is touched.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparse_detector_ros.tools import bench_tables  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("jsonl", nargs="?", default=str(ROOT / bench_tables.JSONL),
                   help="bench sparse output (default: docs/bench_sparse.jsonl)")
    p.add_argument("--root", default=str(ROOT), help="repository root holding README.md, docs/")
    p.add_argument("--check", action="store_true",
                   help="change nothing; exit 1 if a generated block is out of date")
    a = p.parse_args(argv)
    rows = bench_tables.load_rows(a.jsonl)
    stale = bench_tables.update_docs(a.root, rows, check=a.check)
    for path in stale:
        print(f"{'out of date' if a.check else 'rewrote'}: {path}")
    return 1 if a.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
