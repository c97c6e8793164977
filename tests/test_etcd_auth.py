"""etcd auth (``etcd.user``, ``etcd.password_file``): the real sidecar against a real etcd member with auth on.

Each test has a member of its own (``fresh_etcd``) with users made by the real etcdctl as root: ``app`` (a role
with readwrite on the prefix ``services/``), ``nobody`` (no role), then ``auth enable``. etcdctl reads back as
root. The passwords are test passwords: they may appear in the tests' own etcdctl argv, never in the sidecar's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from testkit.etcd import Etcd, etcdctl, etcdctl_binary
from testkit.procs import Sidecar, app_command, free_port

pytestmark = [pytest.mark.integration]

ROOT = ("--user=root", "--password=root-pw-4e1")
APP_PASSWORD = "app-pw-9c2f"
LEASE_TTL = 3.0


@pytest.fixture
def auth_etcd(fresh_etcd: Etcd) -> Etcd:
    ep = fresh_etcd.endpoint
    for args in (
        ("user", "add", f"root:{ROOT[1].split('=', 1)[1]}"),
        ("user", "grant-role", "root", "root"),
        ("role", "add", "svc"),
        ("role", "grant-permission", "svc", "--prefix=true", "readwrite", "services/"),
        ("user", "add", f"app:{APP_PASSWORD}"),
        ("user", "grant-role", "app", "svc"),
        ("user", "add", "nobody:nobody-pw-1b"),
        ("role", "add", "ro"),
        ("role", "grant-permission", "ro", "--prefix=true", "read", "services/"),
        ("user", "add", "reader:reader-pw-5d"),
        ("user", "grant-role", "reader", "ro"),
    ):
        etcdctl(ep, *args)
    enabled = subprocess.run(
        [etcdctl_binary(), f"--endpoints={ep}", "auth", "enable"],
        capture_output=True,
        text=True,
        env={**os.environ, "ETCDCTL_API": "3"},
        timeout=10,
        check=False,
    )
    assert enabled.returncode == 0, enabled.stderr
    return fresh_etcd


def as_root(member: Etcd, *args: str) -> Any:
    return etcdctl(member.endpoint, *ROOT, *args)


def keys(member: Etcd) -> dict[str, int]:
    """Every key under services/ as root reads it: key -> lease."""
    import base64

    return {
        base64.b64decode(kv["key"]).decode(): int(kv.get("lease", 0))
        for kv in as_root(member, "get", "--prefix", "services/").get("kvs") or []
    }


def leases(member: Etcd) -> list[Any]:
    return list(as_root(member, "lease", "list").get("leases") or [])


def start(tmp_path: Path, member: Etcd, user: str, password: str, name: str) -> Sidecar:
    pw = tmp_path / f"{name}.pw"
    pw.write_text(password + "\n")
    pw.chmod(0o600)
    port = free_port()
    config: dict[str, dict[str, Any]] = {
        "registry": {"kind": "etcd"},
        "etcd": {
            "endpoints": [member.endpoint],
            "lease_ttl": f"{LEASE_TTL:g}s",
            "user": user,
            "password_file": str(pw),
        },
        "service": {"name": name, "id": f"{name}-1", "address": "127.0.0.1", "port": port},
        "check": {"interval": "1s", "timeout": "500ms"},
        "shutdown": {"propagation_delay": "1s", "deregister_timeout": "5s", "app_timeout": "5s"},
    }
    return Sidecar(tmp_path, config, app_command(port))


def test_registers_and_drains_with_the_user_s_token(tmp_path: Path, auth_etcd: Etcd) -> None:
    """User ``app`` (readwrite on services/): the key is registered on a lease (etcdctl as root sees it), SIGTERM
    deletes it, confirmed, exit 0; the password is nowhere in the sidecar's log. Red if requests carried no
    token (etcd: "user name is empty", exit 77) or the password leaked into the log."""
    sc = start(tmp_path, auth_etcd, "app", APP_PASSWORD, "authweb")
    sc.wait_event("sidecar.consul.registered")
    [(key, lease)] = keys(auth_etcd).items()
    assert key == "services/authweb/authweb-1" and lease != 0
    sc.send(signal.SIGTERM)
    assert sc.wait() == 0, sc.tail(30)
    assert sc.event("sidecar.consul.deregistered") is not None
    assert keys(auth_etcd) == {}
    assert APP_PASSWORD not in sc.output()


def test_a_wrong_password_exits_77_naming_the_user(tmp_path: Path, auth_etcd: Etcd) -> None:
    """A wrong password in password_file: exit 77, the error names etcd.user 'app' and etcd.password_file but not
    the password; no key, no lease left. Red if the refusal were retried forever, exited otherwise, or
    the password (right or wrong) appeared in the log."""
    wrong = "not-the-pw-77aa"
    sc = start(tmp_path, auth_etcd, "app", wrong, "authwrong")
    assert sc.wait(60) == 77, sc.tail(30)
    denied = sc.event("sidecar.consul.permission_denied")
    assert denied is not None, sc.tail(30)
    assert "etcd.user 'app'" in denied["error"] and "etcd.password_file" in denied["error"], denied
    out = sc.output()
    assert wrong not in out and APP_PASSWORD not in out
    assert keys(auth_etcd) == {} and leases(auth_etcd) == []


@pytest.mark.parametrize("user", ["nobody", "reader"])
def test_a_user_without_permission_on_the_key_exits_77_naming_the_key(
    tmp_path: Path, auth_etcd: Etcd, user: str
) -> None:
    """User ``nobody`` (no role: the first read is refused) or ``reader`` (read only: etcd grants it a lease
    and reads, then refuses the put). Exit 77, the error and the hint name the key and the user (a role
    with readwrite on the key is what it needs); no key and no lease left behind. Red if the lease granted
    before the refused put stayed (checked: not revoking it), or the message named neither."""
    sc = start(tmp_path, auth_etcd, user, f"{user}-pw-{'1b' if user == 'nobody' else '5d'}", "authnone")
    assert sc.wait(60) == 77, sc.tail(30)
    denied = sc.event("sidecar.consul.permission_denied")
    assert denied is not None, sc.tail(30)
    assert "permission denied" in denied["error"] and "'services/authnone/authnone-1'" in denied["error"], denied
    assert f"etcd.user {user!r}" in denied["hint"] and "readwrite" in denied["hint"], denied
    assert keys(auth_etcd) == {} and leases(auth_etcd) == []


def test_no_user_against_etcd_with_auth_exits_77_saying_what_to_set(tmp_path: Path, auth_etcd: Etcd) -> None:
    """No etcd.user while etcd's auth is on (etcd: "user name is empty"): exit 77, the hint names etcd.user and
    etcd.password_file, and says ETCDCTL_USER is not read (the sidecar is given ETCDCTL_USER, as an operator
    used to etcdctl might). Red if it exited 78 (etcd answers with gRPC's InvalidArgument) or retried."""
    port = free_port()
    config: dict[str, dict[str, Any]] = {
        "registry": {"kind": "etcd"},
        "etcd": {"endpoints": [auth_etcd.endpoint]},
        "service": {"name": "authanon", "id": "authanon-1", "address": "127.0.0.1", "port": port},
    }
    sc = Sidecar(tmp_path, config, app_command(port), env={"ETCDCTL_USER": f"app:{APP_PASSWORD}"})
    assert sc.wait(60) == 77, sc.tail(30)
    denied = sc.event("sidecar.consul.permission_denied")
    assert denied is not None and "etcd.user and etcd.password_file" in denied["hint"], denied
    assert "ETCDCTL_USER" in denied["hint"] and APP_PASSWORD not in sc.output()
    assert keys(auth_etcd) == {}


def auth_switch(member: Etcd, what: str) -> None:
    argv = [etcdctl_binary(), f"--endpoints={member.endpoint}", *(ROOT if what == "disable" else ()), "auth", what]
    done = subprocess.run(
        argv, capture_output=True, text=True, env={**os.environ, "ETCDCTL_API": "3"}, timeout=10, check=False
    )
    assert done.returncode == 0, done.stderr


def test_a_token_etcd_forgot_is_renewed(tmp_path: Path, auth_etcd: Etcd) -> None:
    """etcd drops every token when its auth is disabled; enabled again, the sidecar's token is answered
    "invalid auth token" (as an expired one is). The sidecar authenticates again: over two lease TTLs
    every read finds the key on its first lease, and the drain deletes it, confirmed. Red without
    re-authentication (checked: etcd 3.4 renews a lease without looking at the token, but the drain's
    delete is refused: no confirmed deregistration)."""
    sc = start(tmp_path, auth_etcd, "app", APP_PASSWORD, "authrenew")
    sc.wait_event("sidecar.consul.registered")
    [lease] = keys(auth_etcd).values()
    auth_switch(auth_etcd, "disable")
    auth_switch(auth_etcd, "enable")
    t = time.monotonic()
    while time.monotonic() - t < 2 * LEASE_TTL + 1:  # watching over a span of time is the test itself
        assert keys(auth_etcd) == {"services/authrenew/authrenew-1": lease}, f"{time.monotonic() - t:.1f}s"
        time.sleep(0.3)
    sc.send(signal.SIGTERM)
    assert sc.wait() == 0, sc.tail(30)
    assert sc.event("sidecar.consul.deregistered") is not None
    assert keys(auth_etcd) == {}
