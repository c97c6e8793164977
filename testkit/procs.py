"""Real processes for the tests, the demo and the benchmarks: a Consul dev agent on free ports,
and helpers that start programs in sessions of their own and kill everything in them.

Everything started with ``spawn`` is tracked; ``stop_started`` kills whole
sessions (the sidecar's app lives in its own process group inside the same
session), also when a test fails or a demo is interrupted, and ``leftovers()``
tells whether anything survived.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "examples" / "app" / "app.py"
PY = sys.executable

_started: list[subprocess.Popen[bytes]] = []
_sidecar_numbers = itertools.count(1)


_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel reports free, never one this process handed out before: a port is free
    again as soon as the probing socket closes, so two quick calls could otherwise collide."""
    while True:
        with socket.socket() as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def private_loopback_net() -> str:
    """The first three octets of a /24 in 127.0.0.0/8 picked at random for one caller ("127.83.201"):
    apps on its addresses can take ports nobody else binds there (other tests use 127.0.0.1 and a
    few fixed addresses), so a port probed free stays free until the app binds it. Only a wildcard
    bind (0.0.0.0:port) elsewhere could still take it."""
    rng = random.SystemRandom()
    return f"127.{rng.randrange(64, 255)}.{rng.randrange(0, 256)}"


def consul_binary() -> str:
    out = subprocess.run([str(ROOT / "scripts" / "install-consul")], check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


def spawn(argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a process in a session of its own (so teardown can find all it started)."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, env=env
        )
    return track(proc)


def spawn_unseen(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    """``spawn`` in a network namespace of its own (``unshare --net``, its loopback up): the sidecar cannot
    see its sockets."""
    return spawn(["unshare", "--net", "sh", "-c", f"ip link set lo up; exec {' '.join(argv)}"], log)


def track(proc: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
    """Count a process started elsewhere (in a session of its own) among those teardown kills."""
    _started.append(proc)
    return proc


_kept: set[int] = set()  # PIDs of processes that outlive the test that started them (a session's agent)


def keep_for_session(proc: subprocess.Popen[bytes]) -> None:
    """``proc`` belongs to the whole session (a session-scoped fixture started it inside some test):
    the per-test teardown neither kills it nor counts it; ``kill_all_started`` still does."""
    _kept.add(proc.pid)


def started_count() -> int:
    """How many processes were tracked so far: ``stop_started(since)`` and ``leftovers_of_exited(since)``
    take it to mean "started after this point"."""
    return len(_started)


def session_members(sid: int) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # fields[3]: session id; fields[0]: state
            pids.append(int(d.name))
    return pids


def kill_session(sid: int) -> None:
    for pid in session_members(sid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def leftovers() -> list[int]:
    return [p for proc in _started for p in session_members(proc.pid)]


def stop_started(since: int = 0) -> None:
    """Kill every process in the sessions started since index ``since``, and reap the leaders."""
    for proc in _started[since:]:
        if since and proc.pid in _kept:
            continue
        kill_session(proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)


def leftovers_of_exited(since: int = 0, grace: float = 2.0) -> list[str]:
    """Processes still alive in the sessions (started since ``since``) whose leader has exited:
    what a sidecar, nginx or the agent left behind. Waits up to ``grace`` for them to go."""
    deadline = time.monotonic() + grace
    while True:
        left = [
            f"{str(proc.args)[:80]}: {session_members(proc.pid)}"
            for proc in _started[since:]
            if proc.poll() is not None and session_members(proc.pid) and not (since and proc.pid in _kept)
        ]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


def kill_all_started() -> None:
    stop_started(0)


def wait_for(pred: Callable[[], Any], timeout: float, interval: float = 0.02, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def http_get(url: str, timeout: float = 2.0, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class Consul:
    """A real ``consul agent -dev`` on free loopback ports."""

    def __init__(
        self,
        workdir: Path,
        data_dir: Path | None = None,
        hcl: str | None = None,
        dns_port: int | None = None,
        admin_token: str | None = None,
    ) -> None:
        self.admin_token = admin_token  # used for the harness's own reads (ACL-enabled agents)
        self.binary = consul_binary()
        self.workdir = workdir
        self.data_dir = data_dir
        self.hcl = hcl
        self.http_port = free_port()
        self.dns_port = dns_port or free_port()
        self.ports = [free_port() for _ in range(3)]
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "consul.log"

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> None:
        server, lan, wan = self.ports
        argv = [
            self.binary,
            "agent",
            "-dev",
            "-bind=127.0.0.1",
            "-client=127.0.0.1",
            "-node=test",
            f"-http-port={self.http_port}",
            f"-dns-port={self.dns_port}",
            f"-server-port={server}",
            f"-serf-lan-port={lan}",
            f"-serf-wan-port={wan}",
            "-grpc-port=-1",
            "-log-level=info",
        ]
        if self.data_dir is not None:
            argv.append(f"-data-dir={self.data_dir}")
        if self.hcl:
            argv.append(f"-hcl={self.hcl}")
        self.proc = spawn(argv, self.log)
        wait_for(self._ready, 30, 0.1, f"consul agent on {self.address}")

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"consul exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
        try:
            code, body = http_get(self.address + "/v1/catalog/nodes", timeout=1, headers=self._headers())
        except OSError:
            return False
        return code == 200 and b'"test"' in body

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        self.stop(signal.SIGTERM)
        self.start()

    def _headers(self) -> dict[str, str]:
        return {"X-Consul-Token": self.admin_token} if self.admin_token else {}

    def get(self, path: str) -> Any:
        code, body = http_get(self.address + path, headers=self._headers())
        if code == 404:
            return None
        assert code == 200, (path, code, body)
        return json.loads(body)

    def instances(self, name: str) -> list[dict[str, Any]]:
        """Entries of /v1/health/service/<name>: what consumers see."""
        return list(self.get(f"/v1/health/service/{name}") or [])

    def service_ids(self, name: str) -> list[str]:
        return [e["Service"]["ID"] for e in self.instances(name)]


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(v)


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    lines = []
    for name, keys in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in keys.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def merge(base: dict[str, dict[str, Any]], over: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {k: dict(v) for k, v in base.items()}
    for k, v in over.items():
        out.setdefault(k, {}).update(v)
    return out


def log_events(path: Path) -> list[dict[str, Any]]:
    """The JSON events of a log file (a sidecar's, the etcd watcher's), in order; none when it does not exist.
    A process that shares the log with another (the app writes to the sidecar's stderr) can leave its text
    in front of a JSON line: the event is read from its first '{"'."""
    out = []
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            start = line.find('{"')
            if start >= 0:
                with contextlib.suppress(json.JSONDecodeError):
                    out.append(json.loads(line[start:]))
    return out


class Sidecar:
    """``python -m sidecar run`` as a real process, with its JSON log lines at hand."""

    def __init__(
        self,
        workdir: Path,
        config: dict[str, dict[str, Any]],
        command: list[str] | None,
        env: dict[str, str] | None = None,
        nice: int = 0,
    ) -> None:
        """``nice``: run the sidecar (and so its app) at this niceness, so that many of them started
        at once leave the CPU to the other tests on the machine first."""
        self.workdir = workdir
        n = next(_sidecar_numbers)  # not id(self): ids are reused once an object is gone
        self.config_path = write_config(workdir / f"sidecar-{os.getpid()}-{n}.toml", config)
        self.log = workdir / f"sidecar-{os.getpid()}-{n}.log"
        argv = [PY, "-m", "sidecar", "run", "-c", str(self.config_path), "--log-format", "json", "--log-level", "debug"]
        if command:
            argv += ["--", *command]
        if nice:
            argv = ["nice", "-n", str(nice), *argv]  # nice execs the sidecar: the same process
        full_env = dict(os.environ)
        for k in list(full_env):
            if k.startswith(("CONSUL_", "ETCDCTL_")):  # the operator's own settings must not reach a test
                del full_env[k]
        full_env.update(env or {})
        full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
        self.proc = spawn(argv, self.log, full_env)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def events(self) -> list[dict[str, Any]]:
        return log_events(self.log)

    def event(self, name: str) -> dict[str, Any] | None:
        return next((e for e in self.events() if e.get("event") == name), None)

    def wait_event(self, name: str, timeout: float = 60) -> dict[str, Any]:
        """The first ``name`` event, once logged. The default bound is a safety net, not a timing: it only
        runs out when the event never comes (a sidecar that exits fails at once), and a loaded 2-core
        machine has taken over 15 s to start an app and register it."""

        def found() -> dict[str, Any] | None:
            e = self.event(name)
            if e is None and self.proc.poll() is not None:
                raise AssertionError(f"sidecar exited ({self.proc.returncode}) before {name}:\n{self.output()[-3000:]}")
            return e

        return wait_for(found, timeout, what=f"log event {name}")  # type: ignore[no-any-return]

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self, lines: int = 20) -> str:
        """The last lines of the sidecar's log (its app's output included)."""
        return "\n".join(self.output().splitlines()[-lines:])

    def send(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def wait(self, timeout: float = 40) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"sidecar still running after {timeout}s:\n{self.output()[-3000:]}") from None

    def status_url(self) -> str:
        return "http://" + str(self.wait_event("sidecar.status.listening")["address"])

    def app_pid(self) -> int:
        desc = self.wait_event("sidecar.app.started")["app"]
        return int(desc.split()[1])


@contextlib.contextmanager
def scratch_agent() -> Iterator[tuple[Path, Consul]]:
    """A bench's ground: a scratch directory and a Consul dev agent started in it; on leaving (also on an
    error or Ctrl-C), everything started is killed, the agent stopped and the directory removed."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "consul").mkdir()
        consul = Consul(work / "consul")
        consul.start()
        try:
            yield work, consul
        finally:
            kill_all_started()
            consul.stop()


def terminate_all(sidecars: list[Sidecar], timeout: float = 60) -> None:
    """A teardown: SIGTERM every sidecar still running (each drains as it would), then wait for each."""
    for sc in sidecars:
        if sc.proc.poll() is None:
            sc.send(signal.SIGTERM)
    for sc in sidecars:
        sc.wait(timeout)


def app_command(port: int, host: str = "127.0.0.1", *extra: str) -> list[str]:
    return [PY, str(APP), "--host", host, "--port", str(port), *extra]


def read_signal_log(path: Path) -> list[tuple[str, float]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        name, t = line.split()
        out.append((name, float(t)))
    return out


def pid_alive(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"


class ConsulCluster:
    """Three ``consul agent -server`` processes and one client agent, each on a loopback alias of its own
    (127.0.N.1-4, N random so parallel clusters do not share addresses), with free ports and data dirs.

    ``fast=True`` sets ``raft_multiplier = 1`` (Consul's fastest supported timing: a leader that
    dies is replaced within about 1-2 s) and quicker gossip failure detection; ``fast=False`` keeps
    the production defaults (multiplier 5: an election takes several seconds). Everything started is
    tracked by ``spawn``, so the tests' teardown kills it also on failure.
    """

    SERVERS = 3

    def __init__(self, workdir: Path, fast: bool = True) -> None:
        self.binary = consul_binary()
        self.workdir = workdir
        self.fast = fast
        net = 100 + int.from_bytes(os.urandom(1), "big") % 150
        self.hosts = [f"127.0.{net}.{i}" for i in range(1, self.SERVERS + 2)]  # the last one is the client
        self.names = [f"s{i}" for i in range(1, self.SERVERS + 1)] + ["client"]
        self.ports = [{k: free_port(h) for k in ("http", "dns", "server", "serf_lan", "serf_wan")} for h in self.hosts]
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * len(self.hosts)

    @property
    def address(self) -> str:
        """The client agent's HTTP address: what a sidecar talks to."""
        return self.http(len(self.hosts) - 1)

    def http(self, i: int) -> str:
        return f"http://{self.hosts[i]}:{self.ports[i]['http']}"

    def log(self, i: int) -> Path:
        return self.workdir / f"consul-{self.names[i]}.log"

    def _argv(self, i: int) -> list[str]:
        host, p = self.hosts[i], self.ports[i]
        data = self.workdir / f"data-{self.names[i]}"
        data.mkdir(exist_ok=True)
        argv = [
            self.binary,
            "agent",
            f"-node={self.names[i]}",
            f"-bind={host}",
            f"-client={host}",
            f"-data-dir={data}",
            f"-http-port={p['http']}",
            f"-dns-port={p['dns']}",
            f"-server-port={p['server']}",
            f"-serf-lan-port={p['serf_lan']}",
            f"-serf-wan-port={p['serf_wan']}",
            "-grpc-port=-1",
            "-disable-host-node-id",  # four agents on one host would otherwise share a node ID
            "-log-level=debug",
            "-retry-interval=1s",
            "-hcl=disable_update_check = true",
        ]
        if i < self.SERVERS:
            argv += ["-server", f"-bootstrap-expect={self.SERVERS}"]
        argv += [f"-retry-join={self.hosts[j]}:{self.ports[j]['serf_lan']}" for j in range(self.SERVERS) if j != i]
        if self.fast:
            argv += [
                "-hcl=performance { raft_multiplier = 1 }",
                # Notice a dead server within ~1 s rather than ~5 s, so the client stops routing to it.
                '-hcl=gossip_lan { probe_interval = "200ms", probe_timeout = "100ms", suspicion_mult = 2 }',
            ]
        return argv

    def start(self, timeout: float = 60) -> float:
        """Start all four agents; return once the client agent reads the catalog through a leader (seconds taken)."""
        t = time.monotonic()
        for i in range(len(self.hosts)):
            self.procs[i] = spawn(self._argv(i), self.log(i))
        wait_for(self._ready, timeout, 0.05, "a 3-server cluster with a leader and the client agent in it")
        return time.monotonic() - t

    def _alive_check(self) -> None:
        for i, proc in enumerate(self.procs):
            if (
                proc is not None
                and proc.poll() is not None
                and proc.returncode not in (-signal.SIGKILL, -signal.SIGTERM)
            ):
                raise AssertionError(
                    f"consul {self.names[i]} exited with {proc.returncode}: {self.log(i).read_text()[-2000:]}"
                )

    def _ready(self) -> bool:
        self._alive_check()
        try:
            code, body = http_get(self.address + "/v1/catalog/nodes", timeout=1)
        except OSError:
            return False
        return code == 200 and all(f'"{n}"'.encode() in body for n in self.names)

    def leader(self) -> int | None:
        """Index of the server the surviving servers agree is the leader, or None."""
        for i in range(self.SERVERS):
            if self.procs[i] is None:
                continue
            try:
                code, body = http_get(self.http(i) + "/v1/status/leader", timeout=1)
            except OSError:
                continue
            if code == 200:
                addr = json.loads(body)
                for j in range(self.SERVERS):
                    if addr == f"{self.hosts[j]}:{self.ports[j]['server']}":
                        return j
        return None

    def kill(self, i: int) -> None:
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        self.procs[i] = None

    def stop(self) -> None:
        for i in range(len(self.hosts)):
            self.kill(i)

    def get(self, path: str, agent: int | None = None) -> Any:
        code, body = http_get((self.address if agent is None else self.http(agent)) + path)
        if code == 404:
            return None
        assert code == 200, (path, code, body)
        return json.loads(body)

    def listed_anywhere(self, name: str, service_id: str) -> bool | None:
        """Whether any living server's own copy of the catalog (a ``stale`` read, answered without the
        leader) lists the instance; None if no server answered."""
        answered = False
        for i in range(self.SERVERS):
            if self.procs[i] is None:
                continue
            try:
                code, body = http_get(self.http(i) + f"/v1/health/service/{name}?stale", timeout=1)
            except OSError:
                continue
            if code != 200:
                continue
            answered = True
            if any(e["Service"]["ID"] == service_id for e in json.loads(body)):
                return True
        return False if answered else None


def _tcp_table() -> list[tuple[int, int, int]]:
    """(local port, state, inode) of every TCP socket in our network namespace, from /proc/net/tcp{,6}."""
    rows = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            rows.append((int(f[1].rsplit(":", 1)[1], 16), int(f[3], 16), int(f[9])))
    return rows


def _socket_inodes(pid: int) -> set[int]:
    found = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    found.add(int(link[8:-1]))
    except OSError:
        pass
    return found


def accepted_by(port: int, pid: int) -> int:
    """How many established connections to local ``port`` the process ``pid`` has accepted (a connection
    still in the accept queue has no inode yet: the kernel's view, not the app's word)."""
    held = _socket_inodes(pid)
    return sum(1 for p, state, inode in _tcp_table() if p == port and state == 0x01 and inode and inode in held)


def listens(port: int) -> bool:
    """Whether any socket in our network namespace listens on ``port``."""
    return any(p == port and state == 0x0A for p, state, _ in _tcp_table())
