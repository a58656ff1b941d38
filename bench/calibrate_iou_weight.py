"""Calibrate ``detector.iou_weight``: AP per class for each weight of the IoU rescoring.

    python bench/calibrate_iou_weight.py [--model MODEL_YAML] [--params-file PARAMS_YAML]
                                         [--scenes 8] [--frames 3] [--presets hdl64e os1-64]
                                         [--weights 0 0.2 0.4 0.5 0.6 0.7 0.8]

For models with an IoU output (``iou_head: 1``). Scans of scenes of the ``val`` split (never
used in training nor in ``sparse-detector eval``), frames 0, 5, ... of each, per LiDAR preset,
go through the detector once (the runtime configuration's mask mode); the head's outputs are
decoded again for every weight of ``--weights`` (:func:`~sparse_detector_ros.model.decode.
decode`, ``iou_weight``) and scored by the evaluator of ``sparse-detector eval``. One JSON
object a line:

* ``{"kind": "weight", "preset": ..., "iou_weight": w, "ap_bev": {class: AP}, "mean": m}``;
* ``{"kind": "choice", ...}``: the smallest weight whose mean BEV AP over presets and classes
  is within ``--tolerance`` (0.1 AP) of the best (the IoU branch is trained on object centres
  only, so the less a background cell's predicted IoU can lift it over the score threshold the
  better); what ``detector.iou_weight`` defaults to.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WEIGHTS = (0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="", help="model description (default: shipped)")
    ap.add_argument("--params-file", default=None, help="runtime parameter file")
    ap.add_argument("--scenes", type=int, default=8)
    ap.add_argument("--frames", type=int, default=3, help="frames per scene, 5 apart")
    ap.add_argument("--presets", nargs="+", default=["hdl64e", "os1-64"])
    ap.add_argument("--weights", nargs="+", type=float, default=list(WEIGHTS))
    ap.add_argument("--tolerance", type=float, default=0.1,
                    help="AP points from the best within which the smallest weight is chosen")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from sparse_detector_ros.config import Config
    from sparse_detector_ros.model import load_description
    from sparse_detector_ros.model.decode import decode
    from sparse_detector_ros.pipeline import Detector
    from sparse_detector_ros.sim import FRAME_RATE, generate_scene, get_lidar, render_frame
    from sparse_detector_ros.sim.splits import seeds
    from sparse_detector_ros.train.evaluate import Evaluator

    torch.set_num_threads(args.threads)
    model = load_description(args.model)
    config = Config.from_yaml(args.params_file) if args.params_file else Config()
    det = Detector(config, model)
    if "iou" not in det.net.outputs:
        raise SystemExit(f"calibrate_iou_weight: model '{model.name}' has no IoU output "
                         "(architecture.iou_head: 0); detector.iou_weight does nothing for it")
    # the head, as Detector.detect computes it (its decode call is the only thing varied)
    heads = []
    original = decode

    def keep_head(head, *a, **k):
        heads.append(({key: v.clone() for key, v in head.items()}, a, k))
        return original(head, *a, **k)

    import sparse_detector_ros.pipeline as pipeline
    pipeline.decode = keep_head
    index = {c: i for i, c in enumerate(model.classes)}
    weights = sorted(set(args.weights))
    table: dict[tuple[str, float], float] = {}
    try:
        for preset in args.presets:
            lidar = get_lidar(preset)
            evals = {w: Evaluator(model.classes, region=model.grid) for w in weights}
            for seed in seeds("val", args.scenes):
                scene = generate_scene(seed, duration=5 * (args.frames - 1) / FRAME_RATE)
                for i in range(args.frames):
                    f = render_frame(scene, lidar, 5 * i)
                    known = np.array([c in index for c in f.labels], bool)
                    gt = (f.boxes[known], [index[c] for c in f.labels[known]],
                          f.num_points[known])
                    heads.clear()
                    det.detect(f.points[:, :4], tuple(float(v) for v in f.ego_pose[[0, 1, 3]]))
                    head, a, k = heads[0]
                    for w in weights:
                        d = original(head, *a, **(k | {"iou_weight": w}))[0]
                        evals[w].add(d, gt)
            for w in weights:
                res = evals[w].results()
                aps = {c: round(100 * r["ap_bev"], 2) for c, r in res["classes"].items()}
                table[(preset, w)] = float(np.nanmean(list(aps.values())))
                print(json.dumps({"kind": "weight", "preset": preset, "iou_weight": w,
                                  "ap_bev": aps, "mean": round(table[(preset, w)], 2)}),
                      flush=True)
    finally:
        pipeline.decode = original
    mean = {w: float(np.mean([table[(p, w)] for p in args.presets])) for w in weights}
    top = max(mean.values())
    best = min(w for w in weights if mean[w] >= top - args.tolerance)
    print(json.dumps({"kind": "choice", "iou_weight": best, "mean_ap_bev": round(mean[best], 2),
                      "best_mean_ap_bev": round(top, 2), "tolerance": args.tolerance,
                      "mean_ap_bev_without": round(mean.get(0.0, float("nan")), 2),
                      "mask_mode": config.mask.mode, "model": model.name,
                      "scenes": args.scenes, "frames": args.frames, "presets": args.presets}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
