"""The installed sparse_detector_node, started as a subprocess with the package's parameter file,
driven over real DDS (loopback only, own domain: see conftest.py)."""
import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from sparse_detector_ros.config import GridConfig
from sparse_detector_ros.frames import MountTransform
from sparse_detector_ros.masks import save_map
from sparse_detector_ros.model import ModelDescription, load_description, save_checkpoint
from sparse_detector_ros.pipeline import STAGES
from sparse_detector_ros.pointcloud import encode
from sparse_detector_ros.ros_io import cloud_to_msg
from sparse_detector_ros.sim import generate_scene, get_lidar, render_frame
from sparse_detector_ros.sim.export import cloud_buffer
from sparse_detector_ros.sim.splits import seeds
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
    proc = NodeProcess(PARAMS_FILE, {"sparse.dense_crossover": 1, "node.publish_mask": False,
                                     "use_sim_time": False, "node.threads": 1})
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
    assert d["device"] == "cpu" and int(d["threads"]) >= 1     # node.threads 0: torch's own
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
    assert "start-up objects frozen out of garbage collection" in node.log()
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
    from sensor_msgs.msg import PointField

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
    # is_dense = true is a hint, not a guarantee: an all-NaN cloud is empty all the same
    probe.publish(encode(nan_only, "xyzi", is_dense=True))
    d = probe.wait_for_diag(lambda d: d.get("rejected.empty") == "2", 30)
    assert d is not None, node.log()
    # a field the node does not use, past point_step: the field table is not trustworthy
    odd = cloud_to_msg(cloud(seed=6)[0])
    odd.fields = list(odd.fields) + [PointField(name="ambient", offset=odd.point_step,
                                                datatype=PointField.UINT16, count=1)]
    probe.publish(odd)
    d = probe.wait_for_diag(lambda d: d.get("rejected.field_past_point_step") == "1", 30)
    assert d is not None, node.log()
    assert "'ambient'" in d["last_rejection_reason"]
    good, kept = cloud(seed=5)
    probe.publish(good)
    d = probe.wait_for_diag(lambda d: int(d["frames_processed"]) == 1, 30)
    assert d is not None, node.log()
    assert int(d["frames_rejected"]) == 5 and int(d["points_kept"]) == kept
    assert node.alive()
    assert node.interrupt() == 0


def start_and_wait(params: dict) -> tuple[int, str]:
    proc = NodeProcess(PARAMS_FILE, params)
    try:
        code = proc.wait(60)
        return code, proc.log()
    finally:
        proc.close()


def test_transform_with_two_values_stops_startup():
    code, log = start_and_wait({"transform.translation": [1.0, 2.0]})
    assert code == 2
    assert ("parameter 'transform.translation' = [1.0, 2.0] has 2 values: allowed a list of "
            "exactly 3 numbers in [-100.0, 100.0]") in log, log


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


def test_int_stands_for_float_and_ros_node_parameters_are_accepted(node_with_extras):
    proc, probe = node_with_extras
    assert probe.wait_for_subscriber(30), proc.log()
    assert "unknown parameter" not in proc.log()
    # node.publish_mask false: no output/mask publisher, the other outputs are there
    assert probe.wait_for(lambda: probe.node.count_publishers("/output/markers") == 1, 10)
    assert probe.node.count_publishers("/output/objects") == 1
    assert probe.node.count_publishers("/output/mask") == 0
    d = probe.wait_for_diag(lambda d: True, 15)       # node.threads: the network's threads
    assert d is not None and d["threads"] == "1", (d, proc.log())
    assert proc.alive()
    assert proc.interrupt() == 0


def one_error_line(log: str) -> str:
    """The configuration error line of a node that stopped with exit code 2 (and nothing of a
    traceback around it)."""
    assert "Traceback" not in log and "RCLError" not in log, log
    lines = [x for x in log.splitlines() if x.startswith("[sparse_detector] invalid ")]
    assert len(lines) == 1, log
    return lines[0]


