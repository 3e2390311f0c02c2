"""Bad input through the real CLI, each in a fresh interpreter: exactly one line on stderr (what is wrong, and
what to do where the case names it), exit code 2, no traceback, no model loaded, little CPU, and the store
byte-for-byte as it was (every path, size and mtime).

All cases run concurrently once per module (each in its own copy of the reference store); the tests then
check one outcome each. CPU seconds (wait4) stand in for wall time: the machine is shared, so wall time
measures the neighbours, while CPU time measures what the command did.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import shutil
import sys
import textwrap
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml

from tests.faults.conftest import Outcome, Reference, diff, run_cli, snapshot

CPU_LIMIT = 30.0
"""CPU seconds a rejected command may take, interpreter start and imports included (the heaviest imports,
prefect + transformer_lens + torch, cost ~7 s here and much more on a loaded machine, plus the
pre-flight model-config check; starting Prefect and running a stage costs more)."""
WORKERS = 3
"""Concurrent CLI processes."""
ERROR_PREFIX = r"circuitflow( [a-z]+)?: error: "
"""How every message starts: `circuitflow: error:` (flows.cli) or `circuitflow COMMAND: error:` (usage errors)."""


@dataclass
class World:
    """One case's folder: its own copy of the reference store and a config pointing at it."""

    base: Path
    store: Path
    config: Path
    reference: Reference
    shared: Path
    """Read-only inputs every case may name (bad transcoders, an empty corpus)."""

    def variant(self, name: str, **sections: dict | str) -> str:
        """The case's config with single keys of sections replaced (or a top-level key set)."""
        data = yaml.safe_load(self.config.read_text())
        for section, values in sections.items():
            data[section] = {**data.get(section, {}), **values} if isinstance(values, dict) else values
        path = self.base / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        return str(path)

    def fresh_store(self) -> str:
        """A store folder that a first run has started (a stage folder) but not finished (no run record)."""
        (self.base / "fresh" / "tokens").mkdir(parents=True)
        return str(self.base / "fresh")

    def text(self, name: str, content: str) -> str:
        path = self.base / name
        path.write_text(content)
        return str(path)


@dataclass(frozen=True)
class Case:
    id: str
    args: Callable[[World], list[str]]
    wrong: str
    """Regex the one line must match: it names what is wrong."""
    todo: str | None = None
    """Regex for the part that says what to do (None: the message of this case needs none beyond naming it)."""
    xfail: str | None = None
    marks: tuple = field(default=())


def _trace(w: World, *extra: str) -> list[str]:
    return ["trace", "--config", str(w.config), "--store", str(w.store), *extra]


def _sql(query: str | Callable[[World], str]) -> Callable[[World], list[str]]:
    return lambda w: ["sql", query(w) if callable(query) else query, "--store", str(w.store)]


