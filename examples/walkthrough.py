# %% [markdown]
# # circuitflow walkthrough: transcoder circuits on the bundled default
#
# The steps of the original transcoder-circuits walkthrough (Dunefsky, Chlenski & Nanda, NeurIPS
# 2024), on the bundled SmolLM2-135M with the transcoders `circuitflow run configs/default.yaml`
# trained on layers 0-3:
#
# 1. load the model and the transcoders from the store;
# 2. feature density, and one live feature's dashboard data (SQL over the mined Parquet);
# 3. replace MLPs by transcoders: one prompt's feature activation, then cross-entropy;
# 4. trace a feature on a prompt: path search, filters, graph with error nodes, and the full
#    attribution graph;
# 5. check the top path by ablating its source feature: exactly in the model with its attention
#    patterns and norm scales frozen, approximately in the real model;
# 6. an input-invariant view of the same connections: the pullback onto earlier transcoders.
#
# It reads the store of the latest run: the first argument, else `CIRCUITFLOW_STORE`, else
# `./store` (where `circuitflow run` writes by default). Open it in Jupyter/VS Code as a notebook
# (percent format) or run it: `python examples/walkthrough.py [STORE]`. The graphs it draws go to
# `CIRCUITFLOW_WALKTHROUGH_OUT` (default `<store>/walkthrough`); `CIRCUITFLOW_WALKTHROUGH_PROMPT` traces
# another prompt than the config's first trace root.

# %%
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from core import attribution, graph
from core import paths as search
from core.config import from_dict
from core.metrics import splice_eval, splice_hooks
from core.model import load_model
from core.views import pullback
from storage import catalog, layout
from storage.graphs import GraphRecord, write_graphs
from storage.tables import read_tokens
from tasks.trace import encode_prompt, load_transcoders, strongest_feature

torch.set_num_threads(int(os.environ.get("CIRCUITFLOW_THREADS", "2")))
torch.set_grad_enabled(False)
from_command_line = Path(sys.argv[0]).name == "walkthrough.py" and len(sys.argv) > 1  # not a notebook kernel's argv
STORE = Path(sys.argv[1] if from_command_line else os.environ.get("CIRCUITFLOW_STORE", "./store")).resolve()
latest = STORE / "runs" / "latest.json"
if not latest.is_file():
    raise SystemExit(f"{STORE}: no runs/latest.json; run `circuitflow run configs/default.yaml` first")
run = json.loads(latest.read_text())
cfg, plan = from_dict(run["config"]), run["plan"]
print(f"store {STORE}: model {cfg.model.name}, transcoder layers {list(cfg.activations.layers)}")

# %% [markdown]
# ## 1. The model and the transcoders
# Each transcoder reads the MLP input (`blocks.L.ln2.hook_normalized`, which equals the MLP's input
# because the model's norm weights are folded) and predicts the MLP output.

# %%
model = load_model(cfg.model.name, device="cpu", dtype="float32")
transcoders = load_transcoders(cfg, plan)
for layer, tc in transcoders.items():
    print(f"layer {layer}: d_sae {tc.cfg.d_sae}, {tc.cfg.activation}, {tc.cfg.hook_in} -> {tc.cfg.hook_out}")
LAYER = max(transcoders)

# %% [markdown]
# ## 2. Feature density and one feature's dashboard
# The density histogram is over log10 firing frequency (the original's `log_feature_sparsity`);
# "live" features fire more often than 1 in 10^4 tokens.

# %%
con = catalog.connect(STORE)
freq = np.array([r[0] for r in con.execute("select freq from feature_stats where layer = ?", [LAYER]).fetchall()])
log_freq = np.log10(np.clip(freq, 1e-10, None))
counts, edges = np.histogram(log_freq, bins=10, range=(-10, 0))
for c, lo in zip(counts, edges[:-1], strict=True):
    print(f"log10 freq {lo:5.1f} .. {lo + 1:5.1f}: {'#' * int(60 * c / max(counts.max(), 1))} {c}")
print(f"live (> 1e-4): {(log_freq > -4).mean():.1%} of layer {LAYER}'s features")