def test_configuration_errors_are_reported_all_at_once(tmp_path):
    """A typo, a mixed-type list (rcl refuses it), a value out of range in the parameter file and
    a grid value on the command line: one line naming all four, exit 2, no traceback."""
    f = tmp_path / "params.yaml"
    f.write_text("sparse_detector:\n  ros__parameters:\n    node:\n      qos_dpeth: 5\n"
                 "    transform:\n      translation: [0, 0, 0.5]\n    sparse:\n"
                 "      tile_size: 65\n", encoding="utf-8")
    code, log = start_and_wait_file(f, {"grid.resolution": 0.1})
    assert code == 2, log
    line = one_error_line(log)
    assert line.startswith("[sparse_detector] invalid configuration: 4 problems: "), line
    for fragment in ("unknown parameter 'node.qos_dpeth' = 5: did you mean 'node.qos_depth'?",
                     "'transform.translation' = [0, 0, 0.5] mixes float and integer values",
                     "'sparse.tile_size' = 65 is out of range: allowed [4, 64]",
                     "'grid.resolution' = 0.1 is not a runtime parameter"):
        assert fragment in line, line


def start_and_wait_file(params_file, params=None, extra_args=None) -> tuple[int, str]:
    proc = NodeProcess(params_file, params, extra_args)
    try:
        return proc.wait(60), proc.log()
    finally:
        proc.close()


