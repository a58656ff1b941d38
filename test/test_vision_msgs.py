"""The vision_msgs interface package built from interfaces/vision_msgs by
scripts/build_vision_msgs.sh (run by scripts/setup.sh): its types import in the venv's Python,
(de)serialize in rclpy, travel over DDS between two contexts, and their CDR bytes agree with
``rosbags`` taught the same .msg files (sparse_detector_ros.tools.vision_types)."""
from __future__ import annotations

import time

import numpy as np
import pytest
from rosbags.typesys import Stores, TypesysError, get_typestore, get_types_from_msg

from sparse_detector_ros.tools import vision_types

TYPE = "vision_msgs/msg/Detection3DArray"
# Upstream ROS 2 vision_msgs: field names, types and order (the order fixes the CDR layout).
EXPECTED_FIELDS = {
    "ObjectHypothesis": [("class_id", "string"), ("score", "double")],
    "ObjectHypothesisWithPose": [("hypothesis", "vision_msgs/ObjectHypothesis"),
                                 ("pose", "geometry_msgs/PoseWithCovariance")],
    "BoundingBox3D": [("center", "geometry_msgs/Pose"), ("size", "geometry_msgs/Vector3")],
    "Detection3D": [("header", "std_msgs/Header"),
                    ("results", "sequence<vision_msgs/ObjectHypothesisWithPose>"),
                    ("bbox", "vision_msgs/BoundingBox3D"), ("id", "string")],
    "Detection3DArray": [("header", "std_msgs/Header"),
                         ("detections", "sequence<vision_msgs/Detection3D>")],
}


def vision_msg():
    """The ``vision_msgs.msg`` module, or a failure saying how to build it."""
    try:
        import vision_msgs.msg
    except ImportError as exc:  # pragma: no cover - only without the set-up
        pytest.fail(f"vision_msgs does not import ({exc}): run bash scripts/build_vision_msgs.sh")
    return vision_msgs.msg


def make_array():
    """A Detection3DArray with two detections, every field set to a distinct value."""
    m = vision_msg()
    arr = m.Detection3DArray()
    arr.header.stamp.sec, arr.header.stamp.nanosec = 1_700_000_123, 456_789
    arr.header.frame_id = "lidar"
    for i, (cls, score) in enumerate([("car", 0.87), ("pedestrian", 0.5)]):
        det = m.Detection3D()
        det.header = arr.header
        det.id = str(i)
        hyp = m.ObjectHypothesisWithPose()
        hyp.hypothesis.class_id, hyp.hypothesis.score = cls, score
        hyp.pose.pose.position.x, hyp.pose.pose.position.y = 10.0 + i, -3.5 * i
        hyp.pose.pose.orientation.z, hyp.pose.pose.orientation.w = 0.6, 0.8
        hyp.pose.covariance = np.arange(36, dtype=np.float64) + i
        det.results.append(hyp)
        det.bbox.center = hyp.pose.pose
        det.bbox.size.x, det.bbox.size.y, det.bbox.size.z = 4.5 - i, 1.9, 1.6 + 0.1 * i
        arr.detections.append(det)
    return arr


def summary(arr):
    """Plain-Python view of a Detection3DArray (rclpy or rosbags message) for comparison."""
    def pose(p):
        return (p.position.x, p.position.y, p.position.z, p.orientation.x, p.orientation.y,
                p.orientation.z, p.orientation.w)
    return (arr.header.stamp.sec, arr.header.stamp.nanosec, arr.header.frame_id,
            [(d.header.stamp.sec, d.header.frame_id, d.id,
              [(r.hypothesis.class_id, r.hypothesis.score, pose(r.pose.pose),
                list(np.asarray(r.pose.covariance, np.float64))) for r in d.results],
              pose(d.bbox.center), (d.bbox.size.x, d.bbox.size.y, d.bbox.size.z))
             for d in arr.detections])


def kilted_store():
    ts = get_typestore(Stores.ROS2_KILTED)
    vision_types.register_vision_msgs(ts)
    return ts


