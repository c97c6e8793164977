"""A surge rolling update behind nginx, under open-loop load, with or without the sidecar's drain.

start v1 x N (each wrapped by the sidecar) -> load through nginx ->
for each old instance: start its v2 replacement on a fresh loopback address,
wait until it is registered and passing, then stop the old one:
    sidecar mode: SIGTERM to the old instance's sidecar (deregister, wait, stop the app)
    naive mode:   SIGTERM straight to the old app (what happens without the sidecar's order;
                  its sidecar deregisters only after the app has died, like registrator)
-> keep the load on a few seconds -> stop the load -> count failures from the client's own records.

Two registries, one harness: ``Cluster`` is Consul with nginx following Consul DNS (``resolver valid=1s``);
``EtcdWatchCluster`` is etcd with nginx whose upstream a confd-like watcher (testkit/etcd_watch.py) renders
from the etcd prefix, ``lag`` seconds after each change.
"""

from __future__ import annotations

import abc
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
from testkit.etcd import Etcd, get_prefix
from testkit.etcd_watch import EtcdWatcher

from .loadgen import Record, run_load, summarize
from .nginx import Nginx, UpstreamNginx


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
    # When nginx stopped routing to the old instance (etcd: the watcher's reload; None when unknown).
    balancer_dropped: float | None = None


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


class RolloutCluster(abc.ABC):
    """A registry, nginx following it and the instances of service `web`, all on loopback."""

    registry = ""

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
        self.instances: list[Instance] = []
        self.stopped: list[Instance] = []
        self._next_host = 2

    @property
    @abc.abstractmethod
    def nginx(self) -> Nginx:
        """The balancer the load goes through."""

    @abc.abstractmethod
    def start(self) -> None:
        """Start the registry and nginx (and whatever makes nginx follow the registry)."""

    @abc.abstractmethod
    def registry_config(self) -> dict[str, dict[str, Any]]:
        """The sidecars' sections that name the registry."""

    @abc.abstractmethod
    def wait_passing(self, inst: Instance, timeout: float = 30) -> None:
        """Until ``inst`` is registered and passing, as a deploy script would check it."""

    @abc.abstractmethod
    def stop_registry(self) -> None:
        """Stop nginx and the registry (the instances are stopped already)."""

    def next_address(self) -> str:
        addr = f"127.0.0.{self._next_host}"
        self._next_host += 1
        return addr

    def start_instance(self, version: str) -> Instance:
        address = self.next_address()
        config: dict[str, dict[str, Any]] = {
            **self.registry_config(),
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

    def stop_instance(self, inst: Instance, naive: bool) -> None:
        if naive:
            os.kill(inst.app_pid(), signal.SIGTERM)
        else:
            inst.sidecar.send(signal.SIGTERM)
        inst.sidecar.wait(60)
        self.instances.remove(inst)
        self.stopped.append(inst)

    def wait_routed(self, insts: list[Instance], timeout: float = 30) -> None:  # noqa: B027 - a no-op by default
        """Until nginx routes to exactly ``insts`` (before the load starts: the warm-up is steady state).
        Consul: nothing to wait for, nginx resolves each request's name (its cache is empty at start)."""

    def balancer_dropped(self, inst: Instance, t0_wall: float) -> float | None:
        """When nginx stopped routing to ``inst``, in seconds since the load began, if this harness knows."""
        return None

    def stop(self) -> None:
        for inst in list(self.instances):
            if inst.sidecar.proc.poll() is None:
                inst.sidecar.send(signal.SIGTERM)
        for inst in list(self.instances):
            try:
                inst.sidecar.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        self.stop_registry()


class Cluster(RolloutCluster):
    """Consul, nginx following Consul DNS and the instances of service `web`, all on loopback."""

    registry = "consul"

    def __init__(
        self,
        workdir: Path,
        app_port: int | None = None,
        propagation_delay: str = "3s",
        log: Callable[[str], None] = print,
        shutdown: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(workdir, app_port, propagation_delay, log, shutdown)
        self.consul = Consul(workdir)
        self._nginx = Nginx(workdir / "nginx", self.consul.dns_port, free_port(), self.app_port)

    @property
    def nginx(self) -> Nginx:
        return self._nginx

    def start(self) -> None:
        self.nginx.test_config()
        self.consul.start()
        self.log(f"consul agent -dev: HTTP {self.consul.address}, DNS 127.0.0.1:{self.consul.dns_port}")
        self.nginx.start()
        self.log(
            f"nginx: {self.nginx.url} -> web.service.consul:{self.app_port} "
            "(resolver valid=1s, proxy_next_upstream off)"
        )

    def registry_config(self) -> dict[str, dict[str, Any]]:
        return {"consul": {"address": self.consul.address}}

    def wait_passing(self, inst: Instance, timeout: float = 30) -> None:
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
                f"{timeout:g}s",
            ],
            check=True,
            capture_output=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )

    def stop_registry(self) -> None:
        self.nginx.stop()
        self.consul.stop()


