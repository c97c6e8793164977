"""``consul-sidecar wait`` against a real agent: it returns when the condition holds, not before."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from testkit import PY, ROOT, Consul, app_command, free_port
from testkit.suite import StartSidecar, base_config


def wait_cmd(consul: Consul, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [PY, "-m", "sidecar", "wait", "--consul-address", consul.address, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def test_wait_passing_then_gone(consul: Consul, start_sidecar: StartSidecar, service_name: str) -> None:
    """1. `wait --passing` starts before the instance exists; it must still be waiting 1 s later.
    2. The sidecar registers the instance: the wait ends with 0 and says what it waited for.
    3. `wait --gone` ends with 0 once the sidecar has drained; `--min-passing 1` times out with 1 afterwards.
    """
    sid = f"{service_name}-1"
    w = wait_cmd(consul, "--service", service_name, "--id", sid, "--passing", "--timeout", "30s")
    time.sleep(1.0)
    assert w.poll() is None, "wait returned before the instance existed"
    port = free_port()
    sc = start_sidecar(base_config(consul, service_name, port), app_command(port))
    out, err = w.communicate(timeout=30)
    assert w.returncode == 0, err
    assert f"{service_name} instance {sid} passing" in out
    assert consul.service_ids(service_name) == [sid]

    gone = wait_cmd(consul, "--service", service_name, "--id", sid, "--gone", "--timeout", "30s")
    time.sleep(0.5)
    assert gone.poll() is None
    sc.send(signal.SIGTERM)
    out, err = gone.communicate(timeout=30)
    assert gone.returncode == 0, err
    assert sc.wait() == 0

    t = time.monotonic()
    late = wait_cmd(consul, "--service", service_name, "--min-passing", "1", "--timeout", "1s")
    out, err = late.communicate(timeout=30)
    assert late.returncode == 1
    assert "timed out" in err and "0 passing of 0 registered" in err
    assert time.monotonic() - t < 10


def test_wait_bad_arguments(consul: Consul) -> None:
    for args, needle in (
        (["--service", "x", "--passing"], "--passing and --gone need --id"),
        (["--service", "x", "--min-passing", "0"], "must be at least 1"),
        (["--service", "x", "--min-passing", "1", "--timeout", "soon"], "--timeout"),
    ):
        p = wait_cmd(consul, *args)
        _, err = p.communicate(timeout=30)
        assert p.returncode == 2 and needle in err and "Traceback" not in err


@pytest.mark.integration
def test_wait_unreachable_consul_times_out_with_the_reason() -> None:
    port = free_port()
    p = subprocess.run(
        [
            PY,
            "-m",
            "sidecar",
            "wait",
            "--consul-address",
            f"http://127.0.0.1:{port}",
            "--service",
            "x",
            "--min-passing",
            "1",
            "--timeout",
            "1s",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
    )
    assert p.returncode == 1
    assert "unreachable" in p.stderr and "Traceback" not in p.stderr
