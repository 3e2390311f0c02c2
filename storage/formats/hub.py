"""`hf://owner/repo/path-or-glob` transcoder specs: fetched through huggingface_hub (an optional dependency)."""

from __future__ import annotations

from pathlib import Path

from storage.formats.base import CheckpointError, first_line
from storage.formats.original_pt import SPARSITY_SUFFIX


def fetch_hub(spec: str) -> str:
    """`hf://owner/repo/path-or-glob` -> the local path (downloads only the matching files; the hub cache is reused)."""
    parts = spec.removeprefix("hf://").split("/", 2)
    if len(parts) < 2 or not all(parts[:2]):
        raise CheckpointError(f"{spec}: expected hf://owner/repo[/path or glob]")
    repo_id, inner = "/".join(parts[:2]), (parts[2] if len(parts) == 3 else "")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(
            f"{spec}: reading from the hub needs huggingface_hub (pip install huggingface_hub)"
        ) from None
    patterns = [inner, f"{inner}/*", inner.removesuffix(".pt") + SPARSITY_SUFFIX] if inner else None
    try:
        local = snapshot_download(repo_id, allow_patterns=patterns)
    except Exception as exc:  # network, auth or missing repo: one line either way
        raise CheckpointError(
            f"{spec}: could not fetch from the hub ({type(exc).__name__}: {first_line(exc)})"
        ) from None
    return str(Path(local) / inner) if inner else local
