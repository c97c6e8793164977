"""``shutdown.propagation_delay = "learned"`` (issue 20): the fixed strategy waits the delay the fleet's record of
drain horizons recommends (p99 plus a margin), within ``learned_min`` .. ``learned_max``; ``learned_max`` with
fewer than 10 recorded drains or a record that cannot be read.

The rule itself (drain/record.py ``learned_delay``) and the config are pure logic; the lifecycle's use of it runs
on fakes in virtual time (a read that never answers, a second SIGINT during it); the rest runs real sidecars,
real apps and signals against a real Consul agent (one with ACLs), and the real ``check-config``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from sidecar.config import ConfigError, load_config
from sidecar.drain import record
from testkit import PY, ROOT, Consul, Sidecar, app_command, free_port, write_config
from testkit.acl import make_token, writer_rules
from testkit.fakes import FakeAgent, FakeApp, FakeProber, make_config, make_sidecar, until
from testkit.suite import StartSidecar, base_config


def _samples(*horizons_ms: int) -> list[dict[str, Any]]:
    return [{"time": 1.0, "service_id": "web-1", "horizon_ms": ms, "new_connections": 1} for ms in horizons_ms]


def _raw_record(horizon: str) -> bytes:
    """Twelve samples whose horizon_ms is ``horizon`` written as is (json.loads takes NaN and Infinity)."""
    return ('{"samples": [' + ", ".join([f'{{"horizon_ms": {horizon}}}'] * 12) + "]}").encode()


# --- the rule ---------------------------------------------------------------------------------------------


def test_the_learned_delay_is_the_recommendation_within_its_bounds() -> None:
    """Twelve drains of 1.5 s: p99 1.5 s + the 0.5 s floor of the margin = 2 s, the same figure
    ``consul-sidecar horizon`` recommends; ``learned_margin`` replaces the computed margin; a recommendation
    below learned_min or above learned_max is clamped and says which bound it hit. Red when the margin is
    left out, the bounds are not applied, or the rule differs from the command's."""
    twelve = _samples(*([1500] * 12))
    got = record.learned_delay(twelve, 1.0, 10.0)
    assert (got.delay_s, got.reason, got.p99_ms, got.margin_ms, got.clamped) == (2.0, "record", 1500, 500, None)
    assert got.delay_s * 1000 == record.summarise(twelve).recommended_ms
    assert "p99 1.50 s + margin 0.50 s over 12 drains" in got.why
    assert record.learned_delay(twelve, 1.0, 10.0, learned_margin=0.25).delay_s == 1.75
    low = record.learned_delay(_samples(*([100] * 12)), 1.0, 10.0, learned_margin=0.1)
    assert (low.delay_s, low.clamped) == (1.0, "learned_min") and "learned_min" in low.why
    high = record.learned_delay(_samples(*([20_000] * 12)), 1.0, 6.0)
    assert (high.delay_s, high.clamped) == (6.0, "learned_max") and "learned_max" in high.why


def test_without_a_recommendation_the_learned_delay_is_learned_max() -> None:
    """Nine drains (one short of a recommendation), an empty record, a record that cannot be read: each
    waits learned_max, the safe side, and says why. Red when a short or missing record shortens the wait."""
    nine = record.learned_delay(_samples(*([100] * 9)), 1.0, 7.0)
    assert (nine.delay_s, nine.reason, nine.count) == (7.0, "too_few_samples", 9) and "9 of the 10" in nine.why
    assert record.learned_delay([], 1.0, 7.0).delay_s == 7.0
    for junk in ("NaN", "Infinity"):  # what json.loads takes and no drain measures
        bad = record.learned_delay(record.samples(_raw_record(junk)), 1.0, 7.0)
        assert (bad.delay_s, bad.reason) == (7.0, "record_unreadable") or bad.reason == "too_few_samples", bad
    gone = record.learned_delay(None, 1.0, 7.0, unreadable="no answer within 1s")
    assert (gone.delay_s, gone.reason) == (7.0, "record_unreadable") and "no answer within 1s" in gone.why


# --- the config -------------------------------------------------------------------------------------------


def _load(tmp_path: Path, shutdown: str) -> Any:
    p = tmp_path / "c.toml"
    p.write_text(f'[service]\nname = "web"\nport = 8080\naddress = "127.0.0.1"\n[shutdown]\n{shutdown}')
    return load_config(p, {})


