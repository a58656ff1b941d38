"""bev.Rasterizer / rasterize / rasterize_batch: points -> (B, C, H, W) BEV features.

The reference is a plain Python loop over the points (float64 arithmetic). The random grids use
bounds and resolutions that are exact in binary (multiples of 1/4 m) and points on a 1/16 m
lattice, so float32 and float64 agree exactly on every cell index, boundaries included.
"""
from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparse_detector_ros.bev import Rasterizer, rasterize, rasterize_batch
from sparse_detector_ros.config import GridConfig

HYP = settings(max_examples=200, deadline=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# A small grid with exact binary bounds: 16 x 12 cells of 0.5 m, 4 slices of 1 m.
SMALL = GridConfig(x_min=-4.0, x_max=4.0, y_min=-2.0, y_max=4.0, z_min=-2.0, z_max=2.0,
                   resolution=0.5, z_slices=4, intensity_max=100.0, density_saturation=8)


def reference(points, g: GridConfig):
    """Naive BEV: one Python iteration per point, float64."""
    pts = np.asarray(points, np.float64)
    H = round((g.x_max - g.x_min) / g.resolution)
    W = round((g.y_max - g.y_min) / g.resolution)
    dz = (g.z_max - g.z_min) / g.z_slices
    occ = np.zeros((g.z_slices, H, W))
    inten = np.zeros((H, W))
    count = np.zeros((H, W))
    kept = 0
    for x, y, z, i in pts[:, :4]:
        if not (math.isfinite(x) and math.isfinite(y) and math.isfinite(z)):
            continue
        r = math.floor((x - g.x_min) / g.resolution)
        c = math.floor((y - g.y_min) / g.resolution)
        k = math.floor((z - g.z_min) / dz)
        if not (0 <= r < H and 0 <= c < W and 0 <= k < g.z_slices):
            continue
        kept += 1
        occ[k, r, c] = 1.0
        v = 0.0 if math.isnan(i) else min(1.0, max(0.0, i / g.intensity_max))
        inten[r, c] = max(inten[r, c], v)
        count[r, c] += 1
    dens = np.minimum(1.0, np.log1p(count) / math.log(g.density_saturation))
    out = np.concatenate([occ, inten[None], dens[None]])[None].astype(np.float32)
    return out, kept


def run(points, g=SMALL):
    bev, n = Rasterizer(g)(points)
    return bev, n


def cell(g, x, y):
    return math.floor((x - g.x_min) / g.resolution), math.floor((y - g.y_min) / g.resolution)


# --------------------------------------------------------------------------- shape

@pytest.mark.parametrize("g", [GridConfig(), SMALL,
                               GridConfig(x_min=0.0, x_max=70.4, y_min=-40.0, y_max=40.0,
                                          resolution=0.1, z_slices=10)])
def test_shape_and_dtype(g):
    r = Rasterizer(g)
    bev, n = r(np.zeros((0, 4), np.float32))
    H, W = g.shape
    assert bev.shape == (1, g.z_slices + 2, H, W) == (1, r.channels, r.height, r.width)
    assert bev.dtype == torch.float32 and bev.device.type == "cpu"
    assert n == 0 and not bev.any()


def test_default_grid_is_512_square_with_7_channels():
    bev, _ = Rasterizer(GridConfig())(np.zeros((1, 4), np.float32))
    assert bev.shape == (1, 7, 512, 512)


def test_rasterize_one_shot_equals_rasterizer():
    rng = np.random.default_rng(0)
    pts = np.c_[rng.uniform(-5, 5, (300, 3)), rng.uniform(0, 150, 300)].astype(np.float32)
    assert torch.equal(rasterize(pts, SMALL), Rasterizer(SMALL)(pts)[0])


# --------------------------------------------------------------------------- placement

@pytest.mark.parametrize("x,y", [(-4.0, -2.0), (3.9, 3.9), (0.0, 0.0), (-0.01, 0.26),
                                 (1.75, -1.25), (0.5, 0.5)])
def test_point_lands_in_row_x_col_y(x, y):
    bev, n = run(np.float32([[x, y, 0.5, 50.0]]))
    r, c = cell(SMALL, x, y)
    assert n == 1
    occ = bev[0, 2]  # z = 0.5 -> slice 2 of [-2,-1,0,1,2)
    assert occ[r, c] == 1.0 and occ.sum() == 1.0
    assert bev[0, :SMALL.z_slices].sum() == 1.0


def test_rows_are_x_and_cols_are_y():
    # x moves along rows (dim 2), y along columns (dim 3): not transposed.
    bev, _ = run(np.float32([[3.2, -1.9, 0.0, 1.0]]))
    nz = bev[0, SMALL.z_slices + 1].nonzero().tolist()
    assert nz == [[14, 0]]


@pytest.mark.parametrize("z,k", [(-2.0, 0), (-1.5, 0), (-1.0, 1), (-0.001, 1), (0.0, 2),
                                 (1.0, 3), (1.99, 3)])
def test_occupancy_slice_by_z(z, k):
    bev, n = run(np.float32([[0.1, 0.1, z, 0.0]]))
    r, c = cell(SMALL, 0.1, 0.1)
    assert n == 1
    col = bev[0, :SMALL.z_slices, r, c]
    expected = torch.zeros(SMALL.z_slices)
    expected[k] = 1.0
    assert torch.equal(col, expected)


def test_occupancy_several_slices_in_one_cell():
    pts = np.float32([[0.1, 0.1, z, 0.0] for z in (-1.5, 0.5, 0.6, 1.5)])
    bev, n = run(pts)
    r, c = cell(SMALL, 0.1, 0.1)
    assert n == 4
    assert bev[0, :4, r, c].tolist() == [1.0, 0.0, 1.0, 1.0]


# --------------------------------------------------------------------------- intensity

def test_intensity_is_max_over_cell_divided_by_intensity_max():
    pts = np.float32([[0.1, 0.1, 0.0, 10.0], [0.2, 0.3, 0.5, 37.0], [0.4, 0.2, -1.0, 5.0],
                      [1.1, 1.1, 0.0, 80.0]])
    bev, _ = run(pts)
    ch = bev[0, SMALL.z_slices]
    assert ch[cell(SMALL, 0.1, 0.1)].item() == pytest.approx(0.37)
    assert ch[cell(SMALL, 1.1, 1.1)].item() == pytest.approx(0.80)
    assert int((ch > 0).sum()) == 2


@pytest.mark.parametrize("value,expected", [(250.0, 1.0), (100.0, 1.0), (1e30, 1.0),
                                            (np.inf, 1.0), (-5.0, 0.0), (-np.inf, 0.0),
                                            (0.0, 0.0), (np.nan, 0.0)])
def test_intensity_clipped_to_unit_range(value, expected):
    bev, n = run(np.float32([[0.1, 0.1, 0.0, value]]))
    assert n == 1  # a strange intensity does not drop the point
    assert bev[0, SMALL.z_slices][cell(SMALL, 0.1, 0.1)].item() == expected
    assert torch.isfinite(bev).all()


def test_nan_intensity_does_not_hide_the_other_points_of_the_cell():
    pts = np.float32([[0.1, 0.1, 0.0, np.nan], [0.2, 0.2, 0.0, 40.0], [0.3, 0.3, 0.0, np.nan]])
    bev, n = run(pts)
    assert n == 3
    assert bev[0, SMALL.z_slices][cell(SMALL, 0.1, 0.1)].item() == pytest.approx(0.4)


def test_intensity_max_one_for_normalised_drivers():
    g = GridConfig(x_min=0.0, x_max=2.0, y_min=0.0, y_max=2.0, resolution=1.0,
                   intensity_max=1.0)
    bev, _ = Rasterizer(g)(np.float32([[0.5, 0.5, 0.0, 0.25], [1.5, 0.5, 0.0, 7.0]]))
    assert bev[0, g.z_slices, :, 0].tolist() == [0.25, 1.0]


# --------------------------------------------------------------------------- density

@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 9, 50])
def test_density_log_scale_saturates(n):
    pts = np.tile(np.float32([[0.1, 0.1, 0.0, 0.0]]), (n, 1))
    bev, kept = run(pts)
    assert kept == n
    d = bev[0, SMALL.z_slices + 1]
    expected = min(1.0, math.log1p(n) / math.log(SMALL.density_saturation))
    assert d[cell(SMALL, 0.1, 0.1)].item() == pytest.approx(expected, rel=1e-6)
    assert int((d > 0).sum()) == 1


