"""Evaluation metrics of the detector: KITTI-style average precision (R40) with rotated BEV and
3D IoU, nuScenes-style centre-distance AP, per range band and per points-in-box band, the mask
recall, and the reports (markdown tables, JSON).

Boxes follow :mod:`sparse_detector_ros.boxes`: ``(x, y, z, l, w, h, yaw)``, ``z`` the centre, in
the sensor frame. Labels are indices into the evaluator's ``classes`` (for detections and ground
truth alike: map the model's classes to these first when they differ).

Matching (:func:`match_frame`, one frame, one class), KITTI style
------------------------------------------------------------------
Detections are taken by descending score (equal scores: lower index first). Each one matches the
still unmatched ground-truth (GT) object of highest similarity that passes the threshold:

* ``metric="bev"``: rotated IoU of the footprints (:func:`~sparse_detector_ros.boxes.bev_iou`),
  match when ``IoU > threshold`` (strictly, as KITTI);
* ``metric="3d"``: rotated 3D IoU (:func:`~sparse_detector_ros.boxes.iou_3d`), ``IoU >
  threshold``;
* ``metric="dist"``: distance of the box centres seen from above (x, y), match when ``distance <
  threshold`` metres (strictly, as nuScenes), the nearest first.

Then:

* matching a valid GT: true positive (TP); that GT is taken;
* matching a don't-care GT (``gt_ignore``): neither TP nor false positive (FP), "ignored". A
  don't-care GT is never taken: it absorbs any number of detections (we cannot tell what a
  detection on an object with almost no points should be);
* matching nothing: FP, unless the detection itself is marked ``pred_ignore`` (it lies outside
  the band or region being evaluated), then ignored;
* a duplicate: its GT is already taken, so it matches nothing (or a don't-care) -> FP (ignored).

Every valid GT not matched is a miss (it counts in ``num_gt`` but never becomes a TP).

Average precision (:func:`average_precision`), KITTI R40
-------------------------------------------------------
Over all frames, the non-ignored detections are sorted by descending score; precision and recall
(TP / number of valid GT) are taken after each distinct score (detections of equal score enter
together, so their order does not matter). ``AP = 1/40 * sum_{r = 1/40, 2/40, ..., 1} p(r)`` with
``p(r)`` the highest precision at any recall ``>= r`` (0 when recall never reaches ``r``). With
no valid GT of a class (``num_gt = 0``) AP is undefined: **NaN** (``null`` in JSON, "–" in the
tables), whatever the false positives; the counts (``num_gt``, ``tp``, ``fp``) stay in the
results. Class means (``mean``) skip NaN classes.

Bands
-----
* don't care: GT with fewer than ``min_points`` (5) LiDAR points; GT whose centre lies outside
  ``region`` (the BEV grid, when given: nothing can be detected there); detections outside
  ``region`` are ``pred_ignore``.
* range bands (``0-20``, ``20-40``, ``40-edge`` m; ``[lo, hi)`` of the centre's distance from the
  sensor in x, y), KITTI-like: GT outside the band are don't care, detections are placed in the
  band of their own centre distance and those outside it are ``pred_ignore``. So a detection in
  the band that matches a GT just across the border is ignored (not FP), and a detection just
  across the border that matches a GT of the band is a TP (it found that object); unmatched
  detections count as FP in their own band only.
* points-in-box bands (``5-20``, ``20-100``, ``100+`` points, ``[lo, hi)``): GT outside the band
  are don't care, so a detection matching one is ignored. Unmatched detections: when ``add``
  gets ``pred_num_points`` (points in each detected box, counted as the GT's ``num_points``),
  a detection belongs to the band of its own count and is FP there only, as for range; without
  it an unmatched detection counts as FP in **every** points band (the conservative choice:
  band APs are then lower bounds, never inflated by dropping false positives).

Mask recall: the share of evaluated GT (not don't care) whose centre tile was active in the
computation mask (``add(..., active_centre=...)``, one bool per GT), overall and per class.

Results (:meth:`Evaluator.results`) and reports (:func:`to_markdown`, :func:`headline`,
:func:`write_json`) are plain dicts / text; every number is formatted by :func:`format_value`
and every table row is defined in ``_summary_rows`` / ``_band_rows``.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..boxes import BOX_DIM, bev_iou, iou_3d
from ..sim.world import CLASSES

__all__ = ["METRICS", "IOU_THRESHOLDS", "DIST_THRESHOLDS", "RANGE_BANDS", "POINT_BANDS",
           "MIN_POINTS", "RECALL_POINTS", "FrameMatch", "similarity", "match_frame",
           "average_precision", "band_label", "Evaluator", "format_value", "to_markdown",
           "headline", "to_jsonable", "write_json", "write_report"]

METRICS = ("bev", "3d", "dist")
#: rotated-IoU threshold per class (BEV and 3D), KITTI's
IOU_THRESHOLDS: dict[str, float] = {"car": 0.7, "pedestrian": 0.5, "cyclist": 0.5}
#: centre-distance thresholds [m], nuScenes'
DIST_THRESHOLDS: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
#: ``[lo, hi)`` distance of the centre from the sensor [m]; inf = up to the edge of the grid
RANGE_BANDS: tuple[tuple[float, float], ...] = ((0.0, 20.0), (20.0, 40.0), (40.0, math.inf))
#: ``[lo, hi)`` LiDAR points in the box
POINT_BANDS: tuple[tuple[float, float], ...] = ((5, 20), (20, 100), (100, math.inf))
#: GT with fewer points are don't care
MIN_POINTS = 5
RECALL_POINTS = 40


# ----------------------------------------------------------------------------- input helpers

def _np(x, dtype, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x, dtype=dtype)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be an array of {np.dtype(dtype).name}: {e}") from None


def _boxes(x, name: str) -> np.ndarray:
    b = _np(x, np.float64, name)
    if b.ndim == 1 and b.size == 0:
        b = b.reshape(0, BOX_DIM)
    if b.ndim != 2 or b.shape[1] != BOX_DIM:
        raise ValueError(f"{name} must have shape (K, 7) = (x, y, z, l, w, h, yaw) per row, "
                         f"got {b.shape}")
    return b


def _vec(x, k: int, name: str, dtype, default=None) -> np.ndarray:
    if x is None:
        if default is None:
            raise ValueError(f"{name} is required")
        return np.full(k, default, dtype)
    v = _np(x, dtype, name)
    if v.shape != (k,):
        raise ValueError(f"{name} must have shape ({k},), one value per box, got {v.shape}")
    return v


# ----------------------------------------------------------------------------- matching

@dataclass
class FrameMatch:
    """The outcome of :func:`match_frame` for ``K`` detections.

    ``scores`` (K,) float64; ``tp`` (K,) bool: matched a valid GT; ``ignored`` (K,) bool: matched
    a don't-care GT, or matched nothing while ``pred_ignore``; a detection neither TP nor ignored
    is a false positive (:attr:`fp`). ``gt_index`` (K,) int64: the valid GT a TP matched, else -1.
    ``num_gt``: the number of valid (evaluated) GT of the frame.
    """
    scores: np.ndarray
    tp: np.ndarray
    ignored: np.ndarray
    gt_index: np.ndarray
    num_gt: int

    @property
    def fp(self) -> np.ndarray:
        """(K,) bool: false positives."""
        return ~self.tp & ~self.ignored


def similarity(pred_boxes, gt_boxes, metric: str = "bev") -> np.ndarray:
    """(K, G) float64 between detections and GT: BEV IoU (``"bev"``), 3D IoU (``"3d"``) or the
    distance of the centres in x, y in metres (``"dist"``)."""
    p = _boxes(pred_boxes, "pred_boxes")
    g = _boxes(gt_boxes, "gt_boxes")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if len(p) == 0 or len(g) == 0:
        return np.zeros((len(p), len(g)))
    if metric == "bev":
        return np.asarray(bev_iou(p, g), np.float64)
    if metric == "3d":
        return np.asarray(iou_3d(p, g), np.float64)
    return np.hypot(p[:, None, 0] - g[None, :, 0], p[:, None, 1] - g[None, :, 1])


def _greedy(matrix: np.ndarray, threshold: float, metric: str, order: np.ndarray,
            gt_ignore: np.ndarray, pred_ignore: np.ndarray):
    """The matching loop of :func:`match_frame` on checked inputs: (tp, ignored, gt_index)."""
    k = matrix.shape[0]
    tp = np.zeros(k, bool)
    ignored = np.zeros(k, bool)
    gt_index = np.full(k, -1, np.int64)
    if metric == "dist":
        ok, key = matrix < threshold, -matrix
    else:
        ok, key = matrix > threshold, matrix
    available = np.ones(matrix.shape[1], bool)
    any_ok = ok.any(1) if matrix.shape[1] else np.zeros(k, bool)
    for i in order:
        if any_ok[i]:
            cand = ok[i] & available
            if cand.any():
                g = int(np.argmax(np.where(cand, key[i], -np.inf)))
                if gt_ignore[g]:
                    ignored[i] = True
                else:
                    tp[i] = True
                    gt_index[i] = g
                    available[g] = False
                continue
        if pred_ignore[i]:
            ignored[i] = True
    return tp, ignored, gt_index


def _check_threshold(threshold: float, metric: str) -> float:
    t = float(threshold)
    if metric == "dist":
        if not t > 0:
            raise ValueError(f"the distance threshold must be > 0 metres, got {threshold}")
    elif not 0.0 <= t <= 1.0:
        raise ValueError(f"the IoU threshold must be in [0, 1], got {threshold}")
    return t


def match_frame(pred_boxes, pred_scores, gt_boxes, gt_ignore=None, iou_threshold: float = 0.7,
                metric: str = "bev", *, pred_ignore=None, matrix=None) -> FrameMatch:
    """Greedy KITTI-style matching of one frame's detections of one class to its GT.

    Args:
        pred_boxes: (K, 7) detections; ``pred_scores`` (K,) their scores (no NaN).
        gt_boxes: (G, 7) ground truth; ``gt_ignore`` (G,) bool: don't care (default none).
        iou_threshold: for ``"bev"`` / ``"3d"`` the IoU a match must exceed; for ``"dist"`` the
            centre distance in metres a match must stay below.
        metric: ``"bev"``, ``"3d"`` or ``"dist"`` (see the module docstring).
        pred_ignore: (K,) bool, detections that are ignored rather than FP when they match
            nothing (outside the band or region evaluated); default none.
        matrix: the (K, G) :func:`similarity` of these boxes for ``metric``, when already
            computed (the boxes are then only checked for shape).

    Returns:
        :class:`FrameMatch` (TP, ignored, matched GT per detection; valid GT count).
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    thr = _check_threshold(iou_threshold, metric)
    p = _boxes(pred_boxes, "pred_boxes")
    g = _boxes(gt_boxes, "gt_boxes")
    k, n = len(p), len(g)
    scores = _vec(pred_scores, k, "pred_scores", np.float64)
    if np.isnan(scores).any():
        raise ValueError("pred_scores contain NaN")
    gi = _vec(gt_ignore, n, "gt_ignore", bool, default=False)
    pi = _vec(pred_ignore, k, "pred_ignore", bool, default=False)
    if matrix is None:
        m = similarity(p, g, metric)
    else:
        m = _np(matrix, np.float64, "matrix")
        if m.shape != (k, n):
            raise ValueError(f"matrix must have shape (K, G) = ({k}, {n}), got {m.shape}")
    order = np.argsort(-scores, kind="stable")
    tp, ignored, gt_index = _greedy(m, thr, metric, order, gi, pi)
    return FrameMatch(scores, tp, ignored, gt_index, int((~gi).sum()))


