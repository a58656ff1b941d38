"""The evaluation metrics (train/evaluate.py) against hand-worked cases: matching, KITTI R40
AP, don't-care objects, class separation, range / points bands, centre distance, the reports."""
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_detector_ros.boxes import bev_iou, iou_3d
from sparse_detector_ros.sim.dataset import SimDataset
from sparse_detector_ros.sim.splits import seeds
from sparse_detector_ros.train.evaluate import (Evaluator, average_precision, format_value,
                                                headline, match_frame, to_markdown,
                                                write_json, write_report)

CAR, PED, CYC = 0, 1, 2
L, W, H = 4.0, 1.8, 1.6


def box(x, y, yaw=0.0, z=0.8, l=L, w=W, h=H):
    return [x, y, z, l, w, h, yaw]


def frame(gt_boxes, gt_labels=None, gt_points=None, det_boxes=None, det_scores=None,
          det_labels=None):
    """((det boxes, scores, labels), (gt boxes, labels, num_points)) with defaults: cars, 50
    points each, the GT as detections with falling scores (given detections: cars)."""
    g = np.asarray(gt_boxes, float).reshape(-1, 7)
    gl = np.zeros(len(g), int) if gt_labels is None else np.asarray(gt_labels)
    gp = np.full(len(g), 50) if gt_points is None else np.asarray(gt_points)
    d = g.copy() if det_boxes is None else np.asarray(det_boxes, float).reshape(-1, 7)
    ds = (np.linspace(0.9, 0.5, len(d)) if det_scores is None else np.asarray(det_scores,
                                                                            float))
    if det_labels is None:      # the GT's labels for GT-as-detections, else cars
        det_labels = gl if det_boxes is None else np.zeros(len(d), int)
    dl = np.asarray(det_labels)
    return (d, ds, dl), (g, gl, gp)


def evaluate(*frames, **kw):
    ev = Evaluator(**kw)
    for dets, gt in frames:
        ev.add(dets, gt)
    return ev.results()


ROW = [box(10.0 * i + 5, 3.0) for i in range(4)]   # four cars in a row, 5 m to 35 m


# ----------------------------------------------------------------------------- AP

def test_perfect_detections_give_ap_one_for_every_metric():
    gts = [box(8, -4, 0.3), box(15, 6, 2.0, l=0.8, w=0.7, h=1.8),
           box(25, -9, -1.0, l=1.8, w=0.7, h=1.7), box(45, 2, 1.1)]
    res = evaluate(frame(gts, [CAR, PED, CYC, CAR]), frame(ROW))
    for c in ("car", "pedestrian", "cyclist"):
        r = res["classes"][c]
        assert r["ap_bev"] == 1.0 and r["ap_3d"] == 1.0, c
        assert all(v == 1.0 for v in r["ap_dist"].values()) and r["ap_dist_mean"] == 1.0, c
    assert res["classes"]["car"]["num_gt"] == 6
    assert [res["mean"][k] for k in ("ap_bev", "ap_3d", "ap_dist_mean")] == [1.0, 1.0, 1.0]


def test_lowest_scored_false_positive_leaves_r40_ap_at_one():
    dets = ROW + [box(0, -30)]                          # nowhere near any car
    res = evaluate(frame(ROW, det_boxes=dets, det_scores=[0.9, 0.8, 0.7, 0.6, 0.1]))
    car = res["classes"]["car"]
    assert car["ap_bev"] == 1.0 and car["fp_bev"] == 1 and car["tp_bev"] == 4


def test_highest_scored_false_positive_gives_hand_computed_ap():
    # FP first: precision 0, then 1/2, 2/3, 3/4, 4/5 at recall 1/4 .. 1: the interpolated
    # precision is 4/5 at every recall point
    dets = ROW + [box(0, -30)]
    res = evaluate(frame(ROW, det_boxes=dets, det_scores=[0.9, 0.8, 0.7, 0.6, 0.95]))
    assert res["classes"]["car"]["ap_bev"] == pytest.approx(4 / 5, abs=1e-12)
    # TP, FP, TP over 2 GT: p = 1 up to recall 1/2 (20 points), then 2/3 (20 points)
    assert average_precision([0.9, 0.8, 0.7], [True, False, True], 2) == pytest.approx(
        (20 + 20 * 2 / 3) / 40, abs=1e-12)


def test_one_miss_gives_r40_value():
    res = evaluate(frame(ROW, det_boxes=ROW[:3]))       # 3 of 4: recall 0.75
    assert res["classes"]["car"]["ap_bev"] == pytest.approx(30 / 40, abs=1e-12)
    assert res["classes"]["car"]["num_gt"] == 4
    assert average_precision([0.9], [True], 3) == pytest.approx(13 / 40, abs=1e-12)


