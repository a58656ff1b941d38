"""Where the sparse backbone's time goes: per module, against the active-tile fraction.

    python bench/backbone_profile.py [--model MODEL_YAML] [--params-file PARAMS_YAML]
                                     [--scenes 6] [--repeats 5] [--dilations 0 2 4 6 10 16]

Scans of ``bench`` scenes (never used in training) are rasterized once; the backbone
(:meth:`~sparse_detector_ros.model.network.SparseBEVNet.backbone`, inference form) then runs on
each under occupancy masks of several dilations (so active fractions from a few per cent to most
of the map, with the shapes real masks have) and under the dense mask, interleaved, ``--repeats``
times. Each sparse module is timed by forward hooks; ``other`` is the rest of the backbone (the
mask pooled to each stage, the tile lists). One JSON object a line:

* ``{"kind": "run", ...}``: each mask's median backbone time and per-module times (ms) and its
  first-stage active-tile fraction, per scan;
* ``{"kind": "fit", ...}``: least squares ``t = fixed + slope * fraction`` over the sparse runs,
  for the backbone and per module; ``efficiency`` = dense time / slope (1.0: the sparse path
  costs exactly the active share of the dense one, with no fixed part); and the active fraction
  at which the backbone would run 3x faster than dense, ``(dense / 3 - fixed) / slope``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import common


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_arguments(ap, scenes=6, frames=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dilations", nargs="+", type=int, default=[0, 2, 4, 6, 10, 16])
    ap.add_argument("--preset", default="hdl64e")
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from sparse_detector_ros.masks import occupancy_mask

    model, config, det = common.detector(args)
    net = det.net
    c = config.mask
    names = {id(m): n for n, m in net.named_modules() if m in net.sparse_modules()}
    spent: dict[str, float] = {}
    started: dict[int, float] = {}

    def pre(mod, _inp):
        started[id(mod)] = time.perf_counter()

    def post(mod, _inp, _out):
        n = names[id(mod)]
        spent[n] = spent.get(n, 0.0) + (time.perf_counter() - started[id(mod)]) * 1e3

    for m in net.sparse_modules():
        m.register_forward_pre_hook(pre)
        m.register_forward_hook(post)

    cases = []                      # (scan, label, bev, mask)
    for s, f in enumerate(common.scans("bench", args.scenes, args.frames, args.preset)):
        pts = f.points[:, :4].astype(np.float32)
        bev, _ = det.rasterizer(pts)
        cases.append((s, "dense", bev, torch.ones(bev.shape[0], *bev.shape[2:])))
        for d in args.dilations:
            m = occupancy_mask(pts, model.grid, min_points=c.occupancy_min_points,
                               min_height=c.occupancy_min_height,
                               ground_cell=c.occupancy_ground_cell, dilation=d)
            cases.append((s, f"occupancy_d{d}", bev, m[None].float()))

    times: dict[int, list] = {k: [] for k in range(len(cases))}
    with torch.inference_mode():
        for _, _, bev, m in cases[:3]:                                   # warm-up
            net.backbone(bev, m)
        for r in range(args.repeats):
            order = list(range(len(cases)))
            order = order[r % len(order):] + order[:r % len(order)]
            for k in order:
                _, _, bev, m = cases[k]
                spent.clear()
                t0 = time.perf_counter()
                net.backbone(bev, m)
                total = (time.perf_counter() - t0) * 1e3
                times[k].append((total, dict(spent), net.stem.last_active_fraction,
                                 net.stem.last_path))

    rows = []
    for k, (s, label, _, _) in enumerate(cases):
        ts = times[k]
        total = float(np.median([t[0] for t in ts]))
        mods = {n: round(float(np.median([t[1].get(n, 0.0) for t in ts])), 3)
                for n in names.values()}
        row = {"kind": "run", "scan": s, "mask": label, "active": round(float(ts[0][2]), 4),
               "path": ts[0][3], "backbone_ms": round(total, 3), "modules_ms": mods,
               "other_ms": round(total - sum(mods.values()), 3)}
        rows.append(row)
        print(json.dumps(row), flush=True)

    dense = [r for r in rows if r["mask"] == "dense"]
    sparse = [r for r in rows if r["mask"] != "dense" and r["path"] == "sparse"]
    if len(sparse) < 2:
        print(json.dumps({"kind": "fit", "error": "fewer than two sparse runs"}))
        return 0

    def fit(key) -> dict:
        x = np.array([r["active"] for r in sparse])
        y = np.array([key(r) for r in sparse])
        slope, fixed = np.polyfit(x, y, 1)
        d = float(np.median([key(r) for r in dense]))
        return {"dense_ms": round(d, 3), "fixed_ms": round(float(fixed), 3),
                "slope_ms": round(float(slope), 3),
                "efficiency": round(d / slope, 3) if slope > 0 else None}

    whole = fit(lambda r: r["backbone_ms"])
    need = (whole["dense_ms"] / 3 - whole["fixed_ms"]) / whole["slope_ms"]
    print(json.dumps({"kind": "fit", "backbone": whole,
                      "fraction_for_3x": round(need, 4) if need > 0 else None,
                      "modules": {n: fit(lambda r, n=n: r["modules_ms"][n])
                                  for n in names.values()},
                      "other": fit(lambda r: r["other_ms"]),
                      "tile_size": config.sparse.tile_size, "model": model.name,
                      "scans": len(dense), "repeats": args.repeats,
                      "threads": torch.get_num_threads()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
