"""Training / evaluation access to the synthetic world: a torch ``Dataset`` of frames,
generated on the fly, optionally cached on disk as ``.npz``.

Item ``i`` is frame ``i % frames_per_scene`` of scene ``i // frames_per_scene``; scene ``k``
uses seed ``seed + k``. Each item is a dict::

    points      (N, 4) float32 tensor   x, y, z, intensity (sensor frame ``lidar``)
    ring, time  (N,) int16 / float32    beam index, firing time within the scan [s]
    surface     (N,) uint8              what each point hit (sim.raycast.SURFACES)
    boxes       (K, 7) float32          x, y, z, length, width, height, yaw (sensor frame)
    labels      (K,) int64              index into CLASSES ("car", "pedestrian", "cyclist")
    num_points  (K,) int64              LiDAR points inside each box
    pose        (4,) float64            x, y, z, yaw of base_link in ``map``
    map         dict: image (X, Y) uint8 nav2 values (255 road, 230 sidewalk, 0 other; row =
                x index, col = y index, as bev.py), origin (x, y) [m], resolution [m]
    scene, frame, mount_height          ints / float

Use :func:`collate_frames` as ``collate_fn`` (clouds and box lists differ in length).
"""
from __future__ import annotations

import hashlib
import os
import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .frames import render_frame
from .lidar import DEFAULT_PRESET, LidarModel, get_lidar
from .world import CLASSES, FRAME_RATE, generate_scene

_CLASS_INDEX = {c: i for i, c in enumerate(CLASSES)}


class SimDataset(Dataset):
    """Frames of ``num_scenes`` scenes x ``frames_per_scene`` frames (10 Hz drives).

    ``lidar``: a preset name or a :class:`LidarModel`; ``cache_dir``: where to keep ``.npz``
    files of rendered frames (and maps) so that a second epoch reads instead of rendering.
    """

    def __init__(self, num_scenes: int = 10, frames_per_scene: int = 20, *, seed: int = 0,
                 lidar: str | LidarModel = DEFAULT_PRESET, density: float = 1.0,
                 cache_dir: str | Path | None = None, transform=None):
        if num_scenes < 1 or frames_per_scene < 1:
            raise ValueError("num_scenes and frames_per_scene must be >= 1")
        self.num_scenes, self.frames_per_scene = int(num_scenes), int(frames_per_scene)
        self.seed, self.density = int(seed), float(density)
        self.lidar = get_lidar(lidar) if isinstance(lidar, str) else lidar
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.transform = transform
        self._scenes: OrderedDict = OrderedDict()
        self._maps: OrderedDict = OrderedDict()
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)

    def __len__(self) -> int:
        return self.num_scenes * self.frames_per_scene

    @property
    def duration(self) -> float:
        return (self.frames_per_scene - 1) / FRAME_RATE

    def _key(self, scene_idx: int) -> str:
        spec = dict(seed=self.seed + scene_idx, duration=self.duration, density=self.density,
                    lidar=repr(self.lidar), v=2)   # v2: map images are (x, y) rasters
        return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]

    def scene(self, scene_idx: int):
        sc = self._scenes.get(scene_idx)
        if sc is None:
            sc = generate_scene(self.seed + scene_idx, duration=self.duration, density=self.density)
            self._scenes[scene_idx] = sc
            while len(self._scenes) > 2:
                self._scenes.popitem(last=False)
        return sc

    def _map(self, scene_idx: int):
        cached = self._maps.get(scene_idx)
        if cached is not None:
            return cached
        path = self.cache_dir / f"map_{self._key(scene_idx)}.npz" if self.cache_dir else None
        if path is not None and path.exists():
            with np.load(path) as z:
                out = dict(image=z["image"], origin=tuple(z["origin"]), resolution=float(z["res"]))
        else:
            rm = self.scene(scene_idx).roadmap()
            out = dict(image=rm.occupancy_image(), origin=tuple(rm.origin),
                       resolution=rm.resolution)
            if path is not None:
                _save_atomic(path, image=out["image"], origin=np.array(out["origin"]),
                             res=np.array(out["resolution"]))
        self._maps[scene_idx] = out
        while len(self._maps) > 2:
            self._maps.popitem(last=False)
        return out

    def _frame_arrays(self, scene_idx: int, frame_idx: int) -> dict:
        path = (self.cache_dir / f"frame_{self._key(scene_idx)}_{frame_idx:05d}.npz"
                if self.cache_dir else None)
        if path is not None and path.exists():
            with np.load(path) as z:
                return {k: z[k] for k in z.files}
        f = render_frame(self.scene(scene_idx), self.lidar, frame_idx)
        arrays = dict(points=f.points, ring=f.ring.astype(np.int16), time=f.time,
                      surface=f.surface, boxes=f.boxes,
                      labels=np.array([_CLASS_INDEX[c] for c in f.labels], np.int64),
                      num_points=f.num_points.astype(np.int64), pose=f.ego_pose)
        if path is not None:
            _save_atomic(path, **arrays)
        return arrays

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        scene_idx, frame_idx = divmod(int(index), self.frames_per_scene)
        a = self._frame_arrays(scene_idx, frame_idx)
        m = self._map(scene_idx)
        item = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in a.items()}
        item["map"] = dict(image=torch.from_numpy(m["image"].copy()), origin=m["origin"],
                           resolution=m["resolution"])
        item.update(scene=scene_idx, frame=frame_idx, mount_height=self.lidar.mount_height)
        return self.transform(item) if self.transform is not None else item


def _save_atomic(path, **arrays) -> None:
    """Write an .npz through a temporary file of this process, then rename: a reader (another
    DataLoader worker) never sees a half-written file."""
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def collate_frames(batch: list[dict]) -> dict:
    """Batch of items -> dict of lists (clouds and box sets have different lengths)."""
    return {k: [b[k] for b in batch] for k in batch[0]}