# ----------------------------------------------------------------------------- AP

def average_precision(scores, tp, num_gt: int, recall_points: int = RECALL_POINTS) -> float:
    """KITTI average precision with ``recall_points`` interpolation points (R40 by default).

    Args:
        scores: (M,) scores of the evaluated (non-ignored) detections of all frames.
        tp: (M,) bool, True for a true positive (else a false positive).
        num_gt: number of valid GT objects over all frames.

    Returns ``mean_{r = 1/R, ..., R/R} max{precision at recall >= r}`` (0 where recall never
    reaches ``r``), in ``[0, 1]``; NaN when ``num_gt == 0``. Equal scores enter the
    precision/recall curve together.
    """
    s = _np(scores, np.float64, "scores").reshape(-1)
    t = _np(tp, bool, "tp").reshape(-1)
    if s.shape != t.shape:
        raise ValueError(f"scores and tp must have the same length, got {s.shape} and "
                         f"{t.shape}")
    if int(recall_points) < 1:
        raise ValueError(f"recall_points must be >= 1, got {recall_points}")
    num_gt = int(num_gt)
    if num_gt < 0:
        raise ValueError(f"num_gt must be >= 0, got {num_gt}")
    if int(t.sum()) > num_gt:
        raise ValueError(f"{int(t.sum())} true positives for only {num_gt} GT objects")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    if num_gt == 0:
        return math.nan
    if len(s) == 0:
        return 0.0
    order = np.argsort(-s, kind="stable")
    s, t = s[order], t[order]
    ctp = np.cumsum(t)
    cfp = np.cumsum(~t)
    last = np.r_[s[1:] != s[:-1], True]           # end of each run of equal scores
    ctp, cfp = ctp[last], cfp[last]
    recall = ctp / num_gt
    precision = ctp / (ctp + cfp)
    best = np.maximum.accumulate(precision[::-1])[::-1]     # max precision at recall >= ...
    r = np.arange(1, int(recall_points) + 1) / int(recall_points)
    idx = np.searchsorted(recall, r, side="left")           # first point with recall >= r
    p = np.where(idx < len(recall), best[np.minimum(idx, len(recall) - 1)], 0.0)
    return float(p.mean())


