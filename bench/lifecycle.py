"""Lifecycle figures against a local Consul dev agent (issue targets in brackets).

    SIGTERM -> deregistration confirmed        median, p99 over N runs   [p99 <= 20 ms]
    sidecar start -> registered and passing    median, p99 over N runs   [<= 300 ms]
      (the app is already up and healthy: alongside mode, so only the sidecar starts)
    sidecar resident memory                    median over N runs        [<= 40 MB]
    sidecar CPU while idle (registered)        over IDLE seconds         [<= 0.3 % of one core]
    the status server's cost (/metrics, /ready on vs status.listen = "")
      start -> registered and passing (wall and CPU time), RSS after a scrape of /metrics and /ready
                                               medians, over and ratio   [<= 30 ms, <= 3 MB over]

Usage: python bench/lifecycle.py [--runs 50] [--idle 60] [--old REF]
The status server's runs alternate (off, on) so both see the same load on the machine.
With --old, a sidecar of REF's code (``git archive REF sidecar``) idles beside the new one over the
same window, so both CPU figures see the same load on the machine.
Everything it starts is stopped at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trees import unpack  # noqa: E402

from testkit import (  # noqa: E402
    Consul,
    Sidecar,
    app_command,
    free_port,
    http_get,
    kill_all_started,
    spawn,
    wait_for,
    write_config,
)


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
    """CPU time of the process's live threads, from the scheduler's nanoseconds: /proc/PID/stat
    counts 10 ms ticks, too coarse for a tenth of a percent over a minute. (A thread that ended
    within the window would be missing: that can only make a figure lower.)"""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total / 1e9


def passing(consul: Consul, name: str) -> bool:
    with urllib.request.urlopen(f"{consul.address}/v1/health/service/{name}?passing=1", timeout=2) as r:
        return bool(json.loads(r.read()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--idle", type=float, default=60.0, help="seconds of idle CPU measurement")
    ap.add_argument("--old", metavar="REF", help="also measure the idle CPU of this git ref's code, in the same window")
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

        cost = status_cost(work, consul, port, args.runs)

        # Idle CPU: one registered sidecar, keeping its registration (check interval 1 s).
        sc = Sidecar(work, config(consul, "idle", port, app={}, check={"interval": "1s"}), None)
        sc.wait_event("sidecar.consul.registered")
        old_cfg = config(consul, "idle-old", port, app={}, check={"interval": "1s"})
        old = start_old(work, args.old, old_cfg) if args.old else None
        if old is not None:
            wait_for(lambda: passing(consul, "idle-old"), 15, what="the old code's sidecar registered")
        time.sleep(2)
        c0, w0 = cpu_seconds(sc.pid), time.monotonic()
        old_c0 = cpu_seconds(old.pid) if old is not None else 0.0
        time.sleep(args.idle)
        idle_pct = (cpu_seconds(sc.pid) - c0) / (time.monotonic() - w0) * 100
        old_pct = (cpu_seconds(old.pid) - old_c0) / (time.monotonic() - w0) * 100 if old is not None else None
        idle_rss = rss_mb(sc.pid)
        old_rss = rss_mb(old.pid) if old is not None else None
        sc.send(signal.SIGTERM)
        sc.wait(15)
        if old is not None:
            old.send_signal(signal.SIGTERM)
            old.wait(15)
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
    print(f"{'CPU while idle, % of one core':44} {idle_pct:9.2f} {'':>9} {'<= 0.3':>12}")
    if old_pct is not None and old_rss is not None:
        print(f"{args.old + ' (same window): CPU while idle, %':44} {old_pct:9.2f}")
        print(f"{args.old + ' (same window): memory after idle period (MB)':44} {old_rss:9.1f}")
    print(
        f"(idle measured over {args.idle:g} s with the registration checked every 1 s; "
        "p99 column for memory is the max)"
    )
    print()
    print(f"status server (/metrics, /ready) on vs off ({args.runs} runs each, alternating): medians")
    print(f"{'measure':44} {'off':>9} {'on':>9} {'over':>9} {'ratio':>7} {'target':>10}")
    for what, key, unit, target in (
        ("start -> registered and passing", "start_ms", "ms", "<= 30 ms"),
        ("CPU time until registered and passing", "cpu_ms", "ms", ""),
        ("resident memory after a scrape", "rss", "MB", "<= 3 MB"),
    ):
        off, on = statistics.median(cost[key][False]), statistics.median(cost[key][True])
        print(f"{what + f' ({unit})':44} {off:9.1f} {on:9.1f} {on - off:9.1f} {on / off:7.3f} {target:>10}")
    return 0


def status_cost(work: Path, consul: Consul, port: int, runs: int) -> dict[str, dict[bool, list[float]]]:
    """Start time and RSS of a sidecar without its status server and with it (scraped once on
    /metrics and /ready before the RSS is read, so the code behind them is loaded)."""
    out: dict[str, dict[bool, list[float]]] = {k: {False: [], True: []} for k in ("start_ms", "cpu_ms", "rss")}
    for i in range(runs):
        for on in (False, True):
            name = f"cost{i}{'on' if on else 'off'}"
            status: dict[str, object] = {"listen": "127.0.0.1:0" if on else ""}
            t0 = time.monotonic()
            sc = Sidecar(work, config(consul, name, port, app={}, status=status), None)
            wait_for(functools.partial(passing, consul, name), 15, 0.002, "registered and passing")
            out["start_ms"][on].append((time.monotonic() - t0) * 1000)
            # CPU spent until then: what the start costs, less blurred than wall time by other load.
            out["cpu_ms"][on].append(cpu_seconds(sc.pid) * 1000)
            if on:
                base = sc.status_url()
                for path in ("/metrics", "/ready"):
                    code, body = http_get(base + path, timeout=5)
                    if code != 200:
                        print(f"status cost run {i + 1}: {path} answered {code}: {body.decode()}", file=sys.stderr)
            out["rss"][on].append(rss_mb(sc.pid))
            sc.send(signal.SIGTERM)
            sc.wait(15)
        print(
            f"status cost run {i + 1}/{runs}: start off {out['start_ms'][False][-1]:.0f} ms, "
            f"on {out['start_ms'][True][-1]:.0f} ms",
            file=sys.stderr,
        )
    return out


def start_old(work: Path, ref: str, cfg: dict[str, dict[str, object]]) -> subprocess.Popen[bytes]:
    """A sidecar running ``ref``'s code: its package from git, the same interpreter and virtualenv."""
    tree = unpack(ref, work / "old")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")}
    env["PYTHONPATH"] = str(tree)  # -P below: the current directory does not come first
    config_file = write_config(work / "old.toml", cfg)
    argv = [sys.executable, "-P", "-m", "sidecar", "run", "-c", str(config_file), "--log-format", "json"]
    return spawn(argv, work / "old.log", env)


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
