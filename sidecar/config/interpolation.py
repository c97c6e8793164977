"""``${VAR}``, ``${VAR:-default}`` and ``$$`` in configuration strings.

The one place values come from the environment.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def interpolate(value: str, env: Mapping[str, str], unset: Callable[[str], None]) -> str:
    """``value`` with its variables replaced.

    ``unset(name)`` is called for each variable that is unset and has no default.
    """

    def repl(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        found = env.get(name)
        if found is not None and (found != "" or default is None):
            return found
        if default is not None:
            return default
        unset(name)
        return ""

    return _VAR.sub(repl, value)


def variables(value: str) -> Iterator[str]:
    """The names of the variables ``value`` uses (not ``$$``)."""
    return (m.group(1) for m in _VAR.finditer(value) if m.group(1))
