"""The project's central test: the sparse residual block equals x + tilemask * F(x)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings, strategies as st

from sparse_detector_ros.config import SparseConfig
from sparse_detector_ros.sparse import (SparseResidualBlock, basic_branch, bottleneck_branch,
                                        fold_bn, receptive_halo, tile_mask)

ATOL = 1e-4


def randomize_bn(branch: nn.Sequential, seed: int) -> nn.Sequential:
    """Non-trivial batch-norm statistics and affine terms (so biases make out-of-map cells
    non-zero: the border handling is really exercised)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in branch:
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.5 + 0.3)
    return branch.eval()


def dilated_branch(c: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c, c, 3, padding=2, dilation=2), nn.ReLU(),
                         nn.Conv2d(c, c, (3, 1), padding=(1, 0)), nn.SiLU(),
                         nn.Conv2d(c, c, 5, padding=2, bias=True))


BRANCHES = {
    "bottleneck": lambda c: bottleneck_branch(c, max(1, c // 2)),
    "basic": lambda c: basic_branch(c),
    "dilated": dilated_branch,
}


def blob_mask(g, N, H, W, frac):
    """BEV-like blobby mask: smoothed noise thresholded at the (1-frac) quantile."""
    noise = torch.rand(N, 1, H // 4 + 2, W // 4 + 2, generator=g)
    sm = torch.nn.functional.interpolate(noise, size=(H, W), mode="bilinear",
                                         align_corners=False)[:, 0]
    if frac <= 0:
        return torch.zeros(N, H, W)
    if frac >= 1:
        return torch.ones(N, H, W)
    q = torch.quantile(sm.flatten(), 1 - frac)
    return (sm > q).float()


def dense_oracle(branch, x, mask, B):
    """x + tilemask * F(x), written out independently of the block."""
    N, _, H, W = x.shape
    Ty, Tx = -(-H // B), -(-W // B)
    tm = torch.zeros(N, Ty, Tx)
    for n in range(N):
        for ty in range(Ty):
            for tx in range(Tx):
                tm[n, ty, tx] = float(mask[n, ty * B:(ty + 1) * B, tx * B:(tx + 1) * B].max() > 0)
    up = tm.repeat_interleave(B, 1).repeat_interleave(B, 2)[:, None, :H, :W]
    with torch.no_grad():
        return x + up * branch(x)


@pytest.mark.parametrize("kind", list(BRANCHES))
@pytest.mark.parametrize("B", [8, 16, 32])
@pytest.mark.parametrize("H,W", [(37, 53), (64, 64), (45, 19)])
@pytest.mark.parametrize("frac", [0.0, 0.15, 0.5, 1.0])
@pytest.mark.parametrize("channels_last", [False, True])
def test_block_equals_dense_reference(kind, B, H, W, frac, channels_last):
    g = torch.Generator().manual_seed(B * 1000 + H * 10 + W + int(frac * 100))
    C = 6
    torch.manual_seed(B + H)
    branch = randomize_bn(BRANCHES[kind](C), B + W)
    block = SparseResidualBlock(branch, tile_size=B, dense_crossover=1.0).eval()
    x = torch.randn(2, C, H, W, generator=g)
    mask = blob_mask(g, 2, H, W, frac)
    ref = dense_oracle(branch, x, mask, B)
    xin = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    with torch.no_grad():
        out = block(xin, mask)
    assert block.last_path == "sparse"
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)
    assert torch.equal(xin, x)  # input untouched
    # the block's own dense reference agrees as well
    with torch.no_grad():
        torch.testing.assert_close(block.dense_reference(x, mask), ref, rtol=0, atol=ATOL)


def test_every_border_tile_and_corner():
    """Only the tiles touching the four borders (and corners) active, odd map size."""
    torch.manual_seed(0)
    C, H, W, B = 5, 41, 35, 8
    branch = randomize_bn(basic_branch(C), 1)
    block = SparseResidualBlock(branch, tile_size=B, dense_crossover=1.0).eval()
    x = torch.randn(1, C, H, W)
    mask = torch.zeros(1, H, W)
    mask[:, 0, :] = mask[:, -1, :] = 1
    mask[:, :, 0] = mask[:, :, -1] = 1
    for cl in (False, True):
        xin = x.contiguous(memory_format=torch.channels_last) if cl else x
        with torch.no_grad():
            out = block(xin, mask)
        torch.testing.assert_close(out, dense_oracle(branch, x, mask, B), rtol=0, atol=ATOL)


def test_map_smaller_than_tile():
    torch.manual_seed(1)
    branch = randomize_bn(bottleneck_branch(4, 3), 2)
    block = SparseResidualBlock(branch, tile_size=32, dense_crossover=1.0).eval()
    x = torch.randn(1, 4, 7, 11)
    mask = torch.zeros(1, 7, 11)
    mask[0, 3, 5] = 1
    with torch.no_grad():
        torch.testing.assert_close(block(x, mask), dense_oracle(branch, x, mask, 32), atol=ATOL,
                                   rtol=0)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(H=st.integers(5, 48), W=st.integers(5, 48), B=st.integers(4, 20),
       kind=st.sampled_from(list(BRANCHES)), frac=st.floats(0, 1), seed=st.integers(0, 10**6),
       cl=st.booleans())
def test_block_hypothesis(H, W, B, kind, frac, seed, cl):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    branch = randomize_bn(BRANCHES[kind](4), seed)
    block = SparseResidualBlock(branch, tile_size=B, dense_crossover=1.0).eval()
    x = torch.randn(1, 4, H, W, generator=g)
    mask = (torch.rand(1, H, W, generator=g) < frac * 0.05).float()
    xin = x.contiguous(memory_format=torch.channels_last) if cl else x
    with torch.no_grad():
        out = block(xin, mask)
    torch.testing.assert_close(out, dense_oracle(branch, x, mask, B), rtol=0, atol=ATOL)


def test_dense_crossover_switch_gives_same_result():
    torch.manual_seed(2)
    C, H, W, B = 8, 48, 40, 8
    branch = randomize_bn(bottleneck_branch(C), 3)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, C, H, W, generator=g)
    for frac in (0.3, 0.8, 1.0):
        mask = blob_mask(g, 1, H, W, frac)
        ref = dense_oracle(branch, x, mask, B)
        sparse = SparseResidualBlock(branch, B, dense_crossover=1.0).eval()
        dense = SparseResidualBlock(branch, B, dense_crossover=0.0).eval()
        with torch.no_grad():
            a, b = sparse(x, mask), dense(x, mask)
        assert sparse.last_path == "sparse" and dense.last_path == "dense"
        torch.testing.assert_close(a, ref, rtol=0, atol=ATOL)
        torch.testing.assert_close(b, ref, rtol=0, atol=ATOL)
    # default crossover 0.6: 100 % active runs dense, a few tiles run sparse
    blk = SparseResidualBlock.from_config(branch, SparseConfig(backend="torch")).eval()
    with torch.no_grad():
        blk(x, torch.ones(1, H, W))
        assert blk.last_path == "dense" and blk.last_active_fraction == 1.0
        few = torch.zeros(1, H, W)
        few[0, 20:30, 5:12] = 1
        blk(x, few)
        assert blk.last_path == "sparse"


@pytest.mark.parametrize("crossover", [0.0, 1.0])
def test_inplace(crossover):
    torch.manual_seed(3)
    branch = randomize_bn(basic_branch(4), 4)
    block = SparseResidualBlock(branch, 8, dense_crossover=crossover).eval()
    x = torch.randn(1, 4, 30, 30).contiguous(memory_format=torch.channels_last)
    mask = torch.zeros(1, 30, 30)
    mask[0, 10:20, 3:9] = 1
    ref = dense_oracle(branch, x, mask, 8)
    with torch.no_grad():
        out = block(x, mask, inplace=True)
    assert out.data_ptr() == x.data_ptr()
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)


def test_output_keeps_memory_format():
    branch = randomize_bn(bottleneck_branch(8), 0)
    block = SparseResidualBlock(branch, 8, dense_crossover=1.0).eval()
    x = torch.randn(1, 8, 24, 24).contiguous(memory_format=torch.channels_last)
    mask = torch.zeros(1, 24, 24)
    mask[0, :5, :5] = 1
    with torch.no_grad():
        assert block(x, mask).is_contiguous(memory_format=torch.channels_last)
        assert block(x.contiguous(), mask).is_contiguous()


@pytest.mark.parametrize("kind", list(BRANCHES))
def test_fold_bn_matches_eval_branch(kind):
    torch.manual_seed(4)
    branch = randomize_bn(BRANCHES[kind](6), 9)
    folded = fold_bn(branch)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded) or kind == "dilated"
    x = torch.randn(2, 6, 21, 17)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), branch(x), rtol=1e-5, atol=1e-5)
    assert branch[0].weight is not folded[0].weight  # a copy; the original is unchanged


