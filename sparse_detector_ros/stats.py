"""Thread-safe frame accounting for the node's diagnostics (ROS-free).

The subscription callback, the worker thread and the diagnostics timer all touch these
counters, so every access goes through one lock. :meth:`FrameStats.snapshot` returns a plain
dict that ``ros_io.diagnostics_msg`` turns into a DiagnosticArray.

Two kinds of timing statistics, per stage (``stage_ms``), for the sum of the stages
(``total_ms``) and for the latency from the cloud's stamp to the published outputs
(``latency_ms``):

* ``(mean, max)`` over the frames processed since the previous snapshot (one diagnostics
  period; ``frames_in_window`` of them), cleared by every snapshot;
* ``(p50, p99)`` over the last ``window`` frames processed (``node.stats_window``; a rolling
  window that snapshots do not clear; ``frames_in_stats`` of them).

Both hold every stage the pipeline timed: the stages given at construction (``pipeline.STAGES``)
in their order, reported as 0 while no frame ran them, then any other stage a frame reported.

Counters that keep the statistics honest:

* ``frames_lost``: clouds a publisher sent that the node never took. Where the middleware gives
  each message its publisher's sequence number (Fast DDS does), they are the gaps between the
  numbers of consecutive clouds of one publisher (:class:`SequenceGaps`,
  :meth:`FrameStats.missed`): lost in the transport, or overwritten in the subscription's
  queue (``node.qos_depth``) before the node could take them, which no middleware event
  reports. Otherwise they are the count of the subscription's message-lost event
  (:meth:`FrameStats.lost`), which the snapshot also gives on its own
  (``frames_lost_in_transport``); ``frames_lost_source`` says which it is.
* ``frames_clock_skew``: frames whose stamp was too far from the node's clock
  (:meth:`FrameStats.clock_skew`): they are processed, but their "latency" measures the clock
  difference, so :meth:`FrameStats.processed` gets ``latency_ms=None`` and leaves them out of
  the latency statistics.
"""
from __future__ import annotations

import threading
import time
from collections import defaultdict, deque
from typing import Callable, Mapping

import numpy as np


class SequenceGaps:
    """Messages never taken, from the publication sequence numbers of each publisher.

    ``missed(publisher, seq)``: how many messages of ``publisher`` (any hashable id, e.g. its
    GID) came between the last one taken and this one (``seq - last - 1``); 0 for the first
    message seen from a publisher (what it sent before is not known to be meant for us) and
    for a number not after the last (a restarted count). Not thread-safe: one subscription
    callback calls it."""

    def __init__(self) -> None:
        self._last: dict[object, int] = {}

    def missed(self, publisher: object, seq: int) -> int:
        last = self._last.get(publisher)
        self._last[publisher] = int(seq)
        return 0 if last is None or seq <= last else int(seq) - last - 1


def p50_p99(values) -> tuple[float, float]:
    """Median and 99th percentile (linear interpolation) of ``values``; (0, 0) when empty."""
    if len(values) == 0:
        return 0.0, 0.0
    p50, p99 = np.percentile(np.asarray(values, np.float64), [50.0, 99.0])
    return float(p50), float(p99)


