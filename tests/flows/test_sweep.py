"""The sweep flow under Prefect on a tiny model: every point is one train task run (named for the point)
on the task runner, adding one value trains exactly that point, the CLI prints one line per point and
the SQL view follows the latest sweep."""

from __future__ import annotations

import pytest

import tasks.train as train_stage
from flows.cli import main as cli_main
from flows.sweep import sweep_flow
from storage import catalog
from tests.tasks.test_sweep_stage import KINDS, L1, stub_curves, sweep_config

pytestmark = pytest.mark.prefect


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep-flow")
    return sweep_config(tmp), tmp / "store"


@pytest.fixture(autouse=True)
def quick_curves(monkeypatch):
    monkeypatch.setattr(train_stage, "plot_curves", stub_curves)


def statuses(result: dict) -> dict[tuple[str, float], str]:
    return {(p["kind"], p["settings"]["l1_coefficient"]): p["status"] for p in result["points"]}


def task_run_names(flow_run_id) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return sorted(r.name for r in runs)


def count(store) -> int:
    return catalog.query(store, "select count(*) from sweep")[1][0][0]


def test_each_point_is_one_task_and_adding_a_value_trains_only_it(prefect_harness, config) -> None:
    path, store = config
    state = sweep_flow(config=path, return_state=True)
    first = state.result()
    assert statuses(first) == {(k, v): "ran" for k in KINDS for v in L1}
    assert [s["status"] for s in first["upstream"]] == ["ran", "ran"] and first["sweep"]["status"] == "ran"
    names = task_run_names(state.state_details.flow_run_id)
    points = [f"sweep-{k}-l1_coefficient={v}-layer-1" for k in KINDS for v in L1]  # one train task per point
    assert sorted(n for n in names if not n.startswith(("tokens-", "activations-"))) == sorted(
        [*points, "collect-sweep"]
    )
    assert len(names) == 6 + 3  # + tokens, activations, collect
    assert count(store) == 6

    # One more l1 value for one kind: exactly that point trains; the tokens, activations and the
    # three points it shares with the first sweep are cache hits.
    more = ["sweep.kinds=[transcoder]", "sweep.grid.l1_coefficient=[1e-4, 1e-3, 1e-2, 3e-2]"]
    second = sweep_flow(config=path, overrides=more)
    assert statuses(second) == {**{("transcoder", v): "cached" for v in L1}, ("transcoder", 3e-2): "ran"}
    assert [s["status"] for s in second["upstream"]] == ["cached", "cached"]
    assert second["sweep"]["status"] == "ran" and count(store) == 4  # the view follows the latest sweep


def test_cli_prints_every_point_and_the_outputs(prefect_harness, config, capsys) -> None:
    path, store = config
    sweep_flow(config=path)  # complete (a cache hit after the test above)
    assert cli_main(["sweep", path]) == 0
    out = capsys.readouterr().out
    lines = [line.split() for line in out.splitlines() if line.split()[:1] in (["transcoder"], ["sae_mlp_out"])]
    assert [(x[0], x[1], x[3]) for x in lines] == [(k, f"l1_coefficient={v}", "cached") for k in KINDS for v in L1]
    assert "sweep.png" in out and "sweep.parquet (cached)" in out and "CE clean" in out
    assert count(store) == 6  # the original sweep is the latest again
