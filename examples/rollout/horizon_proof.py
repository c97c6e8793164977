"""Issue 20's proof: rolling updates behind a consumer of known horizon, drain after drain, under one load.

One Consul agent, a service of ``replicas`` instances (the example app, each wrapped by the sidecar, each on
an address of its own and the same port), and a ``HorizonConsumer`` that routes every request (a new
connection each, open loop) by the answer Consul gave ``horizon`` seconds ago. A plan is a list of phases
(a name, a number of drains, the drained instances' ``[shutdown]`` section); each drain is one step of a
real rolling update: start the new instance, wait until Consul lists it passing, SIGTERM the oldest one's
sidecar and wait for its exit. The load runs through the whole plan; every phase's failures are counted
from the consumer's own records.

An instance's ``[shutdown]`` section is fixed when it starts, ``replicas`` steps before it is drained, so
each phase's section is a callable, called when the instance it configures starts. A section that depends on
an earlier phase's outcome (a recommendation read after it) needs that phase to end ``replicas`` drains
before: the callable raises ``NotYet`` otherwise, and the plan must put a bridge phase in between.

A phase ends once the consumer no longer routes to any instance drained so far (its view, ``horizon``
seconds behind Consul, has caught up), so a drain's failures count in the phase of that drain. Used by
bench/horizon_proof.py (H = 2 and 4 s, the tight figures) and tests/test_horizon_proof.py (H = 2 s).
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testkit import APP, PY, ROOT, Consul, Sidecar, free_port, private_loopback_net, wait_for

from .consumers import HorizonConsumer
from .loadgen import Summary, summarize

Shutdown = Callable[[], dict[str, Any]]


class NotYet(Exception):
    """A phase's ``[shutdown]`` section was asked for before what it depends on was known."""


@dataclass(frozen=True)
class PhasePlan:
    name: str
    drains: int
    shutdown: Shutdown
    # Called once the phase's last drain is over and the consumer has caught up (e.g. to read the record).
    after: Callable[[], None] | None = None


@dataclass
class Drain:
    phase: str
    old: str  # the drained instance's address
    new: str  # the instance started in its place
    shutdown: dict[str, Any]  # the drained instance's [shutdown] section
    exit_code: int
    delay_done: dict[str, Any]
    done: dict[str, Any] | None
    learned: dict[str, Any] | None  # sidecar.drain.learned_delay, when the delay was learned

    @property
    def horizon_ms(self) -> int | None:
        return None if self.done is None else self.done.get("horizon_ms")

    @property
    def waited_ms(self) -> int:
        """How long the drain waited between the confirmed deregistration and the app's signal."""
        return int(self.delay_done["elapsed_ms"])

    @property
    def bound_s(self) -> float:
        return float(self.delay_done["bound_s"])


@dataclass
class PhaseResult:
    name: str
    drains: list[Drain]
    window: tuple[float, float]  # seconds on the consumer's clock
    load: Summary

    @property
    def horizons_ms(self) -> list[int]:
        return [h for d in self.drains if (h := d.horizon_ms) is not None]


@dataclass
class _Instance:
    address: str
    shutdown: dict[str, Any]
    phase: str
    sidecar: Sidecar = field(repr=False)


