"""The installed sparse_detector_node, started as a subprocess with the package's parameter file,
driven over real DDS (loopback only, own domain: see conftest.py)."""
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from sparse_detector_ros.config import GridConfig
from sparse_detector_ros.model import ModelDescription, load_description, save_checkpoint
from sparse_detector_ros.pipeline import STAGES
from sparse_detector_ros.pointcloud import encode
from sparse_detector_ros.ros_io import cloud_to_msg
from sparse_detector_ros.tools.node_client import NodeProcess, Probe

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.ros

PARAMS_FILE = ROOT / "config" / "sparse_detector.yaml"
# Reliable transport so that every frame the test sends is accounted for.
FAST = {"node.diagnostics_period": 0.2, "node.qos_reliability": "reliable", "node.qos_depth": 10}


def cloud(n=20000, seed=0, layout="velodyne"):
    rng = np.random.default_rng(seed)
    pts = np.empty((n, 4), np.float32)
    pts[:, :2] = rng.uniform(-60, 60, (n, 2))  # some fall outside the +-51.2 m grid
    pts[:, 2] = rng.uniform(-2.5, 1.5, n)
    pts[:, 3] = rng.uniform(0, 255, n)
    grid_mask = (np.abs(pts[:, 0]) < 51.2) & (np.abs(pts[:, 1]) < 51.2)
    extra = {"ring": rng.integers(0, 64, n).astype(np.uint16)}
    return encode(pts, layout, extra), int(grid_mask.sum())


@pytest.fixture
def node():
    proc = NodeProcess(PARAMS_FILE, FAST)
    yield proc
    proc.close()


@pytest.fixture
def probe():
    p = Probe()
    yield p
    p.close()


@pytest.fixture
def node_with_extras():
    proc = NodeProcess(PARAMS_FILE, {"sparse.tile": 8, "sparse.dense_crossover": 1})
    p = Probe()
    yield proc, p
    p.close()
    proc.close()


def test_node_processes_clouds_and_reports_diagnostics(node, probe):
    assert probe.wait_for_subscriber(30), node.log()
    sent = []
    for seed in range(3):
        c, kept = cloud(seed=seed)
        sent.append(kept)
        probe.publish(c)
        d = probe.wait_for_diag(lambda d, k=seed + 1: int(d["frames_processed"])
                                + int(d["frames_dropped"]) >= k, 30)
        assert d is not None, node.log()
    d = probe.wait_for_diag(lambda d: int(d["frames_received"]) == 3
                            and int(d["frames_processed"]) + int(d["frames_dropped"]) == 3, 10)
    assert d is not None, (probe.latest(), node.log())
    assert d["device"] == "cpu"
    assert int(d["frames_rejected"]) == 0
    assert int(d["points_received"]) == 20000
    assert int(d["points_kept"]) == sent[-1]
    busy = [x for x in probe.diagnostics if int(x["frames_in_window"]) > 0]
    assert busy
    assert d["mask_mode"] == "occupancy" and d["mask_fallback"] == ""
    assert 0 < float(busy[-1]["active_fraction"]) <= 1 and int(d["detections"]) >= 0
    for x in busy:  # every pipeline stage is reported, and took time
        assert all(float(x[f"{s}_ms"]) > 0 for s in STAGES), x
        assert float(x["total_ms"]) >= sum(float(x[f"{s}_ms"]) for s in STAGES) - 0.01
        assert float(x["latency_ms"]) >= float(x["total_ms"])
    assert node.alive()
    assert node.interrupt() == 0  # clean shutdown on SIGINT


def test_malformed_cloud_is_rejected_and_node_keeps_running(node, probe):
    assert probe.wait_for_subscriber(30), node.log()
    bad = cloud_to_msg(cloud(seed=1)[0])
    bad.data = bytes(bad.data)[:-5]  # length no longer height*row_step
    probe.publish(bad)
    d = probe.wait_for_diag(lambda d: int(d["frames_rejected"]) == 1, 30)
    assert d is not None, node.log()
    assert "data length" in d["last_rejection_reason"]
    assert d["rejected.bad_length"] == "1"
    assert d["level"] == "1"  # WARN while frames are being rejected
    good, kept = cloud(seed=2)
    probe.publish(good)
    d = probe.wait_for_diag(lambda d: int(d["frames_processed"]) == 1, 30)
    assert d is not None, node.log()
    assert int(d["frames_rejected"]) == 1 and int(d["points_kept"]) == kept
    assert node.alive()
    assert "rejected a point cloud (bad_length)" in node.log()
    assert node.interrupt() == 0


