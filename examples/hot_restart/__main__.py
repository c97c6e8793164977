"""The hot-restart demo: ``python -m examples.hot_restart`` (``scripts/demo --hot-restart`` sets up and runs it).

One instance (gunicorn by default) under the sidecar with ``[hot_restart] enabled = true``, under
open-loop load straight at its port (no balancer in front) while a watcher follows it in Consul:
first restarted hot (SIGUSR2: the next generation takes the sidecar's listening socket, the old one
finishes its requests and exits), then, as the control, restarted plainly (the sidecar stopped and
started again). Prints both side by side. Everything it starts is stopped at the end, also on
failure, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from testkit import Consul, kill_all_started, leftovers
from testkit.hotrestart import ALL_SERVERS

from .scenario import Run, hot_run, plain_run


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through the same finally blocks as Ctrl-C


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="scripts/demo --hot-restart", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--server",
        choices=ALL_SERVERS,
        default="gunicorn",
        help="the server to restart (default gunicorn; uvicorn-plain: without examples/app/uvicorn_serve.py)",
    )
    ap.add_argument("--rate", type=float, default=200.0, help="requests per second at the instance (default 200)")
    ap.add_argument("--restarts", type=int, default=3, help="hot restarts in a row (default 3)")
    ap.add_argument(
        "--slow-ms", type=int, default=2000, help="3 requests this slow are in flight at each trigger (default 2000)"
    )
    return ap.parse_args(argv)


def row(label: str, r: Run) -> str:
    res = r.result
    return (
        f"{label:13} {len(res.hits):9d} {len(res.refused):8d} {len(res.failed):7d} "
        f"{r.p99_steady_ms:11.1f} {r.p99_restart_ms:12.1f} {r.generations_served():>4d}/{len(r.pids):<4d} "
        f"{r.not_passing_seconds:12.1f}s"
    )


def report(hot: Run, plain: Run, restarts: int) -> None:
    print()
    print(
        f"{'restart':13} {'requests':>9} {'refused':>8} {'failed':>7} {'p99 steady':>11} {'p99 restart':>12} "
        f"{'served':>9} {'not passing':>13}"
    )
    print(row(f"hot x{restarts}", hot))
    print(row("plain x1", plain))
    for r in (hot, plain):
        kinds: dict[str, int] = {}
        for h in r.result.hits:
            if not h.ok:
                kind = (h.error or f"HTTP {h.status}").split(":")[0]
                kinds[kind] = kinds.get(kind, 0) + 1
        if kinds:
            print(
                f"  {r.mode} failures: "
                + ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))
            )
    print(
        "p99 in ms; served: generations whose PID answered requests / generations; "
        "not passing: seconds the catalog showed the instance missing or not passing"
    )
    if hot.restarts:
        exits = ", ".join(f"{r.old_exit_seconds:.2f}s" for r in hot.restarts)
        print(f"hot: SIGUSR2 to the old generation's exit: {exits} (it finishes its in-flight requests first)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    work = Path(tempfile.mkdtemp(prefix="consul-sidecar-hot-restart-demo-"))
    print(f"logs of every process (kept after the demo): {work}")
    t = time.monotonic()
    try:
        consul = Consul(work)
        consul.start()
        print(f"{args.server} under the sidecar, {args.rate:g} requests/s straight at its port")
        print(f"hot restart x{args.restarts} (SIGUSR2), {args.slow_ms} ms requests in flight at each trigger:")
        hot = hot_run(
            work / "hot", consul, "hotdemo", args.server, args.rate, restarts=args.restarts, slow_ms=args.slow_ms
        )
        print("plain restart (the control: the sidecar stopped, then started again):")
        plain = plain_run(work / "plain", consul, "plaindemo", args.server, args.rate)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping everything", file=sys.stderr)
        return 130
    finally:
        kill_all_started()
        left = leftovers()
        if left:
            print(f"warning: processes still alive: {left}", file=sys.stderr)
    report(hot, plain, args.restarts)
    print(f"demo took {time.monotonic() - t:.0f}s")
    load = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    if load > 2 * cores:
        print(
            f"warning: this machine was overloaded during the demo (load average {load:.1f} on {cores} cores): "
            "latencies say more about the machine than about the restart; run it again on a quieter machine"
        )
    hot_ok = hot.lost == 0 and hot.not_passing_seconds == 0
    plain_ok = plain.lost > 0
    print(
        "hot restart: "
        + (
            "no request refused or failed, passing in Consul throughout"
            if hot_ok
            else f"{hot.lost} requests LOST, {hot.not_passing_seconds:.1f}s not passing"
        )
    )
    print(
        f"plain restart (control): {plain.lost} requests lost"
        + ("" if plain_ok else " (expected some: the harness should see failures)")
    )
    return 0 if hot_ok and plain_ok else 1


if __name__ == "__main__":
    sys.exit(main())