def test_learned_is_read_and_learned_max_bounds_the_worst_case(tmp_path: Path) -> None:
    """``propagation_delay = "learned"`` sets the flag; the wait's upper bound (propagation_delay, which the
    worst case and the budget warning count) is learned_max, and the budget warning names learned_max. Red
    when "learned" is refused, or the worst case counts anything but learned_max."""
    sd = _load(tmp_path, 'propagation_delay = "learned"\nlearned_max = "12s"\nlearned_margin = "300ms"\n').shutdown
    assert (sd.learned, sd.propagation_delay, sd.learned_min, sd.learned_margin) == (True, 12.0, 1.0, 0.3)
    assert sd.worst_case == 3 + 12 + 20 + 1
    warning = sd.over_budget()
    assert warning is not None and "Lower shutdown.app_timeout" in warning  # the biggest: 20 s
    sd = _load(tmp_path, 'propagation_delay = "learned"\nlearned_max = "25s"\n').shutdown
    assert "Lower shutdown.learned_max" in (sd.over_budget() or "")
    plain = _load(tmp_path, 'propagation_delay = "4s"\n').shutdown
    assert (plain.learned, plain.propagation_delay) == (False, 4.0)


@pytest.mark.parametrize(
    ("shutdown", "key", "words"),
    [
        ('strategy = "traffic"\npropagation_delay = "learned"\n', "shutdown.propagation_delay", 'strategy = "fixed"'),
        (
            'propagation_delay = "learned"\nlearned_min = "8s"\n',
            "shutdown.learned_min",
            "8s is longer than learned_max 5s",
        ),
        (
            'propagation_delay = "learned"\nlearned_max = "500ms"\n',
            "shutdown.learned_max",
            "shorter than learned_min 1s",
        ),
        ('propagation_delay = "learnt"\n', "shutdown.propagation_delay", 'or "learned"'),
        ("propagation_delay = 5\n", "shutdown.propagation_delay", 'or "learned"'),
    ],
    ids=["with-traffic", "min-over-max", "max-under-default-min", "misspelt", "a-number"],
)
def test_bad_learned_settings_are_one_problem_naming_the_key(
    tmp_path: Path, shutdown: str, key: str, words: str
) -> None:
    """Red when a bad combination loads, or its problem does not name the key and what to write."""
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, shutdown)
    [line] = e.value.problems
    assert f": {key}: " in line and words in line, line


# --- the lifecycle, on fakes in virtual time --------------------------------------------------------------


class _RecordAgent(FakeAgent):
    """The fake agent with a KV store: the record's read answers ``document``, never (``hang``), or fails;
    the write raises what ``write_error`` says."""

    def __init__(
        self,
        calls: list[str],
        document: bytes | None = None,
        hang: bool = False,
        error: bool = False,
        write_error: Exception | None = None,
    ):
        super().__init__(calls)
        self.document, self.hang, self.error, self.write_error = document, hang, error, write_error

    async def read_kv(self, key: str) -> tuple[int, bytes | None]:
        self.calls.append("read record")
        if self.hang:
            await asyncio.Event().wait()
        if self.error:
            raise ValueError("garbage from the agent")
        return 7, self.document

    async def update_kv(self, key: str, change: Any, read: tuple[int, bytes | None] | None = None) -> int:
        self.calls.append("write record")
        if self.write_error is not None:
            raise self.write_error
        return 1


def _document(*horizons_ms: int) -> bytes:
    return json.dumps({"version": 1, "samples": _samples(*horizons_ms)}).encode()


async def _drain(
    tmp_path: Path,
    agent: _RecordAgent,
    first: signal.Signals = signal.SIGTERM,
    then: signal.Signals | None = None,
    **shutdown: str,
) -> float:
    """Run a sidecar on fakes until registered, send it ``first`` (and ``then`` once the record is being
    read); return the virtual seconds from ``first`` to the app's stop signal."""
    config = make_config(tmp_path, propagation_delay="learned", **shutdown)
    app = FakeApp(agent.calls)
    sc, inbox = make_sidecar(config, agent, app, FakeProber())
    run = asyncio.create_task(sc.run())
    await until(lambda: "register passing=True" in agent.calls)
    loop = asyncio.get_running_loop()
    t = loop.time()
    inbox.queue.put_nowait(first)
    if then is not None:
        await until(lambda: "read record" in agent.calls)
        inbox.queue.put_nowait(then)
    await until(lambda: "stop SIGTERM" in agent.calls, 120)
    elapsed = loop.time() - t
    assert await run == 0
    return elapsed


