"""The CUDA kernels of kernels/*.cu, run on the CPU, against the torch backend and a naive
numpy reference.

The very same .cu files are compiled by g++ with test/emu/cuda_emu.h (built once per session
into a temporary directory) and driven through the CuPy backend's own host logic
(``cupy_backend.reduce_mask_with`` / ``gather_with`` / ``scatter_with``) with an emulated
launcher in place of the CUDA one, so argument packing, launch geometry and dtype dispatch are
tested too. A missing C++ compiler is an error, not a skip: setup installs g++.
"""
from __future__ import annotations

import importlib.util
import itertools
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from sparse_detector_ros.sparse import blocks, ops, strided
from sparse_detector_ros.sparse import cupy_backend as cb
from sparse_detector_ros.sparse import torch_backend as tb

ROOT = Path(__file__).resolve().parents[1]


def _load_emu():
    spec = importlib.util.spec_from_file_location("kernel_emu",
                                                  ROOT / "test" / "emu" / "kernel_emu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


kernel_emu = _load_emu()


@pytest.fixture(scope="session")
def emu(tmp_path_factory):
    return kernel_emu.EmulatedKernels(ROOT / "kernels", tmp_path_factory.mktemp("kernel_emu"))


@pytest.fixture(scope="session")
def emu64(tmp_path_factory):
    """The kernels built with their 32-bit indexing disabled (the path for > 2**31 items)."""
    return kernel_emu.EmulatedKernels(ROOT / "kernels", tmp_path_factory.mktemp("kernel_emu64"),
                                      defines=("SPARSE_DETECTOR_INDEX32_MAX=0",))


@pytest.fixture(scope="session", params=["cuda_geometry", "tiny_grid", "index64"])
def launcher(request, emu, emu64):
    """The launch geometry of the CUDA path; a 3-block x 32-thread grid whose threads each
    loop over many work items (grid-stride loops); the 64-bit indexing path."""
    if request.param == "cuda_geometry":
        return emu
    if request.param == "tiny_grid":
        return emu.with_geometry(32, 3)
    return emu64.with_geometry(64, 2)


# --------------------------------------------------------------------------------------------
# naive references (loops over tiles and cells, straight from the op contract)
# --------------------------------------------------------------------------------------------

def ref_reduce_mask(mask, th, tw, sh, sw, oy, ox, threshold, pooling):
    N, H, W = mask.shape
    Ty, Tx = -(-H // sh), -(-W // sw)
    rows, pooled = [], np.zeros((N, Ty, Tx), dtype=np.float64)
    for n in range(N):
        for ty in range(Ty):
            for tx in range(Tx):
                y0, x0 = ty * sh + oy, tx * sw + ox
                ys = slice(max(y0, 0), max(min(y0 + th, H), 0))
                win = mask[n, ys, max(x0, 0):max(min(x0 + tw, W), 0)]
                if win.size == 0:
                    continue
                v = win.max() if pooling == "max" else _mean64(win)
                pooled[n, ty, tx] = v
                if float(v) > float(threshold):  # compared in float64, as both backends do
                    rows.append((n, ty, tx))
    return np.array(rows, dtype=np.int32).reshape(-1, 3), pooled


def _mean64(win) -> float:
    """The window's mean as both backends compute it: float64 sum in row-major order, divided
    by the cell count in float64."""
    s = 0.0
    for v in np.asarray(win, dtype=np.float64).ravel():
        s += float(v)
    return s / win.size


def _cells(idx, th, tw, sh, sw, oy, ox, N, H, W):
    """(k, i, j, n, y, x) for every in-map tile element."""
    for k, (n, ty, tx) in enumerate(idx.tolist()):
        if not 0 <= n < N:
            continue
        for i in range(th):
            for j in range(tw):
                y, x = ty * sh + oy + i, tx * sw + ox + j
                if 0 <= y < H and 0 <= x < W:
                    yield k, i, j, n, y, x


def ref_gather(x, idx, th, tw, sh, sw, oy, ox, layout):
    if layout == "NCHW":
        N, C, H, W = x.shape
        out = np.zeros((len(idx), C, th, tw), dtype=x.dtype)
        for k, i, j, n, y, xx in _cells(idx, th, tw, sh, sw, oy, ox, N, H, W):
            out[k, :, i, j] = x[n, :, y, xx]
    else:
        N, H, W, C = x.shape
        out = np.zeros((len(idx), th, tw, C), dtype=x.dtype)
        for k, i, j, n, y, xx in _cells(idx, th, tw, sh, sw, oy, ox, N, H, W):
            out[k, i, j, :] = x[n, y, xx, :]
    return out


def ref_scatter(tiles, idx, base, sh, sw, oy, ox, add, layout):
    out = base.copy()
    if layout == "NCHW":
        _, _, th, tw = tiles.shape
        N, _, H, W = base.shape
        for k, i, j, n, y, xx in _cells(idx, th, tw, sh, sw, oy, ox, N, H, W):
            out[n, :, y, xx] = out[n, :, y, xx] + tiles[k, :, i, j] if add else tiles[k, :, i, j]
    else:
        _, th, tw, _ = tiles.shape
        N, H, W, _ = base.shape
        for k, i, j, n, y, xx in _cells(idx, th, tw, sh, sw, oy, ox, N, H, W):
            out[n, y, xx, :] = out[n, y, xx, :] + tiles[k, i, j, :] if add else tiles[k, i, j, :]
    return out


# --------------------------------------------------------------------------------------------
# geometry strategies: odd sizes, tiles hanging over every border, negative offsets
# --------------------------------------------------------------------------------------------

pairs = st.tuples(st.integers(1, 6), st.integers(1, 6))
offsets = st.tuples(st.integers(-5, 3), st.integers(-5, 3))
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def _random_indices(rng, N, Ty, Tx, k, unique=True):
    allc = np.array([(n, ty, tx) for n in range(N) for ty in range(Ty) for tx in range(Tx)],
                    dtype=np.int32).reshape(-1, 3)
    if unique:
        k = min(k, len(allc))
        sel = np.sort(rng.choice(len(allc), size=k, replace=False))
    else:
        sel = rng.integers(0, len(allc), size=k)
    return allc[sel]


def _nhwc(a):
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1))