class EtcdWatchCluster(RolloutCluster):
    """etcd, nginx whose upstream the confd-like watcher renders from ``<prefix>/web/`` (``lag`` seconds after
    each change: the consumer's horizon), and the instances of service `web` (``registry.kind = "etcd"``).

    ``etcd``: a running member to share (the tests' session member, with a prefix of the test's own); None starts
    one under ``workdir`` and stops it with the rest."""

    registry = "etcd"

    def __init__(
        self,
        workdir: Path,
        app_port: int | None = None,
        propagation_delay: str = "3s",
        log: Callable[[str], None] = print,
        shutdown: dict[str, Any] | None = None,
        lag: float = 1.0,
        etcd: Etcd | None = None,
        prefix: str = "services",
    ) -> None:
        super().__init__(workdir, app_port, propagation_delay, log, shutdown)
        workdir.mkdir(parents=True, exist_ok=True)
        self.own_etcd = etcd is None
        self.etcd = etcd or Etcd(workdir)
        self.prefix = prefix.rstrip("/")
        self.lag = lag
        self._nginx = UpstreamNginx(workdir / "nginx", free_port())
        self.watcher = EtcdWatcher(
            workdir, self.etcd.endpoint, f"{self.prefix}/web/", self._nginx.upstream, self._nginx.pid_file, lag
        )

    @property
    def nginx(self) -> UpstreamNginx:
        return self._nginx

    def start(self) -> None:
        self.nginx.test_config()
        if self.own_etcd:
            self.etcd.start()
        self.log(f"etcd: {self.etcd.endpoint}, instances under {self.prefix}/web/ (format grpc)")
        self.nginx.start()
        wait_for(self.nginx.pid_written, 10, 0.05, "nginx's pid file")
        self.watcher.start()
        self.log(
            f"nginx: {self.nginx.url} -> upstream web, rendered from etcd by testkit/etcd_watch.py "
            f"(watch, render, reload {self.lag:g}s after each change; proxy_next_upstream off)"
        )

    def registry_config(self) -> dict[str, dict[str, Any]]:
        return {
            "registry": {"kind": "etcd"},
            "etcd": {"endpoints": [self.etcd.endpoint], "prefix": self.prefix, "lease_ttl": "5s"},
        }

    def key(self, inst: Instance) -> str:
        return f"{self.prefix}/web/{inst.service_id}"

    def wait_passing(self, inst: Instance, timeout: float = 30) -> None:
        """Until etcdctl (a linearizable read) finds the instance's key: the sidecar puts it only while the
        app's check passes. What a deploy script would run: ``etcdctl get <prefix>/web/<id>``."""
        key = self.key(inst)

        def present() -> bool:
            if inst.sidecar.proc.poll() is not None:
                raise AssertionError(f"sidecar of {inst.address} exited:\n{inst.sidecar.tail()}")
            return key in get_prefix(self.etcd.endpoint, key)

        wait_for(present, timeout, 0.1, f"etcd key {key}")

    def wait_routed(self, insts: list[Instance], timeout: float = 30) -> None:
        """Until the watcher has applied exactly ``insts`` to nginx (``lag`` after their keys appeared) and nginx,
        reloaded, answers from every one of them: ``2 x len(insts)`` successes in a row covering them all (a
        worker of the previous configuration may still take a request or two just after the reload)."""
        self.watcher.wait_applied([f"{i.address}:{self.app_port}" for i in insts], timeout)
        want = {i.address for i in insts}
        streak: list[str] = []

        def answered_by_all() -> bool:
            try:
                code, _, backend = _get_backend(self.nginx.url)
            except OSError:
                code, backend = 0, ""
            if code != 200:
                streak.clear()
                return False
            streak.append(backend.split(":")[0])
            return len(streak) >= 2 * len(insts) and set(streak[-2 * len(insts) :]) >= want

        wait_for(answered_by_all, timeout, 0.02, f"nginx answering from {sorted(want)}")

    def balancer_dropped(self, inst: Instance, t0_wall: float) -> float | None:
        """The watcher's first applied set without ``inst`` after it was applied with it."""
        server = f"{inst.address}:{self.app_port}"
        seen = False
        for e in self.watcher.events():
            if e.get("event") != "watch.applied":
                continue
            if server in e["servers"]:
                seen = True
            elif seen:
                return float(e["applied"]) - t0_wall
        return None

    def stop_registry(self) -> None:
        self.watcher.stop()
        self.nginx.stop()
        if self.own_etcd:
            self.etcd.stop()


