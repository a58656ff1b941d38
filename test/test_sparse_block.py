"""The project's central test: the sparse residual block equals x + tilemask * F(x), and the
sparse strided conv equals tilemask_out * layers(x), on every active tile."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings, strategies as st

from sparse_detector_ros.config import SparseConfig
from sparse_detector_ros.sparse import (SparseResidualBlock, SparseStridedConv, basic_branch,
                                        bottleneck_branch, downsample_branch, downsample_mask,
                                        fold_bn, preact_basic_branch, preact_bottleneck_branch,
                                        receptive_halo, tile_mask)
from sparse_detector_ros.sparse.blocks import POINTWISE, ZERO_PRESERVING

ATOL = 1e-4
STRIDED_ATOL = 1e-5


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


def sigmoid_first_branch(c: int) -> nn.Sequential:
    """Sigmoid(0) = 0.5 before the first conv: off-map cells of the gathered stack must be
    zeroed again before it. Grouped, dilated even-kernel (span 3) and 1x1-with-bias convs."""
    return nn.Sequential(nn.Sigmoid(), nn.Conv2d(c, c, 2, padding=1, dilation=2, groups=2),
                         nn.BatchNorm2d(c), nn.Tanh(), nn.Conv2d(c, c, 3, padding=1))


def bias_first_branch(c: int) -> nn.Sequential:
    """A 1x1 conv with bias (and a zero-preserving ReLU) before the first spatial conv."""
    return nn.Sequential(nn.Conv2d(c, c, 1, bias=True), nn.ReLU(),
                         nn.Conv2d(c, c, 3, padding=1, bias=False))


BRANCHES = {
    "bottleneck": lambda c: bottleneck_branch(c, max(1, c // 2)),
    "basic": lambda c: basic_branch(c),
    "dilated": dilated_branch,
    "preact_bottleneck": lambda c: preact_bottleneck_branch(c, max(1, c // 2)),
    "preact_basic": lambda c: preact_basic_branch(c),
    "sigmoid_first": sigmoid_first_branch,
    "bias_first": bias_first_branch,
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


@pytest.mark.parametrize("kind", list(BRANCHES))
def test_every_border_tile_and_corner(kind):
    """Only the tiles touching the four borders (and corners) active, odd map size."""
    torch.manual_seed(0)
    C, H, W, B = 6, 41, 35, 8
    branch = randomize_bn(BRANCHES[kind](C), 1)
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


DEFAULTED = ("tile_size", "threshold", "pooling", "dense_crossover", "backend")


@pytest.mark.parametrize("make", [lambda: SparseResidualBlock(bottleneck_branch(4)),
                                  lambda: SparseStridedConv(downsample_branch(4, 6))],
                         ids=["residual", "strided"])
def test_defaults_are_the_sparse_config_defaults(make):
    """A block built with defaults uses SparseConfig's values (config.py is the one place for
    defaults); from_config passes every field of a non-default config through."""
    cfg = SparseConfig()
    block = make()
    assert {n: getattr(block, n) for n in DEFAULTED} == {n: getattr(cfg, n) for n in DEFAULTED}
    other = SparseConfig(backend="torch", tile_size=8, threshold=0.25, pooling="avg",
                         dense_crossover=0.3)
    built = type(block).from_config(block.branch if hasattr(block, "branch") else block.layers,
                                    other)
    assert {n: getattr(built, n) for n in DEFAULTED} == {n: getattr(other, n) for n in DEFAULTED}


def _tiles_around(crossover: float, total: int) -> tuple[int, int]:
    """Active-tile counts just at / below the crossover and just above it."""
    below = max(k for k in range(total + 1) if k / total <= crossover)
    return below, min(below + 1, total)


@pytest.mark.parametrize("kind", ["residual", "strided"])
def test_default_crossover_switches_paths_just_above_it(kind):
    """With the default crossover c, an active fraction <= c runs sparse and the next tile more
    (> c) runs dense; both equal the dense-masked oracle."""
    torch.manual_seed(11)
    cfg = SparseConfig()
    B, C, Ty, Tx = cfg.tile_size, 4, 10, 10          # 100 output tiles of the default size
    if kind == "residual":
        branch = randomize_bn(bottleneck_branch(C), 12)
        block = SparseResidualBlock(branch, backend="torch").eval()
        s = 1
    else:
        layers = randomize_bn(downsample_branch(C, C), 12)
        block = SparseStridedConv(layers, backend="torch").eval()
        s = 2
    assert block.dense_crossover == cfg.dense_crossover
    H, W = Ty * B * s, Tx * B * s
    x = torch.randn(1, C, H, W)
    total = Ty * Tx
    below, above = _tiles_around(block.dense_crossover, total)
    cases = [(below, "sparse")] + ([(above, "dense")] if below < total else [])
    for k, path in cases:
        mask = torch.zeros(1, H, W)
        for t in range(k):                            # one cell in each of the first k tiles
            mask[0, (t // Tx) * B * s + 3, (t % Tx) * B * s + 5] = 1
        with torch.no_grad():
            out = block(x, mask)
            ref = block.dense_reference(x, mask)
        assert block.last_path == path, (k, total, block.dense_crossover)
        assert block.last_active_fraction == k / total
        torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)


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
    # every BN that follows a conv is folded; a BN before a conv (pre-activation) stays
    layers = list(branch)
    leading = sum(isinstance(m, nn.BatchNorm2d) and (i == 0 or not isinstance(layers[i - 1],
                                                                               nn.Conv2d))
                  for i, m in enumerate(layers))
    assert sum(isinstance(m, nn.BatchNorm2d) for m in folded) == leading
    x = torch.randn(2, 6, 21, 17)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), branch(x), rtol=1e-5, atol=1e-5)
    # a copy; the original is unchanged
    assert not {id(p) for p in branch.parameters()} & {id(p) for p in folded.parameters()}


@pytest.mark.parametrize("kind", ["bottleneck", "preact_basic", "preact_bottleneck"])
def test_fused_block_equals_reference(kind):
    """Folded batch norm (biases everywhere, a leading BN kept in the pre-activation forms)
    still gives the dense result on border tiles."""
    torch.manual_seed(5)
    C, H, W, B = 16, 50, 50, 16
    branch = randomize_bn(BRANCHES[kind](C), 6)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, C, H, W, generator=g)
    mask = blob_mask(g, 1, H, W, 0.2)
    mask[0, 0, :] = mask[0, -1, :] = mask[0, :, 0] = mask[0, :, -1] = 1
    ref = dense_oracle(branch, x, mask, B)
    block = SparseResidualBlock(branch, B, dense_crossover=1.0).fuse()
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in block.branch)
    assert n_bn == (1 if kind.startswith("preact") else 0)
    with torch.inference_mode():
        out = block(x.contiguous(memory_format=torch.channels_last), mask)
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)


def test_receptive_halo():
    assert receptive_halo(bottleneck_branch(8)) == (1, 1)
    assert receptive_halo(basic_branch(8)) == (2, 2)
    assert receptive_halo(dilated_branch(4)) == (2 + 1 + 2, 2 + 0 + 2)


class _ScaledConv(nn.Conv2d):
    """A Conv2d subclass whose forward differs from F.conv2d on its weights."""

    def forward(self, x):
        return 2 * super().forward(x)


def _conv(**kw):
    return nn.Conv2d(4, 4, kw.pop("k", 3), **{"padding": 1, **kw})


@pytest.mark.parametrize("layers,error,match", [
    ([_conv(stride=2)], ValueError, r"layer 0 \(Conv2d.*stride \(2, 2\).*SparseStridedConv"),
    ([_conv(padding=0)], ValueError, r"layer 0 .*'same' padding \(1, 1\)"),
    ([_conv(k=2)], ValueError, r"layer 0 .*even effective kernel \(2, 2\)"),
    ([_conv(padding_mode="reflect")], ValueError, r"layer 0 .*padding_mode='reflect'"),
    ([_conv(), nn.MaxPool2d(2)], TypeError, r"layer 1 \(MaxPool2d"),
    ([_conv(), nn.GroupNorm(2, 4)], TypeError, r"layer 1 \(GroupNorm"),
    ([nn.BatchNorm2d(4, track_running_stats=False), _conv()], ValueError,
     r"layer 0 \(BatchNorm2d.*running statistics"),
    ([nn.ReLU(inplace=True), _conv()], ValueError, r"layer 0 \(ReLU\(inplace=True\)\).*in place"),
    ([nn.Identity(), nn.ReLU(inplace=True), _conv()], ValueError, r"layer 1 .*in place"),
    ([_ScaledConv(4, 4, 3, padding=1)], TypeError, r"layer 0 \(_ScaledConv"),
    ([nn.Conv2d(4, 8, 3, padding=1)], ValueError, r"4 channels to 8"),
    ([_conv(), nn.BatchNorm2d(3)], ValueError,
     r"layer 1 \(BatchNorm2d\(3.*takes 3 channels but gets 4"),
    ([nn.ReLU()], ValueError, r"no nn.Conv2d"),
], ids=["stride", "no-padding", "even-kernel", "reflect", "maxpool", "groupnorm", "bn-batch-stats",
        "inplace-first", "inplace-after-identity", "conv-subclass", "channels", "bn-channels",
        "no-conv"])
def test_rejects_unsupported_branches_naming_the_layer(layers, error, match):
    with pytest.raises(error, match=match):
        SparseResidualBlock(nn.Sequential(*layers))


def test_accepts_in_place_activations_after_the_first_layer():
    """BN -> ReLU(inplace) works on BN's fresh output: x stays untouched on both paths."""
    branch = randomize_bn(preact_basic_branch(4), 3)
    x = torch.randn(1, 4, 20, 20)
    x0 = x.clone()
    mask = torch.ones(1, 20, 20)
    for crossover in (0.0, 1.0):
        with torch.no_grad():
            SparseResidualBlock(branch, 8, dense_crossover=crossover).eval()(x, mask)
        assert torch.equal(x, x0)


