"""Multiply-accumulate (MAC) counts of a residual branch, dense and per sparse tile.

These counts give the benchmark's *ideal* speed-up. The ideal charges the halo only where the
sparse path really computes it. Each unpadded conv trims its own radius off the gathered
window, so a conv runs on a window that still carries the margin left at its input.

Conventions (the sparse path of :class:`~sparse_detector_ros.sparse.SparseResidualBlock`):

* the branch is a sequence of stride-1 convs; conv ``i`` has kernel ``kh x kw``, dilation
  ``dh, dw`` and radius ``r_i = (dh * (kh - 1) // 2, dw * (kw - 1) // 2)``;
* a ``B x B`` output tile is gathered with the halo ``h = sum_i r_i`` on each side; the margin
  at conv ``i``'s input is ``m_i = h - sum_{j<i} r_j``, and conv ``i`` writes
  ``(B + 2 (m_i - r_i))_y x (B + 2 (m_i - r_i))_x`` output cells;
* ``MACs_i = out_cells_i * (Cin_i / groups_i) * Cout_i * kh * kw``.

So for a 1x1 -> 3x3 -> 1x1 bottleneck (halo 1) the first 1x1 runs on ``(B+2)^2`` cells, the
3x3 produces ``B^2`` cells from a ``(B+2)^2`` input, and the last 1x1 runs on ``B^2`` cells.
The dense branch on an ``H x W`` map does ``H * W * sum_i (Cin_i / groups_i) Cout_i kh kw``
MACs (every conv is "same"-padded). Biases, batch norm, activations, the residual add,
gather and scatter are not MACs and are not counted.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

__all__ = ["ConvSpec", "conv_specs", "dense_macs", "tile_macs", "ideal_speedup"]


@dataclass(frozen=True)
class ConvSpec:
    """One stride-1 conv of a branch: channels, kernel ``(kh, kw)``, dilation, groups."""

    cin: int
    cout: int
    kernel: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    def __post_init__(self):
        kh, kw = self.kernel
        if min(self.cin, self.cout, self.groups, kh, kw, *self.dilation) < 1:
            raise ValueError(f"ConvSpec needs positive sizes, got {self}")
        if kh % 2 == 0 or kw % 2 == 0:
            raise ValueError(f"ConvSpec kernel must be odd, got {self.kernel}")
        if self.cin % self.groups or self.cout % self.groups:
            raise ValueError(f"ConvSpec channels {self.cin}->{self.cout} are not divisible "
                             f"by groups={self.groups}")

    @property
    def radius(self) -> tuple[int, int]:
        """Cells trimmed per side by an unpadded conv: ``dilation * (kernel - 1) // 2``."""
        return (self.dilation[0] * (self.kernel[0] - 1) // 2,
                self.dilation[1] * (self.kernel[1] - 1) // 2)

    @property
    def macs_per_cell(self) -> int:
        """MACs for one output cell: ``(cin / groups) * cout * kh * kw``."""
        return self.cin // self.groups * self.cout * self.kernel[0] * self.kernel[1]


def conv_specs(branch: Iterable) -> list[ConvSpec]:
    """The :class:`ConvSpec` of every ``nn.Conv2d`` in ``branch`` (an ``nn.Sequential``), in
    order; other layers are pointwise and carry no MACs here."""
    import torch.nn as nn

    specs = [ConvSpec(m.in_channels, m.out_channels, tuple(m.kernel_size), tuple(m.dilation),
                      m.groups)
             for m in branch if isinstance(m, nn.Conv2d)]
    if not specs:
        raise ValueError("branch has no nn.Conv2d: nothing to count")
    return specs


def dense_macs(specs: Sequence[ConvSpec], height: int, width: int, batch: int = 1) -> int:
    """MACs of the dense branch on a ``(batch, C, height, width)`` map ("same" padding)."""
    if min(height, width, batch) < 1:
        raise ValueError(f"map must be non-empty, got batch={batch} {height}x{width}")
    return batch * height * width * sum(s.macs_per_cell for s in specs)


def tile_macs(specs: Sequence[ConvSpec], tile: int | tuple[int, int]) -> int:
    """MACs the sparse path does for one active ``tile x tile`` output tile: conv ``i`` writes
    ``(B + 2 (m_i - r_i))`` cells per axis, ``m_i`` being the halo margin left at its input
    (see the module docstring). ``tile``: ``B`` or ``(By, Bx)``."""
    by, bx = (tile, tile) if isinstance(tile, int) else tile
    if min(by, bx) < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    my = sum(s.radius[0] for s in specs)
    mx = sum(s.radius[1] for s in specs)
    total = 0
    for s in specs:
        ry, rx = s.radius
        my, mx = my - ry, mx - rx
        total += (by + 2 * my) * (bx + 2 * mx) * s.macs_per_cell
    return total


def ideal_speedup(specs: Sequence[ConvSpec], height: int, width: int,
                  tile: int | tuple[int, int], active_tiles: int,
                  batch: int = 1) -> float | None:
    """``dense_macs / (active_tiles * tile_macs)``: the speed-up if time were proportional to
    MACs. ``None`` when no tile is active (nothing to compare)."""
    if active_tiles < 0:
        raise ValueError(f"active_tiles must be >= 0, got {active_tiles}")
    if active_tiles == 0:
        return None
    return dense_macs(specs, height, width, batch) / (active_tiles * tile_macs(specs, tile))