def band_label(band: tuple[float, float], unit_inf: str = "+") -> str:
    """``(20, 40)`` -> ``"20-40"``; an infinite upper end -> ``"40-edge"`` (``unit_inf="-edge"``)
    or ``"100+"`` (``"+"``)."""
    lo, hi = band
    return f"{lo:g}{unit_inf}" if math.isinf(hi) else f"{lo:g}-{hi:g}"


def _in_band(values: np.ndarray, band: tuple[float, float]) -> np.ndarray:
    return (values >= band[0]) & (values < band[1])


def _check_bands(bands, name: str) -> tuple[tuple[float, float], ...]:
    out = tuple((float(lo), float(hi)) for lo, hi in bands)
    for lo, hi in out:
        if not lo < hi:
            raise ValueError(f"{name}: each band must be (lo, hi) with lo < hi, got {(lo, hi)}")
    return out


# ----------------------------------------------------------------------------- evaluator

@dataclass
class _ClassFrame:
    """One frame's detections and GT of one class, with their similarity matrices."""
    scores: np.ndarray            # (K,)
    order: np.ndarray             # (K,) by descending score
    det_range: np.ndarray         # (K,) centre distance [m]
    det_points: np.ndarray | None  # (K,) points in the box, when given
    det_in_region: np.ndarray     # (K,) bool
    gt_range: np.ndarray          # (G,)
    gt_points: np.ndarray         # (G,)
    gt_dontcare: np.ndarray       # (G,) bool: too few points or outside the region
    gt_active: np.ndarray | None  # (G,) bool: centre tile active
    mats: dict[str, np.ndarray]   # metric -> (K, G)


