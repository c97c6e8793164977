"""Load python-consul2's ``consul.base`` without its package ``__init__``.

``consul/__init__.py`` imports the library's requests-based client, which the
sidecar never uses and which costs about 6 MB of resident memory (requests,
urllib3, charset_normalizer, idna): 15 % of our 40 MB budget. ``consul.base``
holds everything we use (the endpoint classes, callbacks and exceptions) and
imports only the standard library and six. If some other code already
imported ``consul`` normally, that module is used as it is.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType
from typing import Any


def _load() -> ModuleType:
    if "consul" not in sys.modules:
        spec = importlib.util.find_spec("consul")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("python-consul2 is not installed (pip install python-consul2)")
        package = importlib.util.module_from_spec(spec)  # created, deliberately not executed
        sys.modules["consul"] = package
    return importlib.import_module("consul.base")


consul_base: Any = _load()
