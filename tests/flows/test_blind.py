"""The blind comparison end to end on tiny:ln: a transcoder and an SAE at the same layer are mined by the
mine stage (cached by key), the rater's folder names neither and shows each feature under its opaque id,
the order is fixed by the seed, and ratings with known answers unblind to exactly the right counts."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from core.blind import BlindError
from core.transcoder import TranscoderConfig, init_transcoder
from flows.blind_compare import blind_compare
from flows.cli import main as cli_main
from storage import blind as files
from storage import layout
from storage.checkpoints import save_transcoder
from tests.corpora import write_corpus

pytestmark = pytest.mark.prefect

N = 6
LAYER = 1
PROSE = (
    "The parser reads a configuration file line by line, strips comments, and returns a mapping of keys to "
    "values. Numbers become integers, lists are split on commas, and unknown keys raise an error. "
)
SECRETS = ("tcsecretdir", "saesecretdir")
"""Folder names of the two dictionaries: they must not appear anywhere in the rater's folder."""


def _dictionary(folder: Path, sae: bool, seed: int) -> str:
    hook_out = f"blocks.{LAYER}.hook_mlp_out"
    hook_in = hook_out if sae else f"blocks.{LAYER}.ln2.hook_normalized"
    cfg = TranscoderConfig(32, 64, 32, hook_in=hook_in, hook_out=hook_out, layer=LAYER, model_name="tiny:ln")
    tc = init_transcoder(cfg, seed=seed)
    with torch.no_grad():
        tc.b_enc.fill_(-0.2)  # features fire on some tokens, not all
    save_transcoder(tc, folder)
    return str(folder)


@pytest.fixture(scope="module")
def study(tmp_path_factory, prefect_harness):
    """A tiny config and store, two dictionaries, and blind sets for seeds 1 (CLI, twice) and 2 (flow)."""
    base = tmp_path_factory.mktemp("blind")
    corpus = write_corpus(base / "corpus", 30, PROSE)
    config = {
        "model": {"name": "tiny:ln", "device": "cpu"},
        "corpus": {"source": str(corpus), "min_chars": 100},
        "tokens": {"context_size": 32, "train_rows": 8, "mine_rows": 12, "holdout_fraction": 0.3},
        "activations": {"layers": [0, 1]},
        "mine": {"top_k": 5, "num_bands": 3, "per_band": 2, "dashboard_pages": 0},
        "store": {"root": str(base / "store")},
        "runner": {"max_workers": 1, "torch_threads": 1},
    }
    path = base / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    dicts = [_dictionary(base / SECRETS[0], sae=False, seed=1), _dictionary(base / SECRETS[1], sae=True, seed=2)]
    args = ["blind", "make", *dicts, "--config", str(path), "--n", str(N), "--seed", "1"]
    assert cli_main([*args, "--out", str(base / "handover")]) == 0
    first = _published(base / "store")
    assert cli_main(args) == 0  # the same set again: a cache hit
    assert _published(base / "store") == first
    other = blind_compare(dictionaries=dicts, config=str(path), n=N, seed=2)
    return {"base": base, "store": base / "store", "config": path, "dicts": dicts, "other": other}


def _published(store: Path) -> dict[str, int]:
    """Blind set directory -> when its manifest was written (ns)."""
    return {d.name: (d / layout.MANIFEST).stat().st_mtime_ns for d in (store / "blind").iterdir()}


def _set_dir(study, seed: int) -> Path:
    for d in sorted((study["store"] / "blind").iterdir()):
        if layout.is_complete(d) and files.read_key(d)["seed"] == seed:
            return d
    raise AssertionError(f"no blind set for seed {seed}")


def _key(study, seed: int) -> dict:
    return files.read_key(_set_dir(study, seed))


def _sections(page: str) -> list[str]:
    return re.findall(r'<section class="feature" id="(F\d+)">', page)


def test_rater_folder_hides_the_source(study):
    for seed in (1, 2):
        folder = _set_dir(study, seed) / files.RATER_DIR
        assert sorted(p.name for p in folder.iterdir()) == ["index.html", "ratings.csv"]
        key = _key(study, seed)
        forbidden = [*SECRETS, *study["dicts"], str(study["store"]), "layer", "blocks.", "hook", "sae", "transcoder"]
        forbidden += [d["name"] for d in key["dictionaries"]] + [d["mine"] for d in key["dictionaries"]]
        for file in folder.iterdir():
            text = file.read_text().lower()
            leaks = [w for w in forbidden if w.lower() in text]
            assert leaks == [], f"{file.name} names {leaks}"
    handed = study["base"] / "handover"
    assert sorted(p.name for p in handed.iterdir()) == ["index.html", "ratings.csv"]
    assert (handed / "index.html").read_bytes() == (_set_dir(study, 1) / "rater" / "index.html").read_bytes()