def test_duplicate_detection_is_a_false_positive():
    gts = ROW[:2]
    dets = [gts[0], box(gts[0][0] + 0.1, gts[0][1]), gts[1]]
    m = match_frame(dets, [0.9, 0.8, 0.7], gts, iou_threshold=0.7)
    assert m.tp.tolist() == [True, False, True]
    assert m.fp.tolist() == [False, True, False]
    assert m.gt_index.tolist() == [0, -1, 1]
    res = evaluate(frame(gts, det_boxes=dets, det_scores=[0.9, 0.8, 0.7]))
    assert res["classes"]["car"]["ap_bev"] == pytest.approx((20 + 20 * 2 / 3) / 40, abs=1e-12)


def test_greedy_matching_by_score_takes_the_highest_similarity():
    m = np.array([[0.80, 0.75],     # det 0 (score 0.9): A is its best
                  [0.90, 0.00],     # det 1 (score 0.8): A only, already taken -> FP
                  [0.72, 0.95]])    # det 2 (score 0.7): B
    r = match_frame(np.zeros((3, 7)), [0.9, 0.8, 0.7], np.zeros((2, 7)), matrix=m)
    assert r.gt_index.tolist() == [0, -1, 1] and r.fp.tolist() == [False, True, False]
    r = match_frame(np.zeros((3, 7)), [0.7, 0.8, 0.9], np.zeros((2, 7)), matrix=m)
    assert r.gt_index.tolist() == [-1, 0, 1]           # det 2 first takes B, det 1 takes A


@pytest.mark.parametrize("yaw", [0.0, 0.6, -2.2])
@pytest.mark.parametrize("threshold", [0.7, 0.5])
def test_rotated_iou_at_the_threshold_edge(yaw, threshold):
    # two l x w boxes offset by d along their heading overlap with IoU (l - d) / (l + d)
    d = L * (1 - threshold) / (1 + threshold)
    gt = np.array([box(12.0, -3.0, yaw)])
    heading = np.array([math.cos(yaw), math.sin(yaw)])

    def shifted(dd):
        b = gt.copy()
        b[0, :2] += dd * heading
        return b
    assert bev_iou(shifted(d), gt)[0, 0] == pytest.approx(threshold, abs=1e-9)
    eps = 1e-6
    for metric in ("bev", "3d"):
        assert iou_3d(shifted(d - eps), gt)[0, 0] > threshold
        assert match_frame(shifted(d - eps), [0.9], gt, None, threshold, metric).tp[0]
        assert match_frame(shifted(d + eps), [0.9], gt, None, threshold, metric).fp[0]
    # the evaluator uses the class's threshold: car 0.7, pedestrian 0.5
    label = CAR if threshold == 0.7 else PED
    near = evaluate(frame(gt, [label], det_boxes=shifted(d - eps), det_labels=[label]))
    far = evaluate(frame(gt, [label], det_boxes=shifted(d + eps), det_labels=[label]))
    name = "car" if label == CAR else "pedestrian"
    assert near["classes"][name]["ap_bev"] == 1.0 and near["classes"][name]["ap_3d"] == 1.0
    assert far["classes"][name]["ap_bev"] == 0.0 and far["classes"][name]["fp_bev"] == 1


def test_3d_iou_sees_height_that_bev_ignores():
    gt = np.array([box(10, 0)])
    up = np.array([box(10, 0, z=0.8 + 0.6)])              # 3D IoU = 1 / 1.75 / ... < 0.7
    assert match_frame(up, [0.9], gt, None, 0.7, "bev").tp[0]
    assert match_frame(up, [0.9], gt, None, 0.7, "3d").fp[0]


def test_dont_care_objects_are_neither_missed_nor_matched():
    gts = [ROW[0], ROW[1], ROW[2]]
    pts = [50, 4, 5]                                       # 4 points: don't care; 5: evaluated
    # no detection on the don't-care object: not a miss
    res = evaluate(frame(gts, gt_points=pts, det_boxes=[ROW[0], ROW[2]]))
    car = res["classes"]["car"]
    assert car["ap_bev"] == 1.0 and car["num_gt"] == 2 and car["num_dontcare"] == 1
    # the highest-scored detection on it: neither TP nor FP
    res = evaluate(frame(gts, gt_points=pts, det_scores=[0.5, 0.9, 0.4]))
    car = res["classes"]["car"]
    assert car["ap_bev"] == 1.0 and car["tp_bev"] == 2 and car["fp_bev"] == 0
    m = match_frame(gts, [0.5, 0.9, 0.4], gts, [False, True, False])
    assert m.ignored.tolist() == [False, True, False] and m.num_gt == 2
    # a don't-care object absorbs duplicates too
    m = match_frame([ROW[1], ROW[1]], [0.9, 0.8], gts, [False, True, False])
    assert m.ignored.tolist() == [True, True] and not m.fp.any()