# --------------------------------------------------------------------------------------------
# reduce_mask
# --------------------------------------------------------------------------------------------

@SETTINGS
@given(N=st.integers(1, 3), H=st.integers(1, 17), W=st.integers(1, 17), tile=pairs,
       stride=pairs, offset=offsets, density=st.sampled_from([0.0, 0.05, 0.3, 1.0]),
       pooling=st.sampled_from(["max", "avg"]), seed=st.integers(0, 2**16))
def test_reduce_mask_matches_references(launcher, N, H, W, tile, stride, offset, density,
                                        pooling, seed):
    rng = np.random.default_rng(seed)
    # 0/1 masks: pooled values (maxima, means of 0/1 cells) are exact in every implementation
    mask = (rng.random((N, H, W)) < density).astype(np.float32)
    threshold = 0.2 if pooling == "avg" else 0.0
    idx, count, pooled = cb.reduce_mask_with(torch.from_numpy(mask), tile, stride, offset,
                                             threshold, pooling, launcher)
    ref_idx, ref_pooled = ref_reduce_mask(mask, *tile, *stride, *offset, threshold, pooling)
    assert idx.dtype == torch.int32 and idx.shape == (count, 3)
    np.testing.assert_array_equal(idx.numpy(), ref_idx)
    np.testing.assert_allclose(pooled.numpy(), ref_pooled, rtol=1e-6, atol=0)
    t_idx, t_count = tb.reduce_mask(torch.from_numpy(mask), tile, stride, offset, threshold,
                                    pooling)
    assert t_count == count and torch.equal(t_idx, idx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_reduce_mask_dtypes_and_thresholds(emu, dtype, pooling):
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(2, 23, 18, generator=g).to(dtype)
    for threshold in (0.1, 0.5, 0.9):
        idx, count, _ = cb.reduce_mask_with(mask, (5, 4), (4, 3), (-1, 0), threshold, pooling, emu)
        m = mask.numpy() if dtype == torch.float64 else mask.float().numpy()
        ref_idx, _ = ref_reduce_mask(m, 5, 4, 4, 3, -1, 0, threshold, pooling)
        np.testing.assert_array_equal(idx.numpy(), ref_idx)
        t_idx, t_count = tb.reduce_mask(mask, (5, 4), (4, 3), (-1, 0), threshold, pooling)
        assert t_count == count and torch.equal(t_idx, idx)


@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_reduce_mask_nan_makes_a_tile_inactive(emu, pooling):
    mask = torch.ones(1, 6, 6)
    mask[0, 1, 4] = float("nan")  # in tile (0, 1) of a 3x3 grid
    idx, count, pooled = cb.reduce_mask_with(mask, 3, 3, 0, 0.5, pooling, emu)
    assert idx.tolist() == [[0, 0, 0], [0, 1, 0], [0, 1, 1]] and bool(pooled[0, 0, 1].isnan())
    assert torch.equal(tb.reduce_mask(mask, 3, 3, 0, 0.5, pooling)[0], idx)


def test_reduce_mask_empty_and_full(emu):
    z = torch.zeros(2, 9, 7)
    idx, count, _ = cb.reduce_mask_with(z, 3, 3, 0, 0.0, "max", emu)
    assert count == 0 and idx.shape == (0, 3) and idx.dtype == torch.int32
    idx, count, _ = cb.reduce_mask_with(torch.ones(2, 9, 7), 3, 3, 0, 0.0, "avg", emu)
    assert count == 2 * 3 * 3
    # windows entirely off the map are never active, even with a negative threshold
    idx, count, _ = cb.reduce_mask_with(torch.ones(1, 4, 4), 2, 2, (-3, -3), -1.0, "max", emu)
    assert idx.tolist() == [[0, 1, 1]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_reduce_mask_avg_ties_pick_the_same_tiles(emu, dtype):
    """A window filled with one value v (as stored in ``dtype``) has the exact mean v: with
    threshold == v neither backend may call it active, with the next float64 below v both
    must. (Summed in float32, as the torch backend did before, n*n copies of 0.1f and the like
    round to a mean above v for many n, and the torch backend picked tiles the kernel did
    not: e.g. 0.1f in a 3x3 or 16x16 window.) float64 values such as 0.1 do not sum exactly
    even in float64: there the two backends must still agree, tie or not."""
    for below in (False, True):
        for v, n in itertools.product((0.1, 0.2, 0.3, 0.7, 0.9), range(2, 20)):
            f = float(torch.tensor(v, dtype=dtype))
            mask = torch.full((1, n + 1, n), v, dtype=dtype)   # 2 x 1 grid, clipped 1-row tile
            thr, active = (math.nextafter(f, -math.inf), [[0, 0, 0], [0, 1, 0]]) if below \
                else (f, [])
            idx, _, _ = cb.reduce_mask_with(mask, n, n, 0, thr, "avg", emu)
            t_idx, _ = tb.reduce_mask(mask, n, n, 0, thr, "avg")
            assert idx.tolist() == t_idx.tolist(), (v, n, thr)
            if dtype != torch.float64:   # float32 / float16 sums are exact in float64
                assert idx.tolist() == active, (v, n, thr)


@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_reduce_mask_threshold_is_compared_in_float64(emu, pooling):
    """0.1f (0.10000000149...) is above the float64 threshold 0.1 but not above 0.1 rounded to
    float32: both backends compare in float64, neither rounds the threshold to the mask's
    dtype."""
    mask = torch.full((1, 4, 4), 0.1)
    f = float(mask[0, 0, 0])
    for thr, active in ((0.1, [[0, 0, 0]]), (f, [])):
        idx, _, _ = cb.reduce_mask_with(mask, 4, 4, 0, thr, pooling, emu)
        assert idx.tolist() == tb.reduce_mask(mask, 4, 4, 0, thr, pooling)[0].tolist() == active


@SETTINGS
@given(H=st.integers(1, 17), W=st.integers(1, 17), tile=pairs, stride=pairs, offset=offsets,
       seed=st.integers(0, 2**16))
def test_reduce_mask_avg_agrees_on_ties_with_any_values(emu, H, W, tile, stride, offset, seed):
    """Random float32 masks spanning 8 decades, threshold = the exact float64 mean of one
    window (a tie): both backends and the reference (float64 row-major sum) agree on every
    tile."""
    rng = np.random.default_rng(seed)
    mask = (rng.random((2, H, W)) * 10.0 ** rng.uniform(-8, 0, (2, H, W))).astype(np.float32)
    _, pooled = ref_reduce_mask(mask, *tile, *stride, *offset, 0.0, "avg")
    means = pooled[pooled > 0]
    threshold = float(means[rng.integers(len(means))]) if len(means) else 0.0
    ref_idx, _ = ref_reduce_mask(mask, *tile, *stride, *offset, threshold, "avg")
    idx, _, _ = cb.reduce_mask_with(torch.from_numpy(mask), tile, stride, offset, threshold,
                                    "avg", emu)
    t_idx, _ = tb.reduce_mask(torch.from_numpy(mask), tile, stride, offset, threshold, "avg")
    np.testing.assert_array_equal(idx.numpy(), ref_idx)
    np.testing.assert_array_equal(t_idx.numpy(), ref_idx)


# --------------------------------------------------------------------------------------------
# gather
# --------------------------------------------------------------------------------------------

@SETTINGS
@given(N=st.integers(1, 3), C=st.integers(1, 5), H=st.integers(1, 15), W=st.integers(1, 15),
       tile=pairs, stride=pairs, offset=offsets, k=st.integers(0, 12),
       layout=st.sampled_from(["NCHW", "NHWC"]), seed=st.integers(0, 2**16))
def test_gather_matches_references(launcher, N, C, H, W, tile, stride, offset, k, layout, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C, H, W)).astype(np.float32)
    if layout == "NHWC":
        x = _nhwc(x)
    Ty, Tx = -(-H // stride[0]), -(-W // stride[1])
    idx = _random_indices(rng, N, Ty, Tx, k, unique=False)
    out = cb.gather_with(torch.from_numpy(x), torch.from_numpy(idx), tile, stride, offset, layout,
                         launcher)
    ref = ref_gather(x, idx, *tile, *stride, *offset, layout)
    assert out.shape == ref.shape and out.is_contiguous()
    np.testing.assert_array_equal(out.numpy(), ref)
    t = tb.gather(torch.from_numpy(x), torch.from_numpy(idx), tile, stride, offset, layout)
    assert torch.equal(t, out)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.int32,
                                   torch.float64, torch.int64, torch.int16,
                                   torch.uint8])  # 1-byte: torch backend fallback
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_gather_dtypes_bit_exact(emu, dtype, layout):
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(2, 3, 11, 9, generator=g) * 100).to(dtype)
    if layout == "NHWC":
        x = x.permute(0, 2, 3, 1).contiguous()
    idx = torch.tensor([[0, 0, 0], [0, 2, 1], [1, 3, 2], [1, 0, 2]], dtype=torch.int64)
    out = cb.gather_with(x, idx, (5, 6), (3, 4), (-1, -2), layout, emu)
    assert out.dtype == dtype
    ref = ref_gather(x.view(torch.int16).numpy() if x.element_size() == 2 else x.numpy(),
                     idx.numpy(), 5, 6, 3, 4, -1, -2, layout)
    got = out.view(torch.int16).numpy() if x.element_size() == 2 else out.numpy()
    np.testing.assert_array_equal(got, ref)


