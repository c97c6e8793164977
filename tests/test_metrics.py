"""/metrics and /ready on the status listener, against a real Consul agent, real sidecars and a real Prometheus.

The exposition is read with a strict parser of the text format 0.0.4 written here (not the sidecar's
own code), so a malformed line, a sample without its TYPE, a counter not ending in _total or a badly
escaped label fails the test.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

import sidecar
import testkit
from sidecar.clock import SystemClock
from sidecar.state import State, Status
from testkit import Consul, free_port, http_get, spawn, wait_for
from testkit.suite import RegisteredSidecar, StartSidecar, base_config

# --- a strict parser of the Prometheus text format 0.0.4 -------------------------------------------

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_KINDS = {"counter", "gauge", "histogram", "summary", "untyped"}

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _labels(text: str, line: str) -> tuple[dict[str, str], str]:
    """Parse ``{a="b",...}`` at the start of ``text``; (labels, the rest)."""
    assert text.startswith("{"), line
    out: dict[str, str] = {}
    i = 1
    while True:
        if text[i] == "}":
            return out, text[i + 1 :]
        m = _LABEL.match(text, i)
        assert m, f"bad label name in {line!r}"
        name = m.group()
        i = m.end()
        assert text[i : i + 2] == '="', f"bad label in {line!r}"
        i += 2
        value = []
        while text[i] != '"':
            if text[i] == "\\":
                nxt = text[i + 1]
                assert nxt in '\\"n', f"bad escape \\{nxt} in {line!r}"
                value.append("\n" if nxt == "n" else nxt)
                i += 2
            else:
                assert text[i] != "\n", line
                value.append(text[i])
                i += 1
        i += 1
        assert name not in out, f"label {name} twice in {line!r}"
        out[name] = "".join(value)
        if text[i] == ",":
            i += 1
        else:
            assert text[i] == "}", f"expected , or }} in {line!r}"


def parse_exposition(text: str) -> tuple[Series, dict[str, str]]:
    """(series -> value, family -> type). Raises AssertionError on anything the format does not allow."""
    assert text.endswith("\n"), "the exposition must end with a line feed"
    series: Series = {}
    types: dict[str, str] = {}
    helps: set[str] = set()
    seen_families: list[str] = []
    for line in text[:-1].split("\n"):
        assert line, "no empty lines inside the exposition"
        if line.startswith("# HELP "):
            name, _, _help = line[7:].partition(" ")
            assert _NAME.fullmatch(name) and name not in helps, line
            helps.add(name)
            continue
        if line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert _NAME.fullmatch(name) and kind in _KINDS and name not in types, line
            assert not any(k[0] == name for k in series), f"TYPE after samples of {name}"
            types[name] = kind
            seen_families.append(name)
            continue
        assert not line.startswith("#"), f"unexpected comment {line!r}"
        m = _NAME.match(line)
        assert m, f"bad sample line {line!r}"
        name, rest = m.group(), line[m.end() :]
        labels: dict[str, str] = {}
        if rest.startswith("{"):
            labels, rest = _labels(rest, line)
        assert rest.startswith(" "), f"no value in {line!r}"
        fields = rest[1:].split(" ")
        assert 1 <= len(fields) <= 2, f"bad value/timestamp in {line!r}"
        value = float(fields[0])  # raises on anything not a Go float (NaN, +Inf allowed)
        assert name in types, f"sample of {name} before its TYPE"
        assert seen_families[-1] == name, f"samples of {name} not grouped under its TYPE"
        assert name in helps, f"no HELP for {name}"
        key = (name, frozenset(labels.items()))
        assert key not in series, f"series twice: {line!r}"
        series[key] = value
    for name, kind in types.items():
        assert (kind == "counter") == name.endswith("_total"), f"{name}: a counter's name ends in _total, only then"
    return series, types


def scrape(sc: testkit.Sidecar) -> Series:
    with urllib.request.urlopen(sc.status_url() + "/metrics", timeout=5) as r:
        assert r.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        series, _ = parse_exposition(r.read().decode())
    return series


def value(series: Series, name: str, **labels: str) -> float | None:
    return series.get((name, frozenset(labels.items())))


def ready(sc: testkit.Sidecar) -> tuple[int, dict[str, Any]]:
    code, body = http_get(sc.status_url() + "/ready", timeout=5)
    return code, json.loads(body)


def agent_put(agent: Consul, path: str) -> None:
    req = urllib.request.Request(agent.address + path, method="PUT", data=b"")
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.status == 200


# --- the parser itself ------------------------------------------------------------------------------


def test_parser_rejects_what_the_format_forbids() -> None:
    """The test's parser is strict: each broken exposition below raises, the good one parses."""
    good = '# HELP a_total x\n# TYPE a_total counter\na_total{l="q\\"\\\\\\n"} 1\n'
    series, _ = parse_exposition(good)
    assert series == {("a_total", frozenset({("l", 'q"\\\n')})): 1.0}
    for bad in (
        "# HELP a x\n# TYPE a counter\na 1\n",  # a counter without _total
        "# HELP a_total x\na_total 1\n",  # no TYPE
        '# HELP a x\n# TYPE a gauge\na{l="x\\t"} 1\n',  # an escape the format does not have
        '# HELP a x\n# TYPE a gauge\na{l="x"} 1\na{l="x"} 2\n',  # a series twice
        "# HELP a x\n# TYPE a gauge\na one\n",  # not a number
        "# HELP a x\n# TYPE a gauge\na 1",  # no final line feed
    ):
        with pytest.raises((AssertionError, ValueError)):
            parse_exposition(bad)


