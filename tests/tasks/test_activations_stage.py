"""The activations stage end to end on a tiny model and a tiny store: the cache it publishes, resume
after a kill and after a full disk (byte-identical to an uninterrupted run), errors before any
forward pass, and the Prefect task under the test harness (cache hit, progress artifact)."""

from __future__ import annotations

import errno
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

import storage.shards as shards
import tasks.activations as stage
from core.activations import CaptureError, capture_mlp_pairs
from core.config import ActivationsConfig, Config, ModelConfig, RunnerConfig, StoreConfig
from core.errors import UserError
from core.model import load_model
from storage import layout
from storage.shards import ActivationCache, ShardWriteError
from storage.tables import tokens_table, write_table
from tasks.activations import cache_activations

TOKENS_KEY = "tok0123456789abc"
N_ROWS, CONTEXT = 12, 9  # 8 pairs per row; shard_tokens 16 -> 6 shards of 2 rows


class Killed(BaseException):
    """Stands in for SIGKILL/Ctrl-C in the middle of the stage."""


def token_rows(seed: int = 0) -> np.ndarray:
    rows = np.random.default_rng(seed).integers(0, 256, size=(N_ROWS, CONTEXT), dtype=np.int32)
    rows[:, 0] = 256  # BOS of the byte-level tokenizer
    return rows


def make_store(root: Path) -> np.ndarray:
    """A store holding only a finished tokens stage."""
    rows = token_rows()
    folder = layout.stage_dir(root, "tokens", TOKENS_KEY)
    write_table(tokens_table(rows), folder / "tokens.parquet")
    layout.write_json_atomic(folder / layout.MANIFEST, {"stage": "tokens", "key": TOKENS_KEY})
    return rows


def config(root: Path, **acts: object) -> Config:
    settings = {"layers": (0, 1), "shard_tokens": 16, "batch_rows": 2, **acts}
    return Config(
        model=ModelConfig(name="tiny:rms", device="cpu"),
        activations=ActivationsConfig(**settings),
        store=StoreConfig(root=str(root)),
        runner=RunnerConfig(torch_threads=1),
    )


def run(root: Path, key: str = "act0123456789abc", **acts: object) -> dict:
    return cache_activations.fn(config(root, **acts), key=key, tokens_key=TOKENS_KEY)