def test_gather_empty_and_invalid_batch(emu):
    x = torch.randn(2, 3, 8, 8)
    out = cb.gather_with(x, torch.zeros(0, 3, dtype=torch.int32), 4, 4, 0, "NCHW", emu)
    assert out.shape == (0, 3, 4, 4)
    # a batch index outside [0, N) reads as off the map (zeros), never out of bounds
    out = cb.gather_with(x, torch.tensor([[2, 0, 0], [-1, 0, 0], [1, 1, 1]]), 4, 4, 0, "NCHW", emu)
    assert torch.equal(out[:2], torch.zeros(2, 3, 4, 4))
    assert torch.equal(out[2], x[1, :, 4:8, 4:8])


def test_gather_non_contiguous_input(emu):
    x = torch.randn(1, 4, 10, 12).to(memory_format=torch.channels_last)  # NCHW view, NHWC storage
    idx = torch.tensor([[0, 0, 0], [0, 2, 3]])
    out = cb.gather_with(x, idx, 5, 4, -1, "NCHW", emu)
    ref = ref_gather(x.contiguous().numpy(), idx.numpy(), 5, 5, 4, 4, -1, -1, "NCHW")
    np.testing.assert_array_equal(out.numpy(), ref)
    nhwc = x.permute(0, 2, 3, 1)  # contiguous NHWC view of the same storage
    out2 = cb.gather_with(nhwc, idx, 5, 4, -1, "NHWC", emu)
    assert torch.equal(out2, out.permute(0, 2, 3, 1))


