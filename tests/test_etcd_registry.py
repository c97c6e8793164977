"""The etcd adapter (sidecar/registry/etcd.py) against a real etcd member, read back with the real etcdctl.

Each test has an etcd member of its own (testkit's ``fresh_etcd``); the one that starts etcd late makes its own.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from sidecar.clock import SystemClock
from sidecar.config import Config, load_config
from sidecar.config.names import OWNER_META_KEY
from sidecar.registry.base import Deregistration, RegistryUnavailable
from sidecar.registry.etcd import EtcdRegistry
from testkit.etcd import Etcd, etcdctl
from testkit.procs import free_port, http_get, wait_for

pytestmark = [pytest.mark.integration]


@pytest.fixture
def etcd_url(fresh_etcd: Etcd) -> str:
    """A member of the test's own: these tests read and write the default prefix ``services/``."""
    return fresh_etcd.endpoint


def config(tmp_path: Path, url: str) -> Config:
    p = tmp_path / "c.toml"
    p.write_text(
        f'[registry]\nkind = "etcd"\n[etcd]\nendpoints = ["{url}"]\nlease_ttl = "3s"\n'
        '[service]\nname = "web"\nid = "web-1"\nport = 8080\naddress = "127.0.0.2"\n'
    )
    return load_config(p, {})


@pytest.mark.asyncio
async def test_registered_key_value_and_lease_as_etcdctl_reads_them_then_deregistered(
    tmp_path: Path, etcd_url: str
) -> None:
    """etcdctl sees services/web/web-1 with the endpoints manager's value, our owner mark, on a lease with a
    TTL; after deregister_confirmed (CONFIRMED) etcdctl finds no key and the lease is revoked.
    Red if the key, the value, the lease or the confirmation were wrong (e.g. a put without a lease)."""
    reg = EtcdRegistry(config(tmp_path, etcd_url), SystemClock())
    try:
        await reg.register({"Meta": {OWNER_META_KEY: "owner-1"}})
        got = etcdctl(etcd_url, "get", "--prefix", "services/")
        kvs: Any = got["kvs"]
        [kv] = kvs
        assert base64.b64decode(kv["key"]) == b"services/web/web-1"
        value = json.loads(base64.b64decode(kv["value"]))
        assert value["Op"] == 0 and value["Addr"] == "127.0.0.2:8080"
        assert value["Metadata"]["meta"][OWNER_META_KEY] == "owner-1"
        lease = int(kv["lease"])
        assert lease != 0
        ttl = etcdctl(etcd_url, "lease", "timetolive", format(lease, "x"))
        assert 0 < int(ttl["ttl"]) <= 3
        entry = await reg.registered("web-1")
        assert entry is not None and entry["Meta"][OWNER_META_KEY] == "owner-1"
        result = await reg.deregister_confirmed("web", "web-1", SystemClock().monotonic() + 3)
        assert result.outcome is Deregistration.CONFIRMED
        assert "kvs" not in etcdctl(etcd_url, "get", "--prefix", "services/")
        assert int(etcdctl(etcd_url, "lease", "timetolive", format(lease, "x"))["ttl"]) == -1
    finally:
        await reg.close()


@pytest.mark.asyncio
async def test_the_lease_is_kept_alive_past_its_ttl(tmp_path: Path, etcd_url: str) -> None:
    """With lease_ttl 3s the key is still there after 5 s (kept alive every 1 s). Red without the keepalive."""
    import asyncio

    reg = EtcdRegistry(config(tmp_path, etcd_url), SystemClock())
    try:
        await reg.register({"Meta": {}})
        await asyncio.sleep(5)
        assert "kvs" in etcdctl(etcd_url, "get", "--prefix", "services/")
    finally:
        await reg.close()


@pytest.mark.asyncio
async def test_unreachable_etcd_is_unavailable_not_applied(tmp_path: Path) -> None:
    """Nothing listens: the write is RegistryUnavailable with maybe_applied False (the lifecycle retries with
    backoff). Red if a refused connection counted as maybe applied, or raised anything else."""
    reg = EtcdRegistry(config(tmp_path, f"http://127.0.0.1:{free_port()}"), SystemClock())
    try:
        with pytest.raises(RegistryUnavailable) as e:
            await reg.register({"Meta": {}})
        assert e.value.maybe_applied is False
    finally:
        await reg.close()


# --- the real sidecar with registry.kind = "etcd" ---------------------------------------------------------


def sidecar_config(url: str, port: int, name: str, **shutdown: str) -> dict[str, dict[str, Any]]:
    return {
        "registry": {"kind": "etcd"},
        "etcd": {"endpoints": [url], "lease_ttl": "3s"},
        "service": {"name": name, "id": f"{name}-1", "address": "127.0.0.1", "port": port},
        "check": {"interval": "1s", "timeout": "500ms"},
        "shutdown": {"propagation_delay": "1s", "deregister_timeout": "3s", "app_timeout": "5s", **shutdown},
    }


def key_present(url: str, name: str) -> bool:
    return "kvs" in etcdctl(url, "get", "--prefix", f"services/{name}/")


def post(url: str) -> None:
    import urllib.request

    urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=5).read()


