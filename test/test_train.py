"""Training: a tiny model overfits a few frames and finds their boxes again; resuming continues
where a run stopped; the same command runs under torchrun (two CPU processes, gloo)."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from sparse_detector_ros.boxes import bev_iou
from sparse_detector_ros.config import Config, GridConfig, SparseConfig
from sparse_detector_ros.model import ModelDescription, load_description
from sparse_detector_ros.model.decode import decode
from sparse_detector_ros.pipeline import Detector
from sparse_detector_ros.tools import train_cli
from sparse_detector_ros.train.data import Augmentation, CachedBEVDataset, generate_cache

GRID = GridConfig(x_min=-12.8, x_max=12.8, y_min=-12.8, y_max=12.8, resolution=0.2)
ARCH = {"stage_channels": [16, 32, 32], "stage_blocks": [1, 1, 1], "neck_channels": 16,
        "head_channels": 16}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A cache of a few frames on a small grid around the sensor, and a tiny model for it."""
    root = tmp_path_factory.mktemp("train")
    aug = replace(Augmentation(), variants=1, rotation=0.0, flip=False, scale=(1.0, 1.0),
                  paste={})
    generate_cache(root / "cache", "train", scenes=2, frames_per_scene=1, presets=("hdl64e",),
                   grid=GRID, seed=0, workers=1, augmentation=aug)
    desc = ModelDescription(grid=GRID, architecture=ARCH, name="tiny")
    desc.save(root / "model.yaml")
    return root


def args_for(root: Path, out: str, **over) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    train_cli.add_arguments(p)
    argv = ["--cache", str(root / "cache"), "--out", str(root / out),
            "--model", str(root / "model.yaml"), "--crop", "128", "--batch", "2",
            "--no-progress", "--threads", "2"]
    for k, v in over.items():
        argv += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return p.parse_args(argv)


def log_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_tiny_model_overfits_a_few_frames_and_finds_their_boxes(tiny):
    args = args_for(tiny, "fit", steps=300, lr=0.01, dense_fraction=0.5, save_every=100,
                    log_every=1)
    assert train_cli.run(args) == 0
    rows = [r for r in log_of(tiny / "fit" / "train_log.jsonl") if "total" in r]
    first = sum(r["total"] for r in rows[:3]) / 3
    last = sum(r["total"] for r in rows[-3:]) / 3
    assert last < first / 4, (first, last)          # the loss falls by 4x or more
    assert log_of(tiny / "fit" / "train_log.jsonl")[-1]["done"] is True
    # the trained weights load through the model contract and find the frames' cars again
    desc = load_description(tiny / "fit" / "model.yaml")
    det = Detector(Config(sparse=SparseConfig(tile_size=8)), desc)
    assert det.trained
    ds = CachedBEVDataset(tiny / "cache", crop=None, classes=desc.classes)
    found = total = 0
    for i in range(len(ds)):
        item = ds[i]
        with torch.inference_mode():
            head, active = det.net(item["bev"][None], torch.ones(1, *GRID.shape))
        dets = decode(head, GRID, det.net.out_stride, (0.3,) * 3, active=active)[0]
        cars = item["boxes"][(item["labels"] == 0) & (item["num_points"] >= 50)]
        total += len(cars)
        if len(cars) and len(dets):
            iou = bev_iou(cars, dets.boxes[dets.labels == 0])
            found += int((iou.amax(1) > 0.5).sum()) if iou.numel() else 0
    assert total >= 2 and found >= 0.8 * total, (found, total)


def dense_pass(tiny, desc):
    """Seeded modules for ``desc``, a batch of two cached frames, the stride, and the dense
    head on the batch with its active cells."""
    from sparse_detector_ros.pipeline import build_modules
    from sparse_detector_ros.train.data import collate

    torch.manual_seed(0)
    modules = build_modules(desc, Config())
    ds = CachedBEVDataset(tiny / "cache", crop=None)
    batch = collate([ds[0], ds[1]])
    with torch.no_grad():
        dense = torch.ones_like(batch["mask"], dtype=torch.float32)
        head, active = modules["net"](batch["bev"], dense)
    return modules, batch, modules["net"].out_stride, head, active


def losses_at_rot_weights(tiny, desc):
    """The loss terms of two cached frames for ``desc`` (seeded weights, a dense pass) at
    ``--rot-weight`` 1 and 3, with the dense head, its targets, the centre cells' mask and the
    stride: what the loss tests below compare."""
    from sparse_detector_ros.train.targets import encode_batch
    from sparse_detector_ros.train.train import losses

    modules, batch, stride, head, active = dense_pass(tiny, desc)
    with torch.no_grad():
        one = losses(modules, batch, stride, 3, "dense", args_for(tiny, "w1"))
        three = losses(modules, batch, stride, 3, "dense", args_for(tiny, "w3", rot_weight=3.0))
    t = encode_batch(batch["boxes"], batch["labels"], batch["grid"], stride, 3)
    return one, three, head, t, t["mask"] * active.float(), stride


