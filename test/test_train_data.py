"""Training data and CenterPoint targets: encode -> decode round trip, heatmap shape, losses,
the compact BEV cache (round trip, augmentation, crops, copy-paste, determinism)."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from sparse_detector_ros.bev import Rasterizer
from sparse_detector_ros.boxes import bev_iou, points_in_boxes
from sparse_detector_ros.config import GridConfig, MaskConfig
from sparse_detector_ros.masks import occupancy_mask
from sparse_detector_ros.model.decode import decode
from sparse_detector_ros.model.description import ModelDescription
from sparse_detector_ros.model.network import SparseBEVNet
from sparse_detector_ros.sim import CLASSES, generate_scene, get_lidar, render_frame
from sparse_detector_ros.train import data
from sparse_detector_ros.train.targets import (REG_KEYS, encode, encode_batch, focal_loss,
                                               iou_loss,
                                               gaussian_radius, output_shape, reg_loss)

ASYM = GridConfig(x_min=-10.0, x_max=30.5, y_min=-20.0, y_max=12.0, resolution=0.25)
SMALL = GridConfig(x_min=-19.2, x_max=19.2, y_min=-19.2, y_max=19.2, resolution=0.2)
SIZES = {0: (4.5, 1.9, 1.6), 1: (0.6, 0.6, 1.75), 2: (1.8, 0.6, 1.7)}   # car, ped, cyclist


# ============================================================================ targets

def head_of(targets: dict, batch: bool = False, axis: bool = True) -> dict:
    """A head dict that decodes to the targets' boxes: logit +20 on centre cells (heatmap
    1.0), -20 elsewhere, the regression maps as they are (without ``axis`` unless ``axis``)."""
    t = targets if batch else {k: v[None] for k, v in targets.items()}
    hm = t["heatmap"]
    logits = torch.where(hm == 1.0, torch.tensor(20.0), torch.tensor(-20.0))
    return {"heatmap": logits, **{k: t[k] for k in REG_KEYS if axis or k != "axis"}}


def random_boxes(grid: GridConfig, stride: int, n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """``n`` boxes of all classes, centres on output cells 3 apart (no two peaks share a
    pooling window), offsets at the cell edges and inside, yaws near +-pi and random."""
    ho, wo = output_shape(grid, stride)
    lattice = [(i, j) for i in range(2, ho - 2, 3) for j in range(2, wo - 2, 3)]
    # the corner cells of the grid too: boxes partly outside
    lattice += [(0, 0), (ho - 1, wo - 1), (0, wo - 1), (ho - 1, 0)]
    pick = rng.choice(len(lattice), n, replace=False)
    cell = stride * grid.resolution
    edges = [0.0, 1e-4, 0.5, 1.0 - 1e-4]
    boxes, labels = [], []
    H, W = grid.shape
    for k, p in enumerate(pick):
        i, j = lattice[p]
        dx = edges[k % 4] if k % 3 else rng.random()
        dy = edges[(k // 4) % 4] if k % 5 else rng.random()
        x = grid.x_min + (i + dx) * cell
        y = grid.y_min + (j + dy) * cell
        # a last output cell that sticks out of the BEV (ceil): keep the centre inside it
        x = min(x, grid.x_max - 1e-3)
        y = min(y, grid.y_max - 1e-3)
        c = k % 3
        l, w, h = (s * rng.uniform(0.8, 1.2) for s in SIZES[c])
        yaw = [math.pi - 1e-6, -math.pi + 1e-6, math.pi, rng.uniform(-math.pi, math.pi)][k % 4]
        boxes.append((x, y, rng.uniform(-2.5, 1.0), l, w, h, yaw))
        labels.append(c)
    return np.asarray(boxes, np.float32), np.asarray(labels, np.int64)


def assert_round_trip(boxes, labels, grid, stride, axis=True):
    t = encode(boxes, labels, grid, stride, 3)
    det = decode(head_of(t, axis=axis), grid, stride, [0.5] * 3, top_k=10_000, nms_iou=1.0)[0]
    got, _, got_labels = det.numpy()
    assert len(got) == len(boxes)
    # match by centre (each expected box has one decoded box within a mm)
    d = np.hypot(got[:, None, 0] - boxes[None, :, 0], got[:, None, 1] - boxes[None, :, 1])
    order = d.argmin(0)
    assert sorted(order.tolist()) == list(range(len(boxes)))
    g = got[order]
    np.testing.assert_allclose(g[:, :2], boxes[:, :2], rtol=0, atol=1e-5)
    np.testing.assert_allclose(g[:, 2], boxes[:, 2], rtol=0, atol=1e-6)
    np.testing.assert_allclose(g[:, 3:6], boxes[:, 3:6], rtol=1e-6)
    dyaw = (g[:, 6] - boxes[:, 6] + math.pi) % (2 * math.pi) - math.pi
    assert np.abs(dyaw).max() < 1e-6
    np.testing.assert_array_equal(got_labels[order], labels)


@pytest.mark.parametrize("axis", [False, True])
def test_round_trip_asymmetric_grid(axis):
    # 162 x 128 cells at stride 4: 41 x 32 output cells, the last row sticking out of the BEV
    assert ASYM.shape == (162, 128) and output_shape(ASYM, 4) == (41, 32)
    rng = np.random.default_rng(1)
    boxes, labels = random_boxes(ASYM, 4, 60, rng)
    assert set(labels.tolist()) == {0, 1, 2}
    assert_round_trip(boxes, labels, ASYM, 4, axis)


@pytest.mark.parametrize("axis", [False, True])
def test_round_trip_default_grid_at_the_networks_stride(axis):
    grid = GridConfig()
    stride = SparseBEVNet(ModelDescription()).out_stride
    rng = np.random.default_rng(2)
    boxes, labels = random_boxes(grid, stride, 150, rng)
    assert_round_trip(boxes, labels, grid, stride, axis)


def test_boxes_partly_outside_are_kept_centres_outside_are_dropped():
    g = ASYM
    car = (4.5, 1.9, 1.6, 0.3)
    kept = [(g.x_min, 0.0, -1.0, *car), (g.x_max - 1e-3, 0.0, -1.0, *car),
            (5.0, g.y_min + 1e-3, -1.0, *car)]
    dropped = [(g.x_max, 0.0, -1.0, *car), (g.x_min - 1e-3, 0.0, -1.0, *car),
               (5.0, g.y_max, -1.0, *car), (5.0, g.y_min - 0.5, -1.0, *car)]
    t = encode(np.array(kept + dropped, np.float32), np.zeros(7, np.int64), g, 4, 3)
    assert int((t["heatmap"] == 1.0).sum()) == 3 and int(t["mask"].sum()) == 3
    assert_round_trip(np.array(kept, np.float32), np.zeros(3, np.int64), g, 4)
    empty = encode(np.array(dropped, np.float32), np.zeros(4, np.int64), g, 4, 3)
    assert float(empty["heatmap"].abs().sum()) == 0.0 and float(empty["mask"].sum()) == 0.0


def test_heatmap_is_one_at_the_centre_and_gaussian_around():
    g, stride = ASYM, 4
    cell = stride * g.resolution
    box = np.array([[5.3, -3.1, -1.0, 4.5, 1.9, 1.6, 0.4]], np.float32)
    t = encode(box, [2], g, stride, 3)
    hm = t["heatmap"].numpy()
    ci, cj = int((5.3 - g.x_min) // cell), int((-3.1 - g.y_min) // cell)
    r = max(2, int(math.floor(float(gaussian_radius(4.5 / cell, 1.9 / cell)))))
    sigma = (2 * r + 1) / 6
    assert hm[2, ci, cj] == 1.0 and int((hm == 1.0).sum()) == 1
    expected = np.zeros_like(hm[2])
    for a in range(-r, r + 1):
        for b in range(-r, r + 1):
            expected[ci + a, cj + b] = math.exp(-(a * a + b * b) / (2 * sigma * sigma))
    np.testing.assert_allclose(hm[2], expected, rtol=1e-6, atol=0)
    assert hm[:2].max() == 0.0
    assert t["mask"][ci, cj] == 1.0 and float(t["mask"].sum()) == 1.0


def test_gaussian_radius_formula_and_min_radius():
    # l = w = 10 cells, overlap 0.1: the third case, (-4 + sqrt(16 + 144)) / 2
    assert float(gaussian_radius(10.0, 10.0, 0.1)) == pytest.approx((-4 + math.sqrt(160)) / 2)
    # l = 20, w = 4 at 0.7: the first case is the smallest
    s, p, o = 24.0, 80.0, 0.7
    r1 = (s + math.sqrt(s * s - 4 * p * (1 - o) / (1 + o))) / 2
    r2 = (2 * s + math.sqrt(4 * s * s - 16 * (1 - o) * p)) / 2
    r3 = (-2 * o * s + math.sqrt(4 * o * o * s * s - 16 * o * (o - 1) * p)) / 2
    assert float(gaussian_radius(20.0, 4.0, o)) == pytest.approx(min(r1, r2, r3))
    # a pedestrian at stride 4 x 0.2 m: radius below 1 cell -> min_radius
    ped = np.array([[0.3, 0.3, -1.0, 0.6, 0.6, 1.7, 0.0]], np.float32)
    for min_radius in (0, 2, 3):
        hm = encode(ped, [1], GridConfig(), 4, 3, min_radius=min_radius)["heatmap"][1]
        assert int((hm > 0).sum()) == (2 * min_radius + 1) ** 2


def test_overlapping_gaussians_combine_by_maximum_and_first_box_gives_regression():
    g = ASYM
    a = np.array([[5.0, 0.0, -1.0, 4.5, 1.9, 1.6, 0.1]], np.float32)
    b = np.array([[6.6, 0.0, -0.5, 4.0, 1.8, 1.5, 0.2]], np.float32)    # the next cell
    ta, tb = encode(a, [0], g, 4, 3), encode(b, [0], g, 4, 3)
    tab = encode(np.concatenate([a, b]), [0, 0], g, 4, 3)
    assert torch.equal(tab["heatmap"], torch.maximum(ta["heatmap"], tb["heatmap"]))
    # same centre cell: both paint, the first gives the regression target
    c = a.copy()
    c[0, 3:] = (3.0, 1.5, 1.2, -0.7)
    t = encode(np.concatenate([a, c]), [0, 1], g, 4, 3)
    assert float(t["mask"].sum()) == 1.0 and int((t["heatmap"] == 1.0).sum()) == 2
    for key in REG_KEYS:
        assert torch.equal(t[key], ta[key])


def test_encode_batch_stacks_samples_with_their_own_grids():
    rng = np.random.default_rng(3)
    b0, l0 = random_boxes(ASYM, 4, 10, rng)
    shifted = replace(ASYM, x_min=ASYM.x_min + 2.0, x_max=ASYM.x_max + 2.0)
    b1, l1 = random_boxes(shifted, 4, 7, rng)
    t = encode_batch([b0, b1], [l0, l1], [ASYM, shifted], 4, 3)
    assert t["heatmap"].shape == (2, 3, 41, 32) and t["mask"].shape == (2, 41, 32)
    for n, (b, lab, g) in enumerate(((b0, l0, ASYM), (b1, l1, shifted))):
        single = encode(b, lab, g, 4, 3)
        for key, v in single.items():
            assert torch.equal(t[key][n], v)
    dets = decode(head_of(t, batch=True), ASYM, 4, [0.5] * 3, top_k=1000, nms_iou=1.0)
    assert [len(d) for d in dets] == [10, 7]


def test_reg_radius_writes_each_box_around_its_centre_so_a_peak_off_centre_decodes_it():
    g = ASYM
    a = np.array([[5.3, 0.1, -1.0, 4.5, 1.9, 1.6, 0.1]], np.float32)
    t = encode(a, [0], g, 4, 3, reg_radius=1)
    assert torch.equal(encode(a, [0], g, 4, 3)["mask"] > 0, t["mask"] == 1.0)   # the centre
    cells = torch.nonzero(t["mask"]).tolist()
    assert len(cells) == 9
    hm = t["heatmap"][0]
    for i, j in cells:
        # the loss weight of a cell is the object's heatmap value there
        assert float(t["mask"][i, j]) == pytest.approx(float(hm[i, j]))
        # a peak at any of the nine cells decodes the box
        head = head_of(t)
        head["heatmap"] = torch.full_like(head["heatmap"], -20.0)
        head["heatmap"][0, 0, i, j] = 20.0
        got = decode(head, g, 4, [0.5] * 3, nms_iou=1.0)[0].numpy()[0]
        np.testing.assert_allclose(got, a, rtol=1e-6, atol=1e-5)
    # without it a peak one cell off decodes a box at that cell with zero size targets
    t0 = encode(a, [0], g, 4, 3)
    assert int((t0["mask"] > 0).sum()) == 1


def test_reg_radius_cells_take_the_nearest_centre_and_centres_keep_their_own():
    g = ASYM
    # two cars two output cells (1 m each) apart along x: their 3 x 3 windows share a row
    a = np.array([[5.3, 0.1, -1.0, 4.5, 1.9, 1.6, 0.1],
                  [7.1, 0.1, -0.5, 4.0, 1.8, 1.5, 0.2]], np.float32)
    t = encode(a, [0, 0], g, 4, 3, reg_radius=1)
    fx = (a[:, 0] - g.x_min) / 1.0
    ci = np.floor(fx).astype(int)
    assert ci[1] - ci[0] == 2
    mid = ci[0] + 1            # the shared row's centre is 1.2 cells from the first, 0.6 from
    j = int(np.floor((0.1 - g.y_min) / 1.0))    # the second: the second's
    assert float(t["offset"][0, mid, j]) == pytest.approx(fx[1] - mid, abs=1e-5)
    assert float(t["z"][0, mid, j]) == pytest.approx(-0.5)
    # the centre cells' targets are their own boxes'
    assert float(t["offset"][0, ci[0], j]) == pytest.approx(fx[0] - ci[0], abs=1e-5)
    assert float(t["offset"][0, ci[1], j]) == pytest.approx(fx[1] - ci[1], abs=1e-5)
    assert float(t["mask"][ci[0], j]) == float(t["mask"][ci[1], j]) == 1.0
    assert int((t["mask"] > 0).sum()) == 15


def test_reg_loss_weighs_each_cell_by_the_mask():
    rng = np.random.default_rng(6)
    boxes, labels = random_boxes(ASYM, 4, 5, rng)
    t = encode_batch([boxes], [labels], ASYM, 4, 3, reg_radius=1)
    mask = t["mask"]
    assert 0.0 < float(mask[mask > 0].min()) < 1.0
    # off by 1 on one neighbour cell of weight m only: m / (sum of the weights)
    n, i, j = (int(v) for v in torch.nonzero((mask > 0) & (mask < 1))[0])
    pred = t["z"].clone()
    pred[n, 0, i, j] += 1.0
    m = float(mask[n, i, j])
    assert float(reg_loss(pred, t["z"], mask)) == pytest.approx(m / float(mask.sum()))


def test_far_weight_scales_the_regression_weights_of_an_object_by_its_range():
    from sparse_detector_ros.train.targets import FAR_RAMP

    g = GridConfig(x_min=-51.2, x_max=51.2, y_min=-51.2, y_max=51.2, resolution=0.2)
    # ranges 10 m (below the ramp), 30 m (half way up) and 45 m (beyond it)
    a = np.array([[10.1, 0.3, -1.0, 4.5, 1.9, 1.6, 0.1],
                  [0.3, 30.1, -1.0, 4.5, 1.9, 1.6, 0.4],
                  [-27.1, -35.9, -1.0, 4.5, 1.9, 1.6, 1.0]], np.float32)
    r = np.hypot(a[:, 0], a[:, 1])
    assert r[0] < FAR_RAMP[0] < r[1] < FAR_RAMP[1] < r[2]
    want = 1.0 + 2.0 * np.array([0.0, (r[1] - FAR_RAMP[0]) / (FAR_RAMP[1] - FAR_RAMP[0]), 1.0])
    plain = encode(a, [0, 0, 0], g, 4, 3, reg_radius=1)
    t = encode(a, [0, 0, 0], g, 4, 3, reg_radius=1, far_weight=2.0)
    for key in REG_KEYS:
        assert torch.equal(t[key], plain[key])                 # the same targets
    assert torch.equal(t["heatmap"], plain["heatmap"])
    cell = 4 * g.resolution
    for k in range(3):
        ci, cj = int((a[k, 0] - g.x_min) // cell), int((a[k, 1] - g.y_min) // cell)
        win = (slice(ci - 1, ci + 2), slice(cj - 1, cj + 2))
        # every cell of the object's window, its centre (1.0) included, weighs want[k] times more
        torch.testing.assert_close(t["mask"][win], plain["mask"][win] * float(want[k]))
        assert float(t["mask"][ci, cj]) == pytest.approx(want[k])
    assert torch.equal(encode(a, [0, 0, 0], g, 4, 3, reg_radius=1, far_weight=0.0)["mask"],
                       plain["mask"])
    # the centre cells alone (no reg_radius) too
    t0 = encode(a, [0, 0, 0], g, 4, 3, far_weight=2.0)
    assert sorted(t0["mask"][t0["mask"] > 0].tolist()) == pytest.approx(sorted(want.tolist()))


@pytest.mark.parametrize("far_weight", [-0.5, float("nan"), True, "1"])
def test_encode_rejects_a_bad_far_weight(far_weight):
    with pytest.raises(ValueError, match="far_weight must be a finite number >= 0"):
        encode(np.zeros((0, 7)), [], ASYM, 4, 3, far_weight=far_weight)


@pytest.mark.parametrize("boxes, labels, message", [
    (np.zeros((2, 6)), [0, 0], "boxes must have shape"),
    (np.ones((2, 7)), [0], "labels must have shape"),
    (np.ones((1, 7)), [3], "labels must be ints in"),
    (np.array([[0, 0, 0, 0.0, 1, 1, 0]]), [0], "l, w, h > 0"),
    (np.array([[np.nan, 0, 0, 1, 1, 1, 0]]), [0], "finite"),
])
def test_encode_rejects_bad_input(boxes, labels, message):
    with pytest.raises(ValueError, match=message):
        encode(boxes, labels, ASYM, 4, 3)


@pytest.mark.parametrize("reg_radius", [-1, 1.5, True])
def test_encode_rejects_a_bad_reg_radius(reg_radius):
    with pytest.raises(ValueError, match="reg_radius must be an int >= 0"):
        encode(np.zeros((0, 7)), [], ASYM, 4, 3, reg_radius=reg_radius)


def test_iou_loss_targets_the_iou_of_the_decoded_box_with_its_object():
    g = GridConfig(x_min=0.0, x_max=25.6, y_min=0.0, y_max=25.6, resolution=0.2)
    stride, cell = 4, 0.8
    # an axis-aligned car (l along x) and a pedestrian, each alone in its cell
    boxes = np.array([[5.1, 5.1, -1.0, 4.0, 2.0, 1.5, 0.0],
                      [15.3, 9.7, -1.0, 0.8, 0.6, 1.7, 0.7]], np.float32)
    t = encode_batch([boxes], [np.array([0, 1])], [g], stride, 3)
    head = {k: t[k].clone() for k in ("offset", "z", "size", "rot", "axis")}
    logit = torch.ones(1, 1, *t["mask"].shape[1:], requires_grad=True)
    head["iou"] = logit
    # perfect boxes: IoU 1 -> BCE(1, 1) = softplus(1) - 1 per object
    loss = iou_loss(head, t, t["mask"], cell).detach()
    assert float(loss) == pytest.approx(math.log1p(math.e) - 1, rel=1e-5)
    # the car moved 0.25 cells (0.2 m) along its length: IoU (l - d) / (l + d) = 3.8 / 4.2;
    # both turned round (rot negated, the axis unchanged: same footprints): no change there
    i, j = int(5.1 // cell), int(5.1 // cell)
    head["offset"] = head["offset"].clone()
    head["offset"][0, 0, i, j] += 0.25
    head["rot"] = -head["rot"]
    loss = iou_loss(head, t, t["mask"], cell).detach()
    q = (1.0 + 3.8 / 4.2) / 2                        # the mean over the two objects
    assert float(loss) == pytest.approx(math.log1p(math.e) - q, rel=1e-5)
    # gradient only into the IoU logits (the target is a constant)
    head["offset"].requires_grad_(True)
    iou_loss(head, t, t["mask"], cell).backward()
    assert head["offset"].grad is None and logit.grad is not None
    assert int((logit.grad != 0).sum()) == 2
    # no object: zero, with a gradient path
    empty = iou_loss(head, t, torch.zeros_like(t["mask"]), cell)
    assert float(empty.detach()) == 0.0 and empty.requires_grad
    # a quarter turn of the pedestrian's axis (0.8 x 0.6 about its centre): IoU 0.6^2 / (2 *
    # 0.48 - 0.36) = 0.6
    head["offset"] = t["offset"].clone()
    head["rot"] = t["rot"].clone()
    pi_, pj = int(15.3 // cell), int(9.7 // cell)
    head["axis"] = head["axis"].clone()
    head["axis"][0, :, pi_, pj] = -head["axis"][0, :, pi_, pj]
    loss = iou_loss(head, t, t["mask"], cell).detach()
    assert float(loss) == pytest.approx(math.log1p(math.e) - (1.0 + 0.6) / 2, rel=1e-5)


def test_focal_loss_near_zero_for_a_perfect_prediction_larger_when_shifted():
    rng = np.random.default_rng(4)
    boxes, labels = random_boxes(ASYM, 4, 20, rng)
    t = encode_batch([boxes, boxes[:5]], [labels, labels[:5]], ASYM, 4, 3)
    hm = t["heatmap"]
    perfect = torch.where(hm == 1.0, torch.tensor(30.0), torch.tensor(-30.0))
    assert float(focal_loss(perfect, hm)) < 1e-9
    shifted = torch.roll(perfect, 1, dims=-1)
    assert float(focal_loss(shifted, hm)) > 10.0
    # a softer, still centred guess lies in between
    soft = torch.logit(hm.clamp(0.01, 0.99))
    assert 1e-9 < float(focal_loss(soft, hm)) < float(focal_loss(shifted, hm))


def test_focal_loss_formula_normalisation_and_stability():
    torch.manual_seed(0)
    y = torch.rand(2, 3, 6, 5) * 0.9
    y[0, 1, 2, 3] = 1.0
    y[1, 0, 4, 0] = 1.0
    y[1, 2, 0, 4] = 1.0
    x = torch.randn(2, 3, 6, 5) * 3
    p = torch.sigmoid(x.double())
    yd = y.double()
    pos = yd == 1
    ref = -(torch.where(pos, (1 - p) ** 2 * torch.log(p),
                        (1 - yd) ** 4 * p ** 2 * torch.log(1 - p))).sum() / 3
    assert float(focal_loss(x, y)) == pytest.approx(float(ref), rel=1e-5)
    # no positives: normalised by 1, not by 0
    assert math.isfinite(float(focal_loss(x, y * 0.5)))
    # extreme logits: finite loss and gradients
    xe = torch.full((1, 3, 6, 5), 1e4, requires_grad=True)
    ye = torch.zeros(1, 3, 6, 5)
    ye[0, 0, 0, 0] = 1.0
    loss = focal_loss(xe * torch.tensor([1.0, -1.0, 1.0]).view(1, 3, 1, 1), ye)
    loss.backward()
    assert math.isfinite(float(loss.detach())) and torch.isfinite(xe.grad).all()


def test_reg_loss_zero_on_targets_and_l1_per_object():
    rng = np.random.default_rng(5)
    boxes, labels = random_boxes(ASYM, 4, 12, rng)
    t = encode_batch([boxes, boxes[:4]], [labels, labels[:4]], ASYM, 4, 3)
    mask = t["mask"]
    for key, c in REG_KEYS.items():
        assert float(reg_loss(t[key], t[key], mask)) == 0.0
        # off by 0.5 on the centre cells, NaN elsewhere: 0.5 per channel per object
        pred = torch.where(mask[:, None] > 0, t[key] + 0.5, torch.tensor(float("nan")))
        assert float(reg_loss(pred, t[key], mask)) == pytest.approx(0.5 * c)
        w = torch.arange(1.0, c + 1)
        assert float(reg_loss(pred, t[key], mask, w)) == pytest.approx(0.5 * float(w.sum()))
    assert float(reg_loss(t["z"] + 1, t["z"], torch.zeros_like(mask))) == 0.0


# ============================================================================ cache

AUG = data.Augmentation(variants=2, paste={"pedestrian": 3, "cyclist": 2}, frame_step=5)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    out = tmp_path_factory.mktemp("cache")
    stats = data.generate_cache(out, "train", scenes=2, frames_per_scene=2,
                                presets=["vlp16"], grid=SMALL, seed=7, workers=1,
                                augmentation=AUG)
    return out, stats


def test_cache_round_trip_equals_rasterizer_up_to_quantization(cache):
    out, stats = cache
    ds = data.CachedBEVDataset(out, crop=None, min_points=0)
    assert len(ds) == stats["samples"] == 2 * 2 * 2
    m = ds.manifest["mask"]
    z = SMALL.z_slices
    rasterizer = Rasterizer(SMALL)
    for index in (0, 3, 5):       # scenes 0 and 1, frames 0 and 5, variants 0 and 1
        item = ds[index]
        raw = data.regenerate(out, index)
        ref = rasterizer(raw.points)[0][0]
        assert item["bev"].shape == ref.shape == (SMALL.channels, *SMALL.shape)
        assert torch.equal(item["bev"][:z], ref[:z])                     # occupancy: exact
        assert (item["bev"][z] - ref[z]).abs().max() <= 1 / 510 + 1e-7    # intensity: uint8
        assert (item["bev"][z + 1] - ref[z + 1]).abs().max() <= 1e-6      # density: count
        assert torch.equal(item["mask"], occupancy_mask(
            raw.points, SMALL, min_points=m["min_points"], min_height=m["min_height"],
            ground_cell=m["ground_cell"], dilation=m["dilation"]))
        x, y = raw.boxes[:, 0].astype(np.float64), raw.boxes[:, 1].astype(np.float64)
        inside = (x >= SMALL.x_min) & (x < SMALL.x_max) & (y >= SMALL.y_min) & (y < SMALL.y_max)
        np.testing.assert_array_equal(item["boxes"].numpy(), raw.boxes[inside])
        np.testing.assert_array_equal(item["labels"].numpy(), raw.labels[inside])
        np.testing.assert_array_equal(item["num_points"].numpy(), raw.num_points[inside])


def test_pack_unpack_handles_saturated_density_and_windows():
    rng = np.random.default_rng(6)
    # clusters of 1 .. 200 points per cell (density saturates at 64) plus scattered points
    centres = rng.uniform(-19, 19, (40, 2))
    counts = rng.integers(1, 200, 40)
    pts = [np.column_stack([np.repeat(c[None], n, 0) + rng.uniform(0, 0.05, (n, 2)),
                            rng.uniform(-2.9, 1.9, n), rng.uniform(0, 300, n)])
           for c, n in zip(centres, counts)]
    pts.append(np.column_stack([rng.uniform(-20, 20, (3000, 2)), rng.uniform(-3.5, 2.5, 3000),
                                rng.uniform(0, 255, 3000)]))
    pts = np.concatenate(pts).astype(np.float32)
    bev = Rasterizer(SMALL)(pts)[0][0]
    occ = occupancy_mask(pts, SMALL, dilation=0)
    arrays = data.pack_sample(bev, occ, SMALL)
    assert arrays["count"].max() == SMALL.density_saturation
    back = data.unpack_sample(arrays, SMALL)
    z = SMALL.z_slices
    assert torch.equal(back[:z], bev[:z])
    assert (back[z + 1] - bev[z + 1]).abs().max() <= 1e-6
    assert (back[z] - bev[z]).abs().max() <= 1 / 510 + 1e-7
    win = data.unpack_sample(arrays, SMALL, (40, 8, 64, 96))
    assert torch.equal(win, back[:, 40:104, 8:104])
    rows, cols = data.occupied_cells(arrays, SMALL, (0, 0, *SMALL.shape))
    got = np.zeros(SMALL.shape, bool)
    got[rows, cols] = True
    np.testing.assert_array_equal(got, occ.numpy())


@pytest.fixture(scope="module")
def frame():
    scene = generate_scene(3, duration=0.0)
    return render_frame(scene, get_lidar("vlp16", mount_height=1.8), 0)


@pytest.mark.parametrize("angle, flip, scale", [
    (0.7, False, 1.0), (math.pi - 1e-4, True, 1.05), (-math.pi + 1e-4, False, 0.95),
    (-2.1, True, 1.03)])
def test_global_augmentation_keeps_every_boxs_points(frame, angle, flip, scale):
    before = points_in_boxes(frame.points, frame.boxes).sum(1)
    assert before.sum() > 100
    p, b = data.apply_global(frame.points, frame.boxes, angle, flip, scale)
    np.testing.assert_array_equal(points_in_boxes(p, b).sum(1), before)
    assert np.all(np.abs(b[:, 6]) <= math.pi)
    np.testing.assert_allclose(b[:, 3:6], frame.boxes[:, 3:6] * scale, rtol=1e-6)


def test_tilt_rotates_points_and_centres_keeps_boxes_upright(frame):
    pitch, roll = math.radians(2.0), math.radians(-1.5)
    r = data.tilt_matrix(pitch, roll)
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
    # the box centres, as points, land on the tilted boxes' centres
    centres = np.column_stack([frame.boxes[:, :3], np.zeros(len(frame.boxes))])
    p, b = data.apply_tilt(np.concatenate([frame.points, centres]), frame.boxes, pitch, roll)
    np.testing.assert_allclose(p[len(frame.points):, :3], b[:, :3], atol=1e-5)
    np.testing.assert_allclose(p[:len(frame.points), :3],
                               frame.points[:, :3].astype(np.float64) @ r.T, atol=1e-4)
    np.testing.assert_array_equal(b[:, 3:], frame.boxes[:, 3:])
    np.testing.assert_array_equal(p[:len(frame.points), 3], frame.points[:, 3])
    # R = Rx(roll) @ Ry(pitch): a point ahead goes down for a positive pitch
    assert (r @ [10.0, 0.0, 0.0])[2] < 0
    np.testing.assert_allclose(data.tilt_matrix(0.0, 0.0), np.eye(3))


def test_scene_plan_draws_mounting_in_range_and_rotates_presets():
    aug = data.Augmentation()
    jobs = data.plan_scenes("train", 12, data.DEFAULT_PRESETS, 0, aug)
    assert [j.preset for j in jobs[:4]] == list(data.DEFAULT_PRESETS)
    assert [j.preset for j in jobs[4:8]] == list(data.DEFAULT_PRESETS)
    assert all(1.5 <= j.mount_height <= 2.2 for j in jobs)
    tilt = math.radians(2.0)
    assert all(abs(j.pitch) <= tilt and abs(j.roll) <= tilt for j in jobs)
    assert len({j.mount_height for j in jobs}) == 12
    val = data.plan_scenes("val", 2, ["vlp16"], 0, aug)
    assert [j.seed for j in val] == [100_000, 100_001]


def test_paste_avoids_collisions_and_clears_the_pasted_box():
    aug = data.Augmentation(paste={"pedestrian": 6, "cyclist": 0})
    jobs = data.plan_scenes("train", 3, ["hdl32e"], 0, aug)
    bank = data.build_bank(jobs, aug, duration=0.0)
    assert len(bank["boxes"]) > 6 and set(bank["labels"].tolist()) == {1}
    job = jobs[0]
    lidar = get_lidar(job.preset, mount_height=job.mount_height)
    f = render_frame(generate_scene(job.seed, duration=0.0), lidar, 0)
    base = data.RawSample(f.points, f.owner, f.boxes,
                          np.array([CLASSES.index(c) for c in f.labels]),
                          f.num_points, np.zeros(len(f.boxes), bool), {})
    out = data.paste_objects(base, bank, job.preset, job.mount_height, aug.paste,
                             np.random.default_rng(0))
    new = out.boxes[out.pasted]
    assert 1 <= len(new) <= 6 and np.all(out.labels[out.pasted] == 1)
    iou = bev_iou(out.boxes, out.boxes)
    np.fill_diagonal(iou, 0.0)
    assert iou[out.pasted].max() == 0.0
    # only the pasted object's own points are left in its box; it stands on this ground
    inside = points_in_boxes(out.points, new)
    assert not np.any(inside[:, out.owner != data.PASTED])
    np.testing.assert_allclose(new[:, 2] - new[:, 5] / 2, -job.mount_height, atol=1e-5)
    assert np.sum(out.owner == data.PASTED) == out.num_points[out.pasted].sum()


def test_cache_pastes_objects_and_records_the_run(cache):
    out, stats = cache
    m = json.loads((out / data.MANIFEST).read_text())
    assert m["split"] == "train" and m["presets"] == ["vlp16"] and m["seed"] == 7
    assert m["scene_seeds"] == [0, 1] and m["grid"] == SMALL.to_dict()
    assert m["augmentation"] == AUG.to_dict() and m["classes"] == list(CLASSES)
    assert len(m["samples"]) == stats["samples"] == 8
    assert m["counts"]["pasted"] == sum(s["pasted"] for s in m["samples"]) > 0
    assert sum(m["counts"]["boxes"].values()) == sum(s["boxes"] for s in m["samples"])
    assert stats["bytes_per_sample"] > 0 and stats["seconds_per_sample"] > 0
    for s in m["samples"]:
        assert (out / s["file"]).stat().st_size == s["bytes"]
        assert 1.5 <= s["mount_height"] <= 2.2 and 0.95 <= s["scale"] <= 1.05
    with pytest.raises(FileExistsError, match="overwrite=True"):
        data.generate_cache(out, "train", scenes=1, presets=["vlp16"], grid=SMALL)


def test_crop_is_a_sub_grid_and_shifts_boxes_consistently(cache):
    out, _ = cache
    full = data.CachedBEVDataset(out, crop=None, min_points=0)
    cropped = data.CachedBEVDataset(out, crop=64, min_points=0)
    res = SMALL.resolution
    stride = 4
    for index, origin in ((0, (64, 96)), (3, (0, 128)), (5, (128, 0)), (6, (40, 72))):
        a, c = full[index], cropped.load(index, origin)
        r0, c0 = origin
        g = c["grid"]
        assert g.shape == (64, 64) and c["origin"] == origin
        assert g.x_min == pytest.approx(SMALL.x_min + r0 * res)
        assert g.y_min == pytest.approx(SMALL.y_min + c0 * res)
        assert torch.equal(c["bev"], a["bev"][:, r0:r0 + 64, c0:c0 + 64])
        assert torch.equal(c["mask"], a["mask"][r0:r0 + 64, c0:c0 + 64])
        x, y = a["boxes"][:, 0].double(), a["boxes"][:, 1].double()
        keep = (x >= g.x_min) & (x < g.x_max) & (y >= g.y_min) & (y < g.y_max)
        assert torch.equal(c["boxes"], a["boxes"][keep])
        assert torch.equal(c["labels"], a["labels"][keep])
        # every kept box has the same cell in the crop as in the full grid, shifted by origin
        ci = torch.floor((c["boxes"][:, 0].double() - g.x_min) / res)
        fi = torch.floor((c["boxes"][:, 0].double() - SMALL.x_min) / res)
        assert torch.equal(fi - ci, torch.full_like(ci, float(r0)))
        # targets on the crop's grid = the full grid's targets cut (origins are multiples of 4)
        tc = encode(c["boxes"], c["labels"], g, stride, 3)
        tf = encode(a["boxes"], a["labels"], SMALL, stride, 3)
        sl = (slice(r0 // stride, r0 // stride + 16), slice(c0 // stride, c0 // stride + 16))
        assert torch.equal(tc["mask"], tf["mask"][sl])
        for key in ("offset", "z", "size", "rot"):
            torch.testing.assert_close(tc[key], tf[key][(slice(None), *sl)], rtol=0,
                                       atol=1e-5)
    assert any(len(cropped.load(i, (64, 64))["boxes"]) for i in range(len(cropped)))


def test_random_crops_are_aligned_and_batch(cache):
    out, _ = cache
    ds = data.CachedBEVDataset(out, crop=64, align=8)
    torch.manual_seed(0)
    items = [ds[i % len(ds)] for i in range(24)]
    H, W = SMALL.shape
    origins = {it["origin"] for it in items}
    assert len(origins) > 5
    assert all(r % 8 == 0 and c % 8 == 0 and 0 <= r <= H - 64 and 0 <= c <= W - 64
               for r, c in origins)
    batch = data.collate(items[:4])
    assert batch["bev"].shape == (4, SMALL.channels, 64, 64)
    assert batch["mask"].shape == (4, 64, 64) and batch["mask"].dtype == torch.bool
    assert batch["origin"].tolist() == [list(it["origin"]) for it in items[:4]]
    t = encode_batch(batch["boxes"], batch["labels"], batch["grid"], 4, 3)
    assert t["heatmap"].shape == (4, 3, 16, 16)


def test_class_remap_and_min_points(cache):
    out, _ = cache
    base = data.CachedBEVDataset(out, crop=None, min_points=0)
    ds = data.CachedBEVDataset(out, crop=None, classes=("cyclist", "car"), min_points=80)
    few = 0
    for i in range(len(ds)):
        a, b = base[i], ds[i]
        names = [CLASSES[k] for k in a["labels"].tolist()]
        keep = np.array([n in ("cyclist", "car") for n in names], bool)
        few += int(np.sum(keep & (a["num_points"].numpy() < 80)))
        keep &= a["num_points"].numpy() >= 80
        assert torch.equal(b["boxes"], a["boxes"][torch.from_numpy(keep)])
        assert [("cyclist", "car")[k] for k in b["labels"].tolist()] == \
            [n for n, k in zip(names, keep) if k]
    assert few > 0                                   # the point filter did drop boxes
    with pytest.raises(ValueError, match="not in the cache"):
        data.CachedBEVDataset(out, classes=("truck",))


def test_generation_is_deterministic_for_a_seed_and_any_workers(cache, tmp_path):
    out, _ = cache
    again = tmp_path / "again"
    data.generate_cache(again, "train", scenes=2, frames_per_scene=2, presets=["vlp16"],
                        grid=SMALL, seed=7, workers=2, augmentation=AUG)
    m1 = json.loads((out / data.MANIFEST).read_text())
    m2 = json.loads((again / data.MANIFEST).read_text())
    assert m1["samples"] == m2["samples"] and m1["counts"] == m2["counts"]
    for name in [s["file"] for s in m1["samples"]] + [data.BANK_FILE]:
        with np.load(out / name) as a, np.load(again / name) as b:
            assert a.files == b.files
            for k in a.files:
                np.testing.assert_array_equal(a[k], b[k])
    # another seed gives other augmentations
    other = tmp_path / "other"
    data.generate_cache(other, "train", scenes=1, frames_per_scene=1, presets=["vlp16"],
                        grid=SMALL, seed=8, workers=1, augmentation=AUG)
    m3 = json.loads((other / data.MANIFEST).read_text())
    assert m3["samples"][0]["angle"] != m1["samples"][0]["angle"]


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(presets=["hdl65"]), ValueError, "unknown LiDAR preset"),
    (dict(split="training"), ValueError, "split must be one of"),
    (dict(frames_per_scene=0), ValueError, "frames_per_scene"),
])
def test_generate_cache_rejects_bad_settings(tmp_path, kwargs, error, message):
    args = dict(split="train", scenes=1, presets=["vlp16"], grid=SMALL)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        data.generate_cache(tmp_path / "c", **args)


def test_dataset_rejects_bad_crop_and_missing_cache(cache, tmp_path):
    out, _ = cache
    with pytest.raises(ValueError, match="crop must be None or an int"):
        data.CachedBEVDataset(out, crop=1000)
    with pytest.raises(ValueError, match="outside the"):
        data.CachedBEVDataset(out, crop=64).load(0, (150, 0))
    with pytest.raises(FileNotFoundError, match="not a training cache"):
        data.CachedBEVDataset(tmp_path)
    with pytest.raises(ValueError, match="Augmentation.scale"):
        data.Augmentation(scale=(1.1, 0.9))


def test_cache_command_paste_option_adds_classes_to_the_default_paste(monkeypatch, tmp_path,
                                                                     capsys):
    import argparse

    from sparse_detector_ros.tools import cache_cli

    seen = {}
    monkeypatch.setattr(data, "generate_cache",
                        lambda *a, augmentation, mask, **k:
                        seen.update(aug=augmentation, mask=mask) or {})
    parser = argparse.ArgumentParser()
    cache_cli.add_arguments(parser)

    def run(*argv):
        assert cache_cli.run(parser.parse_args(["--out", str(tmp_path / "c"), *argv])) == 0
        return dict(seen["aug"].paste)

    default = dict(data.Augmentation().paste)
    assert run() == default
    assert run("--paste", "car=4") == {**default, "car": 4}
    assert run("--paste", "car=3", "cyclist=0", "--variants", "1") == {**default, "car": 3,
                                                                       "cyclist": 0}
    assert seen["aug"].variants == 1
    assert seen["mask"] == MaskConfig()          # the runtime default unless asked
    run("--occupancy-min-points", "2")
    assert seen["mask"].occupancy_min_points == 2
    assert seen["mask"].occupancy_dilation == MaskConfig().occupancy_dilation
    for bad in ("0", "x"):
        with pytest.raises(SystemExit):
            run("--occupancy-min-points", bad)
        assert f"argument --occupancy-min-points: {bad!r}: expected an int >= 1" in \
            capsys.readouterr().err
    for bad in ("car", "car=x", "=2"):        # not CLASS=N: argparse's one-line error
        with pytest.raises(SystemExit):
            run("--paste", bad)
        assert f"argument --paste: {bad!r}: expected CLASS=N" in capsys.readouterr().err
    for bad in ("bus=2", "car=-1"):            # the augmentation names what it takes
        with pytest.raises(ValueError, match=r"Augmentation.paste = .*must map classes of"):
            run("--paste", bad)
