"""What a service name, a service ID, a meta key, a DNS name and a host name may hold, and the default service ID."""

from __future__ import annotations

import hashlib
import re

# \Z, not $: "$" also matches before a trailing newline, which a ${VAR} read from a file often has.
SERVICE_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_-]{0,62}\Z")
SERVICE_ID = re.compile(r"\A[A-Za-z0-9._:@-]{1,256}\Z")
DNS_LABEL = re.compile(r"\A[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\Z")
META_KEY = re.compile(r"\A[A-Za-z0-9_-]{1,128}\Z")
HOST_NAME = re.compile(
    r"\A(?=.{1,253}\Z)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})(?:\.[A-Za-z0-9_][A-Za-z0-9_-]{0,62})*\.?\Z"
)
_ID_PART = re.compile(r"\A[A-Za-z0-9._:-]{1,64}\Z")


def default_service_id(name: str, hostname: str, address: str, port: int) -> str:
    """``<name>-<hostname>-<address>-<port>``: two sidecars on one host that differ only in
    their address (one loopback alias or interface each) must not share an ID.

    A part that is long or holds characters an ID may not (an IPv6 zone's ``%``) is
    shortened and given a digest of the original, so the ID stays valid and unique.
    """

    def part(text: str) -> str:
        if _ID_PART.match(text):
            return text
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        return re.sub(r"[^A-Za-z0-9._:-]", "_", text)[:40] + "-" + digest

    return f"{name}-{part(hostname)}-{part(address)}-{port}"


OWNER_META_KEY = "consul_sidecar_owner"
"""The reserved meta key that marks an entry as one sidecar process's own (a random token per process):
the keeper and the drain tell their own entry from another's with the same ID by it."""
