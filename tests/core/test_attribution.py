"""Feature-vector attribution on tiny random float64 models (docs/method.md section 5).

The references are independent of core.attribution: the real HookedTransformer run with hooks that
freeze attention patterns and normalisation scales (and replace MLPs by transcoders plus a fixed
error), perturbed and differentiated. Tolerances: identities 1e-9 absolute on values of order 1
(the spec asks 1e-6); interventions 1e-5 relative.
"""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from core import attribution as A
from core import paths as P
from core.transcoder import TranscoderConfig, init_transcoder

N_LAYERS = 3
D_MODEL = 16
D_SAE = 24
TOKENS = torch.tensor([0, 5, 17, 3, 9, 22, 11])  # position 0 plays the BOS


# ---------------------------------------------------------------- tiny models


VARIANTS = {
    "ln": dict(norm="LN"),
    "rms": dict(norm="RMS"),
    "rms-gqa": dict(norm="RMS", gqa=True),
    "ln-gqa": dict(norm="LN", gqa=True),
    "ln-folded": dict(norm="LN", fold=True),
    "rms-gqa-folded": dict(norm="RMS", gqa=True, fold=True),
    "ln-parallel": dict(norm="LN", parallel=True),
}


def tiny_model(norm: str = "LN", gqa: bool = False, fold: bool = False, parallel: bool = False, seed: int = 0):
    """A random float64 model; every norm weight and bias is perturbed so no term can hide."""
    cfg = HookedTransformerConfig(
        n_layers=N_LAYERS,
        d_model=D_MODEL,
        n_ctx=16,
        d_head=4,
        n_heads=4,
        d_mlp=32,
        d_vocab=40,
        act_fn="gelu_new" if norm == "LN" else "silu",
        gated_mlp=norm == "RMS",
        normalization_type=norm,
        positional_embedding_type="standard" if norm == "LN" else "rotary",
        n_key_value_heads=2 if gqa else None,
        parallel_attn_mlp=parallel,
        dtype=torch.float64,
        seed=seed,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedTransformer(cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.split(".")[-1]
            if leaf == "w":
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
            elif leaf.startswith("b") or leaf.startswith("_b"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    if fold:
        model.process_weights_(fold_ln=True, center_writing_weights=norm == "LN", center_unembed=False)
    model.eval()
    return model


def tiny_transcoders(layers=range(N_LAYERS), seed: int = 0, activation: str = "relu"):
    """Random transcoders with random biases, about half their features active per token."""
    out = {}
    for layer in layers:
        cfg = TranscoderConfig(
            D_MODEL,
            D_SAE,
            D_MODEL,
            activation=activation,
            k=6,
            hook_in=f"blocks.{layer}.ln2.hook_normalized",
            hook_out=f"blocks.{layer}.hook_mlp_out",
            layer=layer,
        )
        tc = init_transcoder(cfg, seed=seed + layer, dtype=torch.float64)
        gen = torch.Generator().manual_seed(100 + seed + layer)
        with torch.no_grad():
            for name in ("b_enc", "b_dec", "b_dec_out"):
                getattr(tc, name).copy_(0.3 * torch.randn(getattr(tc, name).shape, generator=gen, dtype=torch.float64))
            if tc.threshold is not None:
                tc.threshold.copy_(0.05 * torch.rand(D_SAE, generator=gen, dtype=torch.float64))
        out[layer] = tc.requires_grad_(False)
    return out


@pytest.fixture(scope="module", params=list(VARIANTS))
def setup(request):
    model = tiny_model(**VARIANTS[request.param])
    tcs = tiny_transcoders()
    state = A.prepare(model, tcs, TOKENS)
    return model, tcs, state


# ---------------------------------------------------------------- the independent reference


class Frozen:
    """The real model run with patterns, scales, transcoder errors and (optionally) features frozen."""

    def __init__(self, model, tcs, tokens):
        self.model, self.tcs, self.tokens = model, tcs, tokens[None]
        with torch.no_grad():
            _, cache = model.run_with_cache(self.tokens)
        self.clean = {k: v.detach().clone() for k, v in cache.items()}
        self.err = {}
        for layer, tc in tcs.items():
            out = tc(self.clean[tc.cfg.hook_in])
            self.err[layer] = (self.clean[f"blocks.{layer}.hook_mlp_out"] - out.out).detach()

    def run(self, mlp_add=None, resid0_add=None, live_heads=None, linear_features=False, frozen_features=True):
        """Hooks: freeze patterns and scales; MLP out = transcoder(z) + fixed error with z frozen
        (or responding linearly on its active set); `mlp_add[layer]` adds to an MLP output;
        `live_heads` (a set of (layer, head)) freezes every other head's output."""
        captured = {}
        hooks = []
        for name in self.clean:
            if name.endswith("hook_pattern") or name.endswith("hook_scale"):
                hooks.append((name, lambda x, hook: self.clean[hook.name]))
        for layer, tc in self.tcs.items():
            hooks.append((tc.cfg.hook_in, self._capture(captured, layer)))
            hooks.append((f"blocks.{layer}.hook_mlp_out", self._mlp(layer, captured, mlp_add, linear_features)))
        if resid0_add is not None:
            hooks.append(("blocks.0.hook_resid_pre", lambda x, hook: x + resid0_add))
        if live_heads is not None:
            for layer in range(self.model.cfg.n_layers):
                hooks.append((f"blocks.{layer}.attn.hook_z", self._freeze_heads(layer, live_heads)))
        with torch.no_grad():
            logits = self.model.run_with_hooks(self.tokens, fwd_hooks=hooks)
        return captured, logits[0]

    @staticmethod
    def _capture(captured, layer):
        def hook(x, hook):
            captured[layer] = x[0]
            return x

        return hook

    def _mlp(self, layer, captured, mlp_add, linear_features):
        tc = self.tcs[layer]
        clean_u = self.clean[tc.cfg.hook_in][0]

        def hook(x, hook):
            z = tc(clean_u).feature_acts
            if linear_features:
                pre_now, pre_clean = tc.pre_acts(captured[layer]), tc.pre_acts(clean_u)
                z = z + (pre_now - pre_clean) * (z != 0)
            out = tc.decode(z) + self.err[layer][0]
            if mlp_add is not None and layer in mlp_add:
                out = out + mlp_add[layer]
            return out[None]

        return hook

    def _freeze_heads(self, layer, live):
        def hook(z, hook):
            keep = torch.tensor([(layer, h) in live for h in range(z.shape[2])])
            return torch.where(keep[None, None, :, None], z, self.clean[hook.name])

        return hook

    def feature_pre(self, captured, layer, pos, feature) -> float:
        return float(self.tcs[layer].pre_acts(captured[layer])[pos, feature])


def feature_add(state, layer, pos, feature, delta):
    """An MLP-output perturbation equal to adding `delta` to feature j's activation."""
    add = torch.zeros(state.n_pos, D_MODEL, dtype=torch.float64)
    add[pos] = delta * state.transcoders[layer].W_dec[feature]
    return {layer: add}


def rel_close(actual, expected, rel=1e-5, floor=1e-9):
    return abs(actual - expected) <= rel * max(abs(expected), floor)


# ---------------------------------------------------------------- the frozen state itself


def test_state_matches_the_model(setup):
    """The frozen norms reproduce the transcoder input and the head outputs sum to attn_out."""
    model, tcs, state = setup
    ref = Frozen(model, tcs, TOKENS)
    for layer in range(N_LAYERS):
        x_read = state.resid[state.mlp_read_site(layer)]
        u = ref.clean[f"blocks.{layer}.ln2.hook_normalized"][0]
        torch.testing.assert_close(state.mlp_in[layer].apply(x_read), u, rtol=0, atol=1e-12)
        attn_out = torch.einsum("hts,hsd->td", state.pattern[layer], state.head_out[layer]) + state.b_O[layer]
        torch.testing.assert_close(attn_out, ref.clean[f"blocks.{layer}.hook_attn_out"][0], rtol=0, atol=1e-12)
        mlp = state.z[layer] @ tcs[layer].W_dec + tcs[layer].b_dec_out + state.error[layer]
        torch.testing.assert_close(mlp, ref.clean[f"blocks.{layer}.hook_mlp_out"][0], rtol=0, atol=1e-12)


# ---------------------------------------------------------------- identity 6.1: decomposition


def test_root_decomposition(setup):
    """pre_i = v0 . x_mid + bias, and v0 . x_mid = embedding + every head from every source (BOS too)
    + b_O terms + per earlier layer sum_j z_j (f_dec_j . v0) + b_dec_out . v0 + error . v0."""
    model, tcs, state = setup
    ref = Frozen(model, tcs, TOKENS)
    for layer, pos, feature in [(2, 6, 3), (1, 4, 10), (0, 2, 7), (2, 0, 5)]:
        root = A.feature_root(state, layer, feature, pos)
        pre = float(ref.tcs[layer].pre_acts(ref.clean[f"blocks.{layer}.ln2.hook_normalized"][0])[pos, feature])
        assert abs(root.contrib - pre) < 1e-9
        v0 = root.vector
        terms = float(state.resid[0, pos] @ v0) + root.const
        for lower in range(layer + (0 if state.parallel else 1)):  # attention L feeds resid_mid L
            heads = state.pattern[lower, :, pos, : pos + 1, None] * state.head_out[lower, :, : pos + 1]
            terms += float(heads.sum((0, 1)) @ v0) + float(state.b_O[lower] @ v0)
        for lower in range(layer):
            tc = tcs[lower]
            z = tc(ref.clean[f"blocks.{lower}.ln2.hook_normalized"][0]).feature_acts[pos]
            terms += float(z @ (tc.W_dec @ v0)) + float(tc.b_dec_out @ v0) + float(ref.err[lower][0, pos] @ v0)
        assert abs(terms - pre) < 1e-9
        assert abs(A.children(state, root).total() - pre) < 1e-9


def test_every_child_value_equals_its_contribution(setup):
    """For every child (all features, heads, sources, embedding) of the root and of grandchildren,
    vector . x[site, pos] + const equals the contribution computed from activations and patterns."""
    _, _, state = setup
    root = A.feature_root(state, 2, 3, 6)
    frontier = [root]
    for _ in range(2):
        nxt = []
        for node in frontier:
            ch = A.children(state, node)
            assert abs(ch.total() - node.contrib) < 1e-9
            for cand in P.candidates(state, node, ch, skip_bos=False):
                child = A.make_child(state, node, cand)
                value = float(child.vector @ state.resid[child.site, child.pos]) + child.const
                assert abs(value - child.contrib) < 1e-9, (cand, value)
                nxt.append(child)
        frontier = [n for n in nxt if n.kind != "embed"][:6]


def test_batched_children_equal_naive_loop(setup):
    """children() (batched over features, heads, sources) equals a per-component loop."""
    _, tcs, state = setup
    root = A.feature_root(state, 2, 3, 5)
    ch = A.children(state, root)
    v, t = root.vector, root.pos
    for layer, contribs in ch.features.items():
        for j in range(D_SAE):
            naive = float(state.z[layer][t, j]) * float(tcs[layer].W_dec[j] @ v)
            assert abs(float(contribs[j]) - naive) < 1e-12
    for layer, contribs in ch.heads.items():
        assert contribs.shape == (4, t + 1)
        for h, s in itertools.product(range(4), range(t + 1)):
            naive = float(state.pattern[layer, h, t, s]) * float(state.head_out[layer, h, s] @ v)
            assert abs(float(contribs[h, s]) - naive) < 1e-12
    every = P.candidates(state, root, ch, skip_bos=False)
    best = P.candidates(state, root, ch, skip_bos=False, k=5)
    assert P.top_candidates(best, 5) == P.top_candidates(every, 5)


# ---------------------------------------------------------------- identity 6.2: attribution = intervention


@pytest.mark.parametrize("which", ["same_token", "through_head", "embedding"])
def test_attribution_equals_intervention(setup, which):
    """Adding delta to the source changes the root's pre-activation by delta x edge weight, with
    patterns and scales frozen, MLPs replaced by transcoders plus fixed errors, other features frozen
    and (to isolate one edge) every head but the traced one frozen."""
    model, tcs, state = setup
    ref = Frozen(model, tcs, TOKENS)
    root = A.feature_root(state, 2, 3, 6)
    delta = 1e-3
    if which == "same_token":
        cands = [c for c in P.candidates(state, root, A.children(state, root)) if c.kind == "feature"]
        cand = max(cands, key=lambda c: abs(c.contrib))
        child = A.make_child(state, root, cand)
        captured, _ = ref.run(mlp_add=feature_add(state, cand.layer, 6, cand.index, delta), live_heads=set())
        expected_per_unit = child.contrib / child.activation
    elif which == "through_head":
        cands = P.candidates(state, root, A.children(state, root))
        heads = [c for c in cands if c.kind == "head" and c.src != 6 and c.layer >= 1]
        head = max(heads, key=lambda c: abs(c.contrib))
        head_node = A.make_child(state, root, head)
        ch = A.children(state, head_node)
        feats = [c for c in P.candidates(state, head_node, ch) if c.kind == "feature"]
        cand = max(feats, key=lambda c: abs(c.contrib))
        child = A.make_child(state, head_node, cand)
        add = feature_add(state, cand.layer, head.src, cand.index, delta)
        captured, _ = ref.run(mlp_add=add, live_heads={(head.layer, head.index)})
        expected_per_unit = child.contrib / child.activation
    else:
        embed = A.make_child(state, root, A.Candidate("embed", -1, -1, 6, A.children(state, root).embed))
        add = torch.zeros(1, state.n_pos, D_MODEL, dtype=torch.float64)
        add[0, 6] = delta * state.resid[0, 6]
        captured, _ = ref.run(resid0_add=add, live_heads=set())
        expected_per_unit = embed.contrib
    change = ref.feature_pre(captured, 2, 6, 3) - root.contrib
    assert rel_close(change, delta * expected_per_unit), (change, delta * expected_per_unit)
    assert abs(expected_per_unit) > 1e-6  # the edge is not trivially zero


def test_path_contributions_are_linear_in_the_source(setup):
    """A two-hop path (feature -> head -> feature -> root) scales exactly with its source feature."""
    model, tcs, state = setup
    ref = Frozen(model, tcs, TOKENS)
    root = A.feature_root(state, 2, 3, 6)
    cands = [c for c in P.candidates(state, root, A.children(state, root)) if c.kind == "feature" and c.layer == 1]
    mid = A.make_child(state, root, max(cands, key=lambda c: abs(c.contrib)))
    below = [c for c in P.candidates(state, mid, A.children(state, mid)) if c.kind == "feature" and c.layer == 0]
    leaf = A.make_child(state, mid, max(below, key=lambda c: abs(c.contrib)))
    # only the middle feature responds (linearly); everything else frozen; no heads
    delta = 1e-3
    add = feature_add(state, 0, 6, leaf.feature, delta)
    captured, _ = ref.run(mlp_add=add, live_heads=set())
    d_mid = (ref.feature_pre(captured, 1, 6, mid.feature)) - float(state.pre[1][6, mid.feature])
    both = {**add, **feature_add(state, 1, 6, mid.feature, d_mid)}  # the middle feature follows its input
    captured, _ = ref.run(mlp_add=both, live_heads=set())
    change = (ref.feature_pre(captured, 2, 6, 3)) - root.contrib
    direct = A.children(state, root).features[0][leaf.feature] / leaf.activation  # the direct residual edge
    assert rel_close(change, delta * (leaf.contrib / leaf.activation + float(direct)))


# ---------------------------------------------------------------- roots


def test_logit_root_equals_the_logit_difference(setup):
    model, tcs, state = setup
    ref = Frozen(model, tcs, TOKENS)
    root = A.logit_root(state, 7, 12, pos=-1)
    with torch.no_grad():
        out = model(TOKENS[None])[0, -1]
    assert abs(root.contrib - float(out[7] - out[12])) < 1e-9
    assert abs(A.children(state, root).total() - root.contrib) < 1e-9
    # the logit edge through the frozen ln_final matches an intervention at the last MLP
    cand = max(
        (c for c in P.candidates(state, root, A.children(state, root)) if c.kind == "feature"),
        key=lambda c: abs(c.contrib),
    )
    child = A.make_child(state, root, cand)
    captured, logits = ref.run(mlp_add=feature_add(state, cand.layer, 6, cand.index, 1e-3), live_heads=set())
    change = float(logits[-1, 7] - logits[-1, 12]) - root.contrib
    assert rel_close(change, 1e-3 * child.contrib / child.activation)


def test_frozen_norm_matches_the_papers_constant_on_rms_and_centred_models():
    """With RMSNorm (or a centred residual stream) the pullback is the paper's c * f_enc."""
    for variant in ("rms-gqa-folded", "ln-folded"):
        model = tiny_model(**VARIANTS[variant])
        tcs = tiny_transcoders()
        state = A.prepare(model, tcs, TOKENS)
        root = A.feature_root(state, 1, 4, 5)
        f = tcs[1].W_enc[:, 4]
        x = state.resid[state.mlp_read_site(1)]
        c = float(f @ state.mlp_in[1].apply(x)[5]) / float(f @ x[5])
        paper = c * f
        if state.mlp_in[1].center:  # equal up to the all-ones direction, which a centred residual never reads
            paper = paper - paper.mean()
        # TL's centring leaves the folded LayerNorm residual's mean at ~1e-8, hence rtol 1e-6
        torch.testing.assert_close(root.vector, paper, rtol=1e-6, atol=1e-9)


def test_bad_roots_say_what_is_wrong():
    model = tiny_model()
    state = A.prepare(model, tiny_transcoders(layers=[0, 1]), TOKENS, max_layer=1)
    with pytest.raises(A.AttributionError, match="feature 99 is out of range"):
        A.feature_root(state, 1, 99)
    with pytest.raises(A.AttributionError, match="layer 2 has no transcoder"):
        A.feature_root(state, 2, 0)
    with pytest.raises(A.AttributionError, match="position 7 is out of range"):
        A.feature_root(state, 1, 0, pos=7)
    with pytest.raises(A.AttributionError, match="logit roots need the whole model"):
        A.logit_root(state, 3)


def test_missing_transcoder_layer_is_a_frozen_error_term():
    model = tiny_model()
    state = A.prepare(model, tiny_transcoders(layers=[0, 2]), TOKENS)
    root = A.feature_root(state, 2, 3, 6)
    ch = A.children(state, root)
    assert set(ch.features) == {0}
    assert abs(ch.error[1] - float(state.mlp_out[1, 6] @ root.vector)) < 1e-12
    assert abs(ch.total() - root.contrib) < 1e-9


@pytest.mark.parametrize("activation", ["topk", "jumprelu"])
def test_other_activations_decompose(activation):
    model = tiny_model("RMS", gqa=True)
    state = A.prepare(model, tiny_transcoders(activation=activation), TOKENS)
    root = A.feature_root(state, 2, 1, 6)
    assert abs(A.children(state, root).total() - root.contrib) < 1e-9
    for path in P.find_paths(state, root, 2, 5):
        node = path[-1]
        assert abs(float(node.vector @ state.resid[node.site, node.pos]) + node.const - node.contrib) < 1e-9


# ---------------------------------------------------------------- path search and graph


@pytest.fixture(scope="module")
def ln_state():
    model = tiny_model()
    return A.prepare(model, tiny_transcoders(), TOKENS)


def test_beam_search_keeps_the_best_extensions(ln_state):
    state = ln_state
    root = A.feature_root(state, 2, 3, 6)
    paths = P.find_paths(state, root, num_iters=3, num_branches=4)
    lengths = [len(p) for p in paths]
    assert lengths == sorted(lengths) and set(lengths) <= {2, 3, 4}
    first = [p for p in paths if len(p) == 2]
    # iteration 1 keeps the 4 children of the root with the largest |contrib|
    every = P.candidates(state, root, A.children(state, root))
    best = sorted((abs(c.contrib) for c in every), reverse=True)[:4]
    assert [abs(p[-1].contrib) for p in first] == pytest.approx(best, rel=1e-12)
    # every path of iteration 2 extends a path of iteration 1 and is among the best pooled ones
    second = [p for p in paths if len(p) == 3]
    assert all(p[:2] in [q for q in first] for p in second)
    pool = [
        abs(c.contrib)
        for q in first
        if not P.is_leaf(q[-1])
        for c in P.candidates(state, q[-1], A.children(state, q[-1]))
    ]
    assert min(abs(p[-1].contrib) for p in second) >= sorted(pool, reverse=True)[len(second) - 1] - 1e-12
    assert all(not P.is_leaf(p[-2]) for p in paths if len(p) > 2)


def test_signed_ranking_and_bos_skipping(ln_state):
    state = ln_state
    root = A.feature_root(state, 2, 3, 6)
    signed = P.find_paths(state, root, 1, 6, signed=True)
    values = [p[-1].contrib for p in signed]
    assert values == sorted(values, reverse=True)
    absolute = P.find_paths(state, root, 1, 30, skip_bos=True)
    assert not any(p[-1].kind == "head" and p[-1].pos == 0 for p in absolute)
    with_bos = P.candidates(state, root, A.children(state, root), skip_bos=False)
    assert any(c.kind == "head" and c.src == 0 for c in with_bos)


def test_path_filters(ln_state):
    state = ln_state
    root = A.feature_root(state, 2, 3, 6)
    paths = P.find_paths(state, root, 3, 6)
    target = next(p[-1] for p in paths if p[-1].kind == "feature")
    pattern = P.NodePattern.parse(f"F{target.layer}.{target.feature}@{target.pos}")
    through = P.filter_paths(paths, through=[pattern])
    avoid = P.filter_paths(paths, not_through=[pattern])
    assert through and all(any(pattern.matches(n) for n in p) for p in through)
    assert len(through) + len(avoid) == len(paths)
    assert P.NodePattern.parse("H1.2") == P.NodePattern("head", 1, None, head=2)
    assert P.NodePattern.parse("F2") == P.NodePattern("feature", 2) and P.NodePattern.parse("H") == P.NodePattern(
        "head"
    )
    for bad in ("E1", "F1.", "H1.2.3"):
        with pytest.raises(A.AttributionError, match="node pattern"):
            P.NodePattern.parse(bad)
    with pytest.raises(A.AttributionError, match="node pattern"):
        P.NodePattern.parse("X1")


def test_graph_merge_sums_exactly(ln_state):
    """Every expanded node's incoming edges (children, error, bias, prune error) sum to its
    attribution; merged attributions are sums over distinct prefixes."""
    state = ln_state
    root = A.feature_root(state, 2, 3, 6)
    result = P.trace(state, root, num_iters=3, num_branches=6)
    circuit = result.circuit
    ids = [n.id for n in circuit.nodes]
    assert len(ids) == len(set(ids))
    expanded = {e.target for e in circuit.edges}
    for nid in expanded:
        node = circuit.node(nid)
        incoming = sum(e.weight for e in circuit.incoming(nid))
        assert abs(incoming - node.attribution) < 1e-9
        kinds = {circuit.node(e.source).kind for e in circuit.incoming(nid)}
        assert {"error", "bias", "prune_error"} <= kinds
    assert abs(circuit.node("root").attribution - root.contrib) < 1e-12
    # a node reached by several prefixes carries their summed contribution
    prefixes = {}
    for path in result.paths:
        for j in range(1, len(path)):
            prefixes[tuple(n.key for n in path[: j + 1])] = path[j].contrib
    for node in circuit.nodes:
        if node.kind in ("feature", "head", "embed"):
            total = sum(c for k, c in prefixes.items() if k[-1] == node.id)
            assert abs(total - node.attribution) < 1e-12


def test_prune_error_is_what_the_search_left_out(ln_state):
    """The prune error of the root equals the sum of its children that are not in the graph."""
    state = ln_state
    root = A.feature_root(state, 2, 3, 6)
    circuit = P.trace(state, root, num_iters=1, num_branches=3).circuit
    ch = A.children(state, root)
    kept = {e.source for e in circuit.incoming("root")}
    left_out = 0.0
    for c in P.candidates(state, root, ch, skip_bos=False):
        child = A.make_child(state, root, c)
        if child.key not in kept:
            left_out += c.contrib
    prune = circuit.node("root|prune_error").attribution
    assert abs(prune - left_out) < 1e-9
    assert math.isfinite(prune)
