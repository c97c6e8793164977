"""strategy = "traffic" sees every connection: short ones the client closes, HTTP/1.0, Connection: close,
pooled keep-alive, in the host's network namespace and in the app's own; and says so when it cannot.

Real Consul, real sidecar and app processes, a real client with a cached address (it never asks
Consul again, like a JVM's DNS cache or a script), real signals.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from testkit import PY, ROOT, Consul, Sidecar, app_command, free_port, http_get, spawn, wait_for
from testkit.restricted import answers, deny_netlink_membership, start_restricted
from testkit.shortclient import AFTER, RATE, CachedClient, drain_with_client
from testkit.suite import StartSidecar, base_config

TRAFFIC = {
    "strategy": "traffic",
    "propagation_delay": "20s",
    "min_delay": "1s",
    "quiet_period": "1s",
    "app_timeout": "10s",
}


MODES = ["close", "http10", "connection_close", "pooled"]


@pytest.mark.parametrize("mode", MODES)
def test_short_connections_after_deregistration_hold_the_drain(
    consul: Consul, start_sidecar: StartSidecar, service_name: str, mode: str
) -> None:
    """A client with a cached address sends a request every 0.33 s for 5 s after the deregistration
    (each as ``mode`` says). Expected: traffic's drain outlasts the client (> 5 s), ends on quiet
    (not the 20 s bound), and not one request fails."""
    port = free_port()
    sc = start_sidecar(base_config(consul, service_name, port, shutdown=TRAFFIC), app_command(port))
    view = sc.wait_event("sidecar.drain.traffic_view", 40)
    assert "destroy_events" in view["sources"], view
    c, ev, stopped_after = drain_with_client(sc, "127.0.0.1", port, mode)
    assert not c.failed and c.ok >= RATE * AFTER, (c.ok, c.failed[:3], ev)
    assert ev["reason"] == "traffic quiet", ev
    assert AFTER * 1000 <= ev["elapsed_ms"] <= (AFTER + 1.0 + 2.0) * 1000, ev


def test_a_connection_idle_since_its_request_is_dated_by_that_request(
    consul: Consul, start_sidecar: StartSidecar, service_name: str
) -> None:
    """Right after the deregistration a client opens a keep-alive connection, sends one request, reads the
    answer and keeps the connection open, idle (a pooled upstream connection). Expected: the drain dates
    that activity by the request's data, so it ends about quiet_period after it (~1.2 s), not one
    quiet_period after the first look at the socket table that happened to find the connection (>= 2 s).
    /status tells when the quiet step has begun."""
    port = free_port()
    sc = start_sidecar(base_config(consul, service_name, port, shutdown=TRAFFIC), app_command(port))
    sc.wait_event("sidecar.consul.registered", 40)
    url = sc.status_url() + "/status"
    sc.send(signal.SIGTERM)
    sc.wait_event("sidecar.consul.deregistered")
    t = time.monotonic()
    # Once the quiet step has begun (it has seen the port without this connection).
    wait_for(
        lambda: (json.loads(http_get(url)[1] or "{}").get("drain") or {}).get("step") == "quiet",
        5,
        what="the drain's quiet step",
    )
    c = CachedClient("127.0.0.1", port, "pooled")
    with c._connect() as s:
        s.sendall(c.request())
        assert c._response(s).startswith(b"HTTP/1.1 200")
        answered = time.monotonic() - t
        ev = sc.wait_event("sidecar.drain.delay_done", 30)
    assert answered < 0.7, f"the request was answered only {answered:.2f}s after the deregistration: too slow to judge"
    assert ev["reason"] == "traffic quiet" and 1000 <= ev["elapsed_ms"] <= 1700, ev
    assert sc.wait(40) == 0


def test_another_servers_full_accept_queue_does_not_hold_the_drain(
    consul: Consul, start_sidecar: StartSidecar, service_name: str
) -> None:
    """A neighbour in the same (shared) network namespace: a server whose accept queue (backlog 1) is full
    and which accepts nothing, and a client knocking on it every 50 ms through the whole drain, so the
    namespace's ListenOverflows/ListenDrops keep growing. The app's port gets nothing. Expected: the drain
    ends on quiet after about min_delay + quiet_period, not at the 20 s bound; the control shows the
    namespace's counters did grow meanwhile."""
    from sidecar.drain.netns_counters import read_counters

    port = free_port()
    sc = start_sidecar(base_config(consul, service_name, port, shutdown=TRAFFIC), app_command(port))
    sc.wait_event("sidecar.consul.registered", 40)
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(1)
    stop = threading.Event()
    knockers: list[socket.socket] = []

    def knock() -> None:
        while not stop.wait(0.05):
            c = socket.socket()
            c.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                c.connect(full.getsockname())
            knockers.append(c)
            while len(knockers) > 20:
                knockers.pop(0).close()

    th = threading.Thread(target=knock, daemon=True)
    try:
        th.start()
        before = read_counters().listen_drops
        sc.send(signal.SIGTERM)
        ev = sc.wait_event("sidecar.drain.delay_done", 40)
        grew = read_counters().listen_drops - before
    finally:
        stop.set()
        th.join(5)
        for c in knockers:
            c.close()
        full.close()
    assert grew >= 10, f"the namespace's listen drops grew by {grew} only: the neighbour did not overflow"
    assert ev["reason"] == "traffic quiet" and ev["elapsed_ms"] <= 1000 + 1000 + 2500, ev
    assert sc.wait(40) == 0


