"""Read-only web pages over a store (`circuitflow serve`): the runs, each mine stage's dashboard index
and every feature's page (rendered on demand, so features without a pre-rendered page have one too),
each trace stage's graph with its feature nodes linking to their pages, and the store's files.

Routes: `/` (runs), `/mine/KEY/`, `/mine/KEY/features/L/F`, `/trace/KEY/`, `/dashboards/` and
`/features/L/F` (the latest run's mining), `/files/PATH`. Nothing outside the store is reachable,
nothing is written, and only GET and HEAD are answered.
"""

from __future__ import annotations

import html
import json
import math
import mimetypes
import re
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import unquote, urlsplit

from core.circuit import Circuit, GraphEdge, GraphNode
from core.errors import UserError
from storage import catalog, dashboard, dashboard_index, graphs, layout, runs
from storage.links import DEFAULT_PORT, SERVE_URL_ENV, serve_hint, served_link  # noqa: F401 - re-exported

MAX_RUNS = 200
"""The runs page lists at most this many run records, newest first."""
_KEY = re.compile(r"[0-9a-f]{6,64}")
_STYLE = "body{font-family:sans-serif;margin:20px}td,th{border:1px solid #ddd;padding:2px 6px}table{border-collapse:collapse}"


class ServeError(UserError):
    """The store or the address given to `circuitflow serve` cannot be used."""


class Response(NamedTuple):
    status: int
    content_type: str
    body: bytes
    location: str = ""


def _page(title: str, body: str, status: int = 200) -> Response:
    text = (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f'<style>{_STYLE}</style></head><body><p><a href="/">runs</a> · <a href="/dashboards/">latest dashboards</a>'
        f"</p>{body}</body></html>\n"
    )
    return Response(status, "text/html; charset=utf-8", text.encode())


def _error(status: int, message: str) -> Response:
    return _page(f"{status}", f"<h1>{status} {HTTPStatus(status).phrase}</h1><p>{html.escape(message)}</p>", status)


def _html(text: str) -> Response:
    return Response(200, "text/html; charset=utf-8", text.encode())


def _redirect(location: str) -> Response:
    return Response(302, "text/plain; charset=utf-8", b"", location)


