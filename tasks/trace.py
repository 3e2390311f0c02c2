"""Stage `trace`: the circuits of the roots listed in the config (docs/method.md sections 5-7), as the paper's
path search with error nodes and as a pruned full attribution graph, written to Parquet/JSON/HTML.

`trace_prompt` is also what `circuitflow trace` calls for an ad-hoc root (no Prefect run needed).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch
from prefect import task
from prefect.context import TaskRunContext

from core import attribution, graph
from core import paths as search
from core.config import Config, TraceConfig
from core.transcoder import Transcoder
from storage import links, runs
from storage.graphs import GraphRecord, root_terms, summary_rows, write_graphs
from storage.layout import StoreError
from tasks.common import build_stage, cache_key, log
from tasks.trace_inputs import (  # noqa: F401 - re-exported: the trace command, intervene and examples use them here
    Prompt,
    TraceInputError,
    check_pos,
    check_root,
    encode_prompt,
    load_transcoders,
    strongest_feature,
)


def load_transcoders_for(cfg: Config, plan: dict[str, Any]) -> dict[int, Transcoder]:
    """`load_transcoders`, falling back to the latest run's transcoders when the plan's are missing
    (e.g. trained before a code change) and that run used the same model, layers and train settings."""
    try:
        return load_transcoders(cfg, plan)
    except StoreError:
        latest = runs.latest_path(cfg.store.root)
        run = runs.read_latest(cfg.store.root)
        if run is None or not _same_training(run["config"], cfg):
            raise
        log(f"trace: using the transcoders of the latest run ({latest}), trained with an earlier code version")
        return load_transcoders(cfg, run["plan"])


def _same_training(recorded: dict[str, Any], cfg: Config) -> bool:
    keys = [("model", "name"), ("activations", "layers"), ("activations", "hook_in"), ("train", None)]
    now = cfg.to_dict()
    return (
        all(
            (recorded.get(a) if b is None else recorded.get(a, {}).get(b)) == (now[a] if b is None else now[a][b])
            for a, b in keys
        )
        and recorded.get("transcoders") == now["transcoders"]
    )


class Traced(NamedTuple):
    records: list[GraphRecord]
    summary: dict[str, Any]
    """Root index, prompt, layer, feature (the one traced), feature_auto, pos, token, values, terms."""


def top_prediction(state: attribution.PromptState, pos: int) -> int:
    """The model's most likely next token at token `pos` (the whole model must have run)."""
    assert state.final is not None and state.W_U is not None and state.b_U is not None
    t = pos % len(state.tokens)
    logits = state.final.apply(state.resid[-1])[t] @ state.W_U + state.b_U
    return int(torch.argmax(logits))


def single_token(cfg: Config, text: str, flag: str) -> int:
    """The id of the one token `text` encodes to; a one-line error otherwise (before any model loads)."""
    from core.model import load_tokenizer

    ids = list(load_tokenizer(cfg.model.name)(text, add_special_tokens=False)["input_ids"])
    if len(ids) != 1:
        raise TraceInputError(
            f"{flag} {text!r}: encodes to {len(ids)} tokens {ids}; give a string that is one token "
            "(mind the leading space, e.g. ' the')"
        )
    return ids[0]


class LogitRoot(NamedTuple):
    token: int | None = None
    """None: the top prediction at the root's position."""
    other: int | None = None
    """Subtracted token of a logit difference."""


class _Root(NamedTuple):
    state: attribution.PromptState
    node: attribution.Node
    summary: dict[str, Any]


def _feature_root(model, transcoders, prompt, layer, feature, pos, dtype) -> _Root:
    state = attribution.prepare(model, transcoders, prompt.tokens, max_layer=layer, dtype=dtype)
    auto = feature is None
    if feature is None:
        feature = strongest_feature(state, layer, pos)
    root = attribution.feature_root(state, layer, feature, pos)
    if auto:
        log(
            f"trace: root feature chosen: F{layer}.{feature}, the largest activation at token {root.pos} "
            f"{prompt.texts[root.pos]!r} ({root.activation:.4g})"
        )
    elif root.activation == 0:
        log(f"trace: F{layer}.{feature} is not active at token {root.pos}; the graph explains its pre-activation")
    return _Root(state, root, {"layer": layer, "feature": feature, "feature_auto": auto})


