# %% [markdown]
# # Case study: what drives a layer-3 feature, and what does it do?
#
# The loop of the original transcoder-circuits case studies, on the store of the latest run of
# `circuitflow run` (bundled SmolLM2-135M, transcoders on layers 0-3):
#
# 1. pick a layer-3 feature and read its dashboard (examples, promoted tokens);
# 2. state a hypothesis from its examples and its traced graph: which earlier features drive it;
# 3. check the hypothesis with dataset-level attribution: the mean attribution the feature receives
#    from each upstream source over the held-out contexts where it fires;
# 4. confirm or refute it with interventions: ablate the top upstream features (against a control
#    of other active features), then steer the feature and generate.
#
# Every number it prints is computed here; the conclusion is derived from those numbers. Run it as
# `python examples/case_study.py [STORE]` (default `$CIRCUITFLOW_STORE`, else `./store`) or open it
# as a notebook (percent format).

# %%
import json
import os
import random
import sys
from pathlib import Path

import torch

from core import attribution
from core.config import from_dict
from core.interventions import HeadAblation, Spliced, Steering, ablate_feature, generate
from core.model import load_model
from storage import catalog, layout
from storage.tables import read_tokens
from tasks.trace import encode_prompt, load_transcoders

torch.set_num_threads(int(os.environ.get("CIRCUITFLOW_THREADS", "2")))
torch.set_grad_enabled(False)
arguments = sys.argv[1:] if Path(sys.argv[0]).name == "case_study.py" else []  # not a notebook kernel's argv
STORE = Path(arguments[0] if arguments else os.environ.get("CIRCUITFLOW_STORE", "./store")).resolve()
try:
    run = json.loads((STORE / "runs" / "latest.json").read_text())
except FileNotFoundError:
    raise SystemExit(f"{STORE}: no runs/latest.json; run `circuitflow run configs/default.yaml` first") from None
cfg, plan = from_dict(run["config"]), run["plan"]
LAYER, MAX_CONTEXTS, TOP = 3, 6, 3
model = load_model(cfg.model.name, device=cfg.model.device, dtype=cfg.model.dtype)
transcoders = load_transcoders(cfg, plan)
con = catalog.connect(STORE)
decode = model.tokenizer.decode
print(f"store {STORE}: model {cfg.model.name}, transcoder layers {sorted(transcoders)}")

# %% [markdown]
# ## 1. The feature and its dashboard
# The feature is the layer-3 root the pipeline's trace stage traced (so its graph exists); without a
# trace, the most frequent live layer-3 feature.

# %%
trace_dir = layout.stage_dir(STORE, "trace", plan.get("trace") or "none")
roots = json.loads((trace_dir / layout.MANIFEST).read_text())["roots"] if layout.is_complete(trace_dir) else []
root_info = next((r for r in roots if r["layer"] == LAYER), None)
if root_info is not None:
    FEATURE = int(root_info["feature"])
else:
    FEATURE = con.execute(
        "select feature from feature_stats where layer = ? order by n_fired desc limit 1", [LAYER]
    ).fetchone()[0]
n_fired, freq, max_act = con.execute(
    "select n_fired, freq, max_act from feature_stats where layer = ? and feature = ?", [LAYER, FEATURE]
).fetchone()
print(f"feature {LAYER}:{FEATURE}: fires on {n_fired} held-out tokens ({freq:.2%}), max activation {max_act:.3g}")
for rank, act, text in con.execute(
    "select rank, act, context(row, pos) from top_examples where layer = ? and feature = ? and band = -1 order by rank",
    [LAYER, FEATURE],
).fetchall():
    print(f"  top #{rank} act {act:5.2f}  {text!r}")
promoted = [
    t
    for (t,) in con.execute(
        "select token from feature_views where layer = ? and feature = ? and view = 'logit_top' order by rank",
        [LAYER, FEATURE],
    ).fetchall()
]
print("tokens its decoder promotes most (logit lens):", [decode([t]) for t in promoted])

# %% [markdown]
# ## 2. A hypothesis from the examples and the graph
# The traced graph (full attribution graph of the trace stage) names the earlier transcoder features
# with the largest attribution to the feature on the traced prompt.

# %%
if root_info is not None:
    graph_sources = con.execute(
        "select layer, feature, attribution from nodes where graph = 'full' and kind = 'feature' "
        "order by abs(attribution) desc limit ?",
        [TOP],
    ).fetchall()
    terms = root_info.get("full", {}).get("root_terms", {})
    print(
        f"traced on {root_info['prompt']!r}; the root's value splits into", {k: round(v, 3) for k, v in terms.items()}
    )
