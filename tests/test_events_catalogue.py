"""docs/events.md's event catalogue and the events the code logs cannot drift apart (issue 12).

The code's events are found statically in sidecar/'s source: every string literal of the form
``sidecar.<area>.<what>`` (or ``sidecar.<what>``) that is not the name of one of sidecar's modules.
Scanning every literal, not only the first argument of ``log.info(...)``, also finds the names handed
through a helper (``StatusServer._problem(cause, "sidecar.status.accept_failed", ...)``), chosen
between levels (``(log.error if x else log.info)("...")``) or written into an event dict
(log.py's ``{"event": "sidecar.log.dropped"}``). A name computed at run time (an f-string or a
concatenation starting with ``sidecar.``) cannot be checked this way: it fails the test, naming its
place, rather than passing unseen.
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "sidecar"
EVENTS = ROOT / "docs" / "events.md"
NAME = re.compile(r"sidecar(\.[a-z][a-z0-9_]*)+")
ROW = re.compile(r"^\|\s*`(sidecar\.[^`]*)`\s*\|")


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def logged_events() -> tuple[dict[str, list[str]], list[str]]:
    """(event name -> the places it appears in sidecar/, places where a name is computed)."""
    found: dict[str, list[str]] = {}
    computed: list[str] = []
    for path in sorted(SOURCE.rglob("*.py")):
        where = path.relative_to(ROOT)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and NAME.fullmatch(node.value):
                if not _is_module(node.value):
                    found.setdefault(node.value, []).append(f"{where}:{node.lineno}")
            elif isinstance(node, ast.JoinedStr):
                head = node.values[0] if node.values else None
                if isinstance(head, ast.Constant) and str(head.value).startswith("sidecar."):
                    computed.append(f"{where}:{node.lineno} (an f-string)")
            elif isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mod)):
                left = node.left
                if isinstance(left, ast.Constant) and isinstance(left.value, str) and left.value.startswith("sidecar."):
                    computed.append(f"{where}:{node.lineno} (a concatenation)")
    return found, computed


def catalogued_events() -> list[str]:
    """The names in the first column of the tables under '## Event catalogue', in order (repeats kept)."""
    text = EVENTS.read_text(encoding="utf-8")
    start = text.index("\n## Event catalogue\n")
    end = text.find("\n## ", start + 1)
    section = text[start : end if end != -1 else len(text)]
    return [m.group(1) for line in section.splitlines() if (m := ROW.match(line))]


def test_the_scan_sees_events_and_module_names_apart() -> None:
    """Control: the scan finds events logged in each of its ways (a direct call, a helper's argument,
    an event dict) and does not take module names (sidecar.registry.consul) for events."""
    found, _ = logged_events()
    assert {"sidecar.consul.registered", "sidecar.status.accept_failed", "sidecar.log.dropped"} <= set(found)
    assert "sidecar.registry.consul" not in found and "sidecar.config" not in found
    assert len(catalogued_events()) > 40


def test_no_event_name_is_computed() -> None:
    """No event name is built at run time: the catalogue could not be checked against it."""
    _, computed = logged_events()
    assert computed == [], (
        f"event names built at run time cannot be checked against docs/events.md; log literal names instead: {computed}"
    )


def test_every_logged_event_is_catalogued_and_every_catalogued_one_is_logged() -> None:
    """The set of names the code logs equals the set docs/events.md's catalogue lists."""
    found, _ = logged_events()
    listed = set(catalogued_events())
    missing_in_doc = sorted(set(found) - listed)
    never_logged = sorted(listed - set(found))
    problems = []
    if missing_in_doc:
        problems.append(
            "logged in sidecar/ but missing from docs/events.md's '## Event catalogue': "
            + ", ".join(f"{n} ({found[n][0]})" for n in missing_in_doc)
        )
    if never_logged:
        problems.append(
            "listed in docs/events.md's '## Event catalogue' but logged nowhere in sidecar/: " + ", ".join(never_logged)
        )
    assert not problems, "\n".join(problems)


def test_each_event_is_catalogued_once() -> None:
    """One row per name: an event means one situation, so it is described once."""
    twice = sorted(n for n, k in Counter(catalogued_events()).items() if k > 1)
    assert twice == [], f"listed more than once in docs/events.md's '## Event catalogue': {twice}"
