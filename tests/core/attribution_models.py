"""Tiny float64 models, random transcoders and the frozen-model reference shared by the attribution tests.

`Frozen` is independent of core.attribution: the real HookedTransformer run with hooks that freeze
attention patterns and normalisation scales (and replace MLPs by transcoders plus a fixed error).
"""

from __future__ import annotations

import warnings

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from core.transcoder import TranscoderConfig, init_transcoder

N_LAYERS = 3
D_MODEL = 16
D_SAE = 24
TOKENS = torch.tensor([0, 5, 17, 3, 9, 22, 11])  # position 0 plays the BOS


# ---------------------------------------------------------------- tiny models


VARIANTS = {
    "ln": dict(norm="LN"),
    "rms": dict(norm="RMS"),
    "rms-gqa": dict(norm="RMS", gqa=True),
    "ln-gqa": dict(norm="LN", gqa=True),
    "ln-folded": dict(norm="LN", fold=True),
    "rms-gqa-folded": dict(norm="RMS", gqa=True, fold=True),
    "ln-parallel": dict(norm="LN", parallel=True),
}


def tiny_model(norm: str = "LN", gqa: bool = False, fold: bool = False, parallel: bool = False, seed: int = 0):
    """A random float64 model; every norm weight and bias is perturbed so no term can hide."""
    cfg = HookedTransformerConfig(
        n_layers=N_LAYERS,
        d_model=D_MODEL,
        n_ctx=16,
        d_head=4,
        n_heads=4,
        d_mlp=32,
        d_vocab=40,
        act_fn="gelu_new" if norm == "LN" else "silu",
        gated_mlp=norm == "RMS",
        normalization_type=norm,
        positional_embedding_type="standard" if norm == "LN" else "rotary",
        n_key_value_heads=2 if gqa else None,
        parallel_attn_mlp=parallel,
        dtype=torch.float64,
        seed=seed,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedTransformer(cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.split(".")[-1]
            if leaf == "w":
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
            elif leaf.startswith("b") or leaf.startswith("_b"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    if fold:
        model.process_weights_(fold_ln=True, center_writing_weights=norm == "LN", center_unembed=False)
    model.eval()
    return model


def tiny_transcoders(layers=range(N_LAYERS), seed: int = 0, activation: str = "relu"):
    """Random transcoders with random biases, about half their features active per token."""
    out = {}
    for layer in layers:
        cfg = TranscoderConfig(
            D_MODEL,
            D_SAE,
            D_MODEL,
            activation=activation,
            k=6,
            hook_in=f"blocks.{layer}.ln2.hook_normalized",
            hook_out=f"blocks.{layer}.hook_mlp_out",
            layer=layer,
        )
        tc = init_transcoder(cfg, seed=seed + layer, dtype=torch.float64)
        gen = torch.Generator().manual_seed(100 + seed + layer)
        with torch.no_grad():
            for name in ("b_enc", "b_dec", "b_dec_out"):
                getattr(tc, name).copy_(0.3 * torch.randn(getattr(tc, name).shape, generator=gen, dtype=torch.float64))
            if tc.threshold is not None:
                tc.threshold.copy_(0.05 * torch.rand(D_SAE, generator=gen, dtype=torch.float64))
        out[layer] = tc.requires_grad_(False)
    return out


# ---------------------------------------------------------------- the independent reference


class Frozen:
    """The real model run with patterns, scales, transcoder errors and (optionally) features frozen."""

    def __init__(self, model, tcs, tokens):
        self.model, self.tcs, self.tokens = model, tcs, tokens[None]
        with torch.no_grad():
            _, cache = model.run_with_cache(self.tokens)
        self.clean = {k: v.detach().clone() for k, v in cache.items()}
        self.err = {}
        for layer, tc in tcs.items():
            out = tc(self.clean[tc.cfg.hook_in])
            self.err[layer] = (self.clean[f"blocks.{layer}.hook_mlp_out"] - out.out).detach()

    def run(self, mlp_add=None, resid0_add=None, live_heads=None, linear_features=False, frozen_features=True):
        """Hooks: freeze patterns and scales; MLP out = transcoder(z) + fixed error with z frozen
        (or responding linearly on its active set); `mlp_add[layer]` adds to an MLP output;
        `live_heads` (a set of (layer, head)) freezes every other head's output."""
        captured = {}
        hooks = []
        for name in self.clean:
            if name.endswith("hook_pattern") or name.endswith("hook_scale"):
                hooks.append((name, lambda x, hook: self.clean[hook.name]))
        for layer, tc in self.tcs.items():
            hooks.append((tc.cfg.hook_in, self._capture(captured, layer)))
            hooks.append((f"blocks.{layer}.hook_mlp_out", self._mlp(layer, captured, mlp_add, linear_features)))
        if resid0_add is not None:
            hooks.append(("blocks.0.hook_resid_pre", lambda x, hook: x + resid0_add))
        if live_heads is not None:
            for layer in range(self.model.cfg.n_layers):
                hooks.append((f"blocks.{layer}.attn.hook_z", self._freeze_heads(layer, live_heads)))
        with torch.no_grad():
            logits = self.model.run_with_hooks(self.tokens, fwd_hooks=hooks)
        return captured, logits[0]

    @staticmethod
    def _capture(captured, layer):
        def hook(x, hook):
            captured[layer] = x[0]
            return x

        return hook

    def _mlp(self, layer, captured, mlp_add, linear_features):
        tc = self.tcs[layer]
        clean_u = self.clean[tc.cfg.hook_in][0]

        def hook(x, hook):
            z = tc(clean_u).feature_acts
            if linear_features:
                pre_now, pre_clean = tc.pre_acts(captured[layer]), tc.pre_acts(clean_u)
                z = z + (pre_now - pre_clean) * (z != 0)
            out = tc.decode(z) + self.err[layer][0]
            if mlp_add is not None and layer in mlp_add:
                out = out + mlp_add[layer]
            return out[None]

        return hook

    def _freeze_heads(self, layer, live):
        def hook(z, hook):
            keep = torch.tensor([(layer, h) in live for h in range(z.shape[2])])
            return torch.where(keep[None, None, :, None], z, self.clean[hook.name])

        return hook

    def feature_pre(self, captured, layer, pos, feature) -> float:
        return float(self.tcs[layer].pre_acts(captured[layer])[pos, feature])


def feature_add(state, layer, pos, feature, delta):
    """An MLP-output perturbation equal to adding `delta` to feature j's activation."""
    add = torch.zeros(state.n_pos, D_MODEL, dtype=torch.float64)
    add[pos] = delta * state.transcoders[layer].W_dec[feature]
    return {layer: add}


def rel_close(actual, expected, rel=1e-5, floor=1e-9):
    return abs(actual - expected) <= rel * max(abs(expected), floor)
