"""reduce_mask / gather / scatter of the torch backend against naive Python loops."""
from __future__ import annotations

import ast
import logging
import math
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st, HealthCheck

from sparse_detector_ros import sparse
from sparse_detector_ros.sparse import geometry, ops, torch_backend as tb

SPARSE_DIR = Path(sparse.__file__).resolve().parent


# ---------------------------------------------------------------- naive references

def ref_reduce_mask(mask, tile, stride, offset=0, threshold=0.0, pooling="max"):
    th, tw = geometry.pair(tile)
    sh, sw = geometry.pair(stride)
    oy, ox = geometry.pair(offset)
    N, H, W = mask.shape
    out = []
    for n in range(N):
        for ty in range(math.ceil(H / sh)):
            for tx in range(math.ceil(W / sw)):
                vals = [float(mask[n, r, c])
                        for r in range(ty * sh + oy, ty * sh + oy + th)
                        for c in range(tx * sw + ox, tx * sw + ox + tw)
                        if 0 <= r < H and 0 <= c < W]
                if not vals:
                    continue
                v = max(vals) if pooling == "max" else sum(vals) / len(vals)
                if v > threshold:
                    out.append([n, ty, tx])
    return torch.tensor(out, dtype=torch.int32).reshape(-1, 3)


def ref_gather(x, indices, tile, stride, offset, layout="NCHW"):
    th, tw = geometry.pair(tile)
    sh, sw = geometry.pair(stride)
    oy, ox = geometry.pair(offset)
    xc = x if layout == "NCHW" else x.permute(0, 3, 1, 2)
    N, C, H, W = xc.shape
    out = torch.zeros(len(indices), C, th, tw, dtype=x.dtype)
    for k, (n, ty, tx) in enumerate(indices.tolist()):
        for i in range(th):
            for j in range(tw):
                r, c = ty * sh + oy + i, tx * sw + ox + j
                if 0 <= r < H and 0 <= c < W:
                    out[k, :, i, j] = xc[n, :, r, c]
    return out if layout == "NCHW" else out.permute(0, 2, 3, 1).contiguous()


def ref_scatter(tiles, indices, base, stride, offset=0, add=False, layout="NCHW"):
    sh, sw = geometry.pair(stride)
    oy, ox = geometry.pair(offset)
    out = base.clone()
    oc = out if layout == "NCHW" else out.permute(0, 3, 1, 2)  # view
    tc = tiles if layout == "NCHW" else tiles.permute(0, 3, 1, 2)
    _, C, H, W = oc.shape
    _, _, bh, bw = tc.shape
    for k, (n, ty, tx) in enumerate(indices.tolist()):
        for i in range(bh):
            for j in range(bw):
                r, c = ty * sh + oy + i, tx * sw + ox + j
                if 0 <= r < H and 0 <= c < W:
                    if add:
                        oc[n, :, r, c] += tc[k, :, i, j]
                    else:
                        oc[n, :, r, c] = tc[k, :, i, j]
    return out


def random_indices(g, N, Ty, Tx, frac):
    act = torch.rand(N, Ty, Tx, generator=g) < frac
    return torch.nonzero(act).to(torch.int32)


# ---------------------------------------------------------------- reduce_mask

@pytest.mark.parametrize("pooling", ["max", "avg"])
@pytest.mark.parametrize("H,W,tile,stride,offset", [
    (37, 29, 8, 8, 0), (37, 29, 10, 8, -1), (16, 16, 16, 16, 0), (33, 47, (12, 9), (8, 7), (-2, 1)),
    (5, 7, 8, 8, 0), (20, 20, 4, 6, 3)])
def test_reduce_mask_matches_reference(pooling, H, W, tile, stride, offset):
    g = torch.Generator().manual_seed(H * 100 + W)
    mask = (torch.rand(2, H, W, generator=g) > 0.93).float() * torch.rand(2, H, W, generator=g)
    for thr in (0.0, 0.05):
        idx, k = tb.reduce_mask(mask, tile, stride, offset, thr, pooling)
        ref = ref_reduce_mask(mask, tile, stride, offset, thr, pooling)
        assert idx.dtype == torch.int32 and idx.shape == (k, 3)
        assert torch.equal(idx, ref)


