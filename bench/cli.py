"""How fast each command answers, beside ``python -c "import asyncio"``, old code against new.

    --version                                   median <= 1.5 x baseline
    check-config -c FILE                        median <= 1.5 x baseline
    wait --min-passing 1 (true at once)         median <= 2 x baseline
    run: spawn -> registered and passing        median no slower than the old code
      (alongside mode: the app is already up and healthy, so only the sidecar starts)

Each of the --runs rounds runs every variant once, in a shuffled order, so load on the machine
falls on all of them alike. The old code is ``git archive REF sidecar`` (default REF: main),
run by the same interpreter and virtualenv. Both run from bytecode cached in a temporary
directory (PYTHONPYCACHEPREFIX) after one warm-up each, as an installed package does.

Usage: python bench/cli.py [--runs 20] [--old REF | --old ""]
Everything it starts is stopped at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from testkit import PY, Consul, app_command, free_port, kill_all_started, spawn, wait_for, write_config  # noqa: E402

# What the console script does; -P keeps the current directory off sys.path, so PYTHONPATH alone
# decides which tree's `sidecar` is imported.
ENTRY = [PY, "-P", "-c", "import sys; from sidecar.__main__ import entry; sys.exit(entry())"]
BASELINE = "python -c 'import asyncio'"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--old", default="main", metavar="REF", help='git ref of the code to compare with ("" for none)')
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-cli-"))
    trees = {"new": ROOT}
    if args.old:
        (work / "old").mkdir()
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", args.old, "sidecar"], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(work / "old")], input=archive, check=True)
        trees["old"] = work / "old"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_") and k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")

    def env_for(tree: Path) -> dict[str, str]:
        return {**env, "PYTHONPATH": str(tree)}

    consul = Consul(work)
    try:
        consul.start()
        port = free_port()
        app = spawn(app_command(port), work / "app.log")
        wait_for(lambda: _answers(port), 10, what="the app")
        _put(f"{consul.address}/v1/agent/service/register", {"Name": "bench-wait", "ID": "bench-wait-1", "Port": port})
        wait_for(lambda: _passing(consul, "bench-wait"), 15, what="bench-wait passing")
        check_cfg = write_config(work / "check.toml", _config(consul, "bench-check", port))

        def short(argv: list[str], tree: Path | None) -> Callable[[], float]:
            def go() -> float:
                t0 = time.perf_counter()
                subprocess.run(
                    argv,
                    env=env_for(tree) if tree else env,
                    cwd=work,
                    check=True,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    stdin=subprocess.DEVNULL,
                )
                return (time.perf_counter() - t0) * 1000

            return go

        runs = iter(range(1_000_000))

        def run(tree: Path) -> Callable[[], float]:
            def go() -> float:
                name = f"bench-run-{next(runs)}"
                cfg = write_config(work / f"{name}.toml", _config(consul, name, port))
                t0 = time.perf_counter()
                sc = spawn([*ENTRY, "run", "-c", str(cfg), "--log-format", "json"], work / f"{name}.log", env_for(tree))
                wait_for(lambda: _passing(consul, name), 15, 0.002, f"{name} registered and passing")
                ms = (time.perf_counter() - t0) * 1000
                sc.send_signal(signal.SIGTERM)
                if sc.wait(15) != 0:
                    raise AssertionError(f"{name} exited {sc.returncode}: {(work / f'{name}.log').read_text()[-2000:]}")
                return ms

            return go

        cases: dict[tuple[str, str], Callable[[], float]] = {
            ("baseline", ""): short([PY, "-c", "import asyncio"], None)
        }
        wait_args = [
            "wait",
            "--consul-address",
            consul.address,
            "--service",
            "bench-wait",
            "--min-passing",
            "1",
            "--timeout",
            "10s",
        ]
        for variant, tree in trees.items():
            cases[("--version", variant)] = short([*ENTRY, "--version"], tree)
            cases[("check-config", variant)] = short([*ENTRY, "check-config", "-c", str(check_cfg)], tree)
            cases[("wait", variant)] = short([*ENTRY, *wait_args], tree)
            cases[("run", variant)] = run(tree)
        for case in cases.values():  # warm-up: compiles and caches the bytecode
            case()
        times: dict[tuple[str, str], list[float]] = {k: [] for k in cases}
        for i in range(args.runs):
            order = list(cases)
            random.shuffle(order)
            for key in order:
                times[key].append(cases[key]())
            print(
                f"round {i + 1}/{args.runs}: "
                + ", ".join(f"{c} {v or ''} {times[(c, v)][-1]:.0f}".replace("  ", " ") for c, v in cases),
                file=sys.stderr,
            )
        app.send_signal(signal.SIGTERM)
        app.wait(10)
    finally:
        kill_all_started()
        shutil.rmtree(work, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    base = med[("baseline", "")]
    targets = {"--version": 1.5, "check-config": 1.5, "wait": 2.0}
    print()
    print(
        f"consul-sidecar CLI start-up, median of {args.runs} runs, ms "
        f"({os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}); "
        f"baseline {BASELINE}: {base:.0f} ms"
    )
    print(f"{'command':14} {'old':>8} {'new':>8} {'old/base':>9} {'new/base':>9} {'target':>22}")
    for command in ("--version", "check-config", "wait", "run"):
        old = med.get((command, "old"))
        new = med[(command, "new")]
        if command in targets:
            target = f"new/base <= {targets[command]:g}: {'met' if new / base <= targets[command] else 'NOT met'}"
        else:
            target = "new <= old: " + ("met" if old is None or new <= old else f"NOT met (+{new / old - 1:.0%})")
        old_text = f"{old:8.0f}" if old is not None else f"{'-':>8}"
        old_ratio = f"{old / base:9.2f}" if old is not None else f"{'-':>9}"
        print(f"{command:14} {old_text} {new:8.0f} {old_ratio} {new / base:9.2f} {target:>22}")
    print(f"(run: spawn -> registered and passing in the catalog; old = {args.old or 'none'})")
    return 0


def _config(consul: Consul, name: str, port: int) -> dict[str, dict[str, object]]:
    return {
        "consul": {"address": consul.address},
        "service": {"name": name, "id": f"{name}-1", "address": "127.0.0.1", "port": port},
        "check": {"interval": "10s"},
        "shutdown": {"propagation_delay": "0s"},
        "status": {"listen": ""},
        "app": {},
    }


def _answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
            return True
    except OSError:
        return False


def _put(url: str, body: dict[str, object]) -> None:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="PUT")
    with urllib.request.urlopen(req, timeout=5):
        pass


def _passing(consul: Consul, name: str) -> bool:
    with urllib.request.urlopen(f"{consul.address}/v1/health/service/{name}?passing=1", timeout=2) as r:
        return bool(json.loads(r.read()))


if __name__ == "__main__":
    sys.exit(main())