@pytest.mark.asyncio
async def test_the_drain_waits_the_records_recommendation(tmp_path: Path) -> None:
    """A record of twelve 1.5 s drains: the app's signal comes 2 s (p99 + margin) after the SIGTERM, not
    learned_max (9 s), and only after the deregistration and the record's read. Red when the learned delay
    is not passed to the wait (9 s) or the read is skipped."""
    agent = _RecordAgent([], _document(*([1500] * 12)))
    elapsed = await _drain(tmp_path, agent, learned_max="9s")
    assert 2.0 - 1e-6 <= elapsed < 2.1, elapsed
    assert agent.calls.index("deregister") < agent.calls.index("read record") < agent.calls.index("stop SIGTERM")


@pytest.mark.asyncio
async def test_a_read_that_never_answers_waits_learned_max_not_longer(tmp_path: Path) -> None:
    """The record's read hangs: the drain gives up on it within its deadline and waits learned_max from
    the confirmation, no longer (the read's deadline counts within it). A read that raises garbage: the
    same. Red when a hanging read holds the drain past learned_max, or a failed read shortens it."""
    for agent in (_RecordAgent([], hang=True), _RecordAgent([], error=True)):
        elapsed = await _drain(tmp_path, agent, learned_max="4s")
        assert 4.0 - 1e-6 <= elapsed < 4.1, (elapsed, agent.calls)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "document",
    [
        _raw_record("NaN"),
        _raw_record("Infinity"),
        _raw_record("1e300"),
        _raw_record("-5000"),
        bytes([0xFF, 0xFE]) + b" not even text",
    ],
    ids=["nan", "infinity", "huge", "negative", "binary"],
)
async def test_a_hostile_record_never_breaks_the_drain_nor_shortens_it(tmp_path: Path, document: bytes) -> None:
    """Anyone with key:write on the record can fill it with what ``json.loads`` accepts and no drain ever
    measured: NaN, Infinity, 1e300, negative horizons, or bytes that are not text. The drain must still wait
    (at least learned_min, at most learned_max) and stop the app; never crash on the arithmetic. Red when
    NaN or Infinity reach ``math.ceil`` (ValueError, OverflowError) and the drain dies with the app unsignalled."""
    agent = _RecordAgent([], document)
    elapsed = await _drain(tmp_path, agent, learned_min="1500ms", learned_max="6s")
    assert 1.5 - 1e-6 <= elapsed < 6.1, elapsed


@pytest.mark.asyncio
async def test_a_second_sigint_during_the_records_read_ends_the_wait(tmp_path: Path) -> None:
    """The operator's second Ctrl-C (the first started the drain) while the record is being read (it hangs):
    the app is stopped at once, as during any delay. Red when the read is outside the interruptible wait."""
    agent = _RecordAgent([], hang=True)
    elapsed = await _drain(tmp_path, agent, signal.SIGINT, signal.SIGINT, learned_max="30s", app_timeout="5s")
    assert elapsed < 1.0, elapsed


# --- real sidecars, a real agent ----------------------------------------------------------------------------


def _put_record(consul: Consul, name: str, horizons_ms: list[int]) -> None:
    req = urllib.request.Request(
        f"{consul.address}/v1/kv/{record.key(name)}", data=_document(*horizons_ms), method="PUT"
    )
    with urllib.request.urlopen(req, timeout=5) as r:
        assert json.loads(r.read()) is True


def _learned_config(consul: Consul, name: str, port: int, **shutdown: str) -> dict[str, dict[str, Any]]:
    return base_config(consul, name, port, shutdown={"propagation_delay": "learned", **shutdown})


def _sigterm_drain(sc: Sidecar, status: int = 0) -> dict[str, Any]:
    """Registered, SIGTERMed, drained: its ``delay_done`` event, once the sidecar exited with ``status``."""
    sc.wait_event("sidecar.consul.registered")
    sc.send(signal.SIGTERM)
    done = sc.wait_event("sidecar.drain.delay_done", timeout=60)
    assert sc.wait(60) == status, sc.tail()
    return done


