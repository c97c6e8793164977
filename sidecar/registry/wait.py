"""``consul-sidecar wait``: block until the registry shows a condition, for deploy scripts.

Consul: it follows ``/v1/health/service/<name>`` with blocking queries, so it answers
within milliseconds of the change and costs nothing while it waits. One query at
a time, nothing concurrent: it runs on the Consul client's blocking transport,
without asyncio or aiohttp, whose import alone would be most of its run time.

etcd (``-c FILE`` with ``registry.kind = "etcd"``): ``EtcdHealth`` reads the keys under
``<prefix>/<service>/`` (skydns: ``/skydns/<reversed domain>/<service>/``) by a linearizable range over
etcd's JSON gateway with ``http.client``, every ``POLL`` seconds. A key exists only while its instance's
check passes, so each key is a passing instance. Same conditions, messages and exit statuses as Consul's.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ..durations import format_duration
from .base import RegistryPermissionDenied, RegistryRejected, RegistryUnavailable

if TYPE_CHECKING:
    import ssl

    from ..config import EtcdSettings

POLL = 0.1  # seconds between two reads of etcd's keys


class HealthSource(Protocol):
    """What the wait reads: consul.BlockingHealth, or EtcdHealth below."""

    def health_service(
        self, name: str, index: str | None = None, wait: str | None = None, *, cutoff: float | None = None
    ) -> tuple[str, list[dict[str, Any]]]: ...


class WaitClock(Protocol):
    """The blocking counterpart of clock.Clock (which is asyncio's)."""

    def monotonic(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class SystemWaitClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


def _passing(entry: dict[str, Any]) -> bool:
    return all(c.get("Status") == "passing" for c in entry.get("Checks", []))


@dataclass(frozen=True)
class Condition:
    description: str
    holds: Callable[[list[dict[str, Any]]], bool]
    seen: Callable[[list[dict[str, Any]]], str]


def instance_passing(service: str, sid: str) -> Condition:
    def holds(entries: list[dict[str, Any]]) -> bool:
        return any(e["Service"]["ID"] == sid and _passing(e) for e in entries)

    def seen(entries: list[dict[str, Any]]) -> str:
        mine = [e for e in entries if e["Service"]["ID"] == sid]
        if not mine:
            return f"{sid} is not registered"
        if not mine[0].get("Checks"):
            return f"{sid} is registered" + (f" (key {mine[0]['Key']})" if "Key" in mine[0] else "")
        return f"{sid} checks: " + ", ".join(f"{c.get('CheckID')}={c.get('Status')}" for c in mine[0].get("Checks", []))

    return Condition(f"{service} instance {sid} passing", holds, seen)


def min_passing(service: str, n: int) -> Condition:
    def count(entries: list[dict[str, Any]]) -> int:
        return sum(1 for e in entries if _passing(e))

    return Condition(
        f"at least {n} passing instance(s) of {service}",
        lambda entries: count(entries) >= n,
        lambda entries: f"{count(entries)} passing of {len(entries)} registered",
    )


def instance_gone(service: str, sid: str) -> Condition:
    def holds(entries: list[dict[str, Any]]) -> bool:
        return all(e["Service"]["ID"] != sid for e in entries)

    return Condition(
        f"{service} instance {sid} gone", holds, lambda entries: "still registered" if not holds(entries) else "gone"
    )


@dataclass(frozen=True)
class WaitResult:
    ok: bool
    elapsed: float
    last_seen: str
    error: str | None = None


def wait_for_condition(
    agent: HealthSource, service: str, cond: Condition, timeout: float, clock: WaitClock, registry: str = "Consul"
) -> WaitResult:
    t0 = clock.monotonic()
    deadline = t0 + timeout
    index: str | None = None
    last_seen = f"no answer from {registry} yet"
    error: str | None = None
    while True:
        remaining = deadline - clock.monotonic()
        if remaining <= 0:
            return WaitResult(False, clock.monotonic() - t0, last_seen, error)
        # Blocking query: returns on the first change, or after `wait`. Consul
        # adds up to wait/16 of jitter, so ask for a little less than remains.
        wait = format_duration(max(0.1, min(30.0, remaining * 0.9)))
        try:
            # A frozen agent must not stretch --timeout.
            new_index, entries = agent.health_service(
                service, index=index, wait=wait, cutoff=clock.monotonic() + max(0.1, remaining)
            )
            error = None
        except TimeoutError:
            continue  # a blocking query still open at our deadline: the condition did not come true
        except (RegistryPermissionDenied, RegistryRejected) as e:
            return WaitResult(False, clock.monotonic() - t0, last_seen, str(e))
        except RegistryUnavailable as e:
            error = str(e)
            clock.sleep(min(0.5, max(0.0, deadline - clock.monotonic())))
            continue
        last_seen = cond.seen(entries)
        if cond.holds(entries):
            return WaitResult(True, clock.monotonic() - t0, last_seen)
        # An index that goes backwards (agent restarted) restarts the wait from scratch.
        index = new_index if index is None or int(new_index) >= int(index) else None
        if index == "0":
            index = None
            clock.sleep(0.05)


# --- etcd ------------------------------------------------------------------------------------------------


def service_prefix(settings: EtcdSettings, service: str) -> str:
    """The prefix under which every instance of ``service`` has its key (registry/etcd.py's etcd_key, less
    the ID; tests/test_etcd_surface.py holds the two together)."""
    from ..config import EtcdFormat

    if settings.format is EtcdFormat.SKYDNS:
        labels = [label for label in reversed(settings.dns_domain.rstrip(".").split(".")) if label]
        return "/skydns/" + "/".join([*labels, service]) + "/"
    return f"{settings.prefix.rstrip('/')}/{service}/"


MAX_BODY = 4 * 1024 * 1024  # the keys of one service; an answer larger than this is not etcd's to our range


def _read_bounded(resp: Any, sock: Any, deadline: float) -> bytes:
    """The body, read a piece at a time until ``deadline`` (monotonic) and at most MAX_BODY bytes: the
    socket's timeout bounds one read only, so a body that drips in a byte at a time would outlast it."""
    chunks: list[bytes] = []
    size = 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        if sock is not None:
            sock.settimeout(remaining)
        chunk = resp.read1(64 * 1024)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > MAX_BODY:
            raise ValueError(f"an answer over {MAX_BODY} bytes")
        chunks.append(chunk)


class TlsFileProblem(Exception):
    """A TLS file of [etcd] that cannot be used: ``key`` names it."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"etcd.{key}: {problem}")
        self.key = key


def tls_context(settings: EtcdSettings) -> ssl.SSLContext | None:
    """The TLS context for https endpoints (etcd.ca_file, etcd.cert_file and key_file), or None when no
    TLS file is set (the system's CAs then verify an https endpoint). Raises TlsFileProblem."""
    if settings.ca_file is None and settings.cert_file is None:
        return None
    import ssl

    try:
        context = ssl.create_default_context(cafile=str(settings.ca_file) if settings.ca_file else None)
    except (OSError, ssl.SSLError) as e:
        problem = f"cannot use {settings.ca_file} as CA certificates: {e.strerror or e}"
        raise TlsFileProblem("ca_file", problem) from None
    if settings.cert_file is not None and settings.key_file is not None:
        try:
            context.load_cert_chain(str(settings.cert_file), str(settings.key_file))
        except (OSError, ssl.SSLError) as e:
            problem = f"cannot use {settings.cert_file} with key_file {settings.key_file}: {e.strerror or e}"
            raise TlsFileProblem("cert_file", problem) from None
    return context


def _range_end(prefix: bytes) -> bytes:
    """etcd's end of a prefix range: the prefix with its last byte incremented."""
    end = bytearray(prefix)
    while end and end[-1] == 0xFF:
        end.pop()
    if not end:
        return b"\0"
    end[-1] += 1
    return bytes(end)


class EtcdHealth:
    """``wait``'s reads of etcd: each instance's key under the service's prefix, in the shape the conditions
    read (``{"Service": {"ID": ...}, "Key": ..., "Checks": []}``: no check fails, the key's existence is the
    check). The first read at once, then one every ``POLL``; the index is etcd's revision. With
    ``etcd.user``, a token from ``/v3/auth/authenticate`` (again once when etcd says it is no longer valid);
    ``password`` is never part of an error."""

    def __init__(self, settings: EtcdSettings, password: str | None = None, tls: ssl.SSLContext | None = None) -> None:
        self._settings = settings
        self._tls = tls
        self._password = password
        self._token: str | None = None
        self._endpoints = list(settings.endpoints)
        self.address = ", ".join(self._endpoints)

    def health_service(
        self, name: str, index: str | None = None, wait: str | None = None, *, cutoff: float | None = None
    ) -> tuple[str, list[dict[str, Any]]]:
        """Raises TimeoutError when ``cutoff`` (monotonic) comes before an answer."""
        if index is not None:
            pause = POLL if cutoff is None else min(POLL, cutoff - time.monotonic())
            if pause > 0:
                time.sleep(pause)
        prefix = service_prefix(self._settings, name)
        body = {
            "key": base64.b64encode(prefix.encode()).decode(),
            "range_end": base64.b64encode(_range_end(prefix.encode())).decode(),
        }
        answer = self._post("/v3/kv/range", body, cutoff)
        entries = []
        kvs = answer.get("kvs") or []
        for kv in kvs if isinstance(kvs, list) else []:
            try:
                key = base64.b64decode(kv.get("key") or "", validate=True).decode(errors="replace")
            except (AttributeError, ValueError):
                continue  # no key of etcd's: counts as no instance
            if not key.startswith(prefix) or len(key) == len(prefix):
                continue  # not an instance's key under the service's prefix
            entries.append({"Service": {"ID": key[len(prefix) :]}, "Key": key, "Checks": []})
        return str((answer.get("header") or {}).get("revision") or "0"), entries

    def _post(self, path: str, body: dict[str, Any], cutoff: float | None) -> dict[str, Any]:
        for attempt in (1, 2):
            if self._settings.user is not None and self._token is None:
                auth = {"name": self._settings.user, "password": self._password or ""}
                self._token = str(self._send("/v3/auth/authenticate", auth, cutoff, None).get("token") or "")
            try:
                return self._send(path, body, cutoff, self._token)
            except _TokenRefused as e:
                self._token = None  # expired (etcd's simple tokens last 5 minutes) or the member restarted
                if attempt == 2:
                    raise RegistryPermissionDenied(f"POST {path}: {e}") from None
        raise AssertionError("unreachable")

    def _send(self, path: str, body: dict[str, Any], cutoff: float | None, token: str | None) -> dict[str, Any]:
        import http.client

        last: Exception | None = None
        headers = {"Content-Type": "application/json", **({"Authorization": token} if token else {})}
        for endpoint in self._endpoints:
            limit = self._settings.timeout
            if cutoff is not None:
                limit = min(limit, cutoff - time.monotonic())
                if limit <= 0:
                    raise TimeoutError
            u = urllib.parse.urlsplit(endpoint)
            host, port = u.hostname or "127.0.0.1", u.port or 2379
            conn: http.client.HTTPConnection
            if u.scheme == "https":
                conn = http.client.HTTPSConnection(host, port, timeout=limit, context=self._tls)
            else:
                conn = http.client.HTTPConnection(host, port, timeout=limit)
            try:
                try:
                    conn.connect()
                except (ConnectionRefusedError, OSError) as e:
                    last = e  # never sent (refused, or a TLS handshake that failed): the next member may answer
                    continue
                try:
                    conn.request("POST", path, json.dumps(body), headers)
                    resp = conn.getresponse()
                    deadline = time.monotonic() + limit
                    raw, status = _read_bounded(resp, conn.sock, deadline), resp.status
                except ValueError as e:  # too large: not etcd's answer to a range of one service's keys
                    raise RegistryUnavailable(f"POST {path}: {endpoint}: not etcd's JSON gateway ({e})") from None
                except TimeoutError:
                    if cutoff is not None and time.monotonic() >= cutoff:
                        raise
                    raise RegistryUnavailable(f"POST {path}: no answer from {endpoint} within {limit:g}s") from None
                except (http.client.HTTPException, OSError) as e:
                    hint = ""
                    if "SSL" in e.__class__.__name__:  # etcd ended the TLS session: a client certificate it refused
                        hint = " (TLS refused: check etcd.cert_file and etcd.key_file against etcd's trusted CA)"
                    raise RegistryUnavailable(f"POST {path}: {endpoint}: {e.__class__.__name__}: {e}{hint}") from None
            finally:
                conn.close()
            self.address = endpoint
            try:
                doc = json.loads(raw)
            except ValueError:
                raise RegistryUnavailable(f"POST {path}: {endpoint} (HTTP {status}): not etcd's JSON gateway") from None
            if status == 200 and isinstance(doc, dict) and "error" not in doc:
                header = doc.get("header")
                if path != "/v3/auth/authenticate" and not (isinstance(header, dict) and header.get("cluster_id")):
                    # Every answer of etcd's gateway has its header: without it, "no keys" could be anyone's
                    # (a proxy's, another service's on the port), and --gone would be satisfied falsely.
                    raise RegistryUnavailable(f"POST {path}: {endpoint}: not etcd's JSON gateway (no response header)")
                return doc
            message = str(doc.get("message") or doc.get("error") or "") if isinstance(doc, dict) else ""
            code = doc.get("code") if isinstance(doc, dict) else None
            if code == 16 and token is not None:
                raise _TokenRefused(message)
            if "user name is empty" in message:
                raise RegistryPermissionDenied(
                    f"POST {path}: {endpoint}: etcd requires auth ({message}): set etcd.user and etcd.password_file"
                )
            if code in (7, 16) or "permission denied" in message or "authentication" in message:
                raise RegistryPermissionDenied(f"POST {path}: {endpoint}: {message or status}")
            raise RegistryUnavailable(f"POST {path}: {endpoint}: {message or f'HTTP {status}'}")
        raise RegistryUnavailable(f"POST {path}: no etcd member reachable ({self.address}): {last}", False)

    def close(self) -> None:
        pass  # one connection per read, closed after it


class _TokenRefused(Exception):
    """etcd no longer takes the auth token: authenticate again."""
