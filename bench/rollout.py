"""Rollout benchmark: the demo's surge rollout K times with the sidecar and K times naive, same load.

Per run: failed requests, p99 latency during the rollout and in steady state
(before it), rollout duration, the sidecars' resident memory. Target: 0 failed
requests in every sidecar run, failures in every naive run.

Usage: python bench/rollout.py [--runs 5] [--rate 300] [--replicas 3] [--propagation-delay 3s]
                               [--registry consul|etcd] [--lag 1]
--registry etcd: etcd, and nginx's upstream rendered from the prefix by testkit/etcd_watch.py --lag s late.
Everything it starts is stopped at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples.rollout.loadgen import summarize  # noqa: E402
from examples.rollout.rollout import Cluster, EtcdWatchCluster, RolloutCluster, RolloutResult, rollout  # noqa: E402
from testkit import kill_all_started  # noqa: E402


async def one(work: Path, naive: bool, args: argparse.Namespace) -> RolloutResult:
    cluster: RolloutCluster
    if args.registry == "etcd":
        cluster = EtcdWatchCluster(work, propagation_delay=args.propagation_delay, log=lambda _: None, lag=args.lag)
    else:
        cluster = Cluster(work, propagation_delay=args.propagation_delay, log=lambda _: None)
    try:
        cluster.start()
        return await rollout(cluster, naive, replicas=args.replicas, rate=args.rate, log=lambda _: None)
    finally:
        cluster.stop()


async def main_async(args: argparse.Namespace) -> list[RolloutResult]:
    work = Path(tempfile.mkdtemp(prefix="bench-rollout-"))
    results = []
    for i in range(args.runs):
        for naive in (False, True):  # interleaved, so both modes see the same machine noise
            r = await one(work / f"{i}-{'naive' if naive else 'sidecar'}", naive, args)
            s = summarize(r.records)
            print(
                f"run {i + 1}/{args.runs} {r.mode:7}: {s.failed} failed of {s.requests}, "
                f"rollout {r.rollout_seconds:.1f}s"
                + (" (" + ", ".join(f"{k} x{v}" for k, v in sorted(s.errors.items(), key=lambda kv: -kv[1])) + ")")
                * bool(s.errors),
                file=sys.stderr,
            )
            results.append(r)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--rate", type=float, default=300.0)
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--propagation-delay", default="3s")
    ap.add_argument("--registry", choices=("consul", "etcd"), default="consul")
    ap.add_argument("--lag", type=float, default=1.0, help="etcd: the watcher's delay in seconds (default 1)")
    args = ap.parse_args()
    if not args.lag >= 0:
        ap.error("--lag must be >= 0")
    try:
        results = asyncio.run(main_async(args))
    finally:
        kill_all_started()

    follows = (
        f"upstream rendered from etcd by the watcher, lag {args.lag:g}s"
        if args.registry == "etcd"
        else "Consul DNS, resolver valid=1s"
    )
    print(
        f"\nrollout benchmark ({args.registry}): {args.runs} runs per mode, {args.replicas} instances v1 -> v2, "
        f"{args.rate:g} requests/s through nginx ({follows}), propagation_delay {args.propagation_delay}"
    )
    print(
        f"{'mode':8} {'run':>3} {'requests':>9} {'failed':>7} {'p99 steady ms':>14} {'p99 rollout ms':>15} "
        f"{'rollout s':>10} {'sidecar RSS MB':>15}"
    )
    for mode in ("sidecar", "naive"):
        rows = [r for r in results if r.mode == mode]
        for i, r in enumerate(rows, 1):
            steady = summarize(r.records, (0.0, r.rollout_start))
            during = summarize(r.records, (r.rollout_start, r.rollout_end))
            total = summarize(r.records)
            rss = statistics.median(r.sidecar_rss_mb) if r.sidecar_rss_mb else float("nan")
            print(
                f"{mode:8} {i:3d} {total.requests:9d} {total.failed:7d} {steady.p99_ms:14.1f} {during.p99_ms:15.1f} "
                f"{r.rollout_seconds:10.1f} {rss:15.1f}"
            )
    for mode in ("sidecar", "naive"):
        rows = [r for r in results if r.mode == mode]
        failed = [summarize(r.records).failed for r in rows]
        print(
            f"{mode:8} median failed {statistics.median(failed):g}, "
            f"runs with failures {sum(f > 0 for f in failed)}/{len(rows)}, "
            f"median rollout {statistics.median(r.rollout_seconds for r in rows):.1f}s"
        )
    sc = [summarize(r.records).failed for r in results if r.mode == "sidecar"]
    nv = [summarize(r.records).failed for r in results if r.mode == "naive"]
    ok = all(f == 0 for f in sc) and all(f > 0 for f in nv)
    print("target met: 0 failed in every sidecar run, failures in every naive run" if ok else "TARGET MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
