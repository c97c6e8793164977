"""etcd's JSON gateway with the standard library, blocking: the reads of ``consul-sidecar wait`` and
``consul-sidecar horizon`` (``registry.kind = "etcd"``), which load neither asyncio nor aiohttp.

``BlockingEtcd`` posts to ``/v3/...`` with ``http.client``, one request at a time and one connection per
request: each member of ``etcd.endpoints`` in turn until one answers, TLS from etcd.ca_file, cert_file and
key_file, and with ``etcd.user`` a token from ``/v3/auth/authenticate`` (again once when etcd says it is no
longer valid). An answer must carry etcd's response header, or it is no answer of etcd's. The password is
never part of an error. ``open_etcd`` builds one from the settings, reading the files they name.

``kv_place``: where a key of the sidecar's own (the record of horizons) lives, for this reader and for the
adapter (registry/etcd.py) that writes it.
"""

from __future__ import annotations

import base64
import json
import posixpath
import time
import urllib.parse
from typing import TYPE_CHECKING, Any

from .base import RegistryPermissionDenied, RegistryUnavailable

if TYPE_CHECKING:
    import ssl

    from ..config import EtcdSettings


def kv_place(prefix: str, key: str) -> str:
    """Where a key of the sidecar's own (the fleet's record of horizons: ``consul-sidecar/horizon/<name>``)
    lives in etcd: beside ``etcd.prefix``, not under it, where consumers take every key under
    ``<prefix>/<service>/`` for an instance (``services`` -> ``consul-sidecar/horizon/<name>``,
    ``/srv/services/`` -> ``/srv/consul-sidecar/horizon/<name>``)."""
    parent = posixpath.dirname(prefix.rstrip("/"))
    return f"{parent.rstrip('/')}/{key}" if parent else key


MAX_BODY = 4 * 1024 * 1024  # the keys of one service, or one record: an answer larger than this is not etcd's


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


class EtcdFileProblem(Exception):
    """A file of [etcd] that cannot be used (TLS, password): ``key`` names it."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"etcd.{key}: {problem}")
        self.key = key


def tls_context(settings: EtcdSettings) -> ssl.SSLContext | None:
    """The TLS context for https endpoints (etcd.ca_file, etcd.cert_file and key_file), or None when no
    TLS file is set (the system's CAs then verify an https endpoint). Raises EtcdFileProblem."""
    if settings.ca_file is None and settings.cert_file is None:
        return None
    import ssl

    try:
        context = ssl.create_default_context(cafile=str(settings.ca_file) if settings.ca_file else None)
    except (OSError, ssl.SSLError) as e:
        problem = f"cannot use {settings.ca_file} as CA certificates: {e.strerror or e}"
        raise EtcdFileProblem("ca_file", problem) from None
    if settings.cert_file is not None and settings.key_file is not None:
        try:
            context.load_cert_chain(str(settings.cert_file), str(settings.key_file))
        except (OSError, ssl.SSLError) as e:
            problem = f"cannot use {settings.cert_file} with key_file {settings.key_file}: {e.strerror or e}"
            raise EtcdFileProblem("cert_file", problem) from None
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


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: Any) -> bytes | None:
    try:
        return base64.b64decode(text or "", validate=True)
    except (TypeError, ValueError):
        return None


def open_etcd(settings: EtcdSettings) -> BlockingEtcd:
    """A reader for ``settings``, with the TLS context and the password their files give. Raises
    EtcdFileProblem naming the key of a file that cannot be used."""
    tls = tls_context(settings)
    password = None
    if settings.password_file is not None:
        from ..config.files import FileProblem, read_capped

        try:
            password = read_capped(settings.password_file, 4096)[0].decode().rstrip("\r\n")
        except (FileProblem, UnicodeDecodeError) as e:
            why = e if isinstance(e, FileProblem) else f"{settings.password_file} is not UTF-8 text"
            raise EtcdFileProblem("password_file", str(why)) from None
    return BlockingEtcd(settings, password, tls)


class BlockingEtcd:
    """Reads of etcd over its JSON gateway, blocking (module docstring). ``address``: the member that
    answered last (all of ``etcd.endpoints`` before the first answer)."""

    def __init__(self, settings: EtcdSettings, password: str | None = None, tls: ssl.SSLContext | None = None) -> None:
        self._settings = settings
        self._tls = tls
        self._password = password
        self._token: str | None = None
        self._endpoints = list(settings.endpoints)
        self.address = ", ".join(self._endpoints)

    def secrets(self) -> list[str]:
        """What no output may show: the password (for redact.scrub)."""
        return [self._password] if self._password else []

    def range_prefix(self, prefix: str, cutoff: float | None = None) -> tuple[str, list[tuple[str, bytes]]]:
        """etcd's revision and every (key, value) under ``prefix``, by a linearizable range; a pair whose
        key or value is no base64 (no answer of etcd's) is left out."""
        raw = prefix.encode()
        answer = self.post("/v3/kv/range", {"key": _b64(raw), "range_end": _b64(_range_end(raw))}, cutoff)
        return str((answer.get("header") or {}).get("revision") or "0"), self._pairs(answer, prefix, exact=False)

    def get(self, key: str, cutoff: float | None = None) -> bytes | None:
        """The value of ``key`` by a linearizable range; None when there is no such key."""
        pairs = self._pairs(self.post("/v3/kv/range", {"key": _b64(key.encode())}, cutoff), key, exact=True)
        return pairs[0][1] if pairs else None

    @staticmethod
    def _pairs(answer: dict[str, Any], key: str, exact: bool) -> list[tuple[str, bytes]]:
        found = []
        kvs = answer.get("kvs") or []
        for kv in kvs if isinstance(kvs, list) else []:
            name = _unb64(kv.get("key")) if isinstance(kv, dict) else None
            value = _unb64(kv.get("value")) if isinstance(kv, dict) else None
            if name is None or value is None:
                continue
            text = name.decode(errors="replace")
            if text == key if exact else text.startswith(key):  # etcd answers only what was asked: a check
                found.append((text, value))
        return found

    def post(self, path: str, body: dict[str, Any], cutoff: float | None = None) -> dict[str, Any]:
        """etcd's answer to ``body`` at ``path`` (a JSON object with etcd's header). Raises
        RegistryUnavailable (no member answered as etcd), RegistryPermissionDenied (etcd's auth refused the
        user, the password or the request), TimeoutError when ``cutoff`` (monotonic) comes first."""
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
                    # (a proxy's, another service's on the port): wait's --gone satisfied falsely, an empty
                    # record of horizons read where there is one.
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
        pass  # one connection per request, closed after it


class _TokenRefused(Exception):
    """etcd no longer takes the auth token: authenticate again."""
