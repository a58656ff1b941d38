"""The box convention and all box maths: corners, points in boxes, rotated BEV and 3D IoU, BEV NMS.

Convention (REP-103 frames: x forward, y left, z up; metres, radians), used everywhere::

    box = (x, y, z, l, w, h, yaw)

* ``x, y, z``: the centre of the box (``z`` is the height of the centre, not of the floor);
* ``l`` (length) along the heading, ``w`` (width) across it, ``h`` (height) along +z;
* ``yaw``: the heading, counter-clockwise about +z from +x. ``yaw`` and ``yaw + pi`` describe
  the same set of points (every function here treats them alike).

K boxes are a ``(K, 7)`` array. Every function takes numpy arrays or torch tensors: numpy in ->
numpy out, computed in float64; torch in -> torch out on the input's device, computed in the
input's floating dtype (float32 for integer input). When one argument is a tensor the others
are moved to its device.

Rotated IoU is exact (to rounding) for any pair of rectangles: the intersection of two convex
quadrilaterals is the convex polygon whose vertices are the corners of each box inside the other
plus the crossings of their edges; those (at most 24) candidates are sorted by angle around
their mean and the shoelace formula gives the area. All pairs are computed at once in torch,
only for pairs whose circumscribed circles meet. In float64 it agrees with GEOS (shapely) to
about 1e-11 in IoU, shared and crossing edges included; in float32 to about 1e-4. It measured
4-7x faster than shapely 2.2's vectorised intersection on overlapping box sets (and runs on the
GPU).
"""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["BOX_DIM", "corners_bev", "corners_3d", "points_in_boxes", "count_points_in_boxes",
           "bev_iou", "bev_iou_pairs", "iou_3d", "nms_bev"]

BOX_DIM = 7

# corner template in the box frame, counter-clockwise seen from above, front face first
_CORNER_U = (0.5, 0.5, -0.5, -0.5)     # along the heading (x 'length')
_CORNER_V = (-0.5, 0.5, 0.5, -0.5)     # across it (y 'width')

# pairs computed per chunk in the IoU (bounds the memory: about 2 kB per pair in float64)
_PAIR_CHUNK = 1 << 17


# ----------------------------------------------------------------------------- input checks

def _is_tensor(*xs) -> bool:
    return any(isinstance(x, torch.Tensor) for x in xs)


def _device_of(*xs) -> torch.device:
    for x in xs:
        if isinstance(x, torch.Tensor):
            return x.device
    return torch.device("cpu")


def _float_dtype(*xs) -> torch.dtype:
    """Floating dtype of the computation for torch inputs (the widest floating input dtype)."""
    dts = [x.dtype for x in xs if isinstance(x, torch.Tensor) and x.is_floating_point()]
    if not dts:
        return torch.float32
    out = dts[0]
    for d in dts[1:]:
        out = torch.promote_types(out, d)
    return out


def _boxes(boxes, name: str, like=None):
    """``boxes`` as a (K, 7) float array: numpy float64, or a torch tensor of the dtype and
    device of ``like`` (a tensor) when given. Raises ValueError naming ``name`` otherwise."""
    if like is not None:
        b = torch.as_tensor(boxes, dtype=like.dtype, device=like.device)
    elif isinstance(boxes, torch.Tensor):
        b = boxes if boxes.is_floating_point() else boxes.float()
    else:
        b = np.asarray(boxes, dtype=np.float64)
    if b.ndim != 2 or b.shape[1] != BOX_DIM:
        raise ValueError(f"{name} must have shape (K, 7) = (x, y, z, l, w, h, yaw) per row, "
                         f"got {tuple(b.shape)}")
    if bool((b[:, 3:6] < 0).any()):
        raise ValueError(f"{name} has a negative size: l, w, h (columns 3-5) must be >= 0")
    return b


def _pair(a, b, name_a: str, name_b: str):
    """Two box arrays in one computation type: numpy float64 or torch (shared dtype/device)."""
    if _is_tensor(a, b):
        ref = torch.empty(0, dtype=_float_dtype(a, b), device=_device_of(a, b))
        return _boxes(a, name_a, ref), _boxes(b, name_b, ref), True
    return _boxes(a, name_a), _boxes(b, name_b), False


