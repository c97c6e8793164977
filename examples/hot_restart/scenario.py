"""One instance under open-loop load, restarted hot (SIGUSR2) or plainly (sidecar stopped and started).

Shared by the demo (``python -m examples.hot_restart``, ``scripts/demo --hot-restart``) and the bench
(``bench/hot_restart.py``). The load goes straight at the instance's port, no balancer in front, and
the catalog watcher follows the instance in Consul (testkit/hotload.py).
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testkit import Consul, Sidecar, free_port
from testkit.hotload import HotLoad, LoadResult
from testkit.hotrestart import HotInstance, Restart, hot_config, server_command


@dataclass
class Run:
    """One run: the load's records, and when the restart(s) began and ended (time.monotonic())."""

    mode: str  # "hot" or "plain"
    server: str
    result: LoadResult
    t_begin: float  # the first trigger (hot) or the SIGTERM to the sidecar (plain)
    t_end: float  # the last restart done (hot) or the new sidecar registered (plain)
    pids: list[int] = field(default_factory=list)  # each generation's PID, in order
    restarts: list[Restart] = field(default_factory=list)

    @property
    def lost(self) -> int:
        """Requests refused or failed."""
        return len(self.result.refused) + len(self.result.failed)

    @property
    def p99_steady_ms(self) -> float:
        """p99 latency before the restart (skipping the first half second: connection warm-up)."""
        return self.result.p99_ms(self.result.began + 0.5, self.t_begin)

    @property
    def p99_restart_ms(self) -> float:
        """p99 latency of the requests started while the restart ran."""
        return self.result.p99_ms(self.t_begin, self.t_end)

    @property
    def old_exit_seconds(self) -> float:
        """Hot: median time from the trigger to the old generation's exit. Plain: NaN."""
        values = sorted(r.old_exit_seconds for r in self.restarts)
        return values[len(values) // 2] if values else math.nan

    @property
    def not_passing_seconds(self) -> float:
        """How long the watcher saw the instance missing or not passing (from each such answer to the next answer)."""
        samples = self.result.samples
        total = 0.0
        for a, b in zip(samples, samples[1:]):
            if a.state != "passing":
                total += b.t - a.t
        if samples and samples[-1].state != "passing":
            total += self.result.ended - samples[-1].t
        return total

    def generations_served(self) -> int:
        served = self.result.pids()
        return sum(served[p] > 0 for p in self.pids)


Log = Callable[[str], None]


def _start(work: Path, server: str, config: dict[str, dict[str, Any]]) -> Sidecar:
    sc = Sidecar(work, config, server_command(server, int(config["service"]["port"])))
    sc.wait_event("sidecar.consul.registered", timeout=60)
    return sc


def hot_run(
    work: Path,
    consul: Consul,
    name: str,
    server: str,
    rate: float,
    restarts: int = 1,
    steady: float = 2.0,
    after: float = 1.0,
    slow_ms: int = 0,
    log: Log = print,
) -> Run:
    """``restarts`` hot restarts in a row under load (with 3 ``slow_ms`` requests in flight at each
    trigger, if > 0); ``steady`` seconds of load before, ``after`` seconds after."""
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    sc = _start(work, server, hot_config(consul, name, port, server))
    inst = HotInstance(sc)
    pids = [inst.serving_pid()]
    done: list[Restart] = []
    try:
        with HotLoad(
            f"http://127.0.0.1:{port}/", rate, consul=consul.address, service=name, service_id=f"{name}-1"
        ) as load:
            time.sleep(steady)
            for i in range(restarts):
                if slow_ms > 0:
                    load.slow(3, slow_ms)
                r = inst.hot_restart(timeout=90)
                done.append(r)
                pids.append(r.new_pid or 0)
                ok, refused, failed = load.counts()
                log(
                    f"  hot restart {i + 1}/{restarts}: pid {r.old_pid} -> {r.new_pid}, old generation exited "
                    f"{r.old_exit_seconds:.2f}s after SIGUSR2; so far {ok} answered, {refused} refused, {failed} failed"
                )
            time.sleep(after)
            result = load.stop()
    finally:
        sc.send(signal.SIGTERM)
        sc.wait(60)
    return Run("hot", server, result, done[0].t_signal, done[-1].t_done, pids, done)


def plain_run(
    work: Path,
    consul: Consul,
    name: str,
    server: str,
    rate: float,
    steady: float = 2.0,
    after: float = 1.0,
    log: Log = print,
) -> Run:
    """The control: the same load across a plain restart (SIGTERM to the sidecar, which drains and
    exits; then the same sidecar and command started again)."""
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cfg = hot_config(consul, name, port, server)
    sc = _start(work, server, cfg)
    pids = [HotInstance(sc).serving_pid()]
    again: Sidecar | None = None
    try:
        with HotLoad(
            f"http://127.0.0.1:{port}/", rate, consul=consul.address, service=name, service_id=f"{name}-1"
        ) as load:
            time.sleep(steady)
            t_begin = time.monotonic()
            sc.send(signal.SIGTERM)
            sc.wait(60)
            again = _start(work, server, cfg)
            t_end = time.monotonic()
            pids.append(HotInstance(again).serving_pid())
            ok, refused, failed = load.counts()
            log(
                f"  plain restart: sidecar stopped and started again in {t_end - t_begin:.2f}s; "
                f"so far {ok} answered, {refused} refused, {failed} failed"
            )
            time.sleep(after)
            result = load.stop()
    finally:
        for s in (sc, again):
            if s is not None and s.proc.poll() is None:
                s.send(signal.SIGTERM)
                s.wait(60)
    return Run("plain", server, result, t_begin, t_end, pids)
