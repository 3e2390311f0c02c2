"""Transcoder files: round trips through every layout, the foreign tools' own forward passes as references,
the original release read safely (a malicious pickle runs nothing), and one-line errors for bad files.

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
import pickle
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from core.errors import UserError
from core.transcoder import Transcoder, TranscoderConfig, init_transcoder, topk_relu
from storage import checkpoints as ck
from storage.checkpoints import (
    CheckpointError,
    ModelWidths,
    check_fits,
    load_log_feature_sparsity,
    load_transcoder,
    load_transcoders,
    save_transcoder,
    save_transcoders,
)
from storage.formats import base as formats_base

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


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("fmt", ck.FORMATS)
@pytest.mark.parametrize(("activation", "skip"), VARIANTS)
def test_every_format_round_trips_and_means_the_same_to_the_other_tool(tmp_path, fmt, activation, skip):
    tc, u = make_tc(activation, skip), inputs()
    if fmt == "circuit-tracer" and activation == "topk":  # its loader cannot run top-k: refused, nothing written
        with pytest.raises(ck.CheckpointError, match="top-k transcoder cannot be written for circuit-tracer exactly"):
            save_transcoder(tc, tmp_path / "tc", fmt)
        assert not (tmp_path / "tc").exists()
        return
    written = save_transcoder(tc, tmp_path / "tc", fmt)
    back = load_transcoder(written)
    want = tc(u)
    got = back(u)
    assert max_diff(got.out, want.out) < TOL64
    assert max_diff(got.feature_acts, want.feature_acts) < TOL64
    assert back.cfg == tc.cfg
    ref_out, ref_z = (
        saelens_forward(written, u) if fmt != "circuit-tracer" else circuit_tracer_forward(written, LAYER, u)
    )
    assert max_diff(ref_out, want.out) < TOL64
    assert max_diff(ref_z, want.feature_acts) < TOL64
    # the reference is not vacuous: the features fire and the pre-bias was really folded in
    assert (want.feature_acts > 0).float().sum(-1).mean() > 1
    assert tc.b_dec.abs().max() > 0.1 and back.b_dec.abs().max() == 0


def test_float32_round_trip_within_fold_rounding(tmp_path):
    tc, u = make_tc("relu", True, dtype=torch.float32), inputs(torch.float32)
    for fmt in ("native", "circuit-tracer"):
        back = load_transcoder(save_transcoder(tc, tmp_path / fmt, fmt))
        assert back.dtype == torch.float32
        assert max_diff(back(u).out, tc(u).out) < TOL32


@pytest.mark.parametrize("src", ["release", "native", "circuit-tracer"])
@pytest.mark.parametrize("dst", ["native", "saelens", "circuit-tracer"])
def test_convert_between_every_pair(tmp_path, src, dst):
    if src == "release":
        state = release_state(dtype=torch.float64)
        original = load_transcoder(write_release(tmp_path, state=state))
        assert max_diff(original(inputs()).out, release_forward(state, inputs())) < TOL64
    else:
        original = load_transcoder(save_transcoder(make_tc("jumprelu", True), tmp_path / "src", src))
    mid = load_transcoder(save_transcoder(original, tmp_path / "mid", dst))
    again = load_transcoder(save_transcoder(mid, tmp_path / "again", src if src != "release" else "native"))
    u = inputs()
    assert max_diff(mid(u).out, original(u).out) < TOL64
    assert max_diff(again(u).out, original(u).out) < TOL64
    assert (again.cfg.hook_in, again.cfg.hook_out, again.cfg.layer) == (HOOK_IN, HOOK_OUT, LAYER)


def test_native_folder_is_the_saelens_v6_layout(tmp_path):
    folder = save_transcoder(make_tc("jumprelu", True), tmp_path / "tc")
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu_skip_transcoder"
    assert (cfg["d_in"], cfg["d_sae"], cfg["d_out"], cfg["dtype"]) == (D, D_SAE, D, "float64")
    assert cfg["apply_b_dec_to_input"] is False and cfg["normalize_activations"] == "none"
    meta = cfg["metadata"]
    assert (meta["hook_name"], meta["hook_name_out"], meta["model_name"]) == (HOOK_IN, HOOK_OUT, "tiny:ln")
    assert meta["sae_lens_version"] >= "6.0.0"
    weights = load_file(str(folder / "sae_weights.safetensors"))
    assert {k: list(v.shape) for k, v in weights.items()} == {
        "W_enc": [D, D_SAE],
        "b_enc": [D_SAE],
        "W_dec": [D_SAE, D],
        "b_dec": [D],
        "threshold": [D_SAE],
        "W_skip": [D, D],
    }
    assert {p.name for p in folder.iterdir()} == {"cfg.json", "sae_weights.safetensors"}
    assert oct((folder / "sae_weights.safetensors").stat().st_mode & 0o044) != "0o0"  # readable like other files


def test_architecture_names_per_activation(tmp_path):
    names = {
        (a, s): json.loads((save_transcoder(make_tc(a, s), tmp_path / f"{a}{s}") / "cfg.json").read_text())[
            "architecture"
        ]
        for a, s in VARIANTS
    }
    assert names == {
        ("relu", False): "transcoder",
        ("relu", True): "skip_transcoder",
        ("jumprelu", False): "jumprelu_transcoder",
        ("jumprelu", True): "jumprelu_skip_transcoder",
        ("topk", False): "topk",  # SAELens' TopKSAE computes it exactly (SAELens has no top-k transcoder)
        ("topk", True): "topk_skip_transcoder",
    }


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


def test_saelens_jumprelu_with_negative_thresholds_matches_saelens(tmp_path):
    threshold = torch.linspace(-1, 1, D_SAE, dtype=torch.float64)  # half negative: relu-then-threshold matters
    folder = write_saelens(
        tmp_path / "j", saelens_cfg("jumprelu_skip_transcoder"), saelens_weights(threshold=threshold, skip=True)
    )
    tc, u = load_transcoder(folder), inputs()
    ref_out, ref_z = saelens_forward(folder, u)
    assert max_diff(tc(u).out, ref_out) < TOL64 and max_diff(tc(u).feature_acts, ref_z) < TOL64
    assert (tc.cfg.activation, tc.cfg.skip, tc.cfg.layer, tc.cfg.model_name) == ("jumprelu", True, LAYER, "gpt2")


def test_negative_thresholds_cannot_be_written_as_saelens(tmp_path):
    tc = make_tc("jumprelu")
    with torch.no_grad():
        tc.threshold[:3] = -0.2
    with pytest.raises(CheckpointError, match="3 JumpReLU thresholds are negative"):
        save_transcoder(tc, tmp_path / "n")
    assert not (tmp_path / "n").exists()
    back = load_transcoder(save_transcoder(tc, tmp_path / "ct", "circuit-tracer"))  # circuit-tracer's JumpReLU is ours
    assert max_diff(back(inputs()).out, tc(inputs()).out) < TOL64


def test_pre_v6_and_plain_sae_configs(tmp_path):
    # SAELens < 6 kept hook names at the top level; a plain SAE applies b_dec to its input and its output
    cfg = {
        "architecture": "standard",
        "d_in": D,
        "d_sae": D_SAE,
        "dtype": "float64",
        "hook_name": "blocks.4.hook_resid_pre",
        "model_name": "gpt2",
    }
    folder = write_saelens(tmp_path / "sae", cfg, saelens_weights())
    tc, u = load_transcoder(folder), inputs()
    w = load_file(str(folder / "sae_weights.safetensors"))
    want = torch.relu((u - w["b_dec"]) @ w["W_enc"] + w["b_enc"]) @ w["W_dec"] + w["b_dec"]
    assert max_diff(tc(u).out, want) < TOL64
    assert (tc.cfg.hook_in, tc.cfg.hook_out, tc.cfg.layer) == ("blocks.4.hook_resid_pre",) * 2 + (4,)


def test_unsupported_saelens_options_are_one_line(tmp_path):
    norm = write_saelens(
        tmp_path / "a", saelens_cfg("transcoder", normalize_activations="expected_average_only_in"), saelens_weights()
    )
    gated = write_saelens(tmp_path / "b", saelens_cfg("gated"), saelens_weights())
    for folder, needle in ((norm, "normalize_activations"), (gated, "architecture 'gated'")):
        with pytest.raises(CheckpointError, match=needle) as err:
            load_transcoder(folder)
        assert "\n" not in str(err.value)


# ------------------------------------------------------------------ circuit-tracer sets


def test_circuit_tracer_set_holds_many_layers(tmp_path):
    tcs = {i: make_tc("relu", i == 1, layer=i, seed=i) for i in range(3)}
    (folder,) = save_transcoders(tcs, tmp_path / "set", "circuit-tracer")
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["model_kind"] == "transcoder_set"
    assert (config["feature_input_hook"], config["feature_output_hook"]) == ("ln2.hook_normalized", "hook_mlp_out")
    assert sorted(p.name for p in folder.glob("layer_*.safetensors")) == [f"layer_{i}.safetensors" for i in range(3)]
    loaded = load_transcoders(folder)
    assert sorted(loaded) == [0, 1, 2]
    for i, tc in tcs.items():
        assert max_diff(loaded[i](inputs()).out, tc(inputs()).out) < TOL64
        assert max_diff(circuit_tracer_forward(folder, i, inputs())[0], tc(inputs()).out) < TOL64
    assert load_transcoder(folder, layer=1).cfg.skip
    with pytest.raises(CheckpointError, match=r"layers \[0, 1, 2\]; pass layer="):
        load_transcoder(folder)
    with pytest.raises(CheckpointError, match="no transcoder for layer 7"):
        load_transcoder(folder, layer=7)


def test_adding_a_layer_to_an_existing_set(tmp_path):
    save_transcoder(make_tc(layer=0), tmp_path / "set", "circuit-tracer")
    save_transcoder(make_tc("jumprelu", layer=1, seed=1), tmp_path / "set", "circuit-tracer")
    assert sorted(load_transcoders(tmp_path / "set")) == [0, 1]
    other = make_tc(layer=2)
    other.cfg = other.cfg.with_(hook_in="blocks.2.hook_resid_mid")
    with pytest.raises(
        CheckpointError, match="feature_input_hook is 'hook_resid_mid' but the set has 'ln2.hook_normalized'"
    ):
        save_transcoder(other, tmp_path / "set", "circuit-tracer")
    assert sorted(load_transcoders(tmp_path / "set")) == [0, 1]


def test_circuit_tracer_files_from_other_writers(tmp_path):
    # gemma-scope style "threshold" key, an old transposed W_dec [d_model, d_sae], and no circuitflow block
    folder = tmp_path / "gs"
    folder.mkdir()
    (folder / "config.yaml").write_text(
        "model_name: google/gemma-2-2b\nmodel_kind: transcoder_set\nfeature_input_hook: hook_resid_mid\nfeature_output_hook: hook_mlp_out\n"
    )
    w = saelens_weights(threshold=torch.rand(D_SAE, dtype=torch.float64))
    file = {
        "W_enc": w["W_enc"].T.contiguous(),
        "W_dec": w["W_dec"].T.contiguous(),
        "b_enc": w["b_enc"],
        "b_dec": w["b_dec"],
        "threshold": w["threshold"],
    }
    save_file(file, str(folder / "layer_0.safetensors"))
    tc, u = load_transcoder(folder), inputs()
    pre = u @ w["W_enc"] + w["b_enc"]
    want = (pre * (pre > w["threshold"])) @ w["W_dec"] + w["b_dec"]
    assert max_diff(tc(u).out, want) < TOL64
    assert (tc.cfg.hook_in, tc.cfg.layer, tc.cfg.activation) == ("blocks.0.hook_resid_mid", 0, "jumprelu")


# ------------------------------------------------------------------ the original release


@pytest.mark.parametrize("module", [RELEASE_MODULE, "sae_training.config"])
def test_release_loads_without_importing_its_classes(tmp_path, module):
    state = release_state()
    file = write_release(tmp_path, state=state, module=module)
    assert module not in sys.modules
    tc, u = load_transcoder(file), inputs(torch.float32)
    assert module not in sys.modules
    assert max_diff(tc(u).out, release_forward(state, u)) < TOL32
    assert tc.cfg == TranscoderConfig(D, D_SAE, D, "relu", 32, False, HOOK_IN, HOOK_OUT, LAYER, "gpt2-small")
    sparsity = load_log_feature_sparsity(file)
    assert sparsity.shape == (D_SAE,) and torch.allclose(sparsity, torch.linspace(-6, -1, D_SAE))
    assert torch.equal(load_log_feature_sparsity(str(file).replace(".pt", "_log_feature_sparsity.pt")), sparsity)


def test_release_folder_and_glob_load_by_layer(tmp_path):
    for layer in (0, 1, 3):
        write_release(tmp_path, layer=layer)
    everything = load_transcoders(tmp_path)
    assert sorted(everything) == [0, 1, 3]
    some = load_transcoders(str(tmp_path / "*blocks.[01].ln2*_40.pt"))
    assert sorted(some) == [0, 1]
    assert (
        max_diff(some[1](inputs(torch.float32)).out, release_forward(release_state(seed=1), inputs(torch.float32)))
        < TOL32
    )
    assert load_transcoder(tmp_path, layer=3).cfg.hook_in == "blocks.3.ln2.hook_normalized"
    with pytest.raises(CheckpointError, match="matches no transcoder files"):
        load_transcoders(str(tmp_path / "*.nothing"))


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


@pytest.mark.parametrize("name", ["os.system", "exec", "eval"])
@pytest.mark.parametrize("container", ["zip", "raw-pickle"])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, name, container):
    marker = tmp_path / "PWNED"
    evil = payloads(marker)[name]
    # sanity: this payload really does run under plain pickle
    pickle.loads(pickle.dumps(evil))
    assert marker.exists()
    marker.unlink()
    obj = {"cfg": evil, "state_dict": release_state()}
    file = tmp_path / "final_evil.pt"
    if container == "zip":
        torch.save(obj, file)
    else:
        file.write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(CheckpointError, match="refused to unpickle") as err:
        load_transcoder(file)
    assert "\n" not in str(err.value) and str(file) in str(err.value)
    assert not marker.exists()


def test_malicious_pickle_is_refused_even_past_the_scan(tmp_path, monkeypatch):
    """Defence in depth: with the static scan blinded, torch's weights-only unpickler still refuses."""
    marker = tmp_path / "PWNED"
    file = tmp_path / "evil.pt"
    pickle_with_fake_module(
        {"cfg": LanguageModelSAERunnerConfig(), "state_dict": {"x": payloads(marker)["os.system"]}}, file
    )
    monkeypatch.setattr(torch.serialization, "get_unsafe_globals_in_checkpoint", lambda f: [])
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        load_transcoder(file)
    assert not marker.exists()