# --------------------------------------------------------------------------------------------
# scatter
# --------------------------------------------------------------------------------------------

@SETTINGS
@given(N=st.integers(1, 3), C=st.integers(1, 5), H=st.integers(1, 15), W=st.integers(1, 15),
       tile=pairs, stride=pairs, offset=offsets, k=st.integers(0, 12),
       layout=st.sampled_from(["NCHW", "NHWC"]), seed=st.integers(0, 2**16))
def test_scatter_add_matches_references(launcher, N, C, H, W, tile, stride, offset, k, layout,
                                        seed):
    """add=True: overlapping tiles (tile > stride) and repeated indices accumulate."""
    rng = np.random.default_rng(seed)
    Ty, Tx = -(-H // stride[0]), -(-W // stride[1])
    idx = _random_indices(rng, N, Ty, Tx, k, unique=False)
    # small integers: float sums are exact whatever order the atomics run in
    shape = (len(idx), C, *tile) if layout == "NCHW" else (len(idx), *tile, C)
    tiles = rng.integers(-8, 9, size=shape).astype(np.float32)
    base_shape = (N, C, H, W) if layout == "NCHW" else (N, H, W, C)
    base = rng.integers(-8, 9, size=base_shape).astype(np.float32)
    b = torch.from_numpy(base.copy())
    out = cb.scatter_with(torch.from_numpy(tiles), torch.from_numpy(idx), b, stride, offset, True,
                      True, layout, launcher)
    ref = ref_scatter(tiles, idx, base, *stride, *offset, True, layout)
    assert out is b
    np.testing.assert_array_equal(out.numpy(), ref)
    t = tb.scatter(torch.from_numpy(tiles), torch.from_numpy(idx), torch.from_numpy(base.copy()),
                   stride, offset, add=True, layout=layout)
    assert torch.equal(t, out)


@SETTINGS
@given(N=st.integers(1, 3), C=st.integers(1, 5), H=st.integers(1, 15), W=st.integers(1, 15),
       tile=pairs, extra=pairs, offset=offsets, k=st.integers(0, 12),
       layout=st.sampled_from(["NCHW", "NHWC"]), seed=st.integers(0, 2**16))
def test_scatter_overwrite_matches_references(launcher, N, C, H, W, tile, extra, offset, k,
                                              layout, seed):
    """add=False with non-overlapping tiles (stride >= tile, distinct indices)."""
    rng = np.random.default_rng(seed)
    stride = (tile[0] + extra[0] - 1, tile[1] + extra[1] - 1)
    Ty, Tx = -(-H // stride[0]), -(-W // stride[1])
    idx = _random_indices(rng, N, Ty, Tx, k, unique=True)
    shape = (len(idx), C, *tile) if layout == "NCHW" else (len(idx), *tile, C)
    tiles = rng.standard_normal(shape).astype(np.float32)
    base_shape = (N, C, H, W) if layout == "NCHW" else (N, H, W, C)
    base = rng.standard_normal(base_shape).astype(np.float32)
    b = torch.from_numpy(base.copy())
    out = cb.scatter_with(torch.from_numpy(tiles), torch.from_numpy(idx), b, stride, offset, False,
                      False, layout, launcher)
    assert out is not b and np.array_equal(b.numpy(), base)  # inplace=False leaves base alone
    np.testing.assert_array_equal(out.numpy(), ref_scatter(tiles, idx, base, *stride, *offset,
                                                           False, layout))
    t = tb.scatter(torch.from_numpy(tiles), torch.from_numpy(idx), torch.from_numpy(base.copy()),
                   stride, offset, add=False, layout=layout)
    assert torch.equal(t, out)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.int32,
                                   torch.float64, torch.int64])
