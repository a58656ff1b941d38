"""Training data from the synthetic world: augmented, rasterized BEV samples cached compactly on
disk (:func:`generate_cache`) and read back as a torch ``Dataset`` (:class:`CachedBEVDataset`).

Generation (:func:`generate_cache`), per scene of a split's seeds (:mod:`..sim.splits`):

1. mounting (one per scene, drawn from the run's seed and the scene seed): a LiDAR preset (the
   presets are rotated over the scenes), a mounting height uniform in
   ``Augmentation.mount_height`` (1.5 .. 2.2 m) and a pitch and roll uniform in
   ``+-Augmentation.tilt_deg`` (2 degrees);
2. ``frames_per_scene`` frames, ``frame_step`` frames (0.1 s each) apart, rendered with
   :func:`..sim.render_frame` at that mounting height;
3. ground-truth sampling (copy-paste, :func:`paste_objects`): pedestrians and cyclists from a
   bank of objects seen by the same preset (:func:`build_bank`: every object of those classes
   with ``>= paste_min_points`` own points in the first frame of each scene of the run) are
   pasted into the frame at the place they were seen, their height moved to this frame's
   ground; an object is pasted only where its box (grown by 0.25 m) meets no other box and no
   scenery point (wall, pole, tree), and the frame's points inside its box are removed first.
   What the pasted object would hide is not removed (as in OpenPCDet's ground-truth sampling);
4. tilt (the simulator has no pitch or roll): the points and the box centres are rotated about
   the sensor origin by ``R = Rx(roll) @ Ry(pitch)`` (:func:`apply_tilt`; what a sensor turned
   by ``R^T`` sees; pitch and roll are drawn symmetric about 0, so the sign convention does not
   bias the data). Boxes stay upright: their yaw and size are kept, so a box's faces move by up
   to ``sin(2 deg) * l / 2`` (4 cm for a 4.5 m car) against its points;
5. ``variants`` augmented copies of each frame (:func:`apply_global`, points and boxes alike,
   before rasterization): a flip about the x axis (``y -> -y``, ``yaw -> -yaw``) with
   probability 1/2, a rotation about z uniform in ``+-rotation`` (pi), a scaling uniform in
   ``scale`` (0.95 .. 1.05) of every coordinate and box size about the sensor origin;
6. each copy is rasterized (:class:`..bev.Rasterizer`) and its undilated occupancy mask computed
   (:func:`..masks.occupancy_mask` with the ``mask.occupancy_*`` settings, dilation 0), then
   stored compactly (:func:`pack_sample`).

Every random draw comes from ``numpy.random.SeedSequence([seed, scene_seed, ...purpose])``, so
the cache depends on ``seed`` and the settings only (not on ``workers`` or the order of work).

Compact sample (one deflated ``.npz`` per sample, written atomically; deflate halves the size
again and costs nothing measurable when reading): only the ``N`` cells that hold a point or are
occupied:

* ``cells (N,) int32``: flat cell index ``i * W + j`` (row ``i`` = x index, as ``bev.py``),
  ascending;
* ``slices (N, ceil(z_slices / 8)) uint8``: the height-slice occupancy channels as bits
  (``numpy.packbits`` along axis 1): exact;
* ``intensity (N,) uint8``: ``round(255 * v)`` of the intensity channel ``v``: the one lossy
  channel, rebuilt as ``q / 255`` (error <= 1/510, 0.002);
* ``count (N,) uint8`` (``uint16`` when ``density_saturation > 255``): the cell's point count,
  capped at ``density_saturation`` (recovered from the density channel, a strictly increasing
  function of the count below saturation); the density is rebuilt with the rasterizer's formula,
  equal to float32 rounding;
* ``occupied (ceil(N / 8),) uint8``: ``numpy.packbits`` of the undilated occupancy mask on the
  ``N`` cells (the mask is dilated when read, so any ``dilation`` can be used later);
* ``boxes (K, 7) float32``, ``labels (K,) int8`` (index into ``manifest["classes"]``),
  ``num_points (K,) int32``: the LiDAR points on each object as rendered (a pasted object: its
  own points), before tilt and augmentation.

``manifest.json`` holds the settings (split, scene seeds, presets, grid, seed, augmentation,
mask settings, classes, this format), one record per sample (file, scene, frame, variant,
preset, mounting and augmentation drawn, boxes, pasted objects, cells, bytes) and the counts and
costs of the run.

Reading (:class:`CachedBEVDataset`): an item is rebuilt dense from the compact form, optionally
as a random ``crop x crop`` window. A crop at cell origin ``(r0, c0)`` is the sub-grid
``x_min' = x_min + r0 * res``, ``y_min' = y_min + c0 * res`` (``x_max' = x_min' + crop * res``,
same for y; the item's ``grid``): cell ``(i, j)`` of the crop is cell ``(r0 + i, c0 + j)`` of the
full grid. Boxes stay in the sensor frame, where they agree with the sub-grid; the boxes whose
centre lies in the sub-grid's extent are kept (the rule :func:`.targets.encode` applies), so the
targets are encoded with the crop's grid. The occupancy mask is dilated on the full grid's cells
(a window with a margin around the crop), then cut, so a crop's mask equals the full mask's cut.
"""
from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..bev import Rasterizer
from ..boxes import bev_iou, count_points_in_boxes, points_in_boxes
from ..config import GridConfig, MaskConfig
from ..masks import dilate, occupancy_mask
from ..sim import CLASSES, FRAME_RATE, PRESETS, generate_scene, get_lidar, render_frame
from ..sim.splits import seeds as split_seeds

