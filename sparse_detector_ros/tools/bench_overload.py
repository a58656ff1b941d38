"""``sparse-detector bench overload``: the running node fed at a multiple of its capacity, as
JSON.

Starts ``sparse_detector_node`` (reliable input QoS unless ``--qos best_effort``), measures its
capacity first (one 120k-point cloud at a time, each sent when the previous one's outputs came
back: the median cycle, after ``--warmup`` frames), then publishes such clouds at ``--factor``
(3) times that rate for ``--seconds`` (60) and reports:

* ``frames``: sent, received, processed, dropped, rejected, lost (the node's counters over the
  overload phase; ``lost`` = ``frames_lost``, what the middleware reported lost),
  ``unreported_loss`` (sent - received - lost: clouds that vanished without any counter, e.g.
  overwritten in the subscription's queue of ``node.qos_depth`` while the node's executor was
  starved), ``outputs`` (output messages received here), ``accounted`` (no unreported loss, and
  received = processed + dropped + rejected once the node settled);
* ``latency_ms``: p50/p99/max from a cloud's stamp to its outputs arriving here (same clock);
* ``cycle_ms``: p50/max of the time between consecutive outputs (the worker's per-frame time
  under this load) and ``latency_bound_ms`` = 3 * cycle max + publish period, with
  ``latency_within_bound``. Why that bound: with newest-frame-only a cloud waits at most for the
  frame in hand (one cycle), then takes its own (one cycle); one more cycle and one publish
  period cover transport and scheduling. A backlog would instead grow the latency by about
  ``(1 - 1/factor)`` of the elapsed time, far past the bound;
* ``rss_mb``: the node process's resident memory (``VmRSS`` of ``/proc/<pid>/status``) after the
  capacity phase (warm), at the end, and the largest sample (one a second), with
  ``end_over_start``;
* the node's own diagnostics (``total_ms_p50/p99``, ``latency_ms_p50/p99``) and its exit code
  after SIGINT.

The clouds are spinning-LiDAR-like sweeps (``bench_decode.synthetic_scan``) in the Velodyne
layout, a few distinct ones published in turn, each stamped when it is sent.
"""
from __future__ import annotations

import json
import time

import numpy as np

#: node parameters of an overload run (``node.qos_depth``: the node's default unless given)
OVERLOAD_PARAMS: dict[str, object] = {"node.qos_reliability": "reliable",
                                      "node.diagnostics_period": 0.2}
#: the node is taken as settled once its counters stopped moving for this long [s]
QUIET_S = 3.0


