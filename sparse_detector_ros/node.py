"""``sparse_detector_node``: the rclpy node around the ROS-free :class:`pipeline.Pipeline`.

Topics (relative names: a namespace applies)
  * subscribes ``input/points`` (sensor_msgs/PointCloud2; sensor-data QoS by default,
    ``node.qos_reliability`` and ``node.qos_depth`` configurable; remap it to your driver's topic)
  * subscribes ``input/odometry`` (nav_msgs/Odometry; sensor-data QoS): the pose of the
    detection frame in the map frame (the frame of ``mask.map_yaml``), for the map-prior mask.
    Always subscribed (``mask.mode`` may switch to ``map_prior`` at run time); the latest message
    is kept, and used for a cloud when its stamp is within ``node.odometry_timeout_s`` of the
    cloud's; otherwise the map prior gives way to ``mask.map_fallback`` and diagnostics say why
    (``mask_fallback``).
  * publishes ``output/objects`` (vision_msgs/Detection3DArray; only when vision_msgs is
    installed, else one error is logged), ``output/markers`` (visualization_msgs/MarkerArray,
    ``node.publish_markers``) and ``output/mask`` (nav_msgs/OccupancyGrid: where the network
    computed, ``node.publish_mask``; volatile, depth 1). Every output of a frame carries the
    input cloud's header (stamp and frame_id) unchanged: boxes found in the detection frame are
    moved back into the cloud's frame with the ``transform.*`` mount transform.
  * publishes ``/diagnostics`` (diagnostic_msgs/DiagnosticArray) every ``node.diagnostics_period``
    (``ros_io.diagnostics_msg``: ERROR when no cloud arrived for ``node.input_timeout_s``; WARN
    for a start-up fault (the torch backend standing in for missing CuPy kernels, the CPU for a
    missing GPU with ``node.device: cuda``), rejected frames, frames stamped more than
    ``node.max_stamp_skew_s`` from the node's clock (a clock problem: processed, counted in
    ``frames_clock_skew`` and kept out of the latency statistics), a p99 latency above
    ``node.latency_budget_ms``, or a mask fallback; messages lost in the transport are counted
    in ``frames_lost`` through the subscription's message-lost event).

Threading: the subscription callback only stores the newest cloud in a one-slot mailbox; a
worker thread takes it and runs the pipeline. The callback rejects a malformed cloud itself
(header and layout checks, ``pointcloud.validate``; see :meth:`SparseDetectorNode._on_cloud` for
why this keeps up with a flood of them). A cloud that arrives
while an unprocessed one is waiting replaces it (the replaced one is counted as dropped), so
the node always works on the newest frame and never builds a backlog. A malformed cloud is
rejected, counted, logged with per-kind throttling, and the node goes on. Before subscribing,
one warm-up frame of random points runs through the pipeline, so that the first real frame is
not slow.

Parameters: every entry of ``config.PARAMS``, declared with a ParameterDescriptor
(description, range or choices). Configuration errors end start-up with one line on stderr and
exit code 2, every problem at once: :func:`main` reads the ``--params-file`` and ``-p``
arguments itself first (``config.config_from_ros_arguments``: files that are missing or not
YAML, lists of mixed types, unknown names with a close match suggested, values out of range),
before ``rclpy.init`` parses them again (it would stop at the first, with a traceback). Only
the file entries for this node apply (``/**`` for every node), as in ROS. Ctrl-C during
start-up exits quietly (code 0).

The live parameters (``config.LIVE_PARAMS``: ``detector.*``, ``mask.*``,
``node.latency_budget_ms``) may be changed while the node runs (``ros2 param set``): they are
checked with the same specs (a refusal gives the same message) and applied between two frames,
under the lock that also guards each frame; a map that cannot be read is refused and the old
configuration stays (with ``mask.map_required`` false it is taken, and the map prior gives way
to ``mask.map_fallback``, reported). Every other parameter is declared read-only
(rclpy refuses a change, naming it). The BEV grid and the classes are not parameters: they come
from the model description (``model.path``; default: the model shipped with the package), which
ships with the weights; an unreadable description, or weights trained on another grid, also
stop start-up with one message.
"""
from __future__ import annotations