__all__ = ["FORMAT_VERSION", "DEFAULT_PRESETS", "MANIFEST", "Augmentation", "SceneJob",
           "RawSample", "plan_scenes", "apply_tilt", "apply_global", "tilt_matrix",
           "build_bank", "paste_objects", "frame_samples", "pack_sample", "unpack_sample",
           "occupied_cells",
           "density_table", "generate_cache", "regenerate", "CachedBEVDataset", "collate"]

FORMAT_VERSION = 1
DEFAULT_PRESETS = ("hdl64e", "os1-64", "hdl32e", "vlp16")
MANIFEST = "manifest.json"
BANK_FILE = "bank.npz"
SAMPLES_DIR = "samples"
#: owner code of pasted points (the simulator uses >= 0 actors, -1 scenery, -2 ground)
PASTED = -3
#: free space kept around a pasted box (m, each side)
PASTE_CLEARANCE = 0.25

_CLASS_INDEX = {c: i for i, c in enumerate(CLASSES)}
# seed-sequence purposes
_MOUNT, _PASTE, _GLOBAL = 1, 2, 3


# ============================================================================ settings

@dataclass(frozen=True)
class Augmentation:
    """The random variation of :func:`generate_cache` (see the module docstring).

    ``variants``: augmented copies per rendered frame; ``mount_height`` (m) and ``tilt_deg``
    (pitch and roll, +-degrees): per scene; ``rotation`` (+-rad about z), ``flip`` (about x, with
    probability 1/2), ``scale`` (range): per copy; ``frame_step``: frames between two rendered
    frames of a scene; ``paste``: ``{class: objects pasted per frame}`` (empty: no
    ground-truth sampling); ``paste_min_points``: fewest own points of a bank object.
    """
    variants: int = 2
    mount_height: tuple[float, float] = (1.5, 2.2)
    tilt_deg: float = 2.0
    rotation: float = math.pi
    flip: bool = True
    scale: tuple[float, float] = (0.95, 1.05)
    frame_step: int = 5
    paste: Mapping[str, int] = field(default_factory=lambda: {"pedestrian": 2, "cyclist": 4})
    paste_min_points: int = 5

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"Augmentation.{name} = {getattr(self, name)!r}: {allowed}")

        if not isinstance(self.variants, int) or self.variants < 1:
            raise bad("variants", "must be an int >= 1")
        lo, hi = self.mount_height
        if not 0.0 < lo <= hi:
            raise bad("mount_height", "must be (low, high) metres with 0 < low <= high")
        if not 0.0 <= self.tilt_deg <= 30.0:
            raise bad("tilt_deg", "must be in [0, 30] degrees")
        if not 0.0 <= self.rotation <= math.pi:
            raise bad("rotation", "must be in [0, pi] radians")
        lo, hi = self.scale
        if not 0.0 < lo <= hi:
            raise bad("scale", "must be (low, high) with 0 < low <= high")
        if not isinstance(self.frame_step, int) or self.frame_step < 1:
            raise bad("frame_step", "must be an int >= 1")
        for cls, n in dict(self.paste).items():
            if cls not in _CLASS_INDEX or not isinstance(n, int) or n < 0:
                raise bad("paste", f"must map classes of {list(CLASSES)} to ints >= 0")
        if not isinstance(self.paste_min_points, int) or self.paste_min_points < 1:
            raise bad("paste_min_points", "must be an int >= 1")

    @property
    def paste_classes(self) -> tuple[str, ...]:
        return tuple(c for c in CLASSES if dict(self.paste).get(c, 0) > 0)

    def to_dict(self) -> dict[str, Any]:
        return {"variants": self.variants, "mount_height": list(self.mount_height),
                "tilt_deg": self.tilt_deg, "rotation": self.rotation, "flip": self.flip,
                "scale": list(self.scale), "frame_step": self.frame_step,
                "paste": {c: int(dict(self.paste)[c]) for c in CLASSES
                          if c in dict(self.paste)},
                "paste_min_points": self.paste_min_points}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Augmentation":
        d = dict(d)
        for key in ("mount_height", "scale"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


@dataclass(frozen=True)
class SceneJob:
    """One scene of a run: its position, seed, preset and mounting (pitch, roll in radians)."""
    index: int
    seed: int
    preset: str
    mount_height: float
    pitch: float
    roll: float


@dataclass
class RawSample:
    """Points and ground truth of one (augmented) sample, in the sensor frame.

    ``points (N, 4) float32``; ``owner (N,) int32`` (the simulator's codes, :data:`PASTED` for
    pasted points); ``boxes (K, 7) float32``; ``labels (K,) int64`` (index into ``CLASSES``);
    ``num_points (K,) int32``; ``pasted (K,) bool``; ``params``: what was drawn.
    """
    points: np.ndarray
    owner: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    num_points: np.ndarray
    pasted: np.ndarray
    params: dict[str, Any]


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def plan_scenes(split: str, scenes: int, presets: Sequence[str], seed: int,
                augmentation: Augmentation, offset: int = 0) -> list[SceneJob]:
    """The scenes of a run: seeds ``sim.splits.seeds(split, scenes, offset)``, preset
    ``presets[k % len(presets)]`` for scene ``k``, mounting drawn per scene."""
    if not presets:
        raise ValueError("presets must name at least one LiDAR preset")
    unknown = [p for p in presets if p.lower() not in PRESETS]
    if unknown:
        raise ValueError(f"unknown LiDAR preset(s) {unknown}: choose from {', '.join(PRESETS)}")
    jobs = []
    tilt = math.radians(augmentation.tilt_deg)
    for k, s in enumerate(split_seeds(split, scenes, offset)):
        rng = _rng(seed, s, _MOUNT)
        h = float(rng.uniform(*augmentation.mount_height))
        pitch, roll = (float(v) for v in rng.uniform(-tilt, tilt, 2))
        jobs.append(SceneJob(k, s, presets[k % len(presets)].lower(), h, pitch, roll))
    return jobs


# ============================================================================ geometry

def tilt_matrix(pitch: float, roll: float) -> np.ndarray:
    """``(3, 3)`` float64 ``R = Rx(roll) @ Ry(pitch)``: a point ``p`` of the level sensor is
    ``R @ p`` in the tilted sensor's frame (pitch about y, roll about x, radians)."""
    cp, sp, cr, sr = math.cos(pitch), math.sin(pitch), math.cos(roll), math.sin(roll)
    ry = np.array([[cp, 0.0, sp], [0.0, 1.0, 0.0], [-sp, 0.0, cp]])
    rx = np.array([[1.0, 0.0, 0.0], [0.0, cr, -sr], [0.0, sr, cr]])
    return rx @ ry


def _wrap(a: np.ndarray) -> np.ndarray:
    return (a + np.pi) % (2.0 * np.pi) - np.pi


def apply_tilt(points: np.ndarray, boxes: np.ndarray, pitch: float, roll: float
               ) -> tuple[np.ndarray, np.ndarray]:
    """Points ``(N, >=3)`` and boxes ``(K, 7)`` seen by a sensor tilted by ``pitch``, ``roll``
    (radians) about its origin: points and box centres rotated by :func:`tilt_matrix`; boxes
    stay upright (yaw and size kept). Returns new float32 arrays (further point columns
    copied)."""
    r = tilt_matrix(pitch, roll)
    p = np.array(points, np.float32)
    b = np.array(boxes, np.float32).reshape(-1, 7)
    p[:, :3] = (p[:, :3].astype(np.float64) @ r.T).astype(np.float32)
    b[:, :3] = (b[:, :3].astype(np.float64) @ r.T).astype(np.float32)
    return p, b


def apply_global(points: np.ndarray, boxes: np.ndarray, angle: float, flip: bool, scale: float
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The global augmentation of points ``(N, >=3)`` and boxes ``(K, 7)``, in this order: flip
    about the x axis (``y -> -y``, ``yaw -> -yaw``) when ``flip``, rotation by ``angle`` about
    z (``yaw + angle``, wrapped to ``[-pi, pi)``), scaling of coordinates and box sizes by
    ``scale`` about the origin. A rigid motion plus a uniform scaling of both, so every point
    keeps its place relative to every box. Returns new float32 arrays (computed in float64)."""
    p = np.array(points, np.float64)
    b = np.array(boxes, np.float64).reshape(-1, 7)
    if flip:
        p[:, 1] = -p[:, 1]
        b[:, 1] = -b[:, 1]
        b[:, 6] = -b[:, 6]
    c, s = math.cos(angle), math.sin(angle)
    for a in (p, b):
        x, y = a[:, 0].copy(), a[:, 1].copy()
        a[:, 0] = c * x - s * y
        a[:, 1] = s * x + c * y
    b[:, 6] = _wrap(b[:, 6] + angle)
    p[:, :3] *= scale
    b[:, :6] *= scale
    return p.astype(np.float32), b.astype(np.float32)


# ============================================================================ copy-paste

def build_bank(jobs: Sequence[SceneJob], augmentation: Augmentation, duration: float
               ) -> dict[str, np.ndarray]:
    """The object bank of ground-truth sampling: every object of ``augmentation.paste_classes``
    with ``>= paste_min_points`` own points in frame 0 of each scene of ``jobs`` (rendered as
    the run renders it). Arrays: ``points (P, 4) float32`` (concatenated, sensor frame of
    their frame), ``offsets (E + 1,) int64``, ``boxes (E, 7) float32``, ``labels (E,) int64``,
    ``preset (E,)`` str, ``mount_height (E,) float32``."""
    parts = [_bank_of_scene(job, augmentation, duration) for job in jobs]
    return _concat_banks(parts)


def _bank_of_scene(job: SceneJob, augmentation: Augmentation, duration: float) -> dict:
    classes = augmentation.paste_classes
    lidar = get_lidar(job.preset, mount_height=job.mount_height)
    frame = render_frame(generate_scene(job.seed, duration=duration), lidar, 0)
    pts, boxes, labels = [], [], []
    for k, cls in enumerate(frame.labels):
        if cls not in classes:
            continue
        own = frame.points[frame.owner == frame.ids[k]]
        if len(own) >= augmentation.paste_min_points:
            pts.append(own)
            boxes.append(frame.boxes[k])
            labels.append(_CLASS_INDEX[cls])
    return {"points": pts, "boxes": boxes, "labels": labels, "preset": job.preset,
            "mount_height": job.mount_height}


def _concat_banks(parts: Sequence[dict]) -> dict[str, np.ndarray]:
    pts, boxes, labels, preset, mount, sizes = [], [], [], [], [], []
    for p in parts:
        pts += p["points"]
        boxes += p["boxes"]
        labels += p["labels"]
        preset += [p["preset"]] * len(p["boxes"])
        mount += [p["mount_height"]] * len(p["boxes"])
        sizes += [len(a) for a in p["points"]]
    return {"points": (np.concatenate(pts).astype(np.float32) if pts
                       else np.zeros((0, 4), np.float32)),
            "offsets": np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
            "boxes": np.asarray(boxes, np.float32).reshape(-1, 7),
            "labels": np.asarray(labels, np.int64),
            "preset": np.asarray(preset, dtype="<U16"),
            "mount_height": np.asarray(mount, np.float32)}


def paste_objects(sample: RawSample, bank: Mapping[str, np.ndarray], preset: str,
                  mount_height: float, counts: Mapping[str, int], rng: np.random.Generator
                  ) -> RawSample:
    """Ground-truth sampling: up to ``counts[class]`` bank objects of ``preset`` pasted into
    ``sample`` (level sensor at ``mount_height``; see the module docstring). Candidates are
    tried in a random order (at most 4x the count per class); a pasted object's points are
    moved up by the bank object's mounting height minus this one (same ground); it gets
    ``num_points`` = its own points and ``pasted = True``. Returns a new sample."""
    pts, owner = sample.points, sample.owner
    boxes, labels = sample.boxes, sample.labels
    num, pasted = sample.num_points, sample.pasted
    scenery = pts[owner == -1]
    for cls in CLASSES:
        want = int(counts.get(cls, 0))
        cand = np.flatnonzero((bank["labels"] == _CLASS_INDEX[cls]) & (bank["preset"] == preset))
        if want <= 0 or len(cand) == 0:
            continue
        done = 0
        for e in rng.permutation(cand)[:4 * want]:
            if done == want:
                break
            dz = float(bank["mount_height"][e]) - float(mount_height)
            box = bank["boxes"][e].astype(np.float64).copy()
            box[2] += dz
            grown = box.copy()
            grown[3:6] += 2 * PASTE_CLEARANCE
            if len(boxes) and float(np.max(bev_iou(grown[None], boxes))) > 0.0:
                continue
            if len(scenery) and int(count_points_in_boxes(scenery, grown[None])[0]) > 0:
                continue
            obj = bank["points"][bank["offsets"][e]:bank["offsets"][e + 1]].copy()
            obj[:, 2] += dz
            keep = ~points_in_boxes(pts, box[None])[0]
            pts = np.concatenate([pts[keep], obj])
            owner = np.concatenate([owner[keep], np.full(len(obj), PASTED, np.int32)])
            boxes = np.concatenate([boxes, box[None].astype(np.float32)])
            labels = np.concatenate([labels, [_CLASS_INDEX[cls]]])
            num = np.concatenate([num, [len(obj)]]).astype(np.int32)
            pasted = np.concatenate([pasted, [True]])
            done += 1
    return RawSample(pts, owner, boxes, labels.astype(np.int64), num, pasted,
                     dict(sample.params))


# ============================================================================ samples

def _duration(frames_per_scene: int, augmentation: Augmentation) -> float:
    return (frames_per_scene - 1) * augmentation.frame_step / FRAME_RATE


def frame_samples(job: SceneJob, frame: int, augmentation: Augmentation, seed: int,
                  bank: Mapping[str, np.ndarray] | None, duration: float, scene=None
                  ) -> list[RawSample]:
    """The ``augmentation.variants`` samples of rendered frame ``frame`` (a frame index of the
    scene, ``0, frame_step, ...``) of ``job``: render, paste, tilt, augment (see the module
    docstring). ``scene``: the generated scene when the caller has it."""
    if scene is None:
        scene = generate_scene(job.seed, duration=duration)
    lidar = get_lidar(job.preset, mount_height=job.mount_height)
    f = render_frame(scene, lidar, frame)
    base = RawSample(f.points, f.owner.astype(np.int32), f.boxes,
                     np.array([_CLASS_INDEX[c] for c in f.labels], np.int64),
                     f.num_points.astype(np.int32), np.zeros(len(f.boxes), bool), {})
    if bank is not None and augmentation.paste_classes:
        base = paste_objects(base, bank, job.preset, job.mount_height, augmentation.paste,
                             _rng(seed, job.seed, frame, _PASTE))
    pts, boxes = apply_tilt(base.points, base.boxes, job.pitch, job.roll)
    out = []
    for v in range(augmentation.variants):
        rng = _rng(seed, job.seed, frame, v, _GLOBAL)
        angle = float(rng.uniform(-augmentation.rotation, augmentation.rotation))
        flip = bool(augmentation.flip and rng.random() < 0.5)
        scale = float(rng.uniform(*augmentation.scale))
        p, b = apply_global(pts, boxes, angle, flip, scale)
        params = {"scene": job.seed, "frame": int(frame), "variant": v, "preset": job.preset,
                  "mount_height": job.mount_height, "pitch": job.pitch, "roll": job.roll,
                  "angle": angle, "flip": flip, "scale": scale}
        out.append(RawSample(p, base.owner, b, base.labels, base.num_points, base.pasted,
                             params))
    return out


def density_table(grid: GridConfig) -> torch.Tensor:
    """``(density_saturation + 1,) float32``: the density channel of a cell holding ``n``
    points (index ``n``, capped at saturation), the formula of :mod:`..bev`."""
    n = torch.arange(grid.density_saturation + 1, dtype=torch.float32)
    return (torch.log1p(n) * (1.0 / math.log(grid.density_saturation))).clamp_(max=1.0)


def _count_dtype(grid: GridConfig):
    return np.uint8 if grid.density_saturation <= 255 else np.uint16


def pack_sample(bev: torch.Tensor, occupied: torch.Tensor, grid: GridConfig
                ) -> dict[str, np.ndarray]:
    """Dense ``bev (C, H, W)`` or ``(1, C, H, W)`` float32 and undilated ``occupied (H, W)``
    bool -> the compact arrays (``cells``, ``slices``, ``intensity``, ``count``,
    ``occupied``) of the module docstring."""
    z = grid.z_slices
    h, w = grid.shape
    b = bev.reshape(grid.channels, h * w).cpu().numpy()
    occ = occupied.reshape(h * w).cpu().numpy()
    dens = b[z + 1]
    cells = np.flatnonzero((dens > 0) | occ).astype(np.int32)
    sat = grid.density_saturation
    d = dens[cells].astype(np.float64)
    count = np.where(d >= 1.0, sat, np.rint(np.expm1(d * math.log(sat))))
    return {"cells": cells,
            "slices": np.packbits(b[:z, cells].T > 0.5, axis=1),
            "intensity": np.rint(b[z, cells] * 255.0).astype(np.uint8),
            "count": np.minimum(count, sat).astype(_count_dtype(grid)),
            "occupied": np.packbits(occ[cells])}


def unpack_sample(arrays: Mapping[str, np.ndarray], grid: GridConfig,
                  window: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """Compact arrays -> ``bev (C, h, w) float32``: the dense BEV of the window
    ``(r0, c0, h, w)`` of the grid (default: the whole grid)."""
    z = grid.z_slices
    H, W = grid.shape
    r0, c0, h, w = window or (0, 0, H, W)
    cells = arrays["cells"].astype(np.int64)
    if (r0, c0, h, w) == (0, 0, H, W):
        local, sel = cells, slice(None)
    else:
        rows, cols = np.divmod(cells, W)
        rows -= r0
        cols -= c0
        sel = np.flatnonzero((rows >= 0) & (rows < h) & (cols >= 0) & (cols < w))
        local = rows[sel] * w + cols[sel]
    table = _DENSITY.get(grid.density_saturation)
    if table is None:
        table = _DENSITY[grid.density_saturation] = density_table(grid).numpy()
    # the cells' values in one (M, C) block, assigned with one numpy fancy index (measured
    # several times faster than torch index_put / index_copy_ here)
    vals = np.empty((len(local), grid.channels), np.float32)
    vals[:, :z] = np.unpackbits(arrays["slices"][sel], axis=1, count=z)
    vals[:, z] = _INTENSITY[arrays["intensity"][sel]]
    vals[:, z + 1] = table[arrays["count"][sel]]
    bev = np.zeros((grid.channels, h * w), np.float32)
    bev[:, local] = vals.T
    return torch.from_numpy(bev).view(grid.channels, h, w)


_INTENSITY = np.arange(256, dtype=np.float32) / np.float32(255.0)
_DENSITY: dict[int, np.ndarray] = {}


# ============================================================================ generation

class _Worker:
    """Per-process state of the generation: the settings, the bank and a rasterizer."""
    settings: dict[str, Any] = {}
    rasterizer: Rasterizer | None = None


def _init_worker(settings: dict[str, Any]) -> None:
    torch.set_num_threads(1)
    _Worker.settings = settings
    _Worker.rasterizer = Rasterizer(settings["grid"])


def _bank_job(job: SceneJob) -> dict:
    s = _Worker.settings
    return _bank_of_scene(job, s["augmentation"], s["duration"])


def _sample_name(job: SceneJob, frame: int, variant: int) -> str:
    return f"{SAMPLES_DIR}/s{job.seed:06d}_f{frame:04d}_v{variant:02d}.npz"


def _save_atomic(path: Path, arrays: Mapping[str, np.ndarray]) -> int:
    """Write a deflated .npz through a temporary file of this process, then rename (a reader
    never sees a half-written file); returns its bytes."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    tmp.replace(path)
    return path.stat().st_size


def _rasterize(sample: RawSample, s: Mapping[str, Any]) -> dict[str, np.ndarray]:
    grid, m = s["grid"], s["mask"]
    bev, _ = _Worker.rasterizer(sample.points)
    occ = occupancy_mask(sample.points, grid, min_points=m["min_points"],
                         min_height=m["min_height"], ground_cell=m["ground_cell"], dilation=0)
    return pack_sample(bev, occ, grid)


def _scene_job(job: SceneJob) -> list[dict[str, Any]]:
    s = _Worker.settings
    aug: Augmentation = s["augmentation"]
    out_dir: Path = s["out_dir"]
    scene = generate_scene(job.seed, duration=s["duration"])
    records = []
    for f in range(s["frames_per_scene"]):
        frame = f * aug.frame_step
        for sample in frame_samples(job, frame, aug, s["seed"], s["bank"], s["duration"],
                                    scene):
            t0 = time.perf_counter()
            arrays = _rasterize(sample, s)
            arrays.update(boxes=sample.boxes.astype(np.float32),
                          labels=sample.labels.astype(np.int8),
                          num_points=sample.num_points.astype(np.int32))
            name = _sample_name(job, frame, sample.params["variant"])
            nbytes = _save_atomic(out_dir / name, arrays)
            records.append({"file": name, **sample.params, "boxes": int(len(sample.boxes)),
                            "labels": np.bincount(sample.labels, minlength=len(CLASSES))
                            .tolist(),
                            "pasted": int(sample.pasted.sum()), "cells": int(len(arrays["cells"])),
                            "bytes": nbytes, "raster_s": time.perf_counter() - t0})
    return records


def _mask_settings(mask: MaskConfig) -> dict[str, Any]:
    return {"min_points": int(mask.occupancy_min_points),
            "min_height": float(mask.occupancy_min_height),
            "ground_cell": float(mask.occupancy_ground_cell),
            "dilation": int(mask.occupancy_dilation)}


def _run(fn, jobs: Sequence[SceneJob], settings: dict[str, Any], workers: int) -> list:
    if workers <= 1 or len(jobs) <= 1:
        saved = (_Worker.settings, _Worker.rasterizer)
        _Worker.settings, _Worker.rasterizer = settings, Rasterizer(settings["grid"])
        try:
            return [fn(j) for j in jobs]
        finally:
            _Worker.settings, _Worker.rasterizer = saved
    methods = mp.get_all_start_methods()
    ctx = mp.get_context("fork" if "fork" in methods else "spawn")
    with ctx.Pool(min(workers, len(jobs)), initializer=_init_worker,
                  initargs=(settings,)) as pool:
        return pool.map(fn, jobs, chunksize=1)


def generate_cache(out_dir: str | Path, split: str = "train", scenes: int = 100,
                   frames_per_scene: int = 4, presets: Sequence[str] = DEFAULT_PRESETS,
                   grid: GridConfig | None = None, seed: int = 0, workers: int = 1, *,
                   augmentation: Augmentation | None = None, mask: MaskConfig | None = None,
                   scene_offset: int = 0, overwrite: bool = False) -> dict[str, Any]:
    """Render, augment, rasterize and store a training cache (see the module docstring).

    Args:
        out_dir: the cache folder (created); holds ``manifest.json``, ``samples/*.npz`` and,
            with ground-truth sampling, ``bank.npz``.
        split: the :mod:`..sim.splits` split whose seeds are used ("train", "val", ...).
        scenes: scenes of the split, from ``scene_offset`` on.
        frames_per_scene: rendered frames per scene (``frame_step`` apart).
        presets: LiDAR presets, rotated over the scenes.
        grid: the BEV grid (default: ``GridConfig()``, the model's grid).
        seed: seed of every random draw (mounting, pasting, augmentation).
        workers: processes (1: in this process). They are forked where the platform can
            (each runs torch with one thread); generation runs on the CPU only.
        augmentation: the random variation (default :class:`Augmentation`).
        mask: where the ``mask.occupancy_*`` settings come from (default ``MaskConfig()``).
        overwrite: replace an existing cache in ``out_dir`` (else FileExistsError).

    Returns:
        the manifest's ``stats`` (samples, seconds, bytes per sample, ...), also written to the
        manifest.
    """
    t_start = time.perf_counter()
    grid = grid or GridConfig()
    augmentation = augmentation or Augmentation()
    mask_settings = _mask_settings(mask or MaskConfig())
    if not isinstance(frames_per_scene, int) or frames_per_scene < 1:
        raise ValueError(f"frames_per_scene must be an int >= 1, got {frames_per_scene!r}")
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    presets = [p.lower() for p in presets]
    jobs = plan_scenes(split, scenes, presets, seed, augmentation, scene_offset)
    out_dir = Path(out_dir)
    if (out_dir / MANIFEST).exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already holds a cache ({MANIFEST}); pass "
                              "overwrite=True to replace it")
    (out_dir / SAMPLES_DIR).mkdir(parents=True, exist_ok=True)
    if (out_dir / MANIFEST).exists():
        (out_dir / MANIFEST).unlink()
    for old in (out_dir / SAMPLES_DIR).glob("*.npz"):
        old.unlink()
    duration = _duration(frames_per_scene, augmentation)
    settings = {"grid": grid, "augmentation": augmentation, "mask": mask_settings,
                "duration": duration, "frames_per_scene": frames_per_scene, "seed": int(seed),
                "out_dir": out_dir, "bank": None}

    bank_counts: dict[str, dict[str, int]] = {}
    t_bank = time.perf_counter()
    if augmentation.paste_classes:
        bank = _concat_banks(_run(_bank_job, jobs, settings, workers))
        _save_atomic(out_dir / BANK_FILE, bank)
        settings["bank"] = bank
        for p in presets:
            sel = bank["preset"] == p
            bank_counts[p] = {c: int(np.sum(bank["labels"][sel] == _CLASS_INDEX[c]))
                              for c in augmentation.paste_classes}
    elif (out_dir / BANK_FILE).exists():
        (out_dir / BANK_FILE).unlink()
    t_bank = time.perf_counter() - t_bank

    records = [r for part in _run(_scene_job, jobs, settings, workers) for r in part]
    seconds = time.perf_counter() - t_start
    n = len(records)
    labels = np.sum([r["labels"] for r in records], axis=0) if n else np.zeros(len(CLASSES))
    stats = {"samples": n,
             "seconds": round(seconds, 3),
             "seconds_per_sample": round(seconds / max(n, 1), 4),
             "bank_seconds": round(t_bank, 3),
             "raster_seconds_per_sample": round(sum(r.pop("raster_s") for r in records)
                                                / max(n, 1), 4),
             "bytes_per_sample": round(sum(r["bytes"] for r in records) / max(n, 1)),
             "cells_per_sample": round(sum(r["cells"] for r in records) / max(n, 1)),
             "workers": workers}
    manifest = {
        "format": FORMAT_VERSION, "split": split, "scene_seeds": [j.seed for j in jobs],
        "scene_offset": scene_offset, "frames_per_scene": frames_per_scene,
        "presets": presets, "grid": grid.to_dict(), "seed": int(seed),
        "augmentation": augmentation.to_dict(), "mask": mask_settings,
        "classes": list(CLASSES),
        "quantization": "occupancy slices exact (bits); intensity uint8 round(255 v), error "
                        "<= 1/510; density from the point count, exact to float32 rounding",
        "counts": {"samples": n, "boxes": {c: int(labels[i]) for i, c in enumerate(CLASSES)},
                   "pasted": sum(r["pasted"] for r in records), "bank": bank_counts},
        "samples": records, "stats": stats}
    tmp = out_dir / f".{MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(out_dir / MANIFEST)
    return stats


def _load_manifest(cache_dir: Path) -> dict[str, Any]:
    path = cache_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{cache_dir} is not a training cache: no {MANIFEST} (make one "
                                "with generate_cache)") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: cache format {manifest.get('format')!r} is not supported "
                         f"(this code reads format {FORMAT_VERSION}): regenerate the cache")
    return manifest


