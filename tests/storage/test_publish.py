"""Publishing over an artifact (atomic exchange), stale temp entries of killed writers, and write errors as one
line (storage.layout, storage.checkpoints, storage.shards)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from core.errors import UserError
from storage import checkpoints, layout
from storage.formats import base as formats_base
from storage.shards import ShardFile

needs_exchange = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux-only")


def artifact(folder: Path, value: str) -> Path:
    """A complete stage directory holding `value`."""
    folder.mkdir(parents=True)
    (folder / "data.txt").write_text(value)
    layout.write_json_atomic(folder / layout.MANIFEST, {"v": value})
    return folder


def value_of(folder: Path) -> str:
    return json.loads((folder / layout.MANIFEST).read_text())["v"]


# ---------------------------------------------------------------- publish


@needs_exchange
def test_exchange_swaps_two_directories(tmp_path):
    a, b = artifact(tmp_path / "a", "first"), artifact(tmp_path / "b", "second")
    inodes = (a.stat().st_ino, b.stat().st_ino)
    assert layout.exchange(a, b)
    assert (value_of(a), value_of(b)) == ("second", "first")
    assert (a.stat().st_ino, b.stat().st_ino) == inodes[::-1]
    with pytest.raises(FileNotFoundError):
        layout.exchange(a, tmp_path / "missing")


@needs_exchange
def test_forced_publish_shows_a_complete_artifact_at_every_step(tmp_path, monkeypatch):
    """Right after the swap `<key>/` is the new artifact and the old one waits at the temp name; the old one
    is removed only then. (The fallback would show no `<key>/` between its two renames.)"""
    final = artifact(tmp_path / "stage" / "key", "old")
    tmp = artifact(tmp_path / "stage" / "key.tmp-new", "new")
    seen = []
    real_exchange, real_rmtree = layout.exchange, layout.shutil.rmtree

    def exchange(a: Path, b: Path) -> bool:
        seen.append(("before swap", value_of(final)))
        done = real_exchange(a, b)
        seen.append(("after swap", value_of(final)))
        return done

    def rmtree(path, *args, **kwargs):
        seen.append(("removing", value_of(Path(path))))
        seen.append(("while removing", value_of(final)))
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(layout, "exchange", exchange)
    monkeypatch.setattr(layout.shutil, "rmtree", rmtree)
    layout.publish(tmp, final)
    monkeypatch.undo()
    assert seen == [("before swap", "old"), ("after swap", "new"), ("removing", "old"), ("while removing", "new")]
    assert sorted(p.name for p in final.parent.iterdir()) == ["key"]


@needs_exchange
def test_a_reader_never_misses_the_artifact_during_forced_publishes(tmp_path):
    """A reader polls `<key>/manifest.json` while the artifact is republished 100 times: it is always there."""
    final = artifact(tmp_path / "stage" / "key", "0")
    stop, misses, looks = threading.Event(), [], [0]

    def reader() -> None:
        while not stop.is_set():
            looks[0] += 1
            if not layout.is_complete(final):
                misses.append(looks[0])

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(1, 101):
            with layout.staging(tmp_path, "stage", "key") as tmp:
                layout.write_json_atomic(tmp / layout.MANIFEST, {"v": str(i)})
    finally:
        stop.set()
        thread.join()
    assert looks[0] > 100 and not misses, f"{len(misses)} of {looks[0]} looks found no artifact"
    assert value_of(final) == "100" and [p.name for p in final.parent.iterdir()] == ["key"]


def test_publish_falls_back_to_two_renames_without_exchange(tmp_path, monkeypatch):
    monkeypatch.setattr(layout, "exchange", lambda a, b: False)
    final = artifact(tmp_path / "stage" / "key", "old")
    layout.publish(artifact(tmp_path / "stage" / "key.tmp-x", "new"), final)
    assert value_of(final) == "new" and [p.name for p in final.parent.iterdir()] == ["key"]


def test_forced_finish_scratch_never_leaves_the_old_artifact_in_the_scratch_dir(tmp_path):
    final = artifact(layout.stage_dir(tmp_path, "activations", "k"), "old")
    scratch = layout.scratch_dir(tmp_path, "activations", "k")
    (scratch / "shard.bin").write_text("new")
    layout.finish_scratch(scratch, final, {"v": "new"})
    assert value_of(final) == "new" and (final / "shard.bin").read_text() == "new"
    assert [p.name for p in final.parent.iterdir()] == ["k"]


# ---------------------------------------------------------------- stale temp entries


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def owned_by(path: Path, pid: int) -> Path:
    """`path` with its owner pid replaced (a temp name as process `pid` would have made it)."""
    return path.with_name(path.name.replace(f"-{os.getpid()}@", f"-{pid}@"))


def test_temp_names_carry_their_owner_and_only_dead_owners_are_stale(tmp_path):
    final = tmp_path / "stage" / "key"
    mine = layout.temp_path(final, hidden=False)
    assert mine.name.startswith(f"key.tmp-{os.getpid()}@") and not layout.is_stale(mine)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert not layout.is_stale(owned_by(mine, live.pid))
    finally:
        live.kill()
        live.wait()
    assert layout.is_stale(owned_by(mine, dead_pid()))
    other_host = mine.name.split("@")[0] + "@00000000-" + mine.name.rsplit("-", 1)[1]
    assert not layout.is_stale(final.with_name(other_host))
    assert not layout.is_stale(final.with_name("key.tmp-1a2b3c4d"))  # not a name this module makes
    assert layout.is_stale(owned_by(layout.temp_path(final), dead_pid()))  # hidden temp files too


def test_building_a_stage_removes_what_killed_writers_left(tmp_path):
    """Staging any key of a stage removes that stage's temp dirs (and displaced artifacts) of dead writers,
    and nothing else: not a live writer's, not an artifact, not a scratch dir."""
    folder = tmp_path / "tokens"
    done = artifact(folder / "done", "x")
    scratch = layout.scratch_dir(tmp_path, "tokens", "resume")
    dead = dead_pid()
    stale_dir = artifact(owned_by(layout.temp_path(folder / "k1", hidden=False), dead), "torn")
    stale_old = artifact(owned_by(layout.temp_path(folder / "k2", hidden=False, kind="old"), dead), "old")
    live_dir = artifact(layout.temp_path(folder / "k1", hidden=False), "building")
    with layout.staging(tmp_path, "tokens", "k3") as tmp:
        assert not stale_dir.exists() and not stale_old.exists()
        layout.write_json_atomic(tmp / layout.MANIFEST, {"v": "k3"})
    assert sorted(p.name for p in folder.iterdir()) == sorted(["done", "k3", scratch.name, live_dir.name])
    assert value_of(done) == "x" and value_of(live_dir) == "building"


