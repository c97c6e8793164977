"""The docker-compose demo's driver: ``python -m examples.rollout.compose`` (run by ``scripts/compose-demo``,
which installs Docker, starts the daemon and provides the images first).

For each mode (``sidecar``, then ``naive``) and run: a fresh copy of docker-compose.yml under its
own project name and host ports, open-loop load through nginx on ``/`` (the "web" replicas) and
``/alongside/`` (the alongside pair), ``scripts/compose-rollout web v2`` then
``scripts/compose-rollout web-alongside v2`` (with ``--naive`` for the control), a few seconds
more load, the end-state check (``compose up -d --dry-run`` has nothing to create, recreate or
start), and ``compose down``. Prints the table of ``scripts/demo`` and writes one PNG with both
runs (out/compose-rollout.png) and, with ``--json``, every figure for tests and benchmarks.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from testkit import ROOT, free_port, http_get

from .loadgen import Record, summarize, write_csv

ROLLOUT = ROOT / "scripts" / "compose-rollout"
PATHS = {"web": "/", "alongside": "/alongside/"}


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through the same finally blocks as Ctrl-C


def compose_cmd() -> list[str]:
    return shlex.split(os.environ.get("DOCKER_COMPOSE", "docker compose"))


@dataclass
class Mark:
    t: float  # seconds since the load began
    label: str
    kind: str  # passing, stop, deregistered, signalled


@dataclass
class StepTimes:
    """One replaced instance: where the time went, in seconds (sidecar figures from its own log)."""

    unit: str
    service_id: str
    compose_up: float = float("nan")  # compose up --scale/--profile for the new container
    until_passing: float = float("nan")  # from compose's return to `wait --passing` returning
    stop_total: float = float("nan")  # stop sent -> container removed
    deregister_ms: float = float("nan")
    delay: float = float("nan")  # deregistration confirmed -> app signalled
    app_exit_ms: float = float("nan")  # app signalled -> app gone


@dataclass
class ModeRun:
    mode: str
    run: int
    project: str
    records: dict[str, list[Record]]
    marks: list[Mark]
    steps: list[StepTimes]
    rollout_start: float
    rollout_end: float
    end_state_ok: bool
    end_state: str
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def rollout_seconds(self) -> float:
        return self.rollout_end - self.rollout_start


class Stack:
    """One copy of docker-compose.yml under its own project name and host ports."""

    def __init__(self, project: str, workdir: Path, log: Any = print) -> None:
        self.project = project
        self.workdir = workdir
        self.nginx_port = free_port()
        self.consul_port = free_port()
        self.log = log
        self.env = {
            **os.environ,
            "COMPOSE_PROJECT_NAME": project,
            "COMPOSE_FILE": str(ROOT / "docker-compose.yml"),
            "NGINX_PORT": str(self.nginx_port),
            "CONSUL_PORT": str(self.consul_port),
            "WEB_VERSION": "v1",
            "ALONGSIDE_VERSION": "v1",
        }

    def compose(
        self, *args: str, check: bool = True, timeout: float = 300, **env: str
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*compose_cmd(), *args], cwd=ROOT, env={**self.env, **env}, capture_output=True, text=True, timeout=timeout
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"compose {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
        return result

    def consul_passing(self, name: str) -> int:
        try:
            status, body = http_get(f"http://127.0.0.1:{self.consul_port}/v1/health/service/{name}?passing=1")
        except OSError:
            return 0
        return len(json.loads(body)) if status == 200 else 0

    def up(self, replicas: int, timeout: float = 120) -> None:
        self.compose("up", "--detach", "--scale", f"web={replicas}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.consul_passing("web") >= replicas and self.consul_passing("web-alongside") >= 1:
                ok = all(self._nginx_ok(p) for p in PATHS.values())
                if ok:
                    return
            time.sleep(0.5)
        ps = self.compose("ps", "--all", check=False).stdout
        raise RuntimeError(f"the stack did not come up within {timeout:g}s:\n{ps}")

    def _nginx_ok(self, path: str) -> bool:
        try:
            return http_get(f"http://127.0.0.1:{self.nginx_port}{path}")[0] == 200
        except OSError:
            return False

    def dry_run(self) -> tuple[bool, str]:
        """`up -d --dry-run` as a user would run it after the rollout (the versions now v2):
        nothing may be created, recreated or started."""
        r = self.compose("up", "--detach", "--dry-run", check=False, WEB_VERSION="v2", ALONGSIDE_VERSION="v2")
        text = (r.stdout + r.stderr).strip()
        changes = [ln for ln in text.splitlines() if re.search(r"\b(Recreat|Creat|Start|Remov|Stopp)", ln)]
        ok = r.returncode == 0 and not changes
        return ok, text

    def down(self) -> None:
        # nginx's and Consul's own logs, for when something failed (kept in the work directory).
        for service in ("nginx", "consul"):
            logs = self.compose("logs", "--no-color", "--timestamps", service, check=False, timeout=60)
            (self.workdir / f"{service}.log").write_text(logs.stdout + logs.stderr)
        self.compose("--profile", "standby", "down", "--volumes", "--remove-orphans", "--timeout", "1", check=False)


def _wall_to_load(wall: float, t0_wall: float) -> float:
    return wall - t0_wall


def read_events(path: Path, t0_wall: float) -> list[tuple[float, str, list[str]]]:
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2:
                out.append((_wall_to_load(float(parts[0]), t0_wall), parts[1], parts[2:]))
    return out


def sidecar_events(logdir: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """{service_id: {event name: the JSON event}} from the logs of the removed containers."""
    found: dict[str, dict[str, dict[str, Any]]] = {}
    for f in sorted(logdir.glob("*.log")) if logdir.exists() else []:
        for line in f.read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            sid = ev.get("service_id")
            if isinstance(sid, str) and isinstance(ev.get("event"), str):
                found.setdefault(sid, {}).setdefault(ev["event"], ev)
    return found


def _ts(ev: dict[str, Any] | None, t0_wall: float) -> float | None:
    if not ev or "timestamp" not in ev:
        return None
    return _wall_to_load(dt.datetime.fromisoformat(str(ev["timestamp"]).replace("Z", "+00:00")).timestamp(), t0_wall)


def short(sid: str) -> str:
    """web-0123456789ab-8080 -> web 0123"""
    m = re.match(r"(.*)-([0-9a-f]{12})-\d+$", sid)
    return f"{m.group(1)} {m.group(2)[:4]}" if m else sid


def marks_and_steps(
    events: list[tuple[float, str, list[str]]], logs: dict[str, dict[str, dict[str, Any]]], t0_wall: float, naive: bool
) -> tuple[list[Mark], list[StepTimes]]:
    marks: list[Mark] = []
    steps: list[StepTimes] = []
    starting: dict[str, float] = {}
    started: dict[str, float] = {}
    pending_new: dict[str, StepTimes] = {}
    stop_sent: dict[str, float] = {}
    for t, name, fields in events:
        unit = fields[0] if fields else "?"
        if name == "new_starting":
            starting[unit] = t
        elif name == "new_started":
            started[unit] = t
        elif name == "new_passing":
            sid = fields[1]
            marks.append(Mark(t, f"{short(sid)} passing", "passing"))
            st = StepTimes(unit, sid)
            st.compose_up = started.get(unit, t) - starting.get(unit, t)
            st.until_passing = t - started.get(unit, t)
            pending_new[unit] = st
        elif name == "stop_sent":
            sid = fields[1]
            stop_sent[sid] = t
            marks.append(Mark(t, f"{short(sid)} stop", "stop"))
            if naive:
                marks.append(Mark(t, f"{short(sid)} app signalled", "signalled"))
        elif name == "stopped":
            sid = fields[1]
            st = pending_new.pop(unit) if unit in pending_new else StepTimes(unit, sid)
            st.service_id = sid
            st.stop_total = t - stop_sent.get(sid, t)
            ev = logs.get(sid, {})
            dereg = ev.get("sidecar.consul.deregistered")
            done = ev.get("sidecar.drain.delay_done")
            stopped = ev.get("sidecar.app.stopped") or ev.get("sidecar.app.exited")
            if dereg is not None:
                st.deregister_ms = float(dereg.get("elapsed_ms", float("nan")))
                td = _ts(dereg, t0_wall)
                if td is not None:
                    marks.append(Mark(td, f"{short(sid)} dereg. confirmed", "deregistered"))
            if done is not None and not naive:
                ts_done, ts_dereg = _ts(done, t0_wall), _ts(dereg, t0_wall)
                if ts_done is not None:
                    marks.append(Mark(ts_done, f"{short(sid)} app signalled", "signalled"))
                    if ts_dereg is not None:
                        st.delay = ts_done - ts_dereg
            if stopped is not None and "elapsed_ms" in stopped:
                st.app_exit_ms = float(stopped["elapsed_ms"])
            steps.append(st)
    return sorted(marks, key=lambda m: m.t), steps


async def run_rollout(stack: Stack, naive: bool, workdir: Path, log: Any) -> None:
    env = {**stack.env, "ROLLOUT_EVENTS": str(workdir / "events"), "ROLLOUT_LOGS": str(workdir / "logs")}
    for unit in ("web", "web-alongside"):
        argv = [str(ROLLOUT), *(["--naive"] if naive else []), unit, "v2"]
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        assert proc.stdout is not None
        out = []
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            out.append(line)
            if line.startswith("compose-rollout:"):
                log(f"  {line}")
        if await proc.wait() != 0:
            raise RuntimeError(f"{' '.join(argv)} failed:\n" + "\n".join(out[-40:]))


async def one_mode(
    mode: str, run: int, args: argparse.Namespace, work: Path, projects_file: Path | None, log: Any
) -> ModeRun:
    naive = mode == "naive"
    project = f"csdemo{os.getpid()}{mode[0]}{run}"
    if projects_file is not None:
        with projects_file.open("a") as f:
            f.write(project + "\n")
    workdir = work / project
    workdir.mkdir(parents=True, exist_ok=True)
    stack = Stack(project, workdir, log)
    phases: dict[str, float] = {}
    try:
        t = time.monotonic()
        log(
            f"[{mode}] project {project}: compose up ({args.replicas} x web v1, the alongside pair v1), "
            f"nginx on 127.0.0.1:{stack.nginx_port}, Consul on 127.0.0.1:{stack.consul_port}"
        )
        await asyncio.to_thread(stack.up, args.replicas)
        phases["up"] = time.monotonic() - t
        stop = asyncio.Event()
        t0 = time.monotonic()
        t0_wall = time.time()
        from .loadgen import run_load

        loads = {
            name: asyncio.create_task(
                run_load(f"http://127.0.0.1:{stack.nginx_port}{path}", args.rate, stop, timeout=5.0, t0=t0)
            )
            for name, path in PATHS.items()
        }
        log(f"[{mode}] load: {args.rate:g} requests/s on each of {', '.join(PATHS.values())} through nginx, open loop")
        await asyncio.sleep(args.warmup)
        rollout_start = time.monotonic() - t0
        await run_rollout(stack, naive, workdir, log)
        rollout_end = time.monotonic() - t0
        await asyncio.sleep(args.cooldown)
        stop.set()
        records = {name: await task for name, task in loads.items()}
        phases["rollout"] = rollout_end - rollout_start
        t = time.monotonic()
        ok, text = await asyncio.to_thread(stack.dry_run)
        phases["dry_run"] = time.monotonic() - t
        log(
            f"[{mode}] end state: `compose up -d --dry-run` "
            + ("has nothing to do" if ok else f"WOULD CHANGE THINGS:\n{text}")
        )
        events = read_events(workdir / "events", t0_wall)
        marks, steps = marks_and_steps(events, sidecar_events(workdir / "logs"), t0_wall, naive)
        return ModeRun(mode, run, project, records, marks, steps, rollout_start, rollout_end, ok, text, phases)
    finally:
        t = time.monotonic()
        await asyncio.to_thread(stack.down)
        phases["down"] = time.monotonic() - t


def _row(label: str, records: list[Record], seconds: float) -> str:
    s = summarize(records)
    v1, v2 = s.by_version.get("v1", 0), s.by_version.get("v2", 0)
    return (
        f"{label:17} {s.requests:9d} {s.failed:7d} {s.failure_rate * 100:8.2f}% {s.p50_ms:8.1f} {s.p99_ms:8.1f} "
        f"{v1:8d} {v2:8d} {seconds:9.1f}s"
    )


def report(runs: list[ModeRun], out: Path, plot: bool) -> None:
    print()
    print(
        f"{'rollout':17} {'requests':>9} {'failed':>7} {'fail rate':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'by v1':>8} {'by v2':>8} {'duration':>10}"
    )
    for r in runs:
        tag = f" #{r.run + 1}" if any(x.run for x in runs) else ""
        for name, recs in r.records.items():
            print(_row(f"{r.mode}{tag} {name}", recs, r.rollout_seconds))
    for r in runs:
        for name, recs in r.records.items():
            s = summarize(recs)
            if s.errors:
                print(
                    f"  {r.mode} {name} failures: "
                    + ", ".join(f"{k} x{v}" for k, v in sorted(s.errors.items(), key=lambda kv: -kv[1]))
                )
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("compose-rollout*.*"):
        stale.unlink()
    for r in runs:
        if r.run == 0:
            for name, recs in r.records.items():
                write_csv(recs, out / f"compose-rollout-{r.mode}-{name}.csv")
    if plot:
        from .timeline import Panel, plot_comparison

        panels = []
        for r in runs:
            if r.run != 0:
                continue
            recs = [x for rs in r.records.values() for x in rs]
            s = summarize(recs)
            panels.append(
                Panel(
                    f"{r.mode}: {s.failed} failed of {s.requests} ('/' and '/alongside/')",
                    recs,
                    [(m.t, m.label, m.kind) for m in r.marks],
                    (r.rollout_start, r.rollout_end),
                )
            )
        plot_comparison(
            panels,
            out / "compose-rollout.png",
            "docker compose: rolling update v1 -> v2 of 'web' (x3) and the alongside pair, under load through nginx",
            caption=NAIVE_CAPTION,
        )
    print(
        f"\nper-request records: {out}/compose-rollout-*.csv"
        + (f"; timeline: {out}/compose-rollout.png" if plot else "")
    )


NAIVE_CAPTION = (
    "Naive: the app is stopped while it is still in Consul; the sidecar deregisters only after the app has gone. "
    "Failures go on after the last stop because nginx keeps the old address for up to valid=1s after Consul "
    "dropped it, and the alongside pair's app container leaves its registration to the health check."
)


def step_dict(s: StepTimes) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and v != v else v) for k, v in asdict(s).items()}


def to_json(runs: list[ModeRun]) -> dict[str, Any]:
    out = []
    for r in runs:
        per: dict[str, dict[str, Any]] = {}
        for name, recs in r.records.items():
            s = summarize(recs)
            per[name] = {"requests": s.requests, "failed": s.failed, "by_version": s.by_version, "errors": s.errors}
        out.append(
            {
                "mode": r.mode,
                "run": r.run,
                "project": r.project,
                "targets": per,
                "failed": sum(int(v["failed"]) for v in per.values()),
                "requests": sum(int(v["requests"]) for v in per.values()),
                "rollout_seconds": r.rollout_seconds,
                "end_state_ok": r.end_state_ok,
                "end_state": r.end_state,
                "steps": [step_dict(s) for s in r.steps],
                "phases": r.phases,
            }
        )
    return {"runs": out}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="scripts/compose-demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--modes", default="sidecar,naive", help="comma-separated: sidecar, naive (default both)")
    ap.add_argument("--runs", type=int, default=1, help="repeat each mode (default 1; bench/compose_rollout.py uses 3)")
    ap.add_argument("--replicas", type=int, default=3, help="'web' replicas to roll (default 3)")
    ap.add_argument(
        "--rate", type=float, default=100.0, help="requests per second on each path through nginx (default 100)"
    )
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds of load before the rollout (default 3)")
    ap.add_argument("--cooldown", type=float, default=3.0, help="seconds of load after it (default 3)")
    ap.add_argument("--out", type=Path, default=ROOT / "out", help="where the PNG and CSVs go (default out/)")
    ap.add_argument("--json", type=Path, help="write every figure to this file")
    ap.add_argument("--no-plot", action="store_true", help="skip the PNG timeline")
    ap.add_argument("--projects-file", type=Path, help=argparse.SUPPRESS)  # scripts/compose-demo's clean-up list
    return ap.parse_args(argv)


async def main_async(args: argparse.Namespace, work: Path) -> list[ModeRun]:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    subprocess.run(
        [*compose_cmd(), "build", "web"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "COMPOSE_FILE": str(ROOT / "docker-compose.yml"), "COMPOSE_PROJECT_NAME": "csdemobuild"},
    )
    runs = []
    for i in range(args.runs):
        for mode in modes:
            runs.append(await one_mode(mode, i, args, work, args.projects_file, print))
    return runs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="consul-sidecar-compose-"))
    print(f"rollout events and the removed containers' logs (kept after the demo): {work}")
    t = time.monotonic()
    try:
        runs = asyncio.run(main_async(args, work))
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (RuntimeError, subprocess.CalledProcessError) as e:
        detail = (getattr(e, "stdout", None) or "")[-4000:] + (getattr(e, "stderr", None) or "")[-4000:]
        print(f"compose demo failed: {e}\n{detail}", file=sys.stderr)
        return 1
    report(runs, args.out, plot=not args.no_plot)
    if args.json:
        args.json.write_text(json.dumps(to_json(runs), indent=1))
    print(f"compose demo took {time.monotonic() - t:.0f}s")
    verdict = 0
    for r in runs:
        failed = sum(summarize(recs).failed for recs in r.records.values())
        if r.mode == "sidecar":
            ok = failed == 0
            print(f"with the sidecar: {'no request failed' if ok else f'{failed} requests FAILED'}")
        else:
            ok = failed > 0
            print(
                f"naive control: {failed} requests failed"
                + ("" if ok else " (expected some: the harness should see failures)")
            )
        verdict |= 0 if ok else 1
        if not r.end_state_ok:
            print(f"{r.mode}: the end state is not what a plain `up -d` expects:\n{r.end_state}")
            verdict = 1
    return verdict


if __name__ == "__main__":
    sys.exit(main())
