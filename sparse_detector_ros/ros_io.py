"""Conversions between the ROS-free core and ROS 2 messages (rclpy message types only; no node).
"""
from __future__ import annotations

import array
import copy
from collections.abc import Sequence

import numpy as np
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import Point, Pose, Quaternion, Vector3
from nav_msgs.msg import OccupancyGrid
from sensor_msgs.msg import PointCloud2, PointField
from std_msgs.msg import ColorRGBA, Header
from visualization_msgs.msg import Marker, MarkerArray

from .boxes import corners_3d
from .config import GridConfig
from .frames import MountTransform, yaw_quaternion
from .model.decode import Detections
from .pointcloud import CloudBuffer

DIAG_NAME = "sparse_detector: pipeline"


def cloud_to_msg(cloud: CloudBuffer, header: Header | None = None) -> PointCloud2:
    """:class:`pointcloud.CloudBuffer` -> sensor_msgs/PointCloud2 (one buffer copy)."""
    msg = PointCloud2()
    if header is not None:
        msg.header = header
    msg.height, msg.width = cloud.height, cloud.width
    msg.fields = [PointField(name=f.name, offset=f.offset, datatype=f.datatype, count=f.count)
                  for f in cloud.fields]
    msg.is_bigendian = cloud.is_bigendian
    msg.point_step, msg.row_step = cloud.point_step, cloud.row_step
    msg.data = bytes(cloud.data)
    msg.is_dense = cloud.is_dense
    return msg


def _fmt(value: float) -> str:
    return f"{value:.3f}"


