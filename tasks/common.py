"""What every stage task shares: the manifest-checked build protocol wrapped as a cached Prefect task."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.exceptions import MissingContextError

from storage import layout, provenance, stagecode


def cache_key(stage: str) -> Callable[[Any, dict[str, Any]], str]:
    """Prefect cache key function: the stage's content key, passed to the task as `key`."""

    def key_fn(context: Any, parameters: dict[str, Any]) -> str:
        return f"circuitflow-{stage}-{parameters['key']}"

    return key_fn


def build_stage(
    root: str | Path, stage: str, key: str, build: Callable[[Path], dict[str, Any]], force: bool = False
) -> dict[str, Any]:
    """Run `build(tmp_dir) -> manifest` unless the stage's artifact is complete; publish atomically.

    Returns a small summary: stage, key, path, status ("ran" or "cached"), seconds, and the manifest.
    """
    final = layout.stage_dir(root, stage, key)
    if layout.is_complete(final) and not force:
        return _summary(stage, key, final, "cached", 0.0, layout.read_manifest(final))
    reason = "forced" if force and layout.is_complete(final) else why_run(root, stage, key)
    log(f"{stage} {key}: will run: {reason}")
    start = time.perf_counter()
    with layout.staging(root, stage, key) as tmp:
        manifest = build(tmp)
        manifest = {**stage_identity(stage, key), **manifest, **key_provenance(stage, key)}
        manifest["seconds"] = round(time.perf_counter() - start, 3)
        layout.write_json_atomic(tmp / layout.MANIFEST, manifest)
    return {**_summary(stage, key, final, "ran", manifest["seconds"], manifest), "reason": reason}


def why_run(root: str | Path, stage: str, key: str, section: str = "") -> str:
    """Why `stage` computes `key`: what differs from the closest artifact of the stage in the store."""
    return provenance.why_run(root, stage, key, stagecode.code_files(stage), section)


def stage_identity(stage: str, key: str) -> dict[str, Any]:
    """The manifest's first fields: stage, key, code version, creation time."""
    return {"stage": stage, "key": key, "code": layout.code_version(stage), "created": layout.now()}


def key_provenance(stage: str, key: str) -> dict[str, Any]:
    """What the key was made of (settings, inputs) and the hash of each file its code version covers, so a later
    `circuitflow plan` can say why a new key differs (storage.provenance)."""
    made_of = layout.key_payload(key)  # None in a worker process that did not derive the key
    parts = {"key_parts": {"settings": made_of["settings"], "inputs": made_of["inputs"]}} if made_of else {}
    return {**parts, "code_files": stagecode.code_files(stage)}


def _summary(stage: str, key: str, path: Path, status: str, seconds: float, manifest: dict[str, Any]) -> dict[str, Any]:
    return {"stage": stage, "key": key, "path": str(path), "status": status, "seconds": seconds, "manifest": manifest}


def log(message: str) -> None:
    """Log through Prefect when inside a run, else print."""
    try:
        get_run_logger().info(message)
    except MissingContextError:
        print(message)
