"""Hot-restart benchmark: K hot restarts and K plain restarts of one instance, the same load.

Per run, on a fresh sidecar: open-loop load straight at the instance (no balancer), 2 s steady, then
one hot restart (SIGUSR2) or one plain restart (the sidecar stopped with SIGTERM, then started
again), then 1 s more. Reports requests lost (refused + failed), the time from SIGUSR2 to the old
generation's exit, and p99 latency of the requests started during the restart against the steady
state before it, with the ratio taken within each run. Target: 0 lost in every hot run, some lost
in every plain run, and the catalog watcher seeing the instance passing throughout every hot run.

Usage: python bench/hot_restart.py [--runs 5] [--rate 200] [--server gunicorn|uvicorn|example|uvicorn-plain]
Everything it starts is stopped at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import statistics
import sys
import tempfile
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples.hot_restart.scenario import Run, hot_run, plain_run  # noqa: E402
from testkit import Consul, kill_all_started  # noqa: E402
from testkit.hotrestart import ALL_SERVERS  # noqa: E402


def median(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return statistics.median(finite) if finite else math.nan


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--server", choices=ALL_SERVERS, default="gunicorn")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-hot-restart-"))
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        runs = measure(args, work)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping everything", file=sys.stderr)
        return 130
    finally:
        kill_all_started()
    return report(args, runs)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through the same finally blocks as Ctrl-C


def measure(args: argparse.Namespace, work: Path) -> list[Run]:
    runs: list[Run] = []
    consul = Consul(work)
    consul.start()
    for i in range(args.runs):
        for mode in ("hot", "plain"):  # interleaved, so both modes see the same machine noise
            name = f"bench{i}{mode}"
            quiet = lambda _: None  # noqa: E731
            if mode == "hot":
                r = hot_run(work / name, consul, name, args.server, args.rate, log=quiet)
            else:
                r = plain_run(work / name, consul, name, args.server, args.rate, log=quiet)
            print(
                f"run {i + 1}/{args.runs} {mode:5}: {r.lost} lost of {len(r.result.hits)}, "
                f"restart {r.t_end - r.t_begin:.2f}s",
                file=sys.stderr,
            )
            runs.append(r)
    return runs


def report(args: argparse.Namespace, runs: list[Run]) -> int:
    print(
        f"\nhot-restart benchmark: {args.runs} runs per mode, {args.server} under the sidecar, "
        f"{args.rate:g} requests/s straight at the instance (a new connection each), 2 s steady, 1 s after"
    )
    print(
        f"{'mode':6} {'run':>3} {'requests':>9} {'refused':>8} {'failed':>7} {'old exit s':>11} "
        f"{'p99 steady ms':>14} {'p99 restart ms':>15} {'ratio':>6} {'not passing s':>14}"
    )
    for mode in ("hot", "plain"):
        for i, r in enumerate([r for r in runs if r.mode == mode], 1):
            ratio = r.p99_restart_ms / r.p99_steady_ms if r.p99_steady_ms > 0 else math.nan
            print(
                f"{mode:6} {i:3d} {len(r.result.hits):9d} {len(r.result.refused):8d} {len(r.result.failed):7d} "
                f"{r.old_exit_seconds:11.2f} {r.p99_steady_ms:14.1f} {r.p99_restart_ms:15.1f} {ratio:6.2f} "
                f"{r.not_passing_seconds:14.1f}"
            )
    print()
    for mode in ("hot", "plain"):
        rows = [r for r in runs if r.mode == mode]
        ratios = [r.p99_restart_ms / r.p99_steady_ms for r in rows if r.p99_steady_ms > 0]
        line = (
            f"{mode:6} median lost {median([float(r.lost) for r in rows]):g}, "
            f"runs with losses {sum(r.lost > 0 for r in rows)}/{len(rows)}, "
            f"median p99 steady {median([r.p99_steady_ms for r in rows]):.1f} ms, "
            f"during the restart {median([r.p99_restart_ms for r in rows]):.1f} ms "
            f"(median ratio within a run {median(ratios):.2f})"
        )
        if mode == "hot":
            line += f", median SIGUSR2 -> old generation's exit {median([r.old_exit_seconds for r in rows]):.2f}s"
        else:
            line += f", median stop -> registered again {median([r.t_end - r.t_begin for r in rows]):.2f}s"
        print(line)
    hot = [r for r in runs if r.mode == "hot"]
    plain = [r for r in runs if r.mode == "plain"]
    load = os.getloadavg()[0]
    print(f"load average at the end: {load:.1f} on {os.cpu_count() or 1} cores")
    if load > 2 * (os.cpu_count() or 1):
        print("warning: the machine was busy; latencies are the machine's as much as the restart's")
    ok = all(r.lost == 0 and r.not_passing_seconds == 0 for r in hot) and all(r.lost > 0 for r in plain)
    print(
        "target met: 0 lost and passing throughout in every hot run, losses in every plain run"
        if ok
        else "TARGET MISSED"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