class CallsTheConfigClass:
    """A pickle that calls the (mapped) config class with arguments instead of rebuilding it from its fields."""

    def __reduce__(self):
        return (LanguageModelSAERunnerConfig, ("os.system", "touch PWNED"))


def test_the_config_class_is_only_ever_plain_data(tmp_path):
    file = tmp_path / "odd.pt"
    pickle_with_fake_module({"cfg": CallsTheConfigClass(), "state_dict": release_state()}, file)
    with pytest.raises(CheckpointError) as err:
        load_transcoder(file)
    assert "not a readable torch file" in one_line(err)
    bad_hook = tmp_path / "bad_hook"
    bad_hook.mkdir()
    with pytest.raises(CheckpointError, match="'hook_point' is a tensor of shape"):
        load_transcoder(write_release(bad_hook, hook_point=torch.zeros(2)))


def test_malicious_sparsity_file_is_refused(tmp_path):
    marker = tmp_path / "PWNED"
    file = tmp_path / "x_log_feature_sparsity.pt"
    torch.save(payloads(marker)["exec"], file)
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        load_log_feature_sparsity(file)
    assert not marker.exists()


# ------------------------------------------------------------------ bad files: one clear line


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and isinstance(exc.value, UserError)
    return text


def test_wrong_shape_names_file_key_and_shapes(tmp_path):
    w = saelens_weights()
    w["W_dec"] = w["W_dec"].T.contiguous()  # [d_out, d_sae] instead of [d_sae, d_out]
    folder = write_saelens(tmp_path / "bad", saelens_cfg("transcoder"), w)
    with pytest.raises(CheckpointError) as err:
        load_transcoder(folder)
    text = one_line(err)
    assert str(folder / "sae_weights.safetensors") in text
    assert f"'W_dec' has shape [{D}, {D_SAE}], expected [{D_SAE}, {D}] = [d_sae, d_out]" in text