def test_reduce_mask_empty_and_full():
    idx, k = tb.reduce_mask(torch.zeros(1, 30, 30), 8, 8)
    assert k == 0 and idx.shape == (0, 3) and idx.dtype == torch.int32
    idx, k = tb.reduce_mask(torch.ones(2, 30, 30), 8, 8)
    assert k == 2 * 4 * 4
    assert torch.equal(idx, ref_reduce_mask(torch.ones(2, 30, 30), 8, 8))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_reduce_mask_dtypes(dtype):
    mask = torch.zeros(1, 20, 20, dtype=dtype)
    mask[0, 19, 0] = 0.5
    idx, k = tb.reduce_mask(mask, 8, 8, threshold=0.25)
    assert k == 1 and idx.tolist() == [[0, 2, 0]]


def test_reduce_mask_window_outside_map_is_inactive():
    # offset pushes the last windows past the map: they have no in-map cell
    idx, k = tb.reduce_mask(torch.ones(1, 8, 8), 2, 4, offset=6, pooling="avg")
    assert idx.tolist() == [[0, 0, 0]]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(H=st.integers(1, 40), W=st.integers(1, 40), th=st.integers(1, 12), tw=st.integers(1, 12),
       sh=st.integers(1, 12), sw=st.integers(1, 12), oy=st.integers(-4, 4), ox=st.integers(-4, 4),
       pooling=st.sampled_from(["max", "avg"]), seed=st.integers(0, 2**16))
def test_reduce_mask_hypothesis(H, W, th, tw, sh, sw, oy, ox, pooling, seed):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(1, H, W, generator=g) > 0.8).float()
    idx, k = tb.reduce_mask(mask, (th, tw), (sh, sw), (oy, ox), 0.1, pooling)
    assert torch.equal(idx, ref_reduce_mask(mask, (th, tw), (sh, sw), (oy, ox), 0.1, pooling))


# ---------------------------------------------------------------- gather / scatter

GEOMS = [  # H, W, tile, stride, offset  (SBNet halo geometries, odd sizes, tiles on every border)
    (37, 29, 10, 8, -1), (37, 29, 12, 8, -2), (40, 40, 8, 8, 0), (19, 23, 34, 32, -1),
    (33, 47, 18, 16, -1), (31, 31, (9, 11), (7, 9), (-1, -1)), (24, 24, 4, 6, 2)]


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("H,W,tile,stride,offset", GEOMS)
@pytest.mark.parametrize("frac", [0.0, 0.3, 1.0])
def test_gather_matches_reference(layout, H, W, tile, stride, offset, frac):
    g = torch.Generator().manual_seed(H + 7 * W)
    N, C = 2, 3
    x = torch.randn(N, C, H, W, generator=g)
    if layout == "NHWC":
        x = x.permute(0, 2, 3, 1).contiguous()
    Ty, Tx = geometry.grid_shape((H, W), stride)
    idx = random_indices(g, N, Ty, Tx, frac)
    got = tb.gather(x, idx, tile, stride, offset, layout)
    ref = ref_gather(x, idx, tile, stride, offset, layout)
    assert got.shape == ref.shape and got.is_contiguous()
    assert torch.equal(got, ref)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("H,W,tile,stride,offset", GEOMS)
