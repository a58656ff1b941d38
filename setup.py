"""ament_python package set-up: `colcon build` on a ROS 2 install, `pip install .` elsewhere."""
import os
from glob import glob

from setuptools import find_packages, setup

package_name = "sparse_detector_ros"

setup(
    name=package_name,
    version="0.1.0",
    packages=find_packages(exclude=["test", "test.*"]),
    data_files=[
        ("share/ament_index/resource_index/packages", ["resource/" + package_name]),
        ("share/" + package_name, ["package.xml"]),
        ("share/" + package_name + "/launch", glob("launch/*.launch.py")),
        ("share/" + package_name + "/config",
         glob("config/*.yaml") + glob("config/*.xml") + glob("config/*.rviz")),
        ("share/" + package_name + "/kernels", glob("kernels/*.cu")),
        ("share/" + package_name + "/interfaces/vision_msgs/msg",
         glob("interfaces/vision_msgs/msg/*.msg")),
    ] + [  # shipped models: models/<name>/ (model.yaml, weights, card)
        ("share/" + package_name + "/" + d, sorted(glob(d + "/*.*")))
        for d in sorted(glob("models/*")) if os.path.isdir(d)
    ],
    install_requires=["setuptools"],
    zip_safe=True,
    maintainer="sparse_detector_ros maintainers",
    maintainer_email="maintainers@sparse-detector-ros.invalid",
    description="Real-time sparse (SBNet-style) 3D object detection for LiDAR point clouds.",
    license="Apache-2.0",
    extras_require={"cuda12": ["cupy-cuda12x"], "cuda13": ["cupy-cuda13x"]},
    entry_points={
        "console_scripts": [
            "sparse_detector_node = sparse_detector_ros.node:main",
            "sparse-detector = sparse_detector_ros.cli:main",
        ],
    },
)
