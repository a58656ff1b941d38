"""Box maths (sparse_detector_ros.boxes): corners, points in boxes, rotated BEV / 3D IoU, BEV NMS.
Hand-worked cases, degenerate inputs, properties against shapely (GEOS) as an independent
reference, and numpy / torch parity."""
from __future__ import annotations

import math

import numpy as np
import pytest
import shapely
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_detector_ros.boxes import (bev_iou, bev_iou_pairs, corners_3d, corners_bev,
                                       count_points_in_boxes, iou_3d, nms_bev, points_in_boxes)


def box(x=0.0, y=0.0, z=0.0, l=1.0, w=1.0, h=1.0, yaw=0.0):
    return [x, y, z, l, w, h, yaw]


def arr(*rows):
    return np.array(rows, dtype=np.float64).reshape(-1, 7)


def shoelace(poly):
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * float(np.sum(x * np.roll(y, -1) - y * np.roll(x, -1)))


def reference_bev_iou(a, b):
    """BEV IoU by GEOS polygon overlay. Snap rounding (grid_size) keeps GEOS robust when edges
    coincide: without it GEOS can return an empty intersection for a box inside another with
    shared edges (found while writing these tests)."""
    pa = shapely.polygons(corners_bev(a))
    pb = shapely.polygons(corners_bev(b))
    inter = shapely.area(shapely.intersection(pa[:, None], pb[None], grid_size=1e-11))
    union = shapely.area(pa)[:, None] + shapely.area(pb)[None] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


# box strategies: generic floats, plus a lattice (positions on 0.25 m, yaw on 45 degrees) that
# makes edges coincide, cross at corners and boxes contain each other exactly
coord = st.floats(-3.0, 3.0, allow_nan=False)
# sizes: zero or at least 1 cm (a footprint 1e-12 m wide has no meaningful area in float64)
size = st.one_of(st.just(0.0), st.floats(0.01, 4.0))
angle = st.floats(-2 * math.pi, 2 * math.pi, allow_nan=False)
generic_box = st.builds(box, x=coord, y=coord, z=coord, l=size, w=size, h=size, yaw=angle)
lattice = st.integers(-8, 8).map(lambda i: 0.25 * i)
lattice_size = st.integers(0, 12).map(lambda i: 0.25 * i)
lattice_box = st.builds(box, x=lattice, y=lattice, z=lattice, l=lattice_size, w=lattice_size,
                        h=lattice_size, yaw=st.integers(-8, 8).map(lambda k: k * math.pi / 4))
any_box = st.one_of(generic_box, lattice_box)
box_sets = st.lists(any_box, min_size=1, max_size=12).map(lambda rows: arr(*rows))


# ----------------------------------------------------------------------------- corners

def test_corners_bev_counter_clockwise_front_first():
    b = arr(box(x=2.0, y=-1.0, l=4.0, w=2.0, yaw=math.pi / 2))
    c = corners_bev(b)[0]
    assert c.shape == (4, 2)
    # heading +y: front-right is at +y (front) and +x (right of a +y heading)
    np.testing.assert_allclose(c, [[3.0, 1.0], [1.0, 1.0], [1.0, -3.0], [3.0, -3.0]], atol=1e-12)
    assert shoelace(c) == pytest.approx(8.0)                   # counter-clockwise: area > 0
    np.testing.assert_allclose(c[:2].mean(0), [2.0, 1.0], atol=1e-12)    # front face centre


def test_corners_3d_floor_then_roof_in_bev_order():
    b = arr(box(x=1.0, y=2.0, z=0.5, l=3.0, w=1.0, h=2.0, yaw=0.3),
            box(l=1.0, w=2.0, h=0.0, yaw=-2.0))
    c = corners_3d(b)
    assert c.shape == (2, 8, 3)
    np.testing.assert_allclose(c[:, :4, :2], corners_bev(b))
    np.testing.assert_allclose(c[:, 4:, :2], corners_bev(b))
    np.testing.assert_allclose(c[0, :4, 2], -0.5)
    np.testing.assert_allclose(c[0, 4:, 2], 1.5)
    np.testing.assert_allclose(c[1, :, 2], 0.0)


