"""``sparse-detector bag`` and ``sparse-detector replay`` on a small synthetic rosbag2 (4 frames of
a VLP-16 drive, written by sim/export into tmp_path)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from sparse_detector_ros import ros_io
from sparse_detector_ros.cli import main as cli_main
from sparse_detector_ros.tools import bag_cli, replay_cli

ROOT = Path(__file__).resolve().parents[1]
PARAMS_FILE = ROOT / "config" / "sparse_detector.yaml"
FRAMES = 4
# scene seed 0 with the VLP-16: a car of more than 1000 points 2-3 m from the sensor in every
# frame (ground_truth.json), which the shipped weights find
SEED = 0
OUTPUTS = (bag_cli.TOPIC_OBJECTS, bag_cli.TOPIC_MARKERS, bag_cli.TOPIC_MASK,
           bag_cli.TOPIC_DIAGNOSTICS)
INPUTS = ("/points", "/odom", "/tf", "/tf_static", "/ground_truth/markers")
CLI = Path(sys.executable).parent / "sparse-detector"


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """``scene_000/{bag/, map.yaml, ground_truth.json}`` of a 4-frame VLP-16 drive."""
    from sparse_detector_ros.sim import FRAME_RATE, generate_scene, get_lidar
    from sparse_detector_ros.sim.export import write_scene

    out = tmp_path_factory.mktemp("sim") / "scene_000"
    write_scene(generate_scene(SEED, duration=(FRAMES - 1) / FRAME_RATE), get_lidar("vlp16"),
                out, frames=FRAMES)
    return out


def run_bag(capsys, *args) -> tuple[dict, str]:
    """Run ``sparse-detector bag`` in this process: its JSON summary line and its stderr."""
    assert cli_main(["bag", *map(str, args), "--no-progress", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out.strip().splitlines()[-1]), captured.err


def read_bag(path, typestore=None):
    """``{topic: [(log time, message)]}`` and the connections of a rosbag2, deserialized."""
    from rosbags.highlevel import AnyReader

    out: dict[str, list] = {}
    with AnyReader([Path(path)], default_typestore=typestore) as reader:
        for conn, t, raw in reader.messages():
            out.setdefault(conn.topic, []).append((t, reader.deserialize(raw, conn.msgtype)))
        return out, {c.topic: c for c in reader.connections}


def stamp(msg) -> int:
    return bag_cli.stamp_ns(msg.header.stamp)


def headers(msg) -> set[tuple[int, str]]:
    """(stamp, frame_id) of a message's header, or of every marker of a MarkerArray."""
    hs = [m.header for m in msg.markers] if hasattr(msg, "markers") else [msg.header]
    return {(bag_cli.stamp_ns(h.stamp), h.frame_id) for h in hs}


