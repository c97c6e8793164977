"""sidecar.drain.traffic against real loopback sockets: what the kernel shows of one port, and only that port."""

from __future__ import annotations

import errno
import socket
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from sidecar.drain import traffic
from sidecar.drain.sock_diag import DiagSocket
from sidecar.drain.traffic import ConnKey, PortSnapshot, PortWatcher, TrafficWatchError, activity_between

Track = Callable[[socket.socket], socket.socket]


@pytest.fixture
def track() -> Iterator[Track]:
    """Every socket a test makes goes through this, and is closed at the end whatever happens."""
    made: list[socket.socket] = []

    def add(s: socket.socket) -> socket.socket:
        made.append(s)
        return s

    yield add
    for s in made:
        s.close()


@pytest.fixture
def watchers() -> Iterator[Callable[..., PortWatcher]]:
    made: list[PortWatcher] = []

    def make(*args: Any, **kwargs: Any) -> PortWatcher:
        made.append(PortWatcher(*args, **kwargs))
        return made[-1]

    yield make
    for w in made:
        w.close()


def listener(track: Track, host: str = "127.0.0.1") -> tuple[socket.socket, int]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = track(socket.socket(family, socket.SOCK_STREAM))
    s.bind((host, 0))
    s.listen(64)
    return s, s.getsockname()[1]


def connect(track: Track, lsock: socket.socket) -> tuple[socket.socket, socket.socket]:
    """(client, server side) of a new connection to ``lsock``."""
    client = track(socket.socket(lsock.family, socket.SOCK_STREAM))
    client.settimeout(5)
    client.connect(lsock.getsockname()[:2])
    lsock.settimeout(5)
    server, _ = lsock.accept()
    track(server).settimeout(5)
    return client, server


def send_and_receive(client: socket.socket, server: socket.socket, n: int) -> None:
    client.sendall(b"x" * n)
    got = 0
    while got < n:
        chunk = server.recv(n - got)
        assert chunk, "peer closed early"
        got += len(chunk)


def time_wait_on(port: int) -> int:
    """TIME_WAIT sockets whose local port is ``port``, as /proc/net/tcp{,6} shows them: the oracle."""
    n = 0
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                lines = f.readlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "06":
                n += 1
    return n


def test_available_here() -> None:
    ok, why = traffic.available()
    assert ok, why


def test_listening_socket_seen_with_no_connection(track: Track, watchers: Callable[..., PortWatcher]) -> None:
    s = track(socket.socket())
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    w = watchers(port)
    assert not w.snapshot().listening, "bound but not listening yet"
    s.listen(8)
    snap = w.snapshot()
    assert snap.listening
    assert (snap.connections, snap.bytes_received, snap.conn_keys) == (0, 0, frozenset())
    assert snap.bytes_counted
    s.close()
    assert not w.snapshot().listening


def test_new_connection_is_reported(track: Track, watchers: Callable[..., PortWatcher]) -> None:
    lsock, port = listener(track)
    w = watchers(port)
    before = w.snapshot()
    client, server = connect(track, lsock)
    after = w.snapshot()
    # Only the server side has local port == port: the client side (dport == port) is not counted.
    assert after.connections == 1
    (key,) = after.conn_keys
    assert key.src == "127.0.0.1" and key.sport == port
    assert (key.dst, key.dport) == client.getsockname()
    assert key.cookie != 0
    act = activity_between(before, after)
    assert (act.new_connections, act.closed_connections) == (1, 0)
    assert not act.quiet
    # A second connection is new against the first snapshot with one, and the first is not.
    connect(track, lsock)
    act2 = activity_between(after, w.snapshot())
    assert act2.new_connections == 1