def test_corners_of_no_boxes():
    assert corners_bev(np.zeros((0, 7))).shape == (0, 4, 2)
    assert corners_3d(np.zeros((0, 7))).shape == (0, 8, 3)


@given(st.lists(generic_box, min_size=1, max_size=8).map(lambda r: arr(*r)),
       st.integers(-3, 3))
@settings(max_examples=60, deadline=None)
def test_yaw_plus_pi_is_the_same_box(b, turns):
    flipped = b.copy()
    flipped[:, 6] += turns * math.pi
    # the same four corners, in another order
    c, f = corners_bev(b), corners_bev(flipped)
    for k in range(len(b)):
        d = np.abs(c[k][:, None] - f[k][None]).max(-1)       # (4, 4) distances
        assert (d.min(1) < 1e-9).all()
    np.testing.assert_allclose(bev_iou(flipped, b), bev_iou(b, b), atol=1e-9)
    np.testing.assert_allclose(iou_3d(flipped, b), iou_3d(b, b), atol=1e-9)


# ----------------------------------------------------------------------------- points in boxes

@given(st.lists(st.builds(box, x=coord, y=coord, z=coord, l=st.floats(0.1, 4), w=st.floats(0.1, 4),
                          h=st.floats(0.1, 4), yaw=angle), min_size=1, max_size=6)
       .map(lambda r: arr(*r)))
@settings(max_examples=60, deadline=None)
def test_points_in_boxes_centre_in_corners_pushed_out_not(b):
    k = len(b)
    own = np.eye(k, dtype=bool)
    assert points_in_boxes(b[:, :3], b)[own].all()
    def grown(dl, dh):                # corners of the boxes grown by dl in l and w, dh in h
        g = b.copy()
        g[:, 3:5] += dl
        g[:, 5] += dh
        return corners_3d(g)

    for j in range(k):
        assert points_in_boxes(grown(-2e-3, -2e-3)[j], b[j:j + 1]).all()       # pulled in
        assert not points_in_boxes(grown(2e-3, -2e-3)[j], b[j:j + 1]).any()    # out sideways
        assert not points_in_boxes(grown(-2e-3, 2e-3)[j], b[j:j + 1]).any()    # out in z


def test_points_in_boxes_hand_case_and_shapes():
    b = arr(box(l=4.0, w=2.0, h=2.0, yaw=math.pi / 2))          # long side along y
    p = np.array([[0.0, 1.9, 0.0, 7.0], [1.9, 0.0, 0.0, 7.0], [0.0, 0.0, 1.0, 7.0],
                  [0.0, 0.0, 1.01, 7.0]])
    np.testing.assert_array_equal(points_in_boxes(p, b), [[True, False, True, False]])
    # points on a face are inside
    faces = np.array([[1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 1.0, 1.0]])
    assert points_in_boxes(faces, arr(box(l=2.0, w=2.0, h=2.0))).all()
    assert points_in_boxes(p, np.zeros((0, 7))).shape == (0, 4)
    assert points_in_boxes(np.zeros((0, 3)), b).shape == (1, 0)
    np.testing.assert_array_equal(count_points_in_boxes(p, b), [2])
    np.testing.assert_array_equal(count_points_in_boxes(np.zeros((0, 3)), b), [0])
    assert count_points_in_boxes(p, np.zeros((0, 7))).shape == (0,)


@given(box_sets, st.integers(0, 2**31 - 1))
@settings(max_examples=40, deadline=None)
def test_count_points_in_boxes_equals_the_brute_force_row_sums(b, seed):
    rng = np.random.default_rng(seed)
    p = rng.uniform(-5, 5, (300, 4)).astype(np.float32)
    p[:50, :3] = np.repeat(b[:, :3], 50, 0)[:50]                 # points on centres, ties in x
    want = points_in_boxes(p, b).sum(1)
    np.testing.assert_array_equal(count_points_in_boxes(p, b), want)
    got = count_points_in_boxes(torch.from_numpy(p).double(), torch.from_numpy(b))
    assert isinstance(got, torch.Tensor) and got.dtype == torch.int64
    np.testing.assert_array_equal(got.numpy(), want)


# ----------------------------------------------------------------------------- IoU, hand cases