def test_bad_headers_and_empty_clouds_are_rejected_by_kind(node, probe):
    from builtin_interfaces.msg import Time

    assert probe.wait_for_subscriber(30), node.log()
    probe.publish(cloud(seed=3)[0], stamp=Time(sec=-1, nanosec=0))
    assert probe.wait_for_diag(lambda d: d.get("rejected.bad_stamp") == "1", 30), node.log()
    probe.publish(cloud(seed=4)[0], frame_id="")
    assert probe.wait_for_diag(lambda d: d.get("rejected.no_frame_id") == "1", 30), node.log()
    nan_only = np.full((100, 4), np.nan, np.float32)
    probe.publish(encode(nan_only, "xyzi", is_dense=False))
    d = probe.wait_for_diag(lambda d: d.get("rejected.empty") == "1", 30)
    assert d is not None, node.log()
    assert "no valid points" in d["last_rejection_reason"]
    good, kept = cloud(seed=5)
    probe.publish(good)
    d = probe.wait_for_diag(lambda d: int(d["frames_processed"]) == 1, 30)
    assert d is not None, node.log()
    assert int(d["frames_rejected"]) == 3 and int(d["points_kept"]) == kept
    assert node.alive()
    assert node.interrupt() == 0


def start_and_wait(params: dict) -> tuple[int, str]:
    proc = NodeProcess(PARAMS_FILE, params)
    try:
        code = proc.wait(60)
        return code, proc.log()
    finally:
        proc.close()


def test_out_of_range_parameter_stops_startup():
    code, log = start_and_wait({"sparse.tile_size": 65})
    assert code == 2
    assert "parameter 'sparse.tile_size' = 65 is out of range: allowed [4, 64]" in log, log


def test_bad_choice_parameter_stops_startup():
    code, log = start_and_wait({"node.qos_reliability": "sometimes"})
    assert code == 2
    assert "node.qos_reliability" in log and "sometimes" in log, log


def test_grid_parameter_stops_startup_the_grid_belongs_to_the_model():
    code, log = start_and_wait({"grid.resolution": 0.1})
    assert code == 2
    assert "'grid.resolution' = 0.1 is not a runtime parameter" in log, log


def test_weights_trained_on_another_grid_stop_startup(tmp_path):
    trained = ModelDescription(grid=GridConfig(resolution=0.4))
    save_checkpoint(tmp_path / "w.pt", trained, {"w": torch.zeros(1)})
    desc = replace(load_description(), weights="w.pt").save(tmp_path / "model.yaml")
    code, log = start_and_wait({"model.path": str(desc)})
    assert code == 2
    assert "do not match model description" in log, log
    assert "grid.resolution: trained 0.4, configured 0.2" in log, log


def test_unknown_parameter_is_a_warning_and_int_stands_for_float(node_with_extras):
    proc, probe = node_with_extras
    assert probe.wait_for_subscriber(30), proc.log()
    assert "unknown parameter 'sparse.tile' ignored" in proc.log()
    assert proc.alive()
    assert proc.interrupt() == 0


def test_demo_command_runs_end_to_end():
    import subprocess
    import sys

    exe = Path(sys.executable).parent / "sparse-detector"
    out = subprocess.run([str(exe), "demo", "--frames", "5", "--lidar", "vlp16"],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    import json
    tail = out.stdout.split("demo: final counters:")[1]
    counters = json.loads(tail[:tail.index("}") + 1])
    assert counters["frames_received"] == "5"
    assert int(counters["frames_processed"]) + int(counters["frames_dropped"]) == 5
    assert int(counters["frames_processed"]) >= 1 and counters["frames_rejected"] == "0"
    assert "node stopped with exit code 0" in out.stdout