def test_a_real_drain_waits_what_the_record_recommends(
    consul: Consul, start_sidecar: StartSidecar, service_name: str
) -> None:
    """Twelve recorded drains of 1.5 s in the real agent's KV store; learned_max 12 s. Expected: one
    ``learned_delay`` event (2 s, reason record, 12 samples), ``delay_done`` with bound_s 2 and at least
    2 s waited but well under learned_max, exit 0, and the drain's own sample appended (13). Red when the
    sidecar waits learned_max, reads another key, or waits less than the recommendation."""
    _put_record(consul, service_name, [1500] * 12)
    port = free_port()
    sc = start_sidecar(_learned_config(consul, service_name, port, learned_max="12s"), app_command(port))
    done = _sigterm_drain(sc)
    [learned] = [e for e in sc.events() if e["event"] == "sidecar.drain.learned_delay"]
    assert (learned["delay_s"], learned["reason"], learned["samples"]) == (2.0, "record", 12), learned
    assert "clamped" not in learned, learned  # None fields are left out of the log
    assert learned["key"] == f"consul-sidecar/horizon/{service_name}" and learned["level"] == "info", learned
    assert done["bound_s"] == 2.0 and 2000 <= done["elapsed_ms"] < 8000, done
    sc.wait_event("sidecar.drain.horizon_saved")
    entries = consul.get(f"/v1/kv/{record.key(service_name)}")
    assert entries is not None


def test_a_real_drain_with_too_few_samples_waits_learned_max(
    consul: Consul, start_sidecar: StartSidecar, service_name: str
) -> None:
    """Three recorded drains of 100 ms (a recommendation needs 10), learned_max 3 s: the drain waits 3 s,
    reason too_few_samples. Red when three samples are trusted (it would wait 1 s)."""
    _put_record(consul, service_name, [100, 100, 100])
    port = free_port()
    sc = start_sidecar(_learned_config(consul, service_name, port, learned_max="3s"), app_command(port))
    done = _sigterm_drain(sc)
    learned = sc.event("sidecar.drain.learned_delay")
    assert learned is not None and (learned["delay_s"], learned["reason"]) == (3.0, "too_few_samples"), learned
    assert done["bound_s"] == 3.0 and done["elapsed_ms"] >= 3000, done


def test_a_token_without_key_read_waits_learned_max_and_says_so(
    acl_consul: Consul, start_sidecar: StartSidecar, service_name: str, tmp_path: Path
) -> None:
    """ACLs deny by default; the token may register its service but not read the record. The app exits 3.
    Expected: one ``learned_delay`` warning (record_unreadable, naming key:read), the wait is learned_max
    (2 s), the exit status is the app's, and the token appears nowhere in the output. Red when a refused
    read shortens the wait, fails the drain, or leaks the token."""
    token = make_token(acl_consul, writer_rules(service_name))
    (tmp_path / "token").write_text(token)
    port = free_port()
    cfg = _learned_config(acl_consul, service_name, port, learned_max="2s", learned_min="500ms")
    cfg["consul"]["token_file"] = str(tmp_path / "token")
    sc = start_sidecar(cfg, app_command(port, "127.0.0.1", "--exit-code", "3"))
    done = _sigterm_drain(sc, 3)
    learned = sc.event("sidecar.drain.learned_delay")
    assert learned is not None and learned["level"] == "warning", learned
    assert (learned["delay_s"], learned["reason"]) == (2.0, "record_unreadable") and "key:read" in learned["why"]
    assert done["elapsed_ms"] >= 2000, done
    assert token not in sc.output()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``consul-sidecar ARGS`` as a process of its own."""
    return subprocess.run(
        [PY, "-m", "sidecar", *args], capture_output=True, text=True, cwd=ROOT, timeout=60, check=False
    )


def _check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return _cli("check-config", "-c", str(path))


def test_check_config_says_what_a_drain_would_wait_now_and_why(
    consul: Consul, service_name: str, tmp_path: Path
) -> None:
    """With the record of twelve 1.5 s drains, check-config's ``learned_now`` is 2 s (p99 + margin) and its
    last lines say so in words; with the agent unreachable it is learned_max, the exit status still 0 (the
    file is valid) and one line names the failed read. Red when check-config does not read the record or
    disagrees with the drain's rule."""
    _put_record(consul, service_name, [1500] * 12)
    sections = _learned_config(consul, service_name, free_port(), learned_max="9s")
    done = _check_config(write_config(tmp_path / "c.toml", sections))
    assert done.returncode == 0, done.stderr
    now = json.loads(done.stdout)["shutdown"]["learned_now"]
    assert (now["delay_s"], now["reason"], now["samples"], now["p99_ms"], now["margin_ms"]) == (
        2.0,
        "record",
        12,
        1500,
        500,
    )
    assert "a drain now would wait 2s after the confirmed deregistration: p99 1.50 s + margin 0.50 s" in done.stderr
    sections["consul"]["address"] = f"http://127.0.0.1:{free_port()}"
    down = _check_config(write_config(tmp_path / "d.toml", sections))
    assert down.returncode == 0 and "Traceback" not in down.stderr, down.stderr
    assert json.loads(down.stdout)["shutdown"]["learned_now"]["delay_s"] == 9.0
    [line] = [x for x in down.stderr.splitlines() if x.startswith("learned delay:")]
    assert "would wait 9s" in line and "could not be read" in line and "unreachable" in line, line


