"""The tiny pipeline config that the rerun and server tests share: two layers of a random tiny model, one traced root."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def tiny_pipeline_config(corpus: str | Path, store: str | Path) -> dict[str, Any]:
    """Every stage on a few hundred tokens: layers 0 and 1 trained in two threads, root 1:3 traced."""
    return {
        "model": {"name": "tiny:ln", "device": "cpu"},
        "corpus": {"source": str(corpus), "min_chars": 100},
        "tokens": {"context_size": 32, "train_rows": 40, "mine_rows": 8, "holdout_fraction": 0.2},
        "activations": {"layers": [0, 1]},
        "train": {  # batch top-k, as the default
            "activation": "batchtopk",
            "k": 8,
            "batch_size": 128,
            "epochs": 1,
            "eval_ce_rows": 2,
            "init_tokens": 256,
            "resample_tokens": 256,
        },  # fmt: skip
        "mine": {"top_k": 5, "num_bands": 2, "per_band": 1},
        "trace": {"roots": [{"prompt": "The cat sat on the mat.", "layer": 1, "feature": 3}], "num_branches": 3},
        "store": {"root": str(store)},
        "runner": {"max_workers": 2, "torch_threads": 1},  # the two layers train in two threads
    }