def regenerate(cache_dir: str | Path, index: int) -> RawSample:
    """The points and ground truth of sample ``index`` of a cache, rendered again from its
    manifest (what was rasterized into it, before quantization)."""
    cache_dir = Path(cache_dir)
    m = _load_manifest(cache_dir)
    rec = m["samples"][index]
    aug = Augmentation.from_dict(m["augmentation"])
    jobs = plan_scenes(m["split"], len(m["scene_seeds"]), m["presets"], m["seed"], aug,
                       m["scene_offset"])
    job = next(j for j in jobs if j.seed == rec["scene"])
    bank = None
    if aug.paste_classes:
        with np.load(cache_dir / BANK_FILE) as z:
            bank = {k: z[k] for k in z.files}
    samples = frame_samples(job, rec["frame"], aug, m["seed"], bank,
                            _duration(m["frames_per_scene"], aug))
    return samples[rec["variant"]]


# ============================================================================ reading

class CachedBEVDataset(Dataset):
    """The samples of a cache made by :func:`generate_cache`, rebuilt dense.

    Args:
        cache_dir: the cache folder.
        crop: side of a random square crop in cells (``None``: the whole grid); must fit the
            grid.
        classes: the model's classes (default: the cache's): labels are remapped to indices of
            this tuple and boxes of other classes dropped.
        min_points: boxes with fewer LiDAR points (``num_points``) are dropped.
        dilation: cells the occupancy mask is grown by (default: the cache's
            ``mask.occupancy_dilation``).
        align: crop origins are multiples of this many cells (default 8: the output stride and
            the smallest sparse tile, so a crop's output cells and tiles line up with the full
            grid's).

    Item ``i`` (a dict):

    * ``bev (C, h, w) float32``, ``mask (h, w) bool`` (the dilated occupancy mask);
    * ``boxes (K, 7) float32`` (sensor frame), ``labels (K,) int64``, ``num_points (K,)
      int64``: the boxes whose centre lies in the item's grid;
    * ``grid``: the item's :class:`GridConfig` (the crop's sub-grid), ``origin``: ``(r0, c0)``
      the crop's first cell in the full grid;
    * ``index``, ``scene``, ``frame``, ``variant``, ``preset``: where it came from.

    ``__getitem__`` draws the crop origin from torch's global generator (seeded per
    ``DataLoader`` worker); :meth:`load` takes it explicitly.
    """

    def __init__(self, cache_dir: str | Path, crop: int | None = 256, *,
                 classes: Sequence[str] | None = None, min_points: int = 1,
                 dilation: int | None = None, align: int = 8):
        self.cache_dir = Path(cache_dir)
        self.manifest = _load_manifest(self.cache_dir)
        self.grid = GridConfig(**self.manifest["grid"])
        self.samples = self.manifest["samples"]
        cache_classes = list(self.manifest["classes"])
        self.classes = tuple(classes) if classes is not None else tuple(cache_classes)
        unknown = [c for c in self.classes if c not in cache_classes]
        if unknown:
            raise ValueError(f"classes {unknown} are not in the cache (it has {cache_classes})")
        self._remap = np.array([self.classes.index(c) if c in self.classes else -1
                                for c in cache_classes], np.int64)
        self.min_points = int(min_points)
        self.dilation = int(self.manifest["mask"]["dilation"] if dilation is None else dilation)
        if self.dilation < 0:
            raise ValueError(f"dilation must be >= 0 cells, got {dilation!r}")
        if not isinstance(align, int) or align < 1:
            raise ValueError(f"align must be an int >= 1, got {align!r}")
        self.align = align
        H, W = self.grid.shape
        if crop is not None and not (isinstance(crop, int) and 1 <= crop <= min(H, W)):
            raise ValueError(f"crop must be None or an int in [1, {min(H, W)}] (the grid is "
                             f"{H} x {W} cells), got {crop!r}")
        self.crop = crop

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        origin = (0, 0)
        if self.crop is not None:
            H, W = self.grid.shape
            nr = (H - self.crop) // self.align + 1
            nc = (W - self.crop) // self.align + 1
            r, c = torch.randint(nr, (1,)).item(), torch.randint(nc, (1,)).item()
            origin = (int(r) * self.align, int(c) * self.align)
        return self.load(index, origin)

    def sub_grid(self, origin: tuple[int, int]) -> GridConfig:
        """The grid of the crop at cell ``origin`` (the whole grid without a crop)."""
        if self.crop is None:
            return self.grid
        r0, c0 = origin
        g, res = self.grid, self.grid.resolution
        x0, y0 = g.x_min + r0 * res, g.y_min + c0 * res
        return replace(g, x_min=x0, x_max=x0 + self.crop * res, y_min=y0,
                       y_max=y0 + self.crop * res)

    def load(self, index: int, origin: tuple[int, int] = (0, 0)) -> dict[str, Any]:
        """Item ``index`` with its crop at cell ``origin`` (ignored without a crop)."""
        if not 0 <= index < len(self.samples):
            raise IndexError(f"sample {index} out of range (cache of {len(self.samples)})")
        rec = self.samples[index]
        H, W = self.grid.shape
        if self.crop is None:
            r0, c0, h, w = 0, 0, H, W
        else:
            r0, c0 = (int(v) for v in origin)
            h = w = self.crop
            if not (0 <= r0 <= H - h and 0 <= c0 <= W - w):
                raise ValueError(f"crop origin {origin} puts a {h} x {w} crop outside the "
                                 f"{H} x {W} grid")
        with np.load(self.cache_dir / rec["file"]) as z:
            arrays = {k: z[k] for k in z.files}
        d = self.dilation
        # the mask is dilated on a window with a margin of d cells, then cut to the crop
        wr0, wc0 = max(r0 - d, 0), max(c0 - d, 0)
        wr1, wc1 = min(r0 + h + d, H), min(c0 + w + d, W)
        bev = unpack_sample(arrays, self.grid, (r0, c0, h, w))
        occ = np.zeros((wr1 - wr0, wc1 - wc0), bool)
        occ[occupied_cells(arrays, self.grid, (wr0, wc0, wr1 - wr0, wc1 - wc0))] = True
        mask = dilate(torch.from_numpy(occ), d)[r0 - wr0:r0 - wr0 + h, c0 - wc0:c0 - wc0 + w]

        grid = self.sub_grid((r0, c0))
        boxes = arrays["boxes"].astype(np.float32)
        labels = self._remap[arrays["labels"].astype(np.int64)]
        num = arrays["num_points"].astype(np.int64)
        x, y = boxes[:, 0].astype(np.float64), boxes[:, 1].astype(np.float64)
        keep = ((labels >= 0) & (num >= self.min_points) & (x >= grid.x_min) & (x < grid.x_max)
                & (y >= grid.y_min) & (y < grid.y_max))
        return {"bev": bev, "mask": mask.contiguous(),
                "boxes": torch.from_numpy(boxes[keep]),
                "labels": torch.from_numpy(labels[keep]),
                "num_points": torch.from_numpy(num[keep]),
                "grid": grid, "origin": (r0, c0), "index": index, "scene": rec["scene"],
                "frame": rec["frame"], "variant": rec["variant"], "preset": rec["preset"]}