def test_density_reaches_exactly_one_at_saturation():
    g = GridConfig(x_min=0.0, x_max=1.0, y_min=0.0, y_max=1.0, resolution=1.0,
                   density_saturation=4)
    bev, _ = Rasterizer(g)(np.zeros((3, 4), np.float32))  # log1p(3) == log(4)
    assert bev[0, -1, 0, 0].item() == pytest.approx(1.0, abs=1e-6)
    bev, _ = Rasterizer(g)(np.zeros((100, 4), np.float32))
    assert bev[0, -1, 0, 0].item() == 1.0


def test_values_are_in_unit_range():
    rng = np.random.default_rng(1)
    pts = np.c_[rng.uniform(-6, 6, (5000, 3)), rng.uniform(-50, 500, 5000)].astype(np.float32)
    bev, n = run(pts)
    ref, n_ref = reference(pts, SMALL)
    assert n == n_ref
    np.testing.assert_allclose(bev.numpy(), ref, rtol=1e-6, atol=1e-7)
    # intensities up to 5x intensity_max and dense cells both reach exactly 1, never more
    assert bev.min() == 0.0 and bev.max() == 1.0
    assert bev[0, SMALL.z_slices].max() == 1.0 and bev[0, SMALL.z_slices + 1].max() == 1.0
    occ = bev[0, :SMALL.z_slices]
    assert torch.all((occ == 0) | (occ == 1))
    # Occupied in some slice <=> density > 0.
    assert torch.equal(occ.amax(0) > 0, bev[0, SMALL.z_slices + 1] > 0)


