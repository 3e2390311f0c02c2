"""Shared by the transcoder-file tests: transcoders with every parameter non-trivial, the other tools' forward
passes re-implemented as independent references, a synthetic copy of the original release, and malicious pickles.

References: each layout's forward pass is re-implemented here from its source (SAELens sae_lens/saes/transcoder.py,
circuit-tracer single_layer_transcoder.py, transcoder_circuits sparse_autoencoder.py) on the raw file tensors, so a
file we write is checked for what the other tool would compute, not only for what we read back.
Tolerances: float64 weights, outputs equal to 1e-9 (the spec asks 1e-6); float32 to 1e-5 (one fold in float32).
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from core.errors import UserError
from core.transcoder import Transcoder, TranscoderConfig, init_transcoder, topk_relu

D, D_SAE, LAYER = 12, 40, 2
HOOK_IN, HOOK_OUT = f"blocks.{LAYER}.ln2.hook_normalized", f"blocks.{LAYER}.hook_mlp_out"
VARIANTS = [(act, skip) for act in ("relu", "topk", "jumprelu") for skip in (False, True)]
TOL64, TOL32 = 1e-9, 1e-5


def make_tc(activation="relu", skip=False, layer=LAYER, dtype=torch.float64, seed=0, d_in=D, d_out=D) -> Transcoder:
    """A transcoder with every parameter non-trivial (biases, pre-bias, thresholds in [0, 0.5], skip)."""
    hooks = (f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out")
    cfg = TranscoderConfig(d_in, D_SAE, d_out, activation, 5, skip, *hooks, layer, "tiny:ln")
    tc = init_transcoder(cfg, seed=seed, dtype=dtype)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in (tc.b_enc, tc.b_dec, tc.b_dec_out):
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) * 0.5)
        if tc.threshold is not None:
            tc.threshold.copy_(torch.rand(D_SAE, generator=gen, dtype=dtype) * 0.5)
        if tc.W_skip is not None:
            tc.W_skip.copy_(torch.randn(d_in, d_out, generator=gen, dtype=dtype) * 0.1)
    return tc


def inputs(dtype=torch.float64, n=256, d=D, seed=1) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)  # [n, d_in]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ------------------------------------------------------------------ independent references (the other tools' math)


def saelens_forward(folder: Path, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAELens Transcoder/SkipTranscoder/JumpReLUTranscoder.forward on the raw folder (TopK from topk_sae.py)."""
    cfg = json.loads((folder / "cfg.json").read_text())
    w = load_file(str(folder / "sae_weights.safetensors"))
    assert cfg["apply_b_dec_to_input"] is False
    pre = u @ w["W_enc"] + w["b_enc"]
    arch = cfg["architecture"]
    if arch.startswith("jumprelu"):
        z = torch.relu(pre) * (pre > w["threshold"])
    elif arch.startswith("topk"):
        top = pre.topk(cfg["k"], dim=-1)
        z = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    else:
        z = torch.relu(pre)
    out = z @ w["W_dec"] + w["b_dec"]
    if "skip" in arch:
        out = out + u @ w["W_skip"].T
    return out, z


