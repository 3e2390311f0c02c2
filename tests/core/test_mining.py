"""Mining equals a brute-force dense computation on a tiny model; stats, top-k, bands and histograms
match their definitions, computed independently with plain Python loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core import mining
from core.mining import Nonzeros
from core.model import load_model
from core.transcoder import TranscoderConfig, init_transcoder

SPEC = 'tiny:{"preset": "ln", "n_layers": 3}'
BOS = 256
LAYERS = (0, 2)
D_SAE = 48


@pytest.fixture(scope="module")
def model():
    return load_model(SPEC, "cpu", "float64")


@pytest.fixture(scope="module")
def transcoders(model):
    out = {}
    for layer in LAYERS:
        cfg = TranscoderConfig(model.cfg.d_model, D_SAE, model.cfg.d_model, layer=layer)
        tc = init_transcoder(cfg, seed=10 + layer, dtype=torch.float64)
        with torch.no_grad():
            tc.b_enc.copy_(torch.linspace(-1.5, 0.2, D_SAE, dtype=torch.float64))  # densities from ~0 to ~60%
            tc.b_dec.copy_(
                0.05 * torch.randn(cfg.d_in, generator=torch.Generator().manual_seed(layer), dtype=torch.float64)
            )
        out[layer] = tc
    return out


@pytest.fixture(scope="module")
def tokens():
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 256, size=(7, 20)).astype(np.int32)  # 7 rows: batches of 3 leave a remainder
    rows[:, 0] = BOS
    rows[2, 9] = BOS  # a document separator inside a row
    rows[4, 3:6] = rows[1, 3:6]  # repeated tokens
    return rows


def dense_acts(model, transcoders, tokens) -> dict[int, np.ndarray]:
    """Reference: the full forward over all rows at once, dense encode; BOS positions zeroed.
    Returns layer -> float64 [rows, pos, d_sae]."""
    names = {layer: f"blocks.{layer}.ln2.hook_normalized" for layer in transcoders}
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.as_tensor(tokens, dtype=torch.long), names_filter=list(names.values()))
        out = {}
        for layer, tc in transcoders.items():
            z = tc.encode(cache[names[layer]]).numpy().copy()
            z[tokens == BOS] = 0.0
            out[layer] = z
    return out


def reference_nonzeros(z: np.ndarray) -> list[tuple[int, int, int]]:
    """(feature, row, pos) of every non-zero, sorted."""
    rows, pos, feature = np.nonzero(z)
    return sorted(zip(feature.tolist(), rows.tolist(), pos.tolist(), strict=True))


def streamed(model, transcoders, tokens, batch_rows=3) -> dict[int, Nonzeros]:
    parts: dict[int, list[Nonzeros]] = {layer: [] for layer in transcoders}
    for batch in mining.stream_nonzeros(model, transcoders, tokens, batch_rows, BOS):
        for layer, nz in batch.items():
            parts[layer].append(nz)
    return {layer: mining.concat_nonzeros(p) for layer, p in parts.items()}


def test_mlp_inputs_equal_the_full_forward_and_stop_after_the_last_hook(model, tokens):
    batch = torch.as_tensor(tokens[:3], dtype=torch.long)
    hooks = {layer: f"blocks.{layer}.ln2.hook_normalized" for layer in LAYERS}
    fired: list[str] = []
    watch = ["blocks.2.ln2.hook_normalized", "blocks.2.hook_mlp_out", "ln_final.hook_normalized"]
    for name in watch:
        model.add_hook(name, lambda act, hook: fired.append(hook.name))
    try:
        got = mining.mlp_inputs(model, batch, hooks)
    finally:
        model.reset_hooks()
    assert fired == ["blocks.2.ln2.hook_normalized"]  # the last MLP and everything after it never ran
    _, cache = model.run_with_cache(batch, names_filter=list(hooks.values()))
    for layer, name in hooks.items():
        assert torch.equal(got[layer], cache[name])


def test_streamed_nonzeros_equal_dense(model, transcoders, tokens):
    dense = dense_acts(model, transcoders, tokens)
    got = streamed(model, transcoders, tokens)
    for layer in LAYERS:
        nz = got[layer]
        assert nz.feature.dtype == np.int32 and nz.row.dtype == np.int32
        assert nz.pos.dtype == np.int16 and nz.act.dtype == np.float32
        keys = sorted(zip(nz.feature.tolist(), nz.row.tolist(), nz.pos.tolist(), strict=True))
        expected = reference_nonzeros(dense[layer])
        assert keys == expected  # same set of (feature, row, pos), no duplicates
        assert 0.05 < len(expected) / dense[layer].size < 0.6  # the test exercises sparse but non-trivial data
        # float32 storage of float64 activations: relative error <= 2^-24
        np.testing.assert_allclose(nz.act, dense[layer][nz.row, nz.pos, nz.feature], rtol=1e-7, atol=0)
        assert not np.any(tokens[nz.row, nz.pos] == BOS)


def test_top_k_from_the_stream_equals_dense_argsort(model, transcoders, tokens):
    dense = dense_acts(model, transcoders, tokens)
    got = streamed(model, transcoders, tokens)
    k = 5
    for layer in LAYERS:
        buffer = mining.RunBuffer(D_SAE, max_nonzeros=10**9)
        buffer.add(got[layer])
        run = buffer.flush()
        _, examples = mining.summarize_features(run, 0, D_SAE, k, num_bands=3, per_band=2, bins=4)
        z = dense[layer].astype(np.float32)
        for f in range(D_SAE):
            col = z[:, :, f]
            r, p = np.nonzero(col)
            order = sorted(zip((-col[r, p]).tolist(), r.tolist(), p.tolist(), strict=True))[:k]
            mine = (examples.feature == f) & (examples.band == -1)
            assert list(zip(examples.row[mine].tolist(), examples.pos[mine].tolist(), strict=True)) == [
                (rr, pp) for _, rr, pp in order
            ]
            assert examples.rank[mine].tolist() == list(range(len(order)))


def test_run_buffer_returns_sorted_runs_that_partition_the_input():
    rng = np.random.default_rng(1)
    batches = [_random_nonzeros(rng, n_rows=3, row0=3 * i, d_sae=30) for i in range(5)]
    buffer = mining.RunBuffer(30, max_nonzeros=60)
    runs = [r for b in batches if (r := buffer.add(b)) is not None]
    last = buffer.flush()
    runs.append(last) if last is not None else None
    assert len(runs) >= 2 and buffer.flush() is None
    for run in runs:
        assert np.all(np.diff(run.feature) >= 0)
        same = np.diff(run.feature) == 0
        order = run.row.astype(np.int64) * 1000 + run.pos
        assert np.all(np.diff(order)[same] > 0)  # within a feature: (row, pos) ascending
    every = mining.concat_nonzeros(runs)
    original = mining.concat_nonzeros(batches)
    assert sorted(
        zip(every.feature.tolist(), every.row.tolist(), every.pos.tolist(), every.act.tolist(), strict=True)
    ) == sorted(
        zip(original.feature.tolist(), original.row.tolist(), original.pos.tolist(), original.act.tolist(), strict=True)
    )


def _random_nonzeros(rng, n_rows: int, row0: int, d_sae: int, ctx: int = 6, density: float = 0.3) -> Nonzeros:
    """Token-major non-zeros like batch_nonzeros yields, with repeated activation values (ties)."""
    mask = rng.random((n_rows, ctx, d_sae)) < density
    r, p, f = np.nonzero(mask)
    act = rng.choice(np.array([0.5, 1.0, 1.5, 2.0, 3.25], np.float32), size=r.shape[0])
    act = np.where(rng.random(r.shape[0]) < 0.5, act, rng.random(r.shape[0]).astype(np.float32) * 4)
    return Nonzeros(f.astype(np.int32), (r + row0).astype(np.int32), p.astype(np.int16), act.astype(np.float32))


# ---------------------------------------------------------------- definitions, brute force


def brute_bands(examples: list[tuple[float, int, int]], num_bands: int, per_band: int) -> list[list[int]]:
    """The docstring's definition with plain loops: examples are (act, row, pos) in (row, pos) order."""
    acts = [float(a) for a, _, _ in examples]
    lo, hi = min(acts), max(acts)
    levels = [hi if num_bands == 1 else hi - b * (hi - lo) / (num_bands - 1) for b in range(num_bands)]
    members: list[list[int]] = [[] for _ in levels]
    for e, a in enumerate(acts):
        nearest = min(range(num_bands), key=lambda b: (abs(a - levels[b]), b))  # ties: the higher level
        members[nearest].append(e)
    return [sorted(m, key=lambda e: (abs(acts[e] - levels[b]), -acts[e], e))[:per_band] for b, m in enumerate(members)]