def test_unit_squares_offset_by_half_have_iou_one_third():
    a, b = arr(box()), arr(box(x=0.5))
    assert bev_iou(a, b)[0, 0] == pytest.approx(1 / 3, abs=1e-12)
    assert iou_3d(a, b)[0, 0] == pytest.approx(1 / 3, abs=1e-12)
    # the same pair rotated together about the origin keeps its IoU
    r = arr(box(x=0.5 * math.cos(0.7), y=0.5 * math.sin(0.7), yaw=0.7))
    assert bev_iou(arr(box(yaw=0.7)), r)[0, 0] == pytest.approx(1 / 3, abs=1e-12)


def test_square_and_its_45_degree_rotation_meet_in_a_regular_octagon():
    octagon = 2 * (math.sqrt(2) - 1)                              # area inside both unit squares
    iou = bev_iou(arr(box()), arr(box(yaw=math.pi / 4)))[0, 0]
    assert iou == pytest.approx(octagon / (2 - octagon), abs=1e-12)


def test_pairwise_iou_is_the_diagonal_of_the_matrix():
    rng = np.random.default_rng(3)
    a = np.c_[rng.uniform(-3, 3, (40, 3)), rng.uniform(0.5, 5, (40, 3)), rng.uniform(-4, 4, 40)]
    b = a + np.c_[rng.normal(0, 0.5, (40, 3)), rng.normal(0, 0.3, (40, 3)), rng.normal(0, 0.3, 40)]
    b[:, 3:6] = np.abs(b[:, 3:6])
    b[0, 3] = 0.0                                    # a zero-area footprint: IoU 0
    want = np.diag(bev_iou(a, b))
    got = bev_iou_pairs(a, b)
    assert got.shape == (40,) and got[0] == 0.0 and (got[1:] > 0).sum() > 20
    np.testing.assert_allclose(got, want, atol=1e-12)
    t = bev_iou_pairs(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float64
    np.testing.assert_allclose(t.numpy(), want, atol=1e-6)
    with pytest.raises(ValueError, match="must pair up, got 40 and 39 boxes"):
        bev_iou_pairs(a, b[:39])


def test_contained_box_iou_is_the_area_ratio():
    big = arr(box(x=10.0, y=-5.0, l=4.0, w=2.0, h=2.0, yaw=1.0))
    small = arr(box(x=10.0, y=-5.0, l=1.0, w=1.0, h=1.0, yaw=-0.4))
    assert bev_iou(big, small)[0, 0] == pytest.approx(1 / 8, abs=1e-12)
    assert iou_3d(big, small)[0, 0] == pytest.approx(1 / 16, abs=1e-12)
    # sharing the long edges: a 2 x 0.5 box in a 2 x 1 box, both turned by 135 degrees
    a = arr(box(x=1.0, y=0.5, l=2.0, w=0.5, yaw=-3 * math.pi / 4))
    b = arr(box(x=1.0, y=0.5, l=1.0, w=2.0, yaw=3 * math.pi / 4))
    assert bev_iou(a, b)[0, 0] == pytest.approx(0.5, abs=1e-12)


def test_disjoint_and_touching_boxes_have_iou_zero():
    a = arr(box())
    b = arr(box(x=3.0), box(x=1.0), box(x=1.0, y=1.0), box(x=0.0, z=1.0))   # far, edge, corner
    np.testing.assert_allclose(bev_iou(a, b)[0, :3], 0.0, atol=1e-12)
    np.testing.assert_array_equal(iou_3d(a, b)[0], 0.0)           # last one: stacked on top
    assert bev_iou(a, b)[0, 3] == pytest.approx(1.0)


def test_3d_iou_with_partial_z_overlap():
    # same footprint, z ranges [0, 2] and [1, 3]: 1 / 3
    a, b = arr(box(z=1.0, h=2.0, yaw=0.3)), arr(box(z=2.0, h=2.0, yaw=0.3))
    assert iou_3d(a, b)[0, 0] == pytest.approx(1 / 3, abs=1e-12)
    # octagon footprint, z overlap 0.5 of heights 1 and 2: v = o*0.5 / (1 + 2 - o*0.5)
    o = 2 * (math.sqrt(2) - 1)
    a, b = arr(box(z=0.0, h=1.0)), arr(box(z=1.0, h=2.0, yaw=math.pi / 4))
    assert iou_3d(a, b)[0, 0] == pytest.approx(o * 0.5 / (3 - o * 0.5), abs=1e-12)
    assert bev_iou(a, b)[0, 0] == pytest.approx(o / (2 - o), abs=1e-12)


def test_degenerate_inputs():
    none = np.zeros((0, 7))
    some = arr(box(), box(x=0.2, yaw=0.1))
    for f in (bev_iou, iou_3d):
        assert f(none, some).shape == (0, 2)
        assert f(some, none).shape == (2, 0)
        assert f(none, none).shape == (0, 0)
    # zero-size boxes: IoU 0 (no NaN), also with themselves
    flat = arr(box(l=0.0, w=0.0), box(l=0.0), box(w=0.0), box(h=0.0))
    both = np.concatenate([flat, some])
    bi, vi = bev_iou(both, both), iou_3d(both, both)
    assert np.isfinite(bi).all() and np.isfinite(vi).all()
    np.testing.assert_array_equal(bi[:3], 0.0)
    np.testing.assert_array_equal(vi[:4], 0.0)
    assert bi[3, 3] == pytest.approx(1.0)                         # zero height, full footprint
    # identical boxes: 1
    np.testing.assert_allclose(np.diag(bev_iou(some, some)), 1.0, atol=1e-12)
    np.testing.assert_allclose(np.diag(iou_3d(some, some)), 1.0, atol=1e-12)


def test_bad_boxes_are_rejected_with_the_argument_named():
    with pytest.raises(ValueError, match="boxes_b must have shape"):
        bev_iou(arr(box()), np.zeros((2, 6)))
    with pytest.raises(ValueError, match="boxes_a has a negative size"):
        iou_3d(arr(box(w=-1.0)), arr(box()))
    with pytest.raises(ValueError, match="points must have shape"):
        points_in_boxes(np.zeros((3, 2)), arr(box()))
    with pytest.raises(ValueError, match=r"boxes must have shape \(K, 7\)"):
        corners_bev(np.zeros(7))


# ----------------------------------------------------------------------------- IoU, properties

@given(box_sets, box_sets)
@settings(max_examples=150, deadline=None)
def test_bev_iou_matches_geos_polygon_overlay(a, b):
    got = bev_iou(a, b)
    assert got.shape == (len(a), len(b)) and got.dtype == np.float64
    np.testing.assert_allclose(got, reference_bev_iou(a, b), atol=1e-7)


@given(box_sets, box_sets)
@settings(max_examples=60, deadline=None)
def test_iou_is_symmetric_and_in_unit_range(a, b):
    for f in (bev_iou, iou_3d):
        ab, ba = f(a, b), f(b, a)
        np.testing.assert_allclose(ab, ba.T, atol=1e-9)
        assert (ab >= 0).all() and (ab <= 1).all()
    # 3D IoU never exceeds BEV IoU times the z-IoU bound: it is 0 when z ranges do not meet
    v = iou_3d(a, b)
    za = a[:, 2:3] + 0.5 * a[:, 5:6] * np.array([-1, 1])
    zb = b[:, 2:3] + 0.5 * b[:, 5:6] * np.array([-1, 1])
    apart = (za[:, None, 1] <= zb[None, :, 0]) | (zb[None, :, 1] <= za[:, None, 0])
    assert (v[apart] == 0).all()


@given(box_sets, st.floats(-50, 50), st.floats(-50, 50), st.floats(-math.pi, math.pi))
@settings(max_examples=40, deadline=None)
def test_iou_is_invariant_under_a_rigid_motion(b, tx, ty, rot):
    c, s = math.cos(rot), math.sin(rot)
    m = b.copy()
    m[:, 0], m[:, 1] = c * b[:, 0] - s * b[:, 1] + tx, s * b[:, 0] + c * b[:, 1] + ty
    m[:, 6] += rot
    np.testing.assert_allclose(bev_iou(m, m), bev_iou(b, b), atol=1e-7)


def test_many_overlapping_pairs_equal_row_by_row():
    # 400 x 400 boxes within a few metres: 160000 candidate pairs, computed in chunks
    rng = np.random.default_rng(3)
    a = random_boxes(rng, 400, 1.0)
    full = bev_iou(a, a)
    rows = np.concatenate([bev_iou(a[i:i + 50], a) for i in range(0, 400, 50)])
    np.testing.assert_array_equal(full, rows)
    assert (full > 0).mean() > 0.9


# ----------------------------------------------------------------------------- NMS

def test_nms_keeps_the_higher_score_of_two_overlapping_boxes():
    b = arr(box(l=4.0, w=2.0), box(x=0.3, l=4.0, w=2.0, yaw=0.05), box(x=10.0))
    keep = nms_bev(b, np.array([0.5, 0.9, 0.7]), 0.5)
    np.testing.assert_array_equal(keep, [1, 2])
    assert keep.dtype == np.int64
    # different classes never suppress each other
    np.testing.assert_array_equal(nms_bev(b, np.array([0.5, 0.9, 0.7]), 0.5,
                                          classes=np.array([0, 1, 0])), [1, 2, 0])
    np.testing.assert_array_equal(nms_bev(b, np.array([0.5, 0.9, 0.7]), 0.5, max_out=1), [1])
    assert nms_bev(b, np.array([0.5, 0.9, 0.7]), 0.5, max_out=0).shape == (0,)


def test_nms_threshold_edge_suppresses_only_above_it():
    b = arr(box(), box(x=0.5))
    iou = bev_iou(b[:1], b[1:])[0, 0]
    scores = np.array([0.9, 0.8])
    np.testing.assert_array_equal(nms_bev(b, scores, iou), [0, 1])          # equal: kept
    np.testing.assert_array_equal(nms_bev(b, scores, np.nextafter(iou, 0)), [0])
    np.testing.assert_array_equal(nms_bev(b, scores, 0.0), [0])
    np.testing.assert_array_equal(nms_bev(b, scores, 1.0), [0, 1])


def test_nms_suppression_is_greedy_not_transitive():
    # a overlaps b, b overlaps c, a and c apart: a suppresses b, so c survives
    b = arr(box(l=2.0), box(x=1.0, l=2.0), box(x=2.0, l=2.0))
    np.testing.assert_array_equal(nms_bev(b, np.array([0.9, 0.8, 0.7]), 0.2), [0, 2])
    np.testing.assert_array_equal(nms_bev(b, np.array([0.7, 0.9, 0.8]), 0.2), [1])


def test_nms_of_nothing_and_bad_arguments():
    assert nms_bev(np.zeros((0, 7)), np.zeros(0), 0.5).shape == (0,)
    k = nms_bev(torch.zeros(0, 7), torch.zeros(0), 0.5)
    assert isinstance(k, torch.Tensor) and k.dtype == torch.int64 and k.shape == (0,)
    with pytest.raises(ValueError, match="scores must have shape"):
        nms_bev(arr(box(), box()), np.zeros(3), 0.5)
    with pytest.raises(ValueError, match="iou_threshold must be in"):
        nms_bev(arr(box()), np.zeros(1), 1.5)
    with pytest.raises(ValueError, match="classes must have shape"):
        nms_bev(arr(box()), np.zeros(1), 0.5, classes=np.zeros(2))


def reference_nms(b, scores, thr, classes):
    """Plain greedy NMS over one pairwise IoU at a time."""
    kept = []
    for i in sorted(range(len(b)), key=lambda i: (-scores[i], i)):
        if all(classes[i] != classes[j] or bev_iou(b[j:j + 1], b[i:i + 1])[0, 0] <= thr
               for j in kept):
            kept.append(i)
    return kept


@given(box_sets, st.integers(0, 2**31 - 1), st.floats(0.0, 1.0), st.booleans())
@settings(max_examples=60, deadline=None)
def test_nms_matches_a_plain_greedy_reference(b, seed, thr, with_classes):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 4, len(b)).astype(np.float64)       # ties included
    classes = rng.integers(0, 2, len(b)) if with_classes else np.zeros(len(b), int)
    got = nms_bev(b, scores, thr, classes=classes if with_classes else None)
    assert got.tolist() == reference_nms(b, scores, thr, classes)


