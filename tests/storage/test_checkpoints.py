"""Transcoder files: round trips through every layout, each file checked against the other tool's own forward pass
(tests/storage/transcoder_files.py has the references and tolerances), SAELens files written by SAELens and
circuit-tracer sets.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from storage import checkpoints as ck
from storage.checkpoints import (
    CheckpointError,
    load_transcoder,
    load_transcoders,
    save_transcoder,
    save_transcoders,
)
from tests.storage.transcoder_files import (
    D_SAE,
    HOOK_IN,
    HOOK_OUT,
    LAYER,
    TOL32,
    TOL64,
    VARIANTS,
    D,
    circuit_tracer_forward,
    inputs,
    make_tc,
    max_diff,
    release_forward,
    release_state,
    saelens_cfg,
    saelens_forward,
    saelens_weights,
    write_release,
    write_saelens,
)

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
