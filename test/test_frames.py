"""frames.py: rotations (hand-worked cases, REP-103 signs) and the mount transform."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_detector_ros.boxes import points_in_boxes
from sparse_detector_ros.frames import (MountTransform, matrix_to_quaternion,
                                        quaternion_to_matrix, quaternion_to_yaw, rpy_to_matrix,
                                        yaw_quaternion)

angle = st.floats(-math.pi, math.pi, allow_nan=False)
coord = st.floats(-50.0, 50.0, allow_nan=False)
S2 = math.sqrt(0.5)


def rotate(q, v):
    """v rotated by the quaternion q (x, y, z, w), by the Hamilton product q v q*."""
    x, y, z, w = q
    u = np.array([x, y, z])
    v = np.asarray(v, float)
    return v + 2 * np.cross(u, np.cross(u, v) + w * v)


# ----------------------------------------------------------------------------- rotations

def test_yaw_90_turns_x_into_y():
    R = rpy_to_matrix(0.0, 0.0, math.pi / 2)
    np.testing.assert_allclose(R @ [1, 0, 0], [0, 1, 0], atol=1e-12)
    np.testing.assert_allclose(R @ [0, 1, 0], [-1, 0, 0], atol=1e-12)
    np.testing.assert_allclose(matrix_to_quaternion(R), [0, 0, S2, S2], atol=1e-12)
    np.testing.assert_allclose(yaw_quaternion(math.pi / 2), [0, 0, S2, S2], atol=1e-12)


def test_positive_pitch_points_x_down_rep103():
    # REP-103: pitch is about +y (y left), so a positive pitch turns +x towards -z (nose down)
    R = rpy_to_matrix(0.0, math.radians(30), 0.0)
    np.testing.assert_allclose(R @ [1, 0, 0], [math.cos(math.radians(30)), 0,
                                               -math.sin(math.radians(30))], atol=1e-12)


def test_positive_roll_turns_y_up():
    R = rpy_to_matrix(math.pi / 2, 0.0, 0.0)
    np.testing.assert_allclose(R @ [0, 1, 0], [0, 0, 1], atol=1e-12)


def test_rpy_order_is_fixed_axes_roll_then_pitch_then_yaw():
    # roll 90 then yaw 90 (fixed axes): y -> z (roll) -> z (yaw keeps z); x -> x -> y
    R = rpy_to_matrix(math.pi / 2, 0.0, math.pi / 2)
    np.testing.assert_allclose(R @ [0, 1, 0], [0, 0, 1], atol=1e-12)
    np.testing.assert_allclose(R @ [1, 0, 0], [0, 1, 0], atol=1e-12)
    # the quaternion of the same rotation: q_yaw * q_roll
    np.testing.assert_allclose(matrix_to_quaternion(R), [0.5, 0.5, 0.5, 0.5], atol=1e-12)


@pytest.mark.parametrize("axis", [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, -1, 0), (0, 1, -1)])
def test_half_turns_keep_the_axis_sign(axis):
    # w = 0: the branch where a trace-only formula loses the relative signs of x, y, z
    a = np.array(axis, float) / np.linalg.norm(axis)
    R = 2 * np.outer(a, a) - np.eye(3)
    q = matrix_to_quaternion(R)
    assert abs(q[3]) < 1e-12
    assert abs(abs(q[:3] @ a) - 1) < 1e-12
    np.testing.assert_allclose(quaternion_to_matrix(q), R, atol=1e-12)


@settings(max_examples=200, deadline=None)
@given(angle, st.floats(-1.5, 1.5), angle)
def test_rpy_matrix_quaternion_consistency(roll, pitch, yaw):
    R = rpy_to_matrix(roll, pitch, yaw)
    np.testing.assert_allclose(R.T @ R, np.eye(3), atol=1e-12)
    assert np.linalg.det(R) == pytest.approx(1.0)
    q = matrix_to_quaternion(R)
    assert np.linalg.norm(q) == pytest.approx(1.0) and q[3] >= 0
    np.testing.assert_allclose(quaternion_to_matrix(q), R, atol=1e-12)
    for v in np.eye(3):
        np.testing.assert_allclose(rotate(q, v), R @ v, atol=1e-12)
    # the yaw of the quaternion is the yaw of the decomposition (|pitch| < 90 degrees)
    assert math.remainder(quaternion_to_yaw(*q) - yaw, 2 * math.pi) == pytest.approx(0, abs=1e-9)


def test_matrix_to_quaternion_is_vectorised():
    Rs = np.stack([rpy_to_matrix(0.1 * k, -0.05 * k, 0.3 * k) for k in range(6)]).reshape(
        2, 3, 3, 3)
    q = matrix_to_quaternion(Rs)
    assert q.shape == (2, 3, 4)
    np.testing.assert_allclose(q[1, 2], matrix_to_quaternion(Rs[1, 2]))


@settings(max_examples=100, deadline=None)
@given(st.floats(-20.0, 20.0, allow_nan=False))
def test_yaw_quaternion_round_trip(yaw):
    q = yaw_quaternion(yaw)
    assert q[3] >= 0
    assert math.remainder(quaternion_to_yaw(*q) - yaw, 2 * math.pi) == pytest.approx(0, abs=1e-9)
    np.testing.assert_allclose(quaternion_to_matrix(q), rpy_to_matrix(0, 0, yaw), atol=1e-12)


def test_quaternion_to_yaw_ignores_scale():
    assert quaternion_to_yaw(0, 0, 3 * S2, 3 * S2) == pytest.approx(math.pi / 2)


def test_bad_rotations_are_refused():
    with pytest.raises(ValueError, match="not a rotation"):
        matrix_to_quaternion(np.diag([1.0, 1.0, -1.0]))          # a reflection
    with pytest.raises(ValueError, match=r"\(\.\.\., 3, 3\)"):
        matrix_to_quaternion(np.eye(4))
    with pytest.raises(ValueError, match="non-zero"):
        quaternion_to_yaw(0, 0, 0, 0)
    with pytest.raises(ValueError, match="finite"):
        rpy_to_matrix(0.0, float("nan"), 0.0)


# ----------------------------------------------------------------------------- MountTransform

def test_identity_returns_the_same_array():
    m = MountTransform()
    assert m.is_identity
    pts = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
    assert m.points_to_detection(pts) is pts


def test_points_to_detection_keeps_extra_columns_and_makes_a_copy():
    m = MountTransform(translation=(1.0, 2.0, 3.0), rpy=(0.0, 0.0, math.pi / 2))
    assert not m.is_identity
    pts = np.array([[1.0, 0.0, 0.0, 42.0, 7.0]], np.float32)
    out = m.points_to_detection(pts)
    assert out.dtype == np.float32 and out.shape == pts.shape and out is not pts
    np.testing.assert_allclose(out[0], [1.0, 3.0, 3.0, 42.0, 7.0], atol=1e-6)
    np.testing.assert_array_equal(pts[0], [1.0, 0.0, 0.0, 42.0, 7.0])          # input untouched


def test_read_only_points_are_accepted():
    pts = np.ones((3, 4), np.float32)
    pts.setflags(write=False)
    out = MountTransform(translation=(0, 0, 1)).points_to_detection(pts)
    np.testing.assert_allclose(out[:, 2], 2.0)


@settings(max_examples=100, deadline=None)
@given(st.tuples(coord, coord, st.floats(-3, 3)), st.tuples(st.floats(-0.5, 0.5),
       st.floats(-0.5, 0.5), angle), st.tuples(coord, coord, st.floats(-2, 2)), angle)
def test_box_centre_round_trip(t, rpy, centre, yaw):
    """A point at a box centre in the cloud frame, moved to the detection frame, boxed there and
    moved back, lands on the centre boxes_to_cloud returns; the orientation is R^T Rz(yaw)."""
    m = MountTransform(translation=t, rpy=rpy)
    p_cloud = np.array([centre], np.float64)
    p_det = (m.rotation @ p_cloud[0]) + m.translation
    np.testing.assert_allclose(m.points_to_detection(p_cloud.astype(np.float32))[0], p_det,
                               atol=1e-3)
    box = np.array([[*p_det, 4.0, 2.0, 1.5, yaw]])
    centres, quats = m.boxes_to_cloud(box)
    assert centres.shape == (1, 3) and quats.shape == (1, 4)
    np.testing.assert_allclose(centres[0], p_cloud[0], atol=1e-9)
    np.testing.assert_allclose(quaternion_to_matrix(quats[0]),
                               m.rotation.T @ rpy_to_matrix(0, 0, yaw), atol=1e-9)
    # the same pose through pose_to_cloud
    pos, q = m.pose_to_cloud(p_det, yaw_quaternion(yaw))
    np.testing.assert_allclose(pos, p_cloud[0], atol=1e-9)
    np.testing.assert_allclose(q, quats[0], atol=1e-9)


def test_points_inside_a_box_stay_inside_after_the_round_trip():
    m = MountTransform(translation=(0.5, -1.0, 1.8), rpy=(0.05, -0.1, 0.7))
    rng = np.random.default_rng(1)
    cloud = rng.uniform(-5, 5, size=(4000, 4)).astype(np.float32)
    det = m.points_to_detection(cloud)
    box = np.array([[2.0, 1.0, 0.5, 6.0, 4.0, 3.0, 0.4]])
    inside = points_in_boxes(det, box)[0]
    assert 100 < inside.sum() < 3900
    # the same box, placed in the cloud frame (centre and rotation), contains the same points
    centre, q = m.boxes_to_cloud(box)
    local = (cloud[:, :3] - centre[0]) @ quaternion_to_matrix(q[0])
    inside_cloud = (np.abs(local) <= np.array([3.0, 2.0, 1.5]) + 1e-4).all(1)
    np.testing.assert_array_equal(inside_cloud, inside)


def test_tilted_mount_rotates_the_heading_by_r_transpose():
    # the sensor is pitched 10 degrees nose-down in the detection frame: its frame is R
    pitch = math.radians(10)
    m = MountTransform(rpy=(0.0, pitch, 0.0))
    yaw = math.radians(30)
    _, q = m.boxes_to_cloud(np.array([[10.0, 0.0, 0.0, 4.0, 2.0, 1.5, yaw]]))
    heading_det = np.array([math.cos(yaw), math.sin(yaw), 0.0])
    np.testing.assert_allclose(rotate(q[0], [1, 0, 0]), m.rotation.T @ heading_det, atol=1e-12)
    # seen from a nose-down sensor a level heading points up: z > 0 in the cloud frame
    assert rotate(q[0], [1, 0, 0])[2] > 0.05
    assert q[0][3] >= 0


def test_yaw_mount_rotates_box_centres_and_headings():
    m = MountTransform(rpy=(0.0, 0.0, math.pi / 2))     # the cloud's x is the detection's y
    centres, q = m.boxes_to_cloud(np.array([[0.0, 5.0, 1.0, 4.0, 2.0, 1.5, math.pi / 2]]))
    np.testing.assert_allclose(centres[0], [5.0, 0.0, 1.0], atol=1e-12)
    assert quaternion_to_yaw(*q[0]) == pytest.approx(0.0, abs=1e-12)


def test_from_matrix_and_bad_input():
    R = rpy_to_matrix(0.1, 0.2, 0.3)
    m = MountTransform.from_matrix(R, [1, 2, 3])
    np.testing.assert_allclose(m.rotation, R)
    np.testing.assert_allclose(m.translation, [1, 2, 3])
    assert MountTransform.from_matrix(np.eye(3), [0, 0, 0]).is_identity
    with pytest.raises(ValueError, match="rotation"):
        MountTransform.from_matrix(2 * np.eye(3), [0, 0, 0])
    with pytest.raises(ValueError, match="translation"):
        MountTransform(translation=(0.0, 1.0))
    with pytest.raises(ValueError, match="rpy"):
        MountTransform(rpy=(0.0, float("inf"), 0.0))
    with pytest.raises(ValueError, match=r"points .*\(N, >=3\)"):
        MountTransform(translation=(1, 0, 0)).points_to_detection(np.zeros((4, 2), np.float32))
    with pytest.raises(ValueError, match=r"boxes .*\(K, 7\)"):
        MountTransform().boxes_to_cloud(np.zeros((2, 6)))
