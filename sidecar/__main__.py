"""``python -m sidecar`` and the ``consul-sidecar`` command.

A Ctrl-C while Python is still importing (aiohttp, structlog: a few hundred milliseconds
before the sidecar has a signal handler of its own) raises KeyboardInterrupt wherever the
import happens to be. The user asked to stop, not for a traceback: exit 130 quietly, the
status a shell reports for SIGINT. Hence the import inside the function.
"""

import sys


def entry() -> int:
    try:
        from .cli import main

        return main()
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(entry())
