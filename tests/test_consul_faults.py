"""The agent forgets us, is not there yet, or cannot be reached while we drain."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from sidecar.registry.registration import OWNER_META_KEY
from testkit import Consul, app_command, free_port, http_get, pid_alive, read_signal_log, wait_for
from testkit.suite import StartSidecar, base_config


def test_agent_restart_without_data_dir_reregisters(
    fresh_consul: Consul, start_sidecar: StartSidecar, service_name: str
) -> None:
    """1. Registered with tags and meta; the dev agent restarts and forgets every service.
    2. Expected: the registration is back within the check interval (1 s) + 1 s of the
       agent answering again: exactly one instance, tags and meta intact, passing.
    """
    fresh_consul.start()
    port = free_port()
    cfg = base_config(fresh_consul, service_name, port, service={"tags": ["v7"], "meta": {"build": "42"}})
    sc = start_sidecar(cfg, app_command(port))
    sc.wait_event("sidecar.consul.registered")
    fresh_consul.restart()
    back = time.monotonic()
    wait_for(lambda: fresh_consul.service_ids(service_name), 10, 0.02, "re-registration")
    took = time.monotonic() - back
    assert took <= 1.0 + 1.0, f"re-registered {took:.2f}s after the agent came back"
    [entry] = fresh_consul.instances(service_name)
    assert entry["Service"]["Tags"] == ["v7"] and entry["Service"]["Meta"] == {
        "build": "42",
        OWNER_META_KEY: entry["Service"]["Meta"].get(OWNER_META_KEY),
    }
    wait_for(
        lambda: [c["Status"] for c in fresh_consul.instances(service_name)[0]["Checks"]] == ["passing", "passing"],
        5,
        what="passing checks",
    )
    # Waited for, not read once: the sidecar's writer thread may put the line out after the catalog shows it.
    sc.wait_event("sidecar.consul.reregistered", timeout=5)
    sc.send(signal.SIGTERM)
    assert sc.wait() == 0


@pytest.mark.slow
def test_consul_down_at_start_registers_once_it_is_up(
    fresh_consul: Consul, start_sidecar: StartSidecar, service_name: str
) -> None:
    """1. No agent listens yet. The app starts anyway and serves.
    2. The agent starts 3 s later. Expected: the sidecar registers as soon as its
       backoff (1 s to 30 s) next retries, logging one 'unreachable' and one
       'reachable' event rather than one per retry.
    """
    port = free_port()
    sc = start_sidecar(base_config(fresh_consul, service_name, port), app_command(port))
    sc.wait_event("sidecar.consul.unreachable")
    assert http_get(f"http://127.0.0.1:{port}/")[0] == 200  # the app runs meanwhile
    time.sleep(3)
    fresh_consul.start()
    sc.wait_event("sidecar.consul.registered", timeout=40)
    assert fresh_consul.service_ids(service_name) == [f"{service_name}-1"]
    events = [e["event"] for e in sc.events()]
    assert events.count("sidecar.consul.unreachable") == 1
    sc.send(signal.SIGTERM)
    assert sc.wait() == 0


def test_agent_down_for_the_whole_drain(
    fresh_consul: Consul, start_sidecar: StartSidecar, service_name: str, tmp_path: Path
) -> None:
    """1. Registered; then the agent dies; SIGTERM to the sidecar.
    2. Expected: deregistration cannot be confirmed (an error event says so), yet the
       drain ends within its budget: the app is signalled after the delay and its
       status (0) is the sidecar's.
    """
    fresh_consul.start()
    port = free_port()
    siglog = tmp_path / "signals.log"
    cfg = base_config(
        fresh_consul, service_name, port, shutdown={"deregister_timeout": "1s", "propagation_delay": "1s"}
    )
    sc = start_sidecar(cfg, app_command(port, "127.0.0.1", "--signal-log", str(siglog)))
    sc.wait_event("sidecar.consul.registered")
    fresh_consul.stop()
    sent = time.monotonic()
    sc.send(signal.SIGTERM)
    assert sc.wait(20) == 0
    took = time.monotonic() - sent
    ev = sc.event("sidecar.consul.deregister_unconfirmed")
    assert ev is not None and ev["level"] == "error"
    [(name, at)] = read_signal_log(siglog)
    assert name == "SIGTERM" and at - sent >= 1.0 + 1.0 - 0.1  # deregister_timeout + propagation_delay
    assert took < 1 + 1 + 10 + 1 + 3  # the worst case (+3 s of process start-up slack)


@pytest.mark.parametrize("source", ["token_file", "CONSUL_HTTP_TOKEN"])
def test_token_never_leaks(
    consul: Consul, start_sidecar: StartSidecar, service_name: str, tmp_path: Path, source: str
) -> None:
    """The token appears in no log line, no /status answer, no process argument, and not in the
    app's environment (the app does not inherit CONSUL_HTTP_TOKEN)."""
    secret = "7f1c2d3e-aaaa-bbbb-cccc-0123456789ab"
    tf = tmp_path / "token"
    tf.write_text(secret + "\n")
    port = free_port()
    if source == "token_file":
        sc = start_sidecar(base_config(consul, service_name, port, consul={"token_file": str(tf)}), app_command(port))
    else:
        sc = start_sidecar(
            base_config(consul, service_name, port), app_command(port), env={"CONSUL_HTTP_TOKEN": secret}
        )
    sc.wait_event("sidecar.consul.registered")
    status = http_get(sc.status_url() + "/status")[1].decode()
    cmdline = Path(f"/proc/{sc.pid}/cmdline").read_bytes().decode()
    app_cmdline = Path(f"/proc/{sc.app_pid()}/cmdline").read_bytes().decode()
    app_environ = Path(f"/proc/{sc.app_pid()}/environ").read_bytes().decode(errors="replace")
    sc.send(signal.SIGTERM)
    assert sc.wait() == 0
    assert json.loads(status)["state"] == "registered"
    for where, text in (
        ("log", sc.output()),
        ("status", status),
        ("cmdline", cmdline),
        ("app cmdline", app_cmdline),
        ("app environment", app_environ),
    ):
        assert secret not in text, where


