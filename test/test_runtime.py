"""runtime: the allocator setting of a detector process."""
import ctypes
import ctypes.util

from sparse_detector_ros import runtime


def test_keep_freed_memory_sets_glibc_thresholds_once(monkeypatch):
    calls = []

    class Mallopt:
        argtypes = None

        def __call__(self, param, value):
            calls.append((param, value))
            return 1

    class FakeLibc:
        mallopt = Mallopt()
    monkeypatch.setattr(runtime, "_DONE", {"value": None})
    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeLibc())
    assert runtime.keep_freed_memory(1 << 20) is True
    assert calls == [(runtime.M_MMAP_THRESHOLD, 1 << 20),
                     (runtime.M_TRIM_THRESHOLD, (1 << 21) - 1)]
    assert runtime.keep_freed_memory() is True and len(calls) == 2      # idempotent


def test_without_glibc_nothing_changes(monkeypatch):
    def missing(name):
        raise OSError("no libc")

    monkeypatch.setattr(runtime, "_DONE", {"value": None})
    monkeypatch.setattr(ctypes, "CDLL", missing)
    assert runtime.keep_freed_memory() is False


def test_real_glibc_accepts_it(monkeypatch):
    monkeypatch.setattr(runtime, "_DONE", {"value": None})
    assert runtime.keep_freed_memory() is (ctypes.util.find_library("c") is not None)


def test_freeze_startup_objects_takes_live_objects_out_of_collections():
    import gc

    class Held:
        pass

    held = [Held() for _ in range(100)]          # alive "start-up" objects
    try:
        frozen = runtime.freeze_startup_objects()
        assert frozen == gc.get_freeze_count() >= 100
        tracked = {id(o) for o in gc.get_objects()}
        assert not any(id(o) in tracked for o in held)        # no collection scans them
        later = Held()                                        # new objects are collected as before
        assert gc.is_tracked(later) and id(later) in {id(o) for o in gc.get_objects()}
    finally:
        gc.unfreeze()