def test_rendering_escapes_label_values() -> None:
    """A label value with a quote, a backslash and a line feed comes back unchanged through the strict
    parser, and every family has HELP and TYPE (pure rendering, no server)."""
    from sidecar.http import metrics

    status = Status(SystemClock(), "svc-1")
    awkward = 'a"b\\c\nd'
    status.reregistrations_total[awkward] = 2
    status.drain_end = awkward
    series, types = parse_exposition(metrics.render(status, {"register": 0}, 0, ["fixed delay"]).decode())
    assert value(series, "consul_sidecar_reregistrations_total", reason=awkward) == 2
    assert value(series, "consul_sidecar_drain_end", reason=awkward) == 1
    assert value(series, "consul_sidecar_drain_end", reason="fixed delay") == 0
    assert types["consul_sidecar_state"] == "gauge"
    assert types["consul_sidecar_registrations_total"] == "counter"


# --- /ready's bounded reads of the agent (pure logic: a stand-in reader) ----------------------------


@pytest.mark.asyncio
async def test_ready_reads_the_agent_once_per_second_whatever_the_probes() -> None:
    """1. 200 concurrent /ready checks while registered: the agent is read once, all get its verdict.
    2. Within the cache's second: no new read. 3. After it: one new read.
    4. A reader that never answers: the verdict is "consul unreachable" within the read timeout."""
    from sidecar.http.readiness import Readiness

    status = Status(SystemClock(), "svc-1")
    status.enter(State.REGISTERED)
    reads = 0

    async def reader(sid: str, timeout: float) -> tuple[str, list[dict[str, Any]]]:
        nonlocal reads
        reads += 1
        await asyncio.sleep(0.05)
        return "passing", [{"CheckID": f"service:{sid}", "Status": "passing"}]

    r = Readiness(status, reader, timeout=0.5, ttl=1.0)
    verdicts = await asyncio.gather(*(r.check() for _ in range(200)))
    assert reads == 1 and all(v.ready and v.reason == "registered" for v in verdicts)
    await r.check()
    assert reads == 1
    await asyncio.sleep(1.1)
    await r.check()
    assert reads == 2

    async def frozen(sid: str, timeout: float) -> tuple[str, list[dict[str, Any]]]:
        await asyncio.sleep(60)
        raise AssertionError("unreachable")

    t = time.monotonic()
    v = await Readiness(status, frozen, timeout=0.3).check()
    assert (v.ready, v.reason) == (False, "consul unreachable")
    assert time.monotonic() - t < 2.0


# --- real sidecars ----------------------------------------------------------------------------------


