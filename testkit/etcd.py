"""Real etcd for the tests and benchmarks: one member, or a three-member cluster, on free loopback ports.

Members are started with ``spawn`` (a session of their own), so the suite's teardown kills them and its
leftover checks count them. Each member keeps its data in a directory of its own under the workdir, so
``restart`` and ``EtcdCluster.start(member)`` bring back the same member with its data.

``etcdctl`` runs the real ``etcdctl`` (API v3, ``-w json``) and returns its parsed output; ``get_prefix`` and
``lease_ttl`` are the two reads the tests need most. etcdctl prints keys and values base64-encoded; lease
IDs come as numbers in its JSON and are passed back to it in hex.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from testkit.procs import free_port, http_get, spawn, wait_for


class EtcdctlError(AssertionError):
    """etcdctl exited non-zero (or did not finish in time); ``stderr`` holds its message."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stderr: str) -> None:
        super().__init__(f"{' '.join(argv)} failed ({returncode}): {stderr.strip()[-1000:]}")
        self.returncode = returncode
        self.stderr = stderr


def etcd_binary() -> str:
    found = shutil.which("etcd") or ("/usr/bin/etcd" if os.path.exists("/usr/bin/etcd") else None)
    if found is None:
        raise AssertionError("no etcd binary (scripts/setup installs Debian's etcd-server)")
    return found


def etcdctl_binary() -> str:
    found = shutil.which("etcdctl") or ("/usr/bin/etcdctl" if os.path.exists("/usr/bin/etcdctl") else None)
    if found is None:
        raise AssertionError("no etcdctl binary (scripts/setup installs Debian's etcd-client)")
    return found


def _endpoints_arg(endpoints: str | Sequence[str]) -> str:
    return endpoints if isinstance(endpoints, str) else ",".join(endpoints)


def etcdctl(endpoints: str | Sequence[str], *args: str, timeout: float = 5.0) -> Any:
    """``ETCDCTL_API=3 etcdctl --endpoints=... -w json ARGS``, its JSON output parsed. ``timeout`` is etcdctl's
    own ``--command-timeout`` (one request's deadline); the process itself gets a few seconds more, then
    is killed. Raises ``EtcdctlError`` when it fails."""
    argv = [
        etcdctl_binary(),
        f"--endpoints={_endpoints_arg(endpoints)}",
        "--dial-timeout=2s",
        f"--command-timeout={timeout:g}s",
        "-w",
        "json",
        *args,
    ]
    env = {**os.environ, "ETCDCTL_API": "3"}
    try:
        out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout + 5, check=False)
    except subprocess.TimeoutExpired as e:
        raise EtcdctlError(argv, None, f"no answer within {timeout + 5:g}s: {e.stderr!r}") from None
    if out.returncode != 0:
        raise EtcdctlError(argv, out.returncode, out.stderr or out.stdout)
    return json.loads(out.stdout) if out.stdout.strip() else None


def get_prefix(endpoints: str | Sequence[str], prefix: str, timeout: float = 5.0) -> dict[str, tuple[bytes, int]]:
    """Every key under ``prefix`` (a linearizable read): key -> (value, lease ID; 0 when none)."""
    reply = etcdctl(endpoints, "get", "--prefix", prefix, timeout=timeout)
    out: dict[str, tuple[bytes, int]] = {}
    for kv in reply.get("kvs") or []:
        key = base64.b64decode(kv["key"]).decode()
        out[key] = (base64.b64decode(kv.get("value", "")), int(kv.get("lease", 0)))
    return out


def lease_ttl(endpoints: str | Sequence[str], lease_id: int, timeout: float = 5.0) -> int:
    """The lease's remaining TTL in seconds, as etcd reports it (-1: the lease is gone or expired)."""
    reply = etcdctl(endpoints, "lease", "timetolive", format(lease_id, "x"), timeout=timeout)
    return int(reply["ttl"])


def lease_grant(endpoints: str | Sequence[str], ttl: int, timeout: float = 5.0) -> int:
    """A new lease of ``ttl`` seconds; its ID."""
    return int(etcdctl(endpoints, "lease", "grant", str(ttl), timeout=timeout)["ID"])


