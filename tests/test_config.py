"""The configuration file: defaults, interpolation, Consul's environment, and every bad-input case."""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from sidecar.config import ConfigError, default_service_id, load_config
from sidecar.durations import MAX_SECONDS, format_duration, parse_duration
from testkit import PY, ROOT, Consul

MINIMAL = '[service]\nname = "web"\nport = 8080\naddress = "127.0.0.2"\n'


def load(tmp_path: Path, text: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    p = tmp_path / "c.toml"
    p.write_text(text)
    return load_config(p, env or {}, hostname=lambda: "host1", local_address=lambda h, p: "10.9.8.7")


def problems(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, text, env)
    return e.value.problems


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("5s", 5), ("1m", 60), ("1m30s", 90), ("1.5s", 1.5), ("0", 0), ("2h", 7200), ("250us", 0.00025)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "-1s", "5 s", "1x", "s", "1s2", "ms"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_format_duration_round_trips() -> None:
    for s in (0.0, 0.25, 1.0, 1.5, 60.0, 29.0):
        assert parse_duration(format_duration(s)) == pytest.approx(s)


def test_defaults(tmp_path: Path) -> None:
    c = load(tmp_path, MINIMAL)
    assert c.consul.address == "http://127.0.0.1:8500"
    assert c.service.id == "web-host1-127.0.0.2-8080"
    assert c.check.http == "http://127.0.0.2:8080/healthz"
    assert (c.check.interval, c.check.timeout, c.check.deregister_critical_after) == (1.0, 1.0, 60.0)
    assert c.startup.wait_healthy and c.startup.timeout == 60
    sd = c.shutdown
    assert (sd.propagation_delay, sd.app_signal, sd.app_timeout, sd.deregister_timeout) == (
        5.0,
        signal.SIGTERM,
        20.0,
        3.0,
    )
    assert sd.worst_case == 29.0  # fits Kubernetes' 30 s grace period
    assert c.status is not None and (c.status.host, c.status.port) == ("127.0.0.1", 0)  # any free port: cannot collide
    assert c.consul.token.read() is None


def test_service_address_defaults_to_the_interface_toward_consul(tmp_path: Path) -> None:
    c = load(tmp_path, '[service]\nname = "web"\nport = 80\n')
    assert c.service.address == "10.9.8.7"


def test_interpolation(tmp_path: Path) -> None:
    text = (
        '[service]\nname = "${NAME}"\nport = 8080\naddress = "${ADDR:-127.0.0.3}"\n'
        'tags = ["${VER:-v0}"]\nmeta = { v = "$${literal}" }\n'
    )
    c = load(tmp_path, text, {"NAME": "api"})
    assert (c.service.name, c.service.address, c.service.tags) == ("api", "127.0.0.3", ("v0",))
    assert c.service.meta["v"] == "${literal}"


def test_consul_environment_applies_where_the_file_is_silent(tmp_path: Path) -> None:
    token_file = tmp_path / "tok"
    token_file.write_text("s3cret-from-file\n")
    env = {
        "CONSUL_HTTP_ADDR": "127.0.0.1:9500",
        "CONSUL_HTTP_TOKEN_FILE": str(token_file),
        "CONSUL_HTTP_SSL_VERIFY": "false",
    }
    c = load(tmp_path, MINIMAL, env)
    assert c.consul.address == "http://127.0.0.1:9500"
    assert c.consul.token.read() == "s3cret-from-file"
    assert c.consul.tls_verify is False
    assert "s3cret" not in repr(c)
    # The file wins over the environment.
    c2 = load(tmp_path, '[consul]\naddress = "https://consul.local:8501"\ntoken = "t"\n' + MINIMAL, env)
    assert c2.consul.address == "https://consul.local:8501"
    assert c2.consul.token.read() == "t"


def test_token_file_is_read_on_every_use(tmp_path: Path) -> None:
    """A rotated token file takes effect without a restart."""
    tf = tmp_path / "tok"
    tf.write_text("one")
    c = load(tmp_path, f'[consul]\ntoken_file = "{tf}"\n' + MINIMAL)
    assert c.consul.token.read() == "one"
    tf.write_text("two\n")
    assert c.consul.token.read() == "two"


BAD = [
    ("missing-name", "[service]\nport = 8080\n", "service.name"),
    ("missing-port", '[service]\nname = "web"\n', "service.port"),
    ("port-zero", '[service]\nname = "web"\nport = 0\n', "service.port"),
    ("port-too-big", '[service]\nname = "web"\nport = 70000\n', "service.port"),
    ("port-string", '[service]\nname = "web"\nport = "http"\n', "service.port"),
    ("bad-duration", MINIMAL + '[shutdown]\npropagation_delay = "5 seconds"\n', "shutdown.propagation_delay"),
    ("bare-number-duration", MINIMAL + '[shutdown]\napp_timeout = "20"\n', "shutdown.app_timeout"),
    ("duration-not-string", MINIMAL + "[shutdown]\napp_timeout = 20\n", "shutdown.app_timeout"),
    ("unknown-key", MINIMAL + '[shutdown]\npropagation_dealy = "5s"\n', "shutdown.propagation_dealy"),
    ("unknown-section", MINIMAL + "[servcie]\nx = 1\n", "servcie"),
    ("unknown-signal", MINIMAL + '[shutdown]\napp_signal = "SIGTERMINATE"\n', "shutdown.app_signal"),
    ("uncatchable-signal", MINIMAL + '[shutdown]\napp_signal = "SIGKILL"\n', "shutdown.app_signal"),
    ("unreadable-token-file", '[consul]\ntoken_file = "/nonexistent/token"\n' + MINIMAL, "consul.token_file"),
    ("token-and-token-file", '[consul]\ntoken = "a"\ntoken_file = "/etc/hostname"\n' + MINIMAL, "consul.token"),
    ("bad-address", '[consul]\naddress = "ftp://x:1"\n' + MINIMAL, "consul.address"),
    ("interval-under-1s", MINIMAL + '[check]\ninterval = "500ms"\n', "check.interval"),
    (
        "deregister-under-1m",
        MINIMAL + '[check]\nderegister_critical_after = "30s"\n',
        "check.deregister_critical_after",
    ),
    ("remote-check-url", MINIMAL + '[check]\nhttp = "http://169.254.169.254/latest"\n', "check.http"),
    ("unset-variable", '[service]\nname = "${NO_SUCH_VAR}"\nport = 1\n', "service.name"),
    ("bad-name", '[service]\nname = "web app"\nport = 1\n', "service.name"),
    ("meta-not-string", '[service]\nname = "w"\nport = 1\nmeta = { a = 1 }\n', "service.meta.a"),
    ("tags-not-list", '[service]\nname = "w"\nport = 1\ntags = "v1"\n', "service.tags"),
    ("two-app-targets", MINIMAL + '[app]\npid = 5\nshutdown_url = "http://127.0.0.2:8080/shutdown"\n', "app"),
    ("bad-listen", MINIMAL + '[status]\nlisten = "nowhere"\n', "status.listen"),
    ("wait-healthy-string", MINIMAL + '[startup]\nwait_healthy = "yes"\n', "startup.wait_healthy"),
    ("not-toml", "[service\nname=", "not valid TOML"),
    ("section-not-table", 'service = "web"\n', "service"),
    # Issue 8: each of these gave a traceback, passed, or failed only once the agent answered.
    ("check-url-bad-ipv6", MINIMAL + '[check]\nhttp = "http://[::1"\n', "check.http"),
    ("check-url-bad-port", MINIMAL + '[check]\nhttp = "http://127.0.0.2:99999/healthz"\n', "check.http"),
    ("check-url-newline", MINIMAL + '[check]\nhttp = "http://127.0.0.2:8080/\\nx"\n', "check.http"),
    ("shutdown-url-bad-ipv6", MINIMAL + '[app]\nshutdown_url = "http://[zz"\n', "app.shutdown_url"),
    ("address-with-colon", '[service]\nname = "web"\nport = 8080\naddress = "a:b"\n', "service.address"),
    ("address-with-port", '[service]\nname = "web"\nport = 8080\naddress = "10.0.0.1:8080"\n', "service.address"),
    ("duration-320-digits", MINIMAL + f'[shutdown]\napp_timeout = "{"9" * 320}s"\n', "shutdown.app_timeout"),
    ("interval-past-go-max", MINIMAL + '[check]\ninterval = "3000000h"\n', "check.interval"),
    ("check-timeout-past-go-max", MINIMAL + '[check]\ntimeout = "2562048h"\n', "check.timeout"),
    (
        "deregister-after-past-go-max",
        MINIMAL + '[check]\nderegister_critical_after = "9223372037s"\n',
        "check.deregister_critical_after",
    ),
    ("delay-past-go-max", MINIMAL + '[shutdown]\npropagation_delay = "3000000h"\n', "shutdown.propagation_delay"),
    ("id-dot", '[service]\nname = "web"\nport = 8080\naddress = "127.0.0.2"\nid = "."\n', "service.id"),
    ("id-dot-dot", '[service]\nname = "web"\nport = 8080\naddress = "127.0.0.2"\nid = ".."\n', "service.id"),
    ("id-slash", '[service]\nname = "web"\nport = 8080\naddress = "127.0.0.2"\nid = "a/../b"\n', "service.id"),
    (
        "id-trailing-newline",
        '[service]\nname = "web"\nport = 8080\naddress = "127.0.0.2"\nid = "web-1\\n"\n',
        "service.id",
    ),
    (
        "id-control-char",
        '[service]\nname = "web"\nport = 8080\naddress = "127.0.0.2"\nid = "a\\u0007b"\n',
        "service.id",
    ),
    ("name-trailing-newline", '[service]\nname = "web\\n"\nport = 8080\naddress = "127.0.0.2"\n', "service.name"),
    ("meta-key-trailing-newline", MINIMAL + '[service.meta]\n"v\\n" = "1"\n', "service.meta.v"),
    ("meta-key-reserved", MINIMAL + '[service.meta]\nconsul_sidecar_owner = "x"\n', "consul_sidecar_owner"),
    ("token-with-newline", '[consul]\ntoken = "tok-1\\ntok-2"\n' + MINIMAL, "consul.token"),
    ("config-file-too-big", MINIMAL + "# " + "x" * (1 << 20) + "\n", "larger than"),
]


@pytest.mark.parametrize(("case", "text", "key"), BAD, ids=[b[0] for b in BAD])
def test_bad_config_names_the_key(tmp_path: Path, case: str, text: str, key: str) -> None:
    found = problems(tmp_path, text)
    assert any(f"c.toml: {key}" in p or key in p for p in found), found
    assert all(p.startswith(str(tmp_path / "c.toml")) for p in found), found


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    found = problems(tmp_path, '[service]\nname = ""\nport = 0\n[shutdown]\napp_timeout = "x"\n')
    keys = " ".join(found)
    assert "service.name" in keys and "service.port" in keys and "shutdown.app_timeout" in keys


def _limit_memory() -> None:
    # A loader that reads /dev/zero whole must fail here, not eat the machine's memory.
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "sidecar", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env=env,
        preexec_fn=_limit_memory,
    )


