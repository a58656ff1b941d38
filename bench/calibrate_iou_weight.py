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
  is within ``--tolerance`` (0.1 AP) of the best (the heatmap, trained on every cell, stays
  the main term of the score; the IoU branch is trained near objects only); what
  ``detector.iou_weight`` defaults to. The weight only reorders the detections: the score
  thresholds select on the heatmap (:func:`~sparse_detector_ros.model.decode.decode`).
"""
from __future__ import annotations

import argparse
import json
import sys

import common

WEIGHTS = (0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_arguments(ap, frames=3)
    ap.add_argument("--presets", nargs="+", default=["hdl64e", "os1-64"])
    ap.add_argument("--weights", nargs="+", type=float, default=list(WEIGHTS))
    ap.add_argument("--tolerance", type=float, default=0.1,
                    help="AP points from the best within which the smallest weight is chosen")
    args = ap.parse_args(argv)

    import numpy as np

    from sparse_detector_ros.train.evaluate import Evaluator

    model, config, det = common.detector(args)
    if "iou" not in det.net.outputs:
        raise SystemExit(f"calibrate_iou_weight: model '{model.name}' has no IoU output "
                         "(architecture.iou_head: 0); detector.iou_weight does nothing for it")
    index = {c: i for i, c in enumerate(model.classes)}
    weights = sorted(set(args.weights))
    table: dict[tuple[str, float], float] = {}
    for preset in args.presets:
        evals = {w: Evaluator(model.classes, region=model.grid) for w in weights}
        for f in common.scans("val", args.scenes, args.frames, preset):
            known = np.array([c in index for c in f.labels], bool)
            gt = (f.boxes[known], [index[c] for c in f.labels[known]], f.num_points[known])
            # the network once, its head decoded once per weight
            out = det.network(f.points[:, :4], common.pose(f))
            for w in weights:
                evals[w].add(det.boxes(out, iou_weight=w), gt)
        for w in weights:
            res = evals[w].results()
            aps = {c: round(100 * r["ap_bev"], 2) for c, r in res["classes"].items()}
            table[(preset, w)] = float(np.nanmean(list(aps.values())))
            print(json.dumps({"kind": "weight", "preset": preset, "iou_weight": w,
                              "ap_bev": aps, "mean": round(table[(preset, w)], 2)}), flush=True)
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
