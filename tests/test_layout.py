"""The file list is the architecture: the package's rooms, their floors, and the imports between them.

Pure reading of the source (no agent, no process): every import of one of our modules, at any depth
of a function and under ``TYPE_CHECKING`` too, is an arrow. Arrows go down the floors or stay in a
room; no module reaches a room above its own, and no chain of imports comes back to where it began.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "sidecar"

# Top to bottom, as the program runs. A room is a sub-package or a top-level module.
FLOORS: list[set[str]] = [
    {"__main__", "cli"},
    {"wiring"},
    {"lifecycle"},
    {"hot_restart"},
    {"http"},
    {"process"},
    {"drain"},
    {"registry"},
    {"config"},
    # leaves: they import nothing of ours but each other's leaves below
    {"log"},
    {"state", "redact", "clock", "durations", "exit_codes", "backoff", "executor", "__init__"},
]
FLOOR_OF = {room: i for i, rooms in enumerate(FLOORS) for room in rooms}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def room(module: str) -> str:
    return module.split(".")[0]


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """Our modules that ``module`` imports (relative or absolute), by their dotted names under sidecar."""
    is_package = path.name == "__init__.py"
    package = module.split(".") if is_package and module != "__init__" else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = ".".join([*base, *([node.module] if node.module else [])])
            elif node.module and (node.module == "sidecar" or node.module.startswith("sidecar.")):
                target = node.module.removeprefix("sidecar").lstrip(".")
            else:
                continue
            for alias in node.names:  # `from . import x` may name a module
                sub = f"{target}.{alias.name}" if target else alias.name
                targets.append(sub if sub in known else target)
        elif isinstance(node, ast.Import):
            targets = [a.name.removeprefix("sidecar.") for a in node.names if a.name.startswith("sidecar.")]
        for t in targets:
            found.add(t if t else "__init__")
    found.discard(module)
    return {t for t in found if t in known or t == "__init__"}


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: imports_of(m, p, known) for m, p in mods.items()}


def test_every_room_has_a_floor() -> None:
    """Every top-level module and sub-package of sidecar/ is placed on a floor (a new one must be placed)."""
    rooms = {room(m) for m in modules()}
    assert sorted(rooms - set(FLOOR_OF)) == []
    assert sorted(set(FLOOR_OF) - rooms) == []


def test_no_import_goes_up() -> None:
    """An import from a lower floor to a higher one is an arrow back up: it ties the rooms in a knot."""
    up = sorted(
        f"{m} -> {t}"
        for m, targets in graph().items()
        for t in targets
        if room(t) != room(m) and FLOOR_OF[room(t)] < FLOOR_OF[room(m)]
    )
    assert up == []


def test_no_import_circle() -> None:
    """No chain of imports between our modules comes back to where it began."""
    g = graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in sorted(g[m]):
            if t not in g:
                continue
            if state.get(t) == 1:
                cycles.append([*stack[stack.index(t) :], t])
            elif t not in state:
                visit(t, [*stack, t])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_state_imports_nothing_of_ours() -> None:
    """The record every room reads (state, DrainEnd) is a leaf: it cannot pull a room in with it."""
    assert graph()["state"] == set()


@pytest.mark.parametrize("leaf", sorted(FLOORS[-1] - {"__init__"}))
def test_leaves_import_no_room(leaf: str) -> None:
    assert {t for t in graph()[leaf] if FLOOR_OF[room(t)] < len(FLOORS) - 1} == set()


def test_the_checker_sees_an_arrow_up(tmp_path: Path) -> None:
    """The control: a module of a low floor that imports the lifecycle is seen by imports_of."""
    probe = tmp_path / "probe.py"
    probe.write_text("from __future__ import annotations\nfrom ..lifecycle import Sidecar\nfrom .. import cli\n")
    assert imports_of("drain.probe", probe, set(modules())) == {"lifecycle", "cli"}


def module_map() -> str:
    text = (ROOT / "docs" / "development.md").read_text()
    begin = text.index("```\n", text.index("Where things are:")) + 4
    return text[begin : text.index("\n```", begin)]


def listed_files(block: str) -> set[str]:
    """The files the module map names: an indented tree, a name (or several, 'clock.py, backoff.py') at the start
    of a line and its description after two spaces; lines indented to the description column continue it. The
    config room names its files in its description."""
    found: set[str] = set()
    stack: list[tuple[int, str]] = []
    for line in block.splitlines():
        indent = len(line) - len(line.lstrip(" "))
        if not line.strip() or indent >= DESCRIPTION_COLUMN:
            continue
        head = line.strip().split("  ")[0]
        while stack and stack[-1][0] >= indent:
            stack.pop()
        prefix = "".join(p for _, p in stack)
        if head.endswith("/"):
            stack.append((indent, head))
            continue
        found.update(prefix + name.strip() for name in head.split(","))
    return {f for f in found if f.startswith("sidecar/")}


DESCRIPTION_COLUMN = 32


def test_the_module_map_lists_every_module() -> None:
    """docs/development.md's map names every module of sidecar/ where it is, and no module that is gone."""
    actual = {str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
    listed = listed_files(module_map())
    config = {f for f in actual if f.startswith("sidecar/config/")}  # named in prose in the room's description
    named_in_config = {f for f in config if f.removeprefix("sidecar/config/") in module_map()}
    assert sorted(actual - listed - named_in_config) == []
    assert sorted(listed - actual) == []


def test_no_test_module_imports_another() -> None:
    """What tests share lives in testkit/ (fakes, fault proxy, ACL and TLS helpers, the fixtures' types):
    a test module that imports another runs that module's import-time code and ties the two together."""
    found = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] == "tests"):
                found.append(f"{path.name}: from {'.' * node.level}{node.module or ''} import ...")
            elif isinstance(node, ast.Import):
                found += [f"{path.name}: import {a.name}" for a in node.names if a.name.split(".")[0] == "tests"]
    assert found == []