CASES = [
    # ------------------------------------------------------------ the config file and the command line
    Case("malformed-yaml", lambda w: ["run", w.text("bad.yaml", "model: [unclosed\n")],
         r"bad\.yaml: malformed YAML at line 2"),
    Case("not-a-mapping", lambda w: ["run", w.text("list.yaml", "- model\n- corpus\n")],
         r"expected a mapping of sections"),
    Case("unknown-key", lambda w: ["run", w.variant("uk", train={"lrr": 1})],
         r"train\.lrr: unknown key", r"did you mean 'lr'"),
    Case("wrong-type", lambda w: ["run", w.variant("wt", tokens={"train_rows": "many"})],
         r"tokens\.train_rows: expected an integer, got 'many'"),
    Case("value-out-of-range", lambda w: ["run", str(w.config), "--set", "train.lr=-1"],
         r"train\.lr: must be > 0, got -1"),
    Case("missing-config", lambda w: ["run", str(w.base / "nope.yaml")], r"nope\.yaml: config file not found"),
    Case("bad-set", lambda w: ["run", str(w.config), "--set", "train.lr"],
         r"--set 'train\.lr': expected key=value", r"e\.g\. train\."),
    Case("unknown-stage", lambda w: ["run", str(w.config), "--stages", "tokens,bogus"],
         r"--stages 'bogus': unknown stage", r"stages are tokens, activations"),
    Case("unknown-force-stage", lambda w: ["run", str(w.config), "--force", "tokenz"],
         r"--force 'tokenz': unknown stage", r"stages are tokens, activations"),
    Case("argparse-bad-int", lambda w: _trace(w, "--prompt", "hi", "--layer", "one", "--feature", "1"),
         r"argument --layer: invalid int value: 'one'",
         r"see circuitflow trace --help"),
    # ------------------------------------------------------------ the model, corpus and transcoders
    Case("unknown-model", lambda w: ["run", w.variant("um", model={"name": "nonexistent-model-xyz"})],
         r"'nonexistent-model-xyz' is not a TransformerLens model name", r"expected `bundled:"),
    Case("layer-out-of-range", lambda w: ["run", str(w.config), "--set", "activations.layers=[0,5]"],
         r"activations\.layers: layer 5 is out of range", r"has layers 0\.\.1"),
    Case("hook-mismatch",
         lambda w: ["run", str(w.config), "--stages", "tokens,activations", "--set",
                    "activations.hook_in=blocks.{layer}.hook_nope"],
         r"no hook 'blocks\.0\.hook_nope'", r"check activations\.hook_in"),
    Case("transcoder-wrong-d-model", lambda w: ["run", w.variant("wide", transcoders=str(w.shared / "wide"))],
         r"d_in is 24 but the model's d_model is 32", r"trained on another model"),
    Case("transcoders-match-nothing", lambda w: ["run", w.variant("none", transcoders=str(w.shared / "nothing*"))],
         r"transcoders: '.*nothing\*' matches no file or folder"),
    Case("malicious-pickle-transcoder", lambda w: ["run", w.variant("evil", transcoders=str(w.shared / "evil.pt"))],
         r"evil\.pt: refused to unpickle"),
    Case("empty-corpus", lambda w: ["run", w.variant("ec", corpus={"source": str(w.shared / "empty")}),
                                    "--stages", "tokens"],
         r"holds no \.txt or \.md files"),
    Case("corpus-too-small", lambda w: ["run", str(w.config), "--stages", "tokens", "--set", "tokens.train_rows=5000"],
         r"the corpus yields only \d+ rows of 32 tokens but 5000 are needed", r"add text"),
    # ------------------------------------------------------------ circuitflow trace
    Case("trace-feature-out-of-range", lambda w: _trace(w, "--prompt", "hello", "--layer", "1", "--feature", "64"),
         r"--feature 64: out of range", r"features 0\.\.63"),
    Case("trace-prompt-too-long", lambda w: _trace(w, "--prompt", "x" * 300, "--layer", "1", "--feature", "3"),
         r"--prompt is 301 tokens long", r"shorten it"),
    Case("trace-pos-out-of-range",
         lambda w: _trace(w, "--prompt", "hello", "--layer", "1", "--feature", "3", "--pos", "40"),
         r"--pos 40: out of range", r"the prompt has 6 tokens"),
    Case("trace-logit-not-one-token", lambda w: _trace(w, "--prompt", "hello", "--logit", "ab"),
         r"--logit 'ab': encodes to 2 tokens", r"give a string that is one token"),
    Case("trace-bad-path-filter", lambda w: _trace(w, "--prompt", "hello", "--layer", "1", "--through", "F1.x"),
         r"node pattern 'F1\.x': expected F\[<layer>\[\.<feature>\]\]\[@pos\]"),
    Case("config-logit-root-not-one-token",
         lambda w: ["run", w.variant("lr", trace={"roots": [{"prompt": "hello", "logit_diff": ["a", "bc"]}]})],
         r"trace\.roots\[\]\.logit_diff 'bc': encodes to 2 tokens", r"give a string that is one token"),
    Case("config-feature-inputs-malformed", lambda w: ["run", w.variant("fi", feature_inputs={"features": ["1-3"]})],
         r"feature_inputs\.features: '1-3' is not LAYER:FEATURE", r"e\.g\. '3:496'"),
    Case("trace-layer-without-transcoder",
         lambda w: _trace(w, "--prompt", "hello", "--layer", "7", "--feature", "3"),
         r"--layer 7: no transcoder for this layer", r"layers with one: 0, 1"),
    # ------------------------------------------------------------ circuitflow sql / feature / convert
    Case("sql-attach", _sql(lambda w: f"attach '{w.base / 'x.db'}' as x"), r"refused: attach statements", r"use select"),
    Case("sql-install", _sql("install httpfs"), r"refused: install/load statements", r"use select"),
    Case("sql-copy-to", _sql(lambda w: f"copy tokens to '{w.store / 'out.csv'}'"), r"refused: copy statements",
         r"use select"),
    Case("sql-write-after-select", _sql("select 1; drop view tokens"), r"refused: drop statements", r"use select"),
    Case("sql-read-etc-passwd", _sql("select * from read_csv('/etc/passwd')"), r"/etc/passwd", r"only files inside the store can be read"),
    Case("sql-read-proc", _sql("select * from read_text('/proc/self/environ')"), r"/proc/self/environ",
         r"only files inside the store can be read"),
    Case("sql-comment-hides-copy", _sql(lambda w: f"select 1 -- harmless\n; copy tokens to '{w.store / 'x.csv'}'"),
         r"refused: copy statements", r"use select"),
    Case("sql-path-escapes-store", _sql(lambda w: f"select * from read_text('{w.store}/../tiny.yaml')"),
         r"\.\./tiny\.yaml", r"only files inside the store can be read"),
    Case("sql-symlink-escapes-store", _sql(lambda w: f"select * from read_csv('{w.store}/runs/passwd.csv')"),
         r"passwd\.csv", r"only files inside the store can be read"),
    Case("sql-duckdb-temp-dir-escapes-store", _sql(lambda w: f"select content from read_text('{w.base}/.tmp/secret.txt')"),
         r"secret\.txt", r"inside the store"),
    Case("sql-missing-store", lambda w: ["sql", "select 1", "--store", str(w.base / "no-store")],
         r"store .*no-store does not exist", r"run `circuitflow run CONFIG` first"),
    Case("feature-missing-store", lambda w: ["feature", "0", "1", "--store", str(w.base / "no-store")],
         r"store .*no-store does not exist", r"run `circuitflow run CONFIG` first"),
    Case("feature-out-of-range", lambda w: ["feature", "0", "640", "--store", str(w.store)],
         r"layer 0 feature 640 was not mined", r"mined: layer 0: features 0\.\.63"),
    Case("convert-missing-file", lambda w: ["convert", str(w.base / "missing.pt"), str(w.base / "out")],
         r"missing\.pt: not a transcoder file or folder"),
    Case("convert-malicious-pickle", lambda w: ["convert", str(w.shared / "evil.pt"), str(w.base / "out")],
         r"evil\.pt: refused to unpickle"),
    Case("convert-pickle-protocol-0", lambda w: ["convert", str(w.shared / "evil-p0.pt"), str(w.base / "out")],
         r"evil-p0\.pt: refused to unpickle: it references posix\.system, which is neither tensor data"),
    Case("convert-pickle-protocol-4", lambda w: ["convert", str(w.shared / "evil-p4.pt"), str(w.base / "out")],
         r"evil-p4\.pt: refused to unpickle: it references posix\.system, which is neither tensor data"),
    # ------------------------------------------------------------ a store path that cannot hold a store
    Case("store-is-a-file", lambda w: ["run", str(w.config), "--store", w.text("afile", "x\n")],
         r"--store '.*afile': is a file, not a directory", r"pass a directory"),
    Case("store-under-a-file", lambda w: ["run", str(w.config), "--store", w.text("bfile", "x\n") + "/store"],
         r"lies under the file .*bfile, not a directory", r"pass a directory"),
    Case("store-under-proc", lambda w: ["run", str(w.config), "--store", "/proc/self/store"],
         r"--store '/proc/self/store': .* lies in a kernel filesystem", r"pass a directory on disk"),
    # ------------------------------------------------------------ settings that pass the types but not the sizes
    Case("train-huge-expansion-factor", lambda w: ["run", str(w.config), "--set", "train.expansion_factor=1000000"],
         r"train\.expansion_factor: training needs about [\d.]+ [GT]B of memory \(d_sae 32000000\)",
         r"lower train\.expansion_factor \(now 1000000\)"),
    Case("train-l1-infinite", lambda w: ["run", str(w.config), "--set", "train.l1_coefficient=.inf"],
         r"train\.l1_coefficient: must be a finite number, got inf"),
    Case("train-k-above-d-sae",
         lambda w: ["run", str(w.config), "--set", "train.activation=topk", "--set", "train.k=5000"],
         r"train\.k: 5000 is more than the dictionary's 64 features", r"lower train\.k"),
    # ------------------------------------------------------------ unbounded SQL
    Case("sql-cross-join-timeout",
         lambda w: ["sql", "select count(*) from vocab a, vocab b, vocab c, vocab d, vocab e", "--store", str(w.store), "--timeout", "1"],
         r"ran past its time limit of 1 s", r"raise it with --timeout"),
    Case("sql-distinct-cross-join-memory",
         lambda w: ["sql", "select count(distinct a.token * 1000000 + b.token * 1000 + c.token) from vocab a, vocab b, "
                    "vocab c", "--store", str(w.store), "--memory-limit", "20MB", "--timeout", "60"],
         r"needs more than its memory limit of 20MB", r"raise it with --memory-limit"),
    Case("sql-huge-result", _sql("select a.token from vocab a, vocab b, vocab c"),
         r"returns more than 1000000 rows", r"add a LIMIT or raise the cap with --max-rows"),
    Case("sql-before-first-run", lambda w: ["sql", "select * from tokens", "--store", w.fresh_store()],
         r"no run has finished in the store .*fresh yet", r"views appear when `circuitflow run` finishes"),
    Case("sql-expression-depth", _sql("select " + "(" * 1100 + "1" + ")" * 1100),
         r"Max expression depth limit of 1000 exceeded\. Simplify the query \(settings cannot be changed here\)\.$"),
]  # fmt: skip


