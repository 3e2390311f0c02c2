"""One layer's mined feature_acts files (storage.tables rows) read back as core.mining non-zeros, a
chunk of complete features at a time."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from core.mining import Nonzeros, chunk_features, concat_nonzeros, empty_nonzeros, sort_by_feature
from storage import tables


def iter_feature_chunks(parts: list[Path], d_sae: int, max_nonzeros: int) -> Iterator[tuple[int, int, Nonzeros]]:
    """Read one layer's feature_acts files (each sorted by feature, in row order) back as complete
    features: yields (first, stop, non-zeros of features first..stop-1 sorted by feature, then row
    and position), holding about `max_nonzeros` rows at a time."""
    counts = [tables.feature_counts(p, d_sae) for p in parts]
    offsets = [np.concatenate([[0], np.cumsum(c)]) for c in counts]
    total = np.sum(counts, axis=0) if counts else np.zeros(d_sae, np.int64)
    for first, stop in chunk_features(total, max_nonzeros):
        pieces = []
        for path, off in zip(parts, offsets, strict=True):
            table = tables.read_rows(path, int(off[first]), int(off[stop]))
            pieces.append(Nonzeros(*(table.column(n).to_numpy() for n in Nonzeros._fields)))
        nz = concat_nonzeros(pieces) if pieces else empty_nonzeros()
        if len(pieces) > 1:
            nz = nz.take(sort_by_feature(nz.feature, d_sae))
        yield first, stop, nz
