"""Synthetic LiDAR world: determinism, ray casting, occlusion, ground truth, scene layout,
road map (nav2 format), rosbag2 export round trip, Dataset and CLI."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_detector_ros.boxes import count_points_in_boxes, points_in_boxes
from sparse_detector_ros.sim import (CLASSES, PRESETS, Actor, Scene, generate_scene, get_lidar,
                                     render_frame)
from sparse_detector_ros.sim import shapes
from sparse_detector_ros.sim.frames import (count_margin, counting_boxes, scene_primitives,
                                             sensor_pose)
from sparse_detector_ros.sim.raycast import (GROUND, SURFACE, Primitives, cast_rays,
                                             surface_distance)
from sparse_detector_ros.config import GridConfig
from sparse_detector_ros.masks import load_map, map_in_sensor_frame
from sparse_detector_ros.sim.roads import Road

# small sensors keep the suite fast; the geometry is the same as the full presets
SMALL = get_lidar("hdl32e", columns=720)
TINY = get_lidar("vlp16", columns=400)


@pytest.fixture(scope="module")
def scene():
    return generate_scene(5, duration=0.9)


@pytest.fixture(scope="module")
def frame(scene):
    return render_frame(scene, SMALL, 3)


def frame_primitives(scene, lidar, index):
    t = index / 10.0
    sx, sy, sz, syaw = sensor_pose(scene, lidar, t)
    world = scene_primitives(scene, t, (sx, sy), lidar.max_range + 20)
    return world.inverse_transformed(sx, sy, sz, syaw), -sz


# ----------------------------------------------------------------------------- determinism

def test_same_seed_same_frame_different_seed_different():
    a = render_frame(generate_scene(11, duration=0.5), TINY, 4)
    b = render_frame(generate_scene(11, duration=0.5), TINY, 4)
    c = render_frame(generate_scene(12, duration=0.5), TINY, 4)
    for name in ("points", "ring", "time", "owner", "surface", "boxes", "num_points", "ego_pose"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert list(a.labels) == list(b.labels)
    assert a.points.shape != c.points.shape or not np.array_equal(a.points, c.points)


# ----------------------------------------------------------------------------- LiDAR model

@pytest.mark.parametrize("name,beams,lo,hi", [("vlp16", 16, -15, 15), ("hdl32e", 32, -30.67, 10.67),
                                              ("hdl64e", 64, -24.33, 2.0),
                                              ("os1-64", 64, -22.5, 22.5),
                                              ("os1-128", 128, -22.5, 22.5),
                                              ("mid360", 32, -7.0, 52.0)])
def test_presets_have_the_sensor_fields_of_view(name, beams, lo, hi):
    lid = PRESETS[name]
    el = np.rad2deg(lid.elevations)
    assert lid.beams == beams
    assert el.min() == pytest.approx(lo, abs=1e-6) and el.max() == pytest.approx(hi, abs=1e-6)
    # Velodyne numbers rings bottom-up, Ouster top-down
    assert (el[0] < el[-1]) == (lid.ring_order == "bottom_up")
    t = lid.column_times()
    assert t.min() >= 0 and t.max() < lid.period


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="vlp16"):
        get_lidar("nope")


def test_frame_fields_are_sensor_like(frame):
    p = frame.points
    assert p.dtype == np.float32 and p.shape[1] == 4
    assert np.all((p[:, 3] >= 0) & (p[:, 3] <= 255))
    r = np.linalg.norm(p[:, :3], axis=1)
    assert r.min() >= SMALL.min_range - 0.1 and r.max() <= SMALL.max_range + 0.1
    assert frame.ring.max() < SMALL.beams and frame.time.max() < SMALL.period
    # time grows with the firing order; ring = beam: elevation of each point matches its ring
    assert np.all(np.diff(frame.time) >= 0)
    el = np.arcsin(p[:, 2] / r)
    np.testing.assert_allclose(el, np.asarray(SMALL.elevations)[frame.ring], atol=1e-4)
    ground = frame.owner == GROUND
    np.testing.assert_allclose(p[ground, 2], -SMALL.mount_height, atol=3 * SMALL.range_noise)
    # intensity follows the surface: markings are brighter than asphalt
    road = p[frame.surface == SURFACE["road"], 3]
    mark = p[frame.surface == SURFACE["marking"], 3]
    assert len(mark) and np.median(mark) > 3 * np.median(road)


# ----------------------------------------------------------------------------- roads

@settings(max_examples=60, deadline=None, derandomize=True)
@given(s=st.floats(0.0, 1.0), l=st.floats(-6.0, 6.0), curv=st.floats(0.015, 0.04),
       sign=st.sampled_from([-1, 1]), angle=st.floats(0.3, 1.5))
def test_road_coordinates_round_trip(s, l, curv, sign, angle):
    road = Road.chain((3.0, -2.0), 0.4, [("line", 30.0), ("arc", sign * curv, angle / curv),
                                          ("line", 25.0)])
    s = s * road.length
    x, y, h = road.pose(np.array([s]), l)
    s2, l2, d = road.project(x, y)
    # a point within the inner radius projects back onto the same (s, l)
    if abs(l) < 0.9 / curv:
        assert abs(float(l2[0]) - l) < 1e-6 and abs(float(d[0]) - abs(l)) < 1e-6
        x2, y2, _ = road.pose(s2, l2)
        assert np.hypot(x2 - x, y2 - y)[0] < 1e-6


# ----------------------------------------------------------------------------- ray casting

def test_culled_casting_equals_brute_force(scene):
    prims, gz = frame_primitives(scene, SMALL, 0)
    for k in Primitives.KINDS:   # porosity draws random numbers per block: switch it off
        setattr(prims, k + "_poro", np.zeros(len(getattr(prims, k))))
    a = cast_rays(prims, SMALL, gz, np.random.default_rng(0))
    b = cast_rays(prims, SMALL, gz, np.random.default_rng(0), cull=False)
    seen = a.t <= SMALL.max_range          # beyond the range the cull drops primitives
    np.testing.assert_array_equal(seen, b.t <= SMALL.max_range)
    np.testing.assert_array_equal(a.t[seen], b.t[seen])
    np.testing.assert_array_equal(a.owner[seen], b.owner[seen])


def test_every_point_lies_on_a_scene_surface_within_the_noise(scene):
    f = render_frame(scene, SMALL, 5)
    prims, gz = frame_primitives(scene, SMALL, 5)
    d = surface_distance(prims, gz, f.points)
    assert d.max() <= 3 * SMALL.range_noise + 2e-3, np.sort(d)[-5:]
    # and without noise the points sit on the surfaces to float precision
    exact = render_frame(scene, SMALL.with_(range_noise=0.0), 5)
    d0 = surface_distance(prims, gz, exact.points)
    assert d0.max() < 2e-3


def _lone_scene(with_wall: bool, car_x: float = 16.0) -> Scene:
    road = Road.chain((-50.0, 0.0), 0.0, [("line", 150.0)], parking=(True, True))
    car = Actor(0, "car", "car", (4.5, 1.8, 1.5), 0, 50.0 + car_x, 0.0)
    car.shape = shapes.vehicle(4.5, 1.8, 1.5, "car", 0.4, 0)
    ped = Actor(1, "pedestrian", "adult", (0.6, 0.6, 1.8), 0, 50.0 + car_x, 6.0)
    ped.shape = shapes.pedestrian(0.6, 0.6, 1.8, 0.3, 1)
    wall = (shapes.boxes([(-0.2, 0.2, -10.0, 10.0, 0.0, 6.0)], 0.3, SURFACE["wall"])
            .transformed(8.0, 0.0, 0.0, 0.0) if with_wall else Primitives())
    ego = Actor(-1, "car", "car", (4.7, 1.9, 1.5), 0, 50.0, 0.0)
    return Scene(0, [road], [], wall, [car, ped], ego, 0.0, (-60.0, -30.0, 110.0, 30.0))


def test_object_fully_behind_a_wall_gets_no_points():
    lid = get_lidar("hdl64e", columns=1024, dropout=0.0)
    open_ = render_frame(_lone_scene(False), lid, 0)
    hidden = render_frame(_lone_scene(True), lid, 0)
    assert list(open_.ids) == [0, 1] and list(hidden.ids) == [0, 1]
    assert np.all(open_.num_points > 50)               # visible without the wall ...
    assert np.all(hidden.num_points == 0)              # ... nothing at all behind it
    assert not np.isin(hidden.owner, [0, 1]).any()
    # the wall hides everything behind it inside its angular span
    inside = np.abs(np.arctan2(hidden.points[:, 1], hidden.points[:, 0])) < np.arctan2(9.5, 8.2)
    assert hidden.points[inside, 0].max() < 8.0 + 3 * lid.range_noise


def test_cars_show_only_their_near_faces_and_cast_a_shadow():
    lid = get_lidar("hdl64e", columns=1024, dropout=0.0)
    f = render_frame(_lone_scene(False, car_x=12.0), lid, 0)
    car = f.points[f.owner == 0]
    # hits on the near half only: the far side (x > centre + 0.5 m) is never seen head-on
    assert car[:, 0].min() == pytest.approx(12.0 - 2.25, abs=0.1)
    assert np.mean(car[:, 0] > 12.0 + 1.0) < 0.35           # roof only, no far face
    ground = f.points[f.owner == GROUND]
    shadow = (np.abs(ground[:, 1]) < 0.6) & (ground[:, 0] > 15.0) & (ground[:, 0] < 30.0)
    assert shadow.sum() == 0
    beside = (np.abs(ground[:, 1] - 3.0) < 0.6) & (ground[:, 0] > 15.0) & (ground[:, 0] < 30.0)
    assert beside.sum() > 20


# ----------------------------------------------------------------------------- ground truth

def test_box_point_counts_match_the_points(scene, frame):
    m = count_margin(SMALL)
    inside = points_in_boxes(frame.points, counting_boxes(frame.boxes, *m))   # brute force
    np.testing.assert_array_equal(frame.num_points, inside.sum(1))
    np.testing.assert_array_equal(
        count_points_in_boxes(frame.points, counting_boxes(frame.boxes, *m)), inside.sum(1))
    # no ground return is counted
    assert not inside[:, frame.owner == GROUND].any()
    assert (frame.num_points > 0).sum() >= 3
    # the count is the object's own returns: its points lie in its box, hardly anything else
    for k, aid in enumerate(frame.ids):
        own = frame.owner == aid
        if own.sum() >= 10:
            # (feet returns within the ground-noise band below the counted floor are lost)
            assert inside[k, own].mean() > 0.9, (frame.labels[k], inside[k, own].mean())
            assert inside[k].sum() <= own.sum() * 1.1 + 3
    # without noise the tight box (+2 mm for float32 rounding) holds every vehicle return
    exact = render_frame(scene, SMALL.with_(range_noise=0.0), 3)
    tight = points_in_boxes(exact.points, counting_boxes(exact.boxes, 2e-3))
    for k, aid in enumerate(exact.ids):
        own = exact.owner == aid
        if own.any() and exact.labels[k] == "car":
            assert tight[k, own].all()
    # boxes stand on the ground, in the sensor frame
    np.testing.assert_allclose(frame.boxes[:, 2] - frame.boxes[:, 5] / 2, -SMALL.mount_height,
                               atol=1e-4)
    assert set(frame.labels) <= set(CLASSES)


# ----------------------------------------------------------------------------- scene layout

@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_actors_are_placed_plausibly(seed):
    sc = generate_scene(seed, duration=3.0)
    assert len(sc.roads) >= 2 and sc.intersections
    counts = {c: 0 for c in CLASSES}
    for a in sc.actors:
        counts[a.cls] += 1
        road = sc.roads[a.road]
        x, y, yaw = (float(v) for v in a.pose(sc.roads, 0.0))
        s, l, _ = road.project(np.array([x]), np.array([y]))
        s, l = float(s[0]), float(l[0])
        hw = road.side_half_width(1 if l >= 0 else -1)
        _, _, heading = road.pose(np.array([s]))
        rel = (yaw - heading[0] + np.pi) % (2 * np.pi) - np.pi
        L, W, H = a.size
        if a.cls == "car":
            assert abs(l) <= hw, "vehicles stay on the carriageway"
            assert min(abs(rel), np.pi - abs(rel)) < 0.1, "vehicles head along their lane"
            if a.subtype == "car":
                assert 3.5 <= L <= 5.5
            assert a.subtype in ("car", "van", "truck")
        elif a.cls == "cyclist":
            assert abs(l) <= hw and min(abs(rel), np.pi - abs(rel)) < 0.1
        else:
            on_walk = hw < abs(l) <= hw + road.sidewalk_width
            crossing = abs(a.v_l) > 0
            assert on_walk or crossing, (l, hw)
    assert counts["car"] >= 5 and counts["pedestrian"] >= 3
    # no two actors overlap (footprints sampled on a grid)
    boxes = []
    for a in sc.actors:
        x, y, yaw = (float(v) for v in a.pose(sc.roads, 0.0))
        boxes.append((x, y, 1.0, a.size[0], a.size[1], 2.0, yaw))
    boxes = np.array(boxes)
    for k, b in enumerate(boxes):
        u, v = np.meshgrid(np.linspace(-0.45, 0.45, 5), np.linspace(-0.45, 0.45, 3))
        c, s = np.cos(b[6]), np.sin(b[6])
        px = b[0] + c * u.ravel() * b[3] - s * v.ravel() * b[4]
        py = b[1] + s * u.ravel() * b[3] + c * v.ravel() * b[4]
        pts = np.stack([px, py, np.ones_like(px)], 1)
        others = np.delete(boxes, k, axis=0)
        assert not points_in_boxes(pts, others).any(), sc.actors[k]
    # buildings keep off roads and sidewalks
    rm = sc.roadmap()
    bld = sc.static.box_surf == SURFACE["building"]
    assert bld.sum() >= 4
    b = sc.static.box[bld]
    codes = rm.lookup(b[:, 0], b[:, 1])
    assert np.all(codes == SURFACE["terrain"])


def test_ego_drives_along_the_road_at_city_speed():
    sc = generate_scene(7, duration=4.0)
    t = np.arange(41) / 10.0
    x, y, yaw = sc.ego.pose(sc.roads, t)
    speed = np.hypot(np.diff(x), np.diff(y)) / 0.1
    assert np.all((speed > 5.0) & (speed < 14.0))
    codes = sc.roadmap().lookup(x, y)
    assert np.all(np.isin(codes, [SURFACE["road"], SURFACE["marking"]]))
    f = render_frame(sc, TINY, 10)
    assert f.ego_twist[0] == pytest.approx(speed[10], rel=0.05)


# ----------------------------------------------------------------------------- road map

def test_road_map_follows_the_nav2_map_server_format(tmp_path, scene):
    import yaml
    from PIL import Image
    rm = scene.roadmap()
    rm.save(tmp_path / "map.yaml")
    meta = yaml.safe_load((tmp_path / "map.yaml").read_text())
    assert set(meta) >= {"image", "resolution", "origin", "negate", "occupied_thresh",
                         "free_thresh"}
    assert meta["image"] == "map.png" and meta["negate"] in (0, 1)
    assert isinstance(meta["resolution"], float) and len(meta["origin"]) == 3
    assert 0 < meta["free_thresh"] < meta["occupied_thresh"] < 1
    img = Image.open(tmp_path / meta["image"])
    # image width runs along x, its top row is the largest y (map_server); rasters are (x, y)
    assert img.mode == "L" and img.size == rm.shape
    np.testing.assert_array_equal(np.asarray(img)[::-1].T, rm.occupancy_image())
    occ = load_map(tmp_path / "map.yaml").occupancy
    # drivable road is free, off-road is occupied; origin = lower-left corner
    x, y, _ = scene.ego.pose(scene.roads, np.linspace(0, scene.duration, 10))
    i = ((x - meta["origin"][0]) / meta["resolution"]).astype(int)
    j = ((y - meta["origin"][1]) / meta["resolution"]).astype(int)
    assert np.all(occ[i, j] == 0)
    assert np.all(occ[rm.surface == SURFACE["terrain"]] == 100)
    assert np.all(occ[rm.drivable] == 0)
    assert rm.drivable.mean() > 0.03


def test_map_resampled_into_the_sensor_frame_matches_the_points(scene, frame):
    from sparse_detector_ros.sim.roadmap import ROAD_VALUE
    rm = scene.roadmap()
    pose = frame.ego_pose[[0, 1, 3]]
    grid = GridConfig(x_min=-40.0, x_max=40.0, y_min=-20.0, y_max=20.0, resolution=0.5)
    local = map_in_sensor_frame(rm.occupancy_image(), rm.origin, rm.resolution, pose, grid)
    assert local.shape == (160, 80)
    assert local[80, 40] == ROAD_VALUE                   # under the ego: road
    # ground returns labelled road/marking fall on road cells of the resampled map
    p = frame.points
    on_road = np.isin(frame.surface, [SURFACE["road"], SURFACE["marking"]])
    sel = on_road & (np.abs(p[:, 0]) < 39) & (np.abs(p[:, 1]) < 19)
    i = ((p[sel, 0] + 40.0) / 0.5).astype(int)
    j = ((p[sel, 1] + 20.0) / 0.5).astype(int)
    assert np.mean(local[i, j] == ROAD_VALUE) > 0.97     # (cell edges differ by < 0.5 m)


# ----------------------------------------------------------------------------- export

@pytest.mark.parametrize("layout", ["velodyne", "ouster", "livox"])
def test_exported_bag_reads_back_and_clouds_decode(tmp_path, layout):
    from rosbags.rosbag2 import Reader
    from rosbags.typesys import Stores, get_typestore

    from sparse_detector_ros.pointcloud import decode
    from sparse_detector_ros.sim.export import write_scene
    lid = get_lidar("vlp16", columns=360)
    sc = generate_scene(21, duration=0.1)
    write_scene(sc, lid, tmp_path / "s", frames=2, layout=layout)
    expected = [render_frame(sc, lid, i) for i in range(2)]
    ts = get_typestore(Stores.ROS2_HUMBLE)
    seen = {}
    with Reader(tmp_path / "s" / "bag") as reader:
        assert list((tmp_path / "s" / "bag").glob("*.mcap"))
        for conn, stamp, raw in reader.messages():
            msg = ts.deserialize_cdr(raw, conn.msgtype)
            i = seen.setdefault(conn.topic, 0)
            seen[conn.topic] += 1
            if conn.topic == "/points":
                assert msg.header.frame_id == "lidar"
                pts = decode(msg)
                want = expected[i]
                if msg.height > 1:   # organized ring x column image: ring-major order
                    want_pts = want.points[np.lexsort((want.column, want.ring))]
                else:                # firing order
                    want_pts = want.points
                np.testing.assert_array_equal(pts, want_pts)
                names = {f.name for f in msg.fields}
                assert {"ring", "line"} & names
            elif conn.topic == "/odom":
                assert (msg.header.frame_id, msg.child_frame_id) == ("map", "base_link")
                assert msg.pose.pose.position.x == pytest.approx(expected[i].ego_pose[0])
            elif conn.topic == "/ground_truth/markers":
                assert len(msg.markers) == len(expected[i].boxes) + 1   # DELETEALL first
            elif conn.topic == "/tf_static":
                assert msg.transforms[0].transform.translation.z == pytest.approx(lid.mount_height)
    assert seen == {"/points": 2, "/odom": 2, "/tf": 2, "/tf_static": 1,
                    "/ground_truth/markers": 2}
    gt = json.loads((tmp_path / "s" / "ground_truth.json").read_text())
    assert len(gt["frames"]) == 2
    b = gt["frames"][1]["boxes"]
    assert [x["num_points"] for x in b] == expected[1].num_points.tolist()
    np.testing.assert_allclose([[x["x"], x["y"], x["yaw"]] for x in b],
                               expected[1].boxes[:, [0, 1, 6]], atol=1e-3)
    assert (tmp_path / "s" / "map.yaml").exists() and (tmp_path / "s" / "map.png").exists()


def test_ouster_layout_is_an_organized_image():
    from sparse_detector_ros.sim.export import cloud_buffer
    lid = get_lidar("os1-64", columns=256)
    f = render_frame(generate_scene(2, duration=0.0), lid, 0)
    buf = cloud_buffer(f, "ouster")
    assert (buf.height, buf.width, buf.is_dense) == (64, 256, False)
    arr = np.frombuffer(buf.data, np.uint8).reshape(64, 256, 48)
    ring = arr[:, :, 26:28].copy().view("<u2")[..., 0]
    np.testing.assert_array_equal(ring, np.arange(64)[:, None].repeat(256, 1))


# ----------------------------------------------------------------------------- dataset, CLI

def test_dataset_yields_frames_and_reads_its_cache(tmp_path, monkeypatch):
    import torch

    from sparse_detector_ros.sim import dataset as ds_mod
    ds = ds_mod.SimDataset(2, 2, seed=3, lidar=TINY, cache_dir=tmp_path)
    assert len(ds) == 4
    item = ds[3]
    assert item["points"].dtype == torch.float32 and item["points"].shape[1] == 4
    assert item["boxes"].shape[1] == 7 and len(item["labels"]) == len(item["boxes"])
    assert item["pose"].shape == (4,) and item["map"]["image"].ndim == 2
    assert (item["scene"], item["frame"]) == (1, 1)
    assert len(list(tmp_path.glob("frame_*.npz"))) == 1
    monkeypatch.setattr(ds_mod, "render_frame", lambda *a, **k: pytest.fail("not cached"))
    again = ds_mod.SimDataset(2, 2, seed=3, lidar=TINY, cache_dir=tmp_path)[3]
    for k in ("points", "boxes", "labels", "num_points", "pose"):
        assert torch.equal(item[k], again[k])
    # the map, cached too, is the scene's (x, y) raster
    assert torch.equal(item["map"]["image"], again["map"]["image"])
    assert item["map"]["image"].shape == ds.scene(1).roadmap().shape
    batch = ds_mod.collate_frames([item, again])
    assert len(batch["points"]) == 2


def test_sim_command_writes_bags_preview_and_stats(tmp_path, capsys):
    from sparse_detector_ros import cli
    from sparse_detector_ros.tools import sim_cli
    assert cli.COMMANDS["sim"][0] == "sparse_detector_ros.tools.sim_cli"
    parser = argparse.ArgumentParser()
    sim_cli.add_arguments(parser)
    args = parser.parse_args(["--scenes", "2", "--frames", "2", "--lidar", "vlp16",
                              "--columns", "300", "--out", str(tmp_path / "out"),
                              "--preview", str(tmp_path / "p.png"), "--stats", "--no-progress"])
    assert sim_cli.run(args) == 0
    for k in range(2):
        d = tmp_path / "out" / f"scene_{k:03d}"
        assert (d / "bag" / "metadata.yaml").exists() and (d / "map.yaml").exists()
        assert list((d / "bag").glob("*.mcap"))
    assert (tmp_path / "p.png").stat().st_size > 10_000
    stats = json.loads(capsys.readouterr().out)
    assert {"points", "objects", "points_per_isolated_car", "seconds_per_scan"} <= set(stats)
    assert sim_cli.run(parser.parse_args([])) == 2
