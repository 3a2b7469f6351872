"""The HTTP transport over real loopback: proxies from the environment, kinds of faults, the listener."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import KEY, SECRET

from scenario_watch.api.client import ScenarioClient
from scenario_watch.config import MODEL_ID
from scenario_watch.errors import TransientError
from scenario_watch.sandbox import Sandbox


class Proxy(BaseHTTPRequestHandler):
    """A forward proxy that answers itself: it records the absolute URL and headers it was asked for."""

    seen: list[tuple[str, str | None]]

    def do_GET(self) -> None:
        self.seen.append((self.path, self.headers.get("Proxy-Authorization")))
        if self.path.startswith("/moved/"):  # as a server of its own: a redirect elsewhere
            self.send_response(302)
            self.send_header("Location", self.path.removeprefix("/moved"))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = json.dumps({"job": {"jobId": "job_p", "status": "in-progress"}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet."""


@pytest.fixture
def proxy() -> Iterator[tuple[str, list[tuple[str, str | None]]]]:
    seen: list[tuple[str, str | None]] = []
    handler = type("Recording", (Proxy,), {"seen": seen})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()


def test_requests_go_through_the_environments_proxy_unless_no_proxy_names_the_host(
    sandbox: Sandbox, proxy: tuple[str, list[tuple[str, str | None]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, seen = proxy
    for name in ("http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", url)
    through = ScenarioClient(sandbox.base_url, KEY, SECRET, model_id=MODEL_ID, timeout=5.0, retries=0)
    assert through.get_job("job_p").job_id == "job_p"  # the proxy's answer: the sandbox never saw it
    [(path, proxy_auth)] = seen
    assert path == f"{sandbox.base_url}/jobs/job_p"  # absolute form: a request for the proxy to forward
    assert proxy_auth is None
    assert not [r for r in sandbox.requests if r.path == "/v1/jobs/job_p"]
    through.close()
    # ALL_PROXY when no proxy is set for the scheme; the URL's user and password go to the proxy.
    monkeypatch.delenv("HTTP_PROXY")
    monkeypatch.setenv("ALL_PROXY", url.replace("://", "://me:p%40ss@"))
    through = ScenarioClient(sandbox.base_url, KEY, SECRET, model_id=MODEL_ID, timeout=5.0, retries=0)
    assert through.get_job("job_p").job_id == "job_p"
    assert seen[1] == (f"{sandbox.base_url}/jobs/job_p", "Basic " + base64.b64encode(b"me:p@ss").decode())
    through.close()
    monkeypatch.delenv("ALL_PROXY")
    monkeypatch.setenv("HTTP_PROXY", url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    direct = ScenarioClient(sandbox.base_url, KEY, SECRET, model_id=MODEL_ID, timeout=5.0, retries=0)
    job, _ = direct.generate({"prompt": "x"})
    assert direct.get_job(job.job_id).job_id == job.job_id
    assert len(seen) == 2  # the proxy was not asked again
    direct.close()


def test_a_refused_connection_is_a_connection_fault_and_told_to_the_listener() -> None:
    with socket.socket() as probe:  # a port that was free a moment ago: nobody listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = ScenarioClient(f"http://127.0.0.1:{port}/v1", KEY, SECRET, model_id=MODEL_ID, retries=0)
    told: list[tuple[str, str, int | None]] = []
    client.on_response(lambda method, url, status: told.append((method, url, status)))
    with pytest.raises(TransientError, match="cannot connect") as info:
        client.get_job("job_x")
    assert info.value.kind == "connection"  # not a timeout, though urllib3 files it under one
    with pytest.raises(TransientError) as info:
        client.download(f"http://127.0.0.1:{port}/assets/a.png", io.BytesIO())
    assert info.value.kind == "connection"
    assert told == [
        ("GET", f"http://127.0.0.1:{port}/v1/jobs/job_x", None),
        ("GET", f"http://127.0.0.1:{port}/assets/a.png", None),
    ]
    client.close()


def test_the_api_is_not_followed_through_a_redirect(
    sandbox: Sandbox, proxy: tuple[str, list[tuple[str, str | None]]]
) -> None:
    """The API has no reason to redirect: a 3xx is an error answer, and the credentials go nowhere else."""
    url, seen = proxy
    client = ScenarioClient(f"{url}/moved/v1", KEY, SECRET, model_id=MODEL_ID, timeout=5.0, retries=0)
    with pytest.raises(TransientError, match="HTTP 302"):
        client.get_job("job_x")
    assert [path for path, _ in seen] == ["/moved/v1/jobs/job_x"]
    client.close()
