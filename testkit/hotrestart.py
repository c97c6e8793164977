"""Real servers under the sidecar's hot restart: their commands, the config, and the restart itself.

The tests (tests/test_hot_restart_load.py), the bench (bench/hot_restart.py) and the demo
(examples/hot_restart) share these:

- ``server_command(server, port)``: gunicorn with ``examples/app/wsgi_app.py``, uvicorn with
  ``examples/app/asgi_app.py`` (through ``uvicorn_serve.py``; ``uvicorn-plain``: as shipped), or the
  example app, each taking the sidecar's socket (fd 3).
- ``hot_config(...)``: a sidecar config with ``[hot_restart]`` for that server (``ready = "notify"``
  where the server says ``READY=1``, ``"warmup"`` for uvicorn, which never does).
- ``HotInstance``: reads the sidecar's ``/status`` (``app.generations``, ``hot_restart``), sends the
  trigger and waits for the outcome: a new generation serving alone, or the failure recorded with the
  old one still serving.
"""

from __future__ import annotations

import functools
import json
import signal
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from testkit.procs import PY, ROOT, Consul, Sidecar, app_command, http_get, merge, pid_alive, wait_for

APP_DIR = ROOT / "examples" / "app"
FAULTWRAP = ROOT / "testkit" / "faultwrap.py"
SERVERS = ("gunicorn", "uvicorn", "example")
# Plain `python -m uvicorn --fd 3`, without examples/app/uvicorn_serve.py's shutdown grace: it closes
# connections accepted just before its shutdown unanswered (the bench and demo can show it).
ALL_SERVERS = (*SERVERS, "uvicorn-plain")
# uvicorn says nothing when it accepts: the sidecar waits this long after starting it. Its start-up
# takes ~0.5 s on a quiet machine; connections that come sooner wait in the socket's backlog.
UVICORN_WARMUP = "1500ms"


@functools.cache
def _gunicorn_has_control_socket() -> bool:
    # Newer gunicorn versions open a control socket at a fixed path under ~/.gunicorn by default:
    # two generations (and parallel tests) would share it. Older ones have no flag to turn it off.
    out = subprocess.run([PY, "-m", "gunicorn", "--help"], capture_output=True, text=True, timeout=60)
    return "--no-control-socket" in out.stdout


def server_command(server: str, port: int, fault_dir: Path | None = None) -> list[str]:
    """The command the sidecar starts for ``server`` (one of ``SERVERS``). With ``fault_dir``, it
    runs under testkit/faultwrap.py: a file ``crash`` there makes the next generation exit at start,
    a file ``no-ready`` makes it serve without ever saying READY=1 (see ``HotInstance.break_next``)."""
    if server == "gunicorn":
        cmd = [PY, "-m", "gunicorn", "--pythonpath", str(APP_DIR), "--worker-class", "gthread"]
        cmd += ["--workers", "1", "--threads", "16", "--graceful-timeout", "30", "--log-level", "warning"]
        if _gunicorn_has_control_socket():
            cmd.append("--no-control-socket")
        cmd.append("wsgi_app:app")
    elif server in ("uvicorn", "uvicorn-plain"):
        # "uvicorn": uvicorn with examples/app/uvicorn_serve.py's shutdown grace; "uvicorn-plain": as shipped.
        cmd = [PY, str(APP_DIR / "uvicorn_serve.py")] if server == "uvicorn" else [PY, "-m", "uvicorn"]
        cmd += ["--app-dir", str(APP_DIR), "--fd", "3", "--log-level", "warning", "--no-access-log", "asgi_app:app"]
    elif server == "example":
        cmd = app_command(port)
    else:
        raise ValueError(f"unknown server {server!r}: one of {', '.join(ALL_SERVERS)}")
    if fault_dir is None:
        return cmd
    wrap = [PY, str(FAULTWRAP), "--crash-if", str(fault_dir / "crash"), "--no-ready-if", str(fault_dir / "no-ready")]
    return [*wrap, "--", *cmd]


def hot_section(server: str, **over: Any) -> dict[str, Any]:
    """``[hot_restart]`` for ``server``: READY=1 where it says so, a warm-up for uvicorn."""
    section: dict[str, Any] = {"enabled": True, "signal": "SIGUSR2", "timeout": "30s"}
    if server.startswith("uvicorn"):
        section.update(ready="warmup", warmup=UVICORN_WARMUP)
    else:
        section.update(ready="notify")
    section.update(over)
    return section


