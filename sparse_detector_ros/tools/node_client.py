"""Drive a running ``sparse_detector_node`` from outside, over real DDS: start the installed
executable as a subprocess, publish clouds (and odometry) to it, collect its /diagnostics and
outputs (objects, markers, mask), change its parameters through its parameter services. Used by
the demo and the tests. Callers set ``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST`` and a
``ROS_DOMAIN_ID`` (see :func:`local_dds_env`) before rclpy is initialised.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

NODE_EXECUTABLE = "sparse_detector_node"


def local_dds_env(domain_id: int | None = None) -> None:
    """Keep DDS on this machine and on its own domain (tests, demo, benchmarks), with the
    package's Fast DDS profile (loopback UDP + a shared-memory segment large enough for big
    clouds over best-effort QoS) unless the caller already chose a profile."""
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    if not os.environ.get("FASTDDS_DEFAULT_PROFILES_FILE"):
        from ..paths import find_share_file
        os.environ["FASTDDS_DEFAULT_PROFILES_FILE"] = str(
            find_share_file("config/fastdds_local_large_data.xml"))
    if domain_id is not None:
        os.environ["ROS_DOMAIN_ID"] = str(domain_id)
    else:
        os.environ.setdefault("ROS_DOMAIN_ID", str(100 + os.getpid() % 100))


def stamp_ns(stamp) -> int:
    """A ``builtin_interfaces/Time`` in nanoseconds."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def node_executable() -> str:
    """Path of the installed ``sparse_detector_node`` (next to this Python, else on PATH)."""
    here = Path(sys.executable).parent / NODE_EXECUTABLE
    if here.exists():
        return str(here)
    found = shutil.which(NODE_EXECUTABLE)
    if found is None:
        raise FileNotFoundError(f"{NODE_EXECUTABLE} is not installed (run scripts/setup.sh)")
    return found


class NodeProcess:
    """``sparse_detector_node --ros-args [--params-file F] [-p name:=value ...]`` as a child.

    Its stdout+stderr go to a temporary log file (:meth:`log`), so a chatty node never blocks
    on a full pipe.
    """

    def __init__(self, params_file: str | os.PathLike | None = None,
                 params: dict[str, object] | None = None, extra_args: list[str] | None = None):
        args = [node_executable(), "--ros-args"]
        if params_file is not None:
            args += ["--params-file", str(params_file)]
        for name, value in (params or {}).items():
            args += ["-p", f"{name}:={_ros_literal(value)}"]
        args += extra_args or []
        self.args = args
        self._log = tempfile.NamedTemporaryFile("w+", prefix="sparse_detector_node_",
                                                suffix=".log", delete=False)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        with open(self._log.name, encoding="utf-8", errors="replace") as f:
            return f.read()

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def interrupt(self, timeout: float = 15.0) -> int:
        """SIGINT (Ctrl-C) and wait; kills the process if it does not stop in time."""
        if self.alive():
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def close(self) -> None:
        if self.alive():
            try:
                self.interrupt(5.0)
            except subprocess.TimeoutExpired:
                pass
        self._log.close()
        os.unlink(self._log.name)


