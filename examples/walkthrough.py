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
# 4. trace the feature on a prompt where it fires: path search, filters, graph with error nodes,
#    and the full attribution graph;
# 5. check the top edge by ablation, frozen (exact) and in the real model (approximate);
# 6. an input-invariant view of the same edges: the pullback onto earlier transcoders.
#
# It reads the store of the latest run: `CIRCUITFLOW_STORE` (default `./store`). Open it in
# Jupyter/VS Code as a notebook (percent format) or run it: `python examples/walkthrough.py`.

# %%
import json
import os
from pathlib import Path

import numpy as np
import torch

from core import attribution, graph
from core.config import from_dict
from core.metrics import splice_eval, splice_hooks
from core.model import load_model
from core.views import pullback
from storage import catalog, layout
from storage.graphs import GraphRecord, write_graphs
from storage.tables import read_tokens
from tasks.trace import load_transcoders

torch.set_num_threads(int(os.environ.get("CIRCUITFLOW_THREADS", "2")))
torch.set_grad_enabled(False)
STORE = Path(os.environ.get("CIRCUITFLOW_STORE", "./store")).resolve()
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
    print(f"layer {layer}: d_sae {tc.cfg.d_sae}, {tc.cfg.hook_in} -> {tc.cfg.hook_out}")
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
FEATURE, FREQ, MAX_ACT = con.execute(  # a live feature firing on about 1% of tokens
    "select feature, freq, max_act from feature_stats where layer = ? and n_fired >= 20 "
    "order by abs(log10(freq) + 2), max_act desc limit 1",
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
prompt_tokens = torch.tensor(rows[top_row, : top_pos + 1], dtype=torch.long)
hook = transcoders[LAYER].cfg.hook_in


def feature_activation(hooks: list) -> float:
    """The feature's activation at the last prompt token with `hooks` applied."""
    with model.hooks(fwd_hooks=hooks):
        _, cache = model.run_with_cache(prompt_tokens[None], names_filter=[hook], stop_at_layer=LAYER + 1)
    return float(transcoders[LAYER].encode(cache[hook][0, -1])[FEATURE])


print(f"clean: {feature_activation([]):.4g} (mined: {top_act:.4g})")
for layer in range(LAYER):
    print(f"MLP {layer} replaced: {feature_activation(splice_hooks({layer: transcoders[layer]}, first_pos=1)):.4g}")

# %%
ce = splice_eval(model, torch.tensor(rows[:8], dtype=torch.long), transcoders, batch_rows=4, first_pos=1)
print(
    f"CE clean {ce.ce_clean:.3f}, all {len(transcoders)} transcoders {ce.ce_spliced:.3f}, "
    f"zero-ablated {ce.ce_zero:.3f}; CE recovered {ce.ce_recovered:.1%}, KL {ce.kl:.3f} nats"
)

# %% [markdown]
# ## 4. Tracing the feature
# Feature-vector propagation (paper App. D): attention patterns and normalisation scales are
# frozen, so every node's contribution is exact and its children (features, attention heads per
# source token, the embedding, error and bias terms) sum to it. The beam search keeps the 15 best
# paths per step for 3 steps, ranking by |contribution|.

# %%
state = attribution.prepare(model, transcoders, prompt_tokens, max_layer=LAYER)
root = attribution.feature_root(state, LAYER, FEATURE, -1)
texts = [model.tokenizer.decode([int(t)]) for t in prompt_tokens]
print(f"root {root.label} {texts[-1]!r}: pre-activation {root.contrib:.4g}, activation {root.activation:.4g}")
paths = attribution.find_paths(state, root, num_iters=3, num_branches=15)
for path in sorted(paths, key=lambda p: -abs(p[-1].contrib))[:10]:
    print(f"{path[-1].contrib:+8.4f}  " + " <- ".join(f"{n.key}[{texts[n.pos]!r}]" for n in path[1:]))

# %% [markdown]
# Filters keep the paths through (or not through) given nodes, e.g. everything that reaches the
# root through attention from another token:

# %%
through_heads = attribution.filter_paths(paths, through=[attribution.NodePattern(kind="head")])
print(f"{len(through_heads)} of {len(paths)} paths go through an attention head")

# %% [markdown]
# Merging the paths gives a graph whose every expanded node carries error nodes: the transcoder
# error below it, its bias terms, and the prune error (what the search left out), so its incoming
# edges sum exactly to its attribution.

# %%
circuit = attribution.paths_to_graph(state, [(root,)] + paths)
for edge in circuit.incoming("root"):
    print(f"{edge.source:>24} -> root  {edge.weight:+.4f}")
total = sum(e.weight for e in circuit.incoming("root"))
print(f"sum of the root's incoming edges {total:.5f} = its pre-activation {root.contrib:.5f}")

# %%
full = graph.full_graph(state, [root], max_features=cfg.trace.max_features)
pruned = graph.prune_graph(full, cfg.trace.node_threshold, cfg.trace.edge_threshold)
full_circuit = graph.to_circuit(full, pruned)
print(
    f"full graph: {full.n_features} features traced; kept {len(full_circuit.nodes)} nodes, {len(full_circuit.edges)} edges"
)
print("root =", {k: round(v, 4) for k, v in full_circuit.meta["root_terms"].items()})
out = Path(os.environ.get("CIRCUITFLOW_WALKTHROUGH_OUT", STORE / "walkthrough"))
records = [
    GraphRecord(0, "paths", circuit, texts, repr(texts)),
    GraphRecord(0, "full", full_circuit, texts, repr(texts)),
]
print("open", write_graphs(records, out)["graph.html"])

# %% [markdown]
# ## 5. Checking the top edge by ablation
# The strongest feature child of the root is zero-ablated (its decoder output removed from its
# MLP's output at that token). With patterns, scales and every other MLP output frozen, the root
# moves by exactly minus the feature's direct edge in the full graph (the residual path the path
# search found plus the attention routes from that token to itself); in the real model, where
# everything downstream responds, roughly so.

# %%
child = max((p[1] for p in paths if p[1].kind == "feature"), key=lambda n: abs(n.contrib))
tc = transcoders[child.layer]
removed = torch.zeros(1, len(prompt_tokens), model.cfg.d_model)
removed[0, child.pos] = child.activation * tc.W_dec[child.feature].detach()


def root_pre(hooks: list) -> float:
    with model.hooks(fwd_hooks=hooks):
        _, cache = model.run_with_cache(prompt_tokens[None], names_filter=[hook], stop_at_layer=LAYER + 1)
    return float(transcoders[LAYER].pre_acts(cache[hook][0, -1])[FEATURE])


ablated = f"blocks.{child.layer}.hook_mlp_out"
ablate = [(ablated, lambda x, hook: x - removed)]
clean = root_pre([])
_, frozen_cache = model.run_with_cache(prompt_tokens[None], stop_at_layer=LAYER + 1)
freeze = [
    (name, lambda x, hook: frozen_cache[hook.name])
    for name in frozen_cache
    if name.endswith(("hook_pattern", "hook_scale")) or (name.endswith("hook_mlp_out") and name != ablated)
]
frozen_change = root_pre(ablate + freeze) - clean
free_change = root_pre(ablate) - clean
ids = [n.id for n in full.nodes]
edge = float(full.adjacency[-1, ids.index(child.key)]) if child.key in ids else float("nan")
print(f"ablating {child.key} {texts[child.pos]!r} (activation {child.activation:.4g}):")
print(f"  attributed: residual path {child.contrib:+.4f}, every direct route (full-graph edge) {edge:+.4f}")
print(f"  frozen model: root moves {frozen_change:+.4f} (expected {-edge:+.4f}); real model: {free_change:+.4f}")
if np.isfinite(edge):
    assert abs(frozen_change + edge) <= 1e-3 * max(1.0, abs(edge)), "attribution does not match the intervention"

# %% [markdown]
# ## 6. Input-invariant connections
# The pullback `W_dec^(l') f_enc` scores every earlier feature's connection to the root feature
# without any input; the features the trace found should score highly on it.

# %%
for layer in range(LAYER):
    scores = pullback(transcoders[layer], transcoders[LAYER].W_enc[:, [FEATURE]].detach())[0]
    top = set(torch.topk(scores.abs(), 20).indices.tolist())
    found = {n.feature for p in paths for n in p if n.kind == "feature" and n.layer == layer}
    print(f"layer {layer}: {len(found & top)} of the {len(found)} traced features are in the pullback's top 20")
