"""``sparse-detector bag``: run the detector over a recorded rosbag2 and write a new bag with its
outputs, as the node would have published them -- no ROS install needed (``rosbags`` reads and
writes the bags, rclpy only serializes the output messages).

Examples::

    sparse-detector bag /tmp/simdata/scene_000/bag --out /tmp/detected
    sparse-detector bag in_bag --out out_bag --params-file my_params.yaml --storage sqlite3 \\
        --map /tmp/simdata/scene_000/map.yaml      # map_prior mask (mask.mode in the file)

What it does. ``IN`` (a rosbag2 folder, sqlite3 or MCAP) is read in log-time order; every message
is copied to ``OUT`` at its log time on its own topic, and every cloud of ``--points-topic`` goes
through :class:`~sparse_detector_ros.pipeline.Detector` as the node runs it: decoded
(``pointcloud.decode``), moved into the detection frame (``transform.*``,
:class:`~sparse_detector_ros.frames.MountTransform`), detected with the pose of the latest
``--odom-topic`` message for the map-prior mask (none when that odometry's stamp is further than
``node.odometry_timeout_s`` from the cloud's, or missing: the mask then falls back to
``mask.map_fallback``; counted as ``frames_without_pose``). Its outputs are written at the
cloud's log time, each carrying the cloud's header (stamp and frame_id) unchanged:

==============================  =====================================  ========================
``/sparse_detector/objects``    vision_msgs/msg/Detection3DArray       ``ros_io.detections_msg``
``/sparse_detector/markers``    visualization_msgs/msg/MarkerArray     ``ros_io.markers_msg``
``/sparse_detector/mask``       nav_msgs/msg/OccupancyGrid             ``ros_io.mask_msg``
``/diagnostics``                diagnostic_msgs/msg/DiagnosticArray    :func:`frame_diagnostics`
==============================  =====================================  ========================

The messages are built with rclpy's message classes and serialized by
``rclpy.serialization.serialize_message``; the connections' message definitions come from a
``rosbags`` typestore that knows vision_msgs (``tools/vision_types.py``). Without vision_msgs
in rclpy the objects topic is left out (one warning); markers and mask are still written. An
input topic with the name of an output topic is replaced by the output (one warning).

A cloud that cannot be decoded (``pointcloud.CloudError``: malformed, empty, no frame_id) or
deserialized is skipped and counted (still copied to ``OUT``). At the end one line of JSON
(stdout) summarises the run: frames, detections per class, mean/p50/p99 ms per stage, the mean
active-tile fraction, skipped clouds by kind.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

TOPIC_OBJECTS = "/sparse_detector/objects"
TOPIC_MARKERS = "/sparse_detector/markers"
TOPIC_MASK = "/sparse_detector/mask"
TOPIC_DIAGNOSTICS = "/diagnostics"
OUTPUT_TYPES = {
    TOPIC_OBJECTS: "vision_msgs/msg/Detection3DArray",
    TOPIC_MARKERS: "visualization_msgs/msg/MarkerArray",
    TOPIC_MASK: "nav_msgs/msg/OccupancyGrid",
    TOPIC_DIAGNOSTICS: "diagnostic_msgs/msg/DiagnosticArray",
}
STORAGES = ("mcap", "sqlite3")
HARDWARE_ID = "sparse-detector bag"


class BagToolError(RuntimeError):
    """A bad input (bag, topic, option); the message says what was wrong."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="IN", help="rosbag2 folder (sqlite3 or MCAP) to read")
    parser.add_argument("--out", required=True, metavar="OUT",
                        help="rosbag2 folder to write (must not exist)")
    parser.add_argument("--params-file", default=None, metavar="F",
                        help="runtime parameter file (ROS parameter YAML, as the node's; "
                             "default: the built-in defaults)")
    parser.add_argument("--model", default="", metavar="PATH",
                        help="model description (default: the parameter file's model.path, "
                             "else the shipped model)")
    parser.add_argument("--points-topic", default="/points",
                        help="PointCloud2 topic to detect on (default /points)")
    parser.add_argument("--odom-topic", default="/odom",
                        help="nav_msgs/Odometry topic giving the pose for the map_prior mask "
                             "(default /odom; ignored when the bag does not have it)")
    parser.add_argument("--map", default=None, metavar="MAP.yaml",
                        help="nav2 map for the map_prior mask (overrides mask.map_yaml)")
    parser.add_argument("--storage", choices=STORAGES, default=None,
                        help="storage of OUT (default: the same as IN)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                        help="torch device (default: the parameter file's node.device)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


# -- helpers (also used by the tests) ---------------------------------------------------------

def bag_storage(path: str | Path) -> str:
    """Storage identifier (``mcap`` or ``sqlite3``) of the rosbag2 folder ``path``."""
    import yaml

    meta = Path(path) / "metadata.yaml"
    if not meta.is_file():
        raise BagToolError(f"{path} is not a rosbag2 folder: {meta} does not exist")
    try:
        info = yaml.safe_load(meta.read_text(encoding="utf-8"))["rosbag2_bagfile_information"]
        storage = str(info["storage_identifier"])
    except (yaml.YAMLError, KeyError, TypeError) as exc:
        raise BagToolError(f"{meta} is not rosbag2 metadata: {exc}") from None
    if storage not in STORAGES:
        raise BagToolError(f"{path}: storage '{storage}' is not supported: "
                           f"allowed {', '.join(STORAGES)}")
    return storage


def stamp_ns(stamp: Any) -> int:
    """``builtin_interfaces/Time``-like -> nanoseconds."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def odometry_pose(odom: Any) -> tuple[tuple[float, float, float], int]:
    """``((x, y, yaw), stamp_ns)`` of a nav_msgs/Odometry message; ValueError for a non-finite
    position or an invalid orientation (the node ignores such a message too)."""
    import math

    from ..frames import quaternion_to_yaw

    p, q = odom.pose.pose.position, odom.pose.pose.orientation
    yaw = quaternion_to_yaw(q.x, q.y, q.z, q.w)
    if not (math.isfinite(p.x) and math.isfinite(p.y)):
        raise ValueError(f"position ({p.x}, {p.y}) is not finite")
    return (float(p.x), float(p.y), float(yaw)), stamp_ns(odom.header.stamp)


def pose_for(odom: tuple[tuple[float, float, float], int] | None, cloud_stamp_ns: int,
             timeout_s: float) -> tuple[float, float, float] | None:
    """The pose of the latest odometry (:func:`odometry_pose`, or None) for a cloud stamped
    ``cloud_stamp_ns``: None when there is none or its stamp is further than ``timeout_s`` from
    the cloud's (the node's ``node.odometry_timeout_s`` rule)."""
    if odom is None or abs(cloud_stamp_ns - odom[1]) > timeout_s * 1e9:
        return None
    return odom[0]


def ros_header(header: Any):
    """A rosbags ``std_msgs/Header`` -> rclpy ``std_msgs.msg.Header`` (same stamp, frame_id)."""
    from builtin_interfaces.msg import Time
    from std_msgs.msg import Header

    return Header(stamp=Time(sec=int(header.stamp.sec), nanosec=int(header.stamp.nanosec)),
                  frame_id=str(header.frame_id))


def frame_diagnostics(result, header, classes: Sequence[str], *, device: str, backend: str):
    """One frame's :class:`~sparse_detector_ros.pipeline.FrameResult` -> DiagnosticArray
    stamped with the cloud's stamp: status ``ros_io.DIAG_NAME`` with the per-stage ``<stage>_ms``
    and ``total_ms`` of this frame, points, active fraction, mask mode and fallback, and
    ``detections`` / ``detections.<class>``."""
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue

    from ..ros_io import DIAG_NAME

    labels = result.detections.labels.tolist()
    values = [("backend", backend), ("device", device),
              ("points_received", str(result.points_received)),
              ("points_kept", str(result.points_kept))]
    values += [(f"{stage}_ms", f"{ms:.3f}") for stage, ms in result.stage_ms.items()]
    values += [("total_ms", f"{sum(result.stage_ms.values()):.3f}"),
               ("active_fraction", f"{result.active_fraction:.3f}"),
               ("mask_mode", result.mask_mode), ("mask_fallback", result.mask_fallback),
               ("detections", str(len(labels)))]
    values += [(f"detections.{c}", str(labels.count(k))) for k, c in enumerate(classes)]
    status = DiagnosticStatus(level=DiagnosticStatus.OK, name=DIAG_NAME, message="ok",
                              hardware_id=HARDWARE_ID,
                              values=[KeyValue(key=k, value=v) for k, v in values])
    out = DiagnosticArray()
    out.header = header
    out.status = [status]
    return out


def output_typestore():
    """A rosbags typestore for the output connections' definitions: the ROS 2 message set of
    the installed rclpy (Kilted), plus vision_msgs."""
    from rosbags.typesys import Stores, get_typestore

    from .vision_types import register_vision_msgs

    ts = get_typestore(Stores.ROS2_KILTED)
    register_vision_msgs(ts)
    return ts


def summarize(stage_ms: dict[str, list[float]], total_ms: list[float],
              detections: dict[str, int], active: list[float], **extra: Any) -> dict:
    """The run's summary (the JSON line): mean/p50/p99 ms of every stage and of the total."""
    import numpy as np

    def stats(v: list[float]) -> dict[str, float]:
        if not v:
            return {"mean": 0.0, "p50": 0.0, "p99": 0.0}
        a = np.asarray(v, np.float64)
        return {"mean": round(float(a.mean()), 3),
                "p50": round(float(np.percentile(a, 50)), 3),
                "p99": round(float(np.percentile(a, 99)), 3)}

    return {"bag": "summary", **extra, "detections": detections,
            "stage_ms": {s: stats(v) for s, v in stage_ms.items()}, "total_ms": stats(total_ms),
            "active_fraction": round(float(sum(active) / len(active)), 4) if active else 0.0}


# -- the run ----------------------------------------------------------------------------------

def _load_config(args):
    from dataclasses import replace

    from ..config import Config

    config = Config.from_yaml(args.params_file) if args.params_file else Config()
    if args.map:
        if not Path(args.map).is_file():
            raise BagToolError(f"--map {args.map}: no such file")
        config = replace(config, mask=replace(config.mask, map_yaml=str(args.map)))
    if args.device:
        config = replace(config, node=replace(config.node, device=args.device))
    return config


def _connection_args(conn, typestore) -> dict[str, Any] | None:
    """``Writer.add_connection`` keywords copying an input connection (definition, hash, QoS),
    or None when neither the bag nor ``typestore`` has the message definition."""
    from rosbags.interfaces import MessageDefinitionFormat

    msgdef = conn.msgdef.data if conn.msgdef.format != MessageDefinitionFormat.NONE else None
    digest = conn.digest or None
    if msgdef is None or digest is None:
        if conn.msgtype not in typestore.types:
            return None
        msgdef = msgdef or typestore.generate_msgdef(conn.msgtype, ros_version=2)[0]
        digest = digest or typestore.hash_rihs01(conn.msgtype)
    return dict(msgdef=msgdef, rihs01=digest,
                serialization_format=conn.ext.serialization_format,
                offered_qos_profiles=conn.ext.offered_qos_profiles)


def _build_detector(config, model):
    """``(Detector, device, backend name)`` for the run; warnings go to stderr."""
    from ..pipeline import Detector, resolve_device
    from ..sparse import ops

    device, warning = resolve_device(config.node.device)
    if warning:
        print(f"sparse-detector bag: {warning}", file=sys.stderr)
    detector = Detector(config, model, device)
    if not detector.trained:
        print(f"sparse-detector bag: model '{model.name}' has no trained weights: the boxes "
              "mean nothing", file=sys.stderr)
    backend = ops.get_backend(config.sparse.backend, device).__name__.rsplit(".", 1)[-1]
    return detector, device, backend.removesuffix("_backend")


def process_bag(args) -> dict:
    """Run the bag tool (see the module docstring); returns the summary dict."""
    from rclpy.serialization import serialize_message
    from rosbags.highlevel import AnyReader
    from rosbags.rosbag2 import StoragePlugin, Writer, WriterError
    from rosbags.typesys import Stores, get_typestore
    from tqdm import tqdm

    from .. import ros_io
    from ..frames import MountTransform
    from ..model.description import load_description
    from ..node import header_stamp_ns
    from ..pipeline import STAGES, StageTimer
    from ..pointcloud import CloudError
    from ..pointcloud import decode as decode_cloud

    src = Path(args.input)
    storage = args.storage or bag_storage(src)  # also a clear error for a non-bag folder
    if args.storage:
        bag_storage(src)
    out = Path(args.out)
    if out.exists():
        raise BagToolError(f"--out {out} exists: choose a new folder")
    config = _load_config(args)
    model = load_description(args.model or config.model.path)
    mount = MountTransform(config.transform.translation, config.transform.rpy)
    timeout_s = config.node.odometry_timeout_s
    classes = tuple(model.classes)
    ts_out = output_typestore()
    vision_error = ros_io.vision_msgs_error()

    stage_ms: dict[str, list[float]] = {s: [] for s in STAGES}
    total_ms: list[float] = []
    active: list[float] = []
    detections = {c: 0 for c in classes}
    skipped: dict[str, int] = {}
    clouds = frames = no_pose = 0
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    with AnyReader([src], default_typestore=get_typestore(Stores.ROS2_HUMBLE)) as reader:
        points_conns = [c for c in reader.connections if c.topic == args.points_topic]
        if not points_conns:
            raise BagToolError(f"{src} has no topic {args.points_topic!r} (--points-topic); its "
                               "topics: " + ", ".join(sorted(reader.topics)))
        bad = [c.msgtype for c in points_conns if c.msgtype != "sensor_msgs/msg/PointCloud2"]
        if bad:
            raise BagToolError(f"--points-topic {args.points_topic} has type {bad[0]}, not "
                               "sensor_msgs/msg/PointCloud2")
        odom_ids = {c.id for c in reader.connections
                    if c.topic == args.odom_topic and c.msgtype == "nav_msgs/msg/Odometry"}
        n_clouds = sum(c.msgcount for c in points_conns)
        detector, device, backend = _build_detector(config, model)
        stride = detector.net.out_stride
        if vision_error:
            print(f"sparse-detector bag: {vision_error} ({TOPIC_OBJECTS} is not written)",
                  file=sys.stderr)
        with Writer(out, version=9, storage_plugin=plugin) as writer:
            copy = {}
            for conn in reader.connections:
                if conn.topic in OUTPUT_TYPES:
                    print(f"sparse-detector bag: input topic {conn.topic} is replaced by the "
                          "detector's output", file=sys.stderr)
                    continue
                kw = _connection_args(conn, ts_out)
                if kw is None:
                    print(f"sparse-detector bag: {conn.topic} ({conn.msgtype}) has no message "
                          "definition: not copied", file=sys.stderr)
                    continue
                try:
                    copy[conn.id] = writer.add_connection(conn.topic, conn.msgtype, **kw)
                except WriterError:  # the same topic, type and QoS twice: one connection
                    copy[conn.id] = next(c for c in writer.connections if c.topic == conn.topic
                                         and c.msgtype == conn.msgtype)
            outs = {t: writer.add_connection(t, msgtype, typestore=ts_out)
                    for t, msgtype in OUTPUT_TYPES.items()
                    if not (t == TOPIC_OBJECTS and vision_error)}
            odom = None
            bar = tqdm(total=n_clouds, unit="frame", desc="bag", disable=args.no_progress,
                       file=sys.stderr)
            for conn, t, raw in reader.messages():
                if conn.id in copy:
                    writer.write(copy[conn.id], t, raw)
                if conn.id in odom_ids:
                    try:
                        odom = odometry_pose(reader.deserialize(raw, conn.msgtype))
                    except Exception:  # a broken odometry message: keep the last good one
                        pass
                    continue
                if conn.topic != args.points_topic:
                    continue
                clouds += 1
                bar.update(1)
                timer = StageTimer(device)
                try:
                    try:
                        msg = reader.deserialize(raw, conn.msgtype)
                    except Exception as exc:
                        raise CloudError("deserialize", f"cannot deserialize: {exc}") from None
                    cloud_ns = header_stamp_ns(msg.header)
                    with timer("decode"):
                        points = mount.points_to_detection(decode_cloud(msg))
                        if len(points) == 0:
                            raise CloudError("empty", "point cloud has no valid points")
                except CloudError as exc:
                    skipped[exc.kind] = skipped.get(exc.kind, 0) + 1
                    continue
                pose = pose_for(odom, cloud_ns, timeout_s)
                no_pose += pose is None
                result = detector.detect(points, pose, timer)
                result.points_received = int(msg.width) * int(msg.height)
                frames += 1
                header = ros_header(msg.header)
                dets = result.detections
                if TOPIC_OBJECTS in outs:
                    writer.write(outs[TOPIC_OBJECTS], t, serialize_message(
                        ros_io.detections_msg(dets, classes, header, mount)))
                writer.write(outs[TOPIC_MARKERS], t, serialize_message(
                    ros_io.markers_msg(dets, classes, header, mount)))
                writer.write(outs[TOPIC_MASK], t, serialize_message(
                    ros_io.mask_msg(result.active, model.grid, stride, header, mount)))
                writer.write(outs[TOPIC_DIAGNOSTICS], t, serialize_message(
                    frame_diagnostics(result, header, classes, device=str(device),
                                      backend=backend)))
                for s, ms in result.stage_ms.items():
                    stage_ms.setdefault(s, []).append(ms)
                total_ms.append(sum(result.stage_ms.values()))
                active.append(result.active_fraction)
                for k in dets.labels.tolist():
                    detections[classes[k]] += 1
                bar.set_postfix(dets=len(dets), ms=f"{total_ms[-1]:.0f}", refresh=False)
            bar.close()
    return summarize(stage_ms, total_ms, detections, active, input=str(src), out=str(out),
                     storage=storage, clouds=clouds, frames=frames,
                     skipped=sum(skipped.values()), skipped_by_kind=skipped,
                     frames_without_pose=no_pose, objects=not vision_error, device=str(device),
                     backend=backend, model=model.name, trained=detector.trained)


def run(args) -> int:
    from rosbags.rosbag2 import ReaderError, WriterError

    from ..config import ConfigError

    try:
        summary = process_bag(args)
    except (BagToolError, ConfigError, FileNotFoundError, ReaderError, WriterError) as exc:
        print(f"sparse-detector bag: {exc}", file=sys.stderr)
        return 2
    if summary["skipped"]:
        print(f"sparse-detector bag: skipped {summary['skipped']} cloud(s) that could not be "
              f"decoded: {summary['skipped_by_kind']}", file=sys.stderr)
    print(json.dumps(summary), flush=True)
    return 0
