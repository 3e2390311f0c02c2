"""The `circuitflow` process sets torch's OpenMP threads to sleep between parallel regions (flows/__init__.py)
before torch loads, unless the environment says otherwise."""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = "import flows, torch, os; print(os.environ['OMP_WAIT_POLICY'])"


def _policy(env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_flows_import_sets_a_passive_wait_policy_and_the_environment_wins() -> None:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    assert _policy(env) == "PASSIVE"
    assert _policy({**env, "OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE"
