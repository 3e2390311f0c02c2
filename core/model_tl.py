"""What every model loader shares: the weight processing, the spec errors, shape facts, and building a
processed HookedTransformer from an unprocessed TransformerLens state dict."""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import torch
from torch import Tensor
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.weight_processing import ProcessWeights

from core.errors import UserError

PROCESSING: dict[str, bool] = {
    "fold_ln": True,
    "center_writing_weights": True,
    "center_unembed": True,
    "fold_value_biases": True,
}
"""Weight processing applied to every model (TransformerLens' from_pretrained defaults)."""


SPEC_FORMS = (
    "`bundled:smollm2-135m`, `tiny:<preset>` or `tiny:{json}`, a local Hugging Face folder, "
    "or a TransformerLens model name such as `gpt2`"
)


class ModelSpecError(UserError, ValueError):
    """A model spec that names no loadable model, described in one line."""


class ModelUnavailableError(UserError, RuntimeError):
    """A valid model name whose weights cannot be reached (no hub, not cached), in one line."""


class ModelInfo(NamedTuple):
    """Shape facts about a model, read without loading its weights."""

    n_layers: int
    """Number of transformer blocks."""
    d_model: int
    """Residual stream width."""
    d_mlp: int
    """MLP hidden width."""
    d_vocab: int
    """Vocabulary size (rows of W_E)."""
    n_ctx: int
    """Longest context the model supports."""
    normalization: str
    """Norm type before folding: "LN" or "RMS" (TransformerLens' `normalization_type`)."""
    name: str
    """Model name (TransformerLens `model_name`)."""


def _info_from_cfg(cfg: HookedTransformerConfig) -> ModelInfo:
    norm = (cfg.normalization_type or "none").removesuffix("Pre")
    return ModelInfo(cfg.n_layers, cfg.d_model, int(cfg.d_mlp or 0), cfg.d_vocab, cfg.n_ctx, norm, cfg.model_name)


def _build(cfg: HookedTransformerConfig, state_dict: dict[str, Tensor], tokenizer: Any) -> HookedTransformer:
    """A HookedTransformer from an unprocessed TL-format state dict, processed as `PROCESSING`.

    Same result as `HookedTransformer.load_and_process_state_dict` (TL's `ProcessWeights` on the
    folded config), but the processed weights are loaded in one pass instead of key by key, which
    takes TL ~6 s for a 135M model.
    """
    model = HookedTransformer(folded_config(cfg), tokenizer, move_to_device=False)
    full = model.fill_missing_keys(dict(state_dict))
    _load_params(model, ProcessWeights.process_weights(full, model.cfg, **PROCESSING))
    return model


def folded_config(cfg: HookedTransformerConfig) -> HookedTransformerConfig:
    """`cfg` as it is after folding the norm weights: LN -> LNPre, RMS -> RMSPre."""
    norm = cfg.normalization_type
    if not PROCESSING["fold_ln"] or norm not in ("LN", "RMS"):
        return cfg
    # seed=None: TL's config would otherwise reseed the global RNGs; the seed is kept as a record.
    folded = HookedTransformerConfig.from_dict({**cfg.to_dict(), "normalization_type": f"{norm}Pre", "seed": None})
    folded.seed = cfg.seed
    return folded


NORM_KEY = re.compile(r"(^|\.)ln(1|2|_final)?\.[wb]$")
"""State-dict keys of norm weights and biases, which folding leaves without a parameter."""


def _load_params(model: HookedTransformer, params: dict[str, Tensor]) -> None:
    """Load every parameter of `model` from `params`; only folded norm weights may be left over."""
    missing, unexpected = model.load_state_dict(params, strict=False)
    missing_params = sorted(set(missing) & {name for name, _ in model.named_parameters()})
    leftovers = [key for key in unexpected if not NORM_KEY.search(key)]
    if missing_params or leftovers:
        raise RuntimeError(f"weights do not fit the model: missing {missing_params[:3]}, unexpected {leftovers[:3]}")


def _place(model: HookedTransformer, device: torch.device, dtype: torch.dtype) -> HookedTransformer:
    """Cast and move after processing, so folding always happens in float32."""
    if dtype != model.cfg.dtype:
        model.to(dtype, print_details=False)
    model.to(str(device), print_details=False)  # a string keeps the index of `cuda:N` in cfg.device
    return model.eval()
