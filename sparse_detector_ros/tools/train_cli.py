"""``sparse-detector train`` and ``sparse-detector cache``: train the detector on a cached
synthetic set (:mod:`sparse_detector_ros.train.train`), and make that cache
(:func:`sparse_detector_ros.train.data.generate_cache`)."""
from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("--cache", required=True, help="training cache (train/data.py)")
    parser.add_argument("--out", required=True, help="folder for checkpoints, log and weights")
    parser.add_argument("--model", default="",
                        help="model description to train (default: the shipped one)")
    parser.add_argument("--heading", choices=("sincos", "axis"), default=None,
                        help="heading encoding of the head (model/network.py HEADINGS; default: "
                             "the description's)")
    parser.add_argument("--iou-head", type=int, choices=(0, 1), default=None,
                        help="1: the head also predicts its boxes' IoU (rescores detections); "
                             "default: the description's")
    parser.add_argument("--iou-loss-weight", type=float, default=1.0,
                        help="weight of the IoU branch's loss (models with iou_head: 1)")
    parser.add_argument("--tile-size", type=int, default=None,
                        help="sparse.tile_size of the masked passes (default: the runtime "
                             "default, 16); train at the tile size the node will run")
    parser.add_argument("--steps", type=int, default=6000, help="optimizer steps")
    parser.add_argument("--batch", type=int, default=4, help="crops per step and process")
    parser.add_argument("--crop", type=int, default=256, help="crop side in cells")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--dense-fraction", type=float, default=0.3,
                        help="share of dense passes")
    parser.add_argument("--object-mask-fraction", type=float, default=0.0,
                        help="share of passes under the objects' own mask (as tight as the net "
                             "mask); the rest uses the occupancy mask")
    parser.add_argument("--reg-weight", type=float, default=2.0, help="weight of the L1 loss")
    parser.add_argument("--reg-radius", type=int, default=0,
                        help="also train the box regression at the cells within this many "
                             "output cells of each centre (a peak one cell off still decodes "
                             "its object's box; train/targets.py); 0: centre cells only")
    parser.add_argument("--far-weight", type=float, default=0.0,
                        help="far objects' regression weight: 1 + W at 40 m and beyond, rising "
                             "from 1 at 20 m (train/targets.py); 0: every object the same")
    parser.add_argument("--rot-weight", type=float, default=1.0,
                        help="weight of the heading (sin, cos) within the L1 loss")
    parser.add_argument("--mask-weight", type=float, default=1.0,
                        help="weight of the mask net's loss")
    parser.add_argument("--mask-pos-weight", type=float, default=10.0,
                        help="weight of the mask net's positive cells (recall)")
    parser.add_argument("--min-points", type=int, default=1,
                        help="objects with fewer LiDAR points are not trained on")
    parser.add_argument("--bf16", action="store_true",
                        help="run the networks' forward and backward in bfloat16 autocast "
                             "(weights, losses and targets stay float32); on CPUs with "
                             "AVX512-BF16 or AMX a step takes about 2/3 of the time")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-every", type=int, default=250, help="checkpoint period [steps]")
    parser.add_argument("--log-every", type=int, default=10, help="log period [steps]")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop (and save) after this much wall time")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no tqdm bar (logs only)")


def run(args) -> int:
    from ..train import train
    return train.run(args)