@pytest.mark.parametrize("add", [False, True])
@pytest.mark.parametrize("inplace", [False, True])
def test_scatter_matches_reference(layout, H, W, tile, stride, offset, add, inplace):
    g = torch.Generator().manual_seed(H * 3 + W)
    N, C = 2, 3
    th, tw = geometry.pair(tile)
    sh, sw = geometry.pair(stride)
    if not add:  # overwrite is only well defined for non-overlapping tiles
        th, tw = min(th, sh), min(tw, sw)
    base = torch.randn(N, C, H, W, generator=g)
    tiles = torch.randn(0, C, th, tw)
    Ty, Tx = geometry.grid_shape((H, W), (sh, sw))
    for frac in (0.0, 0.4, 1.0):
        idx = random_indices(g, N, Ty, Tx, frac)
        tiles = torch.randn(len(idx), C, th, tw, generator=g)
        b, t = base, tiles
        if layout == "NHWC":
            b, t = base.permute(0, 2, 3, 1).contiguous(), tiles.permute(0, 2, 3, 1).contiguous()
        ref = ref_scatter(t, idx, b, stride, offset, add, layout)
        b_in = b.clone()
        got = tb.scatter(t, idx, b_in, stride, offset, add=add, inplace=inplace, layout=layout)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
        if inplace:
            assert got.data_ptr() == b_in.data_ptr()
        else:
            assert got.data_ptr() != b_in.data_ptr() and torch.equal(b_in, b)


def test_scatter_into_channels_last_view():
    """A channels_last NCHW map permuted to NHWC is contiguous; a sliced one is not."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 4, 20, 20, generator=g).contiguous(memory_format=torch.channels_last)
    idx = torch.tensor([[0, 0, 0], [0, 1, 2]], dtype=torch.int32)
    tiles = torch.randn(2, 8, 8, 4, generator=g)
    nhwc = base.permute(0, 2, 3, 1)
    ref = ref_scatter(tiles, idx, nhwc, 8, 0, True, "NHWC")
    got = tb.scatter(tiles, idx, nhwc, 8, 0, add=True, layout="NHWC")
    assert got.data_ptr() == base.data_ptr()
    torch.testing.assert_close(got, ref)
    odd = torch.randn(1, 20, 20, 8, generator=g)[..., ::2]          # non-contiguous NHWC
    ref = ref_scatter(tiles, idx, odd, 8, 0, False, "NHWC")
    got = tb.scatter(tiles, idx, odd, 8, 0, add=False, layout="NHWC")
    torch.testing.assert_close(got, ref)
    odd = torch.randn(1, 8, 20, 20, generator=g)[:, ::2]            # non-contiguous NCHW
    t = tiles.permute(0, 3, 1, 2)
    ref = ref_scatter(t, idx, odd, 8, 0, True, "NCHW")
    got = tb.scatter(t, idx, odd, 8, 0, add=True, layout="NCHW")
    torch.testing.assert_close(got, ref)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(H=st.integers(1, 30), W=st.integers(1, 30), B=st.integers(1, 9), h=st.integers(0, 3),
       layout=st.sampled_from(["NCHW", "NHWC"]), frac=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_gather_scatter_roundtrip_hypothesis(H, W, B, h, layout, frac, seed):
    """SBNet geometry: gather B+2h / stride B / offset -h, crop the halo, scatter B: the
    active tiles are copied exactly, everything else keeps base's value."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 2, H, W, generator=g)
    Ty, Tx = geometry.grid_shape((H, W), B)
    idx = random_indices(g, 1, Ty, Tx, frac)
    xl = x if layout == "NCHW" else x.permute(0, 2, 3, 1).contiguous()
    tiles = tb.gather(xl, idx, B + 2 * h, B, -h, layout)
    assert torch.equal(tiles, ref_gather(xl, idx, B + 2 * h, B, -h, layout))
    core = tiles[:, :, h:h + B, h:h + B] if layout == "NCHW" else tiles[:, h:h + B, h:h + B]
    base = torch.zeros_like(xl)
    out = tb.scatter(core, idx, base, B, 0, add=False, inplace=False, layout=layout)
    tm = torch.zeros(1, Ty, Tx, dtype=torch.bool)
    tm[idx[:, 0].long(), idx[:, 1].long(), idx[:, 2].long()] = True
    up = tm.repeat_interleave(B, 1).repeat_interleave(B, 2)[:, :H, :W]
    expect = x * up[:, None]
    if layout == "NHWC":
        expect = expect.permute(0, 2, 3, 1)
    assert torch.equal(out, expect)


