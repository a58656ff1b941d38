"""sparse_detector_ros: real-time 3D object detection in LiDAR point clouds with tiling-based
sparse convolution (SBNet). The ROS-free core lives in this package's modules; only
``node.py`` and ``ros_io.py`` import rclpy."""

__version__ = "0.1.0"
