"""``sparse-detector eval``: detection quality on synthetic sequences never used in training.

What it runs. ``--scenes`` scenes of the ``eval`` seed range (:mod:`..sim.splits`: training,
validation and benchmarks draw from other ranges), each rendered by every LiDAR preset of
``--presets`` at ``--frames`` frames ``--frame-step`` frames (0.1 s each) apart, starting at
frame 0; every frame goes through one :class:`~sparse_detector_ros.pipeline.Detector` per mask
mode of ``--modes`` (same weights, same runtime parameters but ``mask.mode``), and one
:class:`~sparse_detector_ros.train.evaluate.Evaluator` per (preset, mode) collects it. Every
option fixes the scenes, frames and weights, so the output depends on the options only
(deterministic; the wall time is printed, never written into the reports).

* Presets: by default ``hdl64e`` and ``os1-64`` (two of the training presets,
  :data:`..train.data.DEFAULT_PRESETS`) and :data:`HELD_OUT_PRESET` ``os1-128``, which training
  never sees. Any preset that is not a training preset is marked "held out". ``os1-128`` is
  the held-out default because its field of view (+-22.5 deg vertical, 360 deg, 2048 columns,
  120 m) is exactly that of the training preset ``os1-64``: what changes is only the beam
  density (twice the rings, so more points per object), which isolates generalisation to a
  new sensor from a change of what the sensor can see at all. ``mid360`` (-7 .. +52 deg, 70 m)
  looks mostly upwards and sees little of the road, so its numbers would measure the field of
  view rather than the detector.
* Mask modes: by default ``dense occupancy map_prior net`` and the runtime configuration's
  ``mask.mode`` (the default column, marked "(default)" in the tables).
* Map prior: each scene's nav2 map (:meth:`..sim.RoadMap.from_scene`, saved to a temporary
  folder) loaded as the node loads its map: ``mask.map_road_min_value`` (default -1: every free
  cell of the map, on the simulator's maps the carriageway and the sidewalks) and
  ``mask.map_margin``; the sensor pose is the frame's ego pose ``(x, y, yaw)`` (the sensor sits
  above base_link).
* Ground truth: the frame's boxes (sensor frame), classes mapped to the model's class indices
  (objects of other classes are left out), LiDAR points per object ``frame.num_points``; the
  evaluator's ``region`` is the model's BEV grid (objects centred outside are don't care).
  Detections: points in each detected box counted as the ground truth's are
  (:func:`..sim.frames.counting_boxes`), so each detection falls in its own points band.
* Mask recall: for each ground-truth object, whether the cell of the head's output grid
  (stride ``net.out_stride``) that holds its centre was active (``FrameResult.active``,
  :func:`centre_active`); the evaluator counts the evaluated (not don't care) objects only.

Output: ``<out>/eval.json`` (``{preset: {mode: Evaluator.results() + "run"}}``, ``run`` holding
the preset, whether it is held out, the mode, whether it is the default, the model, whether it
has trained weights, the scene seeds and frames) and ``<out>/eval.md`` (the tables of
:func:`..train.evaluate.to_markdown` under a paragraph naming the run). ``--readme`` rewrites the
block between :data:`README_MARKERS` of the README with the headline rows (one per preset, the
default mask mode).
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from . import positive_int

MODES = ("dense", "occupancy", "map_prior", "net", "union")
#: the mask modes evaluated by default (the configuration's ``mask.mode`` is added)
EVAL_MODES = ("dense", "occupancy", "map_prior", "net")
#: the preset evaluated by default that training never sees (see the module docstring)
HELD_OUT_PRESET = "os1-128"
DEFAULT_EVAL_PRESETS = ("hdl64e", "os1-64", HELD_OUT_PRESET)
README_MARKERS = ("<!-- eval-headline:begin -->", "<!-- eval-headline:end -->")
#: nav2 map value from which a cell is road for the map prior: the simulator's carriageway


def add_arguments(parser) -> None:
    from ..paths import source_root

    root = source_root()
    parser.add_argument("--model", default="",
                        help="model description (default: the parameter file's model.path, "
                             "else the shipped model)")
    parser.add_argument("--presets", nargs="+", default=list(DEFAULT_EVAL_PRESETS),
                        help="LiDAR presets, one row block each (default: hdl64e os1-64 and "
                             f"{HELD_OUT_PRESET}, held out of training; presets that are not "
                             "training presets are marked held out)")
    parser.add_argument("--scenes", type=positive_int, default=8,
                        help="scenes of the eval split (default 8)")
    parser.add_argument("--frames", type=positive_int, default=5,
                        help="frames per scene and preset (default 5)")
    parser.add_argument("--frame-step", type=positive_int, default=5,
                        help="frames (0.1 s each) between two evaluated frames (default 5)")
    parser.add_argument("--modes", nargs="+", default=None, choices=MODES,
                        help="mask modes, one column each (default: dense occupancy map_prior "
                             "net and the runtime configuration's mask.mode)")
    parser.add_argument("--params-file", default=None,
                        help="runtime parameter file (default: the built-in defaults)")
    parser.add_argument("--out", default=str(root / "docs"),
                        help="folder for eval.json and eval.md (default: docs/ of the source "
                             "tree)")
    parser.add_argument("--readme", nargs="?", const=str(root / "README.md"), default=None,
                        help="rewrite the headline block of this README (default when given "
                             "without a path: README.md of the source tree)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no tqdm bar")


def centre_active(active, boxes, grid, stride: int) -> np.ndarray:
    """(G,) bool: whether the centre ``(x, y)`` of each box ``(G, 7)`` lies in an active cell of
    ``active`` (Ho, Wo) bool, the head's output grid of stride ``stride`` on the BEV ``grid``
    (row = x index, col = y index, see ``bev.py``: cell ``(i, j)`` covers ``x in [x_min +
    i*S*res, x_min + (i+1)*S*res)``, same for y). Centres off the output grid are False."""
    a = active.detach().cpu().numpy() if hasattr(active, "detach") else np.asarray(active)
    a = a.astype(bool)
    if a.ndim != 2:
        raise ValueError(f"active must have shape (Ho, Wo), got {a.shape}")
    b = np.asarray(boxes, np.float64).reshape(-1, 7)
    cell = float(stride) * float(grid.resolution)
    i = np.floor((b[:, 0] - grid.x_min) / cell)
    j = np.floor((b[:, 1] - grid.y_min) / cell)
    inside = (i >= 0) & (i < a.shape[0]) & (j >= 0) & (j < a.shape[1])
    out = np.zeros(len(b), bool)
    out[inside] = a[i[inside].astype(np.int64), j[inside].astype(np.int64)]
    return out


def eval_modes(requested: list[str] | None, default_mode: str) -> list[str]:
    """The mask modes to run, in order, each once: ``requested``, or :data:`EVAL_MODES` and
    ``default_mode``."""
    modes = list(requested) if requested else [*EVAL_MODES, default_mode]
    return list(dict.fromkeys(modes))


def evaluate(args) -> tuple[dict[str, dict[str, dict]], dict[str, Any]]:
    """Run the evaluation of the module docstring: ``({preset: {mode: results}}, info)`` with
    ``info`` the run's settings (modes, default mode, held-out presets, model, seeds)."""
    import torch
    from tqdm import tqdm

    from ..boxes import count_points_in_boxes
    from ..config import Config
    from ..masks import MapPrior, road_min_value
    from ..model import load_description
    from ..pipeline import Detector
    from ..sim import FRAME_RATE, RoadMap, generate_scene, get_lidar, render_frame
    from ..sim.frames import count_margin, counting_boxes
    from ..sim.splits import seeds
    from ..train.data import DEFAULT_PRESETS
    from ..train.evaluate import Evaluator

    if args.threads:
        torch.set_num_threads(args.threads)
    base = Config.from_yaml(args.params_file) if args.params_file else Config()
    model = load_description(args.model or base.model.path)
    presets = list(dict.fromkeys(p.lower() for p in args.presets))
    lidars = {p: get_lidar(p) for p in presets}     # ValueError naming the presets
    held_out = [p for p in presets if p not in DEFAULT_PRESETS]
    default_mode = base.mask.mode
    modes = eval_modes(args.modes, default_mode)
    detectors = {m: Detector(replace(base, mask=replace(base.mask, mode=m)), model, args.device)
                 for m in modes}
    net = detectors[modes[0]].net
    class_index = {c: k for k, c in enumerate(model.classes)}
    evaluators = {p: {m: Evaluator(model.classes, region=model.grid) for m in modes}
                  for p in presets}
    scene_seeds = seeds("eval", args.scenes)
    indices = [k * args.frame_step for k in range(args.frames)]
    duration = indices[-1] / FRAME_RATE
    bar = tqdm(total=len(scene_seeds) * len(presets) * len(indices), unit="frame",
               desc="eval", disable=not args.progress, file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="sparse_detector_eval_") as tmp:
        for seed in scene_seeds:
            scene = generate_scene(seed, duration=duration)
            yaml_path = RoadMap.from_scene(scene).save(Path(tmp) / f"map_{seed}.yaml")
            prior = MapPrior.from_yaml(yaml_path, road_min_value(base.mask),
                                       margin=base.mask.map_margin)
            for det in detectors.values():
                det.set_map_prior(prior)
            for preset in presets:
                lidar = lidars[preset]
                margin = count_margin(lidar)
                for index in indices:
                    frame = render_frame(scene, lidar, index)
                    known = np.array([c in class_index for c in frame.labels], bool)
                    gt_boxes = frame.boxes[known]
                    gt = (gt_boxes, [class_index[c] for c in frame.labels[known]],
                          frame.num_points[known])
                    points = frame.points[:, :4]
                    pose = tuple(float(v) for v in frame.ego_pose[[0, 1, 3]])
                    for mode in modes:
                        r = detectors[mode].detect(points, pose)
                        boxes = r.detections.boxes.detach().cpu().numpy()
                        pred_points = count_points_in_boxes(points, counting_boxes(boxes,
                                                                                   *margin))
                        evaluators[preset][mode].add(
                            r, gt, active_centre=centre_active(r.active, gt_boxes, model.grid,
                                                               net.out_stride),
                            pred_num_points=pred_points)
                    bar.update(1)
    bar.close()
    trained = all(d.trained for d in detectors.values())
    info = {"modes": modes, "default_mode": default_mode, "presets": presets,
            "held_out": held_out, "training_presets": list(DEFAULT_PRESETS),
            "model": model.name, "trained": trained, "split": "eval",
            "scene_seeds": scene_seeds, "frames": indices, "frame_step": args.frame_step,
            "map_road_value": base.mask.map_road_min_value, "map_margin": base.mask.map_margin,
            "head_stride": net.out_stride}
    results = {}
    for p in presets:
        results[p] = {}
        for m in modes:
            res = evaluators[p][m].results()
            res["run"] = {"preset": p, "held_out": p in held_out, "mask_mode": m,
                          "default_mode": m == default_mode} | {
                k: info[k] for k in ("model", "trained", "split", "scene_seeds", "frames",
                                     "map_road_value", "map_margin", "head_stride")}
            results[p][m] = res
    return results, info


