"""``vision_msgs`` message types for ``rosbags``, from the project's own ``.msg`` files.

``rosbags`` typestores know the core ROS 2 interfaces but not ``vision_msgs``. The bag tools
read and write ``vision_msgs/msg/Detection3DArray`` (what the node publishes on
``output/objects``), so :func:`register_vision_msgs` teaches a typestore the five messages of
``interfaces/vision_msgs/msg`` -- the same definitions the ROS 2 interface package is built
from (``scripts/build_vision_msgs.sh``), so both sides agree on the CDR bytes.

The ``.msg`` files are found next to the package in a source checkout
(``<checkout>/interfaces/vision_msgs/msg``) and, when installed, in
``share/sparse_detector_ros/interfaces/vision_msgs/msg`` (see :mod:`sparse_detector_ros.paths`).
ROS-free: needs ``rosbags`` only.
"""
from __future__ import annotations

from pathlib import Path

from ..paths import find_share_file

PACKAGE = "vision_msgs"
#: relative location of the ``.msg`` files below a share root (checkout or install)
MSG_DIR = "interfaces/vision_msgs/msg"
#: the messages of the interface package, dependencies first
MESSAGES = ("ObjectHypothesis", "ObjectHypothesisWithPose", "BoundingBox3D", "Detection3D",
            "Detection3DArray")


def msg_dir() -> Path:
    """Folder holding ``<Name>.msg`` of every name in :data:`MESSAGES`; FileNotFoundError
    naming the places searched when there is none."""
    return find_share_file(MSG_DIR)


def vision_msgs_definitions(directory: Path | str | None = None) -> dict[str, str]:
    """``{"vision_msgs/msg/<Name>": msg text}`` for every name in :data:`MESSAGES`, read from
    ``directory`` (default :func:`msg_dir`). FileNotFoundError naming a missing file."""
    root = Path(directory) if directory is not None else msg_dir()
    defs = {}
    for name in MESSAGES:
        path = root / f"{name}.msg"
        if not path.is_file():
            raise FileNotFoundError(f"vision_msgs definition {path} is missing")
        defs[f"{PACKAGE}/msg/{name}"] = path.read_text()
    return defs


def register_vision_msgs(typestore, directory: Path | str | None = None) -> list[str]:
    """Register the ``vision_msgs`` messages into a ``rosbags`` ``Typestore`` (in place).

    Afterwards ``typestore.types["vision_msgs/msg/Detection3DArray"]`` builds messages and
    ``typestore.serialize_cdr`` / ``deserialize_cdr`` read and write them. Registering twice is
    harmless; a typestore that already holds a different ``vision_msgs`` definition raises
    ``rosbags.typesys.TypesysError`` naming the type. Returns the registered type names.
    """
    from rosbags.typesys import get_types_from_msg

    types = {}
    for name, text in vision_msgs_definitions(directory).items():
        types.update(get_types_from_msg(text, name))
    typestore.register(types)
    return list(types)
