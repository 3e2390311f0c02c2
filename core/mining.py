"""Feature mining (docs/method.md section 4): stream token rows through the model, encode each layer's
MLP input with its transcoder, and keep every non-zero activation as (feature, row, pos, act).

Two passes, both with bounded memory (never a dense [all tokens x d_sae] matrix):
1. `stream_nonzeros` runs the model batch by batch, stopping right after the last needed hook, and
   yields each batch's non-zeros per layer; `RunBuffer` turns them into runs sorted by feature.
2. `summarize_features` takes the non-zeros of a contiguous range of features (sorted by feature,
   then row and position) and returns their statistics, histogram, top-k and banded examples.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from core.transcoder import Transcoder

if TYPE_CHECKING:  # annotations only: readers of mined tables (storage.dashboard) need no transformer_lens
    from transformer_lens import HookedTransformer

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

    @property
    def size(self) -> int:
        """Number of non-zeros."""
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

    blocks = [int(name.split(".")[1]) for name in wanted if name.startswith("blocks.")]
    last_block = max(blocks, default=model.cfg.n_layers - 1)
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

    `keep` [batch pos] (bool) masks positions that are not mined (e.g. BOS tokens). On the CPU this
    runs in numpy: single-threaded, so it does not slow down when cores are oversubscribed."""
    batch, ctx, d_sae = z.shape
    if z.is_cuda:
        flat_index = (z.reshape(-1) != 0).nonzero()[:, 0]  # [n]
        act = z.reshape(-1)[flat_index].float().cpu().numpy()
        flat_index = flat_index.cpu().numpy()
    else:
        z = z if z.dtype in (torch.float32, torch.float64) else z.float()  # numpy has no bfloat16
        values = z.detach().reshape(-1).numpy()  # [tokens * d_sae], a view
        flat_index = np.flatnonzero(values != 0)  # faster than on the floats directly
        act = values[flat_index].astype(np.float32)
    token, feature = np.divmod(flat_index, d_sae)
    if keep is not None:
        kept = keep.reshape(-1).cpu().numpy()[token]
        token, feature, act = token[kept], feature[kept], act[kept]
    row, pos = np.divmod(token, ctx)
    return Nonzeros(feature.astype(np.int32), (row + row0).astype(np.int32), pos.astype(np.int16), act)


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
            out = {
                layer: batch_nonzeros(tc.encode(inputs[layer].to(tc.dtype)), start, keep)
                for layer, tc in transcoders.items()
            }
        yield out


class RunBuffer:
    """Collects one layer's non-zeros (in token order) and returns them as runs sorted by feature
    (ties keep token order, so within a feature entries are sorted by row then position) whenever
    more than `max_nonzeros` are held."""

    def __init__(self, d_sae: int, max_nonzeros: int):
        self.d_sae = d_sae
        self.max_nonzeros = max_nonzeros
        self.parts: list[Nonzeros] = []
        self.held = 0

    def add(self, nz: Nonzeros) -> Nonzeros | None:
        """Hold `nz`; return a sorted run when the buffer is full, else None."""
        self.parts.append(nz)
        self.held += nz.size
        return self.flush() if self.held >= self.max_nonzeros else None

    def flush(self) -> Nonzeros | None:
        """Return everything held as one run sorted by feature (None when empty)."""
        if not self.held:
            return None
        run = concat_nonzeros(self.parts)
        self.parts, self.held = [], 0
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


def band_levels(lo: float, hi: float, num_bands: int) -> np.ndarray:
    """The evenly spaced activation levels, highest first: l_b = hi - b (hi - lo) / (num_bands - 1)."""
    if num_bands == 1:
        return np.array([hi], dtype=np.float64)
    b = np.arange(num_bands, dtype=np.float64)
    return hi - b * (hi - lo) / (num_bands - 1)