else:
    graph_sources, terms = [], {}
hypothesis = [(int(a), int(b)) for a, b, _ in graph_sources]
print(
    f"HYPOTHESIS: {LAYER}:{FEATURE} is driven by the earlier features {[f'{a}:{b}' for a, b in hypothesis]} "
    "(its strongest feature sources in the graph); ablating them removes a large part of its activation "
    "wherever it fires."
)

# %% [markdown]
# ## 3. Dataset-level attribution
# Over the held-out contexts where the feature fires (its strongest `MAX_CONTEXTS` firings in the mined
# `feature_acts`), the mean direct attribution the feature receives from each upstream source: every
# earlier transcoder feature at its token, every attention head (summed over source tokens), the
# embedding and the transcoder errors. It is computed here context by context with `core.attribution`
# (the decomposition the pipeline's `feature_inputs` stage averages). When the store has the
# `feature_inputs` table for this feature, the table's means are used, and checked against the
# recomputation when they cover as many contexts (the strongest firings, in both).

# %%
rows = read_tokens(layout.stage_dir(STORE, "tokens", plan["tokens_mine"]) / "tokens.parquet")
contexts = con.execute(
    "select row, pos, act from feature_acts where layer = ? and feature = ? order by act desc limit ?",
    [LAYER, FEATURE, MAX_CONTEXTS],
).fetchall()
sums: dict[tuple[str, int, int], float] = {}
for row, pos, _ in contexts:
    state = attribution.prepare(model, transcoders, torch.tensor(rows[row, : pos + 1]), max_layer=LAYER)
    ch = attribution.children(state, attribution.feature_root(state, LAYER, FEATURE, pos))
    parts = {("feature", layer, j): float(v) for layer, c in ch.features.items() for j, v in enumerate(c) if v != 0}
    parts |= {("head", layer, h): float(v) for layer, c in ch.heads.items() for h, v in enumerate(c.sum(-1))}
    parts |= {("error", layer, -1): v for layer, v in ch.error.items()} | {("embed", -1, -1): ch.embed}
    for key, value in parts.items():
        sums[key] = sums.get(key, 0.0) + value
mean = {key: value / len(contexts) for key, value in sums.items()}
recomputed = mean
has_table = "feature_inputs" in catalog.view_sources(STORE)
stored = (
    con.execute(
        "select source_kind, source_layer, source_index, mean, contexts from feature_inputs "
        "where layer = ? and feature = ?",
        [LAYER, FEATURE],
    ).fetchall()
    if has_table
    else []
)
if stored:
    mean = {(k, int(a), int(b)): float(m) for k, a, b, m, _ in stored}
    source_of_means = f"the feature_inputs table, {stored[0][4]} contexts"
    if stored[0][4] == len(contexts):  # the same strongest contexts: the table must equal the recomputation
        gap = max(abs(mean.get(k, 0.0) - v) for k, v in recomputed.items())
        print(f"feature_inputs vs the per-context recomputation here: largest |difference| {gap:.2e}")
else:
    source_of_means = f"per-context attribution computed here over {len(contexts)} contexts (no feature_inputs table)"
by_kind = {}
for (kind, _, _), value in mean.items():
    by_kind[kind] = by_kind.get(kind, 0.0) + value
print(f"mean attribution by source kind ({source_of_means}):", {k: round(v, 3) for k, v in by_kind.items()})
features_ranked = sorted((k for k in mean if k[0] == "feature"), key=lambda k: -mean[k])
top_sources = [(layer, j) for _, layer, j in features_ranked[:TOP]]
for kind, layer, j in features_ranked[:6]:
    print(f"  {layer}:{j}  mean attribution {mean[(kind, layer, j)]:+.4f}")
overlap = sorted(set(hypothesis) & set(top_sources))
print(f"graph sources {hypothesis} vs dataset top {top_sources}: {len(overlap)} in common")
feature_share = by_kind.get("feature", 0.0) / max(sum(abs(v) for v in by_kind.values()), 1e-9)
print(f"upstream features carry {feature_share:+.1%} of the mean attribution (signed share of the total |.|)")

# %% [markdown]
# ## 4. Interventions
# In each context, the real model with the transcoders spliced in (attention and norms recomputed):
# the dataset's top upstream features are zero-ablated at the feature's token, and, as a control,
# as many other upstream features active there (drawn with a fixed seed). The feature's activation
# drop is compared with the linearised prediction (the same ablation with attention, norm scales and
# errors frozen). The attention head with the largest mean attribution is ablated too (at the
# feature's token), since heads carry much of the attribution on small stores. Only layers 0-3 run.

