"""Full attribution graphs and pruning on tiny random float64 models.

References: autograd through the real HookedTransformer with patterns and scales frozen and MLP
outputs replaced by constants (one backward pass per target: the naive per-node loop), forward
interventions, an exhaustive enumeration of path-search paths, and closed-form matrix inverses for
influence. Tolerances: 1e-9 absolute on values of order 1, 1e-5 relative for interventions.
"""

from __future__ import annotations

import pytest
import torch

from core import attribution as A
from core import graph as G
from core import paths as P
from core.circuit import FULL_GRAPH_ORDER
from tests.core.attribution_models import TOKENS, VARIANTS, Frozen, feature_add, rel_close, tiny_model, tiny_transcoders


@pytest.fixture(scope="module", params=["ln", "rms-gqa", "ln-parallel"])
def built(request):
    model = tiny_model(**VARIANTS[request.param])
    tcs = tiny_transcoders()
    state = A.prepare(model, tcs, TOKENS)
    root = A.feature_root(state, 2, 3, 6)
    graph = G.full_graph(state, [root], batch_size=16)
    return model, tcs, state, root, graph


def autograd_row(model, tcs, state, target) -> dict[str, float]:
    """One target's incoming edges by autograd through the frozen model (independent of core.graph)."""
    ref = Frozen(model, tcs, TOKENS)
    n_pos, d = state.n_pos, state.resid.shape[-1]
    inj = {layer: torch.zeros(n_pos, d, dtype=torch.float64, requires_grad=True) for layer in range(state.n_layers)}
    emb = torch.zeros(n_pos, d, dtype=torch.float64, requires_grad=True)
    captured = {}
    hooks = [(n, lambda x, hook: ref.clean[hook.name]) for n in ref.clean if n.endswith(("hook_pattern", "hook_scale"))]
    for layer in range(state.n_layers):
        name = f"blocks.{layer}.hook_mlp_out"
        hooks.append((name, lambda x, hook, layer=layer, name=name: (ref.clean[name][0] + inj[layer])[None]))
        hooks.append(
            (f"blocks.{layer}.ln2.hook_normalized", lambda x, hook, layer=layer: captured.setdefault(layer, x))
        )
    hooks.append(("blocks.0.hook_resid_pre", lambda x, hook: x + emb[None]))
    logits = model.run_with_hooks(TOKENS[None], fwd_hooks=hooks)
    if target == "logit":
        value = logits[0, -1, 7] - logits[0, -1, 12]
    else:
        layer, pos, feature = target
        value = tcs[layer].pre_acts(captured[layer][0])[pos, feature]
    grads = torch.autograd.grad(value, [emb] + [inj[layer] for layer in range(state.n_layers)], allow_unused=True)
    row = {}
    for pos in range(n_pos):
        row[f"E@{pos}"] = float(state.resid[0, pos] @ grads[0][pos])
    for layer in range(state.n_layers):
        g = grads[1 + layer]
        g = torch.zeros(n_pos, d, dtype=torch.float64) if g is None else g
        for pos in range(n_pos):
            row[f"err{layer}@{pos}"] = float(state.error[layer, pos] @ g[pos])
            for feature in torch.nonzero(state.z[layer][pos]).flatten().tolist():
                w = float(state.z[layer][pos, feature] * (tcs[layer].W_dec[feature] @ g[pos]))
                row[f"F{layer}.{feature}@{pos}"] = w
    return row


def test_rows_sum_to_each_targets_value(built):
    """Every target (feature pre-activation, root) = sum of its incoming edges + its bias."""
    *_, graph = built
    targets = list(range(graph.n_features)) + [graph.n_nodes - 1]
    recon = graph.adjacency[targets].sum(1) + graph.bias[targets]
    torch.testing.assert_close(recon, graph.value[targets], rtol=0, atol=1e-9)
    assert graph.n_features > 20  # the tiny model has plenty of active features


