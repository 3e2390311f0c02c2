"""Intervention specs as people write them (CLI flags, the `experiments` config section), parsed
without torch so configs and commands can refuse malformed ones before any model loads.

    L:F[@pos]          a feature of layer L's transcoder (ablate), at token pos or every token
    L:F=VALUE[@pos]    a feature and a number (clamp: set its activation; steer: a strength)
    L.H[@pos]          attention head H of layer L (ablate its output)
    L[@pos]            the MLP of layer L (ablate its output)

Positions may be negative (counted from the end of the prompt).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from core.errors import UserError

SpecKind = Literal["ablate", "clamp", "scale", "steer", "ablate_head", "ablate_mlp"]
_INT = r"(-?\d+)"
_NUMBER = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"
_POS = rf"(?:@{_INT})?"
_FORMS = {
    "ablate": (re.compile(rf"{_INT}:{_INT}{_POS}"), "L:F[@pos], e.g. 3:496 or 3:496@5"),
    "clamp": (re.compile(rf"{_INT}:{_INT}={_NUMBER}{_POS}"), "L:F=VALUE[@pos], e.g. 3:496=4.5@-1"),
    "scale": (re.compile(rf"{_INT}:{_INT}={_NUMBER}{_POS}"), "L:F=FACTOR[@pos], e.g. 3:496=2"),
    "steer": (re.compile(rf"{_INT}:{_INT}={_NUMBER}{_POS}"), "L:F=STRENGTH[@pos], e.g. 3:496=8"),
    "ablate_head": (re.compile(rf"{_INT}\.{_INT}{_POS}"), "L.H[@pos], e.g. 2.5"),
    "ablate_mlp": (re.compile(rf"{_INT}{_POS}"), "L[@pos], e.g. 1"),
}
FLAGS = {"ablate_head": "--ablate-head", "ablate_mlp": "--ablate-mlp"}
"""CLI flag of each kind when it is not `--<kind>`."""


class SpecError(UserError, ValueError):
    """A malformed intervention spec, in one line with the expected form."""


@dataclass(frozen=True)
class Spec:
    """One parsed intervention: what, where, and its number."""

    kind: SpecKind
    """ablate | clamp | scale | steer (features), ablate_head, ablate_mlp."""
    layer: int
    """Layer of the feature's transcoder, the head or the MLP."""
    index: int = -1
    """Feature (ablate, clamp, scale, steer) or head (ablate_head); -1 for an MLP."""
    value: float = 0.0
    """clamp: the activation set; scale: the factor; steer: the strength; 0 for ablations."""
    pos: int | None = None
    """Token position (negative from the end); None: every token."""
    text: str = ""
    """The spec as written, for messages and tables."""

    @property
    def flag(self) -> str:
        return FLAGS.get(self.kind, f"--{self.kind}")


def parse_spec(kind: SpecKind, text: str) -> Spec:
    """Parse one spec of `kind`; SpecError (one line, with the expected form) when malformed."""
    if kind not in _FORMS:
        raise SpecError(f"unknown intervention kind {kind!r}; expected one of {', '.join(_FORMS)}")
    pattern, form = _FORMS[kind]
    match = pattern.fullmatch(str(text).strip())
    flag = FLAGS.get(kind, f"--{kind}")
    if not match:
        raise SpecError(f"{flag} {text!r}: malformed; expected {form}")
    groups = match.groups()
    pos = None if groups[-1] is None else int(groups[-1])
    layer = int(groups[0])
    if layer < 0:
        raise SpecError(f"{flag} {text!r}: layer {layer} is negative; layers count from 0")
    if kind == "ablate_mlp":
        return Spec(kind, layer, pos=pos, text=text)
    index = int(groups[1])
    if index < 0:
        raise SpecError(f"{flag} {text!r}: index {index} is negative; features and heads count from 0")
    value = float(groups[2]) if kind in ("clamp", "scale", "steer") else 0.0
    return Spec(kind, layer, index, value, pos, text)


def parse_specs(**texts: list[str] | tuple[str, ...]) -> list[Spec]:
    """Every spec given per kind, e.g. `parse_specs(ablate=["3:4"], clamp=["2:7=1.5@3"])`, in that order."""
    return [parse_spec(kind, t) for kind, items in texts.items() for t in items or ()]  # type: ignore[arg-type]
