"""``sparse-detector bench node``: end-to-end latency of the real node through DDS.

For each mask mode of ``--modes`` (default: ``dense`` and the parameter file's ``mask.mode``,
in one run, one after the other) the installed ``sparse_detector_node`` is started as a child
process (:class:`node_client.NodeProcess`, the package's parameter file, ``mask.mode`` set; the
same torch threads for every mode: the node's default, or ``--node-threads``) on a local DDS
domain. A :class:`node_client.Probe` in this process publishes synthetic 64-beam scans
(``--lidar hdl64e``: about 120k points, ``velodyne`` layout, the ``bench`` seed range;
``--scans`` distinct scans cycled; the sensor pose as ``input/odometry`` with every cloud) at
``--rate`` (10 Hz) for ``--seconds`` (60 s), after ``--warmup`` uncounted clouds, and records
when each cloud's ``output/objects`` arrives.

* latency: the cloud's stamp (the probe's clock when it was published) to the arrival of the
  ``output/objects`` with that stamp, on the same clock; ``{"p50", "p90", "p99", "min",
  "max"}`` in ms over the counted frames that came back;
* frames: ``sent`` (counted clouds published), ``received`` / ``processed`` / ``dropped``
  (replaced in the node's one-slot mailbox by a newer cloud) / ``rejected``: the node's
  diagnostics counters over the counted run (a settled reading after the warm-up subtracted
  from a settled reading at the end); ``lost`` = sent - received (never reached the node; the
  node's ``frames_lost`` when its diagnostics have one); ``outputs`` = counted clouds whose
  ``output/objects`` arrived;
* the node process's CPU % over the counted run (``/proc/<pid>/stat`` utime + stime; 100 % =
  one core busy) and its RSS at the end and peak (``VmRSS``, ``VmHWM``); the probe's own CPU %
  (it shares the machine);
* ``node_diagnostics``: the node's own ``total_ms_p50/p99`` and ``latency_ms_p50/p99`` (over its
  last ``node.stats_window`` frames), ``mask_mode``; ``active_fraction_mean``: the share of the
  backbone's tiles computed, over the counted frames (from the node's per-period diagnostics);
* ``loadavg_end`` (the run row has ``loadavg_start``): other work on the machine shows there.

JSON lines: a ``"run"`` row, one ``"node"`` row per mode, a ``"summary"`` row with the targets
(p99 <= 100 ms with 0 dropped and 0 lost frames at 10 Hz; aim: p99 <= 50 ms) and whether each
mode met them. The publisher and the node share the CPU, as a driver and the node would.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from ..runtime import freeze_startup_objects
from . import positive_int
from .node_client import stamp_ns

#: p99 latency limit [ms] (with no dropped or lost frame) and the p99 aimed for [ms]
TARGET_P99_MS = 100.0
AIM_P99_MS = 50.0
COUNTERS = ("frames_received", "frames_processed", "frames_dropped", "frames_rejected")


def _positive_float(text: str) -> float:
    import argparse

    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def add_arguments(parser) -> None:
    from ..pointcloud import LAYOUTS
    from .bench_pipeline import MODES

    parser.add_argument("--modes", nargs="+", default=None, choices=MODES,
                        help="mask modes, one node run each (default: dense and the parameter "
                        "file's mask.mode)")
    parser.add_argument("--rate", type=_positive_float, default=10.0,
                        help="clouds per second (default 10)")
    parser.add_argument("--seconds", type=_positive_float, default=60.0,
                        help="counted seconds per mode (default 60)")
    parser.add_argument("--warmup", type=int, default=10,
                        help="uncounted clouds sent first, at the same rate (default 10)")
    parser.add_argument("--scans", type=positive_int, default=20,
                        help="distinct scans the clouds cycle over (default 20)")
    parser.add_argument("--scenes", type=positive_int, default=5,
                        help="bench scenes the scans are spread over (default 5; 1 for a mask "
                        "that needs the map prior: the node holds one map)")
    parser.add_argument("--lidar", default="hdl64e", help="simulated LiDAR preset")
    parser.add_argument("--layout", default="velodyne", choices=sorted(LAYOUTS),
                        help="driver field layout of the clouds (default velodyne)")
    parser.add_argument("--params-file", default=None,
                        help="ROS parameter file (default: the package's config)")
    parser.add_argument("--reliable", action="store_true",
                        help="subscribe input/points reliably (default: the parameter file's "
                        "node.qos_reliability)")
    parser.add_argument("--node-threads", type=positive_int, default=None,
                        help="torch (OpenMP) threads of the node, set through OMP_NUM_THREADS "
                        "(default: the node's default, one per core)")
    parser.add_argument("--startup-timeout", type=_positive_float, default=120.0,
                        help="seconds to wait for the node to subscribe (default 120)")
    parser.add_argument("--domain-id", type=int, default=None, help="ROS_DOMAIN_ID to use")
    parser.add_argument("--jsonl", default=None, help="also write the rows to this file")


# ------------------------------------------------------------------------------ helpers

def cpu_seconds(pid: int) -> float:
    """User + system CPU time [s] of process ``pid`` so far (``/proc/<pid>/stat``)."""
    path = f"/proc/{pid}/stat"
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError as exc:
        raise RuntimeError(f"cannot read {path} ({exc}): is the process still running?") from exc
    # fields after the command name (which may hold spaces) start at field 3: utime is 14
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def counters(d: dict) -> tuple[int, ...]:
    """The node's frame counters (:data:`COUNTERS`) of one diagnostics dict."""
    return tuple(int(d[k]) for k in COUNTERS)