def _logit_root(model, transcoders, prompt, logit: LogitRoot, pos, dtype, texts) -> _Root:
    state = attribution.prepare(model, transcoders, prompt.tokens, max_layer=None, dtype=dtype)
    auto = logit.token is None
    token = top_prediction(state, pos) if auto else logit.token
    root = attribution.logit_root(state, token, logit.other, pos)
    name = f"logit {texts(token)!r}" + ("" if logit.other is None else f" - logit {texts(logit.other)!r}")
    root = dataclasses.replace(root, label=f"{name} @{root.pos}")
    if auto:
        log(f"trace: root chosen: {name}, the top prediction after token {root.pos} {prompt.texts[root.pos]!r}")
    other = None if logit.other is None else texts(logit.other)
    summary = {"layer": None, "feature": None, "feature_auto": False, "logit": texts(token), "vs": other}
    return _Root(state, root, {**summary, "logit_auto": auto, "root_name": name})


def root_name(summary: dict[str, Any]) -> str:
    """`F3.12`, or `logit ' the'` (minus another logit) for a logit root."""
    return summary.get("root_name") or f"F{summary['layer']}.{summary['feature']}"


def trace_prompt(
    model: Any,
    transcoders: dict[int, Transcoder],
    prompt: Prompt,
    layer: int | None,
    feature: int | None,
    pos: int,
    tcfg: TraceConfig,
    index: int = 0,
    paths: bool = True,
    full: bool = True,
    *,
    logit: LogitRoot | None = None,
    through: tuple = (),
    not_through: tuple = (),
) -> Traced:
    """Trace one root: path search + graph with error nodes, and/or the pruned full graph.

    The root is feature `feature` of `layer` (None: `strongest_feature` at `pos`, recorded with
    `feature_auto: true`), or with `layer` None a logit (`logit`; default: the top prediction at
    `pos`, recorded with `logit_auto: true`). `through` / `not_through` (core.paths.NodePattern)
    filter the paths before they are merged.
    """
    if layer is not None:
        check_root(transcoders, layer, feature, pos, len(prompt.tokens))
    dtype = torch.float64 if tcfg.dtype == "float64" else torch.float32
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    if layer is None:
        made = _logit_root(model, transcoders, prompt, logit or LogitRoot(), pos, dtype, _decoder(model))
    else:
        made = _feature_root(model, transcoders, prompt, layer, feature, pos, dtype)
    state, root = made.state, made.node
    seconds["prepare"] = time.perf_counter() - start
    records = []
    summary: dict[str, Any] = {"root": index, "prompt": prompt.text, **made.summary}
    summary.update(pos=root.pos, token=prompt.texts[root.pos], pre_activation=root.contrib, activation=root.activation)
    if paths:
        start = time.perf_counter()
        head_cap = model.cfg.n_heads if tcfg.cap_heads else None
        opts = (tcfg.num_iters, tcfg.num_branches, tcfg.signed, tcfg.skip_bos, tuple(through), tuple(not_through))
        result = search.trace(state, root, *opts, head_cap=head_cap)
        seconds["paths"] = time.perf_counter() - start
        found = [{"nodes": [n.key for n in p], "contrib": p[-1].contrib} for p in result.paths]
        records.append(GraphRecord(index, "paths", result.circuit, prompt.texts, prompt.text, found))
        summary["root_terms"] = root_terms(result.circuit)
        summary["top_path"] = found[0] if found else None
    if full:
        start = time.perf_counter()
        g = graph.full_graph(state, [root], max_features=tcfg.max_features)
        pruned = graph.prune_graph(g, tcfg.node_threshold, tcfg.edge_threshold)
        circuit = graph.to_circuit(g, pruned)
        seconds["full"] = time.perf_counter() - start
        circuit.meta.update(root=root.label, root_value=root.contrib, traced_features=g.n_features)
        records.append(GraphRecord(index, "full", circuit, prompt.texts, prompt.text))
        summary["full"] = {"nodes": len(circuit.nodes), "edges": len(circuit.edges), **circuit.meta}
    summary["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    timing = ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items())
    log(f"trace: root {index} {root_name(summary)}@{root.pos} = {root.contrib:.4g} ({timing})")
    return Traced(records, summary)


def _decoder(model: Any) -> Any:
    """Token id -> its text, with the model's tokenizer."""
    return lambda token: model.tokenizer.decode([token]) if getattr(model, "tokenizer", None) else str(token)


def logit_spec(cfg: Config, root: Any) -> LogitRoot:
    """The token ids of a config root's `logit` / `logit_diff` (one-line error for a multi-token string)."""
    token, other = root.logit_tokens()
    flag = "trace.roots[].logit_diff" if root.logit_diff is not None else "trace.roots[].logit"
    return LogitRoot(
        None if token is None else single_token(cfg, token, flag),
        None if other is None else single_token(cfg, other, flag),
    )


def build_trace(cfg: Config, plan: dict[str, Any], tmp: Path) -> dict[str, Any]:
    """Trace every configured root into `tmp`; return the manifest fields."""
    from core.model import load_model

    torch.set_num_threads(cfg.runner.torch_threads)
    transcoders = load_transcoders(cfg, plan)
    prompts = [encode_prompt(cfg, r.prompt) for r in cfg.trace.roots]
    logits = [logit_spec(cfg, r) if r.is_logit else None for r in cfg.trace.roots]
    for r, p in zip(cfg.trace.roots, prompts, strict=True):
        if r.is_logit:
            check_pos(r.pos, len(p.tokens))
        else:
            check_root(transcoders, r.layer, r.feature, r.pos, len(p.tokens))
    model = load_model(cfg.model.name, cfg.model.device, cfg.model.dtype)
    records, summaries = [], []
    for i, (r, p) in enumerate(zip(cfg.trace.roots, prompts, strict=True)):
        traced = trace_prompt(
            model, transcoders, p, r.layer, r.feature, r.pos, cfg.trace, i, full=cfg.trace.full, logit=logits[i]
        )
        records += traced.records
        summaries.append(traced.summary)
    files = write_graphs(records, tmp)
    return {"roots": summaries, "files": sorted(Path(f).name for f in files.values()), "graphs": len(records)}


@task(name="trace_roots", task_run_name="trace", cache_key_fn=cache_key("trace"), persist_result=True)
def trace_roots(cfg: Config, key: str, plan: dict, force: bool = False) -> dict[str, Any]:
    """Prefect task: the trace stage for the config's roots and the plan's transcoders."""
    summary = build_stage(cfg.store.root, "trace", key, lambda tmp: build_trace(cfg, plan, tmp), force)
    if TaskRunContext.get() is not None:
        from prefect.artifacts import create_markdown_artifact

        graph = links.serve_hint(Path(summary["path"]).parents[1], f"/trace/{summary['key']}/")
        create_markdown_artifact(
            key="trace-summary", markdown=f"Graph (nodes link to feature pages): {graph}\n\n" + trace_markdown(summary)
        )
    return summary


def trace_markdown(summary: dict[str, Any]) -> str:
    """The stage's roots, their error terms and top paths, as markdown."""
    lines = [f"## Circuit traces\n\nStage directory: `{summary['path']}` (graph.html, nodes/edges.parquet)\n"]
    for r in summary["manifest"]["roots"]:
        lines.append(
            f"### Root {r['root']}: {_described(r)}{_chosen(r)} at token {r['pos']} "
            f"`{r['token']!r}` = {r['pre_activation']:.4g}\n"
        )
        terms = r.get("root_terms", {})
        if terms:
            lines += ["| term | value |", "|---|---|"] + [f"| {k} | {v:.4g} |" for k, v in terms.items()]
        if r.get("top_path"):
            p = r["top_path"]
            lines.append(f"\nTop path: `{' <- '.join(p['nodes'])}` ({p['contrib']:.4g})")
        if "full" in r:
            f = r["full"]
            lines.append(f"\nFull graph: {f['nodes']} nodes, {f['edges']} edges after pruning.\n")
    return "\n".join(lines)


def _described(summary: dict[str, Any]) -> str:
    if summary.get("layer") is None:
        return root_name(summary)
    return f"layer {summary['layer']} feature {summary['feature']}"


def _chosen(summary: dict[str, Any]) -> str:
    if summary.get("logit_auto"):
        return " (chosen: the top prediction there)"
    return " (chosen: the largest activation there)" if summary.get("feature_auto") else ""


def table_rows(records: list[GraphRecord], k: int = 15) -> list[dict[str, Any]]:
    """Rows for a terminal table: per graph, the largest nodes with the root's error terms."""
    rows = []
    for rec in records:
        for row in summary_rows(rec.circuit, k):
            rows.append({"root": rec.root, "graph": rec.kind, **row, "token": rec.tokens[row["pos"]]})
    return rows