def diagnostics_msg(snapshot: dict, *, device: str, stamp, hardware_id: str,
                    previous: dict | None = None, backend: str = "",
                    input_timeout_s: float | None = None,
                    latency_budget_ms: float | None = None,
                    faults: Sequence[str] = (), threads: int | None = None
                    ) -> DiagnosticArray:
    """``stats.FrameStats.snapshot()`` -> DiagnosticArray with one status, ``DIAG_NAME``.

    Level (worst first; the message joins every problem, worst first, with "; "):

    * ERROR when no cloud arrived for more than ``input_timeout_s`` (``node.input_timeout_s``;
      counted from start-up before the first cloud);
    * WARN for each of: a start-up fault in ``faults`` (e.g. the CuPy backend or the GPU
      missing: the torch backend or the CPU stands in); frames rejected since ``previous``
      (the snapshot of the last message); frames stamped too far from the node's clock since
      ``previous`` (``frames_clock_skew``: a clock problem, kept out of the latency statistics);
      the p99 latency over the stats window above ``latency_budget_ms``
      (``node.latency_budget_ms``); the last frame ran another mask than configured
      (``mask_fallback``, e.g. the map prior without a pose or without a readable map);
    * OK otherwise (message ``ok``).

    Keys: ``backend``, ``device``, ``threads`` (the network's CPU threads, when given),
    ``faults`` (the start-up faults joined with "; ", "" when
    none), the frame counters ``frames_received/processed/dropped/rejected``, ``frames_lost``
    (clouds sent but never taken: in the transport or overwritten in the subscription's queue;
    ``frames_lost_source`` says how they are counted, ``frames_lost_in_transport`` is the
    middleware's message-lost event, see ``stats``), ``frames_clock_skew`` and
    ``last_clock_skew_s``, ``<stage>_ms``/``<stage>_ms_max`` (mean and max since the last
    message), ``<stage>_ms_p50``/``<stage>_ms_p99`` (over the last ``node.stats_window``
    frames), the same for ``total_ms`` and ``latency_ms`` (the latency without the skewed
    frames), ``detections`` (last frame) and ``detections.<class>``, ``rejected.<kind>``.
    """
    problems: list[tuple[int, str]] = []
    since = float(snapshot.get("seconds_since_input", 0.0))
    if input_timeout_s is not None and since > input_timeout_s:
        what = ("no point cloud received" if snapshot.get("input_received", True)
                else "no point cloud received since start-up")
        problems.append((DiagnosticStatus.ERROR, f"{what} for {since:.1f} s "
                         f"(node.input_timeout_s = {input_timeout_s:g})"))
    problems += [(DiagnosticStatus.WARN, str(f)) for f in faults if f]
    prev = previous or {}
    rejected_now = snapshot["frames_rejected"] - prev.get("frames_rejected", 0)
    if rejected_now > 0:
        problems.append((DiagnosticStatus.WARN, f"{rejected_now} frame(s) rejected: "
                         f"{snapshot['last_rejection']}"))
    skewed_now = snapshot.get("frames_clock_skew", 0) - prev.get("frames_clock_skew", 0)
    if skewed_now > 0:
        problems.append((DiagnosticStatus.WARN, f"{skewed_now} frame(s) with a clock problem: "
                         f"{snapshot.get('last_clock_skew', '')}"))
    p99 = snapshot.get("latency_ms_pct", (0.0, 0.0))[1]
    frames_in_latency = snapshot.get("frames_in_latency", snapshot.get("frames_in_stats", 0))
    if latency_budget_ms is not None and frames_in_latency and p99 > latency_budget_ms:
        problems.append((DiagnosticStatus.WARN, f"latency p99 {p99:.1f} ms over "
                         f"{frames_in_latency} frames exceeds "
                         f"node.latency_budget_ms = {latency_budget_ms:g}"))
    if snapshot.get("mask_fallback"):
        problems.append((DiagnosticStatus.WARN, f"mask '{snapshot.get('mask_mode', '')}' ran "
                         f"instead of the configured one: {snapshot['mask_fallback']}"))
    if problems:
        level = max(lvl for lvl, _ in problems)
        message = "; ".join(text for _, text in sorted(problems, key=lambda p: p[0],
                                                        reverse=True))
    else:
        level, message = DiagnosticStatus.OK, "ok"
    values = [
        ("backend", backend),
        ("device", device),
        *((("threads", str(threads)),) if threads is not None else ()),
        ("faults", "; ".join(str(f) for f in faults if f)),
        ("frames_received", str(snapshot["frames_received"])),
        ("frames_processed", str(snapshot["frames_processed"])),
        ("frames_dropped", str(snapshot["frames_dropped"])),
        ("frames_rejected", str(snapshot["frames_rejected"])),
        ("frames_lost", str(snapshot.get("frames_lost", 0))),
        ("frames_lost_source", snapshot.get("frames_lost_source", "")),
        ("frames_lost_in_transport", str(snapshot.get("frames_lost_in_transport", 0))),
        ("frames_clock_skew", str(snapshot.get("frames_clock_skew", 0))),
        ("last_clock_skew_s", f"{snapshot.get('last_clock_skew_s', 0.0):.3f}"),
        ("last_rejection_reason", snapshot["last_rejection"]),
        ("points_received", str(snapshot["points_received"])),
        ("points_kept", str(snapshot["points_kept"])),
        ("frames_in_window", str(snapshot["frames_in_window"])),
        ("frames_in_stats", str(snapshot.get("frames_in_stats", 0))),
        ("seconds_since_input", f"{since:.1f}"),
    ]
    pct = snapshot.get("stage_ms_pct", {})
    for stage, (mean, peak) in snapshot["stage_ms"].items():
        p = pct.get(stage, (0.0, 0.0))
        values += [(f"{stage}_ms", _fmt(mean)), (f"{stage}_ms_max", _fmt(peak)),
                   (f"{stage}_ms_p50", _fmt(p[0])), (f"{stage}_ms_p99", _fmt(p[1]))]
    values += [("active_fraction", _fmt(snapshot["active_fraction"][0])),
               ("active_fraction_max", _fmt(snapshot["active_fraction"][1])),
               ("mask_mode", snapshot["mask_mode"]),
               ("mask_fallback", snapshot["mask_fallback"]),
               ("detections", str(snapshot["detections"]))]
    values += [(f"detections.{c}", str(n))
               for c, n in snapshot.get("detections_by_class", {}).items()]
    for key in ("total_ms", "latency_ms"):
        p = snapshot.get(f"{key}_pct", (0.0, 0.0))
        values += [(key, _fmt(snapshot[key][0])), (f"{key}_max", _fmt(snapshot[key][1])),
                   (f"{key}_p50", _fmt(p[0])), (f"{key}_p99", _fmt(p[1]))]
    for kind, count in sorted(snapshot["rejected_by_kind"].items()):
        values.append((f"rejected.{kind}", str(count)))
    status = DiagnosticStatus(level=level, name=DIAG_NAME, message=message,
                              hardware_id=hardware_id,
                              values=[KeyValue(key=k, value=v) for k, v in values])
    out = DiagnosticArray()
    if stamp is not None:
        out.header.stamp = stamp
    out.status = [status]
    return out