def _tensors(*xs):
    """Tensors as they are, numpy arrays copied into CPU tensors (copies: the caller's arrays
    may be read-only)."""
    return tuple(x if isinstance(x, torch.Tensor) else torch.tensor(x) for x in xs)


def _const(values, like):
    if isinstance(like, torch.Tensor):
        return torch.tensor(values, dtype=like.dtype, device=like.device)
    return np.asarray(values, dtype=like.dtype)


# ----------------------------------------------------------------------------- corners

def corners_bev(boxes):
    """(K, 4, 2) x, y of the box corners seen from above, counter-clockwise: front-right,
    front-left, rear-left, rear-right ("front" = +l/2 along the heading, "left" = +w/2)."""
    b = _boxes(boxes, "boxes")
    return _corners_xy(b, b[:, 0:1], b[:, 1:2])


def _corners_xy(b, cx, cy):
    """(K, 4, 2) corners of boxes ``b`` centred at (cx, cy) (K, 1) each."""
    u = _const(_CORNER_U, b)[None] * b[:, 3:4]
    v = _const(_CORNER_V, b)[None] * b[:, 4:5]
    xp = torch if isinstance(b, torch.Tensor) else np
    c, s = xp.cos(b[:, 6:7]), xp.sin(b[:, 6:7])
    return xp.stack([cx + c * u - s * v, cy + s * u + c * v], -1)


def corners_3d(boxes):
    """(K, 8, 3) box corners: 0-3 on the floor (z - h/2), 4-7 on the roof (z + h/2), each four
    in the order of :func:`corners_bev` (front-right, front-left, rear-left, rear-right)."""
    b = _boxes(boxes, "boxes")
    xy = corners_bev(b)
    xp = torch if isinstance(b, torch.Tensor) else np
    lo = (b[:, 2:3] - b[:, 5:6] / 2)[:, :, None] * xp.ones_like(xy[:, :, :1])
    hi = (b[:, 2:3] + b[:, 5:6] / 2)[:, :, None] * xp.ones_like(xy[:, :, :1])
    return xp.concatenate([xp.concatenate([xy, lo], -1), xp.concatenate([xy, hi], -1)], 1)


# ----------------------------------------------------------------------------- points in boxes

def _points(points, like_tensor):
    if like_tensor is not None:
        p = torch.as_tensor(points, device=like_tensor.device)
        p = p.to(torch.promote_types(_float_dtype(p), like_tensor.dtype))
    elif isinstance(points, torch.Tensor):
        p = points if points.is_floating_point() else points.float()
    else:
        p = np.asarray(points, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 3:
        raise ValueError(f"points must have shape (N, >=3) with x, y, z first, got "
                         f"{tuple(p.shape)}")
    return p[:, :3]


def _points_and_boxes(points, boxes):
    if _is_tensor(points, boxes):
        dt = _float_dtype(points, boxes)
        ref = torch.empty(0, dtype=dt, device=_device_of(points, boxes))
        b = _boxes(boxes, "boxes", ref)
        return _points(points, b), b
    return _points(points, None), _boxes(boxes, "boxes")


def _inside(p, b):
    """(K, N) bool: points p (N, 3) inside boxes b (K, 7), faces included."""
    xp = torch if isinstance(b, torch.Tensor) else np
    dx = p[None, :, 0] - b[:, None, 0]
    dy = p[None, :, 1] - b[:, None, 1]
    c, s = xp.cos(b[:, 6])[:, None], xp.sin(b[:, 6])[:, None]
    lx = c * dx + s * dy
    ly = -s * dx + c * dy
    lz = p[None, :, 2] - b[:, None, 2]
    return ((abs(lx) <= b[:, None, 3] / 2) & (abs(ly) <= b[:, None, 4] / 2)
            & (abs(lz) <= b[:, None, 5] / 2))


def points_in_boxes(points, boxes):
    """(K, N) bool: which of ``points`` (N, >=3; x, y, z first) lie inside which of ``boxes``
    (K, 7). Points on a face count as inside."""
    p, b = _points_and_boxes(points, boxes)
    return _inside(p, b)


def count_points_in_boxes(points, boxes):
    """(K,) int64: number of ``points`` (N, >=3) inside each of ``boxes`` (K, 7), the row sums
    of :func:`points_in_boxes` without its (K, N) matrix: points are sorted by x once and each
    box tests only the points within its circumscribed radius in x."""
    p, b = _points_and_boxes(points, boxes)
    if isinstance(b, torch.Tensor):
        xs, order = torch.sort(p[:, 0], stable=True)
        half = 0.5 * torch.hypot(b[:, 3], b[:, 4]) + 1e-6
        lo = torch.searchsorted(xs, b[:, 0] - half).tolist()
        hi = torch.searchsorted(xs, b[:, 0] + half).tolist()
        out = torch.zeros(len(b), dtype=torch.int64, device=b.device)
        for k in range(len(b)):
            if hi[k] > lo[k]:
                out[k] = _inside(p[order[lo[k]:hi[k]]], b[k:k + 1]).sum()
        return out
    order = np.argsort(p[:, 0], kind="stable")
    xs = p[order, 0]
    out = np.zeros(len(b), np.int64)
    for k in range(len(b)):
        r = 0.5 * np.hypot(b[k, 3], b[k, 4]) + 1e-6
        lo, hi = np.searchsorted(xs, [b[k, 0] - r, b[k, 0] + r])
        if hi > lo:
            out[k] = int(_inside(p[order[lo:hi]], b[k:k + 1]).sum())
    return out


# ----------------------------------------------------------------------------- IoU

def _cross(a, b):
    return a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]


