"""Thread-safe frame accounting for the node's diagnostics (ROS-free).

The subscription callback, the worker thread and the diagnostics timer all touch these
counters, so every access goes through one lock. :meth:`FrameStats.snapshot` returns a plain
dict that ``ros_io.diagnostics_msg`` turns into a DiagnosticArray. Its ``stage_ms`` holds every
stage the pipeline timed: the stages given at construction (``pipeline.STAGES``) in their order,
reported as 0 while no frame ran them, then any other stage a frame reported.
"""
from __future__ import annotations

import threading
from collections import defaultdict


class FrameStats:
    def __init__(self, stages: tuple[str, ...]):
        self._lock = threading.Lock()
        self.frames_received = 0
        self.frames_processed = 0
        self.frames_dropped = 0
        self.frames_rejected = 0
        self.rejected_by_kind: dict[str, int] = defaultdict(int)
        self.last_rejection = ""
        self.points_received = 0
        self.points_kept = 0
        self._window: dict[str, list[float]] = {s: [] for s in stages}
        self._total: list[float] = []
        self._latency: list[float] = []
        self._active: list[float] = []
        self.detections = 0
        self.mask_mode = ""
        self.mask_fallback = ""

    def received(self) -> None:
        with self._lock:
            self.frames_received += 1

    def dropped(self) -> None:
        with self._lock:
            self.frames_dropped += 1

    def rejected(self, kind: str, reason: str) -> None:
        with self._lock:
            self.frames_rejected += 1
            self.rejected_by_kind[kind] += 1
            self.last_rejection = reason

    def processed(self, points_received: int, points_kept: int, stage_ms: dict[str, float],
                  latency_ms: float, active_fraction: float = 1.0, detections: int = 0,
                  mask_mode: str = "", mask_fallback: str = "") -> None:
        with self._lock:
            self.frames_processed += 1
            self.points_received = points_received
            self.points_kept = points_kept
            self.detections = detections
            self.mask_mode = mask_mode
            self.mask_fallback = mask_fallback
            self._active.append(active_fraction)
            for s, ms in stage_ms.items():
                self._window.setdefault(s, []).append(ms)
            self._total.append(sum(stage_ms.values()))
            self._latency.append(latency_ms)

    def snapshot(self) -> dict:
        """Counters plus mean/max of each timing over the frames since the last snapshot."""
        def mean_max(v: list[float]) -> tuple[float, float]:
            return (sum(v) / len(v), max(v)) if v else (0.0, 0.0)

        with self._lock:
            stage_ms = {k: mean_max(v) for k, v in self._window.items()}
            total, latency = mean_max(self._total), mean_max(self._latency)
            active = mean_max(self._active)
            frames_in_window = len(self._total)
            for v in (*self._window.values(), self._total, self._latency, self._active):
                v.clear()
            return {
                "frames_received": self.frames_received,
                "frames_processed": self.frames_processed,
                "frames_dropped": self.frames_dropped,
                "frames_rejected": self.frames_rejected,
                "rejected_by_kind": dict(self.rejected_by_kind),
                "last_rejection": self.last_rejection,
                "points_received": self.points_received,
                "points_kept": self.points_kept,
                "frames_in_window": frames_in_window,
                "stage_ms": stage_ms,
                "total_ms": total,
                "latency_ms": latency,
                "active_fraction": active,
                "detections": self.detections,
                "mask_mode": self.mask_mode,
                "mask_fallback": self.mask_fallback,
            }
