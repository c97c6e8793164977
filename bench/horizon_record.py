"""What the horizon's write to the fleet's record costs a drain (issue 20): a drain's length with and without it.

Both sidecars drain the same way (fixed delay 1 s, the example app, which exits at once on SIGTERM): one
runs this tree's code, which appends the horizon to Consul's KV store while the app exits; the other runs
REF's code (``git archive REF sidecar``), which does not write. Runs alternate (old, new), so both see the
same load on the machine. Per drain: SIGTERM -> the sidecar's exit as this process sees it, and
``sidecar.stopped``'s own ``elapsed_ms``; for the new code also ``horizon_saved``'s ``after_app_ms`` (what
the write added after the app's exit) and ``elapsed_ms`` (the whole write).

Usage: python bench/horizon_record.py [--runs 10] [--old REF]
Everything it starts is stopped at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trees import unpack  # noqa: E402

from testkit import Consul, app_command, free_port, scratch_agent, spawn, wait_for, write_config  # noqa: E402
from testkit.procs import log_events  # noqa: E402


def find(log: Path, name: str) -> dict[str, object] | None:
    return next((e for e in log_events(log) if e.get("event") == name), None)


def drain(consul: Consul, work: Path, tree: Path, name: str, n: int) -> dict[str, float]:
    port = free_port()
    cfg: dict[str, dict[str, object]] = {
        "consul": {"address": consul.address},
        "service": {"name": name, "id": f"{name}-{n}", "address": "127.0.0.1", "port": port},
        "check": {"interval": "1s"},
        "shutdown": {"propagation_delay": "1s"},
        "status": {"listen": ""},
    }
    config_file = write_config(work / f"{name}-{n}.toml", cfg)
    log = work / f"{name}-{n}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")}
    env["PYTHONPATH"] = str(tree)
    argv = [sys.executable, "-P", "-m", "sidecar", "run", "-c", str(config_file), "--log-format", "json"]
    proc = spawn([*argv, "--", *app_command(port)], log, env)
    wait_for(lambda: find(log, "sidecar.consul.registered") is not None, 30, what=f"{name}-{n} registered")
    t = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    wall = (time.monotonic() - t) * 1000
    stopped = find(log, "sidecar.stopped") or {}
    saved = find(log, "sidecar.drain.horizon_saved") or {}
    app = find(log, "sidecar.app.stopped") or {}
    return {
        "wall_ms": wall,
        "elapsed_ms": float(str(stopped.get("elapsed_ms", "nan"))),
        "after_app_ms": float(str(saved.get("after_app_ms", "nan"))),
        "write_ms": float(str(saved.get("elapsed_ms", "nan"))),
        "app_ms": float(str(app.get("elapsed_ms", "nan"))),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--old", default="b07ae78", metavar="REF", help="code without the write (default b07ae78)")
    args = ap.parse_args()
    with scratch_agent() as (work, consul):
        old_tree = unpack(args.old, work / "old")
        old, new = [], []
        for n in range(args.runs):
            old.append(drain(consul, work, old_tree, "bench-old", n))
            new.append(drain(consul, work, ROOT, "bench-new", n))

    def med(rows: list[dict[str, float]], k: str) -> float:
        return statistics.median(r[k] for r in rows)

    print(f"{args.runs} drains each (fixed delay 1 s, the app exits at once), medians:")
    print(f"{'SIGTERM -> exit, without the write (' + args.old + '), ms':58} {med(old, 'wall_ms'):8.1f}")
    print(f"{'SIGTERM -> exit, with the write, ms':58} {med(new, 'wall_ms'):8.1f}")
    print(
        f"{'sidecar.stopped elapsed_ms, without / with':58} {med(old, 'elapsed_ms'):8.1f} {med(new, 'elapsed_ms'):8.1f}"
    )
    print(
        f"{'the app signalled -> stopped, without / with, ms':58} {med(old, 'app_ms'):8.1f} {med(new, 'app_ms'):8.1f}"
    )
    print(f"{'horizon_saved: write started -> logged after the app exit, ms':58} {med(new, 'write_ms'):8.1f}")
    print(f"{'horizon_saved: after the app exit (added to the drain), ms':58} {med(new, 'after_app_ms'):8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
