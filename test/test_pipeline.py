"""pipeline: one list of stages (STAGES) from the timer to the diagnostics; the mount transform;
live reconfiguration; warm-up; the diagnostics statistics (p50/p99 window, levels)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import math
from dataclasses import replace

from sparse_detector_ros.bev import rasterize
from sparse_detector_ros.config import Config, ConfigError, TransformConfig
from sparse_detector_ros.frames import MountTransform
from sparse_detector_ros.masks import save_map
from sparse_detector_ros.model import load_description
from sparse_detector_ros.pipeline import (STAGES, Detector, Pipeline, StageTimer,
                                          warm_up_points)
from sparse_detector_ros.pointcloud import CloudError, encode
from sparse_detector_ros.ros_io import diagnostics_msg, diagnostics_to_dict
from sparse_detector_ros.stats import FrameStats


def points(n=5000, seed=0):
    rng = np.random.default_rng(seed)
    p = np.empty((n, 4), np.float32)
    p[:, :2] = rng.uniform(-60, 60, (n, 2))
    p[:, 2] = rng.uniform(-2.5, 1.5, n)
    p[:, 3] = rng.uniform(0, 255, n)
    return p


@pytest.fixture(scope="module")
def pipeline():
    return Pipeline(Config(), load_description(), "cpu")


def test_process_times_exactly_the_stages_in_order(pipeline):
    pts = points()
    r = pipeline.process(encode(pts, "velodyne"))
    assert list(r.stage_ms) == list(STAGES)
    assert all(v > 0 for v in r.stage_ms.values())
    assert torch.equal(r.bev, rasterize(pts, pipeline.model.grid))
    inside = (np.abs(pts[:, 0]) < 51.2) & (np.abs(pts[:, 1]) < 51.2)
    assert r.points_received == len(pts) and r.points_kept == int(inside.sum())


def test_empty_cloud_is_a_cloud_error(pipeline):
    with pytest.raises(CloudError) as e:
        pipeline.process(encode(np.full((10, 4), np.nan, np.float32), "xyzi", is_dense=False))
    assert e.value.kind == "empty"


def test_timer_refuses_a_stage_that_is_not_listed():
    timer = StageTimer(torch.device("cpu"))
    with timer(STAGES[0]):
        pass
    with pytest.raises(KeyError, match="not in the pipeline's stages"):
        with timer("unlisted"):
            pass
    assert list(timer.ms) == [STAGES[0]]


def test_diagnostics_report_every_stage_a_frame_timed():
    stats = FrameStats(STAGES)
    snap = stats.snapshot()
    assert list(snap["stage_ms"]) == list(STAGES)       # listed before any frame
    ms = {s: float(i + 1) for i, s in enumerate(STAGES)} | {"later_stage": 7.0}
    stats.processed(10, 8, ms, latency_ms=30.0)
    stats.processed(10, 8, {s: 2 * v for s, v in ms.items()}, latency_ms=50.0)
    snap = stats.snapshot()
    assert list(snap["stage_ms"]) == [*STAGES, "later_stage"]
    assert snap["stage_ms"]["later_stage"] == (10.5, 14.0)
    assert snap["total_ms"] == (1.5 * sum(ms.values()), 2 * sum(ms.values()))
    assert snap["latency_ms"] == (40.0, 50.0) and snap["frames_in_window"] == 2
    d = diagnostics_to_dict(diagnostics_msg(snap, device="cpu", stamp=None, hardware_id="t",
                                            backend="torch"))
    for s in (*STAGES, "later_stage"):
        for suffix in ("", "_max", "_p50", "_p99"):
            assert f"{s}_ms{suffix}" in d
    assert d["later_stage_ms"] == "10.500" and d["total_ms_max"] == f"{2 * sum(ms.values()):.3f}"
    assert d["later_stage_ms_p50"] == "10.500" and d["later_stage_ms_p99"] == "13.930"
    assert d["latency_ms_p50"] == "40.000" and d["latency_ms_p99"] == "49.800"
    assert d["level"] == "0" and d["backend"] == "torch" and d["device"] == "cpu"
    # a snapshot clears the per-period mean/max, not the rolling p50/p99 window
    d = diagnostics_to_dict(diagnostics_msg(stats.snapshot(), device="cpu", stamp=None,
                                            hardware_id="t", previous=snap))
    assert d["later_stage_ms"] == "0.000" and d["later_stage_ms_p50"] == "10.500"
    assert d["frames_in_window"] == "0" and d["frames_in_stats"] == "2"


def test_p50_p99_are_over_the_last_window_frames():
    stats = FrameStats(STAGES, window=10)
    for i in range(30):
        stats.processed(1, 1, {"rasterize": float(i)}, latency_ms=float(100 + i))
    snap = stats.snapshot()
    assert snap["frames_in_stats"] == 10 and snap["frames_in_window"] == 30
    assert snap["stage_ms_pct"]["rasterize"] == pytest.approx((24.5, 28.91))
    assert snap["latency_ms_pct"] == pytest.approx((124.5, 128.91))
    assert snap["stage_ms_pct"]["boxes"] == (0.0, 0.0)      # listed, never timed
    with pytest.raises(ValueError, match="window"):
        FrameStats(STAGES, window=0)


def test_detections_per_class_are_reported():
    stats = FrameStats(STAGES)
    stats.processed(1, 1, {}, 1.0, detections_by_class={"car": 2, "pedestrian": 0, "cyclist": 1})
    snap = stats.snapshot()
    assert snap["detections"] == 3
    d = diagnostics_to_dict(diagnostics_msg(snap, device="cpu", stamp=None, hardware_id="t"))
    assert (d["detections"], d["detections.car"], d["detections.pedestrian"],
            d["detections.cyclist"]) == ("3", "2", "0", "1")


def test_diagnostic_levels_error_warn_ok():
    now = [100.0]
    stats = FrameStats(STAGES, clock=lambda: now[0])

    def report(previous=None):
        snap = stats.snapshot()
        d = diagnostics_to_dict(diagnostics_msg(snap, device="cpu", stamp=None, hardware_id="t",
                                                previous=previous, input_timeout_s=2.0,
                                                latency_budget_ms=100.0))
        return snap, d

    now[0] += 1.5
    snap, d = report()
    assert d["level"] == "0" and d["message"] == "ok"          # no input yet, but not for 2 s
    now[0] += 1.0
    snap, d = report()
    assert d["level"] == "2", d                                # ERROR: nothing for 2.5 s
    assert "no point cloud received since start-up for 2.5 s" in d["message"]
    assert "node.input_timeout_s = 2" in d["message"]
    stats.received()
    stats.processed(1, 1, {"rasterize": 1.0}, latency_ms=50.0)
    snap, d = report(snap)
    assert d["level"] == "0" and d["seconds_since_input"] == "0.0"
    stats.received()
    stats.processed(1, 1, {"rasterize": 1.0}, latency_ms=150.0)   # p99 of (50, 150) > 100
    snap, d = report(snap)
    assert d["level"] == "1" and "latency p99 149.0 ms" in d["message"], d
    assert "node.latency_budget_ms = 100" in d["message"]
    stats.rejected("bad_length", "data length 3 is not 4")
    snap, d = report(snap)
    assert d["level"] == "1" and d["message"].startswith("1 frame(s) rejected: data length")
    now[0] += 3.0
    snap, d = report(snap)                                     # ERROR outranks the WARN
    assert d["level"] == "2" and d["message"].startswith("no point cloud received for 3.0 s")
    assert "latency p99" in d["message"]


# --------------------------------------------------------------------------- mount transform

def cell_centre_points(grid, n=4000, seed=0):
    """Points on BEV cell centres (x, y) and mid-slice heights: a transform that is exact up to
    float rounding keeps every point in its cell."""
    rng = np.random.default_rng(seed)
    H, W = grid.shape
    p = np.empty((n, 4), np.float32)
    p[:, 0] = grid.x_min + (rng.integers(0, H, n) + 0.5) * grid.resolution
    p[:, 1] = grid.y_min + (rng.integers(0, W, n) + 0.5) * grid.resolution
    dz = (grid.z_max - grid.z_min) / grid.z_slices
    p[:, 2] = grid.z_min + (rng.integers(0, grid.z_slices, n) + 0.5) * dz
    p[:, 3] = rng.uniform(0, 255, n)
    return p


def test_process_moves_the_points_into_the_detection_frame(pipeline):
    grid = pipeline.model.grid
    det_pts = cell_centre_points(grid)
    mount = MountTransform(translation=(1.0, -2.0, 1.5), rpy=(0.0, 0.0, math.pi / 2))
    cloud_pts = det_pts.copy()                 # the same points seen in the sensor's frame
    cloud_pts[:, :3] = ((det_pts[:, :3].astype(np.float64) - mount.translation)
                        @ mount.rotation).astype(np.float32)
    mounted = Pipeline(Config(), pipeline.model, "cpu", mount=mount)
    mounted.detector = pipeline.detector       # same weights, no second load
    r = mounted.process(encode(cloud_pts, "xyzi"))
    assert torch.equal(r.bev, rasterize(det_pts, grid))
    assert not torch.equal(pipeline.process(encode(cloud_pts, "xyzi")).bev, r.bev)
    ref = pipeline.detector.detect(det_pts)
    assert torch.equal(r.detections.boxes, ref.detections.boxes)   # boxes: detection frame
    assert list(r.stage_ms) == list(STAGES)


def test_the_mount_defaults_to_the_transform_parameters():
    cfg = Config(transform=TransformConfig(translation=(0.5, 0.0, 1.8), rpy=(0.0, 0.1, 0.0)))
    p = Pipeline(cfg, load_description(), "cpu")
    assert np.allclose(p.mount.translation, (0.5, 0.0, 1.8))
    assert np.allclose(p.mount.rotation, MountTransform(rpy=(0.0, 0.1, 0.0)).rotation)
    assert Pipeline(Config(), load_description(), "cpu").mount.is_identity


def test_warm_up_points_cover_the_grid_and_warm_up_runs_a_frame(pipeline):
    g = pipeline.model.grid
    pts = warm_up_points(g, 5000)
    assert pts.shape == (5000, 4) and pts.dtype == np.float32
    assert (pts[:, 0] >= g.x_min).all() and (pts[:, 0] <= g.x_max).all()
    assert (pts[:, 1] >= g.y_min).all() and (pts[:, 1] <= g.y_max).all()
    assert (pts[:, 2] >= g.z_min).all() and (pts[:, 2] <= g.z_max).all()
    assert pts[:, 0].max() - pts[:, 0].min() > 0.9 * (g.x_max - g.x_min)
    calls = []
    real = pipeline.detector.detect
    pipeline.detector.detect = lambda pts, *a, **k: calls.append(pts) or real(pts, *a, **k)
    try:
        assert pipeline.warm_up(3000) > 0
    finally:
        del pipeline.detector.detect
    assert len(calls) == 1 and calls[0].shape == (3000, 4)


# --------------------------------------------------------------------------- reconfigure

@pytest.fixture
def detector():
    return Detector(Config(), load_description(), "cpu")


def road_map(tmp_path, name="map.yaml"):
    """A nav2 map that is free (road) everywhere around the origin."""
    return str(save_map(tmp_path / name, np.full((300, 300), 254, np.uint8),
                        origin=(-150.0, -150.0, 0.0), resolution=1.0))


def test_reconfigure_applies_detector_values_from_the_next_frame(detector):
    pts = points(20000, seed=3)
    base = Config()
    detector.reconfigure(base.updated({"detector.score_thresholds": [0.0]}))
    many = len(detector.detect(pts).detections)
    assert many > 5
    detector.reconfigure(detector.config.updated({"detector.top_k": 5}))
    assert 0 < len(detector.detect(pts).detections) <= 5
    detector.reconfigure(detector.config.updated({"detector.score_thresholds": [1.0]}))
    assert len(detector.detect(pts).detections) == 0
    detector.reconfigure(detector.config.updated({"mask.mode": "dense"}))
    r = detector.detect(pts)
    assert r.mask_mode == "dense" and r.active_fraction == 1.0


def test_reconfigure_loads_the_map_only_when_it_changed(detector, tmp_path):
    path = road_map(tmp_path)
    cfg = detector.config.updated({"mask.mode": "map_prior", "mask.map_yaml": path})
    detector.reconfigure(cfg)
    prior = detector.masker.map_prior
    assert prior is not None
    r = detector.detect(points(), pose=(0.0, 0.0, 0.0))
    assert r.mask_mode == "map_prior" and r.mask_fallback == ""
    detector.reconfigure(cfg.updated({"detector.nms_iou": 0.5, "mask.occupancy_dilation": 3}))
    assert detector.masker.map_prior is prior           # same map: not read again
    detector.reconfigure(detector.config.updated({"mask.map_margin": 4.0}))
    assert detector.masker.map_prior is not prior and detector.masker.map_prior.margin == 4.0


def test_reconfigure_refuses_and_keeps_the_old_config(detector, tmp_path):
    good = detector.config.updated({"mask.mode": "map_prior", "mask.map_yaml": road_map(tmp_path)})
    detector.reconfigure(good)
    masker, thresholds = detector.masker, detector.thresholds
    bad = [
        (good.updated({"mask.map_yaml": str(tmp_path / "missing.yaml"),
                       "detector.top_k": 7}), "'mask.map_yaml'", "could not be read"),
        (good.updated({"detector.score_thresholds": [0.1, 0.2]}),
         "'detector.score_thresholds'", "3 classes"),
        (good.updated({"sparse.tile_size": 8}), "'sparse.tile_size' = 8", "start-up only"),
        (replace(good, model=replace(good.model, path="/elsewhere")), "'model.path'",
         "start-up only"),
    ]
    for cfg, *fragments in bad:
        with pytest.raises(ConfigError) as e:
            detector.reconfigure(cfg)
        for f in fragments:
            assert f in str(e.value)
        assert detector.config == good
        assert detector.masker is masker and detector.thresholds == thresholds
    # node.* and transform.* are not the detector's: ignored
    detector.reconfigure(good.updated({"node.latency_budget_ms": 5.0}))
    assert detector.masker is masker


def test_pipeline_reconfigure_replaces_the_mount():
    p = Pipeline(Config(), load_description(), "cpu")
    p.reconfigure(Config().updated({"transform.translation": [0.0, 0.0, 2.0],
                                    "detector.top_k": 9}))
    assert np.allclose(p.mount.translation, (0.0, 0.0, 2.0))
    assert p.detector.config.detector.top_k == 9 and p.config.detector.top_k == 9


def test_an_unreadable_map_falls_back_when_it_is_not_required(detector, tmp_path):
    """mask.map_required false: a map that cannot be read is taken, the map prior gives way to
    mask.map_fallback and the frame says why (the node's diagnostics then WARN)."""
    corrupt = tmp_path / "corrupt.yaml"
    corrupt.write_text("image: [unclosed\n")
    for path, why in ((str(tmp_path / "missing.yaml"), "cannot be read"),
                      (str(corrupt), "is not valid YAML")):
        cfg = detector.config.updated({"mask.mode": "map_prior", "mask.map_yaml": path,
                                       "mask.map_required": False})
        detector.reconfigure(cfg)
        r = detector.detect(points(), pose=(0.0, 0.0, 0.0))
        assert r.mask_mode == "occupancy", r.mask_mode
        assert r.mask_fallback.startswith(f"parameter 'mask.map_yaml' = {path!r}: the map could "
                                          "not be read"), r.mask_fallback
        assert why in r.mask_fallback and "using mask.map_fallback = 'occupancy'" in \
            r.mask_fallback
        with pytest.raises(ConfigError, match="mask.map_required to false"):  # required: refused
            detector.reconfigure(cfg.updated({"mask.map_required": True}))


def test_a_nan_cloud_flagged_dense_is_rejected_as_empty(pipeline):
    with pytest.raises(CloudError) as e:
        pipeline.process(encode(np.full((10, 4), np.nan, np.float32), "xyzi", is_dense=True))
    assert e.value.kind == "empty" and "no valid points (10 before removing NaN/Inf)" in str(
        e.value)


# --------------------------------------------------------------------------- backend fallback

def test_backend_fallback_says_why_torch_stands_in_for_cupy(monkeypatch):
    from sparse_detector_ros import pipeline as pipeline_mod
    from sparse_detector_ros.pipeline import backend_fallback

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert backend_fallback("torch", cuda) == "" and backend_fallback("auto", cpu) == ""
    with pytest.raises(ConfigError, match="'sparse.backend' = 'cupy' needs a CUDA device"):
        backend_fallback("cupy", cpu)

    def broken(name, device):
        raise RuntimeError("backend 'cupy' is not usable: ImportError: No module named 'cupy'")

    monkeypatch.setattr(pipeline_mod.sparse_ops, "get_backend", broken)
    text = backend_fallback("auto", cuda)
    assert "CuPy kernels are unavailable on cuda (ImportError: No module named 'cupy')" in text
    assert "torch backend" in text
    with pytest.raises(ConfigError, match="'cupy' cannot be used: ImportError.*use 'auto'"):
        backend_fallback("cupy", cuda)
    monkeypatch.setattr(pipeline_mod.sparse_ops, "get_backend", lambda name, device: object())
    assert backend_fallback("auto", cuda) == "" and backend_fallback("cupy", cuda) == ""


# --------------------------------------------------------------------------- honest diagnostics

def _diag(stats, previous=None, **kw):
    snap = stats.snapshot()
    return snap, diagnostics_to_dict(diagnostics_msg(snap, device="cpu", stamp=None,
                                                     hardware_id="t", previous=previous,
                                                     latency_budget_ms=100.0, **kw))


def test_clock_skew_frames_stay_out_of_the_latency_and_warn():
    stats = FrameStats(STAGES)
    stats.processed(1, 1, {"rasterize": 1.0}, latency_ms=20.0)
    stats.clock_skew(-1.8e9, "cloud stamped 0 (the driver sets no stamp?) ... check use_sim_time")
    stats.processed(1, 1, {"rasterize": 1.0}, latency_ms=None)    # not a latency
    snap, d = _diag(stats)
    assert d["latency_ms_max"] == "20.000" and d["latency_ms_p99"] == "20.000"
    assert d["frames_processed"] == "2" and d["frames_clock_skew"] == "1"
    assert d["last_clock_skew_s"] == "-1800000000.000"
    assert d["level"] == "1" and d["message"].startswith("1 frame(s) with a clock problem: "
                                                         "cloud stamped 0"), d
    assert "use_sim_time" in d["message"]
    _, d = _diag(stats, snap)                                    # nothing new: OK again
    assert d["level"] == "0" and d["frames_clock_skew"] == "1", d


def test_lost_frames_are_sequence_gaps_where_the_middleware_numbers_messages():
    from sparse_detector_ros.stats import SequenceGaps

    gaps = SequenceGaps()
    assert [gaps.missed("a", s) for s in (5, 6, 9, 10)] == [0, 0, 2, 0]
    assert gaps.missed("b", 100) == 0 and gaps.missed("a", 14) == 3   # per publisher
    assert gaps.missed("a", 1) == 0 and gaps.missed("a", 3) == 1      # a restarted count
    stats = FrameStats(STAGES)
    stats.lost(3)                                   # the message-lost event, until ...
    snap, d = _diag(stats)
    assert (d["frames_lost"], d["frames_lost_source"]) == ("3", "message-lost event")
    stats.missed(0)                                 # ... clouds come with sequence numbers
    stats.missed(5)
    snap, d = _diag(stats, snap)
    assert (d["frames_lost"], d["frames_lost_source"], d["frames_lost_in_transport"]) == (
        "5", "sequence numbers", "3")               # the gaps include the transport's losses
    assert d["level"] == "0"                        # counted, like dropped: not a WARN
    stats = FrameStats(STAGES)
    stats.lost_event_supported = False
    assert _diag(stats)[1]["frames_lost_source"] == "not reported by the middleware"


def test_faults_and_mask_fallback_are_reported():
    stats = FrameStats(STAGES)
    stats.processed(1, 1, {}, 1.0)
    snap, d = _diag(stats)
    assert (d["faults"], d["level"]) == ("", "0")
    why = "sparse.backend 'auto': the CuPy kernels are unavailable on cuda (ImportError: x)"
    snap, d = _diag(stats, snap, faults=[why])
    assert d["level"] == "1" and d["message"] == why and d["faults"] == why
    stats.processed(1, 1, {}, 1.0, mask_mode="occupancy",
                    mask_fallback="odometry 2.0 s older than the cloud; using mask.map_fallback")
    snap, d = _diag(stats, snap)
    assert d["level"] == "1" and d["message"].startswith(
        "mask 'occupancy' ran instead of the configured one: odometry 2.0 s older"), d
    stats.processed(1, 1, {}, 1.0, mask_mode="map_prior")        # the map prior is back
    _, d = _diag(stats, snap)
    assert d["level"] == "0", d