def test_metrics_follow_registration_reregistration_and_drain(
    registered_sidecar: RegisteredSidecar, consul: Consul, service_name: str
) -> None:
    """1. Registered: build_info has the version, state registered is 1 (the others 0), Consul reachable,
    one registration, no re-registration, no deregistration or drain figures yet, no drain end reason set.
    2. The agent forgets the service (deregistered behind the sidecar's back): the keeper re-registers it,
    reregistrations_total{reason="service_missing"} becomes 1 and registrations_total 2.
    3. SIGTERM with propagation_delay 1s, the app slow to stop (3 s): while it stops, state stopping is 1,
    deregistration_seconds is set, drain_seconds is about the 1 s delay, drain_end{reason="fixed delay"} is 1."""
    sc, _ = registered_sidecar("--drain-seconds", "3", shutdown={"propagation_delay": "1s", "app_timeout": "15s"})
    s = scrape(sc)
    assert value(s, "consul_sidecar_build_info", version=sidecar.__version__) == 1
    assert value(s, "consul_sidecar_state", state="registered") == 1
    assert value(s, "consul_sidecar_state", state="starting") == 0
    assert value(s, "consul_sidecar_consul_reachable") == 1
    assert value(s, "consul_sidecar_registrations_total") == 1
    assert value(s, "consul_sidecar_reregistrations_total", reason="service_missing") == 0
    assert value(s, "consul_sidecar_consul_request_errors_total", operation="register") == 0
    assert value(s, "consul_sidecar_app_restarts_total") == 0
    assert value(s, "consul_sidecar_log_lines_dropped_total") == 0
    assert value(s, "consul_sidecar_maintenance") == 0
    assert not any(k[0] in ("consul_sidecar_deregistration_seconds", "consul_sidecar_drain_seconds") for k in s)
    assert value(s, "consul_sidecar_drain_end", reason="fixed delay") == 0

    agent_put(consul, f"/v1/agent/service/deregister/{service_name}-1")
    sc.wait_event("sidecar.consul.reregistered", timeout=10)
    s = wait_for(
        lambda: (
            s if value(s := scrape(sc), "consul_sidecar_reregistrations_total", reason="service_missing") == 1 else None
        ),
        5,
        what="the re-registration counted",
    )
    assert value(s, "consul_sidecar_registrations_total") == 2

    sc.send(signal.SIGTERM)
    sc.wait_event("sidecar.drain.delay_done")
    s = scrape(sc)
    assert value(s, "consul_sidecar_state", state="stopping") == 1
    dereg = value(s, "consul_sidecar_deregistration_seconds")
    assert dereg is not None and 0 < dereg < 3
    drain = value(s, "consul_sidecar_drain_seconds")
    assert drain is not None and 0.9 <= drain < 3
    assert value(s, "consul_sidecar_drain_end", reason="fixed delay") == 1
    assert value(s, "consul_sidecar_drain_end", reason="second SIGINT") == 0
    assert sc.wait(30) == 0


def test_ready_follows_start_maintenance_and_drain(
    start_sidecar: StartSidecar, consul: Consul, service_name: str
) -> None:
    """1. The app is unhealthy for its first 4 s: /ready answers 503 "starting" (/healthz 200 meanwhile).
    2. Registered and passing: 200 "registered".
    3. Maintenance enabled through the agent's API: 503 "maintenance", with the reason given; /healthz stays 200.
    4. Disabled again: 200.
    5. SIGTERM with a 4 s propagation delay: 503 "draining" during the delay; /healthz stays 200."""
    port = free_port()
    cfg = base_config(consul, service_name, port, shutdown={"propagation_delay": "4s"})
    sc = start_sidecar(cfg, testkit.app_command(port, "127.0.0.1", "--healthy-after", "4"))
    code, doc = ready(sc)
    assert (code, doc["ready"], doc["reason"]) == (503, False, "starting")
    assert http_get(sc.status_url() + "/healthz")[0] == 200
    sc.wait_event("sidecar.consul.registered")
    wait_for(lambda: ready(sc)[0] == 200, 10, 0.2, "ready once registered")
    assert ready(sc) == (200, {"ready": True, "reason": "registered"})

    sid = f"{service_name}-1"
    agent_put(consul, f"/v1/agent/service/maintenance/{sid}?enable=true&reason=" + urllib.parse.quote("disk swap"))
    code, doc = wait_for(lambda: r if (r := ready(sc))[0] == 503 else None, 5, 0.2, "503 in maintenance")
    assert doc["reason"] == "maintenance" and "disk swap" in doc["detail"]
    assert http_get(sc.status_url() + "/healthz")[0] == 200
    agent_put(consul, f"/v1/agent/service/maintenance/{sid}?enable=false")
    wait_for(lambda: ready(sc)[0] == 200, 5, 0.2, "200 after maintenance")

    sc.send(signal.SIGTERM)
    sc.wait_event("sidecar.consul.deregistered")
    code, doc = ready(sc)
    assert (code, doc["reason"]) == (503, "draining")
    assert http_get(sc.status_url() + "/healthz")[0] == 200
    assert sc.wait(30) == 0