def add_arguments(parser) -> None:
    parser.add_argument("--seconds", type=float, default=60.0,
                        help="length of the overload phase [s] (default 60)")
    parser.add_argument("--factor", type=float, default=3.0,
                        help="publish rate as a multiple of the measured capacity (default 3)")
    parser.add_argument("--points", type=int, default=120_000, help="points per cloud")
    parser.add_argument("--capacity-frames", type=int, default=6,
                        help="frames timed to measure the capacity (default 6)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="frames sent before the capacity is timed (default 2)")
    parser.add_argument("--qos", choices=("reliable", "best_effort"), default="reliable",
                        help="reliability of the node's input subscription (default reliable)")
    parser.add_argument("--qos-depth", type=int, default=None,
                        help="node.qos_depth of the input subscription (default: the node's)")
    parser.add_argument("--domain-id", type=int, default=None,
                        help="ROS_DOMAIN_ID (default: the environment's, else one per process)")


def rss_kb(pid: int) -> int | None:
    """Resident memory of process ``pid`` [kB] (``VmRSS`` in ``/proc/<pid>/status``), None
    when it cannot be read."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _pct(values, q: float) -> float:
    return float(np.percentile(np.asarray(values, np.float64), q)) if len(values) else 0.0


def _clouds(points: int, count: int = 4) -> list:
    from ..pointcloud import encode
    from ..ros_io import cloud_to_msg
    from .bench_decode import synthetic_scan

    msgs = []
    for seed in range(count):
        pts, ring, t = synthetic_scan(points, seed)
        msgs.append(cloud_to_msg(encode(pts, "velodyne", {"ring": ring, "time": t})))
    return msgs


def run_overload(seconds: float = 60.0, factor: float = 3.0, points: int = 120_000,
                 capacity_frames: int = 6, warmup: int = 2, qos: str = "reliable",
                 qos_depth: int | None = None, node=None, probe=None) -> dict:
    """The overload run described in the module docstring, with a node started here (and
    stopped with SIGINT at the end) unless ``node`` (a ``node_client.NodeProcess``) and
    ``probe`` are given; the report as a dict."""
    from rclpy.qos import QoSProfile, ReliabilityPolicy

    from .fuzz import Counters, Harness

    if seconds <= 0 or factor <= 0 or capacity_frames < 1 or warmup < 0 or points < 1:
        raise ValueError("seconds, factor, points and capacity_frames must be positive, "
                         "warmup >= 0")
    t_start = time.monotonic()
    params = OVERLOAD_PARAMS | {"node.qos_reliability": qos}
    if qos_depth is not None:
        params["node.qos_depth"] = qos_depth
    h = Harness(node, probe, params=params)
    clock = h.probe.node.get_clock()
    arrivals: list[tuple[int, int]] = []  # (cloud stamp, arrival) [ns]

    def on_output(msg) -> None:
        header = msg.markers[0].header if hasattr(msg, "markers") else msg.header
        arrivals.append((header.stamp.sec * 1_000_000_000 + header.stamp.nanosec,
                         clock.now().nanoseconds))

    out_qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
    if h.probe.has_objects:
        from vision_msgs.msg import Detection3DArray
        h.probe.node.create_subscription(Detection3DArray, "output/objects", on_output, out_qos)
        output_topic = "output/objects"
    else:
        from visualization_msgs.msg import MarkerArray
        h.probe.node.create_subscription(MarkerArray, "output/markers", on_output, out_qos)
        output_topic = "output/markers"
    report: dict = {"bench": "overload", "points": points, "factor": factor,
                    "seconds": seconds, "qos": qos, "qos_depth": qos_depth or "node default",
                    "output_topic": output_topic}
    try:
        if not h.ready():
            raise RuntimeError("the node did not come up:\n" + h.node.log()[-4000:])
        msgs = _clouds(points)
        pid = h.node.proc.pid

        def send(i: int) -> int:
            msg = msgs[i % len(msgs)]
            msg.header.frame_id = "lidar"
            msg.header.stamp = h.probe.now()
            h.publish(msg)
            return msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec

        # 1. capacity: one cloud at a time
        cycles = []
        for i in range(warmup + capacity_frames):
            stamp = send(i)
            if not h.probe.wait_for(lambda s=stamp: any(a[0] == s for a in arrivals), 120.0):
                raise RuntimeError("no output for a capacity frame:\n" + h.node.log()[-4000:])
            if i >= warmup:
                cycles.append((next(a[1] for a in arrivals if a[0] == stamp) - stamp) / 1e6)
        frame_ms = float(np.median(cycles))
        period = frame_ms / 1e3 / factor
        report["capacity"] = {"frame_ms_p50": round(frame_ms, 2),
                              "frame_ms_max": round(max(cycles), 2),
                              "frames_per_s": round(1e3 / frame_ms, 2)}
        d0 = h.wait_accounted(60.0)
        if d0 is None:
            raise RuntimeError("the node did not settle after the capacity phase")
        before = Counters.of(d0)
        rss_start = rss_kb(pid)

        # 2. overload: publish every `period` seconds, spinning in between
        phase_start = clock.now().nanoseconds
        first = len(arrivals)
        sent = 0
        rss_samples = [rss_start] if rss_start else []
        t0 = time.monotonic()
        next_rss = t0 + 1.0
        while True:
            due = t0 + sent * period
            if due - t0 >= seconds:
                break
            now = time.monotonic()
            while now < due:
                h.probe.executor.spin_once(timeout_sec=due - now)
                now = time.monotonic()
            send(sent)
            sent += 1
            if now >= next_rss:
                rss_samples += [r for r in (rss_kb(pid),) if r]
                next_rss += 1.0
        publish_s = time.monotonic() - t0

        # 3. settle: every cloud received is handled, and either every cloud sent is accounted
        # for or the counters stopped moving (the rest vanished unreported)
        moved = {"received": -1, "at": time.monotonic()}

        def settled(c: Counters) -> bool:
            if c.received != moved["received"]:
                moved["received"], moved["at"] = c.received, time.monotonic()
            return c.settled and (c.received + c.lost >= h.sent
                                  or time.monotonic() - moved["at"] > QUIET_S)

        d = h.wait(settled, 120.0)
        after = Counters.of(d) if d is not None else Counters.of(h.probe.latest() or d0)
        delta = after.minus(before)
        unreported = sent - delta.received - delta.lost
        h.probe.wait_for(lambda: len(arrivals) - first >= delta.processed, 10.0)
        rss_end = rss_kb(pid)
        phase = sorted((a for a in arrivals[first:] if a[0] >= phase_start), key=lambda a: a[1])
        latency = [(arr - stamp) / 1e6 for stamp, arr in phase]
        gaps = [(b[1] - a[1]) / 1e6 for a, b in zip(phase, phase[1:])]
        cycle_max = max(gaps) if gaps else frame_ms
        bound = 3.0 * cycle_max + period * 1e3
        final = d if d is not None else (h.probe.latest() or {})
        report.update({
            "rate_hz": round(1.0 / period, 2),
            "achieved_rate_hz": round(sent / publish_s, 2) if publish_s > 0 else None,
            "frames": {"sent": sent, "received": delta.received,
                       "processed": delta.processed, "dropped": delta.dropped,
                       "rejected": delta.rejected, "lost": delta.lost,
                       "unreported_loss": unreported, "outputs": len(phase)},
            "accounted": d is not None and unreported == 0 and after.settled,
            "latency_ms": {"p50": round(_pct(latency, 50), 2), "p99": round(_pct(latency, 99), 2),
                           "max": round(max(latency), 2) if latency else None},
            "cycle_ms": {"p50": round(_pct(gaps, 50), 2), "max": round(cycle_max, 2)},
            "publish_period_ms": round(period * 1e3, 2),
            "latency_bound_ms": round(bound, 2),
            "latency_within_bound": bool(latency) and max(latency) <= bound,
            "rss_mb": {"start": _mb(rss_start), "end": _mb(rss_end),
                       "max": _mb(max(rss_samples + [rss_end or 0]) or None),
                       "end_over_start": round(rss_end / rss_start, 3)
                       if rss_start and rss_end else None},
            "node_diagnostics": {k: float(final[k]) for k in (
                "total_ms_p50", "total_ms_p99", "latency_ms_p50", "latency_ms_p99")
                if k in final},
        })
        report["node_alive"] = h.node.alive()
    finally:
        report["exit_code"] = h.close()
    report["wall_s"] = round(time.monotonic() - t_start, 1)
    return report


def _mb(kb: int | None) -> float | None:
    return None if not kb else round(kb / 1024.0, 1)


def run(args) -> int:
    from .node_client import local_dds_env

    local_dds_env(args.domain_id)
    report = run_overload(seconds=args.seconds, factor=args.factor, points=args.points,
                          capacity_frames=args.capacity_frames, warmup=args.warmup, qos=args.qos,
                          qos_depth=args.qos_depth)
    print(json.dumps(report, indent=2))
    return 0
