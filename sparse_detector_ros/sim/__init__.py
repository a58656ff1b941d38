"""Synthetic LiDAR world: seeded street scenes, a vectorised spinning-LiDAR ray caster,
exact ground truth, nav2 road maps, ego drives at 10 Hz, rosbag2 export and a torch Dataset.

ROS-free (numpy; torch only for :mod:`.dataset`; ``rosbags`` only for :mod:`.export`)::

    from sparse_detector_ros.sim import generate_scene, get_lidar, render_frame
    scene = generate_scene(seed=0, duration=5.0)          # 51 frames at 10 Hz
    frame = render_frame(scene, get_lidar("hdl64e"), 0)  # points, boxes, pose, labels
"""
from .frames import Frame, render_frame
from .lidar import DEFAULT_PRESET, PRESETS, LidarModel, get_lidar
from .roadmap import RoadMap
from .world import CLASSES, FRAME_RATE, Actor, Scene, generate_scene

__all__ = ["Frame", "render_frame", "LidarModel", "PRESETS", "DEFAULT_PRESET", "get_lidar",
           "RoadMap", "CLASSES", "FRAME_RATE", "Actor", "Scene", "generate_scene"]
