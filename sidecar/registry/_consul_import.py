"""Load python-consul2's ``consul.base`` without its package ``__init__``.

``consul/__init__.py`` imports the library's requests-based client, which the
sidecar never uses and which costs about 6 MB of resident memory (requests,
urllib3, charset_normalizer, idna): 15 % of our 40 MB budget. ``consul.base``
holds everything we use (the endpoint classes, callbacks and exceptions) and
imports only the standard library and six.

The file is executed under a name of ours, ``sidecar._consul_base``: nothing is
put under ``consul`` in ``sys.modules``, so code elsewhere in the process that
imports ``consul`` later gets the whole package, as if we were not there. If
``consul.base`` was imported before us, that module is used as it is.
tests/test_consul_contract.py checks what we rely on in it.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from types import ModuleType
from typing import Any

PRIVATE_NAME = "sidecar._consul_base"


def _load() -> ModuleType:
    if "consul.base" in sys.modules:
        return sys.modules["consul.base"]
    if PRIVATE_NAME in sys.modules:
        return sys.modules[PRIVATE_NAME]
    package = importlib.util.find_spec("consul")  # finds the package, does not execute it
    found = (
        importlib.machinery.PathFinder.find_spec("base", list(package.submodule_search_locations))
        if package is not None and package.submodule_search_locations
        else None
    )
    if found is None or found.origin is None:
        raise ImportError("python-consul2 is not installed (pip install python-consul2)")
    spec = importlib.util.spec_from_file_location(PRIVATE_NAME, found.origin)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[PRIVATE_NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[PRIVATE_NAME]
        raise
    return module


consul_base: Any = _load()