def diagnostics_to_dict(msg: DiagnosticArray, name: str = DIAG_NAME) -> dict[str, str] | None:
    """The key/values (plus ``level`` and ``message``) of status ``name``, or None."""
    for status in msg.status:
        if status.name == name:
            out = {kv.key: kv.value for kv in status.values}
            out["level"] = str(int.from_bytes(status.level, "little")
                               if isinstance(status.level, bytes) else int(status.level))
            out["message"] = status.message
            return out
    return None


# ----------------------------------------------------------------------------- detector outputs
# Detections, markers and the computation mask as messages, all in the cloud's frame with the
# cloud's header. vision_msgs is imported lazily (detections_msg, vision_msgs_error): without it
# the node still publishes markers and the mask.

#: RGBA per class: the values of the simulator's ground-truth markers (sim/export.CLASS_RGBA)
CLASS_RGBA: dict[str, tuple[float, float, float, float]] = {
    "car": (0.9, 0.2, 0.2, 0.5), "pedestrian": (0.2, 0.5, 0.95, 0.5),
    "cyclist": (0.2, 0.8, 0.3, 0.5)}
#: RGBA of any class not in CLASS_RGBA
OTHER_RGBA = (0.6, 0.6, 0.6, 0.5)
#: marker geometry [m]: box edge width, arrow shaft/head diameter, text height and lift above
#: the roof, arrow length beyond the front face
LINE_WIDTH, ARROW_SHAFT, ARROW_HEAD, TEXT_HEIGHT, TEXT_LIFT, ARROW_OVERHANG = (
    0.05, 0.1, 0.2, 0.5, 0.3, 0.5)
# corner pairs of the 12 box edges in corners_3d's order (0-3 floor, 4-7 roof)
_EDGES = tuple(i for edge in ((0, 1), (1, 2), (2, 3), (3, 0), (4, 5), (5, 6), (6, 7), (7, 4),
                              (0, 4), (1, 5), (2, 6), (3, 7)) for i in edge)


def vision_msgs_error() -> str | None:
    """None when ``vision_msgs`` (Detection3DArray...) imports, else one sentence saying that it
    is missing and that markers and the mask are still published."""
    try:
        from vision_msgs.msg import Detection3DArray  # noqa: F401
    except ImportError as exc:
        return (f"vision_msgs is not installed ({exc}): output/objects "
                f"(vision_msgs/Detection3DArray) is not published; output/markers and "
                f"output/mask still are")
    return None


def _header(header) -> Header:
    """A copy of ``header`` (an rclpy Header or any object with ``stamp.sec``,
    ``stamp.nanosec`` and ``frame_id``, e.g. a rosbags message's) as an rclpy Header."""
    return Header(stamp=Time(sec=int(header.stamp.sec), nanosec=int(header.stamp.nanosec)),
                  frame_id=str(header.frame_id))


def _checked_detections(dets: Detections, classes: Sequence[str]):
    """``dets`` as numpy ``(boxes (K, 7) float64, scores (K,) float64, labels (K,) int64)``;
    ValueError when a label has no class name."""
    boxes, scores, labels = dets.numpy()
    bad = labels[(labels < 0) | (labels >= len(classes))]
    if len(bad):
        raise ValueError(f"detection label(s) {sorted(set(bad.tolist()))} out of range for "
                         f"{len(classes)} classes {list(classes)}")
    return boxes.astype(np.float64), scores.astype(np.float64), labels


def _in_cloud(boxes: np.ndarray, mount: MountTransform | None):
    """Box centres (K, 3) and orientations (K, 4) x, y, z, w in the cloud frame."""
    if mount is None:
        return boxes[:, :3], yaw_quaternion(boxes[:, 6])
    return mount.boxes_to_cloud(boxes)


def _pose(position, quaternion) -> Pose:
    x, y, z = (float(v) for v in position)
    qx, qy, qz, qw = (float(v) for v in quaternion)
    return Pose(position=Point(x=x, y=y, z=z), orientation=Quaternion(x=qx, y=qy, z=qz, w=qw))


