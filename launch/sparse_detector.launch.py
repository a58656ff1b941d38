"""Start sparse_detector_node (and optionally RViz) on a ROS 2 install.

    ros2 launch sparse_detector_ros sparse_detector.launch.py \
        input_topic:=/velodyne_points params_file:=/path/to/params.yaml rviz:=true

Arguments:
  params_file     ROS parameter file (default: the package's config/sparse_detector.yaml)
  namespace       namespace of the node and its topics (default: none)
  input_topic     PointCloud2 topic, remapped onto the node's input/points (default /points)
  odometry_topic  nav_msgs/Odometry topic for the map-prior mask, remapped onto
                  input/odometry (default /odom)
  use_sim_time    true when replaying a bag with /clock (ros2 bag play --clock)
  log_level       node log level (default info)
  rviz            also start RViz with config/sparse_detector.rviz (default false)
  fixed_frame     RViz fixed frame (default base_link; the cloud's frame if there is no TF)
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node


def generate_launch_description():
    share = get_package_share_directory("sparse_detector_ros")
    arg = LaunchConfiguration
    return LaunchDescription([
        DeclareLaunchArgument(
            "params_file", default_value=os.path.join(share, "config", "sparse_detector.yaml"),
            description="ROS parameter file for sparse_detector_node"),
        DeclareLaunchArgument("namespace", default_value="",
                              description="namespace of the node and its topics"),
        DeclareLaunchArgument("input_topic", default_value="/points",
                              description="PointCloud2 topic to detect objects in"),
        DeclareLaunchArgument("odometry_topic", default_value="/odom",
                              description="nav_msgs/Odometry topic (map-prior mask)"),
        DeclareLaunchArgument("use_sim_time", default_value="false",
                              description="use /clock (bag replay with --clock)"),
        DeclareLaunchArgument("log_level", default_value="info", description="node log level"),
        DeclareLaunchArgument("rviz", default_value="false",
                              description="start RViz with the package's configuration"),
        DeclareLaunchArgument("fixed_frame", default_value="base_link",
                              description="RViz fixed frame"),
        Node(
            package="sparse_detector_ros",
            executable="sparse_detector_node",
            name="sparse_detector",
            namespace=arg("namespace"),
            output="screen",
            parameters=[arg("params_file"), {"use_sim_time": arg("use_sim_time")}],
            remappings=[("input/points", arg("input_topic")),
                        ("input/odometry", arg("odometry_topic"))],
            arguments=["--ros-args", "--log-level", arg("log_level")],
        ),
        Node(
            package="rviz2",
            executable="rviz2",
            name="rviz2",
            condition=IfCondition(arg("rviz")),
            arguments=["-d", os.path.join(share, "config", "sparse_detector.rviz"),
                       "-f", arg("fixed_frame")],
            parameters=[{"use_sim_time": arg("use_sim_time")}],
        ),
    ])
