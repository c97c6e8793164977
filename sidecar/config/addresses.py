"""Addresses: the agent's (``http``, ``https``, ``unix``), listen addresses, URLs, this host's own address."""

from __future__ import annotations

import ipaddress
import re
import socket
import urllib.parse

from .names import HOST_NAME

DEFAULT_CONSUL_ADDRESS = "127.0.0.1:8500"  # the consul CLI's: the scheme comes from CONSUL_HTTP_SSL
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def parse_consul_address(text: str, default_scheme: str = "http") -> tuple[str, str, int]:
    """ "http://h:p", "https://h:p", "h:p", "h" or "unix:///path" -> (scheme, host, port); for
    ``unix`` the host is the socket's path and the port 0. ValueError if malformed.

    ``default_scheme`` is used when the text has none ("https" with CONSUL_HTTP_SSL=true, as the consul CLI does).
    """
    t = text.strip()
    if t.startswith("unix://"):
        path = t[len("unix://") :]
        if not path or _CONTROL.search(path):
            raise ValueError(f'{text!r}: give the socket\'s path, like "unix:///var/run/consul/http.sock"')
        return "unix", path, 0
    if "://" not in t:
        t = f"{default_scheme}://{t}"
    try:
        u = urllib.parse.urlsplit(t)
    except ValueError:
        raise ValueError(f'{text!r} is not a URL like "http://127.0.0.1:8500"') from None
    if u.scheme not in ("http", "https"):
        raise ValueError(f"{text!r}: scheme must be http, https or unix")
    if u.path not in ("", "/") or u.query or u.fragment or u.username or u.password:
        raise ValueError(f"{text!r}: give only scheme, host and port")
    try:
        port = u.port
    except ValueError:
        raise ValueError(f"{text!r}: port is not in 1..65535") from None
    if not u.hostname:
        raise ValueError(f"{text!r}: no host")
    return u.scheme, u.hostname, port or (8501 if u.scheme == "https" else 8500)


def parse_listen(text: str) -> tuple[str, int]:
    """ "host:port" or "[v6]:port" -> (host, port). ValueError if malformed."""
    try:
        u = urllib.parse.urlsplit("//" + text.strip())
    except ValueError:
        raise ValueError(f'{text!r} is not "host:port"') from None
    try:
        port = u.port
    except ValueError:
        raise ValueError(f"{text!r}: port is not in 0..65535") from None
    if port is None or not u.hostname:
        raise ValueError(f'{text!r} is not "host:port"')
    return u.hostname, port


def server_name(text: str) -> str:
    """CONSUL_TLS_SERVER_NAME as the consul CLI reads it: a port, if any, is dropped."""
    t = text.strip()
    if t.rfind(":") > t.rfind("]"):  # a port (Go's hasPort test)
        t = t[: t.rfind(":")]
    return t.removeprefix("[").removesuffix("]")


def address_toward(host: str, port: int) -> str:
    """This host's IP on the interface that routes to (host, port); no packet is sent.

    Raises OSError when there is no route (or the agent's name does not resolve).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        infos = socket.getaddrinfo(host, port, family, socket.SOCK_DGRAM)
    except UnicodeError as e:  # a label IDNA cannot encode (longer than 63): a name that cannot resolve
        raise OSError(f"{host[:80]!r} is not a resolvable host name: {e}") from None
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect(infos[0][4])
        return str(s.getsockname()[0])


def same_host(a: str, b: str) -> bool:
    """Whether two addresses name the same host (IPs compared as addresses: ::1 == 0:0::1)."""
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return a.lower() == b.lower()


def valid_address(address: str) -> bool:
    """An IP address or a host name (what service.address may be)."""
    try:
        ipaddress.ip_address(address)
        return True
    except ValueError:
        return bool(HOST_NAME.match(address))


def url_problem(url: str) -> str | None:
    """Why ``url`` is not a usable http(s) URL, or None."""
    if any(c.isspace() or _CONTROL.match(c) for c in url):
        return f"{url!r} contains whitespace or a control character"
    try:
        u = urllib.parse.urlsplit(url)
        u.port  # noqa: B018 - raises ValueError for a port outside 0..65535
    except ValueError as e:
        return f"{url!r} is not a valid URL ({e})"
    if u.scheme not in ("http", "https") or not u.hostname:
        return f"{url!r} is not an http:// or https:// URL"
    return None