def circuit_tracer_forward(folder: Path, layer: int, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """circuit-tracer SingleLayerTranscoder: F.linear(x, W_enc, b_enc), JumpReLU x*(x>t), acts @ W_dec + b_dec, skip x @ W_skip.T.
    Top-k has no circuit-tracer loader; the k circuitflow records in config.yaml is used for it."""
    w = load_file(str(folder / f"layer_{layer}.safetensors"))
    config = yaml.safe_load((folder / "config.yaml").read_text())
    pre = torch.nn.functional.linear(u, w["W_enc"], w["b_enc"])
    extra = config["circuitflow"]["layers"][layer]
    if "activation_function.threshold" in w:
        z = pre * (pre > w["activation_function.threshold"])
    elif extra["activation"] == "topk":
        z = topk_relu(pre, extra["k"])
    else:
        z = torch.relu(pre)
    out = z @ w["W_dec"] + w["b_dec"]
    if "W_skip" in w:
        out = out + u @ w["W_skip"].T
    return out, z


def release_forward(state: dict[str, torch.Tensor], u: torch.Tensor) -> torch.Tensor:
    """transcoder_circuits SparseAutoencoder.forward for a transcoder."""
    z = torch.relu((u - state["b_dec"]) @ state["W_enc"] + state["b_enc"])
    return z @ state["W_dec"] + state["b_dec_out"]


# ------------------------------------------------------------------ the original release, built synthetically

RELEASE_MODULE = "transcoder_circuits.sae_training.config"


@dataclasses.dataclass
class LanguageModelSAERunnerConfig:
    """Stand-in for the release's config dataclass (only the fields the loader reads, plus torch objects)."""

    model_name: str = "gpt2-small"
    hook_point: str = HOOK_IN
    hook_point_layer: int = LAYER
    d_in: int = D
    d_out: int | None = D
    d_sae: int = D_SAE
    is_transcoder: bool = True
    out_hook_point: str | None = HOOK_OUT
    out_hook_point_layer: int | None = LAYER
    device: object = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    dtype: object = torch.float32
    use_ghost_grads: tuple = (False,)
    l1_coefficient: float = 1.4e-4


def pickle_with_fake_module(obj: object, file: Path, module: str = RELEASE_MODULE, save=torch.save) -> None:
    """Save `obj` while the stand-in class is importable as module.LanguageModelSAERunnerConfig, then unregister it
    so that loading cannot import it."""
    parts = module.split(".")
    names = [".".join(parts[: i + 1]) for i in range(len(parts))]
    assert not any(n in sys.modules for n in names)
    for name in names:
        sys.modules[name] = types.ModuleType(name)
    sys.modules[module].LanguageModelSAERunnerConfig = LanguageModelSAERunnerConfig
    old = LanguageModelSAERunnerConfig.__module__
    LanguageModelSAERunnerConfig.__module__ = module
    try:
        save(obj, file)
    finally:
        LanguageModelSAERunnerConfig.__module__ = old
        for name in names:
            del sys.modules[name]


def release_state(seed=3, d_sae=D_SAE, dtype=torch.float32) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(D, d_sae, generator=gen, dtype=dtype) * 0.3,
        "b_enc": torch.randn(d_sae, generator=gen, dtype=dtype) * 0.1,
        "W_dec": torch.randn(d_sae, D, generator=gen, dtype=dtype) * 0.3,
        "b_dec": torch.randn(D, generator=gen, dtype=dtype) * 0.1,
        "b_dec_out": torch.randn(D, generator=gen, dtype=dtype) * 0.1,
    }


def write_release(folder: Path, layer=LAYER, state=None, module=RELEASE_MODULE, **cfg) -> Path:
    name = f"final_sparse_autoencoder_gpt2-small_blocks.{layer}.ln2.hook_normalized_{D_SAE}"
    file = folder / f"{name}.pt"
    hooks = {"hook_point": f"blocks.{layer}.ln2.hook_normalized", "out_hook_point": f"blocks.{layer}.hook_mlp_out"}
    config = LanguageModelSAERunnerConfig(hook_point_layer=layer, **{**hooks, **cfg})
    pickle_with_fake_module({"cfg": config, "state_dict": state or release_state(seed=layer)}, file, module)
    torch.save(torch.linspace(-6, -1, D_SAE), folder / f"{name}_log_feature_sparsity.pt")
    return file


# ------------------------------------------------------------------ SAELens files written by SAELens


def write_saelens(folder: Path, cfg: dict, weights: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(weights, str(folder / "sae_weights.safetensors"))
    return folder


def saelens_cfg(arch: str, **extra) -> dict:
    meta = {"model_name": "gpt2", "hook_name": HOOK_IN, "hook_name_out": HOOK_OUT, "sae_lens_version": "6.5.0"}
    base = {"architecture": arch, "d_in": D, "d_sae": D_SAE, "d_out": D, "dtype": "float64", "device": "cpu"}
    return {**base, "apply_b_dec_to_input": False, "normalize_activations": "none", "metadata": meta, **extra}


def saelens_weights(seed=5, threshold=None, skip=False) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w = {
        "W_enc": torch.randn(D, D_SAE, generator=gen, dtype=torch.float64),
        "b_enc": torch.randn(D_SAE, generator=gen, dtype=torch.float64) * 0.3,
        "W_dec": torch.randn(D_SAE, D, generator=gen, dtype=torch.float64),
        "b_dec": torch.randn(D, generator=gen, dtype=torch.float64),
    }
    if threshold is not None:
        w["threshold"] = threshold
    if skip:
        w["W_skip"] = torch.randn(D, D, generator=gen, dtype=torch.float64)  # [d_out, d_in]
    return w


class Evil:
    """Unpickling this runs `payload(arg)`: what a crafted checkpoint would do."""

    def __init__(self, payload, arg):
        self.payload, self.arg = payload, arg

    def __reduce__(self):
        return (self.payload, (self.arg,))


def payloads(marker: Path) -> dict[str, Evil]:
    return {
        "os.system": Evil(os.system, f"touch {marker}"),
        "exec": Evil(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
        "eval": Evil(builtins.eval, f"open({str(marker)!r}, 'w')"),
    }


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and isinstance(exc.value, UserError)
    return text
