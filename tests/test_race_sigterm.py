"""SIGTERM at random points of the start-up and of the keeper's cycle, many times (seeded).

A fault-injecting proxy widens the windows in which a registration write is in flight
(it holds requests or their answers for a random few hundred ms). After every run:
the app got its signal only after the instance had left the catalog, the catalog never
listed it again, and neither the agent nor the catalog holds it at the end.

SIDECAR_RACE_SEED picks another sequence of runs; a failure names the seed and the run.
"""

from __future__ import annotations

import os
import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from examples.rollout.fleet import CatalogWatcher
from testkit import Consul, app_command, free_port, read_signal_log, wait_for
from testkit.faultproxy import REGISTER, FaultProxy, remove_behind_its_back
from testkit.suite import StartSidecar, base_config

SEED = int(os.environ.get("SIDECAR_RACE_SEED", "20261127"))
RUNS = 18  # 2-4 s each, three at a time: ~30-50 s on a loaded 2-core machine


@dataclass(frozen=True)
class Plan:
    index: int
    mode: str  # "startup": SIGTERM while starting; "keeper": while the keeper re-registers
    hold: float  # how long the proxy holds a registration (request or answer)
    at: float  # when SIGTERM comes: seconds after the sidecar started the app, or after the agent forgot us

    def __str__(self) -> str:
        return f"seed {SEED} run {self.index}: {self.mode}, hold {self.hold:.2f}s, SIGTERM at +{self.at:.2f}s"


def plans() -> list[Plan]:
    rng = random.Random(SEED)
    out = []
    for i in range(RUNS):
        mode = "startup" if i % 2 == 0 else "keeper"
        # Start-up (app started to registered) takes 0.4-1.5 s here; the keeper's cycle is 1 s of
        # sleep, a read and a write. Holds stay under consul.timeout (1 s): such writes are answered.
        at = rng.uniform(0.0, 2.0) if mode == "startup" else rng.uniform(0.0, 2.2)
        out.append(Plan(i, mode, rng.uniform(0.2, 0.9), at))
    return out


def one_run(plan: Plan, consul: Consul, start_sidecar: StartSidecar, workdir: Path) -> str | None:
    """Run one plan; None if the promise held, else what went wrong."""
    name = f"race{SEED % 1000}x{plan.index}x{os.getpid()}"
    sid = f"{name}-1"
    port = free_port()
    siglog = workdir / f"{name}.signals"
    watcher = CatalogWatcher(consul, name)
    watcher.start()
    with FaultProxy(consul.http_port) as proxy:
        proxy.add("GET", "/v1/agent/service/", "delay", 0.1)
        cfg = base_config(
            consul, name, port, shutdown={"propagation_delay": "300ms", "deregister_timeout": "3s", "app_timeout": "5s"}
        )
        cfg["consul"]["address"] = proxy.address
        if plan.mode == "startup":
            proxy.add("PUT", REGISTER, "hold_response", plan.hold)  # applied at once, answered late
        sc = start_sidecar(cfg, app_command(port, "127.0.0.1", "--signal-log", str(siglog)))
        # The lifecycle's start (signals before the interpreter has started are another matter).
        sc.wait_event("sidecar.app.started", timeout=30)
        if plan.mode == "keeper":
            sc.wait_event("sidecar.consul.registered", timeout=30)
            proxy.add("PUT", REGISTER, "hold_request", plan.hold)  # lands late, even if given up on
            remove_behind_its_back(consul, sid)
        time.sleep(plan.at)
        sc.send(signal.SIGTERM)
        code = sc.wait(40)
    time.sleep(0.3)  # anything landing late shows in the watcher
    watcher.stop.set()
    signals = read_signal_log(siglog)
    listed = [t for t, ids in watcher.changes if sid in ids]
    problems = []
    if code not in (0, 128 + signal.SIGTERM):
        problems.append(f"exit {code}")
    if signals:
        signalled = signals[0][1]
        before = [ids for t, ids in watcher.changes if t <= signalled][-1:]
        if before and sid in before[0]:
            problems.append(
                f"the app was signalled while the catalog listed it ({watcher.changes}, signal at {signalled})"
            )
        if any(t > signalled for t in listed):
            problems.append(f"listed again after the app's signal ({watcher.changes}, signal at {signalled})")
    elif listed:  # registered implies the app was healthy, so its signal handler was in place
        problems.append(f"listed, yet the app recorded no signal ({watcher.changes})")
    if consul.get(f"/v1/agent/service/{sid}") is not None:
        problems.append("left registered in the agent")
    if consul.service_ids(name):
        problems.append("left in the catalog")
    if "Traceback" in sc.output():
        problems.append("traceback in the sidecar's output")
    return f"{plan}: {'; '.join(problems)}\n{sc.output()[-1500:]}" if problems else None


def test_sigterm_at_random_points_keeps_the_promise(
    consul: Consul, start_sidecar: StartSidecar, tmp_path: Path
) -> None:
    """18 seeded runs, half SIGTERM somewhere in the start-up (the first registration applied but
    its answer held), half somewhere in the keeper's cycle (a re-registration held before it
    reaches the agent). Expected after every run: signal after gone, nothing left registered."""
    wait_for(lambda: consul.get("/v1/agent/self"), 5, what="the agent")
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda p: one_run(p, consul, start_sidecar, tmp_path), plans()))
    failures = [r for r in results if r]
    assert not failures, f"{len(failures)} of {RUNS} runs broke the promise:\n" + "\n\n".join(failures)