def _unpack(obj, keys: tuple[str, ...], name: str):
    if isinstance(obj, Mapping):
        missing = [k for k in keys if k not in obj]
        if missing:
            raise ValueError(f"{name} lacks {', '.join(missing)} (needs {', '.join(keys)})")
        return tuple(obj[k] for k in keys)
    if all(hasattr(obj, k) for k in keys):
        return tuple(getattr(obj, k) for k in keys)
    if isinstance(obj, Sequence) and len(obj) == len(keys):
        return tuple(obj)
    raise ValueError(f"{name} must be ({', '.join(keys)}): a tuple, a mapping or an object "
                     f"with those attributes, got {type(obj).__name__}")


class Evaluator:
    """Accumulates frames, then :meth:`results` gives every AP of the module docstring.

    Args:
        classes: class names; labels index them (default: the simulator's classes).
        iou_thresholds: class -> IoU threshold for BEV and 3D AP (default
            :data:`IOU_THRESHOLDS`; every class needs one).
        dist_thresholds: centre-distance thresholds in metres.
        min_points: GT with fewer LiDAR points are don't care.
        range_bands, point_bands: ``[lo, hi)`` bands (see the module docstring).
        region: ``(x_min, x_max, y_min, y_max)`` or an object with those attributes (a
            ``GridConfig``): GT centred outside are don't care, detections outside ignored
            unless they match; default everywhere.
        recall_points: interpolation points of AP.

    ``add(detections, gt, extra=None, *, active_centre=None, pred_num_points=None)`` per frame.
    """

    def __init__(self, classes: Sequence[str] = CLASSES, *,
                 iou_thresholds: Mapping[str, float] | None = None,
                 dist_thresholds: Sequence[float] = DIST_THRESHOLDS,
                 min_points: int = MIN_POINTS,
                 range_bands: Sequence[tuple[float, float]] = RANGE_BANDS,
                 point_bands: Sequence[tuple[float, float]] = POINT_BANDS,
                 region: Any = None, recall_points: int = RECALL_POINTS):
        self.classes = tuple(classes)
        if not self.classes or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must be distinct names, got {self.classes}")
        thr = dict(IOU_THRESHOLDS if iou_thresholds is None else iou_thresholds)
        missing = [c for c in self.classes if c not in thr]
        if missing:
            raise ValueError(f"iou_thresholds has no threshold for class(es) "
                             f"{', '.join(missing)}")
        self.iou_thresholds = {c: _check_threshold(thr[c], "bev") for c in self.classes}
        self.dist_thresholds = tuple(_check_threshold(d, "dist") for d in dist_thresholds)
        if not self.dist_thresholds:
            raise ValueError("dist_thresholds must name at least one distance")
        self.min_points = int(min_points)
        self.range_bands = _check_bands(range_bands, "range_bands")
        self.point_bands = _check_bands(point_bands, "point_bands")
        self.region = self._region(region)
        if int(recall_points) < 1:
            raise ValueError(f"recall_points must be >= 1, got {recall_points}")
        self.recall_points = int(recall_points)
        self._frames: list[list[_ClassFrame]] = []
        self._extra: dict[str, list[float]] = {}
        self._fallback_frames = 0

    @staticmethod
    def _region(region) -> tuple[float, float, float, float] | None:
        if region is None:
            return None
        if all(hasattr(region, k) for k in ("x_min", "x_max", "y_min", "y_max")):
            region = (region.x_min, region.x_max, region.y_min, region.y_max)
        r = tuple(float(v) for v in region)
        if len(r) != 4 or not (r[0] < r[1] and r[2] < r[3]):
            raise ValueError(f"region must be (x_min, x_max, y_min, y_max) with min < max, got "
                             f"{region}")
        return r

    def _inside(self, boxes: np.ndarray) -> np.ndarray:
        if self.region is None:
            return np.ones(len(boxes), bool)
        x0, x1, y0, y1 = self.region
        return ((boxes[:, 0] >= x0) & (boxes[:, 0] < x1) & (boxes[:, 1] >= y0)
                & (boxes[:, 1] < y1))

    def __len__(self) -> int:
        return len(self._frames)

    def add(self, detections, gt, extra: Mapping[str, float] | None = None, *,
            active_centre=None, pred_num_points=None) -> None:
        """Add one frame.

        Args:
            detections: ``(boxes (K, 7), scores (K,), labels (K,))`` as a tuple, a mapping or an
                object with those attributes (``model.decode.Detections``), or a pipeline
                ``FrameResult`` (its ``detections``; its ``active_fraction`` goes into
                ``extra`` unless given there, and a ``mask_fallback`` is counted).
            gt: ``(boxes (G, 7), labels (G,), num_points (G,))`` likewise (a ``SimDataset``
                item works as it is).
            extra: per-frame numbers to average over frames (e.g. ``active_fraction``).
            active_centre: (G,) bool, whether each GT's centre tile was active in the mask.
            pred_num_points: (K,) LiDAR points in each detected box (points-in-box bands).
        """
        extra = dict(extra or {})
        if hasattr(detections, "detections") and hasattr(detections, "active_fraction"):
            extra.setdefault("active_fraction", float(detections.active_fraction))
            if getattr(detections, "mask_fallback", ""):
                self._fallback_frames += 1
            detections = detections.detections
        db, ds, dl = _unpack(detections, ("boxes", "scores", "labels"), "detections")
        gb, gl, gn = _unpack(gt, ("boxes", "labels", "num_points"), "gt")
        db, gb = _boxes(db, "detection boxes"), _boxes(gb, "gt boxes")
        k, n = len(db), len(gb)
        ds = _vec(ds, k, "detection scores", np.float64)
        if np.isnan(ds).any():
            raise ValueError("detection scores contain NaN")
        dl = _vec(dl, k, "detection labels", np.int64)
        gl = _vec(gl, n, "gt labels", np.int64)
        gn = _vec(gn, n, "gt num_points", np.float64)
        for lab, name in ((dl, "detection labels"), (gl, "gt labels")):
            bad = lab[(lab < 0) | (lab >= len(self.classes))]
            if len(bad):
                raise ValueError(f"{name} must index the {len(self.classes)} classes "
                                 f"{self.classes}, got {int(bad[0])}")
        act = None if active_centre is None else _vec(active_centre, n, "active_centre", bool)
        dpts = (None if pred_num_points is None
                else _vec(pred_num_points, k, "pred_num_points", np.float64))
        d_range = np.hypot(db[:, 0], db[:, 1])
        g_range = np.hypot(gb[:, 0], gb[:, 1])
        d_in = self._inside(db)
        g_care = (gn >= self.min_points) & self._inside(gb)
        per_class = []
        for c in range(len(self.classes)):
            di, gi = np.flatnonzero(dl == c), np.flatnonzero(gl == c)
            pb, tb = db[di], gb[gi]
            mats = {m: similarity(pb, tb, m) for m in METRICS}
            per_class.append(_ClassFrame(
                scores=ds[di], order=np.argsort(-ds[di], kind="stable"),
                det_range=d_range[di], det_points=None if dpts is None else dpts[di],
                det_in_region=d_in[di], gt_range=g_range[gi], gt_points=gn[gi],
                gt_dontcare=~g_care[gi], gt_active=None if act is None else act[gi],
                mats=mats))
        self._frames.append(per_class)
        for key, v in extra.items():
            self._extra.setdefault(key, []).append(float(v))

    def _ap(self, c: int, metric: str, thr: float, kind: str | None = None,
            band: tuple[float, float] | None = None) -> dict[str, Any]:
        """AP of class ``c`` for one metric and threshold, optionally in one band of
        ``kind`` ("range" or "points")."""
        scores, tps = [], []
        num_gt = 0
        for frame in self._frames:
            f = frame[c]
            gt_ign = f.gt_dontcare
            pred_ign = ~f.det_in_region
            if kind == "range":
                gt_ign = gt_ign | ~_in_band(f.gt_range, band)
                pred_ign = pred_ign | ~_in_band(f.det_range, band)
            elif kind == "points":
                gt_ign = gt_ign | ~_in_band(f.gt_points, band)
                if f.det_points is not None:
                    pred_ign = pred_ign | ~_in_band(f.det_points, band)
            num_gt += int((~gt_ign).sum())
            if len(f.scores) == 0:
                continue
            tp, ignored, _ = _greedy(f.mats[metric], thr, metric, f.order, gt_ign, pred_ign)
            scores.append(f.scores[~ignored])
            tps.append(tp[~ignored])
        s = np.concatenate(scores) if scores else np.zeros(0)
        t = np.concatenate(tps) if tps else np.zeros(0, bool)
        ap = average_precision(s, t, num_gt, self.recall_points)
        return {"ap": ap, "num_gt": num_gt, "tp": int(t.sum()), "fp": int((~t).sum())}

    def _metric_set(self, c: int, kind: str | None = None, band=None) -> dict[str, Any]:
        thr = self.iou_thresholds[self.classes[c]]
        bev = self._ap(c, "bev", thr, kind, band)
        d3 = self._ap(c, "3d", thr, kind, band)
        dist = {f"{d:g}": self._ap(c, "dist", d, kind, band)["ap"] for d in self.dist_thresholds}
        vals = list(dist.values())
        return {"num_gt": bev["num_gt"], "ap_bev": bev["ap"], "ap_3d": d3["ap"],
                "ap_dist": dist,
                "ap_dist_mean": math.nan if bev["num_gt"] == 0 else float(np.mean(vals)),
                "tp_bev": bev["tp"], "fp_bev": bev["fp"], "tp_3d": d3["tp"], "fp_3d": d3["fp"]}

    def results(self) -> dict[str, Any]:
        """Every metric of the frames added so far::

            {"frames": int, "fallback_frames": int, "extra": {name: mean over frames},
             "mask_recall": float (NaN without active_centre or evaluated GT),
             "mask_recall_objects": int,
             "settings": {iou_thresholds, dist_thresholds, min_points, bands, region, ...},
             "classes": {class: {"iou_threshold", "num_gt", "num_dontcare", "num_det",
                                 "ap_bev", "ap_3d", "ap_dist": {"0.5": ap, ...},
                                 "ap_dist_mean", "tp_bev", "fp_bev", "tp_3d", "fp_3d",
                                 "mask_recall",
                                 "range": {"0-20": {num_gt, ap_bev, ap_3d, ap_dist,
                                                    ap_dist_mean, ...}, ...},
                                 "points": {"5-20": {...}, ...}}},
             "mean": {"ap_bev", "ap_3d", "ap_dist_mean", "range": {band: {...}},
                      "points": {band: {...}}}}

        AP values are in [0, 1], NaN when a class has no evaluated GT (see the module
        docstring); ``mean`` averages the classes that are not NaN.
        """
        out: dict[str, Any] = {
            "frames": len(self._frames), "fallback_frames": self._fallback_frames,
            "extra": {k: float(np.mean(v)) for k, v in self._extra.items()},
            "settings": {"classes": list(self.classes),
                         "iou_thresholds": dict(self.iou_thresholds),
                         "dist_thresholds": list(self.dist_thresholds),
                         "min_points": self.min_points,
                         "range_bands": [band_label(b, "-edge") for b in self.range_bands],
                         "point_bands": [band_label(b, "+") for b in self.point_bands],
                         "region": None if self.region is None else list(self.region),
                         "recall_points": self.recall_points},
            "classes": {}}
        act_hit = act_all = 0
        for c, name in enumerate(self.classes):
            res = self._metric_set(c)
            frames = [f[c] for f in self._frames]
            hit = sum(int((f.gt_active & ~f.gt_dontcare).sum()) for f in frames
                      if f.gt_active is not None)
            tot = sum(int((~f.gt_dontcare).sum()) for f in frames if f.gt_active is not None)
            act_hit, act_all = act_hit + hit, act_all + tot
            res.update(iou_threshold=self.iou_thresholds[name],
                       num_dontcare=sum(int(f.gt_dontcare.sum()) for f in frames),
                       num_det=sum(len(f.scores) for f in frames),
                       mask_recall=hit / tot if tot else math.nan)
            res["range"] = {band_label(b, "-edge"): self._metric_set(c, "range", b)
                            for b in self.range_bands}
            res["points"] = {band_label(b, "+"): self._metric_set(c, "points", b)
                             for b in self.point_bands}
            out["classes"][name] = res
        out["mask_recall"] = act_hit / act_all if act_all else math.nan
        out["mask_recall_objects"] = act_all
        cls = list(out["classes"].values())
        keys = ("ap_bev", "ap_3d", "ap_dist_mean")
        out["mean"] = {k: _nanmean([r[k] for r in cls]) for k in keys}
        for kind in ("range", "points"):
            out["mean"][kind] = {b: {k: _nanmean([r[kind][b][k] for r in cls]) for k in keys}
                                 | {"num_gt": sum(r[kind][b]["num_gt"] for r in cls)}
                                 for b in cls[0][kind]}
        return out


