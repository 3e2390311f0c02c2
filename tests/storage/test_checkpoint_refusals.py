"""Checkpoints that would load wrong are refused in one line: k outside 1..d_sae, non-finite weights, cfg.json
fields circuitflow does not read; SAELens' rescale_acts_by_decoder_norm is supported exactly (checked against an
independent re-implementation of SAELens' TopKSAE encode/decode)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from storage import checkpoints as ck
from tests.storage.transcoder_files import D_SAE, inputs, make_tc, max_diff


def native(tmp_path: Path, activation: str = "topk") -> Path:
    return ck.save_transcoder(make_tc(activation), tmp_path / "tc")


def edit_cfg(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, **changes}))


@pytest.mark.parametrize("k", [0, -3, D_SAE + 1, 10**12])
def test_k_outside_one_to_d_sae_is_refused(tmp_path, k):
    folder = native(tmp_path)
    edit_cfg(folder, k=k)
    with pytest.raises(ck.CheckpointError, match=rf"k={k} is outside 1\.\.d_sae \(d_sae={D_SAE}\)"):
        ck.load_transcoder(folder)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("fmt", ["native", "circuit-tracer"])
def test_non_finite_weights_are_refused(tmp_path, value, fmt):
    folder = ck.save_transcoder(make_tc("relu"), tmp_path / "tc", fmt)
    file = next(folder.glob("*.safetensors"))
    tensors = load_file(str(file))
    name = "W_dec"
    tensors[name][3, 1] = value
    save_file(tensors, str(file))
    with pytest.raises(ck.CheckpointError, match=rf"tensor '{name}' holds 1 non-finite values"):
        ck.load_transcoder(folder)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("made_up_setting", 1, r"unknown field 'made_up_setting'"),
        ("finetuning_scaling_factor", True, r"finetuning_scaling_factor is set"),
        ("activation_fn_str", "relu", r"activation_fn_str 'relu' does not match architecture 'topk'"),
    ],
)
def test_cfg_fields_that_change_the_computation_are_refused_by_name(tmp_path, field, value, match):
    folder = native(tmp_path)
    edit_cfg(folder, **{field: value})
    with pytest.raises(ck.CheckpointError, match=match):
        ck.load_transcoder(folder)


def test_rescale_on_a_non_topk_architecture_is_refused(tmp_path):
    folder = native(tmp_path, "relu")
    edit_cfg(folder, rescale_acts_by_decoder_norm=True)
    with pytest.raises(ck.CheckpointError, match="rescale_acts_by_decoder_norm is only defined for top-k"):
        ck.load_transcoder(folder)


def saelens_topk_rescaled(folder: Path, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAELens TopKSAE with rescale_acts_by_decoder_norm (sae_lens/saes/topk_sae.py encode/decode), re-implemented:
    pre * |W_dec row|, top-k with ReLU, then acts / |W_dec row| @ W_dec + b_dec. Returns (output, encode())."""
    cfg = json.loads((folder / "cfg.json").read_text())
    w = load_file(str(folder / "sae_weights.safetensors"))
    norm = w["W_dec"].norm(dim=-1)
    pre = (u @ w["W_enc"] + w["b_enc"]) * norm
    top = pre.topk(cfg["k"], dim=-1)
    z = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    return (z / norm) @ w["W_dec"] + w["b_dec"], z


def test_rescale_acts_by_decoder_norm_loads_exactly(tmp_path):
    """A TopK file whose decoder rows are far from unit norm: the flag changes which features win, and the
    folded transcoder reproduces SAELens' features and outputs."""
    folder = native(tmp_path)
    file = folder / "sae_weights.safetensors"
    tensors = load_file(str(file))
    scale = torch.linspace(0.2, 5.0, D_SAE, dtype=tensors["W_dec"].dtype)
    tensors["W_dec"] = tensors["W_dec"] * scale[:, None]
    save_file(tensors, str(file))
    u = inputs()
    plain = ck.load_transcoder(folder)(u)
    edit_cfg(folder, rescale_acts_by_decoder_norm=True)
    got = ck.load_transcoder(folder)(u)
    want_out, want_z = saelens_topk_rescaled(folder, u)
    assert max_diff(got.out, want_out) < 1e-9 and max_diff(got.feature_acts, want_z) < 1e-9
    assert max_diff(plain.out, want_out) > 1e-2, "the flag must matter for this test to mean anything"


def test_truncated_weights_are_one_line(tmp_path):
    folder = native(tmp_path, "relu")
    file = folder / "sae_weights.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(ck.CheckpointError, match="sae_weights.safetensors"):
        ck.load_transcoder(folder)


class Forged:
    """Pickles as a call of the release's config class name with an argument: what a forged file would try."""

    def __reduce__(self):
        return (ForgedTarget, ("touch PWNED",))


class ForgedTarget:
    pass


def test_forged_config_class_name_runs_nothing(tmp_path, monkeypatch):
    """A pickle that names `<anything>.config.LanguageModelSAERunnerConfig` and calls it with arguments: the name is
    mapped to an inert stand-in, which takes no arguments, so the file is refused and nothing runs."""
    monkeypatch.chdir(tmp_path)
    module = types.ModuleType("evil.config")
    module.LanguageModelSAERunnerConfig = ForgedTarget
    monkeypatch.setitem(sys.modules, "evil", types.ModuleType("evil"))
    monkeypatch.setitem(sys.modules, "evil.config", module)
    ForgedTarget.__module__, ForgedTarget.__qualname__ = "evil.config", "LanguageModelSAERunnerConfig"
    try:
        torch.save({"cfg": Forged(), "state_dict": {}}, tmp_path / "forged.pt")
    finally:
        ForgedTarget.__module__, ForgedTarget.__qualname__ = __name__, "ForgedTarget"
    monkeypatch.delitem(sys.modules, "evil.config")  # the loader must not find the class by importing it
    with pytest.raises(ck.CheckpointError, match="forged.pt"):
        ck.load_transcoder(tmp_path / "forged.pt")
    assert not (tmp_path / "PWNED").exists()