def brute_histogram(acts: list[float], bins: int) -> list[int]:
    lo, hi = min(acts), max(acts)
    counts = [0] * bins
    for a in acts:
        index = bins - 1 if hi == lo else min(math.floor((a - lo) / (hi - lo) * bins), bins - 1)
        counts[index] += 1
    return counts


@pytest.mark.parametrize(("num_bands", "per_band"), [(4, 2), (1, 3), (6, 1)])
def test_summaries_match_their_definitions(num_bands, per_band):
    rng = np.random.default_rng(2)
    d_sae, k, bins = 30, 4, 5
    nz = mining.concat_nonzeros([_random_nonzeros(rng, 4, 4 * i, d_sae) for i in range(3)])
    keep = nz.feature != 7  # feature 7 never fires
    keep[np.flatnonzero(nz.feature == 9)[2:]] = False  # feature 9 fires twice: fewer than the bands need
    nz = nz.take(keep)
    run = nz.take(mining.sort_by_feature(nz.feature, d_sae))
    first, stop = 5, 25
    inside = (run.feature >= first) & (run.feature < stop)
    stats, examples = mining.summarize_features(run.take(inside), first, stop, k, num_bands, per_band, bins)
    assert stats.feature.tolist() == list(range(first, stop))
    for i, f in enumerate(range(first, stop)):
        sel = run.feature == f
        ex = [(float(a), int(r), int(p)) for a, r, p in zip(run.act[sel], run.row[sel], run.pos[sel], strict=True)]
        assert stats.n_fired[i] == len(ex)
        mine = examples.feature == f
        if not ex:
            assert f == 7 and math.isnan(stats.mean_act[i]) and math.isnan(stats.max_act[i])
            assert stats.histogram[i].sum() == 0 and not mine.any()
            continue
        acts = [a for a, _, _ in ex]
        assert stats.mean_act[i] == pytest.approx(sum(acts) / len(acts), rel=1e-12)
        assert stats.min_act[i] == min(acts) and stats.max_act[i] == max(acts)
        assert stats.histogram[i].tolist() == brute_histogram(acts, bins)
        top = sorted(range(len(ex)), key=lambda e: (-ex[e][0], ex[e][1], ex[e][2]))[:k]
        got_top = [
            (r, p)
            for r, p, b in zip(examples.row[mine], examples.pos[mine], examples.band[mine], strict=True)
            if b == -1
        ]
        assert got_top == [(ex[e][1], ex[e][2]) for e in top]
        for b, picked in enumerate(brute_bands(ex, num_bands, per_band)):
            band = mine & (examples.band == b)
            assert list(zip(examples.row[band].tolist(), examples.pos[band].tolist(), strict=True)) == [
                (ex[e][1], ex[e][2]) for e in picked
            ], f"feature {f} band {b}"
            assert examples.rank[band].tolist() == list(range(len(picked)))
            assert examples.act[band].tolist() == [ex[e][0] for e in picked]


