"""Feature mining (ALGORITHMS.md section 4): stream token rows through the model, encode each layer's
MLP input with its transcoder, and keep every non-zero activation as (feature, row, pos, act).

Two passes, both with bounded memory (never a dense [all tokens x d_sae] matrix):
1. `stream_nonzeros` runs the model batch by batch, stopping right after the last needed hook, and
   yields each batch's non-zeros per layer; `RunBuffer` turns them into runs sorted by feature.
2. `summarize_features` takes the non-zeros of a contiguous range of features (sorted by feature,
   then row and position) and returns their statistics, histogram, top-k and banded examples.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import NamedTuple

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from core.transcoder import Transcoder

MAX_POS = int(np.iinfo(np.int16).max)
"""Positions are stored as int16."""


class Nonzeros(NamedTuple):
    """Non-zero feature activations of one layer, one entry per (feature, token)."""

    feature: np.ndarray
    """int32 [n] feature index."""
    row: np.ndarray
    """int32 [n] token row (index into the mining tokens)."""
    pos: np.ndarray
    """int16 [n] position in the row."""
    act: np.ndarray
    """float32 [n] activation value."""

    def __len__(self) -> int:  # type: ignore[override]
        return int(self.feature.shape[0])

    def take(self, index: np.ndarray | slice) -> Nonzeros:
        return Nonzeros(self.feature[index], self.row[index], self.pos[index], self.act[index])


def concat_nonzeros(parts: list[Nonzeros]) -> Nonzeros:
    """Concatenate non-zero lists in order."""
    return Nonzeros(*(np.concatenate([getattr(p, name) for p in parts]) for name in Nonzeros._fields))


def empty_nonzeros() -> Nonzeros:
    return Nonzeros(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.int16), np.zeros(0, np.float32))


# ---------------------------------------------------------------- pass 1: the forward stream


class _StopForward(Exception):
    """Raised by the last needed hook so the forward pass skips every later component."""


def hook_names(transcoders: Mapping[int, Transcoder]) -> dict[int, str]:
    """Layer -> the hook each transcoder reads (its cfg.hook_in, else the MLP input of its layer)."""
    return {layer: tc.cfg.hook_in or f"blocks.{layer}.ln2.hook_normalized" for layer, tc in transcoders.items()}


@torch.inference_mode()
def mlp_inputs(
    model: HookedTransformer, tokens: Int[Tensor, "batch pos"], hooks: Mapping[int, str]
) -> dict[int, Float[Tensor, "batch pos d_model"]]:
    """Activations at the given hooks, running the model only as far as the last of them."""
    wanted = set(hooks.values())
    captured: dict[str, Tensor] = {}

    def save(act: Tensor, hook) -> None:
        captured[hook.name] = act
        if len(captured) == len(wanted):
            raise _StopForward

    last_block = max(int(name.split(".")[1]) for name in wanted if name.startswith("blocks."))
    try:
        with model.hooks(fwd_hooks=[(name, save) for name in wanted]):
            model(tokens, stop_at_layer=last_block + 1)
    except _StopForward:
        pass
    missing = wanted - set(captured)
    if missing:
        raise ValueError(f"hooks {sorted(missing)} never fired; check the transcoders' hook_in names")
    return {layer: captured[name] for layer, name in hooks.items()}


def batch_nonzeros(z: Float[Tensor, "batch pos d_sae"], row0: int, keep: Tensor | None = None) -> Nonzeros:
    """Non-zeros of one batch, in token-major order (row, pos, then feature).

    `keep` [batch pos] (bool) masks positions that are not mined (e.g. BOS tokens)."""
    batch, ctx, d_sae = z.shape
    if keep is not None:
        z = z * keep[..., None].to(z.dtype)
    flat = z.reshape(batch * ctx, d_sae)  # [tokens d_sae]
    idx = flat.nonzero()  # [n 2]: (token, feature), token-major
    token, feature = idx[:, 0], idx[:, 1]
    act = flat[token, feature]
    return Nonzeros(
        feature.to(torch.int32).cpu().numpy(),
        (token // ctx + row0).to(torch.int32).cpu().numpy(),
        (token % ctx).to(torch.int16).cpu().numpy(),
        act.to(torch.float32).cpu().numpy(),
    )


def stream_nonzeros(
    model: HookedTransformer,
    transcoders: Mapping[int, Transcoder],
    tokens: np.ndarray,
    batch_rows: int,
    bos_id: int | None = None,
) -> Iterator[dict[int, Nonzeros]]:
    """For each batch of `batch_rows` token rows: layer -> the batch's non-zero activations.

    `tokens` is int [n_rows, context]; positions holding `bos_id` are not mined."""
    if tokens.shape[1] > MAX_POS + 1:
        raise ValueError(f"context of {tokens.shape[1]} tokens exceeds the int16 position limit {MAX_POS + 1}")
    hooks = hook_names(transcoders)
    device = next(iter(transcoders.values())).device
    for start in range(0, tokens.shape[0], batch_rows):
        batch = torch.as_tensor(tokens[start : start + batch_rows], dtype=torch.long, device=device)
        keep = None if bos_id is None else batch != bos_id  # [batch pos]
        inputs = mlp_inputs(model, batch, hooks)
        with torch.inference_mode():
            yield {
                layer: batch_nonzeros(tc.encode(inputs[layer].to(tc.dtype)), start, keep)
                for layer, tc in transcoders.items()
            }


class RunBuffer:
    """Collects one layer's non-zeros (in token order) and returns them as runs sorted by feature
    (ties keep token order, so within a feature entries are sorted by row then position) whenever
    more than `max_nonzeros` are held."""

    def __init__(self, d_sae: int, max_nonzeros: int):
        self.d_sae = d_sae
        self.max_nonzeros = max_nonzeros
        self.parts: list[Nonzeros] = []
        self.size = 0

    def add(self, nz: Nonzeros) -> Nonzeros | None:
        """Hold `nz`; return a sorted run when the buffer is full, else None."""
        self.parts.append(nz)
        self.size += len(nz)
        return self.flush() if self.size >= self.max_nonzeros else None

    def flush(self) -> Nonzeros | None:
        """Return everything held as one run sorted by feature (None when empty)."""
        if not self.size:
            return None
        run = concat_nonzeros(self.parts)
        self.parts, self.size = [], 0
        return run.take(sort_by_feature(run.feature, self.d_sae))


def sort_by_feature(feature: np.ndarray, d_sae: int) -> np.ndarray:
    """Stable order by feature (a radix sort on uint16 keys when d_sae allows)."""
    keys = feature.astype(np.uint16) if d_sae <= 1 << 16 else feature
    return np.argsort(keys, kind="stable")


# ---------------------------------------------------------------- pass 2: per-feature summaries


class FeatureStats(NamedTuple):
    """Per-feature statistics over the mined tokens, one entry per feature of a range."""

    feature: np.ndarray
    """int32 [m] feature index."""
    n_fired: np.ndarray
    """int64 [m] tokens on which the feature is non-zero."""
    mean_act: np.ndarray
    """float64 [m] mean of the non-zero activations (NaN when it never fired)."""
    min_act: np.ndarray
    """float32 [m] smallest non-zero activation (NaN when it never fired)."""
    max_act: np.ndarray
    """float32 [m] largest activation (NaN when it never fired)."""
    histogram: np.ndarray
    """int64 [m bins] counts of non-zero activations in equal bins over [min_act, max_act]."""


class Examples(NamedTuple):
    """Selected examples of features: top-k (band -1) and banded samples (band 0 = highest level)."""

    feature: np.ndarray
    """int32 [n]"""
    band: np.ndarray
    """int16 [n] -1 for the top-k list, else the band index."""
    rank: np.ndarray
    """int16 [n] rank within the top-k list or within the band."""
    row: np.ndarray
    """int32 [n]"""
    pos: np.ndarray
    """int16 [n]"""
    act: np.ndarray
    """float32 [n]"""


def smallest(keys: list[np.ndarray], k: int, mask: np.ndarray | None = None) -> np.ndarray:
    """Indices of the k entries with the lexicographically smallest (keys[0], keys[1], ..., index),
    in that order, considering only entries where `mask` is true. O(n) plus a sort of the ties."""
    primary = keys[0] if mask is None else np.where(mask, keys[0], np.inf)
    available = primary.shape[0] if mask is None else int(mask.sum())
    k = min(k, available)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    cut = np.partition(primary, k - 1)[k - 1]
    cand = np.flatnonzero(primary <= cut)
    if mask is not None:
        cand = cand[mask[cand]]
    order = np.lexsort([cand] + [key[cand] for key in reversed(keys)])
    return cand[order[:k]]


def band_levels(lo: float, hi: float, num_bands: int) -> np.ndarray:
    """The evenly spaced activation levels, highest first: l_b = hi - b (hi - lo) / (num_bands - 1)."""
    if num_bands == 1:
        return np.array([hi], dtype=np.float64)
    b = np.arange(num_bands, dtype=np.float64)
    return hi - b * (hi - lo) / (num_bands - 1)


def banded_examples(act: np.ndarray, num_bands: int, per_band: int) -> list[np.ndarray]:
    """The banded samples of one feature, one index array per band (highest band first).

    Definition. With the feature's non-zero activations a_e (examples e in (row, pos) order),
    lo = min a, hi = max a, and levels l_b = hi - b (hi - lo) / (B - 1) for b = 0..B-1 (l_0 = hi,
    l_{B-1} = lo; one band at hi when B = 1): for b = 0, 1, ... in turn, band b takes the
    `per_band` examples not taken by an earlier band that are nearest to l_b, ordered by the key
    (|a_e - l_b|, -a_e, e). A band is shorter (or empty) only when fewer examples remain.
    Arithmetic is float64."""
    a = act.astype(np.float64)
    if a.shape[0] == 0:
        return [np.zeros(0, dtype=np.int64) for _ in range(num_bands)]
    free = np.ones(a.shape[0], dtype=bool)
    bands = []
    for level in band_levels(a.min(), a.max(), num_bands):
        picked = smallest([np.abs(a - level), -a], per_band, free)
        free[picked] = False
        bands.append(picked)
    return bands


def histogram(act: np.ndarray, lo: float, hi: float, bins: int) -> np.ndarray:
    """Counts in `bins` equal-width bins over [lo, hi]: bin = min(floor((a - lo) / (hi - lo) * bins),
    bins - 1) in float64; every value goes to the last bin when hi == lo."""
    a = act.astype(np.float64)
    if hi > lo:
        index = np.minimum(np.floor((a - lo) / (hi - lo) * bins).astype(np.int64), bins - 1)
    else:
        index = np.full(a.shape[0], bins - 1, dtype=np.int64)
    return np.bincount(index, minlength=bins)


def summarize_features(
    nz: Nonzeros, first: int, stop: int, top_k: int, num_bands: int, per_band: int, bins: int
) -> tuple[FeatureStats, Examples]:
    """Statistics and examples of features first..stop-1 from their complete non-zeros, sorted by
    feature and, within a feature, by (row, pos).

    Top-k: the k largest activations, ties broken by (row, pos). Bands: see `banded_examples`."""
    counts = np.bincount(nz.feature - first, minlength=stop - first) if len(nz) else np.zeros(stop - first, np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    m = stop - first
    mean, lo, hi = np.full(m, np.nan), np.full(m, np.nan, np.float32), np.full(m, np.nan, np.float32)
    hist = np.zeros((m, bins), dtype=np.int64)
    chosen: list[tuple[int, int, np.ndarray]] = []  # (band, feature offset, segment indices)
    for i in np.flatnonzero(counts):
        start, end = offsets[i], offsets[i + 1]
        act = nz.act[start:end]
        mean[i], lo[i], hi[i] = act.astype(np.float64).mean(), act.min(), act.max()
        hist[i] = histogram(act, float(lo[i]), float(hi[i]), bins)
        chosen.append((-1, i, start + smallest([-act.astype(np.float64)], top_k)))
        for b, picked in enumerate(banded_examples(act, num_bands, per_band)):
            chosen.append((b, i, start + picked))
    stats = FeatureStats(np.arange(first, stop, dtype=np.int32), counts.astype(np.int64), mean, lo, hi, hist)
    return stats, _examples(nz, chosen)


def _examples(nz: Nonzeros, chosen: list[tuple[int, int, np.ndarray]]) -> Examples:
    if not chosen:
        empty = np.zeros(0, np.int16)
        return Examples(np.zeros(0, np.int32), empty, empty, np.zeros(0, np.int32), empty, np.zeros(0, np.float32))
    index = np.concatenate([c[2] for c in chosen])
    band = np.concatenate([np.full(len(c[2]), c[0], np.int16) for c in chosen])
    rank = np.concatenate([np.arange(len(c[2]), dtype=np.int16) for c in chosen])
    return Examples(nz.feature[index], band, rank, nz.row[index], nz.pos[index], nz.act[index])


def chunk_features(counts: np.ndarray, max_nonzeros: int) -> list[tuple[int, int]]:
    """Split features 0..len(counts)-1 into contiguous ranges of at most `max_nonzeros` non-zeros
    (a single feature with more gets a range of its own)."""
    ranges, first, held = [], 0, 0
    for f, c in enumerate(counts.tolist()):
        if held and held + c > max_nonzeros:
            ranges.append((first, f))
            first, held = f, 0
        held += c
    ranges.append((first, len(counts)))
    return ranges