def test_reg_radius_option_trains_the_regression_around_the_centres(tiny):
    from sparse_detector_ros.train.targets import REG_KEYS, encode_batch, reg_loss
    from sparse_detector_ros.train.train import losses

    modules, batch, stride, head, active = dense_pass(tiny, load_description(tiny / "model.yaml"))
    with torch.no_grad():
        got = losses(modules, batch, stride, 3, "dense", args_for(tiny, "r", reg_radius=1))
    centres = encode_batch(batch["boxes"], batch["labels"], batch["grid"], stride, 3)
    t = encode_batch(batch["boxes"], batch["labels"], batch["grid"], stride, 3, reg_radius=1)
    m = t["mask"] * active.float()
    assert int((m > 0).sum()) > 4 * int((centres["mask"] > 0).sum()) > 0
    want = sum(reg_loss(head[k], t[k], m) for k in REG_KEYS if k in head)
    torch.testing.assert_close(got["reg"], want, rtol=1e-4, atol=1e-6)


def test_far_weight_option_reaches_the_regression_loss_and_is_checked_at_start(tiny,
                                                                              monkeypatch):
    from sparse_detector_ros.train import targets
    from sparse_detector_ros.train.targets import REG_KEYS, encode_batch, reg_loss
    from sparse_detector_ros.train.train import losses, run

    # the tiny grid ends before 20 m: the ramp brought within it
    monkeypatch.setattr(targets, "FAR_RAMP", (2.0, 12.0))
    modules, batch, stride, head, active = dense_pass(tiny, load_description(tiny / "model.yaml"))
    with torch.no_grad():
        got = losses(modules, batch, stride, 3, "dense", args_for(tiny, "f", far_weight=3.0))
        plain = losses(modules, batch, stride, 3, "dense", args_for(tiny, "f"))
    t = encode_batch(batch["boxes"], batch["labels"], batch["grid"], stride, 3, far_weight=3.0)
    m = t["mask"] * active.float()
    assert float(m.max()) > 1.0
    want = sum(reg_loss(head[k], t[k], m) for k in REG_KEYS if k in head)
    torch.testing.assert_close(got["reg"], want, rtol=1e-4, atol=1e-6)
    assert float(got["reg"]) != pytest.approx(float(plain["reg"]))
    with pytest.raises(SystemExit, match="--far-weight must be a finite number >= 0"):
        run(args_for(tiny, "f", far_weight=-1.0))


def test_bf16_option_runs_the_networks_in_bfloat16_and_keeps_the_losses_float32(tiny):
    from sparse_detector_ros.train.train import losses

    modules, batch, stride, _, _ = dense_pass(tiny, load_description(tiny / "model.yaml"))
    seen = []
    hook = modules["net"].register_forward_hook(
        lambda m, i, out: seen.append(out[0]["heatmap"].dtype))
    with torch.no_grad():
        full = losses(modules, batch, stride, 3, "dense", args_for(tiny, "f"))
        half = losses(modules, batch, stride, 3, "dense", args_for(tiny, "h", bf16=True))
    hook.remove()
    assert seen == [torch.float32, torch.bfloat16]
    for key in ("heatmap", "reg", "mask_net", "total"):
        assert half[key].dtype == torch.float32
        assert half[key] != full[key]                  # computed in bfloat16 ...
        torch.testing.assert_close(half[key], full[key], rtol=0.05, atol=1e-3)   # ... nearly
    assert train_cli.run(args_for(tiny, "bf16", steps=3, bf16=True)) == 0
    rows = log_of(tiny / "bf16" / "train_log.jsonl")
    assert rows[-1]["done"] is True and rows[-2]["step"] == 3