def test_control_fixed_one_second_loses_the_short_connections(
    consul: Consul, start_sidecar: StartSidecar, service_name: str
) -> None:
    """Control for the test above: a fixed 1 s delay stops the app while the client still sends:
    requests fail (the harness sees failures)."""
    port = free_port()
    sc = start_sidecar(base_config(consul, service_name, port, shutdown={"propagation_delay": "1s"}), app_command(port))
    c, ev, _ = drain_with_client(sc, "127.0.0.1", port, "close")
    assert ev["reason"] == "fixed delay"
    assert len(c.failed) >= 3, (c.ok, c.failed)


# --- a host that allows less: no events, or only the poll ------------------------------------------


@pytest.mark.integration
def test_filter_denies_netlink_membership() -> None:
    """The seccomp helper itself: a child under it cannot join the destroy groups (EPERM)."""
    code = "import socket; s = socket.socket(16, 3, 4); s.bind((0, 0)); s.setsockopt(270, 1, 1)"
    r = subprocess.run([PY, "-c", code], preexec_fn=deny_netlink_membership, capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "Operation not permitted" in r.stderr, r.stderr


def test_poll_alone_waits_the_upper_bound_and_says_why(consul: Consul, tmp_path: Path, service_name: str) -> None:
    """No destroy events (refused, as without CAP_NET_ADMIN where the kernel requires it) and a shared
    network namespace (the agent listens here): only the poll is left. Expected: sources = [listen_drops,
    poll], a warning that says the view is blind, and the drain waits the whole propagation_delay (4 s)
    with no traffic at all, never ending on 'quiet'."""
    port = free_port()
    cfg = base_config(consul, service_name, port, shutdown={**TRAFFIC, "propagation_delay": "4s"})
    sc = start_restricted(tmp_path, cfg, app_command(port), [], deny_events=True)
    view = sc.wait_event("sidecar.drain.traffic_view")
    assert view["level"] == "warning" and view["sources"] == ["listen_drops", "poll"], view
    assert "CAP_NET_ADMIN" in view["missing"]["destroy_events"] and "shared" in view["missing"]["passive_opens"], view
    assert "upper bound" in view["consequence"], view
    sc.send(signal.SIGTERM)
    ev = sc.wait_event("sidecar.drain.delay_done", 30)
    assert ev["reason"] == "upper bound (traffic view blind to short connections)", ev
    assert 4000 <= ev["elapsed_ms"] < 4000 + 700, ev
    assert sc.wait() == 0


def test_poll_alone_with_the_opt_in_ends_on_quiet_and_misses(consul: Consul, tmp_path: Path, service_name: str) -> None:
    """The same host, with shutdown.traffic_poll_only_accepts_misses = true: the drain ends on the poll's
    quiet while the short client still sends, and requests fail: what the setting's name warns of."""
    port = free_port()
    cfg = base_config(consul, service_name, port, shutdown={**TRAFFIC, "traffic_poll_only_accepts_misses": True})
    sc = start_restricted(tmp_path, cfg, app_command(port), [], deny_events=True)
    view = sc.wait_event("sidecar.drain.traffic_view")
    assert "may end while short connections still arrive" in view["consequence"], view
    c, ev, _ = drain_with_client(sc, "127.0.0.1", port, "close")
    assert ev["reason"] == "traffic quiet" and ev["elapsed_ms"] < AFTER * 1000, ev
    assert c.failed, (c.ok, ev)


def test_without_cap_net_admin_the_view_is_what_the_kernel_allows(
    consul: Consul, tmp_path: Path, service_name: str
) -> None:
    """The sidecar without CAP_NET_ADMIN (setpriv drops it from every set). This kernel lets any process
    join the destroy groups (older ones and some runtimes refuse: see the seccomp tests), so the sidecar
    must choose what it really gets, not what it assumes: destroy events if the join works, and the
    short client loses nothing either way (events, or the upper bound)."""
    port = free_port()
    cfg = base_config(consul, service_name, port, shutdown=TRAFFIC)
    prefix = ["setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin", "--"]
    sc = start_restricted(tmp_path, cfg, app_command(port), prefix, deny_events=False)
    view = sc.wait_event("sidecar.drain.traffic_view")
    caps = int(
        next(
            line.split()[1]
            for line in Path(f"/proc/{sc.pid}/status").read_text().splitlines()
            if line.startswith("CapEff")
        ),
        16,
    )
    assert not caps & (1 << 12), "setpriv did not drop CAP_NET_ADMIN"
    c, ev, _ = drain_with_client(sc, "127.0.0.1", port, "close")
    assert not c.failed, (c.ok, c.failed[:3], view, ev)
    assert ev["elapsed_ms"] >= AFTER * 1000, ev


# --- the app in a network namespace of its own ---------------------------------------------------------


@dataclass
class Netns:
    name: str
    host_ip: str
    inner_ip: str


@pytest.fixture
def netns() -> Iterator[Netns]:
    """A network namespace with loopback up and a veth pair to the host (10.231.<n>.1 <-> .2)."""
    n = os.getpid() % 200 + 20
    name, host_if, inner_if = f"sctest{os.getpid()}", f"sch{os.getpid() % 100000}", f"scn{os.getpid() % 100000}"
    ns = Netns(name, f"10.231.{n}.1", f"10.231.{n}.2")
    steps = [
        ["ip", "netns", "add", name],
        ["ip", "link", "add", host_if, "type", "veth", "peer", "name", inner_if],
        ["ip", "link", "set", inner_if, "netns", name],
        ["ip", "addr", "add", f"{ns.host_ip}/30", "dev", host_if],
        ["ip", "link", "set", host_if, "up"],
        ["ip", "-n", name, "addr", "add", f"{ns.inner_ip}/30", "dev", inner_if],
        ["ip", "-n", name, "link", "set", inner_if, "up"],
        ["ip", "-n", name, "link", "set", "lo", "up"],
    ]
    try:
        for step in steps:
            subprocess.run(step, check=True, capture_output=True, timeout=10)
        yield ns
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


class Forwarder(threading.Thread):
    """TCP from (host, port) to (to_host, to_port), in this (the host's) network namespace: the pod's
    route to the node's agent, with no listener inside the app's namespace."""

    def __init__(self, host: str, to: tuple[str, int]) -> None:
        super().__init__(daemon=True)
        self.to = to
        self.sock = socket.create_server((host, 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.conns: list[socket.socket] = []

    def close(self) -> None:
        self.stop.set()
        self.join(2)
        self.sock.close()
        for c in self.conns:
            c.close()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                a, _ = self.sock.accept()
            except OSError:
                continue
            try:
                b = socket.create_connection(self.to, timeout=2)
            except OSError:
                a.close()
                continue
            self.conns += [a, b]
            for x, y in ((a, b), (b, a)):
                threading.Thread(target=self._pipe, args=(x, y), daemon=True).start()

    @staticmethod
    def _pipe(x: socket.socket, y: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := x.recv(65536):
                y.sendall(data)
        with contextlib.suppress(OSError):
            y.shutdown(socket.SHUT_WR)


@pytest.mark.parametrize("events", [False, True], ids=["counters", "events_and_counters"])
def test_app_in_its_own_network_namespace(
    consul: Consul, tmp_path: Path, service_name: str, netns: Netns, events: bool
) -> None:
    """The sidecar and its app in a network namespace of their own (a pod: loopback and one veth inside,
    the agent outside). Without destroy events (refused), the namespace's PassiveOpens counter is the
    complete source. Expected: sources include passive_opens; the short client (client-closed
    connections, 3/s for 5 s after the deregistration) loses nothing and the drain outlasts it."""
    fwd = Forwarder(netns.host_ip, ("127.0.0.1", consul.http_port))
    fwd.start()
    try:
        port = free_port()
        cfg = base_config(
            consul,
            service_name,
            port,
            consul={"address": f"http://{netns.host_ip}:{fwd.port}"},
            service={"address": netns.inner_ip},
            check={"allow_remote": False},
            status={"listen": ""},
            shutdown=TRAFFIC,
        )
        sc = start_restricted(
            tmp_path,
            cfg,
            app_command(port, netns.inner_ip),
            ["ip", "netns", "exec", netns.name],
            deny_events=not events,
        )
        view = sc.wait_event("sidecar.drain.traffic_view", 30)
        expected = (["destroy_events"] if events else []) + ["passive_opens", "listen_drops", "poll"]
        assert view["sources"] == expected, view
        c, ev, _ = drain_with_client(sc, netns.inner_ip, port, "close")
        assert not c.failed and c.ok >= RATE * AFTER, (c.ok, c.failed[:3], ev)
        assert ev["reason"] == "traffic quiet" and AFTER * 1000 <= ev["elapsed_ms"] <= (AFTER + 3.0) * 1000, ev
    finally:
        fwd.close()


class StatusScraper(threading.Thread):
    """GET ``url`` every 0.1 s (a monitoring scrape) until ``stop``; counts the answers."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.answers = 0
        self.stop = threading.Event()

    def run(self) -> None:
        import urllib.request

        while not self.stop.is_set():
            with contextlib.suppress(OSError), urllib.request.urlopen(self.url, timeout=1) as r:
                r.read()
                self.answers += 1
            self.stop.wait(0.1)


@pytest.mark.parametrize("events", [False, True], ids=["counters", "events_and_counters"])
def test_status_scrapes_in_the_apps_namespace_do_not_hold_the_drain(
    consul: Consul, tmp_path: Path, service_name: str, netns: Netns, events: bool
) -> None:
    """The sidecar and its app in a network namespace of their own, the status server listening on the
    namespace's address, and a monitor scraping /status every 0.1 s through the whole drain; no request
    reaches the app. The scrapes are connections the namespace's PassiveOpens counts, but the sidecar
    accepted them itself. Expected: the drain ends on quiet after about min_delay + quiet_period (not at
    the 20 s bound), while the scraper kept getting answers (it was scraping during the drain)."""
    fwd = Forwarder(netns.host_ip, ("127.0.0.1", consul.http_port))
    fwd.start()
    scraper: StatusScraper | None = None
    try:
        port = free_port()
        cfg = base_config(
            consul,
            service_name,
            port,
            consul={"address": f"http://{netns.host_ip}:{fwd.port}"},
            service={"address": netns.inner_ip},
            check={"allow_remote": False},
            status={"listen": f"{netns.inner_ip}:0"},
            shutdown=TRAFFIC,
        )
        sc = start_restricted(
            tmp_path,
            cfg,
            app_command(port, netns.inner_ip),
            ["ip", "netns", "exec", netns.name],
            deny_events=not events,
        )
        view = sc.wait_event("sidecar.drain.traffic_view", 30)
        assert "passive_opens" in view["sources"] and ("destroy_events" in view["sources"]) is events, view
        sc.wait_event("sidecar.consul.registered", 40)
        scraper = StatusScraper(sc.status_url() + "/status")
        scraper.start()
        wait_for(lambda: scraper is not None and scraper.answers >= 3, 10, what="the scraper's first answers")
        sc.send(signal.SIGTERM)
        sc.wait_event("sidecar.consul.deregistered")
        before = scraper.answers
        ev = sc.wait_event("sidecar.drain.delay_done", 40)
        during = scraper.answers - before
        assert ev["reason"] == "traffic quiet" and ev["elapsed_ms"] <= 1000 + 1000 + 2500, (ev, during)
        assert during >= 5, f"the scraper got only {during} answers during the drain: it did not exercise it"
        assert sc.wait(40) == 0
    finally:
        if scraper is not None:
            scraper.stop.set()
            scraper.join(5)
        fwd.close()


# --- whose port is it -------------------------------------------------------------------------------


def test_foreign_process_on_the_port_nothing_registered_exit_69(
    consul: Consul, tmp_path: Path, service_name: str
) -> None:
    """Another server already listens on the app's port and answers the health check; the app (here a
    process that never manages to bind, like one retrying) is not the owner. Expected: nothing is
    registered, exit 69, one error naming the owner's PID and command."""
    port = free_port()
    foreign = spawn(app_command(port, "127.0.0.1", "--instance", "someone-else"), tmp_path / "foreign.log")
    wait_for(lambda: answers(port), 10, what="the foreign server")
    sc = Sidecar(tmp_path, base_config(consul, service_name, port), ["sleep", "30"])
    assert sc.wait(30) == 69, sc.output()[-2000:]
    err = sc.event("sidecar.startup.port_not_the_apps")
    assert err is not None and err["owner_pid"] == foreign.pid and "someone-else" in err["owner_command"], err
    assert sc.event("sidecar.consul.registered") is None
    assert consul.service_ids(service_name) == []
    foreign.kill()
    foreign.wait(5)


def test_the_apps_own_port_is_checked_and_accepted(
    consul: Consul, start_sidecar: StartSidecar, service_name: str
) -> None:
    """The app, started through a shell (the listener is held by the shell's child, not by the PID the
    sidecar started), owns the port: the check says it is the app's and registration goes on."""
    port = free_port()
    sc = start_sidecar(base_config(consul, service_name, port), ["sh", "-c", " ".join(app_command(port)) + "; true"])
    ok = sc.wait_event("sidecar.startup.port_owner")
    assert "app's process tree" in ok["detail"], ok
    sc.wait_event("sidecar.consul.registered")
    sc.send(signal.SIGTERM)
    assert sc.wait() in (0, 143)


@pytest.mark.integration
def test_check_config_shows_the_traffic_view_and_the_new_keys(tmp_path: Path) -> None:
    """check-config with strategy = "traffic": the sources this host allows, the verdict, the queried DNS
    name and the opt-in are shown; a malformed dns_name is one clear error naming the key (exit 78)."""
    import json

    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[service]\nname = "web"\nport = 8080\naddress = "127.0.0.1"\n'
        '[shutdown]\nstrategy = "traffic"\ndns_name = "v2.web.service.dc1.consul"\n'
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [PY, "-m", "sidecar", "check-config", "-c", str(cfg)], capture_output=True, text=True, env=env, timeout=30
    )
    assert r.returncode == 0, r.stderr
    sd = json.loads(r.stdout)["shutdown"]
    assert sd["dns_name"] == "v2.web.service.dc1.consul" and sd["traffic_poll_only_accepts_misses"] is False, sd
    view = sd["traffic_view_here"]
    assert view["sources"][0] == "destroy_events" and view["sources"][-1] == "poll", view
    assert view["verdict"] == "complete: every connection is seen", view
    cfg.write_text(cfg.read_text().replace("v2.web.service.dc1.consul", "web..consul"))
    r = subprocess.run(
        [PY, "-m", "sidecar", "check-config", "-c", str(cfg)], capture_output=True, text=True, env=env, timeout=30
    )
    assert r.returncode == 78 and "shutdown.dns_name" in r.stderr and "Traceback" not in r.stderr, r.stderr


# --- every address family and name ------------------------------------------------------------------


class TruncatingDns(threading.Thread):
    """A resolver on 127.0.0.1 (UDP and TCP) that, until ``until`` (monotonic), answers ``name``'s AAAA
    question with ``address`` — over UDP only with the TC bit set and no record, so the full answer is
    to be had over TCP alone — and its A question with no record; then NXDOMAIN. Other names: NXDOMAIN."""

    def __init__(self, name: str, address: str) -> None:
        super().__init__(daemon=True)
        self.name, self.address = name.lower(), address
        self.until = float("inf")
        # One port for UDP and TCP: the UDP port the kernel picks may be taken for TCP by another
        # test's socket, so try again (closing the UDP socket) rather than fail or leak it.
        for attempt in range(20):
            self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.udp.bind(("127.0.0.1", 0))
            self.port = self.udp.getsockname()[1]
            try:
                self.tcp = socket.create_server(("127.0.0.1", self.port))
                break
            except OSError:
                self.udp.close()
                if attempt == 19:
                    raise
        self.udp.settimeout(0.1)
        self.tcp.settimeout(0.1)
        self.stop = threading.Event()
        self.asked: list[tuple[str, int, str]] = []

    def answer(self, q: bytes, over: str) -> bytes:
        end, labels = 12, []
        while q[end] != 0:
            labels.append(q[end + 1 : end + 1 + q[end]].decode())
            end += 1 + q[end]
        qtype = struct.unpack("!H", q[end + 1 : end + 3])[0]
        name = ".".join(labels).lower()
        self.asked.append((name, qtype, over))
        question = q[12 : end + 5]
        live = name == self.name and time.monotonic() < self.until
        if not live:
            return q[:2] + b"\x81\x83\x00\x01\x00\x00\x00\x00\x00\x00" + question
        if qtype == 28 and over == "udp":
            return q[:2] + b"\x83\x80\x00\x01\x00\x00\x00\x00\x00\x00" + question  # TC
        if qtype == 28:
            rr = b"\xc0\x0c" + struct.pack("!HHIH", 28, 1, 0, 16) + socket.inet_pton(socket.AF_INET6, self.address)
            return q[:2] + b"\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00" + question + rr
        return q[:2] + b"\x81\x80\x00\x01\x00\x00\x00\x00\x00\x00" + question

    def run(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(OSError):
                q, peer = self.udp.recvfrom(512)
                self.udp.sendto(self.answer(q, "udp"), peer)
            with contextlib.suppress(OSError):
                c, _ = self.tcp.accept()
                with c:
                    c.settimeout(1)
                    size = struct.unpack("!H", c.recv(2))[0]
                    q = b""
                    while len(q) < size:
                        q += c.recv(size - len(q))
                    a = self.answer(q, "tcp")
                    c.sendall(struct.pack("!H", len(a)) + a)

    def close(self) -> None:
        self.stop.set()
        self.join(2)
        self.udp.close()
        self.tcp.close()


def test_ipv6_service_dns_step_asks_aaaa_over_tcp_when_truncated(
    consul: Consul, start_sidecar: StartSidecar, service_name: str
) -> None:
    """An IPv6 loopback service ([::1]) and a resolver, asked for a configured name (a tag and a
    datacenter), that keeps handing out the instance's AAAA record for 3 s after SIGTERM, over UDP only
    truncated. Expected: the DNS step asks AAAA for that name, retries over TCP, clears only after
    ~3 s; the drain ends on quiet ~1 s later; the port view works for the IPv6 listener."""
    with socket.socket(socket.AF_INET6) as probe:
        probe.bind(("::1", 0))  # no IPv6 loopback here: an error, not a skip
        port = probe.getsockname()[1]
    name = f"v2.{service_name}.service.dc1.consul"
    dns = TruncatingDns(name, "::1")
    dns.start()
    try:
        cfg = base_config(
            consul,
            service_name,
            port,
            service={"address": "::1"},
            shutdown={**TRAFFIC, "dns": [f"127.0.0.1:{dns.port}"], "dns_name": name},
        )
        sc = start_sidecar(cfg, app_command(port, "::1"))
        view = sc.wait_event("sidecar.drain.traffic_view")
        assert view["level"] == "info" and "destroy_events" in view["sources"], view
        dns.until = time.monotonic() + 3.0
        sc.send(signal.SIGTERM)
        ev = sc.wait_event("sidecar.drain.delay_done", 40)
        clear = sc.event("sidecar.drain.dns_clear")
        assert clear is not None and clear["elapsed_ms"] >= 2500, (clear, ev)
        assert ev["reason"] == "traffic quiet" and 3000 + 1000 - 300 <= ev["elapsed_ms"] <= 3000 + 1000 + 1500, ev
        assert (name, 28, "tcp") in dns.asked and (name, 1, "udp") in dns.asked, dns.asked[:6]
        assert sc.wait() == 0
    finally:
        dns.close()