def test_full_graph_equals_autograd_per_target(built):
    """The batched backward equals one autograd pass per target, entry by entry."""
    model, tcs, state, root, graph = built
    ids = [n.id for n in graph.nodes]
    picks = list(range(0, graph.n_features, max(1, graph.n_features // 12))) + [graph.n_nodes - 1]
    for k in picks:
        node = graph.nodes[k]
        target = (node.layer, node.pos, node.feature) if node.kind == "feature" else (2, 6, 3)
        row = autograd_row(model, tcs, state, target)
        for src, weight in row.items():
            ours = float(graph.adjacency[k, ids.index(src)]) if src in ids else 0.0
            assert abs(ours - weight) < 1e-9, (node.id, src, ours, weight)


def test_direct_edge_equals_intervention_through_attention(built):
    """Perturbing a feature at an earlier token (heads live, other features frozen) moves the root by
    delta x edge / activation."""
    model, tcs, state, root, graph = built
    ref = Frozen(model, tcs, TOKENS)
    root_row = graph.adjacency[-1, : graph.n_features]
    candidates = [i for i in range(graph.n_features) if graph.nodes[i].pos != 6]
    j = max(candidates, key=lambda i: abs(float(root_row[i])))
    node = graph.nodes[j]
    delta = 1e-3
    captured, _ = ref.run(mlp_add=feature_add(state, node.layer, node.pos, node.feature, delta))
    change = ref.feature_pre(captured, 2, 6, 3) - root.contrib
    assert rel_close(change, delta * float(root_row[j]) / node.activation)
    assert abs(float(root_row[j])) > 1e-6


def test_total_attribution_equals_intervention_with_linear_features(built):
    """With every feature responding linearly on its active set, a source's effect on the root is
    delta x attribution / activation (all paths, through features and heads)."""
    model, tcs, state, root, graph = built
    ref = Frozen(model, tcs, TOKENS)
    for j in sorted(range(graph.n_features), key=lambda i: -abs(graph.nodes[i].attribution))[:3]:
        node = graph.nodes[j]
        delta = 1e-3
        captured, _ = ref.run(
            mlp_add=feature_add(state, node.layer, node.pos, node.feature, delta), linear_features=True
        )
        change = ref.feature_pre(captured, 2, 6, 3) - root.contrib
        assert rel_close(change, delta * node.attribution / node.activation)


def test_batch_size_does_not_change_the_graph(built):
    _, _, state, root, graph = built
    one = G.full_graph(state, [root], batch_size=1)
    torch.testing.assert_close(one.adjacency, graph.adjacency, rtol=0, atol=1e-12)
    torch.testing.assert_close(one.bias, graph.bias, rtol=0, atol=1e-12)


def test_logit_root_graph():
    model = tiny_model("RMS", gqa=True)
    tcs = tiny_transcoders()
    state = A.prepare(model, tcs, TOKENS)
    root = A.logit_root(state, 7, 12)
    graph = G.full_graph(state, [root])
    assert {n.layer for n in graph.nodes[: graph.n_features]} == {0, 1, 2}
    assert abs(float(graph.adjacency[-1].sum() + graph.bias[-1]) - root.contrib) < 1e-9
    row = autograd_row(model, tcs, state, "logit")
    ids = [n.id for n in graph.nodes]
    for src, weight in row.items():
        assert abs(float(graph.adjacency[-1, ids.index(src)]) - weight) < 1e-9


def _all_paths(state, node, out, depth=0):
    """Every path below `node` (no pruning, BOS included): leaves' contributions by node id."""
    ch = A.children(state, node)
    for layer, value in ch.error.items():
        key = f"err{layer}@{node.pos}"
        out[key] = out.get(key, 0.0) + value
    for cand in P.candidates(state, node, ch, skip_bos=False):
        child = A.make_child(state, node, cand)
        if child.kind != "head":
            out[child.key] = out.get(child.key, 0.0) + child.contrib
        if child.kind != "embed":
            _all_paths(state, child, out, depth + 1)


def test_attribution_is_the_sum_over_every_path_search_path():
    """Full-graph attribution of a node = the sum of the path-search contributions of every path
    ending at it: the two algorithms agree exactly when nothing is pruned."""
    model = tiny_model()
    tcs = tiny_transcoders(layers=[0, 1])
    state = A.prepare(model, tcs, TOKENS[:4], max_layer=1)
    root = A.feature_root(state, 1, 3, 3)
    graph = G.full_graph(state, [root])
    sums: dict[str, float] = {}
    _all_paths(state, root, sums)
    checked = 0
    for node in graph.nodes[:-1]:
        expected = sums.get(node.id, 0.0)
        assert abs(node.attribution - expected) < 1e-9, (node.id, node.attribution, expected)
        checked += abs(expected) > 1e-6
    assert checked > 10


# ---------------------------------------------------------------- influence and pruning


def toy_graph(adjacency: torch.Tensor, n_features: int, n_errors: int, n_embeds: int) -> G.AttributionGraph:
    n = adjacency.shape[0]
    nodes = [A.GraphNode(f"n{i}", "feature", 0, 0) for i in range(n)]
    weights = torch.zeros(n, dtype=torch.float64)
    weights[-1] = 1.0
    ones = torch.ones(n, dtype=torch.float64)
    return G.AttributionGraph(nodes, adjacency, torch.zeros(n), ones, ones, weights, n_features, n_errors, n_embeds, 1)


def test_influence_equals_the_matrix_inverse():
    gen = torch.Generator().manual_seed(0)
    n = 9
    adjacency = torch.tril(torch.randn(n, n, generator=gen, dtype=torch.float64), -1)  # a DAG
    norm = G.normalize_matrix(adjacency)
    assert torch.allclose(norm.sum(1)[1:], torch.ones(n - 1, dtype=torch.float64))
    weights = torch.zeros(n, dtype=torch.float64)
    weights[-1] = 1.0
    expected = weights @ (
        torch.linalg.inv(torch.eye(n, dtype=torch.float64) - norm) - torch.eye(n, dtype=torch.float64)
    )
    torch.testing.assert_close(G.compute_influence(norm, weights), expected, rtol=1e-12, atol=1e-12)
    cyclic = torch.zeros(2, 2, dtype=torch.float64)
    cyclic[0, 1] = cyclic[1, 0] = 1.0
    with pytest.raises(ValueError, match="cycle"):
        G.compute_influence(cyclic, torch.tensor([1.0, 0.0], dtype=torch.float64), max_iters=10)


def test_prune_keeps_the_influential_nodes():
    """Root 5 <- features 0..3 <- embedding 4. Feature 0 carries most, 3 almost nothing."""
    a = torch.zeros(6, 6, dtype=torch.float64)
    a[5, 0], a[5, 1], a[5, 2], a[5, 3] = 10.0, -5.0, 2.0, 0.01
    a[0:4, 4] = 1.0
    graph = toy_graph(a, n_features=4, n_errors=0, n_embeds=1)
    influence = G.node_influence(graph)
    total = 10 + 5 + 2 + 0.01
    torch.testing.assert_close(influence[:4], torch.tensor([10, 5, 2, 0.01], dtype=torch.float64) / total)
    pruned = G.prune_graph(graph, node_threshold=0.8, edge_threshold=1.0)
    assert pruned.node_mask.tolist() == [True, True, False, False, True, True]
    everything = G.prune_graph(graph, node_threshold=1.0, edge_threshold=1.0)
    assert everything.node_mask.all()
    circuit = G.to_circuit(graph, pruned)
    assert {(e.source, e.target) for e in circuit.edges} == {("n0", "n5"), ("n1", "n5"), ("n4", "n0"), ("n4", "n1")}


def test_pruned_tiny_graph_keeps_the_requested_share(built):
    *_, graph = built
    pruned = G.prune_graph(graph, node_threshold=0.8, edge_threshold=0.98)
    influence = pruned.node_influence
    candidates = torch.ones(graph.n_nodes, dtype=torch.bool)
    candidates[graph.n_features + graph.n_errors :] = False
    kept_before_cleanup = influence[candidates] >= G._threshold(influence[candidates], 0.8)
    assert float(influence[candidates][kept_before_cleanup].sum()) >= 0.8 * float(influence[candidates].sum()) - 1e-12
    assert pruned.node_mask[-1] and pruned.node_mask.sum() < graph.n_nodes
    # every kept feature has an edge in and an edge out
    for i in torch.nonzero(pruned.node_mask[: graph.n_features]).flatten().tolist():
        assert pruned.edge_mask[i].any() and pruned.edge_mask[:, i].any()
    circuit = G.to_circuit(graph, pruned)
    assert circuit.root == "root" and len(circuit.edges) == int(pruned.edge_mask.sum())


def test_one_pass_feature_scores_equal_total_attribution(built):
    """feature_scores (one linear backward pass) = total_attribution of the complete graph."""
    _, _, state, root, graph = built
    scores = G.feature_scores(state, [root])
    for node in graph.nodes[: graph.n_features]:
        assert abs(float(scores[node.layer][node.pos, node.feature]) - node.attribution) < 1e-9


def test_capped_graph_keeps_exact_rows_and_the_same_edges(built):
    """With max_features the best features by |attribution| stay, the rest become frozen dropped
    sources: rows still sum exactly and edges between kept nodes are unchanged."""
    _, _, state, root, graph = built
    cap = graph.n_features // 3
    capped = G.full_graph(state, [root], max_features=cap)
    assert capped.n_features == cap
    kept = {n.id for n in capped.nodes[:cap]}
    ranked = sorted(graph.nodes[: graph.n_features], key=lambda n: -abs(n.attribution))
    assert kept == {n.id for n in ranked[:cap]}
    assert any(n.kind == "dropped" for n in capped.nodes)
    targets = list(range(cap)) + [capped.n_nodes - 1]
    recon = capped.adjacency[targets].sum(1) + capped.bias[targets]
    torch.testing.assert_close(recon, capped.value[targets], rtol=0, atol=1e-9)
    full_ids = [n.id for n in graph.nodes]
    for i, node in enumerate(capped.nodes):
        if node.kind in ("feature", "embed", "error"):
            j = full_ids.index(node.id)
            for t in targets:
                tj = full_ids.index(capped.nodes[t].id)
                assert abs(float(capped.adjacency[t, i] - graph.adjacency[tj, j])) < 1e-12


def test_full_graph_nodes_come_in_the_documented_order(built):
    """core.circuit's node order: kinds in FULL_GRAPH_ORDER; features by (layer, token, feature), errors by
    (layer, token), embeddings by token; to_circuit keeps that order for the nodes it keeps."""
    _, _, state, root, _ = built
    graph = G.full_graph(state, [root], max_features=10)
    kinds = [n.kind for n in graph.nodes]
    assert kinds == sorted(kinds, key=FULL_GRAPH_ORDER.index) and set(kinds) == set(FULL_GRAPH_ORDER)
    for kind, key in (("feature", lambda n: (n.layer, n.pos, n.feature)), ("error", lambda n: (n.layer, n.pos))):
        keys = [key(n) for n in graph.nodes if n.kind == kind]
        assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert [n.pos for n in graph.nodes if n.kind == "embed"] == list(range(state.n_pos))
    circuit = G.to_circuit(graph, G.prune_graph(graph))
    order = [n.id for n in graph.nodes]
    assert [order.index(n.id) for n in circuit.nodes] == sorted(order.index(n.id) for n in circuit.nodes)
