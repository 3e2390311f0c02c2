"""Shared test set-up: offline Prefect settings, one test harness per session, few torch threads."""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("CIRCUITFLOW_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def prefect_harness():
    """A throw-away Prefect API for tests that run flows or tasks (about 10 s once per session)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