def test_bytes_sent_by_the_client_are_counted(track: Track, watchers: Callable[..., PortWatcher]) -> None:
    lsock, port = listener(track)
    w = watchers(port)
    empty = w.snapshot()
    client, server = connect(track, lsock)
    a = w.snapshot()
    send_and_receive(client, server, 1000)
    b = w.snapshot()
    act = activity_between(a, b)
    assert act.new_connections == 0
    assert act.bytes_in >= 1000
    assert b.bytes_received - a.bytes_received >= 1000
    # Bytes that the server sends are not bytes in.
    server.sendall(b"y" * 5000)
    client.recv(5000)
    assert activity_between(b, w.snapshot()).bytes_in == 0
    # Between a snapshot without the connection and one with it, all its bytes count.
    act = activity_between(empty, b)
    assert act.new_connections == 1 and act.bytes_in >= 1000


def test_idle_persistent_connection_is_quiet(track: Track, watchers: Callable[..., PortWatcher]) -> None:
    lsock, port = listener(track)
    w = watchers(port)
    client, server = connect(track, lsock)
    send_and_receive(client, server, 300)
    a = w.snapshot()
    time.sleep(0.2)
    b = w.snapshot()
    assert a.connections == b.connections == 1
    assert a.conn_keys == b.conn_keys
    assert a.bytes_received == b.bytes_received >= 300
    act = activity_between(a, b)
    assert act.quiet and act.closed_connections == 0


def test_connections_of_other_ports_are_not_counted(track: Track, watchers: Callable[..., PortWatcher]) -> None:
    watched, port = listener(track)
    other, other_port = listener(track)
    for _ in range(3):
        client, server = connect(track, other)
        send_and_receive(client, server, 100)
    w = watchers(port)
    mine = w.snapshot()
    assert mine.listening and mine.connections == 0 and mine.bytes_received == 0
    # The kernel already drops them (bytecode and id.idiag_sport), not just the Python side.
    assert [rec.sport for family in (socket.AF_INET, socket.AF_INET6) for rec in w._dump(family)] == [port]
    theirs = watchers(other_port).snapshot()
    assert theirs.connections == 3 and theirs.bytes_received >= 300


def test_time_wait_sockets_are_not_counted(track: Track, watchers: Callable[..., PortWatcher]) -> None:
    lsock, port = listener(track)
    w = watchers(port)
    live_client, live_server = connect(track, lsock)
    pairs = [connect(track, lsock) for _ in range(5)]
    assert w.snapshot().connections == 6
    for client, server in pairs:
        send_and_receive(client, server, 10)
        server.close()  # the server side closes first: TIME_WAIT lands on the watched port
        assert client.recv(10) == b""
        client.close()
    deadline = time.monotonic() + 5
    while time_wait_on(port) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    # At least: an unrelated connection elsewhere on the machine may have used this number as its
    # ephemeral port and left a TIME_WAIT socket of its own (seen with several suites at once).
    assert time_wait_on(port) >= 5, "the test did not make the TIME_WAIT sockets it meant to"
    snap = w.snapshot()
    assert snap.listening
    assert snap.connections == 1
    assert {(k.dst, k.dport) for k in snap.conn_keys} == {live_client.getsockname()}


def test_local_address_filter(track: Track, watchers: Callable[..., PortWatcher]) -> None:
    lsock, port = listener(track)
    connect(track, lsock)
    elsewhere = watchers(port, ["127.0.0.2"]).snapshot()
    assert not elsewhere.listening and elsewhere.connections == 0
    here = watchers(port, ["::1", "::ffff:127.0.0.1"]).snapshot()
    assert here.listening and here.connections == 1
    with pytest.raises(ValueError):
        PortWatcher(port, ["localhost"])
    for bad in (0, 65536):
        with pytest.raises(ValueError):
            PortWatcher(bad)


