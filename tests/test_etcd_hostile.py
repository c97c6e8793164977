"""The etcd adapter against endpoints that are not etcd, and etcd answering at the worst moment.

Beside a real etcd member (testkit's ``fresh_etcd``, read back with the real etcdctl), an HTTP server
in the test process plays the hostile part: an endpoint that answers 200 ``{}`` to everything (a proxy,
another service on the port), garbage where a lease ID or a value belongs, a body without end, or etcd
itself behind a hop that holds the answer to a lease grant or refuses grants for a while.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import resource
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from sidecar.clock import SystemClock
from sidecar.config import Config, load_config
from sidecar.registry.base import Deregistration, RegistryUnavailable
from sidecar.registry.etcd import EtcdRegistry
from testkit import PY, ROOT
from testkit.etcd import Etcd, etcdctl, get_prefix
from testkit.procs import wait_for

pytestmark = [pytest.mark.integration]

# path -> (status, body, or None to pass the request on to etcd); called for each request
Answer = Callable[[str], tuple[int, bytes] | None]


class Endpoint:
    """An HTTP server on a free loopback port: ``answer`` decides each request; what it leaves to etcd is
    passed on to ``upstream`` (after ``hold(path)`` seconds)."""

    def __init__(self, answer: Answer, upstream: str | None = None, hold: Callable[[str], float] | None = None):
        self.requests: list[str] = []
        self.held = threading.Event()  # set when a held answer starts being held
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.requests.append(self.path)
                canned = answer(self.path)
                if canned is None:
                    assert upstream is not None
                    u = urllib.parse.urlsplit(upstream)
                    conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=30)
                    conn.request("POST", self.path, body, {"Content-Type": "application/json"})
                    resp = conn.getresponse()
                    canned = (resp.status, resp.read())
                    conn.close()
                    delay = hold(self.path) if hold else 0.0
                    if delay:
                        outer.held.set()
                        time.sleep(delay)
                status, data = canned
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                if data == b"DRIP":  # a byte every 0.3 s, of a body that would take 5 minutes
                    self.send_header("Content-Length", "1000")
                    self.end_headers()
                    try:
                        for _ in range(1000):
                            self.wfile.write(b" ")
                            self.wfile.flush()
                            time.sleep(0.3)
                    except OSError:
                        pass
                    return
                if data == b"ENDLESS":
                    self.send_header("Content-Length", str(10**11))
                    self.end_headers()
                    try:
                        while True:
                            self.wfile.write(b" " * 65536)
                    except OSError:
                        return
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoints() -> Iterator[Callable[..., Endpoint]]:
    made: list[Endpoint] = []

    def make(answer: Answer, upstream: str | None = None, hold: Callable[[str], float] | None = None) -> Endpoint:
        made.append(Endpoint(answer, upstream, hold))
        return made[-1]

    yield make
    for e in made:
        e.close()


def config(tmp_path: Path, endpoints: list[str], **etcd: str) -> Config:
    p = tmp_path / "c.toml"
    extra = "".join(f'{k} = "{v}"\n' for k, v in etcd.items())
    p.write_text(
        f'[registry]\nkind = "etcd"\n[etcd]\nendpoints = {json.dumps(endpoints)}\nlease_ttl = "3s"\n{extra}'
        '[service]\nname = "web"\nid = "web-1"\nport = 8080\naddress = "127.0.0.2"\n[check]\ninterval = "1s"\n'
    )
    return load_config(p, {})


def passing() -> dict[str, Any]:
    return {"Meta": {}, "Check": {"Status": "passing"}}


@pytest.mark.asyncio
async def test_an_answer_without_etcds_header_never_confirms_a_deregistration(
    tmp_path: Path, fresh_etcd: Etcd, endpoints: Callable[..., Endpoint]
) -> None:
    """Endpoints: the real etcd, then one that answers 200 ``{}`` to everything. The key is put; etcd is
    frozen; the drain's delete and read reach only the impostor. Expected: UNCONFIRMED at the deadline,
    naming the impostor. Red when any 200 JSON counted as etcd's answer (an
    empty range read as "the key is gone": the drain was reported confirmed, the key stayed)."""
    fake = endpoints(lambda path: (200, b"{}"))
    reg = EtcdRegistry(config(tmp_path, [fresh_etcd.endpoint, fake.url], timeout="1s"), SystemClock())
    try:
        await reg.register(passing())
        fresh_etcd.freeze()
        try:
            result = await reg.deregister_confirmed("web", "web-1", SystemClock().monotonic() + 3)
        finally:
            fresh_etcd.thaw()
        assert result.outcome is Deregistration.UNCONFIRMED, result
        assert "not etcd's JSON gateway" in (result.error or ""), result
        # (The deletes sent to the frozen member wait in its socket and may be applied once it is thawed:
        # maybe applied, as the unconfirmed outcome says.)
    finally:
        await reg.close()


@pytest.mark.asyncio
async def test_a_grant_answered_after_the_drain_began_puts_no_key(
    tmp_path: Path, fresh_etcd: Etcd, endpoints: Callable[..., Endpoint]
) -> None:
    """The first lease grant reaches etcd at once, its answer is held 2 s by the hop; the drain begins
    meanwhile and confirms (no key yet). Expected: when the answer comes, registration raises
    RegistryUnavailable (not applied), no key is put and the granted lease is revoked. Red when the
    registration carried on after the drain (the key came back after the app could have been signalled)."""
    grants = {"n": 0}

    def hold(path: str) -> float:
        if path != "/v3/lease/grant":
            return 0.0
        grants["n"] += 1
        return 2.0 if grants["n"] == 1 else 0.0

    hop = endpoints(lambda path: None, upstream=fresh_etcd.endpoint, hold=hold)
    reg = EtcdRegistry(config(tmp_path, [hop.url], timeout="5s"), SystemClock())
    try:
        registering = asyncio.create_task(reg.register(passing()))
        await asyncio.to_thread(hop.held.wait, 10)
        result = await reg.deregister_confirmed("web", "web-1", SystemClock().monotonic() + 1)
        assert result.outcome is Deregistration.CONFIRMED, result
        with pytest.raises(RegistryUnavailable) as e:
            await registering
        assert e.value.maybe_applied is False
        assert get_prefix(fresh_etcd.endpoint, "services/") == {}
        assert not (etcdctl(fresh_etcd.endpoint, "lease", "list").get("leases") or [])
        assert hop.requests.count("/v3/kv/put") == 0, hop.requests
    finally:
        await reg.close()


GARBAGE = {
    "lease-id": {"/v3/lease/grant": b'{"header":{"cluster_id":"1"},"ID":"notanumber"}'},
    "value": {"/v3/kv/range": b'{"header":{"cluster_id":"1"},"kvs":[{"key":"a2V5","value":"not base64!"}]}'},
    "endless-body": {"/v3/kv/range": b"ENDLESS", "/v3/lease/grant": b"ENDLESS"},
}


@pytest.mark.parametrize("kind", sorted(GARBAGE))
@pytest.mark.asyncio
async def test_garbage_where_etcd_would_answer_is_unavailable_not_a_crash(
    tmp_path: Path, endpoints: Callable[..., Endpoint], kind: str
) -> None:
    """An endpoint answering 200 with a lease ID that is no number, a value that is no base64, or a body
    without end: each request raises RegistryUnavailable within etcd.timeout (the lifecycle retries or
    reports), never KeyError, ValueError or binascii.Error (the sidecar crashed, its app SIGKILLed), nor
    reads a body into memory without bound. Red before the adapter checked etcd's answers."""
    table = GARBAGE[kind]
    fake = endpoints(lambda path: (200, table.get(path, b'{"header":{"cluster_id":"1"}}')))
    reg = EtcdRegistry(config(tmp_path, [fake.url], timeout="2s"), SystemClock())
    try:
        started, peak = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with pytest.raises(RegistryUnavailable):
            if kind == "value":
                await reg.registered("web-1")
            else:
                await reg.register(passing())
        assert time.monotonic() - started < 10
        grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024
        assert grown_mb < 100, f"the test process's peak memory grew {grown_mb:.0f} MB"
    finally:
        await reg.close()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "kvs",
    [b'[{"mod_revision": "x", "value": ""}]', b'[{"mod_revision": "3", "value": "%%%"}]', b'"a string"', b"[7]"],
    ids=["revision-no-number", "value-no-base64", "kvs-no-list", "entry-no-object"],
)
async def test_a_record_read_answered_with_garbage_is_unavailable_not_a_crash(
    tmp_path: Path, endpoints: Callable[..., Endpoint], kvs: bytes
) -> None:
    """The fleet's record of horizons read (and appended to) from an endpoint whose range answer carries
    etcd's header but garbage entries: read_kv and update_kv raise RegistryUnavailable (the drain's
    warning ``horizon_not_saved``, a learned delay's learned_max), never ValueError, binascii.Error or
    TypeError: after the app's exit such an error ended the sidecar with exit 70, the app's status lost.
    Red before read_kv checked its answer."""
    body = b'{"header":{"cluster_id":"1"},"kvs":' + kvs + b"}"
    fake = endpoints(lambda path: (200, body))
    reg = EtcdRegistry(config(tmp_path, [fake.url], timeout="2s"), SystemClock())
    try:
        with pytest.raises(RegistryUnavailable):
            await reg.read_kv("consul-sidecar/horizon/web")
        with pytest.raises(RegistryUnavailable):
            await reg.update_kv("consul-sidecar/horizon/web", lambda value: b"{}")
    finally:
        await reg.close()


