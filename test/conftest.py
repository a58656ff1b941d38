"""Test-wide settings. DDS discovery stays on this machine and on a domain of the tests' own,
set before anything imports rclpy."""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ.setdefault("ROS_DOMAIN_ID", str(60 + os.getpid() % 40))
# Loopback-only UDP plus shared memory sized for large clouds (see the file's comment).
os.environ.setdefault("FASTDDS_DEFAULT_PROFILES_FILE",
                      str(ROOT / "config" / "fastdds_local_large_data.xml"))
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