def test_classes_are_evaluated_separately():
    gts = [ROW[0], box(20, 3, l=0.8, w=0.7, h=1.8)]
    res = evaluate(frame(gts, [CAR, PED], det_labels=[CAR, CAR], det_scores=[0.5, 0.9]))
    car, ped = res["classes"]["car"], res["classes"]["pedestrian"]
    # car: the car detection on the pedestrian is a FP scored above the true car
    assert car["fp_bev"] == 1 and car["ap_bev"] == pytest.approx(0.5, abs=1e-12)
    assert ped["num_gt"] == 1 and ped["ap_bev"] == 0.0 and ped["num_det"] == 0
    assert math.isnan(res["classes"]["cyclist"]["ap_bev"])    # no cyclists at all
    assert res["mean"]["ap_bev"] == pytest.approx(0.25)        # NaN classes skipped


def test_average_precision_without_objects_is_nan_and_inputs_are_checked():
    assert math.isnan(average_precision([0.9, 0.8], [False, False], 0))
    assert average_precision([], [], 3) == 0.0
    with pytest.raises(ValueError, match="true positives"):
        average_precision([0.9, 0.8], [True, True], 1)
    with pytest.raises(ValueError, match="same length"):
        average_precision([0.9], [True, False], 2)
    with pytest.raises(ValueError, match="metric"):
        match_frame(ROW, [1, 1, 1, 1], ROW, metric="iou")
    with pytest.raises(ValueError, match=r"pred_scores must have shape \(4,\)"):
        match_frame(ROW, [1, 1], ROW)
    with pytest.raises(ValueError, match="gt labels must index"):
        evaluate(frame(ROW, gt_labels=[0, 1, 2, 3], det_labels=[0, 0, 0, 0]))
    with pytest.raises(ValueError, match="no threshold for class"):
        Evaluator(classes=("car", "truck"))


@pytest.mark.parametrize("first_tp", [True, False])
def test_equal_scores_enter_together(first_tp):
    tp = [True, False] if first_tp else [False, True]
    assert average_precision([0.5, 0.5], tp, 1) == pytest.approx(0.5, abs=1e-12)


def _reference_r40(scores, tp, num_gt):
    """Straight from the definition, distinct scores: cut after each detection."""
    order = np.argsort(-np.asarray(scores))
    t = np.asarray(tp)[order]
    curve = [(t[:k].sum() / num_gt, t[:k].sum() / k) for k in range(1, len(t) + 1)]
    return np.mean([max([p for rec, p in curve if rec >= r / 40], default=0.0)
                    for r in range(1, 41)])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=25), st.integers(0, 5),
       st.randoms(use_true_random=False))
def test_average_precision_matches_the_definition(tp, extra_gt, rnd):
    num_gt = sum(tp) + extra_gt
    scores = rnd.sample(range(1000), len(tp))              # distinct
    got = average_precision(scores, tp, num_gt)
    if num_gt == 0:
        assert math.isnan(got)
    else:
        assert got == pytest.approx(_reference_r40(scores, tp, num_gt), abs=1e-12)
        perm = list(range(len(tp)))
        rnd.shuffle(perm)
        assert average_precision([scores[i] for i in perm], [tp[i] for i in perm],
                                 num_gt) == pytest.approx(got, abs=1e-12)


# ----------------------------------------------------------------------------- centre distance

def test_centre_distance_thresholds_at_the_edge():
    gt = np.array([box(20, 5, 0.4)])
    eps = 1e-6
    for thr in (0.5, 1.0, 2.0, 4.0):
        direction = np.array([0.6, 0.8])
        near, far = gt.copy(), gt.copy()
        near[0, :2] += (thr - eps) * direction
        far[0, :2] += (thr + eps) * direction
        near[0, 2] += 3.0                                  # z is not part of the distance
        assert match_frame(near, [0.9], gt, None, thr, "dist").tp[0]
        assert match_frame(far, [0.9], gt, None, thr, "dist").fp[0]
    det = gt.copy()
    det[0, 0] += 1.0 + eps                                 # beyond 0.5 and 1, within 2 and 4
    res = evaluate(frame(gt, det_boxes=det))
    assert res["classes"]["car"]["ap_dist"] == {"0.5": 0.0, "1": 0.0, "2": 1.0, "4": 1.0}
    assert res["classes"]["car"]["ap_dist_mean"] == 0.5


