"""``sparse-detector bench pipeline``: the whole detector per stage, dense against every mask.

Synthetic 64-beam scans (``--lidar hdl64e``, about 120k points) of scenes from the ``bench``
seed range (never used in training, see ``sim/splits.py``) go through
:class:`~sparse_detector_ros.pipeline.Detector` once per mask mode, the modes interleaved scan
by scan (order rotated every scan) in one process and one thread setting, after a warm-up. The
map prior gets each scene's nav2 map and the sensor pose of each scan. JSON lines:

* a ``"run"`` row (settings, torch, CPU);
* per mode a ``"pipeline"`` row: for every stage of ``pipeline.STAGES`` that ran and for
  ``total``, ``{"p50", "p90", "p99", "min", "max"}`` in ms over the scans; the active-tile
  fraction (mean, min, max); ``backbone_speedup`` = dense p50 backbone / this mode's p50
  backbone; ``mask_cost`` = this mode's p50 mask time / dense p50 backbone time; the network's
  dense MACs and the MAC-counted ideal backbone speed-up (1 / mean active fraction).

``--markdown`` rewrites the table of ``docs/pipeline.md`` and the README's headline from the
rows (between their ``<!-- bench-pipeline... -->`` markers). The weights are the model's (random
when it has none: the timings do not depend on them, the net mask's active fraction does).
"""
from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path

MODES = ("dense", "occupancy", "map_prior", "net", "union")
DOCS_MARKERS = ("<!-- bench-pipeline:begin -->", "<!-- bench-pipeline:end -->")
README_MARKERS = ("<!-- bench-pipeline-headline:begin -->", "<!-- bench-pipeline-headline:end -->")


def add_arguments(parser) -> None:
    parser.add_argument("--scans", type=int, default=50, help="timed scans (default 50)")
    parser.add_argument("--scenes", type=int, default=10,
                        help="scenes the scans are spread over (default 10)")
    parser.add_argument("--lidar", default="hdl64e", help="simulated LiDAR preset")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--warmup", type=int, default=3, help="untimed scans per mode first")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: all cores)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="", help="model description (default: shipped)")
    parser.add_argument("--params-file", default=None,
                        help="runtime parameter file (default: the built-in defaults)")
    parser.add_argument("--markdown", action="store_true",
                        help="rewrite the tables of docs/pipeline.md and README.md")
    parser.add_argument("--jsonl", default=None, help="also write the rows to this file")


def percentiles(values: list[float]) -> dict[str, float]:
    """p50 / p90 / p99 (linear interpolation), min and max of ``values``, in ms, rounded."""
    import numpy as np

    v = np.asarray(values, dtype=np.float64)
    p50, p90, p99 = np.percentile(v, [50, 90, 99])
    return {k: round(float(x), 3) for k, x in
            (("p50", p50), ("p90", p90), ("p99", p99), ("min", v.min()), ("max", v.max()))}