@pytest.mark.parametrize(("case", "text", "key"), BAD, ids=[b[0] for b in BAD])
def test_cli_bad_config_exits_78_and_starts_nothing(
    consul: Consul, tmp_path: Path, case: str, text: str, key: str
) -> None:
    """`run` with a bad file: exit 78, a message naming the key, no traceback,
    the app never started (its marker file is absent), nothing registered in the agent."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[consul]\naddress = "{consul.address}"\n' + text if "[consul]" not in text else text)
    marker = tmp_path / "app-started"
    before = consul.get("/v1/agent/services")
    r = run_cli("run", "-c", str(cfg), "--", "touch", str(marker))
    assert r.returncode == 78, r.stderr
    assert key in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert not marker.exists()
    assert consul.get("/v1/agent/services") == before


@pytest.mark.integration
def test_cli_missing_file() -> None:
    r = run_cli("check-config", "-c", "/nonexistent/sidecar.toml")
    assert r.returncode == 78
    assert "/nonexistent/sidecar.toml" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.integration
def test_check_config_prints_registration_and_redacts_token(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[consul]\ntoken = "${TOK}"\n' + MINIMAL + '[service.meta]\nversion = "1.0"\n')
    r = run_cli("check-config", "-c", str(cfg), env={"TOK": "very-secret-token", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert "very-secret-token" not in r.stdout + r.stderr
    doc = json.loads(r.stdout)
    reg = doc["registration"]
    assert reg["Name"] == "web" and reg["Port"] == 8080 and reg["Meta"] == {"version": "1.0"}
    assert reg["Check"]["HTTP"] == "http://127.0.0.2:8080/healthz"
    assert doc["consul"]["token"].startswith("<redacted>")
    assert doc["shutdown"]["worst_case"] == "29s"
    assert "worst-case shutdown: 29s" in r.stderr


@pytest.mark.integration
def test_cli_app_section_in_wrapper_mode_is_an_error(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(MINIMAL + "[app]\npid = 5\n")
    r = run_cli("run", "-c", str(cfg), "--", "true")
    assert r.returncode == 78 and "[app] is for alongside mode" in r.stderr


@pytest.mark.integration
def test_cli_version_and_help() -> None:
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("consul-sidecar ")
    for cmd in ([], ["run"], ["check-config"]):
        h = run_cli(*cmd, "--help")
        assert h.returncode == 0 and "usage:" in h.stdout


def test_unresolvable_agent_without_service_address_is_an_error(tmp_path: Path) -> None:
    """No silent fallback to a loopback address that would go into the catalog."""
    p = tmp_path / "c.toml"
    p.write_text('[consul]\naddress = "http://no-such-agent.invalid:8500"\n[service]\nname = "w"\nport = 80\n')

    def no_route(host: str, port: int) -> str:
        raise OSError(-2, "Name or service not known")

    with pytest.raises(ConfigError) as e:
        load_config(p, {}, hostname=lambda: "h", local_address=no_route)
    assert any("service.address" in line and "no-such-agent.invalid" in line for line in e.value.problems)


@pytest.mark.integration
def test_check_config_warns_over_budget_and_names_the_setting(tmp_path: Path) -> None:
    """Worst case 3 + 5 + 60 + 1 = 69 s over the default 30 s budget: a warning naming app_timeout;
    raising shutdown.budget to match silences it."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(MINIMAL + '[shutdown]\napp_timeout = "60s"\n')
    r = run_cli("check-config", "-c", str(cfg))
    assert r.returncode == 0
    assert (
        "warning" in r.stderr and "69s exceeds shutdown.budget 30s" in r.stderr and "shutdown.app_timeout" in r.stderr
    )
    cfg.write_text(MINIMAL + '[shutdown]\napp_timeout = "60s"\nbudget = "70s"\n')
    r = run_cli("check-config", "-c", str(cfg))
    assert r.returncode == 0 and "warning" not in r.stderr