def test_zero_preserving_layers_map_zero_to_zero():
    """The zeroing before a conv is skipped after these layers: f(0) must be exactly 0. (Those
    left out, e.g. Sigmoid and BatchNorm with a shift, are exercised by the branches above.)"""
    assert set(ZERO_PRESERVING) <= set(POINTWISE)
    z = torch.zeros(1, 1, 3, 3)
    for cls in ZERO_PRESERVING:
        assert torch.equal(cls()(z), z), cls.__name__
    assert not torch.equal(nn.Sigmoid()(z), z)


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


# --------------------------------------------------------------------------------------------
# the sparse strided (downsampling) conv: tilemask_out * layers(x) on active output tiles
# --------------------------------------------------------------------------------------------

def _strided(ci, co, *layers_after, **conv):
    return nn.Sequential(nn.Conv2d(ci, co, **conv), *layers_after)


STRIDED = {
    "3x3_s2": lambda ci, co: downsample_branch(ci, co, 3, 2),
    "2x2_s2": lambda ci, co: downsample_branch(ci, co, 2, 2),
    "1x1_s2_bias": lambda ci, co: _strided(ci, co, nn.BatchNorm2d(co), kernel_size=1, stride=2),
    "3x3_s2_dil2": lambda ci, co: _strided(ci, co, nn.BatchNorm2d(co), nn.SiLU(), kernel_size=3,
                                          stride=2, padding=2, dilation=2),
    "3x3_s3": lambda ci, co: _strided(ci, co, nn.ReLU(), kernel_size=3, stride=3, padding=1),
    "asym_grouped": lambda ci, co: _strided(ci, co, nn.BatchNorm2d(co), nn.ReLU(),
                                            kernel_size=(3, 2), stride=(2, 1), padding=(1, 0),
                                            groups=2, bias=False),
    # pre-activation: BN with a shift and Sigmoid before the conv make off-map cells non-zero
    "preact_3x3_s2": lambda ci, co: nn.Sequential(
        nn.BatchNorm2d(ci), nn.Sigmoid(), nn.Conv2d(ci, co, 3, 2, 1), nn.BatchNorm2d(co),
        nn.ReLU()),
}


