"""Tile plans: the active tiles of one map, plus what the sparse modules derive from them.

Every sparse module of a stage runs on the same active ``B x B`` output tiles: the stage's
downsampling conv scatters into them and each residual block gathers them with its halo,
convolves and scatters back. What a module derives from the tile list besides the convs --
the element positions of its gathers and scatters, the off-map cells zeroed before a spatial
conv, whether any tile reaches past the map border at all -- depends only on the tile list,
the tile geometry and the map size, so it is the same for every block of the stage.

A :class:`TilePlan` is that tile list (it *is* the ``(indices, K, total)`` tuple that
``active_tiles`` returns, so it unpacks as before) with the map ``(N, H, W)`` and tile size it
was made for, and a cache of the derived tensors keyed by geometry, map size and device. The
first module that needs, say, the gather positions of an 18 x 18 window at stride 16 on a
256 x 256 map computes them; the next block of the stage reuses them. Nothing in the cache
depends on the feature values, so reuse gives the numbers recomputation gives.

Host synchronisation: the column-wise bounds of the indices are read back to the host once per
plan (:meth:`TilePlan.bounds`); from then on "does any tile cross the map border?" is a host
computation for every module and geometry, and a plan whose tiles stay inside the map needs no
validity masks at all.

A plan is made for one map and tile size and refuses others (:meth:`TilePlan.check`); a plain
``(indices, K, total)`` tuple is still accepted everywhere a plan is (:meth:`TilePlan.of`
wraps it, with a fresh cache). A plan is meant for one frame: it keeps its tensors alive.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from . import torch_backend
from .geometry import check_geometry, check_indices, grid_shape, in_map_cells, pair

__all__ = ["TilePlan", "tile_mask"]

_MISSING = object()


def tile_mask(indices: torch.Tensor, shape: tuple[int, int, int], tile: int | tuple[int, int],
              dtype=torch.float32) -> torch.Tensor:
    """The active-tile mask upsampled to the map: ``(N, 1, H, W)`` with 1 in every cell of an
    active ``tile x tile`` output tile (tile grid with stride = tile, offset 0)."""
    N, H, W = shape
    th, tw = pair(tile, "tile")
    Ty, Tx = grid_shape((H, W), (th, tw))
    tm = torch.zeros(N, Ty, Tx, dtype=dtype, device=indices.device)
    if indices.numel():
        i = indices.long()
        tm[i[:, 0], i[:, 1], i[:, 2]] = 1
    up = tm.repeat_interleave(th, 1).repeat_interleave(tw, 2)[:, :H, :W]
    return up.unsqueeze(1)


class TilePlan(tuple):
    """``(indices, count, total)`` of the active ``tile`` output tiles of an ``(N, H, W)`` map,
    with a per-plan cache of derived index tensors.

    Args:
        indices: ``(K, 3)`` int rows ``[n, ty, tx]`` (e.g. from ``reduce_mask``).
        count: ``K``.
        total: number of tiles of the grid (``N * ceil(H/B) * ceil(W/B)``).
        shape: ``(N, H, W)`` of the map whose output tiles these are (for a strided conv: its
            *output* map).
        tile: the output tile size ``B`` or ``(bh, bw)``.

    Unpacks and indexes like the tuple ``(indices, count, total)``.
    """

    def __new__(cls, indices: torch.Tensor, count: int, total: int,
                shape: Sequence[int], tile: int | tuple[int, int]) -> "TilePlan":
        check_indices(indices)
        if int(count) != indices.shape[0]:
            raise ValueError(f"count {count} does not match the {indices.shape[0]} indices")
        self = super().__new__(cls, (indices, int(count), int(total)))
        if len(shape) != 3:
            raise ValueError(f"shape must be the map's (N, H, W), got {tuple(shape)}")
        self.shape = tuple(int(v) for v in shape)
        self.tile = pair(tile, "tile")
        self._cache: dict[tuple, Any] = {}
        return self

    def __getnewargs__(self):
        return tuple(self) + (self.shape, self.tile)

    def __repr__(self) -> str:
        return (f"TilePlan(count={self.count}, total={self.total}, shape={self.shape}, "
                f"tile={self.tile})")

    @property
    def indices(self) -> torch.Tensor:
        """``(K, 3)`` rows ``[n, ty, tx]``."""
        return self[0]

    @property
    def count(self) -> int:
        """``K``."""
        return self[1]

    @property
    def total(self) -> int:
        """Tiles in the grid."""
        return self[2]

    # ------------------------------------------------------------------ construction, checks

    @classmethod
    def of(cls, tiles: Sequence, shape: Sequence[int], tile: int | tuple[int, int],
           what: str = "tiles") -> "TilePlan":
        """``tiles`` itself when it is a :class:`TilePlan` for this map and tile size
        (``ValueError`` naming ``what`` when it is for another), or a new plan wrapping a plain
        ``(indices, count, total)`` tuple (which carries no map size to check)."""
        shape = tuple(int(v) for v in shape)
        if isinstance(tiles, TilePlan):
            tiles.check(shape, tile, what)
            return tiles
        try:
            indices, count, total = tiles
        except (TypeError, ValueError):
            raise ValueError(f"{what} must be a TilePlan or an (indices, K, total) tuple, got "
                             f"{type(tiles).__name__}") from None
        return cls(indices, count, total, shape, tile)

    def check(self, shape: Sequence[int], tile: int | tuple[int, int],
              what: str = "tiles") -> None:
        """``ValueError`` (naming ``what``) unless the plan was made for an ``(N, H, W)`` map of
        ``shape`` and output tiles of size ``tile``."""
        shape, tile = tuple(int(v) for v in shape), pair(tile, "tile")
        if shape != self.shape or tile != self.tile:
            raise ValueError(f"{what}: the tile plan was made for a map (N, H, W) = {self.shape}"
                             f" with {self.tile} tiles, not for {shape} with {tile} tiles")

    # ------------------------------------------------------------------ cached derivations

    def _cached(self, key: tuple, make):
        try:
            return self._cache[key]
        except KeyError:
            value = self._cache[key] = make()
            return value

    def _lookup(self, raw: tuple):
        """The value cached under the caller's own arguments ``raw`` (a fast path that skips
        normalising them), or ``_MISSING``."""
        try:
            return self._cache.get(raw, _MISSING)
        except TypeError:       # unhashable arguments (e.g. lists): take the normal path
            return _MISSING

    def _remember(self, raw: tuple, value):
        try:
            self._cache[raw] = value
        except TypeError:
            pass
        return value

    def bounds(self) -> tuple[list[int], list[int]] | None:
        """Column-wise smallest and largest ``[n, ty, tx]`` on the host (read back once per
        plan), ``None`` when there are no tiles."""
        return self._cached(("bounds",), lambda: torch_backend.index_bounds(self.indices))

    def inside(self, tile, stride, offset, shape: Sequence[int]) -> bool:
        """Whether every element of every tile of the grid ``tile``/``stride``/``offset`` lies
        on a map of ``shape`` (``(N, H, W)``, or ``(H, W)`` to leave the batch index out): a
        host computation on :meth:`bounds`."""
        return torch_backend.tiles_inside(self.bounds(), tuple(shape), tile, stride, offset)

    def host_rows(self) -> list[list[int]]:
        """``[n, ty]`` of every tile as host lists (read back once per plan)."""
        return self._cached(("rows",),
                            lambda: self.indices[:, :2].to("cpu", torch.int64).tolist())

    def in_map_cells(self, tile, stride, offset, hw: tuple[int, int],
                     device: torch.device | None = None, start: int = 0,
                     stop: int | None = None) -> torch.Tensor | None:
        """:func:`~.geometry.in_map_cells` of tiles ``start:stop`` (``(k, th, tw)`` bool: which
        elements lie on the ``H x W`` map), or ``None`` when all of the plan's tiles lie inside
        (decided on the host, no tensor work). Computed once per geometry, map size and device.
        """
        raw = ("in_map:args", tile, stride, offset, hw, device, start, stop)
        hit = self._lookup(raw)
        if hit is not _MISSING:
            return hit
        geo = check_geometry(tile, stride, offset)
        H, W = (int(v) for v in hw)
        dev = torch.device(device) if device is not None else self.indices.device
        if self.inside(geo[:2], geo[2:4], geo[4:], (H, W)):   # rows and columns only
            return self._remember(raw, None)
        full = self._cached(("in_map", geo, H, W, dev),
                            lambda: in_map_cells(self.indices, geo[:2], geo[2:4], geo[4:],
                                                 (H, W), dev))
        if full is not None and (start != 0 or stop is not None):
            full = full[start:stop]
        return self._remember(raw, full)

    def tile_index(self, tile, stride, offset, shape: Sequence[int],
                   device: torch.device | None = None, start: int = 0,
                   stop: int | None = None) -> torch_backend.TileIndex:
        """:func:`~.torch_backend.tile_index` of tiles ``start:stop`` on an ``(N, H, W)`` map of
        ``shape``: the element positions the torch backend's ``gather_at`` / ``scatter_at``
        take. Computed once per geometry, map size, device and tile range."""
        raw = ("index:args", tile, stride, offset, shape, device, start, stop)
        hit = self._lookup(raw)
        if hit is not _MISSING:
            return hit
        geo = check_geometry(tile, stride, offset)
        shape = tuple(int(v) for v in shape)
        dev = torch.device(device) if device is not None else self.indices.device
        key = ("index", geo, shape, dev)
        full = self._cached(key, lambda: torch_backend.tile_index(
            self.indices, shape, geo[:2], geo[2:4], geo[4:], dev, bounds=self.bounds()))
        stop = self.count if stop is None else min(stop, self.count)
        if start == 0 and stop == self.count:
            return self._remember(raw, full)
        return self._remember(raw, self._cached(key + (start, stop),
                                                lambda: full.rows(start, stop)))

    def tile_mask(self, dtype=torch.float32, device: torch.device | None = None
                  ) -> torch.Tensor:
        """:func:`tile_mask` of the plan's tiles on its map: ``(N, 1, H, W)``, 1 in every cell
        of an active tile (the dense path's output mask). Computed once per dtype and device;
        treat it as read-only."""
        dev = torch.device(device) if device is not None else self.indices.device
        return self._cached(("tile_mask", dtype, dev), lambda: tile_mask(
            self.indices.to(dev), self.shape, self.tile, dtype))