def test_wildcard_listener_counts_for_the_addresses_it_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without binding a wildcard address here: the kernel's answer is faked, the filter is real."""

    def fake_dump(
        w: PortWatcher, family: int, states: int = 0, with_info: bool = True, with_meminfo: bool = False
    ) -> Iterator[DiagSocket]:
        if family == socket.AF_INET:
            yield DiagSocket(family, 10, v4_listener, 8080, "0.0.0.0", 0, 1, 0, 0, 0, 0)
        else:
            yield DiagSocket(family, 10, v6_listener, 8080, "::", 0, 2, 0, 0, 0, 0)

    monkeypatch.setattr(PortWatcher, "_dump", fake_dump)
    for v4_listener, v6_listener, wanted, expected in [
        ("0.0.0.0", "::1", ["127.0.0.1"], True),
        ("127.0.0.1", "::1", ["127.0.0.2"], False),
        ("0.0.0.0", "::1", ["::2"], False),
        ("127.0.0.1", "::", ["::2"], True),
        ("127.0.0.1", "::", ["127.0.0.2"], True),
    ]:
        with PortWatcher(8080, wanted) as w:
            assert w.snapshot().listening is expected, (v4_listener, v6_listener, wanted)


def test_ipv6_loopback(track: Track, watchers: Callable[..., PortWatcher]) -> None:
    try:
        lsock, port = listener(track, "::1")
    except OSError as e:
        # No ::1 here: then the machine must really have no IPv6 loopback, and IPv4 must still work.
        try:
            with open("/proc/net/if_inet6") as f:
                lo6 = any(line.startswith("0" * 31 + "1") for line in f)
        except FileNotFoundError:
            lo6 = False
        assert not (socket.has_ipv6 and lo6), f"::1 is configured but cannot be bound: {e}"
        v4, v4port = listener(track)
        assert watchers(v4port).snapshot().listening
        return
    w = watchers(port)
    a = w.snapshot()
    assert a.listening and a.connections == 0
    client, server = connect(track, lsock)
    send_and_receive(client, server, 1000)
    b = w.snapshot()
    (key,) = b.conn_keys
    assert key.src == "::1" and key.sport == port and key.dst == "::1"
    act = activity_between(a, b)
    assert act.new_connections == 1 and act.bytes_in >= 1000
    assert watchers(port, ["::1"]).snapshot().connections == 1
    only_v4 = watchers(port, ["127.0.0.1"]).snapshot()
    assert not only_v4.listening and only_v4.connections == 0


def test_activity_between_made_up_snapshots() -> None:
    k = [ConnKey("127.0.0.1", 80, "127.0.0.1", 40000 + i, i) for i in range(4)]
    a = PortSnapshot(True, {k[0]: 100, k[1]: 50, k[2]: 7})
    b = PortSnapshot(True, {k[0]: 100, k[1]: 80, k[3]: 20})
    assert activity_between(a, b) == traffic.Activity(new_connections=1, closed_connections=1, bytes_in=30 + 20)
    assert activity_between(b, b).quiet
    assert (b.connections, b.bytes_received, b.conn_keys) == (3, 200, frozenset({k[0], k[1], k[3]}))


# --- failures: one exception class, never a struct.error or a bare OSError ---

_NLMSG = struct.Struct("=IHHII")


def _nlmsg(kind: int, seq: int, payload: bytes) -> bytes:
    return _NLMSG.pack(_NLMSG.size + len(payload), kind, 2, seq, 0) + payload


def _diag_msg(port: int, info: bytes | None) -> bytes:
    body = struct.pack("=BB2x", socket.AF_INET, 1) + struct.pack("!HH", port, 40000)
    body += socket.inet_aton("127.0.0.1") + bytes(12) + socket.inet_aton("127.0.0.1") + bytes(12)
    body += struct.pack("=III5I", 0, 9, 0, 0, 0, 0, 0, 0)
    if info is not None:
        body += struct.pack("=HH", 4 + len(info), 2) + info
    return body


class FakeNetlink:
    """Stands in for the netlink socket: answers every request with ``reply(seq)``."""

    def __init__(self, reply: Callable[[int], bytes]) -> None:
        self.reply, self.pending = reply, b""

    def sendto(self, data: bytes, address: object) -> int:
        self.pending = self.reply(_NLMSG.unpack_from(data)[3])
        return len(data)

    def recvmsg_into(self, buffers: list[memoryview]) -> tuple[int, list[Any], int, Any]:
        data, self.pending = self.pending, b""
        buffers[0][: len(data)] = data
        return len(data), [], 0, None

    def close(self) -> None:
        pass


