"""``sparse-detector bench soak``: many frames through the pipeline, looking for leaks and drift.

``--frames`` frames (default 10,000) go through :meth:`pipeline.Pipeline.process` in this
process, one after the other, as PointCloud2-like :class:`pointcloud.CloudBuffer` s in a driver
layout (``sim.export.cloud_buffer``), cycling over ``--scans`` distinct pre-rendered synthetic
scans of the ``bench`` seed range (never used in training; the scan generation of
``bench pipeline``). Before the count starts: the pipeline's own warm-up frame (as the node does)
and ``--warmup`` real scans. Per frame the wall time of ``process`` (decode to boxes) is
recorded; the resident set size (``VmRSS`` of ``/proc/self/status``) every ``--rss-every``
frames, at the end of the first window and at the last frame.

The first and the last ``--window`` frames (default 1,000; at most half the frames) are
compared. JSON lines:

* a ``"run"`` row (settings, torch, CPU);
* a ``"soak"`` row: ``ms_first`` / ``ms_last`` (``{"p50", "p90", "p99", "min", "max"}`` of the
  two windows), ``p50_drift_pct`` and ``p99_drift_pct`` ((last - first) / first, in %: positive
  = slower at the end), ``rss_mib_first`` (RSS at the end of the first window), ``rss_mib_end``,
  ``rss_growth_pct`` ((end - first) / first, in %), ``rss_peak_mib`` (``VmHWM``), the RSS series
  ``rss_mib`` (``[frame, MiB]``), ``blocks`` (p50/p99 and RSS of consecutive windows: the trend),
  the ``targets`` (RSS growth < 5 %, p99 drift < 10 %) and ``met`` (each, and ``all``), and
  ``loadavg_end`` (the run row has ``loadavg_start``: other work on the machine shows there);
* a ``"summary"`` row (wall time).

On this project's 2-core CPU a frame takes about 60 ms: the default run lasts 10 to 12 minutes.
"""
from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import positive_int

#: the soak's targets: RSS growth from the end of the first window to the end [%], and p99
#: drift between the first and the last window [%] (both must stay below)
TARGETS = {"rss_growth_pct": 5.0, "p99_drift_pct": 10.0}


def add_arguments(parser) -> None:
    from ..pointcloud import LAYOUTS
    from .bench_pipeline import MODES

    parser.add_argument("--frames", type=positive_int, default=10000,
                        help="frames counted (default 10000; at least 2)")
    parser.add_argument("--scans", type=positive_int, default=50,
                        help="distinct scans the frames cycle over (default 50)")
    parser.add_argument("--scenes", type=positive_int, default=10,
                        help="bench scenes the scans are spread over (default 10)")
    parser.add_argument("--lidar", default="hdl64e", help="simulated LiDAR preset")
    parser.add_argument("--layout", default="velodyne", choices=sorted(LAYOUTS),
                        help="driver field layout of the clouds (default velodyne)")
    parser.add_argument("--mode", default=None, choices=MODES,
                        help="mask mode (default: the parameter file's mask.mode)")
    parser.add_argument("--window", type=positive_int, default=1000,
                        help="frames in the first and the last window compared (default 1000, "
                        "at most half the frames)")
    parser.add_argument("--rss-every", type=positive_int, default=100,
                        help="read the RSS every N frames (default 100)")
    parser.add_argument("--warmup", type=int, default=5,
                        help="uncounted scans before the count starts (default 5)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch threads (default: all cores)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="",
                        help="model description (default: the parameter file's model.path)")
    parser.add_argument("--params-file", default=None,
                        help="runtime parameter file (default: the built-in defaults)")
    parser.add_argument("--jsonl", default=None, help="also write the rows to this file")


# ------------------------------------------------------------------------ shared helpers

@dataclass
class BenchScan:
    """One synthetic scan: ``cloud`` (:class:`pointcloud.CloudBuffer`, sensor frame), ``pose``
    ``(x, y, yaw)`` of the sensor in its scene's map frame, ``map_yaml`` (the scene's nav2 map,
    "" when maps were not written), ``scene`` (seed) and ``points`` (count)."""
    cloud: Any
    pose: tuple[float, float, float]
    map_yaml: str
    scene: int
    points: int


