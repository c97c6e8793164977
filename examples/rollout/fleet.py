"""Many sidecars on one agent: start N at once, wait until all pass, SIGTERM all at once.

Used by tests/test_fleet.py (correctness: nobody left in the catalog, no app signalled
before its own deregistration) and bench/fleet.py (how long each phase takes).
"""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testkit import APP, PY, Consul, Sidecar, free_port, private_loopback_net, read_signal_log, wait_for

AppCommand = Callable[[str, int, Path], list[str]]
"""(address, port, signal log) -> the app's command line."""


def example_app(address: str, port: int, signal_log: Path) -> list[str]:
    return [PY, str(APP), "--host", address, "--port", str(port), "--signal-log", str(signal_log)]


class CatalogWatcher(threading.Thread):
    """Follows /v1/health/service/<name> with blocking queries; records (monotonic time, IDs) per change."""

    def __init__(self, consul: Consul, name: str) -> None:
        super().__init__(daemon=True)
        self.consul, self.name = consul, name
        self.changes: list[tuple[float, list[str]]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        index = "0"
        headers = {"X-Consul-Token": self.consul.admin_token} if self.consul.admin_token else {}
        while not self.stop.is_set():
            url = f"{self.consul.address}/v1/health/service/{self.name}?index={index}&wait=2s"
            try:
                with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as r:
                    body = json.loads(r.read())
                    new_index = r.headers["X-Consul-Index"]
            except OSError:
                time.sleep(0.05)
                continue
            ids = sorted(e["Service"]["ID"] for e in body)
            if not self.changes or self.changes[-1][1] != ids:
                self.changes.append((time.monotonic(), ids))
            index = new_index if int(new_index) >= int(index) else "0"

    def first_time(self, pred: object) -> float | None:
        return next((t for t, ids in self.changes if pred(ids)), None)  # type: ignore[operator]

    def gone_at(self, sid: str) -> float | None:
        """When ``sid`` was first seen absent after having been present."""
        present = False
        for t, ids in self.changes:
            if sid in ids:
                present = True
            elif present:
                return t
        return None


@dataclass
class FleetResult:
    n: int
    start_to_all_passing: float
    sigterm_to_all_gone: float
    sigterm_to_all_exited: float
    exit_codes: list[int]
    left_in_catalog: list[str]
    signalled_before_gone: list[str] = field(default_factory=list)
    never_signalled: list[str] = field(default_factory=list)


def run_fleet(
    consul: Consul,
    workdir: Path,
    n: int = 50,
    name: str = "fleet",
    propagation_delay: str = "1s",
    nice: int = 0,
    app: AppCommand = example_app,
    up_timeout: float = 180,
) -> FleetResult:
    """Start ``n`` sidecars at once and wait until all pass; SIGTERM all at once and watch them go.

    Each app gets an address of its own in a /24 of 127.0.0.0/8 that nobody else uses, and a port
    free there: no other program's free-port probe can take it before the app binds it. A sidecar
    that exits before the fleet is up fails the run at once, naming the instance, with its log's
    last lines (not after ``up_timeout``). ``nice`` runs the sidecars and apps at that niceness.
    """
    net = private_loopback_net()
    sidecars: list[tuple[str, Sidecar, Path]] = []
    t0 = time.monotonic()
    for i in range(n):
        sid = f"{name}-{i}"
        address = f"{net}.{i + 1}"
        app_port = free_port(address)
        siglog = workdir / f"{sid}.signals"
        config: dict[str, dict[str, Any]] = {
            "consul": {"address": consul.address, "timeout": "5s"},
            "service": {"name": name, "id": sid, "address": address, "port": app_port},
            "check": {"interval": "2s", "timeout": "2s"},
            "startup": {"timeout": "120s"},
            "shutdown": {"propagation_delay": propagation_delay, "deregister_timeout": "10s", "app_timeout": "20s"},
            "status": {"listen": ""},
        }
        sidecars.append((sid, Sidecar(workdir, config, app(address, app_port, siglog), nice=nice), siglog))

    def passing() -> set[str]:
        return {e["Service"]["ID"] for e in consul.get(f"/v1/health/service/{name}?passing=1") or []}

    def all_passing() -> bool:
        for sid, sc, _ in sidecars:
            if sc.proc.poll() is not None:
                raise AssertionError(
                    f"{sid}: its sidecar exited (status {sc.proc.returncode}) before all {n} instances were "
                    f"passing; the last lines of its log {sc.log}:\n{sc.tail(20)}"
                )
        return len(passing()) == n

    try:
        wait_for(all_passing, up_timeout, 0.2, f"{n} passing instances")
    except AssertionError as e:
        if "timed out" not in str(e):
            raise
        missing = sorted(set(sid for sid, _, _ in sidecars) - passing())
        raise AssertionError(f"{e}; not passing: {', '.join(missing) or 'none'}") from None
    start_to_all_passing = time.monotonic() - t0

    watcher = CatalogWatcher(consul, name)
    watcher.start()
    wait_for(lambda: watcher.changes and len(watcher.changes[-1][1]) == n, 10, what="the watcher to see every instance")
    sent = time.monotonic()
    for _, sc, _ in sidecars:
        sc.send(signal.SIGTERM)
    wait_for(lambda: consul.instances(name) == [], 60, 0.05, "every instance gone from the catalog")
    all_gone = time.monotonic() - sent
    codes = [sc.wait(60) for _, sc, _ in sidecars]
    all_exited = time.monotonic() - sent
    time.sleep(0.3)
    watcher.stop.set()

    result = FleetResult(
        n, start_to_all_passing, all_gone, all_exited, codes, [e["Service"]["ID"] for e in consul.instances(name)]
    )
    for sid, _, siglog in sidecars:
        signals = [t for s, t in read_signal_log(siglog) if s == "SIGTERM"]
        gone = watcher.gone_at(sid)
        if not signals:
            result.never_signalled.append(sid)
        elif gone is None or signals[0] < gone:
            result.signalled_before_gone.append(sid)
    return result