def fake_watcher(monkeypatch: pytest.MonkeyPatch, reply: Callable[[int], bytes]) -> PortWatcher:
    w = PortWatcher(8080)
    w.close()
    fake = FakeNetlink(reply)
    monkeypatch.setattr(w, "_closed", False)
    monkeypatch.setattr(w, "_sock", fake)
    return w


def test_refusal_is_a_traffic_watch_error(monkeypatch: pytest.MonkeyPatch) -> None:
    w = fake_watcher(monkeypatch, lambda seq: _nlmsg(2, seq, struct.pack("=i", -errno.EPERM) + bytes(16)))
    with pytest.raises(TrafficWatchError) as e:
        w.snapshot()
    assert e.value.errno == errno.EPERM


def _done(seq: int) -> bytes:
    return _nlmsg(3, seq, struct.pack("=i", 0))


@pytest.mark.parametrize(
    "reply",
    [
        lambda seq: b"",  # nothing at all
        lambda seq: _NLMSG.pack(400, 20, 2, seq, 0) + bytes(8) + _done(seq),  # says 400 bytes, has 24
        lambda seq: _nlmsg(20, seq, bytes(30)) + _done(seq),  # shorter than an inet_diag_msg
        lambda seq: (
            _nlmsg(20, seq, _diag_msg(8080, None) + struct.pack("=HH", 2, 2)) + _done(seq)
        ),  # attribute length 2
        lambda seq: _nlmsg(20, seq, _diag_msg(8080, None) + struct.pack("=HH", 200, 2) + bytes(8)) + _done(seq),
    ],
    ids=["empty", "message-length", "short-message", "attribute-too-short", "attribute-too-long"],
)
def test_garbage_is_a_traffic_watch_error(monkeypatch: pytest.MonkeyPatch, reply: Callable[[int], bytes]) -> None:
    fake_watcher(monkeypatch, lambda seq: _nlmsg(20, seq, _diag_msg(8080, bytes(200))) + _done(seq)).snapshot()
    with pytest.raises(TrafficWatchError):
        fake_watcher(monkeypatch, reply).snapshot()


def test_short_tcp_info_means_bytes_not_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kernels before 4.1 end struct tcp_info before tcpi_bytes_received (offset 128)."""

    def reply(seq: int, info: bytes) -> bytes:
        return _nlmsg(20, seq, _diag_msg(8080, info)) + _done(seq)

    old = fake_watcher(monkeypatch, lambda seq: reply(seq, bytes(104))).snapshot()
    assert old.connections == 1 and old.bytes_received == 0 and not old.bytes_counted
    new = fake_watcher(monkeypatch, lambda seq: reply(seq, bytes(128) + struct.pack("=Q", 4242) + bytes(64))).snapshot()
    assert new.bytes_counted and set(new.conn_bytes.values()) == {4242}


def test_netlink_refused_at_open(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> socket.socket:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(socket, "socket", refuse)
    with pytest.raises(TrafficWatchError) as e:
        PortWatcher(8080)
    assert e.value.errno == errno.EPERM
    ok, why = traffic.available()
    assert not ok and "Operation not permitted" in why


def test_closed_watcher_refuses(watchers: Callable[..., PortWatcher]) -> None:
    w = watchers(8080)
    w.close()
    w.close()
    with pytest.raises(TrafficWatchError):
        w.snapshot()


def test_youngest_time_wait_age_dates_connections_the_server_closed() -> None:
    """A connection the server side closed leaves a TIME_WAIT socket whose age is reported;
    before any, the answer is None."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = srv.getsockname()[1]
    with srv, PortWatcher(port, ["127.0.0.1"]) as w:
        assert w.youngest_time_wait_age() is None
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = srv.accept()
        conn.close()  # the server closes first: TIME_WAIT lands on the watched port
        time.sleep(0.05)
        client.close()
        time.sleep(0.5)
        age = w.youngest_time_wait_age()
        assert age is not None and 0.4 <= age <= 1.5, age


