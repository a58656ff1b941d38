#!/usr/bin/env python3
"""PointCloud2 decode + BEV rasterize benchmark; prints JSON (as `sparse-detector bench decode`)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sparse_detector_ros.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", "decode", *sys.argv[1:]]))
