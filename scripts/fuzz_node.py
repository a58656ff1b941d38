#!/usr/bin/env python3
"""Nightly fuzzing of the running sparse_detector_node: ``--cases`` (default 1000) malformed and
odd PointCloud2 messages generated with hypothesis (seeded by ``--seed``), sent one at a time
into a node started here over DDS (loopback, own domain), then a good simulated scan, a flood of
``--flood`` tiny malformed clouds and another good scan (``sparse_detector_ros.tools.fuzz``).

Prints the report as JSON; exit status 0 when the node never crashed, every case had the
expected outcome, every cloud was accounted for, every rejection had a reason, the good scans
were detected and the node stopped cleanly on SIGINT; 1 otherwise.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def passed(report: dict) -> bool:
    flood = report.get("flood")
    return (report["crashes"] == 0 and not report["unexpected"] and report["accounted"]
            and report["rejected_sum_matches"] and report["rejections_without_reason"] == 0
            and (report["detections_after"] or 0) >= 1 and report["exit_code"] == 0
            and (flood is None or (flood["accounted"]
                                   and (report["detections_after_flood"] or 0) >= 1)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=1000, help="generated clouds (1000)")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed (0)")
    parser.add_argument("--flood", type=int, default=500,
                        help="tiny malformed clouds sent as fast as possible after the cases "
                             "(500; 0: none)")
    parser.add_argument("--domain-id", type=int, default=None,
                        help="ROS_DOMAIN_ID (default: the environment's, else one per process)")
    parser.add_argument("--progress", action="store_true", help="cases sent, on stderr")
    args = parser.parse_args(argv)

    from sparse_detector_ros.tools.fuzz import run_fuzz
    from sparse_detector_ros.tools.node_client import local_dds_env

    local_dds_env(args.domain_id)

    def progress(done: int, total: int) -> None:
        if done % 50 == 0 or done == total:
            print(f"{done}/{total} cases", file=sys.stderr, flush=True)

    report = run_fuzz(args.cases, args.seed, flood_count=args.flood,
                      progress=progress if args.progress else None)
    report["passed"] = passed(report)
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