def scans(args):
    """``(points, pose, map_yaml)`` for ``--scans`` scans over ``--scenes`` bench scenes."""
    from ..sim import FRAME_RATE, RoadMap, generate_scene, get_lidar, render_frame
    from ..sim.splits import seeds

    lidar = get_lidar(args.lidar)
    per = -(-args.scans // args.scenes)
    tmp = Path(tempfile.mkdtemp(prefix="sparse_detector_bench_"))
    out = []
    for seed in seeds("bench", args.scenes):
        scene = generate_scene(seed, duration=(per - 1) / FRAME_RATE)
        yaml_path = RoadMap.from_scene(scene).save(tmp / f"map_{seed}.yaml")
        for i in range(per):
            if len(out) == args.scans:
                break
            f = render_frame(scene, lidar, i)
            out.append((f.points[:, :4].astype("float32"), tuple(f.ego_pose[[0, 1, 3]]),
                        str(yaml_path)))
    return out


def run(args) -> int:
    import torch

    from ..config import Config, MaskConfig
    from ..masks import MapPrior, road_min_value
    from ..model import load_description
    from ..pipeline import STAGES, Detector, StageTimer

    from ..runtime import keep_freed_memory

    keep_freed_memory()   # as the node does
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    base = Config.from_yaml(args.params_file) if args.params_file else Config()
    model = load_description(args.model)
    data = scans(args)
    detectors = {}
    for mode in args.modes:
        mask = MaskConfig(**{**base.mask.__dict__, "mode": mode})
        detectors[mode] = Detector(Config(model=base.model, sparse=base.sparse, mask=mask,
                                          detector=base.detector, node=base.node),
                                   model, args.device)
    rows = [{"bench": "run", "scans": len(data), "scenes": args.scenes, "lidar": args.lidar,
             "points_mean": round(sum(len(p) for p, _, _ in data) / len(data)),
             "modes": list(args.modes), "threads": torch.get_num_threads(),
             "device": args.device, "torch": torch.__version__,
             "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
             "model": model.name, "trained": all(d.trained for d in detectors.values()),
             "mask_defaults": base.mask.__dict__}]
    print(json.dumps(rows[0]), flush=True)
    priors: dict[str, MapPrior] = {}
    times = {m: {s: [] for s in (*STAGES, "total")} for m in args.modes}
    active = {m: [] for m in args.modes}
    boxes = {m: [] for m in args.modes}
    fallbacks = {m: 0 for m in args.modes}
    for i, (points, pose, yaml_path) in enumerate(data[:args.warmup] + data):
        warm = i < args.warmup
        if yaml_path not in priors:
            priors[yaml_path] = MapPrior.from_yaml(yaml_path, road_min_value(base.mask),
                                                   margin=base.mask.map_margin)
            # growing the road by the margin happens once per map (as when the node loads
            # its map), not per scan: do it before the timed calls
            priors[yaml_path](pose, model.grid)
        order = list(args.modes)
        k = i % len(order)
        for mode in order[k:] + order[:k]:
            det = detectors[mode]
            det.set_map_prior(priors[yaml_path])
            timer = StageTimer(det.device)
            t0 = time.perf_counter()
            r = det.detect(points, pose, timer)
            total = (time.perf_counter() - t0) * 1e3
            if warm:
                continue
            for s, ms in r.stage_ms.items():
                times[mode][s].append(ms)
            times[mode]["total"].append(total)
            active[mode].append(r.active_fraction)
            boxes[mode].append(len(r.detections))
            fallbacks[mode] += bool(r.mask_fallback)
    dense_bb = percentiles(times["dense"]["backbone"])["p50"] if "dense" in times else None
    net = detectors[args.modes[0]].net
    macs = net.macs(model.grid.shape)
    for mode in args.modes:
        stages = {s: percentiles(v) for s, v in times[mode].items() if v}
        bb = stages["backbone"]["p50"]
        mean_active = sum(active[mode]) / len(active[mode])
        row = {"bench": "pipeline", "mode": mode, "ms": stages,
               "active_fraction": {"mean": round(mean_active, 4),
                                   "min": round(min(active[mode]), 4),
                                   "max": round(max(active[mode]), 4)},
               "backbone_speedup": round(dense_bb / bb, 3) if dense_bb else None,
               "ideal_backbone_speedup": round(1 / mean_active, 3) if mean_active else None,
               "mask_cost": round(stages["mask"]["p50"] / dense_bb, 4) if dense_bb else None,
               "detections_mean": round(sum(boxes[mode]) / len(boxes[mode]), 2),
               "fallback_scans": fallbacks[mode], "net_macs": macs}
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = {"bench": "summary", "wall_s": round(time.perf_counter() - t_start, 1)}
    rows.append(summary)
    print(json.dumps(summary), flush=True)
    if args.jsonl:
        Path(args.jsonl).write_text("".join(json.dumps(r) + "\n" for r in rows))
    if args.markdown:
        update_docs(rows)
    return 0


# ------------------------------------------------------------------------------ tables

def render_table(rows: list[dict]) -> str:
    """The markdown table of the ``pipeline`` rows (p50 / p90 / p99 per stage in ms)."""
    from .bench_tables import _wrap

    run = next(r for r in rows if r["bench"] == "run")
    data = [r for r in rows if r["bench"] == "pipeline"]
    stages = [s for s in ("rasterize", "mask", "backbone", "head", "boxes")
              if any(s in r["ms"] for r in data)]
    lines = [_wrap(f"{run['scans']} synthetic {run['lidar']} scans (about "
                   f"{run['points_mean']} points) from {run['scenes']} bench scenes, "
                   f"{run['threads']} torch threads on {run['device']} ({run['cpu']}), torch "
                   f"{run['torch']}, model '{run['model']}'"
                   + ("" if run["trained"] else " with random weights") + ". Cells: p50 / p90 "
                   "/ p99 ms over the scans; total = rasterize to boxes (decode of the "
                   "message not included)."), ""]
    head = ["mask", "active tiles", *stages, "total", "backbone ×", "mask cost"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in data:
        a = r["active_fraction"]
        cells = [f"`{r['mode']}`", f"{a['mean']:.0%} ({a['min']:.0%}–{a['max']:.0%})"]
        for s in (*stages, "total"):
            m = r["ms"].get(s)
            cells.append(f"{m['p50']:.1f} / {m['p90']:.1f} / {m['p99']:.1f}" if m else "–")
        sp = r["backbone_speedup"]
        cells.append(f"×{sp:.2f} (ideal ×{r['ideal_backbone_speedup']:.1f})" if sp else "–")
        cells.append(f"{r['mask_cost']:.1%}" if r["mask_cost"] is not None else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def update_docs(rows: list[dict], root: str | Path | None = None) -> None:
    from .bench_tables import replace_block

    root = Path(root) if root else Path(__file__).resolve().parents[2]
    table = render_table(rows)
    for rel, markers in (("docs/pipeline.md", DOCS_MARKERS), ("README.md", README_MARKERS)):
        path = root / rel
        text = path.read_text(encoding="utf-8")
        path.write_text(replace_block(text, markers, table), encoding="utf-8")
