"""Dataset-level attribution equals the mean of per-context attributions computed one by one.

The reference runs core.attribution on each context alone (the row cut after the position, the
root at its last token) and averages its children; the fast path runs each row once and batches
the positions. Tolerance 1e-9 absolute on float64 tiny models (the spec asks 1e-5).
"""

from __future__ import annotations

import pytest
import torch

from core import attribution as A
from core.dataset_attribution import dataset_inputs
from tests.core.attribution_models import VARIANTS, tiny_model, tiny_transcoders

LAYER = 2


def naive_means(model, tcs, rows, layer, feature, contexts):
    """{(kind, layer, index): (mean, mean_abs, count)} by a loop over contexts and sources."""
    sums: dict[tuple, list] = {}
    for row, pos in contexts:
        state = A.prepare(model, tcs, rows[row, : pos + 1], max_layer=layer)
        ch = A.children(state, A.feature_root(state, layer, feature, -1))
        values = {("embed", -1, -1): ch.embed, ("bias", -1, -1): ch.bias}
        values.update({("error", lo, -1): e for lo, e in ch.error.items()})
        for lo, contribs in ch.features.items():
            values.update({("feature", lo, j): float(c) for j, c in enumerate(contribs)})
        for la, contribs in ch.heads.items():
            values.update({("head", la, h): float(contribs[h].sum()) for h in range(contribs.shape[0])})
        for key, x in values.items():
            acc = sums.setdefault(key, [0.0, 0.0, 0])
            acc[0] += x
            acc[1] += abs(x)
            acc[2] += x != 0
    n = len(contexts)
    return {k: (s / n, a / n, c) for k, (s, a, c) in sums.items() if c > 0}


@pytest.mark.parametrize("variant", ["ln", "rms-gqa"])
def test_dataset_attribution_equals_the_naive_loop(variant):
    model = tiny_model(**VARIANTS[variant])
    tcs = tiny_transcoders()
    rows = torch.randint(1, 40, (3, 9), generator=torch.Generator().manual_seed(3))
    rows[:, 0] = 0
    with torch.no_grad():
        _, cache = model.run_with_cache(rows)
    z = tcs[LAYER](cache[tcs[LAYER].cfg.hook_in]).feature_acts  # [row pos d_sae]
    features = torch.topk((z > 0).sum((0, 1)), 2).indices.tolist()
    contexts = {
        (LAYER, f): [tuple(rc) for rc in torch.nonzero(z[:, 1:, f] > 0).add(torch.tensor([0, 1])).tolist()]
        for f in features
    }
    assert all(len(c) >= 5 for c in contexts.values())
    stats = dataset_inputs(model, tcs, rows, contexts, dtype=torch.float64)
    for f in features:
        want = naive_means(model, tcs, rows, LAYER, f, contexts[(LAYER, f)])
        got = {(r.source_kind, r.source_layer, r.source_index): r[3:] for r in stats[(LAYER, f)].rows()}
        assert stats[(LAYER, f)].contexts == len(contexts[(LAYER, f)])
        assert set(got) == set(want) and any(k[0] == "feature" for k in want)
        mean_pre = sum(float(z[r, p, f] if z[r, p, f] > 0 else 0) for r, p in contexts[(LAYER, f)])
        assert mean_pre > 0  # every context is one where the feature fires (relu: z = pre-activation)
        assert abs(sum(g[0] for g in got.values()) - mean_pre / len(contexts[(LAYER, f)])) < 1e-9
        for key, (mean, mean_abs, count) in want.items():
            g = got[key]
            assert abs(g[0] - mean) < 1e-9 and abs(g[1] - mean_abs) < 1e-9 and g[2] == count, key