def test_distance_matching_takes_the_nearest_centre():
    gts = np.array([box(10, 0), box(11.5, 0)])
    m = match_frame([box(11.2, 0)], [0.9], gts, None, 2.0, "dist")
    assert m.gt_index.tolist() == [1]


# ----------------------------------------------------------------------------- bands

def test_range_bands_filter_objects_and_detections_by_their_own_distance():
    gts = [box(10, 0), box(30, 0), box(50, 0)]
    fp = box(0, 25)                                        # 25 m away, matches nothing
    res = evaluate(frame(gts, det_boxes=gts + [fp], det_scores=[0.9, 0.8, 0.7, 0.95]))
    rng = res["classes"]["car"]["range"]
    assert list(rng) == ["0-20", "20-40", "40-edge"]
    assert [rng[b]["num_gt"] for b in rng] == [1, 1, 1]
    assert rng["0-20"]["ap_bev"] == 1.0 and rng["40-edge"]["ap_bev"] == 1.0
    assert rng["20-40"]["ap_bev"] == pytest.approx(0.5) and rng["20-40"]["fp_bev"] == 1
    # across the border: GT at 19.9 m, its detection at 20.1 m
    g, d = [box(19.9, 0)], [box(20.1, 0)]
    rng = evaluate(frame(g, det_boxes=d))["classes"]["car"]["range"]
    assert rng["0-20"]["ap_bev"] == 1.0 and rng["0-20"]["tp_bev"] == 1   # found its object
    assert rng["20-40"]["num_gt"] == 0 and rng["20-40"]["fp_bev"] == 0   # ignored, not FP
    assert math.isnan(rng["20-40"]["ap_bev"])
    assert res["mean"]["range"]["20-40"]["num_gt"] == 1


def test_points_bands_with_and_without_detection_point_counts():
    gts = [ROW[0], ROW[1], ROW[2]]
    pts = [10, 50, 500]
    fp = box(0, -30)
    f = frame(gts, gt_points=pts, det_boxes=gts + [fp], det_scores=[0.9, 0.8, 0.7, 0.95])
    # without counts the unmatched detection is a FP in every band
    pb = evaluate(f)["classes"]["car"]["points"]
    assert list(pb) == ["5-20", "20-100", "100+"]
    assert [pb[b]["num_gt"] for b in pb] == [1, 1, 1]
    assert all(pb[b]["fp_bev"] == 1 and pb[b]["ap_bev"] == 0.5 for b in pb)
    # with counts only in its own band (30 points: 20-100)
    ev = Evaluator()
    ev.add(*f, pred_num_points=[10, 50, 500, 30])
    pb = ev.results()["classes"]["car"]["points"]
    assert [pb[b]["fp_bev"] for b in pb] == [0, 1, 0]
    assert [pb[b]["ap_bev"] for b in pb] == [1.0, 0.5, 1.0]
    # a detection matching an object of another band is ignored there
    assert [pb[b]["tp_bev"] for b in pb] == [1, 1, 1]


def test_region_makes_objects_outside_dont_care():
    gts = [box(10, 0), box(10, 60)]                        # the second outside |y| < 50
    ev = Evaluator(region=(-50.0, 50.0, -50.0, 50.0))
    ev.add(*frame(gts, det_boxes=[gts[0], box(10, 70)], det_scores=[0.5, 0.9]))
    car = ev.results()["classes"]["car"]
    assert car["num_gt"] == 1 and car["num_dontcare"] == 1
    assert car["ap_bev"] == 1.0 and car["fp_bev"] == 0


# ----------------------------------------------------------------------------- frame inputs

def test_mask_recall_counts_evaluated_objects_only():
    ev = Evaluator()
    dets, gt = frame(ROW, gt_points=[50, 50, 50, 2])
    ev.add(dets, gt, active_centre=[True, False, True, True])   # the 4th: don't care
    ev.add(*frame(ROW[:1]), extra={"active_fraction": 0.5}, active_centre=[True])
    ev.add(*frame(ROW[:1]), extra={"active_fraction": 0.3})   # no mask info: not counted
    res = ev.results()
    assert res["mask_recall"] == pytest.approx(3 / 4) and res["mask_recall_objects"] == 4
    assert res["classes"]["car"]["mask_recall"] == pytest.approx(3 / 4)
    assert math.isnan(res["classes"]["pedestrian"]["mask_recall"])
    assert res["extra"]["active_fraction"] == pytest.approx(0.4)
    assert res["frames"] == 3


