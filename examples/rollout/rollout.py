"""A surge rolling update behind nginx, under open-loop load, with or without the sidecar's drain.

start v1 x N (each wrapped by the sidecar) -> load through nginx ->
for each old instance: start its v2 replacement on a fresh loopback address,
`consul-sidecar wait --passing`, then stop the old one:
    sidecar mode: SIGTERM to the old instance's sidecar (deregister, wait, stop the app)
    naive mode:   SIGTERM straight to the old app (what happens without the sidecar's order;
                  its sidecar deregisters only after the app has died, like registrator)
-> keep the load on a few seconds -> stop the load -> count failures from the client's own records.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from testkit import APP, PY, ROOT, Consul, Sidecar, free_port, pid_alive, wait_for

from .loadgen import Record, run_load
from .nginx import Nginx


@dataclass
class Instance:
    address: str
    version: str
    sidecar: Sidecar

    @property
    def service_id(self) -> str:
        return f"web-{self.address}"

    def app_pid(self) -> int:
        return self.sidecar.app_pid()


@dataclass
class Step:
    old: str
    new: str
    started_new: float  # seconds since the load began
    new_passing: float
    stop_sent: float
    old_gone: float
    # From the old instance's sidecar log (None when it did not log them, e.g. naive).
    deregistered: float | None = None
    app_signalled: float | None = None


@dataclass
class RolloutResult:
    mode: str
    records: list[Record]
    steps: list[Step]
    rollout_start: float
    rollout_end: float
    load_end: float
    sidecar_rss_mb: list[float] = field(default_factory=list)

    @property
    def rollout_seconds(self) -> float:
        return self.rollout_end - self.rollout_start

    def marks(self) -> list[tuple[float, str]]:
        return [(t, label) for t, label, _ in self.kinded_marks()]

    def kinded_marks(self) -> list[tuple[float, str, str]]:
        """(seconds, label, kind) with kinds as in timeline.MARK_STYLES."""
        out: list[tuple[float, str, str]] = []
        for i, s in enumerate(self.steps, 1):
            out.append((s.new_passing, f"v2 #{i} passing", "passing"))
            out.append((s.stop_sent, f"v1 #{i} stop", "stop"))
            if s.deregistered is not None:
                out.append((s.deregistered, f"v1 #{i} dereg.", "deregistered"))
            if s.app_signalled is not None:
                out.append((s.app_signalled, f"v1 #{i} app signalled", "signalled"))
        return out


class Cluster:
    """Consul, nginx and the instances of service `web`, all on loopback."""

    def __init__(
        self,
        workdir: Path,
        app_port: int | None = None,
        propagation_delay: str = "3s",
        log: Callable[[str], None] = print,
        shutdown: dict[str, Any] | None = None,
    ) -> None:
        self.workdir = workdir
        self.app_port = app_port or free_port()
        # The sidecars' [shutdown] section: a fixed delay unless the caller says otherwise.
        self.shutdown: dict[str, Any] = {
            "propagation_delay": propagation_delay,
            "app_timeout": "10s",
            **(shutdown or {}),
        }
        self.log = log
        self.consul = Consul(workdir)
        self.nginx = Nginx(workdir / "nginx", self.consul.dns_port, free_port(), self.app_port)
        self.instances: list[Instance] = []
        self.stopped: list[Instance] = []
        self._next_host = 2

    def start(self) -> None:
        self.nginx.test_config()
        self.consul.start()
        self.log(f"consul agent -dev: HTTP {self.consul.address}, DNS 127.0.0.1:{self.consul.dns_port}")
        self.nginx.start()
        self.log(
            f"nginx: {self.nginx.url} -> web.service.consul:{self.app_port} "
            "(resolver valid=1s, proxy_next_upstream off)"
        )

    def next_address(self) -> str:
        addr = f"127.0.0.{self._next_host}"
        self._next_host += 1
        return addr

    def start_instance(self, version: str) -> Instance:
        address = self.next_address()
        config: dict[str, dict[str, Any]] = {
            "consul": {"address": self.consul.address},
            "service": {
                "name": "web",
                "id": f"web-{address}",
                "address": address,
                "port": self.app_port,
                "tags": [version],
                "meta": {"version": version},
            },
            "check": {"interval": "1s", "timeout": "1s"},
            "shutdown": dict(self.shutdown),
            "status": {"listen": ""},
        }
        command = [PY, str(APP), "--host", address, "--port", str(self.app_port), "--version", version]
        inst = Instance(address, version, Sidecar(self.workdir, config, command))
        self.instances.append(inst)
        return inst

    def wait_passing(self, inst: Instance, timeout: str = "30s") -> None:
        """`consul-sidecar wait --passing`, as a deploy script would run it."""
        subprocess.run(
            [
                PY,
                "-m",
                "sidecar",
                "wait",
                "--consul-address",
                self.consul.address,
                "--service",
                "web",
                "--id",
                inst.service_id,
                "--passing",
                "--timeout",
                timeout,
            ],
            check=True,
            capture_output=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )

    def stop_instance(self, inst: Instance, naive: bool) -> None:
        if naive:
            os.kill(inst.app_pid(), signal.SIGTERM)
        else:
            inst.sidecar.send(signal.SIGTERM)
        inst.sidecar.wait(60)
        self.instances.remove(inst)
        self.stopped.append(inst)

    def stop(self) -> None:
        for inst in list(self.instances):
            if inst.sidecar.proc.poll() is None:
                inst.sidecar.send(signal.SIGTERM)
        for inst in list(self.instances):
            try:
                inst.sidecar.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        self.nginx.stop()
        self.consul.stop()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def rollout(
    cluster: Cluster,
    naive: bool,
    replicas: int = 3,
    rate: float = 300.0,
    warmup: float = 3.0,
    cooldown: float = 3.0,
    log: Callable[[str], None] = print,
) -> RolloutResult:
    """Run one rolling update v1 -> v2 under load; every process it starts it leaves to cluster.stop()."""
    mode = "naive" if naive else "sidecar"
    run = asyncio.to_thread
    old = [cluster.start_instance("v1") for _ in range(replicas)]
    for inst in old:
        await run(cluster.wait_passing, inst)
    log(f"[{mode}] {replicas} x v1 passing: {', '.join(i.address for i in old)}")
    rss = [rss_mb(i.sidecar.pid) for i in old]

    stop = asyncio.Event()
    t0 = time.monotonic()
    t0_wall = time.time()
    load = asyncio.create_task(run_load(cluster.nginx.url, rate, stop, timeout=5.0, t0=t0))
    now: Callable[[], float] = lambda: time.monotonic() - t0  # noqa: E731
    log(f"[{mode}] load: {rate:g} requests/s through nginx, open loop")
    await asyncio.sleep(warmup)
    steps: list[Step] = []
    rollout_start = now()
    for n, inst in enumerate(old, 1):
        started = now()
        new = cluster.start_instance("v2")
        await run(cluster.wait_passing, new)
        passing = now()
        log(
            f"[{mode}] step {n}/{replicas}: v2 {new.address} passing after {passing - started:.1f}s; "
            f"stopping v1 {inst.address}" + (" (SIGTERM to the app)" if naive else " (SIGTERM to its sidecar)")
        )
        sent = now()
        await run(cluster.stop_instance, inst, naive)
        gone = now()
        log(f"[{mode}] step {n}/{replicas}: v1 {inst.address} stopped after {gone - sent:.1f}s")
        dereg, signalled = _drain_times(inst, t0_wall)
        steps.append(Step(inst.address, new.address, started, passing, sent, gone, dereg, sent if naive else signalled))
    rollout_end = now()
    await asyncio.sleep(cooldown)
    stop.set()
    records = await load
    return RolloutResult(mode, records, steps, rollout_start, rollout_end, now(), rss)


def _drain_times(inst: Instance, t0_wall: float) -> tuple[float | None, float | None]:
    """When the old instance's sidecar confirmed its deregistration and when it signalled the
    app (the end of the delay), in seconds since the load began, from its JSON log."""

    def at(name: str) -> float | None:
        ev = inst.sidecar.event(name)
        if not ev or "timestamp" not in ev:
            return None
        return datetime.fromisoformat(str(ev["timestamp"]).replace("Z", "+00:00")).timestamp() - t0_wall

    return at("sidecar.consul.deregistered"), at("sidecar.drain.delay_done")


def sidecar_pids(cluster: Cluster) -> list[int]:
    return [i.sidecar.pid for i in cluster.instances if pid_alive(i.sidecar.pid)]


def wait_all_gone(cluster: Cluster, timeout: float = 30) -> Any:
    return wait_for(lambda: not sidecar_pids(cluster), timeout, 0.1, "instances to stop")
