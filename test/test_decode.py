"""Decoding of the head into boxes (sparse_detector_ros.model.decode): round trip of boxes placed
on head maps, peak picking, per-class thresholds, top-K, class-aware NMS, the active mask, the
batch, empty outputs and input checks."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sparse_detector_ros.config import GridConfig
from sparse_detector_ros.model.decode import Detections, decode, window_max

# asymmetric grid: x in [0, 80], y in [-20, 40] at 0.2 m -> 400 x 300 cells, 100 x 75 at stride 4
GRID = GridConfig(x_min=0.0, x_max=80.0, y_min=-20.0, y_max=40.0, resolution=0.2)
STRIDE = 4
CELL = STRIDE * GRID.resolution
HO, WO = 100, 75
BACKGROUND = -10.0          # logit of empty cells (score 4.5e-5)


def blank_head(n: int = 1, k: int = 3, ho: int = HO, wo: int = WO) -> dict[str, torch.Tensor]:
    """A head with no object: background heatmap, unit boxes at the cell centres."""
    return {
        "heatmap": torch.full((n, k, ho, wo), BACKGROUND),
        "offset": torch.full((n, 2, ho, wo), 0.5),
        "z": torch.zeros(n, 1, ho, wo),
        "size": torch.zeros(n, 3, ho, wo),
        "rot": torch.cat([torch.zeros(n, 1, ho, wo), torch.ones(n, 1, ho, wo)], 1),
    }


def place_boxes(head, boxes, labels, logits, b: int = 0, grid: GridConfig = GRID,
                stride: int = STRIDE) -> np.ndarray:
    """Writes ``boxes`` (M, 7) (x, y, z, l, w, h, yaw) of classes ``labels`` (M,) onto batch item
    ``b`` of ``head``: the logit ``logits`` (M,) at the cell holding each centre, the regression
    values (offset in the cell, z, log sizes, sin/cos yaw) there. Returns the cells (M, 2)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 7)
    cell = stride * grid.resolution
    u = (boxes[:, 0] - grid.x_min) / cell
    v = (boxes[:, 1] - grid.y_min) / cell
    i, j = np.floor(u).astype(np.int64), np.floor(v).astype(np.int64)
    ho, wo = head["heatmap"].shape[-2:]
    assert ((i >= 0) & (i < ho) & (j >= 0) & (j < wo)).all(), "box centre off the grid"
    assert len({(a, c) for a, c in zip(i, j)}) == len(i), "two boxes in one cell"
    ti, tj = torch.as_tensor(i), torch.as_tensor(j)
    f32 = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    head["heatmap"][b, torch.as_tensor(np.asarray(labels)), ti, tj] = f32(logits)
    head["offset"][b, :, ti, tj] = f32(np.stack([u - i, v - j]))
    head["z"][b, 0, ti, tj] = f32(boxes[:, 2])
    head["size"][b, :, ti, tj] = f32(np.log(boxes[:, 3:6]).T)
    head["rot"][b, :, ti, tj] = f32(np.stack([np.sin(boxes[:, 6]), np.cos(boxes[:, 6])]))
    return np.stack([i, j], 1)


def cell_centre(i: int, j: int) -> tuple[float, float]:
    return GRID.x_min + (i + 0.5) * CELL, GRID.y_min + (j + 0.5) * CELL


def car(i: int, j: int, yaw: float = 0.0) -> list[float]:
    """A 4.5 x 2 m box centred in output cell (i, j)."""
    return [*cell_centre(i, j), -1.0, 4.5, 2.0, 1.6, yaw]


def sigmoid32(logit: float) -> float:
    return float(torch.sigmoid(torch.tensor(logit, dtype=torch.float32)))


def wrap(a):
    return (a + np.pi) % (2 * np.pi) - np.pi


