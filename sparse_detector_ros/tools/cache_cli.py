"""``sparse-detector cache``: render, augment, rasterize and store a training cache
(:func:`sparse_detector_ros.train.data.generate_cache`)."""
from __future__ import annotations

import argparse
import json

from . import positive_int


def add_arguments(parser) -> None:
    parser.add_argument("--out", required=True, help="cache folder")
    parser.add_argument("--split", default="train", help="seed range (sim/splits.py)")
    parser.add_argument("--scenes", type=int, default=100)
    parser.add_argument("--frames", type=int, default=4, help="rendered frames per scene")
    parser.add_argument("--presets", nargs="+", default=None,
                        help="LiDAR presets rotated over the scenes (default: hdl64e os1-64 "
                             "hdl32e vlp16)")
    parser.add_argument("--variants", type=int, default=None,
                        help="augmented copies per frame (default 2)")
    parser.add_argument("--paste", nargs="+", default=[], metavar="CLASS=N", type=paste_entry,
                        help="objects of CLASS pasted into each frame (ground-truth sampling), "
                             "e.g. car=4; classes not named keep the default (pedestrian=2 "
                             "cyclist=4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scene-offset", type=int, default=0,
                        help="first scene of the split's range")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--model", default="", help="model description whose grid to use")
    parser.add_argument("--occupancy-min-points", type=positive_int, default=None,
                        help="mask.occupancy_min_points of the occupancy masks stored for the "
                             "training passes under that mask (default: the runtime default)")
    parser.add_argument("--overwrite", action="store_true")


def paste_entry(value: str) -> tuple[str, int]:
    """``"car=4"`` -> ``("car", 4)``; argparse's error (one line, exit 2) for anything not
    ``CLASS=N`` with an integer N (the classes and N >= 0 are checked by ``Augmentation``)."""
    name, sep, count = str(value).partition("=")
    try:
        if not sep or not name:
            raise ValueError
        return name, int(count)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: expected CLASS=N, e.g. car=4") from None


def run(args) -> int:
    from dataclasses import replace

    from ..config import MaskConfig
    from ..model import load_description
    from ..train.data import DEFAULT_PRESETS, Augmentation, generate_cache

    aug = Augmentation() if args.variants is None else replace(Augmentation(),
                                                               variants=args.variants)
    if args.paste:
        aug = replace(aug, paste={**dict(aug.paste), **dict(args.paste)})
    mask = (MaskConfig() if args.occupancy_min_points is None
            else MaskConfig(occupancy_min_points=args.occupancy_min_points))
    stats = generate_cache(args.out, args.split, args.scenes, args.frames,
                           args.presets or DEFAULT_PRESETS, load_description(args.model).grid,
                           args.seed, args.workers, augmentation=aug, mask=mask,
                           scene_offset=args.scene_offset, overwrite=args.overwrite)
    print(json.dumps(stats))
    return 0