# %%
FEATURE, FREQ, MAX_ACT = con.execute(  # a live feature firing on about 1% of tokens (seen 20+ times if any is)
    "select feature, freq, max_act from feature_stats where layer = ? and n_fired > 0 "
    "order by n_fired >= 20 desc, abs(log10(freq) + 2), max_act desc limit 1",
    [LAYER],
).fetchone()
print(f"feature {LAYER}.{FEATURE}: fires on {FREQ:.2%} of tokens, max activation {MAX_ACT:.3g}")
examples = con.execute(
    "select rank, row, pos, act, context(row, pos) from top_examples where layer = ? and feature = ? and band = -1 "
    "order by rank limit 8",
    [LAYER, FEATURE],
).fetchall()
for rank, _row, _pos, act, text in examples:
    print(f"  #{rank} act {act:6.3f}  {text!r}")

# %% [markdown]
# ## 3. Replacing MLPs by transcoders
# First, the feature's activation on its top example with the lower MLPs replaced by their
# transcoders (one at a time); then the cross-entropy of the model with every transcoder
# spliced in at once, against the clean model and zero-ablated MLPs.

# %%
rows = read_tokens(layout.stage_dir(STORE, "tokens", plan["tokens_mine"]) / "tokens.parquet")
_, top_row, top_pos, top_act, _ = examples[0]
example_tokens = torch.tensor(rows[top_row, : top_pos + 1], dtype=torch.long)


def feature_activation(hooks: list) -> float:
    """The dashboard feature's activation at the example's last token with `hooks` applied."""
    hook = transcoders[LAYER].cfg.hook_in
    with model.hooks(fwd_hooks=hooks):
        _, cache = model.run_with_cache(example_tokens[None], names_filter=[hook], stop_at_layer=LAYER + 1)
    return float(transcoders[LAYER].encode(cache[hook][0, -1])[FEATURE])


clean_act = feature_activation([])
print(f"clean: {clean_act:.4g} (mined: {top_act:.4g})")
assert abs(clean_act - top_act) <= 1e-3 * max(1.0, abs(top_act)), "the mined activation does not reproduce"
for layer in range(LAYER):
    print(f"MLP {layer} replaced: {feature_activation(splice_hooks({layer: transcoders[layer]}, first_pos=1)):.4g}")

# %%
held_out = torch.tensor(rows[:4], dtype=torch.long)  # a quick look; the train stage's eval.json has the real figures
ce = splice_eval(model, held_out, transcoders, batch_rows=2, first_pos=1)
print(
    f"on {held_out.numel()} held-out tokens: CE clean {ce.ce_clean:.3f}, all {len(transcoders)} transcoders "
    f"{ce.ce_spliced:.3f}, zero-ablated {ce.ce_zero:.3f}; CE recovered {ce.ce_recovered:.1%}, KL {ce.kl:.3f} nats"
)
assert ce.ce_clean < ce.ce_zero and ce.ce_spliced < ce.ce_zero, "the transcoders recover nothing of the MLPs"

# %% [markdown]
# ## 4. Tracing a feature
# The prompt is the first root of the config's `trace:` section (the pipeline traced it too), or
# `CIRCUITFLOW_WALKTHROUGH_PROMPT`; the root is the layer-`LAYER` feature with the largest activation
# at the prompt's last token, which is what the trace stage traces when a root gives no `feature`.
#
# Feature-vector propagation (paper App. D): attention patterns and normalisation scales are
# frozen, so every node's contribution is exact and its children (features, attention heads per
# source token, the embedding, error and bias terms) sum to it. The beam search keeps the
# `num_branches` best paths per step for `num_iters` steps, ranking by |contribution|.

# %%
PROMPT = os.environ.get("CIRCUITFLOW_WALKTHROUGH_PROMPT") or (
    cfg.trace.roots[0].prompt if cfg.trace.roots else "The function returns a list of strings."
)
prompt = encode_prompt(cfg, PROMPT)
tokens, texts = prompt.tokens, prompt.texts
state = attribution.prepare(model, transcoders, tokens, max_layer=LAYER)
ROOT_FEATURE = strongest_feature(state, LAYER, -1)
root = attribution.feature_root(state, LAYER, ROOT_FEATURE, -1)
print(f"prompt {PROMPT!r}: {len(tokens)} tokens")
print(f"root {root.label} {texts[-1]!r}: pre-activation {root.contrib:.4g}, activation {root.activation:.4g}")
assert root.activation > 0, "the strongest feature at the last token does not fire"