def assert_boxes_close(got, want):
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape
    np.testing.assert_allclose(got[:, :3], want[:, :3], rtol=0, atol=1e-5)
    np.testing.assert_allclose(got[:, 3:6], want[:, 3:6], rtol=1e-6, atol=0)
    assert np.abs(wrap(got[:, 6] - want[:, 6])).max(initial=0) < 1e-6


def random_boxes(rng, m: int, spacing: int = 3, grid: GridConfig = GRID):
    """``m`` boxes in distinct output cells ``spacing`` apart (so that no two share a pooling
    window) with realistic sizes; the first ones sit at cell edges and have yaw near +-pi."""
    lattice = [(i, j) for i in range(0, HO, spacing) for j in range(0, WO, spacing)]
    cells = np.array(lattice)[rng.choice(len(lattice), m, replace=False)]
    frac = rng.uniform(0, 1, (m, 2))
    edges = [[0.0, 0.0], [1 - 1e-7, 0.0], [0.0, 1 - 1e-7], [1 - 1e-7, 1 - 1e-7]]
    frac[:4] = edges[:m]
    yaw = rng.uniform(-np.pi, np.pi, m)
    special = [np.pi, -np.pi, np.pi - 1e-6, -np.pi + 1e-6, np.pi / 2, -np.pi / 2, 0.0, 3.14159]
    yaw[:8] = special[:m]
    boxes = np.stack([
        grid.x_min + (cells[:, 0] + frac[:, 0]) * CELL,
        grid.y_min + (cells[:, 1] + frac[:, 1]) * CELL,
        rng.uniform(-3.0, 2.0, m),
        rng.uniform(0.3, 12.0, m), rng.uniform(0.3, 3.0, m), rng.uniform(0.5, 4.0, m),
        yaw], 1)
    return boxes


# ----------------------------------------------------------------------------- round trip

# the same cells with the x range shifted: x_min is used, and is not 0
SHIFTED = GridConfig(x_min=-12.0, x_max=68.0, y_min=-20.0, y_max=40.0, resolution=0.2)


@pytest.mark.parametrize("grid", [GRID, SHIFTED])
def test_round_trip_random_boxes(grid):
    rng = np.random.default_rng(0)
    m = 150
    boxes = random_boxes(rng, m, grid=grid)
    labels = rng.integers(0, 3, m)
    logits = rng.permutation(np.linspace(-0.5, 6.0, m))   # distinct scores in [0.38, 0.998]
    head = blank_head()
    place_boxes(head, boxes, labels, logits, grid=grid)
    (det,) = decode(head, grid, STRIDE, [0.3, 0.3, 0.3], top_k=1000, nms_iou=1.0)
    order = np.argsort(-logits)
    assert len(det) == m
    assert det.boxes.dtype == torch.float32 and det.scores.dtype == torch.float32
    assert det.labels.dtype == torch.int64
    got_boxes, got_scores, got_labels = det.numpy()
    assert_boxes_close(got_boxes, boxes[order])
    np.testing.assert_array_equal(got_labels, labels[order])
    np.testing.assert_allclose(got_scores, 1 / (1 + np.exp(-logits[order])), rtol=1e-6)
    assert (np.diff(got_scores) < 0).all()                # sorted by descending score


def test_round_trip_through_nms_of_separate_boxes():
    """Boxes that do not overlap all come back through the default NMS."""
    rng = np.random.default_rng(1)
    boxes = random_boxes(rng, 60, spacing=6)
    # footprints within 1.77 m of their centre; centres >= 5 cells = 4 m apart: no overlap
    boxes[:, 3:5] = rng.uniform(0.3, 2.5, (60, 2))
    labels = np.zeros(60, np.int64)
    logits = rng.permutation(np.linspace(0.0, 4.0, 60))
    head = blank_head()
    place_boxes(head, boxes, labels, logits)
    (det,) = decode(head, GRID, STRIDE, [0.1] * 3, top_k=100, nms_iou=0.01)
    assert len(det) == 60
    assert_boxes_close(det.boxes, boxes[np.argsort(-logits)])


# ----------------------------------------------------------------------------- peak picking

