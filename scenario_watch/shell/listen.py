"""`[http] listen` addresses: HOST:PORT parsed, and whether a host is this machine only."""

from __future__ import annotations

import ipaddress


def split_listen(value: str) -> tuple[str, int]:
    """HOST:PORT (or [V6]:PORT) as (host, port); ValueError saying what is wrong."""
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError("write an IPv6 address in brackets, e.g. [::1]:8765")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:8765 (or 0.0.0.0:8765 with a token)")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Whether a listen host is this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: whatever it resolves to, it is not known to be loopback