def test_gather_scatter_are_differentiable():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 7, 9, generator=g, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([[0, 0, 0], [0, 1, 2], [0, 0, 1]], dtype=torch.int32)
    for layout in ("NCHW", "NHWC"):
        def f(x):
            xl = x if layout == "NCHW" else x.permute(0, 2, 3, 1)
            t = tb.gather(xl, idx, 6, 4, -1, layout) * 2.0
            c = t[:, :, 1:5, 1:5] if layout == "NCHW" else t[:, 1:5, 1:5]
            return tb.scatter(c, idx, xl * 1.0, 4, 0, add=True, inplace=True, layout=layout)
        assert torch.autograd.gradcheck(f, (x,))
        tiles = torch.randn(3, 2, 4, 4, dtype=torch.float64, requires_grad=True)
        if layout == "NHWC":
            tiles = torch.randn(3, 4, 4, 2, dtype=torch.float64, requires_grad=True)
        base = torch.randn(*( (1, 2, 7, 9) if layout == "NCHW" else (1, 7, 9, 2)),
                           dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda t, b: tb.scatter(t, idx, b, 4, 0, add=True, inplace=False, layout=layout),
            (tiles, base))


def test_empty_indices():
    idx = torch.zeros(0, 3, dtype=torch.int32)
    x = torch.randn(1, 3, 10, 10)
    assert tb.gather(x, idx, 6, 4, -1).shape == (0, 3, 6, 6)
    assert tb.gather(x.permute(0, 2, 3, 1).contiguous(), idx, 6, 4, -1, "NHWC").shape == (0, 6, 6,
                                                                                          3)
    out = tb.scatter(torch.zeros(0, 3, 4, 4), idx, x, 4, inplace=False, add=True)
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()


def test_bad_arguments():
    x = torch.randn(1, 3, 10, 10)
    idx = torch.zeros(1, 3, dtype=torch.int32)
    with pytest.raises(ValueError):
        tb.gather(x, idx, 4, 4, layout="NCWH")
    with pytest.raises(ValueError):
        tb.gather(x, idx, 0, 4)
    with pytest.raises(ValueError):
        tb.reduce_mask(torch.zeros(10, 10), 4, 4)
    with pytest.raises(ValueError):
        tb.reduce_mask(torch.zeros(1, 10, 10), 4, 4, pooling="min")
    with pytest.raises(ValueError):
        tb.scatter(torch.zeros(1, 2, 4, 4), idx, x, 4)


# ---------------------------------------------------------------- precomputed element positions

