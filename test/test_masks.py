"""masks: nav2 maps read like map_server, the map prior resampled onto any BEV grid, and one
raster convention (bev.py: row = x index, col = y index) across bev, masks and sim.

The test maps are written pixel by pixel with PIL, and the expected cells are derived by hand
from map_server's rule (image top row = largest y, left column = smallest x, ``origin`` = outer
corner of the bottom-left pixel), not through the code under test.
"""
from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from sparse_detector_ros.bev import Rasterizer
from sparse_detector_ros.config import GridConfig
from sparse_detector_ros.masks import (NavMap, dense_mask, image_from_raster, load_map,
                                       map_in_sensor_frame, mask_shape, nav2_yaml,
                                       raster_from_image, road_raster, save_map)

DEFAULT = GridConfig()                                                # +-51.2 m at 0.2 m
ASYM = GridConfig(x_min=0.0, x_max=80.0, y_min=-20.0, y_max=40.0, resolution=0.4)


def write_map(tmp_path, pixels, origin, resolution, name="map", *, mode="trinary", negate=0,
              **keys):
    """Write ``pixels`` (image rows, top row first) as a nav2 pair; returns the YAML path."""
    Image.fromarray(np.asarray(pixels, np.uint8)).save(tmp_path / f"{name}.png")
    text = nav2_yaml(f"{name}.png", resolution, origin, mode=mode, negate=negate, **keys)
    (tmp_path / f"{name}.yaml").write_text(text)
    return tmp_path / f"{name}.yaml"


def pixel_centre(rows, r, c, origin, res):
    """map_server: world centre of image pixel (row r from the top, column c)."""
    return origin[0] + (c + 0.5) * res, origin[1] + (rows - 1 - r + 0.5) * res


def expected_cell(world, pose, grid, cell):
    """Sensor-frame position of a world point and the BEV cell (row = x, col = y) holding it."""
    px, py, yaw = pose
    dx, dy = world[0] - px, world[1] - py
    sx = math.cos(yaw) * dx + math.sin(yaw) * dy
    sy = -math.sin(yaw) * dx + math.cos(yaw) * dy
    return (sx, sy), (math.floor((sx - grid.x_min) / cell), math.floor((sy - grid.y_min) / cell))


# --------------------------------------------------------------------------- nav2 reading

def test_single_road_pixel_lands_in_its_x_y_cell(tmp_path):
    # 10 px wide (x), 6 px tall (y); road pixel in image row 1, column 7
    pixels = np.zeros((6, 10), np.uint8)
    pixels[1, 7] = 255
    nav = load_map(write_map(tmp_path, pixels, (-3.0, -2.0, 0.0), 1.0))
    assert isinstance(nav, NavMap)
    assert nav.shape == nav.occupancy.shape == (10, 6)        # (X, Y)
    assert nav.origin == (-3.0, -2.0, 0.0) and nav.resolution == 1.0
    # centre (4.5, 2.5) -> i = floor((4.5 + 3) / 1) = 7, j = floor((2.5 + 2) / 1) = 4
    assert pixel_centre(6, 1, 7, (-3.0, -2.0), 1.0) == (4.5, 2.5)
    assert np.argwhere(nav.road()).tolist() == [[7, 4]]
    assert nav.occupancy[7, 4] == 0 and (nav.occupancy == 100).sum() == 59
    assert nav.image[7, 4] == 255 and nav.image.dtype == np.uint8


def test_raster_image_conversion_is_the_map_server_orientation():
    # image: top row = largest y, left column = smallest x; raster: [x index, y index]
    img = np.arange(6).reshape(2, 3)           # 2 rows (y), 3 columns (x)
    r = raster_from_image(img)
    assert r.shape == (3, 2)
    assert r[0, 0] == img[1, 0] and r[2, 0] == img[1, 2] and r[0, 1] == img[0, 0]
    np.testing.assert_array_equal(image_from_raster(r), img)


@pytest.mark.parametrize("grey,negate,expected", [
    (255, 0, 0), (254, 0, 0), (205, 0, -1), (100, 0, -1), (80, 0, 100), (0, 0, 100),
    (0, 1, 0), (255, 1, 100), (128, 1, -1)])
def test_trinary_occupancy_follows_map_server(tmp_path, grey, negate, expected):
    # p = (255 - g) / 255 (g / 255 negated); > 0.65 occupied, < 0.196 free, else unknown
    nav = load_map(write_map(tmp_path, [[grey]], (0, 0, 0), 0.5, negate=negate))
    assert nav.occupancy.tolist() == [[expected]]


