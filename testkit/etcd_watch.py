"""A confd-like watcher: the endpoints under an etcd prefix rendered as an nginx upstream, nginx reloaded on change.

This is how most balancers follow etcd (confd, registrator's templates): watch the prefix, render a config file
from the current set of keys, reload the balancer. It runs as a process of its own, like confd:

    python -m testkit.etcd_watch --endpoint http://127.0.0.1:2379 --prefix services/web/ \\
        --upstream nginx/upstream.conf --nginx-pid nginx/nginx.pid --lag 1

- **Watch.** A linearizable range of the prefix through etcd's JSON gateway (``/v3/kv/range``) gives the set and
  its revision; a watch (``/v3/watch``, one streaming POST; etcd answers one JSON object a line) from revision + 1
  follows every put and delete. A broken stream, a cancelled or compacted watch: range and watch again.
  A member that stops answering without closing the connection (frozen) is not noticed: the watch asks for no
  progress notifications; this watcher is for tests and demos on loopback, not for production.
- **Values** (the sidecar's ``format = "grpc"``, the etcd endpoints manager's JSON): ``{"Op":0,"Addr":"host:port",
  "Metadata":...}`` is a server ``host:port``; any other ``Op``, an ``Addr`` that is not ``host:port``, or a value
  that is not JSON is left out of the upstream (and logged once per key and revision).
- **Lag** (``--lag`` seconds) stands in for a consumer's horizon: each change is applied ``lag`` seconds after the
  watcher saw it, in order, so nginx always routes by the set etcd held ``lag`` seconds earlier (a change and its
  undoing within the lag are both applied, one after the other). The first set, at start, is applied at once.
- **Empty set.** nginx refuses an upstream without a server, so no endpoint renders ``server 127.0.0.1:1 down;``:
  nginx then answers 502 at once. Keeping the last set instead would route to instances that have left etcd and
  hide what the registry says; the balancer here follows etcd, even to nothing.
- **No passive health check.** Each server is rendered with ``max_fails=0``: nginx's default (``max_fails=1``,
  ``fail_timeout=10s``) takes a server out for 10 s after one failed request, a second mechanism besides etcd
  that would hide most of the failures of an instance stopped too early (as ``proxy_next_upstream`` would,
  which the nginx config turns off). The balancer here follows etcd alone.
- **Reload.** The file is written whole (a temporary file renamed over it) and nginx's master gets SIGHUP (what
  ``nginx -s reload`` sends it), only when the rendered text changed.
- **Stop.** SIGTERM or SIGINT (Ctrl-C): the handler only records; the main loop sees it within 0.1 s and exits 0.
  It starts no process, so it leaves none behind.

Each step is one JSON line on stdout: ``watch.started``, ``watch.applied`` (``servers``, ``revision``, ``seen``
and ``applied`` as Unix times, ``initial``), ``watch.reloaded``, ``watch.reload_failed``, ``watch.skipped_value``,
``watch.broken``, ``watch.stopped``. ``EtcdWatcher`` is the handle the tests and the demo use: it starts the
process with ``testkit.spawn`` (so teardown kills it), reads these events and stops it.
"""

from __future__ import annotations

import argparse
import base64
import collections
import http.client
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

EMPTY = "server 127.0.0.1:1 down;  # no endpoint under the prefix: nginx answers 502"
_ADDR = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})$")


def _b64(s: str | bytes) -> str:
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def prefix_range_end(prefix: str) -> bytes:
    """The key just past every key that starts with ``prefix`` (etcd's ``--prefix``): the last byte plus one."""
    raw = bytearray(prefix.encode())
    while raw:
        if raw[-1] < 0xFF:
            raw[-1] += 1
            return bytes(raw)
        raw.pop()
    return b"\0"


def server_of(value: bytes) -> str | None:
    """``host:port`` for a grpc-format value with ``Op`` 0 (add) and a well-formed ``Addr``; None otherwise."""
    try:
        doc = json.loads(value)
    except ValueError:
        return None
    if not isinstance(doc, dict) or doc.get("Op", 0) != 0:
        return None
    addr = doc.get("Addr")
    if not isinstance(addr, str) or not _ADDR.match(addr) or not 0 < int(addr.rsplit(":", 1)[1]) < 65536:
        return None
    return addr


def render(servers: Sequence[str], prefix: str) -> str:
    """The upstream's body (nginx ``include``s it inside ``upstream { }``): one ``server`` line per endpoint,
    sorted, without nginx's passive health check (``max_fails=0``), or the ``down`` placeholder for none."""
    lines = [f"# rendered by testkit.etcd_watch from etcd prefix {prefix!r}"]
    lines += [f"server {s} max_fails=0;" for s in sorted(set(servers))] or [EMPTY]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Snapshot:
    seen_mono: float  # time.monotonic() when the watcher saw this set
    seen_wall: float
    revision: int
    servers: tuple[str, ...]


