"""Interventions on tiny float64 models (LayerNorm and RMSNorm, with and without grouped-query attention).

References are independent of core.interventions: the plain model (its own logits, hooks that zero a
head's hook_z or add to an MLP output) and the attribution graph of core.graph, whose edges predict
every change of the frozen (linearised) model exactly. Tolerances: 1e-9 absolute for identities on
values of order 1 (the spec asks 1e-6), 1e-5 relative for graph predictions.
"""

from __future__ import annotations

import pytest
import torch

from core import attribution as A
from core import graph as G
from core.intervention_spec import SpecError, parse_spec, parse_specs
from core.interventions import (
    FeatureEdit,
    HeadAblation,
    InterventionError,
    MlpAblation,
    Spliced,
    Steering,
    ablate_feature,
    ablate_layer,
    from_spec,
    generate,
)
from tests.core.attribution_models import TOKENS, VARIANTS, tiny_model, tiny_transcoders

NORMS = ["ln", "rms", "rms-gqa", "ln-gqa"]


@pytest.fixture(scope="module", params=NORMS)
def setup(request):
    model = tiny_model(**VARIANTS[request.param])
    tcs = tiny_transcoders()
    return model, tcs, Spliced(model, tcs, TOKENS)


def model_logits(model, hooks=()):
    with torch.no_grad():
        return model.run_with_hooks(TOKENS[None], fwd_hooks=list(hooks))[0]


def test_empty_intervention_reproduces_the_model(setup):
    model, _, spliced = setup
    clean = model_logits(model)
    for frozen in (False, True):
        result = spliced.run([], frozen=frozen)
        torch.testing.assert_close(result.logits, clean, rtol=0, atol=1e-9)
        assert result.kl() < 1e-12 and result.feature_changes() == []


def _source(state, layer, pos):
    """The active feature of `layer` at `pos` with the largest activation."""
    return int(torch.argmax(state.z[layer][pos]))


@pytest.mark.parametrize("source_layer", [0, 1])
def test_frozen_clamp_moves_everything_by_the_graph_edges(setup, source_layer):
    """Frozen: adding delta to a source feature moves every downstream feature's pre-activation and the
    target logit by delta x (the graph's per-unit edge, summed over every path): feature -> feature on
    the same token, through attention heads on later tokens, and feature -> logit."""
    model, tcs, spliced = setup
    state = A.prepare(model, tcs, TOKENS)
    token = int(torch.argmax(spliced.clean_logits[-1]))
    full = G.full_graph(state, [A.logit_root(state, token)])
    per_unit = full.adjacency / torch.where(full.activation == 0, 1.0, full.activation)[None, :]
    eye = torch.eye(full.n_nodes, dtype=per_unit.dtype)
    total = torch.linalg.solve(eye - per_unit, eye) - eye  # every path: sum_n P^n
    pos, delta = 2, 0.7
    feature = _source(state, source_layer, pos)
    src = full.index(f"F{source_layer}.{feature}@{pos}")
    result = spliced.run([FeatureEdit(source_layer, feature, "add", delta, pos)], frozen=True)
    crossed = 0
    for k, node in enumerate(full.nodes[: full.n_features]):
        if k == src:
            continue
        change = float(
            result.pre[node.layer][node.pos, node.feature] - spliced.clean_pre[node.layer][node.pos, node.feature]
        )
        expected = delta * float(total[k, src])
        assert abs(change - expected) <= 1e-5 * max(abs(expected), 1e-4), (node.id, change, expected)
        if node.layer == source_layer + 1 and node.pos > pos:  # only attention carries it across tokens
            assert abs(expected - delta * float(per_unit[k, src])) < 1e-12
            crossed += abs(expected) > 1e-3
    assert crossed > 0  # some through-head edge is exercised
    logit_change = float(result.logits[-1, token] - spliced.clean_logits[-1, token])
    expected = delta * float(total[full.index("root"), src])
    assert abs(logit_change - expected) <= 1e-5 * abs(expected) and abs(expected) > 1e-4


def test_frozen_clamp_with_a_layer_without_transcoder():
    """A layer without a transcoder is a frozen error term in both the graph and the frozen run."""
    model = tiny_model()
    tcs = tiny_transcoders(layers=[0, 2])
    state = A.prepare(model, tcs, TOKENS)
    spliced = Spliced(model, tcs, TOKENS)
    root = A.feature_root(state, 2, 3, 6)
    full = G.full_graph(state, [root])
    feature = _source(state, 0, 4)
    total = float(full.nodes[full.index(f"F0.{feature}@4")].attribution) / float(state.z[0][4, feature])
    result = spliced.run([FeatureEdit(0, feature, "set", float(state.z[0][4, feature]) + 0.3, 4)], frozen=True)
    change = float(result.pre[2][6, 3] - spliced.clean_pre[2][6, 3])
    assert abs(change - 0.3 * total) <= 1e-5 * abs(0.3 * total)