def occupied_cells(arrays: Mapping[str, np.ndarray], grid: GridConfig,
                   window: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, cols)`` int64, relative to ``window`` ``(r0, c0, h, w)``, of the undilated
    occupied cells of compact arrays that lie in the window."""
    r0, c0, h, w = window
    cells = arrays["cells"].astype(np.int64)
    occ = np.unpackbits(arrays["occupied"], count=len(cells)).astype(bool)
    rows, cols = np.divmod(cells[occ], grid.shape[1])
    rows, cols = rows - r0, cols - c0
    sel = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    return rows[sel], cols[sel]


def collate(batch: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Items of :class:`CachedBEVDataset` -> a batch: ``bev (B, C, h, w)``, ``mask (B, h, w)``
    stacked; ``boxes``, ``labels``, ``num_points``, ``grid`` (one per item: crops differ in
    origin) as lists; ``origin (B, 2) int64``; ``index`` as a list. Use as ``collate_fn``."""
    if not batch:
        raise ValueError("collate needs at least one item")
    shapes = {tuple(b["bev"].shape) for b in batch}
    if len(shapes) != 1:
        raise ValueError(f"items of one batch must have one BEV shape, got {sorted(shapes)}")
    return {"bev": torch.stack([b["bev"] for b in batch]),
            "mask": torch.stack([b["mask"] for b in batch]),
            "boxes": [b["boxes"] for b in batch], "labels": [b["labels"] for b in batch],
            "num_points": [b["num_points"] for b in batch], "grid": [b["grid"] for b in batch],
            "origin": torch.tensor([b["origin"] for b in batch], dtype=torch.int64),
            "index": [b["index"] for b in batch]}