def test_destroy_events_only_the_ports_connections(track: Track) -> None:
    """sock_diag's destroy events through DestroyEvents: 5 client-closed connections to another port
    and that port's listener closing are not counted; 3 to our port,
    each lasting ~1 ms, are 3 events."""
    from sidecar.drain.tcp_events import DestroyEvents

    ours, port = listener(track)
    other, _ = listener(track)
    with DestroyEvents(port, ["127.0.0.1"]) as events:
        for _ in range(5):
            client, server = connect(track, other)
            client.close()
            server.close()
        other.close()
        time.sleep(0.2)
        assert events.read().ended == 0
        for _ in range(3):
            client, server = connect(track, ours)
            client.close()
            server.close()
        time.sleep(0.2)
        batch = events.read()
        assert (batch.ended, batch.lost) == (3, False), batch


def test_snapshot_dates_the_last_inbound_data(track: Track, watchers: Callable[..., PortWatcher]) -> None:
    """tcpi_last_data_recv (offset 52 of struct tcp_info) on this kernel: a connection idle for ~0.6 s is
    dated ~0.6 s back (its handshake), one that just received bytes is dated now, and ``narrow`` sees the same."""
    lsock, port = listener(track)
    w = watchers(port, ["127.0.0.1"])
    assert w.snapshot().last_activity is None
    client, server = connect(track, lsock)
    time.sleep(0.6)
    idle = w.snapshot()
    assert idle.last_activity is not None and 0.45 <= idle.taken_at - idle.last_activity <= 3.0, idle
    send_and_receive(client, server, 10)
    busy = w.snapshot(narrow=True)
    assert busy.listening and busy.connections == 1, busy
    assert busy.last_activity is not None and busy.taken_at - busy.last_activity <= 0.3, busy


def test_destroy_events_filter_the_address_in_the_kernel(track: Track) -> None:
    """Two instances on one port, 127.0.0.1 and 127.0.0.2 (the demo's layout): the events of the other
    instance's connections are dropped by the kernel's filter, not counted."""
    from sidecar.drain.tcp_events import DestroyEvents

    ours, port = listener(track)
    theirs = track(socket.socket())
    theirs.bind(("127.0.0.2", port))
    theirs.listen(8)
    with DestroyEvents(port, ["127.0.0.1"]) as events:
        assert events.filtered
        for lsock in [theirs] * 4 + [ours] * 2:
            client, server = connect(track, lsock)
            client.close()
            server.close()
        time.sleep(0.2)
        assert events.read().ended == 2


def test_listen_drops_are_the_ports_own(track: Track, watchers: Callable[..., PortWatcher]) -> None:
    """A listener with a backlog of 1 that accepts nothing, and 6 connection attempts: its own sk_drops
    grow (SYNs and retransmits refused), while a watcher of another port sees none of them."""
    full, port = listener(track)
    full.listen(1)
    _, other = listener(track)
    w, w_other = watchers(port, ["127.0.0.1"]), watchers(other, ["127.0.0.1"])
    assert w.listen_drops() == 0 and w_other.listen_drops() == 0
    for _ in range(6):
        c = track(socket.socket())
        c.setblocking(False)
        try:
            c.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
    deadline = time.monotonic() + 5
    while not w.listen_drops() and time.monotonic() < deadline:
        time.sleep(0.05)
    drops = w.listen_drops()
    assert drops is not None and drops >= 1, drops
    snap = w.snapshot(narrow=True)
    assert snap.listen_drops is not None and snap.listen_drops >= drops
    assert w_other.listen_drops() == 0 and w_other.snapshot(narrow=True).listen_drops == 0