def test_missing_key_and_extra_key(tmp_path):
    w = saelens_weights()
    del w["b_enc"]
    with pytest.raises(CheckpointError, match="missing tensor 'b_enc'") as err:
        load_transcoder(write_saelens(tmp_path / "a", saelens_cfg("transcoder"), w))
    one_line(err)
    w = saelens_weights()
    w["b_dec_out"] = w["b_dec"].clone()
    with pytest.raises(CheckpointError, match=r"unexpected tensors \['b_dec_out'\]"):
        load_transcoder(write_saelens(tmp_path / "b", saelens_cfg("transcoder"), w))


def test_wrong_shape_in_release_and_circuit_tracer(tmp_path):
    state = release_state()
    state["b_dec_out"] = state["b_dec_out"][:-1]
    with pytest.raises(
        CheckpointError, match=rf"'b_dec_out' has shape \[{D - 1}\], expected \[{D}\] = \[d_out\]"
    ) as err:
        load_transcoder(write_release(tmp_path, state=state))
    one_line(err)
    folder = save_transcoder(make_tc(), tmp_path / "ct", "circuit-tracer")
    layer_file = folder / f"layer_{LAYER}.safetensors"
    w = load_file(str(layer_file))
    w["W_enc"] = w["W_enc"][:, :-1].contiguous()
    save_file(w, str(layer_file))
    with pytest.raises(
        CheckpointError, match=rf"'W_enc' has shape \[{D_SAE}, {D - 1}\], expected \[{D_SAE}, {D}\]"
    ) as err:
        load_transcoder(folder)
    assert str(layer_file) in one_line(err)


