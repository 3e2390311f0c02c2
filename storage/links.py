"""Where the results of a store are served: artifacts link to `circuitflow serve` when its address is
configured (CIRCUITFLOW_SERVE_URL), else they say which command serves them. Kept apart from
storage.web so the stages that publish links do not depend on the server's code."""

from __future__ import annotations

import os
from pathlib import Path

SERVE_URL_ENV = "CIRCUITFLOW_SERVE_URL"
"""Address of a running `circuitflow serve` (e.g. http://127.0.0.1:4300); artifacts link to it when set."""
DEFAULT_PORT = 4300
"""`circuitflow serve`'s default port."""


def served_link(route: str) -> str | None:
    """The URL of `route` on the configured server, or None when none is configured."""
    base = os.environ.get(SERVE_URL_ENV, "").strip().rstrip("/")
    return f"{base}{route}" if base else None


def serve_hint(root: str | Path, route: str) -> str:
    """Markdown for an artifact: a link to `route` when a server is configured, else how to start one."""
    url = served_link(route)
    if url:
        return f"[{url}]({url})"
    return (
        f"run `circuitflow serve --store {Path(root).resolve()}` and open `http://127.0.0.1:{DEFAULT_PORT}{route}` "
        f"(set {SERVE_URL_ENV} to that server's address for the runs to link to it)"
    )