# %% [markdown]
# The trace stage recorded the root it chose in its manifest (and in `nodes.parquet`); when it
# traced this prompt with an automatic root, it chose the same feature.

# %%
trace_manifest = layout.stage_dir(STORE, "trace", plan["trace"]) / layout.MANIFEST
for r in json.loads(trace_manifest.read_text())["roots"] if trace_manifest.is_file() else []:
    how = "chosen automatically" if r.get("feature_auto") else "given in the config"
    print(f"trace stage, root {r['root']}: layer {r['layer']} feature {r['feature']} ({how}) on {r['prompt']!r}")
    if r.get("feature_auto") and (r["prompt"], r["layer"], r["pos"]) == (PROMPT, LAYER, len(tokens) - 1):
        assert r["feature"] == ROOT_FEATURE, "the trace stage chose another root feature"

# %%
paths = search.find_paths(
    state, root, cfg.trace.num_iters, cfg.trace.num_branches, cfg.trace.signed, cfg.trace.skip_bos
)
for path in sorted(paths, key=lambda p: -abs(p[-1].contrib))[:10]:
    print(f"{path[-1].contrib:+8.4f}  " + " <- ".join(f"{n.key}[{texts[n.pos]!r}]" for n in path[1:]))

# %% [markdown]
# Filters keep the paths through (or not through) given nodes, e.g. everything that reaches the
# root through attention from another token:

# %%
through_heads = search.filter_paths(paths, through=[search.NodePattern(kind="head")])
print(f"{len(through_heads)} of {len(paths)} paths go through an attention head")

# %% [markdown]
# Merging the paths gives a graph whose every expanded node carries error nodes: the transcoder
# error below it, its bias terms, and the prune error (what the search left out), so its incoming
# edges sum exactly to its attribution. The root's `error` edge is what the transcoders below it
# do not reconstruct; a large one means the circuit runs partly through unexplained MLP output.

# %%
circuit = attribution.paths_to_graph(state, [(root,)] + paths)
for edge in sorted(circuit.incoming("root"), key=lambda e: -abs(e.weight))[:12]:
    print(f"{edge.source:>24} -> root  {edge.weight:+.4f}")
terms = {e.source.removeprefix("root|"): e.weight for e in circuit.incoming("root") if e.source.startswith("root|")}
print("error terms of the root:", {k: round(v, 4) for k, v in terms.items()})
total = sum(e.weight for e in circuit.incoming("root"))
print(f"sum of the root's incoming edges {total:.5f} = its pre-activation {root.contrib:.5f}")
assert abs(total - root.contrib) <= 1e-4 * max(1.0, abs(root.contrib))  # float32 sums of a few hundred terms

# %% [markdown]
# The full attribution graph has every direct-effect edge between the active features of the
# layers below the root on every token, the per-layer transcoder errors and the embeddings. On a
# short prompt every feature is traced (`max_features=None`), so each feature's attribution is its
# total effect on the root through every path; on a long one the config's `trace.max_features` caps
# the graph and the rest become frozen per-token sources.

# %%
n_active = sum(int((state.z[layer][: root.pos + 1] != 0).sum()) for layer in transcoders if layer < LAYER)
every_feature = n_active <= 8000  # an 8000 x 8000 float32 adjacency is 256 MB
full = graph.full_graph(state, [root], max_features=None if every_feature else cfg.trace.max_features)
pruned = graph.prune_graph(full, cfg.trace.node_threshold, cfg.trace.edge_threshold)
full_circuit = graph.to_circuit(full, pruned)
print(
    f"full graph: {full.n_features} of {n_active} active features traced; "
    f"kept {len(full_circuit.nodes)} nodes, {len(full_circuit.edges)} edges"
)
print("root =", {k: round(v, 4) for k, v in full_circuit.meta["root_terms"].items()})
ROOT_ROW = full.index("root")
row_total = float(full.adjacency[ROOT_ROW].sum() + full.bias[ROOT_ROW])
assert abs(row_total - root.contrib) <= 1e-4 * max(1.0, abs(root.contrib)), "the root's row does not sum to it"
out = Path(os.environ.get("CIRCUITFLOW_WALKTHROUGH_OUT", STORE / "walkthrough"))
records = [
    GraphRecord(0, "paths", circuit, texts, PROMPT),
    GraphRecord(0, "full", full_circuit, texts, PROMPT),
]
print("open", write_graphs(records, out)["graph.html"])

