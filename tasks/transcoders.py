"""The transcoders a run uses, one per configured layer: the train stage's artifacts, or external files named
by `transcoders:`. Shared by the stages that read them (mine, trace), so neither imports the other."""

from __future__ import annotations

from typing import Any

import torch

from core.config import Config, ConfigError
from core.transcoder import Transcoder
from storage import layout


def load_layer_transcoders(cfg: Config, plan: dict[str, Any], device: torch.device) -> dict[int, Transcoder]:
    """The transcoder of every configured layer: from `transcoders:` when set, else the train stage."""
    from storage.checkpoints import load_transcoder, load_transcoders

    layers = list(cfg.activations.layers)
    if cfg.transcoders is not None:
        found = load_transcoders(cfg.transcoders, device=str(device))
        missing = [x for x in layers if x not in found]
        if missing:
            raise ConfigError(f"transcoders: {cfg.transcoders!r} has no transcoder for layer(s) {missing}")
        return {x: found[x] for x in layers}
    train = {int(k): v for k, v in plan["train"].items()}  # JSON turns int keys into strings
    out = {}
    for layer in layers:
        path = layout.stage_dir(cfg.store.root, "train", train[layer])
        if not layout.is_complete(path):
            raise layout.StoreError(
                f"{path}: the transcoder of layer {layer} is not trained; run the train stage first"
            )
        out[layer] = load_transcoder(path, device=str(device))
    return out