# --- issue 8: hostile input gives one line naming the key, exit 78, nothing started -------------


def test_durations_are_bounded_by_what_consul_accepts() -> None:
    """Consul 1.8.7 takes Interval/Timeout/DeregisterCriticalServiceAfter up to Go's maximum duration
    (9223372036.854775807s: 200) and answers 400 one nanosecond later; the sidecar refuses beyond it
    at load time, and writes every accepted value back without an exponent."""
    assert parse_duration("2562047h") == 2562047 * 3600
    assert parse_duration("2562047h47m16.854s") == MAX_SECONDS
    for text in ("2562047h47m16.855s", "3000000h", "9" * 309 + "s", "9" * 5000 + "ns", "1" * 400 + ".5h"):
        with pytest.raises(ValueError, match="longest duration Consul accepts"):
            parse_duration(text)
    assert format_duration(MAX_SECONDS) == "9223372036.854s"
    assert format_duration(2562047 * 3600 + 0.5) == "9223369200.5s"
    assert format_duration(90.25) == "90.25s"


def test_default_id_is_unique_per_address_and_always_valid() -> None:
    """Same name, host and port, different addresses: different IDs. Odd hosts and addresses (an IPv6
    zone, a long DNS name) still give a valid ID, distinct per address."""
    a = default_service_id("web", "host1", "127.0.0.2", 8080)
    b = default_service_id("web", "host1", "127.0.0.3", 8080)
    assert (a, b) == ("web-host1-127.0.0.2-8080", "web-host1-127.0.0.3-8080")
    odd = [
        default_service_id("web", "h", addr, 80)
        for addr in ("fe80::1%eth0", "fe80::1%eth1", "a" * 60 + ".example.com", "b" * 60 + ".example.com")
    ]
    assert len(set(odd)) == 4
    assert all(re.fullmatch(r"[A-Za-z0-9._:@-]{1,256}", i) for i in odd), odd


