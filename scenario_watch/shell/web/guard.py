"""What keeps the listener from being a way in: the token, the Host check, headers, and scrubbed answers."""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Iterable, Mapping
from http.cookies import CookieError, SimpleCookie
from pathlib import Path
from typing import Any

from scenario_watch.logs import MASK, Redactor
from scenario_watch.shell.listen import is_loopback

COOKIE = "sw_session"
# Every answer carries these: no script but our own files, no framing, no sniffing, no referrer.
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; img-src 'self' data:; style-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
}
# What a person wrote: a "/" there is theirs, not a path of this host (folders and secrets still go).
VERBATIM = frozenset({"prompt"})
# An absolute path left in a message (a path the folder labels did not cover): only its last name stays.
_ABSOLUTE = re.compile(r"(?<![\w.:/~-])/(?:[^\s/'\"]+/)+([^\s/'\"]*)")


class Gate:
    """Who may read: anyone on loopback without a token; otherwise the token (bearer or login cookie)."""

    def __init__(self, token: str | None) -> None:
        self.token = token.encode() if token else None
        # The cookie holds a value derived from the token, not the token itself.
        self.session = (
            hmac.new(self.token, b"scenario-watch session", hashlib.sha256).hexdigest()
            if self.token
            else None
        )

    def allows(self, authorization: str | None, cookies: str | None) -> bool:
        """Whether a request with these headers may read anything (compared in constant time)."""
        if self.token is None or self.session is None:
            return True
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.token):
            return True
        cookie = _cookie(cookies)
        return cookie is not None and hmac.compare_digest(cookie.encode(), self.session.encode())

    def login(self, given: str) -> str | None:
        """The Set-Cookie value for a right token (HttpOnly, SameSite=Strict); None for a wrong one."""
        if self.token is None or self.session is None:
            return None
        if not hmac.compare_digest(given.encode(), self.token):
            return None
        return f"{COOKIE}={self.session}; HttpOnly; SameSite=Strict; Path=/"

    def host_allowed(self, host_header: str | None) -> bool:
        """Without a token only loopback names are answered: a web page cannot rebind its DNS to us."""
        if self.token is not None or not host_header:
            return True
        host = host_header.strip()
        if host.startswith("["):
            host = host[1 : host.find("]")] if "]" in host else host
        else:
            host = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
        return is_loopback(host)


def _cookie(raw: str | None) -> str | None:
    if not raw:
        return None
    try:
        jar: SimpleCookie = SimpleCookie(raw)
    except CookieError:
        return None
    morsel = jar.get(COOKIE)
    return morsel.value if morsel is not None else None


class Scrubber:
    """Takes the host's folder paths and any secret out of what the listener answers."""

    def __init__(self, folders: Mapping[str, Path], api: Iterable[str], token: str | None = None) -> None:
        # Longest path first, so a preset folder inside the inbox is named as the preset's.
        pairs = [(os.path.normpath(path), label) for label, path in folders.items()]
        self.folders = sorted(pairs, key=lambda pair: -len(pair[0]))
        self.secrets = Redactor(api)  # the key and secret (and their Basic-auth form)
        self.token = token

    def text(self, value: str, *, any_path: bool = True) -> str:
        """One string, with folders named by their label (`outbox/x_1.png`) and secrets masked;
        `any_path`: any other absolute path cut to its last name too."""
        for path, label in self.folders:
            value = value.replace(path + "/", label + "/").replace(path, label)
        if any_path:
            value = _ABSOLUTE.sub(lambda m: m.group(1) or "/", value)
        value = str(self.secrets.mask(value))
        return value.replace(self.token, MASK) if self.token else value

    def value(self, value: Any, key: str = "") -> Any:
        """A JSON-like value with every string in it scrubbed (a prompt's own text keeps its slashes)."""
        if isinstance(value, str):
            return self.text(value, any_path=key not in VERBATIM)
        if isinstance(value, dict):
            return {k: self.value(v, str(k)) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.value(v, key) for v in value]
        return value