def test_opening_a_scratch_dir_removes_torn_temp_files_of_dead_writers(tmp_path):
    scratch = layout.scratch_dir(tmp_path, "train", "k")
    (scratch / "checkpoint.safetensors").write_bytes(b"good")
    torn = owned_by(layout.temp_path(scratch / "checkpoint.safetensors"), dead_pid())
    torn.write_bytes(b"to")
    nested = owned_by(layout.temp_path(scratch / "layer=0" / "pairs-00000.safetensors"), dead_pid())
    nested.parent.mkdir()
    nested.write_bytes(b"to")
    live = layout.temp_path(scratch / "other.json")
    live.write_text("{")
    assert layout.scratch_dir(tmp_path, "train", "k") == scratch
    assert sorted(p.name for p in scratch.rglob("*") if p.is_file()) == sorted(["checkpoint.safetensors", live.name])


def test_shard_temp_files_are_owned(tmp_path):
    file = ShardFile(tmp_path / "layer=0" / "pairs-00000.safetensors", 4, 2, 2, "float32")
    try:
        assert file.tmp.name.startswith(".pairs-00000.safetensors.tmp-") and not layout.is_stale(file.tmp)
        assert owned_by(file.tmp, os.getpid()) == file.tmp
    finally:
        file.abort()


# ---------------------------------------------------------------- write errors


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def assert_one_line_full_disk(err: BaseException, path: Path) -> None:
    message = str(err)
    assert isinstance(err, layout.StoreError) and isinstance(err, UserError) and isinstance(err, OSError)
    assert "\n" not in message and f"could not write {path}: No space left on device" in message, message
    assert "free disk space" in message and err.errno == errno.ENOSPC


