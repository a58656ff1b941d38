"""Conversions between the ROS-free core and ROS 2 messages (rclpy message types only; no node).
"""
from __future__ import annotations

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from sensor_msgs.msg import PointCloud2, PointField
from std_msgs.msg import Header

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
                    previous: dict | None = None) -> DiagnosticArray:
    """``stats.FrameStats.snapshot()`` -> DiagnosticArray with one status, ``DIAG_NAME``.

    Level: OK while frames are processed; WARN when frames were rejected since ``previous``;
    STALE when no frame was processed since the last message.
    """
    rejected_now = snapshot["frames_rejected"] - (previous or {}).get("frames_rejected", 0)
    if rejected_now > 0:
        level, message = DiagnosticStatus.WARN, (
            f"{rejected_now} frame(s) rejected: {snapshot['last_rejection']}")
    elif snapshot["frames_in_window"] == 0:
        level, message = DiagnosticStatus.STALE, "no frame processed since the last report"
    else:
        level, message = DiagnosticStatus.OK, "ok"
    values = [
        ("device", device),
        ("frames_received", str(snapshot["frames_received"])),
        ("frames_processed", str(snapshot["frames_processed"])),
        ("frames_dropped", str(snapshot["frames_dropped"])),
        ("frames_rejected", str(snapshot["frames_rejected"])),
        ("last_rejection_reason", snapshot["last_rejection"]),
        ("points_received", str(snapshot["points_received"])),
        ("points_kept", str(snapshot["points_kept"])),
        ("frames_in_window", str(snapshot["frames_in_window"])),
    ]
    for stage, (mean, peak) in snapshot["stage_ms"].items():
        values += [(f"{stage}_ms", _fmt(mean)), (f"{stage}_ms_max", _fmt(peak))]
    values += [("active_fraction", _fmt(snapshot["active_fraction"][0])),
               ("active_fraction_max", _fmt(snapshot["active_fraction"][1])),
               ("mask_mode", snapshot["mask_mode"]),
               ("mask_fallback", snapshot["mask_fallback"]),
               ("detections", str(snapshot["detections"]))]
    values += [("total_ms", _fmt(snapshot["total_ms"][0])),
               ("total_ms_max", _fmt(snapshot["total_ms"][1])),
               ("latency_ms", _fmt(snapshot["latency_ms"][0])),
               ("latency_ms_max", _fmt(snapshot["latency_ms"][1]))]
    for kind, count in sorted(snapshot["rejected_by_kind"].items()):
        values.append((f"rejected.{kind}", str(count)))
    status = DiagnosticStatus(level=level, name=DIAG_NAME, message=message,
                              hardware_id=hardware_id,
                              values=[KeyValue(key=k, value=v) for k, v in values])
    out = DiagnosticArray()
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
