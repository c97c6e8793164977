"""The app never outlives the sidecar: every descendant ends on every exit path, a daemonizing app is
followed as the app, and what holds when the sidecar itself is SIGKILLed (issue 8, defect 5).

Real sidecar, real Consul agent, real processes in sessions of their own and real signals. The
processes these apps leave in another session escape the harness's session-wide teardown, so each
test kills them itself (``escaped``) after asserting whether they were still alive.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from examples.rollout.fleet import CatalogWatcher
from testkit import (
    PY,
    ROOT,
    Consul,
    app_command,
    free_port,
    http_get,
    pid_alive,
    read_signal_log,
    spawn,
    wait_for,
    write_config,
)
from testkit.suite import StartSidecar, base_config

FAMILY = str(Path(__file__).resolve().parent / "data" / "family.py")


@pytest.fixture
def escaped() -> Iterator[list[int]]:
    """PIDs a test registers here are SIGKILLed at teardown, also on failure."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def read_pid(path: Path, timeout: float = 15) -> int:
    def parse() -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int(path.read_text().strip())
        return None

    return int(wait_for(parse, timeout, what=f"a PID in {path}"))


def answers(port: int) -> bool:
    try:
        return http_get(f"http://127.0.0.1:{port}/healthz", timeout=1)[0] == 200
    except OSError:
        return False


def tree(root: int) -> list[int]:
    """Live descendants of ``root``, found by scanning every /proc/<pid>/stat."""
    by_parent: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
                if fields[0] != "Z":
                    by_parent.setdefault(int(fields[1]), []).append(int(d.name))
    out, todo = [], [root]
    while todo:
        kids = by_parent.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


# --- every descendant ends, whatever its session --------------------------------------------------


@pytest.mark.parametrize(
    ("ending", "expected"),
    [("sigterm", 0), ("app-exits", 3), ("never-healthy", 69)],
    ids=["drain", "app-exits-on-its-own", "startup-fails"],
)
def test_a_worker_in_its_own_session_ends_with_the_app(
    consul: Consul,
    start_sidecar: StartSidecar,
    service_name: str,
    tmp_path: Path,
    escaped: list[int],
    ending: str,
    expected: int,
) -> None:
    """1. The app starts a worker in a session of its own (setsid) that serves on a second port.
    2. The sidecar ends: a drain on SIGTERM, the app exiting on its own (status 3), or a startup
       that fails (the app never healthy: 69).
    3. Expected: the sidecar exits with that status and the worker is gone: it got app_signal
       (SIGTERM, its graceful shutdown) and no SIGKILL was needed. Nothing stays registered.
    """
    port, worker_port = free_port(), free_port()
    worker_pid_file = tmp_path / "worker.pid"
    extra = {"app-exits": ["--crash-after", "4"], "never-healthy": ["--unhealthy"]}.get(ending, [])
    # A short start-up bound only where it is the point: a loaded machine starts apps slowly.
    cfg = base_config(consul, service_name, port, startup={"timeout": "4s" if ending == "never-healthy" else "30s"})
    sc = start_sidecar(
        cfg,
        [
            PY,
            FAMILY,
            "setsid-worker",
            str(worker_port),
            str(worker_pid_file),
            "--",
            *app_command(port, "127.0.0.1", *extra),
        ],
    )
    worker = read_pid(worker_pid_file)
    escaped.append(worker)
    assert os.getsid(worker) == worker != os.getsid(sc.pid), "the worker runs in a session of its own"
    wait_for(lambda: answers(worker_port), 10, what="the worker to serve")
    if ending == "sigterm":
        sc.wait_event("sidecar.consul.registered")
        sc.send(signal.SIGTERM)
    assert sc.wait(30) == expected
    alive = pid_alive(worker)
    assert not alive, "the worker outlived the sidecar"
    assert not answers(worker_port)
    stopped = sc.event("sidecar.app.stopped")
    assert stopped is not None and stopped["leftovers_signalled"] >= 1 and stopped.get("leftovers_killed") is None, (
        stopped
    )
    assert consul.instances(service_name) == []
    assert sc.event("sidecar.app.listener_not_direct_child") is None  # the server is the direct child