def bench_scans(count: int, scenes: int, lidar: str = "hdl64e", layout: str = "velodyne",
                maps: bool = False) -> list[BenchScan]:
    """``count`` scans spread over the first ``scenes`` scenes of the ``bench`` seed range,
    consecutive frames of each scene (as ``bench pipeline``'s scans), as clouds in ``layout``;
    with ``maps`` each scene's nav2 map is written to a temporary folder."""
    from ..sim import FRAME_RATE, RoadMap, generate_scene, get_lidar, render_frame
    from ..sim.export import cloud_buffer
    from ..sim.splits import seeds

    if count < 1 or scenes < 1:
        raise ValueError(f"need at least one scan and one scene, got {count} scans over "
                         f"{scenes} scenes")
    preset = get_lidar(lidar)
    per = -(-count // scenes)
    tmp = Path(tempfile.mkdtemp(prefix="sparse_detector_bench_")) if maps else None
    out: list[BenchScan] = []
    for seed in seeds("bench", scenes):
        if len(out) == count:
            break
        scene = generate_scene(seed, duration=(per - 1) / FRAME_RATE)
        yaml_path = str(RoadMap.from_scene(scene).save(tmp / f"map_{seed}.yaml")) if maps else ""
        for i in range(min(per, count - len(out))):
            f = render_frame(scene, preset, i)
            pose = tuple(float(v) for v in f.ego_pose[[0, 1, 3]])
            out.append(BenchScan(cloud_buffer(f, layout), pose, yaml_path, seed, len(f.points)))
    return out


def proc_status_kib(key: str = "VmRSS", pid: int | str = "self") -> int:
    """A ``kB`` value of ``/proc/<pid>/status`` (``VmRSS``: resident set size, ``VmHWM``: its
    peak). Raises RuntimeError naming the file when it cannot be read (not Linux, process gone)
    or has no such key."""
    path = f"/proc/{pid}/status"
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError as exc:
        raise RuntimeError(f"cannot read {path} ({exc}): the soak and node benchmarks need "
                           "Linux /proc") from exc
    raise RuntimeError(f"{path} has no {key} line")


def pct_change(first: float, last: float) -> float | None:
    """``(last - first) / first`` in %, rounded to 3 decimals; None when ``first`` is 0."""
    return round((last - first) / first * 100.0, 3) if first else None


def run_info(torch, device: str, model, config, trained: bool) -> dict:
    """The settings every benchmark row of this kind starts with (torch, CPU, model)."""
    return {"threads": torch.get_num_threads(), "device": device, "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "model": model.name, "trained": trained, "mask_mode": config.mask.mode}


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none): a benchmark row
    records them at its start and end, so that a run on a shared machine shows it."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ---------------------------------------------------------------------------------- soak

def soak_row(times_ms: list[float], rss_kib: list[tuple[int, int]], window: int,
             rss_peak_kib: int) -> dict:
    """The ``"soak"`` row from the per-frame times [ms] and the ``(frame, kB)`` RSS samples
    (frames counted from 1; samples at frame ``window`` and at the last frame are required)."""
    from .bench_pipeline import percentiles

    n = len(times_ms)
    if window < 1 or 2 * window > n:
        raise ValueError(f"window of {window} frames does not fit twice into {n} frames")
    rss = dict(rss_kib)
    if window not in rss or n not in rss:
        raise ValueError(f"RSS samples at frames {window} and {n} are required, got "
                         f"{sorted(rss)}")
    first, last = percentiles(times_ms[:window]), percentiles(times_ms[-window:])
    mib = {k: round(v / 1024.0, 2) for k, v in rss.items()}
    growth = pct_change(rss[window], rss[n])
    p50_drift = pct_change(first["p50"], last["p50"])
    p99_drift = pct_change(first["p99"], last["p99"])
    blocks = []
    for start in range(0, n - window + 1, window):
        end = start + window
        p = percentiles(times_ms[start:end])
        sample = max((f for f in rss if f <= end), default=None)
        blocks.append({"frames": [start + 1, end], "p50": p["p50"], "p99": p["p99"],
                       "rss_mib": mib.get(sample) if sample is not None else None})
    met = {"rss_growth": growth is not None and growth < TARGETS["rss_growth_pct"],
           "p99_drift": p99_drift is not None and p99_drift < TARGETS["p99_drift_pct"]}
    met["all"] = all(met.values())
    return {"bench": "soak", "frames": n, "window": window,
            "ms_first": first, "ms_last": last,
            "p50_drift_pct": p50_drift, "p99_drift_pct": p99_drift,
            "rss_mib_first": mib[window], "rss_mib_end": mib[n], "rss_growth_pct": growth,
            "rss_peak_mib": round(rss_peak_kib / 1024.0, 2),
            "rss_mib": [[f, mib[f]] for f in sorted(mib)], "blocks": blocks,
            "targets": dict(TARGETS), "met": met}


def run(args) -> int:
    import torch

    from ..config import Config
    from ..model import load_description
    from ..pipeline import Pipeline
    from ..runtime import keep_freed_memory

    if args.frames < 2:
        raise SystemExit("bench soak: --frames must be at least 2 (a first and a last window)")
    window = min(args.window, args.frames // 2)
    keep_freed_memory()   # as the node does
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    config = Config.from_yaml(args.params_file) if args.params_file else Config()
    if args.mode:
        config = config.updated({"mask.mode": args.mode})
    model = load_description(args.model or config.model.path)
    pipeline = Pipeline(config, model, args.device)
    map_mode = config.mask.mode == "map_prior" or (
        config.mask.mode == "union" and "map_prior" in config.mask.union)
    data = bench_scans(args.scans, args.scenes, args.lidar, args.layout, maps=map_mode)
    priors: dict[str, Any] = {}
    if map_mode:
        from ..masks import MapPrior, road_min_value
        for s in data:
            if s.map_yaml not in priors:
                priors[s.map_yaml] = MapPrior.from_yaml(s.map_yaml, road_min_value(config.mask),
                                                        margin=config.mask.map_margin)
                priors[s.map_yaml](s.pose, model.grid)   # grow the road once, untimed
    run_row = {"bench": "run", "kind": "soak", "frames": args.frames, "window": window,
               "warmup": args.warmup, "scans": len(data), "scenes": args.scenes,
               "lidar": args.lidar, "layout": args.layout,
               "points_mean": round(sum(s.points for s in data) / len(data)),
               "rss_every": args.rss_every, "loadavg_start": load_average(),
               **run_info(torch, args.device, model, config, pipeline.detector.trained)}
    rows = [run_row]
    print(json.dumps(run_row), flush=True)

    def one(i: int) -> float:
        scan = data[i % len(data)]
        if map_mode:
            pipeline.detector.set_map_prior(priors[scan.map_yaml])
        t0 = time.perf_counter()
        pipeline.process(scan.cloud, scan.pose if map_mode else None)
        return (time.perf_counter() - t0) * 1e3

    pipeline.warm_up()
    for i in range(args.warmup):
        one(i)
    times: list[float] = []
    rss: list[tuple[int, int]] = []
    for i in range(args.frames):
        times.append(one(i))
        k = i + 1
        if k % args.rss_every == 0 or k in (window, args.frames):
            rss.append((k, proc_status_kib("VmRSS")))
    row = soak_row(times, rss, window, proc_status_kib("VmHWM"))
    row["loadavg_end"] = load_average()
    rows.append(row)
    print(json.dumps(row), flush=True)
    summary = {"bench": "summary", "kind": "soak", "met": row["met"]["all"],
               "wall_s": round(time.perf_counter() - t_start, 1)}
    rows.append(summary)
    print(json.dumps(summary), flush=True)
    if args.jsonl:
        Path(args.jsonl).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0
