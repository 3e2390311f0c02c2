"""Run every benchmark on the bundled default and print one table; writes bench/RESULTS.md.

    .venv/bin/python -m bench.run [--quick] [--only NAME,...]

Each figure is a ratio or a latency measured side by side in the same run, with its target.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import time
from pathlib import Path

import torch

BENCHES = ("activations", "train", "mine", "trace", "feature_inputs", "interventions", "pipeline")
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (
        f"{cpu}, {os.cpu_count()} cores, GPU: {gpu}, torch {torch.__version__}, torch threads {torch.get_num_threads()}"
    )


def collect(names: list[str], quick: bool) -> list[dict]:
    rows: list[dict] = []
    for name in names:
        try:
            module = importlib.import_module(f"bench.bench_{name}")
        except ModuleNotFoundError as exc:
            rows.append({"name": name, "value": None, "unit": "", "target": "", "met": None, "note": f"missing: {exc}"})
            continue
        start = time.perf_counter()
        for row in module.run(quick=quick):
            rows.append({"bench": name, **row})
        print(f"[{name}] {time.perf_counter() - start:.1f} s", flush=True)
    return rows


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def table(rows: list[dict]) -> str:
    lines = ["| figure | value | unit | target | met | note |", "|---|---|---|---|---|---|"]
    for r in rows:
        met = {True: "yes", False: "NO", None: "-"}[r.get("met")]
        lines.append(
            f"| {r['name']} | {_fmt(r.get('value'))} | {r.get('unit', '')} | {r.get('target', '')} | {met} | {r.get('note', '')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller inputs (a smoke run, not the reported figures)")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(BENCHES)}")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument(
        "--store", help="a store the default config trained (else ./store; random transcoders without one)"
    )
    args = parser.parse_args()
    if args.store:
        os.environ["CIRCUITFLOW_BENCH_STORE"] = args.store
    torch.set_num_threads(args.threads)
    names = args.only.split(",") if args.only else list(BENCHES)
    host = machine()  # before the benchmarks, some of which change the thread count
    rows = collect(names, args.quick)
    text = table(rows)
    print(text)
    if not args.quick:
        stamp = time.strftime("%Y-%m-%d %H:%M")
        RESULTS.write_text(
            f"# Benchmark results\n\nRun {stamp} on: {host}\n\nCommand: `.venv/bin/python -m bench.run`\n\n{text}\n"
        )
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