import math
import signal
import sys
import threading
import time
from typing import Sequence

from .config import (GRID_SPECS, LIVE_PARAMS, NODE_NAME, PARAMS, SPECS, Config, ConfigError,
                     ParamSpec, config_from_ros_arguments, grid_is_model_property,
                     is_ros_node_param, start_up_only, unknown_parameter)


def _leave_quietly(signum, frame):  # Ctrl-C while torch, rclpy... load: no traceback
    raise SystemExit(0)


# Until the heavy modules below are loaded (seconds), Ctrl-C exits quietly; the handler that
# was there is put back right after (main() then catches KeyboardInterrupt).
_SIGINT_BEFORE = (signal.signal(signal.SIGINT, _leave_quietly)
                  if threading.current_thread() is threading.main_thread() else None)
try:
    import numpy as np  # noqa: E402
    import rclpy  # noqa: E402
    import torch  # noqa: E402
    from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
    from nav_msgs.msg import OccupancyGrid, Odometry  # noqa: E402
    from rcl_interfaces.msg import (FloatingPointRange, IntegerRange,  # noqa: E402
                                    ParameterDescriptor, ParameterType, SetParametersResult)
    from rclpy.event_handler import (SubscriptionEventCallbacks,  # noqa: E402
                                     UnsupportedEventTypeError)
    from rclpy.executors import ExternalShutdownException  # noqa: E402
    from rclpy.impl.implementation_singleton import rclpy_implementation  # noqa: E402
    from rclpy.node import Node  # noqa: E402
    from rclpy.qos import (DurabilityPolicy, QoSProfile, ReliabilityPolicy,  # noqa: E402
                           qos_profile_sensor_data)
    from sensor_msgs.msg import PointCloud2  # noqa: E402
    from visualization_msgs.msg import MarkerArray  # noqa: E402

    from .frames import quaternion_to_yaw  # noqa: E402
    from .model.description import load_description  # noqa: E402
    from .pipeline import (STAGES, FrameResult, Pipeline, backend_fallback,  # noqa: E402
                           resolve_device)
    from .pointcloud import CloudError  # noqa: E402
    from .pointcloud import validate as validate_cloud  # noqa: E402
    from .ros_io import (detections_msg, diagnostics_msg, markers_msg, mask_msg,  # noqa: E402
                         vision_msgs_error)
    from .runtime import freeze_startup_objects, keep_freed_memory  # noqa: E402
    from .stats import FrameStats, SequenceGaps  # noqa: E402
finally:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _SIGINT_BEFORE if _SIGINT_BEFORE is not None
                      else signal.SIG_DFL)

RCLError = rclpy_implementation.RCLError
UnknownROSArgsError = rclpy_implementation.UnknownROSArgsError

_ROS_TYPES = {bool: ParameterType.PARAMETER_BOOL, int: ParameterType.PARAMETER_INTEGER,
              float: ParameterType.PARAMETER_DOUBLE, str: ParameterType.PARAMETER_STRING,
              tuple: ParameterType.PARAMETER_DOUBLE_ARRAY}


def descriptor(spec: ParamSpec) -> ParameterDescriptor:
    """The ROS ParameterDescriptor of one config spec: read-only unless the spec is live
    (``config.LIVE_PARAMS``); the description says which."""
    when = (" (live: ros2 param set applies it from the next frame)" if spec.live
            else " (set at start-up only)")
    d = ParameterDescriptor(name=spec.name, type=_ROS_TYPES[spec.type],
                            description=spec.description + when, read_only=not spec.live)
    if spec.choices is not None:
        d.additional_constraints = "one of: " + ", ".join(spec.choices)
    elif spec.type is tuple:  # ROS ranges apply to scalars only: say it in words
        count = "" if spec.length is None else f"exactly {spec.length} values, "
        d.additional_constraints = f"{count}each value in [{spec.min}, {spec.max}]"
    elif spec.type is float:
        d.floating_point_range = [FloatingPointRange(from_value=float(spec.min),
                                                     to_value=float(spec.max), step=0.0)]
    elif spec.type is int:
        d.integer_range = [IntegerRange(from_value=int(spec.min), to_value=int(spec.max),
                                        step=1)]
    return d


