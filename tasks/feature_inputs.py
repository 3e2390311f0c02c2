"""Stage `feature_inputs`: dataset-level attribution. For each chosen feature, the mean attribution it
receives from every upstream transcoder feature, attention head, the embedding and each transcoder's
error over the held-out contexts where it fires (core.dataset_attribution), as feature_inputs.parquet.

Features: `feature_inputs.features` ("L:F"), the `top` most frequent of each of `layers`, and with
`roots` the trace roots' features (chosen as the trace stage chooses them when not given). Contexts:
the mine stage's feature_acts rows of the feature, strongest first, at most `max_contexts`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from prefect import task

from core import attribution
from core.config import Config
from core.dataset_attribution import dataset_inputs
from storage import duck, layout, tables
from storage.feature_inputs import feature_inputs_table, write_feature_inputs
from tasks.common import build_stage, cache_key, log
from tasks.trace_inputs import encode_prompt, load_transcoders, strongest_feature


def chosen_features(cfg: Config, con: Any, model: Any, transcoders: dict) -> list[tuple[int, int]]:
    """The features to analyse, in config order, without repeats."""
    fi = cfg.feature_inputs
    out = list(fi.pairs())
    for layer in fi.layers:
        if fi.top:
            sql = "select feature from feature_stats where layer = ? order by n_fired desc, feature limit ?"
            out += [(layer, int(f)) for (f,) in con.execute(sql, [layer, fi.top]).fetchall()]
    if fi.roots:
        for r in (r for r in cfg.trace.roots if not r.is_logit):
            feature = r.feature
            if feature is None:
                prompt = encode_prompt(cfg, r.prompt)
                state = attribution.prepare(model, transcoders, prompt.tokens, max_layer=r.layer)
                feature = strongest_feature(state, r.layer, r.pos)
            out.append((r.layer, int(feature)))
    return list(dict.fromkeys(out))


def contexts_of(con: Any, layer: int, feature: int, limit: int | None) -> list[tuple[int, int]]:
    """(row, pos) where the feature fires in the held-out tokens, strongest activation first."""
    sql = "select row, pos from feature_acts where layer = ? and feature = ? and act > 0 order by act desc, row, pos"
    params: list[Any] = [layer, feature]
    if limit is not None:
        sql += " limit ?"
        params.append(limit)
    return [(int(r), int(p)) for r, p in con.execute(sql, params).fetchall()]


def build_feature_inputs(cfg: Config, plan: dict[str, Any], tmp: Path) -> dict[str, Any]:
    """Mean inputs of every chosen feature into `tmp`; return the manifest fields."""
    from core.model import load_model

    torch.set_num_threads(cfg.runner.torch_threads)
    tokens_dir = layout.stage_dir(cfg.store.root, "tokens", plan["tokens_mine"])
    mine_dir = layout.stage_dir(cfg.store.root, "mine", plan["mine"])
    if not layout.is_complete(mine_dir):
        raise layout.StoreError(f"{mine_dir}: the mine stage has not finished; run it first")
    transcoders = load_transcoders(cfg, plan)
    model = load_model(cfg.model.name, cfg.model.device, cfg.model.dtype)
    con = duck.open_views(cfg.store.root, duck.mine_views(mine_dir))
    try:
        features = chosen_features(cfg, con, model, transcoders)
        contexts = {f: contexts_of(con, *f, cfg.feature_inputs.max_contexts) for f in features}
    finally:
        con.close()
    rows = torch.from_numpy(np.asarray(tables.read_tokens(tokens_dir / "tokens.parquet"), dtype=np.int64))
    dtype = torch.float64 if cfg.feature_inputs.dtype == "float64" else torch.float32
    start = time.perf_counter()
    stats = dataset_inputs(model, transcoders, rows, contexts, dtype=dtype)
    seconds = time.perf_counter() - start
    n_contexts = sum(s.contexts for s in stats.values())
    out = [
        feature_inputs_table(layer, f, stats[(layer, f)].contexts, stats[(layer, f)].rows()) for layer, f in features
    ]
    write_feature_inputs(out, tmp)
    log(f"feature_inputs: {len(features)} features, {n_contexts} contexts in {seconds:.1f} s")
    return {
        "features": [{"layer": layer, "feature": f, "contexts": stats[(layer, f)].contexts} for layer, f in features],
        "contexts": n_contexts,
        "seconds_per_context": round(seconds / max(n_contexts, 1), 5),
        "rows": sum(t.num_rows for t in out),
    }


@task(
    name="feature_inputs", task_run_name="feature_inputs", cache_key_fn=cache_key("feature_inputs"), persist_result=True
)
def mean_feature_inputs(cfg: Config, key: str, plan: dict, force: bool = False) -> dict[str, Any]:
    """Prefect task: the feature_inputs stage for the plan's mining tokens, transcoders and mine stage."""
    return build_stage(cfg.store.root, "feature_inputs", key, lambda tmp: build_feature_inputs(cfg, plan, tmp), force)
