"""Calibrate ``mask.net_threshold``: active tiles and recall of the net mask per threshold.

    python bench/calibrate_net_mask.py [--model MODEL_YAML] [--params-file PARAMS_YAML]
                                       [--scenes 8] [--frames 2]
                                       [--presets hdl64e os1-64 hdl32e vlp16] [--target 0.99]

Scans of scenes of the ``val`` split (never used in training nor in ``sparse-detector eval``),
frames 0, 5, ... of each, per LiDAR preset, go through the model's rasterizer and mask net once;
every threshold of ``--thresholds`` is applied to the same logits. One JSON object a line:

* ``{"kind": "threshold", "preset": ..., "threshold": t, ...}``: ``active`` (mean, max) share of
  the backbone's first-stage tiles (``sparse.tile_size`` cells of the first stage, as the engine
  pools the mask) that the mask activates, and ``recall``: the share of objects with >= 5 points
  whose centre tile is active (the evaluation's mask recall), with ``missed`` / ``objects``;
* ``{"kind": "choice", ...}``: the highest threshold whose recall is at least ``--target`` on
  every preset, with its active share per preset.

The choice is what ``mask.net_threshold`` defaults to (see ``docs/pipeline.md``).
"""
from __future__ import annotations

import argparse
import json
import sys

import common

THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_arguments(ap, frames=2)
    ap.add_argument("--presets", nargs="+", default=["hdl64e", "os1-64", "hdl32e", "vlp16"])
    ap.add_argument("--thresholds", nargs="+", type=float, default=list(THRESHOLDS))
    ap.add_argument("--target", type=float, default=0.99, help="recall to keep (0.99)")
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from sparse_detector_ros.masks import net_mask
    from sparse_detector_ros.sparse.blocks import plan_tiles
    from sparse_detector_ros.sparse.geometry import grid_shape

    model, config, det = common.detector(args)
    sp = config.sparse
    g = model.grid
    H, W = g.shape
    tile = det.net.tiles[0] * det.net.arch["stem_stride"]      # first-stage tile, BEV cells
    thresholds = sorted(args.thresholds)
    rows = {}
    for preset in args.presets:
        acc = {t: {"active": [], "hit": 0, "objects": 0} for t in thresholds}
        for f in common.scans("val", args.scenes, args.frames, preset):
            b = f.boxes[f.num_points >= 5]
            ci = np.floor((b[:, 0] - g.x_min) / g.resolution).astype(int)
            cj = np.floor((b[:, 1] - g.y_min) / g.resolution).astype(int)
            ok = (ci >= 0) & (ci < H) & (cj >= 0) & (cj < W)
            ci, cj = ci[ok] // tile, cj[ok] // tile
            bev, _ = det.rasterizer(f.points[:, :4].astype(np.float32))
            with torch.inference_mode():
                logits = det.mask_net(bev)
            for t in thresholds:
                # the engine's own pooling of the mask into tiles
                m = net_mask(logits, t, (H, W)).float()
                plan = plan_tiles(m, tile, sp.threshold, sp.pooling, "torch")
                on = np.zeros(grid_shape((H, W), tile), bool)
                on[plan.indices[:, 1].numpy(), plan.indices[:, 2].numpy()] = True
                a = acc[t]
                a["active"].append(float(on.mean()))
                a["hit"] += int(on[ci, cj].sum())
                a["objects"] += len(ci)
        for t in thresholds:
            a = acc[t]
            recall = a["hit"] / a["objects"] if a["objects"] else 1.0
            row = {"kind": "threshold", "preset": preset, "threshold": t,
                   "active": {"mean": round(float(np.mean(a["active"])), 4),
                              "max": round(float(np.max(a["active"])), 4)},
                   "recall": round(recall, 4), "missed": a["objects"] - a["hit"],
                   "objects": a["objects"]}
            rows[(preset, t)] = row
            print(json.dumps(row), flush=True)
    ok = [t for t in thresholds
          if all(rows[(p, t)]["recall"] >= args.target for p in args.presets)]
    best = max(ok) if ok else None
    print(json.dumps({"kind": "choice", "target": args.target, "threshold": best,
                      "active": {p: rows[(p, best)]["active"]["mean"] for p in args.presets}
                      if best is not None else None,
                      "recall": {p: rows[(p, best)]["recall"] for p in args.presets}
                      if best is not None else None,
                      "model": model.name, "scenes": args.scenes, "frames": args.frames}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
