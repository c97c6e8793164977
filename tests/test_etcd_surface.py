"""What an operator reads of a sidecar with ``registry.kind = "etcd"``: /ready, /status and /metrics, the
``wait``, ``check-config`` and ``maint`` commands, and the traffic strategy's catalog step.

Real sidecars (testkit's ``Sidecar``) with real apps against real etcd members; what the sidecar says is
cross-checked with ``etcdctl``. Tests on the shared member write under their own ``etcd_prefix``; those
that freeze etcd have a member of their own.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from testkit.etcd import Etcd, etcdctl, get_prefix, lease_ttl
from testkit.procs import PY, ROOT, Sidecar, app_command, free_port, http_get, wait_for, write_config

pytestmark = [pytest.mark.integration]

CONSUL_ONLY_FAMILIES = (
    "consul_sidecar_consul_reachable",
    "consul_sidecar_consul_request_errors_total",
    "consul_sidecar_maintenance",
)


def etcd_config(url: str, prefix: str, port: int, name: str, **over: dict[str, Any]) -> dict[str, dict[str, Any]]:
    cfg: dict[str, dict[str, Any]] = {
        "registry": {"kind": "etcd"},
        "etcd": {"endpoints": [url], "prefix": prefix, "lease_ttl": "3s", "timeout": "1s"},
        "service": {"name": name, "id": f"{name}-{port}", "address": "127.0.0.1", "port": port},
        "check": {"interval": "1s", "timeout": "500ms"},
        "shutdown": {"propagation_delay": "1s", "deregister_timeout": "3s", "app_timeout": "5s"},
    }
    for section, values in over.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def get_json(sc: Sidecar, path: str) -> tuple[int, dict[str, Any]]:
    code, body = http_get(sc.status_url() + path, timeout=5)
    return code, json.loads(body)


def families(sc: Sidecar) -> dict[str, str]:
    """/metrics as {sample name with labels: value}, with a ``# TYPE`` line required for each family."""
    code, body = http_get(sc.status_url() + "/metrics", timeout=5)
    assert code == 200
    text = body.decode()
    types = set(re.findall(r"^# TYPE (\S+) ", text, re.M))
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            assert name.split("{")[0] in types, line
            out[name] = value
    return out


def post(url: str) -> None:
    import urllib.request

    urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=5).read()


# --- /status, /metrics, /ready ---------------------------------------------------------------------------


def test_status_and_metrics_show_the_key_and_lease_etcdctl_sees(tmp_path: Path, etcd: Etcd, etcd_prefix: str) -> None:
    """1. Registered: /status's ``registry`` names kind etcd, the key and the lease that etcdctl shows the key
    on (hex), lease_ttl 3 s, etcd reachable, no keepalive failure; Consul's ``consul_reachable`` and
    ``maintenance`` are not there. 2. /metrics has consul_sidecar_etcd_reachable 1,
    consul_sidecar_etcd_keepalive_failures_total 0 and etcd_key_withheld 0, and none of Consul's own families.
    Red if /status or /metrics spoke of Consul with etcd, or named a key or lease etcd does not hold."""
    port = free_port()
    sc = Sidecar(tmp_path, etcd_config(etcd.endpoint, etcd_prefix, port, "surf"), app_command(port))
    sc.wait_event("sidecar.consul.registered")
    key = f"{etcd_prefix}surf/surf-{port}"
    [(value, lease)] = get_prefix(etcd.endpoint, key).values()
    assert json.loads(value)["Addr"] == f"127.0.0.1:{port}"

    code, doc = get_json(sc, "/status")
    assert code == 200
    reg = doc["registry"]
    assert reg["kind"] == "etcd" and reg["reachable"] is True and reg["endpoint"] == etcd.endpoint
    assert reg["key"] == key and reg["lease_id"] == format(lease, "x") and reg["lease_ttl_s"] == 3
    assert 0 < lease_ttl(etcd.endpoint, int(reg["lease_id"], 16)) <= 3
    assert reg["key_withheld"] is False and reg["keepalive_failures"] == 0
    assert not {"consul_reachable", "maintenance", "maintenance_reason"} & set(doc), doc

    m = families(sc)
    assert m["consul_sidecar_etcd_reachable"] == "1"
    assert m["consul_sidecar_etcd_keepalive_failures_total"] == "0"
    assert m["consul_sidecar_etcd_key_withheld"] == "0"
    assert m["consul_sidecar_registrations_total"] == "1"
    assert not [n for n in m if n.split("{")[0] in CONSUL_ONLY_FAMILIES], m
    sc.send(signal.SIGTERM)
    assert sc.wait() == 0, sc.tail()
    assert get_prefix(etcd.endpoint, key) == {}