def test_ablating_a_head_equals_zeroing_its_hook_z(setup):
    model, _, spliced = setup

    def zero(head, pos=None):
        def hook(z, hook):
            z = z.clone()
            z[:, slice(None) if pos is None else pos, head] = 0
            return z

        return hook

    for layer, head, pos in [(1, 2, None), (2, 0, 5), (0, 3, -1)]:
        result = spliced.run([HeadAblation(layer, head, pos)])
        expected = model_logits(model, [(f"blocks.{layer}.attn.hook_z", zero(head, pos))])
        torch.testing.assert_close(result.logits, expected, rtol=0, atol=1e-9)
        assert result.kl(-1 if pos is None else pos) > 1e-8


def test_real_feature_edits_and_steering_equal_changes_of_the_mlp_output(setup):
    """Recomputed: ablating, clamping or steering a feature equals adding the decoder change to the real
    MLP output, and every later transcoder reads the changed input (the walkthrough's real-model ablation)."""
    model, tcs, spliced = setup
    z = spliced.clean_acts[0]
    feature = int(torch.argmax(z[3]))
    cases = [
        (ablate_feature(0, feature, 3), {3: -z[3, feature]}),
        (FeatureEdit(0, feature, "set", 2.5, 3), {3: 2.5 - z[3, feature]}),
        (FeatureEdit(0, feature, "scale", 3.0, None), {t: 2.0 * z[t, feature] for t in range(len(TOKENS))}),
        (Steering(0, feature, 4.0, None), dict.fromkeys(range(len(TOKENS)), 4.0)),
    ]
    for iv, amounts in cases:
        add = torch.zeros(len(TOKENS), model.cfg.d_model, dtype=torch.float64)
        for t, amount in amounts.items():
            add[t] = float(amount) * tcs[0].W_dec[feature]
        seen = {}
        hooks = [("blocks.0.hook_mlp_out", lambda x, hook, add=add: x + add)]
        hooks += [(tcs[layer].cfg.hook_in, capture(seen, layer)) for layer in (1, 2)]
        expected = model_logits(model, hooks)
        result = spliced.run([iv])
        torch.testing.assert_close(result.logits, expected, rtol=0, atol=1e-9)
        for layer in (1, 2):
            torch.testing.assert_close(result.pre[layer], tcs[layer].pre_acts(seen[layer]), rtol=0, atol=1e-9)


def capture(seen, layer):
    def hook(x, hook):
        seen[layer] = x[0]
        return x

    return hook


def test_layer_and_mlp_ablations(setup):
    model, tcs, spliced = setup
    result = spliced.run([ablate_layer(1, pos=4)])
    assert bool((result.acts[1][4] == 0).all()) and torch.equal(result.acts[1][:4], spliced.clean_acts[1][:4])
    zero_mlp = [("blocks.1.hook_mlp_out", lambda x, hook: torch.zeros_like(x))]
    torch.testing.assert_close(spliced.run([MlpAblation(1)]).logits, model_logits(model, zero_mlp), rtol=0, atol=1e-9)


def test_feature_changes_and_top_tokens(setup):
    _, _, spliced = setup
    feature = int(torch.argmax(spliced.clean_acts[1][5]))
    result = spliced.run([ablate_feature(1, feature, 5)])
    changes = result.feature_changes()
    assert changes[0].layer >= 1 and all(c.pos >= 5 and c.layer >= 1 for c in changes)
    assert any(c[:3] == (1, feature, 5) and c.after == 0 for c in changes)
    moved = [abs(c.after - c.before) for c in changes]
    assert moved == sorted(moved, reverse=True)
    naive = sorted(  # every (layer, feature, pos) that moved, by a plain loop
        (abs(float(result.acts[layer][t, j] - spliced.clean_acts[layer][t, j])), layer, j, t)
        for layer in result.acts
        for t in range(len(TOKENS))
        for j in range(result.acts[layer].shape[1])
        if result.acts[layer][t, j] != spliced.clean_acts[layer][t, j]
    )[::-1]
    assert len(changes) == min(100, len(naive)) and moved == pytest.approx([d for d, *_ in naive[: len(changes)]])
    assert {c[:3] for c in result.feature_changes(limit=None)} == {(layer, j, t) for _, layer, j, t in naive}
    top = result.top_changes(5)
    before = torch.softmax(spliced.clean_logits[-1], -1)
    after = torch.softmax(result.logits[-1], -1)
    assert abs(abs(top[0].after - top[0].before) - float((after - before).abs().max())) < 1e-12
    assert result.logprob(top[0].token) == pytest.approx(float(torch.log(after[top[0].token])), rel=1e-9)


