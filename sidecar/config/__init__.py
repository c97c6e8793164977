"""The configuration: parsed and validated once, at the edge, into frozen objects.

This package is the only code that reads the environment (``${VAR}`` interpolation and
Consul's own ``CONSUL_*`` variables). Everything downstream gets a ``Config``.

- keys.py: the table of every key (section, type, default, bounds, environment, doc)
- model.py: the frozen settings a ``Config`` is made of
- loader.py: ``load_config``, validation, every problem as one line naming the key
- interpolation.py, files.py, tokens.py, addresses.py, names.py: what the loader uses
- docs.py: docs/configuration.md and check-config's view, from the table
"""

from __future__ import annotations

from .addresses import address_toward, parse_consul_address, parse_listen, same_host
from .files import CONFIG_MAX_BYTES, TOKEN_MAX_BYTES
from .keys import KEYS, SECTIONS, EtcdFormat, Key, Kind, ReadyMode, RegistryKind, Strategy, parse_signal
from .loader import load_config, load_consul_settings, load_etcd_settings
from .model import (
    KILL_REAP_TIMEOUT,
    AppSettings,
    CheckSettings,
    Config,
    ConfigError,
    ConsulSettings,
    EtcdSettings,
    HotRestartSettings,
    RegistrySettings,
    ServiceSettings,
    ShutdownSettings,
    StartupSettings,
    StatusSettings,
)
from .names import default_service_id
from .tokens import TokenError, TokenSource

_SECTIONS = SECTIONS  # the name tests/test_config_fuzz.py has always imported

__all__ = [
    "CONFIG_MAX_BYTES",
    "KEYS",
    "KILL_REAP_TIMEOUT",
    "SECTIONS",
    "TOKEN_MAX_BYTES",
    "_SECTIONS",
    "AppSettings",
    "CheckSettings",
    "Config",
    "ConfigError",
    "ConsulSettings",
    "EtcdFormat",
    "EtcdSettings",
    "RegistryKind",
    "RegistrySettings",
    "HotRestartSettings",
    "Key",
    "Kind",
    "ServiceSettings",
    "ShutdownSettings",
    "StartupSettings",
    "StatusSettings",
    "ReadyMode",
    "Strategy",
    "TokenError",
    "TokenSource",
    "address_toward",
    "default_service_id",
    "load_config",
    "load_consul_settings",
    "load_etcd_settings",
    "parse_consul_address",
    "parse_listen",
    "parse_signal",
    "same_host",
]
