"""Path search against a naive reference of the original transcoder-circuits search.

The reference below is written from the original algorithm's definition, on the model's own
TransformerLens cache (not on core.attribution's frozen state): each parent offers, per transcoder
layer, its k best features (k = num_branches, signed ranking, inactive features count with
contribution 0), per attention layer its min(k, n_heads) best (head, source) pairs (BOS skipped),
and the embedding; it keeps its k best; the pooled extensions of the beam keep the k best; nodes at
resid_pre of layer 0 (layer-0 head sources, the embedding) are not expanded. The vectors use the
exact LayerNorm pullback (frozen scale, mean removed), which circuitflow keeps (see docs/tracing.md).
Tolerance: contributions 1e-9 absolute (float64 tiny model, values of order 1).
"""

from __future__ import annotations

import pytest
import torch

from core import attribution as A
from core import paths as P
from tests.core.attribution_models import TOKENS, tiny_model, tiny_transcoders

ROOT_LAYER = 2


class Original:
    """The original search on a plain-LayerNorm model whose transcoders read ln2.hook_normalized."""

    def __init__(self, model, tcs, tokens):
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens[None])
        self.c = {k: v[0] for k, v in cache.items()}
        self.model, self.tcs = model, tcs
        self.z = {layer: tc(self.c[f"blocks.{layer}.ln2.hook_normalized"]).feature_acts for layer, tc in tcs.items()}

    def _pull(self, w, layer, ln, pos):
        """x -> w . ln(x) without the bias, with the scale frozen: center(w * ln.w) / scale."""
        if ln == "ln1":
            w = w * self.model.blocks[layer].ln1.w
        return (w - w.mean()) / self.c[f"blocks.{layer}.{ln}.hook_scale"][pos, 0]

    def root(self, feature, pos):
        vector = self._pull(self.tcs[ROOT_LAYER].W_enc[:, feature], ROOT_LAYER, "ln2", pos)
        return {"key": "root", "layer": ROOT_LAYER, "mid": True, "pos": pos, "vector": vector, "contrib": None}

    def children(self, node, k):
        """The node's k best children by signed contribution, the original's groups and caps."""
        layer, t, v, groups = node["layer"], node["pos"], node["vector"], []
        for lo in range(layer):  # MLPs below the node's site
            tc = self.tcs[lo]
            conn = tc.W_dec @ v
            scores = self.z[lo][t] * conn
            groups.append([self._feature(lo, j, t, conn[j], float(scores[j])) for j in torch.topk(scores, k).indices])
        n_heads = self.model.cfg.n_heads
        for la in range(layer + 1 if node["mid"] else layer):
            W_O = self.model.blocks[la].attn.W_O
            out = torch.einsum("she,hed->hsd", self.c[f"blocks.{la}.attn.hook_v"], W_O)  # [head src d_model]
            scores = (self.c[f"blocks.{la}.attn.hook_pattern"][:, t] * (out @ v))[:, 1 : t + 1]  # BOS skipped
            width = scores.shape[1]
            best = torch.topk(scores.flatten(), min(k, n_heads, scores.numel())).indices
            groups.append([self._head(la, int(i) // width, int(i) % width + 1, t, v) for i in best])
        embed = {"key": f"E@{t}", "layer": 0, "mid": False, "pos": t, "vector": v}
        groups.append([{**embed, "contrib": float(self.c["blocks.0.hook_resid_pre"][t] @ v)}])
        pool = [c for g in groups for c in g]
        return sorted(pool, key=lambda c: c["contrib"], reverse=True)[:k]

    def _feature(self, layer, j, t, conn, contrib):
        vector = conn * self._pull(self.tcs[layer].W_enc[:, j], layer, "ln2", t)
        return {
            "key": f"F{layer}.{int(j)}@{t}",
            "layer": layer,
            "mid": True,
            "pos": t,
            "vector": vector,
            "contrib": contrib,
        }

    def _head(self, layer, h, s, t, v):
        attn = self.model.blocks[layer].attn
        a = self.c[f"blocks.{layer}.attn.hook_pattern"][h, t, s]
        value = (self.c[f"blocks.{layer}.attn.hook_v"][s, h] @ attn.W_O[h]) @ v
        vector = a * self._pull(attn.W_V[h] @ (attn.W_O[h] @ v), layer, "ln1", s)
        return {
            "key": f"H{layer}.{h}@{s}>{t}",
            "layer": layer,
            "mid": False,
            "pos": s,
            "vector": vector,
            "contrib": float(a * value),
        }

    @torch.no_grad()
    def search(self, root, num_iters, k):
        """Paths per iteration as tuples of node keys below the root, with their contributions."""
        beam, found = [[root]], []
        for _ in range(num_iters):
            pool = [
                p + [c] for p in beam if not (p[-1]["layer"] == 0 and not p[-1]["mid"]) for c in self.children(p[-1], k)
            ]
            beam = sorted(pool, key=lambda p: p[-1]["contrib"], reverse=True)[:k]
            found.append({tuple(n["key"] for n in p[1:]): p[-1]["contrib"] for p in beam})
        return found


def ours(state, root, num_iters, k, head_cap):
    paths = P.find_paths(state, root, num_iters, k, signed=True, skip_bos=True, head_cap=head_cap)
    found = [{} for _ in range(num_iters)]
    for p in paths:
        found[len(p) - 2][tuple(n.key for n in p[1:])] = p[-1].contrib
    return found


@pytest.fixture(scope="module")
def ln_setup():
    model = tiny_model("LN")
    tcs = tiny_transcoders()
    return Original(model, tcs, TOKENS), A.prepare(model, tcs, TOKENS)


def active_roots(state):
    return [(f, t) for t in range(1, len(TOKENS)) for f in torch.nonzero(state.z[ROOT_LAYER][t]).flatten().tolist()]


def test_search_with_the_original_settings_returns_its_path_set(ln_setup):
    original, state = ln_setup
    roots = active_roots(state)
    assert len(roots) > 40
    n_heads = state.pattern.shape[1]
    for feature, t in roots:
        want = original.search(original.root(feature, t), 3, 5)
        got = ours(state, A.feature_root(state, ROOT_LAYER, feature, t), 3, 5, n_heads)
        for it, (w, g) in enumerate(zip(want, got, strict=True)):
            assert set(g) == set(w), f"root F{ROOT_LAYER}.{feature}@{t}, iteration {it + 1}"
            assert all(abs(g[key] - w[key]) < 1e-9 for key in w)


def test_layer0_heads_and_the_embedding_are_leaves(ln_setup):
    _, state = ln_setup
    for feature, t in active_roots(state):
        for p in P.find_paths(state, A.feature_root(state, ROOT_LAYER, feature, t), 3, 5):
            assert all(not (a.kind == "head" and a.layer == 0) and a.kind != "embed" for a in p[1:-1])


def _binds(state, paths, root, k, cap):
    """Whether some expanded parent's k best children hold more than `cap` heads of one layer."""
    parents = [root] + [p[-1] for p in paths if not P.is_leaf(p[-1])]
    for node in parents:
        top = P.top_candidates(P.candidates(state, node, A.children(state, node), k=k, signed=True), k, signed=True)
        layers = [c.layer for c in top if c.kind == "head"]
        if any(layers.count(la) > cap for la in set(layers)):
            return True
    return False


@pytest.mark.parametrize("cap", [1, 2])
def test_the_head_cap_changes_results_only_when_it_binds(ln_setup, cap):
    _, state = ln_setup
    changed = 0
    for feature, t in active_roots(state):
        root = A.feature_root(state, ROOT_LAYER, feature, t)
        free = ours(state, root, 3, 5, None)
        assert ours(state, root, 3, 5, 5) == free  # a cap of num_branches never binds
        if ours(state, root, 3, 5, cap) != free:
            changed += 1
            assert _binds(state, P.find_paths(state, root, 3, 5, signed=True), root, 5, cap)
    assert changed > 0