def test_ready_follows_the_key_and_the_drain(tmp_path: Path, etcd: Etcd, etcd_prefix: str) -> None:
    """1. Registered: /ready 200 "registered". 2. The app's check fails: etcdctl sees the key deleted, /ready
    answers 503 "check critical" and /metrics' etcd_key_withheld is 1. 3. The check passes again: the key is
    back and /ready 200. 4. SIGTERM with a 4 s propagation delay: once etcdctl sees the key gone, /ready
    answers 503 "draining". Red if /ready judged by the lifecycle's state alone (it said 200 while the key
    was deleted, as before this change)."""
    port = free_port()
    cfg = etcd_config(etcd.endpoint, etcd_prefix, port, "ready", shutdown={"propagation_delay": "4s"})
    sc = Sidecar(tmp_path, cfg, app_command(port))
    sc.wait_event("sidecar.consul.registered")
    prefix = f"{etcd_prefix}ready/"
    assert get_json(sc, "/ready") == (200, {"ready": True, "reason": "registered"})

    post(f"http://127.0.0.1:{port}/health?status=500")
    wait_for(lambda: get_prefix(etcd.endpoint, prefix) == {}, 10, 0.1, "key deleted while the check fails")
    code, doc = wait_for(lambda: r if (r := get_json(sc, "/ready"))[0] == 503 else None, 5, 0.2, "503")
    assert doc["reason"] == "check critical" and "deleted" in doc["detail"], doc
    assert families(sc)["consul_sidecar_etcd_key_withheld"] == "1"

    post(f"http://127.0.0.1:{port}/health?status=auto")
    wait_for(lambda: get_prefix(etcd.endpoint, prefix) != {}, 10, 0.1, "key back")
    wait_for(lambda: get_json(sc, "/ready")[0] == 200, 5, 0.2, "ready again")

    sc.send(signal.SIGTERM)
    wait_for(lambda: get_prefix(etcd.endpoint, prefix) == {}, 10, 0.05, "key deleted by the drain")
    assert get_json(sc, "/ready") == (503, {"ready": False, "reason": "draining"})
    assert sc.wait() == 0, sc.tail()


def test_a_failing_keepalive_is_counted_and_the_registration_re_established(tmp_path: Path, fresh_etcd: Etcd) -> None:
    """etcd frozen (SIGSTOP) past a keepalive: /ready says 503 "etcd unreachable", /metrics'
    consul_sidecar_etcd_keepalive_failures_total and /status's keepalive_failures rise to at least 1. Thawed:
    the key is there again (etcdctl) on a live lease, /ready 200, and the counter keeps its count.
    Red if keepalive failures were not counted in /metrics, or /ready still said 200 with etcd frozen."""
    port = free_port()
    url = fresh_etcd.endpoint
    sc = Sidecar(tmp_path, etcd_config(url, "services", port, "keep"), app_command(port))
    sc.wait_event("sidecar.consul.registered")
    assert fresh_etcd.proc is not None
    os.killpg(fresh_etcd.proc.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: int(families(sc)["consul_sidecar_etcd_keepalive_failures_total"]) >= 1, 15, 0.2, "counted")
        code, doc = wait_for(lambda: r if (r := get_json(sc, "/ready"))[0] == 503 else None, 10, 0.2, "503")
        assert doc["reason"] == "etcd unreachable", doc
    finally:
        os.killpg(fresh_etcd.proc.pid, signal.SIGCONT)
    wait_for(lambda: get_prefix(url, "services/keep/") != {}, 20, 0.1, "key there after the thaw")
    wait_for(lambda: get_json(sc, "/ready")[0] == 200, 20, 0.2, "ready after the thaw")
    [(_, lease)] = get_prefix(url, "services/keep/").values()
    assert lease_ttl(url, lease) > 0
    failures = int(families(sc)["consul_sidecar_etcd_keepalive_failures_total"])
    assert failures >= 1 and get_json(sc, "/status")[1]["registry"]["keepalive_failures"] == failures
    sc.send(signal.SIGTERM)
    assert sc.wait() == 0, sc.tail()


