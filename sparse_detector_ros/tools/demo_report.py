"""The demo's scoring and pictures (no ROS): one frame's detections against its ground truth at
the evaluation's IoU thresholds, and a bird's-eye-view picture of points, computation-mask tiles
and boxes."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..boxes import corners_bev
from ..config import GridConfig
from ..sim.preview import CLASS_COLORS
from ..train.evaluate import IOU_THRESHOLDS, MIN_POINTS, match_frame

#: class -> matplotlib colour (the simulator preview's), for detections and ground truth
CLASS_COLOURS = CLASS_COLORS


@dataclass
class FrameScore:
    """Per class: true positives, false positives and missed (evaluated) ground truth."""
    tp: dict[str, int] = field(default_factory=dict)
    fp: dict[str, int] = field(default_factory=dict)
    fn: dict[str, int] = field(default_factory=dict)

    def add(self, other: "FrameScore") -> None:
        for mine, theirs in ((self.tp, other.tp), (self.fp, other.fp), (self.fn, other.fn)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v

    def totals(self) -> tuple[int, int, int]:
        return sum(self.tp.values()), sum(self.fp.values()), sum(self.fn.values())

    def recall_precision(self) -> tuple[float, float]:
        """Recall and precision over all classes (NaN when undefined)."""
        tp, fp, fn = self.totals()
        return (tp / (tp + fn) if tp + fn else float("nan"),
                tp / (tp + fp) if tp + fp else float("nan"))


def score_frame(det_boxes: np.ndarray, det_scores: np.ndarray, det_classes: Sequence[str],
                gt_boxes: np.ndarray, gt_classes: Sequence[str], gt_points: np.ndarray,
                classes: Sequence[str], grid: GridConfig) -> FrameScore:
    """Greedy matching per class at the evaluation's BEV IoU (car 0.7, pedestrian and cyclist
    0.5). Ground truth with fewer than 5 points or centred outside ``grid`` is don't care: a
    detection on it is neither a TP nor an FP, and missing it is no miss."""
    det_boxes = np.asarray(det_boxes, np.float64).reshape(-1, 7)
    gt_boxes = np.asarray(gt_boxes, np.float64).reshape(-1, 7)
    det_classes, gt_classes = np.asarray(det_classes, str), np.asarray(gt_classes, str)
    inside = ((gt_boxes[:, 0] >= grid.x_min) & (gt_boxes[:, 0] < grid.x_max)
              & (gt_boxes[:, 1] >= grid.y_min) & (gt_boxes[:, 1] < grid.y_max))
    care = inside & (np.asarray(gt_points) >= MIN_POINTS)
    out = FrameScore()
    for c in classes:
        d, g = det_classes == c, gt_classes == c
        m = match_frame(det_boxes[d], np.asarray(det_scores, np.float64)[d], gt_boxes[g],
                        gt_ignore=~care[g], iou_threshold=IOU_THRESHOLDS.get(c, 0.5))
        out.tp[c] = int(m.tp.sum())
        out.fp[c] = int(m.fp.sum())
        out.fn[c] = m.num_gt - int(m.tp.sum())
    return out


def draw_bev(path: str | Path, points: np.ndarray, mask: np.ndarray | None,
             mask_extent: tuple[float, float, float, float] | None,
             det_boxes: np.ndarray, det_classes: Sequence[str], det_scores: np.ndarray,
             gt_boxes: np.ndarray, gt_classes: Sequence[str], gt_care: np.ndarray,
             title: str, half_extent: float = 52.0, dpi: int = 110) -> Path:
    """Save a top view (x right, y up, metres, the cloud's frame) to ``path``: points as grey
    dots, the computation mask's active cells (``mask`` (nx, ny) bool, row = x index, covering
    ``mask_extent`` = (x_min, x_max, y_min, y_max)) shaded, ground truth as dashed outlines
    (faint when don't care), detections as solid outlines with a heading line and a score."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Polygon

    fig, ax = plt.subplots(figsize=(8.6, 8.6))
    ax.set_facecolor("white")
    if mask is not None and mask_extent is not None:
        shade = np.where(np.asarray(mask, bool).T, 1.0, np.nan)  # imshow rows are y
        ax.imshow(shade, origin="lower", extent=mask_extent, cmap="Blues", vmin=0, vmax=3.5,
                  interpolation="nearest", alpha=0.55)
    pts = np.asarray(points)
    ax.scatter(pts[:, 0], pts[:, 1], s=0.15, c="#555555", linewidths=0, rasterized=True)
    for box, cls, care in zip(np.asarray(gt_boxes).reshape(-1, 7), gt_classes, gt_care):
        poly = corners_bev(box[None])[0]
        ax.add_patch(Polygon(poly, closed=True, fill=False, ls="--", lw=1.1,
                             ec=CLASS_COLOURS.get(str(cls), "k"), alpha=0.9 if care else 0.3))
    for box, cls, score in zip(np.asarray(det_boxes).reshape(-1, 7), det_classes, det_scores):
        poly = corners_bev(box[None])[0]
        colour = CLASS_COLOURS.get(str(cls), "k")
        ax.add_patch(Polygon(poly, closed=True, fill=False, lw=1.6, ec=colour))
        front = poly[:2].mean(0)
        ax.plot([box[0], front[0]], [box[1], front[1]], color=colour, lw=1.2)
        ax.text(box[0], box[1] + max(box[4], 1.0), f"{score:.2f}", color=colour, fontsize=6,
                ha="center")
    ax.plot([0], [0], marker=(3, 0, -90), color="k", ms=9)  # the sensor, pointing along +x
    ax.set_xlim(-half_extent, half_extent)
    ax.set_ylim(-half_extent, half_extent)
    ax.set_aspect("equal")
    ax.set_xlabel("x [m]")
    ax.set_ylabel("y [m]")
    ax.set_title(title, fontsize=9)
    handles = [plt.Line2D([], [], color=c, lw=1.6, label=k) for k, c in CLASS_COLOURS.items()]
    handles += [plt.Line2D([], [], color="k", lw=1.1, ls="--", label="ground truth"),
                plt.Rectangle((0, 0), 1, 1, fc="#9ecae1", label="computed tiles")]
    ax.legend(handles=handles, loc="upper right", fontsize=7)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path
