"""Where the box AP goes: error of the matched boxes and AP with one error removed at a time.

    python bench/box_errors.py [--model MODEL_YAML] [--params-file PARAMS_YAML] [--scenes 8]
                               [--frames 5] [--preset hdl64e] [--split val]

Scans of ``--scenes`` scenes of ``--split`` (default ``val``: never used in training nor in
``sparse-detector eval``), frames 0, 5, ... of each, go through the detector (the runtime
configuration, its mask mode). Each detection is paired with the nearest ground-truth box of its
class within 2 m. One JSON object a line, per class:

* ``{"kind": "errors", ...}``: for the paired detections, median and 90th percentile of the
  heading error modulo pi (degrees; a box turned round has the same footprint), of the length,
  width and centre errors along and across the object (m), the share with BEV IoU above the
  class's threshold, and the correlation of score and IoU;
* ``{"kind": "ablation", ...}``: BEV AP (KITTI R40, the evaluator's matching and don't cares)
  as detected and with one part of every paired box replaced by the ground truth's (``yaw``,
  ``size``, ``centre``, all three), and with the detections ranked by their true IoU
  (``rank``): how much AP each error costs.
"""
from __future__ import annotations

import argparse
import json
import sys

import common

#: ablations: name -> the parts of a paired box taken from the ground truth
ABLATIONS = {"as_detected": (), "yaw": ("yaw",), "size": ("size",), "centre": ("centre",),
             "yaw_size_centre": ("yaw", "size", "centre"), "rank": ("rank",)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_arguments(ap, frames=5)
    ap.add_argument("--preset", default="hdl64e")
    ap.add_argument("--split", default="val", choices=("val", "eval", "bench"))
    args = ap.parse_args(argv)

    import numpy as np

    from sparse_detector_ros.train.evaluate import (IOU_THRESHOLDS, MIN_POINTS,
                                                    average_precision, match_frame, similarity)

    model, config, det = common.detector(args)
    g = model.grid
    frames = []                                  # (class, pred boxes, scores, gt boxes, care)
    for f in common.scans(args.split, args.scenes, args.frames, args.preset):
        r = det.detect(f.points[:, :4], common.pose(f))
        boxes, scores, labels = (np.asarray(a, np.float64) for a in r.detections.numpy())
        for c, name in enumerate(model.classes):
            k = f.labels == name
            gb = f.boxes[k].astype(np.float64)
            care = ((f.num_points[k] >= MIN_POINTS) & (gb[:, 0] >= g.x_min)
                    & (gb[:, 0] < g.x_max) & (gb[:, 1] >= g.y_min) & (gb[:, 1] < g.y_max))
            frames.append((name, boxes[labels == c], scores[labels == c], gb, care))

    def paired(pb, gb):
        """(detection index, gt index) of each detection with a ground truth within 2 m."""
        if not len(pb) or not len(gb):
            return np.zeros(0, int), np.zeros(0, int)
        d = similarity(pb, gb, "dist")
        near = np.flatnonzero(d.min(1) < 2.0)
        return near, d[near].argmin(1)

    for name in model.classes:
        thr = IOU_THRESHOLDS[name]
        rows = []
        for cname, pb, ps, gb, care in frames:
            if cname != name:
                continue
            i, j = paired(pb, gb)
            if not len(i):
                continue
            p, t = pb[i], gb[j]
            c, s = np.cos(t[:, 6]), np.sin(t[:, 6])
            dx, dy = p[:, 0] - t[:, 0], p[:, 1] - t[:, 1]
            iou = np.diag(similarity(p, t, "bev"))
            rows.append(np.c_[ps[i], iou,
                              np.degrees(np.abs((p[:, 6] - t[:, 6] + np.pi / 2) % np.pi
                                                - np.pi / 2)),
                              p[:, 3] - t[:, 3], p[:, 4] - t[:, 4], dx * c + dy * s,
                              -dx * s + dy * c])
        e = np.concatenate(rows) if rows else np.zeros((0, 7))

        def stat(col):
            v = np.abs(e[:, col])
            if not len(v):
                return None
            return {"p50": round(float(np.median(v)), 3),
                    "p90": round(float(np.percentile(v, 90)), 3)}

        print(json.dumps({
            "kind": "errors", "class": name, "preset": args.preset, "paired": len(e),
            "iou_above_threshold": round(float((e[:, 1] > thr).mean()), 3) if len(e) else None,
            "yaw_deg": stat(2), "length_m": stat(3), "width_m": stat(4), "along_m": stat(5),
            "across_m": stat(6),
            "score_iou_corr": round(float(np.corrcoef(e[:, 0], e[:, 1])[0, 1]), 3)
            if len(e) > 2 else None}), flush=True)
        aps = {}
        for label, parts in ABLATIONS.items():
            sc, tp, num_gt = [], [], 0
            for cname, pb, ps, gb, care in frames:
                if cname != name:
                    continue
                pb, ps = pb.copy(), ps.copy()
                i, j = paired(pb, gb)
                if "yaw" in parts:
                    pb[i, 6] = gb[j, 6]
                if "size" in parts:
                    pb[i, 3:6] = gb[j, 3:6]
                if "centre" in parts:
                    pb[i, 0:3] = gb[j, 0:3]
                if "rank" in parts and len(pb) and len(gb):
                    ps = similarity(pb, gb, "bev").max(1) + 1e-3 * ps
                m = match_frame(pb, ps, gb, ~care, thr, "bev")
                keep = ~m.ignored
                sc.append(m.scores[keep])
                tp.append(m.tp[keep])
                num_gt += m.num_gt
            ap_ = average_precision(np.concatenate(sc), np.concatenate(tp), num_gt)
            aps[label] = round(100 * ap_, 2)
        print(json.dumps({"kind": "ablation", "class": name, "preset": args.preset,
                          "iou_threshold": thr, "ap_bev": aps}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
