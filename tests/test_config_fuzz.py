"""Property: any configuration input yields either a valid Config or ConfigError with readable
lines, and `check-config` exits 0 or 78 without a traceback. Never anything else."""

from __future__ import annotations

import contextlib
import io
import string
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar import cli
from sidecar.config import _SECTIONS, Config, ConfigError, load_config
from testkit import toml_value

SETTINGS = settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

durations = st.one_of(
    st.sampled_from(
        [
            "0",
            "1s",
            "500ms",
            "1m",
            "90s",
            "1h",
            "1.5s",
            "5",
            "-1s",
            "1x",
            "",
            "1m30s",
            "999999h",
            "3000000h",
            "2562047h",
            "2562047h47m16.854s",
            "2562047h47m16.855s",
            "9" * 309 + "s",
            "1" * 400 + ".5h",
        ]
    ),
    st.from_regex(r"\A[0-9]{0,4}(\.[0-9]{0,2})?(ns|us|ms|s|m|h|d)?\Z", fullmatch=True),
    st.tuples(st.integers(300, 400), st.sampled_from(["ns", "s", "h", ".5s"])).map(lambda t: "9" * t[0] + t[1]),
)
# Values that gave tracebacks, hangs or MemoryErrors (issue 8), and their neighbours.
HOSTILE = [
    "http://[::1",
    "http://[zz",
    "http://[::1]:99999/",
    "https://h:0x1/",
    "http://h/\nx",
    "a:b",
    "[::1]",
    "::1",
    "fe80::1%eth0",
    ".",
    "..",
    "a/b",
    "a/../b",
    "web\n",
    "x\x00y",
    "tok-1\ntok-2",
    "/dev/zero",
    "/dev/null",
    "/",
    "/proc/self/fd/0",
    "${HOME}\n",
    "\u2028",
    "٨٠٨٠",
]
scalars = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    durations,
    st.sampled_from(
        [
            "${HOME}",
            "${NOPE}",
            "${NOPE:-x}",
            "$$",
            "http://127.0.0.1:8500",
            "https://[::1]:1",
            "SIGTERM",
            "KILL",
            "127.0.0.1:0",
        ]
    ),
    st.sampled_from(HOSTILE),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(string.ascii_lowercase, max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


@st.composite
def documents(draw: Any) -> dict[str, dict[str, Any]]:
    doc: dict[str, dict[str, Any]] = {}
    for section in draw(st.lists(st.sampled_from([*_SECTIONS, "extra"]), max_size=8, unique=True)):
        known = sorted(_SECTIONS.get(section, frozenset({"x"})))
        keys = draw(
            st.lists(
                st.one_of(st.sampled_from(known), st.text(string.ascii_lowercase + "_", min_size=1, max_size=8)),
                max_size=6,
                unique=True,
            )
        )
        doc[section] = {k: draw(values) for k in keys}
    return doc


def render(doc: dict[str, dict[str, Any]]) -> str:
    out = []
    for name, keys in doc.items():
        out.append(f"[{name}]")
        out += [f'"{k}" = {toml_value(v)}' for k, v in keys.items()]
    return "\n".join(out) + "\n"


def check(path: Path, env: dict[str, str] | None = None) -> None:
    try:
        config = load_config(
            path, env or {"HOME": "/root"}, hostname=lambda: "h", local_address=lambda h, p: "127.0.0.1"
        )
    except ConfigError as e:
        assert e.problems and all(p.startswith(str(path)) and "\n" not in p for p in e.problems), e.problems
        return
    assert isinstance(config, Config)
    assert 1 <= config.service.port <= 65535 and config.service.name


@SETTINGS
@given(text=st.text(max_size=300))
def test_any_text(tmp_path_factory: Any, text: str) -> None:
    p = tmp_path_factory.mktemp("fuzz") / "c.toml"
    p.write_bytes(text.encode("utf-8", "replace"))
    check(p)


@SETTINGS
@given(doc=documents())
def test_any_structure(tmp_path_factory: Any, doc: dict[str, dict[str, Any]]) -> None:
    p = tmp_path_factory.mktemp("fuzz") / "c.toml"
    p.write_text(render(doc))
    check(p)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(doc=documents(), raw=st.binary(max_size=64))
def test_check_config_exit_codes(tmp_path_factory: Any, doc: dict[str, dict[str, Any]], raw: bytes) -> None:
    """The CLI in process: exit 0 or 78, nothing on stderr that looks like a traceback."""
    d = tmp_path_factory.mktemp("cli")
    for i, content in enumerate((render(doc).encode(), raw)):
        p = d / f"c{i}.toml"
        p.write_bytes(content)
        err, out = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = cli.main(["check-config", "-c", str(p)])
        assert code in (0, 78), (code, err.getvalue())
        assert "Traceback" not in err.getvalue()


STRING_KEYS = sorted(
    (section, key)
    for section, keys in _SECTIONS.items()
    for key in keys
    if (section, key)
    not in {
        ("service", "port"),
        ("service", "tags"),
        ("service", "meta"),
        ("shutdown", "dns"),
        ("app", "pid"),
        ("check", "allow_remote"),
        ("startup", "wait_healthy"),
        ("consul", "tls_verify"),
    }
)


@SETTINGS
@given(
    where=st.sampled_from(STRING_KEYS),
    value=st.one_of(st.text(max_size=60), st.sampled_from(HOSTILE), durations),
    through_env=st.booleans(),
)
def test_any_string_at_any_string_key(
    tmp_path_factory: Any, where: tuple[str, str], value: str, through_env: bool
) -> None:
    """Every key that takes a string, given any string (directly or through ${VAR}, the way a value
    read from a file arrives with its newline): a Config or ConfigError lines, never a traceback."""
    section, key = where
    doc: dict[str, dict[str, Any]] = {"service": {"name": "web", "port": 8080, "address": "127.0.0.1"}}
    doc.setdefault(section, {})[key] = "${V}" if through_env else value
    p = tmp_path_factory.mktemp("fuzz") / "c.toml"
    p.write_text(render(doc))
    check(p, {"V": value.replace("\0", "")} if through_env else None)
