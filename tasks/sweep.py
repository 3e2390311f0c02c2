"""Stage `sweep`: the sparsity/fidelity sweep (transcoders vs SAEs). Each point of the config's `sweep`
section is the base train section with overrides, trained by the train stage under its usual key;
this stage collects every point's held-out evaluation into `<store>/sweep/<key>/sweep.parquet` and
plots L0 against spliced cross-entropy, one curve per kind (`sweep.png`)."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext

from core.config import Config, ConfigError
from storage import layout
from storage.catalog import SWEEP_LATEST, SWEEP_TABLE
from storage.tables import write_table
from tasks.common import build_stage
from tasks.evaluate import EVAL_JSON
from tasks.plan import make_plan
from tasks.train import STAGE as TRAIN_STAGE

STAGE = "sweep"
PLOT, REPORT = "sweep.png", "sweep.md"
ARTIFACT = "sweep"
"""Key of the markdown artifact with the sweep's table and the path of its plot."""
KIND_LABELS = {
    "transcoder": "transcoder",
    "skip_transcoder": "skip transcoder",
    "sae_mlp_out": "SAE (MLP out)",
    "sae_mlp_in": "SAE (MLP in)",
}
METRICS = {
    "l0": "l0", "fvu": "fvu", "ce_clean": "ce_clean", "ce_spliced": "ce_spliced", "ce_ablated": "ce_zero",
    "ce_recovered": "ce_recovered", "ce_kl": "ce_kl", "dead_fraction": "dead_fraction",
}  # fmt: skip
"""Sweep table column -> eval.json field of the point's train stage (ce_zero: the spliced hook zeroed)."""


class SweepPoint(NamedTuple):
    """One point of a sweep: a kind, a layer and the grid values, trained as `cfg.train` under `key`."""

    index: int
    kind: str
    layer: int
    settings: dict[str, Any]
    """The swept train settings of this point (name -> value), in grid order."""
    cfg: Config
    """The base config with this point's train section."""
    key: str
    """Train stage key of the point: the pipeline's per-layer train key for `cfg`."""

    def labels(self) -> dict[str, Any]:
        """What names the point: index, kind, layer and settings."""
        return {"point": self.index, "kind": self.kind, "layer": self.layer, "settings": self.settings}

    def record(self) -> dict[str, Any]:
        """What the collect stage needs: plain data, no config."""
        return {**self.labels(), "train_key": self.key}


# ---------------------------------------------------------------- points (no heavy work)


def sweep_points(cfg: Config) -> list[SweepPoint]:
    """Every point of the config's sweep: kinds x grid combinations x layers. Raises a one-line
    ConfigError when the sweep is empty, a layer has no cached activations or a point is invalid."""
    sweep = cfg.sweep
    if not sweep.grid and not sweep.kinds:
        raise ConfigError(
            "sweep: nothing to sweep; add e.g. sweep: {grid: {l1_coefficient: [1e-4, 1e-3]}, "
            "kinds: [transcoder, sae_mlp_out]}"
        )
    if cfg.transcoders is not None:
        raise ConfigError("transcoders: a sweep trains its own points; remove transcoders: from the config")
    layers = sweep.layers or cfg.activations.layers
    missing = [x for x in layers if x not in cfg.activations.layers]
    if missing:
        raise ConfigError(
            f"sweep.layers: layer {missing[0]} has no cached activations; add it to activations.layers "
            f"(now {list(cfg.activations.layers)})"
        )
    points: list[SweepPoint] = []
    for kind in sweep.kinds or (cfg.train.kind,):
        for values in itertools.product(*sweep.grid.values()):
            settings = dict(zip(sweep.grid, values, strict=True))
            derived = point_config(cfg, kind, settings)
            keys = make_plan(derived).train
            points += [SweepPoint(len(points) + i, kind, x, settings, derived, keys[x]) for i, x in enumerate(layers)]
    return points


def point_config(cfg: Config, kind: str, settings: dict[str, Any]) -> Config:
    """The base config with `train.kind` and `train.<name>` set for one point (validated as a whole)."""
    try:
        return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, kind=kind, **settings))
    except ConfigError as err:
        point = ", ".join([f"kind={kind}", *(f"{k}={v!r}" for k, v in settings.items())])
        raise ConfigError(f"sweep point ({point}): {err}") from None


def sweep_key(points: list[SweepPoint]) -> str:
    """Content key of the collect stage: the points (kind, layer, settings) and their train keys."""
    settings = {"points": [p.labels() for p in points]}
    return layout.stage_key(STAGE, settings, {f"point_{p.index}": p.key for p in points})


def task_name(point: SweepPoint) -> str:
    """Task run name of a point in the Prefect UI, e.g. sweep-sae_mlp_out-l1_coefficient=0.001-layer-1."""
    values = "".join(f"-{k}={v}" for k, v in point.settings.items())
    return f"sweep-{point.kind}{values}-layer-{point.layer}"


# ---------------------------------------------------------------- the collect stage


