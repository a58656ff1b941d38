"""rosbag2 (MCAP) export of simulated sequences through ``rosbags`` -- no ROS install needed.

One scene becomes one folder::

    <out>/scene_000/
        bag/                  rosbag2 folder: metadata.yaml + bag_0.mcap
        map.yaml, map.png     nav2 map_server pair of the scene's roads (frame ``map``)
        ground_truth.json     boxes per frame (sensor frame ``lidar``), ego poses, sensor

Topics in the bag (ROS 2 Humble/Jazzy message definitions):

========================  ================================  ==================================
``/points``               sensor_msgs/msg/PointCloud2       frame ``lidar``, chosen driver layout
``/odom``                 nav_msgs/msg/Odometry             ``map`` -> ``base_link``
``/tf``                   tf2_msgs/msg/TFMessage            ``map`` -> ``base_link``
``/tf_static``            tf2_msgs/msg/TFMessage            ``base_link`` -> ``lidar`` (latched)
``/ground_truth/markers`` visualization_msgs/msg/MarkerArray one CUBE per box, frame ``lidar``
========================  ================================  ==================================
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..pointcloud import encode
from .frames import Frame
from .lidar import LidarModel
from .world import Scene

TOPIC_POINTS = "/points"
TOPIC_ODOM = "/odom"
TOPIC_TF = "/tf"
TOPIC_TF_STATIC = "/tf_static"
TOPIC_MARKERS = "/ground_truth/markers"
LIDAR_FRAME, BASE_FRAME, MAP_FRAME = "lidar", "base_link", "map"
#: stamp of frame 0 of scene 0 [ns]; scene k starts k hours later
BASE_STAMP_NS = 1_700_000_000 * 10 ** 9
CLASS_RGBA = {"car": (0.9, 0.2, 0.2, 0.5), "pedestrian": (0.2, 0.5, 0.95, 0.5),
              "cyclist": (0.2, 0.8, 0.3, 0.5)}


def frame_stamp_ns(scene_index: int, frame: Frame) -> int:
    return BASE_STAMP_NS + scene_index * 3600 * 10 ** 9 + int(round(frame.stamp * 1e9))


def cloud_buffer(frame: Frame, layout: str, stamp_ns: int = 0):
    """The frame's points as a :class:`pointcloud.CloudBuffer` in a driver layout, with the
    driver's per-point fields filled from the caster (ring, firing time, range...).

    ``velodyne``/``xyzi``/``hesai``/``livox``: unorganised (height 1), points in firing
    order. ``ouster``: organised ``rings x columns`` image, missing returns as NaN points
    (``is_dense = False``)."""
    pts, lidar = frame.points, frame.lidar
    if layout in ("velodyne", "xyzi"):
        extra = {"ring": frame.ring, "time": frame.time} if layout == "velodyne" else None
        return encode(pts, layout, extra=extra)
    if layout == "hesai":
        stamps = stamp_ns * 1e-9 + frame.time.astype(np.float64)      # absolute [s]
        return encode(pts, layout, extra={"ring": frame.ring, "timestamp": stamps})
    if layout == "livox":
        return encode(pts, layout, extra={
            "line": (frame.ring.astype(np.int64) * 4 // lidar.beams).astype(np.uint8),
            "tag": np.zeros(len(pts), np.uint8),
            "timestamp": stamp_ns + frame.time.astype(np.float64) * 1e9})
    if layout == "ouster":
        B, W = lidar.shape
        grid = np.full((B, W, 4), np.nan, np.float32)
        ring = np.repeat(np.arange(B, dtype=np.uint16)[:, None], W, 1)
        col_t = np.sort(lidar.column_times())
        t_ns = np.repeat((col_t * 1e9).astype(np.uint32)[None, :], B, 0)
        rng_mm = np.zeros((B, W), np.uint32)
        refl = np.zeros((B, W), np.uint16)
        r, c = frame.ring.astype(np.int64), frame.column.astype(np.int64)
        grid[r, c] = pts
        rng_mm[r, c] = (np.linalg.norm(pts[:, :3], axis=1) * 1000).astype(np.uint32)
        refl[r, c] = np.clip(pts[:, 3], 0, 255).astype(np.uint16)
        return encode(grid.reshape(-1, 4), layout, height=B, is_dense=False, extra={
            "ring": ring.reshape(-1), "t": t_ns.reshape(-1), "range": rng_mm.reshape(-1),
            "reflectivity": refl.reshape(-1)})
    raise ValueError(f"unknown layout {layout!r}: choose velodyne, ouster, livox, hesai or xyzi")


def ground_truth_record(frame: Frame, stamp_ns: int) -> dict:
    ex, ey, ez, eyaw = (float(v) for v in frame.ego_pose)
    boxes = []
    for k in range(len(frame.boxes)):
        x, y, z, l, w, h, yaw = (round(float(v), 4) for v in frame.boxes[k])
        boxes.append(dict(id=int(frame.ids[k]), label=str(frame.labels[k]),
                          subtype=str(frame.subtypes[k]), x=x, y=y, z=z, length=l, width=w,
                          height=h, yaw=yaw, num_points=int(frame.num_points[k]),
                          velocity=[round(float(v), 4) for v in frame.velocities[k]]))
    return dict(index=frame.index, stamp_ns=stamp_ns, num_points=int(len(frame.points)),
                ego_pose=dict(x=ex, y=ey, z=ez, yaw=eyaw), boxes=boxes)


class _Msgs:
    """Builders of rosbags messages (ROS 2 Humble definitions)."""

    def __init__(self):
        from rosbags.typesys import Stores, get_typestore
        self.ts = get_typestore(Stores.ROS2_HUMBLE)
        self.T = self.ts.types

    def header(self, stamp_ns, frame_id):
        T = self.T
        return T["std_msgs/msg/Header"](
            stamp=T["builtin_interfaces/msg/Time"](sec=stamp_ns // 10 ** 9,
                                                   nanosec=stamp_ns % 10 ** 9),
            frame_id=frame_id)

    def quat(self, yaw):
        return self.T["geometry_msgs/msg/Quaternion"](x=0.0, y=0.0, z=float(np.sin(yaw / 2)),
                                                      w=float(np.cos(yaw / 2)))

    def vec(self, x, y, z, kind="geometry_msgs/msg/Vector3"):
        return self.T[kind](x=float(x), y=float(y), z=float(z))

    def cloud(self, buf, stamp_ns):
        T = self.T
        fields = [T["sensor_msgs/msg/PointField"](name=f.name, offset=f.offset,
                                                  datatype=f.datatype, count=f.count)
                  for f in buf.fields]
        return T["sensor_msgs/msg/PointCloud2"](
            header=self.header(stamp_ns, LIDAR_FRAME), height=buf.height, width=buf.width,
            fields=fields, is_bigendian=buf.is_bigendian, point_step=buf.point_step,
            row_step=buf.row_step, data=np.frombuffer(buf.data, np.uint8),
            is_dense=bool(buf.is_dense))

    def transform(self, stamp_ns, parent, child, x, y, z, yaw):
        T = self.T
        return T["geometry_msgs/msg/TransformStamped"](
            header=self.header(stamp_ns, parent), child_frame_id=child,
            transform=T["geometry_msgs/msg/Transform"](translation=self.vec(x, y, z),
                                                       rotation=self.quat(yaw)))

    def tf(self, transforms):
        return self.T["tf2_msgs/msg/TFMessage"](transforms=transforms)

    def odom(self, frame: Frame, stamp_ns):
        T = self.T
        ex, ey, ez, eyaw = frame.ego_pose
        vx, vy, wz = frame.ego_twist
        cov = np.diag([0.01, 0.01, 0.01, 1e-4, 1e-4, 1e-3]).reshape(-1).astype(np.float64)
        return T["nav_msgs/msg/Odometry"](
            header=self.header(stamp_ns, MAP_FRAME), child_frame_id=BASE_FRAME,
            pose=T["geometry_msgs/msg/PoseWithCovariance"](
                pose=T["geometry_msgs/msg/Pose"](position=self.vec(ex, ey, ez,
                                                                   "geometry_msgs/msg/Point"),
                                                 orientation=self.quat(eyaw)),
                covariance=cov),
            twist=T["geometry_msgs/msg/TwistWithCovariance"](
                twist=T["geometry_msgs/msg/Twist"](linear=self.vec(vx, vy, 0.0),
                                                   angular=self.vec(0.0, 0.0, wz)),
                covariance=cov.copy()))

    def marker(self, stamp_ns, ns, mid, mtype, action, pose=None, scale=(0, 0, 0),
               rgba=(0, 0, 0, 0), text=""):
        T = self.T
        pose = pose or T["geometry_msgs/msg/Pose"](
            position=self.vec(0, 0, 0, "geometry_msgs/msg/Point"), orientation=self.quat(0.0))
        return T["visualization_msgs/msg/Marker"](
            header=self.header(stamp_ns, LIDAR_FRAME), ns=ns, id=int(mid), type=mtype,
            action=action, pose=pose, scale=self.vec(*scale),
            color=T["std_msgs/msg/ColorRGBA"](r=rgba[0], g=rgba[1], b=rgba[2], a=rgba[3]),
            lifetime=T["builtin_interfaces/msg/Duration"](sec=0, nanosec=0),
            frame_locked=False, points=[], colors=[], texture_resource="",
            texture=T["sensor_msgs/msg/CompressedImage"](
                header=self.header(0, ""), format="", data=np.zeros(0, np.uint8)),
            uv_coordinates=[], text=text, mesh_resource="",
            mesh_file=T["visualization_msgs/msg/MeshFile"](filename="",
                                                           data=np.zeros(0, np.uint8)),
            mesh_use_embedded_materials=False)

    def markers(self, frame: Frame, stamp_ns):
        M = self.T["visualization_msgs/msg/Marker"]
        out = [self.marker(stamp_ns, "", 0, M.CUBE, M.DELETEALL)]
        for k in range(len(frame.boxes)):
            x, y, z, l, w, h, yaw = (float(v) for v in frame.boxes[k])
            pose = self.T["geometry_msgs/msg/Pose"](
                position=self.vec(x, y, z, "geometry_msgs/msg/Point"), orientation=self.quat(yaw))
            label = str(frame.labels[k])
            out.append(self.marker(stamp_ns, label, frame.ids[k], M.CUBE, M.ADD, pose,
                                   (l, w, h), CLASS_RGBA.get(label, (1, 1, 1, 0.5)),
                                   text=f"{frame.subtypes[k]} {int(frame.num_points[k])} pts"))
        return self.T["visualization_msgs/msg/MarkerArray"](markers=out)


def write_scene(scene: Scene, lidar: LidarModel, out_dir, *, frames: int, layout: str = "velodyne",
                scene_index: int = 0, progress=None) -> Path:
    """Render ``frames`` frames of ``scene`` and write bag, map and ground truth under
    ``out_dir`` (created; must not hold a bag yet). ``progress`` is called once per frame."""
    from rosbags.interfaces import (Qos, QosDurability, QosHistory, QosLiveliness,
                                    QosReliability, QosTime)
    from rosbags.rosbag2 import StoragePlugin, Writer

    from .frames import render_frame

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scene.roadmap().save(out_dir / "map.yaml")
    m = _Msgs()
    ts = m.ts
    zero = QosTime(sec=0, nsec=0)
    latched = Qos(QosHistory.KEEP_LAST, 1, QosReliability.RELIABLE, QosDurability.TRANSIENT_LOCAL,
                  zero, zero, QosLiveliness.AUTOMATIC, zero, False)
    records = []
    with Writer(out_dir / "bag", version=9, storage_plugin=StoragePlugin.MCAP) as w:
        c_pts = w.add_connection(TOPIC_POINTS, "sensor_msgs/msg/PointCloud2", typestore=ts)
        c_odom = w.add_connection(TOPIC_ODOM, "nav_msgs/msg/Odometry", typestore=ts)
        c_tf = w.add_connection(TOPIC_TF, "tf2_msgs/msg/TFMessage", typestore=ts)
        c_tfs = w.add_connection(TOPIC_TF_STATIC, "tf2_msgs/msg/TFMessage", typestore=ts,
                                 offered_qos_profiles=[latched])
        c_mk = w.add_connection(TOPIC_MARKERS, "visualization_msgs/msg/MarkerArray", typestore=ts)

        def put(conn, stamp, msg, msgtype):
            w.write(conn, stamp, ts.serialize_cdr(msg, msgtype))

        for i in range(frames):
            frame = render_frame(scene, lidar, i)
            stamp = frame_stamp_ns(scene_index, frame)
            if i == 0:
                put(c_tfs, stamp, m.tf([m.transform(stamp, BASE_FRAME, LIDAR_FRAME, 0.0, 0.0,
                                                    lidar.mount_height, 0.0)]),
                    "tf2_msgs/msg/TFMessage")
            ex, ey, ez, eyaw = frame.ego_pose
            put(c_tf, stamp, m.tf([m.transform(stamp, MAP_FRAME, BASE_FRAME, ex, ey, ez, eyaw)]),
                "tf2_msgs/msg/TFMessage")
            put(c_odom, stamp, m.odom(frame, stamp), "nav_msgs/msg/Odometry")
            put(c_pts, stamp, m.cloud(cloud_buffer(frame, layout, stamp), stamp),
                "sensor_msgs/msg/PointCloud2")
            put(c_mk, stamp, m.markers(frame, stamp), "visualization_msgs/msg/MarkerArray")
            records.append(ground_truth_record(frame, stamp))
            if progress is not None:
                progress()
    meta = dict(
        scene_seed=scene.seed, layout=layout, frame_id=LIDAR_FRAME, base_frame=BASE_FRAME,
        map_frame=MAP_FRAME, rate_hz=10.0,
        box_convention="x, y, z (box centre), length, width, height, yaw; sensor frame",
        lidar=dict(preset=lidar.name, beams=lidar.beams, columns=lidar.columns,
                   max_range=lidar.max_range, mount_height=lidar.mount_height,
                   elevations_deg=[round(float(np.rad2deg(e)), 4) for e in lidar.elevations]),
        topics=dict(points=TOPIC_POINTS, odom=TOPIC_ODOM, markers=TOPIC_MARKERS),
        frames=records)
    (out_dir / "ground_truth.json").write_text(json.dumps(meta, indent=1))
    return out_dir