def test_neighbour_with_lower_score_is_not_a_peak():
    head = blank_head()
    place_boxes(head, [car(10, 10)], [0], [3.0])
    head["heatmap"][0, 0, 10, 11] = 2.0                   # above the threshold, but lower
    head["heatmap"][0, 0, 11, 9] = 2.5
    (det,) = decode(head, GRID, STRIDE, [0.1] * 3, nms_iou=1.0)
    assert len(det) == 1
    assert det.scores[0].item() == pytest.approx(sigmoid32(3.0))
    assert_boxes_close(det.boxes, [car(10, 10)])


@pytest.mark.parametrize("cells", [[(10, 10), (10, 11)],              # same row
                                   [(10, 10), (11, 9)],               # next row, left
                                   [(10 + a, 10 + c) for a in range(3) for c in range(3)]])
def test_plateau_gives_one_peak_at_its_first_cell(cells):
    head = blank_head()
    for i, j in cells:
        head["heatmap"][0, 1, i, j] = 2.0
    (det,) = decode(head, GRID, STRIDE, [0.1] * 3, nms_iou=1.0)
    assert len(det) == 1
    assert det.labels.tolist() == [1]
    np.testing.assert_allclose(det.boxes[0, :2].numpy(), cell_centre(*min(cells)), atol=1e-5)


def test_peaks_further_than_half_the_pool_apart_both_survive():
    head = blank_head()
    place_boxes(head, [car(20, 20), car(20, 22), car(24, 20)], [2, 2, 2], [2.0, 1.5, 1.0])
    (det,) = decode(head, GRID, STRIDE, [0.1] * 3, nms_iou=1.0, pool=3)
    assert len(det) == 3
    # a 5 x 5 window reaches the peak two cells away: only the higher of that pair survives
    (det5,) = decode(head, GRID, STRIDE, [0.1] * 3, nms_iou=1.0, pool=5)
    assert det5.scores.tolist() == pytest.approx([sigmoid32(2.0), sigmoid32(1.0)])
    # pool 1: every cell above the threshold is a peak
    head["heatmap"][0, 2, 30, 30:33] = torch.tensor([1.0, 1.2, 1.1])
    (det1,) = decode(head, GRID, STRIDE, [0.1] * 3, nms_iou=1.0, pool=1)
    assert len(det1) == 6


