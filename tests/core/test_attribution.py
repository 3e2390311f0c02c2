"""Feature-vector attribution on tiny random float64 models (docs/method.md section 5).

The references are independent of core.attribution: the real HookedTransformer run with hooks that
freeze attention patterns and normalisation scales (and replace MLPs by transcoders plus a fixed
error), perturbed and differentiated. Tolerances: identities 1e-9 absolute on values of order 1
(the spec asks 1e-6); interventions 1e-5 relative.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from core import attribution as A
from core import paths as P
from tests.core.attribution_models import (
    D_MODEL,
    D_SAE,
    N_LAYERS,
    TOKENS,
    VARIANTS,
    Frozen,
    feature_add,
    rel_close,
    tiny_model,
    tiny_transcoders,
)


@pytest.fixture(scope="module", params=list(VARIANTS))
def setup(request):
    model = tiny_model(**VARIANTS[request.param])
    tcs = tiny_transcoders()
    state = A.prepare(model, tcs, TOKENS)
    return model, tcs, state


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