def test_a_killed_sidecar_leaves_no_descendant_behind_on_a_crash_path(
    consul: Consul, start_sidecar: StartSidecar, service_name: str, tmp_path: Path, escaped: list[int]
) -> None:
    """1. The app starts a worker in its own session; the app ignores SIGTERM (app_timeout 1 s).
    2. SIGTERM: after the delay the app gets SIGTERM, ignores it, and is SIGKILLed.
    3. Expected: exit 137, and the worker (which would have honoured SIGTERM, but the escalation
       kills everything) is gone as well.
    """
    port, worker_port = free_port(), free_port()
    worker_pid_file = tmp_path / "worker.pid"
    cfg = base_config(consul, service_name, port, shutdown={"app_timeout": "1s", "propagation_delay": "0s"})
    sc = start_sidecar(
        cfg,
        [
            PY,
            FAMILY,
            "setsid-worker",
            str(worker_port),
            str(worker_pid_file),
            "--",
            *app_command(port, "127.0.0.1", "--ignore-sigterm"),
        ],
    )
    worker = read_pid(worker_pid_file)
    escaped.append(worker)
    sc.wait_event("sidecar.consul.registered")
    sc.send(signal.SIGTERM)
    assert sc.wait(30) == 128 + signal.SIGKILL
    assert not pid_alive(worker), "the worker outlived the sidecar"


# --- a daemonizing app is followed -----------------------------------------------------------------


def daemon_app(port: int, tmp_path: Path, *extra: str) -> tuple[list[str], Path, Path]:
    pid_file, siglog = tmp_path / "daemon.pid", tmp_path / "daemon-signals.log"
    app = app_command(port, "127.0.0.1", "--pid-file", str(pid_file), "--signal-log", str(siglog), *extra)
    return [PY, FAMILY, "daemonize", str(pid_file), "--", *app], pid_file, siglog


def test_a_daemonizing_app_stays_registered_and_is_drained(
    consul: Consul, start_sidecar: StartSidecar, service_name: str, tmp_path: Path, escaped: list[int]
) -> None:
    """1. The app daemonizes (fork, setsid, fork); its parent exits 0 once the daemon listens on the
       service port, as a systemd Type=forking service does.
    2. Expected: sidecar.app.daemon_followed names the daemon; three check intervals later the
       sidecar still runs and the instance is still registered and passing (not deregistered
       as if the app had exited).
    3. SIGTERM: the instance leaves the catalog before the daemon gets SIGTERM, the sidecar
       exits 0 (the daemon's status) and the daemon is gone.
    """
    port = free_port()
    command, pid_file, siglog = daemon_app(port, tmp_path)
    sc = start_sidecar(base_config(consul, service_name, port), command)
    daemon = read_pid(pid_file)
    escaped.append(daemon)
    followed = sc.wait_event("sidecar.app.daemon_followed")
    assert followed["pids"] == [daemon] and followed["parent_pid"] == sc.app_pid(), followed
    sc.wait_event("sidecar.consul.registered")
    time.sleep(3.0)
    assert sc.proc.poll() is None, sc.output()[-2000:]
    [instance] = consul.instances(service_name)
    assert all(c["Status"] == "passing" for c in instance["Checks"]), instance["Checks"]
    assert sc.event("sidecar.consul.deregistered") is None

    watcher = CatalogWatcher(consul, service_name)
    watcher.start()
    wait_for(
        lambda: watcher.changes and watcher.changes[-1][1] == [f"{service_name}-1"], 5, what="watcher sees the instance"
    )
    sc.send(signal.SIGTERM)
    assert sc.wait() == 0
    watcher.stop.set()
    gone = watcher.first_time(lambda ids: not ids)
    assert gone is not None, watcher.changes
    [(name, signalled)] = read_signal_log(siglog)
    assert name == "SIGTERM" and gone < signalled, (gone, signalled)
    assert not pid_alive(daemon), "the daemon outlived the sidecar"
    stopped = sc.event("sidecar.app.stopped")
    assert stopped is not None and "daemon pid" in stopped["app"], stopped
    assert sc.event("sidecar.app.listener_not_direct_child") is None  # a followed daemon is the app