def shard_bytes(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*.safetensors"))}


def stable(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k not in ("created", "seconds")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict[str, bytes]]:
    """An uninterrupted run: its summary and the bytes of every shard."""
    root = tmp_path_factory.mktemp("uninterrupted")
    make_store(root)
    summary = run(root)
    return summary, shard_bytes(Path(summary["path"]))


def test_stage_publishes_a_readable_cache(reference: tuple[dict, dict[str, bytes]], tmp_path: Path) -> None:
    summary, files = reference
    path = Path(summary["path"])
    assert summary["status"] == "ran" and path.name == "act0123456789abc"
    assert set(summary) == {"stage", "key", "path", "status", "seconds", "manifest", "reason"}
    manifest = summary["manifest"]
    assert (manifest["n_tokens"], manifest["d_in"], manifest["d_out"], len(manifest["shards"])) == (96, 32, 32, 6)
    assert manifest["shards"][1] | {"file": "pairs-00001.safetensors"} == {
        "index": 1,
        "row_start": 2,
        "row_stop": 4,
        "token_start": 16,
        "token_stop": 32,
        "n_tokens": 16,
        "file": "pairs-00001.safetensors",
    }
    assert len(files) == 12 and not (path / stage.RESUME_FILE).exists()
    assert not (path.parent / "act0123456789abc.partial").exists()
    # the cache holds exactly what one forward pass per 2-row batch captures
    model = load_model("tiny:rms", device="cpu")
    rows = torch.from_numpy(token_rows()).long()
    source = ActivationCache(path).layer(1)
    x_in, x_out = source.read(0, source.n_tokens)
    want = [capture_mlp_pairs(model, rows[i : i + 2], [1])[1] for i in range(0, N_ROWS, 2)]
    torch.testing.assert_close(x_in, torch.cat([w.mlp_in for w in want]), rtol=0, atol=0)
    torch.testing.assert_close(x_out, torch.cat([w.mlp_out for w in want]), rtol=0, atol=0)
    # disk use is 2 x d_model x 4 bytes per token per layer plus one small header per shard
    layer_bytes = sum(len(b) for name, b in files.items() if name.startswith("layer=1/"))
    assert 96 * 2 * 32 * 4 < layer_bytes < 96 * 2 * 32 * 4 + 6 * 200


def test_second_run_is_cached(reference: tuple[dict, dict[str, bytes]]) -> None:
    summary, _ = reference
    root = Path(summary["path"]).parents[1]
    again = run(root)
    assert again["status"] == "cached" and stable(again["manifest"]) == stable(summary["manifest"])


def test_resume_after_kill_is_byte_identical(
    reference: tuple[dict, dict[str, bytes]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_store(tmp_path)
    real_commit, commits = shards.ShardFile.commit, []

    def commit_then_die(self: shards.ShardFile) -> None:
        commits.append(self.path)
        if len(commits) == 8:  # shard 3 of layer 1: shards 0-2 are done, shard 3 only at layer 0
            raise Killed
        real_commit(self)

    monkeypatch.setattr(shards.ShardFile, "commit", commit_then_die)
    with pytest.raises(Killed):
        run(tmp_path)
    scratch = tmp_path / "activations" / "act0123456789abc.partial"
    final = tmp_path / "activations" / "act0123456789abc"
    assert not final.exists() and len(shard_bytes(scratch)) == 7
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in scratch.rglob("pairs-0000[012].safetensors")}
    monkeypatch.setattr(shards.ShardFile, "commit", real_commit)
    captured: list[tuple[int, ...]] = []
    real_capture = stage.capture_rows

    def spy_capture(model: object, rows: torch.Tensor, *args: object) -> int:
        captured.append(tuple(rows.shape))
        return real_capture(model, rows, *args)

    monkeypatch.setattr(stage, "capture_rows", spy_capture)
    resumed = run(tmp_path, batch_rows=1)  # a new batch size is ignored: shards must stay identical
    assert resumed["status"] == "ran" and resumed["manifest"]["batch_rows"] == 2
    assert captured == [(2, CONTEXT)] * 3  # shards 3, 4, 5 only: work continued at row 6
    after = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in final.rglob("pairs-0000[012].safetensors")}
    assert sorted(after.values()) == sorted(before.values())  # finished shards were not rewritten
    summary, files = reference
    assert shard_bytes(final) == files
    assert stable(resumed["manifest"]) == stable(summary["manifest"])


def test_disk_full_is_clear_and_rerun_resumes(
    reference: tuple[dict, dict[str, bytes]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_store(tmp_path)
    real_write, calls = shards._write_at, []

    def fill_disk(fd: int, data: object, offset: int) -> None:
        calls.append(offset)
        if len(calls) == 9:  # shard 1's first rows (2 headers + 4 row writes per shard), in the writer thread
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(fd, data, offset)

    monkeypatch.setattr(shards, "_write_at", fill_disk)
    with pytest.raises(ShardWriteError, match="No space left on device") as err:
        run(tmp_path)
    assert isinstance(err.value, UserError) and "\n" not in str(err.value)
    scratch = tmp_path / "activations" / "act0123456789abc.partial"
    assert sorted(shard_bytes(scratch)) == ["layer=0/pairs-00000.safetensors", "layer=1/pairs-00000.safetensors"]
    assert [p for p in scratch.rglob(".*")] == []  # no partial file visible
    assert not (tmp_path / "activations" / "act0123456789abc").exists()
    monkeypatch.setattr(shards, "_write_at", real_write)
    resumed = run(tmp_path)
    assert resumed["status"] == "ran" and shard_bytes(Path(resumed["path"])) == reference[1]


def test_force_recomputes_identically(reference: tuple[dict, dict[str, bytes]], tmp_path: Path) -> None:
    make_store(tmp_path)
    first = run(tmp_path)
    inode = (Path(first["path"]) / "layer=0" / "pairs-00000.safetensors").stat().st_ino
    forced = cache_activations.fn(config(tmp_path), key="act0123456789abc", tokens_key=TOKENS_KEY, force=True)
    assert forced["status"] == "ran"
    assert (Path(forced["path"]) / "layer=0" / "pairs-00000.safetensors").stat().st_ino != inode
    assert shard_bytes(Path(forced["path"])) == reference[1]


def test_bad_layer_fails_before_any_forward(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_store(tmp_path)
    forwards: list[int] = []

    def counting_load(*args: object) -> object:
        model = load_model(*args)
        model.hook_embed.register_forward_hook(lambda *a: forwards.append(1))
        return model

    monkeypatch.setattr(stage, "load_model", counting_load)
    with pytest.raises(CaptureError, match="layer 2 is out of range") as err:
        run(tmp_path, layers=(0, 2))
    assert "\n" not in str(err.value) and forwards == []
    with pytest.raises(CaptureError, match="has no hook") as err:
        run(tmp_path, hook_out="blocks.{layer}.hook_mlp_output")
    assert forwards == [] and list((tmp_path / "activations").rglob("*.safetensors")) == []


def test_missing_tokens_stage_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(layout.StoreError, match="tokens stage tok0123456789abc is missing") as err:
        run(tmp_path)
    assert "\n" not in str(err.value)


@pytest.mark.prefect
def test_task_under_prefect(prefect_harness: None, reference: tuple[dict, dict[str, bytes]], tmp_path: Path) -> None:
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.pipeline import run_task

    key = uuid.uuid4().hex[:16]
    cfg = config(tmp_path)
    make_store(tmp_path)

    @flow
    def activations_flow() -> dict:
        return run_task(cache_activations, cfg, "activations", key, False, tokens_key=TOKENS_KEY)

    first, second = activations_flow(), activations_flow()
    assert first["status"] == "ran" and second["status"] == "cached"
    assert shard_bytes(Path(first["path"])) == reference[1]
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"activations-{key}"]))
        )
    assert found and float(found[0].data) == 100.0