@pytest.mark.asyncio
async def test_the_key_comes_back_after_its_lease_expired_and_grants_failed_while_the_check_failed(
    tmp_path: Path, fresh_etcd: Etcd, endpoints: Callable[..., Endpoint]
) -> None:
    """The check fails (the key is deleted), the lease is revoked behind the sidecar's back (as if it expired
    while etcd was out of reach), and grants fail for a while (no leader). Then grants work and the check
    passes. Expected: the keeper grants a lease again and the health loop puts the key back on it. Red when
    a failed re-grant left the adapter without a lease for good (the keeper skipped every later round, the
    health loop died on its assertion: the key never came back while the app was healthy)."""
    refuse = threading.Event()

    def answer(path: str) -> tuple[int, bytes] | None:
        if path == "/v3/lease/grant" and refuse.is_set():
            return 503, b'{"error":"etcdserver: no leader","code":14,"message":"etcdserver: no leader"}'
        return None

    class Probe:
        ok = True

        async def probe(self) -> tuple[bool, str]:
            return self.ok, "HTTP 200" if self.ok else "HTTP 500"

    probe = Probe()
    hop = endpoints(answer, upstream=fresh_etcd.endpoint)
    reg = EtcdRegistry(config(tmp_path, [hop.url]), SystemClock(), prober=probe)
    try:
        await reg.register(passing())
        [(_, lease)] = get_prefix(fresh_etcd.endpoint, "services/").values()
        probe.ok = False
        await asyncio.to_thread(wait_for, lambda: not get_prefix(fresh_etcd.endpoint, "services/"), 10, 0.1, "key out")
        refuse.set()
        etcdctl(fresh_etcd.endpoint, "lease", "revoke", format(lease, "x"))
        await asyncio.to_thread(wait_for, lambda: reg.keepalive_failures >= 2, 15, 0.1, "grants refused twice")
        refuse.clear()
        probe.ok = True
        back = await asyncio.to_thread(
            wait_for, lambda: get_prefix(fresh_etcd.endpoint, "services/"), 15, 0.1, "the key put back"
        )
        [(_, new_lease)] = back.values()
        assert new_lease not in (0, lease)
    finally:
        await reg.close()


