#!/usr/bin/env python3
"""Draw docs/sparse_engine.png: a BEV-like computation mask, the tile grid, the active tiles
(``reduce_mask``), and one tile's gather window with its halo (``gather`` tile B+2h, stride B,
offset -h; ``scatter`` back the B x B core).

    python scripts/make_sparse_figure.py [--out docs/sparse_engine.png]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "docs" / "sparse_engine.png"))
    p.add_argument("--size", type=int, default=128, help="map size in cells")
    p.add_argument("--tile", type=int, default=16, help="output tile size B")
    p.add_argument("--halo", type=int, default=2, help="halo h (2 = two 3x3 convs)")
    p.add_argument("--active", type=float, default=0.2, help="active-tile fraction")
    p.add_argument("--seed", type=int, default=3)
    a = p.parse_args(argv)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from sparse_detector_ros.sparse import reduce_mask
    from sparse_detector_ros.tools.bench_sparse import bev_mask

    S, B, h = a.size, a.tile, a.halo
    mask = bev_mask(S, S, B, a.active, a.seed)
    idx, k = reduce_mask(mask, B, B, 0, 0.0, "max", backend="torch")
    T = -(-S // B)

    fig, axes = plt.subplots(1, 2, figsize=(12, 6.2), gridspec_kw={"width_ratios": [1, 1]})
    ax = axes[0]
    ax.imshow(mask[0].numpy(), cmap="Greys", vmin=0, vmax=1.6, origin="upper",
              extent=(0, S, S, 0), interpolation="nearest")
    for i in range(T + 1):
        ax.axhline(i * B, color="#9aa7b8", lw=0.6)
        ax.axvline(i * B, color="#9aa7b8", lw=0.6)
    for n, ty, tx in idx.tolist():
        ax.add_patch(Rectangle((tx * B, ty * B), B, B, facecolor="#2b8cbe", alpha=0.35,
                               edgecolor="#08589e", lw=1.0))
    # one active tile's gather window (B + 2h) and its output core (B)
    pick = idx[len(idx) // 2].tolist() if k else [0, 0, 0]
    _, ty, tx = pick
    ax.add_patch(Rectangle((tx * B - h, ty * B - h), B + 2 * h, B + 2 * h, fill=False,
                           edgecolor="#e34a33", lw=2.2, ls="--"))
    ax.add_patch(Rectangle((tx * B, ty * B), B, B, fill=False, edgecolor="#e34a33", lw=2.2))
    ax.set_xlim(0, S)
    ax.set_ylim(S, 0)
    ax.set_title(f"computation mask (black), {T}x{T} grid of {B}x{B} tiles,\n"
                 f"{k} active tiles ({100 * k / T / T:.0f} %, blue) from reduce_mask")
    ax.set_xlabel("column (y index)")
    ax.set_ylabel("row (x index)")

    # zoom: the picked tile with its halo
    ax = axes[1]
    lo_y, lo_x = ty * B - h - 2, tx * B - h - 2
    span = B + 2 * h + 4
    ax.imshow(mask[0].numpy(), cmap="Greys", vmin=0, vmax=1.6, origin="upper",
              extent=(0, S, S, 0), interpolation="nearest")
    for i in range(S + 1):
        if lo_y <= i <= lo_y + span:
            ax.axhline(i, color="#d9d9d9", lw=0.4)
        if lo_x <= i <= lo_x + span:
            ax.axvline(i, color="#d9d9d9", lw=0.4)
    ax.add_patch(Rectangle((tx * B - h, ty * B - h), B + 2 * h, B + 2 * h, facecolor="#fdbb84",
                           alpha=0.35, edgecolor="#e34a33", lw=2.2, ls="--"))
    ax.add_patch(Rectangle((tx * B, ty * B), B, B, facecolor="#2b8cbe", alpha=0.35,
                           edgecolor="#08589e", lw=2.2))
    ax.set_xlim(lo_x, lo_x + span)
    ax.set_ylim(lo_y + span, lo_y)
    ax.set_title(f"one tile: gather {B + 2 * h}x{B + 2 * h} (dashed, halo h={h}), "
                 f"stride {B}, offset -{h};\nvalid convs shrink it to the {B}x{B} core, "
                 f"scatter-add back (solid)")
    ax.set_xlabel("column")
    fig.tight_layout()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