def declare_config(node: Node) -> Config:
    """Declare every parameter on ``node`` and return the validated :class:`Config`.

    ``node`` must be created with ``automatically_declare_parameters_from_overrides=True``: the
    values given at start-up (--params-file, -p) are then declared as given, and this function
    checks each against our specs first (one uniform message; an integer may stand for a float,
    as YAML users expect: ``dense_crossover: 1``), then re-declares it read-only with its
    ParameterDescriptor (read-only unless live). An unknown name (a close match suggested) and
    a ``grid.*`` value (the grid belongs to the model description) are errors, as in
    ``Config.from_yaml``.

    Raises one :class:`ConfigError` naming every bad parameter, value and allowed range.
    """
    ours = {p.name for p in PARAMS}
    given: dict[str, object] = {}
    problems: list[str] = []
    for name in node.list_parameters([], 0).names:
        if name in ours:
            given[name] = node.get_parameter(name).value
            node.undeclare_parameter(name)
        elif name in GRID_SPECS:
            problems.append(grid_is_model_property(name, node.get_parameter(name).value))
        elif not is_ros_node_param(name):
            problems.append(unknown_parameter(name, node.get_parameter(name).value, SPECS))
    config = Config.from_flat(given, problems)
    values = config.to_flat()
    for spec in PARAMS:
        try:
            value = values[spec.name]
            node.declare_parameter(spec.name, list(value) if isinstance(value, tuple) else value,
                                   descriptor(spec), ignore_override=True)
        except Exception as exc:  # rclpy's own range/type checks, should ours have passed
            raise ConfigError(f"parameter '{spec.name}': {exc}") from exc
    return config


def header_stamp_ns(header) -> int:
    """``header.stamp`` in nanoseconds; :class:`CloudError` for an empty ``frame_id`` (boxes
    would have no frame to live in) or an invalid stamp."""
    if not header.frame_id:
        raise CloudError("no_frame_id", "header.frame_id is empty: detections could not be "
                         "placed in any frame")
    sec, nsec = int(header.stamp.sec), int(header.stamp.nanosec)
    if sec < 0 or not 0 <= nsec < 1_000_000_000:
        raise CloudError("bad_stamp", f"header.stamp is invalid (sec {sec}, nanosec {nsec})")
    return sec * 1_000_000_000 + nsec


