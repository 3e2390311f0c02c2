"""What `circuitflow run` shows on a terminal when a run fails: the progress bars and one error line that names
the store's log file, which holds Prefect's records and the traceback (`--verbose` prints them too)."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import pytest

from tests.faults.conftest import Reference, run_cli

PROGRESS = re.compile(r"\d+%\|")
"""A tqdm progress bar segment (bars redraw with carriage returns, which Python also splits lines on)."""


def terminal_lines(stderr: str) -> list[str]:
    """The lines of stderr that are not progress bars."""
    return [x for x in re.split(r"[\r\n]", stderr) if x.strip() and not PROGRESS.search(x)]


@pytest.mark.prefect
def test_a_diverged_run_prints_one_error_line_and_logs_the_rest(
    reference: Reference, prefect_api: dict[str, str], tmp_path: Path
) -> None:
    store = tmp_path / "store"
    shutil.copytree(reference.store, store)  # tokens and activations cached: the run fails in train at once
    args = ["run", str(reference.config_for(store)), "--set", "train.l1_coefficient=1e38", "--set", "train.lr=1e30"]
    out = run_cli(args, cwd=tmp_path, env=prefect_api)
    lines = terminal_lines(out.stderr)
    assert out.returncode == 2 and len(lines) == 1, out.stderr[-3000:]
    assert re.match(r"circuitflow: error: layer \d: training diverged .* \(log: .*\.log\)$", lines[0]), lines[0]
    log = Path(re.search(r"\(log: (.*\.log)\)$", lines[0])[1])
    assert log.parent == store / "logs"
    text = log.read_text()
    assert "Traceback" in text and "TrainingDivergedError" in text and "Task run failed" in text, text[-2000:]


def test_verbose_keeps_the_terminal_handlers_and_quiet_moves_them(tmp_path: Path) -> None:
    """In process: without --verbose the terminal handlers leave for the run and come back after; records reach
    the file either way."""
    from prefect.logging.configuration import ensure_logging_setup

    from flows.runlog import run_log

    ensure_logging_setup()
    root = logging.getLogger()
    consoles = [h for h in root.handlers if type(h).__name__ == "PrefectConsoleHandler"]
    assert consoles, "Prefect put no terminal handler on the root logger"
    for verbose in (False, True):
        path = tmp_path / f"{verbose}.log"
        with run_log(path, verbose):
            kept = [h for h in consoles if h in root.handlers]
            logging.getLogger("prefect").info("hello %s", verbose)
        assert kept == (consoles if verbose else [])
        assert f"hello {verbose}" in path.read_text()
        assert all(h in root.handlers for h in consoles)
