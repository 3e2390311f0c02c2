"""The experiments flow on a tiny store: Parquet `interventions` equal to what `circuitflow intervene`
reports, read back through the SQL view (DuckDB), and a table artifact in Prefect."""

from __future__ import annotations

import json

import pytest
import yaml

from flows.cli import main as cli
from storage import catalog
from tests.tasks.test_trace_stage import CONFIG, PROMPT, store  # noqa: F401 (the tiny store fixture)

RUNS = [
    {"name": "ablate", "prompt": PROMPT, "ablate": ["0:5@10"], "ablate_mlp": ["0@-2"], "root": "1:3"},
    {"name": "steer", "prompt": PROMPT, "steer": ["1:3=20"], "ablate_head": ["1.2"], "generate": 3},
    {"name": "frozen", "prompt": PROMPT, "clamp": ["0:7=2.5@-1"], "frozen": True, "target": "e"},
]

pytestmark = pytest.mark.prefect


def test_experiments_flow_writes_the_interventions_view(store, tmp_path, capsys, prefect_harness):  # noqa: F811
    from prefect.client.orchestration import get_client

    from flows.experiments import experiments_flow

    cfg, _, _ = store
    config = tmp_path / "experiments.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "store": {"root": cfg.store.root}, "experiments": {"runs": RUNS}}))
    first = experiments_flow(config=str(config))
    assert first["status"] == "ran" and first["manifest"]["experiments"] == 3
    assert experiments_flow(config=str(config))["status"] == "cached"

    names, rows = catalog.query(cfg.store.root, "select * from interventions order by name")
    table = {r[names.index("name")]: dict(zip(names, r, strict=True)) for r in rows}
    assert sorted(table) == ["ablate", "frozen", "steer"]
    for run in RUNS:  # the same experiment through the CLI
        args = [f"--{k.replace('_', '-')}" if k != "frozen" else "--frozen" for k in run if k not in ("name", "prompt")]
        argv = ["intervene", "--prompt", PROMPT, "--config", str(config), "--format", "json"]
        for key, flag in zip([k for k in run if k not in ("name", "prompt")], args, strict=True):
            values = run[key] if isinstance(run[key], list) else [run[key]]
            argv += [flag] if values == [True] else [x for v in values for x in (flag, str(v))]
        assert cli(argv) == 0
        report, row = json.loads(capsys.readouterr().out), table[run["name"]]
        for name in ("clean_logprob", "patched_logprob", "kl", "target"):
            assert row[name] == pytest.approx(report[name], rel=1e-9, abs=1e-12)
        assert row["interventions"] == report["interventions"]
        assert [c["feature"] for c in row["feature_changes"][:5]] == [
            c["feature"] for c in report["feature_changes"][:5]
        ]
    assert table["ablate"]["root_ratio"] == pytest.approx(
        table["ablate"]["root_change"] / table["ablate"]["root_linearised_change"]
    )
    assert table["steer"]["generated"] and table["frozen"]["target_text"] == "e"
    _, unnested = catalog.query(
        cfg.store.root, "select count(*) from (select unnest(feature_changes) from interventions)"
    )
    assert unnested[0][0] == sum(len(t["feature_changes"]) for t in table.values())

    with get_client(sync_client=True) as client:
        artifact = client.read_latest_artifacts()
        rows = [a for a in artifact if a.key == "interventions"]
        assert rows and "ablate" in str(rows[0].data)


def test_experiments_section_is_checked_when_the_config_loads(tmp_path):
    from core.config import ConfigError, load_config

    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"experiments": {"runs": [{"prompt": "x", "clamp": ["1:2"]}]}}))
    with pytest.raises(ConfigError, match=r"--clamp '1:2': malformed; expected L:F=VALUE"):
        load_config(config)
    config.write_text(yaml.safe_dump({"experiments": {"runs": [{"prompt": "x", "frozen": True, "generate": 2}]}}))
    with pytest.raises(ConfigError, match="drop frozen"):
        load_config(config)
    from tasks.interventions import experiments_key

    with pytest.raises(ConfigError, match="experiments.runs: nothing to run"):
        experiments_key(load_config(None), {"train": {}})