def test_not_a_transcoder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk.pt").write_bytes(b"not a pickle at all")
    for path, needle in (
        (tmp_path / "missing", "not a transcoder"),
        (tmp_path / "empty", "holds no transcoders"),
        (tmp_path / "junk.pt", "junk.pt"),
    ):
        with pytest.raises(CheckpointError, match=needle) as err:
            load_transcoder(path)
        one_line(err)
    with pytest.raises(CheckpointError, match="unknown transcoder format 'onnx'"):
        save_transcoder(make_tc(), tmp_path / "x", "onnx")


# ------------------------------------------------------------------ fitting a model


def test_check_fits_accepts_a_matching_transcoder():
    check_fits(make_tc(), ModelWidths(D, 4 * D, 4), LAYER, (HOOK_IN, HOOK_OUT))
    check_fits(make_tc(), D, LAYER, ("blocks.{layer}.ln2.hook_normalized", "blocks.{layer}.hook_mlp_out"))


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"model": 2 * D}, f"d_in is {D} but the model's d_model is {2 * D}"),
        ({"layer": 1}, "trained for layer 2, not layer 1"),
        ({"model": ModelWidths(D, 4 * D, 2)}, "layer 2 does not exist; the model has layers 0..1"),
        (
            {"hooks": ("blocks.2.hook_resid_mid", HOOK_OUT)},
            "input hook is blocks.2.ln2.hook_normalized but the pipeline uses blocks.2.hook_resid_mid",
        ),
        ({"hooks": (HOOK_IN, "blocks.2.hook_resid_post")}, "output hook is blocks.2.hook_mlp_out"),
    ],
)
def test_check_fits_refuses_in_one_line(kwargs, needle):
    args = {"model": ModelWidths(D, 4 * D, 4), "layer": LAYER, "hooks": (HOOK_IN, HOOK_OUT), **kwargs}
    with pytest.raises(CheckpointError) as err:
        check_fits(make_tc(), args["model"], args["layer"], args["hooks"])
    assert needle in one_line(err)