def settled(probe, timeout: float) -> dict | None:
    """Wait for two consecutive new diagnostics with the same counters in which every received
    frame is accounted for (processed + dropped + rejected = received): the node is idle and
    counted everything that reached it. Returns the second one, or None after ``timeout`` s."""
    start = len(probe.diagnostics)

    def done() -> bool:
        new = probe.diagnostics[start:]
        if len(new) < 2:
            return False
        a, b = counters(new[-2]), counters(new[-1])
        return a == b and b[1] + b[2] + b[3] == b[0]

    return probe.diagnostics[-1] if probe.wait_for(done, timeout) else None


def mode_row(mode: str, sent: int, before: dict, after: dict, latencies_ms: list[float],
             cpu_s: float, wall_s: float, send_s: float, probe_cpu_s: float, rss_kib: int,
             rss_peak_kib: int, during: Sequence[dict] = ()) -> dict:
    """The ``"node"`` row of one mode from the settled diagnostics ``before`` and ``after`` the
    counted run, the latencies of the counted frames whose outputs came back, and the node's
    CPU seconds over ``wall_s`` seconds. ``during``: the diagnostics received in between (their
    per-period ``active_fraction``, weighted by ``frames_in_window``, gives the run's mean)."""
    from .bench_pipeline import percentiles

    delta = {k.removeprefix("frames_"): int(after[k]) - int(before[k]) for k in COUNTERS}
    lost = (int(after["frames_lost"]) - int(before["frames_lost"])
            if "frames_lost" in after and "frames_lost" in before else sent - delta["received"])
    frames = {"sent": sent, **delta, "lost": lost, "outputs": len(latencies_ms)}
    lat = percentiles(latencies_ms) if latencies_ms else None
    p99 = lat["p99"] if lat else None
    ok = p99 is not None and p99 <= TARGET_P99_MS and frames["dropped"] == 0 and lost == 0
    weights = [(int(d["frames_in_window"]), float(d["active_fraction"])) for d in during
               if "frames_in_window" in d and "active_fraction" in d]
    n_active = sum(k for k, _ in weights)
    active = round(sum(k * a for k, a in weights) / n_active, 4) if n_active else None
    diag = {k: after[k] for k in ("total_ms_p50", "total_ms_p99", "latency_ms_p50",
                                  "latency_ms_p99", "mask_mode",
                                  "mask_fallback", "frames_in_stats", "backend", "device")
            if k in after}
    return {"bench": "node", "mode": mode, "frames": frames, "latency_ms": lat,
            "send_rate_hz": round(sent / send_s, 3) if send_s > 0 else None,
            "cpu_percent": round(100.0 * cpu_s / wall_s, 1) if wall_s > 0 else None,
            "probe_cpu_percent": round(100.0 * probe_cpu_s / wall_s, 1) if wall_s > 0 else None,
            "rss_mib": round(rss_kib / 1024.0, 1), "rss_peak_mib": round(rss_peak_kib / 1024.0, 1),
            "active_fraction_mean": active, "node_diagnostics": diag,
            "target_met": ok, "aim_met": ok and p99 <= AIM_P99_MS}


