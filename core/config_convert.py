"""Building config dataclasses from plain YAML data: unknown keys and wrong types are one-line errors
naming the dotted path of the setting."""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any, Literal

from core.config_base import ConfigError


def from_dict(data: dict[str, Any] | None, cls: type, where: str = "") -> Any:
    """Build a config dataclass from plain data, with one-line errors for unknown keys and types."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of keys, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"{_join(where, str(key))}: unknown key{hint}")
    kwargs = {k: _convert(v, hints[k], _join(where, k)) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{where or 'config'}: {exc}") from None
    except ConfigError as exc:  # a list item's own check names the list (`x[]`): name the item
        generic = re.sub(r"\[\d+\]$", "[]", where)
        if where and generic != where and str(exc).startswith(generic + ":"):
            raise ConfigError(where + str(exc)[len(generic) :]) from None
        raise


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not allowed; choose one of {', '.join(map(repr, args))}")
        return value
    if tp is Any:  # plain YAML data, checked by the section that holds it
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of keys, got {value!r}")
        return {str(k): _convert(v, args[1], _join(where, str(k))) for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return from_dict(value, tp, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `2e-4` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")  # pragma: no cover - programming error
