"""The launch file and the RViz configuration. `launch`/`launch_ros` are not on PyPI, so the
launch file runs here against small recording stand-ins of the few classes it uses: what it
declares, which executable it starts with which remappings and parameters, and that every
file and topic it names exists."""
from __future__ import annotations

import importlib.util
import re
import sys
import types
from pathlib import Path

import pytest
import yaml

from sparse_detector_ros.config import NODE_NAME

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch" / "sparse_detector.launch.py"
RVIZ = ROOT / "config" / "sparse_detector.rviz"
ARGS = {"params_file", "namespace", "input_topic", "odometry_topic", "use_sim_time",
        "log_level", "rviz", "fixed_frame"}


class _Recorder:
    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


class LaunchConfiguration(_Recorder):
    used: set[str] = set()

    def __init__(self, name, **kwargs):
        super().__init__(name, **kwargs)
        self.name = name
        LaunchConfiguration.used.add(name)


@pytest.fixture
def launched(monkeypatch):
    """generate_launch_description() run with stand-in launch modules."""
    mods = {name: types.ModuleType(name) for name in (
        "launch", "launch.actions", "launch.conditions", "launch.substitutions", "launch_ros",
        "launch_ros.actions", "ament_index_python", "ament_index_python.packages")}
    mods["launch"].LaunchDescription = lambda entities: list(entities)
    mods["launch.actions"].DeclareLaunchArgument = type("DeclareLaunchArgument", (_Recorder,), {})
    mods["launch.conditions"].IfCondition = type("IfCondition", (_Recorder,), {})
    mods["launch.substitutions"].LaunchConfiguration = LaunchConfiguration
    mods["launch_ros.actions"].Node = type("Node", (_Recorder,), {})
    mods["ament_index_python.packages"].get_package_share_directory = (
        lambda pkg: str(ROOT) if pkg == "sparse_detector_ros" else pytest.fail(pkg))
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    LaunchConfiguration.used = set()
    spec = importlib.util.spec_from_file_location("sparse_detector_launch", LAUNCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    entities = module.generate_launch_description()
    declared = {e.args[0]: e.kwargs for e in entities
                if type(e).__name__ == "DeclareLaunchArgument"}
    nodes = {e.kwargs["executable"]: e.kwargs for e in entities if type(e).__name__ == "Node"}
    return declared, nodes


def _node_topics(kind: str) -> set[str]:
    """Topic names the node passes to create_subscription / create_publisher."""
    src = (ROOT / "sparse_detector_ros" / "node.py").read_text()
    return set(re.findall(rf"create_{kind}\(\s*\w+,\s*\"([^\"]+)\"", src))


def test_launch_declares_the_documented_arguments_and_uses_only_those(launched):
    declared, _ = launched
    assert set(declared) == ARGS
    assert all(kw.get("description") for kw in declared.values())
    assert LaunchConfiguration.used <= set(declared)
    readme = (ROOT / "README.md").read_text()
    for name in ARGS:  # documented for users
        assert f"`{name}`" in readme, name


def test_launch_starts_the_installed_node_with_its_parameter_file_and_remappings(launched):
    declared, nodes = launched
    node = nodes["sparse_detector_node"]
    assert node["package"] == "sparse_detector_ros" and node["name"] == NODE_NAME
    setup = (ROOT / "setup.py").read_text()
    assert "sparse_detector_node = sparse_detector_ros.node:main" in setup
    params_default = Path(declared["params_file"]["default_value"])
    assert params_default == ROOT / "config" / "sparse_detector.yaml"
    assert node["parameters"][0].name == "params_file"
    assert node["parameters"][1]["use_sim_time"].name == "use_sim_time"
    assert node["namespace"].name == "namespace"
    remapped = {src: dst.name for src, dst in node["remappings"]}
    assert remapped == {"input/points": "input_topic", "input/odometry": "odometry_topic"}
    assert set(remapped) <= _node_topics("subscription")
    assert node["arguments"][-1].name == "log_level"


def test_launch_starts_rviz_only_on_request_with_the_package_config(launched):
    declared, nodes = launched
    rviz = nodes["rviz2"]
    assert rviz["condition"].args[0].name == "rviz" and declared["rviz"]["default_value"] == "false"
    d = rviz["arguments"].index("-d")
    assert Path(rviz["arguments"][d + 1]) == RVIZ
    f = rviz["arguments"].index("-f")
    assert rviz["arguments"][f + 1].name == "fixed_frame"


def test_rviz_config_shows_cloud_boxes_and_mask_on_the_node_topics():
    cfg = yaml.safe_load(RVIZ.read_text())
    displays = {d["Class"]: d for d in cfg["Visualization Manager"]["Displays"]}
    published = {"/" + t for t in _node_topics("publisher")}
    assert displays["rviz_default_plugins/MarkerArray"]["Topic"]["Value"] in published
    assert displays["rviz_default_plugins/Map"]["Topic"]["Value"] in published
    cloud = displays["rviz_default_plugins/PointCloud2"]["Topic"]
    assert cloud["Reliability Policy"] == "Best Effort"  # sees sensor-data QoS drivers
    launch_src = LAUNCH.read_text()
    assert f'default_value="{cloud["Value"]}"' in launch_src  # the launch's default input topic
    assert cfg["Visualization Manager"]["Global Options"]["Fixed Frame"] == "base_link"


def test_colcon_installs_the_rviz_config():
    setup = (ROOT / "setup.py").read_text()
    assert 'glob("config/*.rviz")' in setup