@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("H,W,tile,stride,offset", GEOMS)
def test_gather_at_and_scatter_at_match_the_references(layout, H, W, tile, stride, offset):
    """One TileIndex, reused for several channel counts, tile ranges and both scatter modes,
    gives what the naive loops give: tiles on every border and wholly off the map; and a
    TileIndex of tiles inside the map (no validity mask) as well."""
    g = torch.Generator().manual_seed(H * 5 + W)
    N = 2
    Ty, Tx = geometry.grid_shape((H, W), stride)
    th, tw = geometry.pair(tile)
    idx = torch.cat([random_indices(g, N, Ty, Tx, 0.4),
                     torch.tensor([[0, -1, 1], [1, Ty, 0], [1, Ty - 1, Tx - 1]],
                                  dtype=torch.int32)])
    index = tb.tile_index(idx, (N, H, W), tile, stride, offset)
    assert index.flat.shape == (len(idx), th, tw) and index.valid is not None
    oy, ox = geometry.pair(offset)
    sh, sw = geometry.pair(stride)
    inner = [r for r in random_indices(g, N, Ty, Tx, 0.6).tolist()
             if r[1] * sh + oy >= 0 and r[2] * sw + ox >= 0 and r[1] * sh + oy + th <= H
             and r[2] * sw + ox + tw <= W]
    inner = torch.tensor(inner, dtype=torch.int32).reshape(-1, 3)
    inner_index = tb.tile_index(inner, (N, H, W), tile, stride, offset)
    assert inner_index.valid is None
    for C in (1, 3):
        x = torch.randn(N, C, H, W, generator=g)
        if layout == "NHWC":
            x = x.permute(0, 2, 3, 1).contiguous()
        assert torch.equal(tb.gather_at(x, index, layout),
                           ref_gather(x, idx, tile, stride, offset, layout))
        assert torch.equal(tb.gather_at(x, index.rows(1, 4), layout),
                           ref_gather(x, idx[1:4], tile, stride, offset, layout))
        assert torch.equal(tb.gather_at(x, inner_index, layout),
                           ref_gather(x, inner, tile, stride, offset, layout))
        tiles = torch.randn(tb.gather_at(x, index, layout).shape, generator=g)
        for add in (False, True):
            got = tb.scatter_at(tiles, index, x, add=add, inplace=False, layout=layout)
            ref = ref_scatter(tiles, idx, x, stride, offset, add, layout)
            if add:
                torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
            else:   # overlapping tiles: only the cells written at most once are defined
                once = tb.scatter(torch.ones_like(tiles), idx, torch.zeros_like(x), stride,
                                  offset, add=True, layout=layout) <= 1
                assert torch.equal(got[once], ref[once])
        t_in = torch.randn(tb.gather_at(x, inner_index, layout).shape, generator=g)
        torch.testing.assert_close(
            tb.scatter_at(t_in, inner_index, x, add=True, inplace=False, layout=layout),
            ref_scatter(t_in, inner, x, stride, offset, True, layout), rtol=0, atol=1e-6)


def test_tile_index_inside_the_map_needs_no_validity_mask():
    idx = torch.tensor([[0, 1, 1], [1, 2, 3]], dtype=torch.int32)
    index = tb.tile_index(idx, (2, 40, 50), (10, 12), (8, 9), (-1, -2))
    assert index.valid is None and torch.equal(index.off_map(), torch.zeros(0, dtype=torch.long))
    rows, cols = torch.arange(10), torch.arange(12)
    assert torch.equal(index.flat[0], (7 + rows)[:, None] * 50 + 7 + cols)
    assert torch.equal(index.flat[1], (40 + 15 + rows)[:, None] * 50 + 25 + cols)
    # the host check on the bounds: batch index included for (N, H, W), left out for (H, W)
    assert tb.tiles_inside(tb.index_bounds(idx), (2, 40, 50), (10, 12), (8, 9), (-1, -2))
    assert not tb.tiles_inside(tb.index_bounds(idx), (1, 40, 50), (10, 12), (8, 9), (-1, -2))
    assert tb.tiles_inside(tb.index_bounds(idx), (40, 50), (10, 12), (8, 9), (-1, -2))
    # a tile ending exactly at the bottom / right border is inside, one cell more is not
    b = tb.index_bounds(torch.tensor([[0, 2, 3]]))   # rows 15..24, cols 25..36
    assert tb.tiles_inside(b, (1, 25, 37), (10, 12), (8, 9), (-1, -2))
    assert not tb.tiles_inside(b, (1, 24, 37), (10, 12), (8, 9), (-1, -2))
    assert not tb.tiles_inside(b, (1, 25, 36), (10, 12), (8, 9), (-1, -2))
    # and at the top / left border
    b = tb.index_bounds(torch.tensor([[0, 0, 0]]))
    assert tb.tiles_inside(b, (1, 25, 37), 4, 4, 0)
    assert not tb.tiles_inside(b, (1, 25, 37), 4, 4, (-1, 0))
    assert not tb.tiles_inside(b, (1, 25, 37), 4, 4, (0, -1))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(H=st.integers(1, 30), W=st.integers(1, 30), th=st.integers(1, 9), tw=st.integers(1, 9),
       sh=st.integers(1, 9), sw=st.integers(1, 9), oy=st.integers(-3, 3), ox=st.integers(-3, 3),
       seed=st.integers(0, 2**16))
