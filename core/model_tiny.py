"""`tiny:<preset>` models: small seeded random transformers with a byte-level tokenizer, for tests."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import torch
from torch import Tensor
from transformer_lens import HookedTransformer, HookedTransformerConfig

from core.model_tl import ModelSpecError, _build
from core.tokenizer import byte_level_tokenizer, with_bos

# ---------------------------------------------------------------- tiny random models

TINY_PRESETS: dict[str, dict[str, Any]] = {
    "ln": {
        "n_layers": 2,
        "d_model": 32,
        "n_heads": 4,
        "d_head": 8,
        "d_mlp": 128,
        "act_fn": "gelu",
        "normalization_type": "LN",
        "positional_embedding_type": "standard",
    },
    "rms": {
        "n_layers": 2,
        "d_model": 32,
        "n_heads": 4,
        "d_head": 8,
        "d_mlp": 96,
        "act_fn": "silu",
        "gated_mlp": True,
        "normalization_type": "RMS",
        "final_rms": True,
        "positional_embedding_type": "rotary",
        "rotary_adjacent_pairs": False,
    },
}
TINY_PRESETS["rms-gqa"] = {**TINY_PRESETS["rms"], "n_key_value_heads": 2}
TINY_DEFAULTS: dict[str, Any] = {"n_ctx": 256, "d_vocab": 257, "seed": 0, "eps": 1e-5}
"""Shared by every preset: context, byte-level vocabulary (256 bytes + BOS), seed."""


def tiny_config(spec: str) -> HookedTransformerConfig:
    """The config of `tiny:<preset>` or `tiny:{"preset": ..., <HookedTransformerConfig fields>, "seed": N}`.

    The seed is kept in `cfg.seed` only as a record: weights are drawn under a forked RNG, never
    through TL's global seeding.
    """
    fields = _tiny_fields(spec)
    name = spec.removeprefix("tiny:")
    cfg = {**fields, "model_name": f"tiny-{fields['preset']}", "original_architecture": "tiny", "init_weights": True}
    cfg.pop("preset")
    seed = cfg.pop("seed")
    try:
        config = HookedTransformerConfig(**cfg, device="cpu", dtype=torch.float32)
    except (TypeError, ValueError, AssertionError) as err:
        raise ModelSpecError(f"invalid tiny model {name!r}: {str(err).splitlines()[0]}") from None
    config.seed = seed
    return config


def _tiny_fields(spec: str) -> dict[str, Any]:
    """Preset fields merged with the JSON overrides of a `tiny:` spec."""
    body = spec.removeprefix("tiny:").strip()
    overrides: dict[str, Any] = {"preset": body}
    if body.startswith("{"):
        try:
            overrides = json.loads(body)
        except json.JSONDecodeError as err:
            raise ModelSpecError(f"tiny model spec is not valid JSON ({err.msg}): {body!r}") from None
        if not isinstance(overrides, dict):
            raise ModelSpecError(f"tiny model JSON must be an object: {body!r}")
    preset = overrides.get("preset", "ln")
    if preset not in TINY_PRESETS:
        raise ModelSpecError(f"unknown tiny preset {preset!r}; expected one of {', '.join(TINY_PRESETS)}")
    allowed = {f.name for f in dataclasses.fields(HookedTransformerConfig)} | {"preset", "seed"}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ModelSpecError(f"unknown tiny model field(s) {unknown}; use HookedTransformerConfig fields or 'seed'")
    if overrides.get("d_vocab", 257) != 257:
        raise ModelSpecError("tiny models use the byte-level tokenizer: d_vocab must stay 257")
    return {**TINY_DEFAULTS, **TINY_PRESETS[preset], **overrides, "preset": preset}


def _load_tiny(spec: str) -> HookedTransformer:
    """A seeded random tiny model with non-trivial norm weights, processed like a real model."""
    cfg = tiny_config(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        raw = HookedTransformer(cfg, move_to_device=False)
        state_dict = {name: _perturb_norm(name, t) for name, t in raw.state_dict().items()}
        return _build(cfg, state_dict, with_bos(byte_level_tokenizer()))


def _perturb_norm(name: str, tensor: Tensor) -> Tensor:
    """Norm gains 1 +- 0.2 and biases +- 0.1 (fresh init has 1 and 0, which folding would hide)."""
    if name.endswith(("ln1.w", "ln2.w", "ln_final.w")):
        return tensor + 0.2 * torch.randn_like(tensor)
    if name.endswith(("ln1.b", "ln2.b", "ln_final.b")):
        return tensor + 0.1 * torch.randn_like(tensor)
    return tensor