def test_check_fits_takes_the_model_info_of_core_model():
    from core.model import model_info

    info = model_info('tiny:{"preset": "ln", "n_layers": 3, "d_model": 12}')
    assert (info.d_model, info.n_layers) == (D, 3)
    check_fits(make_tc(), info, LAYER, ("blocks.{layer}.ln2.hook_normalized", "blocks.{layer}.hook_mlp_out"))
    with pytest.raises(CheckpointError, match="layer 3 does not exist; the model has layers 0..2"):
        check_fits(make_tc(layer=3), info, 3)


def test_check_fits_sees_a_hook_in_another_layer():
    tc = make_tc()
    tc.cfg = tc.cfg.with_(hook_out="blocks.5.hook_mlp_out")
    with pytest.raises(CheckpointError, match="output hook blocks.5.hook_mlp_out is not in layer 2"):
        check_fits(tc, D, LAYER)


def test_check_fits_uses_d_mlp_for_hooks_inside_the_mlp():
    tc = make_tc(d_out=4 * D)
    tc.cfg = tc.cfg.with_(hook_out="blocks.2.mlp.hook_post")
    check_fits(tc, ModelWidths(D, 4 * D, 4), LAYER)
    with pytest.raises(CheckpointError, match=f"d_out is {4 * D} but the model's d_mlp is {2 * D}"):
        check_fits(tc, ModelWidths(D, 2 * D, 4), LAYER)