def test_atomic_file_turns_a_full_disk_into_one_line_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "t.parquet"
    target.write_text("old")
    with pytest.raises(layout.StoreWriteError) as err:
        with layout.atomic_file(target) as tmp:
            tmp.write_text("ha")
            enospc()
    assert_one_line_full_disk(err.value, target)
    assert [p.name for p in tmp_path.iterdir()] == ["t.parquet"] and target.read_text() == "old"


def test_write_json_atomic_leaves_no_temp_file_on_error(tmp_path, monkeypatch):
    monkeypatch.setattr(layout.os, "fsync", enospc)
    with pytest.raises(layout.StoreWriteError) as err:
        layout.write_json_atomic(tmp_path / "manifest.json", {"a": 1})
    assert_one_line_full_disk(err.value, tmp_path / "manifest.json")
    assert list(tmp_path.iterdir()) == []


def test_a_new_transcoder_folder_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    from core.transcoder import TranscoderConfig, init_transcoder

    tc = init_transcoder(
        TranscoderConfig(
            8, 16, 8, "relu", 4, False, "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out", 0, "tiny:ln"
        ),
        seed=0,
    )
    real = formats_base.save_tensors

    def half_then_full(tensors, path: Path) -> None:
        real(tensors, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        enospc()

    monkeypatch.setattr(formats_base, "save_tensors", half_then_full)
    with pytest.raises(layout.StoreWriteError) as err:
        checkpoints.save_transcoder(tc, tmp_path / "native")
    assert_one_line_full_disk(err.value, tmp_path / "native")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    checkpoints.save_transcoder(tc, tmp_path / "native")  # and the rerun writes it whole
    loaded = checkpoints.load_transcoder(tmp_path / "native")
    assert torch.equal(loaded.W_enc, tc.W_enc) and torch.equal(loaded.W_dec, tc.W_dec)


def test_a_checkpoint_write_leaves_only_names_a_rerun_can_clean(tmp_path: Path, monkeypatch) -> None:
    """While a checkpoint is being written, every new entry in its folder is a temp name of storage.layout,
    which a rerun removes once its writer is dead; the file is readable like the store's other files."""
    from storage.training import read_checkpoint, write_checkpoint

    seen: list[str] = []
    replace = os.replace

    def spy(src, dst):  # the moment before the rename: what a kill -9 here would leave
        seen.extend(p.name for p in tmp_path.iterdir())
        replace(src, dst)

    monkeypatch.setattr(layout.os, "replace", spy)
    target = tmp_path / "checkpoint.safetensors"
    write_checkpoint(target, {"w": torch.arange(6.0).reshape(2, 3)}, {"step": 3})
    assert seen and all(layout._TEMP_NAME.search(name) for name in seen), seen
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
    assert target.stat().st_mode & 0o777 == (0o666 & ~_umask())
    tensors, meta = read_checkpoint(target)
    assert torch.equal(tensors["w"], torch.arange(6.0).reshape(2, 3)) and meta == {"step": 3}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@needs_exchange
def test_feature_acts_listed_across_a_forced_publish_are_the_new_artifacts_whole(tmp_path, monkeypatch):
    """A listing of a mine artifact's feature_acts that a forced publish interrupts (the old artifact swapped
    out and removed midway) is repeated: the view names the new artifact's files, all of them, never a mix
    or a part."""
    from storage import duck

    def mine(folder: Path, parts: dict[int, int]) -> Path:
        for layer, n in parts.items():
            (folder / "feature_acts" / f"layer={layer}").mkdir(parents=True)
            for i in range(n):
                (folder / "feature_acts" / f"layer={layer}" / f"part-{i}.parquet").write_text(str(i))
        layout.write_json_atomic(folder / layout.MANIFEST, {})
        return folder

    final = mine(tmp_path / "mine" / "key", {0: 2, 1: 2})
    new = mine(tmp_path / "mine" / "key.tmp-new", {0: 3, 1: 1})
    want = sorted(p.relative_to(new) for p in new.rglob("*.parquet"))
    real_glob, calls = Path.glob, [0]

    def glob(self: Path, pattern: str):
        calls[0] += 1
        for i, path in enumerate(real_glob(self, pattern)):
            if calls[0] == 1 and i == 1:  # the first listing is one file in: publish over it
                layout.publish(new, final)
            yield path

    monkeypatch.setattr(Path, "glob", glob)
    files = duck.feature_acts_files(final.resolve())
    assert calls[0] == 2 and [f.relative_to(final.resolve()) for f in files] == want
