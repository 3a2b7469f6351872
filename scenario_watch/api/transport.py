"""HTTP over urllib3: pooled keep-alive connections, one retry policy, proxies from the environment.

urllib3 rather than requests (which is built on it): a request through requests cost about twice the
CPU (0.45 against 0.26 ms for one GET on loopback), and the HTTP client was half of the daemon's CPU.
What requests added that the daemon uses is here: proxies from `HTTPS_PROXY`/`HTTP_PROXY`/`ALL_PROXY`
(with their `user:password@`) and `NO_PROXY` (host names and domains), a CA bundle or folder from
`REQUESTS_CA_BUNDLE`/`CURL_CA_BUNDLE` (else the system's store, which `SSL_CERT_FILE` and `SSL_CERT_DIR`
choose), and a listener told of every request's outcome (the metrics count them). The API is not
followed through redirects (it has no reason to send one: a 3xx is an error answer); the CDN is.
"""

from __future__ import annotations

import os
import threading
import urllib.request
from collections.abc import Callable, Mapping
from urllib.parse import unquote, urlsplit

import urllib3
from urllib3.exceptions import ConnectTimeoutError, MaxRetryError, NewConnectionError

from scenario_watch.api.retries import RetryPolicy

# Told of each request's outcome: (method, absolute URL, final status, or None when nothing answered).
ResponseListener = Callable[[str, str, int | None], None]
POOL_SIZE = 64  # connections kept per host: more than the workers that may call at once


class Transport:
    """Requests to any host, each through the pool for its proxy (or none)."""

    def __init__(
        self, retry: RetryPolicy, timeout: float, headers: Mapping[str, str], *, redirects: bool
    ) -> None:
        self.retry = retry
        self.timeout = urllib3.Timeout(connect=min(5.0, timeout), read=timeout)
        self.headers = dict(headers)
        self.redirects = redirects
        self.listener: ResponseListener | None = None
        # Read once: the environment does not change under a running daemon.
        self._proxies = urllib.request.getproxies()
        self._ca = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or None
        self._proxy_of: dict[tuple[str, str], str | None] = {}  # (scheme, host) -> its proxy
        self._pools: dict[str | None, urllib3.PoolManager] = {}
        self._lock = threading.Lock()  # workers ask for pools at once: one pool per proxy, made once

    def request(
        self,
        method: str,
        url: str,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        stream: bool = False,
    ) -> urllib3.BaseHTTPResponse:
        """One request with the retry policy; urllib3's HTTPError when no answer came (never a status).

        With `stream`, the body is left to read (`stream()`), and the caller releases the connection.
        """
        try:
            resp = self._pool(url).request(
                method,
                url,
                body=body,
                headers={**self.headers, **(headers or {})},
                retries=self.retry,
                redirect=self.redirects,
                timeout=self.timeout,
                preload_content=not stream,
            )
        except urllib3.exceptions.HTTPError:
            if self.listener is not None:
                self.listener(method, url, None)
            raise
        if self.listener is not None:
            self.listener(method, url, resp.status)
        return resp

    def close(self) -> None:
        """Close every pooled connection."""
        with self._lock:
            for pool in self._pools.values():
                pool.clear()
            self._pools.clear()

    def _pool(self, url: str) -> urllib3.PoolManager:
        parts = urlsplit(url)
        key = (parts.scheme, parts.hostname or "")
        with self._lock:
            if key not in self._proxy_of:
                bypass = urllib.request.proxy_bypass(key[1])  # NO_PROXY
                proxy = self._proxies.get(key[0]) or self._proxies.get("all")
                self._proxy_of[key] = None if bypass else proxy
            proxy = self._proxy_of[key]
            pool = self._pools.get(proxy)
            if pool is None:
                pool = self._pools[proxy] = _pool_for(proxy, self._ca)
            return pool


def _pool_for(proxy: str | None, ca: str | None) -> urllib3.PoolManager:
    """A pool manager, through `proxy` when one is set (its `user:password@` as Proxy-Authorization),
    trusting the CA bundle file or folder `ca` (else the system's store)."""
    folder = ca is not None and os.path.isdir(ca)
    ca_certs, ca_cert_dir = (None, ca) if folder else (ca, None)
    if not proxy:
        return urllib3.PoolManager(maxsize=POOL_SIZE, ca_certs=ca_certs, ca_cert_dir=ca_cert_dir)
    parts = urlsplit(proxy)
    headers = None
    if parts.username is not None:  # ProxyManager sends no credentials of the URL's own
        login = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        headers = urllib3.make_headers(proxy_basic_auth=login)
        proxy = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
    return urllib3.ProxyManager(
        proxy, proxy_headers=headers, maxsize=POOL_SIZE, ca_certs=ca_certs, ca_cert_dir=ca_cert_dir
    )


def never_sent(exc: urllib3.exceptions.HTTPError) -> bool:
    """True when the request certainly never reached the server (refused, unresolved, connect timeout)."""
    reason = exc.reason if isinstance(exc, MaxRetryError) else exc
    return isinstance(reason, NewConnectionError | ConnectTimeoutError)


__all__ = ["ResponseListener", "Transport", "never_sent"]
