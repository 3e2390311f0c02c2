"""The shipped configs parse, and the paper's config states the paper's settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.config import Config, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.digest() == load_config(path).digest()


def test_gpt2_small_mirrors_the_paper() -> None:
    """GPT-2 small layer 8, 24576 features, l1 1.4e-4, lr 4e-4 with 5000 warm-up steps, batch 4096, context 128."""
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "gpt2-small.yaml")
    assert cfg.model.name == "gpt2"
    assert cfg.activations.layers == (8,)
    assert cfg.train.kind == "transcoder" and cfg.train.activation == "relu"
    assert cfg.train.expansion_factor * 768 == 24576
    assert cfg.train.l1_coefficient == pytest.approx(1.4e-4)
    assert cfg.train.lr == pytest.approx(4e-4)
    assert (cfg.train.lr_schedule, cfg.train.warmup_steps) == ("warmup", 5000)
    assert cfg.train.batch_size == 4096
    assert cfg.tokens.context_size == 128
    assert cfg.activations.hook_in == "blocks.{layer}.ln2.hook_normalized"
    assert cfg.activations.hook_out == "blocks.{layer}.hook_mlp_out"


def test_default_targets_the_bundled_model_offline() -> None:
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "default.yaml")
    assert cfg.model.name.startswith("bundled:")
    assert cfg.corpus.source.startswith("bundled:")
    assert cfg.activations.layers == (0, 1, 2, 3)