def test_with_etcd_the_record_beside_the_prefix_sets_the_delay(
    etcd: Any, etcd_prefix: str, start_sidecar: StartSidecar, tmp_path: Path
) -> None:
    """registry.kind = "etcd": the record of twelve 1.5 s drains put with etcdctl beside the prefix (where the
    adapter keeps it). check-config says 2 s and a real drain waits 2 s (learned_max 9 s), reason record.
    Red when the etcd adapter's record is not read (learned_max), or check-config reads Consul for it."""
    from sidecar.registry.etcd_blocking import kv_place
    from testkit.etcd import etcdctl

    name = "learnedetcd"
    etcdctl(etcd.endpoint, "put", kv_place(etcd_prefix, record.key(name)), _document(*([1500] * 12)).decode())
    port = free_port()
    sections: dict[str, dict[str, Any]] = {
        "registry": {"kind": "etcd"},
        "etcd": {"endpoints": [etcd.endpoint], "lease_ttl": "3s", "prefix": etcd_prefix},
        "service": {"name": name, "id": f"{name}-1", "address": "127.0.0.1", "port": port},
        "check": {"interval": "1s", "timeout": "500ms"},
        "shutdown": {"propagation_delay": "learned", "learned_max": "9s", "app_timeout": "5s"},
        "status": {"listen": ""},
    }
    checked = _check_config(write_config(tmp_path / "c.toml", sections))
    assert checked.returncode == 0, checked.stderr
    now = json.loads(checked.stdout)["shutdown"]["learned_now"]
    assert (now["delay_s"], now["reason"], now["samples"]) == (2.0, "record", 12), (now, checked.stderr)
    sc = start_sidecar(sections, app_command(port))
    done = _sigterm_drain(sc)
    learned = sc.event("sidecar.drain.learned_delay")
    assert learned is not None and (learned["delay_s"], learned["reason"]) == (2.0, "record"), learned
    assert done["bound_s"] == 2.0 and 2000 <= done["elapsed_ms"] < 8000, done


# --- found by the adversary of the learned delay ----------------------------------------------------------


def _put_raw(consul: Consul, name: str, document: bytes) -> None:
    req = urllib.request.Request(f"{consul.address}/v1/kv/{record.key(name)}", data=document, method="PUT")
    with urllib.request.urlopen(req, timeout=5) as r:
        assert json.loads(r.read()) is True


@pytest.mark.parametrize(
    "document",
    [
        b'{"samples": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"samples": [' + b", ".join([b'{"horizon_ms": ' + b"9" * 400 + b"}"] * 12) + b"]}",
    ],
    ids=["nested-100000-deep", "int-of-400-digits"],
)
def test_a_record_json_loads_chokes_on_never_breaks_a_real_drain(
    consul: Consul, start_sidecar: StartSidecar, service_name: str, document: bytes, tmp_path: Path
) -> None:
    """Anyone with key:write on the record can put in it JSON that ``json.loads`` refuses with RecursionError
    (arrays nested 100,000 deep: Consul takes the 200 kB), or samples whose horizon no float holds (an
    integer of 400 digits: ``math.isfinite`` raises OverflowError). A real drain must still wait learned_max (the
    record recommends nothing), pass the app's exit status on (3), write a whole record in place of the
    garbage, and log no traceback; check-config and ``horizon`` must not die with a traceback. Red before
    the fixes (``record.samples`` let RecursionError and OverflowError out): check-config and ``horizon``
    died with a traceback, and the horizon's write (``merge``) raised out of the drain after the app's stop
    (exit 70, "sidecar.crashed", the app's 3 lost)."""
    _put_raw(consul, service_name, document)
    port = free_port()
    cfg = _learned_config(consul, service_name, port, learned_max="2s", learned_min="500ms")
    checked = _check_config(write_config(tmp_path / "c.toml", cfg))
    assert checked.returncode == 0 and "Traceback" not in checked.stderr, checked.stderr
    assert json.loads(checked.stdout)["shutdown"]["learned_now"]["delay_s"] == 2.0
    shown = _cli("horizon", "-c", str(tmp_path / "c.toml"))
    assert shown.returncode == 1 and "Traceback" not in shown.stderr, shown.stderr
    sc = start_sidecar(cfg, app_command(port, "127.0.0.1", "--exit-code", "3"))
    done = _sigterm_drain(sc, 3)
    learned = sc.event("sidecar.drain.learned_delay")
    assert learned is not None and learned["delay_s"] == 2.0, learned
    assert done["elapsed_ms"] >= 2000, done
    assert "Traceback" not in sc.output(), sc.tail()
    sc.wait_event("sidecar.drain.horizon_saved")
    [entry] = consul.get(f"/v1/kv/{record.key(service_name)}")
    assert len(record.samples(base64.b64decode(entry["Value"]))) == 1, entry