@pytest.mark.parametrize("add", [False, True])
def test_scatter_dtypes(emu, dtype, add):
    g = torch.Generator().manual_seed(7)
    idx = torch.tensor([[0, 0, 0], [0, 1, 2], [1, 2, 1]])
    tiles = torch.randint(-5, 6, (3, 2, 4, 4), generator=g).to(dtype)
    base = torch.randint(-5, 6, (2, 2, 10, 11), generator=g).to(dtype)
    out = cb.scatter_with(tiles, idx, base.clone(), 4, (-1, 1), add, True, "NCHW", emu)
    assert out.dtype == dtype
    ref = ref_scatter(tiles.double().numpy(), idx.numpy(), base.double().numpy(), 4, 4, -1, 1, add,
                      "NCHW")
    np.testing.assert_array_equal(out.double().numpy(), ref)


def test_scatter_into_non_contiguous_base(emu):
    base = torch.zeros(1, 3, 8, 8).to(memory_format=torch.channels_last)
    tiles = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    idx = torch.tensor([[0, 0, 1], [0, 1, 0]])
    for add in (False, True):
        b = base.clone()
        out = cb.scatter_with(tiles, idx, b, 4, 0, add, True, "NCHW", emu)
        assert out is b and b.is_contiguous(memory_format=torch.channels_last)
        ref = ref_scatter(tiles.numpy(), idx.numpy(), base.contiguous().numpy(), 4, 4, 0, 0, add,
                          "NCHW")
        np.testing.assert_array_equal(b.contiguous().numpy(), ref)


def test_scatter_empty_and_invalid_batch(emu):
    base = torch.randn(2, 3, 8, 8)
    before = base.clone()
    cb.scatter_with(torch.zeros(0, 3, 4, 4), torch.zeros(0, 3, dtype=torch.int32), base, 4, 0, True,
                    True, "NCHW", emu)
    assert torch.equal(base, before)
    cb.scatter_with(torch.ones(2, 3, 4, 4), torch.tensor([[2, 0, 0], [-1, 1, 1]]), base, 4, 0, True,
                    True, "NCHW", emu)
    assert torch.equal(base, before)  # rows with n outside [0, N) are dropped


def test_scatter_shape_errors(emu):
    with pytest.raises(ValueError, match="channels"):
        cb.scatter_with(torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, dtype=torch.int32),
                        torch.zeros(1, 3, 8, 8),
                    4, 0, False, True, "NCHW", emu)
    with pytest.raises(ValueError, match="indices"):
        cb.scatter_with(torch.zeros(2, 3, 4, 4), torch.zeros(1, 3, dtype=torch.int32),
                        torch.zeros(1, 3, 8, 8),
                    4, 0, False, True, "NCHW", emu)
    with pytest.raises(ValueError, match="layout"):
        cb.gather_with(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, dtype=torch.int32), 4, 4, 0,
                       "NWHC", emu)


