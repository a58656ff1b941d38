"""Which synthetic scene seeds serve which purpose: training never sees an evaluation or
benchmark scene. Every tool draws its scenes from its own range here."""
from __future__ import annotations

#: split -> [first, end) scene seeds
SPLITS: dict[str, tuple[int, int]] = {
    "train": (0, 100_000),
    "val": (100_000, 110_000),
    "eval": (200_000, 210_000),
    "bench": (300_000, 310_000),
}


def seeds(split: str, count: int, offset: int = 0) -> list[int]:
    """``count`` scene seeds of ``split``, starting ``offset`` seeds into its range."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    lo, hi = SPLITS[split]
    if count < 0 or offset < 0 or lo + offset + count > hi:
        raise ValueError(f"{count} seeds from offset {offset} do not fit split {split!r} "
                         f"({hi - lo} seeds)")
    return list(range(lo + offset, lo + offset + count))