def test_colour_pixels_average_their_channels_and_trinary_counts_opacity(tmp_path):
    rgb = np.array([[[255, 255, 0], [255, 255, 240]]], np.uint8)   # means 170, 250
    Image.fromarray(rgb).save(tmp_path / "c.png")
    (tmp_path / "c.yaml").write_text(nav2_yaml("c.png", 1.0, (0, 0)))
    assert load_map(tmp_path / "c.yaml").occupancy.tolist() == [[-1], [0]]
    # white but transparent: trinary averages (255, 255, 255, 0) = 191.25 -> unknown
    la = np.array([[[255, 0], [255, 255]]], np.uint8)
    Image.fromarray(la).save(tmp_path / "a.png")         # (rows, cols, 2): grey + alpha
    (tmp_path / "a.yaml").write_text(nav2_yaml("a.png", 1.0, (0, 0)))
    assert load_map(tmp_path / "a.yaml").occupancy.tolist() == [[-1], [0]]


def test_scale_and_raw_modes(tmp_path):
    # scale: p = 127/255 = 0.498 -> rint((0.498 - 0.196) / (0.65 - 0.196) * 100) = 67
    nav = load_map(write_map(tmp_path, [[127, 255, 0]], (0, 0), 1.0, mode="scale"))
    assert nav.occupancy.ravel().tolist() == [67, 0, 100]
    nav = load_map(write_map(tmp_path, [[42, 200, 100]], (0, 0), 1.0, mode="raw"))
    assert nav.occupancy.ravel().tolist() == [42, -1, 100]


def test_bad_map_files_are_named(tmp_path):
    (tmp_path / "m.yaml").write_text("image: m.png\nresolution: 0.1\norigin: [0, 0, 0]\n")
    with pytest.raises(ValueError, match="negate, occupied_thresh, free_thresh"):
        load_map(tmp_path / "m.yaml")
    with pytest.raises(ValueError, match="mode 'bilevel' is not supported"):
        load_map(write_map(tmp_path, [[0]], (0, 0), 1.0, mode="bilevel"))


def test_road_only_selects_grey_values_above_min_value(tmp_path):
    # the simulator's encoding: road 255, sidewalk 230, other 0
    nav = load_map(write_map(tmp_path, [[255, 230, 0]], (0, 0), 1.0))
    assert nav.road().ravel().tolist() == [True, True, False]        # nav2 free cells
    assert nav.road(250).ravel().tolist() == [True, False, False]    # road only
    with pytest.raises(ValueError, match="min_value"):
        nav.road(300)


# --------------------------------------------------------------------------- resampling

def one_road_cell_map(tmp_path, res):
    """A 100 m x 80 m map, origin (-20, -30), one road cell centred near (12, 7)."""
    origin = (-20.0, -30.0)
    cols, rows = round(100 / res), round(80 / res)
    i, j = int((12 - origin[0]) / res), int((7 - origin[1]) / res)
    pixels = np.zeros((rows, cols), np.uint8)
    pixels[rows - 1 - j, i] = 255
    world = pixel_centre(rows, rows - 1 - j, i, origin, res)
    return load_map(write_map(tmp_path, pixels, origin + (0.0,), res)), world


POSES = [(0.0, 0.0, 0.0), (3.2, -1.6, 0.0), (2.0, 1.2, math.pi / 2), (-4.0, 20.0, -math.pi / 2),
         (30.0, 10.0, math.pi)]


@pytest.mark.parametrize("grid,stride", [(DEFAULT, 1), (DEFAULT, 2), (ASYM, 1)])
@pytest.mark.parametrize("pose", POSES)
def test_road_cell_lands_in_the_expected_bev_cell(tmp_path, grid, stride, pose):
    cell = grid.resolution * stride
    nav, world = one_road_cell_map(tmp_path, cell)
    (sx, sy), (row, col) = expected_cell(world, pose, grid, cell)
    h, w = mask_shape(grid, stride)
    assert 0 <= row < h and 0 <= col < w                  # the test keeps it in view
    mask = road_raster(nav, pose, grid, stride=stride)
    assert mask.shape == (h, w) and mask.dtype == bool
    assert np.argwhere(mask).tolist() == [[row, col]]