# %%
rng = random.Random(0)
drops = {"top": [], "control": [], "linearised": [], "head": []}
top_head = max((k for k in mean if k[0] == "head"), key=lambda k: mean[k], default=None)
for row, pos, _act in contexts:
    spliced = Spliced(model, transcoders, torch.tensor(rows[row, : pos + 1]), max_layer=LAYER)
    top = [ablate_feature(layer, j, pos) for layer, j in top_sources]
    active = [
        (layer, int(j))
        for layer, z in spliced.clean_acts.items()
        if layer < LAYER
        for j in torch.nonzero(z[pos]).flatten()
        if (layer, int(j)) not in top_sources
    ]
    control = [ablate_feature(layer, j, pos) for layer, j in rng.sample(active, min(TOP, len(active)))]
    clean = float(spliced.clean_acts[LAYER][pos, FEATURE])
    head = [HeadAblation(top_head[1], top_head[2], pos)] if top_head else []
    runs = (("top", top, False), ("control", control, False), ("linearised", top, True), ("head", head, False))
    for name, ivs, frozen in runs:
        after = spliced.run(ivs, frozen=frozen).acts[LAYER][pos, FEATURE]
        drops[name].append(1 - float(after) / clean)
mean_drop = {k: sum(v) / len(v) for k, v in drops.items()}
print(f"ablating the top {TOP} upstream features at the feature's token, over {len(contexts)} contexts:")
print(f"  activation removed: {mean_drop['top']:.1%} (linearised prediction {mean_drop['linearised']:.1%})")
print(f"  control ({TOP} other active upstream features): {mean_drop['control']:.1%}")
if top_head:
    print(
        f"ablating head {top_head[1]}.{top_head[2]} (mean attribution {mean[top_head]:+.3f}): {mean_drop['head']:.1%} removed"
    )

# %% [markdown]
# Steering: the feature's decoder row is added at layer 3 on every token of a neutral prompt, with
# strengths of 2, 8 and 32 times the feature's largest activation; does the model now say the tokens
# the feature promotes? Generation uses the strongest.

# %%
PROMPT = "The function returns"
tokens = encode_prompt(cfg, PROMPT).tokens
spliced = Spliced(model, transcoders, tokens)
p_clean = float(torch.softmax(spliced.clean_logits[-1], -1)[promoted].sum()) if promoted else 0.0
print(f"probability of its {len(promoted)} promoted tokens after {PROMPT!r}: clean {p_clean:.4f}")
for factor in (2, 8, 32):
    steer = [Steering(LAYER, FEATURE, factor * float(max_act))]
    steered = spliced.run(steer)
    p_steer = float(torch.softmax(steered.logits[-1], -1)[promoted].sum()) if promoted else 0.0
    print(f"  steered by {factor:2d} x max activation: {p_steer:.4f} (KL {steered.kl():.3f} nats)")
n = len(tokens)
text_clean = decode(generate(model, transcoders, tokens, (), 12)[n:].tolist())
text_steer = decode(generate(model, transcoders, tokens, steer, 12)[n:].tolist())
print(f"  clean:   {PROMPT}{text_clean!r}")
print(f"  steered: {PROMPT}{text_steer!r}")

# %% [markdown]
# ## Conclusion
# Supported when the top upstream features remove at least half of the activation and at least twice
# what the control removes; refuted otherwise. The steering result is reported beside it.

# %%
supported = mean_drop["top"] >= 0.5 and mean_drop["top"] >= 2 * max(mean_drop["control"], 0.0)
verdict = "SUPPORTED" if supported else "REFUTED"
print(
    f"CONCLUSION: the hypothesis is {verdict}: ablating the top {TOP} upstream features removes "
    f"{mean_drop['top']:.1%} of {LAYER}:{FEATURE}'s activation (control {mean_drop['control']:.1%}, "
    f"threshold 50% and 2x the control); upstream features carry {feature_share:+.1%} of its mean attribution "
    f"(errors {by_kind.get('error', 0.0):+.3f}, heads {by_kind.get('head', 0.0):+.3f}, embedding "
    f"{by_kind.get('embed', 0.0):+.3f}); the top head alone removes {mean_drop['head']:.1%}. Steering it {'raises' if p_steer > p_clean else 'does not raise'} the "
    f"probability of its promoted tokens ({p_clean:.4f} -> {p_steer:.4f} at {factor} x its max activation)."
)