def strided_oracle(layers, x, mask, B):
    """tilemask_out * layers(x) with layers run densely (zero padding) and the output tile mask
    written out with loops: output tile (ty, tx) is active iff the input mask has a cell > 0
    among the input cells [r*s, r*s + s) of its output cells r (per axis)."""
    with torch.no_grad():
        y = layers(x)
    conv = next(m for m in layers if isinstance(m, nn.Conv2d))
    sy, sx = conv.stride
    N, _, Ho, Wo = y.shape
    tm = torch.zeros(N, 1, -(-Ho // B) * B, -(-Wo // B) * B)
    for n in range(N):
        for ty in range(-(-Ho // B)):
            for tx in range(-(-Wo // B)):
                win = mask[n, ty * B * sy:min(ty * B + B, Ho) * sy,
                           tx * B * sx:min(tx * B + B, Wo) * sx]
                if win.numel() and float(win.max()) > 0:
                    tm[n, :, ty * B:(ty + 1) * B, tx * B:(tx + 1) * B] = 1
    return tm[:, :, :Ho, :Wo] * y


def _run_strided(kind, B, H, W, mask, x, channels_last, seed, **kw):
    torch.manual_seed(seed)
    layers = randomize_bn(STRIDED[kind](x.shape[1], 8), seed)
    block = SparseStridedConv(layers, tile_size=B, dense_crossover=1.0, **kw).eval()
    xin = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    with torch.no_grad():
        out = block(xin, mask)
    assert block.last_path == "sparse"
    return block, xin, out, strided_oracle(layers, x, mask, B)


@pytest.mark.parametrize("kind", list(STRIDED))
@pytest.mark.parametrize("B", [4, 8])
@pytest.mark.parametrize("H,W", [(37, 53), (45, 19), (32, 32)])
@pytest.mark.parametrize("frac", [0.0, 0.25, 1.0])
@pytest.mark.parametrize("channels_last", [False, True])
def test_strided_equals_dense_conv_on_active_tiles(kind, B, H, W, frac, channels_last):
    g = torch.Generator().manual_seed(B * 1000 + H * 10 + W + int(frac * 100))
    x = torch.randn(2, 6, H, W, generator=g)
    mask = blob_mask(g, 2, H, W, frac)
    block, xin, out, ref = _run_strided(kind, B, H, W, mask, x, channels_last, H + W)
    assert out.shape == ref.shape
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last
                             else torch.contiguous_format)
    torch.testing.assert_close(out, ref, rtol=0, atol=STRIDED_ATOL)
    assert torch.equal(xin, x)  # input untouched
    with torch.no_grad():
        torch.testing.assert_close(block.dense_reference(x, mask), ref, rtol=0, atol=STRIDED_ATOL)


@pytest.mark.parametrize("kind", list(STRIDED))
def test_strided_every_border_tile_and_corner(kind):
    """Only output tiles on the four borders active (odd map sizes: the last output tile is cut
    by the map, and its input window hangs over the bottom / right border)."""
    H, W, B = 43, 37, 4
    x = torch.randn(1, 6, H, W)
    mask = torch.zeros(1, H, W)
    mask[:, 0, :] = mask[:, -1, :] = mask[:, :, 0] = mask[:, :, -1] = 1
    for cl in (False, True):
        _, _, out, ref = _run_strided(kind, B, H, W, mask, x, cl, 7)
        torch.testing.assert_close(out, ref, rtol=0, atol=STRIDED_ATOL)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(H=st.integers(3, 40), W=st.integers(3, 40), B=st.integers(1, 9),
       kind=st.sampled_from(list(STRIDED)), density=st.floats(0, 0.1),
       seed=st.integers(0, 10**6), cl=st.booleans())
def test_strided_hypothesis(H, W, B, kind, density, seed, cl):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 6, H, W, generator=g)
    mask = (torch.rand(1, H, W, generator=g) < density).float()
    _, _, out, ref = _run_strided(kind, B, H, W, mask, x, cl, seed)
    torch.testing.assert_close(out, ref, rtol=0, atol=STRIDED_ATOL)


@pytest.mark.parametrize("chunk_tiles", [1, 3])
def test_strided_chunks_dense_path_and_fuse_agree(chunk_tiles):
    """Chunked sparse path, the dense path above the crossover and the fused (BN folded) module
    give the same masked map."""
    torch.manual_seed(13)
    C, H, W, B = 6, 41, 29, 4
    layers = randomize_bn(STRIDED["preact_3x3_s2"](C, 8), 14)
    g = torch.Generator().manual_seed(15)
    x = torch.randn(2, C, H, W, generator=g)
    mask = blob_mask(g, 2, H, W, 0.3)
    ref = strided_oracle(layers, x, mask, B)
    per_tile = C * (2 * B + 1) ** 2 * 4
    chunked = SparseStridedConv(layers, B, dense_crossover=1.0,
                                chunk_bytes=per_tile * chunk_tiles).eval()
    dense = SparseStridedConv(layers, B, dense_crossover=0.0).eval()
    fused = SparseStridedConv(layers, B, dense_crossover=1.0).fuse()
    assert sum(isinstance(m, nn.BatchNorm2d) for m in fused.layers) == 1  # the leading one
    with torch.no_grad():
        for block in (chunked, dense, fused):
            out = block(x.contiguous(memory_format=torch.channels_last), mask)
            torch.testing.assert_close(out, ref, rtol=0, atol=STRIDED_ATOL)
    assert (chunked.last_path, dense.last_path, fused.last_path) == ("sparse", "dense", "sparse")


def test_strided_training_mode_and_gradients():
    torch.manual_seed(16)
    C, H, W, B = 4, 23, 19, 4
    block = SparseStridedConv(randomize_bn(downsample_branch(C, 6), 17), B, dense_crossover=1.0)
    x = torch.randn(2, C, H, W)
    mask = torch.zeros(2, H, W)
    mask[0, 0:3, 15:19] = 1
    mask[1, 20, 1] = 1
    block.train()
    out = block(x, mask)
    assert block.last_path == "dense_reference" and out.shape == (2, 6, 12, 10)
    out.sum().backward()
    block.eval()
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    block(xa, mask).square().sum().backward()
    assert block.last_path == "sparse"
    block.dense_reference(xb, mask).square().sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-5)


def test_downsample_mask_and_next_stage_tiles():
    """downsample_mask is the max over each output cell's s x s input cells (0 off the map);
    the strided conv's active tiles are the next stage's tiles on that mask."""
    mask = torch.zeros(1, 7, 9)
    mask[0, 6, 8] = 1      # bottom-right corner: output cell (3, 4) of ceil(7/2) x ceil(9/2)
    mask[0, 1, 2] = 0.5
    down = downsample_mask(mask, 2)
    expect = torch.zeros(1, 4, 5)
    expect[0, 3, 4] = 1
    expect[0, 0, 1] = 0.5
    assert torch.equal(down, expect)
    # output size given: cropped (2x2 stride 2 on 7x9 -> 3x4) or zero-padded (1x1 pad 1 -> 5x6)
    assert torch.equal(downsample_mask(mask[:, None], 2, (3, 4)), expect[:, :3, :4])
    padded = downsample_mask(mask, 2, (5, 6))
    assert padded.shape == (1, 5, 6) and torch.equal(padded[:, :4, :5], expect)
    assert padded[:, 4:].eq(0).all() and padded[:, :, 5:].eq(0).all()

    torch.manual_seed(18)
    C, H, W, B = 4, 40, 36, 4
    down_block = SparseStridedConv(randomize_bn(downsample_branch(C, C), 19), B,
                                   dense_crossover=1.0).eval()
    res = SparseResidualBlock(randomize_bn(bottleneck_branch(C), 20), B,
                              dense_crossover=1.0).eval()
    x = torch.randn(1, C, H, W)
    mask = torch.zeros(1, H, W)
    mask[0, 3:9, 20:33] = 1
    mask[0, 39, 0] = 1
    tiles = down_block.active_tiles(mask)
    m2 = down_block.out_mask(mask)
    assert m2.shape == (1, 20, 18)
    idx2, k2, total2 = res.active_tiles(m2)
    assert torch.equal(tiles[0], idx2) and (tiles[1], tiles[2]) == (k2, total2)
    with torch.no_grad():
        y = down_block(x, mask, tiles=tiles)
        out = res(y, m2, tiles=tiles)
        ref = dense_oracle(res.branch, strided_oracle(down_block.layers, x, mask, B), m2, B)
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)


@pytest.mark.parametrize("layers,error,match", [
    ([nn.Conv2d(4, 4, 3, 2, 1), nn.Conv2d(4, 4, 3, 1, 1)], ValueError, r"exactly one nn.Conv2d"),
    ([nn.ReLU()], ValueError, r"exactly one nn.Conv2d"),
    ([nn.Conv2d(4, 4, 3, 2, 1, padding_mode="replicate")], ValueError,
     r"layer 0 .*padding_mode='replicate'"),
    ([nn.Conv2d(4, 4, 3, 2, 1), nn.MaxPool2d(2)], TypeError, r"layer 1 \(MaxPool2d"),
    ([nn.Conv2d(4, 4, 3, 2, 1), nn.BatchNorm2d(3)], ValueError,
     r"layer 1 \(BatchNorm2d\(3.*takes 3 channels but gets 4"),
    ([nn.ReLU(inplace=True), nn.Conv2d(4, 4, 3, 2, 1)], ValueError, r"layer 0 .*in place"),
    ([nn.Conv2d(4, 4, 2, 1, "same")], ValueError, r"layer 0: .*even effective kernel"),
], ids=["two-convs", "no-conv", "replicate", "maxpool", "bn-channels", "inplace-first",
        "same-even"])
def test_strided_rejects_unsupported_layers(layers, error, match):
    with pytest.raises(error, match=match):
        SparseStridedConv(nn.Sequential(*layers))


def test_strided_rejects_bad_inputs():
    block = SparseStridedConv(downsample_branch(4, 4, 3, 2), 4).eval()
    with pytest.raises(ValueError, match="mask shape"):
        block(torch.zeros(1, 4, 10, 10), torch.zeros(1, 5, 5))
    with pytest.raises(ValueError, match="smaller than the kernel"):
        SparseStridedConv(nn.Sequential(nn.Conv2d(4, 4, 5, 2)), 4).eval()(
            torch.zeros(1, 4, 3, 3), torch.ones(1, 3, 3))
    with pytest.raises(ValueError, match="pooling"):
        SparseStridedConv(downsample_branch(4, 4), pooling="min")


# --------------------------------------------------------------------------------------------
# tile plans: a stage's active tiles and the index tensors its modules derive, computed once
# --------------------------------------------------------------------------------------------

def _stage(C=6, B=4, seed=30):
    """A downsampling conv, residual blocks of two different halos (1 and 2) and a stride-1
    3x3 conv, all on the same B x B output tiles."""
    torch.manual_seed(seed)
    down = SparseStridedConv(randomize_bn(downsample_branch(C, C), seed), B,
                             dense_crossover=1.0).eval()
    blocks = [SparseResidualBlock(randomize_bn(make(C), seed + i), B, dense_crossover=1.0).eval()
              for i, make in enumerate((BRANCHES["bottleneck"], BRANCHES["basic"],
                                        BRANCHES["bottleneck"], BRANCHES["preact_basic"]))]
    head = SparseStridedConv(randomize_bn(nn.Sequential(
        nn.Conv2d(C, C, 3, 1, 1), nn.BatchNorm2d(C), nn.ReLU()), seed + 9), B,
        dense_crossover=1.0).eval()
    return down, blocks, head


def _stage_mask(H, W, border: bool):
    mask = torch.zeros(2, H, W)
    mask[0, 18:30, 20:29] = 1
    mask[1, 30:34, 9:12] = 1
    if border:
        mask[0, 0, :] = mask[1, :, -1] = 1
    return mask


def _run_stage(mods, x, mask, inplace, fresh: bool):
    """The stage with one shared plan (``fresh=False``) or with a plain (indices, K, total)
    tuple per module (every module then derives everything again)."""
    down, blocks, head = mods
    plan = down.active_tiles(mask)
    m2 = down.out_mask(mask)
    tiles = (lambda: tuple(down.active_tiles(mask))) if fresh else (lambda: plan)
    with torch.no_grad():
        y = down(x, mask, tiles=tiles())
        for b in blocks:
            y = b(y, m2, inplace=inplace, tiles=tiles())
        return head(y, m2, tiles=tiles())


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("chunk_tiles", [None, 3])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("border", [False, True])
def test_tile_plan_reuse_equals_recomputation(channels_last, chunk_tiles, inplace, border):
    """Modules sharing one plan (its cached gather / scatter positions, validity masks and
    host bounds reused across halos, maps and chunks) give bit for bit what each module
    computing everything from the tile list gives, and what the dense oracles give."""
    C, B, H, W = 6, 4, 46, 38
    down, blocks, head = _stage(C, B)
    if chunk_tiles:   # small chunks: cached positions are sliced per chunk
        for b in blocks:
            hy, hx = b.halo
            b.chunk_bytes = C * (B + 2 * hy) * (B + 2 * hx) * 4 * chunk_tiles
    g = torch.Generator().manual_seed(31)
    x = torch.randn(2, C, H, W, generator=g)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    mask = _stage_mask(H, W, border)
    shared = _run_stage((down, blocks, head), x.clone(), mask, inplace, fresh=False)
    fresh = _run_stage((down, blocks, head), x.clone(), mask, inplace, fresh=True)
    assert torch.equal(shared, fresh)
    m2 = down.out_mask(mask)
    ref = strided_oracle(down.layers, x, mask, B)
    for b in blocks:
        ref = dense_oracle(b.branch, ref, m2, B)
    ref = strided_oracle(head.layers, ref, m2, B)
    torch.testing.assert_close(shared, ref, rtol=0, atol=ATOL)


def test_tile_plan_derives_each_index_once(monkeypatch):
    """A stage sharing a plan reads the index bounds back once and builds each gather /
    scatter position tensor once per geometry and map: the downsampling conv's gather (input
    map), the B x B scatter (shared by every module) and one gather per halo (the halo-1 blocks
    and the 3x3 head conv share theirs). Off-map masks: once per geometry the convs need."""
    import sparse_detector_ros.sparse.plan as plan_mod
    from sparse_detector_ros.sparse import torch_backend as tb
    calls = {"tile_index": 0, "index_bounds": 0, "in_map_cells": 0}

    def counting(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped
    monkeypatch.setattr(tb, "tile_index", counting("tile_index", tb.tile_index))
    monkeypatch.setattr(tb, "index_bounds", counting("index_bounds", tb.index_bounds))
    monkeypatch.setattr(plan_mod, "in_map_cells",
                        counting("in_map_cells", plan_mod.in_map_cells))
    C, B, H, W = 6, 4, 46, 38
    mods = _stage(C, B)
    x = torch.randn(2, C, H, W).contiguous(memory_format=torch.channels_last)
    mask = _stage_mask(H, W, border=True)
    _run_stage(mods, x, mask, True, fresh=False)
    # gathers: down (input map), halo 1 (bottleneck x2, head), halo 2 (basic, preact_basic);
    # scatter: B x B on the output map
    assert calls["tile_index"] == 4
    assert calls["index_bounds"] == 1
    # zeroing before a spatial conv: a 6 x 6 stack at offset -1 (before the bottleneck's 3x3
    # and before the second 3x3 of both basic blocks) and an 8 x 8 stack at offset -2 (before
    # the preact block's first 3x3); the head's and the basic block's first 3x3 read the
    # gather itself
    assert calls["in_map_cells"] == 2
    for k in calls:
        calls[k] = 0
    _run_stage(mods, x, mask, True, fresh=True)      # no sharing: every module on its own
    assert calls["tile_index"] == 2 + 2 * 4 + 2 and calls["index_bounds"] == 6


def test_tile_plan_inside_the_map_needs_no_validity_masks(monkeypatch):
    """When no tile (with its halo) reaches past the border, the host-side check on the
    plan's bounds skips every off-map mask: none is ever built."""
    import sparse_detector_ros.sparse.plan as plan_mod
    from sparse_detector_ros.sparse import geometry

    def refuse(*a, **k):
        raise AssertionError("in_map_cells called for tiles inside the map")
    monkeypatch.setattr(plan_mod, "in_map_cells", refuse)
    C, B, H, W = 6, 4, 46, 38
    down, blocks, head = _stage(C, B)
    x = torch.randn(2, C, H, W).contiguous(memory_format=torch.channels_last)
    mask = _stage_mask(H, W, border=False)
    plan = down.active_tiles(mask)
    out = _run_stage((down, blocks, head), x, mask, True, fresh=False)
    assert out.shape == (2, C, 23, 19)
    for halo in (1, 2):
        t = B + 2 * halo
        assert geometry.in_map_cells(plan.indices, t, B, -halo, (23, 19)) is None
        assert plan.in_map_cells(t, B, -halo, (23, 19)) is None
    # the same plan on a map whose border its tiles do reach
    monkeypatch.undo()
    assert plan.in_map_cells(B + 2, B, -1, (12, 19)) is not None


def test_tile_plan_refused_for_another_map_or_tile_size():
    C, B, H, W = 6, 4, 46, 38
    down, blocks, head = _stage(C, B)
    mask = _stage_mask(H, W, border=True)
    plan = down.active_tiles(mask)          # for the output map (2, 23, 19), 4 x 4 tiles
    assert plan.shape == (2, 23, 19) and plan.tile == (4, 4)
    m2 = down.out_mask(mask)
    y = torch.randn(2, C, 23, 19)
    wider = SparseResidualBlock(randomize_bn(bottleneck_branch(C), 1), 8,
                                dense_crossover=1.0).eval()
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"made for a map .* \(2, 23, 19\) with \(4, 4\) "
                                             r"tiles, not for \(2, 23, 19\) with \(8, 8\)"):
            wider(y, m2, tiles=plan)
        with pytest.raises(ValueError, match=r"not for \(2, 46, 38\)"):   # input resolution
            blocks[0](torch.randn(2, C, H, W), mask, tiles=plan)
        with pytest.raises(ValueError, match=r"not for \(2, 12, 10\)"):   # down's output
            down(y, m2, tiles=plan)
        with pytest.raises(ValueError, match=r"not for \(1, 23, 19\)"):   # another batch
            blocks[0](y[:1], m2[:1], tiles=plan)
        # the right map and tile size: accepted, and so is the plain tuple
        a = blocks[0](y, m2, tiles=plan)
        b = blocks[0](y, m2, tiles=tuple(plan))
    assert torch.equal(a, b)


def test_tile_plan_is_the_active_tiles_tuple():
    """A plan unpacks as (indices, K, total); its dense-path tile mask is the one tile_mask
    computes, built once."""
    C, B, H, W = 6, 4, 46, 38
    down, blocks, _ = _stage(C, B)
    mask = _stage_mask(H, W, border=True)
    plan = down.active_tiles(mask)
    idx, k, total = plan
    assert isinstance(plan, tuple) and len(plan) == 3
    assert (plan.indices is idx, plan.count, plan.total) == (True, k, total) and total == 2 * 6 * 5
    assert torch.equal(idx, blocks[0].active_tiles(down.out_mask(mask)).indices)
    tm = plan.tile_mask(torch.float32)
    assert torch.equal(tm, tile_mask(idx, (2, 23, 19), B)) and plan.tile_mask() is tm
    with pytest.raises(ValueError, match="count 3 does not match"):
        type(plan)(idx, 3, total, (2, 23, 19), B)
    with pytest.raises(ValueError, match=r"TilePlan or an \(indices, K, total\) tuple"):
        blocks[0](torch.randn(2, C, 23, 19), down.out_mask(mask), tiles=(idx, k))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(N=st.integers(1, 2), H=st.integers(1, 40), W=st.integers(1, 40), sh=st.integers(1, 4),
       sw=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_downsample_mask_is_the_clipped_window_max(N, H, W, sh, sw, seed):
    """Divisible maps take the block-max fast path, the others the pooling one: both give the
    max over each output cell's s x s input window clipped to the map (NaN propagates)."""
    g = torch.Generator().manual_seed(seed)
    for h, w in ((H, W), (H * sh, W * sw)):
        m = torch.rand(N, h, w, generator=g) * (torch.rand(N, h, w, generator=g) > 0.7)
        if seed % 3 == 0:
            m[0, h // 2, w // 2] = float("nan")
        got = downsample_mask(m, (sh, sw))
        Ho, Wo = -(-h // sh), -(-w // sw)
        ref = torch.empty(N, Ho, Wo)
        for r in range(Ho):
            for c in range(Wo):
                win = m[:, r * sh:(r + 1) * sh, c * sw:(c + 1) * sw].reshape(N, -1)
                ref[:, r, c] = torch.where(win.isnan().any(1), float("nan"), win.amax(1))
        torch.testing.assert_close(got, ref, rtol=0, atol=0, equal_nan=True)


def test_tile_plan_answers_every_geometry_as_computed_directly():
    """One plan asked, in turn and repeatedly, about several geometries, maps and tile ranges
    answers each exactly as the uncached functions do (the cache tells its entries apart)."""
    from sparse_detector_ros.sparse import geometry, torch_backend as tb
    mask = _stage_mask(46, 38, border=True)
    down, _, _ = _stage()
    plan = down.active_tiles(mask)
    idx = plan.indices
    queries = [(6, 4, -1, (23, 19), 0, None), (6, 4, 0, (23, 19), 0, None),
               (8, 4, -2, (23, 19), 0, None), (6, 4, -1, (23, 19), 2, 5),
               (6, 4, -1, (40, 40), 0, None), ((9, 9), (8, 8), (-1, -1), (46, 38), 1, 4),
               (4, 4, 0, (23, 19), 0, None)]
    for _ in range(2):
        for tile, stride, offset, hw, start, stop in queries:
            got = plan.in_map_cells(tile, stride, offset, hw, None, start, stop)
            ref = geometry.in_map_cells(idx[start:stop], tile, stride, offset, hw)
            if ref is None:   # the plan may answer for all its tiles: all in the map as well
                assert got is None or bool(got.all())
            else:
                assert got is not None and torch.equal(got, ref)
            got = plan.tile_index(tile, stride, offset, (2,) + hw, None, start, stop)
            ref = tb.tile_index(idx[start:stop], (2,) + hw, tile, stride, offset)
            assert torch.equal(got.flat, ref.flat)
            if ref.valid is None:
                assert got.valid is None or bool(got.valid.all())
            else:
                assert torch.equal(got.valid, ref.valid)
