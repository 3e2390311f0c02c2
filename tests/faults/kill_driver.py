"""The kill driver of the fault suite: a subprocess (this module run with `-m`) that imports the stages once, then
forks one child per request. A child runs the pipeline's stage tasks in order and is SIGKILLed either by itself at
a named call (no hook in the code under test: the child wraps the function) or by the driver when a file appears
in the store; meanwhile the driver scans the store for an artifact directory without its manifest.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.config import load_config
from storage import layout
from tasks.plan import STAGES, Plan
from tests.faults.conftest import REPO, run_stages


@dataclass(frozen=True)
class Kill:
    """Where a child dies. `target` "module:attr" (or "module:Class.method") is wrapped so that its `call`-th
    call (counting calls whose path argument contains `match`) is followed by SIGKILL: `before` it runs,
    `after` it returns, or `torn`: after it returns, the file it wrote (its second argument) is cut in half.
    With `poll` instead, the driver kills the child as soon as a file matching the glob exists in the store."""

    stage: str
    what: str
    target: str = ""
    call: int = 1
    when: str = "after"
    match: str = ""
    poll: str = ""

    def request(self) -> dict[str, Any]:
        return {"target": self.target, "call": self.call, "when": self.when, "match": self.match}


# ---------------------------------------------------------------- the driver (a subprocess)


def serve() -> None:
    """Read one JSON request per line; fork a child per request; answer how it ended, one JSON line each."""
    import torch

    import tasks.activations
    import tasks.feature_inputs
    import tasks.mine
    import tasks.tokens
    import tasks.trace
    import tasks.train  # noqa: F401 - imported once here, shared by every forked child

    torch.set_num_threads(1)
    for line in sys.stdin:
        request = json.loads(line)
        start = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            _child(request)
        status, unfinished, scans = _watch(pid, request)
        reply = {
            "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
            "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
            "seconds": round(time.perf_counter() - start, 2),
            "unfinished_seen": unfinished,
            "scans": scans,
        }
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


def _watch(pid: int, request: dict[str, Any]) -> tuple[int, list[str], int]:
    """Wait for the child, scanning the store all the while for an artifact directory without its manifest;
    with a poll glob, SIGKILL the child as soon as the glob matches. Returns (wait status, directories seen
    without a manifest, number of scans)."""
    store, pattern = Path(request["store"]), request.get("poll")
    unfinished: list[str] = []
    scans = 0
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status, unfinished, scans
        scans += 1
        unfinished += [str(p) for p in _visible_without_manifest(store) if str(p) not in unfinished]
        if pattern and any(store.glob(pattern)):
            os.kill(pid, signal.SIGKILL)
            return os.waitpid(pid, 0)[1], unfinished, scans
        time.sleep(0.002)


def _visible_without_manifest(store: Path) -> list[Path]:
    """`<stage>/<key>/` directories (no dot in the name) without a manifest at this instant (the same directory,
    by inode, before and after the look: a forced publish may swap in a complete one meanwhile)."""
    found = []
    try:
        stages = [p for p in store.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != "runs"]
        dirs = [c for stage in stages for c in stage.iterdir() if "." not in c.name]
        for d in dirs:
            inode = d.stat().st_ino
            if not (d / layout.MANIFEST).is_file() and d.stat().st_ino == inode:
                found.append(d)
    except FileNotFoundError:  # renamed away while looked at
        pass
    return found


def _child(request: dict[str, Any]) -> None:
    """Run the stages (dying where the request says); never returns."""
    code = 1
    try:
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        print(f"--- child {os.getpid()}: {request}", flush=True)
        if request.get("kill"):
            _arm(**request["kill"])
        keys = request["plan"]
        plan = Plan(**{**keys, "train": {int(k): v for k, v in keys["train"].items()}})
        run_stages(load_config(request["config"]), plan, tuple(request["stages"]), tuple(request.get("force", ())))
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _arm(target: str, call: int, when: str, match: str) -> None:
    module, attr = target.split(":")
    owner: Any = importlib.import_module(module)
    *parents, name = attr.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    real = getattr(owner, name)
    seen = 0

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal seen
        counts = not match or any(match in str(a) for a in args)
        seen += counts
        if counts and seen == call and when == "before":
            _die(f"before {target} call {call}")
        result = real(*args, **kwargs)
        if counts and seen == call:
            if when == "torn":
                path = Path(args[1])
                path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
            _die(f"{when} {target} call {call}")
        return result

    setattr(owner, name, wrapper)


def _die(where: str) -> None:
    print(f"--- SIGKILL {where}", flush=True)
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class Driver:
    """The test's end of the driver process."""

    def __init__(self, log: Path) -> None:
        self.log = log
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.faults.kill_driver"],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def run(self, config: Path, store: Path, plan: Plan, kill: Kill | None = None, **extra: Any) -> dict[str, Any]:
        request = {"config": str(config), "store": str(store), "plan": plan.keys(), "log": str(self.log)}
        request.update({"stages": list(STAGES), **extra})
        if kill is not None and kill.poll:
            request["poll"] = kill.poll
        elif kill is not None:
            request["kill"] = kill.request()
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"the driver died; see {self.log}"
        return json.loads(line)

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


if __name__ == "__main__":
    serve()