def _ros_literal(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class Probe:
    """An rclpy node in this process that publishes PointCloud2 to ``topic`` (and
    nav_msgs/Odometry to ``odometry_topic``) and records every ``/diagnostics`` status of the
    detector as a dict (``ros_io.diagnostics_to_dict``), and every message the detector
    publishes on ``output/objects`` (:attr:`objects`; only when vision_msgs imports, else the
    list stays empty), ``output/markers`` (:attr:`markers`) and ``output/mask``
    (:attr:`masks`); :attr:`arrivals` maps each objects message's header stamp [ns] to when it
    arrived [ns, the probe's clock] (latency = arrival - stamp). :meth:`set_parameters` calls
    the detector's parameter service.

    ``keep_messages=False`` (a benchmark): the outputs are still subscribed to (so the detector
    builds and sends them as it would for RViz) and the arrivals recorded, but no message is
    kept: a probe holding thousands of MarkerArrays makes its own garbage collections long, and
    its callbacks -- the arrival times -- late."""

    def __init__(self, topic: str = "input/points", reliable: bool = True, name: str = "probe",
                 odometry_topic: str = "input/odometry", node_name: str = "/sparse_detector",
                 keep_messages: bool = True):
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from nav_msgs.msg import OccupancyGrid, Odometry
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import PointCloud2
        from visualization_msgs.msg import MarkerArray

        from ..ros_io import diagnostics_to_dict, vision_msgs_error

        self._rclpy = rclpy
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node(name, context=self.context)
        qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE if reliable
                         else ReliabilityPolicy.BEST_EFFORT)
        self.pub = self.node.create_publisher(PointCloud2, topic, qos)
        self.odom_pub = self.node.create_publisher(Odometry, odometry_topic, qos)
        self.diagnostics: list[dict] = []
        self.objects: list = []
        self.arrivals: dict[int, int] = {}
        self.markers: list = []
        self.masks: list = []
        self.node_name = node_name
        self.keep_messages = bool(keep_messages)
        self._param_client = None

        def on_diag(msg):
            d = diagnostics_to_dict(msg)
            if d is not None:
                self.diagnostics.append(d)

        self.node.create_subscription(DiagnosticArray, "/diagnostics", on_diag, 10)
        self.has_objects = vision_msgs_error() is None
        if self.has_objects:
            from vision_msgs.msg import Detection3DArray
            self.node.create_subscription(Detection3DArray, "output/objects",
                                          self._on_objects, 10)
        self.node.create_subscription(MarkerArray, "output/markers", self._on_markers, 10)
        self.node.create_subscription(OccupancyGrid, "output/mask", self._on_mask, 10)
        self.executor = rclpy.executors.SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)

    def _on_objects(self, msg) -> None:
        self.arrivals.setdefault(stamp_ns(msg.header.stamp),
                                 self.node.get_clock().now().nanoseconds)
        if self.keep_messages:
            self.objects.append(msg)

    def _on_markers(self, msg) -> None:
        if self.keep_messages:
            self.markers.append(msg)

    def _on_mask(self, msg) -> None:
        if self.keep_messages:
            self.masks.append(msg)

    def spin_for(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.executor.spin_once(timeout_sec=min(0.05, max(0.0, end - time.monotonic())))

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate():
                return True
            self.executor.spin_once(timeout_sec=0.05)
        return predicate()

    def wait_for_subscriber(self, timeout: float = 30.0) -> bool:
        return self.wait_for(lambda: self.pub.get_subscription_count() > 0, timeout)

    def latest(self) -> dict | None:
        return self.diagnostics[-1] if self.diagnostics else None

    def wait_for_diag(self, predicate: Callable[[dict], bool], timeout: float) -> dict | None:
        """Wait until a diagnostics status satisfies ``predicate``; return it (or None)."""
        seen = [0]

        def check() -> bool:
            for d in self.diagnostics[seen[0]:]:
                seen[0] += 1
                if predicate(d):
                    check.hit = d
                    return True
            return False

        check.hit = None
        self.wait_for(check, timeout)
        return check.hit

    def wait_for_output(self, kind: str, stamp, timeout: float):
        """The first message of ``kind`` (``objects``, ``markers`` or ``masks``) whose header
        stamp equals ``stamp`` (for markers: the first marker's), waiting up to ``timeout`` s;
        None if none came."""
        msgs = getattr(self, kind)

        def key(m):
            h = m.markers[0].header if kind == "markers" and m.markers else \
                getattr(m, "header", None)
            return None if h is None else (h.stamp.sec, h.stamp.nanosec)

        want = (stamp.sec, stamp.nanosec)
        found = self.wait_for(lambda: any(key(m) == want for m in msgs), timeout)
        return next((m for m in msgs if key(m) == want), None) if found else None

    def now(self):
        """The probe's clock as a ``builtin_interfaces/Time``."""
        return self.node.get_clock().now().to_msg()

    def publish_odometry(self, x: float, y: float, yaw: float, stamp,
                         frame_id: str = "map", child_frame_id: str = "base_link") -> None:
        """Publish the pose ``(x, y, yaw)`` of the detection frame in ``frame_id``."""
        import math

        from nav_msgs.msg import Odometry

        msg = Odometry()
        msg.header.frame_id, msg.header.stamp = frame_id, stamp
        msg.child_frame_id = child_frame_id
        msg.pose.pose.position.x, msg.pose.pose.position.y = float(x), float(y)
        msg.pose.pose.orientation.z = math.sin(yaw / 2)
        msg.pose.pose.orientation.w = math.cos(yaw / 2)
        self.odom_pub.publish(msg)

    def set_parameters(self, values: dict[str, object], timeout: float = 20.0) -> list:
        """Set parameters of the detector node through its ``set_parameters`` service (one
        result per parameter, in order: ``SetParametersResult`` with ``successful`` and
        ``reason``). A tuple or list value is sent as a double array. Raises TimeoutError when
        the service does not answer."""
        from rclpy.parameter import Parameter
        from rclpy.parameter_client import AsyncParameterClient

        if self._param_client is None:
            self._param_client = AsyncParameterClient(self.node, self.node_name)
        if not self.wait_for(lambda: self._param_client.services_are_ready(), timeout):
            raise TimeoutError(f"parameter services of {self.node_name} not available")
        params = [Parameter(k, value=[float(x) for x in v] if isinstance(v, (list, tuple))
                            else v) for k, v in values.items()]
        future = self._param_client.set_parameters(params)
        self.executor.spin_until_future_complete(future, timeout_sec=timeout)
        if not future.done():
            raise TimeoutError(f"{self.node_name}/set_parameters did not answer in {timeout} s")
        return list(future.result().results)

    def publish(self, cloud, frame_id: str = "lidar", stamp=None) -> None:
        """Publish a ``pointcloud.CloudBuffer`` or a ready PointCloud2 message."""
        from sensor_msgs.msg import PointCloud2

        from ..ros_io import cloud_to_msg

        msg = cloud if isinstance(cloud, PointCloud2) else cloud_to_msg(cloud)
        msg.header.frame_id = frame_id
        msg.header.stamp = stamp if stamp is not None else self.node.get_clock().now().to_msg()
        self.pub.publish(msg)

    def close(self) -> None:
        self.executor.shutdown()
        self.node.destroy_node()
        self._rclpy.try_shutdown(context=self.context)
