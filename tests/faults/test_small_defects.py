"""Small defects a hostile pass found: the feature-sparsity file's permissions and its survival through `convert`."""

from __future__ import annotations

from pathlib import Path

import torch

from flows.cli import main
from storage.checkpoints import SAE_SPARSITY, load_log_feature_sparsity
from tests.faults.conftest import Reference, stage_dirs


def test_sparsity_file_has_the_folder_files_permissions_and_survives_convert(
    reference: Reference, tmp_path: Path, capsys
) -> None:
    folder = stage_dirs(reference.store, reference.plan)["train_0"]
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    assert mode(folder / SAE_SPARSITY) == mode(folder / "cfg.json") == mode(folder / "metrics.parquet")
    want = load_log_feature_sparsity(folder)
    for fmt in ("saelens", "native"):
        out = tmp_path / fmt
        assert main(["convert", str(folder), str(out), "--to", fmt]) == 0
        assert torch.equal(load_log_feature_sparsity(out), want)
        assert mode(out / SAE_SPARSITY) == mode(out / "cfg.json")
    assert "wrote feature sparsity" in capsys.readouterr().out
