"""Shuffled, resumable batches of (mlp_in, mlp_out) pairs over any source that can read contiguous tokens:
the activation cache (storage.shards, wrapped by ShuffledPairs) or the streaming source (core.activations).
The order is docs/method.md's "training batches"."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

BLOCK_TOKENS = 1024
"""Contiguous tokens read at once by the shuffler (the unit of cross-shard mixing)."""
BUFFER_BYTES = 256 * 2**20
"""Default memory for one shuffle window of float32 pairs."""


class PairBatches:
    """Shuffled, resumable batches over any pair source that can `read(start, stop)` contiguous tokens.

    One epoch is a fixed stream of token indices: the blocks of `block_tokens` contiguous tokens in
    [0, stop_token) are put in a random order, consecutive blocks are grouped into windows of about
    `buffer_bytes` of float32 pairs, and each window is read and permuted as a whole. Batches are
    consecutive slices of that stream, so every pair appears exactly once per epoch, the stream
    depends only on (seed, epoch, n_tokens, block and window sizes), and `start_batch` skips whole
    windows without reading them. The last partial batch is kept (yielded smaller).
    Memory: about two windows (the window and its permuted copy).
    """

    n_tokens: int
    d_in: int
    d_out: int
    block_tokens: int = BLOCK_TOKENS
    buffer_bytes: int = BUFFER_BYTES

    def read(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def window_tokens(self) -> int:
        """Tokens per shuffle window: the memory budget, rounded down to whole blocks (at least one)."""
        per_token = 4 * (self.d_in + self.d_out)
        return max(1, self.buffer_bytes // per_token // self.block_tokens) * self.block_tokens

    def num_batches(self, batch_size: int, stop_token: int | None = None) -> int:
        """Batches per epoch, the last partial one included."""
        return -(-self._stop(stop_token) // positive(batch_size, "batch_size"))

    def batches(
        self, batch_size: int, seed: int, epoch: int, start_batch: int = 0, stop_token: int | None = None
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """(mlp_in [batch, d_in], mlp_out [batch, d_out]) float32 batches of one epoch, from `start_batch`."""
        positive(batch_size, "batch_size")
        if min(seed, epoch, start_batch) < 0:
            raise ValueError(f"seed, epoch and start_batch must be >= 0, got {seed}, {epoch}, {start_batch}")
        windows = epoch_windows(self._stop(stop_token), self.block_tokens, self.window_tokens(), seed, epoch)
        return self._stream(windows, batch_size, start_batch * batch_size, seed, epoch)

    def _stop(self, stop_token: int | None) -> int:
        stop = self.n_tokens if stop_token is None else stop_token
        if not 0 <= stop <= self.n_tokens:
            raise ValueError(f"stop_token {stop_token} is outside 0..{self.n_tokens}")
        return stop

    def _stream(
        self, windows: list[list[tuple[int, int]]], batch_size: int, skip: int, seed: int, epoch: int
    ) -> Iterator[tuple[Tensor, Tensor]]:
        pending: list[tuple[Tensor, Tensor]] = []  # the head of the next batch, from earlier windows
        n_pending = window_start = 0
        for index, spans in enumerate(windows):
            size = sum(stop - start for start, stop in spans)
            first = max(0, skip - window_start)  # stream position where this window starts to count
            window_start += size
            if first >= size:
                continue  # the whole window lies before the resume point: not read
            x_in, x_out = self._read_window(spans, size, seed, epoch, index)
            x_in, x_out = x_in[first:], x_out[first:]
            if n_pending:
                need = batch_size - n_pending
                pending.append((x_in[:need], x_out[:need]))
                n_pending += pending[-1][0].shape[0]
                x_in, x_out = x_in[need:], x_out[need:]
                if n_pending < batch_size:
                    continue
                yield _join(pending)
                pending, n_pending = [], 0
            full = x_in.shape[0] - x_in.shape[0] % batch_size
            for start in range(0, full, batch_size):
                yield x_in[start : start + batch_size], x_out[start : start + batch_size]
            if full < x_in.shape[0]:
                pending, n_pending = [(x_in[full:], x_out[full:])], x_in.shape[0] - full
        if n_pending:
            yield _join(pending)  # the last, partial batch is kept

    def _read_window(
        self, spans: list[tuple[int, int]], size: int, seed: int, epoch: int, index: int
    ) -> tuple[Tensor, Tensor]:
        x_in = torch.empty(size, self.d_in)  # [window, d_in]
        x_out = torch.empty(size, self.d_out)  # [window, d_out]
        at = 0
        for start, stop in spans:
            block_in, block_out = self.read(start, stop)
            x_in[at : at + stop - start], x_out[at : at + stop - start] = block_in, block_out
            at += stop - start
        perm = torch.from_numpy(np.random.default_rng([seed, epoch, 1, index]).permutation(size))
        return x_in[perm], x_out[perm]


def epoch_windows(
    n_tokens: int, block_tokens: int, window_tokens: int, seed: int, epoch: int
) -> list[list[tuple[int, int]]]:
    """The shuffled blocks of one epoch grouped into windows: [[(start, stop), ...], ...]."""
    blocks = [(s, min(s + block_tokens, n_tokens)) for s in range(0, n_tokens, block_tokens)]
    order = np.random.default_rng([seed, epoch, 0]).permutation(len(blocks))
    per_window = max(1, window_tokens // block_tokens)
    shuffled = [blocks[i] for i in order]
    return [shuffled[i : i + per_window] for i in range(0, len(shuffled), per_window)]


def _join(parts: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def positive(value: int, name: str) -> int:
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


class ShuffledPairs(PairBatches):
    """PairBatches over a reader that has `n_tokens`, `d_in`, `d_out` and `read(start, stop)` (e.g. one layer of
    the activation cache, storage.shards.PairSource); the reader stays reachable as `.reader`."""

    def __init__(self, reader: Any, block_tokens: int = BLOCK_TOKENS, buffer_bytes: int = BUFFER_BYTES) -> None:
        self.reader = reader
        self.n_tokens, self.d_in, self.d_out = reader.n_tokens, reader.d_in, reader.d_out
        self.block_tokens, self.buffer_bytes = block_tokens, buffer_bytes

    def read(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        return self.reader.read(start, stop)

    def nonfinite_files(self) -> list[str]:
        """The reader's files holding NaN or infinities, when it can name them (for error messages)."""
        locate = getattr(self.reader, "nonfinite_files", None)
        return list(locate()) if callable(locate) else []