def test_generation_applies_the_interventions_at_every_step(setup):
    model, tcs, spliced = setup
    prompt = TOKENS[:4]
    plain = generate(model, tcs, prompt, n_tokens=5)
    seq = prompt.clone()
    for _ in range(5):  # the naive loop: the plain model's argmax
        seq = torch.cat([seq, torch.argmax(model_logits_of(model, seq)[-1]).reshape(1)])
    assert torch.equal(plain, seq)
    steer = [Steering(2, 1, 8.0)]
    steered = generate(model, tcs, prompt, steer, n_tokens=5)
    seq = prompt.clone()
    for _ in range(5):  # a fresh splice of the grown prompt with the same intervention
        seq = torch.cat([seq, torch.argmax(Spliced(model, tcs, seq).run(steer).logits[-1]).reshape(1)])
    assert torch.equal(steered, seq)
    sampled = [generate(model, tcs, prompt, steer, 6, temperature=1.0, seed=s) for s in (1, 1, 2)]
    assert torch.equal(sampled[0], sampled[1]) and len(sampled[2]) == 10


def model_logits_of(model, tokens):
    with torch.no_grad():
        return model(tokens[None])[0]


def test_bad_interventions_say_what_is_wrong(setup):
    _, _, spliced = setup
    for iv, message in [
        (ablate_feature(3, 0), "layer 3 is out of range"),
        (ablate_feature(1, 99), "feature 99 is out of range"),
        (ablate_feature(1, 0, 7), "position 7 is out of range"),
        (HeadAblation(0, 4), "head 4 is out of range"),
    ]:
        with pytest.raises(InterventionError, match=message):
            spliced.run([iv])
    model = tiny_model()
    with pytest.raises(InterventionError, match="layer 1 has no transcoder"):
        Spliced(model, tiny_transcoders(layers=[0]), TOKENS).run([Steering(1, 0, 1.0)])
    with pytest.raises(InterventionError, match="n_tokens"):
        generate(model, {}, TOKENS, n_tokens=-1)


def test_specs_parse_and_refuse_malformed_input():
    assert parse_spec("ablate", "3:496@5") == parse_spec("ablate", " 3:496@5 ").__class__(
        "ablate", 3, 496, 0.0, 5, "3:496@5"
    )
    clamp = parse_spec("clamp", "2:7=-1.5e1@-1")
    assert (clamp.layer, clamp.index, clamp.value, clamp.pos) == (2, 7, -15.0, -1)
    assert from_spec(clamp) == FeatureEdit(2, 7, "set", -15.0, -1)
    assert from_spec(parse_spec("steer", "1:2=8")) == Steering(1, 2, 8.0)
    assert from_spec(parse_spec("ablate_head", "2.5")) == HeadAblation(2, 5)
    assert from_spec(parse_spec("ablate_mlp", "1@3")) == MlpAblation(1, 3)
    assert [s.kind for s in parse_specs(ablate=["1:2"], steer=["0:1=2"])] == ["ablate", "steer"]
    for kind, text, form in [
        ("clamp", "3:4", "L:F=VALUE"),
        ("ablate", "3-4", "L:F"),
        ("steer", "3:4=x", "L:F=STRENGTH"),
        ("ablate_head", "2:1", "L.H"),
    ]:
        with pytest.raises(SpecError, match=form):
            parse_spec(kind, text)


def test_stopping_early_gives_the_same_features(setup):
    model, tcs, spliced = setup
    short = Spliced(model, tcs, TOKENS, max_layer=1)
    feature = int(torch.argmax(spliced.clean_acts[0][3]))
    for frozen in (False, True):
        full, early = (s.run([ablate_feature(0, feature, 3)], frozen=frozen) for s in (spliced, short))
        assert early.logits is None and set(early.acts) == {0, 1}
        for layer in (0, 1):
            torch.testing.assert_close(early.pre[layer], full.pre[layer], rtol=0, atol=1e-12)
    with pytest.raises(InterventionError, match="layer 2 is out of range"):
        short.run([ablate_feature(2, 0)])