def test_a_followed_daemon_that_exits_is_deregistered_with_its_status(
    consul: Consul, start_sidecar: StartSidecar, service_name: str, tmp_path: Path, escaped: list[int]
) -> None:
    """1. A daemonized app is followed (its parent exited 0).
    2. The daemon is stopped from outside (SIGTERM; it exits with status 3).
    3. Expected: the sidecar deregisters at once and exits 3, the daemon's status."""
    port = free_port()
    command, pid_file, _ = daemon_app(port, tmp_path, "--exit-code", "3")
    sc = start_sidecar(base_config(consul, service_name, port), command)
    daemon = read_pid(pid_file)
    escaped.append(daemon)
    sc.wait_event("sidecar.app.daemon_followed")
    sc.wait_event("sidecar.consul.registered")
    os.kill(daemon, signal.SIGTERM)
    assert sc.wait(20) == 3
    exited = sc.event("sidecar.app.exited")
    assert exited is not None and exited["daemon_pids"] == [daemon] and exited["exit_status"] == 3, exited
    assert sc.event("sidecar.consul.deregistered") is not None
    assert consul.instances(service_name) == []


# --- the sidecar itself SIGKILLed ------------------------------------------------------------------


def no_exec_entrypoint(tmp_path: Path, port: int) -> tuple[list[str], Path]:
    """An entrypoint script that forgets ``exec``: bash stays the direct child, the server is its child."""
    pid_file = tmp_path / "server.pid"
    script = tmp_path / "entrypoint.sh"
    script.write_text(
        "#!/bin/bash\n"
        + " ".join(app_command(port, "127.0.0.1", "--pid-file", str(pid_file)))
        + "\necho server ended >&2\n"
    )
    script.chmod(0o755)
    return [str(script)], pid_file


def test_a_killed_sidecar_takes_its_direct_child_along(
    consul: Consul, start_sidecar: StartSidecar, service_name: str, tmp_path: Path, escaped: list[int]
) -> None:
    """1. The app is an entrypoint script without ``exec`` (bash, then the server as its child).
    2. SIGKILL to the sidecar: it can do nothing more.
    3. Expected: the sidecar has warned that the server is not its direct child; the direct child
       (bash) dies with it (parent-death signal). The server, a
       grandchild, is re-parented: outside a PID namespace only the platform can end it (systemd's
       cgroup, a container), see the next test and docs/security.md.
    """
    port = free_port()
    command, pid_file = no_exec_entrypoint(tmp_path, port)
    sc = start_sidecar(base_config(consul, service_name, port), command)
    server = read_pid(pid_file)
    escaped.append(server)
    sc.wait_event("sidecar.consul.registered")
    bash = sc.app_pid()
    assert server != bash and pid_alive(bash)
    warned = sc.wait_event("sidecar.app.listener_not_direct_child", 10)
    assert warned["app_pid"] == bash and warned["listener_pids"] == [server], warned
    sc.send(signal.SIGKILL)
    sc.wait(5)
    wait_for(lambda: not pid_alive(bash), 3, what="the direct child to die with its sidecar")
    os.kill(server, signal.SIGKILL)  # the harness would count it as a leftover of the exited sidecar


