"""The sweep stage without Prefect, on a tiny model: points and their keys come from the config (a point
equal to the pipeline's train section has the pipeline's key), bad sweeps are one-line errors before
any work, and the collected table, plot and SQL view hold exactly the trained points' evaluations."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

import tasks.sweep as sweep_stage
import tasks.train as train_stage
from core.config import ConfigError, load_config
from flows.cli import main as cli_main
from flows.train_layers import train_points
from storage import catalog, layout
from tasks.plan import make_plan
from tests.tasks.test_train_stage import prepare, write_config

L1 = [1e-4, 1e-3, 1e-2]
KINDS = ["transcoder", "sae_mlp_out"]


def sweep_config(tmp_path: Path, **sweep) -> str:
    """The train-stage test config (tiny:ln, layers 0 and 1) with a sweep section at layer 1."""
    path = Path(write_config(tmp_path, epochs=1, activation="relu"))
    data = yaml.safe_load(path.read_text())
    data["sweep"] = {"grid": {"l1_coefficient": L1}, "kinds": KINDS, "layers": [1], **sweep}
    path.write_text(yaml.safe_dump(data))
    return str(path)


def run_task(task, cfg, stage, key, forced, **params):
    """flows.pipeline.run_task without Prefect: the task's function, status ran or cached."""
    return task.fn(cfg=cfg, key=key, force=forced, **params)


def stub_curves(history, path: Path, title: str) -> None:
    """Stands in for tasks.train.plot_curves (~3 s of matplotlib layout per point on a loaded 2-core
    machine); the training curves are the train stage's concern and are tested there."""
    path.write_bytes(b"\x89PNG\r\n\x1a\n")


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    cfg, plan = prepare(sweep_config(tmp))
    points = sweep_stage.sweep_points(cfg)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_stage, "plot_curves", stub_curves)
        trained = train_points(points, plan, False, run_task)
    key = sweep_stage.sweep_key(points)
    collected = sweep_stage.collect_sweep.fn(cfg, key, [p.record() for p in points])
    return cfg, plan, points, trained, collected


def test_points_are_kinds_times_values_with_the_pipelines_keys(tmp_path) -> None:
    cfg = load_config(sweep_config(tmp_path))
    points = sweep_stage.sweep_points(cfg)
    assert [(p.kind, p.settings["l1_coefficient"], p.layer) for p in points] == [(k, v, 1) for k in KINDS for v in L1]
    assert len({p.key for p in points}) == 6 and [p.index for p in points] == list(range(6))
    for p in points:
        assert p.cfg.train.kind == p.kind and p.cfg.train.l1_coefficient == p.settings["l1_coefficient"]
        assert p.key == make_plan(p.cfg).train[1]
    # The point that equals the base train section is the pipeline's own layer-1 transcoder.
    base = load_config(sweep_config(tmp_path), ["train.l1_coefficient=1e-3"])
    assert make_plan(base).train[1] in {p.key for p in points}
    # Adding a value adds points; the others keep their keys.
    more = load_config(sweep_config(tmp_path), ["sweep.grid.l1_coefficient=[1e-4, 1e-3, 1e-2, 3e-2]"])
    keys = [p.key for p in sweep_stage.sweep_points(more)]
    assert len(keys) == 8 and set(keys) >= {p.key for p in points}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "sweep.grid.l1_coeficient=[1]",
            "sweep.grid.l1_coeficient: unknown train setting; did you mean 'l1_coefficient'?",
        ),
        ("sweep.grid.activation=[relu, gelu]", "sweep.grid.activation[1]: 'gelu' is not allowed"),
        ("sweep.grid.l1_coefficient=[-1]", "train.l1_coefficient: must be >= 0, got -1.0"),
        ("sweep.grid.expansion_factor=[0]", "train.expansion_factor: must be > 0"),
        ("sweep.layers=[3]", "sweep.layers: layer 3 has no cached activations"),
        ("sweep.kinds=[sae]", "sweep.kinds[0]: 'sae' is not allowed"),
        ("sweep={}", "sweep: nothing to sweep"),
    ],
)
def test_bad_sweeps_are_one_line_before_any_work(tmp_path, capsys, override: str, message: str) -> None:
    config = sweep_config(tmp_path)
    with pytest.raises(ConfigError, match=None) as err:
        sweep_stage.sweep_points(load_config(config, [override]))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert cli_main(["sweep", config, "--set", override]) == 2
    stderr = capsys.readouterr().err
    assert message in stderr and stderr.count("\n") == 1
    assert not (tmp_path / "store").exists()  # nothing ran