# --------------------------------------------------------------------------------------------
# the SBNet round trip: reduce_mask -> gather (halo) -> per-tile op -> scatter
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_sbnet_round_trip_equals_dense_masked(emu, layout):
    """A 3x3 box filter run on gathered tiles with a 1-cell halo and scattered back equals the
    dense filter on every active output tile (the project's central equality)."""
    g = torch.Generator().manual_seed(11)
    N, C, H, W, B, h = 2, 3, 21, 19, 4, 1
    x = torch.randn(N, C, H, W, generator=g)
    mask = (torch.rand(N, H, W, generator=g) > 0.93).float()
    idx, count, _ = cb.reduce_mask_with(mask, B, B, 0, 0.0, "max", emu)
    assert 0 < count < N * 6 * 5
    weight = torch.ones(C, 1, 3, 3)
    xl = x.permute(0, 2, 3, 1).contiguous() if layout == "NHWC" else x
    tiles = cb.gather_with(xl, idx, B + 2 * h, B, -h, layout, emu)
    t = tiles.permute(0, 3, 1, 2) if layout == "NHWC" else tiles
    y = torch.nn.functional.conv2d(t, weight, groups=C)  # valid conv: (B+2h) -> B
    y = y.permute(0, 2, 3, 1).contiguous() if layout == "NHWC" else y
    base = torch.zeros_like(xl)
    out = cb.scatter_with(y, idx, base, B, 0, False, True, layout, emu)
    out = out.permute(0, 3, 1, 2) if layout == "NHWC" else out
    dense = torch.nn.functional.conv2d(x, weight, padding=1, groups=C)
    active = torch.zeros(N, 1, H, W, dtype=torch.bool)
    for n, ty, tx in idx.tolist():
        active[n, :, ty * B:(ty + 1) * B, tx * B:(tx + 1) * B] = True
    torch.testing.assert_close(out, torch.where(active, dense, torch.zeros(())), rtol=1e-5,
                               atol=1e-5)


# --------------------------------------------------------------------------------------------
# the emulator's own checks, and the public (CUDA-only) API on this machine
# --------------------------------------------------------------------------------------------

def test_emulator_rejects_wrong_argument_types(emu):
    m = torch.zeros(1, 4, 4)
    p = torch.zeros(1, 2, 2)
    a = torch.zeros(1, 2, 2, dtype=torch.int32)
    ints = tuple(np.int32(v) for v in (1, 4, 4, 2, 2, 2, 2, 2, 2, 0, 0))
    with pytest.raises(TypeError, match="needs float64, got float32"):
        emu("reduce_mask.cu", "reduce_mask_f32", 4,
            (m, p, a) + ints + (np.float32(0.5), np.int32(0)))
    with pytest.raises(TypeError, match="int64 tensor"):
        emu("reduce_mask.cu", "reduce_mask_f32", 4,
            (m, p, a.long()) + ints + (np.float64(0.5), np.int32(0)))
    with pytest.raises(TypeError, match="takes"):
        emu("reduce_mask.cu", "reduce_mask_f32", 4, (m, p, a) + ints)


def test_emulator_detects_out_of_bounds_writes(emu):
    x = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
    out = torch.zeros(1, 1, 2, 2)  # too small for a 3x3 tile: the kernel writes past its end
    args = (x.view(torch.int32), torch.zeros(1, 3, dtype=torch.int32), out.view(torch.int32)) + \
        tuple(np.int32(v) for v in (1, 1, 1, 4, 4, 3, 3, 3, 3, 0, 0))
    with pytest.raises(AssertionError, match="wrote outside"):
        emu("sparse_gather.cu", "sparse_gather_nchw_b32", 9, args)


def test_public_api_needs_cuda_tensors():
    with pytest.raises(ValueError, match="CUDA"):
        cb.reduce_mask(torch.zeros(1, 4, 4), 2, 2)
    with pytest.raises(ValueError, match="CUDA"):
        cb.gather(torch.zeros(1, 1, 4, 4), torch.zeros(0, 3, dtype=torch.int32), 2, 2)
    with pytest.raises(ValueError, match="CUDA"):
        cb.scatter(torch.zeros(0, 1, 2, 2), torch.zeros(0, 3, dtype=torch.int32),
                   torch.zeros(1, 1, 4, 4), 2)