# ----------------------------------------------------------------------------- numpy / torch

def random_boxes(rng, k, spread=3.0):
    return np.column_stack([rng.uniform(-spread, spread, (k, 3)), rng.uniform(0.2, 4, (k, 3)),
                            rng.uniform(-4, 4, k)])


def test_torch_in_torch_out_matches_numpy():
    rng = np.random.default_rng(7)
    a, b = random_boxes(rng, 30), random_boxes(rng, 40)
    p = rng.uniform(-4, 4, (500, 4))
    scores = rng.uniform(0, 1, 30)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        ta, tb, tp = (torch.tensor(x, dtype=dtype) for x in (a, b, p))
        for f in (bev_iou, iou_3d):
            got = f(ta, tb)
            assert isinstance(got, torch.Tensor) and got.dtype == dtype
            np.testing.assert_allclose(got.numpy(), f(a, b), atol=tol)
        for f in (corners_bev, corners_3d):
            got = f(ta)
            assert isinstance(got, torch.Tensor) and got.dtype == dtype
            np.testing.assert_allclose(got.numpy(), f(a), atol=tol)
        if dtype == torch.float64:     # float32 may flip points that lie on a face
            np.testing.assert_array_equal(points_in_boxes(tp, ta).numpy(), points_in_boxes(p, a))
        keep = nms_bev(ta, torch.tensor(scores, dtype=dtype), 0.1)
        assert isinstance(keep, torch.Tensor) and keep.dtype == torch.int64
        np.testing.assert_array_equal(keep.numpy(), nms_bev(a, scores, 0.1))
    # mixed inputs compute in torch; integer tensors as float32
    assert bev_iou(torch.tensor(a), b).dtype == torch.float64
    assert bev_iou(torch.zeros(2, 7, dtype=torch.int64), torch.zeros(1, 7)).dtype == torch.float32