def stamp_ns(stamp) -> int:
    """A ``builtin_interfaces/Time`` in nanoseconds."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


class SparseDetectorNode(Node):
    """The detector node (see the module docstring). ``startup_notes``: warnings found before
    the node existed (``main``'s own reading of the parameter files), logged first."""

    def __init__(self, startup_notes: Sequence[str] = (), **kwargs):
        super().__init__(NODE_NAME, automatically_declare_parameters_from_overrides=True,
                         **kwargs)
        for note in startup_notes:
            self.get_logger().warning(note)
        self.config = declare_config(self)
        cfg = self.config.node
        # The model description fixes the BEV grid and classes (ModelError, a ConfigError, for
        # an unreadable description or weights trained on another grid).
        self.model = load_description(self.config.model.path)
        #: start-up faults the node runs despite (a fallback): WARN in every diagnostics message
        self.faults: list[str] = []
        self.device, warning = resolve_device(cfg.device)
        if warning and cfg.device == "cuda":        # asked for a GPU, runs on the CPU
            self.faults.append(warning)
            self.get_logger().warning(warning)
        elif warning:                               # auto: the CPU is the expected choice
            self.get_logger().info(warning)
        # sparse.backend 'cupy' that cannot run is a ConfigError; 'auto' falls back to torch
        fallback = backend_fallback(self.config.sparse.backend, self.device)
        if fallback:
            self.faults.append(fallback)
            self.get_logger().warning(fallback)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.pipeline = Pipeline(self.config, self.model, self.device)
        if not self.pipeline.detector.trained:
            self.get_logger().warning(
                f"model '{self.model.name}' ({self.model.source}) has no trained weights: the "
                "network runs with random weights, its boxes mean nothing")
        map_error = self.pipeline.detector.masker.map_error
        if map_error:
            self.get_logger().warning(f"{map_error}: mask.map_required is false, running with "
                                      f"mask.map_fallback = '{self.config.mask.map_fallback}'")
        self.backend = self.pipeline.detector.backend
        self._last_snapshot: dict | None = None
        self._last_log: dict[str, float] = {}
        # One frame or one reconfiguration at a time: live parameters are applied between frames.
        self._lock = threading.Lock()
        # Latest odometry: ((x, y, yaw) of the detection frame in the map frame, stamp [ns]).
        self._odom: tuple[tuple[float, float, float], int] | None = None
        self._no_odometry = f"no odometry received on {self.resolve_topic_name('input/odometry')}"

        # Outputs (relative names), all with the input cloud's header.
        self._objects_pub = None
        vision_error = vision_msgs_error()
        if vision_error is None:
            from vision_msgs.msg import Detection3DArray
            self._objects_pub = self.create_publisher(Detection3DArray, "output/objects", 10)
        else:
            self.get_logger().error(vision_error)
        self._markers_pub = (self.create_publisher(MarkerArray, "output/markers", 10)
                             if cfg.publish_markers else None)
        self._mask_pub = (self.create_publisher(
            OccupancyGrid, "output/mask",
            QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                       durability=DurabilityPolicy.VOLATILE))
            if cfg.publish_mask else None)

        # Warm-up: one frame of random points before any real one (lazy initialisation).
        warm_ms = self.pipeline.warm_up()
        self.get_logger().info(f"warm-up frame (random points, {self.backend} backend): "
                               f"{warm_ms:.1f} ms")
        # the start-up objects out of the garbage collector's scans (see runtime.py)
        frozen = freeze_startup_objects()
        self.get_logger().info(f"{frozen} start-up objects frozen out of garbage collection")
        # counts from here: "no cloud since start-up" excludes the model loading and warm-up
        self.stats = FrameStats(STAGES, window=cfg.stats_window)

        self.add_on_set_parameters_callback(self._on_set_parameters)
        qos = QoSProfile(
            history=qos_profile_sensor_data.history, depth=cfg.qos_depth,
            reliability=(ReliabilityPolicy.BEST_EFFORT if cfg.qos_reliability == "best_effort"
                         else ReliabilityPolicy.RELIABLE),
            durability=qos_profile_sensor_data.durability)
        self._mailbox: PointCloud2 | None = None
        self._cv = threading.Condition()
        self._stop = False
        self._worker = threading.Thread(target=self._work, name="sparse_detector_worker",
                                        daemon=True)
        self._worker.start()
        self.create_subscription(Odometry, "input/odometry", self._on_odometry,
                                 qos_profile_sensor_data)
        # Lost clouds: the gaps in each publisher's sequence numbers (_on_cloud) where the
        # middleware gives them, else the message-lost event where it reports that.
        self._gaps = SequenceGaps()
        try:
            self.create_subscription(
                PointCloud2, "input/points", self._on_cloud, qos,
                event_callbacks=SubscriptionEventCallbacks(message_lost=self._on_message_lost))
        except UnsupportedEventTypeError as exc:
            self.create_subscription(PointCloud2, "input/points", self._on_cloud, qos)
            self.stats.lost_event_supported = False
            self.get_logger().info(f"{rclpy.get_rmw_implementation_identifier()} does not "
                                   f"report the message-lost event ({exc})")
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_timer(cfg.diagnostics_period, self._publish_diagnostics)
        g = self.model.grid
        outputs = ", ".join(self.resolve_topic_name(t) for t, pub in (
            ("output/objects", self._objects_pub), ("output/markers", self._markers_pub),
            ("output/mask", self._mask_pub)) if pub is not None)
        self.get_logger().info(
            f"ready on {self.device} ({self.backend} backend): model '{self.model.name}' "
            f"({self.model.source}), grid {g.shape[0]}x{g.shape[1]} @ {g.resolution} m, "
            f"input '{self.resolve_topic_name('input/points')}' ({cfg.qos_reliability}, "
            f"depth {cfg.qos_depth}), outputs {outputs}")

    # -- parameters --------------------------------------------------------------------
    def _on_set_parameters(self, params) -> SetParametersResult:
        """Check live parameter changes with the config specs and apply them between frames;
        refuse (with the spec's message) anything that cannot be applied."""
        values = {}
        for p in params:
            if p.name in LIVE_PARAMS:
                values[p.name] = p.value
            elif p.name in SPECS:  # read-only ones are refused by rclpy before this callback
                return SetParametersResult(successful=False, reason=start_up_only(p.name))
        if not values:
            return SetParametersResult(successful=True)
        try:
            with self._lock:
                new = self.config.updated(values)
                changes = self.config.changes(new)
                self.pipeline.reconfigure(new)
                self.config = new
        except ConfigError as exc:
            self.get_logger().warning(f"parameter change refused: {exc}")
            return SetParametersResult(successful=False, reason=str(exc))
        if changes:
            self.get_logger().info("parameters changed: " + ", ".join(
                f"{k} = {list(v) if isinstance(v, tuple) else v!r}" for k, v in changes.items()))
        return SetParametersResult(successful=True)

    # -- subscription side -------------------------------------------------------------
    def _on_cloud(self, msg: PointCloud2, info: dict) -> None:
        """Count the clouds its publisher sent before this one that never arrived
        (``info``: rclpy's MessageInfo), check the cloud's header and layout here
        (microseconds, nothing of the points is read) and reject a malformed one on the spot;
        hand a good one to the worker.

        Rejecting here, not in the worker, is what keeps up with a flood of small malformed
        clouds: handed to the worker, each one had to wake it, and the worker got the GIL only
        when this thread, busy taking the next messages, let go of it (at the interpreter's
        switch interval at worst), so it fell behind and the mailbox overwrote the clouds it
        had not reached (a good one too). Measured, 2000 tiny malformed clouds published at
        once into a reliable depth-1000 input on 2 busy cores, 5 runs: the worker rejected 13
        to 1076 of the about 1200 clouds taken (down to about 40 a second), the rest counted
        dropped; rejected here, every cloud taken is rejected at once (3600 to 7700 a second,
        the rate at which rclpy takes messages), none dropped, and the clouds the queue
        overwrote are counted lost, so that received + lost = sent."""
        self.stats.received()
        seq = info.get("publication_sequence_number") if info else None
        if seq is not None:
            gid = info.get("publisher_gid") or {}
            self.stats.missed(self._gaps.missed(bytes(gid.get("data", b"")), seq))
        try:
            header_stamp_ns(msg.header)
            validate_cloud(msg)
        except CloudError as exc:
            self._reject(exc.kind, str(exc))
            return
        with self._cv:
            if self._mailbox is not None:
                self.stats.dropped()
            self._mailbox = msg
            self._cv.notify()

    def _on_odometry(self, msg: Odometry) -> None:
        p, q = msg.pose.pose.position, msg.pose.pose.orientation
        try:
            yaw = quaternion_to_yaw(q.x, q.y, q.z, q.w)
            if not all(math.isfinite(v) for v in (p.x, p.y)):
                raise ValueError(f"position ({p.x}, {p.y}) is not finite")
        except ValueError as exc:
            self._log_throttled("bad_odometry", f"ignored an odometry message: {exc}")
            return
        self._odom = ((float(p.x), float(p.y), yaw), stamp_ns(msg.header.stamp))

    def _on_message_lost(self, info) -> None:
        """The middleware lost ``info.total_count_change`` messages of input/points."""
        self.stats.lost(int(info.total_count_change))

    def _pose_for(self, cloud_ns: int) -> tuple[tuple[float, float, float] | None, str]:
        """The odometry pose to use for a cloud stamped ``cloud_ns``, or (None, why not)."""
        odom = self._odom
        if odom is None:
            return None, self._no_odometry
        pose, odom_ns = odom
        dt = (cloud_ns - odom_ns) / 1e9
        limit = self.config.node.odometry_timeout_s
        if abs(dt) > limit:
            return None, (f"odometry {abs(dt):.1f} s {'older' if dt > 0 else 'newer'} than the "
                          f"cloud (node.odometry_timeout_s = {limit:g})")
        return pose, ""

    # -- worker side -------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._cv:
                while self._mailbox is None and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                msg, self._mailbox = self._mailbox, None
            try:
                self._process(msg)
            except Exception as exc:  # never let the worker die: the node would go silent
                self.get_logger().error(f"worker: {type(exc).__name__}: {exc}")

    def _clock_problem(self, skew_s: float, cloud_ns: int, now_ns: int) -> str:
        """What a cloud stamped ``skew_s`` s from the node's clock means, and what to check."""
        limit = self.config.node.max_stamp_skew_s
        sim = self.get_clock().ros_time_is_active
        if now_ns == 0:
            return ("the node's clock reads 0: use_sim_time is true but no /clock message has "
                    "arrived (replay the bag with --clock, or set use_sim_time false); left out "
                    "of the latency statistics")
        what = "stamped 0 (the driver sets no stamp?)" if cloud_ns == 0 else (
            f"stamped {abs(skew_s):.1f} s {'ahead of' if skew_s > 0 else 'behind'}")
        return (f"cloud {what} the node's {'simulated (use_sim_time) ' if sim else ''}clock "
                f"(node.max_stamp_skew_s = {limit:g}); left out of the latency statistics: "
                "check use_sim_time (true with a bag replayed with --clock) and the clock sync "
                "(NTP/PTP) between the sensor driver's machine and this one")

    def _process(self, msg: PointCloud2) -> None:
        try:
            cloud_ns = header_stamp_ns(msg.header)
            start_ns = self.get_clock().now().nanoseconds
            skew_s = (cloud_ns - start_ns) / 1e9
            pose, no_pose = self._pose_for(cloud_ns)
            with self._lock:
                result = self.pipeline.process(msg, pose)
                mount = self.pipeline.mount
                has_map = self.pipeline.detector.masker.map_prior is not None
        except CloudError as exc:
            self._reject(exc.kind, str(exc))
            return
        except Exception as exc:  # a bug must not kill the worker: count, log, go on
            self._reject("internal_error", f"{type(exc).__name__}: {exc}")
            return
        if result.mask_fallback and no_pose and has_map:
            result.mask_fallback = f"{no_pose}; {result.mask_fallback}"
        self._publish_outputs(msg.header, result, None if mount.is_identity else mount)
        latency_ms: float | None = (self.get_clock().now().nanoseconds - cloud_ns) / 1e6
        if start_ns == 0 or abs(skew_s) > self.config.node.max_stamp_skew_s:
            # a clock problem, not a latency: counted, kept out of the latency statistics
            latency_ms = None
            self.stats.clock_skew(skew_s, self._clock_problem(skew_s, cloud_ns, start_ns))
        labels = result.detections.labels.cpu().numpy()
        counts = np.bincount(labels, minlength=len(self.model.classes))
        self.stats.processed(result.points_received, result.points_kept, result.stage_ms,
                             latency_ms, active_fraction=result.active_fraction,
                             mask_mode=result.mask_mode, mask_fallback=result.mask_fallback,
                             detections_by_class={c: int(n) for c, n in
                                                  zip(self.model.classes, counts)})

    def _publish_outputs(self, header, result: FrameResult, mount) -> None:
        """Detections, markers and the computation mask of one frame, with the cloud's
        header; a conversion error is logged (throttled) and the other outputs still go out."""
        classes = self.model.classes
        outputs = (
            (self._objects_pub, lambda: detections_msg(result.detections, classes, header,
                                                       mount)),
            (self._markers_pub, lambda: markers_msg(result.detections, classes, header, mount)),
            (self._mask_pub, lambda: mask_msg(result.active, self.model.grid,
                                              self.pipeline.detector.net.out_stride, header,
                                              mount) if result.active is not None else None),
        )
        for pub, build in outputs:
            if pub is None:
                continue
            try:
                out = build()
                if out is not None:
                    pub.publish(out)
            except Exception as exc:
                self._log_throttled("output_error", f"could not publish on {pub.topic_name}: "
                                    f"{type(exc).__name__}: {exc}", error=True)

    def _reject(self, kind: str, reason: str) -> None:
        self.stats.rejected(kind, reason)
        self._log_throttled(kind, f"rejected a point cloud ({kind}): {reason}")

    def _log_throttled(self, kind: str, text: str, error: bool = False) -> None:
        """Log ``text`` unless a message of the same ``kind`` was logged within
        ``node.log_throttle_sec``."""
        now = time.monotonic()
        if now - self._last_log.get(kind, -1e9) >= self.config.node.log_throttle_sec:
            self._last_log[kind] = now
            (self.get_logger().error if error else self.get_logger().warning)(text)

    # -- diagnostics -------------------------------------------------------------------
    def _publish_diagnostics(self) -> None:
        snap = self.stats.snapshot()
        cfg = self.config.node
        self._diag_pub.publish(diagnostics_msg(
            snap, device=str(self.device), backend=self.backend,
            stamp=self.get_clock().now().to_msg(), hardware_id=self.get_fully_qualified_name(),
            previous=self._last_snapshot, input_timeout_s=cfg.input_timeout_s,
            latency_budget_ms=cfg.latency_budget_ms, faults=self.faults,
            threads=torch.get_num_threads()))
        self._last_snapshot = snap

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._worker.join(timeout=5.0)


