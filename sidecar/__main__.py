"""``python -m sidecar`` and the ``consul-sidecar`` command.

A Ctrl-C while Python is still importing (aiohttp, structlog: a few hundred milliseconds
before the sidecar has a signal handler of its own) raises KeyboardInterrupt wherever the
import happens to be. The user asked to stop, not for a traceback: exit 130 quietly, the
status a shell reports for SIGINT. Hence the import inside the function.
"""

import sys

from .exit_codes import EX_INTERRUPTED  # os and signal only: loaded before any Ctrl-C can matter


def entry() -> int:
    try:
        if sys.argv[1:2] == ["run"]:
            from .process.early_signals import hold

            # A reload signal before run's own handlers exist must not end the sidecar. Inside the try:
            # a Ctrl-C that lands while hold() installs its handlers (signal.signal runs Python code
            # after each one) is still Python's KeyboardInterrupt.
            hold()
        from .cli import main

        return main()
    except KeyboardInterrupt:
        return EX_INTERRUPTED


if __name__ == "__main__":
    sys.exit(entry())
