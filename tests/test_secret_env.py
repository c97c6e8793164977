"""The app's environment in wrapper mode holds nothing that fed the sidecar's ACL token (issue 8, defect 9).

A real agent, a real sidecar and a real app; what the app got is read from /proc/<app>/environ,
the environment the kernel handed it at exec.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from testkit import Consul, app_command, free_port
from testkit.suite import StartSidecar, base_config


def app_environment(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)


@pytest.mark.parametrize("how", ["interpolated", "interpolated-with-prefix", "CONSUL_HTTP_TOKEN_FILE"])
def test_variables_that_fed_the_token_are_not_in_the_apps_environment(
    consul: Consul, start_sidecar: StartSidecar, service_name: str, tmp_path: Path, how: str
) -> None:
    """1. The token comes from `token = "${MY_TOKEN}"` (or `"${TOKEN_PREFIX}${MY_TOKEN}"`), or from
       CONSUL_HTTP_TOKEN_FILE; the sidecar also has an unrelated KEEP_ME=1.
    2. Expected: the app's environment has KEEP_ME (the control: the harness reads what the app got)
       but none of the variables that fed the token, and the token's value appears nowhere in it."""
    secret = "3e1a9c55-feed-4bad-9999-0123456789ab"
    port = free_port()
    env = {"KEEP_ME": "1"}
    consul_section: dict[str, object] = {}
    if how == "interpolated":
        env["MY_TOKEN"] = secret
        consul_section["token"] = "${MY_TOKEN}"
        fed = ["MY_TOKEN"]
    elif how == "interpolated-with-prefix":
        env.update(MY_TOKEN=secret[8:], TOKEN_PREFIX=secret[:8])
        consul_section["token"] = "${TOKEN_PREFIX}${MY_TOKEN}"
        fed = ["MY_TOKEN", "TOKEN_PREFIX"]
    else:
        tf = tmp_path / "token"
        tf.write_text(secret + "\n")
        tf.chmod(0o600)
        env["CONSUL_HTTP_TOKEN_FILE"] = str(tf)
        fed = ["CONSUL_HTTP_TOKEN_FILE"]
    sc = start_sidecar(base_config(consul, service_name, port, consul=consul_section), app_command(port), env=env)
    sc.wait_event("sidecar.consul.registered")
    got = app_environment(sc.app_pid())
    sc.send(signal.SIGTERM)
    assert sc.wait() == 0
    assert got.get("KEEP_ME") == "1"
    assert [k for k in fed if k in got] == []
    assert secret not in "\0".join(f"{k}={v}" for k, v in got.items())
    assert sc.event("sidecar.config.warning") is None  # a 0600 file (or no file): no warning


def test_writable_token_file_is_warned_about_at_start(
    consul: Consul, start_sidecar: StartSidecar, service_name: str, tmp_path: Path
) -> None:
    """A world-writable token file: the sidecar starts (a warning, not an error) and logs one
    sidecar.config.warning naming consul.token_file and the mode; the token is not in it."""
    secret = "0b5e2d11-cafe-4bad-8888-0123456789ab"
    tf = tmp_path / "token"
    tf.write_text(secret)
    tf.chmod(0o666)
    port = free_port()
    sc = start_sidecar(base_config(consul, service_name, port, consul={"token_file": str(tf)}), app_command(port))
    sc.wait_event("sidecar.consul.registered")
    warnings = [e for e in sc.events() if e["event"] == "sidecar.config.warning"]
    sc.send(signal.SIGTERM)
    assert sc.wait() == 0
    assert len(warnings) == 1 and "consul.token_file" in warnings[0]["warning"] and "0666" in warnings[0]["warning"], (
        warnings
    )
    assert secret not in sc.output()