def detections_msg(dets: Detections, classes: Sequence[str], header,
                   mount: MountTransform | None = None):
    """:class:`model.decode.Detections` -> ``vision_msgs/Detection3DArray`` in the cloud frame.

    ``header`` (the cloud's) is copied to the array and to every Detection3D. Detection ``k``
    (in the order of ``dets``: by descending score) gets ``id = str(k)``, one result with
    ``hypothesis.class_id = classes[label]``, ``hypothesis.score`` and ``pose.pose`` equal to
    ``bbox.center``; ``bbox.center`` is the box centre and heading (the yaw quaternion, or
    ``R^T Rz(yaw)`` through ``mount``), ``bbox.size = (l, w, h)``. Raises ImportError when
    vision_msgs is missing (see :func:`vision_msgs_error`), ValueError for a label without a
    class name."""
    from vision_msgs.msg import (BoundingBox3D, Detection3D, Detection3DArray,
                                 ObjectHypothesisWithPose)

    boxes, scores, labels = _checked_detections(dets, classes)
    centres, quats = _in_cloud(boxes, mount)
    out = Detection3DArray(header=_header(header))
    items = []
    for k, (c, q, b, score, label) in enumerate(zip(centres.tolist(), quats.tolist(),
                                                    boxes.tolist(), scores.tolist(),
                                                    labels.tolist())):
        det = Detection3D(header=_header(header), id=str(k))
        det.bbox = BoundingBox3D(center=_pose(c, q), size=Vector3(x=b[3], y=b[4], z=b[5]))
        hyp = ObjectHypothesisWithPose()
        hyp.hypothesis.class_id = str(classes[label])
        hyp.hypothesis.score = score
        hyp.pose.pose = _pose(c, q)
        det.results = [hyp]
        items.append(det)
    out.detections = items
    return out


def class_rgba(name: str) -> tuple[float, float, float, float]:
    """The marker colour of class ``name``: :data:`CLASS_RGBA`, else :data:`OTHER_RGBA`."""
    return CLASS_RGBA.get(name, OTHER_RGBA)


def _marker_factory(header: Header):
    """``new(ns, id, type, **fields)`` -> an ADD Marker with ``header``: a shallow copy of one
    default Marker made here, with the given fields set. ``Marker()`` builds a default
    CompressedImage, MeshFile, ... every time (most of the cost of a marker: 300 of them took
    about 20 ms); the copies share those unused defaults (and ``header``) within one
    MarkerArray instead."""
    template = Marker(header=header, action=Marker.ADD)

    def new(ns: str, mid: int, mtype: int, **fields) -> Marker:
        m = copy.copy(template)
        m.ns, m.id, m.type = ns, mid, mtype
        m.points, m.colors, m.uv_coordinates = [], [], []
        for key, value in fields.items():
            setattr(m, key, value)
        return m
    return new


