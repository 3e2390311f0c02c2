"""The original transcoder release read safely: its pickles load without importing their classes, by layer from a
folder or a glob, and a malicious pickle (or sparsity file) is refused and runs nothing.
"""

from __future__ import annotations

import pickle
import sys

import pytest
import torch

from core.transcoder import TranscoderConfig
from storage.checkpoints import (
    CheckpointError,
    load_log_feature_sparsity,
    load_transcoder,
    load_transcoders,
)
from tests.storage.transcoder_files import (
    D_SAE,
    HOOK_IN,
    HOOK_OUT,
    LAYER,
    RELEASE_MODULE,
    TOL32,
    D,
    LanguageModelSAERunnerConfig,
    inputs,
    max_diff,
    one_line,
    payloads,
    pickle_with_fake_module,
    release_forward,
    release_state,
    write_release,
)

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