def _intersection_area(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(P,) BEV intersection area of box pairs a[i], b[i] (P, 7 each), exact to rounding."""
    eps = torch.finfo(a.dtype).eps
    off_x, off_y = a[:, 0:1], a[:, 1:2]          # work relative to a's centre (precision)
    # a corner this close to the other box counts as inside: a few roundings of the relative
    # coordinates, so that corners on a shared edge are kept (parallel edges give no crossing)
    scale = (abs(b[:, :2] - a[:, :2]).amax(1, keepdim=True) + a[:, 3:5].amax(1, keepdim=True)
             + b[:, 3:5].amax(1, keepdim=True) + 1)
    tol = 4 * eps * scale
    zero = torch.zeros_like(off_x)
    ca = _corners_xy(a, zero, zero)                              # (P, 4, 2)
    cb = _corners_xy(b, b[:, 0:1] - off_x, b[:, 1:2] - off_y)

    def inside(pts, box, cx, cy):                                # (P, 4, 2) in box -> (P, 4)
        c, s = torch.cos(box[:, 6:7]), torch.sin(box[:, 6:7])
        dx, dy = pts[..., 0] - cx, pts[..., 1] - cy
        return ((abs(c * dx + s * dy) <= box[:, 3:4] / 2 + tol)
                & (abs(-s * dx + c * dy) <= box[:, 4:5] / 2 + tol))

    in_a = inside(ca, b, b[:, 0:1] - off_x, b[:, 1:2] - off_y)
    in_b = inside(cb, a, zero, zero)
    # edge crossings: a1 + t d1 = b1 + u d2, t, u in [0, 1]
    d1 = (ca.roll(-1, 1) - ca)[:, :, None]                       # (P, 4, 1, 2)
    d2 = (cb.roll(-1, 1) - cb)[:, None]                          # (P, 1, 4, 2)
    r = cb[:, None] - ca[:, :, None]                             # (P, 4, 4, 2)
    den = _cross(d1, d2)
    # (nearly) parallel edges: their crossings are ill-conditioned; the corners in the other
    # box already bound the intersection there (up to a sliver of area <= angle x length^2)
    par = abs(den) <= 64 * eps * d1.norm(dim=-1) * d2.norm(dim=-1) + torch.finfo(a.dtype).tiny
    den = torch.where(par, torch.ones_like(den), den)
    t = _cross(r, d2) / den
    u = _cross(r, d1) / den
    hit = ~par & (t >= 0) & (t <= 1) & (u >= 0) & (u <= 1)
    cross_pts = ca[:, :, None] + t[..., None] * d1               # (P, 4, 4, 2)
    pts = torch.cat([ca, cb, cross_pts.reshape(-1, 16, 2)], 1)   # (P, 24, 2)
    valid = torch.cat([in_a, in_b, hit.reshape(-1, 16)], 1)      # (P, 24)
    pts = torch.where(valid[..., None], pts, torch.zeros_like(pts))
    n = valid.sum(1)
    centre = pts.sum(1) / n.clamp(min=1)[:, None].to(pts.dtype)
    rel = pts - centre[:, None]
    ang = torch.atan2(rel[..., 1], rel[..., 0])
    ang = torch.where(valid, ang, torch.full_like(ang, math.inf))
    order = ang.argsort(1)
    rel = torch.gather(rel, 1, order[..., None].expand(-1, -1, 2))
    valid = torch.gather(valid, 1, order)
    rel = torch.where(valid[..., None], rel, rel[:, :1])         # pad with the first vertex
    area = 0.5 * _cross(rel, rel.roll(-1, 1)).sum(1)
    return torch.where(n >= 3, area, torch.zeros_like(area)).clamp(min=0)


def _intersection_matrix(a: torch.Tensor, b: torch.Tensor, pair_mask=None) -> torch.Tensor:
    """(Ka, Kb) BEV intersection areas, computed only for boxes of non-zero area whose
    circumscribed circles meet (and where ``pair_mask``, a (Ka, Kb) bool, is True)."""
    out = torch.zeros(len(a), len(b), dtype=a.dtype, device=a.device)
    if len(a) == 0 or len(b) == 0:
        return out
    ra = 0.5 * torch.hypot(a[:, 3], a[:, 4])
    rb = 0.5 * torch.hypot(b[:, 3], b[:, 4])
    dist = torch.hypot(a[:, None, 0] - b[None, :, 0], a[:, None, 1] - b[None, :, 1])
    reach = (ra[:, None] + rb[None]) * (1 + 1e-6) + 1e-6
    cand = (dist <= reach) & (a[:, 3] * a[:, 4] > 0)[:, None] & (b[:, 3] * b[:, 4] > 0)[None]
    if pair_mask is not None:
        cand &= pair_mask
    ia, ib = torch.nonzero(cand, as_tuple=True)
    for s in range(0, len(ia), _PAIR_CHUNK):
        i, j = ia[s:s + _PAIR_CHUNK], ib[s:s + _PAIR_CHUNK]
        out[i, j] = _intersection_area(a[i], b[j])
    return out


def _iou(ta: torch.Tensor, tb: torch.Tensor, three_d: bool, pair_mask=None) -> torch.Tensor:
    """(Ka, Kb) BEV (or 3D) IoU of two checked box tensors of one dtype and device."""
    inter = _intersection_matrix(ta, tb, pair_mask)
    va = ta[:, 3] * ta[:, 4]
    vb = tb[:, 3] * tb[:, 4]
    if three_d:
        top = torch.minimum((ta[:, 2] + ta[:, 5] / 2)[:, None], (tb[:, 2] + tb[:, 5] / 2)[None])
        bot = torch.maximum((ta[:, 2] - ta[:, 5] / 2)[:, None], (tb[:, 2] - tb[:, 5] / 2)[None])
        inter = inter * (top - bot).clamp(min=0)
        va = va * ta[:, 5]
        vb = vb * tb[:, 5]
    union = va[:, None] + vb[None] - inter
    pos = union > 0
    return torch.where(pos, inter / torch.where(pos, union, torch.ones_like(union)),
                       torch.zeros_like(union)).clamp(0, 1)


def bev_iou(boxes_a, boxes_b):
    """(Ka, Kb) rotated IoU of the boxes' footprints seen from above (z and h ignored).
    Zero-area footprints have IoU 0 with everything."""
    a, b, tensor = _pair(boxes_a, boxes_b, "boxes_a", "boxes_b")
    iou = _iou(*_tensors(a, b), three_d=False)
    return iou if tensor else iou.numpy()


def bev_iou_pairs(boxes_a, boxes_b):
    """(P,) rotated BEV IoU of the pairs ``boxes_a[i]``, ``boxes_b[i]`` (P, 7 each): the diagonal
    of :func:`bev_iou` without the rest of the matrix. Zero-area footprints give 0."""
    a, b, tensor = _pair(boxes_a, boxes_b, "boxes_a", "boxes_b")
    ta, tb = _tensors(a, b)
    if len(ta) != len(tb):
        raise ValueError(f"boxes_a and boxes_b must pair up, got {len(ta)} and {len(tb)} boxes")
    va, vb = ta[:, 3] * ta[:, 4], tb[:, 3] * tb[:, 4]
    inter = torch.zeros_like(va)
    ok = (va > 0) & (vb > 0)
    if ok.any():
        inter[ok] = _intersection_area(ta[ok], tb[ok])
    union = va + vb - inter
    pos = union > 0
    iou = torch.where(pos, inter / torch.where(pos, union, torch.ones_like(union)),
                      torch.zeros_like(union)).clamp(0, 1)
    return iou if tensor else iou.numpy()


def iou_3d(boxes_a, boxes_b):
    """(Ka, Kb) 3D IoU of rotated boxes: intersection volume = BEV intersection area x overlap
    of the z ranges. Zero-volume boxes have IoU 0 with everything."""
    a, b, tensor = _pair(boxes_a, boxes_b, "boxes_a", "boxes_b")
    iou = _iou(*_tensors(a, b), three_d=True)
    return iou if tensor else iou.numpy()


# ----------------------------------------------------------------------------- NMS

def nms_bev(boxes, scores, iou_threshold: float, max_out: int | None = None, classes=None):
    """Greedy non-maximum suppression with rotated BEV IoU.

    ``boxes`` (K, 7), ``scores`` (K,), optional ``classes`` (K,) integer labels: boxes of
    different classes never suppress each other. Going by descending score (ties: lower index
    first), a box is kept unless its BEV IoU with an already kept box is greater than
    ``iou_threshold`` (in [0, 1]; IoU equal to it keeps the box). At most ``max_out`` boxes
    are kept (all when None). Returns the kept indices into ``boxes``, by descending score:
    int64 numpy array, or a long tensor on the input's device.
    """
    tensor = _is_tensor(boxes, scores, classes)
    if tensor:
        dev = _device_of(boxes, scores, classes)
        ref = torch.empty(0, dtype=_float_dtype(boxes, scores), device=dev)
        b = _boxes(boxes, "boxes", ref)
        sc = torch.as_tensor(scores, device=dev)
    else:
        b = torch.tensor(_boxes(boxes, "boxes"))
        sc = torch.tensor(np.asarray(scores))
    k = len(b)
    if sc.shape != (k,):
        raise ValueError(f"scores must have shape (K,) = ({k},) like boxes, got "
                         f"{tuple(sc.shape)}")
    if not 0.0 <= float(iou_threshold) <= 1.0:
        raise ValueError(f"iou_threshold must be in [0, 1], got {iou_threshold}")
    if max_out is not None and int(max_out) < 0:
        raise ValueError(f"max_out must be >= 0 or None, got {max_out}")
    if torch.isnan(sc.double()).any():
        raise ValueError("scores contain NaN")
    order = torch.sort(sc, descending=True, stable=True).indices
    bs = b[order]
    # only a higher-scored box can suppress a lower-scored one: the upper triangle suffices
    mask = torch.ones(k, k, dtype=torch.bool, device=b.device).triu(1)
    if classes is not None:
        cl = (classes if isinstance(classes, torch.Tensor)
              else torch.as_tensor(np.asarray(classes))).to(b.device)
        if cl.shape != (k,):
            raise ValueError(f"classes must have shape (K,) = ({k},) like boxes, got "
                             f"{tuple(cl.shape)}")
        cl = cl[order]
        mask &= cl[:, None] == cl[None]
    over = (_iou(bs, bs, False, mask) > float(iou_threshold)).cpu().numpy()
    limit = k if max_out is None else min(int(max_out), k)
    keep = []
    suppressed = np.zeros(k, bool)
    for i in range(k):
        if len(keep) >= limit:
            break
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= over[i]
    kept = order.cpu()[torch.as_tensor(keep, dtype=torch.int64)]
    return kept.to(b.device) if tensor else kept.numpy()