def _nanmean(values: Sequence[float]) -> float:
    v = [x for x in values if x is not None and not math.isnan(x)]
    return float(np.mean(v)) if v else math.nan


# ----------------------------------------------------------------------------- reports

def format_value(value: Any, kind: str = "pct") -> str:
    """The one formatter of the reports: ``"pct"`` a fraction in [0, 1] as a percentage with
    one decimal (``0.8734`` -> ``"87.3"``), ``"int"`` an integer; None / NaN -> ``"–"``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if kind == "pct":
        return f"{100.0 * float(value):.1f}"
    if kind == "int":
        return str(int(value))
    raise ValueError(f"kind must be 'pct' or 'int', got {kind!r}")


Row = tuple[str, Callable[[dict], Any], str]


def _summary_rows(sample: dict) -> list[Row]:
    """(label, getter, kind) of the main table's rows, from one results dict's classes."""
    rows: list[Row] = []
    classes = sample["classes"]
    for metric, name in (("ap_bev", "BEV"), ("ap_3d", "3D")):
        for c, r in classes.items():
            rows.append((f"{c} AP {name}@{r['iou_threshold']:g}",
                         lambda res, c=c, m=metric: res["classes"][c][m], "pct"))
    dists = "/".join(f"{d:g}" for d in sample["settings"]["dist_thresholds"])
    for c in classes:
        rows.append((f"{c} AP dist ({dists} m)",
                     lambda res, c=c: res["classes"][c]["ap_dist_mean"], "pct"))
    rows += [("mAP BEV", lambda res: res["mean"]["ap_bev"], "pct"),
             ("mAP 3D", lambda res: res["mean"]["ap_3d"], "pct"),
             ("mAP dist", lambda res: res["mean"]["ap_dist_mean"], "pct"),
             ("active tiles %", lambda res: res["extra"].get("active_fraction"), "pct"),
             ("mask recall %", lambda res: res["mask_recall"], "pct"),
             ("GT evaluated", lambda res: sum(r["num_gt"] for r in res["classes"].values()),
              "int"),
             ("frames", lambda res: res["frames"], "int")]
    return rows


def _band_rows(sample: dict, kind: str) -> list[Row]:
    rows: list[Row] = []
    for band in sample["mean"][kind]:
        for key, name, fmt in (("ap_bev", "mAP BEV", "pct"), ("ap_3d", "mAP 3D", "pct"),
                               ("ap_dist_mean", "mAP dist", "pct"), ("num_gt", "GT", "int")):
            rows.append((f"{band}: {name}",
                         lambda res, b=band, k=key: res["mean"][kind][b][k], fmt))
    return rows


def _check_nested(results_by_preset_and_mode) -> tuple[list[str], list[str], dict]:
    if not isinstance(results_by_preset_and_mode, Mapping) or not results_by_preset_and_mode:
        raise ValueError("results_by_preset_and_mode must be a non-empty mapping "
                         "{preset: {mask mode: Evaluator.results()}}")
    modes: list[str] = []
    sample = None
    for preset, by_mode in results_by_preset_and_mode.items():
        if not isinstance(by_mode, Mapping) or not by_mode:
            raise ValueError(f"results for preset {preset!r} must be a non-empty mapping "
                             "{mask mode: Evaluator.results()}")
        for mode, res in by_mode.items():
            if not isinstance(res, Mapping) or "classes" not in res:
                raise ValueError(f"results[{preset!r}][{mode!r}] is not an "
                                 "Evaluator.results() dict")
            sample = sample or res
            if mode not in modes:
                modes.append(mode)
    return list(results_by_preset_and_mode), modes, sample


def _table(results_by_preset_and_mode, rows: list[Row], presets: list[str], modes: list[str],
           default_mode: str | None, held_out: Sequence[str], what: str) -> list[str]:
    head = [m + (" (default)" if m == default_mode else "") for m in modes]
    lines = [f"| preset | {what} | " + " | ".join(head) + " |",
             "|---|---|" + "---:|" * len(modes)]
    for preset in presets:
        by_mode = results_by_preset_and_mode[preset]
        name = f"**{preset}**" + (" (held out)" if preset in held_out else "")
        for i, (label, get, kind) in enumerate(rows):
            cells = [format_value(get(by_mode[m]), kind) if m in by_mode else "–"
                     for m in modes]
            lines.append(f"| {name if i == 0 else ''} | {label} | " + " | ".join(cells) + " |")
    return lines


def to_markdown(results_by_preset_and_mode: Mapping[str, Mapping[str, dict]], *,
                default_mode: str | None = None, held_out: Sequence[str] = (),
                title: str = "Detection quality") -> str:
    """Markdown tables of ``{preset: {mask mode: Evaluator.results()}}``: one column per mask
    mode (in order of first appearance; ``default_mode`` marked), one row block per preset
    (``held_out`` presets marked): the summary, then by range band, then by points-in-box band
    (class means). AP in %, KITTI R40; "–": no such objects (or mode not run)."""
    presets, modes, sample = _check_nested(results_by_preset_and_mode)
    s = sample["settings"]
    out = [f"## {title}", "",
           f"AP in % (KITTI R40, {s['recall_points']} recall points); rotated IoU thresholds "
           + ", ".join(f"{c} {t:g}" for c, t in s["iou_thresholds"].items())
           + "; centre-distance AP averaged over "
           + "/".join(f"{d:g}" for d in s["dist_thresholds"])
           + f" m. GT with fewer than {s['min_points']} points are don't care. "
           "\"–\": no such objects.", ""]
    out += _table(results_by_preset_and_mode, _summary_rows(sample), presets, modes,
                  default_mode, held_out, "metric")
    for kind, what in (("range", "By range band [m]"), ("points", "By points in box")):
        out += ["", f"### {what}", ""]
        out += _table(results_by_preset_and_mode, _band_rows(sample, kind), presets, modes,
                      default_mode, held_out, "band: metric")
    return "\n".join(out) + "\n"


def headline(results_by_preset_and_mode: Mapping[str, Mapping[str, dict]],
             preset: str | None = None, mode: str | None = None) -> str:
    """A one-row markdown table (header, separator, row) for ``preset`` and ``mode`` (default:
    the first of each): BEV AP per class, mAP 3D, mAP dist, active tiles, mask recall."""
    presets, modes, _ = _check_nested(results_by_preset_and_mode)
    preset = presets[0] if preset is None else preset
    if preset not in results_by_preset_and_mode:
        raise ValueError(f"preset {preset!r} is not in the results ({', '.join(presets)})")
    by_mode = results_by_preset_and_mode[preset]
    mode = next(iter(by_mode)) if mode is None else mode
    if mode not in by_mode:
        raise ValueError(f"mask mode {mode!r} was not evaluated for preset {preset!r} "
                         f"({', '.join(by_mode)})")
    res = by_mode[mode]
    rows = [r for r in _summary_rows(res)
            if " AP BEV@" in r[0] or r[0] in ("mAP 3D", "mAP dist", "active tiles %",
                                              "mask recall %")]
    head = ["preset", "mask"] + [r[0] for r in rows]
    cells = [preset, mode] + [format_value(get(res), kind) for _, get, kind in rows]
    return "\n".join(["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * len(rows),
                      "| " + " | ".join(cells) + " |"]) + "\n"


def to_jsonable(obj: Any) -> Any:
    """``obj`` with NaN / inf as None, numpy scalars and arrays as Python values."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        return None if not math.isfinite(float(obj)) else float(obj)
    return obj


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` (e.g. ``{preset: {mode: results}}``) as strict JSON (NaN -> null)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(obj), indent=1, allow_nan=False) + "\n")
    return path


def write_report(directory: str | Path, results_by_preset_and_mode, *, stem: str = "eval",
                 **markdown_kw) -> tuple[Path, Path]:
    """``<directory>/<stem>.json`` and ``<stem>.md`` (:func:`to_markdown`); returns both."""
    d = Path(directory)
    md = to_markdown(results_by_preset_and_mode, **markdown_kw)
    j = write_json(d / f"{stem}.json", results_by_preset_and_mode)
    m = d / f"{stem}.md"
    m.write_text(md)
    return j, m