def test_each_id_shows_its_feature(study):
    """The page shows, under each id, the dashboard of the feature the key names (its max activation)."""
    key = _key(study, 2)
    page = (_set_dir(study, 2) / "rater" / "index.html").read_text()
    assert _sections(page) == [f["id"] for f in key["features"]] == [f"F{i:02d}" for i in range(1, 2 * N + 1)]
    assert sorted(f["dictionary"] for f in key["features"]) == [0] * N + [1] * N
    chunks = re.split(r'<section class="feature" id="F\d+">', page)[1:]
    for f, chunk in zip(key["features"], chunks, strict=True):
        mine_dir = layout.stage_dir(study["store"], "mine", key["dictionaries"][f["dictionary"]]["mine"])
        stats = pq.read_table(mine_dir / "feature_stats.parquet").to_pylist()
        row = next(r for r in stats if r["layer"] == LAYER and r["feature"] == f["feature"])
        assert row["n_fired"] > 0  # only live features are drawn
        assert f'<div class="card"><b>{row["max_act"]:.3f}</b><span>max activation</span>' in chunk


def test_order_is_fixed_by_the_seed(study):
    one, two = _key(study, 1), _key(study, 2)
    assert [f["id"] for f in one["features"]] == [f["id"] for f in two["features"]]
    order = [(f["dictionary"], f["feature"]) for f in one["features"]]
    assert order != [(f["dictionary"], f["feature"]) for f in two["features"]]
    assert [f["dictionary"] for f in one["features"]] != [0] * N + [1] * N  # interleaved, not in blocks
    assert len(_published(study["store"])) == 2  # seed 1 twice (one set, rewritten never) and seed 2


def test_mining_is_reused_across_sets(study):
    statuses = {(s["stage"], s["status"]) for s in study["other"]["stages"]}
    assert ("mine", "cached") in statuses and ("mine", "ran") not in statuses
    assert ("blind", "ran") in statuses


def _answers(key: dict) -> tuple[list[dict], list[tuple]]:
    """Ratings with known answers: a dictionary's k-th feature (in page order) gets answer k % 5."""
    answers = [
        ("interpretable", "context-free"),
        ("interpretable", "context-dependent"),
        ("maybe", ""),
        ("uninterpretable", ""),
        ("interpretable", "context-dependent"),
    ]
    seen = [0, 0]
    rows = []
    for f in key["features"]:
        level, ctx = answers[seen[f["dictionary"]] % 5]
        seen[f["dictionary"]] += 1
        rows.append({"id": f["id"], "interpretability": level, "context": ctx, "note": "n"})
    names = [d["name"] for d in key["dictionaries"]]
    # N = 6 per dictionary: answers 0..4 then 0 again -> 4 interpretable (2 free, 2 dependent), 1 maybe, 1 un
    expected = [(name, 6, 4, 1, 1, 2, 2) for name in names]
    return rows, expected


def _tally(study, ratings: Path, capsys, *extra: str) -> list[tuple]:
    out = ratings.with_suffix(".tally.json")
    assert cli_main(["blind", "tally", str(ratings), "--store", str(study["store"]), "--out", str(out), *extra]) == 0
    assert "12 of 12 features rated" in capsys.readouterr().out
    return [tuple(r.values()) for r in json.loads(out.read_text())]


def test_ratings_unblind_to_the_right_counts(study, tmp_path, capsys):
    key = _key(study, 2)
    rows, expected = _answers(key)
    as_json = tmp_path / "ratings.json"
    as_json.write_text(json.dumps({"set": key["set"], "ratings": rows}))
    assert _tally(study, as_json, capsys) == expected
    # the CSV template filled in gives the same table
    template = (_set_dir(study, 2) / "rater" / "ratings.csv").read_text().splitlines()
    assert template[0] == "set,id,interpretability,context,note" and len(template) == 2 * N + 1
    by_id = {r["id"]: r for r in rows}
    as_csv = tmp_path / "ratings.csv"
    with as_csv.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(template[0].split(","))
        for line in template[1:]:
            set_id, rid, *_ = line.split(",")
            writer.writerow([set_id, rid, by_id[rid]["interpretability"], by_id[rid]["context"], "a, quoted note"])
    assert _tally(study, as_csv, capsys) == expected


def _bad(tmp_path: Path, name: str, content: str) -> Path:
    path = tmp_path / name
    path.write_text(content)
    return path