def test_main_reports_argument_errors_in_one_line_before_rclpy(capsys):
    """In-process (no node, no DDS): our reading of the arguments fails first, every problem
    in one line; what only rclpy.init sees (an unknown ROS option) is one line too."""
    import signal

    from sparse_detector_ros.node import main

    # the quiet Ctrl-C handler covers the module's imports only: the usual one is back
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert main(["node", "--ros-args", "-p", "sparse.tile_size:=2", "-p", "node.qos_dpeth:=3",
                 "-p", "transform.rpy:=[0, 0, 0.5]"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("[sparse_detector] invalid configuration: 3 "
                                              "problems: "), err
    assert main(["node", "--ros-args", "--bogus-flag"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "[sparse_detector] invalid ROS arguments: UnknownROSArgsError: ['--bogus-flag']"


def test_unreadable_parameter_files_exit_2_with_one_line(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("sparse_detector:\n  ros__parameters:\n    sparse: {tile_size: 8\n")
    code, log = start_and_wait_file(broken, extra_args=["--params-file",
                                                        str(tmp_path / "missing.yaml")])
    assert code == 2, log
    line = one_error_line(log)
    assert f"parameter file '{broken}' is not valid YAML (line 4, column 1)" in line, line
    assert f"parameter file '{tmp_path / 'missing.yaml'}' cannot be read: No such file" in line


def test_only_this_nodes_entries_apply_and_wildcards_do(tmp_path):
    """Values for another node are ignored (even invalid ones), ``/**`` applies to every node,
    a later entry wins, and an unknown name is an error like in Config.from_yaml."""
    f = tmp_path / "shared.yaml"
    f.write_text("other_node:\n  ros__parameters:\n    sparse:\n      tile_size: 3\n"
                 "    bogus: 1\n/**:\n  ros__parameters:\n    node:\n      qos_depth: 3\n"
                 "sparse_detector:\n  ros__parameters:\n    node:\n      qos_depth: 7\n",
                 encoding="utf-8")
    proc, probe = NodeProcess(f), Probe()
    try:
        assert probe.wait_for_subscriber(60), proc.log()
        assert probe.wait_for(lambda: "depth 7)" in proc.log(), 10), proc.log()
        assert proc.interrupt() == 0
    finally:
        probe.close()
        proc.close()
    code, log = start_and_wait(FAST | {"sparse.tile": 8})
    assert code == 2
    assert "unknown parameter 'sparse.tile' = 8: did you mean 'sparse.tile_size'?" in \
        one_error_line(log)


@pytest.mark.parametrize("delay", [1.0, 1.5, 2.0, 2.5, 3.5])
def test_ctrl_c_during_start_up_exits_quietly(delay):
    """Ctrl-C while the modules load, the model loads or the warm-up runs (wherever ``delay``
    lands): exit code 0 and no traceback."""
    import time

    proc = NodeProcess(PARAMS_FILE)
    try:
        time.sleep(delay)
        code = proc.interrupt(30)
        log = proc.log()
        assert code == 0, log
        assert "Traceback" not in log and "KeyboardInterrupt" not in log, log
    finally:
        proc.close()


def test_clock_problems_and_faults_are_reported_and_kept_out_of_latency():
    """A cloud stamped 0 or an hour ahead is processed but is a clock problem: counted, WARN
    naming what to check, left out of the latency statistics. node.device cuda without a GPU:
    the CPU stands in, a WARN fault in every diagnostics message."""
    from builtin_interfaces.msg import Time

    gpu = torch.cuda.is_available()
    node, probe = NodeProcess(PARAMS_FILE, FAST | {"node.device": "cuda"}), Probe()
    try:
        assert probe.wait_for_subscriber(60), node.log()
        d = probe.wait_for_diag(lambda d: True, 15)
        assert d is not None, node.log()
        assert d["frames_lost"] == "0" and d["frames_lost_in_transport"] == "0", d
        if not gpu:
            assert d["device"] == "cpu" and d["level"] in ("1", "2"), d
            assert d["faults"].startswith("node.device is 'cuda' but no CUDA GPU"), d
            assert d["faults"] in d["message"]
        c, _ = cloud(seed=7)
        probe.publish(c, stamp=Time(sec=0, nanosec=0))
        d = probe.wait_for_diag(lambda d: d["frames_clock_skew"] == "1", 60)
        assert d is not None, node.log()
        assert d["frames_processed"] == "1" and d["latency_ms_p99"] == "0.000", d
        assert "cloud stamped 0" in d["message"] and "use_sim_time" in d["message"], d
        assert float(d["last_clock_skew_s"]) < -1e6 and d["level"] in ("1", "2"), d
        now = probe.now()
        probe.publish(c, stamp=Time(sec=now.sec + 3600, nanosec=now.nanosec))
        d = probe.wait_for_diag(lambda d: d["frames_clock_skew"] == "2", 60)
        assert d is not None, node.log()
        assert re.search(r"stamped 3[56]\d\d\.\d s ahead of the node's clock", d["message"]), d
        probe.publish(c)                                   # a good stamp: a real latency
        d = probe.wait_for_diag(lambda d: d["frames_processed"] == "3", 60)
        assert d is not None, node.log()
        assert 0 < float(d["latency_ms_p99"]) < 60_000 and d["frames_clock_skew"] == "2", d
        assert node.interrupt() == 0
    finally:
        probe.close()
        node.close()


def test_unreadable_map_stops_start_up_or_falls_back_when_not_required(tmp_path):
    corrupt = tmp_path / "map.yaml"
    corrupt.write_text("image: map.png\nresolution: [0.1\n")
    code, log = start_and_wait({"mask.mode": "map_prior", "mask.map_yaml": str(corrupt)})
    assert code == 2, log
    line = one_error_line(log)
    assert f"'mask.map_yaml' = '{corrupt}': the map could not be read" in line, line
    assert "is not valid YAML" in line and "mask.map_required to false" in line
    params = FAST | {"mask.mode": "map_prior", "mask.map_yaml": str(corrupt),
                     "mask.map_required": False}
    node, probe = NodeProcess(PARAMS_FILE, params), Probe()
    try:
        assert probe.wait_for_subscriber(60), node.log()
        assert "mask.map_required is false, running with mask.map_fallback" in node.log()
        probe.publish(cloud(seed=8)[0])
        d = probe.wait_for_diag(lambda d: d["frames_processed"] == "1", 60)
        assert d is not None, node.log()
        assert d["mask_mode"] == "occupancy" and d["level"] in ("1", "2"), d
        assert d["mask_fallback"].startswith(f"parameter 'mask.map_yaml' = '{corrupt}': the map "
                                             "could not be read"), d
        assert "mask 'occupancy' ran instead of the configured one" in d["message"], d
        assert node.interrupt() == 0
    finally:
        probe.close()
        node.close()


def test_truncated_weights_stop_startup_naming_the_file(tmp_path):
    from sparse_detector_ros.pipeline import build_modules
    from sparse_detector_ros.config import Config

    desc = load_description()
    save_checkpoint(tmp_path / "w.pt", desc, build_modules(desc, Config()).state_dict())
    data = (tmp_path / "w.pt").read_bytes()
    (tmp_path / "w.pt").write_bytes(data[: len(data) // 3])
    path = replace(desc, weights="w.pt").save(tmp_path / "model.yaml")
    code, log = start_and_wait({"model.path": str(path)})
    assert code == 2, log
    assert f"weights '{tmp_path / 'w.pt'}' of model description '{path}' cannot be read " \
           "(corrupt, truncated" in one_error_line(log)


def test_demo_command_runs_end_to_end(tmp_path):
    """README command 1: the demo streams a drive into the real node and reports detections
    against ground truth, latency and the backbone speed-up, with pictures."""
    import json
    import subprocess
    import sys

    exe = Path(sys.executable).parent / "sparse-detector"
    out = subprocess.run([str(exe), "demo", "--frames", "3", "--picture-every", "2",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "demo summary" in out.stdout and "node stopped with exit code 0" in out.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["frames_sent"] == 3 and summary["frames_rejected"] == 0
    assert 1 <= summary["frames_processed"] <= summary["frames_received"] <= 3
    assert summary["tp"] >= 1 and 0 < summary["recall"] <= 1  # the shipped weights find objects
    assert summary["latency_ms_p50"] > 0 and 0 < summary["active_fraction"] < 1
    assert summary["backbone_ms_dense_p50"] > 0 and summary["backbone_speedup"] > 0
    pictures = sorted(p.name for p in tmp_path.glob("frame_*.png"))
    assert pictures and set(pictures) <= {"frame_000.png", "frame_002.png"}


# --------------------------------------------------------------------------- outputs, live params

# The sensor is mounted turned by 90 degrees and 0.5 m lower than the detection frame the model
# was trained in: its clouds are the simulated scan seen from there, and the node's outputs must
# come back in that (cloud) frame.
MOUNT = {"transform.translation": [0.0, 0.0, 0.5], "transform.rpy": [0.0, 0.0, math.pi / 2]}


@pytest.fixture(scope="module")
def mounted_scan():
    """One hdl64e scan of a fixed scene (the shipped model's test scene) expressed in the
    mounted sensor's frame, and its ground-truth car centres (points >= 20) in that frame."""
    frame = render_frame(generate_scene(seeds("eval", 1, offset=100)[0], duration=0.5),
                         get_lidar("hdl64e"), 0)
    mount = MountTransform(MOUNT["transform.translation"], MOUNT["transform.rpy"])
    to_cloud = lambda p: (p - mount.translation) @ mount.rotation  # noqa: E731  R^T (p - t)
    frame.points[:, :3] = to_cloud(frame.points[:, :3].astype(np.float64))
    cars = frame.boxes[(np.asarray(frame.labels) == "car") & (frame.num_points >= 20)]
    return cloud_buffer(frame, "velodyne"), to_cloud(cars[:, :3].astype(np.float64)), mount


def road_map(tmp_path):
    """A nav2 map that is road everywhere within 150 m of the map origin."""
    return str(save_map(tmp_path / "map.yaml", np.full((300, 300), 254, np.uint8),
                        origin=(-150.0, -150.0, 0.0), resolution=1.0))


def stamp_of(msg):
    return (msg.header.stamp.sec, msg.header.stamp.nanosec, msg.header.frame_id)


def test_outputs_odometry_and_live_parameters(tmp_path, mounted_scan):
    scan, cars, mount = mounted_scan
    params = FAST | MOUNT | {"mask.mode": "map_prior", "mask.map_yaml": road_map(tmp_path),
                             "node.input_timeout_s": 1.0}
    node, probe = NodeProcess(PARAMS_FILE, params), Probe()
    try:
        assert probe.wait_for_subscriber(60), node.log()
        assert probe.has_objects, "vision_msgs should be installed by setup"
        assert "warm-up frame" in node.log()
        # ERROR before any cloud arrived (node.input_timeout_s), and the backend
        d = probe.wait_for_diag(lambda d: d["level"] == "2", 15)
        assert d is not None, node.log()
        assert "no point cloud received since start-up" in d["message"]
        assert d["backend"] == "torch" and d["device"] == "cpu"

        def frame(n, odom_age=None):
            """Send the scan (after odometry ``odom_age`` s older than it, if given); return
            its stamp and the diagnostics once it is processed (the n-th frame)."""
            stamp = probe.now()
            if odom_age is not None:
                t = stamp.sec + stamp.nanosec * 1e-9 - odom_age
                odom_stamp = type(stamp)(sec=int(t), nanosec=int(round((t % 1) * 1e9)) % 10**9)
                for _ in range(3):
                    probe.publish_odometry(0.0, 0.0, 0.0, odom_stamp)
                    probe.spin_for(0.1)
            probe.publish(scan, stamp=stamp)
            d = probe.wait_for_diag(lambda d: int(d["frames_processed"]) >= n, 60)
            assert d is not None and int(d["frames_processed"]) == n, (d, node.log())
            return stamp, d

        # 1. no odometry: map prior -> fallback, said why; outputs carry the cloud's header
        stamp, d = frame(1)
        assert d["mask_mode"] == "occupancy", d
        assert d["mask_fallback"].startswith("no odometry received on /input/odometry; no "
                                             "sensor pose"), d
        want = (stamp.sec, stamp.nanosec, "lidar")
        objects = probe.wait_for_output("objects", stamp, 30)
        markers = probe.wait_for_output("markers", stamp, 30)
        mask = probe.wait_for_output("masks", stamp, 30)
        assert objects and markers and mask, node.log()
        assert stamp_of(objects) == want and stamp_of(mask) == want
        assert all(stamp_of(m) == want for m in [*objects.detections, *markers.markers])
        found = np.array([[x.bbox.center.position.x, x.bbox.center.position.y,
                           x.bbox.center.position.z] for x in objects.detections
                          if x.results[0].hypothesis.class_id == "car"])
        assert len(found) >= 1 and int(d["detections.car"]) == len(found)
        assert int(d["detections"]) == len(objects.detections)
        # boxes in the cloud's frame: near the ground-truth cars seen from the mounted sensor
        dist = np.linalg.norm(found[:, None, :2] - cars[None, :, :2], axis=2).min(1)
        assert (dist < 2.0).mean() >= 0.5, dist
        assert markers.markers[0].action == markers.markers[0].DELETEALL
        assert len(markers.markers) == 1 + 3 * len(objects.detections)
        grid = load_description().grid
        origin = (np.array([grid.x_min, grid.y_min, 0.0]) - mount.translation) @ mount.rotation
        o = mask.info.origin.position
        assert np.allclose([o.x, o.y, o.z], origin, atol=1e-6)
        assert 100 in mask.data and 0 in mask.data
        for key in (*[f"{s}_ms_p{q}" for s in STAGES for q in (50, 99)], "total_ms_p50",
                    "total_ms_p99", "latency_ms_p50", "latency_ms_p99"):
            assert float(d[key]) > 0, key

        # 2. odometry too old, then fresh: the map prior is used
        _, d = frame(2, odom_age=2.0)
        assert d["mask_fallback"].startswith("odometry 2.0 s older than the cloud "
                                             "(node.odometry_timeout_s = 0.5)"), d
        _, d = frame(3, odom_age=0.0)
        assert d["mask_mode"] == "map_prior" and d["mask_fallback"] == "", d

        # 3. live parameters take effect from the next frame
        ok, = probe.set_parameters({"detector.score_thresholds": [1.0]})
        assert ok.successful, ok.reason
        stamp, d = frame(4)
        objects = probe.wait_for_output("objects", stamp, 30)
        assert objects is not None and len(objects.detections) == 0
        assert int(d["detections"]) == 0 and d["detections.car"] == "0"
        assert len(probe.wait_for_output("markers", stamp, 30).markers) == 1  # DELETEALL only
        ok, = probe.set_parameters({"mask.mode": "dense"})
        assert ok.successful, ok.reason
        _, d = frame(5)
        assert d["mask_mode"] == "dense" and float(d["active_fraction"]) == 1.0, d

        # 4. refused: start-up only, out of range, a map that cannot be read (old one stays)
        res = probe.set_parameters({"node.device": "cpu", "sparse.tile_size": 8,
                                    "detector.score_thresholds": [0.2, 1.5]})
        assert not any(r.successful for r in res)
        assert "node.device" in res[0].reason and "sparse.tile_size" in res[1].reason
        assert ("parameter 'detector.score_thresholds' = [0.2, 1.5] is out of range"
                in res[2].reason), res[2].reason
        ok, bad = probe.set_parameters({"mask.mode": "map_prior",
                                        "mask.map_yaml": str(tmp_path / "missing.yaml")})
        assert ok.successful and not bad.successful
        assert "'mask.map_yaml'" in bad.reason and "could not be read" in bad.reason
        _, d = frame(6, odom_age=0.0)
        assert d["mask_mode"] == "map_prior" and d["mask_fallback"] == "", d

        # 5. a live latency budget below the measured latency: WARN (or ERROR, should the
        # input time out meanwhile) naming it
        ok, = probe.set_parameters({"node.latency_budget_ms": 0.1})
        assert ok.successful, ok.reason
        d = probe.wait_for_diag(lambda d: "node.latency_budget_ms = 0.1" in d["message"], 10)
        assert d is not None and d["level"] in ("1", "2"), probe.latest()
        assert node.alive()
        assert node.interrupt() == 0
    finally:
        probe.close()
        node.close()