def test_l_shaped_road_turns_with_the_sensor(tmp_path):
    # arms: along x (x in [0, 20], |y| < 2) and along y (x in [18, 22], y in [0, 15])
    res, origin = 0.5, (-30.0, -30.0)
    n = round(60 / res)
    cx = origin[0] + (np.arange(n) + 0.5) * res
    cy = origin[1] + (np.arange(n) + 0.5) * res
    X, Y = np.meshgrid(cx, cy, indexing="xy")          # image-shaped, row = y (bottom first)
    road = ((X >= 0) & (X <= 20) & (np.abs(Y) < 2)) | ((X >= 18) & (X <= 22) & (Y >= 0)
                                                       & (Y <= 15))
    pixels = np.where(road, 255, 0)[::-1]
    nav = load_map(write_map(tmp_path, pixels, origin + (0.0,), res))

    def at(mask, grid, x, y):
        return bool(mask[math.floor((x - grid.x_min) / grid.resolution),
                         math.floor((y - grid.y_min) / grid.resolution)])

    for grid in (DEFAULT, ASYM):
        ident = road_raster(nav, (0.0, 0.0, 0.0), grid)
        assert at(ident, grid, 10.1, 0.1) and at(ident, grid, 20.1, 10.1)
        assert not at(ident, grid, 10.1, 10.1) and not at(ident, grid, 30.1, 0.1)
        # facing +y: sensor x = world y, sensor y = -world x
        turned = road_raster(nav, (0.0, 0.0, math.pi / 2), grid)
        assert at(turned, grid, 10.1, -19.9)        # world (19.9, 10.1): the y arm
        assert at(turned, grid, 0.1, -10.1)         # world (10.1, 0.1): the x arm
        assert not at(turned, grid, 10.1, 0.1)      # world (-0.1, 10.1): off road
        assert turned.sum() != 0 and not np.array_equal(turned, ident)
    # the mask is the road under each cell centre: as many cells as the road's area allows
    ident = road_raster(nav, (0.0, 0.0, 0.0), DEFAULT)
    area = road.sum() * res * res
    assert ident.sum() * DEFAULT.resolution ** 2 == pytest.approx(area, rel=0.02)


def test_origin_yaw_rotates_the_map(tmp_path):
    # origin yaw 90 deg: the map's own x axis is world +y, its y axis world -x
    res, origin = 1.0, (5.0, -3.0, math.pi / 2)
    pixels = np.zeros((4, 8), np.uint8)            # 8 cells along the map's x, 4 along its y
    pixels[4 - 1 - 2, 6] = 255                     # map cell (i, j) = (6, 2)
    nav = load_map(write_map(tmp_path, pixels, origin, res))
    assert np.argwhere(nav.road()).tolist() == [[6, 2]]
    world = (5.0 - 2.5, -3.0 + 6.5)                # origin + R(90 deg) (6.5, 2.5)
    grid = GridConfig(x_min=-8.0, x_max=8.0, y_min=-8.0, y_max=8.0, resolution=1.0)
    (_, _), (row, col) = expected_cell(world, (0.0, 0.0, 0.0), grid, 1.0)
    assert np.argwhere(road_raster(nav, (0.0, 0.0, 0.0), grid)).tolist() == [[row, col]]


def test_cells_off_the_map_get_the_fill_value(tmp_path):
    nav, _ = one_road_cell_map(tmp_path, 0.4)
    far = (1000.0, 1000.0, 0.3)
    assert not road_raster(nav, far, ASYM).any()
    out = map_in_sensor_frame(nav.occupancy, nav.origin, nav.resolution, far, ASYM, fill=7)
    assert out.dtype == np.int8 and (out == 7).all() and out.shape == ASYM.shape


def test_bad_arguments_are_named(tmp_path):
    nav, _ = one_road_cell_map(tmp_path, 0.4)
    with pytest.raises(ValueError, match="sensor_pose"):
        road_raster(nav, (0.0, 0.0), ASYM)
    with pytest.raises(ValueError, match="stride = 3"):
        road_raster(nav, (0.0, 0.0, 0.0), DEFAULT, stride=3)
    with pytest.raises(ValueError, match="raster must be 2-D"):
        map_in_sensor_frame(np.zeros(4), (0, 0), 1.0, (0, 0, 0), ASYM)


def test_dense_mask_covers_the_grid():
    assert dense_mask(DEFAULT).shape == (512, 512) and dense_mask(DEFAULT).all()
    assert dense_mask(ASYM, 2).shape == (100, 75)
    with pytest.raises(ValueError, match="stride"):
        dense_mask(ASYM, 7)


# --------------------------------------------------------------------------- one convention

