"""Stage `interventions`: every experiment of the config's `experiments` section run on the plan's
transcoders (tasks.intervene), written as `<store>/interventions/<key>/interventions.parquet` (the
`interventions` SQL view) and published as a Prefect table artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext

from core.config import Config, ConfigError
from storage import layout
from storage.interventions import STAGE, TABLE, mark_latest, write_interventions
from tasks.common import build_stage, log

ARTIFACT = "interventions"
"""Key of the table artifact with one row per experiment."""
SUMMARY = ("name", "interventions", "target_text", "clean_logprob", "patched_logprob", "kl")


def experiments_key(cfg: Config, plan: dict[str, Any]) -> str:
    """Content key: the model, the experiments section and the transcoders' train keys."""
    if not cfg.experiments.runs:
        raise ConfigError('experiments.runs: nothing to run; add e.g. runs: [{prompt: "...", ablate: ["3:496"]}]')
    settings = {"model": cfg.model.name, "dtype": cfg.model.dtype, **cfg.experiments.to_dict()}
    inputs = {f"train_{layer}": str(key) for layer, key in (plan.get("train") or {}).items()}
    return layout.stage_key(STAGE, settings, {**inputs, "transcoders": str(cfg.transcoders)})


def build_interventions(cfg: Config, plan: dict[str, Any], tmp: Path) -> dict[str, Any]:
    """Check every experiment, load the model once, run them all, write the table; the manifest fields."""
    from core.model import load_model
    from tasks.intervene import prepare_all, run_experiment
    from tasks.trace import load_transcoders_for

    torch.set_num_threads(cfg.runner.torch_threads)
    transcoders = load_transcoders_for(cfg, plan)  # the latest run's when trained by earlier code
    prepared = prepare_all(cfg, transcoders)
    model = load_model(cfg.model.name, cfg.model.device, cfg.model.dtype)
    exp = cfg.experiments
    reports = [run_experiment(model, transcoders, p, exp.top_k, exp.max_feature_changes) for p in prepared]
    write_interventions(reports, tmp)
    rows = [{**{k: r[k] for k in SUMMARY}, "root_ratio": (r["root"] or {}).get("ratio")} for r in reports]
    for row in rows:
        log(
            f"interventions: {row['name']}: KL {row['kl']:.3g}, log p {row['clean_logprob']:.3f} -> {row['patched_logprob']:.3f}"
        )
    return {"experiments": len(reports), "files": [TABLE], "rows": rows}


@task(name="run_experiments", task_run_name="interventions", cache_policy=NO_CACHE)
def run_experiments(cfg: Config, key: str, plan: dict[str, Any], force: bool = False) -> dict[str, Any]:
    """Prefect task: the experiments (reused from the store when complete), marked as the store's latest
    (the `interventions` view) and published as a table artifact. Never cached by Prefect: every run
    updates the mark and the artifact."""
    root = cfg.store.root
    summary = build_stage(root, STAGE, key, lambda tmp: build_interventions(cfg, plan, tmp), force)
    mark_latest(root, key)
    if TaskRunContext.get() is not None:
        from prefect.artifacts import create_table_artifact

        rows = [{**r, "interventions": "; ".join(r["interventions"])} for r in summary["manifest"]["rows"]]
        create_table_artifact(table=rows, key=ARTIFACT, description=f"interventions: {len(rows)} experiments")
    return summary
