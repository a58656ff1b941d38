"""The ROS 2 package as users get it: metadata, `colcon build` install layout, the installed
node starting and stopping cleanly, the CLI and the launch file."""
import ast
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def test_package_xml_is_format3_ament_python_with_declared_dependencies():
    root = ET.parse(ROOT / "package.xml").getroot()
    assert root.tag == "package" and root.get("format") == "3"
    assert root.findtext("name") == "sparse_detector_ros"
    assert root.find("export/build_type").text == "ament_python"
    exec_deps = {e.text for e in root.findall("exec_depend")}
    assert {"rclpy", "sensor_msgs", "std_msgs", "geometry_msgs", "nav_msgs",
            "visualization_msgs", "diagnostic_msgs", "vision_msgs", "tf2_ros", "python3-numpy",
            "python3-yaml", "python3-torch"} <= exec_deps
    assert len(exec_deps) == len(root.findall("exec_depend"))  # no key twice
    assert "python3-pytest" in {e.text for e in root.findall("test_depend")}
    assert (ROOT / "resource" / "sparse_detector_ros").exists()


# ROS packages and Python libraries the code imports -> the package.xml key that provides them.
_ROSDEP_KEYS = {"numpy": "python3-numpy", "yaml": "python3-yaml", "torch": "python3-torch",
                "PIL": "python3-pil", "shapely": "python3-shapely", "tqdm": "python3-tqdm",
                "matplotlib": "python3-matplotlib", "hypothesis": "python3-hypothesis"}
_ROS = re.compile(r"^(rclpy|rcl_interfaces|[a-z0-9_]+_msgs|tf2_ros|launch|launch_ros|"
                  r"ament_index_python)$")
_NOT_ROSDEP = {"builtin_interfaces", "cupy", "rosbags"}  # with rclpy / optional / pip only


def test_every_import_of_the_code_is_declared_in_package_xml():
    root = ET.parse(ROOT / "package.xml").getroot()
    declared = {e.text for e in root.findall("exec_depend")}
    std = set(sys.stdlib_module_names) | {"sparse_detector_ros", "setuptools"}
    missing = set()
    for path in [*(ROOT / "sparse_detector_ros").rglob("*.py"), *(ROOT / "launch").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for top in (n.split(".")[0] for n in names):
                if top in std or top in _NOT_ROSDEP:
                    continue
                key = top if _ROS.match(top) else _ROSDEP_KEYS.get(top, f"<no key for {top}>")
                if key not in declared:
                    missing.add(f"{top} ({path.relative_to(ROOT)})")
    assert not missing, f"imported but not declared in package.xml: {sorted(missing)}"


def test_cli_help_lists_subcommands():
    out = subprocess.run([str(VENV_BIN / "sparse-detector"), "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for cmd in ("bench", "sim", "demo"):
        assert cmd in out.stdout
    out = subprocess.run([str(VENV_BIN / "sparse-detector"), "bench", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "decode" in out.stdout and "sparse" in out.stdout


def test_bench_decode_prints_json():
    import json
    out = subprocess.run([str(VENV_BIN / "sparse-detector"), "bench", "decode", "--repeats", "2",
                          "--sizes", "3000", "--layouts", "velodyne", "ouster"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert {r["layout"] for r in data["rows"]} == {"velodyne", "ouster"}
    for row in data["rows"]:
        assert row["points"] == 3000
        for key in ("decode_ms", "decode_not_dense_ms", "rasterize_ms"):
            assert isinstance(row[key], float) and row[key] > 0, (key, row)


@pytest.fixture(scope="module")
def colcon_install():
    """`colcon build` of a copy of the package in a temporary workspace."""
    colcon = VENV_BIN / "colcon"
    assert colcon.exists(), "colcon is missing: scripts/setup.sh installs colcon-common-extensions"
    ws = Path(tempfile.mkdtemp(prefix="sparse_detector_ws_"))
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    pkg = ws / "src" / "sparse_detector_ros"
    for rel in files:
        if (ROOT / rel).is_file():
            (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, pkg / rel)
    env = dict(os.environ, PATH=f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}")
    res = subprocess.run([str(colcon), "build", "--event-handlers", "console_direct-"],
                         cwd=ws, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    yield ws / "install" / "sparse_detector_ros"
    shutil.rmtree(ws, ignore_errors=True)


def test_colcon_build_installs_share_files(colcon_install):
    share = colcon_install / "share" / "sparse_detector_ros"
    assert (share / "package.xml").is_file()
    assert (share / "launch" / "sparse_detector.launch.py").is_file()
    assert (share / "config" / "sparse_detector.yaml").is_file()
    assert (share / "config" / "fastdds_local_large_data.xml").is_file()
    assert any((share / "kernels").glob("*.cu"))
    assert (share / "models" / "default" / "model.yaml").is_file()
    marker = (colcon_install / "share" / "ament_index" / "resource_index" / "packages"
              / "sparse_detector_ros")
    assert marker.exists()


def test_colcon_installed_node_starts_and_stops_cleanly(colcon_install):
    exe = colcon_install / "lib" / "sparse_detector_ros" / "sparse_detector_node"
    assert exe.is_file()
    site = next(colcon_install.glob("lib/python3*/site-packages"))
    env = dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               AMENT_PREFIX_PATH=str(colcon_install), PYTHONUNBUFFERED="1")
    share = colcon_install / "share" / "sparse_detector_ros"
    params = share / "config" / "sparse_detector.yaml"
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([sys.executable, str(exe), "--ros-args", "--params-file",
                                 str(params)], stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 60
            text = ""
            while time.monotonic() < deadline and proc.poll() is None:
                log.seek(0)
                text = log.read()
                if "ready on" in text:
                    break
                time.sleep(0.2)
            assert "ready on" in text, text
            # the model description shipped in the installed share dir
            assert f"({share / 'models' / 'default' / 'model.yaml'})" in text, text
            proc.send_signal(2)  # SIGINT
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    # It ran the installed copy, not the source tree.
    out = subprocess.run([sys.executable, "-c",
                          "import sparse_detector_ros as p; print(p.__file__)"],
                         env=env, capture_output=True, text=True, cwd=tempfile.gettempdir())
    assert str(site) in out.stdout, out.stdout + out.stderr
