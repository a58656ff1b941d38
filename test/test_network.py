"""The detector network end to end: the sparse network's head outputs equal the dense network's
on every output cell whose receptive field lies inside the active tiles (the SBNet contract
through stem, residual stages, downsampling, neck and head)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparse_detector_ros.config import GridConfig, SparseConfig
from sparse_detector_ros.model import ModelDescription
from sparse_detector_ros.model.network import ARCH_DEFAULTS, SparseBEVNet, architecture
from sparse_detector_ros.sparse import tile_mask

# 136 x 100 cells: not a multiple of any tile size, so tiles hang over every border.
GRID = GridConfig(x_min=0.0, x_max=54.4, y_min=-20.0, y_max=20.0, resolution=0.4, z_slices=3)
SMALL = {"stage_channels": [8, 16, 16], "stage_blocks": [1, 2, 1], "neck_channels": 8,
         "head_channels": 8}


def randomize(net: nn.Module, seed: int) -> nn.Module:
    """Random weights and batch-norm statistics with non-zero shifts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                fan_in = m.weight[0].numel() if isinstance(m, nn.Conv2d) else m.in_channels
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / fan_in ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
            elif isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.3)
    return net.eval()


def make_net(tile=8, seed=0, arch=SMALL, stem_stride=2, head_stage=1) -> SparseBEVNet:
    desc = ModelDescription(grid=GRID, architecture={**arch, "stem_stride": stem_stride,
                                                     "head_stage": head_stage})
    net = SparseBEVNet(desc, SparseConfig(tile_size=tile, dense_crossover=1.0, backend="torch"))
    return randomize(net, seed)


def dense_forward(net: SparseBEVNet, bev: torch.Tensor) -> dict[str, torch.Tensor]:
    """The plain dense network, written out independently of the sparse modules."""
    x = bev
    feats = []
    for k, stage in enumerate(net.stages):
        x = (net.stem if k == 0 else net.downs[k - 1]).layers(x)
        for block in stage:
            x = x + block.branch(x)
        feats.append(x)
    h = net.head_stage
    H, W = feats[h].shape[2:]
    y = torch.cat([feats[h]] + [up(f)[:, :, :H, :W] for up, f in zip(net.ups, feats[h + 1:])], 1)
    y = net.head_conv.layers(y)
    return {name: conv(y) for name, conv in net.outputs.items()}


def erode(valid: torch.Tensor, radius: int, stride: int = 1) -> torch.Tensor:
    """Cells whose (2r+1)^2 window (at ``stride``) holds only valid cells; off-map cells are
    zero padding, which is exact."""
    bad = (~valid).float().unsqueeze(1)
    out = F.max_pool2d(bad, 2 * radius + 1, stride, radius) if radius else bad[..., ::stride,
                                                                                 ::stride]
    return out.squeeze(1) == 0


def active_cells(module, mask: torch.Tensor) -> torch.Tensor:
    idx, _, _ = module.active_tiles(mask)
    m = module.out_mask(mask) if hasattr(module, "out_mask") else mask
    return tile_mask(idx, tuple(m.shape), module.tile_size, torch.bool)[:, 0]


def exact_cells(net: SparseBEVNet, mask: torch.Tensor) -> torch.Tensor:
    """Output cells whose receptive field lies inside the active tiles of every layer."""
    N, H, W = mask.shape
    valid = torch.ones(N, H, W, dtype=torch.bool)
    m = mask
    feats_valid, masks = [], []
    for k, stage in enumerate(net.stages):
        down = net.stem if k == 0 else net.downs[k - 1]
        valid = active_cells(down, m) & erode(valid, 1, down.stride[0])
        m = down.out_mask(m)
        for block in stage:
            valid = valid & active_cells(block, m) & erode(valid, block.halo[0])
        feats_valid.append(valid)
        masks.append(m)
    h = net.head_stage
    v = feats_valid[h]
    for k in range(h + 1, len(net.stages)):
        f = 2 ** (k - h)
        up = feats_valid[k].repeat_interleave(f, 1).repeat_interleave(f, 2)
        v = v & up[:, :v.shape[1], :v.shape[2]]
    return v & active_cells(net.head_conv, masks[h]) & erode(v, 1)


def blob_mask(N, H, W, seed, frac=0.3):
    """Large random rectangles (some reaching the map's borders) plus speckle: about ``frac``
    of the cells active, with regions wide enough to hold the network's receptive field."""
    g = torch.Generator().manual_seed(seed)
    m = (torch.rand(N, H, W, generator=g) < 0.01).float()
    for n in range(N):
        while float(m[n].mean()) < frac:
            h, w = (int(v) for v in torch.randint(30, 70, (2,), generator=g))
            y = int(torch.randint(-10, H - 20, (1,), generator=g))
            x = int(torch.randint(-10, W - 20, (1,), generator=g))
            m[n, max(0, y):y + h, max(0, x):x + w] = 1
    return m


