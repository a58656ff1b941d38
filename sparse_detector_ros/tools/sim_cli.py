"""``sparse-detector sim``: synthetic LiDAR sequences to rosbag2 (MCAP), previews, statistics.

Examples::

    sparse-detector sim --scenes 2 --frames 50 --out /tmp/simdata --layout velodyne --lidar hdl64e
    sparse-detector sim --preview sim.png --seed 3
    sparse-detector sim --stats --lidar hdl64e
"""
from __future__ import annotations

import argparse
import json
import sys

LAYOUT_CHOICES = ("velodyne", "ouster", "livox", "hesai", "xyzi")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from sparse_detector_ros.sim.lidar import DEFAULT_PRESET, PRESETS
    parser.add_argument("--scenes", type=int, default=1, help="number of scenes (default 1)")
    parser.add_argument("--frames", type=int, default=50,
                        help="frames per scene at 10 Hz (default 50)")
    parser.add_argument("--out", metavar="DIR",
                        help="write <DIR>/scene_NNN/{bag/, map.yaml, map.png, ground_truth.json}")
    parser.add_argument("--layout", choices=LAYOUT_CHOICES, default=None,
                        help="PointCloud2 field layout of a real driver (default: velodyne; "
                             "ouster for os1-*, livox for mid360)")
    parser.add_argument("--lidar", choices=sorted(PRESETS), default=DEFAULT_PRESET,
                        help=f"sensor preset (default {DEFAULT_PRESET})")
    parser.add_argument("--columns", type=int, default=None,
                        help="override the preset's azimuth steps per revolution")
    parser.add_argument("--seed", type=int, default=0, help="seed of scene 0; scene k uses seed+k")
    parser.add_argument("--density", type=float, default=1.0,
                        help="traffic density multiplier (default 1.0)")
    parser.add_argument("--preview", metavar="PNG",
                        help="render a BEV of points, ground truth boxes and road map")
    parser.add_argument("--frame", type=int, default=0,
                        help="frame shown by --preview / measured by --stats (default 0)")
    parser.add_argument("--stats", action="store_true",
                        help="print one scan's statistics (points, objects, points per car at "
                             "10/30/50 m, time per scan) as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from sparse_detector_ros.sim import generate_scene, get_lidar
    from sparse_detector_ros.sim.world import FRAME_RATE

    if not (args.out or args.preview or args.stats):
        print("sparse-detector sim: nothing to do; give --out DIR, --preview PNG and/or --stats",
              file=sys.stderr)
        return 2
    if args.scenes < 1 or args.frames < 1:
        print("sparse-detector sim: --scenes and --frames must be >= 1", file=sys.stderr)
        return 2
    overrides = {"columns": args.columns} if args.columns else {}
    lidar = get_lidar(args.lidar, **overrides)
    layout = args.layout or ("ouster" if lidar.name.startswith("os1")
                             else "livox" if lidar.name == "mid360" else "velodyne")
    duration = (max(args.frames, args.frame + 1) - 1) / FRAME_RATE

    if args.preview or args.stats:
        scene = generate_scene(args.seed, duration=duration, density=args.density)
        if args.preview:
            from sparse_detector_ros.sim.frames import render_frame
            from sparse_detector_ros.sim.preview import render_preview
            frame = render_frame(scene, lidar, args.frame)
            render_preview(scene, frame, args.preview)
            print(f"preview written to {args.preview}", file=sys.stderr)
        if args.stats:
            from sparse_detector_ros.sim.stats import scan_statistics
            print(json.dumps(scan_statistics(scene, lidar, args.frame), indent=1))
    if args.out:
        from pathlib import Path

        from tqdm import tqdm

        from sparse_detector_ros.sim.export import write_scene
        out = Path(args.out)
        total = args.scenes * args.frames
        with tqdm(total=total, unit="frame", desc="sim", disable=args.no_progress,
                  file=sys.stderr) as bar:
            for k in range(args.scenes):
                scene = generate_scene(args.seed + k, duration=(args.frames - 1) / FRAME_RATE,
                                       density=args.density)
                target = out / f"scene_{k:03d}"
                if (target / "bag").exists():
                    print(f"sparse-detector sim: {target / 'bag'} exists; choose an empty --out",
                          file=sys.stderr)
                    return 1
                write_scene(scene, lidar, target, frames=args.frames, layout=layout,
                            scene_index=k, progress=bar.update)
        print(f"wrote {args.scenes} scene(s) x {args.frames} frames ({layout} layout, "
              f"{lidar.name}) to {out}", file=sys.stderr)
    return 0