class FrameStats:
    """Frame counters and timing windows.

    Args:
        stages: the pipeline's stages, reported (as 0) before any frame ran them.
        window: frames in the rolling p50/p99 window (``node.stats_window``, >= 1).
        clock: monotonic seconds (tests pass a fake one); the time since the last received
            cloud (or since construction, before the first) is measured with it.
    """

    def __init__(self, stages: tuple[str, ...], window: int = 100,
                 clock: Callable[[], float] = time.monotonic):
        if int(window) < 1:
            raise ValueError(f"window must be >= 1 frame, got {window!r}")
        self._lock = threading.Lock()
        self._clock = clock
        self.window = int(window)
        self._started = clock()
        self._last_input: float | None = None
        self.frames_received = 0
        self.frames_processed = 0
        self.frames_dropped = 0
        self.frames_rejected = 0
        self.frames_lost_in_transport = 0     # the message-lost event's count
        self.frames_missed = 0                # sequence-number gaps
        self.sequence_numbers = False         # a cloud came with its sequence number
        #: whether the middleware reports the message-lost event (set by the node)
        self.lost_event_supported = True
        self.frames_clock_skew = 0
        self.last_clock_skew_s = 0.0
        self.last_clock_skew = ""
        self.rejected_by_kind: dict[str, int] = defaultdict(int)
        self.last_rejection = ""
        self.points_received = 0
        self.points_kept = 0
        # since the last snapshot
        self._period: dict[str, list[float]] = {s: [] for s in stages}
        self._total: list[float] = []
        self._latency: list[float] = []
        self._active: list[float] = []
        # the last `window` frames
        self._roll: dict[str, deque[float]] = {s: deque(maxlen=self.window) for s in stages}
        self._roll_total: deque[float] = deque(maxlen=self.window)
        self._roll_latency: deque[float] = deque(maxlen=self.window)
        self.detections = 0
        self.detections_by_class: dict[str, int] = {}
        self.mask_mode = ""
        self.mask_fallback = ""

    def received(self) -> None:
        with self._lock:
            self.frames_received += 1
            self._last_input = self._clock()

    def dropped(self) -> None:
        with self._lock:
            self.frames_dropped += 1

    def rejected(self, kind: str, reason: str) -> None:
        with self._lock:
            self.frames_rejected += 1
            self.rejected_by_kind[kind] += 1
            self.last_rejection = reason

    def lost(self, count: int) -> None:
        """``count`` messages lost in the transport (the subscription's message-lost event)."""
        if count > 0:
            with self._lock:
                self.frames_lost_in_transport += int(count)

    def missed(self, count: int) -> None:
        """A cloud arrived with its publisher's sequence number, ``count`` after the previous
        one taken from that publisher (:class:`SequenceGaps`): from now on ``frames_lost``
        counts these gaps."""
        with self._lock:
            self.sequence_numbers = True
            self.frames_missed += max(0, int(count))

    def _lost_and_source(self) -> tuple[int, str]:
        if self.sequence_numbers:
            return self.frames_missed, "sequence numbers"
        if self.lost_event_supported:
            return self.frames_lost_in_transport, "message-lost event"
        return 0, "not reported by the middleware"

    def clock_skew(self, skew_s: float, description: str) -> None:
        """A frame stamped ``skew_s`` seconds from the node's clock (positive: in the future),
        beyond the allowed skew; ``description`` says so and what to check."""
        with self._lock:
            self.frames_clock_skew += 1
            self.last_clock_skew_s = float(skew_s)
            self.last_clock_skew = description

    def processed(self, points_received: int, points_kept: int, stage_ms: Mapping[str, float],
                  latency_ms: float | None, active_fraction: float = 1.0, detections: int = 0,
                  mask_mode: str = "", mask_fallback: str = "",
                  detections_by_class: Mapping[str, int] | None = None) -> None:
        """Account one processed frame. ``latency_ms`` None: not a latency (the stamp is off
        the clock, see :meth:`clock_skew`), left out of the latency statistics.
        ``detections_by_class``: ``{class: count}`` of this frame (every class of the model,
        zeros included); ``detections`` is its total when given."""
        with self._lock:
            self.frames_processed += 1
            self.points_received = points_received
            self.points_kept = points_kept
            if detections_by_class is not None:
                self.detections_by_class = dict(detections_by_class)
                detections = sum(self.detections_by_class.values())
            self.detections = detections
            self.mask_mode = mask_mode
            self.mask_fallback = mask_fallback
            self._active.append(active_fraction)
            for s, ms in stage_ms.items():
                self._period.setdefault(s, []).append(ms)
                self._roll.setdefault(s, deque(maxlen=self.window)).append(ms)
            total = sum(stage_ms.values())
            self._total.append(total)
            self._roll_total.append(total)
            if latency_ms is not None:
                self._latency.append(latency_ms)
                self._roll_latency.append(latency_ms)

    def snapshot(self) -> dict:
        """Counters, the ``(mean, max)`` timings since the last snapshot (then cleared), the
        ``(p50, p99)`` timings over the rolling window, and ``seconds_since_input``: seconds
        since the last cloud arrived (``input_received`` False: since construction)."""
        def mean_max(v: list[float]) -> tuple[float, float]:
            return (sum(v) / len(v), max(v)) if v else (0.0, 0.0)

        with self._lock:
            now = self._clock()
            stage_ms = {k: mean_max(v) for k, v in self._period.items()}
            total, latency = mean_max(self._total), mean_max(self._latency)
            active = mean_max(self._active)
            frames_in_window = len(self._total)
            for v in (*self._period.values(), self._total, self._latency, self._active):
                v.clear()
            since = self._last_input if self._last_input is not None else self._started
            return {
                "frames_received": self.frames_received,
                "frames_processed": self.frames_processed,
                "frames_dropped": self.frames_dropped,
                "frames_rejected": self.frames_rejected,
                "frames_lost": self._lost_and_source()[0],
                "frames_lost_source": self._lost_and_source()[1],
                "frames_lost_in_transport": self.frames_lost_in_transport,
                "frames_clock_skew": self.frames_clock_skew,
                "last_clock_skew_s": self.last_clock_skew_s,
                "last_clock_skew": self.last_clock_skew,
                "frames_in_latency": len(self._roll_latency),
                "rejected_by_kind": dict(self.rejected_by_kind),
                "last_rejection": self.last_rejection,
                "points_received": self.points_received,
                "points_kept": self.points_kept,
                "frames_in_window": frames_in_window,
                "stage_ms": stage_ms,
                "total_ms": total,
                "latency_ms": latency,
                "frames_in_stats": len(self._roll_total),
                "stats_window": self.window,
                "stage_ms_pct": {k: p50_p99(v) for k, v in self._roll.items()},
                "total_ms_pct": p50_p99(self._roll_total),
                "latency_ms_pct": p50_p99(self._roll_latency),
                "active_fraction": active,
                "detections": self.detections,
                "detections_by_class": dict(self.detections_by_class),
                "mask_mode": self.mask_mode,
                "mask_fallback": self.mask_fallback,
                "input_received": self._last_input is not None,
                "seconds_since_input": max(0.0, now - since),
            }