def test_tiles_inside_agrees_with_in_map_cells(H, W, th, tw, sh, sw, oy, ox, seed):
    """The host-side border test from the index bounds says "inside" exactly when no element
    of any tile is off the map."""
    g = torch.Generator().manual_seed(seed)
    Ty, Tx = geometry.grid_shape((H, W), (sh, sw))
    idx = random_indices(g, 1, Ty, Tx, 0.3)
    if len(idx) == 0:
        assert tb.index_bounds(idx) is None and tb.tiles_inside(None, (1, H, W), 1, 1)
        return
    valid = geometry.in_map_cells(idx, (th, tw), (sh, sw), (oy, ox), (H, W))
    inside = tb.tiles_inside(tb.index_bounds(idx), (1, H, W), (th, tw), (sh, sw), (oy, ox))
    assert inside == (valid is None)
    index = tb.tile_index(idx, (1, H, W), (th, tw), (sh, sw), (oy, ox))
    assert (index.valid is None) == inside


def test_gather_at_and_scatter_at_refuse_another_map_or_tile_size():
    idx = torch.tensor([[0, 1, 1]], dtype=torch.int32)
    index = tb.tile_index(idx, (1, 20, 20), 6, 4, -1)
    with pytest.raises(ValueError, match=r"built for a map \(N, H, W\) = \(1, 20, 20\)"):
        tb.gather_at(torch.zeros(1, 3, 20, 24), index)
    with pytest.raises(ValueError, match=r"built for a map"):
        tb.scatter_at(torch.zeros(1, 3, 6, 6), index, torch.zeros(2, 3, 20, 20))
    with pytest.raises(ValueError, match=r"do not match the TileIndex"):
        tb.scatter_at(torch.zeros(1, 3, 4, 4), index, torch.zeros(1, 3, 20, 20))
    with pytest.raises(TypeError, match="TileIndex"):
        tb.gather_at(torch.zeros(1, 3, 20, 20), idx)


@pytest.mark.parametrize("N,H,W,th,tw", [(1, 512, 512, 2, 2), (2, 64, 48, 16, 16),
                                         (1, 30, 20, 3, 5), (1, 8, 8, 1, 1), (3, 12, 8, 4, 2)])
def test_block_max_equals_max_pool(N, H, W, th, tw):
    g = torch.Generator().manual_seed(H + W)
    m = torch.rand(N, H, W, generator=g) * (torch.rand(N, H, W, generator=g) > 0.9)
    m[0, 0, 0] = float("nan")
    m[-1, -1, -1] = -float("inf")
    ref = torch.nn.functional.max_pool2d(m[:, None], (th, tw))[:, 0]
    got = tb.block_max(m, th, tw)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=0, atol=0, equal_nan=True)
    with pytest.raises(ValueError, match="not a multiple"):
        tb.block_max(m[:, :-1], th + 1, tw)


# ---------------------------------------------------------------- public API and backends

def test_public_api_dispatches_to_torch_on_cpu():
    mask = torch.zeros(1, 20, 20)
    mask[0, 3, 17] = 1
    idx, k = sparse.reduce_mask(mask, 8, 8)
    assert idx.tolist() == [[0, 0, 2]] and k == 1
    x = torch.randn(1, 2, 20, 20)
    t = sparse.gather(x, idx, 10, 8, -1, backend="torch")
    assert torch.equal(t, tb.gather(x, idx, 10, 8, -1))
    out = sparse.scatter(t[:, :, 1:9, 1:9], idx, torch.zeros_like(x), 8, inplace=False)
    assert torch.equal(out[:, :, :8, 16:], x[:, :, :8, 16:])
    assert sparse.get_backend("torch", "cpu") is tb
    assert sparse.get_backend("auto", "cpu") is tb