def _get_backend(url: str) -> tuple[int, bytes, str]:
    """GET ``url``: status, body and the X-Backend header ("" without it); HTTP errors are answers too."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status, r.read(), r.headers.get("X-Backend", "")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), ""


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def counted_rollout(cluster: RolloutCluster, naive: bool) -> tuple[int, int, dict[str, int]]:
    """The tests' rollout: start ``cluster``, two v1 instances rolled to v2 at 200 requests/s, stop it all;
    (requests, failed, requests by version)."""
    try:
        cluster.start()
        result = await rollout(cluster, naive, replicas=2, rate=200.0, warmup=2.0, cooldown=2.0, log=lambda _: None)
    finally:
        cluster.stop()
    s = summarize(result.records)
    return s.requests, s.failed, s.by_version


async def rollout(
    cluster: RolloutCluster,
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
    await run(cluster.wait_routed, old)
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
    for step, inst in zip(steps, old, strict=True):
        step.balancer_dropped = cluster.balancer_dropped(inst, t0_wall)
    return RolloutResult(mode, records, steps, rollout_start, rollout_end, now(), rss)


def _drain_times(inst: Instance, t0_wall: float) -> tuple[float | None, float | None]:
    """When the old instance's sidecar confirmed its deregistration and when it signalled the
    app (the end of the delay), in seconds since the load began, from its JSON log."""

    def at(*names: str) -> float | None:
        for name in names:
            ev = inst.sidecar.event(name)
            if ev and "timestamp" in ev:
                return datetime.fromisoformat(str(ev["timestamp"]).replace("Z", "+00:00")).timestamp() - t0_wall
        return None

    # etcd logs its drain under the sidecar.consul.* names for now (docs/etcd.md); a registry-neutral name is
    # read first should it come.
    return at("sidecar.registry.deregistered", "sidecar.consul.deregistered"), at("sidecar.drain.delay_done")


def sidecar_pids(cluster: RolloutCluster) -> list[int]:
    return [i.sidecar.pid for i in cluster.instances if pid_alive(i.sidecar.pid)]


def wait_all_gone(cluster: RolloutCluster, timeout: float = 30) -> Any:
    return wait_for(lambda: not sidecar_pids(cluster), timeout, 0.1, "instances to stop")