def test_frame_result_and_dataset_item_are_accepted():
    class Dets:                                            # model.decode.Detections-like
        def __init__(self, b, s, lab):
            self.boxes, self.scores, self.labels = b, s, lab

    class Result:                                          # pipeline.FrameResult-like
        def __init__(self, dets):
            self.detections, self.active_fraction, self.mask_fallback = dets, 0.25, "no pose"

    item = SimDataset(1, 1, seed=seeds("eval", 1)[0], lidar="vlp16")[0]
    boxes, labels = item["boxes"], item["labels"]
    scores = np.linspace(0.9, 0.1, len(boxes)).astype(np.float32)
    ev = Evaluator()
    ev.add(Result(Dets(boxes, scores, labels)), item)
    res = ev.results()
    care = int((item["num_points"] >= 5).sum())
    assert sum(r["num_gt"] for r in res["classes"].values()) == care > 0
    for r in res["classes"].values():
        assert r["num_gt"] == 0 or (r["ap_bev"] == 1.0 and r["ap_3d"] == 1.0)
    assert res["extra"]["active_fraction"] == 0.25 and res["fallback_frames"] == 1


# ----------------------------------------------------------------------------- reports

MODES = ("dense", "occupancy", "map_prior", "net")


def _results_by_preset():
    out = {}
    for preset, n_det in (("hdl64e", 4), ("vlp16", 3), ("mid360", 2)):
        out[preset] = {}
        for i, mode in enumerate(MODES):
            ev = Evaluator()
            ev.add(*frame(ROW, det_boxes=ROW[:n_det]),
                   extra={"active_fraction": 1.0 - 0.2 * i}, active_centre=[True] * 4)
            out[preset][mode] = ev.results()
    return out


def test_markdown_has_one_column_per_mode_and_one_block_per_preset():
    res = _results_by_preset()
    md = to_markdown(res, default_mode="occupancy", held_out=("mid360",))
    lines = md.splitlines()
    header = next(line for line in lines if line.startswith("| preset | metric |"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols == ["preset", "metric", "dense", "occupancy (default)", "map_prior", "net"]
    table = lines[lines.index(header) + 2:]
    table = table[:next(i for i, line in enumerate(table) if not line.startswith("|"))]
    firsts = [r.split("|")[1].strip() for r in table]
    assert [f for f in firsts if f] == ["**hdl64e**", "**vlp16**", "**mid360** (held out)"]
    assert len(table) % 3 == 0 and all(len(r.split("|")) == len(cols) + 2 for r in table)
    row = next(r for r in table if "| car AP BEV@0.7 |" in r)
    assert row.split("|")[3:7] == [" 100.0 ", " 100.0 ", " 100.0 ", " 100.0 "]
    active = [r for r in table if "| active tiles % |" in r][0]
    assert [c.strip() for c in active.split("|")[3:7]] == ["100.0", "80.0", "60.0", "40.0"]
    vlp = [r for r in table if "| car AP BEV@0.7 |" in r][1]
    assert vlp.split("|")[3].strip() == format_value(30 / 40) == "75.0"
    assert "### By range band [m]" in md and "0-20: mAP BEV" in md
    assert "### By points in box" in md and "100+: GT" in md
    assert "| – |" in md                                   # NaN classes shown as "–"
    head = headline(res, "hdl64e", "occupancy").splitlines()
    assert len(head) == 3 and head[2].startswith("| hdl64e | occupancy | 100.0 |")
    assert len(head[0].split("|")) == len(head[2].split("|"))
    with pytest.raises(ValueError, match="mask mode 'union' was not evaluated"):
        headline(res, "hdl64e", "union")


def test_json_is_strict_and_round_trips(tmp_path):
    res = _results_by_preset()
    path = write_json(tmp_path / "eval.json", res)
    back = json.loads(path.read_text())                    # strict: NaN written as null
    assert back["vlp16"]["net"]["classes"]["car"]["ap_bev"] == pytest.approx(0.75)
    assert back["vlp16"]["net"]["classes"]["pedestrian"]["ap_bev"] is None
    j, m = write_report(tmp_path / "docs", res, stem="eval_test", default_mode="occupancy")
    assert j.exists() and m.read_text().startswith("## Detection quality")
