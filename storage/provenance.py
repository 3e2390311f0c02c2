"""Why a stage's key is not in the store: its settings, inputs and code compared with the closest artifact
of the same stage that is (each manifest records its `key_parts` and the per-file hashes of its `code_files`).

Reasons, in the order they are listed: `config changed (<section>: <fields>)`, `upstream key changed
(<inputs>)`, `code changed (<files>)`; `not in the store` when the stage never ran there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from storage import layout

IDENTITY = ("layer", "split")
"""Settings that name which artifact of a stage this is (a layer's transcoder, a split's tokens): an earlier
artifact with the same values is the one compared."""


def why_run(root: str | Path, stage: str, key: str, code_files: dict[str, str], section: str = "") -> str:
    """One line saying why `stage` must compute `key` (call after the key was derived in this process)."""
    now = layout.key_payload(key)
    if now is None:
        return "key not derived in this process"
    earlier = _closest(root, stage, now, code_files)
    if earlier is None:
        return "not in the store"
    reasons = differences(now, code_files, earlier, section or stage)
    return "; ".join(reasons) if reasons else "not in the store (an earlier artifact was made the same way)"


def differences(now: dict[str, Any], code_files: dict[str, str], earlier: dict[str, Any], section: str) -> list[str]:
    """What differs between a key's parts now and an earlier manifest's, one reason per kind."""
    settings, inputs, files = _diff(now, code_files, earlier)
    reasons = [f"config changed ({section}: {', '.join(settings)})"] if settings else []
    reasons += [f"upstream key changed ({', '.join(inputs)})"] if inputs else []
    return reasons + ([f"code changed ({', '.join(files)})"] if files else [])


def _diff(now: dict[str, Any], code_files: dict[str, str], earlier: dict[str, Any]) -> tuple[list[str], ...]:
    """(settings, inputs, files) that differ between now and an earlier manifest."""
    parts = earlier.get("key_parts") or {}
    return (
        _changed(now.get("settings") or {}, parts.get("settings") or {}),
        _changed(now.get("inputs") or {}, parts.get("inputs") or {}),
        _changed(code_files, earlier.get("code_files") or {}),
    )


def _changed(now: dict[str, Any], before: dict[str, Any]) -> list[str]:
    """Keys (one level down for nested settings: `corpus.source`) whose values differ, sorted."""
    out = []
    for name in sorted(set(now) | set(before)):
        a, b = now.get(name), before.get(name)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{name}.{sub}" for sub in _changed(a, b)]
        elif a != b:
            out.append(name)
    return out


def _closest(root: str | Path, stage: str, now: dict[str, Any], code_files: dict[str, str]) -> dict[str, Any] | None:
    """The complete artifact of `stage` with recorded key parts that differs least from `now` (same identity
    first, then fewest differences, then newest)."""
    settings = now.get("settings") or {}
    best, best_rank = None, None
    for folder in layout.complete_dirs(root, stage):
        manifest = layout.read_manifest(folder)
        if "key_parts" not in manifest:
            continue
        theirs = (manifest.get("key_parts") or {}).get("settings") or {}
        other = sum(settings.get(k) != theirs.get(k) for k in IDENTITY)
        distance = sum(len(found) for found in _diff(now, code_files, manifest))
        rank = (other, distance, _negated(manifest.get("created", "")))
        if best_rank is None or rank < best_rank:
            best, best_rank = manifest, rank
    return best


def _negated(stamp: str) -> tuple[int, ...]:
    """Sorts newer timestamps first."""
    return tuple(-ord(c) for c in stamp)
