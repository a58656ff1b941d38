"""Public functional API of the sparse engine: ``reduce_mask``, ``gather``, ``scatter``.

Each function has the signature of its :mod:`~sparse_detector_ros.sparse.torch_backend`
counterpart (see there for shapes, the tile geometry and the SBNet halo recipe) plus a keyword
``backend``: ``"auto"`` (default), ``"torch"`` or ``"cupy"``, resolved per call by
:func:`get_backend` from the device of the first tensor argument. ``cupy`` is imported lazily,
never at module load.
"""
from __future__ import annotations

import importlib
import logging
import threading
from types import ModuleType

import torch

from . import torch_backend

__all__ = ["reduce_mask", "gather", "scatter", "get_backend", "reset_backend_cache", "BACKENDS"]

LOGGER = logging.getLogger("sparse_detector_ros.sparse")
BACKENDS = ("auto", "cupy", "torch")
_CUPY_MODULE = "sparse_detector_ros.sparse.cupy_backend"

_lock = threading.Lock()
_cupy_state: dict[str, object] = {}   # "module" -> module | None, "reason" -> str
_warned = False


def _load_cupy() -> tuple[ModuleType | None, str]:
    """Import the CuPy backend once; ``(module, "")`` when usable, else ``(None, reason)``."""
    with _lock:
        if "module" not in _cupy_state:
            mod, reason = None, ""
            try:
                cand = importlib.import_module(_CUPY_MODULE)
                if cand.available():
                    mod = cand
                else:
                    reason = "cupy_backend.available() is False"
            except Exception as e:  # ImportError, or a broken CUDA/CuPy install
                reason = f"{type(e).__name__}: {e}"
            _cupy_state["module"], _cupy_state["reason"] = mod, reason
        return _cupy_state["module"], _cupy_state["reason"]  # type: ignore[return-value]


def get_backend(name: str = "auto", device: torch.device | str | None = None) -> ModuleType:
    """The module implementing ``reduce_mask``/``gather``/``scatter`` for ``name`` on ``device``.

    * ``"torch"``: :mod:`~sparse_detector_ros.sparse.torch_backend` (CPU and CUDA).
    * ``"cupy"``: the CuPy raw-kernel backend; raises ``RuntimeError`` when it cannot be used
      (no CuPy, no GPU, or ``device`` is not CUDA).
    * ``"auto"``: CuPy on a CUDA device when ``cupy_backend`` imports and reports
      ``available()``, else torch. Falling back because CuPy or a GPU is missing (a CUDA
      device without usable CuPy, or no device given and no GPU present) logs ONE warning
      (logger ``sparse_detector_ros.sparse``) per process; an explicit CPU device simply
      means torch.
    """
    global _warned
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    if name == "torch":
        return torch_backend
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if name == "cupy":
        if dev.type != "cuda":
            raise RuntimeError(f"backend 'cupy' needs a CUDA device, got {dev}")
        mod, reason = _load_cupy()
        if mod is None:
            raise RuntimeError(f"backend 'cupy' is not usable: {reason}")
        return mod
    # auto
    if device is None and not torch.cuda.is_available():
        reason = "no CUDA GPU"
    elif dev.type != "cuda" and device is not None:
        return torch_backend  # the caller chose a CPU device: torch is simply the choice
    else:
        mod, reason = _load_cupy()
        if mod is not None:
            return mod
    with _lock:
        if not _warned:
            _warned = True
            LOGGER.warning("sparse backend 'auto': CuPy kernels unavailable (%s); "
                           "using the torch backend", reason)
    return torch_backend


def reset_backend_cache() -> None:
    """Forget the CuPy probe and the warning flag (the next ``auto`` / ``cupy`` lookup probes
    again; used by the tests)."""
    global _warned
    with _lock:
        _cupy_state.clear()
        _warned = False


def reduce_mask(mask: torch.Tensor, tile, stride, offset=0, threshold: float = 0.0,
                pooling: str = "max", *, backend: str = "auto") -> tuple[torch.Tensor, int]:
    """Active tiles of ``mask`` (N, H, W) -> (int32 (K, 3) [n, ty, tx] indices, K).
    See :func:`sparse_detector_ros.sparse.torch_backend.reduce_mask`."""
    return get_backend(backend, mask.device).reduce_mask(mask, tile, stride, offset, threshold,
                                                         pooling)


def gather(x: torch.Tensor, indices: torch.Tensor, tile, stride, offset=0,
           layout: str = "NCHW", *, backend: str = "auto") -> torch.Tensor:
    """Stack the listed tiles of ``x`` -> (K, C, th, tw) / (K, th, tw, C).
    See :func:`sparse_detector_ros.sparse.torch_backend.gather`."""
    return get_backend(backend, x.device).gather(x, indices, tile, stride, offset, layout)


def scatter(tiles: torch.Tensor, indices: torch.Tensor, base: torch.Tensor, stride, offset=0,
            add: bool = False, inplace: bool = True, layout: str = "NCHW", *,
            backend: str = "auto") -> torch.Tensor:
    """Write or add ``tiles`` back into ``base``.
    See :func:`sparse_detector_ros.sparse.torch_backend.scatter`."""
    return get_backend(backend, base.device).scatter(tiles, indices, base, stride, offset, add,
                                                     inplace, layout)