def wait_cli(tmp_path: Path, url: str, *args: str) -> tuple[int, str, float]:
    p = tmp_path / "wait.toml"
    p.write_text(f'[registry]\nkind = "etcd"\n[etcd]\nendpoints = ["{url}"]\n[service]\nname = "web"\nport = 8080\n')
    started = time.monotonic()
    out = subprocess.run(
        [PY, "-m", "sidecar", "wait", "-c", str(p), "--service", "web", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    return out.returncode, out.stderr, time.monotonic() - started


def test_wait_is_bounded_by_its_timeout_against_a_body_that_drips(
    tmp_path: Path, endpoints: Callable[..., Endpoint]
) -> None:
    """``wait --timeout 3s`` against an endpoint that answers a byte every 0.3 s: it ends (exit 1) within a
    few seconds of its timeout, naming the endpoint. Red when only each socket read had a deadline: the
    command waited for the whole body (five minutes)."""
    fake = endpoints(lambda path: (200, b"DRIP"))
    code, err, took = wait_cli(tmp_path, fake.url, "--min-passing", "1", "--timeout", "3s")
    assert code == 1, err
    assert took < 15, (took, err)


def test_wait_gone_does_not_take_an_answer_without_etcds_header_for_no_key(
    tmp_path: Path, endpoints: Callable[..., Endpoint]
) -> None:
    """``wait --id web-1 --gone`` against an endpoint answering 200 ``{}``: not etcd's answer, so it is not
    "no key": exit 1 at the timeout, saying so. Red when any 200 JSON counted as etcd's (a deploy script
    went on as if the instance had left)."""
    fake = endpoints(lambda path: (200, b"{}"))
    code, err, _ = wait_cli(tmp_path, fake.url, "--id", "web-1", "--gone", "--timeout", "2s")
    assert code == 1, err
    assert "not etcd's JSON gateway" in err, err