def bev_input(N=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    H, W = GRID.shape
    return torch.rand(N, GRID.channels, H, W, generator=g)


def check(net, bev, mask, atol=1e-4):
    with torch.no_grad():
        head, active = net(bev, mask)
        ref = dense_forward(net, bev)
    exact = exact_cells(net, mask)
    assert exact.shape == active.shape and bool((exact <= active).all())
    for name, out in head.items():
        assert out.shape == ref[name].shape, name
        diff = (out - ref[name]).abs().amax(1)[exact]
        assert diff.numel() == 0 or float(diff.max()) < atol, (name, float(diff.max()))
    return exact, head, ref


@pytest.mark.parametrize("seed,frac", [(0, 0.3), (1, 0.6), (2, 0.2)])
def test_sparse_network_equals_dense_on_exact_cells(seed, frac):
    net = make_net(seed=seed)
    bev = bev_input(2, seed)
    H, W = GRID.shape
    mask = blob_mask(2, H, W, seed, frac)
    exact, head, ref = check(net, bev, mask)
    assert int(exact.sum()) > 20          # the comparison covers a real region
    # ... and the sparse path really ran (not the dense fallback), and differs outside
    assert all(m.last_path == "sparse" for m in net.sparse_modules())
    assert not torch.allclose(head["heatmap"], ref["heatmap"], atol=1e-3)


def test_full_mask_is_the_dense_network_everywhere():
    net = make_net(seed=3)
    bev = bev_input(1, 3)
    exact, head, ref = check(net, bev, torch.ones(1, *GRID.shape))
    assert bool(exact.all())
    for name in head:
        torch.testing.assert_close(head[name], ref[name], atol=1e-4, rtol=1e-4)


def test_empty_mask_computes_nothing():
    net = make_net(seed=4)
    with torch.no_grad():
        head, active = net(bev_input(1, 4), torch.zeros(1, *GRID.shape))
    assert not bool(active.any())
    # without an active tile every output is its 1x1 conv's bias (nothing was computed)
    for name, conv in net.outputs.items():
        torch.testing.assert_close(head[name][0, :, 0, 0], conv.bias)


@pytest.mark.parametrize("tile,stem_stride,head_stage", [(4, 2, 1), (16, 2, 1), (8, 1, 2),
                                                          (8, 2, 0)])
def test_exact_for_other_tiles_and_layouts(tile, stem_stride, head_stage):
    net = make_net(tile=tile, seed=5, stem_stride=stem_stride, head_stage=head_stage)
    H, W = GRID.shape
    exact, _, _ = check(net, bev_input(1, 5), blob_mask(1, H, W, 5, 0.4))
    assert int(exact.sum()) > 0


def test_fused_network_matches_dense_too():
    net = make_net(seed=6)
    H, W = GRID.shape
    bev, mask = bev_input(1, 6), blob_mask(1, H, W, 6, 0.4)
    with torch.no_grad():
        ref = dense_forward(net, bev)
    net.fuse()
    with torch.no_grad():
        head, _ = net(bev, mask)
    exact = exact_cells(net, mask)
    assert int(exact.sum()) > 50
    for name in head:
        assert float((head[name] - ref[name]).abs().amax(1)[exact].max()) < 1e-4


def test_training_mode_is_differentiable_and_masked():
    net = make_net(seed=7).train()
    for m in net.modules():   # running statistics, so that train and eval compute one function
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    H, W = GRID.shape
    bev, mask = bev_input(2, 7), blob_mask(2, H, W, 7, 0.3)
    head, active = net(bev, mask)
    assert all(m.last_path == "dense_reference" for m in net.sparse_modules())
    loss = sum(v.square().mean() for v in head.values())
    loss.backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
    # the dense-masked reference equals the sparse path on the exact cells
    net.eval()
    with torch.no_grad():
        sparse, _ = net(bev, mask)
    exact = exact_cells(net, mask)
    for name in head:
        assert float((head[name].detach() - sparse[name]).abs().amax(1)[exact].max()) < 1e-4


def test_sizes_come_from_the_description():
    net = SparseBEVNet(ModelDescription(grid=GRID, architecture=SMALL))
    assert [s[0].branch[0].in_channels for s in net.stages] == [8, 16, 16]
    assert [len(s) for s in net.stages] == [1, 2, 1]
    assert net.outputs["heatmap"].out_channels == 3 and net.out_stride == 4
    assert net.stem.layers[0].in_channels == GRID.channels == 5
    prior = torch.sigmoid(net.outputs["heatmap"].bias)
    torch.testing.assert_close(prior, torch.full((3,), ARCH_DEFAULTS["heatmap_prior"]))
    with pytest.raises(ValueError, match="unknown architecture key"):
        architecture(ModelDescription(architecture={"widths": (1, 2)}))
    with pytest.raises(ValueError, match="equal length"):
        architecture(ModelDescription(architecture={"stage_blocks": (1, 2)}))


def test_heading_and_iou_options_add_their_outputs_and_stay_exact():
    plain = SparseBEVNet(ModelDescription(grid=GRID, architecture=SMALL))
    assert set(plain.outputs) == {"heatmap", "offset", "z", "size", "rot"}
    arch = {**SMALL, "heading": "axis", "iou_head": 1}
    torch.manual_seed(0)
    net = SparseBEVNet(ModelDescription(grid=GRID, architecture=arch)).eval()
    assert net.outputs["axis"].out_channels == 2 and net.outputs["iou"].out_channels == 1
    bev = torch.rand(1, GRID.channels, *GRID.shape)
    mask = (torch.rand(1, *GRID.shape) < 0.3).float()
    with torch.no_grad():
        dense, _ = net(bev, torch.ones_like(mask))
        sparse, _ = net(bev, mask)
    exact = exact_cells(net, mask)
    for name in ("axis", "iou"):
        assert float((dense[name] - sparse[name]).abs().amax(1)[exact].max()) < 1e-4
    with pytest.raises(ValueError, match="architecture.heading must be one of sincos, axis"):
        architecture(ModelDescription(architecture={"heading": "bins"}))
    with pytest.raises(ValueError, match="architecture.iou_head must be 0 or 1"):
        architecture(ModelDescription(architecture={"iou_head": 2}))


def test_macs_count_every_conv_and_sparse_carries_the_backbone():
    net = SparseBEVNet(ModelDescription())          # the shipped sizes, 512 x 512 x 7
    macs = net.macs((512, 512))
    # stem 3x3 7->32 stride 2: 256^2 * 7 * 32 * 9
    assert macs["sparse"] > 256 * 256 * 7 * 32 * 9
    assert macs["sparse"] / (macs["sparse"] + macs["dense"]) >= 0.8
    # count the dense MACs again by hooking every conv on a real forward
    seen = {"n": 0}

    def hook(m, inp, out):
        k = m.kernel_size[0] * m.kernel_size[1]
        if isinstance(m, nn.ConvTranspose2d):
            seen["n"] += inp[0].shape[2] * inp[0].shape[3] * m.in_channels * m.out_channels * k
        else:
            seen["n"] += out.shape[2] * out.shape[3] * m.in_channels * m.out_channels * k

    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            m.register_forward_hook(hook)
    with torch.no_grad():
        dense_forward(net.eval(), torch.zeros(1, 7, 512, 512))
    assert seen["n"] == macs["sparse"] + macs["dense"]


@pytest.fixture(scope="module")
def sim_scan(tmp_path_factory):
    """A synthetic hdl64e scan, its sensor pose and its scene's nav2 map."""
    from sparse_detector_ros.sim import RoadMap, generate_scene, get_lidar, render_frame

    scene = generate_scene(300_500, duration=0.5)
    f = render_frame(scene, get_lidar("hdl64e"), 0)
    path = RoadMap.from_scene(scene).save(tmp_path_factory.mktemp("map") / "map.yaml")
    return f.points[:, :4].astype("float32"), tuple(f.ego_pose[[0, 1, 3]]), path


@pytest.mark.parametrize("mode", ["dense", "occupancy", "map_prior", "net", "union"])
def test_every_mask_mode_keeps_the_network_exact(mode, sim_scan):
    from sparse_detector_ros.bev import Rasterizer
    from sparse_detector_ros.config import MaskConfig
    from sparse_detector_ros.masks import ComputationMask, MapPrior, MaskNet

    points, pose, map_yaml = sim_scan
    net = make_net(seed=9)
    mask_net = randomize(MaskNet(GRID.channels), 10)
    cm = ComputationMask(MaskConfig(mode=mode, union="map_prior,occupancy"), GRID,
                         mask_net=mask_net, map_prior=MapPrior.from_yaml(map_yaml, 250))
    bev, _ = Rasterizer(GRID)(points)
    result = cm(points, bev, pose)
    assert result.mode == mode and result.fallback == ""
    exact, _, _ = check(net, bev, result.mask)
    if mode == "dense":
        assert bool(exact.all())
    assert int(exact.sum()) > 0
