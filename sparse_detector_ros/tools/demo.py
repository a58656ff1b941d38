"""``sparse-detector demo``: start the node, stream a drive through the built-in synthetic LiDAR
world into it over DDS (loopback, own domain) at the sensor's rate, print its diagnostics, stop
it with Ctrl-C (SIGINT) and report its exit code.
"""
from __future__ import annotations

import argparse
import json
import time


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def add_arguments(parser) -> None:
    from ..pointcloud import LAYOUTS

    parser.add_argument("--frames", type=_positive(int), default=20,
                        help="clouds to send (default 20)")
    parser.add_argument("--rate", type=_positive(float), default=10.0,
                        help="send rate [Hz] (default 10, the simulated sensor's rate)")
    parser.add_argument("--lidar", default="hdl64e", help="simulated LiDAR preset")
    parser.add_argument("--layout", default="velodyne", choices=sorted(LAYOUTS),
                        help="driver field layout (default velodyne)")
    parser.add_argument("--seed", type=int, default=0, help="synthetic scene seed")
    parser.add_argument("--params-file", default=None,
                        help="ROS parameter file (default: the package's config)")
    parser.add_argument("--domain-id", type=int, default=None, help="ROS_DOMAIN_ID to use")


def run(args) -> int:
    from .node_client import local_dds_env

    local_dds_env(args.domain_id)  # before rclpy starts

    from ..paths import find_share_file
    from ..sim import FRAME_RATE, generate_scene, get_lidar, render_frame
    from ..sim.export import cloud_buffer
    from .node_client import NodeProcess, Probe

    params_file = args.params_file or find_share_file("config/sparse_detector.yaml")
    print(f"demo: starting sparse_detector_node with {params_file}", flush=True)
    node = NodeProcess(params_file, {"node.diagnostics_period": 0.5})
    probe = Probe(reliable=True)  # compatible with best-effort and reliable subscribers
    try:
        if not probe.wait_for_subscriber(60):
            print(node.log())
            raise SystemExit("demo: the node did not subscribe to input/points")
        lidar = get_lidar(args.lidar)
        # The scene is planned (and checked for collisions) for frames at the sensor's 10 Hz,
        # whatever rate they are sent at.
        scene = generate_scene(args.seed, duration=(args.frames - 1) / FRAME_RATE)
        frames = [render_frame(scene, lidar, i) for i in range(args.frames)]
        clouds = [cloud_buffer(f, args.layout) for f in frames]
        print(f"demo: sending {args.frames} clouds of a drive through synthetic scene "
              f"{args.seed} ({lidar.name}, {args.layout} layout, "
              f"{sum(len(f.points) for f in frames) // len(frames)} points on average) "
              f"at {args.rate} Hz", flush=True)
        period = 1.0 / args.rate
        next_t = time.monotonic()
        for i in range(args.frames):
            probe.publish(clouds[i % len(clouds)])
            next_t += period
            probe.spin_for(max(0.0, next_t - time.monotonic()))
        done = probe.wait_for_diag(
            lambda d: int(d["frames_processed"]) + int(d["frames_dropped"])
            + int(d["frames_rejected"]) >= int(d["frames_received"]) > 0
            and int(d["frames_in_window"]) == 0, 15)
        last = done or probe.latest()
        busy = [d for d in probe.diagnostics if int(d["frames_in_window"]) > 0]
        print("demo: diagnostics while streaming (last busy window):")
        print(json.dumps(busy[-1] if busy else last, indent=2))
        print("demo: final counters:")
        print(json.dumps({k: last[k] for k in ("frames_received", "frames_processed",
                                               "frames_dropped", "frames_rejected")}
                         if last else {}, indent=2))
    finally:
        probe.close()
        code = node.interrupt()
        print(f"demo: node stopped with exit code {code}")
        print("demo: node log:\n" + node.log().rstrip())
        node.close()
    return 0 if code == 0 and last else 1