def test_import_is_lazy_and_available_needs_a_gpu():
    code = ("import sys; import sparse_detector_ros.sparse.cupy_backend as cb; "
            "assert 'cupy' not in sys.modules, 'cupy imported at module load'; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    if not torch.cuda.is_available():
        assert cb.available() is False


# --------------------------------------------------------------------------------------------
# the sparse blocks on the emulated kernels
# --------------------------------------------------------------------------------------------

class _EmulatedBackend:
    """The CuPy backend's op API on CPU tensors, kernels run by the emulation."""

    def __init__(self, launch):
        self.launched = []

        def counting(filename, name, total, args):
            self.launched.append(name)
            launch(filename, name, total, args)
        self.launch = counting

    def reduce_mask(self, mask, tile, stride, offset=0, threshold=0.0, pooling="max"):
        return cb.reduce_mask_with(mask, tile, stride, offset, threshold, pooling, self.launch)[:2]

    def gather(self, x, indices, tile, stride, offset=0, layout="NCHW"):
        return cb.gather_with(x, indices, tile, stride, offset, layout, self.launch)

    def scatter(self, tiles, indices, base, stride, offset=0, add=False, inplace=True,
                layout="NCHW"):
        return cb.scatter_with(tiles, indices, base, stride, offset, add, inplace, layout,
                               self.launch)


def _randomize_bn(module, seed):
    """Random running statistics and affine terms: non-zero shifts make off-map cells non-zero
    wherever a batch norm runs before a conv."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.5 + 0.3)
    return module.eval()


def _border_mask(g, N, H, W):
    """A few random cells plus every border cell: tiles on every border are active."""
    mask = (torch.rand(N, H, W, generator=g) > 0.995).float()
    mask[:, 0, :] = mask[:, -1, :] = mask[:, :, 0] = mask[:, :, -1] = 1
    return mask


@pytest.mark.parametrize("branch", ["bottleneck", "preact_basic"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_sparse_residual_block_on_emulated_kernels(emu, monkeypatch, branch, channels_last):
    torch.manual_seed(0)
    make = {"bottleneck": blocks.bottleneck_branch, "preact_basic": blocks.preact_basic_branch}
    block = blocks.SparseResidualBlock(_randomize_bn(make[branch](6), 1), tile_size=4,
                                       dense_crossover=1.0, backend="torch").eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 6, 19, 22, generator=g)
    mask = _border_mask(g, 2, 19, 22)
    with torch.no_grad():
        ref = block.dense_reference(x, mask)       # torch backend, before the patch
    backend = _EmulatedBackend(emu)
    monkeypatch.setattr(ops, "get_backend", lambda name="auto", device=None: backend)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = block(x, mask)
    assert block.last_path == "sparse" and 0 < block.last_active_fraction < 1
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    layout = "nhwc" if channels_last else "nchw"
    assert {"reduce_mask_f32", f"sparse_gather_{layout}_b32",
            f"sparse_scatter_add_{layout}_f32"} <= set(backend.launched)


@pytest.mark.parametrize("kernel,stride,preact", [(3, 2, False), (2, 2, False), (3, 2, True)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_sparse_strided_conv_on_emulated_kernels(emu, monkeypatch, kernel, stride, preact,
                                                 channels_last):
    """The strided conv through the kernels equals the dense conv (+ BN, ReLU) masked to the
    active output tiles, tiles on every border, odd map size."""
    torch.manual_seed(3)
    layers = strided.downsample_branch(6, 8, kernel, stride)
    if preact:   # BN (with a shift) before the conv: off-map cells are zeroed before it
        layers = torch.nn.Sequential(torch.nn.BatchNorm2d(6), *layers)
    block = strided.SparseStridedConv(_randomize_bn(layers, 4), tile_size=4,
                                      dense_crossover=1.0, backend="torch").eval()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 6, 37, 45, generator=g)
    mask = _border_mask(g, 2, 37, 45)
    with torch.no_grad():
        ref = block.dense_reference(x, mask)       # torch backend, before the patch
    backend = _EmulatedBackend(emu)
    monkeypatch.setattr(ops, "get_backend", lambda name="auto", device=None: backend)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = block(x, mask)
    assert block.last_path == "sparse" and 0 < block.last_active_fraction < 1
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    layout = "nhwc" if channels_last else "nchw"
    assert {"reduce_mask_f32", f"sparse_gather_{layout}_b32",
            f"sparse_scatter_{layout}_b32"} <= set(backend.launched)


def test_gpu_check_script(capsys):
    """bench/gpu_check.py: a clear exit without a GPU, and its logic runs (--cpu-smoke)."""
    import json
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not torch.cuda.is_available():
        assert mod.main([]) == 2
        assert "no CUDA GPU" in capsys.readouterr().err
    rc = mod.main(["--cpu-smoke", "--size", "40", "--channels", "4", "--tile", "8",
                   "--density", "0.3", "--repeats", "1", "--warmup", "0"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["ok"], report
    assert {r["op"] for r in report["ops"]} == {"reduce_mask", "gather", "scatter"}


# --------------------------------------------------------------------------------------------
# the CUDA launcher's plumbing, with a stand-in for CuPy whose kernels run on the emulator
# --------------------------------------------------------------------------------------------

class _FakeCupy:
    """Records what cupy_backend does with CuPy: module compilation, device and stream
    contexts, DLPack imports, kernel launches (run by the emulator)."""

    def __init__(self, emu):
        import types
        self.log = []
        fake = self

        class Ctx:
            def __init__(self, kind, value):
                fake.log.append((kind, value))

            def __enter__(self):
                fake.log.append(("enter", None))
                return self

            def __exit__(self, *exc):
                fake.log.append(("exit", None))
                return False

        class Stream:
            @staticmethod
            def from_external(obj):
                return Ctx("stream", obj)

        class RawModule:
            def __init__(self, code, options=()):
                self.file = next(f for f in cb.KERNELS if cb.kernel_source(f) == code)
                fake.log.append(("module", (self.file, tuple(options))))

            def compile(self):
                fake.log.append(("compile", self.file))

            def get_function(self, name):
                file = self.file

                def kernel(grid, block, args):
                    assert all(not isinstance(a, torch.Tensor) or getattr(a, "_via_dlpack", False)
                               for a in args), "tensor passed without from_dlpack"
                    assert ("enter", None) == fake.log[-1] or fake.log[-1][0] == "dlpack"
                    fake.log.append(("launch", (name, grid, block)))
                    emu.launch(file, name, (*grid, 1, 1), (*block, 1, 1), args)
                return kernel

        def from_dlpack(t):
            fake.log.append(("dlpack", t.dtype))
            v = t.view(t.shape)
            v._via_dlpack = True
            return v

        self.module = types.SimpleNamespace(
            cuda=types.SimpleNamespace(Device=lambda i: Ctx("device", i), Stream=Stream),
            RawModule=RawModule, from_dlpack=from_dlpack)

    def kinds(self, kind):
        return [v for k, v in self.log if k == kind]


@pytest.fixture
def empty_kernel_cache():
    """No compiled kernels before the test, and none of the fake CuPy's left after it."""
    cb.clear_kernel_cache()
    yield
    cb.clear_kernel_cache()


def test_cuda_launcher_plumbing(emu, monkeypatch, empty_kernel_cache):
    fake = _FakeCupy(emu)
    monkeypatch.setitem(sys.modules, "cupy", fake.module)

    class TorchStream:  # torch.cuda.Stream implements the CUDA stream protocol
        cuda_stream = 1234

        def __cuda_stream__(self):
            return (0, self.cuda_stream)
    torch_stream = TorchStream()
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: torch_stream)

    g = torch.Generator().manual_seed(1)
    mask = (torch.rand(2, 13, 17, generator=g) > 0.9).float()
    x = torch.randn(2, 13, 17, 3, generator=g)
    for _ in range(2):
        idx, k, _ = cb.reduce_mask_with(mask, 4, 4, 0, 0.0, "max", cb.cuda_launch)
        tiles = cb.gather_with(x, idx, 6, 4, -1, "NHWC", cb.cuda_launch)
        out = cb.scatter_with(tiles, idx, torch.zeros_like(x), 4, -1, True, True, "NHWC",
                              cb.cuda_launch)
    assert k > 0
    t_idx, _ = tb.reduce_mask(mask, 4, 4)
    t_tiles = tb.gather(x, t_idx, 6, 4, -1, "NHWC")
    assert torch.equal(idx, t_idx) and torch.equal(tiles, t_tiles)
    assert torch.equal(out, tb.scatter(t_tiles, t_idx, torch.zeros_like(x), 4, -1, add=True,
                                       layout="NHWC"))
    # each file compiled once (cached per device), with exactly NVRTC_OPTIONS
    assert sorted(fake.kinds("module")) == sorted((f, cb.NVRTC_OPTIONS) for f in cb.KERNELS)
    assert fake.kinds("device") and set(fake.kinds("device")) == {0}
    # every launch under torch's current stream, all tensors through DLPack, CUDA geometry
    assert len(fake.kinds("stream")) == len(fake.kinds("launch")) == 6
    assert all(s is torch_stream for s in fake.kinds("stream"))
    for name, grid, block in fake.kinds("launch"):
        assert block == (cb.THREADS,) and 1 <= grid[0] <= cb.MAX_BLOCKS
    assert [n for n, _, _ in fake.kinds("launch")][:3] == [
        "reduce_mask_f32", "sparse_gather_nhwc_b32", "sparse_scatter_add_nhwc_f32"]
