"""The model shipped with the package: its weights load through the model contract and find the
cars of a fixed synthetic scan (a scene of the eval range, never used in training)."""
from __future__ import annotations

import numpy as np
import torch

from sparse_detector_ros.config import Config
from sparse_detector_ros.model import load_description
from sparse_detector_ros.pipeline import Detector
from sparse_detector_ros.sim import generate_scene, get_lidar, render_frame
from sparse_detector_ros.sim.splits import seeds


def test_shipped_weights_find_the_cars_of_a_fixed_scan():
    model = load_description()
    assert model.weights_path is not None and model.weights_path.is_file()
    det = Detector(Config(), model)
    assert det.trained
    frame = render_frame(generate_scene(seeds("eval", 1, offset=100)[0], duration=0.5),
                         get_lidar("hdl64e"), 0)
    result = det.detect(frame.points[:, :4].astype(np.float32), tuple(frame.ego_pose[[0, 1, 3]]))
    cars = frame.boxes[(np.asarray(frame.labels) == "car") & (frame.num_points >= 20)]
    found = result.detections.boxes[result.detections.labels == 0].numpy()
    assert len(cars) >= 5 and len(found) >= 1
    dist = np.hypot(cars[:, None, 0] - found[None, :, 0], cars[:, None, 1] - found[None, :, 1])
    hit = dist.min(1) < 1.0
    assert hit.mean() >= 0.6, (int(hit.sum()), len(cars))


def test_shipped_model_has_the_axis_and_iou_outputs_and_iou_weight_rescores():
    from dataclasses import replace

    model = load_description()
    assert model.architecture["heading"] == "axis" and model.architecture["iou_head"] == 1
    frame = render_frame(generate_scene(seeds("eval", 1, offset=100)[0], duration=0.5),
                         get_lidar("hdl64e"), 0)
    points = frame.points[:, :4].astype(np.float32)
    base = Config()
    assert base.detector.iou_weight > 0
    plain = replace(base, detector=replace(base.detector, iou_weight=0.0,
                                           score_thresholds=(0.05,)))
    det = Detector(plain, model)
    out = det.network(points)
    a = det.detect(points).detections
    # Detector.boxes decodes one network output with the parameters or another weight
    for got in (det.boxes(out), det.boxes(out, iou_weight=0.0)):
        assert torch.equal(got.boxes, a.boxes) and torch.equal(got.scores, a.scores)
    b = det.boxes(out, iou_weight=0.5)
    # the same boxes (the peaks do not depend on the weight), other scores
    ab, bb = a.boxes.numpy(), b.boxes.numpy()
    d = np.hypot(ab[:, None, 0] - bb[None, :, 0], ab[:, None, 1] - bb[None, :, 1])
    same = d.min(1) < 1e-4
    assert same.sum() >= 5
    sa = a.scores.numpy()[same]
    sb = b.scores.numpy()[d.argmin(1)[same]]
    assert np.abs(sa - sb).max() > 0.05
    assert ((sb > 0) & (sb < 1)).all()


def test_box_radius_parameter_reaches_the_decoding():
    from dataclasses import replace

    from sparse_detector_ros.model.decode import decode

    model = load_description()
    frame = render_frame(generate_scene(seeds("eval", 1, offset=100)[0], duration=0.5),
                         get_lidar("hdl64e"), 0)
    points = frame.points[:, :4].astype(np.float32)
    base = Config()
    assert base.detector.box_radius == 1
    det = Detector(base, model)
    out = det.network(points)
    d = base.detector
    for radius in (0, 1, 2):
        det.reconfigure(replace(base, detector=replace(d, box_radius=radius)))
        got = det.boxes(out)
        want = decode(out.head, det.grid, det.net.out_stride, det.thresholds, top_k=d.top_k,
                      nms_iou=d.nms_iou, active=out.active, iou_weight=d.iou_weight,
                      box_radius=radius)[0]
        assert torch.equal(got.boxes, want.boxes) and len(got) >= 5
        if radius == 0:
            peak = got.boxes
        else:      # the same detections, other boxes (their peaks' neighbours weigh in)
            assert got.boxes.shape == peak.shape
            assert 0 < (got.boxes[:, :2] - peak[:, :2]).abs().max() < 0.8
