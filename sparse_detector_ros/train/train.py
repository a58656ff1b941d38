"""``sparse-detector train``: train the detector and its mask net on a cached synthetic set.

One step (:func:`train_step`):

1. a batch of random ``crop x crop`` crops of cached BEV samples (:mod:`.data`);
2. the computation mask of the pass (:func:`pass_kind`): with probability ``--dense-fraction``
   everything (a dense pass), with probability ``--object-mask-fraction`` the objects' mask
   (:func:`object_mask`: the cells of the mask net's grid that objects cover, as tight as the
   net mask at inference), else the cached occupancy mask (sparse passes: in ``train()`` mode
   every sparse module runs its dense-masked reference, the same values as the sparse path on
   the active tiles), so what runs at inference -- objects near the edge of the active tiles
   included -- is what is trained;
3. the network on it; CenterPoint targets on the crop's grid (:mod:`.targets`); the focal loss
   on the heatmap and L1 on offset, z, log size, sin/cos yaw (and the axis, sin/cos 2 yaw, for
   models with ``heading: axis``), both restricted to the head's
   active cells (outside them nothing is computed at inference); the L1 at the centre cells
   and, with ``--reg-radius R``, at the cells within ``R`` of them, weighted by the heatmap;
   with ``--far-weight W`` objects beyond 20 m weigh up to ``1 + W`` times more (at 40 m);
   For models with ``iou_head: 1``, the IoU branch learns the BEV IoU of the box decoded at
   each cell with a regression target (the same cells) with its object
   (:func:`.targets.iou_loss`, weight ``--iou-loss-weight``);
4. the mask net (:class:`~sparse_detector_ros.masks.MaskNet`) on the same BEV, against
   :func:`~sparse_detector_ros.masks.net_target` (cells near objects), with a binary
   cross-entropy whose positives weigh ``--mask-pos-weight`` times more: recall first;
5. AdamW, one-cycle learning rate, gradient clipping.

With ``--bf16`` steps 3 and 4 run the networks under bfloat16 autocast (about half the time of
float32 on CPUs with AVX512-BF16); the weights, the targets and the losses stay float32.

Fixed seeds; a tqdm bar with loss and rate; a JSON-lines log (``train_log.jsonl``); resumable
checkpoints (``checkpoint.pt``: modules, optimizer, scheduler, step, RNG states) every
``--save-every`` steps and at the end, when the time budget (``--max-minutes``) runs out, or on
Ctrl-C; ``--resume`` continues from it. The final weights go to ``<out>/model.pt`` with the
model description (``model.yaml``) next to them.

Under ``torchrun`` (``WORLD_SIZE > 1``) it runs DistributedDataParallel on the gloo backend
(CPU) or NCCL (CUDA): each process a shard of the batches (DistributedSampler), rank 0 logs and
saves. ``--steps`` counts optimizer steps, each of ``world_size * batch`` crops.
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from ..config import Config
from ..masks import net_target, repeat_cells
from ..model.description import ModelDescription, load_description, save_checkpoint
from ..model.network import architecture, load_state
from ..pipeline import build_modules
from .data import CachedBEVDataset, collate
from .targets import encode_batch, focal_loss, iou_loss, reg_loss

REG_KEYS = ("offset", "z", "size", "rot", "axis")


# ------------------------------------------------------------------------------ distributed

def init_distributed(device: str) -> tuple[int, int]:
    """``(rank, world_size)``; starts the process group under torchrun (gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------ the step

#: the computation masks of a training pass (see :func:`pass_kind`)
PASSES = ("dense", "occupancy", "objects")


def pass_kind(u: float, dense_fraction: float, object_fraction: float) -> str:
    """The mask of a pass for a uniform draw ``u`` in [0, 1): ``dense`` below
    ``dense_fraction``, ``objects`` in the next ``object_fraction``, else ``occupancy``."""
    if u < dense_fraction:
        return "dense"
    return "objects" if u < dense_fraction + object_fraction else "occupancy"


def object_mask(targets: torch.Tensor, factor: int, hw: tuple[int, int]) -> torch.Tensor:
    """``(B, H, W)``: the mask net's targets ``(B, h, w)`` (:func:`~sparse_detector_ros.masks.
    net_target`: 1 on the cells of the ``factor``-downsampled grid that an object covers), each
    cell repeated over the ``factor x factor`` BEV cells it holds, cropped to ``hw``: a
    computation mask as tight as a good net mask, so that objects at the edge of the active
    tiles are trained on."""
    return repeat_cells(targets, factor, hw)


def losses(modules, batch: dict[str, Any], stride: int, num_classes: int, kind: str,
           args) -> dict[str, torch.Tensor]:
    """The loss terms of one batch under the computation mask ``kind`` (one of
    :data:`PASSES`; see the module docstring)."""
    if kind not in PASSES:
        raise ValueError(f"kind = {kind!r}: allowed {', '.join(PASSES)}")
    net, mask_net = modules["net"], modules["mask_net"]
    bev = batch["bev"]
    # the mask net's target; also the computation mask of an "objects" pass
    target_m = torch.stack([net_target(b, g, mask_net.factor) for b, g in
                            zip(batch["boxes"], batch["grid"])]).to(bev)
    if kind == "dense":
        mask = torch.ones_like(batch["mask"], dtype=bev.dtype)
    elif kind == "objects":
        mask = object_mask(target_m, mask_net.factor, tuple(batch["mask"].shape[1:]))
    else:
        mask = batch["mask"].to(bev)
    # --bf16: the networks run under bfloat16 autocast; their outputs come back as float32, so
    # that the losses, the targets and the IoU of the decoded boxes stay in float32
    amp = torch.autocast(bev.device.type, dtype=torch.bfloat16,
                         enabled=bool(getattr(args, "bf16", False)))
    with amp:
        head, active = net(bev, mask)
        logits_m = mask_net(bev)
    head = {k: v.float() for k, v in head.items()}
    logits_m = logits_m.float()
    t = encode_batch(batch["boxes"], batch["labels"], batch["grid"], stride, num_classes,
                     reg_radius=getattr(args, "reg_radius", 0),
                     far_weight=getattr(args, "far_weight", 0.0))
    act = active.to(bev.dtype)
    # nothing is computed outside the active cells: no loss there, no object counted there
    logits = torch.where(active[:, None], head["heatmap"], torch.full_like(head["heatmap"], -30))
    out = {"heatmap": focal_loss(logits, t["heatmap"] * act[:, None])}
    reg_mask = t["mask"] * act
    # the heading's L1 terms may weigh more (--rot-weight): boxes must be tight at IoU 0.7;
    # "axis" only for models with heading: axis (model/network.py)
    rot_weight = getattr(args, "rot_weight", 1.0)
    weight = {"rot": rot_weight, "axis": rot_weight}
    out["reg"] = sum(weight.get(k, 1.0) * reg_loss(head[k], t[k], reg_mask)
                     for k in REG_KEYS if k in head)
    if "iou" in head:       # models with iou_head: 1 (model/network.py)
        cell = stride * float(batch["grid"][0].resolution)
        out["iou"] = iou_loss(head, t, reg_mask, cell)
    pos_w = torch.tensor(args.mask_pos_weight, dtype=logits_m.dtype)
    out["mask_net"] = F.binary_cross_entropy_with_logits(logits_m[:, 0], target_m,
                                                         pos_weight=pos_w)
    out["total"] = (out["heatmap"] + args.reg_weight * out["reg"]
                    + args.mask_weight * out["mask_net"])
    if "iou" in out:
        out["total"] = out["total"] + getattr(args, "iou_loss_weight", 1.0) * out["iou"]
    return out


class TrainModel(torch.nn.Module):
    """The modules and their loss in one forward, so that DistributedDataParallel (which
    averages gradients through its module's forward) wraps the whole step."""

    def __init__(self, modules, stride: int, num_classes: int, args):
        super().__init__()
        self.inner = modules
        self.stride, self.num_classes, self.args = stride, num_classes, args

    def forward(self, batch: dict[str, Any], kind: str) -> dict[str, torch.Tensor]:
        return losses(self.inner, batch, self.stride, self.num_classes, kind, self.args)


def training_config(args) -> Config:
    """The runtime configuration the modules are built with: the defaults, with ``--tile-size``
    as ``sparse.tile_size`` (in ``train()`` mode a sparse pass multiplies by the tile mask, so
    the tiles trained on are those of this size: train at the tile size the node will run)."""
    tile = getattr(args, "tile_size", None)
    return Config.from_flat({"sparse.tile_size": tile}) if tile else Config()


def filter_points(batch: dict[str, Any], min_points: int) -> dict[str, Any]:
    keep = [n >= min_points for n in batch["num_points"]]
    return {**batch, "boxes": [b[k] for b, k in zip(batch["boxes"], keep)],
            "labels": [lab[k] for lab, k in zip(batch["labels"], keep)]}


# ------------------------------------------------------------------------------ main

def run(args) -> int:
    from tqdm import tqdm

    device = torch.device(args.device)
    rank, world = init_distributed(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed + rank)
    fractions = (args.dense_fraction, args.object_mask_fraction)
    if min(fractions) < 0 or sum(fractions) > 1:
        raise SystemExit(f"train: --dense-fraction ({fractions[0]}) and --object-mask-fraction "
                         f"({fractions[1]}) must be >= 0 and add up to at most 1")
    far = getattr(args, "far_weight", 0.0)
    if not math.isfinite(far) or far < 0:
        raise SystemExit(f"train: --far-weight must be a finite number >= 0, got {far}")
    out = Path(args.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    model = load_description(args.model)
    if getattr(args, "heading", None):
        model = replace(model, architecture={**model.architecture, "heading": args.heading})
    if getattr(args, "iou_head", None) is not None:
        model = replace(model, architecture={**model.architecture, "iou_head": args.iou_head})
    config = training_config(args)
    ds = CachedBEVDataset(args.cache, crop=args.crop, classes=model.classes)
    if ds.grid != model.grid:
        raise SystemExit(f"train: the cache's grid {ds.grid} is not the model's grid "
                         f"{model.grid}: regenerate the cache for this model")
    modules = build_modules(model, config).to(device)
    stride, num_classes = modules["net"].out_stride, len(model.classes)
    opt = torch.optim.AdamW(modules.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps,
                                                pct_start=0.1)
    step = 0
    ckpt_path = out / "checkpoint.pt"
    if args.resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        load_state(modules, ckpt["state_dict"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        step = int(ckpt["step"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        np.random.set_state(ckpt["rng"]["numpy"])
        random.setstate(ckpt["rng"]["python"])
    step_model: torch.nn.Module = TrainModel(modules, stride, num_classes, args)
    if world > 1:
        step_model = torch.nn.parallel.DistributedDataParallel(step_model)
    sampler = (DistributedSampler(ds, world, rank, seed=args.seed + step) if world > 1
               else RandomSampler(ds, replacement=True, num_samples=10**9,
                                  generator=torch.Generator().manual_seed(args.seed + step)))
    loader = DataLoader(ds, batch_size=args.batch, sampler=sampler, collate_fn=collate,
                        num_workers=args.workers, drop_last=True,
                        persistent_workers=args.workers > 0)
    dense_rng = random.Random(args.seed * 7919 + step)
    log = open(out / "train_log.jsonl", "a", encoding="utf-8") if rank == 0 else None
    stop = {"now": False}
    signal.signal(signal.SIGINT, lambda *_: stop.update(now=True))
    t0 = time.perf_counter()
    bar = tqdm(total=args.steps, initial=step, disable=rank != 0 or not args.progress,
               dynamic_ncols=True, desc="train")
    modules.train()
    ema: dict[str, float] = {}
    epoch = 0
    while step < args.steps and not stop["now"]:
        if world > 1:
            sampler.set_epoch(epoch)
        epoch += 1
        for batch in loader:
            batch = filter_points(batch, args.min_points)
            batch["bev"] = batch["bev"].to(device)
            batch["mask"] = batch["mask"].to(device)
            kind = pass_kind(dense_rng.random(), args.dense_fraction,
                             args.object_mask_fraction)
            terms = step_model(batch, kind)
            opt.zero_grad(set_to_none=True)
            terms["total"].backward()
            torch.nn.utils.clip_grad_norm_(modules.parameters(), 10.0)
            opt.step()
            sched.step()
            step += 1
            vals = {k: float(v.detach()) for k, v in terms.items()}
            for k, v in vals.items():
                ema[k] = v if k not in ema else 0.98 * ema[k] + 0.02 * v
            elapsed = time.perf_counter() - t0
            if rank == 0:
                bar.update(1)
                bar.set_postfix(loss=f"{ema['total']:.3f}", hm=f"{ema['heatmap']:.3f}",
                                reg=f"{ema['reg']:.3f}", lr=f"{sched.get_last_lr()[0]:.1e}")
                if step % args.log_every == 0 or step == args.steps:
                    log.write(json.dumps({"step": step, "elapsed_s": round(elapsed, 1),
                                          "crops": step * args.batch * world,
                                          "mask": kind, "lr": sched.get_last_lr()[0],
                                          **{k: round(v, 5) for k, v in vals.items()},
                                          **{f"ema_{k}": round(v, 5) for k, v in ema.items()}})
                              + "\n")
                    log.flush()
            out_of_time = args.max_minutes is not None and elapsed > 60 * args.max_minutes
            if rank == 0 and (step % args.save_every == 0 or step == args.steps or out_of_time
                              or stop["now"]):
                save_state(ckpt_path, model, modules, opt, sched, step)
            if out_of_time:
                stop["now"] = True
            if step >= args.steps or stop["now"]:
                break
    bar.close()
    if rank == 0:
        save_state(ckpt_path, model, modules, opt, sched, step)
        if step >= args.steps:
            write_weights(out, model, modules)
        log.write(json.dumps({"done": step >= args.steps, "step": step,
                              "wall_s": round(time.perf_counter() - t0, 1)}) + "\n")
        log.close()
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def save_state(path: Path, model: ModelDescription, modules, opt, sched, step: int) -> None:
    tmp = path.with_suffix(".tmp")
    save_checkpoint(tmp, model, modules.state_dict(), optimizer=opt.state_dict(),
                    scheduler=sched.state_dict(), step=step,
                    rng={"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                         "python": random.getstate()})
    os.replace(tmp, path)


def write_weights(out: Path, model: ModelDescription, modules) -> Path:
    """``<out>/model.pt`` (weights + description) and ``<out>/model.yaml`` naming it."""
    weights = out / "model.pt"
    # every size written out, so that the weights do not depend on ARCH_DEFAULTS staying put
    desc = replace(model, weights=weights.name, source=out / "model.yaml",
                   architecture=architecture(model))
    save_checkpoint(weights, desc, {k: v.detach().cpu() for k, v in modules.state_dict().items()})
    desc.save(out / "model.yaml")
    return weights

