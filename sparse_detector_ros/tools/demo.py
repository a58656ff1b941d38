"""``sparse-detector demo``: the main job. Make a short synthetic drive (a scene never used in
training), start the real node with the shipped weights, stream the drive into it over DDS
(loopback, own domain) at the sensor's rate, and collect what it publishes.

Prints a per-frame table (ground truth evaluated, detections, true/false positives and misses at
the evaluation's BEV IoU: car 0.7, pedestrian and cyclist 0.5; latency from the cloud's stamp to
the arrival of its ``output/objects``; active-tile fraction) and a summary (recall, precision,
latency p50/p99, active fraction, frames dropped, and the backbone's speed-up against the dense
backbone, measured in this process on the same frames side by side). Writes BEV pictures (points,
computed tiles from ``output/mask``, detections against ground truth) and ``summary.json`` to
the folder it names. The node is stopped with Ctrl-C (SIGINT) at the end; its log is printed
when something went wrong.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def add_arguments(parser) -> None:
    from ..pointcloud import LAYOUTS
    from ..sim.splits import seeds

    parser.add_argument("--frames", type=_positive(int), default=20,
                        help="clouds to send (default 20: 2 s of driving)")
    parser.add_argument("--rate", type=_positive(float), default=10.0,
                        help="send rate [Hz] (default 10, the simulated sensor's rate)")
    parser.add_argument("--lidar", default="hdl64e", help="simulated LiDAR preset")
    parser.add_argument("--layout", default="velodyne", choices=sorted(LAYOUTS),
                        help="driver field layout (default velodyne)")
    parser.add_argument("--seed", type=int, default=seeds("bench", 1)[0],
                        help="synthetic scene seed (default: the first benchmark scene, which "
                        "training never sees)")
    parser.add_argument("--params-file", default=None,
                        help="ROS parameter file (default: the package's config)")
    parser.add_argument("--out", default="demo_output",
                        help="folder for the pictures and summary.json (default demo_output)")
    parser.add_argument("--picture-every", type=_positive(int), default=5,
                        help="write a BEV picture of every N-th frame (default 5)")
    parser.add_argument("--domain-id", type=int, default=None, help="ROS_DOMAIN_ID to use")


def _stamp_key(stamp) -> tuple[int, int]:
    return int(stamp.sec), int(stamp.nanosec)


def objects_to_arrays(msg, classes) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A vision_msgs/Detection3DArray -> (boxes (K, 7) in its frame, scores (K,), class ids)."""
    from ..frames import quaternion_to_yaw

    boxes, scores, names = [], [], []
    for d in msg.detections:
        c, s, q = d.bbox.center.position, d.bbox.size, d.bbox.center.orientation
        boxes.append((c.x, c.y, c.z, s.x, s.y, s.z, quaternion_to_yaw(q.x, q.y, q.z, q.w)))
        scores.append(d.results[0].hypothesis.score if d.results else 0.0)
        names.append(d.results[0].hypothesis.class_id if d.results else "")
    return np.asarray(boxes, np.float64).reshape(-1, 7), np.asarray(scores), names


def mask_to_array(msg) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """A nav_msgs/OccupancyGrid with an axis-aligned origin -> ((nx, ny) bool, row = x index,
    and its extent (x_min, x_max, y_min, y_max))."""
    info = msg.info
    grid = np.asarray(msg.data, np.int8).reshape(info.height, info.width).T > 0
    x0, y0 = info.origin.position.x, info.origin.position.y
    return grid, (x0, x0 + info.width * info.resolution, y0, y0 + info.height * info.resolution)


def backbone_speedup(frames, model, config) -> dict:
    """The backbone's time with the configured mask against the dense backbone, in this
    process, on the same frames, alternating (one warm-up frame each); median over frames."""
    from dataclasses import replace

    import torch

    from ..pipeline import Detector

    dense_cfg = replace(config, mask=replace(config.mask, mode="dense"))
    sparse, dense = Detector(config, model), Detector(dense_cfg, model)
    torch.set_num_threads(torch.get_num_threads())
    ms = {"sparse": [], "dense": []}
    for i, f in enumerate([frames[0], *frames]):
        for name, det in (("sparse", sparse), ("dense", dense)):
            t = det.detect(f.points).stage_ms["backbone"]
            if i > 0:
                ms[name].append(t)
    med = {k: float(np.median(v)) for k, v in ms.items()}
    return {"backbone_ms_sparse_p50": med["sparse"], "backbone_ms_dense_p50": med["dense"],
            "backbone_speedup": med["dense"] / med["sparse"], "frames": len(frames)}


