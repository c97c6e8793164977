"""ACLs (a real agent with default_policy = "deny") and TLS (a real agent with a CA the test makes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from testkit import PY, ROOT, Consul, app_command, free_port, http_get, pid_alive, wait_for
from testkit.acl import api, delete_token, make_ca, make_cert, make_token, writer_rules
from testkit.stallfs import StallFS
from testkit.suite import RegisteredSidecar, StartSidecar, base_config


@pytest.mark.parametrize("token_kind", ["none", "unknown", "read-only"])
def test_registration_denied_is_one_clear_error(
    acl_consul: Consul, start_sidecar: StartSidecar, service_name: str, tmp_path: Path, token_kind: str
) -> None:
    """No token, an unknown token, or a token without service:write: exit 77 at start, one error
    naming the problem and the service, the app stopped, nothing registered, no token printed."""
    tokens = {
        "none": None,
        "unknown": "5b1e4c52-dead-beef-0000-000000000000",
        "read-only": make_token(
            acl_consul, 'service_prefix "" { policy = "read" }\nnode_prefix "" { policy = "read" }'
        ),
    }
    token = tokens[token_kind]
    consul_section: dict[str, object] = {}
    if token:
        (tmp_path / "token").write_text(token)
        consul_section = {"token_file": str(tmp_path / "token")}
    port = free_port()
    sc = start_sidecar(base_config(acl_consul, service_name, port, consul=consul_section), app_command(port))
    app = sc.app_pid()
    assert sc.wait(30) == 77
    [err] = [e for e in sc.events() if e["event"] == "sidecar.consul.permission_denied"]
    expected = "ACL not found" if token_kind == "unknown" else f"Missing service:write on {service_name}"
    assert expected in err["error"], err
    assert err["hint"]
    assert "Traceback" not in sc.output()
    assert not pid_alive(app)
    assert acl_consul.get(f"/v1/agent/service/{service_name}-1") is None
    if token:
        assert token not in sc.output()


def test_token_file_rotation(
    acl_consul: Consul, registered_sidecar: RegisteredSidecar, service_name: str, tmp_path: Path
) -> None:
    """1. Registered with token A from consul.token_file.
    2. The file is rewritten with token B; the sidecar re-registers with B (the agent keeps the
       registering token for its catalog syncs); then A is deleted.
    3. SIGTERM: the deregistration is confirmed (agent and catalog), no ACL error; neither token is logged.
    """
    a, b = make_token(acl_consul, writer_rules(service_name)), make_token(acl_consul, writer_rules(service_name))
    tf = tmp_path / "token"
    tf.write_text(a + "\n")
    sc, _ = registered_sidecar(agent=acl_consul, consul={"token_file": str(tf)})
    assert sc.event("sidecar.consul.catalog_unreadable") is None
    tf.write_text(b + "\n")
    wait_for(lambda: sc.event("sidecar.consul.reregistered"), 5, what="re-registration with the new token")
    delete_token(acl_consul, a)
    assert acl_consul.service_ids(service_name) == [f"{service_name}-1"]
    sc.send(signal.SIGTERM)
    assert sc.wait(30) == 0
    assert sc.event("sidecar.consul.deregistered") is not None
    assert acl_consul.service_ids(service_name) == []
    assert a not in sc.output() and b not in sc.output()


def test_token_file_on_a_stalled_mount(
    acl_consul: Consul, registered_sidecar: RegisteredSidecar, service_name: str, tmp_path: Path
) -> None:
    """The token file is on a mount whose server stops answering (a dead NFS server, a secret store
    that hangs): every open or read of it blocks in the kernel (testkit.stallfs, a real FUSE mount).
    1. Registered with token A from consul.token_file on that mount.
    2. The mount stalls; the sidecar's next request reads the file (its check every second).
    3. Expected: /healthz still answers; one event says the token file stalled; SIGTERM drains with
       the last good token (under default_policy "deny" only A can deregister) and the sidecar exits 0
       within its worst case; A never appears in the output."""
    a = make_token(acl_consul, writer_rules(service_name))
    fs = StallFS(tmp_path / "mnt", (a + "\n").encode())
    try:
        sc, _ = registered_sidecar(agent=acl_consul, consul={"token_file": str(fs.path)})
        url = sc.status_url()
        fs.stall()
        wait_for(lambda: fs.held, 10, what="the sidecar to read the stalled token file")
        assert http_get(url + "/healthz", timeout=5)[0] == 200
        stalled = sc.wait_event("sidecar.consul.token_stalled")
        assert str(fs.path) in stalled["source"]
        assert acl_consul.service_ids(service_name) == [f"{service_name}-1"]
        sc.send(signal.SIGTERM)
        assert sc.wait(30) == 0, sc.output()[-3000:]  # worst case 3 + 1 + 10 + 1 s
        assert sc.event("sidecar.consul.deregistered") is not None
        assert acl_consul.service_ids(service_name) == []
        assert a not in sc.output()
        assert len([e for e in sc.events() if e["event"] == "sidecar.consul.token_stalled"]) == 1
    finally:
        fs.close()


def test_token_from_consul_http_token_file(
    acl_consul: Consul, registered_sidecar: RegisteredSidecar, service_name: str, tmp_path: Path
) -> None:
    token = make_token(acl_consul, writer_rules(service_name))
    (tmp_path / "token").write_text(token)
    sc, _ = registered_sidecar(agent=acl_consul, env={"CONSUL_HTTP_TOKEN_FILE": str(tmp_path / "token")})
    assert acl_consul.service_ids(service_name) == [f"{service_name}-1"]
    cmdline = Path(f"/proc/{sc.pid}/cmdline").read_bytes().decode()
    sc.send(signal.SIGTERM)
    assert sc.wait(30) == 0
    assert token not in sc.output() and token not in cmdline


def test_deregistration_blocked_by_acls_is_reported(
    acl_consul: Consul, registered_sidecar: RegisteredSidecar, service_name: str, tmp_path: Path
) -> None:
    """1. Registered with token A; the keeper is slow (30 s check interval), so the sidecar has not yet
       re-registered when the file switches to token B and A is deleted.
    2. SIGTERM: the agent answers 200 and drops its local copy, but its catalog sync runs with the
       deleted token A, so the catalog keeps the instance. Expected: detected and reported loudly.
    """
    a, b = make_token(acl_consul, writer_rules(service_name)), make_token(acl_consul, writer_rules(service_name))
    tf = tmp_path / "token"
    tf.write_text(a)
    sc, _ = registered_sidecar(
        agent=acl_consul,
        consul={"token_file": str(tf)},
        check={"interval": "30s"},
        shutdown={"deregister_timeout": "1s", "propagation_delay": "0s"},
    )
    tf.write_text(b)
    delete_token(acl_consul, a)
    sc.send(signal.SIGTERM)
    assert sc.wait(30) == 0
    blocked = sc.event("sidecar.consul.deregister_blocked")
    assert blocked is not None and blocked["level"] == "error", sc.output()[-2000:]
    assert acl_consul.service_ids(service_name) == [f"{service_name}-1"]  # what the sidecar reported
    api(acl_consul, "PUT", "/v1/catalog/deregister", {"Node": "test", "ServiceID": f"{service_name}-1"})


def test_token_without_node_read_is_warned_about(
    acl_consul: Consul, registered_sidecar: RegisteredSidecar, service_name: str, tmp_path: Path
) -> None:
    """A token with service:write but no node:read cannot see the catalog; the sidecar says so once."""
    token = make_token(acl_consul, f'service "{service_name}" {{ policy = "write" }}')
    (tmp_path / "token").write_text(token)
    sc, _ = registered_sidecar(agent=acl_consul, consul={"token_file": str(tmp_path / "token")})
    warn = sc.wait_event("sidecar.consul.catalog_unreadable")
    assert "node:read" in warn["hint"]
    sc.send(signal.SIGTERM)
    assert sc.wait(30) == 0
    assert acl_consul.service_ids(service_name) == []


# --- TLS ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_consul(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Consul, Path, int]]:
    d = tmp_path_factory.mktemp("tls")
    make_ca(d, "ca")
    make_ca(d, "other-ca")
    make_cert(d, "ca", "server", "IP:127.0.0.1,DNS:localhost")
    make_cert(d, "ca", "client", "DNS:client")
    https = free_port()
    hcl = (
        f'ports {{ https = {https} }} ca_file = "{d}/ca.pem" cert_file = "{d}/server.pem" key_file = "{d}/server.key" '
        "verify_incoming_https = true"
    )
    agent = Consul(d, hcl=hcl)
    agent.start()
    yield agent, d, https
    agent.stop()


def test_https_with_ca_and_client_certificate(
    tls_consul: tuple[Consul, Path, int], registered_sidecar: RegisteredSidecar, service_name: str
) -> None:
    """The agent serves HTTPS with a CA the test made and requires client certificates: the sidecar
    registers and deregisters over HTTPS with ca_file, cert_file and key_file."""
    agent, d, https = tls_consul
    consul_section = {
        "address": f"https://127.0.0.1:{https}",
        "ca_file": str(d / "ca.pem"),
        "cert_file": str(d / "client.pem"),
        "key_file": str(d / "client.key"),
    }
    sc, _ = registered_sidecar(agent=agent, consul=consul_section)
    assert agent.service_ids(service_name) == [f"{service_name}-1"]
    sc.send(signal.SIGTERM)
    assert sc.wait(30) == 0
    assert sc.event("sidecar.consul.deregistered") is not None
    assert agent.service_ids(service_name) == []


@pytest.mark.parametrize("case", ["wrong-ca", "no-client-cert"])
def test_https_misconfigured_is_a_clear_error(
    tls_consul: tuple[Consul, Path, int], start_sidecar: StartSidecar, service_name: str, case: str
) -> None:
    """A CA that did not sign the agent's certificate, or no client certificate where the agent
    requires one: one clear TLS error at start (not endless retries), exit 78, nothing registered."""
    agent, d, https = tls_consul
    port = free_port()
    consul_section: dict[str, object] = {"address": f"https://127.0.0.1:{https}", "timeout": "1s"}
    if case == "wrong-ca":
        consul_section |= {
            "ca_file": str(d / "other-ca.pem"),
            "cert_file": str(d / "client.pem"),
            "key_file": str(d / "client.key"),
        }
    else:
        consul_section |= {"ca_file": str(d / "ca.pem")}
    sc = start_sidecar(
        base_config(agent, service_name, port, consul=consul_section, startup={"timeout": "5s"}), app_command(port)
    )
    assert sc.wait(30) == 78
    err = sc.event("sidecar.consul.registration_rejected")
    assert err is not None and "TLS" in err["error"], sc.output()[-2000:]
    assert ("not trusted" in err["error"]) if case == "wrong-ca" else ("client certificate" in err["error"])
    assert agent.service_ids(service_name) == []
    assert "Traceback" not in sc.output()


@pytest.mark.integration
@pytest.mark.parametrize("case", ["trusted", "wrong-ca", "no-client-cert"])
def test_wait_over_https(tls_consul: tuple[Consul, Path, int], service_name: str, case: str) -> None:
    """`wait --http-addr https://...` (its blocking transport) with the CA and client certificate from
    CONSUL_CACERT / CONSUL_CLIENT_CERT / CONSUL_CLIENT_KEY sees an instance with no checks as passing
    and exits 0. A CA that did not sign the agent's certificate, or no client certificate, ends at
    once with exit 1 and one clear TLS error (not a wait until --timeout), no traceback."""
    agent, d, https = tls_consul
    body = json.dumps({"Name": service_name, "ID": f"{service_name}-1", "Port": 1}).encode()
    req = urllib.request.Request(f"{agent.address}/v1/agent/service/register", data=body, method="PUT")
    urllib.request.urlopen(req, timeout=5).close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")} | {"PYTHONPATH": str(ROOT)}
    env |= {"CONSUL_CACERT": str(d / ("other-ca.pem" if case == "wrong-ca" else "ca.pem"))}
    if case != "no-client-cert":
        env |= {"CONSUL_CLIENT_CERT": str(d / "client.pem"), "CONSUL_CLIENT_KEY": str(d / "client.key")}
    try:
        done = subprocess.run(
            [
                PY,
                "-m",
                "sidecar",
                "wait",
                "--http-addr",
                f"https://127.0.0.1:{https}",
                "--service",
                service_name,
                "--min-passing",
                "1",
                "--timeout",
                "30s",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
    finally:
        req = urllib.request.Request(f"{agent.address}/v1/agent/service/deregister/{service_name}-1", method="PUT")
        urllib.request.urlopen(req, timeout=5).close()
    assert "Traceback" not in done.stderr
    if case == "trusted":
        assert done.returncode == 0, done.stderr
        assert "1 passing of 1 registered" in done.stdout
        return
    assert done.returncode == 1 and "timed out" not in done.stderr, done.stderr
    assert "TLS" in done.stderr
    assert ("not trusted" in done.stderr) if case == "wrong-ca" else ("client certificate" in done.stderr)
