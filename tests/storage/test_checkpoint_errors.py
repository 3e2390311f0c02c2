"""Transcoder files that cannot be used fail in one clear line (bad shapes, missing keys, not a transcoder, not fitting
the model); writes are atomic; folders of transcoders and hub specs load only what they name.
"""

from __future__ import annotations

import pytest
from safetensors.torch import load_file, save_file

from storage.checkpoints import (
    CheckpointError,
    ModelWidths,
    check_fits,
    load_transcoder,
    load_transcoders,
    save_transcoder,
    save_transcoders,
)
from storage.formats import base as formats_base
from tests.storage.transcoder_files import (
    D_SAE,
    HOOK_IN,
    HOOK_OUT,
    LAYER,
    TOL64,
    D,
    inputs,
    make_tc,
    max_diff,
    one_line,
    release_state,
    saelens_cfg,
    saelens_weights,
    write_release,
    write_saelens,
)

# ------------------------------------------------------------------ bad files: one clear line


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
