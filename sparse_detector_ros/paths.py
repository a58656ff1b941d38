"""Where the package's shared files (config/, launch/, kernels/) are: a source checkout, a
colcon/ament install (``share/sparse_detector_ros``) or a pip install (``sys.prefix/share``)."""
from __future__ import annotations

import sys
from pathlib import Path

PACKAGE = "sparse_detector_ros"


def source_root() -> Path:
    """Root of a source checkout (or an editable install): the folder above this package."""
    return Path(__file__).resolve().parents[1]


def installed_share_dirs() -> list[Path]:
    """``share/sparse_detector_ros`` of an install: ament's share directory when
    ``ament_index_python`` knows the package, then ``sys.prefix/share/sparse_detector_ros``."""
    dirs = []
    try:
        from ament_index_python.packages import get_package_share_directory
        dirs.append(Path(get_package_share_directory(PACKAGE)))
    except Exception:  # not installed with ament, or no ament_index_python at all
        pass
    dirs.append(Path(sys.prefix) / "share" / PACKAGE)
    return dirs


def share_dirs() -> list[Path]:
    """Candidate roots, most specific first: the source tree, then the installed ones."""
    return [source_root(), *installed_share_dirs()]


def find_share_file(relative: str) -> Path:
    """First existing ``<root>/<relative>`` over :func:`share_dirs`; FileNotFoundError naming
    every place searched otherwise."""
    tried = []
    for root in share_dirs():
        path = root / relative
        if path.exists():
            return path
        tried.append(str(path))
    raise FileNotFoundError(f"{relative} not found in: " + ", ".join(tried))
