"""Config loading, validation and digest stability."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from core.config import Config, ConfigError, apply_overrides, from_dict, load_config

ROOT = Path(__file__).resolve().parents[2]


def test_default_yaml_loads_and_matches_layers():
    cfg = load_config(ROOT / "configs" / "default.yaml")
    assert cfg.activations.layers == (0, 1, 2, 3)
    assert cfg.model.name == "bundled:smollm2-135m"
    assert cfg.trace.roots and cfg.trace.roots[0].layer == 3


def test_digest_is_stable_across_processes():
    code = "from core.config import load_config; print(load_config('configs/default.yaml').digest())"
    outs = {
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        for _ in range(2)
    }
    assert len(outs) == 1
    assert outs.pop().strip() == load_config(ROOT / "configs" / "default.yaml").digest()


def test_digest_changes_with_content_only():
    a = from_dict({"train": {"l1_coefficient": 1e-3}})
    b = from_dict({"train": {"l1_coefficient": 2e-3}})
    assert a.train.digest() != b.train.digest()
    assert a.tokens.digest() == b.tokens.digest()
    assert from_dict({"train": {"lr": 1}}).train.lr == 1.0  # ints are accepted where floats go


def test_overrides_parse_yaml_values():
    data = apply_overrides({}, ["train.l1_coefficient=2e-4", "activations.layers=[1, 2]", "mine.corpus=/tmp/x"])
    cfg = from_dict(data)
    assert cfg.train.l1_coefficient == 2e-4
    assert cfg.activations.layers == (1, 2)
    assert cfg.mine.corpus == "/tmp/x"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"trian": {}}, "trian: unknown key; did you mean 'train'?"),
        ({"train": {"l1_coeficient": 1}}, "train.l1_coeficient: unknown key; did you mean 'l1_coefficient'?"),
        ({"train": {"epochs": "three"}}, "train.epochs: expected an integer, got 'three'"),
        ({"train": {"activation": "gelu"}}, "train.activation: 'gelu' is not allowed"),
        ({"train": {"lr": -1.0}}, "train.lr: must be > 0"),
        ({"tokens": {"holdout_fraction": 1.5}}, "tokens.holdout_fraction: must be between 0 and 1"),
        ({"activations": {"layers": []}}, "activations.layers: list at least one layer"),
        ({"activations": {"layers": 3}}, "activations.layers: expected a list"),
        ({"activations": {"drop_bos": "yes"}}, "activations.drop_bos: expected true or false"),
        ({"trace": {"roots": [{"prompt": "x", "feature": 1}]}}, "trace.roots[0]"),  # no layer
        ({"model": "gpt2"}, "model: expected a mapping"),
    ],
)
def test_bad_values_give_one_line(data, message):
    with pytest.raises(ConfigError) as err:
        from_dict(data)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_layer_beyond_model():
    cfg = from_dict({"activations": {"layers": [0, 30]}})
    with pytest.raises(ConfigError, match=r"activations.layers: layer 30 is out of range; .* has layers 0..29"):
        cfg.check_layers(30)
    cfg.check_layers(31)


def test_malformed_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1\n")
    with pytest.raises(ConfigError, match="malformed YAML at line"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(top)


def test_bad_override():
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["train.lr"])
    assert isinstance(load_config(None, []), Config)
