"""Where a `circuitflow run` sends Prefect's logs: a file in the store, and the terminal only with `--verbose`.

The terminal keeps the stage table, the progress bars and, when the run fails, one error line that names
the log file; the file holds every record at INFO and above, tracebacks included.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

LOG_DIR = "logs"
"""Under the store: one log file per run that went through Prefect."""
FORMAT = "%(asctime)s | %(levelname)-7s | %(name)s - %(message)s"
"""Records of loggers without a Prefect formatter (core.*, libraries)."""


def log_path(root: str | Path) -> Path:
    """A fresh log file name for a run on the store `root` (the folder is created)."""
    folder = Path(root) / LOG_DIR
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"run-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.log"


def _console(handler: logging.Handler) -> bool:
    """A handler that writes to a terminal stream (Prefect's console handler, its internal debug handler)."""
    return isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)


def _loggers() -> list[logging.Logger]:
    known = logging.Logger.manager.loggerDict.values()
    return [logging.getLogger(), *(x for x in known if isinstance(x, logging.Logger))]


@contextlib.contextmanager
def run_log(path: Path, verbose: bool = False) -> Iterator[logging.Handler]:
    """Log Prefect's records (INFO and up) to `path` for the duration; the terminal handlers stay only
    when `verbose`."""
    from prefect.logging.configuration import ensure_logging_setup

    ensure_logging_setup()
    file = logging.FileHandler(path, encoding="utf-8")
    moved: list[tuple[logging.Logger, logging.Handler]] = []
    for logger in _loggers():
        consoles = [h for h in logger.handlers if _console(h)]
        if consoles:
            file.setFormatter(consoles[0].formatter or logging.Formatter(FORMAT))
            logger.addHandler(file)
        if not verbose:
            for handler in consoles:
                logger.removeHandler(handler)
                moved.append((logger, handler))
    prefect = logging.getLogger("prefect")
    level = prefect.level
    prefect.setLevel(min(level or logging.INFO, logging.INFO))
    try:
        yield file
    finally:
        prefect.setLevel(level)
        for logger in _loggers():
            if file in logger.handlers:
                logger.removeHandler(file)
        for logger, handler in moved:
            logger.addHandler(handler)
        file.close()
