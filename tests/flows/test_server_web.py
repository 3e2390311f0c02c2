"""`circuitflow serve` over the store the session's server runs wrote (tests/flows/conftest.py): the
links in a flow run's artifacts open in headless Chromium, a graph node click lands on that feature's
page; every page is read-only and nothing outside the store is reachable; bad input exits 2."""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import shutil
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.browser import Browser, chromium
from tests.flows.prefect_server import CIRCUITFLOW, start, stop


@contextlib.contextmanager
def _client(api: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        yield client


@pytest.fixture(scope="module")
def links(deployed, tiny_config) -> dict[str, str]:
    """The served URLs named by the latest run's `mine-dashboards` and `trace-summary` artifacts (a run
    of the pipeline deployment first, when no test has run one)."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with _client(deployed.api) as client:

        def latest(key: str):
            found = client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), sort=ArtifactSort.CREATED_DESC
            )
            return found[0] if found else None

        if latest("trace-summary") is None:
            from tests.flows.test_server import _run_deployment

            assert _run_deployment(client, tiny_config).state.is_completed()
        mine, trace = latest("mine-dashboards"), latest("trace-summary")
    found = {}
    for name, artifact in (("mine", mine), ("trace", trace)):  # markdown links: [text](url)
        url = re.search(r"\]\((\w+://[^)\s]+)\)", artifact.data)
        assert url, artifact.data
        found[name] = url.group(1)
    assert all(u.startswith(deployed.serve_url) for u in found.values()), found  # http://, never file://
    return found


@pytest.fixture(scope="module")
def served(deployed):
    """`circuitflow serve` on the address the runs link to; yields (url, store)."""
    store = deployed.base / "store"
    port = deployed.serve_url.rsplit(":", 1)[1]
    proc = start(deployed.env, [*CIRCUITFLOW, "serve", "--store", str(store), "--port", port], cwd=deployed.base)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        with contextlib.suppress(OSError):
            urllib.request.urlopen(f"{deployed.serve_url}/", timeout=2).close()
            break
        time.sleep(0.3)
    try:
        yield deployed.serve_url, store
    finally:
        stop(proc, "circuitflow serve")


def _get(url: str, path: str, method: str = "GET") -> tuple[int, str, dict[str, str]]:
    """A raw request (the path is sent as given, not normalised)."""
    host, port = url.removeprefix("http://").split(":")
    con = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        con.request(method, path)
        response = con.getresponse()
        return response.status, response.read().decode(errors="replace"), dict(response.getheaders())
    finally:
        con.close()


def _drawn_features(trace_dir: Path) -> set[tuple[int, int]]:
    """(layer, feature) of the root and feature nodes the picture draws: those of the graphs.MAX_DRAWN_EDGES
    largest edges of each graph, read from the stage's tables."""
    from storage.graphs import MAX_DRAWN_EDGES

    nodes = pq.read_table(trace_dir / "nodes.parquet").to_pylist()
    edges = pq.read_table(trace_dir / "edges.parquet").to_pylist()
    drawn = set()
    for graph in {(n["root"], n["graph"]) for n in nodes}:
        mine = sorted((e for e in edges if (e["root"], e["graph"]) == graph), key=lambda e: -abs(e["weight"]))
        ids = {i for e in mine[:MAX_DRAWN_EDGES] for i in (e["source"], e["target"])}
        drawn |= {(graph, i) for i in ids}
    return {
        (n["layer"], n["feature"])
        for n in nodes
        if n["kind"] == "root" or (n["kind"] == "feature" and ((n["root"], n["graph"]), n["id"]) in drawn)
    }


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Size and mtime of every file in the store, less `.locks/`: the runs' lock files, which a run of the
    schedule test still winding down (cancelled, its process not yet reaped) may touch meanwhile."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.relative_to(root).parts[0] != ".locks"
    }