def test_no_cupy_import_at_module_load():
    import subprocess
    code = ("import sys, sparse_detector_ros.sparse as s, torch; "
            "s.reduce_mask(torch.ones(1, 4, 4), 2, 2); "
            "s.get_backend('auto', 'cpu'); print('cupy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=str(__import__('pathlib').Path(__file__).resolve().parents[1]))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_auto_falls_back_with_one_warning(monkeypatch, caplog):
    """On a CUDA device with no usable CuPy backend, auto -> torch with ONE warning."""
    import types
    fake = types.ModuleType("sparse_detector_ros.sparse.cupy_backend")
    fake.available = lambda: False
    monkeypatch.setitem(sys.modules, "sparse_detector_ros.sparse.cupy_backend", fake)
    ops.reset_backend_cache()
    try:
        with caplog.at_level(logging.WARNING, logger="sparse_detector_ros.sparse"):
            for _ in range(3):
                assert sparse.get_backend("auto", "cuda") is tb
        warnings = [r for r in caplog.records if r.name == "sparse_detector_ros.sparse"]
        assert len(warnings) == 1 and "torch" in warnings[0].getMessage()
        with pytest.raises(RuntimeError):
            sparse.get_backend("cupy", "cuda")
        with pytest.raises(RuntimeError):
            sparse.get_backend("cupy", "cpu")
        fake.available = lambda: True
        ops.reset_backend_cache()
        assert sparse.get_backend("auto", "cuda") is fake
        assert sparse.get_backend("cupy", "cuda") is fake
        assert sparse.get_backend("auto", "cpu") is tb
    finally:
        ops.reset_backend_cache()
    with pytest.raises(ValueError):
        sparse.get_backend("numba", "cpu")


def test_auto_without_a_device_and_without_a_gpu_warns_once(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ops.reset_backend_cache()
    try:
        with caplog.at_level(logging.WARNING, logger="sparse_detector_ros.sparse"):
            assert sparse.get_backend("auto") is tb
            assert sparse.get_backend("auto") is tb
            assert sparse.get_backend("auto", "cpu") is tb
        msgs = [r.getMessage() for r in caplog.records if r.name == "sparse_detector_ros.sparse"]
        assert len(msgs) == 1 and "no CUDA GPU" in msgs[0]
    finally:
        ops.reset_backend_cache()


def test_auto_falls_back_on_import_error(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "sparse_detector_ros.sparse.cupy_backend", None)  # ImportError
    ops.reset_backend_cache()
    try:
        with caplog.at_level(logging.WARNING, logger="sparse_detector_ros.sparse"):
            assert sparse.get_backend("auto", torch.device("cuda", 0)) is tb
        assert sum(r.name == "sparse_detector_ros.sparse" for r in caplog.records) == 1
    finally:
        ops.reset_backend_cache()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torch_backend_on_cuda_matches_cpu():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 37, 29, generator=g)
    mask = (torch.rand(2, 37, 29, generator=g) > 0.9).float()
    idx, k = tb.reduce_mask(mask, 8, 8)
    idx_c, k_c = tb.reduce_mask(mask.cuda(), 8, 8)
    assert k == k_c and torch.equal(idx, idx_c.cpu())
    t = tb.gather(x, idx, 10, 8, -1)
    torch.testing.assert_close(tb.gather(x.cuda(), idx_c, 10, 8, -1).cpu(), t)
    out = tb.scatter(t[:, :, 1:9, 1:9], idx, x.clone(), 8, add=True)
    out_c = tb.scatter(t.cuda()[:, :, 1:9, 1:9], idx_c, x.cuda(), 8, add=True)
    torch.testing.assert_close(out_c.cpu(), out)


def test_out_of_range_tile_indices_read_zero_and_write_nothing():
    """Rows with a batch index outside [0, N) or tiles wholly off the map (negative ty/tx
    included) read as zeros and are dropped by scatter, as in the CuPy kernels."""
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8) + 1
    idx = torch.tensor([[0, -1, 0], [1, 0, -1], [2, 0, 0], [-1, 0, 0], [1, 1, 1]],
                       dtype=torch.int32)
    tiles = tb.gather(x, idx, 4, 4, 0)
    assert torch.count_nonzero(tiles[:4]) == 0
    assert torch.equal(tiles[4], x[1, :, 4:8, 4:8])
    base = torch.zeros_like(x)
    tb.scatter(torch.ones(5, 3, 4, 4), idx, base, 4, 0, add=True)
    expect = torch.zeros_like(x)
    expect[1, :, 4:8, 4:8] = 1
    assert torch.equal(base, expect)


