"""``sparse_detector_node``: the rclpy node around the ROS-free :class:`pipeline.Pipeline`.

Topics
  * subscribes ``input/points`` (sensor_msgs/PointCloud2; sensor-data QoS by default,
    ``node.qos_reliability`` and ``node.qos_depth`` configurable; remap it to your driver's topic)
  * publishes ``/diagnostics`` (diagnostic_msgs/DiagnosticArray) every ``node.diagnostics_period``

Threading: the subscription callback only stores the newest cloud in a one-slot mailbox; a
worker thread takes it and runs the pipeline. A cloud that arrives while an unprocessed one is
waiting replaces it (the replaced one is counted as dropped), so the node always works on the
newest frame and never builds a backlog. A malformed cloud is rejected, counted, logged with
per-kind throttling, and the node goes on.

Parameters: every entry of ``config.PARAMS``, declared read-only with a ParameterDescriptor
(description, range or choices). An invalid value stops start-up with one message naming the
parameter, the value and the allowed range (exit code 2). The BEV grid and the classes are not
parameters: they come from the model description (``model.path``; default: the model shipped
with the package), which ships with the weights; an unreadable description, or weights trained
on another grid, also stop start-up with one message.
"""
from __future__ import annotations

import sys
import threading
import time

import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import (FloatingPointRange, IntegerRange, ParameterDescriptor,
                                ParameterType)
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import PointCloud2

from .config import (GRID_SPECS, NODE_NAME, PARAMS, Config, ConfigError, ParamSpec,
                     grid_is_model_property)
from .model.description import load_description
from .pipeline import STAGES, Pipeline, resolve_device
from .pointcloud import CloudError
from .runtime import keep_freed_memory
from .ros_io import diagnostics_msg
from .stats import FrameStats

_ROS_TYPES = {bool: ParameterType.PARAMETER_BOOL, int: ParameterType.PARAMETER_INTEGER,
              float: ParameterType.PARAMETER_DOUBLE, str: ParameterType.PARAMETER_STRING,
              tuple: ParameterType.PARAMETER_DOUBLE_ARRAY}
# Parameters every rclpy node may receive that are not ours.
_FOREIGN_PARAMS = ("use_sim_time", "start_type_description_service", "qos_overrides.")


def descriptor(spec: ParamSpec) -> ParameterDescriptor:
    """The ROS ParameterDescriptor of one config spec (read-only: set at start-up)."""
    d = ParameterDescriptor(name=spec.name, type=_ROS_TYPES[spec.type],
                            description=spec.description, read_only=True)
    if spec.choices is not None:
        d.additional_constraints = "one of: " + ", ".join(spec.choices)
    elif spec.type is tuple:  # ROS ranges apply to scalars only: say it in words
        d.additional_constraints = f"each value in [{spec.min}, {spec.max}]"
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
    ParameterDescriptor. Unknown names get a warning and are removed; a ``grid.*`` value is an
    error, since the grid belongs to the model description.

    Raises :class:`ConfigError` naming the parameter, value and allowed range.
    """
    ours = {p.name for p in PARAMS}
    given: dict[str, object] = {}
    for name in node.list_parameters([], 0).names:
        if name in ours:
            given[name] = node.get_parameter(name).value
            node.undeclare_parameter(name)
        elif name in GRID_SPECS:
            raise ConfigError(grid_is_model_property(name, node.get_parameter(name).value))
        elif not name.startswith(_FOREIGN_PARAMS):
            node.get_logger().warning(f"unknown parameter '{name}' ignored")
            node.undeclare_parameter(name)
    config = Config.from_flat(given)
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


class SparseDetectorNode(Node):
    def __init__(self, **kwargs):
        super().__init__(NODE_NAME, automatically_declare_parameters_from_overrides=True,
                         **kwargs)
        self.config = declare_config(self)
        cfg = self.config.node
        # The model description fixes the BEV grid and classes (ModelError, a ConfigError, for
        # an unreadable description or weights trained on another grid).
        self.model = load_description(self.config.model.path)
        self.device, warning = resolve_device(cfg.device)
        if warning:
            self.get_logger().warning(warning)
        self.pipeline = Pipeline(self.config, self.model, self.device)
        if not self.pipeline.detector.trained:
            self.get_logger().warning(
                f"model '{self.model.name}' ({self.model.source}) has no trained weights: the "
                "network runs with random weights, its boxes mean nothing")
        self.stats = FrameStats(STAGES)
        self._last_snapshot: dict | None = None
        self._last_log: dict[str, float] = {}

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
        self.create_subscription(PointCloud2, "input/points", self._on_cloud, qos)
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_timer(cfg.diagnostics_period, self._publish_diagnostics)
        g = self.model.grid
        self.get_logger().info(
            f"ready on {self.device}: model '{self.model.name}' ({self.model.source}), "
            f"grid {g.shape[0]}x{g.shape[1]} @ {g.resolution} m, "
            f"input '{self.resolve_topic_name('input/points')}' ({cfg.qos_reliability}, "
            f"depth {cfg.qos_depth})")

    # -- subscription side -------------------------------------------------------------
    def _on_cloud(self, msg: PointCloud2) -> None:
        self.stats.received()
        with self._cv:
            if self._mailbox is not None:
                self.stats.dropped()
            self._mailbox = msg
            self._cv.notify()

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

    def _process(self, msg: PointCloud2) -> None:
        try:
            stamp_ns = header_stamp_ns(msg.header)
            result = self.pipeline.process(msg)
        except CloudError as exc:
            self._reject(exc.kind, str(exc))
            return
        except Exception as exc:  # a bug must not kill the worker: count, log, go on
            self._reject("internal_error", f"{type(exc).__name__}: {exc}")
            return
        latency_ms = (self.get_clock().now().nanoseconds - stamp_ns) / 1e6
        self.stats.processed(result.points_received, result.points_kept, result.stage_ms,
                             latency_ms, active_fraction=result.active_fraction,
                             detections=len(result.detections), mask_mode=result.mask_mode,
                             mask_fallback=result.mask_fallback)

    def _reject(self, kind: str, reason: str) -> None:
        self.stats.rejected(kind, reason)
        now = time.monotonic()
        if now - self._last_log.get(kind, -1e9) >= self.config.node.log_throttle_sec:
            self._last_log[kind] = now
            self.get_logger().warning(f"rejected a point cloud ({kind}): {reason}")

    # -- diagnostics -------------------------------------------------------------------
    def _publish_diagnostics(self) -> None:
        snap = self.stats.snapshot()
        self._diag_pub.publish(diagnostics_msg(
            snap, device=str(self.device), stamp=self.get_clock().now().to_msg(),
            hardware_id=self.get_fully_qualified_name(), previous=self._last_snapshot))
        self._last_snapshot = snap

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._worker.join(timeout=5.0)


def main(args: list[str] | None = None) -> int:
    keep_freed_memory()  # the per-frame maps reuse heap memory instead of faulting in new pages
    rclpy.init(args=args)
    node = None
    try:
        node = SparseDetectorNode()
        rclpy.spin(node)
    except ConfigError as exc:
        print(f"[sparse_detector] invalid configuration: {exc}", file=sys.stderr, flush=True)
        return 2
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
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