def test_name_from_a_variable_with_a_trailing_newline_is_refused(tmp_path: Path) -> None:
    """`name = "${NAME}"` with NAME="web\n" (a value read from a file): refused, not registered as 'web\n'."""
    found = problems(tmp_path, '[service]\nname = "${NAME}"\nport = 8080\naddress = "127.0.0.2"\n', {"NAME": "web\n"})
    assert len(found) == 1 and "service.name" in found[0] and "\n" not in found[0], found


def _one_clean_line(r: subprocess.CompletedProcess[str], key: str) -> None:
    assert r.returncode == 78, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0], lines
    assert "Traceback" not in r.stderr and r.stdout == ""


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["dev-zero", "fifo", "directory"])
def test_config_file_that_is_not_a_regular_file(tmp_path: Path, kind: str) -> None:
    """/dev/zero, a FIFO nobody writes to, or a directory as the configuration file: one line saying
    what it is, exit 78, at once (no MemoryError, no hang)."""
    path = {"dev-zero": Path("/dev/zero"), "fifo": tmp_path / "fifo", "directory": tmp_path}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    t = time.monotonic()
    r = run_cli("check-config", "-c", str(path))
    _one_clean_line(r, str(path))
    assert "not a regular file" in r.stderr
    assert time.monotonic() - t < 20


