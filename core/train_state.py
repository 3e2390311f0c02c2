"""The resumable state of a training run: weights, Adam, dead-feature counters and position."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from core.config import TrainConfig
from core.transcoder import Transcoder


@dataclass
class TrainState:
    """Everything a resumed run needs besides the data: weights, Adam, dead tracking, position."""

    transcoder: Transcoder
    optimizer: torch.optim.Adam
    steps_since_fired: Int[Tensor, " d_sae"]
    """Optimiser steps since each feature last fired."""
    step: int = 0
    """Optimiser steps done."""
    epoch: int = 0
    """Current epoch."""
    batch: int = 0
    """Next batch index within the current epoch."""
    tokens: int = 0
    """Training tokens consumed."""
    history: list[dict[str, float]] = field(default_factory=list)
    """Logged metric rows (step, tokens, loss, mse, sparsity, l0, fvu, dead, lr, aux)."""
    selection_hint: Tensor | None = None
    """Batch top-k: the last step's smallest kept activation, which screens the next selection (a speed
    hint only, not saved: the selection is exact whatever it is)."""

    def dead_mask(self, window: int) -> Bool[Tensor, " d_sae"]:
        return self.steps_since_fired >= window


def new_state(tc: Transcoder, cfg: TrainConfig) -> TrainState:
    """A fresh Adam optimiser and dead-feature counters for `tc`."""
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    optimizer = torch.optim.Adam(tc.parameters(), lr=cfg.lr, betas=betas, **adam_kernel(tc.device, tc.dtype))
    counters = torch.zeros(tc.cfg.d_sae, dtype=torch.int64, device=tc.device)
    return TrainState(tc, optimizer, counters)


def state_tensors(state: TrainState) -> dict[str, Tensor]:
    """Every tensor of a state, flat and named (weights, Adam moments and steps, dead counters)."""
    tensors = {f"param.{name}": p.detach() for name, p in state.transcoder.named_parameters()}
    names = [name for name, _ in state.transcoder.named_parameters()]
    for index, moments in state.optimizer.state_dict()["state"].items():
        for key, value in moments.items():
            tensors[f"adam.{names[index]}.{key}"] = torch.as_tensor(value).reshape(-1) if key == "step" else value
    tensors["steps_since_fired"] = state.steps_since_fired
    return {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}  # a snapshot, not views


def state_meta(state: TrainState) -> dict[str, Any]:
    """The JSON-able part of a state: position and logged history."""
    return {
        "step": state.step,
        "epoch": state.epoch,
        "batch": state.batch,
        "tokens": state.tokens,
        "history": [dict(row) for row in state.history],
    }


def restore_state(tc: Transcoder, cfg: TrainConfig, tensors: dict[str, Tensor], meta: dict[str, Any]) -> TrainState:
    """Rebuild a TrainState from `state_tensors` / `state_meta` output (weights loaded into `tc`)."""
    with torch.no_grad():
        for name, p in tc.named_parameters():
            p.copy_(tensors[f"param.{name}"])
    state = new_state(tc, cfg)
    names = [name for name, _ in tc.named_parameters()]
    saved = state.optimizer.state_dict()
    for index, name in enumerate(names):
        if f"adam.{name}.exp_avg" in tensors:
            saved["state"][index] = {
                "step": tensors[f"adam.{name}.step"].reshape(()).clone(),
                "exp_avg": tensors[f"adam.{name}.exp_avg"].to(tc.device),
                "exp_avg_sq": tensors[f"adam.{name}.exp_avg_sq"].to(tc.device),
            }
    state.optimizer.load_state_dict(saved)
    state.steps_since_fired.copy_(tensors["steps_since_fired"])
    state.step, state.epoch, state.batch, state.tokens = meta["step"], meta["epoch"], meta["batch"], meta["tokens"]
    state.history = list(meta["history"])
    return state


FUSED_ADAM_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def adam_kernel(device: torch.device, dtype: torch.dtype) -> dict[str, bool]:
    """Adam's fused kernel (one pass over all weights) where torch has one, else the foreach kernel."""
    fused_devices = ("cpu", "cuda", "xpu", "mps")
    if device.type in fused_devices and dtype in FUSED_ADAM_DTYPES:
        return {"fused": True}
    return {"foreach": True}