def test_not_a_consul_agent(start_sidecar: StartSidecar, service_name: str, tmp_path: Path) -> None:
    """consul.address points at some other HTTP server (it answers 404 to everything): one clear
    error, exit 78, the app stopped, no traceback."""
    import http.server
    import threading

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_error(404)

        do_PUT = do_GET

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = free_port()
        from testkit import merge

        cfg = merge(
            {
                "consul": {"address": f"http://127.0.0.1:{server.server_address[1]}", "timeout": "1s"},
                "service": {"name": service_name, "id": f"{service_name}-1", "address": "127.0.0.1", "port": port},
                "status": {"listen": ""},
            },
            {},
        )
        sc = start_sidecar(cfg, app_command(port))
        app = sc.app_pid()
        assert sc.wait(30) == 78
        ev = sc.event("sidecar.consul.registration_rejected")
        assert ev is not None and "Consul agent" in ev["error"], sc.output()[-1500:]
        assert "Traceback" not in sc.output()
        wait_for(lambda: not pid_alive(app), 5, what="the app to be stopped")
    finally:
        server.shutdown()
        server.server_close()


def test_closed_log_pipe_does_not_break_the_drain(consul: Consul, service_name: str, tmp_path: Path) -> None:
    """The sidecar's stderr is a pipe whose reader has gone (`... 2>&1 | jq`, then Ctrl-C kills jq).
    Expected: SIGTERM still deregisters, signals the app after the delay, and passes its status on."""
    import subprocess

    from testkit import PY, ROOT, write_config

    port = free_port()
    siglog = tmp_path / "signals.log"
    cfg = write_config(
        tmp_path / "c.toml", base_config(consul, service_name, port, shutdown={"propagation_delay": "0.5s"})
    )
    proc = subprocess.Popen(
        [
            PY,
            "-m",
            "sidecar",
            "run",
            "-c",
            str(cfg),
            "--",
            *app_command(port, "127.0.0.1", "--signal-log", str(siglog)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        wait_for(lambda: consul.service_ids(service_name), 15, what="registration")
        assert proc.stderr is not None
        proc.stderr.close()  # the reader goes away: every later write is EPIPE
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(20)
        assert consul.service_ids(service_name) == []
        assert [n for n, _ in read_signal_log(siglog)] == ["SIGTERM"]
        assert code == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_agent_never_reachable_nothing_to_drain(
    fresh_consul: Consul, start_sidecar: StartSidecar, service_name: str
) -> None:
    """No agent ever listens (connections refused): no registration can have reached it, so SIGTERM
    stops the app at once instead of spending deregister_timeout + propagation_delay, and no error
    claims an instance was left registered."""
    port = free_port()
    cfg = base_config(
        fresh_consul, service_name, port, shutdown={"propagation_delay": "5s", "deregister_timeout": "3s"}
    )
    sc = start_sidecar(cfg, app_command(port))
    sc.wait_event("sidecar.consul.unreachable")
    t = time.monotonic()
    sc.send(signal.SIGTERM)
    assert sc.wait(20) == 0
    assert time.monotonic() - t < 3.0
    assert sc.event("sidecar.drain.nothing_registered") is not None
    assert (
        sc.event("sidecar.consul.left_registered") is None and sc.event("sidecar.consul.deregister_unconfirmed") is None
    )