@pytest.fixture(scope="module")
def detected(scene, tmp_path_factory):
    """The bag tool's MCAP output for the scene and its summary."""
    out = tmp_path_factory.mktemp("bag") / "out"
    # module scope: no capsys; the summary is the last stdout line of the subprocess
    proc = subprocess.run([CLI, "bag", scene / "bag", "--out", out, "--no-progress",
                           "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out, json.loads(proc.stdout.strip().splitlines()[-1])


def test_bag_writes_inputs_and_one_output_per_cloud_with_the_cloud_header(scene, detected):
    out, summary = detected
    assert bag_cli.bag_storage(out) == "mcap"
    msgs, conns = read_bag(out, bag_cli.output_typestore())
    src, _ = read_bag(scene / "bag")
    assert set(msgs) == set(INPUTS) | set(OUTPUTS)
    for topic in INPUTS:     # copied unchanged, at the same log times
        assert [t for t, _ in msgs[topic]] == [t for t, _ in src[topic]]
    assert conns["/tf_static"].ext.offered_qos_profiles   # latched QoS copied too
    clouds = msgs["/points"]
    assert len(clouds) == FRAMES
    for topic in OUTPUTS:
        got = msgs[topic]
        assert len(got) == FRAMES, topic
        for (t_cloud, cloud), (t, m) in zip(clouds, got):
            assert t == t_cloud, topic
            assert headers(m) == {(stamp(cloud), "lidar")}, topic
    assert summary["frames"] == summary["clouds"] == FRAMES and summary["skipped"] == 0
    assert summary["objects"] is True
    assert set(summary["stage_ms"]) == {"decode", "rasterize", "mask", "backbone", "head",
                                        "boxes"}
    for s in summary["stage_ms"].values():
        assert 0 < s["p50"] <= s["p99"]
    assert 0 < summary["active_fraction"] <= 1
    n_objects = sum(len(m.detections) for _, m in msgs[bag_cli.TOPIC_OBJECTS])
    assert sum(summary["detections"].values()) == n_objects


def test_bag_outputs_hold_detections_mask_and_per_stage_diagnostics(scene, detected):
    out, summary = detected
    msgs, _ = read_bag(out, bag_cli.output_typestore())
    for (_, objects), (_, markers), (_, mask), (_, diag) in zip(
            *(msgs[t] for t in OUTPUTS)):
        n = len(objects.detections)
        assert [d.id for d in objects.detections] == [str(k) for k in range(n)]
        assert all(d.header.stamp == objects.header.stamp for d in objects.detections)
        assert markers.markers[0].action == 3            # DELETEALL, then 3 markers a box
        assert len(markers.markers) == 1 + 3 * n
        assert mask.info.width * mask.info.height == len(mask.data) > 0
        values = set(np.asarray(mask.data).tolist())
        assert values == {0, 100}
        d = {kv.key: kv.value for kv in diag.status[0].values}
        assert diag.status[0].name == ros_io.DIAG_NAME
        for stage in summary["stage_ms"]:
            assert float(d[f"{stage}_ms"]) > 0
        assert int(d["detections"]) == n == sum(int(d[f"detections.{c}"])
                                                for c in ("car", "pedestrian", "cyclist"))
        assert d["mask_mode"] == "occupancy"


def assert_near_car_found(scene, out):
    """In every frame the ground truth has a car of more than 1000 points; a car detection sits
    within 0.5 m of its centre (both in the cloud's frame)."""
    msgs, _ = read_bag(out, bag_cli.output_typestore())
    gt = json.loads((scene / "ground_truth.json").read_text())["frames"]
    assert len(msgs[bag_cli.TOPIC_OBJECTS]) == len(gt)
    for frame, (_, objects) in zip(gt, msgs[bag_cli.TOPIC_OBJECTS]):
        assert stamp(objects) == frame["stamp_ns"]
        big = [b for b in frame["boxes"] if b["label"] == "car" and b["num_points"] > 1000]
        assert big, "the scene no longer has the near car: pick another seed"
        for b in big:
            dist = [np.hypot(d.bbox.center.position.x - b["x"], d.bbox.center.position.y - b["y"])
                    for d in objects.detections if d.results[0].hypothesis.class_id == "car"]
            assert dist and min(dist) < 0.5, (b, dist)


def test_shipped_weights_find_the_near_car(scene, detected):
    assert_near_car_found(scene, detected[0])


def test_mount_transform_detects_in_the_detection_frame_and_answers_in_the_cloud_frame(
        scene, tmp_path, capsys):
    """transform.rpy turns the cloud by 90 degrees about z before detection (the detector sees
    a turned scene); the boxes come back into the cloud's frame, where the car still is."""
    params = tmp_path / "params.yaml"
    params.write_text("sparse_detector:\n  ros__parameters:\n    transform:\n"
                      "      rpy: [0.0, 0.0, 1.5707963267948966]\n")
    run_bag(capsys, scene / "bag", "--out", tmp_path / "out", "--params-file", params)
    assert_near_car_found(scene, tmp_path / "out")


def test_bag_writes_sqlite3_too(scene, tmp_path, capsys):
    out = tmp_path / "out"
    summary, _ = run_bag(capsys, scene / "bag", "--out", out, "--storage", "sqlite3")
    assert bag_cli.bag_storage(out) == "sqlite3" and summary["storage"] == "sqlite3"
    msgs, _ = read_bag(out, bag_cli.output_typestore())
    assert set(msgs) == set(INPUTS) | set(OUTPUTS)
    assert all(len(msgs[t]) == FRAMES for t in OUTPUTS)
    # and the sqlite3 bag is read as input like the MCAP one (same storage by default)
    again, _ = run_bag(capsys, out, "--out", tmp_path / "again")
    assert again["storage"] == "sqlite3" and again["frames"] == FRAMES


def _write_bag_with_bad_clouds(src: Path, dst: Path) -> None:
    """Copy of ``src`` whose cloud 1 has half its data and cloud 2 an empty frame_id."""
    from dataclasses import replace as dc_replace

    from rosbags.highlevel import AnyReader
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    ts = get_typestore(Stores.ROS2_HUMBLE)
    with AnyReader([src], default_typestore=ts) as reader, Writer(dst, version=9,
                                            storage_plugin=StoragePlugin.MCAP) as writer:
        conns = {c.id: writer.add_connection(c.topic, c.msgtype, msgdef=c.msgdef.data,
                                             rihs01=c.digest,
                                             offered_qos_profiles=c.ext.offered_qos_profiles)
                 for c in reader.connections}
        k = 0
        for conn, t, raw in reader.messages():
            if conn.topic == "/points":
                msg = reader.deserialize(raw, conn.msgtype)
                if k == 1:
                    msg = dc_replace(msg, data=msg.data[:len(msg.data) // 2])
                elif k == 2:
                    msg = dc_replace(msg, header=dc_replace(msg.header, frame_id=""))
                raw = ts.serialize_cdr(msg, conn.msgtype)
                k += 1
            writer.write(conns[conn.id], t, raw)


def test_malformed_clouds_are_skipped_and_counted(scene, tmp_path, capsys):
    bad = tmp_path / "bad"
    _write_bag_with_bad_clouds(scene / "bag", bad)
    out = tmp_path / "out"
    summary, err = run_bag(capsys, bad, "--out", out)
    assert summary["clouds"] == FRAMES and summary["frames"] == FRAMES - 2
    assert summary["skipped"] == 2
    assert summary["skipped_by_kind"] == {"bad_length": 1, "no_frame_id": 1}
    assert "skipped 2 cloud(s)" in err
    msgs, _ = read_bag(out, bag_cli.output_typestore())
    assert len(msgs["/points"]) == FRAMES                  # bad clouds are still copied
    good = [stamp(m) for i, (_, m) in enumerate(msgs["/points"]) if i not in (1, 2)]
    for topic in OUTPUTS:
        assert [headers(m) for _, m in msgs[topic]] == [{(g, "lidar")} for g in good], topic


def test_without_vision_msgs_everything_but_objects_is_written(scene, tmp_path, capsys,
                                                               monkeypatch):
    monkeypatch.setattr(ros_io, "vision_msgs_error", lambda: "vision_msgs is not installed")
    out = tmp_path / "out"
    summary, err = run_bag(capsys, scene / "bag", "--out", out)
    assert summary["objects"] is False
    assert err.count("vision_msgs is not installed") == 1
    msgs, _ = read_bag(out)
    assert bag_cli.TOPIC_OBJECTS not in msgs
    assert all(len(msgs[t]) == FRAMES for t in OUTPUTS if t != bag_cli.TOPIC_OBJECTS)


def test_map_prior_uses_fresh_odometry_and_falls_back_without_it(scene, tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("sparse_detector:\n  ros__parameters:\n    mask:\n      mode: map_prior\n")
    common = ("--params-file", params, "--map", scene / "map.yaml")
    with_pose, _ = run_bag(capsys, scene / "bag", "--out", tmp_path / "a", *common)
    assert with_pose["frames_without_pose"] == 0
    no_pose, _ = run_bag(capsys, scene / "bag", "--out", tmp_path / "b", *common,
                      "--odom-topic", "/no_such_odometry")
    assert no_pose["frames_without_pose"] == FRAMES
    for out, fallback in ((tmp_path / "a", False), (tmp_path / "b", True)):
        msgs, _ = read_bag(out, bag_cli.output_typestore())
        for _, diag in msgs[bag_cli.TOPIC_DIAGNOSTICS]:
            d = {kv.key: kv.value for kv in diag.status[0].values}
            assert (d["mask_fallback"] != "") == fallback, d
            assert d["mask_mode"] == ("occupancy" if fallback else "map_prior")


def test_odometry_pose_and_staleness_rule():
    def odom(x=1.0):
        q = SimpleNamespace(x=0.0, y=0.0, z=np.sin(0.3), w=np.cos(0.3))   # yaw 0.6
        return SimpleNamespace(header=SimpleNamespace(stamp=SimpleNamespace(sec=10, nanosec=0)),
                               pose=SimpleNamespace(pose=SimpleNamespace(
                                   position=SimpleNamespace(x=x, y=2.0, z=3.0), orientation=q)))

    rec = bag_cli.odometry_pose(odom())
    (x, y, yaw), t = rec
    assert (x, y, t) == (1.0, 2.0, 10_000_000_000) and yaw == pytest.approx(0.6)
    assert bag_cli.pose_for(rec, 10_400_000_000, 0.5) == rec[0]
    assert bag_cli.pose_for(rec, 10_600_000_000, 0.5) is None             # 0.6 s older
    assert bag_cli.pose_for(rec, 9_400_000_000, 0.5) is None              # 0.6 s newer
    assert bag_cli.pose_for(None, 10_000_000_000, 0.5) is None
    with pytest.raises(ValueError, match="not finite"):
        bag_cli.odometry_pose(odom(x=float("nan")))


def test_bag_refuses_bad_inputs(scene, tmp_path, capsys):
    assert cli_main(["bag", str(scene / "bag"), "--out", str(tmp_path / "o"),
                     "--points-topic", "/lidar", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "/lidar" in err and "/points" in err                  # names the bag's topics
    assert cli_main(["bag", str(tmp_path), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "not a rosbag2 folder" in capsys.readouterr().err
    assert cli_main(["bag", str(scene / "bag"), "--out", str(scene), "--no-progress"]) == 2
    assert "exists" in capsys.readouterr().err


# -- replay ----------------------------------------------------------------------------------

def test_replay_parses_remaps_and_finds_message_classes():
    assert replay_cli.parse_remaps(["/a:=/b", "/c:=d"]) == {"/a": "/b", "/c": "d"}
    for bad in ("/a", ":=/b", "/a:="):
        with pytest.raises(replay_cli.ReplayError, match="FROM:=TO"):
            replay_cli.parse_remaps([bad])
    from sensor_msgs.msg import PointCloud2
    assert replay_cli.message_class("sensor_msgs/msg/PointCloud2") is PointCloud2
    assert replay_cli.message_class("no_such_msgs/msg/Thing") is None
    assert replay_cli.is_latched("/tf_static", [])


class Listener:
    """An rclpy node recording the stamps seen on a few topics: reliable for what replay
    publishes (replay waits for reliable subscribers to acknowledge its last messages),
    best-effort (matches any publisher) for the node's outputs."""

    def __init__(self):
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from nav_msgs.msg import Odometry
        from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
        from rosgraph_msgs.msg import Clock
        from visualization_msgs.msg import MarkerArray

        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node("bag_tools_listener", context=self.context)
        self.seen: dict[str, list[int]] = {}
        self.diag_frames: list[int] = []

        def record(topic, key=lambda m: stamp(m)):
            def cb(msg):
                self.seen.setdefault(topic, []).append(key(msg))
            return cb

        reliable = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
        for topic, cls, key, qos in (
                ("/clock", Clock, lambda m: bag_cli.stamp_ns(m.clock), reliable),
                ("/output/markers", MarkerArray, lambda m: bag_cli.stamp_ns(
                    m.markers[0].header.stamp), qos_profile_sensor_data),
                ("/ground_truth/markers", MarkerArray, lambda m: bag_cli.stamp_ns(
                    m.markers[0].header.stamp), reliable),
                ("/odom", Odometry, stamp, reliable)):
            self.node.create_subscription(cls, topic, record(topic, key), qos)

        def on_diag(msg):
            d = ros_io.diagnostics_to_dict(msg)
            if d is not None:
                self.seen.setdefault("/diagnostics", []).append(stamp(msg))
                self.diag_frames.append(int(d["frames_processed"]))

        self.node.create_subscription(DiagnosticArray, "/diagnostics", on_diag,
                                      qos_profile_sensor_data)
        self.executor = rclpy.executors.SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)

    def spin_until(self, predicate, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate():
                return True
            self.executor.spin_once(timeout_sec=0.05)
        return predicate()

    def close(self):
        import rclpy

        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)


@pytest.mark.ros
def test_replay_drives_a_sim_time_node(scene):
    """The node runs on the bag's time (use_sim_time + /clock from replay): its markers carry
    the replayed clouds' stamps and its diagnostics are stamped in bag time; --topics and
    --remap apply."""
    from sparse_detector_ros.tools.node_client import NodeProcess

    src, _ = read_bag(scene / "bag")
    cloud_stamps = [stamp(m) for _, m in src["/points"]]
    first, last = cloud_stamps[0], cloud_stamps[-1]
    node = NodeProcess(PARAMS_FILE, {"use_sim_time": True, "node.device": "cpu",
                                     "node.diagnostics_period": 0.1},
                       extra_args=["-r", "input/points:=/lidar/points"])
    listener = Listener()
    replay = None
    try:
        assert listener.spin_until(
            lambda: listener.node.count_subscribers("/lidar/points") > 0, 60), node.log()
        replay = subprocess.Popen(
            [CLI, "replay", scene / "bag", "--topics", "/points", "/ground_truth/markers",
             "--remap", "/points:=/lidar/points", "--rate", "0.5", "--start-delay", "0.5",
             "--wait-for", "/lidar/points", "/ground_truth/markers", "/clock"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert listener.spin_until(lambda: replay.poll() is not None, 60)
        out, err = replay.communicate()
        assert replay.returncode == 0, err
        summary = json.loads(out.strip().splitlines()[-1])
        assert summary["published"]["/lidar/points"] == FRAMES
        assert summary["published"]["/ground_truth/markers"] == FRAMES
        assert not summary["interrupted"]
        listener.spin_until(lambda: len(listener.seen.get("/output/markers", [])) >= 1, 20)
        clock = listener.seen.get("/clock", [])
        assert clock and first <= min(clock) and max(clock) == last
        assert clock == sorted(clock)
        assert listener.seen.get("/ground_truth/markers") == cloud_stamps
        assert "/odom" not in listener.seen                          # not in --topics
        markers = listener.seen.get("/output/markers", [])
        assert markers and set(markers) <= set(cloud_stamps), (markers, node.log())
        diag = listener.seen.get("/diagnostics", [])
        assert diag and all(first <= s <= last + 10**9 for s in diag), (diag, node.log())
        assert max(listener.diag_frames) >= 1, node.log()
    finally:
        if replay is not None and replay.poll() is None:
            replay.kill()
            replay.wait()
        listener.close()
        node.close()


@pytest.mark.ros
def test_replay_stops_cleanly_on_ctrl_c(scene):
    replay = subprocess.Popen([CLI, "replay", scene / "bag", "--rate", "0.01",
                               "--start-delay", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONUNBUFFERED="1"))
    listener = Listener()
    try:
        assert listener.spin_until(lambda: len(listener.seen.get("/clock", [])) >= 3, 60)
        replay.send_signal(signal.SIGINT)
        out, err = replay.communicate(timeout=20)
        assert replay.returncode == 0, err
        summary = json.loads(out.strip().splitlines()[-1])
        assert summary["interrupted"] is True
        assert summary["published"].get("/points", 0) < FRAMES
        assert "Traceback" not in err
    finally:
        if replay.poll() is None:
            replay.kill()
            replay.wait()
        listener.close()
