"""The rolling-update demo: ``python -m examples.rollout`` (``scripts/demo`` sets up and runs it).

By default it runs the rollout twice on fresh clusters: once with the sidecar's
drain, once naive (SIGTERM straight to the app), and prints both side by side.
Everything it starts is stopped at the end, also on failure, Ctrl-C or SIGTERM.

--registry consul (the default): Consul, nginx following Consul DNS (resolver valid=1s).
--registry etcd: etcd (registry.kind = "etcd"), nginx whose upstream a confd-like watcher
(testkit/etcd_watch.py) renders from the etcd prefix and reloads --lag seconds after each change.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from testkit import ROOT, kill_all_started, leftovers

if TYPE_CHECKING:
    from .loadgen import Summary
    from .rollout import RolloutResult


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through the same finally blocks as Ctrl-C


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="scripts/demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="scripts/demo --hot-restart [options] runs the hot-restart demo instead "
        "(scripts/demo --hot-restart --help).",
    )
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--naive", action="store_true", help="only the control: SIGTERM straight to the old apps")
    mode.add_argument("--sidecar-only", action="store_true", help="only the rollout with the sidecar's drain")
    ap.add_argument(
        "--registry",
        choices=("consul", "etcd"),
        default="consul",
        help="where the instances register and what nginx follows (default consul)",
    )
    ap.add_argument(
        "--lag",
        type=float,
        default=1.0,
        help="etcd: seconds the watcher waits before applying a change to nginx, a consumer's horizon (default 1)",
    )
    ap.add_argument("--replicas", type=int, default=3, help="instances of v1 to replace (default 3)")
    ap.add_argument("--rate", type=float, default=300.0, help="requests per second through nginx (default 300)")
    ap.add_argument(
        "--propagation-delay", default="3s", help='the sidecar\'s shutdown.propagation_delay (default "3s")'
    )
    ap.add_argument(
        "--strategy",
        choices=("fixed", "traffic"),
        default="fixed",
        help="the sidecars' shutdown.strategy; traffic waits for a quiet port, bounded by 30s (default fixed)",
    )
    ap.add_argument(
        "--out", type=Path, default=ROOT / "out", help="where the PNG timeline and the CSVs go (default out/)"
    )
    ap.add_argument("--no-plot", action="store_true", help="skip the PNG timeline")
    args = ap.parse_args(argv)
    if not args.lag >= 0:
        ap.error(f"--lag must be a number of seconds >= 0, not {args.lag}")
    return args


def row(label: str, s: Summary, r: RolloutResult) -> str:
    from .loadgen import summarize

    v1, v2 = s.by_version.get("v1", 0), s.by_version.get("v2", 0)
    # p99 in steady state (before the rollout) and during it, as bench/rollout.py shows them: one p99
    # over the whole run mixes the machine's stalls with the rollout's cost.
    steady = summarize(r.records, (0.0, r.rollout_start))
    during = summarize(r.records, (r.rollout_start, r.rollout_end))
    return (
        f"{label:9} {s.requests:9d} {s.failed:7d} {s.failure_rate * 100:8.2f}% {s.p50_ms:8.1f} "
        f"{steady.p99_ms:10.1f} {during.p99_ms:11.1f} {v1:8d} {v2:8d} {r.rollout_seconds:9.1f}s"
    )


HEADER = (
    f"{'rollout':9} {'requests':>9} {'failed':>7} {'fail rate':>9} {'p50 ms':>8} "
    f"{'p99 steady':>10} {'p99 rollout':>11} {'by v1':>8} {'by v2':>8} {'duration':>10}"
)


def report(
    results: list[RolloutResult],
    out: Path,
    plot: bool,
    strategy: str = "fixed",
    registry: str = "consul",
    lag: float = 1.0,
) -> None:
    from .loadgen import summarize, write_csv

    strategy_note = f" (strategy {strategy})" if strategy != "fixed" else ""
    follows = f" following etcd (watcher, lag {lag:g}s)" if registry == "etcd" else ""
    print()
    print(HEADER)
    for r in results:
        s = summarize(r.records)
        print(row(r.mode, s, r))
    print("(latencies in ms; p99 steady: the requests started before the rollout, p99 rollout: those during it)")
    for r in results:
        s = summarize(r.records)
        if s.errors:
            print(
                f"  {r.mode} failures: "
                + ", ".join(f"{k} x{v}" for k, v in sorted(s.errors.items(), key=lambda kv: -kv[1]))
            )
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("rollout*.*"):  # a previous run's files would read as this run's
        stale.unlink()
    for r in results:
        write_csv(r.records, out / f"rollout-{r.mode}.csv")
    if plot:
        from .timeline import Panel, plot_comparison

        panels = []
        for r in results:
            s = summarize(r.records)
            panels.append(
                Panel(
                    f"{r.mode}: {s.failed} failed of {s.requests} requests",
                    r.records,
                    r.kinded_marks(),
                    (r.rollout_start, r.rollout_end),
                )
            )
        plot_comparison(
            panels,
            out / "rollout.png",
            f"rolling update v1 -> v2 behind nginx{follows}{strategy_note}",
            caption=ETCD_CAPTION.format(lag=lag) if registry == "etcd" else NAIVE_CAPTION,
        )
    print(f"\nper-request records: {out}/rollout-*.csv" + (f"; timeline: {out}/rollout.png" if plot else ""))


NAIVE_CAPTION = (
    "Naive: the app gets SIGTERM while it is still in Consul; its sidecar deregisters only after the app has gone. "
    "Failures go on after the last stop because nginx keeps the answer of its last DNS lookup for up to valid=1s "
    "after Consul dropped the instance. "
    "With the sidecar, the app is signalled only after the deregistration and the delay."
)


ETCD_CAPTION = (
    "Naive: the app gets SIGTERM while its key is still in etcd; its sidecar deletes the key only after the app "
    "has gone. Failures go on after each stop because the watcher applies etcd's changes to nginx {lag:g}s late "
    "(the consumer's horizon). With the sidecar, the app is signalled only after the confirmed delete and the delay."
)


async def run_modes(args: argparse.Namespace, work: Path) -> list[RolloutResult]:
    from .rollout import Cluster, EtcdWatchCluster, RolloutCluster, rollout

    modes = [True] if args.naive else [False] if args.sidecar_only else [False, True]
    results = []
    for naive in modes:
        mode = "naive" if naive else "sidecar"
        shutdown = {"strategy": "traffic", "propagation_delay": "30s"} if args.strategy == "traffic" else None
        cluster: RolloutCluster
        if args.registry == "etcd":
            cluster = EtcdWatchCluster(
                work / mode, propagation_delay=args.propagation_delay, shutdown=shutdown, lag=args.lag
            )
        else:
            cluster = Cluster(work / mode, propagation_delay=args.propagation_delay, shutdown=shutdown)
        try:
            cluster.start()
            results.append(await rollout(cluster, naive, replicas=args.replicas, rate=args.rate))
        finally:
            cluster.stop()
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)  # before the heavy imports: --help needs none of them (nor the virtualenv)
    from .loadgen import summarize

    signal.signal(signal.SIGTERM, _on_sigterm)
    work = Path(tempfile.mkdtemp(prefix="consul-sidecar-demo-"))
    print(f"logs of every process (kept after the demo): {work}")
    t = time.monotonic()
    try:
        results = asyncio.run(run_modes(args, work))
    except KeyboardInterrupt:
        print("\ninterrupted: stopping everything", file=sys.stderr)
        return 130
    finally:
        kill_all_started()
        left = leftovers()
        if left:
            print(f"warning: processes still alive: {left}", file=sys.stderr)
    report(results, args.out, plot=not args.no_plot, strategy=args.strategy, registry=args.registry, lag=args.lag)
    print(f"demo took {time.monotonic() - t:.0f}s")
    # An overloaded host makes healthy instances miss their 1 s checks (Consul then marks them
    # critical and DNS answers NXDOMAIN; with etcd the sidecar deletes the key): failures in *both*
    # runs then say nothing about the sidecar.
    load = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    if load > 2 * cores:
        print(
            f"warning: this machine was overloaded during the demo (load average {load:.1f} on {cores} cores): "
            "health checks time out under such load, so failures here may be the machine's, not the drain's; "
            "run it again on a quieter machine"
        )
    verdict = 0
    for r in results:
        failed = summarize(r.records).failed
        if r.mode == "sidecar":
            ok = failed == 0
            print(f"with the sidecar: {'no request failed' if ok else f'{failed} requests FAILED'}")
        else:
            ok = failed > 0
            print(
                f"naive control: {failed} requests failed"
                + ("" if ok else " (expected some: the harness should see failures)")
            )
        verdict |= 0 if ok else 1
    return verdict


if __name__ == "__main__":
    sys.exit(main())
