"""Check that transcoders exported by circuitflow compute the same outputs in SAELens and circuit-tracer.

Two halves, two environments:

    python scripts/check_interop.py --python /tmp/interop-venv/bin/python [--store STORE] [--out DIR]

The first half (this project's venv) takes the transcoders of STORE's latest run (the default pipeline's
are batch top-k trained, saved as JumpReLU) with the run's cached MLP inputs, or, without --store, random
transcoders with the default pipeline's shapes (SmolLM2-135M: d_model 576, d_sae 2304; per-token top-k
k=64, ReLU, JumpReLU and a skip variant) with random inputs. It exports each with `circuitflow convert
--to saelens` and `--to circuit-tracer` (a per-token top-k transcoder is refused by the latter) and saves
the inputs with circuitflow's outputs and feature activations. The second half runs under `--python` (a
separate venv with `pip install sae-lens circuit-tracer`, never this project's) and loads each export
with the other tool's own loader, printing the largest absolute differences. Nothing of the other tools
is imported into circuitflow.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

N_TOKENS = 512
"""Input rows compared per transcoder."""


def ours(args: argparse.Namespace, out: Path) -> list[dict]:
    """Export every transcoder both ways and save inputs, outputs and feature activations; returns the cases."""
    import torch
    from safetensors.torch import save_file

    from storage.checkpoints import CheckpointError, save_transcoder

    torch.manual_seed(0)
    cases = []
    for name, tc in _transcoders(args.store):
        x = _inputs(args.store, tc.cfg.layer, tc.cfg.d_in)
        with torch.no_grad():
            result = tc(x)
        folder = out / name
        save_file({"x": x, "out": result.out, "acts": result.feature_acts}, str(folder.with_suffix(".pt.safetensors")))
        case = {"name": name, "activation": tc.cfg.activation, "layer": tc.cfg.layer}
        case["saelens"] = str(save_transcoder(tc, folder / "saelens", "saelens"))
        try:
            case["circuit_tracer"] = str(save_transcoder(tc, folder / "ct", "circuit-tracer"))
        except CheckpointError as exc:
            case["circuit_tracer_refused"] = str(exc)
        cases.append(case)
    return cases


def _transcoders(store: str | None) -> list:
    import torch

    from core.transcoder import TranscoderConfig, init_transcoder
    from storage.checkpoints import load_transcoder

    if store:
        latest = json.loads((Path(store) / "runs" / "latest.json").read_text())
        keys = latest["plan"]["train"]
        return [(f"layer{k}", load_transcoder(Path(store) / "train" / v)) for k, v in sorted(keys.items())]
    found = []
    for i, (activation, skip) in enumerate([("topk", False), ("relu", False), ("jumprelu", False), ("relu", True)]):
        hooks = ("blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out")
        cfg = TranscoderConfig(576, 2304, 576, activation, 64, skip, *hooks, 1, "bundled:smollm2-135m")
        tc = init_transcoder(cfg, seed=i)
        with torch.no_grad():  # every parameter non-trivial: biases, pre-bias, thresholds, skip
            for p in (tc.b_enc, tc.b_dec, tc.b_dec_out):
                p.copy_(torch.randn(p.shape) * 0.3)
            if tc.threshold is not None:
                tc.threshold.copy_(torch.rand(tc.threshold.shape) * 0.5)
            if tc.W_skip is not None:
                tc.W_skip.copy_(torch.randn(tc.W_skip.shape) * 0.02)
        found.append((f"{activation}{'-skip' if skip else ''}", tc))
    return found


def _inputs(store: str | None, layer: int, d_in: int):
    """The first N_TOKENS cached MLP inputs of the layer in STORE's latest run, else random ones."""
    import torch

    from storage import layout
    from storage.shards import ActivationCache

    if not store:
        return torch.randn(N_TOKENS, d_in) * 2.0
    key = json.loads((Path(store) / "runs" / "latest.json").read_text())["plan"]["activations"]
    return ActivationCache(layout.stage_dir(store, "activations", key)).layer(layer).read(0, N_TOKENS)[0].float()


def theirs(out: Path) -> None:
    """Under the other venv: load each export with SAELens and circuit-tracer and compare with circuitflow's outputs."""
    import torch
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    for case in json.loads((out / "cases.json").read_text()):
        want = load_file(str((out / case["name"]).with_suffix(".pt.safetensors")))
        line = [f"{case['name']:<14}"]
        line.append(_saelens(Path(case["saelens"]), want))
        if "circuit_tracer" in case:
            line.append(_circuit_tracer(Path(case["circuit_tracer"]), case["layer"], want))
        else:
            line.append("circuit-tracer: export refused (" + case["circuit_tracer_refused"].split(";")[0] + ")")
        print("  ".join(line), flush=True)


def _saelens(folder: Path, want: dict) -> str:
    import sae_lens
    import torch

    sae = sae_lens.SAE.load_from_disk(str(folder), device="cpu")
    with torch.no_grad():
        acts = sae.encode(want["x"])
        out = sae(want["x"])
    return (
        f"SAELens {sae_lens.__version__} {type(sae).__name__}: max|out diff| {_diff(out, want['out'])}, "
        f"max|act diff| {_diff(acts, want['acts'])}, active/token {_active(acts):.1f} (ours {_active(want['acts']):.1f})"
    )


def _circuit_tracer(folder: Path, layer: int, want: dict) -> str:
    import torch
    from circuit_tracer.transcoder.single_layer_transcoder import load_relu_transcoder

    tc = load_relu_transcoder(str(folder / f"layer_{layer}.safetensors"), layer, device=torch.device("cpu"),
                              lazy_encoder=False, lazy_decoder=False)  # fmt: skip
    with torch.no_grad():
        acts = tc.encode(want["x"])
        out = tc(want["x"])
    return f"circuit-tracer: max|out diff| {_diff(out, want['out'])}, max|act diff| {_diff(acts, want['acts'])}"


def _diff(a, b) -> str:
    """Largest absolute difference, and relative to the largest absolute value of ours."""
    largest = (a.float() - b.float()).abs().max().item()
    return f"{largest:.2e} ({largest / max(b.float().abs().max().item(), 1e-30):.1e} rel)"


def _active(acts) -> float:
    return (acts != 0).float().sum(-1).mean().item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", help="the other venv's interpreter (sae-lens and circuit-tracer installed)")
    parser.add_argument("--store", help="compare the transcoders of this store's latest run")
    parser.add_argument("--out", help="folder for the exports (default: a temp folder)")
    parser.add_argument("--theirs", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.theirs:
        theirs(Path(args.theirs))
        return 0
    out = Path(args.out or tempfile.mkdtemp(prefix="circuitflow-interop-"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "cases.json").write_text(json.dumps(ours(args, out), indent=1))
    print(f"exports in {out}", flush=True)
    if not args.python:
        print("no --python given: run the other half with PYTHON scripts/check_interop.py --theirs", out)
        return 0
    return subprocess.run([args.python, __file__, "--theirs", str(out)], check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