# ------------------------------------------------------------------ atomic writes, folders of transcoders, the hub


def test_saving_into_an_existing_folder_keeps_other_files(tmp_path):
    folder = tmp_path / "train"
    folder.mkdir()
    (folder / "metrics.parquet").write_bytes(b"x")
    save_transcoder(make_tc(), folder)
    save_transcoder(make_tc("topk", seed=9), folder)  # overwrite in place
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "metrics.parquet", "sae_weights.safetensors"]
    assert load_transcoder(folder).cfg.activation == "topk"


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def boom(tensors, path):
        raise OSError("disk full")

    monkeypatch.setattr(formats_base, "save_tensors", boom)
    for fmt in ("native", "circuit-tracer"):
        with pytest.raises(OSError, match="disk full"):
            save_transcoder(make_tc(), tmp_path / fmt, fmt)
    assert list(tmp_path.iterdir()) == []


def test_several_native_transcoders_go_to_layer_folders(tmp_path):
    tcs = {i: make_tc(layer=i, seed=i) for i in (0, 2)}
    written = save_transcoders(tcs, tmp_path / "out")
    assert [p.name for p in written] == ["layer_0", "layer_2"]
    loaded = load_transcoders(tmp_path / "out")
    assert sorted(loaded) == [0, 2]
    assert max_diff(loaded[2](inputs()).out, tcs[2](inputs()).out) < TOL64
    save_transcoder(make_tc(layer=2, seed=7), tmp_path / "out" / "dup")
    with pytest.raises(CheckpointError, match="two transcoders for layer 2"):
        load_transcoders(tmp_path / "out")


def test_hub_spec_downloads_only_what_it_names(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    hub.mkdir()
    for layer in (0, 1):
        write_release(hub, layer=layer)
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None):
        calls.append((repo_id, allow_patterns))
        return str(hub)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    pattern = "final_sparse_autoencoder_gpt2-small_blocks.*.ln2.hook_normalized_40.pt"
    loaded = load_transcoders(f"hf://pchlenski/gpt2-transcoders/{pattern}")
    assert sorted(loaded) == [0, 1]
    assert calls[0][0] == "pchlenski/gpt2-transcoders" and pattern in calls[0][1]
    one = load_transcoder(
        "hf://pchlenski/gpt2-transcoders/final_sparse_autoencoder_gpt2-small_blocks.1.ln2.hook_normalized_40.pt"
    )
    assert one.cfg.layer == 1

    def offline(repo_id, allow_patterns=None):
        raise ConnectionError("no network\nsecond line")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CheckpointError, match="could not fetch from the hub") as err:
        load_transcoder("hf://pchlenski/gpt2-transcoders/x.pt")
    one_line(err)