def test_sigterm_deletes_the_key_before_the_app_is_signalled(tmp_path: Path, etcd_url: str) -> None:
    """The sidecar registers the key (etcdctl sees it); on SIGTERM the key is gone (polled with etcdctl)
    before the app records its SIGTERM, and the drain logs a confirmed deregistration. Red if the app were
    signalled first, or the key left behind."""
    import os
    import signal
    import time

    from testkit.procs import Sidecar, app_command, read_signal_log

    port, log = free_port(), tmp_path / "signals"
    sc = Sidecar(
        tmp_path, sidecar_config(etcd_url, port, "etcdweb"), app_command(port, "127.0.0.1", "--signal-log", str(log))
    )
    sc.wait_event("sidecar.consul.registered")
    assert key_present(etcd_url, "etcdweb")
    os.kill(sc.pid, signal.SIGTERM)
    wait_for(lambda: not key_present(etcd_url, "etcdweb"), timeout=10, interval=0.01, what="key gone")
    gone_at = time.monotonic()
    assert sc.wait() == 0, sc.tail()
    [t_sig] = [t for name, t in read_signal_log(log) if name == "SIGTERM"]
    assert gone_at < t_sig, (gone_at, t_sig)
    assert sc.event("sidecar.consul.deregistered") is not None


def test_a_failing_check_deletes_the_key_and_recovery_puts_it_back(tmp_path: Path, etcd_url: str) -> None:
    """The app's /healthz answering 500 removes the key within a few check intervals (sidecar.etcd.check_critical);
    answering again puts it back (sidecar.etcd.check_passing). Red if the key stayed while the check failed."""
    import os
    import signal

    from testkit.procs import Sidecar, app_command

    port = free_port()
    sc = Sidecar(tmp_path, sidecar_config(etcd_url, port, "etcdhealth"), app_command(port))
    sc.wait_event("sidecar.consul.registered")
    post(f"http://127.0.0.1:{port}/health?status=500")
    wait_for(lambda: not key_present(etcd_url, "etcdhealth"), timeout=10, what="key deleted")
    sc.wait_event("sidecar.etcd.check_critical")
    post(f"http://127.0.0.1:{port}/health?status=auto")
    wait_for(lambda: key_present(etcd_url, "etcdhealth"), timeout=10, what="key back")
    sc.wait_event("sidecar.etcd.check_passing")
    os.kill(sc.pid, signal.SIGTERM)
    assert sc.wait() == 0, sc.tail()
    assert not key_present(etcd_url, "etcdhealth")


def test_a_sigkilled_sidecar_leaves_a_key_that_expires_within_the_lease_ttl(tmp_path: Path, etcd_url: str) -> None:
    """SIGKILL (no drain): the key outlives the sidecar by at most lease_ttl (3 s, plus etcd's expiry check).
    Red if the key had no lease (it would stay forever)."""
    import os
    import signal
    import time

    from testkit.procs import Sidecar, app_command

    port = free_port()
    sc = Sidecar(tmp_path, sidecar_config(etcd_url, port, "etcdkill"), app_command(port))
    sc.wait_event("sidecar.consul.registered")
    os.kill(sc.pid, signal.SIGKILL)
    killed = time.monotonic()
    sc.wait()
    wait_for(lambda: not key_present(etcd_url, "etcdkill"), timeout=10, interval=0.1, what="key expired")
    assert time.monotonic() - killed < 3 + 1.5


def test_etcd_unreachable_at_start_the_app_starts_and_registration_is_retried(tmp_path: Path) -> None:
    """No etcd at the endpoint: the app is started and serves, the sidecar says etcd is unreachable and
    retries; once etcd listens on that port the key appears. Red if the sidecar gave up or held the app back."""
    import os
    import signal

    from testkit.procs import Sidecar, app_command

    late = Etcd(tmp_path)  # its ports chosen now, started below
    port = free_port()
    url = late.endpoint
    sc = Sidecar(tmp_path, sidecar_config(url, port, "etcdlate"), app_command(port))
    sc.wait_event("sidecar.consul.unreachable")
    assert http_get(f"http://127.0.0.1:{port}/healthz")[0] == 200  # the app runs meanwhile
    try:
        late.start()
        sc.wait_event("sidecar.consul.registered", timeout=45)  # backoff: 1 s to 30 s, jittered
        assert key_present(url, "etcdlate")
        os.kill(sc.pid, signal.SIGTERM)
        assert sc.wait() == 0, sc.tail()
    finally:
        late.stop()


class _Failing:
    async def probe(self) -> tuple[bool, str]:
        return False, "HTTP 500"


@pytest.mark.asyncio
async def test_health_is_followed_after_a_stale_key_was_replaced(tmp_path: Path, etcd_url: str) -> None:
    """At start the lifecycle may deregister a stale key (a dead sidecar's) and then register: the health loop
    must run for the new registration. A failing check deletes the key within two intervals. Red if the
    deregistration left the adapter stopped (the key would stay while the check fails)."""
    import asyncio

    reg = EtcdRegistry(config(tmp_path, etcd_url), SystemClock(), prober=_Failing())
    try:
        await reg.deregister_confirmed("web", "web-1", SystemClock().monotonic() + 2)
        await reg.register({"Meta": {}, "Check": {"Status": "passing"}})
        assert "kvs" in etcdctl(etcd_url, "get", "--prefix", "services/")
        await asyncio.sleep(2.5)  # check.interval 1s, failures_before_critical 1
        assert "kvs" not in etcdctl(etcd_url, "get", "--prefix", "services/")
    finally:
        await reg.close()