# --------------------------------------------------------------------------- dropping

def test_points_outside_ranges_are_dropped():
    pts = np.float32([
        [0.1, 0.1, 0.0, 1.0],     # kept
        [-4.1, 0.1, 0.0, 1.0],    # x < x_min
        [4.5, 0.1, 0.0, 1.0],     # x > x_max
        [0.1, -2.5, 0.0, 1.0],    # y < y_min
        [0.1, 4.5, 0.0, 1.0],     # y > y_max
        [0.1, 0.1, -2.5, 1.0],    # z < z_min
        [0.1, 0.1, 2.5, 1.0],     # z > z_max
        [1e30, 0.1, 0.0, 1.0],
        [0.1, -1e30, 0.0, 1.0],
        [0.1, 0.1, 1e30, 1.0],
    ])
    bev, n = run(pts)
    assert n == 1
    assert bev[0, -1].sum().item() == pytest.approx(math.log1p(1) / math.log(8))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("col", [0, 1, 2])
def test_nan_and_inf_coordinates_are_dropped(bad, col):
    pts = np.float32([[0.1, 0.1, 0.0, 10.0], [1.1, 1.1, 0.5, 20.0]])
    pts[1, col] = bad
    bev, n = run(pts)
    ref, n_ref = reference(pts, SMALL)
    assert n == n_ref == 1
    assert torch.isfinite(bev).all()
    np.testing.assert_allclose(bev.numpy(), ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("axis,lo,hi", [(0, -4.0, 4.0), (1, -2.0, 4.0), (2, -2.0, 2.0)])
def test_boundaries_min_included_max_excluded(axis, lo, hi):
    base = [0.1, 0.1, 0.1, 1.0]
    at_min, at_max, below_max = list(base), list(base), list(base)
    at_min[axis], at_max[axis] = lo, hi
    below_max[axis] = hi - 1e-3
    assert run(np.float32([at_min]))[1] == 1
    assert run(np.float32([at_max]))[1] == 0
    below_min = list(base)
    below_min[axis] = np.nextafter(np.float32(lo), np.float32(-np.inf))
    assert run(np.float32([below_min]))[1] == 0
    bev, n = run(np.float32([below_max]))
    assert n == 1
    # min lands in the first cell / slice, just-below-max in the last one.
    if axis == 0:
        assert run(np.float32([at_min]))[0][0, -1, 0].sum() > 0
        assert bev[0, -1, SMALL.shape[0] - 1].sum() > 0
    elif axis == 1:
        assert run(np.float32([at_min]))[0][0, -1, :, 0].sum() > 0
        assert bev[0, -1, :, SMALL.shape[1] - 1].sum() > 0
    else:
        assert run(np.float32([at_min]))[0][0, 0].sum() == 1
        assert bev[0, SMALL.z_slices - 1].sum() == 1


def test_default_grid_boundaries():
    g = GridConfig()
    r = Rasterizer(g)
    pts = np.float32([[-51.2, -51.2, -3.0, 1.0],   # all minima: kept, cell (0, 0), slice 0
                      [51.2, 0.0, 0.0, 1.0],        # x == x_max: dropped
                      [0.0, 51.2, 0.0, 1.0],        # y == y_max: dropped
                      [0.0, 0.0, 2.0, 1.0],         # z == z_max: dropped
                      [51.1, 51.1, 1.9, 1.0]])      # last cell, last slice
    bev, n = r(pts)
    assert n == 2
    assert bev[0, 0, 0, 0] == 1.0 and bev[0, g.z_slices - 1, 511, 511] == 1.0
    assert bev[0, :g.z_slices].sum() == 2.0


def test_cell_edges_belong_to_the_upper_cell():
    # x = x_min + k*res exactly is the first value of row k, x just below it the last of row
    # k-1: each of the 16 rows gets exactly 2 points (floor, not round or ceil).
    pts = np.float32([[-4.0 + 0.5 * k, 0.0, 0.0, 0.0] for k in range(16)]
                     + [[-4.0 + 0.5 * k - 0.01, 0.0, 0.0, 0.0] for k in range(1, 17)])
    bev, n = run(pts)
    assert n == 32
    rows = bev[0, -1, :, cell(SMALL, 0.0, 0.0)[1]]
    expected = math.log1p(2) / math.log(SMALL.density_saturation)
    np.testing.assert_allclose(rows.numpy(), np.full(16, expected, np.float32), rtol=1e-6)
    assert bev[0, -1].sum().item() == pytest.approx(16 * expected, rel=1e-6)


def test_empty_and_all_dropped_clouds_give_zeros():
    for pts in (np.zeros((0, 4), np.float32), np.full((10, 4), np.nan, np.float32),
                np.float32([[100.0, 100.0, 0.0, 1.0]])):
        bev, n = run(pts)
        assert n == 0 and not bev.any()


# --------------------------------------------------------------------------- determinism

def _cloud(seed, n=3000):
    rng = np.random.default_rng(seed)
    pts = np.c_[rng.uniform(-5, 5, (n, 2)), rng.uniform(-3, 3, n),
                rng.uniform(0, 120, n)].astype(np.float32)
    pts[rng.random(n) < 0.02, 0] = np.nan
    return pts


def test_deterministic_same_input_twice():
    pts = _cloud(2)
    r = Rasterizer(SMALL)
    a, na = r(pts)
    b, nb = r(pts)
    assert na == nb and torch.equal(a, b)
    c, nc = Rasterizer(SMALL)(pts.copy())
    assert nc == na and torch.equal(a, c)


def test_permuting_points_gives_identical_tensor():
    pts = _cloud(3)
    a, na = run(pts)
    for seed in range(3):
        perm = np.random.default_rng(seed).permutation(len(pts))
        b, nb = run(pts[perm])
        assert nb == na and torch.equal(a, b)
    b, nb = run(pts[::-1])  # negative strides
    assert nb == na and torch.equal(a, b)


def test_no_state_leaks_between_calls():
    r = Rasterizer(SMALL)
    r(_cloud(4))
    bev, n = r(np.float32([[0.1, 0.1, 0.0, 10.0]]))
    assert n == 1 and bev[0, :SMALL.z_slices].sum() == 1.0


# --------------------------------------------------------------------------- input types

def test_numpy_and_torch_inputs_agree():
    pts = _cloud(5)
    ref, n = run(pts)
    variants = [
        pts.astype(np.float64),
        torch.from_numpy(pts),
        torch.from_numpy(pts.astype(np.float64)),
        np.asfortranarray(pts),
        np.c_[pts, np.ones((len(pts), 2), np.float32)],          # extra columns ignored
        np.c_[pts, np.ones((len(pts), 2), np.float32)][:, :4],   # non-contiguous slice
        torch.from_numpy(np.c_[pts, pts])[:, :4],                 # strided tensor
        torch.from_numpy(pts).t().contiguous().t(),               # column-major tensor
    ]
    for v in variants:
        b, m = run(v)
        assert m == n and torch.equal(b, ref), type(v)


def test_read_only_numpy_input():
    pts = _cloud(6)
    ref, n = run(pts)
    ro = pts.copy()
    ro.setflags(write=False)
    b, m = run(ro)
    assert m == n and torch.equal(b, ref)
    # The zero-copy view of an immutable message buffer, as decode() returns it.
    frozen = np.frombuffer(pts.tobytes(), np.float32).reshape(-1, 4)
    assert not frozen.flags.writeable
    b, m = run(frozen)
    assert m == n and torch.equal(b, ref)


def test_input_is_not_modified():
    pts = _cloud(7)
    before = pts.copy()
    t = torch.from_numpy(pts.copy())
    tb = t.clone()
    run(pts)
    run(t)
    np.testing.assert_array_equal(pts, before)
    np.testing.assert_array_equal(t.numpy(), tb.numpy())


def test_decoded_cloud_rasterizes():
    from sparse_detector_ros.pointcloud import decode, encode
    pts = _cloud(8, 500)
    cloud = encode(pts, "ouster", is_dense=False)
    b, n = run(decode(cloud))
    ref, n_ref = reference(pts, SMALL)
    assert n == n_ref
    np.testing.assert_allclose(b.numpy(), ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape", [(10, 3), (10,), (2, 10, 4)])
def test_bad_shape_raises(shape):
    with pytest.raises(ValueError, match="shape"):
        run(np.zeros(shape, np.float32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    pts = _cloud(9)
    cpu, n = run(pts)
    gpu, m = Rasterizer(SMALL, "cuda")(pts)
    assert gpu.device.type == "cuda" and m == n
    assert torch.equal(gpu.cpu(), cpu)
    clouds = [_cloud(10), pts[:0], torch.from_numpy(_cloud(11)).cuda(), pts]
    cpu_b, n_cpu = Rasterizer(SMALL).batch([torch.as_tensor(c).cpu() for c in clouds])
    gpu_b, n_gpu = Rasterizer(SMALL, "cuda").batch(clouds)   # mixed host/device inputs
    assert gpu_b.device.type == "cuda" and n_gpu == n_cpu
    assert torch.equal(gpu_b.cpu(), cpu_b)


# --------------------------------------------------------------------------- batches

def test_batch_equals_stacked_single_clouds():
    r = Rasterizer(SMALL)
    clouds = [_cloud(20), np.zeros((0, 4), np.float32), _cloud(21, 50)[::-1],
              torch.from_numpy(_cloud(22, 700)).double(), np.float32([[0.1, 0.1, 0.0, 30.0]])]
    bev, kept = r.batch(clouds)
    assert bev.shape == (5, SMALL.channels, *SMALL.shape) and bev.dtype == torch.float32
    singles = [r(c) for c in clouds]
    assert kept == [n for _, n in singles] and kept[1] == 0 and kept[4] == 1
    assert torch.equal(bev, torch.cat([b for b, _ in singles]))
    # each sample holds only its own points: the one-point cloud lights one cell
    assert int((bev[4, -1] > 0).sum()) == 1 and not bev[1].any()


def test_channels_last_rasterizer_writes_the_same_values_into_nhwc_storage():
    clouds = [_cloud(30), _cloud(31, 300), np.zeros((0, 4), np.float32)]
    plain, nhwc = Rasterizer(SMALL), Rasterizer(SMALL, channels_last=True)
    for c in clouds:
        (a, na), (b, nb) = plain(c), nhwc(c)
        assert na == nb and torch.equal(a, b)
        assert b.permute(0, 2, 3, 1).is_contiguous() and not b.is_contiguous()
    (a, ka), (b, kb) = plain.batch(clouds), nhwc.batch(clouds)
    assert ka == kb and torch.equal(a, b) and b.permute(0, 2, 3, 1).is_contiguous()
    # the storage itself is (sample, row, col, channel): a net reading it without a copy
    assert b.contiguous(memory_format=torch.channels_last).data_ptr() == b.data_ptr()


def test_batch_of_one_equals_the_single_call_and_rasterize_batch():
    pts = _cloud(23)
    bev, n = run(pts)
    bb, kept = Rasterizer(SMALL).batch([pts])
    assert kept == [n] and torch.equal(bb, bev)
    assert torch.equal(rasterize_batch([pts, pts], SMALL), torch.cat([bev, bev]))


def test_batch_rejects_non_lists_and_names_the_bad_cloud():
    r = Rasterizer(SMALL)
    with pytest.raises(ValueError, match="non-empty list"):
        r.batch([])
    with pytest.raises(ValueError, match=r"got an array of shape \(10, 4\)"):
        r.batch(np.zeros((10, 4), np.float32))
    with pytest.raises(ValueError, match=r"clouds\[1\] must have shape"):
        r.batch([np.zeros((3, 4), np.float32), np.zeros((3, 3), np.float32)])


# --------------------------------------------------------------------------- warnings

def test_import_keeps_warning_filters_and_read_only_input_does_not_warn():
    # torch warns once per process, so a fresh interpreter is the only honest place to look.
    code = """if True:
        import warnings
        import numpy as np
        import torch
        from sparse_detector_ros.config import GridConfig
        before = list(warnings.filters)
        from sparse_detector_ros.bev import Rasterizer
        assert warnings.filters == before, "importing bev changed warnings.filters"
        warnings.simplefilter("error")       # any warning now raises
        strict = list(warnings.filters)
        pts = np.frombuffer(np.float32([[0.1, 0.2, 0.0, 1.0]]).tobytes(), np.float32)
        pts = pts.reshape(-1, 4)
        assert not pts.flags.writeable
        bev, n = Rasterizer(GridConfig())(pts)
        bb, kept = Rasterizer(GridConfig()).batch([pts, pts])
        assert n == 1 and kept == [1, 1]
        assert warnings.filters == strict, "rasterizing left warnings.filters changed"
        print("ok")
    """
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stdout + res.stderr


# --------------------------------------------------------------------------- vs reference

@st.composite
def grids_and_points(draw):
    res = draw(st.sampled_from((0.25, 0.5, 1.0)))
    H, W = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    x_min = draw(st.integers(-16, 8)) * 0.25
    y_min = draw(st.integers(-16, 8)) * 0.25
    z_slices = draw(st.integers(1, 4))
    dz = draw(st.sampled_from((0.25, 0.5, 1.0)))
    z_min = draw(st.integers(-12, 4)) * 0.25
    g = GridConfig(x_min=x_min, x_max=x_min + H * res, y_min=y_min, y_max=y_min + W * res,
                   z_min=z_min, z_max=z_min + z_slices * dz, resolution=res, z_slices=z_slices,
                   intensity_max=draw(st.sampled_from((1.0, 100.0, 255.0, 3.0))),
                   density_saturation=draw(st.integers(2, 12)))
    n = draw(st.integers(0, 80))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    # Points on a 1/16 m lattice from one cell outside the grid to one cell past it, so the
    # bounds and cell edges are hit exactly; a few cells get many points.
    lat = 16
    def lattice(lo, cells, size):
        return lo + rng.integers(int(-lat * size), int((cells + 1) * size * lat), n,
                                 endpoint=True) / lat

    xs, ys, zs = lattice(x_min, H, res), lattice(y_min, W, res), lattice(z_min, z_slices, dz)
    it = rng.integers(-20, 300, n) / 4
    pts = np.c_[xs, ys, zs, it].astype(np.float32)
    if n and draw(st.booleans()):
        dup = rng.integers(0, n, n // 2)
        pts = np.concatenate([pts, pts[dup]])
    if len(pts) and draw(st.booleans()):
        bad = rng.random(pts.shape) < 0.05
        pts[bad] = rng.choice([np.nan, np.inf, -np.inf], int(bad.sum()))
    return g, pts


@HYP
@given(case=grids_and_points(), as_torch=st.booleans())
def test_matches_naive_reference(case, as_torch):
    g, pts = case
    ref, n_ref = reference(pts, g)
    bev, n = Rasterizer(g)(torch.from_numpy(pts) if as_torch else pts)
    assert n == n_ref
    assert bev.shape == ref.shape
    got = bev.numpy()
    zs = g.z_slices
    # Occupancy and density are exact; intensity up to one float32 rounding.
    np.testing.assert_array_equal(got[0, :zs], ref[0, :zs])
    np.testing.assert_allclose(got[0, zs], ref[0, zs], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got[0, zs + 1], ref[0, zs + 1], rtol=1e-6, atol=1e-7)


@HYP
@given(cases=st.lists(grids_and_points(), min_size=1, max_size=4))
def test_batch_matches_naive_reference(cases):
    g = cases[0][0]
    clouds = [pts for _, pts in cases]
    bev, kept = Rasterizer(g).batch(clouds)
    zs = g.z_slices
    for b, pts in enumerate(clouds):
        ref, n_ref = reference(pts, g)
        assert kept[b] == n_ref
        got = bev[b:b + 1].numpy()
        np.testing.assert_array_equal(got[0, :zs], ref[0, :zs])
        np.testing.assert_allclose(got[0, zs:], ref[0, zs:], rtol=1e-6, atol=1e-7)
