"""What the key table tells people: docs/configuration.md, and check-config's effective values.

python -m sidecar.config.docs           # rewrite docs/configuration.md
python -m sidecar.config.docs --check   # exit 1 if it is stale (a test does the same)
"""

from __future__ import annotations

import enum
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..durations import format_duration
from .keys import KEYS, SECTION_DOCS, SECTIONS, Key, Kind, default
from .model import KILL_REAP_TIMEOUT, Config
from .tokens import TokenSource

DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"

_HEADER = """\
# Configuration

<!-- Generated from sidecar/config/keys.py by `python -m sidecar.config.docs`: edit the table there, not this file. -->

TOML; `consul-sidecar check-config -c FILE` validates a file and prints what would be registered and the effective
settings that apply (the traffic keys only with `strategy = "traffic"`).
Examples: [config/web.toml](../config/web.toml), [config/compose-web.toml](../config/compose-web.toml),
[config/compose-alongside.toml](../config/compose-alongside.toml).

- Durations are Go-style strings as Consul writes them (`"500ms"`, `"5s"`, `"1m30s"`; a bare number is an error,
  not a guess), at most `2562047h47m16.854s`: Go's longest duration, the most Consul accepts for a check's
  interval, timeout and `DeregisterCriticalServiceAfter`.
- Any string may use `${VAR}` and `${VAR:-default}` (`$$` for a literal `$`).
- Integers are TOML integers (`port = 8080`): a quoted number (`"8080"`) or a float (`8080.0`) is an error; a string
  holding a variable is read as a whole number (`port = "${PORT}"`).
- "environment": Consul's own variables, used as the consul CLI uses them when the file does not set the key.
- Bad input is reported as one line per problem naming the file and the key, all problems at once, exit status 78,
  before anything starts or is registered.
"""


def _code(value: object) -> str:
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, int):
        return f"`{value}`"
    return f'`"{value}"`'


def _bounds(key: Key) -> str:
    parts = []
    if key.required:
        parts.append("required")
    if key.kind is Kind.INTEGER and key.minimum is not None and key.maximum is not None:
        parts.append(f"{int(key.minimum)}..{key.maximum}")
    elif key.kind is Kind.DURATION and key.minimum is not None:
        parts.append("more than 0" if key.minimum < 0.01 else f"at least {format_duration(key.minimum)}")
    if key.choices is not None:
        parts.append(" or ".join(_code(c.value) for c in key.choices))
    parts += [f"{_code(v)}: off" for v in key.off if v]
    if key.word:
        parts.append(f"or {_code(key.word)}")
    return ", ".join(parts)


def _row(key: Key) -> str:
    shown = _code(key.default) if key.default not in (None, "") else ""
    dflt = key.default_doc or shown or "none"
    env = ", ".join(f"`{v}`" for v in key.env)
    doc = f"{key.only_with.words} only: {key.doc}" if key.only_with else key.doc
    cells = [f"`{key.name}`", key.kind.value, dflt, env, _bounds(key), doc]
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def render_markdown() -> str:
    out = [_HEADER]
    for section in SECTIONS:
        out += [
            f"## [{section}]",
            "",
            SECTION_DOCS[section],
            "",
            "| key | type | default | environment | bounds | meaning |",
            "|---|---|---|---|---|---|",
        ]
        out += [_row(k) for k in KEYS if k.section == section]
        out.append("")
    worst = (
        default("shutdown.deregister_timeout")
        + default("shutdown.propagation_delay")[0]
        + default("shutdown.app_timeout")
        + KILL_REAP_TIMEOUT
    )
    out += [
        "## Worst-case shutdown",
        "",
        f"`deregister_timeout + propagation_delay + app_timeout + {format_duration(KILL_REAP_TIMEOUT)}` (reaping after "
        f"SIGKILL) = {format_duration(worst)} with the defaults, against `shutdown.budget` "
        f"({format_duration(default('shutdown.budget'))} by default, Kubernetes' grace period). "
        "Give the platform a stop timeout at least this long.",
        "",
    ]
    return "\n".join(out)


def _json(value: Any) -> Any:
    """A settings value as check-config prints it: durations as written, paths and signals by name."""
    if isinstance(value, TokenSource):
        return value.describe()
    if isinstance(value, bool) or value is None or isinstance(value, int | str) and not isinstance(value, enum.Enum):
        return value
    if isinstance(value, float):
        return format_duration(value)
    if isinstance(value, signal.Signals):
        return value.name
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {k: _json(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [f"{v[0]}:{v[1]}" if isinstance(v, tuple) else _json(v) for v in value]
    return str(value)


def effective(config: Config, section: str) -> dict[str, Any]:
    """The effective value of each key of ``section`` (one entry per settings field; the token is described,
    never shown). Keys that apply only with another setting (``only_with``) are left out unless it holds."""
    settings = getattr(config, section)
    out: dict[str, Any] = {}
    for key in KEYS:
        if key.section != section or key.attr in out or settings is None:
            continue
        if key.only_with is not None and not key.only_with.holds(settings):
            continue
        value = getattr(settings, key.attr)
        out[key.attr] = key.word if key.word and getattr(settings, key.model_fields[1]) else _json(value)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    text = render_markdown()
    if args == ["--check"]:
        if not DOC_PATH.exists() or DOC_PATH.read_text() != text:
            print(f"{DOC_PATH} is stale: run `python -m sidecar.config.docs`", file=sys.stderr)
            return 1
        return 0
    if args:
        print("usage: python -m sidecar.config.docs [--check]", file=sys.stderr)
        return 2
    DOC_PATH.write_text(text)
    print(f"wrote {DOC_PATH}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
