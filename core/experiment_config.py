"""The `experiments` config section: batches of interventions the experiments flow runs and stores.

    experiments:
      runs:
        - name: ablate-top-source
          prompt: "The function returns a list of strings"
          ablate: ["1:120@5"]
          root: "3:496"
        - name: steer-496
          prompt: "def parse(line):"
          steer: ["3:496=8"]
          generate: 12

Every spec uses the `circuitflow intervene` syntax (core.intervention_spec) and is parsed when the
config loads, so a malformed one stops the run before any model loads.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.config_base import ConfigError, _Section
from core.intervention_spec import Spec, SpecError, parse_spec, parse_specs

SPEC_FIELDS = ("ablate", "clamp", "steer", "ablate_head", "ablate_mlp")


@dataclass(frozen=True)
class ExperimentConfig(_Section):
    prompt: str
    """The prompt the interventions run on (BOS is prepended)."""
    name: str = ""
    """Name of the experiment in the table (default: exp<index>)."""
    ablate: tuple[str, ...] = ()
    """Features to zero-ablate, `L:F[@pos]`."""
    clamp: tuple[str, ...] = ()
    """Features to set to a value, `L:F=VALUE[@pos]`."""
    steer: tuple[str, ...] = ()
    """Decoder rows to add to their layer's MLP output, `L:F=STRENGTH[@pos]`."""
    ablate_head: tuple[str, ...] = ()
    """Attention heads to zero-ablate, `L.H[@pos]`."""
    ablate_mlp: tuple[str, ...] = ()
    """Whole MLP outputs to zero-ablate, `L[@pos]`."""
    frozen: bool = False
    """Freeze attention patterns, norm scales and transcoder errors (the linearised effect)."""
    target: str | None = None
    """Token text whose log-probability is reported (default: the clean run's top token)."""
    root: str | None = None
    """A feature `L:F[@pos]` (default pos: the last token) whose change is reported, with the ratio of
    the recomputed change to the linearised (frozen) one."""
    generate: int = 0
    """Greedy tokens generated with and without the interventions (0: none)."""

    def __post_init__(self) -> None:
        try:
            self.specs()
            if self.root is not None:
                parse_spec("ablate", self.root)
        except SpecError as err:
            raise ConfigError(f"experiments.runs ({self.name or self.prompt[:30]!r}): {err}") from None
        if self.generate < 0:
            raise ConfigError(f"experiments.runs ({self.name!r}): generate must be >= 0, got {self.generate}")
        if self.frozen and self.generate:
            raise ConfigError(f"experiments.runs ({self.name!r}): generation recomputes attention; drop frozen")

    def specs(self) -> list[Spec]:
        """Every intervention of this run, parsed."""
        return parse_specs(**{name: getattr(self, name) for name in SPEC_FIELDS})


@dataclass(frozen=True)
class ExperimentsConfig(_Section):
    runs: tuple[ExperimentConfig, ...] = ()
    """The experiments, run in order by the experiments flow."""
    top_k: int = 10
    """Tokens listed per run among those whose probability moved most."""
    max_feature_changes: int = 50
    """Feature changes kept per run (largest |change| first)."""

    def __post_init__(self) -> None:
        if self.top_k < 1 or self.max_feature_changes < 1:
            raise ConfigError("experiments.top_k and experiments.max_feature_changes must be >= 1")
        names = [r.name for r in self.runs if r.name]
        if len(set(names)) != len(names):
            raise ConfigError(f"experiments.runs: duplicate names in {names}")
