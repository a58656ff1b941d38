"""ros_io's detector outputs: Detection3DArray, MarkerArray, the mask as OccupancyGrid.

Every message is built from known boxes and checked field by field, then serialized with
rclpy's serializer (which refuses wrong field types)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from builtin_interfaces.msg import Time
from nav_msgs.msg import OccupancyGrid
from rclpy.serialization import deserialize_message, serialize_message
from std_msgs.msg import Header
from vision_msgs.msg import Detection3DArray
from visualization_msgs.msg import Marker, MarkerArray

from sparse_detector_ros import ros_io
from sparse_detector_ros.boxes import corners_3d
from sparse_detector_ros.config import GridConfig
from sparse_detector_ros.frames import MountTransform, quaternion_to_yaw
from sparse_detector_ros.model.decode import Detections
from sparse_detector_ros.ros_io import (detections_msg, markers_msg, mask_msg,
                                        vision_msgs_error)

CLASSES = ("car", "pedestrian", "cyclist")
BOXES = np.array([[10.0, -2.0, 0.8, 4.5, 1.9, 1.6, 0.3],
                  [5.0, 3.0, 0.9, 0.6, 0.7, 1.7, -1.0]], np.float32)
SCORES = np.array([0.9, 0.6], np.float32)
LABELS = np.array([0, 1], np.int64)


def dets(boxes=BOXES, scores=SCORES, labels=LABELS) -> Detections:
    return Detections(torch.as_tensor(boxes), torch.as_tensor(scores), torch.as_tensor(labels))


def header() -> Header:
    return Header(stamp=Time(sec=1_700_000_012, nanosec=345_000_000), frame_id="lidar")


def same_header(h, ref=None) -> bool:
    ref = ref or header()
    return (h.frame_id == ref.frame_id and h.stamp.sec == ref.stamp.sec
            and h.stamp.nanosec == ref.stamp.nanosec)


def round_trip(msg, cls):
    return deserialize_message(serialize_message(msg), cls)


def xyz(p) -> list[float]:
    return [p.x, p.y, p.z]


def xyzw(q) -> list[float]:
    return [q.x, q.y, q.z, q.w]


# ----------------------------------------------------------------------------- Detection3DArray

def test_vision_msgs_is_found():
    assert vision_msgs_error() is None


def test_detection_array_fields():
    msg = detections_msg(dets(), CLASSES, header())
    assert isinstance(msg, Detection3DArray)
    assert same_header(msg.header) and len(msg.detections) == 2
    assert [d.id for d in msg.detections] == ["0", "1"]
    for det, box, score, cls in zip(msg.detections, BOXES.astype(float), SCORES, ("car",
                                                                                  "pedestrian")):
        assert same_header(det.header)
        assert len(det.results) == 1
        hyp = det.results[0]
        assert hyp.hypothesis.class_id == cls
        assert hyp.hypothesis.score == pytest.approx(score)
        np.testing.assert_allclose(xyz(det.bbox.center.position), box[:3], atol=1e-6)
        np.testing.assert_allclose(xyz(det.bbox.size), box[3:6], atol=1e-6)
        assert quaternion_to_yaw(*xyzw(det.bbox.center.orientation)) == pytest.approx(
            box[6], abs=1e-6)
        assert det.bbox.center.orientation.x == det.bbox.center.orientation.y == 0.0
        assert xyz(hyp.pose.pose.position) == xyz(det.bbox.center.position)
        assert xyzw(hyp.pose.pose.orientation) == xyzw(det.bbox.center.orientation)
    back = round_trip(msg, Detection3DArray)
    assert back.detections[1].results[0].hypothesis.class_id == "pedestrian"
    assert back.detections[0].bbox.size.x == pytest.approx(4.5)


def test_header_is_copied_and_may_come_from_rosbags():
    h = header()
    msg = detections_msg(dets(), CLASSES, h)
    h.frame_id = "changed later"
    assert msg.header.frame_id == "lidar" and msg.detections[0].header.frame_id == "lidar"
    # a rosbags message (or anything with stamp.sec/nanosec and frame_id) is accepted too
    bag_header = SimpleNamespace(stamp=SimpleNamespace(sec=3, nanosec=4), frame_id="velodyne")
    msg = detections_msg(dets(), CLASSES, bag_header)
    assert msg.header.frame_id == "velodyne" and msg.detections[1].header.stamp.nanosec == 4
    serialize_message(msg)


def test_empty_detections_and_bad_labels():
    empty = Detections.empty(torch.device("cpu"))
    msg = detections_msg(empty, CLASSES, header())
    assert msg.detections == [] and same_header(msg.header)
    serialize_message(msg)
    with pytest.raises(ValueError, match=r"label\(s\) \[3\] out of range for 3 classes"):
        detections_msg(dets(labels=np.array([0, 3])), CLASSES, header())


# ----------------------------------------------------------------------------- MarkerArray

def by_ns(msg: MarkerArray) -> dict[str, list[Marker]]:
    out: dict[str, list[Marker]] = {}
    for m in msg.markers[1:]:
        out.setdefault(m.ns, []).append(m)
    return out


def rgba(m: Marker) -> tuple[float, ...]:
    return (m.color.r, m.color.g, m.color.b, m.color.a)


def test_markers_delete_all_then_box_arrow_text_per_detection():
    msg = markers_msg(dets(), CLASSES, header())
    first = msg.markers[0]
    assert first.action == Marker.DELETEALL
    assert len(msg.markers) == 1 + 3 * 2
    assert all(same_header(m.header) for m in msg.markers)
    groups = by_ns(msg)
    assert set(groups) == {"sparse_detector/box", "sparse_detector/heading",
                           "sparse_detector/label"}
    for ms in groups.values():
        assert [m.id for m in ms] == [0, 1]                      # unique within a namespace
        assert all(m.action == Marker.ADD for m in ms)
    boxes = groups["sparse_detector/box"]
    corners = corners_3d(BOXES.astype(float))
    for m, c in zip(boxes, corners):
        assert m.type == Marker.LINE_LIST and len(m.points) == 24
        ends = np.array([xyz(p) for p in m.points])
        # every corner is the end of exactly three edges, and every edge has length l, w or h
        d = np.linalg.norm(ends[:, None] - c[None], axis=-1)
        assert (d.min(1) < 1e-5).all()
        np.testing.assert_array_equal(np.bincount(d.argmin(1), minlength=8), 3)
    edge = np.linalg.norm(ends[0::2] - ends[1::2], axis=1)
    np.testing.assert_allclose(np.sort(edge), np.sort(np.repeat(BOXES[1, 3:6], 4)), atol=1e-5)
    for m, box in zip(groups["sparse_detector/heading"], BOXES.astype(float)):
        assert m.type == Marker.ARROW
        np.testing.assert_allclose(xyz(m.pose.position), box[:3], atol=1e-6)
        assert quaternion_to_yaw(*xyzw(m.pose.orientation)) == pytest.approx(box[6], abs=1e-6)
        assert m.scale.x > box[3] / 2                             # reaches past the front face
    texts = groups["sparse_detector/label"]
    assert [m.type for m in texts] == [Marker.TEXT_VIEW_FACING] * 2
    assert [m.text for m in texts] == ["car 0.90", "pedestrian 0.60"]
    for m, box in zip(texts, BOXES.astype(float)):
        assert m.pose.position.z > box[2] + box[5] / 2            # above the roof
    assert len(round_trip(msg, MarkerArray).markers) == 7


def test_marker_colours_by_class():
    boxes = np.repeat(BOXES[:1], 4, 0)
    msg = markers_msg(dets(boxes, np.full(4, 0.5, np.float32), np.arange(4)),
                      ("car", "pedestrian", "cyclist", "truck"), header())
    from sparse_detector_ros.sim.export import CLASS_RGBA as SIM_RGBA

    for ns, ms in by_ns(msg).items():
        got = [rgba(m) for m in ms]
        want = [SIM_RGBA["car"], SIM_RGBA["pedestrian"], SIM_RGBA["cyclist"], ros_io.OTHER_RGBA]
        np.testing.assert_allclose(got, want, atol=1e-6, err_msg=ns)
    car, ped, cyc, other = want
    assert car[0] > max(car[1:3]) and ped[2] > max(ped[:2]) and cyc[1] > max(cyc[0], cyc[2])
    assert other[0] == other[1] == other[2]                       # grey


def test_empty_detections_give_only_delete_all():
    msg = markers_msg(Detections.empty(torch.device("cpu")), CLASSES, header(), ns="x")
    assert len(msg.markers) == 1 and msg.markers[0].action == Marker.DELETEALL
    assert same_header(msg.markers[0].header)
    serialize_message(msg)


def test_markers_of_many_detections_serialize():
    rng = np.random.default_rng(0)
    k = 100
    boxes = np.concatenate([rng.uniform(-40, 40, (k, 3)), rng.uniform(0.5, 5, (k, 3)),
                            rng.uniform(-3, 3, (k, 1))], 1).astype(np.float32)
    msg = markers_msg(dets(boxes, rng.uniform(0, 1, k).astype(np.float32),
                           rng.integers(0, 3, k)), CLASSES, header(),
                      MountTransform(translation=(0, 0, 1.7), rpy=(0.02, -0.05, 0.1)))
    assert len(msg.markers) == 1 + 3 * k
    for ms in by_ns(msg).values():
        assert sorted(m.id for m in ms) == list(range(k))
    assert len(round_trip(msg, MarkerArray).markers) == 1 + 3 * k


# ----------------------------------------------------------------------------- mask

GRID = GridConfig.from_flat({"grid.x_min": -20.0, "grid.x_max": 60.0, "grid.y_min": -30.0,
                             "grid.y_max": 30.0, "grid.resolution": 0.5})      # 160 x 120 cells
STRIDE = 2                                                                   # 80 x 60 output


def one_cell(row: int, col: int, as_tensor: bool):
    a = np.zeros((80, 60), bool)
    a[row, col] = True
    return torch.from_numpy(a) if as_tensor else a


def cell_centre(row: int, col: int) -> np.ndarray:
    """Centre of output cell (row, col) in the detection frame (bev.py's rule at the stride)."""
    cell = GRID.resolution * STRIDE
    return np.array([GRID.x_min + (row + 0.5) * cell, GRID.y_min + (col + 0.5) * cell, 0.0])


@pytest.mark.parametrize("as_tensor", [False, True])
def test_mask_layout_single_cell(as_tensor):
    row, col = 17, 41
    msg = mask_msg(one_cell(row, col, as_tensor), GRID, STRIDE, header())
    info = msg.info
    assert same_header(msg.header)
    assert (info.map_load_time.sec, info.map_load_time.nanosec) == (1_700_000_012, 345_000_000)
    assert (info.width, info.height) == (80, 60)                  # width along x, height along y
    assert info.resolution == pytest.approx(1.0)
    assert xyz(info.origin.position) == [-20.0, -30.0, 0.0]
    assert xyzw(info.origin.orientation) == [0.0, 0.0, 0.0, 1.0]
    data = np.array(msg.data)
    assert len(data) == 80 * 60 and set(data.tolist()) == {0, 100} and (data == 100).sum() == 1
    # the cell's centre, looked up the way a map user does: (x - origin.x) / res, ...
    x, y, _ = cell_centre(row, col)
    gx = int((x - info.origin.position.x) / info.resolution)
    gy = int((y - info.origin.position.y) / info.resolution)
    assert data[gy * info.width + gx] == 100
    back = round_trip(msg, OccupancyGrid)
    assert (back.info.width, back.info.height) == (80, 60) and back.data[gy * 80 + gx] == 100


def test_mask_of_a_full_grid_and_ceil_shapes():
    msg = mask_msg(np.ones((80, 60), bool), GRID, STRIDE, header())
    assert set(msg.data) == {100}
    # a stride that does not divide the grid: the output grid rounds up (or down)
    for shape in ((54, 40), (53, 40)):
        assert mask_msg(np.zeros(shape, bool), GRID, 3, header()).info.width == shape[0]


def test_mask_rejects_a_wrong_shape_or_stride():
    with pytest.raises(ValueError, match=r"active must have shape \(Ho, Wo\) = \(80, 60\)"):
        mask_msg(np.zeros((60, 80), bool), GRID, STRIDE, header())
    with pytest.raises(ValueError, match="stride"):
        mask_msg(np.zeros((80, 60), bool), GRID, 0, header())


# ----------------------------------------------------------------------------- mount

YAW90 = MountTransform(rpy=(0.0, 0.0, math.pi / 2))     # the cloud's x axis is the detection's y


def test_yaw_mount_rotates_box_centres_into_the_cloud_frame():
    box = np.array([[0.0, 5.0, 1.0, 4.0, 2.0, 1.5, math.pi / 2]], np.float32)
    d = dets(box, np.array([0.8], np.float32), np.array([2]))
    det = detections_msg(d, CLASSES, header(), YAW90).detections[0]
    np.testing.assert_allclose(xyz(det.bbox.center.position), [5.0, 0.0, 1.0], atol=1e-6)
    assert quaternion_to_yaw(*xyzw(det.bbox.center.orientation)) == pytest.approx(0, abs=1e-6)
    np.testing.assert_allclose(xyz(det.bbox.size), [4.0, 2.0, 1.5])
    groups = by_ns(markers_msg(d, CLASSES, header(), YAW90))
    np.testing.assert_allclose(xyz(groups["sparse_detector/heading"][0].pose.position),
                               [5.0, 0.0, 1.0], atol=1e-6)
    ends = np.array([xyz(p) for p in groups["sparse_detector/box"][0].points])
    # the box (length 4 along the detection frame's y) is 4 m long along the cloud's x
    np.testing.assert_allclose(ends.min(0), [3.0, -1.0, 0.25], atol=1e-6)
    np.testing.assert_allclose(ends.max(0), [7.0, 1.0, 1.75], atol=1e-6)


def test_yaw_mount_rotates_the_mask_origin_and_its_cells():
    row, col = 17, 41
    msg = mask_msg(one_cell(row, col, False), GRID, STRIDE, header(), YAW90)
    o = msg.info.origin
    # detection (x_min, y_min) = (-20, -30) is the cloud's (y_min, -x_min) = (-30, 20)
    np.testing.assert_allclose(xyz(o.position), [-30.0, 20.0, 0.0], atol=1e-9)
    assert quaternion_to_yaw(*xyzw(o.orientation)) == pytest.approx(-math.pi / 2)
    # the active cell, placed through the map's pose, is where its centre is in the cloud frame
    data = np.array(msg.data)
    gy, gx = divmod(int(np.flatnonzero(data == 100)[0]), msg.info.width)
    yaw = quaternion_to_yaw(*xyzw(o.orientation))
    local = (np.array([gx, gy]) + 0.5) * msg.info.resolution
    c, s = math.cos(yaw), math.sin(yaw)
    at = np.array([o.position.x + c * local[0] - s * local[1],
                   o.position.y + s * local[0] + c * local[1]])
    want = YAW90.rotation.T @ (cell_centre(row, col) - YAW90.translation)
    np.testing.assert_allclose(at, want[:2], atol=1e-9)
    serialize_message(msg)
