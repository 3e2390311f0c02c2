"""`circuitflow convert SRC DST --to FORMAT`: read transcoders in any layout we know, write them as native/SAELens
folders or a circuit-tracer set (storage/checkpoints.py does the work; docs/formats.md describes the layouts)."""

from __future__ import annotations

import argparse
import warnings

from torch import Tensor

from core.transcoder import Transcoder
from storage.checkpoints import (
    CheckpointError,
    key_by_layer,
    load_log_feature_sparsity,
    read_transcoders,
    save_sparsity,
    save_transcoders,
)


def main(args: argparse.Namespace) -> int:
    transcoders = _read(args.src)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        written = save_transcoders(transcoders, args.dst, args.to)
    for warning in caught:
        print(f"circuitflow: warning: {warning.message}")
    for tc in transcoders:
        cfg = tc.cfg
        print(
            f"layer {cfg.layer:>3}  {cfg.activation:<8} d_in={cfg.d_in} d_sae={cfg.d_sae}  {cfg.hook_in or '?'} -> {cfg.hook_out or '?'}"
        )
    for path in written:
        print(f"wrote {args.to}: {path}")
    if args.to != "circuit-tracer" and len(transcoders) == 1 and (sparsity := _sparsity(args.src)) is not None:
        if sparsity.shape == (transcoders[0].cfg.d_sae,):
            print(f"wrote feature sparsity: {save_sparsity(written[0], sparsity)}")
    return 0


def _sparsity(src: str) -> Tensor | None:
    """The feature sparsity stored with SRC (SAELens' sparsity.safetensors, the release's *_log_feature_sparsity.pt)."""
    try:
        return load_log_feature_sparsity(src)
    except CheckpointError:
        return None


def _read(src: str) -> list[Transcoder]:
    """Every transcoder SRC names; several need distinct layers (one per file or folder), a single one may have none."""
    found = read_transcoders(src)
    return found if len(found) == 1 else list(key_by_layer(found, src).values())
