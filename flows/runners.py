"""Where the pipeline's tasks run: threads on one machine, a Dask cluster or Ray, chosen by the
config's `runner` section. The flows carry a `ConfiguredTaskRunner` that starts the chosen runner
once the flow has read its config, so deployments and the CLI pick runners the same way.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from typing import Any

from prefect.context import FlowRunContext
from prefect.futures import PrefectFuture
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from core.config import ConfigError, RunnerConfig

CORE_LOGGER = "core"
"""Loggers under this name (core.*) are forwarded to Prefect's run logs."""


def build_task_runner(runner: RunnerConfig) -> TaskRunner:
    """A fresh (unstarted) Prefect task runner for the config's `runner` section."""
    if runner.kind == "threads":
        return ThreadPoolTaskRunner(max_workers=runner.max_workers)
    if runner.kind == "dask":
        return _dask_runner(runner)
    return _ray_runner(runner)


def _dask_runner(runner: RunnerConfig) -> TaskRunner:
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise ConfigError(
            "runner.kind: dask needs prefect-dask and distributed; install them with "
            "`pip install 'circuitflow[dask]'` or choose runner.kind: threads"
        ) from None
    if runner.address:
        return DaskTaskRunner(address=runner.address)
    logging.getLogger("distributed").setLevel(logging.WARNING)  # a local cluster's chatter stays out of run logs
    cluster = {
        "n_workers": runner.max_workers,
        "threads_per_worker": 1,
        "processes": True,
        "dashboard_address": None,
        "env": {
            "OMP_NUM_THREADS": str(runner.torch_threads),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
        },
    }
    return DaskTaskRunner(cluster_kwargs=cluster)


def _ray_runner(runner: RunnerConfig) -> TaskRunner:
    try:
        from prefect_ray import RayTaskRunner
    except ImportError:
        raise ConfigError(
            "runner.kind: ray needs prefect-ray; install it with `pip install 'circuitflow[ray]'` "
            "or choose runner.kind: threads"
        ) from None
    if runner.address:
        return RayTaskRunner(address=runner.address)
    return RayTaskRunner(init_kwargs={"num_cpus": runner.max_workers, "include_dashboard": False})


class ConfiguredTaskRunner(TaskRunner[PrefectFuture[Any]]):
    """A task runner that delegates to the one a config selects (`configure`), threads if none was set.

    Prefect builds a flow's task runner before the flow body runs, but the body is what reads the
    config; this runner bridges the two and starts the real one (a Dask cluster, say) on demand.
    """

    def __init__(self) -> None:
        self._inner: TaskRunner | None = None
        self._stack = ExitStack()
        super().__init__()

    @property
    def name(self) -> str:
        return f"configured-{self._inner.name}" if self._inner else "configured"

    def duplicate(self) -> ConfiguredTaskRunner:
        return type(self)()

    def configure(self, runner: RunnerConfig) -> TaskRunner:
        """Start the runner `runner` selects; later calls keep the first one."""
        if self._inner is None:
            self._inner = self._stack.enter_context(build_task_runner(runner))
        return self._inner

    def submit(
        self,
        task: Any,
        parameters: dict[str, Any],
        wait_for: Iterable[PrefectFuture[Any]] | None = None,
        dependencies: dict[str, set[Any]] | None = None,
    ) -> PrefectFuture[Any]:
        inner = self._inner or self.configure(RunnerConfig())
        return inner.submit(task, parameters, wait_for, dependencies)

    def __enter__(self) -> ConfiguredTaskRunner:
        super().__enter__()
        self._stack.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self._stack.__exit__(*exc)
        finally:
            self._inner = None
            super().__exit__(*exc)


def configure_flow_runner(runner: RunnerConfig) -> str:
    """Inside a flow run: start the task runner the config selects; returns its name.

    A flow given another task runner explicitly (`flow.with_options(task_runner=...)`) keeps it.
    """
    context = FlowRunContext.get()
    if context is None or context.task_runner is None:
        return "none"
    current = context.task_runner
    if isinstance(current, ConfiguredTaskRunner):
        return current.configure(runner).name
    return current.name


@contextlib.contextmanager
def local_api() -> Iterator[str]:
    """The Prefect API for one `circuitflow run`: PREFECT_API_URL when configured, else a local server.

    The local server is the one Prefect's ephemeral mode would start on first use; starting it here
    and pointing this process and its children at it gives Dask and Ray workers one API to report
    to (each would otherwise start its own). Prefect stops it at exit. Yields the API URL.
    """
    configured = PREFECT_API_URL.value()
    if configured:
        yield configured
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start(timeout=int(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")))
    previous = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield server.api_url
    finally:
        if previous is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = previous


def limited_tag(tag: str | None) -> str | None:
    """`tag` when a Prefect concurrency limit exists for it (tag-based, i.e. a global limit named
    `tag:<tag>`), else None.

    Every task run with tags asks the API for slots, and on a SQLite-backed server concurrent asks
    wait on each other (seconds); so the tag goes on tasks only when a limit will actually use it.
    """
    if not tag:
        return None
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            limit = client.read_global_concurrency_limit_by_name(f"tag:{tag}")
    except ObjectNotFound:
        return None
    return tag if limit.active else None


def forward_core_logs(level: int = logging.INFO) -> None:
    """Send `core.*` log records to Prefect's run logs (the UI); safe to call more than once.

    Prefect gives its API handler to the loggers named in PREFECT_LOGGING_EXTRA_LOGGERS when it
    configures logging: `core` is added there for processes started from here (Dask workers), and
    this process's `core` logger gets the handler directly, Prefect being configured already.
    """
    extra = [name for name in os.environ.get("PREFECT_LOGGING_EXTRA_LOGGERS", "").split(",") if name.strip()]
    if CORE_LOGGER not in extra:
        os.environ["PREFECT_LOGGING_EXTRA_LOGGERS"] = ",".join([*extra, CORE_LOGGER])
    logger = logging.getLogger(CORE_LOGGER)
    if logger.level == logging.NOTSET or logger.level > level:
        logger.setLevel(level)
    present = {type(h) for h in logger.handlers}
    for handler in logging.getLogger("prefect.extra").handlers:
        if type(handler) not in present:
            logger.addHandler(handler)