def horizon_command(consul: Consul, name: str) -> dict[str, Any]:
    """``consul-sidecar horizon --service NAME --http-addr ... --json``, this tree's CLI as a process."""
    done = subprocess.run(
        [PY, "-m", "sidecar", "horizon", "--service", name, "--http-addr", consul.address, "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        raise AssertionError(f"consul-sidecar horizon exited {done.returncode}: {done.stderr.strip()}")
    return json.loads(done.stdout)  # type: ignore[no-any-return]


class KnownHorizonRollout:
    """The service, its consumer and the plan's drains; ``async with`` stops everything it started."""

    def __init__(
        self,
        consul: Consul,
        workdir: Path,
        name: str,
        horizon: float,
        rate: float = 100.0,
        replicas: int = 2,
        log: Callable[[str], None] = print,
    ) -> None:
        self.consul, self.workdir, self.name, self.horizon = consul, workdir, name, horizon
        self.replicas, self.log = replicas, log
        self.port = free_port()
        self.net = private_loopback_net()
        self._hosts = iter(range(1, 255))
        self.consumer = HorizonConsumer(consul.address, name, self.port, horizon=horizon, rate=rate)
        self.live: list[_Instance] = []
        self.drained: list[_Instance] = []
        self._stop = asyncio.Event()
        self._load: asyncio.Task[Any] | None = None

    async def __aenter__(self) -> KnownHorizonRollout:
        self.workdir.mkdir(parents=True, exist_ok=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        if self._load is not None:
            await asyncio.gather(self._load, return_exceptions=True)
        for inst in self.live:
            if inst.sidecar.proc.poll() is None:
                inst.sidecar.send(signal.SIGTERM)
        for inst in self.live:
            await asyncio.to_thread(_reap, inst.sidecar)

    def _start(self, plan: PhasePlan) -> _Instance:
        address = f"{self.net}.{next(self._hosts)}"
        shutdown = {"app_timeout": "10s", **plan.shutdown()}
        config: dict[str, dict[str, Any]] = {
            "consul": {"address": self.consul.address},
            "service": {"name": self.name, "id": f"{self.name}-{address}", "address": address, "port": self.port},
            "shutdown": shutdown,
            "status": {"listen": ""},
        }
        command = [PY, str(APP), "--host", address, "--port", str(self.port)]
        inst = _Instance(address, shutdown, plan.name, Sidecar(self.workdir, config, command))
        self.live.append(inst)
        return inst

    def _passing(self) -> set[str]:
        return {e["Service"]["Address"] for e in self.consul.get(f"/v1/health/service/{self.name}?passing=1") or []}

    def _wait_passing(self, inst: _Instance) -> None:
        def listed() -> bool:
            if inst.sidecar.proc.poll() is not None:
                raise AssertionError(f"the sidecar of {inst.address} exited:\n{inst.sidecar.tail()}")
            return inst.address in self._passing()

        wait_for(listed, 60, 0.05, f"{inst.address} passing in Consul")

    def _routes_to_drained(self) -> bool:
        gone = {i.address for i in self.drained}
        return bool(gone & set(self.consumer.routes_to()))

    async def run(self, plan: list[PhasePlan]) -> list[PhaseResult]:
        """The plan's phases, one drain at a time, under the consumer's load from the first to the last."""
        # Instance k (in the order they start) is the k-th drained: it carries the section of that drain's phase.
        order = [p for p in plan for _ in range(p.drains)]
        spare = PhasePlan("spare", 0, lambda: {"propagation_delay": "0.1s"})
        slots = iter([*order, *[spare] * self.replicas])
        for _ in range(self.replicas):
            self._start(next(slots))
        for inst in list(self.live):
            await asyncio.to_thread(self._wait_passing, inst)
        self._load = asyncio.create_task(self.consumer.run(self._stop))
        await asyncio.to_thread(
            wait_for,
            lambda: any(r.status == 200 for r in self.consumer.records),
            30,
            what="the consumer's first answered request",
        )
        self.log(
            f"{self.name}: {self.replicas} instances passing, consumer {self.consumer.rate:g} requests/s "
            f"routing by Consul's answer of {self.horizon:g}s ago"
        )
        results: list[PhaseResult] = []
        begin = 0.0
        for phase in plan:
            drains = []
            for _ in range(phase.drains):
                drains.append(await self._step(phase, next(slots)))
            await asyncio.to_thread(
                wait_for,
                lambda: not self._routes_to_drained(),
                60,
                what="the consumer's view to leave the drained instances",
            )
            end = time.monotonic() - self.consumer.t0
            r = PhaseResult(phase.name, drains, (begin, end), summarize(self.consumer.records, (begin, end)))
            results.append(r)
            begin = end
            self.log(f"{self.name}: phase {phase.name}: {len(drains)} drains, {r.load.failed}/{r.load.requests} failed")
            if phase.after is not None:
                await asyncio.to_thread(phase.after)
        return results

    async def _step(self, phase: PhasePlan, slot: PhasePlan) -> Drain:
        """Start the new instance, wait until it passes, drain the oldest (which must belong to ``phase``)."""
        new = self._start(slot)
        await asyncio.to_thread(self._wait_passing, new)
        old = self.live[0]  # live until it has exited: teardown stops whatever is left there
        assert old.phase == phase.name, (old.phase, phase.name)
        old.sidecar.send(signal.SIGTERM)
        code = await asyncio.to_thread(old.sidecar.wait, 90)
        self.live.remove(old)
        self.drained.append(old)
        sc = old.sidecar
        delay_done = sc.event("sidecar.drain.delay_done")
        if delay_done is None:
            raise AssertionError(f"{old.address}: no sidecar.drain.delay_done:\n{sc.tail()}")
        d = Drain(
            phase.name,
            old.address,
            new.address,
            old.shutdown,
            code,
            delay_done,
            sc.event("sidecar.drain.done"),
            sc.event("sidecar.drain.learned_delay"),
        )
        self.log(
            f"{self.name}: {phase.name}: drained {old.address} (exit {code}): horizon {d.horizon_ms} ms, "
            f"waited {d.waited_ms} ms (bound {d.bound_s:g}s)"
        )
        return d


class ProofPlan:
    """Issue 20's proof as a plan: ``record`` (``record_drains`` drains with a fixed delay comfortably above
    the horizon: each appends its horizon to the record), then ``consul-sidecar horizon`` reads the
    recommendation, then ``recommended`` (drains that wait the recommendation), then ``control`` (a fixed
    delay of half the horizon, which must lose requests).

    ``learned``: the recommended phase's instances say ``propagation_delay = "learned"`` (the sidecar reads
    the record at the drain's start; ``learned_max`` well above any recommendation here, so a wait that
    covers the horizon came from the record). Without it they carry the recommendation as a fixed delay,
    known only after the record phase: a ``bridge`` of ``replicas`` drains like the record's comes between
    (their samples join the record after the command has read it)."""

    def __init__(
        self,
        consul: Consul,
        name: str,
        horizon: float,
        record_delay: float,
        record_drains: int = 10,
        recommended_drains: int = 5,
        control_drains: int = 2,
        learned: bool = False,
        learned_max: float = 30.0,
        replicas: int = 2,
        log: Callable[[str], None] = print,
    ) -> None:
        self.consul, self.name, self.log = consul, name, log
        self.learned_max = learned_max
        self.recommendation: dict[str, Any] | None = None
        fixed = {"propagation_delay": f"{record_delay:g}s"}
        recommended = self._learned if learned else self._recommended
        self.phases = [
            PhasePlan("record", record_drains, lambda: dict(fixed), after=self._read),
            *([] if learned else [PhasePlan("bridge", replicas, lambda: dict(fixed))]),
            PhasePlan("recommended", recommended_drains, recommended),
            PhasePlan("control", control_drains, lambda: {"propagation_delay": f"{horizon / 2:g}s"}),
        ]

    def _read(self) -> None:
        self.recommendation = horizon_command(self.consul, self.name)
        r = self.recommendation
        self.log(
            f"{self.name}: consul-sidecar horizon: {r['count']} samples, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, "
            f"recommended {r['recommended_ms']} ms (margin {r['margin_ms']} ms)"
        )

    def _recommended(self) -> dict[str, Any]:
        if self.recommendation is None:
            raise NotYet("the recommended delay is read after the record phase: put a bridge phase before")
        return {"propagation_delay": f"{self.recommendation['recommended_ms'] / 1000:g}s"}

    def _learned(self) -> dict[str, Any]:
        return {
            "propagation_delay": "learned",
            "learned_min": "0.5s",
            "learned_max": f"{self.learned_max:g}s",
        }


def _reap(sc: Sidecar) -> None:
    try:
        sc.proc.wait(60)
    except subprocess.TimeoutExpired:
        sc.proc.kill()
        sc.proc.wait(10)
