"""Stage keys and the atomic stage-directory protocol."""

from __future__ import annotations

import pytest

from storage import layout, stagecode


def test_stage_key_depends_on_every_part():
    base = layout.stage_key("train", {"l1": 1}, {"activations": "abc"})
    assert base == layout.stage_key("train", {"l1": 1}, {"activations": "abc"})
    assert len(base) == layout.KEY_LENGTH
    assert base != layout.stage_key("mine", {"l1": 1}, {"activations": "abc"})
    assert base != layout.stage_key("train", {"l1": 2}, {"activations": "abc"})
    assert base != layout.stage_key("train", {"l1": 1}, {"activations": "abd"})


def test_code_version_tracks_sources(tmp_path, monkeypatch):
    before = layout.code_version()
    fake = tmp_path / "core"
    fake.mkdir()
    (fake / "a.py").write_text("x = 1\n")
    (tmp_path / "storage").mkdir()
    monkeypatch.setattr(stagecode, "_PACKAGE_ROOT", tmp_path)
    layout.code_version.cache_clear()
    first = layout.code_version()
    layout.code_version.cache_clear()
    (fake / "a.py").write_text("x = 2\n")
    assert layout.code_version() != first
    monkeypatch.undo()
    layout.code_version.cache_clear()
    assert layout.code_version() == before


def test_stage_code_version_follows_only_its_imports(tmp_path, monkeypatch):
    """Editing a module changes the version of the stages that import it (even lazily), not the others'."""
    for package in ("core", "storage", "tasks"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "core" / "shared.py").write_text("s = 1\n")
    (tmp_path / "core" / "fit.py").write_text("from core import shared\n")
    (tmp_path / "core" / "walk.py").write_text("import core.shared\n")
    (tmp_path / "storage" / "io.py").write_text("def load():\n    from core.walk import x\n")
    (tmp_path / "tasks" / "train.py").write_text("from core.fit import go\n")
    (tmp_path / "tasks" / "trace.py").write_text("from storage import io\n")
    monkeypatch.setattr(stagecode, "_PACKAGE_ROOT", tmp_path)

    def versions() -> dict[str, str]:
        layout.code_version.cache_clear()
        return {stage: layout.code_version(stage) for stage in ("train", "trace", "no-module")}

    start = versions()
    (tmp_path / "core" / "walk.py").write_text("import core.shared\nx = 1\n")  # only trace reaches it
    after_walk = versions()
    assert after_walk["train"] == start["train"]
    assert after_walk["trace"] != start["trace"]
    assert after_walk["no-module"] != start["no-module"]  # a stage without a module follows every file
    (tmp_path / "core" / "shared.py").write_text("s = 2\n")  # both reach it
    after_shared = versions()
    assert after_shared["train"] != after_walk["train"] and after_shared["trace"] != after_walk["trace"]
    names = {p.relative_to(tmp_path).as_posix() for p in stagecode.source_closure("tasks.trace")}
    assert names == {
        "tasks/trace.py",
        "tasks/__init__.py",
        "storage/__init__.py",
        "storage/io.py",
        "core/walk.py",
        "core/shared.py",
        "core/__init__.py",
    }
    monkeypatch.undo()
    layout.code_version.cache_clear()


def test_staging_publishes_only_with_manifest(tmp_path):
    with layout.staging(tmp_path, "tokens", "k1") as tmp:
        (tmp / "data.txt").write_text("x")
        layout.write_json_atomic(tmp / layout.MANIFEST, {"ok": True})
    final = layout.stage_dir(tmp_path, "tokens", "k1")
    assert layout.is_complete(final) and (final / "data.txt").read_text() == "x"
    assert [p.name for p in (tmp_path / "tokens").iterdir()] == ["k1"]


def test_failed_stage_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with layout.staging(tmp_path, "tokens", "k2") as tmp:
            (tmp / "half.parquet").write_text("partial")
            raise RuntimeError("killed")
    assert list((tmp_path / "tokens").iterdir()) == []
    with pytest.raises(layout.StoreError, match="without writing manifest.json"):
        with layout.staging(tmp_path, "tokens", "k3"):
            pass
    assert list((tmp_path / "tokens").iterdir()) == []
    assert layout.complete_dirs(tmp_path, "tokens") == []


def test_republish_replaces_old(tmp_path):
    for value in ("old", "new"):
        with layout.staging(tmp_path, "mine", "k") as tmp:
            (tmp / "v.txt").write_text(value)
            layout.write_json_atomic(tmp / layout.MANIFEST, {"v": value})
    final = layout.stage_dir(tmp_path, "mine", "k")
    assert layout.read_manifest(final) == {"v": "new"}
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["k"]


def test_read_manifest_of_incomplete_dir(tmp_path):
    with pytest.raises(layout.StoreError, match="did not finish"):
        layout.read_manifest(tmp_path)


def test_atomic_file_cleans_up(tmp_path):
    target = tmp_path / "f.bin"
    with pytest.raises(OSError):
        with layout.atomic_file(target) as tmp:
            tmp.write_bytes(b"half")
            raise OSError(28, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_within_store(tmp_path):
    assert layout.within_store(tmp_path, "a/b") == (tmp_path / "a" / "b").resolve()
    with pytest.raises(layout.StoreError, match="escapes the store"):
        layout.within_store(tmp_path, "../../etc/passwd")