# --- consul-sidecar wait ------------------------------------------------------------------------------------


def run_cli(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONSUL_", "ETCDCTL_"))}
    return subprocess.run(
        [PY, "-m", "sidecar", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout
    )


def test_wait_counts_the_passing_instances_under_the_prefix(tmp_path: Path, etcd: Etcd, etcd_prefix: str) -> None:
    """1. Two sidecars register "waitweb" under the test's prefix (etcdctl sees two keys): ``wait -c FILE
    --service waitweb --min-passing 2`` exits 0 and says "2 passing". 2. One drains (SIGTERM, its key gone):
    ``--min-passing 2 --timeout 2s`` exits 1 after about 2 s, one line saying it timed out with 1 passing;
    ``--id <its ID> --gone`` exits 0, ``--id <the other> --passing`` exits 0. Red if wait read Consul with an
    etcd file (no agent here: it would time out in step 1), or counted keys of another service."""
    cfg = write_config(tmp_path / "wait.toml", etcd_config(etcd.endpoint, etcd_prefix, 1, "waitweb"))
    decoy = etcd_prefix + "waitwebx/other"  # another service whose name starts alike: not counted
    etcdctl(etcd.endpoint, "put", decoy, "{}")
    ports = [free_port(), free_port()]
    sidecars = [Sidecar(tmp_path, etcd_config(etcd.endpoint, etcd_prefix, p, "waitweb"), app_command(p)) for p in ports]
    done = run_cli("wait", "-c", str(cfg), "--service", "waitweb", "--min-passing", "2", "--timeout", "60s")
    assert done.returncode == 0, done.stderr
    assert "at least 2 passing instance(s) of waitweb" in done.stdout and "(2 passing of 2 registered)" in done.stdout
    assert len(get_prefix(etcd.endpoint, etcd_prefix + "waitweb/")) == 2

    sidecars[0].send(signal.SIGTERM)
    assert sidecars[0].wait() == 0, sidecars[0].tail()
    assert len(get_prefix(etcd.endpoint, etcd_prefix + "waitweb/")) == 1
    t = time.monotonic()
    done = run_cli("wait", "-c", str(cfg), "--service", "waitweb", "--min-passing", "2", "--timeout", "2s")
    assert done.returncode == 1 and 2 <= time.monotonic() - t < 20, done
    [line] = done.stderr.strip().splitlines()[1:]
    assert "timed out after 2." in line and "last seen: 1 passing of 1 registered" in line, line
    gone = run_cli("wait", "-c", str(cfg), "--service", "waitweb", "--id", f"waitweb-{ports[0]}", "--gone")
    assert gone.returncode == 0, gone.stderr
    passing = run_cli("wait", "-c", str(cfg), "--service", "waitweb", "--id", f"waitweb-{ports[1]}", "--passing")
    assert passing.returncode == 0 and f"waitweb-{ports[1]} is registered" in passing.stdout, passing
    sidecars[1].send(signal.SIGTERM)
    assert sidecars[1].wait() == 0, sidecars[1].tail()


def test_wait_returns_as_the_instance_registers(tmp_path: Path, etcd: Etcd, etcd_prefix: str) -> None:
    """``wait --id ID --passing`` started before the sidecar returns 0 once the key is put, within a
    second of etcdctl seeing it (the poll is 100 ms). Red if it read once and never again."""
    port = free_port()
    cfg = etcd_config(etcd.endpoint, etcd_prefix, port, "late")
    path = write_config(tmp_path / "wait.toml", cfg)
    argv = [PY, "-m", "sidecar", "wait", "-c", str(path), "--service", "late", "--id", f"late-{port}", "--passing"]
    waiter = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        sc = Sidecar(tmp_path, cfg, app_command(port))
        wait_for(lambda: get_prefix(etcd.endpoint, etcd_prefix + "late/") != {}, 60, 0.02, "key put")
        seen = time.monotonic()
        out, err = waiter.communicate(timeout=30)
        assert waiter.returncode == 0, err
        assert time.monotonic() - seen < 1.5
        sc.send(signal.SIGTERM)
        assert sc.wait() == 0, sc.tail()
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()


def test_wait_with_etcd_loads_neither_asyncio_nor_aiohttp(tmp_path: Path, etcd: Etcd, etcd_prefix: str) -> None:
    """As Consul's wait (tests/test_cli_imports.py): the etcd wait runs on http.client; sys.modules at exit has
    no asyncio, aiohttp, structlog, the etcd adapter or the Consul client. Red if it went through the
    adapter (aiohttp) to read etcd."""
    cfg = write_config(tmp_path / "wait.toml", etcd_config(etcd.endpoint, etcd_prefix, 1, "imports"))
    out = tmp_path / "modules.json"
    probe = (
        "import atexit, json, os, sys\n"
        "atexit.register(lambda: open(os.environ['MODULES_OUT'], 'w').write(json.dumps(sorted(sys.modules))))\n"
        "from sidecar.__main__ import entry\n"
        "sys.exit(entry())\n"
    )
    args = ["wait", "-c", str(cfg), "--service", "imports", "--id", "x", "--gone", "--timeout", "5s"]
    done = subprocess.run(
        [PY, "-c", probe, *args], capture_output=True, text=True, cwd=ROOT, env={**os.environ, "MODULES_OUT": str(out)}
    )
    assert done.returncode == 0, done.stderr
    modules = set(json.loads(out.read_text()))
    heavy = {"asyncio", "aiohttp", "structlog", "sidecar.registry.etcd", "sidecar.registry.consul", "consul"}
    assert sorted(modules & heavy) == []
    assert "sidecar.registry.wait" in modules


def test_wait_authenticates_with_the_files_user(tmp_path: Path, fresh_etcd: Etcd) -> None:
    """etcd with auth on (etcdctl: users root and web, web may read services/): ``wait -c FILE`` with
    etcd.user = "web" and its password_file counts the two keys root put (exit 0). A wrong password: exit 1,
    one line saying authentication failed, the password nowhere in the output. No user in the file: exit 1,
    the line says etcd requires auth. Red if wait sent no token (etcd answers "user name is empty")."""
    from testkit.etcd import etcdctl_binary

    url = fresh_etcd.endpoint
    etcdctl(url, "user", "add", "root:rootpw")
    etcdctl(url, "user", "add", "web:webpw")
    etcdctl(url, "role", "add", "reader")
    etcdctl(url, "role", "grant-permission", "reader", "--prefix=true", "read", "services/")
    etcdctl(url, "user", "grant-role", "web", "reader")
    subprocess.run(  # etcdctl prints plain text here even with -w json
        [etcdctl_binary(), f"--endpoints={url}", "auth", "enable"], env={"ETCDCTL_API": "3"}, check=True, timeout=30
    )
    for i in (1, 2):
        etcdctl(url, "--user=root:rootpw", "put", f"services/authweb/i{i}", "{}")
    wrong = "not-" + os.urandom(6).hex()
    for name, password in (("good", "webpw\n"), ("bad", wrong)):
        (tmp_path / name).write_text(password)
    cfg = etcd_config(url, "services", 1, "authweb")
    args = ["--service", "authweb", "--min-passing", "2", "--timeout", "3s"]

    cfg["etcd"] |= {"user": "web", "password_file": str(tmp_path / "good")}
    done = run_cli("wait", "-c", str(write_config(tmp_path / "good.toml", cfg)), *args)
    assert done.returncode == 0 and "(2 passing of 2 registered)" in done.stdout, done

    cfg["etcd"]["password_file"] = str(tmp_path / "bad")
    done = run_cli("wait", "-c", str(write_config(tmp_path / "bad.toml", cfg)), *args)
    assert done.returncode == 1 and wrong not in done.stdout + done.stderr, done
    [line] = done.stderr.strip().splitlines()[1:]
    assert "authentication failed" in line, line

    del cfg["etcd"]["user"], cfg["etcd"]["password_file"]
    done = run_cli("wait", "-c", str(write_config(tmp_path / "none.toml", cfg)), *args)
    assert done.returncode == 1 and "etcd requires auth" in done.stderr, done


def make_certs(d: Path) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, with the real openssl."""

    def openssl(args: str) -> None:
        subprocess.run(["openssl", *args.split()], cwd=d, check=True, capture_output=True, timeout=60)

    openssl("req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=test-ca")
    for name, usage in (("server", "serverAuth,clientAuth"), ("client", "clientAuth")):
        (d / f"{name}.ext").write_text(f"subjectAltName=IP:127.0.0.1\nextendedKeyUsage={usage}\n")
        openssl(f"req -newkey rsa:2048 -nodes -keyout {name}.key -out {name}.csr -subj /CN={name}")
        sign = "x509 -req -CA ca.pem -CAkey ca.key -CAcreateserial -days 2"
        openssl(f"{sign} -in {name}.csr -out {name}.pem -extfile {name}.ext")


def test_wait_reads_etcd_over_tls_with_a_client_certificate(tmp_path: Path) -> None:
    """etcd on https with client certificates required (a real etcd, certificates from openssl): ``wait -c
    FILE`` with etcd.ca_file, cert_file and key_file counts the key etcdctl put (exit 0). Without the client
    certificate: exit 1, one line naming the TLS failure. A CA file that is no certificate: exit 78, one line
    naming etcd.ca_file. Red if wait spoke plain HTTP to an https endpoint or ignored the certificate files."""
    from testkit.etcd import etcd_binary, etcdctl_binary
    from testkit.procs import spawn

    make_certs(tmp_path)
    client, peer = free_port(), free_port()
    url = f"https://127.0.0.1:{client}"
    tls = {"ca_file": str(tmp_path / "ca.pem"), "cert_file": str(tmp_path / "client.pem")}
    tls["key_file"] = str(tmp_path / "client.key")
    argv = [
        etcd_binary(),
        f"--data-dir={tmp_path / 'etcd.data'}",
        f"--listen-client-urls={url}",
        f"--advertise-client-urls={url}",
        f"--listen-peer-urls=http://127.0.0.1:{peer}",
        f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
        f"--initial-cluster=default=http://127.0.0.1:{peer}",
        f"--cert-file={tmp_path / 'server.pem'}",
        f"--key-file={tmp_path / 'server.key'}",
        f"--trusted-ca-file={tmp_path / 'ca.pem'}",
        "--client-cert-auth",
    ]
    proc = spawn(argv, tmp_path / "etcd.log")
    try:
        put = [etcdctl_binary(), f"--endpoints={url}", f"--cacert={tls['ca_file']}", f"--cert={tls['cert_file']}"]
        put += [f"--key={tls['key_file']}", "put", "services/tlsweb/a", "{}"]

        def stored() -> bool:
            assert proc.poll() is None, (tmp_path / "etcd.log").read_text()[-2000:]
            done = subprocess.run(put, env={"ETCDCTL_API": "3"}, capture_output=True, timeout=30)
            return done.returncode == 0

        wait_for(stored, 30, 0.1, "etcd on TLS takes a put")
        cfg = etcd_config(url, "services", 1, "tlsweb")
        args = ["--service", "tlsweb", "--min-passing", "1", "--timeout", "3s"]
        cfg["etcd"] |= tls
        done = run_cli("wait", "-c", str(write_config(tmp_path / "tls.toml", cfg)), *args)
        assert done.returncode == 0 and "(1 passing of 1 registered)" in done.stdout, done

        del cfg["etcd"]["cert_file"], cfg["etcd"]["key_file"]
        done = run_cli("wait", "-c", str(write_config(tmp_path / "nocert.toml", cfg)), *args)
        assert done.returncode == 1, done
        [line] = done.stderr.strip().splitlines()[1:]
        assert "TLS refused: check etcd.cert_file and etcd.key_file" in line, line

        (tmp_path / "bad.pem").write_text("not a certificate\n")
        cfg["etcd"]["ca_file"] = str(tmp_path / "bad.pem")
        done = run_cli("wait", "-c", str(write_config(tmp_path / "badca.toml", cfg)), *args)
        assert done.returncode == 78 and "etcd.ca_file" in done.stderr and len(done.stderr.splitlines()) == 1, done
    finally:
        proc.kill()
        proc.wait(10)


@pytest.mark.parametrize("fmt", ["grpc", "skydns"])
def test_wait_looks_under_the_prefix_the_sidecar_writes(tmp_path: Path, fmt: str) -> None:
    """Pure: wait's service prefix is the adapter's key less the instance ID, in both formats. Red if the
    two layouts drifted apart (wait would count nothing)."""
    from sidecar.config import load_config
    from sidecar.registry.etcd import etcd_key
    from sidecar.registry.wait import service_prefix

    extra = {"format": fmt, "dns_domain": "svc.example.org"} if fmt == "skydns" else {"prefix": "/p/q/"}
    cfg = etcd_config("http://127.0.0.1:2379", "services", 80, "web")
    cfg["etcd"] |= extra
    config = load_config(write_config(tmp_path / "c.toml", cfg), {})
    assert etcd_key(config) == service_prefix(config.etcd, "web") + "web-80"


# --- check-config and maint ---------------------------------------------------------------------------------


def test_check_config_prints_the_etcd_settings_and_key_never_the_password(tmp_path: Path) -> None:
    """``check-config`` with an etcd file (auth set, the password in a file): exit 0; the JSON has the
    endpoints, prefix, format, lease_ttl, the key it would write (prefix/name/id) and its value, the check it
    runs itself; not Consul's section or service definition; the password's text is nowhere in the output;
    one stderr line gives the lease and keepalive period. With skydns the key is the reversed domain's.
    Red if check-config printed Consul's registration for etcd, or the password."""
    secret = "pw-" + os.urandom(8).hex()
    (tmp_path / "pw").write_text(secret)
    cfg = etcd_config("http://127.0.0.1:2379", "/svc", 8080, "web")
    cfg["etcd"] |= {"user": "web", "password_file": str(tmp_path / "pw"), "lease_ttl": "6s"}
    done = run_cli("check-config", "-c", str(write_config(tmp_path / "c.toml", cfg)))
    assert done.returncode == 0, done.stderr
    assert secret not in done.stdout + done.stderr
    doc = json.loads(done.stdout)
    assert "consul" not in doc and "registration" not in doc, list(doc)
    etcd = doc["etcd"]
    assert etcd["endpoints"] == ["http://127.0.0.1:2379"] and etcd["prefix"] == "/svc" and etcd["format"] == "grpc"
    assert etcd["lease_ttl"] == "6s" and etcd["user"] == "web" and etcd["password_file"] == str(tmp_path / "pw")
    assert etcd["key"] == "/svc/web/web-8080" and etcd["value"]["Addr"] == "127.0.0.1:8080"
    assert doc["registry"] == {"kind": "etcd"} and doc["check"]["interval"] == "1s"
    assert "etcd: the key lives on a lease of 6s, kept alive every 2s" in done.stderr, done.stderr

    cfg["etcd"] |= {"format": "skydns", "dns_domain": "svc.example.org"}
    done = run_cli("check-config", "-c", str(write_config(tmp_path / "s.toml", cfg)))
    assert done.returncode == 0, done.stderr
    skydns = json.loads(done.stdout)["etcd"]
    assert skydns["key"] == "/skydns/org/example/svc/web/web-8080"
    assert skydns["value"]["host"] == "127.0.0.1" and skydns["value"]["port"] == 8080


@pytest.mark.parametrize("how", [["--enable", "--reason", "disk swap"], ["--disable"]])
def test_maint_with_etcd_is_one_line_and_exit_78(tmp_path: Path, etcd: Etcd, etcd_prefix: str, how: list[str]) -> None:
    """``maint`` with an etcd file, the instance registered: exit 78, one line on stderr saying maintenance mode
    is Consul's, nothing on stdout, no traceback, and the key untouched (etcdctl: same value, same lease).
    Red if maint tried Consul (exit 69/67 and another message) or changed the key."""
    port = free_port()
    cfg = etcd_config(etcd.endpoint, etcd_prefix, port, "maint")
    sc = Sidecar(tmp_path, cfg, app_command(port))
    sc.wait_event("sidecar.consul.registered")
    before = get_prefix(etcd.endpoint, etcd_prefix + "maint/")
    done = run_cli("maint", "-c", str(sc.config_path), *how)
    assert done.returncode == 78 and done.stdout == "", done
    [line] = done.stderr.splitlines()
    assert "maintenance mode is Consul's" in line and 'registry.kind = "etcd"' in line, line
    assert get_prefix(etcd.endpoint, etcd_prefix + "maint/") == before != {}
    sc.send(signal.SIGTERM)
    assert sc.wait() == 0, sc.tail()


# --- the traffic strategy's catalog step ----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_the_traffic_catalog_step_reads_the_key_in_etcd(tmp_path: Path, etcd: Etcd, etcd_prefix: str) -> None:
    """The drain's wait (sidecar/drain/wait.py, strategy traffic) with the real etcd adapter and a real
    listening port. 1. The key is still in etcd (etcdctl sees it): the catalog step never passes, logs
    ``sidecar.drain.catalog_not_clear`` and the wait ends "upper bound (propagation_delay)" after ~1.5 s.
    2. etcdctl deletes the key 0.5 s into the step: ``sidecar.drain.catalog_clear`` comes after the delete,
    then the quiet step, and the wait ends "traffic quiet". Red if the catalog step did not read etcd (it
    would pass at once in 1), or did not read it again (it would never pass in 2)."""
    import asyncio
    import socket

    import structlog

    from sidecar.clock import SystemClock
    from sidecar.config import load_config
    from sidecar.drain.wait import DrainWait
    from sidecar.registry.etcd import EtcdRegistry
    from sidecar.state import DrainEnd, Status

    port = free_port()
    cfg = etcd_config(etcd.endpoint, etcd_prefix, port, "drain")
    cfg["shutdown"] |= {"strategy": "traffic", "propagation_delay": "1500ms", "min_delay": "100ms"}
    cfg["shutdown"] |= {"quiet_period": "200ms"}
    config = load_config(write_config(tmp_path / "c.toml", cfg), {})
    clock = SystemClock()
    key = f"{etcd_prefix}drain/drain-{port}"
    with socket.create_server(("127.0.0.1", port)):
        reg = EtcdRegistry(config, clock)
        try:
            await reg.register({"Meta": {}, "Check": {"Status": "passing"}})
            assert key in get_prefix(etcd.endpoint, key)
            for step in (1, 2):
                drain = DrainWait(config, reg, clock, structlog.get_logger(), Status(clock, config.service.id))
                await drain.prepare()
                try:
                    with structlog.testing.capture_logs() as logs:
                        t0 = clock.monotonic()
                        if step == 1:
                            end = await drain.wait(t0)
                        else:
                            waiting = asyncio.ensure_future(drain.wait(t0))
                            await asyncio.sleep(0.5)
                            await asyncio.to_thread(etcdctl, etcd.endpoint, "del", key)
                            deleted = clock.monotonic() - t0
                            end = await waiting
                        took = clock.monotonic() - t0
                finally:
                    drain.close()
                events = {e["event"]: e for e in logs}
                if step == 1:
                    assert end is DrainEnd.UPPER_BOUND and 1.4 < took < 5, (end, took)
                    assert "sidecar.drain.catalog_not_clear" in events and "sidecar.drain.catalog_clear" not in events
                    assert key in get_prefix(etcd.endpoint, key)
                else:
                    assert end is DrainEnd.TRAFFIC_QUIET, (end, logs)
                    assert events["sidecar.drain.catalog_clear"]["elapsed_ms"] >= deleted * 1000 - 150
                    assert "sidecar.drain.quiet" in events
        finally:
            await reg.close()


def test_a_traffic_drain_with_etcd_is_truthful_end_to_end(tmp_path: Path, etcd: Etcd, etcd_prefix: str) -> None:
    """The real sidecar, strategy traffic, against etcd: on SIGTERM the key is gone (etcdctl) before the app is
    signalled; the drain logs deregistered, catalog_clear, quiet and delay_done ("traffic quiet",
    deregistration "confirmed"), in that order; no logged field of the whole run (event names aside) speaks
    of Consul. Red if the catalog step or the quiet step were skipped, or a message named Consul falsely."""
    from testkit.procs import read_signal_log

    port, signals = free_port(), tmp_path / "signals"
    cfg = etcd_config(etcd.endpoint, etcd_prefix, port, "traffic")
    cfg["shutdown"] |= {"strategy": "traffic", "propagation_delay": "5s", "min_delay": "200ms", "quiet_period": "300ms"}
    sc = Sidecar(tmp_path, cfg, app_command(port, "127.0.0.1", "--signal-log", str(signals)))
    sc.wait_event("sidecar.consul.registered")
    sc.send(signal.SIGTERM)
    wait_for(lambda: get_prefix(etcd.endpoint, etcd_prefix + "traffic/") == {}, 10, 0.01, "key gone")
    gone_at = time.monotonic()
    assert sc.wait() == 0, sc.tail()
    [t_sig] = [t for name, t in read_signal_log(signals) if name == "SIGTERM"]
    assert gone_at < t_sig
    names = [e["event"] for e in sc.events()]
    order = ["sidecar.consul.deregistered", "sidecar.drain.catalog_clear", "sidecar.drain.quiet"]
    order.append("sidecar.drain.delay_done")
    assert [names.index(n) for n in order] == sorted(names.index(n) for n in order), names
    done = sc.event("sidecar.drain.delay_done")
    assert done is not None and (done["reason"], done["deregistration"]) == ("traffic quiet", "confirmed"), done
    said = [
        (e["event"], k, v)
        for e in sc.events()
        for k, v in e.items()
        # The program's own name is no word of Consul's: the owner mark, the record of horizons' key.
        if k != "event"
        and "consul" in json.dumps(v).lower().replace("consul_sidecar_owner", "").replace("consul-sidecar/horizon/", "")
    ]
    assert said == []


@pytest.mark.parametrize(
    ("registry", "shutdown", "expected"),
    [
        ({}, {}, "web.service.consul"),
        (
            {"registry": {"kind": "etcd"}, "etcd": {"format": "skydns", "dns_domain": "svc.example.org."}},
            {},
            "web.svc.example.org",
        ),
        (
            {"registry": {"kind": "etcd"}, "etcd": {"format": "skydns", "dns_domain": "x.org"}},
            {"dns_name": "v2.web.x.org"},
            "v2.web.x.org",
        ),
    ],
)
def test_the_dns_step_asks_for_the_name_coredns_serves(
    tmp_path: Path, registry: dict[str, dict[str, Any]], shutdown: dict[str, str], expected: str
) -> None:
    """The traffic strategy's DNS step (and check-config's shutdown.dns_name) asks Consul's name with Consul,
    and with etcd's skydns format the name CoreDNS serves the key under; dns_name wins in both. The real
    check-config prints it. Red if etcd's DNS step asked for <name>.service.consul (as it did)."""
    from sidecar.config import load_config

    sections: dict[str, dict[str, Any]] = {
        "service": {"name": "web", "port": 8080, "address": "127.0.0.1"},
        "shutdown": {"strategy": "traffic", "dns": ["127.0.0.1:8600"], **shutdown},
    }
    if registry:
        sections |= registry
        sections["etcd"]["endpoints"] = ["http://127.0.0.1:2379"]
    path = write_config(tmp_path / "c.toml", sections)
    assert load_config(path, {}).dns_query_name == expected
    done = run_cli("check-config", "-c", str(path))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["shutdown"]["dns_name"] == expected


def test_every_metric_family_of_either_registry_is_documented() -> None:
    """Pure: the families /metrics renders for a Consul sidecar and for an etcd one, together, are exactly the
    rows of docs/events.md's /metrics table; the etcd exposition has none of Consul's own families, the Consul
    one none of etcd's. Red if a family were added or renamed without its row (or the other way round)."""
    from sidecar.clock import SystemClock
    from sidecar.http import metrics
    from sidecar.state import Status

    status = Status(SystemClock(), "web-1")
    view = {"keepalive_failures": 2, "failovers": 3, "key_withheld": False}
    consul = set(re.findall(r"^# TYPE (\S+) ", metrics.render(status, {"register": 0}).decode(), re.M))
    etcd = set(re.findall(r"^# TYPE (\S+) ", metrics.render(status, etcd=view).decode(), re.M))
    text = (ROOT / "docs" / "events.md").read_text(encoding="utf-8")
    table = text[text.index("\n### `/metrics`\n") :]
    documented = set(re.findall(r"^\| `(consul_sidecar_[a-z_]+)", table, re.M))
    assert consul | etcd == documented
    assert not etcd & set(CONSUL_ONLY_FAMILIES) and set(CONSUL_ONLY_FAMILIES) <= consul
    assert not {n for n in consul if "_etcd_" in n}
    assert "consul_sidecar_etcd_keepalive_failures_total 2\n" in metrics.render(status, etcd=view).decode()
    assert "consul_sidecar_etcd_failovers_total 3\n" in metrics.render(status, etcd=view).decode()
