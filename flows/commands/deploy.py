"""`circuitflow deploy`: create or update a Prefect deployment of the pipeline whose stored parameters
hold the whole experiment (the config path, the overrides and the store), optionally on a cron or
interval schedule, so a scheduled run or a run started from the UI does what `circuitflow run` with
the same arguments does.

Every input is checked before anything is created: the config and overrides load, the schedule
parses, the Prefect API answers. The work pool is created (a process pool) when it does not exist.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from core.config import load_config
from core.errors import UserError
from storage.links import SERVE_URL_ENV

FLOW_NAME = "circuitflow-pipeline"
ENTRYPOINT = "flows.pipeline.pipeline"
"""A module path: runs import the installed package, from any working directory."""


class DeployError(UserError):
    """A deploy argument is wrong or the Prefect API cannot be reached."""


def parameters(args: argparse.Namespace) -> dict[str, Any]:
    """The deployment's stored parameters; raises UserError when the config or an override is bad."""
    config = Path(args.config).expanduser().resolve()
    overrides = list(args.overrides)
    store_override = [f"store.root={args.store}"] if args.store else []
    cfg = load_config(str(config), overrides + store_override)  # unknown keys and bad values stop here
    store = str(Path(cfg.store.root).expanduser().resolve())
    return {"config": str(config), "overrides": overrides, "stages": None, "force": None, "store": store}


def schedule(cron: str | None, interval: float | None, timezone: str) -> Any:
    """The Prefect schedule object, or None; raises DeployError when it does not parse."""
    from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule
    from pydantic import ValidationError

    if interval is not None and not interval > 0:
        raise DeployError(f"--interval {interval:g}: give a positive number of seconds")
    try:
        if cron is not None:
            return CronSchedule(cron=cron, timezone=timezone)
        return IntervalSchedule(interval=interval, timezone=timezone) if interval is not None else None
    except ValidationError as err:
        reason = err.errors()[0]["msg"].removeprefix("Value error, ")
        raise DeployError(f"--cron {cron!r} / --timezone {timezone!r}: {reason} (e.g. --cron '0 3 * * *')") from None


def check_api(client: Any) -> str:
    """The API URL, once it answers; DeployError when none is configured or it does not answer."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise DeployError(
            "no Prefect server configured: start one (prefect server start) and set "
            "PREFECT_API_URL=http://127.0.0.1:4200/api (docs/orchestration.md)"
        )
    failure = client.api_healthcheck()
    if failure is not None:
        raise DeployError(
            f"the Prefect API at {url} does not answer ({type(failure).__name__}); is the server running?"
        )
    return url


def ensure_pool(client: Any, name: str) -> bool:
    """Create a process work pool named `name` unless one exists; True when it was created."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    try:
        client.read_work_pool(name)
        return False
    except ObjectNotFound:
        template = ProcessWorker.get_default_base_job_template()
        client.create_work_pool(WorkPoolCreate(name=name, type="process", base_job_template=template))
        return True


def job_env() -> dict[str, str]:
    """Environment of the deployment's runs: core.* logs in the UI, and the serve address if set."""
    env = {"PREFECT_LOGGING_EXTRA_LOGGERS": "core", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    if os.environ.get(SERVE_URL_ENV):
        env[SERVE_URL_ENV] = os.environ[SERVE_URL_ENV]
    return env


def create(client: Any, args: argparse.Namespace, params: dict[str, Any], when: Any) -> Any:
    """Create or update the deployment (one run at a time: a run due while another runs waits)."""
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy, ConcurrencyOptions
    from prefect.utilities.callables import parameter_schema

    from flows.pipeline import pipeline

    flow_id = client.create_flow(pipeline)
    overrides = " ".join(f"--set {o}" for o in params["overrides"])
    return client.create_deployment(
        flow_id=flow_id,
        name=args.name,
        entrypoint=ENTRYPOINT,
        work_pool_name=args.pool,
        parameters=params,
        parameter_openapi_schema=parameter_schema(pipeline).model_dump_for_openapi(),
        pull_steps=[{"prefect.deployments.steps.set_working_directory": {"directory": os.getcwd()}}],
        schedules=[DeploymentScheduleCreate(schedule=when, active=True)] if when is not None else [],
        concurrency_limit=1,
        concurrency_options=ConcurrencyOptions(collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
        job_variables={"env": job_env()},
        description=f"circuitflow run {params['config']} --store {params['store']} {overrides}".strip(),
        tags=["circuitflow", "deploy"],
        enforce_parameter_schema=True,
    )


def main(args: argparse.Namespace) -> int:
    args.name = args.name or Path(args.config).stem
    params = parameters(args)
    when = schedule(args.cron, args.interval, args.timezone)
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        url = check_api(client)
        if ensure_pool(client, args.pool):
            print(
                f"created the process work pool {args.pool!r}; start a worker: prefect worker start --pool {args.pool}"
            )
        deployment_id = create(client, args, params, when)
    print(f"deployment {FLOW_NAME}/{args.name} ({deployment_id}) on {url}, work pool {args.pool!r}")
    print(f"  config {params['config']}, store {params['store']}, overrides {params['overrides']}")
    print(f"  schedule: {_describe(when)}")
    print(f"  run it now: prefect deployment run {FLOW_NAME}/{args.name}")
    return 0


def _describe(when: Any) -> str:
    if when is None:
        return "none (runs start from the UI or `prefect deployment run`)"
    if hasattr(when, "cron"):
        return f"cron {when.cron!r} ({when.timezone})"
    return f"every {when.interval.total_seconds():g} s"


def add_parser(sub: argparse._SubParsersAction) -> None:
    """`circuitflow deploy CONFIG [--name N] [--store DIR] [--cron EXPR | --interval S] [--set k=v] [--pool P]`."""
    deploy = sub.add_parser("deploy", help="create or update a Prefect deployment of the pipeline for an experiment")
    deploy.add_argument("config", help="YAML experiment config, e.g. configs/default.yaml")
    deploy.add_argument("--name", help="deployment name (default: the config file's name without .yaml)")
    deploy.add_argument("--store", help="store root (overrides store.root)")
    when = deploy.add_mutually_exclusive_group()
    when.add_argument("--cron", metavar="EXPR", help="cron schedule, e.g. '0 3 * * *' (03:00 every day)")
    when.add_argument("--interval", type=float, metavar="SECONDS", help="run every SECONDS")
    deploy.add_argument("--timezone", default="UTC", help="timezone of the schedule (default UTC)")
    deploy.add_argument("--pool", default="circuitflow", help="process work pool (created when missing)")
    deploy.add_argument(
        "--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE", help="override a config value"
    )