@given(st.lists(lattice_box, min_size=1, max_size=12).map(lambda rows: arr(*rows)))
@settings(max_examples=100, deadline=None)
def test_float32_iou_with_shared_edges_matches_float64(b):
    # lattice boxes share and cross edges; float32 must not invent crossings of parallel edges
    got = bev_iou(torch.tensor(b, dtype=torch.float32), torch.tensor(b, dtype=torch.float32))
    np.testing.assert_allclose(got.numpy(), bev_iou(b, b), atol=1e-4)
    # (a pair whose collinear edges once gave a spurious crossing in float32: IoU off by 0.03)
    two = arr(box(0.5, -0.5, 0, 1.5, 1.5, 1, 3 * math.pi / 4),
              box(1, -1, 0, 0.5, 1.5, 1, -math.pi / 4))
    got = bev_iou(torch.tensor(two, dtype=torch.float32), torch.tensor(two, dtype=torch.float32))
    np.testing.assert_allclose(got.numpy(), bev_iou(two, two), atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_in_cuda_out_matches_cpu():
    rng = np.random.default_rng(8)
    a, b = random_boxes(rng, 200, 20.0), random_boxes(rng, 300, 20.0)
    p = rng.uniform(-20, 20, (5000, 4))
    ca, cb, cp = (torch.tensor(x, dtype=torch.float32, device="cuda") for x in (a, b, p))
    for f in (bev_iou, iou_3d):
        got = f(ca, cb)
        assert got.device.type == "cuda"
        np.testing.assert_allclose(got.cpu().numpy(), f(a, b), atol=1e-4)
    inside = points_in_boxes(cp, ca)
    assert inside.device.type == "cuda"
    np.testing.assert_array_equal(count_points_in_boxes(cp, ca).cpu().numpy(),
                                  inside.sum(1).cpu().numpy())
    scores = torch.rand(200, device="cuda")
    keep = nms_bev(ca, scores, 0.2, classes=torch.arange(200, device="cuda") % 3)
    assert keep.device.type == "cuda"
    np.testing.assert_array_equal(
        keep.cpu().numpy(),
        nms_bev(a, scores.cpu().numpy().astype(np.float64), 0.2, classes=np.arange(200) % 3))
