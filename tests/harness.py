"""Moved: the process harness is the ``testkit`` package at the top of the repository (``from testkit import ...``).

This module only re-exports it, so that tests written before the move still import; new tests import testkit.
"""

from testkit import *  # noqa: F403  # a re-export of the whole public API is this module's only purpose
from testkit import __all__ as __all__
from testkit.procs import _started as _started
