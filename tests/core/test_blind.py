"""The pure logic of the blind comparison: the draw takes only live features, exactly n from each
dictionary, in an order fixed by the seed; ratings are checked with one-line errors; the tally counts
exactly what a rater answered per dictionary."""

from __future__ import annotations

import numpy as np
import pytest

from core.blind import (
    BlindError,
    BlindItem,
    check_ratings,
    dictionary_kind,
    draw_blind_set,
    live_features,
    opaque_ids,
    tally,
)
from core.transcoder import TranscoderConfig

NAMES = ["A", "B"]


def _live(seed: int, d_sae: int = 200) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n_fired = rng.integers(0, 5, size=d_sae)  # about a fifth never fire
    return live_features(np.arange(d_sae, dtype=np.int32), n_fired, n_fired / 1000)


def test_live_features_respect_firing_and_density():
    feature = np.arange(6, dtype=np.int32)
    n_fired = np.array([0, 1, 5, 0, 20, 2])
    freq = n_fired / 100
    assert live_features(feature, n_fired, freq).tolist() == [1, 2, 4, 5]
    assert live_features(feature, n_fired, freq, min_density=0.05).tolist() == [2, 4]


def test_draw_takes_n_distinct_live_features_from_each_dictionary():
    live = [_live(1), _live(2)]
    items = draw_blind_set(live, NAMES, 30, seed=7)
    assert [i.id for i in items] == opaque_ids(60) == [f"F{k:02d}" for k in range(1, 61)]
    for d in (0, 1):
        picked = [i.feature for i in items if i.dictionary == d]
        assert len(picked) == len(set(picked)) == 30
        assert set(picked) <= set(live[d].tolist())
    # shuffled: both dictionaries appear in each half of the page, not in two blocks
    first = [i.dictionary for i in items[:30]]
    assert 5 < sum(first) < 25


def test_order_is_fixed_by_the_seed_and_differs_across_seeds():
    live = [_live(1), _live(2)]
    same = draw_blind_set(live, NAMES, 10, seed=3)
    assert same == draw_blind_set([x.copy() for x in live], NAMES, 10, seed=3)
    orders = {tuple((i.dictionary, i.feature) for i in draw_blind_set(live, NAMES, 10, seed=s)) for s in range(5)}
    assert len(orders) == 5
    # each dictionary's draw uses its own stream: changing B's live set leaves A's features unchanged
    other = draw_blind_set([live[0], _live(9)], NAMES, 10, seed=3)
    assert sorted(i.feature for i in other if i.dictionary == 0) == sorted(i.feature for i in same if i.dictionary == 0)


def test_draw_is_uniform_over_live_features():
    live = [np.arange(10), np.arange(10)]
    hits = np.zeros(10)
    for seed in range(2000):
        for item in draw_blind_set(live, NAMES, 3, seed):
            if item.dictionary == 0:
                hits[item.feature] += 1
    # each feature is drawn with probability 3/10: 600 of 2000 expected, sd ~20.5; 5 sd tolerance
    assert np.all(np.abs(hits - 600) < 5 * np.sqrt(2000 * 0.3 * 0.7))


def test_too_few_live_features_is_one_line():
    with pytest.raises(BlindError, match=r"^B: only 4 live features .* fewer than n=5") as err:
        draw_blind_set([np.arange(10), np.arange(4)], NAMES, 5, seed=0)
    assert "\n" not in str(err.value)


def test_dictionary_kind_from_hooks():
    def cfg(hook_in: str, hook_out: str, skip: bool = False) -> TranscoderConfig:
        return TranscoderConfig(8, 16, 8, skip=skip, hook_in=hook_in, hook_out=hook_out, layer=1)

    assert dictionary_kind(cfg("blocks.1.hook_mlp_out", "blocks.1.hook_mlp_out")) == "sae"
    assert dictionary_kind(cfg("blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out")) == "transcoder"
    assert dictionary_kind(cfg("blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out", True)) == "skip-transcoder"


# ---------------------------------------------------------------- ratings and the tally

ITEMS = [BlindItem("F01", 1, 5), BlindItem("F02", 0, 9), BlindItem("F03", 0, 2), BlindItem("F04", 1, 7)]
IDS = [i.id for i in ITEMS]


def _rows(*ratings: tuple[str, str, str]) -> list[tuple[str, dict]]:
    return [
        (f"line {k + 2}", {"id": i, "interpretability": level, "context": ctx, "note": ""})
        for k, (i, level, ctx) in enumerate(ratings)
    ]


def test_tally_counts_per_dictionary():
    rows = _rows(
        ("F01", "interpretable", "context-free"),
        ("F02", "Interpretable", "context dependent"),  # case and spacing are forgiven
        ("F03", "maybe", ""),
        ("F04", "uninterpretable", "context-free"),  # a context of a non-interpretable feature is not counted
    )
    table = tally(check_ratings(rows, IDS), ITEMS, NAMES)
    assert [tuple(r) for r in table] == [("A", 2, 1, 1, 0, 0, 1), ("B", 2, 1, 0, 1, 1, 0)]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (_rows(("F09", "maybe", "")), r"^line 2: unknown id 'F09'; this set has ids F01\.\.F04$"),
        (_rows(("F01", "yes", "")), r"^line 2 \(F01\): interpretability 'yes' is not one of interpretable, maybe"),
        (_rows(("F01", "interpretable", "")), r"^line 2 \(F01\): rated interpretable but no context"),
        (_rows(("F01", "maybe", "global")), r"^line 2 \(F01\): context 'global' is not one of context-free"),
        (_rows(("F01", "maybe", ""), ("F01", "maybe", "")), r"^line 3: id 'F01' is rated twice \(also at line 2\)"),
        (_rows(("F01", "maybe", ""), ("F02", "", "")), r"^3 of 4 features are not rated \(F02, F03, F04\)"),
        ([("ratings[0]", {"id": "F01", "interpretability": 3})], r"^ratings\[0\] \(F01\): interpretability must be"),
        (_rows(("F01", "", "context-free")), r"^line 2 \(F01\): a context is given but no interpretability"),
    ],
)
def test_bad_ratings_are_one_line_errors(rows, message):
    with pytest.raises(BlindError, match=message) as err:
        check_ratings(rows, IDS)
    assert "\n" not in str(err.value)


def test_partial_tallies_only_the_rated():
    checked = check_ratings(_rows(("F03", "maybe", "")), IDS, partial=True)
    assert [tuple(r) for r in tally(checked, ITEMS, NAMES)] == [("A", 1, 0, 1, 0, 0, 0), ("B", 0, 0, 0, 0, 0, 0)]
