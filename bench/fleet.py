"""Fleet figures: N sidecars on one local agent, started at once, then SIGTERMed at once.

Usage: python bench/fleet.py [--n 50] [--runs 3]
Prints, per run and as medians: start -> all N registered and passing; SIGTERM -> all gone from the
catalog; SIGTERM -> all sidecars exited (propagation_delay 1s included). Stops everything it starts.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples.rollout.fleet import FleetResult, run_fleet  # noqa: E402
from testkit import Consul, kill_all_started  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    results: list[FleetResult] = []
    try:
        for i in range(args.runs):
            work = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
            consul = Consul(work)
            consul.start()
            try:
                r = run_fleet(consul, work, n=args.n, name=f"fleet{i}")
            finally:
                consul.stop()
                kill_all_started()
            ok = not r.left_in_catalog and not r.signalled_before_gone and r.exit_codes == [0] * args.n
            print(
                f"run {i + 1}: all passing {r.start_to_all_passing:.1f}s, "
                f"all gone {r.sigterm_to_all_gone * 1000:.0f}ms, "
                f"all exited {r.sigterm_to_all_exited:.1f}s, {'ok' if ok else 'NOT OK'}",
                file=sys.stderr,
            )
            results.append(r)
    finally:
        kill_all_started()
    print(f"\n{args.n} sidecars on one agent, {args.runs} runs (medians)")
    print(f"start -> all registered and passing   {statistics.median(r.start_to_all_passing for r in results):7.1f} s")
    gone_ms = statistics.median(r.sigterm_to_all_gone for r in results) * 1000
    exited_s = statistics.median(r.sigterm_to_all_exited for r in results)
    print(f"SIGTERM -> all gone from the catalog  {gone_ms:7.0f} ms")
    print(f"SIGTERM -> all sidecars exited        {exited_s:7.1f} s  (includes propagation_delay 1 s)")
    bad = [r for r in results if r.left_in_catalog or r.signalled_before_gone]
    print(f"left in the catalog or signalled before deregistration: {len(bad)} of {len(results)} runs")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
