"""Lifecycle figures against a local Consul dev agent (issue targets in brackets).

    SIGTERM -> deregistration confirmed        median, p99 over N runs   [p99 <= 20 ms]
    sidecar start -> registered and passing    median, p99 over N runs   [<= 300 ms]
      (the app is already up and healthy: alongside mode, so only the sidecar starts)
    sidecar resident memory                    median over N runs        [<= 40 MB]
    sidecar CPU while idle (registered)        over IDLE seconds         [<= 0.5 % of one core]

Usage: python bench/lifecycle.py [--runs 50] [--idle 60]
Everything it starts is stopped at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from testkit import Consul, Sidecar, app_command, free_port, kill_all_started, spawn, wait_for  # noqa: E402


def config(consul: Consul, name: str, port: int, **extra: dict[str, object]) -> dict[str, dict[str, object]]:
    cfg: dict[str, dict[str, object]] = {
        "consul": {"address": consul.address},
        "service": {"name": name, "id": f"{name}-1", "address": "127.0.0.1", "port": port},
        "check": {"interval": "10s"},
        "shutdown": {"propagation_delay": "0s"},
        "status": {"listen": ""},
    }
    for k, v in extra.items():
        cfg.setdefault(k, {}).update(v)
    return cfg


def ts(event: dict[str, object]) -> float:
    return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def passing(consul: Consul, name: str) -> bool:
    with urllib.request.urlopen(f"{consul.address}/v1/health/service/{name}?passing=1", timeout=2) as r:
        return bool(json.loads(r.read()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--idle", type=float, default=60.0, help="seconds of idle CPU measurement")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-lifecycle-"))
    consul = Consul(work)
    try:
        consul.start()
        version = consul_version(consul)
        port = free_port()
        app = spawn(app_command(port), work / "app.log")
        wait_for(lambda: _answers(port), 10, what="the app")

        dereg_ms: list[float] = []
        start_ms: list[float] = []
        rss: list[float] = []
        for i in range(args.runs):
            name = f"bench{i}"
            t0 = time.monotonic()
            sc = Sidecar(work, config(consul, name, port, app={}), None)  # alongside, no [app]: nothing to stop
            wait_for(functools.partial(passing, consul, name), 15, 0.002, "registered and passing")
            start_ms.append((time.monotonic() - t0) * 1000)
            rss.append(rss_mb(sc.pid))
            sc.send(signal.SIGTERM)
            sc.wait(15)
            got = sc.wait_event("sidecar.consul.deregistered")
            sent = sc.wait_event("sidecar.signal.received")
            dereg_ms.append((ts(got) - ts(sent)) * 1000)
            print(
                f"run {i + 1}/{args.runs}: start {start_ms[-1]:.0f} ms, deregistered {dereg_ms[-1]:.1f} ms",
                file=sys.stderr,
            )

        # Idle CPU: one registered sidecar, keeping its registration (check interval 1 s).
        sc = Sidecar(work, config(consul, "idle", port, app={}, check={"interval": "1s"}), None)
        sc.wait_event("sidecar.consul.registered")
        time.sleep(2)
        c0, w0 = cpu_seconds(sc.pid), time.monotonic()
        time.sleep(args.idle)
        idle_pct = (cpu_seconds(sc.pid) - c0) / (time.monotonic() - w0) * 100
        idle_rss = rss_mb(sc.pid)
        sc.send(signal.SIGTERM)
        sc.wait(15)
        app.send_signal(signal.SIGTERM)
        app.wait(10)
    finally:
        kill_all_started()

    print()
    print(f"consul-sidecar lifecycle figures ({args.runs} runs, Consul {version}, {os.cpu_count()} cores)")
    print(f"{'measure':44} {'median':>9} {'p99':>9} {'target':>12}")
    print(
        f"{'SIGTERM -> deregistration confirmed (ms)':44} "
        f"{statistics.median(dereg_ms):9.1f} {pct(dereg_ms, 99):9.1f} {'p99 <= 20':>12}"
    )
    print(
        f"{'start -> registered and passing (ms)':44} "
        f"{statistics.median(start_ms):9.0f} {pct(start_ms, 99):9.0f} {'<= 300':>12}"
    )
    print(f"{'resident memory after registration (MB)':44} {statistics.median(rss):9.1f} {max(rss):9.1f} {'<= 40':>12}")
    print(f"{'resident memory after idle period (MB)':44} {idle_rss:9.1f} {'':>9} {'<= 40':>12}")
    print(f"{'CPU while idle, % of one core':44} {idle_pct:9.2f} {'':>9} {'<= 0.5':>12}")
    print(
        f"(idle measured over {args.idle:g} s with the registration checked every 1 s; "
        "p99 column for memory is the max)"
    )
    return 0


def _answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
            return True
    except OSError:
        return False


def consul_version(consul: Consul) -> str:
    try:
        with urllib.request.urlopen(f"{consul.address}/v1/agent/self", timeout=2) as r:
            return str(json.loads(r.read())["Config"]["Version"])
    except (OSError, KeyError):
        return "?"


if __name__ == "__main__":
    sys.exit(main())