def test_ready_and_metrics_when_consul_is_unreachable(
    start_sidecar: StartSidecar, fresh_consul: Consul, service_name: str
) -> None:
    """1. Registered with an agent of the test's own: /ready 200.
    2. The agent is frozen (SIGSTOP): /ready answers 503 "consul unreachable" without waiting for it
    (each answer within 3 s: the read's deadline is 1 s), and /healthz answers meanwhile.
    3. The agent is killed: /ready answers 503 "consul unreachable", /metrics shows consul_reachable 0 and
    failed reads of the registration counted under operation read_registration."""
    fresh_consul.start()
    port = free_port()
    sc = start_sidecar(base_config(fresh_consul, service_name, port), testkit.app_command(port))
    sc.wait_event("sidecar.consul.registered")
    wait_for(lambda: ready(sc)[0] == 200, 10, 0.2, "ready")
    assert fresh_consul.proc is not None
    fresh_consul.proc.send_signal(signal.SIGSTOP)
    try:
        time.sleep(1.2)  # the cached verdict from before has expired
        for _ in range(3):
            t = time.monotonic()
            code, doc = ready(sc)
            assert time.monotonic() - t < 3.0
            assert (code, doc["reason"]) == (503, "consul unreachable"), doc
            assert http_get(sc.status_url() + "/healthz")[0] == 200
    finally:
        fresh_consul.proc.send_signal(signal.SIGCONT)
    fresh_consul.stop()
    code, doc = wait_for(lambda: r if (r := ready(sc))[0] == 503 else None, 10, 0.2, "503 without Consul")
    assert doc["reason"] == "consul unreachable"
    s = wait_for(
        lambda: s if value(s := scrape(sc), "consul_sidecar_consul_reachable") == 0 else None, 10, 0.2, "unreachable"
    )
    errors = value(s, "consul_sidecar_consul_request_errors_total", operation="read_registration")
    assert errors is not None and errors >= 1
    assert value(s, "consul_sidecar_state", state="registered") == 1


def test_prometheus_scrapes_the_sidecar(registered_sidecar: RegisteredSidecar, tmp_path: Path) -> None:
    """A real Prometheus (Debian's package) scrapes a running sidecar every second; its query API then
    returns consul_sidecar_registrations_total 1 and consul_sidecar_state{state="registered"} 1 for the
    sidecar's target, and the build_info series with the sidecar's version."""
    binary = shutil.which("prometheus")
    assert binary, "prometheus is not installed (scripts/setup installs Debian's prometheus package)"
    sc, _ = registered_sidecar()
    target = sc.status_url().removeprefix("http://")
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        f"scrape_configs:\n  - job_name: sidecar\n    static_configs:\n      - targets: ['{target}']\n"
    )
    port = free_port()
    argv = [
        binary,
        f"--config.file={cfg}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    prom = spawn(argv, tmp_path / "prometheus.log")
    try:

        def query(q: str) -> list[dict[str, Any]]:
            url = f"http://127.0.0.1:{port}/api/v1/query?query={urllib.parse.quote(q)}"
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    doc = json.loads(r.read())
            except OSError:
                return []
            assert doc["status"] == "success", doc
            return list(doc["data"]["result"])

        got = wait_for(lambda: query('consul_sidecar_registrations_total{job="sidecar"}'), 60, 0.5, "a scrape")
        assert [(r["metric"]["instance"], r["value"][1]) for r in got] == [(target, "1")]
        state = query('consul_sidecar_state{job="sidecar",state="registered"}')
        assert [r["value"][1] for r in state] == ["1"]
        info = query("consul_sidecar_build_info")
        assert [r["metric"]["version"] for r in info] == [sidecar.__version__]
        up = query('up{job="sidecar"}')
        assert [r["value"][1] for r in up] == ["1"]
    finally:
        prom.terminate()
        prom.wait(10)


def test_ready_with_the_least_acl_token(
    acl_consul: Consul, registered_sidecar: RegisteredSidecar, service_name: str, tmp_path: Path
) -> None:
    """An agent with ACLs (default deny) and a token holding service:write on the service alone (no node:read):
    /ready's read of the agent is allowed, and /ready answers 200 "registered"."""
    from testkit.acl import make_token

    token = make_token(acl_consul, f'service "{service_name}" {{ policy = "write" }}')
    (tmp_path / "token").write_text(token)
    sc, _ = registered_sidecar(agent=acl_consul, consul={"token_file": str(tmp_path / "token")})
    wait_for(lambda: ready(sc)[0] == 200, 10, 0.2, "ready")
    assert ready(sc) == (200, {"ready": True, "reason": "registered"})
