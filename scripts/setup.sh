#!/usr/bin/env bash
# Create .venv and install everything the project needs (idempotent; seconds when up to date).
#   bash scripts/setup.sh          runtime + test dependencies
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "setup: need Python >= 3.11 as '$PY' (set PYTHON=...)" >&2; exit 1
fi

# System packages: venv support and a C++ compiler (kernel emulation tests). Install only if missing.
need_apt=()
"$PY" -c 'import ensurepip' 2>/dev/null || need_apt+=("python3-venv")
command -v g++ >/dev/null || need_apt+=("g++")
command -v cmake >/dev/null || need_apt+=("cmake")  # the vision_msgs interface build
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
  else
    echo "setup: please install: ${need_apt[*]} (e.g. sudo apt-get install ${need_apt[*]})" >&2; exit 1
  fi
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.sparse_detector_stamp
want=$(cat requirements.txt requirements-test.txt setup.py setup.cfg package.xml | sha256sum | cut -d' ' -f1)
# Re-install when the dependency files changed, or when the package does not import (e.g. a
# fresh checkout of a moved tree).
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || \
   ! (cd / && "$root/.venv/bin/python" -c 'import sparse_detector_ros' 2>/dev/null); then
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-test.txt
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
  echo "$want" > "$stamp"
fi
bash scripts/build_vision_msgs.sh  # vision_msgs interfaces into .venv (skips when built)
echo "setup: .venv ready"
