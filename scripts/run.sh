#!/usr/bin/env bash
# Set everything up in .venv and run Krasis non-interactively. With no --model-path it writes a small
# random-weight demo model to ~/.krasis/models/ and generates from it. Arguments go to `krasis`.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -e .
exec .venv/bin/krasis --non-interactive "$@"