def test_fused_block_equals_reference():
    torch.manual_seed(5)
    C, H, W, B = 16, 50, 50, 16
    branch = randomize_bn(bottleneck_branch(C), 6)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, C, H, W, generator=g)
    mask = blob_mask(g, 1, H, W, 0.2)
    ref = dense_oracle(branch, x, mask, B)
    block = SparseResidualBlock(branch, B, dense_crossover=1.0).fuse()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in block.branch)
    with torch.inference_mode():
        out = block(x.contiguous(memory_format=torch.channels_last), mask)
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)


def test_receptive_halo():
    assert receptive_halo(bottleneck_branch(8)) == (1, 1)
    assert receptive_halo(basic_branch(8)) == (2, 2)
    assert receptive_halo(dilated_branch(4)) == (2 + 1 + 2, 2 + 0 + 2)


def test_rejects_unsupported_branches():
    with pytest.raises(ValueError):
        SparseResidualBlock(nn.Sequential(nn.Conv2d(4, 4, 3, stride=2, padding=1)))
    with pytest.raises(ValueError):
        SparseResidualBlock(nn.Sequential(nn.Conv2d(4, 4, 3, padding=0)))
    with pytest.raises(ValueError):
        SparseResidualBlock(nn.Sequential(nn.Conv2d(4, 4, 2, padding=1)))
    with pytest.raises(TypeError):
        SparseResidualBlock(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.MaxPool2d(2)))
    with pytest.raises(ValueError):
        SparseResidualBlock(nn.Sequential(nn.ReLU()))