def test_rot_weight_scales_only_the_heading_term_of_the_regression_loss(tiny):
    from sparse_detector_ros.train.targets import reg_loss

    one, three, head, t, m, _ = losses_at_rot_weights(tiny, load_description(tiny / "model.yaml"))
    rot = reg_loss(head["rot"], t["rot"], m)
    assert rot > 0
    torch.testing.assert_close(three["reg"] - one["reg"], 2 * rot, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(three["heatmap"], one["heatmap"])


def test_axis_and_iou_options_add_their_loss_terms_and_reach_the_weights(tiny):
    from sparse_detector_ros.train.targets import iou_loss, reg_loss

    base = load_description(tiny / "model.yaml")
    desc = replace(base, architecture={**base.architecture, "heading": "axis", "iou_head": 1})
    one, three, head, t, m, stride = losses_at_rot_weights(tiny, desc)
    heading = reg_loss(head["rot"], t["rot"], m) + reg_loss(head["axis"], t["axis"], m)
    with torch.no_grad():
        iou = iou_loss(head, t, m, stride * GRID.resolution)
    # the rot weight scales the direction and the axis; the IoU term joins the total
    torch.testing.assert_close(three["reg"] - one["reg"], 2 * heading, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(one["iou"], iou)
    args = args_for(tiny, "w1")
    torch.testing.assert_close(one["total"], one["heatmap"] + args.reg_weight * one["reg"]
                               + args.mask_weight * one["mask_net"] + one["iou"])
    # the command-line options reach the trained weights' description
    assert train_cli.run(args_for(tiny, "axis", steps=3, heading="axis", iou_head=1)) == 0
    rows = log_of(tiny / "axis" / "train_log.jsonl")
    assert rows[-1]["done"] is True and "iou" in rows[-2]
    trained = load_description(tiny / "axis" / "model.yaml")
    assert trained.architecture["heading"] == "axis" and trained.architecture["iou_head"] == 1
    det = Detector(Config(sparse=SparseConfig(tile_size=8)), trained)
    assert det.trained and {"axis", "iou"} <= set(det.net.outputs)


def test_tile_size_option_sets_the_tiles_of_the_masked_passes(tiny):
    from sparse_detector_ros.config import ConfigError
    from sparse_detector_ros.pipeline import build_modules
    from sparse_detector_ros.train.train import training_config

    assert training_config(args_for(tiny, "t")).sparse.tile_size == SparseConfig().tile_size
    config = training_config(args_for(tiny, "t", tile_size=8))
    assert config.sparse.tile_size == 8
    desc = load_description(tiny / "model.yaml")
    assert build_modules(desc, config)["net"].tiles[0] == 8
    with pytest.raises(ConfigError, match="sparse.tile_size"):
        training_config(args_for(tiny, "t", tile_size=2))


def test_resume_continues_from_the_checkpoint(tiny):
    out = tiny / "resume"
    assert train_cli.run(args_for(tiny, "resume", steps=20, save_every=5, max_minutes=0)) == 0
    first = log_of(out / "train_log.jsonl")
    assert first[-1]["done"] is False and 1 <= first[-1]["step"] < 20   # stopped early
    assert not (out / "model.pt").exists()
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == first[-1]["step"] and "optimizer" in ckpt
    assert train_cli.run(args_for(tiny, "resume", steps=20, save_every=5, resume=True)) == 0
    rows = log_of(out / "train_log.jsonl")
    assert rows[-1]["done"] is True and rows[-1]["step"] == 20
    steps = [r["step"] for r in rows if "total" in r]
    assert steps == sorted(steps) and steps[-1] == 20         # continued, not restarted
    assert (out / "model.pt").exists()


def test_torchrun_two_cpu_processes_gloo(tiny):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun, "torchrun comes with torch"
    exe = Path(sys.executable).parent / "sparse-detector"
    out = tiny / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", str(exe), "train",
         "--cache", str(tiny / "cache"), "--out", str(out), "--model", str(tiny / "model.yaml"),
         "--crop", "128", "--batch", "1", "--steps", "4", "--no-progress", "--threads", "1"],
        capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = log_of(out / "train_log.jsonl")
    assert rows[-1]["done"] is True
    assert [r["crops"] for r in rows if "total" in r][-1] == 4 * 1 * 2   # steps x batch x world
    desc = load_description(out / "model.yaml")
    assert Detector(Config(), replace(desc)).trained


def test_pass_kind_splits_the_draws_by_the_fractions():
    from sparse_detector_ros.train.train import pass_kind

    kinds = [pass_kind(u / 100, 0.3, 0.35) for u in range(100)]
    assert kinds.count("dense") == 30 and kinds.count("objects") == 35
    assert kinds.count("occupancy") == 35
    assert kinds[29] == "dense" and kinds[30] == "objects" and kinds[65] == "occupancy"
    assert {pass_kind(u / 100, 0.0, 0.0) for u in range(100)} == {"occupancy"}


def test_object_mask_covers_each_object_with_whole_mask_net_cells_and_nothing_else(tiny):
    from sparse_detector_ros.masks import net_target
    from sparse_detector_ros.train.train import object_mask

    g = GRID
    boxes = torch.tensor([[3.1, -4.3, 0.0, 4.5, 1.9, 1.6, 0.3],     # a car
                          [-8.0, 6.0, 0.0, 0.6, 0.6, 1.7, 0.0]])    # a pedestrian
    m = object_mask(torch.stack([net_target(boxes, g, 4), net_target(boxes[:0], g, 4)]), 4,
                    (128, 128))
    assert m.shape == (2, 128, 128)
    assert m[1].sum() == 0                                     # no object: nothing active
    low = net_target(boxes, g, 4)
    assert torch.equal(m[0].view(32, 4, 32, 4).amax((1, 3)), low)  # whole 4 x 4 blocks
    assert torch.equal(m[0].view(32, 4, 32, 4).amin((1, 3)), low)
    for x, y in boxes[:, :2].tolist():                          # each centre cell is active
        assert m[0, int((x - g.x_min) / g.resolution), int((y - g.y_min) / g.resolution)] == 1
    assert 0 < m[0].mean() < 0.05                               # tight: a few % of the crop
    with pytest.raises(ValueError, match="allowed dense, occupancy, objects"):
        from sparse_detector_ros.train.train import losses
        losses({"net": None, "mask_net": None}, {"bev": torch.zeros(1), "mask": torch.zeros(1)},
               4, 3, "sparse", None)