def _log(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, "ts": time.time(), **fields}), flush=True)


class _Gateway:
    """etcd's JSON gateway on one endpoint, with the standard library's HTTP client."""

    def __init__(self, endpoint: str, timeout: float = 5.0) -> None:
        u = urllib.parse.urlsplit(endpoint)
        if u.scheme != "http" or not u.hostname:
            raise SystemExit(f"etcd_watch: --endpoint must be http://host:port, not {endpoint!r}")
        self.host, self.port, self.timeout = u.hostname, u.port or 2379, timeout

    def _conn(self, timeout: float | None) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def range(self, prefix: str) -> tuple[int, dict[str, bytes]]:
        conn = self._conn(self.timeout)
        try:
            body = json.dumps({"key": _b64(prefix), "range_end": _b64(prefix_range_end(prefix))})
            conn.request("POST", "/v3/kv/range", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
            if resp.status != 200:
                raise OSError(f"range: HTTP {resp.status} {data[:200]!r}")
        finally:
            conn.close()
        doc = json.loads(data)
        kvs = {base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", "")) for kv in doc.get("kvs", [])}
        return int(doc["header"]["revision"]), kvs

    def watch(self, prefix: str, start_revision: int) -> Iterator[dict[str, Any]]:
        """Each message of a watch from ``start_revision`` on: ``{"header":..., "events":[...]}`` and the like.
        Returns when the stream ends; raises OSError when it breaks."""
        conn = self._conn(None)  # a watch is quiet while nothing changes: no read deadline
        try:
            create = {
                "key": _b64(prefix),
                "range_end": _b64(prefix_range_end(prefix)),
                "start_revision": str(start_revision),
            }
            conn.request("POST", "/v3/watch", json.dumps({"create_request": create}))
            resp = conn.getresponse()
            if resp.status != 200:
                raise OSError(f"watch: HTTP {resp.status} {resp.read()[:200]!r}")
            while line := resp.readline():
                if line.strip():
                    doc = json.loads(line)
                    if "error" in doc:
                        raise OSError(f"watch: {doc['error']}")
                    yield doc.get("result", {})
        finally:
            conn.close()


def follow(gateway: _Gateway, prefix: str, out: queue.Queue[Snapshot]) -> None:
    """Range + watch, forever: each change of the set is one Snapshot on ``out``. Runs in a daemon thread."""
    skipped: set[tuple[str, int]] = set()
    last: tuple[str, ...] | None = None

    def snapshot(kvs: dict[str, tuple[bytes, int]], revision: int) -> Snapshot:
        servers = []
        for key, (value, mod) in sorted(kvs.items()):
            s = server_of(value)
            if s is None:
                if (key, mod) not in skipped:
                    skipped.add((key, mod))
                    _log("watch.skipped_value", key=key, value=value[:200].decode(errors="replace"))
            else:
                servers.append(s)
        return Snapshot(time.monotonic(), time.time(), revision, tuple(sorted(servers)))

    while True:
        try:
            revision, plain = gateway.range(prefix)
            kvs = {k: (v, revision) for k, v in plain.items()}
            snap = snapshot(kvs, revision)
            out.put(snap)
            last = snap.servers
            for msg in gateway.watch(prefix, revision + 1):
                if msg.get("canceled") or int(msg.get("compact_revision", 0) or 0):
                    raise OSError(f"watch cancelled: {msg.get('cancel_reason') or msg.get('compact_revision')}")
                events = msg.get("events") or []
                if not events:
                    continue  # created, progress
                for ev in events:
                    kv = ev.get("kv", {})
                    key = base64.b64decode(kv.get("key", "")).decode()
                    mod = int(kv.get("mod_revision", 0) or 0)
                    if ev.get("type") == "DELETE":
                        kvs.pop(key, None)
                    else:
                        kvs[key] = (base64.b64decode(kv.get("value", "")), mod)
                revision = int(msg.get("header", {}).get("revision", revision))
                snap = snapshot(kvs, revision)
                if snap.servers != last:  # a put that changes nothing nginx sees (a value re-put) is no change
                    out.put(snap)
                    last = snap.servers
            raise OSError("the watch stream ended")
        except (OSError, ValueError, KeyError, http.client.HTTPException) as e:
            _log("watch.broken", error=f"{type(e).__name__}: {e}"[:300])
            time.sleep(0.2)  # a back-off before the next range, not a synchronisation


class _Stop:
    requested = False


def _on_signal(signum: int, frame: FrameType | None) -> None:
    _Stop.requested = True  # only record: the main loop acts on it


def reload_nginx(pid_file: Path) -> None:
    pid = int(pid_file.read_text().split()[0])
    os.kill(pid, signal.SIGHUP)


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run(endpoint: str, prefix: str, upstream: Path, nginx_pid: Path, lag: float) -> int:
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    snapshots: queue.Queue[Snapshot] = queue.Queue()
    threading.Thread(target=follow, args=(_Gateway(endpoint), prefix, snapshots), daemon=True).start()
    _log("watch.started", endpoint=endpoint, prefix=prefix, upstream=str(upstream), lag=lag)
    pending: collections.deque[Snapshot] = collections.deque()
    current = upstream.read_text() if upstream.exists() else None
    initial = True
    while not _Stop.requested:
        wait = 0.1
        if pending:
            wait = min(wait, max(0.0, pending[0].seen_mono + lag - time.monotonic()))
        try:
            snap = snapshots.get(timeout=wait)
            if initial:
                snap = Snapshot(snap.seen_mono - lag, snap.seen_wall, snap.revision, snap.servers)  # at once
            pending.append(snap)
        except queue.Empty:
            pass
        due = None
        while pending and pending[0].seen_mono + lag <= time.monotonic():
            due = pending.popleft()
        if due is None:
            continue
        text = render(due.servers, prefix)
        _log(
            "watch.applied",
            servers=list(due.servers),
            revision=due.revision,
            seen=due.seen_wall,
            applied=time.time(),
            initial=initial,
        )
        initial = False
        if text == current:
            continue
        write_atomically(upstream, text)
        current = text
        try:
            reload_nginx(nginx_pid)
        except (OSError, ValueError) as e:
            _log("watch.reload_failed", error=f"{type(e).__name__}: {e}")
            continue
        _log("watch.reloaded", servers=list(due.servers), revision=due.revision)
    _log("watch.stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m testkit.etcd_watch", description=__doc__.split("\n\n")[0])
    ap.add_argument("--endpoint", required=True, help="etcd client URL, http://host:port")
    ap.add_argument("--prefix", required=True, help="the key prefix to follow, e.g. services/web/")
    ap.add_argument("--upstream", type=Path, required=True, help="the file nginx includes inside upstream { }")
    ap.add_argument("--nginx-pid", type=Path, required=True, help="nginx's pid file (its master gets SIGHUP)")
    ap.add_argument("--lag", type=float, default=1.0, help="seconds between seeing a change and applying it")
    args = ap.parse_args(argv)
    if not args.lag >= 0:
        ap.error("--lag must be >= 0")
    return run(args.endpoint, args.prefix, args.upstream, args.nginx_pid, args.lag)


class EtcdWatcher:
    """The watcher as a process (``testkit.spawn``: its own session, killed by teardown), and its events."""

    def __init__(self, workdir: Path, endpoint: str, prefix: str, upstream: Path, nginx_pid: Path, lag: float) -> None:
        from testkit.procs import PY, ROOT

        self.log = workdir / "etcd-watch.log"
        self.lag = lag
        self.argv = [
            PY,
            "-m",
            "testkit.etcd_watch",
            "--endpoint",
            endpoint,
            "--prefix",
            prefix,
            "--upstream",
            str(upstream),
            "--nginx-pid",
            str(nginx_pid),
            "--lag",
            repr(lag),
        ]
        self.env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> None:
        """Start it and wait for its first set to be applied (nginx then routes by etcd)."""
        from testkit.procs import spawn

        self.proc = spawn(self.argv, self.log, self.env)
        self.wait_event(lambda e: e["event"] == "watch.applied", timeout, "its first watch.applied")

    def events(self) -> list[dict[str, Any]]:
        from testkit.procs import log_events

        return log_events(self.log)

    def wait_event(self, pred: Any, timeout: float, what: str) -> dict[str, Any]:
        from testkit.procs import wait_for

        def found() -> dict[str, Any] | None:
            e = next((e for e in self.events() if pred(e)), None)
            if e is None and self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"etcd_watch exited ({self.proc.returncode}): {self.tail()}")
            return e

        return wait_for(found, timeout, 0.05, f"etcd_watch: {what}")  # type: ignore[no-any-return]

    def wait_applied(self, servers: Sequence[str], timeout: float = 30, since: float = 0.0) -> dict[str, Any]:
        """The first ``watch.applied`` whose set is exactly ``servers``, seen at or after ``since`` (Unix time)."""
        want = sorted(servers)
        return self.wait_event(
            lambda e: e["event"] == "watch.applied" and e["servers"] == want and e["seen"] >= since,
            timeout,
            f"servers {want} applied",
        )

    def tail(self, chars: int = 2000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def stop(self, timeout: float = 5) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``; its exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


if __name__ == "__main__":
    sys.exit(main())
