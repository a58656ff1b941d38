#!/usr/bin/env bash
# Set everything up (idempotent) and run the demo on the built-in synthetic data.
# Extra arguments go to `sparse-detector demo` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# DDS stays on this machine, on a domain of its own.
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
export ROS_DOMAIN_ID=${ROS_DOMAIN_ID:-$(( $$ % 100 + 1 ))}  # per run: parallel runs do not meet
exec .venv/bin/sparse-detector demo "$@"
