"""The pieces every config section shares: the one-line error and the content digest."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from core.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration problem, described in one line for the person who wrote the config."""


class _Section:
    """Mixin: a stable content digest for frozen config dataclasses."""

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)

    def digest(self) -> str:
        """Hex sha256 of the canonical JSON of this section; identical across processes."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return [_plain(x) for x in obj]
    return obj