def test_the_five_messages_import_with_the_upstream_fields():
    m = vision_msg()
    for name, fields in EXPECTED_FIELDS.items():
        cls = getattr(m, name)
        assert list(cls.get_fields_and_field_types().items()) == fields, name
        cls.__class__.__import_type_support__()
        assert cls._TYPE_SUPPORT is not None, f"{name}: type support library did not load"


def test_installed_package_matches_the_msg_files():
    """A stale build (the .msg files changed, setup not re-run) shows up here."""
    m = vision_msg()
    ts = kilted_store()
    for name in vision_types.MESSAGES:
        _, fields = ts.fielddefs[f"vision_msgs/msg/{name}"]
        assert [f[0] for f in fields] == list(getattr(m, name).get_fields_and_field_types()), name


def test_detection_array_round_trips_through_rclpy_serialization():
    from rclpy.serialization import deserialize_message, serialize_message
    arr = make_array()
    back = deserialize_message(serialize_message(arr), type(arr))
    assert summary(back) == summary(arr)
    assert back == arr


@pytest.mark.ros
def test_detection_array_travels_over_dds_between_two_contexts():
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy

    m = vision_msg()
    qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
    ctx_pub, ctx_sub = rclpy.Context(), rclpy.Context()
    rclpy.init(context=ctx_pub)
    rclpy.init(context=ctx_sub)
    try:
        pub_node = rclpy.create_node("vision_msgs_test_pub", context=ctx_pub)
        sub_node = rclpy.create_node("vision_msgs_test_sub", context=ctx_sub)
        got = []
        sub_node.create_subscription(m.Detection3DArray, "test_vision_msgs/objects",
                                     got.append, qos)
        pub = pub_node.create_publisher(m.Detection3DArray, "test_vision_msgs/objects", qos)
        executor = SingleThreadedExecutor(context=ctx_sub)
        executor.add_node(sub_node)
        deadline = time.monotonic() + 30
        while pub.get_subscription_count() == 0 and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.05)
        assert pub.get_subscription_count() == 1, "the subscription was never discovered"
        sent = make_array()
        pub.publish(sent)
        while not got and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.05)
        assert len(got) == 1, "nothing received over DDS"
        assert summary(got[0]) == summary(sent)
        executor.shutdown()
        pub_node.destroy_node()
        sub_node.destroy_node()
    finally:
        rclpy.shutdown(context=ctx_pub)
        rclpy.shutdown(context=ctx_sub)


def test_rclpy_cdr_bytes_deserialize_with_rosbags_and_back():
    from rclpy.serialization import deserialize_message, serialize_message
    arr = make_array()
    raw = serialize_message(arr)
    ts = kilted_store()
    bag_msg = ts.deserialize_cdr(raw, TYPE)
    assert summary(bag_msg) == summary(arr)
    # and the other way: what a bag writer (rosbags) produces, rclpy reads. Same layout, so the
    # same length (the bytes themselves may differ: Fast CDR leaves alignment padding unset).
    written = bytes(ts.serialize_cdr(bag_msg, TYPE))
    assert len(written) == len(raw)
    assert deserialize_message(written, type(arr)) == arr


def test_register_vision_msgs_is_idempotent_and_refuses_a_different_definition():
    ts = get_typestore(Stores.ROS2_KILTED)
    names = vision_types.register_vision_msgs(ts)
    assert sorted(names) == sorted(f"vision_msgs/msg/{n}" for n in vision_types.MESSAGES)
    vision_types.register_vision_msgs(ts)  # same definitions again: fine
    other = get_typestore(Stores.ROS2_KILTED)
    other.register(get_types_from_msg("string class_id\nfloat32 score\n",
                                      "vision_msgs/msg/ObjectHypothesis"))
    with pytest.raises(TypesysError, match="ObjectHypothesis"):
        vision_types.register_vision_msgs(other)


def test_msg_files_are_found_in_the_checkout_and_a_missing_one_is_named(tmp_path):
    assert (vision_types.msg_dir() / "Detection3DArray.msg").is_file()
    (tmp_path / "ObjectHypothesis.msg").write_text("string class_id\nfloat64 score\n")
    with pytest.raises(FileNotFoundError, match="ObjectHypothesisWithPose.msg"):
        vision_types.vision_msgs_definitions(tmp_path)