def point_rows(root: str | Path, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per point from its train stage directory: eval.json metrics and the spliced hook."""
    rows = []
    for r in records:
        folder = layout.stage_dir(root, TRAIN_STAGE, r["train_key"])
        if not layout.is_complete(folder):
            raise layout.StoreError(f"{folder}: sweep point {r['point']} ({r['kind']}) is not trained; rerun the sweep")
        ev, manifest = json.loads((folder / EVAL_JSON).read_text()), layout.read_manifest(folder)
        row = {"point": r["point"], "kind": r["kind"], "layer": r["layer"], **r["settings"]}
        row["settings"] = json.dumps(r["settings"])
        row.update({name: ev.get(field) for name, field in METRICS.items()})
        row.update(d_sae=manifest["d_sae"], splice_hook=manifest["hook_out"], train_key=r["train_key"])
        rows.append(row)
    return rows


def sweep_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows -> a table with typed fixed columns (metrics float64) and one column per swept setting."""
    fixed = {"point": pa.int32(), "kind": pa.string(), "layer": pa.int32(), "settings": pa.string(),
             **dict.fromkeys(METRICS, pa.float64()), "d_sae": pa.int64(), "splice_hook": pa.string(),
             "train_key": pa.string()}  # fmt: skip
    columns = {name: pa.array([r[name] for r in rows], fixed.get(name)) for name in rows[0]}
    return pa.table(columns)


def sweep_figure(rows: list[dict[str, Any]]) -> Any:
    """The paper's plot: L0 (log x) against CE loss with the dictionary spliced in, one curve per kind
    (points by increasing L0), one panel per layer; clean and ablated CE as horizontal lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers = sorted({r["layer"] for r in rows})
    fig = Figure(figsize=(6.4 * len(layers), 4.8))
    FigureCanvasAgg(fig)  # the Agg canvas, without touching pyplot's global backend
    for i, layer in enumerate(layers):
        ax = fig.add_subplot(1, len(layers), i + 1)
        mine = [r for r in rows if r["layer"] == layer and r["ce_spliced"] is not None and r["l0"] > 0]
        for kind in [k for k in KIND_LABELS if any(r["kind"] == k for r in mine)]:
            l0, ce = zip(*sorted((r["l0"], r["ce_spliced"]) for r in mine if r["kind"] == kind), strict=True)
            ax.plot(l0, ce, marker="o", label=KIND_LABELS[kind])
        _reference_lines(ax, mine)
        _log_x(ax)
        ax.set_xlabel("L0 (active features per token, held out)")
        ax.set_ylabel("CE loss spliced (nats/token)")
        ax.set_title(f"layer {layer}")
        ax.legend(fontsize="small")
    fig.suptitle("Sparsity vs fidelity: transcoders and SAEs")
    fig.tight_layout()
    return fig


def _log_x(ax: Any) -> None:
    """A log x axis labelled in plain numbers at 1, 2 and 5 times powers of ten (no crowded minor labels)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _reference_lines(ax: Any, rows: list[dict[str, Any]]) -> None:
    """Clean CE (dashed) and each distinct ablation's CE (dotted: the spliced hook zeroed)."""
    if not rows:
        return
    ax.axhline(rows[0]["ce_clean"], color="black", linestyle="--", linewidth=1, label="clean")
    for hook in sorted({r["splice_hook"] for r in rows}):
        ablated = next(r["ce_ablated"] for r in rows if r["splice_hook"] == hook)
        what = hook.split(".")[-1].removeprefix("hook_")
        ax.axhline(ablated, color="grey", linestyle=":", linewidth=1, label=f"ablated ({what} zeroed)")


def sweep_markdown(rows: list[dict[str, Any]], names: list[str], folder: Path) -> str:
    """The sweep's table (`names`: the swept settings) and where its plot and Parquet table are, as markdown."""
    head = ["kind", *names, "layer", "L0", "FVU", "CE spliced", "CE ablated", "CE recovered", "dead", "train key"]
    lines = ["## Sweep: sparsity vs fidelity", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["kind"], *(r[n] for n in names), r["layer"], r["l0"], r["fvu"], r["ce_spliced"], r["ce_ablated"],
                 r["ce_recovered"], r["dead_fraction"], f"`{r['train_key']}`"]  # fmt: skip
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    if rows[0]["ce_clean"] is not None:
        lines += ["", f"Clean CE: {rows[0]['ce_clean']:.4f} nats/token."]
    lines += ["", f"Plot (L0 vs CE spliced): `{folder / PLOT}`", f"Table: `{folder / SWEEP_TABLE}`"]
    lines.append('SQL: `circuitflow sql "select * from sweep"`')
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def build_sweep(root: str | Path, key: str, records: list[dict[str, Any]], tmp: Path) -> dict[str, Any]:
    """Write the sweep table, plot and report into `tmp`; return the manifest fields."""
    rows = point_rows(root, records)
    write_table(sweep_table(rows), tmp / SWEEP_TABLE)
    fig = sweep_figure(rows)
    with layout.atomic_file(tmp / PLOT) as file:
        fig.savefig(file, format="png", dpi=100)
    report = sweep_markdown(rows, list(records[0]["settings"]), layout.stage_dir(root, STAGE, key))
    (tmp / REPORT).write_text(report)
    return {"points": len(rows), "files": [SWEEP_TABLE, PLOT, REPORT], "rows": rows}


@task(name="collect_sweep", task_run_name="collect-sweep", cache_policy=NO_CACHE)
def collect_sweep(cfg: Config, key: str, points: list[dict[str, Any]], force: bool = False) -> dict[str, Any]:
    """Prefect task: the sweep table and plot (reused from the store when complete), marked as the
    store's latest sweep (the `sweep` SQL view) and published as an artifact. Cheap, so never cached
    by Prefect: every sweep run updates the latest-sweep mark and the artifact."""
    root = cfg.store.root
    summary = build_stage(root, STAGE, key, lambda tmp: build_sweep(root, key, points, tmp), force)
    layout.write_json_atomic(Path(root) / SWEEP_LATEST, {"key": key, "path": summary["path"]})
    if TaskRunContext.get() is not None:
        from prefect.artifacts import create_markdown_artifact

        report = (Path(summary["path"]) / REPORT).read_text()
        create_markdown_artifact(key=ARTIFACT, markdown=report, description="L0 vs CE spliced per kind")
    return summary
