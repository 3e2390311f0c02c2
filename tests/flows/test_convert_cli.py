"""`circuitflow convert`: every layout in, every layout out, through the real CLI entry point; bad input is one
line on stderr with exit code 2. Outputs are compared on random inputs (float64 weights, tolerance 1e-9)."""

from __future__ import annotations

import pytest
import torch

from flows.cli import main
from storage.checkpoints import load_transcoder, load_transcoders, save_transcoder, save_transcoders
from tests.storage.transcoder_files import (
    TOL32,
    TOL64,
    inputs,
    make_tc,
    max_diff,
    payloads,
    release_forward,
    release_state,
    write_release,
)


@pytest.mark.parametrize("src_format", ["native", "circuit-tracer"])
@pytest.mark.parametrize("to", ["native", "saelens", "circuit-tracer"])
def test_convert_one_transcoder(tmp_path, capsys, src_format, to):
    tc = make_tc("jumprelu", skip=True)
    src = save_transcoder(tc, tmp_path / "src", src_format)
    assert main(["convert", str(src), str(tmp_path / "dst"), "--to", to]) == 0
    out = capsys.readouterr().out
    assert f"wrote {to}: {tmp_path / 'dst'}" in out and "blocks.2.ln2.hook_normalized -> blocks.2.hook_mlp_out" in out
    back = load_transcoder(tmp_path / "dst")
    assert max_diff(back(inputs()).out, tc(inputs()).out) < TOL64


def test_convert_the_release_folder_to_a_circuit_tracer_set_and_back(tmp_path, capsys):
    release = tmp_path / "release"
    release.mkdir()
    for layer in (0, 1):
        write_release(release, layer=layer)
    assert main(["convert", str(release), str(tmp_path / "set"), "--to", "circuit-tracer"]) == 0
    assert main(["convert", str(tmp_path / "set"), str(tmp_path / "native")]) == 0
    assert sorted(p.name for p in (tmp_path / "native").iterdir()) == ["layer_0", "layer_1"]
    loaded = load_transcoders(tmp_path / "native")
    u = inputs(torch.float32)
    for layer in (0, 1):
        assert max_diff(loaded[layer](u).out, release_forward(release_state(seed=layer), u)) < TOL32
    assert "layer   1  relu" in capsys.readouterr().out


def test_topk_to_circuit_tracer_is_refused_in_one_line(tmp_path, capsys):
    """circuit-tracer's loader would apply ReLU to a top-k transcoder: refused, nothing written."""
    src = save_transcoder(make_tc("topk"), tmp_path / "src")
    assert main(["convert", str(src), str(tmp_path / "ct"), "--to", "circuit-tracer"]) == 2
    assert "a top-k transcoder cannot be written for circuit-tracer exactly" in one_error_line(capsys)
    assert not (tmp_path / "ct").exists()


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("circuitflow: error: ")
    return err


def test_missing_source_is_one_line(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nope"), str(tmp_path / "dst")]) == 2
    assert "not a transcoder file or folder" in one_error_line(capsys)
    assert not (tmp_path / "dst").exists()


def test_malicious_release_is_refused_by_the_cli(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    torch.save({"cfg": payloads(marker)["os.system"], "state_dict": {}}, tmp_path / "evil.pt")
    assert main(["convert", str(tmp_path / "evil.pt"), str(tmp_path / "dst")]) == 2
    assert "refused to unpickle" in one_error_line(capsys)
    assert not marker.exists() and not (tmp_path / "dst").exists()


def test_duplicate_layers_are_refused(tmp_path, capsys):
    save_transcoders({2: make_tc()}, tmp_path / "src" / "a")
    save_transcoder(make_tc(seed=4), tmp_path / "src" / "b")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--to", "circuit-tracer"]) == 2
    assert "two transcoders for layer 2" in one_error_line(capsys)