def markers_msg(dets: Detections, classes: Sequence[str], header,
                mount: MountTransform | None = None, ns: str = "sparse_detector") -> MarkerArray:
    """:class:`model.decode.Detections` -> ``visualization_msgs/MarkerArray`` for RViz.

    The first marker is a DELETEALL (the previous frame's markers disappear); then, for
    detection ``k``, three markers with ``id = k``, in the namespaces ``<ns>/box`` (LINE_LIST
    of the box's 12 edges, corner positions in the cloud frame), ``<ns>/heading`` (ARROW from
    the centre along the heading, past the front face) and ``<ns>/label``
    (TEXT_VIEW_FACING ``"car 0.87"`` above the roof), all in the class colour
    (:func:`class_rgba`). Every marker carries a copy of ``header`` (one copy shared by the
    markers of the array). Corners are computed for all boxes at once (``boxes.corners_3d``),
    then turned into one Point per corner (the LINE_LISTs share them)."""
    boxes, scores, labels = _checked_detections(dets, classes)
    hdr = _header(header)
    clear = Marker(header=hdr, ns=ns, id=0, action=Marker.DELETEALL)
    if len(boxes) == 0:
        return MarkerArray(markers=[clear])
    centres, quats = _in_cloud(boxes, mount)
    # (K, 8, 3) corners and (K, 3) text anchors in the detection frame -> cloud frame
    corners = corners_3d(boxes)
    anchors = boxes[:, :3] + np.stack([np.zeros(len(boxes)), np.zeros(len(boxes)),
                                       boxes[:, 5] / 2 + TEXT_LIFT], 1)
    if mount is not None and not mount.is_identity:
        corners = (corners - mount.translation) @ mount.rotation
        anchors = (anchors - mount.translation) @ mount.rotation
    # one Point per corner, each used by the three edges that meet there
    points = [Point(x=x, y=y, z=z) for x, y, z in corners.reshape(-1, 3).tolist()]
    new = _marker_factory(hdr)
    markers = [clear]
    for k, (c, q, a, b, score, label) in enumerate(zip(
            centres.tolist(), quats.tolist(), anchors.tolist(), boxes.tolist(), scores.tolist(),
            labels.tolist())):
        name = str(classes[label])
        r, g, bl, al = class_rgba(name)
        color = ColorRGBA(r=r, g=g, b=bl, a=al)
        markers.append(new(f"{ns}/box", k, Marker.LINE_LIST, scale=Vector3(x=LINE_WIDTH),
                           color=color, points=[points[8 * k + e] for e in _EDGES]))
        markers.append(new(f"{ns}/heading", k, Marker.ARROW, pose=_pose(c, q),
                           scale=Vector3(x=b[3] / 2 + ARROW_OVERHANG, y=ARROW_SHAFT,
                                         z=ARROW_HEAD), color=color))
        markers.append(new(f"{ns}/label", k, Marker.TEXT_VIEW_FACING,
                           pose=_pose(a, (0.0, 0.0, 0.0, 1.0)), scale=Vector3(z=TEXT_HEIGHT),
                           color=color, text=f"{name} {score:.2f}"))
    return MarkerArray(markers=markers)


def mask_msg(active, grid: GridConfig, stride: int, header,
             mount: MountTransform | None = None) -> OccupancyGrid:
    """The computation mask -> ``nav_msgs/OccupancyGrid`` (100 where the network computed, 0
    elsewhere).

    ``active``: (Ho, Wo) bool (torch tensor or numpy; nonzero = active) on the output grid of
    ``stride`` BEV cells, row = x index, col = y index (``bev.py``). The OccupancyGrid is
    row-major in y: ``width = Ho`` cells along x, ``height = Wo`` along y, cell (i, j) at
    ``data[j * Ho + i]``; ``resolution = grid.resolution * stride``; the origin, the corner
    ``(grid.x_min, grid.y_min, 0)`` of the detection frame with its axes, is given in the cloud
    frame (through ``mount``). ``header`` is copied; ``info.map_load_time = header.stamp``."""
    if not isinstance(stride, (int, np.integer)) or isinstance(stride, bool) or stride < 1:
        raise ValueError(f"stride must be an int >= 1, got {stride!r}")
    if hasattr(active, "detach"):
        active = active.detach().cpu().numpy()
    a = np.asarray(active)
    h, w = grid.shape
    allowed = ({h // stride, -(-h // stride)}, {w // stride, -(-w // stride)})
    if a.ndim != 2 or a.shape[0] not in allowed[0] or a.shape[1] not in allowed[1]:
        raise ValueError(f"active must have shape (Ho, Wo) = ({-(-h // stride)}, "
                         f"{-(-w // stride)}) (the {h} x {w} BEV grid at stride {stride}), got "
                         f"{a.shape}")
    hdr = _header(header)
    out = OccupancyGrid(header=hdr)
    out.info.map_load_time = hdr.stamp
    out.info.resolution = float(grid.resolution * stride)
    out.info.width, out.info.height = int(a.shape[0]), int(a.shape[1])
    origin = (float(grid.x_min), float(grid.y_min), 0.0)
    quat = (0.0, 0.0, 0.0, 1.0)
    if mount is not None:
        origin, quat = mount.pose_to_cloud(origin, quat)
    out.info.origin = _pose(origin, quat)
    cells = np.where(a.T != 0, np.int8(100), np.int8(0))            # (Wo, Ho): row = y index
    out.data = array.array("b", np.ascontiguousarray(cells).tobytes())
    return out