def describe(info: dict[str, Any]) -> str:
    """One paragraph naming the run (model, weights, scenes, presets, modes, map prior)."""
    seeds_ = info["scene_seeds"]
    weights = "trained weights" if info["trained"] else "random weights (the APs mean nothing)"
    held = ", ".join(f"`{p}`" for p in info["held_out"]) or "none"
    modes = ", ".join(f"`{m}`" for m in info["modes"])
    frames = ", ".join(map(str, info["frames"]))
    return (f"Model `{info['model']}` with {weights}; {len(seeds_)} scene(s) of the "
            f"`{info['split']}` split (seeds {seeds_[0]}–{seeds_[-1]}, never used in "
            f"training), frames {frames} of each, per LiDAR preset. Training presets: "
            f"{', '.join(info['training_presets'])}; held out of training: {held}. Mask "
            f"modes: {modes}; the default is the runtime configuration's "
            f"`{info['default_mode']}`. The map prior is the road ("
            + (f"map value >= {info['map_road_value']}" if info["map_road_value"] >= 0
               else "every free cell") +
            f") of each scene's nav2 map grown by "
            f"{info['map_margin']:g} m, at the frame's pose. Mask recall: share of evaluated "
            "objects whose centre lies in an active cell of the head (stride "
            f"{info['head_stride']}).")