def test_bad_rating_files_are_one_line_errors(study, tmp_path, capsys):
    key = _key(study, 2)
    rows, _ = _answers(key)
    good = {"set": key["set"], "ratings": rows}
    other_set = _key(study, 1)["set"]
    cases = {
        "unknown id": (_bad(tmp_path, "a.json", json.dumps({**good, "ratings": [*rows, {"id": "F99"}]})), [],
                       "unknown id 'F99'"),
        "invalid value": (_bad(tmp_path, "b.json", json.dumps({**good, "ratings": [{**rows[0], "interpretability": "yes"}, *rows[1:]]})),
                          [], "interpretability 'yes' is not one of"),
        "missing": (_bad(tmp_path, "c.json", json.dumps({**good, "ratings": rows[:-2]})), [], "2 of 12 features are not rated"),
        "malformed": (_bad(tmp_path, "d.json", '{"set": "x", "ratings": [}'), [], "malformed JSON at line 1"),
        "other set": (_bad(tmp_path, "e.json", json.dumps(good)), ["--key", str(_set_dir(study, 1))],
                      f"for set {key['set']}, but the key is for set {other_set}"),
        "no set": (_bad(tmp_path, "f.json", json.dumps(rows)), [], "name no set"),
        "no column": (_bad(tmp_path, "g.csv", "id,rating\nF01,maybe\n"), [], "missing column(s) interpretability"),
        "bad suffix": (_bad(tmp_path, "h.txt", "x"), [], "expected a .json or .csv"),
    }  # fmt: skip
    for label, (path, extra, message) in cases.items():
        code = cli_main(["blind", "tally", str(path), "--store", str(study["store"]), *extra])
        err = capsys.readouterr().err
        assert code == 2, label
        assert message in err and err.count("\n") == 1, f"{label}: {err!r}"


def test_bad_make_input_fails_before_any_work(study, tmp_path, capsys):
    base = ["blind", "make", "--config", str(study["config"])]
    for args, message in [
        ([str(tmp_path / "nope"), study["dicts"][0]], "no such dictionary"),
        ([study["dicts"][0], study["dicts"][0]], "are the same dictionary"),
        ([*study["dicts"], "--layer", "0"], "no dictionary for layer 0"),
        ([*study["dicts"], "--n", "0"], "--n: draw at least 1"),
        ([*study["dicts"], "--n", "500"], "fewer than n=500"),
    ]:
        assert cli_main([*base, *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_export_never_deletes_a_raters_file(study, tmp_path):
    dst = tmp_path / "given"
    files.export_folder(_set_dir(study, 1) / "rater", dst)
    (dst / "ratings.json").write_text("{}")
    with pytest.raises(BlindError, match="holds ratings.json; choose a new --out folder"):
        files.export_folder(_set_dir(study, 2) / "rater", dst)
    assert (dst / "ratings.json").read_text() == "{}"


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.browser
def test_page_download_round_trips_in_headless_chromium(study, tmp_path, capsys):
    """Clicking the page's radios and its download button yields a ratings.json that tallies exactly."""
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium on this machine")
    key = _key(study, 2)
    rows, expected = _answers(key)
    clicks = "".join(
        f'document.querySelector(\'input[name="{r["id"]}-{field}"][value="{r[field]}"]\').click();'
        for r in rows
        for field in ("interpretability", "context")
        if r[field]
    )
    probe = (
        "<script>const Real = Blob; let got = null;"
        "window.Blob = function (parts, opts) { got = parts.join(''); return new Real(parts, opts); };"
        "URL.createObjectURL = () => 'about:blank'; HTMLAnchorElement.prototype.click = function () {};"
        f"{clicks} download();"
        "const pre = document.createElement('pre'); pre.id = 'got'; pre.textContent = got;"
        "document.body.appendChild(pre);</script>"
    )
    page = (_set_dir(study, 2) / "rater" / "index.html").read_text().replace("</body>", probe + "</body>")
    path = tmp_path / "page.html"
    path.write_text(page)
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'p'}"]  # fmt: skip
    dom = subprocess.run(
        [*flags, "--dump-dom", path.as_uri()], check=True, timeout=120, capture_output=True, text=True
    ).stdout
    got = re.search(r'<pre id="got">(.*?)</pre>', dom, re.S)
    assert got, "the page produced no ratings.json"
    import html

    downloaded = tmp_path / "ratings.json"
    downloaded.write_text(html.unescape(got.group(1)))
    assert json.loads(downloaded.read_text())["set"] == key["set"]
    assert _tally(study, downloaded, capsys) == expected
