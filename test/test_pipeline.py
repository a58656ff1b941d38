"""pipeline: one list of stages (STAGES) from the timer to the diagnostics."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sparse_detector_ros.bev import rasterize
from sparse_detector_ros.config import Config
from sparse_detector_ros.model import load_description
from sparse_detector_ros.pipeline import STAGES, Pipeline, StageTimer
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
    d = diagnostics_to_dict(diagnostics_msg(snap, device="cpu", stamp=None, hardware_id="t"))
    for s in (*STAGES, "later_stage"):
        assert f"{s}_ms" in d and f"{s}_ms_max" in d
    assert d["later_stage_ms"] == "10.500" and d["total_ms_max"] == f"{2 * sum(ms.values()):.3f}"
    assert d["level"] == "0"
    # the window is cleared by a snapshot: the next report is STALE with zeros
    d = diagnostics_to_dict(diagnostics_msg(stats.snapshot(), device="cpu", stamp=None,
                                            hardware_id="t", previous=snap))
    assert d["level"] == "3" and d["later_stage_ms"] == "0.000"