def _params() -> list:
    marks = lambda c: [pytest.mark.xfail(strict=True, reason=c.xfail)] if c.xfail else []  # noqa: E731
    return [pytest.param(c, id=c.id, marks=marks(c)) for c in CASES]


# ---------------------------------------------------------------- the shared inputs and the runs


class Evil:
    """Unpickling this runs os.system: what a crafted checkpoint would do."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def make_shared(folder: Path) -> Path:
    """An empty corpus folder, transcoders of the wrong width, and a .pt file whose pickle runs a command."""
    from core.transcoder import TranscoderConfig, init_transcoder
    from storage.checkpoints import save_transcoders

    (folder / "empty").mkdir(parents=True)
    wide = [
        init_transcoder(
            TranscoderConfig(24, 48, 24, "relu", 8, False, f"blocks.{x}.ln2.hook_normalized", f"blocks.{x}.hook_mlp_out",
                             x, "tiny:ln"), seed=x)
        for x in (0, 1)
    ]  # fmt: skip
    save_transcoders(wide, folder / "wide")
    torch.save({"cfg": Evil(f"touch {folder / 'PWNED'}"), "state_dict": {}}, folder / "evil.pt")
    for protocol in (0, 4):  # legacy (not zip) files: a raw pickle, as pickle.dump writes it
        with open(folder / f"evil-p{protocol}.pt", "wb") as fh:
            pickle.dump({"cfg": Evil(f"touch {folder / 'PWNED'}"), "state_dict": {}}, fh, protocol=protocol)
    return folder


def prepare(case: Case, base: Path, reference: Reference, shared: Path) -> World:
    base.mkdir(parents=True)
    store = base / "store"
    shutil.copytree(reference.store, store, symlinks=True)
    (store / "runs" / "passwd.csv").symlink_to("/etc/passwd")  # a link out of the store, for the symlink case
    (base / ".tmp").mkdir()  # DuckDB's default temp directory, relative to the command's working directory
    (base / ".tmp" / "secret.txt").write_text("not in the store\n")
    return World(base, store, reference.config_for(store, "case.yaml"), reference, shared)


@dataclass
class Result:
    outcome: Outcome
    changes: list[str]
    world: World


def run_case(case: Case, base: Path, reference: Reference, shared: Path) -> Result:
    world = prepare(case, base, reference, shared)
    before = snapshot(world.store)
    outcome = run_cli(case.args(world), cwd=world.base)
    return Result(outcome, diff(before, snapshot(world.store)), world)


def _selected(request: pytest.FixtureRequest) -> list[Case]:
    """The cases of this module that the session will run (so `-k one-case` runs one subprocess)."""
    ids = set()
    for item in request.session.items:
        if item.module is sys.modules[__name__] and hasattr(item, "callspec") and "case" in item.callspec.params:
            ids.add(item.callspec.params["case"].id)
    return [c for c in CASES if c.id in ids]


@pytest.fixture(scope="module")
def results(request: pytest.FixtureRequest, reference: Reference, tmp_path_factory) -> dict[str, Result]:
    base = tmp_path_factory.mktemp("bad-inputs")
    shared = make_shared(base / "shared")
    cases = _selected(request)
    with ThreadPoolExecutor(WORKERS) as pool:
        futures = {c.id: pool.submit(run_case, c, base / c.id, reference, shared) for c in cases}
        out = {name: f.result() for name, f in futures.items()}
    report = [f"{'case':<32} {'rc':>3} {'cpu s':>6} {'wall s':>7}"]
    report += [
        f"{k:<32} {r.outcome.returncode:>3} {r.outcome.cpu:>6.1f} {r.outcome.wall:>7.1f}" for k, r in out.items()
    ]
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print("\n" + "\n".join(report))
    assert not (shared / "PWNED").exists(), "a malicious pickle ran its command"
    return out


# ---------------------------------------------------------------- the checks


@pytest.mark.parametrize("case", _params())
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case: Case, results: dict[str, Result]) -> None:
    result = results[case.id]
    out = result.outcome
    shown = textwrap.indent(out.stderr[-3000:], "    ")
    assert "Traceback" not in out.stderr, f"traceback on stderr:\n{shown}"
    lines = out.stderr.splitlines()
    assert len(lines) == 1, f"{len(lines)} lines on stderr, expected one:\n{shown}"
    line = lines[0]
    assert re.match(ERROR_PREFIX, line), line
    assert re.search(case.wrong, line), f"{line!r} does not say what is wrong ({case.wrong!r})"
    if case.todo:
        assert re.search(case.todo, line), f"{line!r} does not say what to do ({case.todo!r})"
    assert out.returncode == 2, f"exit code {out.returncode}"
    assert not out.heavy, f"heavy work before the input was refused: {out.heavy}"
    assert out.cpu < CPU_LIMIT, f"{out.cpu:.1f} CPU seconds before refusing"
    assert not result.changes, f"the store changed: {result.changes[:10]}"
    assert not (result.world.base / "out").exists(), "convert wrote an output for a bad input"


def test_the_harness_can_see_success(reference: Reference, tmp_path) -> None:
    """Control: a good query through the same harness exits 0 and prints the reference's row count, so the
    checks above fail for the right reasons."""
    store = tmp_path / "store"
    shutil.copytree(reference.store, store)
    before = snapshot(store)
    out = run_cli(["sql", "select count(*) as n from tokens", "--store", str(store), "--format", "csv"], cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.split() == ["n", "8"], out.stderr
    assert not out.heavy and not diff(before, snapshot(store))


def test_sql_refuses_without_loading_the_model_stack(tmp_path) -> None:
    """The SQL entry point needs duckdb and the store, not torch: a refusal costs little more than the interpreter."""
    out = run_cli(["sql", "drop view tokens", "--store", str(tmp_path)], cwd=tmp_path)
    assert out.returncode == 2 and "refused: drop statements" in out.stderr, out.stderr
    assert out.cpu < 2.0, f"{out.cpu:.1f} CPU seconds to refuse a statement"