# %% [markdown]
# ## 5. Checking the top path by ablation
# The source of the strongest path that starts at a transcoder feature is zero-ablated: its
# decoder output is removed from its MLP's output at its token. Three models, three predictions:
#
# - **direct**: attention patterns, norm scales and every other MLP output frozen. The root moves
#   by exactly minus the feature's direct edge in the full graph (the residual route plus the
#   attention routes from its token).
# - **replacement, linearised**: patterns and scales frozen, every MLP below the root replaced by
#   its transcoder with the transcoder error held fixed and each feature's on/off state held
#   fixed. The root moves by exactly minus the feature's total attribution (every path from it).
# - **real model**: nothing frozen; the real MLPs (not their transcoders), the attention patterns
#   and the norms respond. The path "survives" when the root moves the attributed way by 0.5x to 2x
#   the total attribution.

# %%
hook_root = transcoders[LAYER].cfg.hook_in
_, clean_cache = model.run_with_cache(tokens[None], stop_at_layer=LAYER + 1)
feature_ids = {n.id for n in full.nodes}


def root_pre(hooks: list) -> float:
    """The root feature's pre-activation with `hooks` applied."""
    with model.hooks(fwd_hooks=hooks):
        _, cache = model.run_with_cache(tokens[None], names_filter=[hook_root], stop_at_layer=LAYER + 1)
    return float(transcoders[LAYER].pre_acts(cache[hook_root][0, -1])[ROOT_FEATURE])


def frozen(name: str) -> tuple:
    """A hook that replaces an activation by its clean value."""
    return name, lambda x, hook: clean_cache[hook.name]


def linear_transcoder(layer: int) -> list:
    """Hooks: MLP `layer`'s output = clean output + the transcoder's response to the change of its input,
    with the clean set of active features (so the error and every on/off decision stay fixed)."""
    tc, seen = transcoders[layer], {}
    u_clean = clean_cache[tc.cfg.hook_in]
    pre_clean, active = tc.pre_acts(u_clean), tc.encode(u_clean) != 0

    def replace(x, hook):
        out = clean_cache[hook.name] + ((tc.pre_acts(seen["u"]) - pre_clean) * active) @ tc.W_dec
        return out + (seen["u"] - u_clean) @ tc.W_skip if tc.W_skip is not None else out

    return [(tc.cfg.hook_in, lambda x, hook: seen.update(u=x)), (tc.cfg.hook_out, replace)]


freeze_norms = [frozen(n) for n in clean_cache if n.endswith(("hook_pattern", "hook_scale"))]
replaced = [h for layer in sorted(transcoders) if layer < LAYER for h in linear_transcoder(layer)]
clean = root_pre([])
tolerance = 1e-4 * max(1.0, abs(root.contrib))  # float32 forward passes and attribution arithmetic: seen ~1e-6


def ablation_check(source: attribution.Node) -> dict[str, float]:
    """Zero-ablate feature `source` at its token in the three models; the attributions and the changes."""
    index = full.index(source.key) if source.key in feature_ids else None
    removed = torch.zeros(1, len(tokens), model.cfg.d_model)
    removed[0, source.pos] = source.activation * transcoders[source.layer].W_dec[source.feature].detach()
    at = transcoders[source.layer].cfg.hook_out
    ablate = (at, lambda x, hook: x - removed)  # registered last: runs after a replacement there
    others = [frozen(n) for n in clean_cache if n.endswith("hook_mlp_out") and n != at]
    return {
        "path": source.contrib,
        "found": sum(p[-1].contrib for p in paths if p[-1].key == source.key),
        "direct_edge": float(full.adjacency[ROOT_ROW, index]) if index is not None else float("nan"),
        "total": full.nodes[index].attribution if index is not None and every_feature else float("nan"),
        "direct": root_pre(freeze_norms + others + [ablate]) - clean,
        "replacement": root_pre(freeze_norms + replaced + [ablate]) - clean,
        "real": root_pre([ablate]) - clean,
    }


