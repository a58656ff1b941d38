"""Process-wide settings for a detector process (the node, the benchmarks, the evaluation).

:func:`keep_freed_memory`: with glibc's defaults a large tensor (above the dynamic mmap
threshold, 128 KiB to 32 MiB) is a fresh ``mmap`` whose pages fault in one by one when first
written, and freed heap memory is trimmed back to the system. A detector allocates the same
large maps every frame, so it would pay those page faults every frame. Raising the mmap and trim
thresholds keeps freed blocks in the heap for the next frame. Measured with the default model
(2-core CPU, 512 x 512 BEV, the same thresholds set through ``MALLOC_MMAP_THRESHOLD_`` /
``MALLOC_TRIM_THRESHOLD_``): the dense backbone went from 31.7 to 25.3 ms a frame (median of 6).
The benchmarks call it too, so dense and sparse are compared under the same setting. Without
glibc it does nothing.

:func:`freeze_startup_objects`: a node holds a few hundred thousand Python objects after start-up
(torch, rclpy, the model) that never become garbage, and every full collection of the cyclic
garbage collector scans them all: measured 75 ms in the node's process (2-core CPU), with the GIL
held, so the worker and the executor both stop. The per-frame messages (a MarkerArray holds a
few thousand objects) trigger such collections now and then: tail latency. Moving the start-up
objects to the permanent generation (``gc.freeze``) takes them out of every later collection
(a full collection then takes microseconds); new objects are collected as before.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
_DONE = {"value": None}


def keep_freed_memory(threshold: int = 1 << 30) -> bool:
    """Ask glibc to serve allocations up to ``threshold`` bytes from the heap and to keep freed
    memory (``mallopt``). Returns True when applied; False (and nothing changed) without glibc.
    Idempotent."""
    if _DONE["value"] is not None:
        return _DONE["value"]
    ok = False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        ok = bool(mallopt(M_MMAP_THRESHOLD, threshold)) and bool(
            mallopt(M_TRIM_THRESHOLD, 2 * threshold - 1 if threshold < 1 << 30 else 2**31 - 1))
    except (OSError, AttributeError):
        ok = False
    _DONE["value"] = ok
    return ok


def freeze_startup_objects() -> int:
    """Collect once, then move every object alive now to the collector's permanent generation
    (``gc.freeze``): later collections do not scan them. Call it once start-up is done (model
    loaded, warm-up frame run). Returns how many objects are frozen in all."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