def _send(probe, msgs, scans, n: int, period: float, offset: int) -> tuple[list[int], float]:
    """Publish ``n`` clouds (odometry first, same stamp) every ``period`` s, spinning the probe
    in between; returns their stamps [ns] and the seconds the sending took. A send that falls
    more than one period behind restarts the schedule (no catch-up burst)."""
    stamps = []
    t0 = time.monotonic()
    next_t = t0
    for k in range(n):
        i = (offset + k) % len(msgs)
        stamp = probe.now()
        x, y, yaw = scans[i].pose
        probe.publish_odometry(x, y, yaw, stamp)
        msgs[i].header.stamp = stamp
        msgs[i].header.frame_id = "lidar"
        probe.pub.publish(msgs[i])
        stamps.append(stamp_ns(stamp))
        next_t += period
        now = time.monotonic()
        if now - next_t > period:
            next_t = now
        probe.spin_for(max(0.0, next_t - now))
    return stamps, time.monotonic() - t0


def run_mode(mode: str, args, params_file, msgs, scans, map_yaml: str) -> dict:
    """Start a node with ``mask.mode`` = ``mode``, warm it up, send the counted clouds, and
    return its ``"node"`` row. Raises RuntimeError (with the node's log) when it fails."""
    from .bench_soak import load_average, proc_status_kib
    from .node_client import NodeProcess, Probe

    params: dict[str, object] = {"mask.mode": mode, "node.diagnostics_period": 0.25}
    if map_yaml:
        params["mask.map_yaml"] = map_yaml
    if args.reliable:
        params["node.qos_reliability"] = "reliable"
    saved = os.environ.get("OMP_NUM_THREADS")
    if args.node_threads:
        os.environ["OMP_NUM_THREADS"] = str(args.node_threads)
    try:
        node = NodeProcess(params_file, params)
    finally:
        if args.node_threads:
            if saved is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = saved
    # reliable: matches a best-effort and a reliable subscription; no message kept (the
    # probe's own garbage collections would delay its arrival times)
    probe = Probe(reliable=True, keep_messages=False)

    def fail(what: str) -> RuntimeError:
        return RuntimeError(f"bench node ({mode}): {what}\n--- node log ---\n{node.log()}")

    try:
        if not probe.has_objects:
            raise RuntimeError("bench node: vision_msgs is missing (run scripts/setup.sh)")
        if not probe.wait_for_subscriber(args.startup_timeout):
            raise fail(f"the node did not subscribe to input/points in {args.startup_timeout} s")
        period = 1.0 / args.rate
        warm = max(1, args.warmup)
        _send(probe, msgs, scans, warm, period, 0)
        if not probe.wait_for(lambda: bool(probe.arrivals), 30.0):
            raise fail("no output/objects came back for the warm-up clouds")
        before = settled(probe, 30.0)
        freeze_startup_objects()   # the probe's start-up objects out of its collections
        first = len(probe.diagnostics)
        if before is None:
            raise fail("the node's counters did not settle after the warm-up")
        n = max(1, round(args.seconds * args.rate))
        pid = node.proc.pid
        cpu0, probe0, t0 = cpu_seconds(pid), time.process_time(), time.monotonic()
        stamps, send_s = _send(probe, msgs, scans, n, period, warm)
        cpu1, probe1, t1 = cpu_seconds(pid), time.process_time(), time.monotonic()
        rss = proc_status_kib("VmRSS", pid)
        load = load_average()
        after = settled(probe, 60.0)
        if after is None:
            raise fail("the node's counters did not settle after the counted run")
        rss_peak = proc_status_kib("VmHWM", pid)
        probe.spin_for(0.3)   # outputs still on their way
        lat = [(probe.arrivals[s] - s) / 1e6 for s in stamps if s in probe.arrivals]
        row = mode_row(mode, len(stamps), before, after, lat, cpu1 - cpu0, t1 - t0, send_s,
                       probe1 - probe0, rss, rss_peak, probe.diagnostics[first:])
        row["loadavg_end"] = load
        return row
    finally:
        probe.close()
        node.close()


