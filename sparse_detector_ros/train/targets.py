"""CenterPoint-style training targets and losses for the head of :mod:`..model.network`.

The targets are the exact inverse of :func:`sparse_detector_ros.model.decode.decode`: they use
the head format written down in :mod:`sparse_detector_ros.model.decode` (output grid of stride
``S`` over the BEV grid, row ``i`` = x index, col ``j`` = y index). For a box
``(x, y, z, l, w, h, yaw)`` (:mod:`sparse_detector_ros.boxes`) whose centre lies in the BEV
extent ``[x_min, x_max) x [y_min, y_max)``::

    fx = (x - x_min) / (S * resolution),  i = floor(fx),  dx = fx - i      (same for y: j, dy)
    offset = (dx, dy),  z = z,  size = (log l, log w, log h),  rot = (sin yaw, cos yaw),
    axis = (sin 2 yaw, cos 2 yaw)

written at the centre cell ``(i, j)``; decoding that cell gives the box back (to float32
rounding). Boxes whose centre lies outside the BEV extent are dropped (a box partly outside
is kept: only its centre matters). The output grid has ``Ho = ceil(H / S)`` rows and
``Wo = ceil(W / S)`` columns, the size the network's stride-2 convolutions (padding 1) give.

Heatmap. Channel ``c`` holds, for every object of class ``c``, a Gaussian centred on its centre
cell: ``exp(-(a^2 + b^2) / (2 sigma^2))`` at the cell ``(i + a, j + b)`` for
``|a|, |b| <= r``, 0 outside that window, ``sigma = (2r + 1) / 6``; overlapping Gaussians
combine by maximum. The centre cell holds exactly 1.0, and only centre cells do (what the
focal loss counts as positives). The radius is ``r = max(min_radius, floor(gaussian_radius(l,
w)))`` with the box's length and width in output cells (:func:`gaussian_radius`, minimum
overlap 0.1 as in CenterPoint).

Several objects in one centre cell: each paints its class's heatmap; the first of them (in
input order) gives the regression target of the cell.

Regression around the centre (``reg_radius`` ``R`` > 0): the regression targets are also
written at the cells ``(i + a, j + b)``, ``|a|, |b| <= R``, around each centre cell, with the
offset measured from that cell (``dx = fx - (i + a)``, so outside [0, 1)): a heatmap peak one
cell off the centre then still decodes the object's box, not an untrained one. A cell near
several objects takes the one whose centre is nearest; a centre cell always keeps its own. The
loss weighs such a cell by the object's heatmap value there (the centre cell by 1.0), so a
cell that is likelier to be the peak counts more.

Far objects (``far_weight`` W > 0): the regression weights of an object's cells are multiplied
by ``1 + W * ramp(range)``, the ramp rising from 0 at 20 m to 1 at 40 m from the sensor. Far
objects have few points and often one face seen, and their boxes are the hardest to place; the
losses stay normalised by the sum of the weights, so this moves the loss towards them.

Losses: :func:`focal_loss` (penalty-reduced focal loss of CenterNet on the heatmap logits) and
:func:`reg_loss` (L1 on the regression maps at the cells with a target, weighted), both
normalised by the number of objects (the sum of the regression weights).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..boxes import BOX_DIM
from ..config import GridConfig

__all__ = ["REG_KEYS", "MIN_OVERLAP", "FAR_RAMP", "gaussian_radius", "output_shape", "encode",
           "iou_loss", "encode_batch", "focal_loss", "reg_loss"]

#: the regression maps of the head (the keys of :mod:`..model.decode` besides ``heatmap``)
REG_KEYS: dict[str, int] = {"offset": 2, "z": 1, "size": 3, "rot": 2, "axis": 2}
#: CenterPoint's minimum overlap for the Gaussian radius
MIN_OVERLAP = 0.1
#: ranges [m] over which the regression weight of ``far_weight`` rises from 1 to its full value
#: (the evaluation's middle range band, 20-40 m: beyond it the weight is full)
FAR_RAMP = (20.0, 40.0)


def gaussian_radius(length, width, min_overlap: float = MIN_OVERLAP) -> np.ndarray:
    """The Gaussian radius of CenterNet / CenterPoint for boxes of ``length x width`` (in
    output cells; arrays or floats of one shape) -> float64 array of that shape.

    The radius is how far the corners of a predicted box may move while the prediction still
    overlaps the ground truth by about ``min_overlap``. Three cases, each a quadratic
    ``a r^2 + b r + c = 0`` in ``r`` with ``s = l + w`` and ``p = l * w``, evaluated the way
    CenterPoint evaluates them (``r = (b + sqrt(b^2 - 4ac)) / 2``):

    * one corner moves inward and the other outward: ``a = 1``, ``b = s``,
      ``c = p (1 - o) / (1 + o)``;
    * both corners move inward (the prediction lies inside the truth): ``a = 4``, ``b = 2 s``,
      ``c = (1 - o) p``;
    * both corners move outward (the truth lies inside the prediction): ``a = 4 o``,
      ``b = -2 o s``, ``c = (o - 1) p``;

    and the radius is the smallest of the three. (The exact root of each quadratic would
    divide by ``2a``; CenterPoint's training recipes, the 0.1 overlap included, are tuned with
    this form, so it is kept.)
    """
    o = float(min_overlap)
    if not 0.0 < o < 1.0:
        raise ValueError(f"min_overlap = {min_overlap!r} must be in (0, 1)")
    l = np.asarray(length, np.float64)
    w = np.asarray(width, np.float64)
    s, p = l + w, l * w
    radii = []
    for a, b, c in ((1.0, s, p * (1.0 - o) / (1.0 + o)),
                    (4.0, 2.0 * s, (1.0 - o) * p),
                    (4.0 * o, -2.0 * o * s, (o - 1.0) * p)):
        radii.append((b + np.sqrt(np.maximum(b * b - 4.0 * a * c, 0.0))) / 2.0)
    return np.minimum(np.minimum(radii[0], radii[1]), radii[2])


def output_shape(grid: GridConfig, stride: int) -> tuple[int, int]:
    """``(Ho, Wo) = (ceil(H / stride), ceil(W / stride))`` for the BEV grid's ``(H, W)``."""
    if not isinstance(stride, (int, np.integer)) or isinstance(stride, bool) or stride < 1:
        raise ValueError(f"stride must be an int >= 1, got {stride!r}")
    h, w = grid.shape
    return -(-h // int(stride)), -(-w // int(stride))


def _as_numpy(a, dtype, name: str) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    try:
        return np.asarray(a, dtype=dtype)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be numeric, got {type(a).__name__}") from None


def _gaussian_at(d2, radius: int):
    """The heatmap Gaussian of radius ``radius`` at squared cell distance ``d2`` from its
    centre: ``exp(-d2 / (2 sigma^2))``, ``sigma = (2r + 1) / 6``."""
    sigma = (2 * radius + 1) / 6.0
    return np.exp(-d2 / (2.0 * sigma * sigma))


def _gaussian(radius: int) -> np.ndarray:
    """``(2r+1, 2r+1)`` float32 Gaussian with 1.0 at the centre (:func:`_gaussian_at`)."""
    d = np.arange(-radius, radius + 1, dtype=np.float64)
    return _gaussian_at(d[:, None] ** 2 + d[None, :] ** 2, radius).astype(np.float32)


def encode(boxes, labels, grid: GridConfig, stride: int, num_classes: int,
           min_radius: int = 2, min_overlap: float = MIN_OVERLAP,
           reg_radius: int = 0, far_weight: float = 0.0) -> dict[str, torch.Tensor]:
    """Targets of one sample (see the module docstring).

    Args:
        boxes: ``(K, 7)`` ``(x, y, z, l, w, h, yaw)`` in the sensor frame (numpy or torch),
            ``l, w, h > 0``.
        labels: ``(K,)`` ints in ``[0, num_classes)``: the heatmap channel of each box.
        grid: the BEV grid of the sample (a crop's sub-grid for a cropped sample).
        stride: the output grid's stride (``SparseBEVNet.out_stride``).
        num_classes: heatmap channels ``K``.
        min_radius: smallest Gaussian radius, in output cells.
        min_overlap: overlap of :func:`gaussian_radius`.
        reg_radius: also write the regression targets at the cells within this many cells of
            each centre cell (see the module docstring; 0: centre cells only).
        far_weight: the regression weight of an object's cells grows with its range from the
            sensor (the grid's origin): ``1 + far_weight * ramp``, ``ramp`` rising linearly
            from 0 at :data:`FAR_RAMP` [0] to 1 at :data:`FAR_RAMP` [1] metres; 0: every
            object weighs the same.

    Returns:
        dict of float32 tensors on the CPU, ``Ho, Wo`` from :func:`output_shape`:
        ``heatmap (num_classes, Ho, Wo)``, ``offset (2, Ho, Wo)``, ``z (1, Ho, Wo)``,
        ``size (3, Ho, Wo)``, ``rot (2, Ho, Wo)``, ``axis (2, Ho, Wo)`` (0 away from the
        cells with a target) and ``mask (Ho, Wo)``, the regression weight: 1.0 on the centre
        cells, the object's heatmap value on the other cells with a target (``reg_radius``),
        else 0.0.

    Raises:
        ValueError naming the argument that is wrong.
    """
    ho, wo = output_shape(grid, stride)
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    if not isinstance(min_radius, (int, np.integer)) or min_radius < 0:
        raise ValueError(f"min_radius must be an int >= 0, got {min_radius!r}")
    if (not isinstance(reg_radius, (int, np.integer)) or isinstance(reg_radius, bool)
            or reg_radius < 0):
        raise ValueError(f"reg_radius must be an int >= 0, got {reg_radius!r}")
    if (isinstance(far_weight, bool) or not isinstance(far_weight, (int, float, np.number))
            or not np.isfinite(far_weight) or far_weight < 0):
        raise ValueError(f"far_weight must be a finite number >= 0, got {far_weight!r}")
    b = _as_numpy(boxes, np.float64, "boxes")
    if b.size == 0:
        b = b.reshape(0, BOX_DIM)
    if b.ndim != 2 or b.shape[1] != BOX_DIM:
        raise ValueError(f"boxes must have shape (K, {BOX_DIM}) (x, y, z, l, w, h, yaw), got "
                         f"{b.shape}")
    lab = _as_numpy(labels, np.float64, "labels").reshape(-1)
    if lab.shape != (len(b),):
        raise ValueError(f"labels must have shape (K,) = ({len(b)},) like boxes, got "
                         f"{_as_numpy(labels, np.float64, 'labels').shape}")
    if len(lab) and (np.any(lab != np.floor(lab)) or lab.min() < 0 or lab.max() >= num_classes):
        raise ValueError(f"labels must be ints in [0, {num_classes}), got values "
                         f"{sorted(set(lab.tolist()))}")
    if not np.all(np.isfinite(b)):
        raise ValueError("boxes must be finite (found NaN or Inf)")
    if len(b) and not np.all(b[:, 3:6] > 0):
        raise ValueError("boxes must have l, w, h > 0 (their logs are the size targets)")
    lab = lab.astype(np.int64)

    heatmap = np.zeros((num_classes, ho, wo), np.float32)
    reg = {key: np.zeros((c, ho, wo), np.float32) for key, c in REG_KEYS.items()}
    mask = np.zeros((ho, wo), np.float32)
    inside = ((b[:, 0] >= grid.x_min) & (b[:, 0] < grid.x_max)
              & (b[:, 1] >= grid.y_min) & (b[:, 1] < grid.y_max))
    b, lab = b[inside], lab[inside]
    if len(b):
        cell = float(stride) * float(grid.resolution)
        fx = (b[:, 0] - grid.x_min) / cell
        fy = (b[:, 1] - grid.y_min) / cell
        # clip: a centre a hair below x_max could round to the next (absent) cell
        i = np.minimum(np.floor(fx).astype(np.int64), ho - 1)
        j = np.minimum(np.floor(fy).astype(np.int64), wo - 1)
        radius = np.maximum(
            np.floor(gaussian_radius(b[:, 3] / cell, b[:, 4] / cell, min_overlap)).astype(int),
            int(min_radius))
        # the regression weight's range factor of each object (1.0 without far_weight)
        ramp = np.clip((np.hypot(b[:, 0], b[:, 1]) - FAR_RAMP[0]) / (FAR_RAMP[1] - FAR_RAMP[0]),
                       0.0, 1.0)
        factor = (1.0 + float(far_weight) * ramp).astype(np.float32)
        kernels: dict[int, np.ndarray] = {}
        for k in range(len(b)):
            r = int(radius[k])
            g = kernels.get(r)
            if g is None:
                g = kernels[r] = _gaussian(r)
            ci, cj = int(i[k]), int(j[k])
            i0, i1 = max(ci - r, 0), min(ci + r + 1, ho)
            j0, j1 = max(cj - r, 0), min(cj + r + 1, wo)
            win = heatmap[lab[k], i0:i1, j0:j1]
            np.maximum(win, g[i0 - ci + r:i1 - ci + r, j0 - cj + r:j1 - cj + r], out=win)
        if reg_radius:
            # the cells around the centres: each takes the object whose centre is nearest
            # (the centre cells, written below, keep their own object)
            near = np.full((ho, wo), np.inf)
            owner = np.full((ho, wo), -1, np.int64)
            weight = np.zeros((ho, wo), np.float32)
            for k in range(len(b)):
                ci, cj, r = int(i[k]), int(j[k]), int(radius[k])
                i0, i1 = max(ci - reg_radius, 0), min(ci + reg_radius + 1, ho)
                j0, j1 = max(cj - reg_radius, 0), min(cj + reg_radius + 1, wo)
                ii, jj = np.mgrid[i0:i1, j0:j1]
                d = (ii + 0.5 - fx[k]) ** 2 + (jj + 0.5 - fy[k]) ** 2
                take = d < near[i0:i1, j0:j1]
                near[i0:i1, j0:j1][take] = d[take]
                owner[i0:i1, j0:j1][take] = k
                g = _gaussian_at((ii - ci) ** 2 + (jj - cj) ** 2, r)
                weight[i0:i1, j0:j1][take] = g[take] * factor[k]
            ni, nj = np.nonzero(owner >= 0)
            k = owner[ni, nj]
            _write_reg(reg, ni, nj, b[k], fx[k], fy[k])
            mask[ni, nj] = weight[ni, nj]
        # regression: the first object of each centre cell
        flat = i * wo + j
        _, first = np.unique(flat, return_index=True)
        i, j, b, fx, fy = i[first], j[first], b[first], fx[first], fy[first]
        _write_reg(reg, i, j, b, fx, fy)
        mask[i, j] = factor[first]
    out = {"heatmap": torch.from_numpy(heatmap)}
    out.update({key: torch.from_numpy(v) for key, v in reg.items()})
    out["mask"] = torch.from_numpy(mask)
    return out


def _write_reg(reg: dict[str, np.ndarray], i: np.ndarray, j: np.ndarray, b: np.ndarray,
               fx: np.ndarray, fy: np.ndarray) -> None:
    """The regression targets of boxes ``b`` at the cells ``(i, j)`` (``fx, fy``: the boxes'
    centres in output cells)."""
    reg["offset"][0, i, j] = fx - i
    reg["offset"][1, i, j] = fy - j
    reg["z"][0, i, j] = b[:, 2]
    reg["size"][:, i, j] = np.log(b[:, 3:6]).T
    reg["rot"][0, i, j] = np.sin(b[:, 6])
    reg["rot"][1, i, j] = np.cos(b[:, 6])
    reg["axis"][0, i, j] = np.sin(2 * b[:, 6])
    reg["axis"][1, i, j] = np.cos(2 * b[:, 6])


def encode_batch(boxes: Sequence, labels: Sequence, grid: GridConfig | Sequence[GridConfig],
                 stride: int, num_classes: int, min_radius: int = 2,
                 min_overlap: float = MIN_OVERLAP, reg_radius: int = 0,
                 far_weight: float = 0.0) -> dict[str, torch.Tensor]:
    """:func:`encode` of ``N`` samples, stacked: the same keys with a leading batch dimension
    (``heatmap (N, K, Ho, Wo)``, ..., ``mask (N, Ho, Wo)``).

    ``boxes``, ``labels``: ``N`` per-sample arrays; ``grid``: one grid for all samples or one
    per sample (crops of one size have sub-grids of one shape but different origins)."""
    n = len(boxes)
    if n == 0 or len(labels) != n:
        raise ValueError(f"boxes and labels must be two non-empty sequences of equal length "
                         f"(one entry per sample), got {n} and {len(labels)}")
    grids = [grid] * n if isinstance(grid, GridConfig) else list(grid)
    if len(grids) != n:
        raise ValueError(f"grid must be one GridConfig or one per sample ({n}), got {len(grids)}")
    shapes = {output_shape(g, stride) for g in grids}
    if len(shapes) != 1:
        raise ValueError(f"the samples' grids give different output shapes {sorted(shapes)}: "
                         "a batch needs one shape")
    parts = [encode(b, lab, g, stride, num_classes, min_radius, min_overlap, reg_radius,
                    far_weight)
             for b, lab, g in zip(boxes, labels, grids)]
    return {key: torch.stack([p[key] for p in parts]) for key in parts[0]}


def focal_loss(pred_logits: torch.Tensor, target_heatmap: torch.Tensor) -> torch.Tensor:
    """Penalty-reduced focal loss of CenterNet (``alpha = 2``, ``beta = 4``), a scalar.

    ``pred_logits`` and ``target_heatmap``: ``(N, K, Ho, Wo)`` (or any equal shapes); the
    target is 1.0 exactly at object centres (the positives) and in ``[0, 1)`` elsewhere. With
    ``p = sigmoid(logit)`` and ``y`` the target::

        positive:  -(1 - p)^2 log(p)
        negative:  -(1 - y)^4 p^2 log(1 - p)

    summed over all cells and divided by the number of positives (at least 1). ``log p`` and
    ``log(1 - p)`` come from ``logsigmoid``, so that no logit gives an infinite or NaN loss.
    """
    if pred_logits.shape != target_heatmap.shape:
        raise ValueError(f"pred_logits {tuple(pred_logits.shape)} and target_heatmap "
                         f"{tuple(target_heatmap.shape)} must have the same shape")
    x = pred_logits.float()
    y = target_heatmap.to(x)
    pos = y == 1.0
    log_p, log_q = F.logsigmoid(x), F.logsigmoid(-x)        # log p, log (1 - p)
    p, q = torch.sigmoid(x), torch.sigmoid(-x)
    pos_term = q.square() * log_p
    neg_term = (1.0 - y).pow(4) * p.square() * log_q
    loss = -torch.where(pos, pos_term, neg_term).sum()
    return loss / pos.sum().clamp(min=1)


def reg_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
             weights: Sequence[float] | None = None) -> torch.Tensor:
    """L1 regression loss on the cells with a target, a scalar.

    ``pred``, ``target``: ``(N, C, Ho, Wo)``; ``mask``: ``(N, Ho, Wo)``, each cell's weight
    (:func:`encode`: 1.0 on centre cells, 0 where there is no target); ``weights``: optional
    ``C`` channel weights. Returns ``sum over cells and channels of mask * weight_c * |pred -
    target|`` divided by the sum of the mask (at least 1): with a 0/1 mask, the per-object L1
    summed over channels, CenterPoint's normalisation. Cells outside the mask do not
    contribute (not even a NaN there).
    """
    if pred.shape != target.shape or pred.dim() != 4:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have "
                         "one shape (N, C, Ho, Wo)")
    n, c, ho, wo = pred.shape
    if tuple(mask.shape) != (n, ho, wo):
        raise ValueError(f"mask must have shape (N, Ho, Wo) = {(n, ho, wo)}, got "
                         f"{tuple(mask.shape)}")
    sel = mask != 0
    p = pred.permute(0, 2, 3, 1)[sel].float()                # (M, C)
    t = target.permute(0, 2, 3, 1)[sel].to(p)
    cw = mask[sel].to(p)
    err = (p - t).abs() * cw[:, None]
    if weights is not None:
        w = torch.as_tensor(weights, dtype=p.dtype, device=p.device)
        if w.shape != (c,):
            raise ValueError(f"weights must have {c} values (one per channel), got "
                             f"{tuple(w.shape)}")
        err = err * w
    return err.sum() / cw.sum().clamp(min=1.0)



