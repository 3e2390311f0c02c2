"""The blind comparison flow (the paper's Table 1): mine two dictionaries with the ordinary tokens and mine
tasks (each cached by its key), then build the blind set: a rater's page that hides every feature's
source, and the answer key kept in the store beside it. `circuitflow blind tally` unblinds the ratings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any

from prefect import flow, tags

from core.blind import BlindError
from core.config import Config, load_config
from flows.pipeline import run_task, with_absolute_store
from flows.runners import ConfiguredTaskRunner, configure_flow_runner, limited_tag
from tasks.blind import (
    Dictionary,
    blind_key,
    describe_dictionaries,
    export_rater_folder,
    make_blind_set,
    mining_config,
    rater_folder,
)
from tasks.plan import Plan, check_config, make_plan, mine_corpus


def prepare_blind(
    config: str | None,
    overrides: list[str] | None,
    dictionaries: list[str],
    layer: int | None = None,
    names: list[str] | None = None,
    n: int = 20,
    min_density: float = 0.0,
) -> tuple[Config, list[Dictionary], list[tuple[Config, Plan]]]:
    """Pre-flight: the config, both dictionaries, and per dictionary the checked config and plan that mine it."""
    if n < 1:
        raise BlindError(f"--n: draw at least 1 feature per dictionary, got {n}")
    if not 0 <= min_density <= 1:
        raise BlindError(f"--min-density: a fraction of the mined tokens between 0 and 1, got {min_density}")
    cfg = with_absolute_store(load_config(config, overrides or []))
    found = describe_dictionaries(list(dictionaries), layer, names)
    mining = []
    for d in found:
        mine_cfg = mining_config(cfg, d)
        check_config(mine_cfg)
        mining.append((mine_cfg, make_plan(mine_cfg)))
    return cfg, found, mining


def mine_dictionary(mine_cfg: Config, plan: Plan) -> list[dict[str, Any]]:
    """The mining tokens and the mine stage of one dictionary (cache hits when already in the store)."""
    from tasks.mine import mine_features
    from tasks.tokens import tokenize_corpus

    split = mine_corpus(mine_cfg)[1]
    tokens = run_task(tokenize_corpus, mine_cfg, "tokens", plan.tokens_mine, False, split=split)
    mined = run_task(mine_features, mine_cfg, "mine", plan.mine, False, plan=plan.keys())
    return [tokens, mined]


@flow(name="circuitflow-blind-compare", log_prints=True, task_runner=ConfiguredTaskRunner())
def blind_compare(
    dictionaries: list[str],
    config: str | None = None,
    overrides: list[str] | None = None,
    n: int = 20,
    seed: int = 0,
    min_density: float = 0.0,
    layer: int | None = None,
    names: list[str] | None = None,
    out: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Mine two dictionaries (checkpoint folders) and draw `n` live features from each into a blind
    rating page, shuffled in an order fixed by `seed`; `out` also copies the rater's folder there."""
    start = time.perf_counter()
    cfg, found, mining = prepare_blind(config, overrides, dictionaries, layer, names, n, min_density)
    configure_flow_runner(cfg.runner)
    device_tag = limited_tag(cfg.runner.gpu_tag)  # the model runs in mining: share the pipeline's device limit
    with tags(device_tag) if device_tag else contextlib.nullcontext():
        stages = [s for mine_cfg, plan in mining for s in mine_dictionary(mine_cfg, plan)]
    mine_keys = [plan.mine for _, plan in mining]
    key = blind_key(found, mine_keys, n, seed, min_density)
    params = {
        "dictionaries": [dataclasses.asdict(d) for d in found],
        "mine_keys": mine_keys,
        "tokens_key": mining[0][1].tokens_mine,
        "n": n,
        "seed": seed,
        "min_density": min_density,
    }
    summary = run_task(make_blind_set, cfg, "blind", key, force, **params)
    stages.append(summary)
    result = {"stages": stages, "key": key, "path": summary["path"], "rater": str(rater_folder(summary))}
    if out:
        result["exported"] = str(export_rater_folder(summary, out))
    result["seconds"] = round(time.perf_counter() - start, 3)
    return result