def readme_block(results: dict, info: dict[str, Any]) -> str:
    """The README's headline: one :func:`..train.evaluate.headline` row per preset for the
    default mask mode (the first mode when the default was not run), held-out presets
    marked."""
    from ..train.evaluate import headline

    mode = info["default_mode"] if info["default_mode"] in info["modes"] else info["modes"][0]
    lines: list[str] = []
    for preset in results:
        table = headline(results, preset, mode).splitlines()
        row = table[2]
        if preset in info["held_out"]:
            row = row.replace(f"| {preset} |", f"| {preset} (held out) |", 1)
        lines += table[:2] if not lines else []
        lines.append(row)
    weights = "trained weights" if info["trained"] else "random weights"
    note = (f"Model `{info['model']}` ({weights}), {len(info['scene_seeds'])} held-out "
            f"synthetic scenes x {len(info['frames'])} frames, mask mode `{mode}`; AP in % "
            "(KITTI R40). All modes and bands: [docs/eval.md](docs/eval.md).")
    return note + "\n\n" + "\n".join(lines) + "\n"


def update_readme(path: str | Path, body: str) -> Path:
    """Replace the block between :data:`README_MARKERS` of ``path`` with ``body``."""
    from .bench_tables import replace_block

    path = Path(path)
    text = path.read_text(encoding="utf-8")
    path.write_text(replace_block(text, README_MARKERS, body), encoding="utf-8")
    return path


def run(args) -> int:
    from ..train.evaluate import write_report

    t0 = time.perf_counter()
    results, info = evaluate(args)
    json_path, md_path = write_report(args.out, results, default_mode=info["default_mode"],
                                      held_out=info["held_out"],
                                      title="Detection quality on held-out synthetic scenes")
    md = md_path.read_text(encoding="utf-8")
    md_path.write_text("# Evaluation (generated by `sparse-detector eval`; do not edit)\n\n"
                       + describe(info) + "\n\n" + md, encoding="utf-8")
    written = [str(json_path), str(md_path)]
    if args.readme:
        written.append(str(update_readme(args.readme, readme_block(results, info))))
    print(json.dumps({"eval": "summary", "written": written,
                      "wall_s": round(time.perf_counter() - t0, 1)}), flush=True)
    return 0