@pytest.mark.server
@pytest.mark.browser
def test_artifact_links_open_graph_and_feature_pages_in_chromium(links, served, tmp_path):
    browser = chromium()
    if browser is None:
        pytest.skip("no chromium on this machine (.ci/run installs Debian's chromium)")
    url, _ = served
    assert links["mine"].startswith(f"{url}/mine/") and links["trace"].startswith(f"{url}/trace/")
    shots = []
    with Browser(browser, tmp_path / "profile") as page:
        page.open(links["mine"])
        assert page.eval("document.querySelector('h1').textContent") == "Feature dashboards"
        shots.append(page.screenshot(tmp_path / "1-dashboards.png"))
        page.click("table a[href*='/features/']")
        assert page.eval("document.querySelector('h1').textContent").startswith("Layer ")
        assert "Top activations" in page.eval("document.body.innerText")
        shots.append(page.screenshot(tmp_path / "2-feature.png"))

        page.open(links["trace"])
        assert page.eval("document.querySelector('h1').textContent") == "Circuit trace"
        shots.append(page.screenshot(tmp_path / "3-graph.png"))
        node = "svg a[href*='/features/']:not(:has(rect))"  # a feature node (the root is the square)
        href = page.eval(f"document.querySelector({node!r}).getAttribute('href')")
        layer, feature = re.search(r"/features/(\d+)/(\d+)$", href).groups()
        page.click(node)
        assert page.eval("location.pathname") == href
        assert page.eval("document.querySelector('h1').textContent") == f"Layer {layer} · Feature {feature}"
        shots.append(page.screenshot(tmp_path / "4-clicked-feature.png"))
    assert all(s.stat().st_size > 10_000 for s in shots)  # rendered pages, not blank screens
    keep = os.environ.get("CIRCUITFLOW_SCREENSHOTS")  # e.g. to look at them after CI
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        for shot in shots:
            shutil.copy(shot, Path(keep) / shot.name)


@pytest.mark.server
def test_pages_are_rendered_on_demand_read_only_and_inside_the_store(links, served):
    url, store = served
    before = _snapshot(store)
    mine = links["mine"].removeprefix(url)
    trace_key = links["trace"].removeprefix(url).strip("/").split("/")[1]
    status, graph, _ = _get(url, f"/trace/{trace_key}/")
    assert status == 200
    expected = _drawn_features(store / "trace" / trace_key)
    linked = {tuple(map(int, m)) for m in re.findall(rf'href="{mine}features/(\d+)/(\d+)"', graph)}
    assert linked == expected and len(expected) > 3  # every drawn feature node and the root
    pages = {p.name for p in (store / "mine" / mine.strip("/").split("/")[1] / "dashboards").glob("*.html")}
    unrendered = [(lay, f) for lay, f in sorted(expected) if f"layer{lay}-feature{f}.html" not in pages]
    assert unrendered  # the mine stage wrote no page for these: the server renders them
    for layer, feature in unrendered[:3]:
        status, body, _ = _get(url, f"{mine}features/{layer}/{feature}")
        assert status == 200 and f"Layer {layer} · Feature {feature}" in body
    assert _get(url, "/dashboards/")[2]["Location"] == mine
    status, runs, _ = _get(url, "/")
    assert status == 200 and f'href="{mine}"' in runs and f'href="/trace/{trace_key}/"' in runs
    assert _get(url, "/files/runs/latest.json")[0] == 200
    for path in ("/files/../../../etc/passwd", "/files/%2e%2e/%2e%2e/%2e%2e/etc/passwd", "/files/..%2f..%2fetc%2fpasswd",
                 "/mine/..%2f..%2f..%2fetc/", "/trace/../../etc/passwd", "/files/.prefect-results/x",
                 "/files//etc/passwd", "/mine/0000000000000000/features/0/0"):  # fmt: skip
        status, body, _ = _get(url, path)
        assert status in (403, 404) and "root:" not in body, path
    assert _get(url, "/", method="POST")[0] == 501 and _get(url, "/", method="DELETE")[0] == 501
    assert _snapshot(store) == before  # nothing written, touched or removed


@pytest.mark.server
def test_bad_serve_input_is_one_line_exit_2(deployed, served, tmp_path):
    url, store = served
    port = url.rsplit(":", 1)[1]
    for args, message in (
        (["--store", str(store), "--port", port], f"port {port} on 127.0.0.1 is in use"),
        (["--store", str(tmp_path / "nowhere")], "does not exist"),
    ):
        proc = start(deployed.env, [*CIRCUITFLOW, "serve", *args], cwd=tmp_path)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 2 and out.count("\n") == 1 and message in out, out
    assert not (tmp_path / "nowhere").exists()
