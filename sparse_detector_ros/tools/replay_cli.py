"""``sparse-detector replay``: play a rosbag2 over ROS 2 with a simulated clock, for machines
without rosbag2 (on a ROS install ``ros2 bag play --clock`` does the same).

Examples::

    sparse-detector replay /tmp/simdata/scene_000/bag
    sparse-detector replay bag --rate 0.5 --topics /points /odom --remap /points:=/lidar/points
    # the node, on bag time:
    ros2 run sparse_detector_ros sparse_detector_node --ros-args -p use_sim_time:=true \\
        -r input/points:=/points

What it does. Every message of the chosen topics (``--topics``; default all) is published as it
is stored (serialized CDR: rclpy publishers take the raw bytes, nothing is deserialized, so the
recorded message definitions must be the installed ones, as with ``ros2 bag play``) on its
recorded topic, renamed by ``--remap FROM:=TO``, at its recorded log time scaled by ``1 /
--rate`` (``--rate 2`` plays twice as fast). Unless ``--no-clock``, ``/clock``
(rosgraph_msgs/Clock) follows the bag's log time: published before each message with that
message's log time and every :data:`CLOCK_PERIOD_S` of wall time in between (interpolated), so
nodes with ``use_sim_time:=true`` run on the bag's time.

QoS: reliable publishers (a reliable publisher serves reliable and best-effort subscribers,
e.g. a driver-style sensor-data subscription), keep-last :data:`DEPTH`; ``/tf_static`` and any
topic recorded as transient-local are published transient-local (latched), so late subscribers
still get them. A topic whose message type is not installed for rclpy is skipped with one
warning. ``--wait-for TOPIC...`` waits until those topics have a matched subscriber, then
``--start-delay`` waits, so that DDS discovery can match the subscribers before the first
message; at the end it waits (at most :data:`FLUSH_TIMEOUT_S`) until reliable subscribers
acknowledged every message. DDS discovery is left to the user as with any ROS tool
(``ROS_DOMAIN_ID``, ``ROS_AUTOMATIC_DISCOVERY_RANGE``). Ctrl-C stops cleanly. At the end (or on
Ctrl-C) one line of JSON (stdout) says what was published per topic and what was skipped.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterable

#: wall-time period of /clock messages between two bag messages [s] (rosbag2's default: 40 Hz)
CLOCK_PERIOD_S = 0.025
#: publisher queue depth (keep-last)
DEPTH = 10
#: queue depth of latched (transient-local) publishers: every recorded message stays available
LATCHED_DEPTH = 100
LATCHED_TOPICS = ("/tf_static",)
#: at the end, wait at most this long for reliable subscribers to acknowledge everything [s]
FLUSH_TIMEOUT_S = 2.0


class ReplayError(RuntimeError):
    """A bad input (bag, option); the message says what was wrong."""


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="IN", help="rosbag2 folder (sqlite3 or MCAP) to play")
    parser.add_argument("--rate", type=_positive_float, default=1.0, metavar="FACTOR",
                        help="playback speed, a multiple of the recorded rate (default 1.0)")
    parser.add_argument("--topics", nargs="+", default=None, metavar="TOPIC",
                        help="play only these recorded topics (default: all)")
    parser.add_argument("--remap", nargs="+", default=[], metavar="FROM:=TO",
                        help="publish recorded topic FROM on topic TO")
    parser.add_argument("--no-clock", action="store_true",
                        help="do not publish /clock (rosgraph_msgs/Clock) from the bag's time")
    parser.add_argument("--start-delay", type=_non_negative_float, default=1.0, metavar="S",
                        help="seconds between creating the publishers and the first message, "
                             "for DDS discovery (default 1.0)")
    parser.add_argument("--wait-for", nargs="+", default=[], metavar="TOPIC",
                        help="before the start delay, wait until each of these played topics "
                             "(names after --remap; /clock too) has a matched subscriber, as "
                             "`ros2 topic pub --wait-matching-subscriptions` does")


def parse_remaps(items: Iterable[str]) -> dict[str, str]:
    """``["/a:=/b", ...]`` -> ``{"/a": "/b"}``; ReplayError for an item without ``:=`` or with
    an empty side."""
    out: dict[str, str] = {}
    for item in items:
        src, sep, dst = item.partition(":=")
        if not sep or not src or not dst:
            raise ReplayError(f"--remap {item!r}: expected FROM:=TO, e.g. /points:=/lidar/points")
        out[src] = dst
    return out


def message_class(msgtype: str) -> type | None:
    """The rclpy message class of ``pkg/msg/Name`` (or ``pkg/Name``), None when not installed."""
    parts = msgtype.split("/")
    if len(parts) == 2:
        parts = [parts[0], "msg", parts[1]]
    if len(parts) != 3:
        return None
    try:
        return getattr(importlib.import_module(f"{parts[0]}.{parts[1]}"), parts[2])
    except (ImportError, AttributeError):
        return None


def is_latched(topic: str, offered_qos_profiles: Any) -> bool:
    """Whether a recorded topic is published transient-local: ``/tf_static``, or a topic whose
    recording publisher offered transient-local durability."""
    from rosbags.interfaces import QosDurability

    if topic in LATCHED_TOPICS:
        return True
    return any(getattr(q, "durability", None) == QosDurability.TRANSIENT_LOCAL
               for q in offered_qos_profiles or ())


def stamp_msg(ns: int):
    """Nanoseconds -> ``builtin_interfaces/Time``."""
    from builtin_interfaces.msg import Time

    return Time(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)


def wait_for_subscribers(node, topics: Iterable[str], publishers: Iterable[Any]) -> None:
    """Block until the publisher of each topic in ``topics`` (resolved names) has a matched
    subscription; ReplayError for a topic that is not played."""
    pubs = {p.topic_name: p for p in publishers if p is not None}
    for topic in topics:
        name = node.resolve_topic_name(topic)
        if name not in pubs:
            raise ReplayError(f"--wait-for {topic}: not a played topic; played: "
                              + ", ".join(sorted(pubs)))
        if pubs[name].get_subscription_count() == 0:
            print(f"sparse-detector replay: waiting for a subscriber on {name}", file=sys.stderr)
        while pubs[name].get_subscription_count() == 0:
            time.sleep(0.05)


def flush(publishers: Iterable[Any], timeout_s: float = FLUSH_TIMEOUT_S) -> bool:
    """Wait (at most ``timeout_s`` in all) until reliable subscribers acknowledged every message
    of ``publishers`` (None entries ignored): publishing is asynchronous, and a process that
    exits at once can lose its last messages. True when all were acknowledged."""
    from rclpy.duration import Duration

    end = time.monotonic() + timeout_s
    ok = True
    for pub in publishers:
        if pub is not None:
            left = max(0.0, end - time.monotonic())
            ok &= bool(pub.wait_for_all_acked(Duration(nanoseconds=int(left * 1e9))))
    return ok


def replay(args, node=None) -> dict:
    """Play the bag (see the module docstring) from an rclpy node (default: a new one in a new
    context); returns the summary dict. KeyboardInterrupt ends the playback early (the summary
    then says ``interrupted``)."""
    import rclpy
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
    from rosbags.rosbag2 import Reader

    src = Path(args.input)
    if not (src / "metadata.yaml").is_file():
        raise ReplayError(f"{src} is not a rosbag2 folder: {src / 'metadata.yaml'} does not exist")
    remaps = parse_remaps(args.remap)
    summary: dict[str, Any] = {"replay": "summary", "input": str(src), "rate": args.rate,
                               "published": {}, "skipped_topics": {}, "interrupted": False}
    own_context = node is None
    context = None
    if own_context:
        context = rclpy.Context()
        rclpy.init(args=[], context=context)   # our argv is not for ROS (e.g. FROM:=TO)
        node = rclpy.create_node("sparse_detector_replay", context=context,
                                 start_parameter_services=False)
    try:
        with Reader(src) as reader:
            topics = set(reader.topics)
            wanted = set(args.topics) if args.topics else topics
            missing = sorted(wanted - topics)
            if missing:
                raise ReplayError(f"--topics: {src} has no topic {', '.join(missing)}; its "
                                  f"topics: {', '.join(sorted(topics))}")
            pubs: dict[int, Any] = {}
            by_topic: dict[str, Any] = {}
            for conn in reader.connections:
                if conn.topic not in wanted:
                    continue
                cls = message_class(conn.msgtype)
                if cls is None:
                    summary["skipped_topics"][conn.topic] = (
                        f"message type {conn.msgtype} is not installed for rclpy")
                    continue
                key = (conn.topic, conn.msgtype)
                if key not in by_topic:
                    latched = is_latched(conn.topic, conn.ext.offered_qos_profiles)
                    qos = QoSProfile(
                        history=HistoryPolicy.KEEP_LAST,
                        depth=LATCHED_DEPTH if latched else DEPTH,
                        reliability=ReliabilityPolicy.RELIABLE,
                        durability=(DurabilityPolicy.TRANSIENT_LOCAL if latched
                                    else DurabilityPolicy.VOLATILE))
                    by_topic[key] = node.create_publisher(
                        cls, remaps.get(conn.topic, conn.topic), qos)
                pubs[conn.id] = by_topic[key]
            for topic, why in summary["skipped_topics"].items():
                print(f"sparse-detector replay: {topic} is not played: {why}", file=sys.stderr)
            clock_pub = None
            if not args.no_clock:
                from rosgraph_msgs.msg import Clock
                clock_pub = node.create_publisher(Clock, "/clock", QoSProfile(
                    history=HistoryPolicy.KEEP_LAST, depth=1,
                    reliability=ReliabilityPolicy.RELIABLE))

            def clock(ns: int) -> None:
                if clock_pub is not None:
                    clock_pub.publish(Clock(clock=stamp_msg(ns)))

            wait_for_subscribers(node, args.wait_for, [*by_topic.values(), clock_pub])
            counts: dict[str, int] = {}
            time.sleep(args.start_delay)
            wall0 = bag0 = None
            try:
                for conn, t, raw in reader.messages(
                        [c for c in reader.connections if c.id in pubs]):
                    if wall0 is None:
                        wall0, bag0 = time.monotonic(), t
                        clock(t)
                    due = wall0 + (t - bag0) / 1e9 / args.rate
                    while (left := due - time.monotonic()) > 0:
                        time.sleep(min(left, CLOCK_PERIOD_S))
                        if clock_pub is not None and due - time.monotonic() > 0:
                            now = bag0 + int((time.monotonic() - wall0) * args.rate * 1e9)
                            clock(min(now, t))
                    clock(t)
                    pub = pubs[conn.id]
                    pub.publish(bytes(raw))
                    counts[pub.topic_name] = counts.get(pub.topic_name, 0) + 1
                flush([*by_topic.values(), clock_pub])
            except KeyboardInterrupt:
                summary["interrupted"] = True
            summary["published"] = counts
            summary["wall_s"] = round(time.monotonic() - wall0, 3) if wall0 is not None else 0.0
    finally:
        if own_context:
            node.destroy_node()
            rclpy.try_shutdown(context=context)
    return summary


def run(args) -> int:
    from rosbags.rosbag2 import ReaderError

    try:
        summary = replay(args)
    except (ReplayError, ReaderError) as exc:
        print(f"sparse-detector replay: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before the playback began
        return 0
    print(json.dumps(summary), flush=True)
    return 0