class Etcd:
    """One real ``etcd`` member on free loopback client and peer ports, data under ``workdir``, log to a file.

    Alone (the default) it is a cluster of one; ``EtcdCluster`` passes ``name`` and one ``initial_cluster``
    to each of its members."""

    def __init__(
        self,
        workdir: Path,
        name: str = "default",
        client_port: int | None = None,
        peer_port: int | None = None,
        initial_cluster: str | None = None,
        cluster_token: str | None = None,
    ) -> None:
        self.binary = etcd_binary()
        self.workdir = workdir
        self.name = name
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        self.initial_cluster = initial_cluster or f"{name}={self.peer_url}"
        self.cluster_token = cluster_token or f"testkit-{self.peer_port}"  # the same for every member of a cluster
        self.data_dir = workdir / f"etcd-{name}.data"
        self.log = workdir / f"etcd-{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def argv(self) -> list[str]:
        return [
            self.binary,
            f"--name={self.name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.endpoint}",
            f"--advertise-client-urls={self.endpoint}",
            f"--listen-peer-urls={self.peer_url}",
            f"--initial-advertise-peer-urls={self.peer_url}",
            f"--initial-cluster={self.initial_cluster}",
            "--initial-cluster-state=new",  # ignored once the data dir holds the member (a restart)
            f"--initial-cluster-token={self.cluster_token}",
            "--enable-v2=false",
        ]

    def launch(self) -> None:
        """Start the process without waiting for it to answer (a cluster's members need each other first)."""
        assert self.proc is None or self.proc.poll() is not None, f"etcd {self.name} is already running"
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.proc = spawn(self.argv(), self.log)

    def start(self, timeout: float = 30) -> None:
        self.launch()
        self.wait_healthy(timeout)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self) -> bool:
        """``/health`` says true: the member is up and has a leader (so it can serve writes)."""
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"etcd {self.name} exited with {self.proc.returncode}: {self.tail()}")
        try:
            code, body = http_get(self.endpoint + "/health", timeout=1)
        except OSError:
            return False
        if code != 200:
            return False
        try:
            return bool(json.loads(body).get("health") == "true")
        except ValueError:
            return False

    def wait_healthy(self, timeout: float = 30) -> None:
        wait_for(self.healthy, timeout, 0.05, f"etcd {self.name} healthy on {self.endpoint}")

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGCONT)  # a frozen member would not act on SIGTERM
            self.proc.send_signal(sig)
            self.proc.wait(10)
        self.proc = None

    def restart(self, timeout: float = 30) -> None:
        self.stop(signal.SIGTERM)
        self.start(timeout)

    def freeze(self) -> None:
        """SIGSTOP: its sockets stay open, it answers nobody (see EtcdCluster). ``stop`` thaws it first."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGSTOP)
        wait_for(self.frozen, 10, 0.01, f"etcd {self.name} frozen")

    def thaw(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGCONT)

    def frozen(self) -> bool:
        """Every thread of the process is stopped (SIGSTOP reaches each thread in turn: a busy one may
        still run for a moment)."""
        assert self.proc is not None
        tasks = Path(f"/proc/{self.proc.pid}/task")
        return all((t / "stat").read_text().rsplit(")", 1)[1].split()[0] == "T" for t in tasks.iterdir())

    def member_id(self) -> int:
        return int(etcdctl(self.endpoint, "endpoint", "status")[0]["Status"]["header"]["member_id"])

    def tail(self, chars: int = 2000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


class EtcdCluster:
    """``size`` etcd members on loopback (one ``--initial-cluster``, state new), each with its own free ports
    and data dir. ``kill`` and ``start`` a member; ``freeze`` stops one with SIGSTOP: its sockets stay
    open but it answers nobody, peers included, which is what the others see of a partitioned member
    (a real network partition needs root and a network namespace per member; this needs neither)."""

    def __init__(self, workdir: Path, size: int = 3) -> None:
        self.workdir = workdir
        names = [f"m{i}" for i in range(size)]
        ports = [(free_port(), free_port()) for _ in names]
        initial = ",".join(f"{n}=http://127.0.0.1:{peer}" for n, (_, peer) in zip(names, ports, strict=True))
        token = f"testkit-{ports[0][1]}"
        self.members = [
            Etcd(workdir, n, client_port=c, peer_port=p, initial_cluster=initial, cluster_token=token)
            for n, (c, p) in zip(names, ports, strict=True)
        ]

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def start_all(self, timeout: float = 60) -> None:
        for m in self.members:
            m.launch()
        for m in self.members:
            m.wait_healthy(timeout)

    def leader(self) -> Etcd | None:
        """The member that is leader now, as the running members report it (None while there is none)."""
        ids: dict[int, Etcd] = {}
        leader_id = 0
        for m in self.members:
            if not m.running():
                continue
            try:
                status = etcdctl(m.endpoint, "endpoint", "status", timeout=2)[0]["Status"]
            except EtcdctlError:
                continue
            ids[int(status["header"]["member_id"])] = m
            leader_id = leader_id or int(status.get("leader", 0))
        return ids.get(leader_id)

    def kill(self, member: Etcd) -> None:
        member.stop(signal.SIGKILL)

    def start(self, member: Etcd, timeout: float = 30) -> None:
        member.start(timeout)

    def freeze(self, member: Etcd) -> None:
        """SIGSTOP the member (see the class): not a network partition, but the others cannot tell."""
        assert member.proc is not None
        os.killpg(member.proc.pid, signal.SIGSTOP)

    def thaw(self, member: Etcd) -> None:
        assert member.proc is not None
        os.killpg(member.proc.pid, signal.SIGCONT)

    def stop_all(self) -> None:
        for m in self.members:
            m.stop(signal.SIGKILL)
