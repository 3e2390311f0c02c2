"""Transcoder training pairs from hooked forward passes: every chosen layer's MLP input and output
from one pass that stops after the last needed layer, copied by hooks into preallocated buffers.

core.streaming reuses the capture to serve pairs without a cache.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer, HookedTransformerConfig

from core.errors import UserError

HOOK_IN = "blocks.{layer}.ln2.hook_normalized"
"""Default input hook: the output of the MLP's norm, i.e. the MLP's input once norm weights are folded."""
HOOK_OUT = "blocks.{layer}.hook_mlp_out"
"""Default output hook: what the MLP adds to the residual stream."""


class CaptureError(UserError, ValueError):
    """A layer, hook or token row the model cannot serve, said in one line before any forward pass."""


class MlpPairs(NamedTuple):
    """One layer's pairs, one row per kept token (row-major over token rows, then positions)."""

    mlp_in: Float[Tensor, "token d_in"]
    """Transcoder input (by default exactly what the MLP consumes)."""
    mlp_out: Float[Tensor, "token d_out"]
    """Transcoder target (by default what the MLP writes to the residual stream)."""


class HookNames(NamedTuple):
    """The two hook points of one layer."""

    hook_in: str
    hook_out: str


def hook_names(layer: int, hook_in: str = HOOK_IN, hook_out: str = HOOK_OUT) -> HookNames:
    """Hook names of `layer` from `{layer}` templates."""
    return HookNames(hook_in.format(layer=layer), hook_out.format(layer=layer))


def tokens_per_row(context_size: int, drop_bos: bool) -> int:
    """Pairs kept per token row: every position, minus position 0 when BOS is dropped."""
    return context_size - 1 if drop_bos else context_size


# ---------------------------------------------------------------- validation (before any forward pass)


def check_capture(
    model: HookedTransformer,
    layers: Sequence[int],
    hook_in: str = HOOK_IN,
    hook_out: str = HOOK_OUT,
    tokens: Int[Tensor, "row pos"] | np.ndarray | None = None,
    drop_bos: bool = True,
) -> None:
    """Raise CaptureError (one line) when a layer, a hook or the token rows do not fit the model."""
    _check_layers_and_hooks(model, layers, hook_in, hook_out)
    for layer in layers:
        if hook_in == HOOK_IN and hasattr(model.blocks[layer].ln2, "w"):
            raise CaptureError(
                f"blocks.{layer}.ln2 applies its weight after hook_normalized, so that hook is not the MLP's "
                "input; load the model with folded norms (core.model.load_model folds them)"
            )
    if tokens is not None:
        _check_tokens(model, tokens, drop_bos)


def check_capture_config(
    model_cfg: HookedTransformerConfig, layers: Sequence[int], hook_in: str = HOOK_IN, hook_out: str = HOOK_OUT
) -> None:
    """check_capture's layer and hook checks without any weights, on a skeleton of the model built on
    the meta device from its config (~0.2 s for the bundled model): a pre-flight check for before a
    model is loaded. Norm folding is not checked here (it happens at load)."""
    model_cfg = dataclasses.replace(model_cfg, tokenizer_name=None)  # never fetch a tokenizer
    with torch.device("meta"):
        skeleton = HookedTransformer(model_cfg, move_to_device=False)
    _check_layers_and_hooks(skeleton, layers, hook_in, hook_out)


def _check_layers_and_hooks(model: HookedTransformer, layers: Sequence[int], hook_in: str, hook_out: str) -> None:
    n_layers = model.cfg.n_layers
    if not layers:
        raise CaptureError("no layers to capture; list at least one, e.g. layers: [0]")
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer < n_layers:
            raise CaptureError(f"layer {layer!r} is out of range: {model.cfg.model_name} has layers 0..{n_layers - 1}")
        for name in hook_names(int(layer), hook_in, hook_out):
            if name not in model.hook_dict:
                raise CaptureError(f"{model.cfg.model_name} has no hook {name!r}; check activations.hook_in/hook_out")


def _check_tokens(model: HookedTransformer, tokens: Tensor | np.ndarray, drop_bos: bool) -> None:
    if tokens.ndim != 2:
        raise CaptureError(f"token rows must be 2-D [row, pos], got shape {tuple(tokens.shape)}")
    n_pos = tokens.shape[1]
    if n_pos > model.cfg.n_ctx or n_pos < (2 if drop_bos else 1):
        raise CaptureError(
            f"token rows have {n_pos} positions; the model takes 1..{model.cfg.n_ctx} (2+ with drop_bos)"
        )
    if tokens.shape[0] and (int(tokens.min()) < 0 or int(tokens.max()) >= model.cfg.d_vocab):
        raise CaptureError(
            f"token ids span {int(tokens.min())}..{int(tokens.max())} but the model's vocabulary is "
            f"0..{model.cfg.d_vocab - 1}; tokenise with the same model"
        )


# ---------------------------------------------------------------- capture


