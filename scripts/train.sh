#!/usr/bin/env bash
# The main job, on a fresh machine: installs what it needs, then a short Hydra training run on the digits data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python experiments/train.py "$@"
