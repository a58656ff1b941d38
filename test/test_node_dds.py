"""The installed sparse_detector_node, started as a subprocess with the package's parameter file,
driven over real DDS (loopback only, own domain: see conftest.py)."""
from pathlib import Path

import numpy as np
import pytest

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
    for key in ("decode_ms", "rasterize_ms", "total_ms", "latency_ms"):
        assert float(d[key]) >= 0.0, key
    busy = [x for x in probe.diagnostics if int(x["frames_in_window"]) > 0]
    assert busy and all(float(x["rasterize_ms"]) > 0 for x in busy)
    assert all(float(x["latency_ms"]) >= float(x["total_ms"]) for x in busy)
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


def test_out_of_range_parameter_stops_startup():
    proc = NodeProcess(PARAMS_FILE, {"grid.resolution": 7.5})
    try:
        code = proc.wait(60)
        log = proc.log()
    finally:
        proc.close()
    assert code != 0
    assert "grid.resolution" in log and "7.5" in log and "[0.02, 2.0]" in log, log


def test_bad_choice_parameter_stops_startup():
    proc = NodeProcess(PARAMS_FILE, {"node.qos_reliability": "sometimes"})
    try:
        code = proc.wait(60)
        log = proc.log()
    finally:
        proc.close()
    assert code != 0
    assert "node.qos_reliability" in log and "sometimes" in log, log


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