def run(args) -> int:
    from .node_client import local_dds_env

    local_dds_env(args.domain_id)  # before rclpy starts

    from ..config import Config
    from ..model import load_description
    from ..paths import find_share_file
    from ..sim import FRAME_RATE, generate_scene, get_lidar, render_frame
    from ..sim.export import cloud_buffer
    from ..train.evaluate import MIN_POINTS
    from .demo_report import FrameScore, draw_bev, score_frame
    from .node_client import NodeProcess, Probe, stamp_ns

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    params_file = args.params_file or find_share_file("config/sparse_detector.yaml")
    config = Config.from_yaml(params_file)
    model = load_description(config.model.path)
    classes = model.classes

    lidar = get_lidar(args.lidar)
    # The scene is planned (and checked for collisions) for frames at the sensor's 10 Hz,
    # whatever rate they are sent at.
    scene = generate_scene(args.seed, duration=(args.frames - 1) / FRAME_RATE)
    t0 = time.perf_counter()
    frames = [render_frame(scene, lidar, i) for i in range(args.frames)]
    clouds = [cloud_buffer(f, args.layout) for f in frames]
    print(f"demo: rendered {args.frames} scans of synthetic scene {args.seed} ({lidar.name}, "
          f"{args.layout} layout, {sum(len(f.points) for f in frames) // len(frames)} points on "
          f"average) in {time.perf_counter() - t0:.1f} s", flush=True)

    print(f"demo: starting sparse_detector_node with {params_file}", flush=True)
    node = NodeProcess(params_file, {"node.diagnostics_period": 0.5})
    probe = Probe(reliable=True)  # compatible with best-effort and reliable subscribers
    code, ok = None, False
    try:
        if not probe.has_objects:
            raise SystemExit("demo: vision_msgs is missing (run scripts/setup.sh)")
        if not probe.wait_for_subscriber(90):
            print(node.log())
            raise SystemExit("demo: the node did not subscribe to input/points")
        print(f"demo: streaming at {args.rate} Hz", flush=True)
        stamps = []
        period = 1.0 / args.rate
        next_t = time.monotonic()
        for cloud in clouds:
            stamp = probe.now()
            stamps.append(stamp)
            probe.publish(cloud, frame_id="lidar", stamp=stamp)
            next_t += period
            probe.spin_for(max(0.0, next_t - time.monotonic()))
        final = probe.wait_for_diag(
            lambda d: int(d["frames_processed"]) + int(d["frames_dropped"])
            + int(d["frames_rejected"]) >= len(clouds) <= int(d["frames_received"]), 30)
        probe.spin_for(0.5)
        final = final or probe.latest() or {}

        rows, total, latencies, actives = [], FrameScore(), [], []
        for i, (frame, stamp) in enumerate(zip(frames, stamps)):
            key = _stamp_key(stamp)
            objs = next((m for m in probe.objects if _stamp_key(m.header.stamp) == key), None)
            mask = next((m for m in probe.masks if _stamp_key(m.header.stamp) == key), None)
            gt_care = ((frame.num_points >= MIN_POINTS)
                       & (np.abs(frame.boxes[:, 0]) < model.grid.x_max)
                       & (np.abs(frame.boxes[:, 1]) < model.grid.y_max))
            if objs is None:
                rows.append((i, len(frame.points), int(gt_care.sum()), None))
                continue
            boxes, scores, names = objects_to_arrays(objs, classes)
            score = score_frame(boxes, scores, names, frame.boxes, frame.labels,
                                frame.num_points, classes, model.grid)
            total.add(score)
            sent_ns = stamp_ns(stamp)
            lat = ((probe.arrivals[sent_ns] - sent_ns) / 1e6 if sent_ns in probe.arrivals
                   else float("nan"))
            latencies.append(lat)
            grid, extent = mask_to_array(mask) if mask is not None else (None, None)
            active = float(grid.mean()) if grid is not None else float("nan")
            actives.append(active)
            rows.append((i, len(frame.points), int(gt_care.sum()), (len(boxes), score, lat,
                                                                     active)))
            if i % args.picture_every == 0 or i == len(frames) - 1:
                tp, fp, fn = score.totals()
                draw_bev(out_dir / f"frame_{i:03d}.png", frame.points, grid, extent, boxes,
                         names, scores, frame.boxes, frame.labels, gt_care,
                         f"scene {args.seed}, frame {i} ({lidar.name}): {len(boxes)} detections,"
                         f" {tp} TP / {fp} FP / {fn} missed; latency {lat:.0f} ms; "
                         f"computed {100 * active:.0f} % of the cells")

        print("\nframe  points  GT(eval)  det   TP  FP  miss  latency_ms  computed")
        for i, n, g, r in rows:
            if r is None:
                print(f"{i:5d} {n:7d} {g:9d}   (no output: lost in transport or dropped for a "
                      "newer cloud)")
                continue
            k, s, lat, act = r
            tp, fp, fn = s.totals()
            print(f"{i:5d} {n:7d} {g:9d} {k:4d} {tp:4d} {fp:3d} {fn:5d} {lat:11.1f} "
                  f"{100 * act:8.0f} %")

        print("demo: measuring the backbone against the dense backbone on the same frames...",
              flush=True)
        speed = backbone_speedup(frames, model, config)
        recall, precision = total.recall_precision()
        tp, fp, fn = total.totals()
        lat = np.asarray([x for x in latencies if np.isfinite(x)])
        summary = {
            "scene": args.seed, "lidar": lidar.name, "frames_sent": len(clouds),
            "frames_received": int(final.get("frames_received", 0)),
            "frames_processed": int(final.get("frames_processed", 0)),
            "frames_dropped": int(final.get("frames_dropped", 0)),
            "frames_rejected": int(final.get("frames_rejected", 0)),
            "mask_mode": final.get("mask_mode", ""),
            "recall": recall, "precision": precision, "tp": tp, "fp": fp, "missed": fn,
            "per_class": {c: {"tp": total.tp.get(c, 0), "fp": total.fp.get(c, 0),
                              "missed": total.fn.get(c, 0)} for c in classes},
            "latency_ms_p50": float(np.percentile(lat, 50)) if len(lat) else None,
            "latency_ms_p99": float(np.percentile(lat, 99)) if len(lat) else None,
            "active_fraction": float(np.nanmean(actives)) if actives else None,
            **speed,
            "pictures": sorted(str(p) for p in out_dir.glob("frame_*.png")),
        }
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print("\ndemo summary")
        print(f"  frames: {len(clouds)} sent, {summary['frames_received']} received by the node, "
              f"{summary['frames_processed']} processed, "
              f"{summary['frames_dropped']} dropped (newest-frame-only), "
              f"{summary['frames_rejected']} rejected; mask {summary['mask_mode']}")
        print(f"  detections vs ground truth (BEV IoU car 0.7, pedestrian/cyclist 0.5, objects "
              f"with >= {MIN_POINTS} points): recall {recall:.2f}, precision {precision:.2f} "
              f"({tp} TP, {fp} FP, {fn} missed)")
        for c in classes:
            pc = summary["per_class"][c]
            print(f"    {c:10s} TP {pc['tp']:3d}  FP {pc['fp']:3d}  missed {pc['missed']:3d}")
        if len(lat):
            print(f"  latency stamp -> objects received: p50 {summary['latency_ms_p50']:.1f} ms, "
                  f"p99 {summary['latency_ms_p99']:.1f} ms")
        print(f"  computed cells (output/mask): {100 * summary['active_fraction']:.0f} % of the "
              "grid")
        print(f"  backbone: {speed['backbone_ms_sparse_p50']:.1f} ms with the "
              f"{config.mask.mode} mask vs {speed['backbone_ms_dense_p50']:.1f} ms dense "
              f"(x{speed['backbone_speedup']:.2f}, same frames, this process)")
        print(f"  pictures and summary.json in {out_dir.resolve()}")
        ok = len(latencies) > 0
    finally:
        probe.close()
        code = node.interrupt()
        print(f"demo: node stopped with exit code {code}")
        if code != 0 or not ok:
            print("demo: node log:\n" + node.log().rstrip())
        node.close()
    return 0 if code == 0 and ok else 1