def test_band_levels_bands_and_histogram_edges():
    np.testing.assert_array_equal(mining.band_levels(1.0, 4.0, 4), [4.0, 3.0, 2.0, 1.0])
    np.testing.assert_array_equal(mining.band_levels(1.0, 4.0, 1), [4.0])
    assert mining.histogram_bin(np.array([0.0, 0.25, 0.5, 1.0]), 0.0, 1.0, 4).tolist() == [0, 1, 2, 3]
    assert mining.histogram_bin(np.array([2.0, 2.0]), 2.0, 2.0, 3).tolist() == [2, 2]
    # levels 3, 2, 1: 1.5 is as near to 2 as to 1 and goes to the higher level
    nz = Nonzeros(np.zeros(5, np.int32), np.arange(5, dtype=np.int32), np.zeros(5, np.int16),
                  np.array([1.0, 1.5, 2.0, 3.0, 2.0], np.float32))  # fmt: skip
    _, ex = mining.summarize_features(nz, 0, 1, top_k=2, num_bands=3, per_band=2, bins=2)
    got = {
        (b, r): (row, a)
        for b, r, row, a in zip(ex.band.tolist(), ex.rank.tolist(), ex.row.tolist(), ex.act.tolist(), strict=True)
    }
    assert got == {
        (-1, 0): (3, 3.0), (-1, 1): (2, 2.0),  # top-2: ties at 2.0 broken by row
        (0, 0): (3, 3.0),
        (1, 0): (2, 2.0), (1, 1): (4, 2.0),  # the third member (1.5) is left out: per_band = 2
        (2, 0): (0, 1.0),
    }  # fmt: skip


def test_chunk_features_cover_every_feature_within_the_budget():
    counts = np.array([5, 0, 3, 9, 1, 1, 12, 0])
    ranges = mining.chunk_features(counts, max_nonzeros=8)
    assert ranges[0][0] == 0 and ranges[-1][1] == len(counts)
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    for first, stop in ranges:
        assert counts[first:stop].sum() <= 8 or stop - first == 1


def test_many_ties_are_broken_by_row_and_position():
    """3000 activations of one feature on two values: top-k and each band take the earliest (row, pos)."""
    n = 3000
    rows = np.arange(n, dtype=np.int32) // 10
    act = np.random.default_rng(4).choice(np.array([0.5, 1.5], np.float32), size=n)
    nz = Nonzeros(np.zeros(n, np.int32), rows, (np.arange(n) % 10).astype(np.int16), act)
    _, ex = mining.summarize_features(nz, 0, 1, top_k=6, num_bands=2, per_band=4, bins=3)
    order = [(r, p) for r, p, a in zip(nz.row.tolist(), nz.pos.tolist(), act.tolist(), strict=True) if a == 1.5]
    low = [(r, p) for r, p, a in zip(nz.row.tolist(), nz.pos.tolist(), act.tolist(), strict=True) if a == 0.5]
    pairs = lambda band: list(zip(ex.row[ex.band == band].tolist(), ex.pos[ex.band == band].tolist(), strict=True))  # noqa: E731
    assert pairs(-1) == order[:6]
    assert pairs(0) == order[:4] and pairs(1) == low[:4]