# ---------------------------------------------------------------- shared geometry module

@pytest.mark.parametrize("hw,k,s,p,d", [((37, 53), 3, 2, 1, 1), ((37, 53), 2, 2, 0, 1),
                                        ((5, 4), 1, 2, 1, 1), ((45, 19), (3, 2), (2, 1),
                                                               (1, 0), 1),
                                        ((16, 16), 3, 3, 2, 2), ((3, 3), 3, 1, 0, 1)])
def test_conv_output_size_matches_torch(hw, k, s, p, d):
    y = torch.nn.functional.conv2d(torch.zeros(1, 1, *hw), torch.zeros(1, 1, *geometry.pair(k)),
                                   stride=s, padding=p, dilation=d)
    assert geometry.conv_output_size(hw, k, s, p, d) == tuple(y.shape[-2:])


def test_conv_output_size_rejects_a_map_smaller_than_the_kernel():
    with pytest.raises(ValueError, match="smaller than the kernel"):
        geometry.conv_output_size((2, 9), 5, 2, 1)


def test_in_map_cells():
    idx = torch.tensor([[0, 0, 0], [0, 1, 2], [1, 2, 1]], dtype=torch.int32)
    valid = geometry.in_map_cells(idx, (6, 5), 4, (-1, -2), (10, 11))
    assert valid.shape == (3, 6, 5) and valid.dtype == torch.bool
    for k, (_, ty, tx) in enumerate(idx.tolist()):
        for i in range(6):
            for j in range(5):
                r, c = ty * 4 - 1 + i, tx * 4 - 2 + j
                assert bool(valid[k, i, j]) == (0 <= r < 10 and 0 <= c < 11)
    assert geometry.in_map_cells(torch.tensor([[0, 1, 1]]), 4, 4, 0, (12, 12)) is None


def test_geometry_checks_name_the_argument():
    with pytest.raises(ValueError, match="tile must be >= 1"):
        geometry.check_geometry(0, 1, 0)
    with pytest.raises(ValueError, match="stride must be an int or an"):
        geometry.check_geometry(1, "x", 0)
    with pytest.raises(ValueError, match="indices must be"):
        geometry.check_indices(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="layout must be"):
        geometry.check_layout("NWHC")
    with pytest.raises(TypeError, match="mask must be a float tensor"):
        geometry.reduce_mask_geometry(torch.zeros(1, 4, 4, dtype=torch.int32), 2, 2, 0, "max")


def _private_cross_module_uses(path: Path) -> list[str]:
    """``from .x import _name`` and ``module._name`` (module bound by an import) in a file."""
    tree = ast.parse(path.read_text())
    modules, found = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            for a in node.names:
                if a.name.startswith("_"):
                    found.append(f"{path.name}:{node.lineno} imports {a.name}")
                modules.add(a.asname or a.name)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in modules and node.attr.startswith("_")
                and not node.attr.startswith("__")):
            found.append(f"{path.name}:{node.lineno} uses {node.value.id}.{node.attr}")
    return found


def test_no_private_names_across_sparse_modules():
    """The backends and blocks share checks through the public geometry module, not through
    each other's private names (the tests of the sparse package keep to public names too)."""
    files = sorted(SPARSE_DIR.glob("*.py")) + [
        Path(__file__).resolve().parent / f for f in (
            "test_sparse_ops.py", "test_sparse_block.py", "test_kernels_emulated.py",
            "test_kernels_nvrtc.py")]
    found = [u for f in files for u in _private_cross_module_uses(f)]
    # CuPy's own compiler internals are the subject of the NVRTC options check
    found = [u for u in found if "compiler._get_max_compute_capability" not in u]
    assert not found, found
