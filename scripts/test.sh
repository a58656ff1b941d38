#!/usr/bin/env bash
# Set everything up (idempotent) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# DDS stays on this machine, on a domain of its own (see test/conftest.py for the DDS profile).
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
export ROS_DOMAIN_ID=${ROS_DOMAIN_ID:-$(( $$ % 100 + 1 ))}  # per run: parallel runs do not meet
# Lint first (ruff.toml: a small, explicit rule set), then the tests.
.venv/bin/ruff check --quiet .
exec .venv/bin/python -m pytest "$@"