@pytest.mark.parametrize("kind", ["dev-zero", "fifo", "two-lines", "too-big", "not-utf8"])
def test_bad_token_file_is_one_config_line(consul: Consul, tmp_path: Path, kind: str) -> None:
    """A token file that is /dev/zero, a FIFO, holds two lines (`tok-1\ntok-2`), is huge or is not
    UTF-8: `run` exits 78 with one line naming consul.token_file, the app never starts, nothing is
    registered, and the token never appears in the message."""
    tf = tmp_path / "token"
    if kind == "dev-zero":
        tf = Path("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(tf)
    else:
        tf.write_bytes(
            {"two-lines": b"tok-1-secret\ntok-2-secret\n", "too-big": b"t" * (1 << 20), "not-utf8": b"\xff\xfe"}[kind]
        )
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[consul]\naddress = "{consul.address}"\ntoken_file = "{tf}"\n' + MINIMAL)
    marker = tmp_path / "app-started"
    before = consul.get("/v1/agent/services")
    r = run_cli("run", "-c", str(cfg), "--", "touch", str(marker))
    _one_clean_line(r, "consul.token_file")
    assert "secret" not in r.stderr
    assert not marker.exists()
    assert consul.get("/v1/agent/services") == before
    _one_clean_line(run_cli("check-config", "-c", str(cfg)), "consul.token_file")


@pytest.mark.integration
def test_check_config_refuses_an_interval_consul_would_refuse(tmp_path: Path) -> None:
    """`check.interval = "3000000h"`: check-config exits 78 naming check.interval (it used to pass, and
    `run` started the app before the agent answered 400)."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(MINIMAL + '[check]\ninterval = "3000000h"\n')
    _one_clean_line(run_cli("check-config", "-c", str(cfg)), "check.interval")


@pytest.mark.integration
def test_writable_token_file_warns_in_check_config(tmp_path: Path) -> None:
    """A group- or world-writable token file: check-config still passes (exit 0) but warns in one line
    naming the file and the mode; a 0600 file gives no warning."""
    tf = tmp_path / "token"
    tf.write_text("tok\n")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[consul]\ntoken_file = "{tf}"\n' + MINIMAL)
    for mode, warned in ((0o666, True), (0o620, True), (0o600, False)):
        tf.chmod(mode)
        r = run_cli("check-config", "-c", str(cfg))
        assert r.returncode == 0, r.stderr
        lines = [line for line in r.stderr.splitlines() if "writable" in line]
        assert bool(lines) == warned, (oct(mode), r.stderr)
        if warned:
            assert (
                len(lines) == 1
                and "consul.token_file" in lines[0]
                and str(tf) in lines[0]
                and f"{mode:04o}" in lines[0]
            )
            assert stat.S_IMODE(tf.stat().st_mode) == mode


# Integer keys: written as TOML integers. A literal string ("8080") is refused with a message naming
# the key (it was accepted silently), a float says "whole number" sensibly (it said "not a number").
# A string is still right for a variable: port = "${PORT}".
INTEGER_KEYS = [("service", "port", 8080), ("app", "pid", 4242)]


def integer_key_config(section: str, key: str, toml_value: str) -> str:
    service = {"name": '"web"', "port": "8080", "address": '"127.0.0.2"'}
    body = {"service": service, "app": {}}
    body[section][key] = toml_value
    return "".join(f"[{s}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()) for s, keys in body.items())


@pytest.mark.parametrize(("section", "key", "good"), INTEGER_KEYS)
@pytest.mark.parametrize(
    ("written", "message"),
    [
        ('"{good}"', 'must be an integer, not a string ("{good}": write {good} without quotes)'),
        ('"http"', "must be an integer, not a string ('http')"),
        ("{good}.0", "must be a whole number, not {good}.0 (write {good})"),
        ("{good}.5", "must be a whole number, not {good}.5"),
        ("true", "must be an integer, not a boolean"),
        ("[{good}]", "must be an integer, not a list"),
    ],
    ids=["string", "word", "float", "fraction", "boolean", "list"],
)
def test_integer_keys_refuse_strings_and_floats_in_one_line(
    tmp_path: Path, section: str, key: str, good: int, written: str, message: str
) -> None:
    found = problems(tmp_path, integer_key_config(section, key, written.format(good=good)))
    assert found == [f"{tmp_path / 'c.toml'}: {section}.{key}: {message.format(good=good)}"]


@pytest.mark.parametrize(("section", "key", "good"), INTEGER_KEYS)
def test_integer_keys_take_a_variable(tmp_path: Path, section: str, key: str, good: int) -> None:
    c = load(tmp_path, integer_key_config(section, key, '"${V}"'), {"V": str(good)})
    assert getattr(getattr(c, section), key) == good
    found = problems(tmp_path, integer_key_config(section, key, '"${V}"'), {"V": f"{good}.0"})
    assert found == [f"{tmp_path / 'c.toml'}: {section}.{key}: '{good}.0' (from a variable) is not a whole number"]