@pytest.mark.parametrize("grid,pose", [(DEFAULT, (0.0, 0.0, 0.0)), (ASYM, (2.0, 1.2, math.pi / 2)),
                                       (ASYM, (30.0, 10.0, math.pi))])
def test_bev_point_and_road_cell_share_the_cell(tmp_path, grid, pose):
    nav, world = one_road_cell_map(tmp_path, grid.resolution)
    (sx, sy), _ = expected_cell(world, pose, grid, grid.resolution)
    bev, n = Rasterizer(grid)(np.float32([[sx, sy, 0.0, 1.0]]))
    assert n == 1
    point_cells = torch.nonzero(bev[0, -1]).tolist()
    assert np.argwhere(road_raster(nav, pose, grid)).tolist() == point_cells


# --------------------------------------------------------------------------- sim round trip

def test_roadmap_round_trips_through_nav2(tmp_path):
    from sparse_detector_ros.sim.raycast import SURFACE
    from sparse_detector_ros.sim.roadmap import ROAD_MIN_VALUE, RoadMap
    surface = np.full((7, 4), SURFACE["terrain"], np.uint8)     # 7 cells along x, 4 along y
    surface[5, 1] = SURFACE["road"]
    surface[2, 3] = SURFACE["sidewalk"]
    surface[6, 0] = SURFACE["marking"]
    rm = RoadMap(surface, (1.5, -2.125), 0.25)
    assert rm.lookup([1.5 + 5.5 * 0.25], [-2.125 + 1.5 * 0.25]).tolist() == [SURFACE["road"]]
    nav = load_map(rm.save(tmp_path / "rm.yaml"))
    np.testing.assert_array_equal(nav.image, rm.occupancy_image())
    assert nav.origin == (1.5, -2.125, 0.0) and nav.resolution == 0.25
    assert np.argwhere(nav.road(ROAD_MIN_VALUE)).tolist() == [[5, 1], [6, 0]]
    assert np.argwhere(nav.road()).tolist() == [[2, 3], [5, 1], [6, 0]]
    with Image.open(tmp_path / "rm.png") as im:
        assert im.size == (7, 4)                    # width along x, height along y


def test_scene_roadmap_round_trips_and_lookup_agrees(tmp_path):
    from sparse_detector_ros.sim import generate_scene
    from sparse_detector_ros.sim.raycast import SURFACE
    from sparse_detector_ros.sim.roadmap import ROAD_MIN_VALUE
    scene = generate_scene(1, duration=0.1)
    rm = scene.roadmap()
    nav = load_map(rm.save(tmp_path / "map.yaml"))
    np.testing.assert_array_equal(nav.image, rm.occupancy_image())
    assert nav.origin[:2] == tuple(rm.origin) and nav.resolution == rm.resolution
    np.testing.assert_array_equal(nav.road(ROAD_MIN_VALUE), rm.drivable)
    # the ego drives on road: lookup, the raster and the map prior agree at its pose
    x, y, yaw = (float(v) for v in scene.ego.pose(scene.roads, 0.0))
    assert rm.lookup(x, y) in (SURFACE["road"], SURFACE["marking"])
    i, j = int((x - rm.origin[0]) / rm.resolution), int((y - rm.origin[1]) / rm.resolution)
    assert rm.drivable[i, j]
    prior = road_raster(nav, (x, y, yaw), DEFAULT, min_value=ROAD_MIN_VALUE)
    assert prior[256, 256] and 0.03 < prior.mean() < 0.9


def test_save_map_writes_what_load_map_reads(tmp_path):
    raster = np.zeros((5, 3), np.uint8)
    raster[4, 0] = 255
    path = save_map(tmp_path / "s.yaml", raster, (-1.0, 2.0), 0.1)
    nav = load_map(path)
    np.testing.assert_array_equal(nav.image, raster)
    assert nav.origin == (-1.0, 2.0, 0.0) and nav.resolution == 0.1
    # the pixel of x index 4, y index 0: rightmost column, bottom row of the image
    png = np.asarray(Image.open(tmp_path / "s.png"))
    assert png.shape == (3, 5) and png[2, 4] == 255 and png.sum() == 255
    with pytest.raises(ValueError, match="uint8"):
        save_map(tmp_path / "t.yaml", raster.astype(np.float32), (0, 0), 0.1)


def test_masks_never_imports_sim_or_torch():
    code = ("import sys, sparse_detector_ros.masks; "
            "bad = [m for m in sys.modules if m.startswith(('sparse_detector_ros.sim', 'torch',"
            " 'rclpy'))]; print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
