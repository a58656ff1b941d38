#!/usr/bin/env python3
"""The running node fed at 3x its measured capacity: latency, drops, memory; prints JSON (as
`sparse-detector bench overload`)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sparse_detector_ros.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", "overload", *sys.argv[1:]]))