def _cell_boxes(maps, sel: torch.Tensor, cell: float) -> torch.Tensor:
    """(M, 7) float64 footprints decoded from the regression maps at the cells ``sel`` (N, Ho,
    Wo) bool, relative to the grid's corner (x, y in metres; z = 0, h = 1: only the footprint
    counts); the yaw as :mod:`..model.decode` reads it (the axis turned towards ``rot`` when the
    maps have an ``axis``)."""
    from ..model.decode import LOG_SIZE_LIMIT, axis_yaw

    _, i, j = sel.nonzero(as_tuple=True)

    def at(key: str) -> torch.Tensor:
        return maps[key].permute(0, 2, 3, 1)[sel].double()

    off, size, rot = at("offset"), at("size"), at("rot")
    yaw = torch.atan2(rot[:, 0], rot[:, 1])
    if "axis" in maps:
        yaw = axis_yaw(at("axis"), yaw)
    lw = size[:, :2].clamp(-LOG_SIZE_LIMIT, LOG_SIZE_LIMIT).exp()
    zero, one = torch.zeros_like(yaw), torch.ones_like(yaw)
    return torch.stack([(i + off[:, 0]) * cell, (j + off[:, 1]) * cell, zero, lw[:, 0],
                        lw[:, 1], one, yaw], 1)


def iou_loss(head, targets, mask: torch.Tensor, cell: float) -> torch.Tensor:
    """The IoU branch's loss, a scalar: binary cross-entropy of ``head["iou"]`` (N, 1, Ho, Wo)
    logits against the BEV IoU of the box the head decodes at each cell with a target (``mask``
    (N, Ho, Wo), the cells' weights as in :func:`reg_loss`) with the target's box there
    (:func:`encode`), a soft target in [0, 1] computed without gradient; the weighted sum over
    the cells divided by the sum of the weights (at least 1).
    ``cell``: the output cell's size in metres (stride x resolution)."""
    from ..boxes import bev_iou_pairs

    sel = mask != 0
    logit = head["iou"][:, 0][sel].float()
    if len(logit) == 0:
        return head["iou"].sum() * 0.0
    with torch.no_grad():
        pred = _cell_boxes({k: v.detach() for k, v in head.items()}, sel, cell)
        want = _cell_boxes({k: targets[k] for k in ("offset", "size", "rot")}, sel, cell)
        q = bev_iou_pairs(pred, want).to(logit)
    w = mask[sel].to(logit)
    return (F.binary_cross_entropy_with_logits(logit, q, reduction="none") * w).sum() \
        / w.sum().clamp(min=1.0)