def test_table_has_one_row_per_point(swept) -> None:
    cfg, plan, points, trained, collected = swept
    assert [s["status"] for s in trained] == ["ran"] * 6
    table = pq.read_table(Path(collected["path"]) / "sweep.parquet").to_pylist()
    assert [(r["kind"], r["l1_coefficient"], r["layer"]) for r in table] == [
        (p.kind, p.settings["l1_coefficient"], 1) for p in points
    ]
    for row, point in zip(table, points, strict=True):
        ev = json.loads((layout.stage_dir(cfg.store.root, "train", point.key) / "eval.json").read_text())
        assert row["train_key"] == point.key and json.loads(row["settings"]) == point.settings
        assert (row["l0"], row["fvu"], row["dead_fraction"]) == (ev["l0"], ev["fvu"], ev["dead_fraction"])
        assert (row["ce_clean"], row["ce_spliced"], row["ce_ablated"], row["ce_recovered"]) == (
            ev["ce_clean"], ev["ce_spliced"], ev["ce_zero"], ev["ce_recovered"])  # fmt: skip
        assert row["splice_hook"] == "blocks.1.hook_mlp_out"  # transcoders and MLP-out SAEs replace the same output
    assert len({r["ce_clean"] for r in table}) == 1 and len({r["ce_ablated"] for r in table}) == 1
    # Stronger L1 gives sparser dictionaries, for both kinds (L0 at l1 1e-2 is far below L0 at 1e-4 here).
    for kind in KINDS:
        l0 = [r["l0"] for r in table if r["kind"] == kind]
        assert l0[0] > l0[-1], (kind, l0)


def test_plot_has_one_curve_per_kind_and_the_reference_lines(swept) -> None:
    cfg, plan, points, trained, collected = swept
    folder = Path(collected["path"])
    assert (folder / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = collected["manifest"]["rows"]
    (ax,) = sweep_stage.sweep_figure(rows).axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"transcoder", "SAE (MLP out)", "clean", "ablated (mlp_out zeroed)"}
    assert ax.get_xscale() == "log"
    for kind, label in (("transcoder", "transcoder"), ("sae_mlp_out", "SAE (MLP out)")):
        expected = sorted((r["l0"], r["ce_spliced"]) for r in rows if r["kind"] == kind)
        assert list(zip(lines[label].get_xdata(), lines[label].get_ydata(), strict=True)) == expected
    assert list(lines["clean"].get_ydata()) == [rows[0]["ce_clean"]] * 2
    assert list(lines["ablated (mlp_out zeroed)"].get_ydata()) == [rows[0]["ce_ablated"]] * 2


def test_sql_view_reads_the_latest_sweep(swept) -> None:
    cfg, plan, points, trained, collected = swept
    names, rows = catalog.query(cfg.store.root, "select kind, count(*), min(l0) from sweep group by kind order by kind")
    assert names[0] == "kind" and [(r[0], r[1]) for r in rows] == [("sae_mlp_out", 3), ("transcoder", 3)]
    assert "sweep" in catalog.view_sources(cfg.store.root)  # no pipeline run recorded: the sweep view alone


def test_collect_again_is_cached_and_keeps_the_table(swept) -> None:
    cfg, plan, points, trained, collected = swept
    again = sweep_stage.collect_sweep.fn(cfg, collected["key"], [p.record() for p in points])
    assert again["status"] == "cached" and again["path"] == collected["path"]
    assert train_points(points, plan, False, run_task)[0]["status"] == "cached"