def hot_config(
    agent: Consul, name: str, port: int, server: str, **sections: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """A sidecar config like tests/conftest.py's ``base_config`` with ``[hot_restart]`` for ``server``."""
    cfg: dict[str, dict[str, Any]] = {
        "consul": {"address": agent.address, "timeout": "1s"},
        "service": {"name": name, "id": f"{name}-1", "address": "127.0.0.1", "port": port},
        "check": {"interval": "1s", "timeout": "1s"},
        "startup": {"timeout": "30s"},
        "shutdown": {"propagation_delay": "1s", "app_timeout": "20s", "deregister_timeout": "3s"},
        "status": {"listen": "127.0.0.1:0"},
        "hot_restart": hot_section(server),
    }
    return merge(cfg, sections)


@dataclass(frozen=True)
class Restart:
    """One hot restart as seen from outside."""

    old_pid: int
    new_pid: int | None  # None: the new generation failed and the old one still serves
    t_signal: float  # time.monotonic() when the trigger was sent
    t_done: float  # when /status showed the outcome (one generation, and the old one gone if replaced)
    t_old_exit: float | None  # when the old generation's process was first seen gone
    error: str | None  # hot_restart.last_error after a failed restart
    # When the sidecar signalled the old generation (its sidecar.hot_restart.old_signalled event).
    t_old_signalled: float | None = None
    started_pid: int | None = None  # the PID the new generation had (sidecar.hot_restart.started), also when it failed

    @property
    def old_exit_seconds(self) -> float:
        """From the trigger to the old generation's exit (NaN if it did not exit)."""
        return self.t_old_exit - self.t_signal if self.t_old_exit is not None else float("nan")


class HotInstance:
    """A sidecar in hot-restart mode, seen through its ``/status``."""

    def __init__(self, sidecar: Sidecar, fault_dir: Path | None = None) -> None:
        self.sidecar = sidecar
        self.fault_dir = fault_dir
        self.url = sidecar.status_url() + "/status"

    def status(self) -> dict[str, Any]:
        code, body = http_get(self.url, timeout=5)
        assert code == 200, (code, body)
        return json.loads(body)  # type: ignore[no-any-return]

    @staticmethod
    def generations(status: dict[str, Any]) -> list[dict[str, Any]]:
        return list((status.get("app") or {}).get("generations") or [])

    @staticmethod
    def hot(status: dict[str, Any]) -> dict[str, Any]:
        return dict(status.get("hot_restart") or {})

    def events(self, name: str) -> list[tuple[float, dict[str, Any]]]:
        """The sidecar's log events called ``name``, each with its time on this host's monotonic clock
        (the log's timestamps are wall-clock: converted with the current offset, good to a millisecond
        or so while nobody steps the clock)."""
        offset = time.time() - time.monotonic()
        out = []
        for e in self.sidecar.events():
            if e.get("event") == name and "timestamp" in e:
                wall = datetime.fromisoformat(str(e["timestamp"]).replace("Z", "+00:00")).timestamp()
                out.append((wall - offset, e))
        return out

    def _started(self, previous_pid: int) -> int | None:
        pids = [
            e.get("pid") for _, e in self.events("sidecar.hot_restart.started") if e.get("previous_pid") == previous_pid
        ]
        return int(pids[-1]) if pids and pids[-1] is not None else None

    def serving_pid(self, timeout: float = 30) -> int:
        """The PID of the one generation there is (waits until there is exactly one)."""

        def one() -> int | None:
            gens = self.generations(self.status())
            return int(gens[0]["pid"]) if len(gens) == 1 else None

        return int(wait_for(one, timeout, 0.05, "exactly one app generation in /status"))

    def break_next(self, how: str | None) -> None:
        """Make the next generation crash at start (``"crash"``), never say READY (``"no-ready"``),
        or start normally again (None). Needs ``fault_dir`` and a command from ``server_command(..., fault_dir)``."""
        assert self.fault_dir is not None, "started without fault_dir"
        for name in ("crash", "no-ready"):
            (self.fault_dir / name).unlink(missing_ok=True)
        if how is not None:
            (self.fault_dir / how).write_text("")

    def hot_restart(self, timeout: float = 60, expect_failure: bool = False) -> Restart:
        """Send the trigger; wait until a new generation serves alone and the old one's process is
        gone (or, with ``expect_failure``, until the failure is in ``hot_restart.last_error`` and the
        old generation serves alone again)."""
        st = self.status()
        before = int(self.hot(st).get("restarts") or 0)
        error_before = self.hot(st).get("last_error")
        old = self.serving_pid()
        t_signal = time.monotonic()
        self.sidecar.send(signal.SIGUSR2)
        t_old_exit: float | None = None
        deadline = t_signal + timeout
        while True:
            if t_old_exit is None and not pid_alive(old):
                t_old_exit = time.monotonic()
            if self.sidecar.proc.poll() is not None:
                raise AssertionError(f"the sidecar exited during a hot restart:\n{self.sidecar.output()[-3000:]}")
            st = self.status()
            gens, hot = self.generations(st), self.hot(st)
            pids = [int(g["pid"]) for g in gens]
            if expect_failure:
                if hot.get("last_error") and hot.get("last_error") != error_before and pids == [old]:
                    error = str(hot["last_error"])
                    return Restart(old, None, t_signal, time.monotonic(), t_old_exit, error, None, self._started(old))
            elif int(hot.get("restarts") or 0) > before and len(pids) == 1 and pids[0] != old and t_old_exit:
                signalled = [t for t, e in self.events("sidecar.hot_restart.old_signalled") if e.get("pid") == old]
                t_done = time.monotonic()
                return Restart(
                    old, pids[0], t_signal, t_done, t_old_exit, None, max(signalled, default=None), self._started(old)
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"hot restart not {'failed' if expect_failure else 'done'} after {timeout}s: "
                    f"old pid {old} alive={t_old_exit is None}, /status {json.dumps(st)[:1500]}"
                )
            time.sleep(0.02)