def test_training_mode_uses_dense_reference_and_sparse_path_is_differentiable():
    torch.manual_seed(6)
    C, H, W, B = 4, 20, 20, 8
    branch = randomize_bn(bottleneck_branch(C), 7)
    block = SparseResidualBlock(branch, B, dense_crossover=1.0)
    x = torch.randn(2, C, H, W)
    mask = torch.zeros(2, H, W)
    mask[0, 2:5, 15:19] = 1
    mask[1, 12, 1] = 1
    block.train()
    out = block(x, mask)
    assert block.last_path == "dense_reference"
    out.sum().backward()
    # eval mode: gradients of the sparse path equal those of the dense reference
    block.eval()
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    block(xa, mask).square().sum().backward()
    assert block.last_path == "sparse"
    block.dense_reference(xb, mask).square().sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-4)


def test_tile_mask():
    idx = torch.tensor([[0, 0, 1], [1, 2, 0]], dtype=torch.int32)
    tm = tile_mask(idx, (2, 10, 7), 4)
    assert tm.shape == (2, 1, 10, 7)
    assert tm[0, 0, :4, 4:].eq(1).all() and tm[0].sum() == 4 * 3
    assert tm[1, 0, 8:, :4].eq(1).all() and tm[1].sum() == 2 * 4


@pytest.mark.parametrize("kind", ["bottleneck", "dilated"])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("B", [4, 8])
@pytest.mark.parametrize("channels_last", [False, True])
def test_chunked_tiles_equal_reference(kind, inplace, B, channels_last):
    """Tiny chunks (1-3 tiles): in place, a chunk's result must not be added into x before
    the tiles whose halo reads it (up to ceil(h / B) tile rows later) have been gathered."""
    torch.manual_seed(7)
    C, H, W = 4, 29, 35
    branch = randomize_bn(BRANCHES[kind](C), 8)
    g = torch.Generator().manual_seed(B)
    x = torch.randn(2, C, H, W, generator=g)
    mask = (torch.rand(2, H, W, generator=g) > 0.97).float()
    ref = dense_oracle(branch, x, mask, B)
    hy, hx = receptive_halo(branch)
    per_tile = C * (B + 2 * hy) * (B + 2 * hx) * 4
    for tiles_per_chunk in (1, 3):
        block = SparseResidualBlock(branch, B, dense_crossover=1.0,
                                    chunk_bytes=per_tile * tiles_per_chunk).eval()
        xin = x.contiguous(memory_format=torch.channels_last) if channels_last else x.clone()
        with torch.no_grad():
            out = block(xin, mask, inplace=inplace)
        torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)


def test_shared_active_tiles_across_blocks():
    """A stage computes reduce_mask once and passes it to each of its blocks."""
    torch.manual_seed(9)
    C, H, W, B = 6, 33, 40, 8
    b1 = SparseResidualBlock(randomize_bn(bottleneck_branch(C), 1), B, dense_crossover=1.0).eval()
    b2 = SparseResidualBlock(randomize_bn(basic_branch(C), 2), B, dense_crossover=1.0).eval()
    x = torch.randn(1, C, H, W)
    mask = torch.zeros(1, H, W)
    mask[0, 5:20, 30:] = 1
    tiles = b1.active_tiles(mask)
    with torch.no_grad():
        shared = b2(b1(x, mask, tiles=tiles), mask, tiles=tiles)
        ref = dense_oracle(b2.branch, dense_oracle(b1.branch, x, mask, B), mask, B)
    torch.testing.assert_close(shared, ref, rtol=0, atol=ATOL)
