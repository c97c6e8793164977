"""The command's entry point (sidecar/__main__.py): a Ctrl-C is exit 130, never a traceback."""

from __future__ import annotations

import sys

import pytest

from sidecar import __main__ as main_module
from sidecar.exit_codes import EX_INTERRUPTED
from sidecar.process import early_signals


def test_ctrl_c_while_the_early_handlers_are_installed_is_exit_130(monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGINT that lands while hold() installs its handlers (signal.signal runs Python code after each
    one: seen beside load, a traceback out of enum's __new__) ends the sidecar with 130 like any early
    Ctrl-C. Red when hold() is called outside entry's try (KeyboardInterrupt escapes)."""

    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(sys, "argv", ["consul-sidecar", "run", "-c", "/nonexistent.toml"])
    monkeypatch.setattr(early_signals, "hold", interrupted)
    assert main_module.entry() == EX_INTERRUPTED
