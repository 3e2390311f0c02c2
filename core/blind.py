"""Blind interpretability comparison of two dictionaries (the paper's Table 1), as pure logic: draw live
features from each with a seeded generator, shuffle them into an opaque order, check a rater's answers
and count them per dictionary once unblinded. Pages and files are written by storage/blind.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from core.ratings import CONTEXT, INTERPRETABILITY, BlindError
from core.transcoder import TranscoderConfig


class BlindItem(NamedTuple):
    """One feature of a blind set, in display order."""

    id: str
    """Opaque id shown to the rater ("F07"): its display position, nothing about its source."""
    dictionary: int
    """Index of the dictionary it was drawn from."""
    feature: int
    """Feature index within that dictionary."""


class Rating(NamedTuple):
    """A rater's answer for one feature."""

    id: str
    interpretability: str
    """One of INTERPRETABILITY."""
    context: str
    """One of CONTEXT, or "" (required only when interpretable)."""
    note: str


class TallyRow(NamedTuple):
    """Per dictionary: the paper's Table 1 counts."""

    dictionary: str
    rated: int
    interpretable: int
    maybe: int
    uninterpretable: int
    context_free: int
    """Interpretable features rated context-free."""
    context_dependent: int
    """Interpretable features rated context-dependent."""


def dictionary_kind(cfg: TranscoderConfig) -> str:
    """The kind of a dictionary: sae when it reconstructs the activation it reads, else transcoder or
    skip-transcoder."""
    if cfg.hook_in and cfg.hook_in == cfg.hook_out:
        return "sae"
    return "skip-transcoder" if cfg.skip else "transcoder"


# ---------------------------------------------------------------- drawing the set


def live_features(feature: np.ndarray, n_fired: np.ndarray, freq: np.ndarray, min_density: float = 0.0) -> np.ndarray:
    """Sorted indices of the features that fired at least once and on at least `min_density` of the tokens."""
    live = (n_fired > 0) & (freq >= min_density)
    return np.sort(feature[live].astype(np.int64))


def opaque_ids(count: int) -> list[str]:
    """F01, F02, ... (zero-padded to the width of `count`, at least two digits)."""
    width = max(2, len(str(count)))
    return [f"F{i + 1:0{width}d}" for i in range(count)]


def draw_blind_set(live: Sequence[np.ndarray], names: Sequence[str], n: int, seed: int) -> list[BlindItem]:
    """`n` features drawn uniformly without replacement from each dictionary's live features, shuffled.

    The seed's SeedSequence spawns one child per dictionary (its draw) and one for the shuffle, so the
    draw of one dictionary does not depend on the other's size. Ids are display positions."""
    if n < 1:
        raise BlindError(f"n must be >= 1 features per dictionary, got {n}")
    children = np.random.SeedSequence(seed).spawn(len(live) + 1)
    drawn: list[tuple[int, int]] = []
    for d, (features, name) in enumerate(zip(live, names, strict=True)):
        if len(features) < n:
            raise BlindError(
                f"{name}: only {len(features)} live features (fired on the mining tokens, density >= the minimum), "
                f"fewer than n={n}; lower n or the minimum density"
            )
        picked = np.random.default_rng(children[d]).choice(np.asarray(features), size=n, replace=False)
        drawn += [(d, int(f)) for f in picked]
    order = np.random.default_rng(children[-1]).permutation(len(drawn))
    return [BlindItem(i, *drawn[j]) for i, j in zip(opaque_ids(len(drawn)), order, strict=True)]


# ---------------------------------------------------------------- checking and counting ratings


def _text(value: Any, where: str, name: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BlindError(f"{where}: {name} must be text, got {value!r}")
    return value.strip()


def _choice(value: str, allowed: tuple[str, ...], where: str, name: str) -> str:
    normal = value.lower().replace("_", "-").replace(" ", "-")
    if normal not in allowed:
        raise BlindError(f"{where}: {name} {value!r} is not one of {', '.join(allowed)}")
    return normal


def parse_rating(row: Mapping[str, Any], where: str, known: Mapping[str, int]) -> Rating | None:
    """One rating row checked against the set's ids; None when the row leaves the feature unrated."""
    rid = _text(row.get("id"), where, "id")
    if rid not in known:
        listed = f"{min(known)}..{max(known)}" if known else "none"
        raise BlindError(f"{where}: unknown id {rid!r}; this set has ids {listed}")
    where = f"{where} ({rid})"
    level = _text(row.get("interpretability"), where, "interpretability")
    context = _text(row.get("context"), where, "context")
    note = _text(row.get("note"), where, "note")
    if not level:
        if context:
            raise BlindError(
                f"{where}: a context is given but no interpretability; choose {', '.join(INTERPRETABILITY)}"
            )
        return None
    level = _choice(level, INTERPRETABILITY, where, "interpretability")
    context = _choice(context, CONTEXT, where, "context") if context else ""
    if level == "interpretable" and not context:
        raise BlindError(f"{where}: rated interpretable but no context; choose {' or '.join(CONTEXT)}")
    return Rating(rid, level, context, note)


def check_ratings(
    rows: Sequence[tuple[str, Mapping[str, Any]]], ids: Sequence[str], partial: bool = False
) -> dict[str, Rating]:
    """Ratings by id from (location, row) pairs: unknown or repeated ids, invalid values and (unless
    `partial`) unrated features raise a one-line BlindError naming where."""
    known = {i: k for k, i in enumerate(ids)}
    out: dict[str, Rating] = {}
    seen: dict[str, str] = {}
    for where, row in rows:
        rating = parse_rating(row, where, known)
        rid = str(row.get("id")).strip()
        if rid in seen:
            raise BlindError(f"{where}: id {rid!r} is rated twice (also at {seen[rid]}); keep one row per id")
        seen[rid] = where
        if rating is not None:
            out[rid] = rating
    missing = [i for i in ids if i not in out]
    if missing and not partial:
        shown = ", ".join(missing[:8]) + (", ..." if len(missing) > 8 else "")
        raise BlindError(
            f"{len(missing)} of {len(ids)} features are not rated ({shown}); rate them or tally with --partial"
        )
    return out


def tally(ratings: Mapping[str, Rating], items: Sequence[BlindItem], names: Sequence[str]) -> list[TallyRow]:
    """Unblind: per dictionary, the counts of each interpretability level and, among the interpretable
    features, of each context kind."""
    counts = [dict.fromkeys(("rated", *INTERPRETABILITY, *CONTEXT), 0) for _ in names]
    for item in items:
        rating = ratings.get(item.id)
        if rating is None:
            continue
        c = counts[item.dictionary]
        c["rated"] += 1
        c[rating.interpretability] += 1
        if rating.interpretability == "interpretable":
            c[rating.context] += 1
    return [
        TallyRow(name, c["rated"], c["interpretable"], c["maybe"], c["uninterpretable"], c["context-free"],
                 c["context-dependent"])
        for name, c in zip(names, counts, strict=True)
    ]  # fmt: skip
