"""CuPy raw-kernel backend of the tiled sparse convolution ops: ``reduce_mask``, ``gather``,
``scatter``.

Same names, signatures, shapes and tile geometry as
:mod:`~sparse_detector_ros.sparse.torch_backend` (see its docstring), for CUDA tensors. The work
is done by the CUDA kernels in ``kernels/*.cu`` (one op a file, ``extern "C" __global__``, no
includes), compiled at first use with NVRTC through :class:`cupy.RawModule` and cached per
device. Tensors are handed to the kernels by DLPack (``cupy.from_dlpack``: no copies) and the
kernels run on PyTorch's current CUDA stream, so they order correctly with the surrounding
torch work without any synchronisation.

``cupy`` is imported inside functions only: importing this module never needs CuPy or a GPU.

Differences from the torch backend:

* no ``tile_index`` / ``gather_at`` / ``scatter_at`` (the torch backend's precomputed element
  positions, which the blocks use through a :class:`~.plan.TilePlan` when the backend has
  them): the kernels compute each element's position themselves;

* not differentiable (inference path; inputs are detached before DLPack export);
* ``reduce_mask`` takes the max of float32 masks in float32 (float64 in float64; other float
  dtypes are converted to float32 first, as the torch backend does). ``avg`` sums the window in
  float64 in row-major order and divides by the in-map cell count in float64, and the pooled
  value is compared with the threshold in float64: the same arithmetic as the torch backend,
  so both pick the same tiles, ties included;
* ``gather`` and overwrite-``scatter`` move bits, so they serve every 2-, 4- and 8-byte dtype;
  ``scatter(add=True)`` has kernels for float32 and float64 and falls back to the torch
  backend for other dtypes (and for 1-byte dtypes everywhere).

Host-side logic (validation, allocation, dtype dispatch, index compaction) lives in
:func:`reduce_mask_with` / :func:`gather_with` / :func:`scatter_with`, which take a ``launch``
callable. The public functions pass :func:`cuda_launch`; the CPU test-suite passes a launcher
that runs the very same ``.cu`` files compiled with g++ through an emulation header, so both
the kernels and this glue are tested without a GPU. Shape and geometry checks are the shared
ones of :mod:`.geometry`.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import paths
from . import torch_backend
from .geometry import (IntPair, check_geometry, check_indices, check_layout, map_shape,
                       reduce_mask_geometry, scatter_geometry)

__all__ = ["reduce_mask", "gather", "scatter", "available", "kernel_dir", "kernel_source",
           "source_kernel_dir", "KERNELS", "NVRTC_OPTIONS", "CUPY_ADDED_OPTIONS",
           "nvrtc_compile_options", "launch_dims", "cuda_launch", "clear_kernel_cache",
           "reduce_mask_with", "gather_with", "scatter_with", "Launcher"]

PACKAGE = paths.PACKAGE

#: Options this backend passes to ``cupy.RawModule(options=...)`` (NVRTC).
NVRTC_OPTIONS: tuple[str, ...] = ("-std=c++17",)

#: Options CuPy's NVRTC path (``cupy.cuda.compiler``, CuPy 14) appends to ours: ``-ftz=true``
#: in ``_compile_with_cache_cuda``, ``--device-as-default-execution-space`` when not using
#: Jitify, plus ``-arch=sm_XX`` for the current device (see :func:`nvrtc_compile_options`).
#: CuPy also adds ``-I`` directories (its own headers, CCCL, the CUDA toolkit's include dir when
#: found); they cannot change the compilation of kernels that include nothing.
CUPY_ADDED_OPTIONS: tuple[str, ...] = ("-ftz=true", "--device-as-default-execution-space")

#: Kernel source files and the kernels each defines.
KERNELS: dict[str, tuple[str, ...]] = {
    "reduce_mask.cu": ("reduce_mask_f32", "reduce_mask_f64"),
    "sparse_gather.cu": tuple(f"sparse_gather_{lay}_{b}" for lay in ("nchw", "nhwc")
                              for b in ("b16", "b32", "b64")),
    "sparse_scatter.cu": tuple(f"sparse_scatter_{lay}_{b}" for lay in ("nchw", "nhwc")
                               for b in ("b16", "b32", "b64"))
    + tuple(f"sparse_scatter_add_{lay}_{t}" for lay in ("nchw", "nhwc") for t in ("f32", "f64")),
}

THREADS = 256          # threads per block (1-D blocks; kernels use grid-stride loops)
MAX_BLOCKS = 8192      # grid cap; larger problems loop inside the threads

#: ``launch(source_file, kernel_name, n_work_items, args)``; args are contiguous torch tensors
#: (passed as pointers) and numpy scalars (np.int32 / np.float32 / np.float64).
Launcher = Callable[[str, str, int, tuple], None]


def nvrtc_compile_options(arch: int | str) -> tuple[str, ...]:
    """The full NVRTC option list a kernel gets at run time on a device of compute capability
    ``arch`` (e.g. ``"86"``): :data:`NVRTC_OPTIONS` plus what CuPy adds. The NVRTC test
    compiles every kernel with exactly this list."""
    return NVRTC_OPTIONS + CUPY_ADDED_OPTIONS + (f"-arch=sm_{arch}",)


def launch_dims(total: int, threads: int = THREADS,
                max_blocks: int = MAX_BLOCKS) -> tuple[int, int]:
    """``(blocks, threads)`` of a 1-D grid-stride launch covering ``total`` work items."""
    return max(1, min(max_blocks, -(-total // threads))), threads


# --------------------------------------------------------------------------------------------
# kernel sources
# --------------------------------------------------------------------------------------------

def source_kernel_dir() -> Path:
    """``kernels/`` of a source checkout (or an editable install)."""
    return paths.source_root() / "kernels"


def _installed_kernel_dirs() -> list[Path]:
    """``share/sparse_detector_ros/kernels`` of an install (ament share, then sys.prefix)."""
    return [d / "kernels" for d in paths.installed_share_dirs()]


def kernel_dir() -> Path:
    """Directory holding the ``.cu`` files: ``$SPARSE_DETECTOR_KERNEL_DIR`` if set, else the
    source tree's ``kernels/``, else the installed share directory. A candidate counts only
    if it holds every file of :data:`KERNELS`; raises ``FileNotFoundError`` naming all places
    searched."""
    cands = []
    env = os.environ.get("SPARSE_DETECTOR_KERNEL_DIR")
    if env:
        cands.append(Path(env))
    cands.append(source_kernel_dir())
    cands.extend(_installed_kernel_dirs())
    for d in cands:
        if all((d / f).is_file() for f in KERNELS):
            return d
    raise FileNotFoundError(
        f"CUDA kernel sources ({', '.join(KERNELS)}) not found in: "
        + ", ".join(str(d) for d in cands))


def kernel_source(filename: str) -> str:
    """Text of one kernel file from :func:`kernel_dir`."""
    if filename not in KERNELS:
        raise ValueError(f"unknown kernel file {filename!r}")
    return (kernel_dir() / filename).read_text()


# --------------------------------------------------------------------------------------------
# CUDA side: availability, compiled modules, launch
# --------------------------------------------------------------------------------------------

def available() -> bool:
    """True iff CuPy imports, torch sees a CUDA device, CuPy sees one too, and the kernel
    sources are found. Never raises."""
    try:
        if not torch.cuda.is_available():
            return False
        import cupy
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return False
        kernel_dir()
        return True
    except Exception:
        return False


_lock = threading.Lock()
_modules: dict[tuple[int, str], object] = {}      # (device, file) -> cupy.RawModule
_functions: dict[tuple[int, str], object] = {}    # (device, kernel) -> cupy.RawKernel


def _kernel(filename: str, name: str, device: int):
    """The compiled kernel ``name`` of ``filename`` on ``device``; compiled once per device."""
    fn = _functions.get((device, name))
    if fn is not None:
        return fn
    import cupy
    with _lock:
        fn = _functions.get((device, name))
        if fn is None:
            with cupy.cuda.Device(device):
                mod = _modules.get((device, filename))
                if mod is None:
                    mod = cupy.RawModule(code=kernel_source(filename), options=NVRTC_OPTIONS)
                    mod.compile()
                    _modules[(device, filename)] = mod
                fn = mod.get_function(name)
            _functions[(device, name)] = fn
    return fn


def _cupy_stream(index: int):
    """torch's current CUDA stream on device ``index``, as a CuPy stream object (no new
    stream: kernels launched under it are ordered with the surrounding torch work)."""
    import cupy
    stream = torch.cuda.current_stream(index)
    if hasattr(cupy.cuda.Stream, "from_external") and hasattr(stream, "__cuda_stream__"):
        return cupy.cuda.Stream.from_external(stream)       # CuPy >= 14
    return cupy.cuda.ExternalStream(stream.cuda_stream, index)


def clear_kernel_cache() -> None:
    """Forget every compiled module and kernel (the next launch compiles again)."""
    with _lock:
        _modules.clear()
        _functions.clear()


def cuda_launch(filename: str, name: str, total: int, args: tuple) -> None:
    """Run kernel ``name`` over ``total`` work items on torch's current stream of the device
    of the tensor arguments; tensors go to CuPy by DLPack (zero-copy views)."""
    import cupy
    dev = next(a.device for a in args if isinstance(a, torch.Tensor))
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    fn = _kernel(filename, name, index)
    blocks, threads = launch_dims(total)
    with cupy.cuda.Device(index), _cupy_stream(index):
        cargs = tuple(cupy.from_dlpack(a.detach()) if isinstance(a, torch.Tensor) else a
                      for a in args)
        fn((blocks,), (threads,), cargs)


def _require_cuda(*tensors: torch.Tensor) -> None:
    dev = tensors[0].device
    for t in tensors:
        if t.device.type != "cuda":
            raise ValueError(f"the cupy backend needs CUDA tensors, got a tensor on {t.device}")
        if t.device != dev:
            raise ValueError(f"tensors on different devices: {dev} and {t.device}")


# --------------------------------------------------------------------------------------------
# host-side logic shared by the CUDA launcher and the CPU emulation
# --------------------------------------------------------------------------------------------

def _indices32(indices: torch.Tensor, device: torch.device) -> torch.Tensor:
    check_indices(indices)
    if indices.is_floating_point() or indices.is_complex():
        raise TypeError(f"indices must be an integer tensor, got {indices.dtype}")
    return indices.to(device=device, dtype=torch.int32).contiguous()


_BITS = {2: ("b16", torch.int16), 4: ("b32", torch.int32), 8: ("b64", torch.int64)}


def _i32(*vals: int) -> tuple:
    return tuple(np.int32(v) for v in vals)


def reduce_mask_with(mask, tile, stride, offset, threshold, pooling, launch: Launcher):
    """:func:`reduce_mask` with the kernel run by ``launch``, plus the per-tile pooled values:
    ``(indices, K, pooled)``, ``pooled`` ``(N, Ty, Tx)`` in the kernel's dtype (0 for windows
    with no in-map cell). Works on any device ``launch`` can handle."""
    (N, H, W, Ty, Tx), (th, tw, sh, sw, oy, ox) = reduce_mask_geometry(mask, tile, stride,
                                                                       offset, pooling)
    if mask.dtype == torch.float64:
        m, name = mask.detach().contiguous(), "reduce_mask_f64"
    else:
        m, name = mask.detach().float().contiguous(), "reduce_mask_f32"
    thr = np.float64(threshold)   # both kernels compare in float64, as the torch backend
    pooled = torch.empty((N, Ty, Tx), dtype=m.dtype, device=m.device)  # the kernel writes all
    active = torch.empty((N, Ty, Tx), dtype=torch.int32, device=m.device)
    total = N * Ty * Tx
    if total:
        launch("reduce_mask.cu", name, total,
               (m, pooled, active) + _i32(N, H, W, Ty, Tx, th, tw, sh, sw, oy, ox)
               + (thr, np.int32(pooling == "avg")))
    # Ordered stream compaction on the device: rows [n, ty, tx] in lexicographic order.
    indices = torch.nonzero(active).to(torch.int32).reshape(-1, 3)
    return indices, int(indices.shape[0]), pooled


def gather_with(x, indices, tile, stride, offset, layout, launch: Launcher):
    """:func:`gather` with the kernel run by ``launch``."""
    layout = check_layout(layout)
    N, C, H, W = map_shape(x, layout)
    th, tw, sh, sw, oy, ox = check_geometry(tile, stride, offset)
    idx = _indices32(indices, x.device)
    K = idx.shape[0]
    shape = (K, C, th, tw) if layout == "NCHW" else (K, th, tw, C)
    bits = _BITS.get(x.element_size())
    if bits is None:
        return torch_backend.gather(x.detach(), indices, tile, stride, offset, layout)
    out = torch.empty(shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    suffix, view = bits
    launch("sparse_gather.cu", f"sparse_gather_{layout.lower()}_{suffix}", out.numel(),
           (x.detach().contiguous().view(view), idx, out.view(view))
           + _i32(K, N, C, H, W, th, tw, sh, sw, oy, ox))
    return out


def scatter_with(tiles, indices, base, stride, offset, add, inplace, layout, launch: Launcher):
    """:func:`scatter` with the kernel run by ``launch``."""
    layout = check_layout(layout)
    idx = _indices32(indices, base.device)
    (K, C, th, tw, N, H, W), (sh, sw, oy, ox) = scatter_geometry(tiles, idx, base, stride,
                                                                 offset, layout)
    if add:
        kind = {torch.float32: "f32", torch.float64: "f64"}.get(base.dtype)
        name = f"sparse_scatter_add_{layout.lower()}_{kind}"
        view = None
    else:
        bits = _BITS.get(base.element_size())
        kind = bits[0] if bits else None
        name = f"sparse_scatter_{layout.lower()}_{kind}"
        view = bits[1] if bits else None
    if kind is None:
        return torch_backend.scatter(tiles.detach(), indices, base, stride, offset, add,
                                     inplace, layout)
    out = base if inplace else base.clone(memory_format=torch.contiguous_format)
    if tiles.numel() == 0 or out.numel() == 0:
        return out
    target = out if out.is_contiguous() else out.contiguous()
    src = tiles.detach().to(device=out.device, dtype=out.dtype).contiguous()
    dst = target.detach()
    if view is not None:
        src, dst = src.view(view), dst.view(view)
    launch("sparse_scatter.cu", name, src.numel(),
           (src, idx, dst) + _i32(K, N, C, H, W, th, tw, sh, sw, oy, ox))
    if target is not out:
        out.copy_(target)
    return out


# --------------------------------------------------------------------------------------------
# public API (CUDA tensors)
# --------------------------------------------------------------------------------------------

def reduce_mask(mask: torch.Tensor, tile: IntPair, stride: IntPair, offset: IntPair = 0,
                threshold: float = 0.0, pooling: str = "max") -> tuple[torch.Tensor, int]:
    """Active tiles of a computation mask (kernel ``reduce_mask_f32``/``_f64``).

    Args:
        mask: ``(N, H, W)`` float CUDA tensor.
        tile, stride, offset: tile grid (``ceil(H/sh) x ceil(W/sw)`` tiles, tile ``(ty, tx)``
            covering rows ``[ty*sh+oy, ty*sh+oy+th)`` and cols ``[tx*sw+ox, tx*sw+ox+tw)``).
        threshold: a tile is active iff its pooled value is ``> threshold`` (in float64).
        pooling: ``"max"`` or ``"avg"`` (mean over the window's in-map cells, summed and
            divided in float64 as the torch backend does). A window with no in-map cell is
            never active.

    Returns:
        ``(indices, count)``: int32 ``(K, 3)`` rows ``[n, ty, tx]`` in lexicographic order on
        the mask's device, and the Python int ``K`` (reading it synchronises the stream, as
        ``torch.nonzero`` does).
    """
    _require_cuda(mask)
    indices, count, _ = reduce_mask_with(mask, tile, stride, offset, threshold, pooling,
                                         cuda_launch)
    return indices, count


def gather(x: torch.Tensor, indices: torch.Tensor, tile: IntPair, stride: IntPair,
           offset: IntPair = 0, layout: str = "NCHW") -> torch.Tensor:
    """Copy the listed tiles of ``x`` into a stack of tiles (kernels ``sparse_gather_*``).

    ``x`` is ``(N, C, H, W)`` (``layout="NCHW"``) or ``(N, H, W, C)`` (``"NHWC"``); returns a
    contiguous ``(K, C, th, tw)`` / ``(K, th, tw, C)`` tensor of ``x``'s dtype whose element
    ``(i, j)`` of tile ``k`` is ``x[n, :, ty*sh+oy+i, tx*sw+ox+j]``, zero off the map.
    """
    _require_cuda(x)
    return gather_with(x, indices, tile, stride, offset, layout, cuda_launch)


def scatter(tiles: torch.Tensor, indices: torch.Tensor, base: torch.Tensor, stride: IntPair,
            offset: IntPair = 0, add: bool = False, inplace: bool = True,
            layout: str = "NCHW") -> torch.Tensor:
    """Write (``add=False``) or accumulate (``add=True``, atomicAdd: overlapping tiles sum)
    a stack of tiles into ``base`` (kernels ``sparse_scatter_*``).

    ``tiles`` is ``(K, C, th, tw)`` / ``(K, th, tw, C)`` (the tile size comes from its shape),
    ``base`` ``(N, C, H, W)`` / ``(N, H, W, C)``; element ``(i, j)`` of tile ``k`` goes to
    ``base[n, :, ty*sh+oy+i, tx*sw+ox+j]`` when inside the map. ``inplace=False`` writes into a
    copy. Returns the written tensor.
    """
    _require_cuda(tiles, base)
    return scatter_with(tiles, indices, base, stride, offset, add, inplace, layout, cuda_launch)