class StoreSite:
    """The pages of one store; `respond(path)` never writes and never leaves the store."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise ServeError(f"store {root} does not exist; pass --store DIR (a folder `circuitflow run` wrote)")

    def respond(self, target: str) -> Response:
        parts = [unquote(p) for p in urlsplit(target).path.split("/") if p]
        try:
            return self._route(parts)
        except (UserError, KeyError, ValueError, OSError) as err:
            return _error(404, str(err).splitlines()[0] if str(err) else type(err).__name__)

    def _route(self, parts: list[str]) -> Response:
        head, rest = (parts[0], parts[1:]) if parts else ("", [])
        routes: dict[str, Callable[[list[str]], Response]] = {
            "": lambda r: self.runs_page(),
            "runs": lambda r: self.runs_page(),
            "mine": self._mine,
            "trace": self._trace,
            "files": self.file,
            "dashboards": lambda r: self._latest("mine", "/mine/{}/"),
            "features": lambda r: self._latest("mine", "/mine/{}/features/" + "/".join(_ints(r, 2))),
        }
        if head not in routes:
            return _error(404, f"no page {'/'.join(parts)}; start at /")
        return routes[head](rest)

    # ------------------------------------------------------------ run records

    def runs(self) -> list[dict[str, Any]]:
        """The newest run records (at most MAX_RUNS), newest first, each with its file name."""
        files = runs.record_files(self.root)[::-1][:MAX_RUNS]
        return [{**json.loads(f.read_text()), "file": f.name} for f in files]

    def _complete(self, stage: str, key: str | None) -> Path | None:
        if not key or not _KEY.fullmatch(str(key)):
            return None
        folder = layout.stage_dir(self.root, stage, str(key))
        return folder if layout.is_complete(folder) else None

    def _latest(self, stage: str, route: str) -> Response:
        for run in self.runs():
            key = run.get("plan", {}).get(stage)
            if self._complete(stage, key):
                return _redirect(route.format(key))
        return _error(404, f"no run in {self.root} has a complete {stage} stage; run `circuitflow run CONFIG` first")

    def runs_page(self) -> Response:
        rows = "".join(self._run_row(r) for r in self.runs())
        body = (
            f"<h1>Runs</h1><p>store <code>{html.escape(str(self.root))}</code>, newest first</p>"
            "<table><tr><th>created</th><th>by</th><th>seconds</th><th>stages</th><th>results</th></tr>"
            f"{rows}</table>"
        )
        return _page("circuitflow runs", body if rows else "<h1>Runs</h1><p>no runs recorded in this store yet</p>")

    def _run_row(self, run: dict[str, Any]) -> str:
        stages = ", ".join(f"{s.get('stage')}: {s.get('status')}" for s in run.get("stages", []))
        plan = run.get("plan", {})
        links = [f'<a href="/files/runs/{html.escape(run["file"])}">record</a>']
        if self._complete("mine", plan.get("mine")):
            links.append(f'<a href="/mine/{plan["mine"]}/">dashboards</a>')
        if self._complete("trace", plan.get("trace")):
            links.append(f'<a href="/trace/{plan["trace"]}/">trace graph</a>')
        return (
            f"<tr><td>{html.escape(str(run.get('created')))}</td><td>{html.escape(str(run.get('orchestrator')))}</td>"
            f"<td>{run.get('seconds')}</td><td>{html.escape(stages)}</td><td>{' · '.join(links)}</td></tr>"
        )

    # ------------------------------------------------------------ mining

    def _mine(self, rest: list[str]) -> Response:
        if not rest:
            return _error(404, "give a mine stage key: /mine/KEY/")
        folder = self._complete("mine", rest[0])
        if folder is None:
            return _error(404, f"no complete mine stage {rest[0]!r} in this store")
        if len(rest) == 1:
            return self.index_page(folder)
        if rest[1] == "features" and len(rest) == 4:
            layer, feature = (int(x) for x in _ints(rest[2:], 2))
            return self.feature_page(folder, layer, feature)
        return _error(404, f"no page {'/'.join(rest)}; features are /mine/KEY/features/LAYER/FEATURE")

    def _connect(self, mine_dir: Path) -> Any:
        tokens_key = layout.read_manifest(mine_dir).get("tokens_mine") or next(
            (r["plan"].get("tokens_mine") for r in self.runs() if r.get("plan", {}).get("mine") == mine_dir.name), None
        )
        tokens_dir = self._complete("tokens", tokens_key)
        if tokens_dir is None:
            raise ServeError(f"the mining tokens of mine stage {mine_dir.name} are not in this store")
        return catalog.connect(self.root, {**catalog.tokens_views(tokens_dir), **catalog.mine_views(mine_dir)})

    def index_page(self, mine_dir: Path) -> Response:
        con = self._connect(mine_dir)
        try:
            rows, summaries = dashboard_index.load_index(con), dashboard_index.layer_summaries(con)
        finally:
            con.close()
        link = _feature_link(mine_dir.name)
        return _html(dashboard_index.render_index(rows, summaries, link, f"mine stage {mine_dir.name}"))

    def feature_page(self, mine_dir: Path, layer: int, feature: int) -> Response:
        con = self._connect(mine_dir)
        try:
            page = dashboard.load_feature(con, layer, feature)
        finally:
            con.close()
        subtitle = f"mine stage {mine_dir.name} · all features: /mine/{mine_dir.name}/"
        return _html(dashboard.render_feature(page, _feature_link(mine_dir.name), subtitle))

    # ------------------------------------------------------------ traces and files

    def _trace(self, rest: list[str]) -> Response:
        folder = self._complete("trace", rest[0] if rest else None)
        if folder is None or len(rest) != 1:
            return _error(404, "no such trace stage; the runs page (/) links every trace graph")
        mine = next(
            (r["plan"]["mine"] for r in self.runs() if r.get("plan", {}).get("trace") == folder.name
             and self._complete("mine", r["plan"].get("mine"))),
            None,
        )  # fmt: skip
        records = load_records(folder / graphs.GRAPH_JSON)
        return _html(graphs.render_page(records, _feature_link(mine) if mine else None))

    def file(self, rest: list[str]) -> Response:
        """A file of the store, as stored; hidden and unfinished folders and anything outside are refused."""
        if not rest or not all(_visible(p) for p in rest):
            return _error(403, "only files inside the store are served")
        path = layout.within_store(self.root, "/".join(rest))
        if not all(_visible(p) for p in path.relative_to(self.root).parts):  # an encoded "/" in a part
            return _error(403, "only files inside the store are served")
        if not path.is_file():
            return _error(404, f"no file {'/'.join(rest)} in the store")
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return Response(200, kind, path.read_bytes())


def _visible(part: str) -> bool:
    """A path part the file route may serve: no hidden name, no unfinished stage, no empty or relative part."""
    return part not in ("", ".", "..") and not part.startswith(".") and ".partial" not in part


def _ints(parts: list[str], n: int) -> list[str]:
    if len(parts) != n or not all(p.isdigit() for p in parts):
        raise ValueError(f"expected {n} numbers in the address, got {'/'.join(parts) or 'none'}")
    return parts


def _feature_link(mine_key: str) -> dashboard.Link:
    return lambda layer, feature: f"/mine/{mine_key}/features/{layer}/{feature}"


def load_records(path: Path) -> list[graphs.GraphRecord]:
    """The graphs of a trace stage's graph.json as GraphRecords (null numbers back to NaN)."""
    records = []
    for g in json.loads(path.read_text())["graphs"]:
        nodes = [
            GraphNode(**{k: math.nan if v is None else v for k, v in n.items() if k in GraphNode._fields})
            for n in g["nodes"]
        ]
        edges = [GraphEdge(e["source"], e["target"], e["weight"]) for e in g["edges"]]
        circuit = Circuit(nodes, edges, g["root_id"], g.get("meta") or {})
        records.append(graphs.GraphRecord(g["root"], g["graph"], circuit, g["tokens"], g["prompt"], g.get("paths", [])))
    return records


# ---------------------------------------------------------------- the HTTP server


def make_server(site: StoreSite, host: str, port: int) -> ThreadingHTTPServer:
    """Bind the server (ServeError when the address is taken or cannot be bound); serve_forever() runs it."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server protocol
            self._send(site.respond(self.path), body=True)

        def do_HEAD(self) -> None:  # noqa: N802
            self._send(site.respond(self.path), body=False)

        def _send(self, response: Response, body: bool) -> None:
            self.send_response(response.status)
            self.send_header("Content-Type", response.content_type)
            self.send_header("Content-Length", str(len(response.body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            if response.location:
                self.send_header("Location", response.location)
            self.end_headers()
            if body:
                self.wfile.write(response.body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet: one line per error only
            if args and str(args[1] if len(args) > 1 else "").startswith(("4", "5")):
                super().log_message(format, *args)

    try:
        return ThreadingHTTPServer((host, port), Handler)
    except OSError as err:
        if err.errno in (98, 48):  # EADDRINUSE on Linux / macOS
            raise ServeError(f"port {port} on {host} is in use; choose another with --port") from None
        raise ServeError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