def run(args) -> int:
    from .node_client import local_dds_env

    local_dds_env(args.domain_id)   # before rclpy starts

    import torch

    from ..config import Config
    from ..paths import find_share_file
    from ..ros_io import cloud_to_msg
    from .bench_soak import bench_scans, load_average

    t_start = time.perf_counter()
    params_file = args.params_file or str(find_share_file("config/sparse_detector.yaml"))
    config = Config.from_yaml(params_file)
    modes = list(dict.fromkeys(args.modes or ["dense", config.mask.mode]))
    union_map = "map_prior" in config.mask.union.split(",")
    map_modes = [m for m in modes if m == "map_prior" or (m == "union" and union_map)]
    if map_modes and args.scenes != 1:
        raise SystemExit(f"bench node: mask mode {map_modes[0]} needs --scenes 1 (the node "
                         "holds one map; the scans must come from its scene)")
    scans = bench_scans(args.scans, args.scenes, args.lidar, args.layout, maps=bool(map_modes))
    msgs = [cloud_to_msg(s.cloud) for s in scans]
    run_row = {"bench": "run", "kind": "node", "modes": modes, "rate_hz": args.rate,
               "seconds": args.seconds, "warmup": args.warmup, "scans": len(scans),
               "scenes": args.scenes, "lidar": args.lidar, "layout": args.layout,
               "points_mean": round(sum(s.points for s in scans) / len(scans)),
               "params_file": params_file,
               "qos_reliability": "reliable" if args.reliable else config.node.qos_reliability,
               "node_device": config.node.device, "torch": torch.__version__,
               "node_threads": args.node_threads or os.environ.get("OMP_NUM_THREADS")
               or torch.get_num_threads(), "cores": os.cpu_count(),
               "domain_id": os.environ.get("ROS_DOMAIN_ID"), "loadavg_start": load_average()}
    rows = [run_row]
    print(json.dumps(run_row), flush=True)
    for mode in modes:
        try:
            row = run_mode(mode, args, params_file, msgs, scans,
                           scans[0].map_yaml if mode in map_modes else "")
        except RuntimeError as exc:
            print(str(exc), file=sys.stderr, flush=True)
            return 1
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = {"bench": "summary", "kind": "node",
               "targets": {"p99_ms_max": TARGET_P99_MS, "dropped_max": 0, "lost_max": 0,
                           "p99_ms_aim": AIM_P99_MS, "rate_hz": args.rate},
               "p99_ms": {r["mode"]: r["latency_ms"]["p99"] if r["latency_ms"] else None
                          for r in rows[1:]},
               "target_met": {r["mode"]: r["target_met"] for r in rows[1:]},
               "aim_met": {r["mode"]: r["aim_met"] for r in rows[1:]},
               "wall_s": round(time.perf_counter() - t_start, 1)}
    rows.append(summary)
    print(json.dumps(summary), flush=True)
    if args.jsonl:
        Path(args.jsonl).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0
