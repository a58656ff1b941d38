"""``sparse-detector bench <name>``: benchmarks that print JSON to stdout."""
from __future__ import annotations

import importlib

BENCHES = {
    "decode": ("sparse_detector_ros.tools.bench_decode",
               "PointCloud2 decode and BEV rasterize times for common driver layouts"),
    "sparse": ("sparse_detector_ros.tools.bench_sparse",
               "sparse residual block vs the fastest dense torch: speed-up and efficiency"),
    "pipeline": ("sparse_detector_ros.tools.bench_pipeline",
                 "the whole detector per stage (p50/p90/p99), dense against every mask"),
    "overload": ("sparse_detector_ros.tools.bench_overload", "node at 3x capacity: drops, RSS"),
    "soak": ("sparse_detector_ros.tools.bench_soak",
             "many frames through the pipeline: RSS growth and p99 drift, first vs last window"),
    "node": ("sparse_detector_ros.tools.bench_node",
             "the real node through DDS: latency stamp to output, drops, CPU, RSS per mask"),
}


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, (module, help_text) in BENCHES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(module)
        mod.add_arguments(p)
        p.set_defaults(_bench_run=mod.run)


def run(args) -> int:
    return int(args._bench_run(args) or 0)