def test_in_a_pid_namespace_a_killed_sidecar_takes_every_descendant_along(
    consul: Consul, tmp_path: Path, service_name: str
) -> None:
    """1. The sidecar runs as PID 1 of a new PID namespace (``unshare --pid --fork``, as in a
       container), wrapping an entrypoint without ``exec`` whose server is a grandchild.
    2. SIGKILL to the sidecar (PID 1 inside).
    3. Expected: the kernel ends the whole namespace: the server is gone too, and stops answering.
       The control: before the SIGKILL the server is alive and answers.
    """
    port = free_port()
    command, _ = no_exec_entrypoint(tmp_path, port)
    cfg = write_config(tmp_path / "c.toml", base_config(consul, service_name, port))
    log = tmp_path / "sidecar.log"
    argv = [
        "unshare",
        "--pid",
        "--fork",
        "--kill-child",
        PY,
        "-m",
        "sidecar",
        "run",
        "-c",
        str(cfg),
        "--log-format",
        "json",
        "--",
        *command,
    ]
    outer = spawn(argv, log, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wait_for(lambda: "sidecar.consul.registered" in log.read_text(), 15, 0.05, "registration")
    [pid1] = [p for p in tree(outer.pid) if f"NSpid:\t{p}\t1\n" in Path(f"/proc/{p}/status").read_text()]
    below = tree(pid1)
    assert len(below) == 2 and answers(port), below  # bash and the server
    os.kill(pid1, signal.SIGKILL)
    wait_for(lambda: not any(pid_alive(p) for p in below), 5, what="every process of the namespace to die")
    assert not answers(port)
    outer.wait(5)


# --- systemd's KillMode, with the signals sent as systemd sends them ------------------------------

UNIT = ROOT / "examples" / "systemd" / "consul-sidecar.service"


def unit_setting(key: str) -> str:
    [value] = [line.split("=", 1)[1].strip() for line in UNIT.read_text().splitlines() if line.startswith(f"{key}=")]
    return value


@pytest.mark.integration
def test_the_example_unit_uses_kill_mode_mixed_with_room_for_the_drain() -> None:
    """The shipped unit sets KillMode=mixed (SIGTERM to the sidecar alone) and a TimeoutStopSec no
    shorter than the worst-case shutdown of the configuration it names."""
    assert unit_setting("KillMode") == "mixed"
    assert unit_setting("KillSignal") == "SIGTERM"
    timeout = unit_setting("TimeoutStopSec")
    assert timeout.endswith("s") and int(timeout[:-1]) >= 30  # the config's default shutdown.budget is 30s
    out = subprocess.run(
        [PY, "-m", "sidecar", "check-config", "-c", str(ROOT / "config" / "web.toml")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    worst = out.stderr.split("worst-case shutdown: ", 1)[1].split()[0]
    assert worst.endswith("s") and float(worst[:-1]) <= int(timeout[:-1]), (worst, timeout)


@pytest.mark.parametrize("kill_mode", ["mixed", "control-group"])
def test_systemd_kill_mode(
    consul: Consul, start_sidecar: StartSidecar, service_name: str, tmp_path: Path, kill_mode: str
) -> None:
    """Signals as systemd sends them on `systemctl stop` (the unit's processes are the sidecar and
    its descendants, all in one cgroup):
    - mixed (the shipped unit's): SIGTERM to the main process only; after TimeoutStopSec, SIGKILL
      to every process left. Expected: the instance leaves the catalog propagation_delay before the app's SIGTERM,
      the sidecar exits 0 well before the timeout, nothing is left for the SIGKILL.
    - control-group (systemd's default), the control: SIGTERM to every process at once. Expected:
      the app is signalled while its instance is still in the catalog: the harness sees the failure
      that KillMode=mixed avoids.
    """
    port = free_port()
    siglog = tmp_path / "signals.log"
    sc = start_sidecar(
        base_config(consul, service_name, port, shutdown={"propagation_delay": "1s"}),
        app_command(port, "127.0.0.1", "--signal-log", str(siglog)),
    )
    sc.wait_event("sidecar.consul.registered")
    watcher = CatalogWatcher(consul, service_name)
    watcher.start()
    wait_for(
        lambda: watcher.changes and watcher.changes[-1][1] == [f"{service_name}-1"], 5, what="watcher sees the instance"
    )
    cgroup = [sc.pid, *tree(sc.pid)]
    assert len(cgroup) == 2
    sent = time.monotonic()
    for pid in cgroup if kill_mode == "control-group" else cgroup[:1]:
        os.kill(pid, signal.SIGTERM)
    timeout_stop = int(unit_setting("TimeoutStopSec")[:-1])
    started = time.monotonic()
    with contextlib.suppress(AssertionError):
        sc.wait(timeout_stop)
    took = time.monotonic() - started
    left = [p for p in cgroup if pid_alive(p)]
    for pid in left:  # systemd's SIGKILL to whatever is left after TimeoutStopSec
        os.kill(pid, signal.SIGKILL)
    sc.wait(5)
    watcher.stop.set()
    gone = watcher.first_time(lambda ids: not ids)
    [(name, signalled)] = read_signal_log(siglog)
    assert name == "SIGTERM" and gone is not None, (watcher.changes, signalled)
    # The app logs its SIGTERM when its handler runs, a little after delivery: the propagation delay
    # (1 s) is what separates "after the instance left" from "at the same moment".
    in_order = signalled - gone >= 1.0 - 0.05
    if kill_mode == "mixed":
        assert in_order, f"app signalled {signalled - gone:.3f}s after its instance left the catalog"
        assert left == [] and sc.proc.returncode == 0 and took < timeout_stop / 2
    else:
        assert sent < gone and not in_order, "control: with control-group the app is signalled while registered"


# --- a Ctrl-C during Python's start-up ------------------------------------------------------------


def importing_modules(pid: int) -> bool:
    """The sidecar's own imports are under way: asyncio's, json's or aiohttp's C extensions are mapped
    (those of them that this Python builds as shared objects)."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False
    return any(m in maps for m in ("_asyncio.", "_json.", "multidict"))


def test_ctrl_c_during_start_up_exits_130_without_a_traceback(
    consul: Consul, tmp_path: Path, service_name: str
) -> None:
    """1. `consul-sidecar run -c FILE` (alongside mode; its app never becomes healthy, so it stays in
       its start-up) gets SIGINT (a terminal's Ctrl-C) while it imports its modules: as soon as the
       first of asyncio's, json's or aiohttp's extensions is mapped, then a little later.
    2. Expected: exit 130 (interrupted before the sidecar was running; or ended by SIGINT itself,
       which a shell reports as 130) or 0 (the signal came once its handlers were in place: a drain
       with nothing registered), never a traceback; at least one run was interrupted (the control
       that the signal hit the imports).
    The interpreter's own start-up before that (site, the venv) is out of the program's reach.
    `--version`, `check-config` and `wait` import too little for the signal to be aimed at them.
    """
    cfg = write_config(tmp_path / "c.toml", base_config(consul, service_name, free_port()))
    codes = []
    for delay in (0.0, 0.0, 0.0, 0.01, 0.03, 0.06):
        p = subprocess.Popen(
            [PY, "-m", "sidecar", "run", "-c", str(cfg)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        try:

            def started(p: subprocess.Popen[bytes] = p) -> bool:
                return importing_modules(p.pid) or p.poll() is not None

            wait_for(started, 10, 0.001, "the sidecar's imports")
            time.sleep(delay)
            p.send_signal(signal.SIGINT)
            _, err = p.communicate(timeout=30)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        assert b"Traceback" not in err and b"KeyboardInterrupt" not in err, err.decode()[-2000:]
        # -2: the interpreter ended itself by SIGINT (what a shell also reports as 130), silently.
        assert p.returncode in (0, 130, -signal.SIGINT), (delay, p.returncode, err.decode()[-2000:])
        codes.append(p.returncode)
    assert {130, -signal.SIGINT} & set(codes), codes
    assert consul.service_ids(service_name) == []


# --- proctree, against this very process ---------------------------------------------------------


@pytest.mark.integration
def test_proctree_finds_descendants_in_other_sessions_and_the_listener_of_a_port() -> None:
    """1. This process starts `sh`, which starts `sleep` in a session of its own (setsid); and
       this process listens on a free port.
    2. Expected: `sleep` is a descendant of `sh` although it left its session, and `sh` one of
       ours; only this process holds the listening socket; once closed, the port has no listener.
       Killed, `sleep` is no longer counted."""
    import socket

    from sidecar.process import proctree

    child = subprocess.Popen(["sh", "-c", "setsid sleep 30 & wait"])
    try:

        def moved_out() -> list[int]:
            return [p for p in proctree.descendants(child.pid) if os.getsid(p) == p != os.getsid(child.pid)]

        [sleep] = wait_for(moved_out, 5, what="the sleep in its own session")
        assert proctree.descendants(child.pid) == {sleep} and child.pid in proctree.descendants(os.getpid())
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen()
            port = s.getsockname()[1]
            assert proctree.listeners({child.pid, sleep, os.getpid()}, port) == {os.getpid()}
        assert proctree.listeners({os.getpid()}, port) == set()
        os.kill(sleep, signal.SIGKILL)
        wait_for(lambda: not proctree.descendants(child.pid), 5, what="the sleep to be gone")
    finally:
        child.kill()
        child.wait(5)
        with contextlib.suppress(ProcessLookupError, UnboundLocalError):
            os.kill(sleep, signal.SIGKILL)


def _proc_net_tcp_listeners(port: int) -> set[int]:
    """The oracle: inodes of the sockets listening on ``port`` as /proc/net/tcp{,6} list them."""
    found: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    found.add(int(fields[9]))
    return found


def test_one_listener_lookup_for_daemon_following_and_the_port_owner_check() -> None:
    """1. This process listens on one port over IPv4 and IPv6 loopback, and holds an accepted connection
       on it; another port has a wildcard listener.
    2. Expected: proctree's lookup (sock_diag) finds exactly the listening sockets /proc/net/tcp{,6} list
       (not the connection), and the port-owner check, built on the same lookup, names this process as
       the holder and accepts a tree that contains it, while refusing one that does not."""
    import socket

    from sidecar.process import port_owner, proctree

    with socket.socket() as v4, socket.socket(socket.AF_INET6) as v6, socket.socket() as wild:
        v4.bind(("127.0.0.1", 0))
        port = v4.getsockname()[1]
        v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        v6.bind(("::1", port))
        wild.bind(("0.0.0.0", 0))
        for s in (v4, v6, wild):
            s.listen()
        with socket.create_connection(("127.0.0.1", port)) as client, v4.accept()[0]:
            found = proctree.listening_inodes(port)
            assert found == _proc_net_tcp_listeners(port) and len(found) == 2, found
            assert proctree.listening_inodes(wild.getsockname()[1]) == _proc_net_tcp_listeners(wild.getsockname()[1])
            assert found == {lst.inode for lst in proctree.listening_sockets(port)}
            assert found <= (proctree.socket_inodes(os.getpid()) or set())
            assert found.isdisjoint(proctree.socket_inodes(1) or set())  # PID 1's may be unreadable: None
            assert proctree.listeners({os.getpid(), 1}, port) == {os.getpid()}
            assert client.getsockname()[1] != port
        assert port_owner.check_port_owner("::1", port, {os.getpid()}).ok
        foreign = port_owner.check_port_owner("127.0.0.1", port, {1})
        assert foreign.checked and not foreign.ok and foreign.owner_pid == os.getpid(), foreign
    assert proctree.listening_inodes(port) == set()
