"""Feature dashboards: the page shows exactly the mined examples (windows and per-token activations
checked against the raw tokens and non-zeros), is self-contained, and renders visibly in Chromium."""

from __future__ import annotations

import html
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from flows.cli import main as cli
from storage import catalog, dashboard, dashboard_index
from tests.storage.test_catalog import VOCAB, make_store


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("dash-store")
    return root, make_store(root, seed=3)


def _strongest_feature(data: dict, layer: int) -> int:
    nz = data["nonzeros"][layer]
    return int(np.bincount(nz.feature).argmax())


def test_loaded_examples_match_the_tokens_and_non_zeros(store):
    root, data = store
    layer = 0
    feature = _strongest_feature(data, layer)
    page = dashboard.load_feature(catalog.connect(root), layer, feature, before=5, after=2)
    nz = data["nonzeros"][layer]
    sel = nz.feature == feature
    acts = {(int(r), int(p)): float(a) for r, p, a in zip(nz.row[sel], nz.pos[sel], nz.act[sel], strict=True)}
    top = sorted(acts, key=lambda rp: (-acts[rp], rp))[:5]
    assert [(e.row, e.pos) for e in page.top()] == top
    assert sorted(page.bands()) == [0, 1, 2]
    rows = data["rows"]
    for e in page.examples:
        lo = max(0, e.pos - 5)
        window = range(lo, min(rows.shape[1], e.pos + 3))
        assert e.texts == [VOCAB[t] for t in rows[e.row, lo : e.pos + 3]]
        assert e.acts == [acts.get((e.row, i), 0.0) for i in window]
        assert e.texts[e.center] == VOCAB[rows[e.row, e.pos]] and e.acts[e.center] == e.act
    assert page.n_tokens == rows.size and page.stats["n_fired"] == int(sel.sum())
    assert [r["token"] for r in page.views["deembed"]] == [2 * feature % len(VOCAB), (2 * feature + 1) % len(VOCAB)]


def test_page_is_self_contained_and_shows_every_example(store):
    root, data = store
    layer = 3
    feature = _strongest_feature(data, layer)
    page = dashboard.load_feature(catalog.connect(root), layer, feature)
    text = dashboard.render_feature(page)
    for forbidden in ("<script", "http://", "https://", " src=", "<link"):
        assert forbidden not in text
    for e in page.examples:
        assert f"{e.act:.3f}" in text
    assert html.escape(dashboard._visible(VOCAB[7])) in text or all(7 not in row for row in data["rows"])
    assert "Layer 3 · Feature" in text and "<svg" in text and "De-embedding" in text


def test_dead_feature_page_and_unknown_feature(store):
    root, _ = store
    con = catalog.connect(root)
    dead = dashboard.load_feature(con, 0, 39)  # make_store never fires the last feature
    assert dead.stats["n_fired"] == 0 and dead.examples == []
    assert "never fired" in dashboard.render_feature(dead)
    with pytest.raises(dashboard.FeatureNotFound, match="layer 0: features 0..39") as err:
        dashboard.load_feature(con, 0, 400)
    assert "\n" not in str(err.value)


def test_index_lists_live_features_most_frequent_first(store):
    root, data = store
    con = catalog.connect(root)
    index = dashboard_index.load_index(con)
    for layer, nz in data["nonzeros"].items():
        mine = [r for r in index if r["layer"] == layer]
        counts = np.bincount(nz.feature, minlength=40)
        expected = sorted((f for f in range(len(counts)) if counts[f]), key=lambda f: (-counts[f], f))
        assert [r["feature"] for r in mine] == expected
        first = mine[0]
        top_rows = [(e.row, e.pos) for e in dashboard.load_feature(con, layer, first["feature"]).top()[:3]]
        assert first["top_tokens"] == [VOCAB[data["rows"][r, p]] for r, p in top_rows]
    pages = {(0, index[0]["feature"])}
    text = dashboard_index.render_index(
        index, dashboard_index.layer_summaries(con), lambda a, b: "p.html" if (a, b) in pages else None
    )
    assert text.count('href="p.html"') == 1 and "never fired" in text


def test_feature_cli_prints_text_and_writes_html(store, tmp_path, capsys):
    root, data = store
    feature = _strongest_feature(data, 0)
    assert cli(["feature", "0", str(feature), "--store", str(root)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"layer 0 feature {feature}: fired on") and "«" in out
    target = tmp_path / "page.html"
    assert cli(["feature", "0", str(feature), "--store", str(root), "--html", str(target)]) == 0
    assert target.read_text().startswith("<!doctype html>")
    assert cli(["feature", "0", "999", "--store", str(root)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.browser
def test_page_renders_with_visible_examples_in_headless_chromium(store, tmp_path):
    """The strongest token of the top example is painted in the full highlight colour, and the
    rendered DOM holds every example's value."""
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium on this machine (.ci/run installs Debian's chromium)")
    from PIL import Image

    root, data = store
    feature = _strongest_feature(data, 0)
    page = dashboard.load_feature(catalog.connect(root), 0, feature)
    path = dashboard.write_html(dashboard.render_feature(page), tmp_path / "page.html")
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'profile'}"]  # fmt: skip
    shot = tmp_path / "shot.png"
    subprocess.run(
        [*flags, "--window-size=1200,900", f"--screenshot={shot}", path.as_uri()],
        check=True,
        timeout=120,
        capture_output=True,
    )
    dom = subprocess.run(
        [*flags, "--dump-dom", path.as_uri()], check=True, timeout=120, capture_output=True, text=True
    ).stdout
    assert f"{page.top()[0].act:.3f}" in dom and "Top activations" in dom
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)
    full = np.abs(pixels - np.array(dashboard.HIGHLIGHT)).max(axis=1) <= 2
    assert full.sum() >= 40, "the strongest token's highlight is not painted in the first screen"
    white = (pixels >= 250).all(axis=1).mean()
    assert 0.5 < white < 0.995  # a page with content, not a blank or error screen
