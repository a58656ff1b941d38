"""Start sparse_detector_node on a ROS 2 install.

    ros2 launch sparse_detector_ros sparse_detector.launch.py \
        input_topic:=/velodyne_points params_file:=/path/to/params.yaml

Arguments: ``input_topic`` (PointCloud2 topic remapped onto the node's ``input/points``),
``params_file`` (ROS parameter file; default: the package's config/sparse_detector.yaml),
``use_sim_time`` (true when replaying a rosbag with --clock), ``log_level``.
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node


def generate_launch_description():
    share = get_package_share_directory("sparse_detector_ros")
    return LaunchDescription([
        DeclareLaunchArgument("input_topic", default_value="/points",
                              description="PointCloud2 topic to detect objects in"),
        DeclareLaunchArgument("params_file",
                              default_value=os.path.join(share, "config", "sparse_detector.yaml"),
                              description="ROS parameter file for sparse_detector_node"),
        DeclareLaunchArgument("use_sim_time", default_value="false",
                              description="use /clock (rosbag replay with --clock)"),
        DeclareLaunchArgument("log_level", default_value="info", description="node log level"),
        Node(
            package="sparse_detector_ros",
            executable="sparse_detector_node",
            name="sparse_detector",
            output="screen",
            parameters=[LaunchConfiguration("params_file"),
                        {"use_sim_time": LaunchConfiguration("use_sim_time")}],
            remappings=[("input/points", LaunchConfiguration("input_topic"))],
            arguments=["--ros-args", "--log-level", LaunchConfiguration("log_level")],
        ),
    ])