@pytest.mark.parametrize("pool", [1, 3, 5, 7])
@pytest.mark.parametrize("shape", [(2, 3, 17, 9), (1, 1, 2, 5), (1, 2, 1, 1)])
def test_window_max_equals_max_pool2d(pool, shape):
    x = torch.randn(*shape)
    x[..., 0, 0] = 5.0                                    # maxima on the border too
    x[..., -1, -1] = 6.0
    x.view(-1)[::3] = x.view(-1)[1]                       # ties
    want = torch.nn.functional.max_pool2d(x, pool, stride=1, padding=pool // 2)
    assert torch.equal(window_max(x, pool), want)


def test_saturated_scores_still_give_the_highest_logit():
    """Logits above ~17 all have score 1.0 in float32: the peak is still the highest logit."""
    head = blank_head()
    place_boxes(head, [car(40, 40)], [0], [30.0])
    head["heatmap"][0, 0, 39, 40] = 20.0                  # earlier cell, same score 1.0
    (det,) = decode(head, GRID, STRIDE, [0.5] * 3, nms_iou=1.0)
    assert len(det) == 1
    assert_boxes_close(det.boxes, [car(40, 40)])


# ----------------------------------------------------------------------------- selection

def test_per_class_thresholds():
    head = blank_head()
    logit = 0.4                                           # score 0.5987
    place_boxes(head, [car(10, 10), car(30, 30), car(50, 50)], [0, 1, 2], [logit] * 3)
    (det,) = decode(head, GRID, STRIDE, [0.7, 0.5, 0.55])
    assert sorted(det.labels.tolist()) == [1, 2]
    (det,) = decode(head, GRID, STRIDE, [0.55, 0.5, 0.7])
    assert sorted(det.labels.tolist()) == [0, 1]
    # a score equal to the threshold is kept
    (det,) = decode(head, GRID, STRIDE, [sigmoid32(logit), 1.0, 1.0])
    assert det.labels.tolist() == [0]


def test_top_k_keeps_the_highest_over_all_classes():
    rng = np.random.default_rng(2)
    m = 12
    boxes = random_boxes(rng, m, spacing=8)
    labels = np.arange(m) % 3
    logits = rng.permutation(np.linspace(0.0, 3.0, m))
    head = blank_head()
    place_boxes(head, boxes, labels, logits)
    (det,) = decode(head, GRID, STRIDE, [0.1] * 3, top_k=5, nms_iou=1.0)
    best = np.argsort(-logits)[:5]
    np.testing.assert_allclose(det.scores.numpy(), 1 / (1 + np.exp(-logits[best])), rtol=1e-6)
    np.testing.assert_array_equal(det.labels.numpy(), labels[best])
    assert_boxes_close(det.boxes, boxes[best])


def test_nms_removes_the_lower_of_overlapping_boxes_of_one_class_only():
    # two cars 1.6 m apart along their length: BEV IoU 5.8 / 12.2 = 0.48
    boxes = [car(20, 20), car(22, 20)]
    same = blank_head()
    place_boxes(same, boxes, [1, 1], [2.0, 3.0])
    (det,) = decode(same, GRID, STRIDE, [0.1] * 3, nms_iou=0.2)
    assert det.labels.tolist() == [1]
    assert det.scores.tolist() == pytest.approx([sigmoid32(3.0)])
    assert_boxes_close(det.boxes, [car(22, 20)])
    (det,) = decode(same, GRID, STRIDE, [0.1] * 3, nms_iou=0.5)    # IoU below: both stay
    assert len(det) == 2
    for skip in (1.0, 1.5):                                        # NMS skipped
        (det,) = decode(same, GRID, STRIDE, [0.1] * 3, nms_iou=skip)
        assert len(det) == 2

    other = blank_head()
    place_boxes(other, boxes, [0, 1], [2.0, 3.0])
    (det,) = decode(other, GRID, STRIDE, [0.1] * 3, nms_iou=0.2)
    assert det.labels.tolist() == [1, 0]
    assert_boxes_close(det.boxes, [car(22, 20), car(20, 20)])


def test_active_drops_peaks_outside():
    head = blank_head()
    place_boxes(head, [car(10, 10), car(60, 50)], [0, 2], [2.0, 1.0])
    active = torch.zeros(1, HO, WO, dtype=torch.bool)
    active[:, 56:64, 48:56] = True                        # an active tile around the 2nd peak
    (det,) = decode(head, GRID, STRIDE, [0.1] * 3, active=active)
    assert det.labels.tolist() == [2]
    assert_boxes_close(det.boxes, [car(60, 50)])
    (det,) = decode(head, GRID, STRIDE, [0.1] * 3, active=torch.ones(1, HO, WO, dtype=torch.bool))
    assert det.labels.tolist() == [0, 2]


def test_empty_output_shapes_and_dtypes():
    head = blank_head(n=2)
    dets = decode(head, GRID, STRIDE, [0.1] * 3)
    assert len(dets) == 2
    for det in [*dets, Detections.empty()]:
        assert len(det) == 0
        assert det.boxes.shape == (0, 7) and det.boxes.dtype == torch.float32
        assert det.scores.shape == (0,) and det.scores.dtype == torch.float32
        assert det.labels.shape == (0,) and det.labels.dtype == torch.int64
        boxes, scores, labels = det.numpy()
        assert boxes.shape == (0, 7) and boxes.dtype == np.float32
        assert labels.dtype == np.int64


def test_batch_of_two_with_different_contents():
    rng = np.random.default_rng(3)
    head = blank_head(n=2)
    b0 = random_boxes(rng, 5, spacing=10)
    b1 = random_boxes(rng, 3, spacing=10)
    place_boxes(head, b0, [0, 1, 2, 0, 1], [1.0, 2.0, 3.0, 4.0, 5.0], b=0)
    place_boxes(head, b1, [2, 2, 1], [3.5, 2.5, 1.5], b=1)
    d0, d1 = decode(head, GRID, STRIDE, [0.1] * 3, nms_iou=1.0)
    assert_boxes_close(d0.boxes, b0[::-1])
    assert d0.labels.tolist() == [1, 0, 2, 1, 0]
    assert_boxes_close(d1.boxes, b1)
    assert d1.labels.tolist() == [2, 2, 1]
    # each item alone decodes the same
    for b, want in ((0, d0), (1, d1)):
        single = {key: t[b:b + 1] for key, t in head.items()}
        (got,) = decode(single, GRID, STRIDE, [0.1] * 3, nms_iou=1.0)
        assert torch.equal(got.boxes, want.boxes) and torch.equal(got.labels, want.labels)


def test_head_requiring_grad_gives_detached_detections():
    head = blank_head()
    place_boxes(head, [car(10, 10)], [0], [2.0])
    head = {key: t.clone().requires_grad_() for key, t in head.items()}
    (det,) = decode(head, GRID, STRIDE, [0.1] * 3)
    assert len(det) == 1 and not det.boxes.requires_grad and not det.scores.requires_grad


# ----------------------------------------------------------------------------- Detections

def test_detections_helpers():
    det = Detections(torch.zeros(2, 7), torch.tensor([0.9, 0.5]), torch.tensor([1, 0]))
    assert len(det) == 2
    assert det.to("cpu").device == torch.device("cpu")
    boxes, scores, labels = det.numpy()
    assert isinstance(boxes, np.ndarray) and scores.tolist() == pytest.approx([0.9, 0.5])
    assert labels.tolist() == [1, 0]
    with pytest.raises(ValueError, match="scores"):
        Detections(torch.zeros(2, 7), torch.zeros(3), torch.zeros(2, dtype=torch.int64))


# ----------------------------------------------------------------------------- input checks

def _without(key):
    head = blank_head()
    del head[key]
    return head


def _with(key, value):
    head = blank_head()
    head[key] = value
    return head


@pytest.mark.parametrize("head, kwargs, message", [
    (_without("rot"), {}, r"missing the key\(s\) \['rot'\]"),
    (_with("size", torch.zeros(1, 2, HO, WO)), {}, r"head\['size'\] must have shape"),
    (_with("offset", torch.zeros(1, 2, HO, WO - 1)), {}, r"head\['offset'\]"),
    (_with("heatmap", torch.zeros(3, HO, WO)), {}, r"head\['heatmap'\] must be 4-D"),
    (_with("z", torch.zeros(1, 1, HO, WO, dtype=torch.int64)), {}, r"head\['z'\].*floating"),
    (blank_head(), {"score_thresholds": [0.3, 0.3]}, r"score_thresholds has 2 values .* 3"),
    (blank_head(), {"score_thresholds": [0.3, 1.5, 0.3]}, r"score_thresholds must be in"),
    (blank_head(), {"stride": 2}, r"stride 2"),
    (blank_head(), {"stride": 4.0}, r"stride must be an int"),
    (blank_head(), {"active": torch.ones(1, HO, WO + 1, dtype=torch.bool)}, r"active .*shape"),
    (blank_head(), {"top_k": 0}, r"top_k"),
    (blank_head(), {"pool": 2}, r"pool must be an odd"),
    (blank_head(), {"nms_iou": -0.1}, r"nms_iou"),
])
def test_bad_input_names_what_is_wrong(head, kwargs, message):
    args = {"stride": STRIDE, "score_thresholds": [0.3] * 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        decode(head, GRID, args.pop("stride"), args.pop("score_thresholds"), **args)


def test_output_grid_may_round_up():
    """A 3-cell BEV at stride 2 gives a 2-cell head (convolutions round up); 1 is allowed too."""
    grid = GridConfig(x_min=0.0, x_max=0.6, y_min=0.0, y_max=0.6, resolution=0.2)
    for cells in (1, 2):
        head = blank_head(k=1, ho=cells, wo=cells)
        head["heatmap"][0, 0, 0, 0] = 1.0
        (det,) = decode(head, grid, 2, [0.5])
        assert det.boxes[0, :2].tolist() == pytest.approx([0.2, 0.2])


# ----------------------------------------------------------------------------- CUDA

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(4)
    head = blank_head(n=2)
    for b in range(2):
        boxes = random_boxes(rng, 40)
        place_boxes(head, boxes, rng.integers(0, 3, 40), rng.uniform(-1, 4, 40), b=b)
    cpu = decode(head, GRID, STRIDE, [0.3] * 3, top_k=30)
    gpu = decode({k: t.cuda() for k, t in head.items()}, GRID, STRIDE, [0.3] * 3, top_k=30)
    for c, g in zip(cpu, gpu):
        assert g.device.type == "cuda"
        assert torch.equal(c.labels, g.labels.cpu())
        torch.testing.assert_close(c.scores, g.scores.cpu())
        torch.testing.assert_close(c.boxes, g.boxes.cpu(), rtol=1e-6, atol=1e-5)


def test_yaw_is_atan2_of_sin_and_cos():
    head = blank_head()
    place_boxes(head, [car(10, 10, yaw=0.3)], [0], [2.0])
    head["rot"][0, :, 10, 10] = torch.tensor([2.0 * math.sin(2.5), 2.0 * math.cos(2.5)])
    (det,) = decode(head, GRID, STRIDE, [0.1] * 3)
    assert det.boxes[0, 6].item() == pytest.approx(2.5, abs=1e-6)


@pytest.mark.parametrize("axis_yaw_,rot_yaw,want", [
    (2.7, 2.5, 2.7),                         # rot near the axis: the axis as it is
    (2.7, -0.5, 2.7 - math.pi),              # rot the other way: the axis turned round
    (math.pi - 0.05, -math.pi + 0.1, math.pi - 0.05),   # across the +-pi seam
    (0.3, 0.3 + math.pi / 2 - 0.01, 0.3),    # just under 90 degrees off: no turn
])
def test_axis_sets_the_footprint_and_rot_the_direction(axis_yaw_, rot_yaw, want):
    head = blank_head()
    head["axis"] = torch.zeros(1, 2, HO, WO)
    place_boxes(head, [car(10, 10, yaw=rot_yaw)], [0], [2.0])
    # a scaled axis vector: only its angle counts
    head["axis"][0, :, 10, 10] = torch.tensor([3.0 * math.sin(2 * axis_yaw_),
                                                3.0 * math.cos(2 * axis_yaw_)])
    (det,) = decode(head, GRID, STRIDE, [0.1] * 3)
    got = det.boxes[0, 6].item()
    assert -math.pi <= got <= math.pi
    assert abs(wrap(got - want)) < 1e-5
    # without the axis the same head decodes the rot yaw
    del head["axis"]
    (det,) = decode(head, GRID, STRIDE, [0.1] * 3)
    assert abs(wrap(det.boxes[0, 6].item() - rot_yaw)) < 1e-5


def test_axis_of_the_wrong_shape_is_refused():
    head = blank_head()
    head["axis"] = torch.zeros(1, 1, HO, WO)
    with pytest.raises(ValueError, match=r"head\['axis'\] must have shape"):
        decode(head, GRID, STRIDE, [0.1] * 3)


def test_iou_output_rescores_and_orders_the_detections_thresholds_stay_the_heatmaps():
    head = blank_head()
    head["iou"] = torch.zeros(1, 1, HO, WO)
    place_boxes(head, [car(10, 10), car(20, 20), car(30, 30)], [0, 0, 1], [2.0, 1.0, 0.0])
    # predicted IoUs: the highest-scored box is the loosest
    for (i, j), q in (((10, 10), 0.2), ((20, 20), 0.95), ((30, 30), 0.9)):
        head["iou"][0, 0, i, j] = math.log(q / (1 - q))
    (plain,) = decode(head, GRID, STRIDE, [0.3] * 3)
    np.testing.assert_allclose(plain.boxes[:, 0], [car(k, k)[0] for k in (10, 20, 30)], atol=1e-5)
    (det,) = decode(head, GRID, STRIDE, [0.3] * 3, iou_weight=0.5)
    s = [sigmoid32(2.0), sigmoid32(1.0), 0.5]
    want = sorted([(s[0] ** 0.5 * 0.2 ** 0.5, 10), (s[1] ** 0.5 * 0.95 ** 0.5, 20),
                   (s[2] ** 0.5 * 0.9 ** 0.5, 30)], reverse=True)
    assert min(w for w, _ in want) >= 0.3
    np.testing.assert_allclose(det.scores.numpy(), [w for w, _ in want], rtol=1e-5)
    np.testing.assert_allclose(det.boxes[:, 0], [car(k, k)[0] for w, k in want], atol=1e-5)
    assert len(det) == 3
    # the thresholds apply to the heatmap: 0.6 keeps the loose box (heatmap 0.88, rescored
    # 0.41) and drops the third (heatmap 0.5, rescored 0.67); the rescored scores order them
    (det,) = decode(head, GRID, STRIDE, [0.6] * 3, iou_weight=0.5)
    np.testing.assert_allclose(det.boxes[:, 0], [car(k, k)[0] for k in (20, 10)], atol=1e-5)
    np.testing.assert_allclose(det.scores.numpy(), [want[0][0], want[2][0]], rtol=1e-5)
    # a head without "iou" ignores the weight
    del head["iou"]
    (det,) = decode(head, GRID, STRIDE, [0.1] * 3, iou_weight=0.9)
    np.testing.assert_allclose(det.scores.numpy(), s, rtol=1e-6)
    for bad in (1.0, -0.1):         # 1 would drop the heatmap: every cell a candidate
        with pytest.raises(ValueError, match=r"iou_weight must be in \[0, 1\)"):
            decode(head, GRID, STRIDE, [0.1] * 3, iou_weight=bad)


# ----------------------------------------------------------------------------- box_radius

def _neighbours(head, box, cell, logit, label=0, axis=False):
    """Writes ``box`` with heatmap logit ``logit`` at output cell ``cell`` = (i, j), the offset
    measured from that cell (the centre may lie outside it), as training with a regression
    radius does around a centre."""
    i, j = cell
    x, y, z, l, w, h, yaw = box
    f = torch.tensor
    head["heatmap"][0, label, i, j] = logit
    head["offset"][0, :, i, j] = f([(x - GRID.x_min) / CELL - i, (y - GRID.y_min) / CELL - j])
    head["z"][0, 0, i, j] = z
    head["size"][0, :, i, j] = f(np.log([l, w, h]))
    head["rot"][0, :, i, j] = f([math.sin(yaw), math.cos(yaw)])
    if axis:
        head["axis"][0, :, i, j] = f([math.sin(2 * yaw), math.cos(2 * yaw)])


def test_box_radius_averages_the_neighbours_weighted_by_their_heatmap():
    head = blank_head()
    head["axis"] = torch.zeros(1, 2, HO, WO)
    peak = np.array(car(10, 10, yaw=0.3), np.float64)
    other = peak + [0.3, -0.2, 0.1, 0.4, 0.2, -0.2, 0.0]     # the neighbour's regression
    other[6] = 0.3 + math.pi - 0.1      # the box turned round, its axis 0.1 rad off the peak's
    _neighbours(head, peak, (10, 10), 2.0, axis=True)
    _neighbours(head, other, (11, 10), 0.0, axis=True)
    head["heatmap"][head["heatmap"] == BACKGROUND] = -100.0      # background weighs nothing
    (plain,) = decode(head, GRID, STRIDE, [0.3] * 3)
    assert_boxes_close(plain.boxes.numpy(), peak[None])
    (got,) = decode(head, GRID, STRIDE, [0.3] * 3, box_radius=1)
    assert len(got) == 1 and got.scores[0] == plain.scores[0]      # the neighbour is no peak
    wp, wo = sigmoid32(2.0), 0.5
    want_xyz_logs = (wp * np.r_[peak[:3], np.log(peak[3:6])]
                     + wo * np.r_[other[:3], np.log(other[3:6])]) / (wp + wo)
    axis = wp * np.array([math.sin(0.6), math.cos(0.6)]) + wo * np.array(
        [math.sin(2 * other[6]), math.cos(2 * other[6])])
    a = 0.5 * math.atan2(*axis)
    want = np.r_[want_xyz_logs[:3], np.exp(want_xyz_logs[3:6]), a][None]
    assert_boxes_close(got.boxes.numpy(), want)
    assert abs(a - 0.3) < 0.1          # the direction stays the peak's (the rot vectors)


def test_box_radius_leaves_out_other_objects_inactive_cells_and_the_map_edge():
    head = blank_head()
    peak = np.array(car(0, 10), np.float64)            # on the map's first row
    _neighbours(head, peak, (0, 10), 2.0)
    # the next cell regresses another car 2 m away (more than half the width, 1 m), with a
    # higher heatmap score than the background but lower than the peak
    _neighbours(head, peak + [0.0, 2.0, 0, 0, 0, 0, 0], (0, 11), 1.0)
    # a cell regressing a box 0.5 m off, which is inactive below
    _neighbours(head, peak + [0.5, 0.0, 0, 0, 0, 0, 0], (1, 10), 1.5)
    head["heatmap"][head["heatmap"] == BACKGROUND] = -100.0      # background weighs nothing
    active = torch.ones(1, HO, WO, dtype=torch.bool)
    (got,) = decode(head, GRID, STRIDE, [0.3] * 3, box_radius=1, active=active)
    w1, w2 = sigmoid32(2.0), sigmoid32(1.5)
    want = peak.copy()
    want[0] = (w1 * peak[0] + w2 * (peak[0] + 0.5)) / (w1 + w2)
    assert_boxes_close(got.boxes.numpy(), want[None])
    active[0, 1, 10] = False
    (got,) = decode(head, GRID, STRIDE, [0.3] * 3, box_radius=1, active=active)
    assert_boxes_close(got.boxes.numpy(), peak[None])
    # a class's own heatmap weighs: the pedestrian channel is empty around its peak
    active[0, 1, 10] = True
    head["heatmap"][0, 1, 0, 10] = 3.0
    dets = decode(head, GRID, STRIDE, [0.3] * 3, box_radius=1, active=active, nms_iou=1.0)[0]
    ped = dets.boxes[dets.labels == 1].numpy()
    assert_boxes_close(ped, peak[None])


def test_box_radius_zero_is_the_peak_cell_and_bad_radius_is_refused():
    rng = np.random.default_rng(5)
    head = blank_head()
    boxes = random_boxes(rng, 20)
    place_boxes(head, boxes, rng.integers(0, 3, 20), rng.uniform(0, 5, 20))
    a, b = decode(head, GRID, STRIDE, [0.3] * 3)[0], decode(head, GRID, STRIDE, [0.3] * 3,
                                                            box_radius=0)[0]
    assert torch.equal(a.boxes, b.boxes) and torch.equal(a.scores, b.scores)
    for bad in (-1, 1.0, True):
        with pytest.raises(ValueError, match="box_radius must be an int >= 0"):
            decode(head, GRID, STRIDE, [0.3] * 3, box_radius=bad)