def test_slowest_peers_that_are_no_list_are_left_out_not_a_traceback(
    consul: Consul, service_name: str, tmp_path: Path
) -> None:
    """Twelve good 1.5 s horizons whose ``slowest_peers`` is a number (anyone with key:write can put it): the
    peers are no evidence, the horizons are. check-config says 2 s (p99 + margin) and ``horizon`` exits 0 with
    its table; the drain's rule says the same. Red before the fix: ``summarise`` iterated the number
    (TypeError): check-config and ``horizon`` died with a traceback, and a drain waited learned_max
    (record_unreadable) in spite of twelve good samples."""
    document = json.dumps({"samples": [{"horizon_ms": 1500, "slowest_peers": 5}] * 12}).encode()
    assert record.learned_delay(record.samples(document), 1.0, 9.0).delay_s == 2.0
    _put_raw(consul, service_name, document)
    cfg = _learned_config(consul, service_name, free_port(), learned_max="9s")
    checked = _check_config(write_config(tmp_path / "c.toml", cfg))
    assert checked.returncode == 0 and "Traceback" not in checked.stderr, checked.stderr
    assert json.loads(checked.stdout)["shutdown"]["learned_now"]["delay_s"] == 2.0, checked.stdout
    shown = _cli("horizon", "-c", str(tmp_path / "c.toml"))
    assert shown.returncode == 0 and "recommended delay" in shown.stdout, (shown.stdout, shown.stderr)


@pytest.mark.parametrize("cut", ["second-sigint", "app-exits"])
def test_a_wait_cut_short_leaves_no_sample_in_the_record(
    consul: Consul, start_sidecar: StartSidecar, service_name: str, cut: str
) -> None:
    """The drain's wait (learned_max 20 s: the record is empty) is cut short by the operator's second Ctrl-C,
    or by the app exiting on its own: the window closed after a few ms, so its horizon (0: nobody came yet) says
    nothing about when consumers stop. Expected: the record gets no sample (no ``horizon_saved``, no key), exit
    as the app's. Red before the fix: the drain appended ``horizon_ms: 0``; ten such drains (a few Ctrl-Cs in
    staging) make a recommendation of 0 s + margin, and every later learned drain waits learned_min."""
    port = free_port()
    cfg = _learned_config(consul, service_name, port, learned_max="20s", app_timeout="5s")
    sc = start_sidecar(cfg, app_command(port))
    sc.wait_event("sidecar.consul.registered")
    sc.send(signal.SIGINT if cut == "second-sigint" else signal.SIGTERM)
    sc.wait_event("sidecar.drain.learned_delay", timeout=30)
    if cut == "second-sigint":
        sc.send(signal.SIGINT)
    else:
        started = sc.event("sidecar.app.started")
        assert started is not None
        pid = int(str(started["app"]).split()[1])  # "pid N (...)"
        os.kill(pid, signal.SIGTERM)
    done = sc.wait_event("sidecar.drain.delay_done", timeout=30)
    assert done["elapsed_ms"] < 10_000, done
    assert sc.wait(60) == 0, sc.tail()
    events = [e["event"] for e in sc.events() if e["event"].startswith("sidecar.drain")]
    assert "sidecar.drain.done" in events and "sidecar.drain.horizon_saved" not in events, events
    assert consul.get(f"/v1/kv/{record.key(service_name)}") is None