class PairRecorder:
    """Forward hooks that copy each layer's (input, output) activations into preallocated buffers.

    Buffers may have any float dtype (the copy converts) and live on any device. Set `offset` (the
    first buffer row to fill) before each forward pass.
    """

    def __init__(
        self,
        model: HookedTransformer,
        buffers: dict[int, MlpPairs],
        drop_bos: bool = True,
        hook_in: str = HOOK_IN,
        hook_out: str = HOOK_OUT,
    ) -> None:
        self.model, self.buffers, self.skip, self.offset = model, buffers, int(drop_bos), 0
        self.stop_at_layer = max(buffers) + 1
        self.hooks: list[tuple[str, Callable]] = []
        for layer, pair in buffers.items():
            names = hook_names(layer, hook_in, hook_out)
            self.hooks.append((names.hook_in, self._copier(pair.mlp_in)))
            self.hooks.append((names.hook_out, self._copier(pair.mlp_out)))

    def _copier(self, buffer: Tensor) -> Callable:
        model_dtype = self.model.cfg.dtype

        def copy(act: Float[Tensor, "batch pos d"], hook: object) -> None:
            # norms hook in float32 and cast after: cast first so we keep exactly what the MLP consumes
            act = act[:, self.skip :].to(model_dtype)  # [batch, pos', d]
            n = act.shape[0] * act.shape[1]
            buffer[self.offset : self.offset + n].view(act.shape).copy_(act)

        return copy

    def run(self, tokens: Int[Tensor, "batch pos"], offset: int) -> int:
        """One forward pass over `tokens`, filling rows from `offset`; returns the rows filled."""
        self.offset = offset
        self.model(tokens.to(self.model.cfg.device, torch.long), stop_at_layer=self.stop_at_layer)
        return tokens.shape[0] * (tokens.shape[1] - self.skip)


def capture_rows(
    model: HookedTransformer,
    rows: Int[Tensor, "row pos"],
    buffers: dict[int, MlpPairs],
    batch_rows: int,
    drop_bos: bool = True,
    hook_in: str = HOOK_IN,
    hook_out: str = HOOK_OUT,
) -> int:
    """Fill `buffers` (from row 0) with the pairs of every token row, `batch_rows` rows per forward pass.

    Returns the number of pairs written per layer. The caller validates with check_capture first.
    """
    recorder = PairRecorder(model, buffers, drop_bos, hook_in, hook_out)
    filled = 0
    with torch.inference_mode(), model.hooks(fwd_hooks=recorder.hooks):
        for start in range(0, rows.shape[0], batch_rows):
            filled += recorder.run(rows[start : start + batch_rows], filled)
    return filled


def allocate_pairs(
    n_tokens: int, d_in: int, d_out: int, layers: Sequence[int], dtype: torch.dtype, device: str | torch.device = "cpu"
) -> dict[int, MlpPairs]:
    """Empty buffers for `n_tokens` pairs of every layer."""
    return {
        layer: MlpPairs(
            torch.empty(n_tokens, d_in, dtype=dtype, device=device),  # [token, d_in]
            torch.empty(n_tokens, d_out, dtype=dtype, device=device),  # [token, d_out]
        )
        for layer in layers
    }


_KNOWN_WIDTHS = {
    ".ln2.hook_normalized": "d_model",
    ".hook_mlp_out": "d_model",
    ".hook_resid_pre": "d_model",
    ".hook_resid_mid": "d_model",
    ".hook_resid_post": "d_model",
    ".hook_attn_out": "d_model",
    ".mlp.hook_post": "d_mlp",
}
"""Hook widths read from the config (a probe pass costs a fixed ~20-70 ms on the bundled model)."""


def pair_dims(
    model: HookedTransformer, layers: Sequence[int], hook_in: str = HOOK_IN, hook_out: str = HOOK_OUT
) -> dict[int, tuple[int, int]]:
    """(d_in, d_out) of every layer's hooks: from the config for common hooks, else one 2-token probe pass."""
    names = [name for layer in layers for name in hook_names(layer, hook_in, hook_out)]
    widths: dict[str, int] = {}
    for name in names:
        suffix = next((s for s in _KNOWN_WIDTHS if name.endswith(s)), None)
        if suffix is not None and getattr(model.cfg, _KNOWN_WIDTHS[suffix], None):
            widths[name] = int(getattr(model.cfg, _KNOWN_WIDTHS[suffix]))
    unknown = [name for name in names if name not in widths]
    if unknown:

        def note(act: Tensor, hook: object) -> None:
            widths[getattr(hook, "name", "")] = act.shape[-1]

        probe = torch.zeros(1, 2, dtype=torch.long, device=model.cfg.device)  # [1, 2]
        with torch.inference_mode(), model.hooks(fwd_hooks=[(n, note) for n in unknown]):
            model(probe, stop_at_layer=max(layers) + 1)
    return {layer: tuple(widths[n] for n in hook_names(layer, hook_in, hook_out)) for layer in layers}


def capture_mlp_pairs(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    layers: Sequence[int],
    drop_bos: bool = True,
    hook_in: str = HOOK_IN,
    hook_out: str = HOOK_OUT,
) -> dict[int, MlpPairs]:
    """Every layer's (mlp_in, mlp_out) for a batch of token rows, from one hooked forward pass that
    stops after max(layers). Pairs are in the model's dtype and device, BOS positions dropped if asked."""
    check_capture(model, layers, hook_in, hook_out, tokens, drop_bos)
    n_tokens = tokens.shape[0] * tokens_per_row(tokens.shape[1], drop_bos)
    dims = pair_dims(model, layers, hook_in, hook_out)
    buffers = {
        layer: allocate_pairs(n_tokens, *dims[layer], [layer], model.cfg.dtype, model.cfg.device)[layer]
        for layer in layers
    }
    capture_rows(model, torch.as_tensor(tokens), buffers, max(1, tokens.shape[0]), drop_bos, hook_in, hook_out)
    return buffers
