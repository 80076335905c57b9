#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs the demo on embedded defaults:
# no downloads, no GPU needed.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
exec .venv/bin/python examples/demo.py "$@"