def nearest_band(act: np.ndarray, lo: np.ndarray, hi: np.ndarray, num_bands: int) -> tuple[np.ndarray, np.ndarray]:
    """For each activation (float64, with its feature's lo and hi): the index of the nearest level
    (the higher level, i.e. the smaller index, on a tie) and the distance to it."""
    if num_bands == 1:
        return np.zeros(act.shape[0], np.int64), np.abs(act - hi)
    width = (hi - lo) / (num_bands - 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        guess = np.where(width > 0, np.floor((hi - act) / width), 0).astype(np.int64)
    best = np.full(act.shape[0], num_bands, np.int64)
    dist = np.full(act.shape[0], np.inf)
    for offset in (-1, 0, 1):  # the exact argmin lies within one of the rounded guess
        b = np.clip(guess + offset, 0, num_bands - 1)
        d = np.abs(act - (hi - b * (hi - lo) / (num_bands - 1)))  # the level, computed as band_levels does
        better = (d < dist) | ((d == dist) & (b < best))
        best, dist = np.where(better, b, best), np.where(better, d, dist)
    return best, dist


def histogram_bin(act: np.ndarray, lo: np.ndarray | float, hi: np.ndarray | float, bins: int) -> np.ndarray:
    """Bin of each activation among `bins` equal-width bins over [lo, hi] (per entry or scalar):
    min(floor((a - lo) / (hi - lo) * bins), bins - 1) in float64, the last bin when hi == lo."""
    lo, hi = np.broadcast_to(lo, act.shape), np.broadcast_to(hi, act.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        index = np.floor((act - lo) / (hi - lo) * bins)
    return np.where(hi > lo, np.minimum(index, bins - 1), bins - 1).astype(np.int64)


def order_by_activation(local: np.ndarray, act: np.ndarray) -> np.ndarray:
    """Stable order by (feature, activation descending): ties keep their (row, pos) order."""
    bits = act.astype(np.float32).view(np.uint32).astype(np.int64)
    sortable = np.where(bits >> 31, 0xFFFFFFFF - bits, bits | 0x80000000)  # float order as unsigned ints
    return np.argsort((local.astype(np.int64) << 32) | (0xFFFFFFFF - sortable), kind="stable")


def summarize_features(
    nz: Nonzeros, first: int, stop: int, top_k: int, num_bands: int, per_band: int, bins: int
) -> tuple[FeatureStats, Examples]:
    """Statistics and examples of features first..stop-1 from their complete non-zeros, sorted by
    feature and, within a feature, by (row, pos). Vectorised over all features of the range.

    Per feature, over its non-zero activations a (lo = min a, hi = max a):
    - top-k: the k largest activations, ties broken by (row, pos).
    - bands: levels l_b = hi - b (hi - lo) / (B - 1), b = 0..B-1 (l_0 = hi, l_{B-1} = lo; only hi
      when B = 1). Every example belongs to the band of its nearest level (the higher level on a
      tie); band b shows the `per_band` members nearest to l_b, ordered by (|a - l_b|, -a, row,
      pos). Bands never repeat an example; a band is empty when no example is nearest to its level.
    - histogram: counts in `bins` equal-width bins over [lo, hi] (see `histogram_bin`).
    All arithmetic on activations is float64 of the stored float32 values."""
    m, n = stop - first, nz.size
    local = nz.feature.astype(np.int64) - first
    counts = np.bincount(local, minlength=m)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    act = nz.act.astype(np.float64)
    fired = np.flatnonzero(counts)
    mean = np.full(m, np.nan)
    lo, hi = np.full(m, np.nan, np.float32), np.full(m, np.nan, np.float32)
    if n:
        mean[fired] = np.add.reduceat(act, starts[fired]) / counts[fired]
        lo[fired] = np.minimum.reduceat(nz.act, starts[fired])
        hi[fired] = np.maximum.reduceat(nz.act, starts[fired])
    lo_e, hi_e = lo[local].astype(np.float64), hi[local].astype(np.float64)
    hist = np.bincount(local * bins + histogram_bin(act, lo_e, hi_e, bins), minlength=m * bins).reshape(m, bins)
    stats = FeatureStats(np.arange(first, stop, dtype=np.int32), counts.astype(np.int64), mean, lo, hi, hist)
    order = order_by_activation(local, nz.act)
    rank = np.arange(n) - starts[local[order]]
    top = rank < top_k
    picks = [(order[top], np.full(int(top.sum()), -1, np.int64), rank[top])]
    band, dist = nearest_band(act[order], lo_e[order], hi_e[order], num_bands)
    picks += _nearest_per_group(local[order] * num_bands + band, dist, per_band, order, band)
    return stats, _examples(nz, picks)


def _nearest_per_group(
    group: np.ndarray, dist: np.ndarray, per_band: int, order: np.ndarray, band: np.ndarray
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Within each run of equal `group` (entries already in (-a, row, pos) order), pick the
    `per_band` entries with the smallest `dist`, ties to the earliest: (index, band, rank) arrays."""
    n = group.shape[0]
    if n == 0:
        return []
    boundary = np.concatenate([[True], group[1:] != group[:-1]])
    starts = np.flatnonzero(boundary)
    run = np.cumsum(boundary) - 1  # run id of each entry
    free = np.ones(n, dtype=bool)
    position = np.arange(n)
    picks = []
    for rank in range(per_band):
        masked = np.where(free, dist, np.inf)
        nearest = np.minimum.reduceat(masked, starts)
        first = np.minimum.reduceat(np.where(free & (masked == nearest[run]), position, n), starts)
        chosen = first[first < n]
        free[chosen] = False
        picks.append((order[chosen], band[chosen], np.full(chosen.shape[0], rank, np.int64)))
    return picks


def _examples(nz: Nonzeros, picks: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> Examples:
    """Examples from (index into nz, band, rank) arrays, ordered by (feature, band, rank)."""
    index, band, rank = (np.concatenate([p[i] for p in picks]) if picks else np.zeros(0, np.int64) for i in range(3))
    order = np.lexsort((rank, band, nz.feature[index]))
    index, band, rank = index[order], band[order], rank[order]
    return Examples(
        nz.feature[index], band.astype(np.int16), rank.astype(np.int16), nz.row[index], nz.pos[index], nz.act[index]
    )


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