def _say(text: str) -> None:
    print(f"[{NODE_NAME}] {text}", file=sys.stderr, flush=True)


def main(args: list[str] | None = None) -> int:
    """Run the node until Ctrl-C or shutdown; the exit code: 0, or 2 for a configuration error
    (one line on stderr naming every problem). ``args``: the command line (default
    ``sys.argv``)."""
    try:
        return _run(list(sys.argv if args is None else args))
    except KeyboardInterrupt:  # Ctrl-C during start-up (or a second one while stopping)
        return 0


def _run(argv: list[str]) -> int:
    # Our own reading of --params-file / -p first: every problem in one message (rclpy.init
    # would stop at the first one with an RCLError traceback).
    try:
        _, notes = config_from_ros_arguments(argv, NODE_NAME)
    except ConfigError as exc:
        _say(f"invalid configuration: {exc}")
        return 2
    keep_freed_memory()  # the per-frame maps reuse heap memory instead of faulting in new pages
    try:
        rclpy.init(args=argv)
    except (RCLError, UnknownROSArgsError) as exc:  # what our reading does not cover
        _say(f"invalid ROS arguments: {type(exc).__name__}: {' '.join(str(exc).split())}")
        return 2
    node = None
    try:
        node = SparseDetectorNode(startup_notes=notes)
        rclpy.spin(node)
    except ConfigError as exc:
        _say(f"invalid configuration: {exc}")
        return 2
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except Exception:
        # Ctrl-C during start-up: rclpy's SIGINT handler shuts the context down, and whatever
        # rclpy call comes next fails (e.g. RCLError "context is not valid"): leave quietly
        if rclpy.ok():
            raise
    finally:
        try:
            if node is not None:
                node.stop()
                node.destroy_node()
        except KeyboardInterrupt:  # a second Ctrl-C while stopping: just leave
            pass
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
