"""A real Prefect deployment path for tests, no mocks: `prefect server start` on a free port with its
own PREFECT_HOME, the process work pool, `prefect deploy --all` from prefect.yaml and a worker, all
started once per session (tests/flows/conftest.py) and stopped by PID afterwards.

The server's scheduler runs every second (PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS), so a
deployment with a short interval schedule gets its runs within seconds. The flow runs link their
artifacts to a `circuitflow serve` address chosen up front (CIRCUITFLOW_SERVE_URL)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[2]
PREFECT = [sys.executable, "-m", "prefect"]
"""The prefect CLI of the interpreter running the tests (whatever venv that is)."""
CIRCUITFLOW = [sys.executable, "-m", "flows.cli"]
POOL = "circuitflow"


class Deployed(NamedTuple):
    api: str
    base: Path
    env: dict[str, str]
    """Environment for CLI subprocesses: this API, this repository's code, the serve address."""
    serve_url: str
    """Where the tests start `circuitflow serve` (the runs' artifacts link there)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop(proc: subprocess.Popen, name: str) -> None:
    """SIGINT (the worker ignores a prompt SIGTERM), then SIGKILL if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.poll() is not None, f"{name} (pid {proc.pid}) did not stop"


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"prefect server exited:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"prefect server not healthy after {timeout} s:\n{log.read_text()[-3000:]}")


def server_env(base: Path, api: str, serve_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "PREFECT_HOME": str(base / "home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "1",
        "PREFECT_UI_ENABLED": "false",  # the API is enough here (docs/ has a screenshot of the UI)
        "CIRCUITFLOW_HOME": str(REPO),
        "CIRCUITFLOW_SERVE_URL": serve_url,
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
    }


def create_pool(api: str) -> None:
    """The process work pool, created through the API as the UI does (`prefect work-pool create
    circuitflow --type process` is the same call, after a CLI start-up)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=POOL, type="process", base_job_template=template))


def start(env: dict[str, str], argv: list[str], cwd: Path = REPO) -> subprocess.Popen:
    """Start a CLI command (see `finish`)."""
    return subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    output, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(proc.args)}:\n{output[-3000:]}"
    return output


def server_and_worker(base: Path):
    """Generator for the session fixture: yields a Deployed, stops everything by PID afterwards."""
    api = f"http://127.0.0.1:{free_port()}/api"
    env = server_env(base, api, f"http://127.0.0.1:{free_port()}")
    port = api.rsplit(":", 1)[1].split("/")[0]
    log = base / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen(
            [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", port], env=env, stdout=out, stderr=out
        )
    started = [(server, "prefect server")]
    try:
        wait_healthy(api, server, log)
        create_pool(api)
        deploy = start(env, [*PREFECT, "--no-prompt", "deploy", "--all"])
        started.append((deploy, "prefect deploy"))
        with open(base / "worker.log", "w") as out:  # it boots while the deployments are created
            worker = subprocess.Popen(
                [*PREFECT, "worker", "start", "--pool", POOL], env=env, cwd=base, stdout=out, stderr=out
            )
        started.append((worker, "prefect worker"))
        finish(deploy)
        yield Deployed(api, base, env, env["CIRCUITFLOW_SERVE_URL"])
    finally:
        for proc, name in reversed(started):
            stop(proc, name)