def gaps(check: dict[str, float]) -> list[float]:
    """How far each frozen model's change is from its exact prediction (the total only when every
    feature is traced)."""
    out = [abs(check["direct"] + check["direct_edge"])]
    return out + [abs(check["replacement"] + check["total"])] if every_feature else out


def ratio(check: dict[str, float]) -> float:
    """The real model's change over the change the total attribution predicts."""
    return check["real"] / -check["total"] if check["total"] else float("nan")


def survives(check: dict[str, float]) -> bool:
    """The real model moves the root the attributed way, by 0.5x to 2x the total attribution."""
    return 0.5 <= ratio(check) <= 2.0


top_path = max((p for p in paths if p[-1].kind == "feature"), key=lambda p: abs(p[-1].contrib))
source = top_path[-1]
top = ablation_check(source)
print("top path from a feature:", " <- ".join(f"{n.key}[{texts[n.pos]!r}]" for n in top_path))
print(f"source {source.key} {texts[source.pos]!r}, activation {source.activation:.4g}; attributed to the root:")
print(
    f"  the path {top['path']:+.4f}, every path the search found from it {top['found']:+.4f}, "
    f"direct edge {top['direct_edge']:+.4f}, total (every path, full graph) {top['total']:+.4f}"
)
print(f"ablating it moves the root's pre-activation ({clean:+.4f}) by")
for name, predicted, label in (("direct", -top["direct_edge"], "direct (patterns, scales, other MLPs frozen)"),
                               ("replacement", -top["total"], "replacement, linearised")):  # fmt: skip
    print(f"  {label}: {top[name]:+.4f}, predicted {predicted:+.4f} (off by {abs(top[name] - predicted):.1e})")
verdict = "survives" if survives(top) else "does not survive"
print(f"  real model: {top['real']:+.4f} = {ratio(top):.2f} x the attributed total: {verdict}")
if not every_feature:
    print("  (long prompt: not every feature traced, so the total attribution is not checked)")
assert max(gaps(top)) <= tolerance, "an attribution does not match its intervention"

# %% [markdown]
# One path can mislead: the same check for the strongest feature sources of all the paths found.
# The frozen models agree with the attribution exactly every time; the real model shows how far
# the linear picture carries (its MLPs are not the transcoders, and patterns and norms respond).

# %%
sources = {}
for p in sorted(paths, key=lambda p: -abs(p[-1].contrib)):
    if p[-1].kind == "feature" and len(sources) < 6:
        sources.setdefault(p[-1].key, p[-1])
checks = {key: ablation_check(node) for key, node in sources.items()}
print(f"{'source':>12} {'path':>8} {'total':>8} {'linearised':>10} {'real':>8}  real/attributed")
for key, c in checks.items():
    print(
        f"{key:>12} {c['path']:+8.4f} {c['total']:+8.4f} {c['replacement']:+10.4f} {c['real']:+8.4f}  "
        f"{ratio(c):6.2f}{'' if survives(c) else '  x'}"
    )
largest_gap = max(g for c in checks.values() for g in gaps(c))
print(f"{sum(map(survives, checks.values()))} of {len(checks)} survive in the real model (0.5x to 2x, same sign)")
print(f"largest gap between a frozen model and its exact prediction: {largest_gap:.1e} (tolerance {tolerance:.1e})")
assert largest_gap <= tolerance, "an attribution does not match its intervention"

# %% [markdown]
# ## 6. Input-invariant connections
# The pullback `W_dec^(l') f_enc` scores every earlier feature's connection to the root feature
# without any input; the features the trace found often score highly on it.

# %%
for layer in range(LAYER):
    if layer not in transcoders:
        continue
    scores = pullback(transcoders[layer], transcoders[LAYER].W_enc[:, [ROOT_FEATURE]].detach())[0]
    top = set(torch.topk(scores.abs(), 20).indices.tolist())
    found = {n.feature for p in paths for n in p if n.kind == "feature" and n.layer == layer}
    print(f"layer {layer}: {len(found & top)} of the {len(found)} traced features are in the pullback's top 20")
