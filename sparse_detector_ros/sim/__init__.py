"""Synthetic LiDAR world: seeded street scenes, a vectorised spinning-LiDAR ray caster,
exact ground truth, nav2 road maps, ego drives at 10 Hz, rosbag2 export and a torch Dataset.

ROS-free (numpy; torch only for :mod:`.dataset`; ``rosbags`` only for :mod:`.export`)::

    from sparse_detector_ros.sim import generate_scene, get_lidar, render_frame
    scene = generate_scene(seed=0, duration=5.0)          # 51 frames at 10 Hz
    frame = render_frame(scene, get_lidar("hdl64e"), 0)  # points, boxes, pose, labels
"""
from .frames import Frame, count_points_in_boxes, points_in_boxes, render_frame
from .lidar import DEFAULT_PRESET, PRESETS, LidarModel, get_lidar
from .roadmap import RoadMap, load_map, map_in_sensor_frame
from .world import CLASSES, FRAME_RATE, Actor, Scene, generate_scene

__all__ = ["Frame", "render_frame", "points_in_boxes", "count_points_in_boxes", "LidarModel",
           "PRESETS", "DEFAULT_PRESET", "get_lidar", "RoadMap", "load_map",
           "map_in_sensor_frame", "CLASSES", "FRAME_RATE", "Actor", "Scene", "generate_scene"]
