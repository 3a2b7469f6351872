"""The listener over real HTTP on loopback: routes, pictures by journal id only, the token, the headers."""

from __future__ import annotations

import base64
import io
import os
import socket
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_cli, wait_for
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from web_site import API_KEY, API_SECRET, Site

from scenario_watch.config import load_settings
from scenario_watch.errors import ConfigError
from scenario_watch.sections import HttpSettings
from scenario_watch.shell.web import Listener
from scenario_watch.shell.web.server import MAX_CONNECTIONS

TOKEN = "t0ken-for-the-web-tests-0123"
CSP = (
    "default-src 'self'; script-src 'self'; img-src 'self' data:; style-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    s = Site(tmp_path / "site")
    yield s
    s.close()


@pytest.fixture
def locked(tmp_path: Path) -> Iterator[Site]:
    s = Site(tmp_path / "site", http={"token": TOKEN})
    yield s
    s.close()


def test_status_json_is_the_status_object_without_host_paths_or_secrets(site: Site) -> None:
    site.run_daemon({"queue": "outbox not writable: No space left on device", "queued": 1})
    done = site.done("cat.json", "Paint the cat blue")
    inbox = site.folders.inbox
    site.failed(
        "dog.json",
        "references",
        f"referenceImages: {inbox}/dog.png and /home/alice/photos/dog.png not found, key {API_KEY}",
        f"put dog.png into {inbox}",
    )
    site.claimed("queued.json", "waits for the disk")
    answer = site.get("/status.json")
    assert answer.status == 200 and answer.headers["content-type"] == "application/json; charset=utf-8"
    report = answer.json()
    assert set(report) == {"daemon", "counts", "jobs", "budget", "recent", "presets"}
    assert report["counts"]["done"] == 1 and report["daemon"]["running"] is True
    [failed, ok] = report["recent"]
    assert (ok["id"], ok["outputs"], ok["references"], ok["prompt"]) == (done, 2, 1, "Paint the cat blue")
    assert failed["error"] == "referenceImages: inbox/dog.png and dog.png not found, key ********"
    assert failed["hint"] == "put dog.png into inbox"
    assert report["jobs"][0]["waiting_for"] == "outbox not writable: No space left on device"
    text = answer.body.decode()
    for secret in (API_KEY, API_SECRET, str(site.root), "/home/alice"):
        assert secret not in text
    for path in ("/", "/metrics", "/static/app.js", "/picture/1/1", "/nope"):
        body = site.get(path).body
        assert API_KEY.encode() not in body and str(site.root).encode() not in body, path


def test_pictures_and_thumbnails_by_journal_id(site: Site) -> None:
    prompt_id = site.running("cat.json", "Paint the cat blue", progress=0.4)
    outputs = site.finish(prompt_id, outputs=2)
    for n, data in enumerate(outputs, start=1):
        answer = site.get(f"/picture/{prompt_id}/{n}")
        assert (answer.status, answer.headers["content-type"], answer.body) == (200, "image/png", data)
    reference = site.get(f"/reference/{prompt_id}/1")
    assert reference.body == (site.folders.inbox / "cat-ref.png").read_bytes()
    thumb = site.get(f"/thumb/{prompt_id}/1")
    assert thumb.status == 200 and thumb.headers["content-type"] == "image/webp"
    with Image.open(io.BytesIO(thumb.body)) as image:
        assert image.format == "WEBP" and max(image.size) <= 256 and image.size == (256, 192)
    [cached] = list((site.folders.state / "thumbs").iterdir())
    made = cached.stat().st_mtime_ns
    assert site.get(f"/thumb/{prompt_id}/1").body == thumb.body
    assert cached.stat().st_mtime_ns == made  # made once, then read from the cache
    assert site.get(f"/reference-thumb/{prompt_id}/1").status == 200
    assert site.get(f"/picture/{prompt_id}/1", method="HEAD").body == b""


def test_unknown_ids_and_numbers_are_404(site: Site) -> None:
    prompt_id = site.done("cat.json", "x", outputs=1)
    for path in (f"/picture/{prompt_id}/2", f"/picture/{prompt_id}/0", "/picture/999/1", "/thumb/999/1"):
        assert site.get(path).status == 404, path
    assert site.get(f"/reference/{prompt_id}/2").status == 404
    assert site.get("/picture/99999999999999999999/1").status == 404  # no route: not even parsed


@pytest.mark.parametrize(
    "path",
    [
        "/picture/../../etc/passwd",
        "/picture/%2e%2e/%2e%2e/etc/passwd",
        "/picture/1/..%2f..%2f..%2fetc%2fpasswd",
        "/picture/1%2f1",
        "/picture/1/1/../../../../etc/passwd",
        "/static/../server.py",
        "/static/..%2fserver.py",
        "/static/%2e%2e/pictures.py",
        "//etc/passwd",
        "/reference/1/1%00.png",
        "/thumb/-1/1",
    ],
)
def test_a_path_from_the_request_is_never_a_path_on_disk(site: Site, path: str) -> None:
    site.done("cat.json", "x", outputs=1)
    answer = site.get(path)
    assert answer.status == 404
    assert b"root:" not in answer.body and b"import" not in answer.body


def test_a_journal_naming_a_file_outside_the_folders_is_refused(site: Site) -> None:
    prompt_id = site.running("cat.json", "x")
    site.store.downloading(prompt_id, ["a"], 1.0)
    site.store.done(prompt_id, ["../../../../../../etc/passwd.png", "/etc/hostname.png"])
    assert site.get(f"/picture/{prompt_id}/1").status == 403
    assert site.get(f"/picture/{prompt_id}/2").status == 403
    assert site.get(f"/thumb/{prompt_id}/1").status == 403


def test_a_symlink_in_place_of_an_output_is_refused(site: Site, tmp_path: Path) -> None:
    prompt_id = site.done("cat.json", "x", outputs=2)
    secret = tmp_path / "secret.png"
    secret.write_bytes((site.folders.outbox / "cat_1.png").read_bytes())  # a real image elsewhere
    (site.folders.outbox / "cat_1.png").unlink()
    (site.folders.outbox / "cat_1.png").symlink_to(secret)
    for path in (f"/picture/{prompt_id}/1", f"/thumb/{prompt_id}/1"):
        answer = site.get(path)
        assert answer.status == 403 and answer.body.startswith(b"403"), path
    # A folder on the way swapped for a link is refused as well (not only the last name).
    sub = site.done("sub/dog.json", "y", outputs=1)
    elsewhere = tmp_path / "elsewhere"
    (site.folders.outbox / "sub").rename(elsewhere)
    (site.folders.outbox / "sub").symlink_to(elsewhere)
    assert site.get(f"/picture/{sub}/1").status == 403
    # A FIFO is refused at once, never opened for reading (which would block).
    (site.folders.outbox / "cat_2.png").unlink()
    os.mkfifo(site.folders.outbox / "cat_2.png")
    assert site.get(f"/picture/{prompt_id}/2").status == 403


def test_a_file_that_is_not_an_image_or_is_a_bomb_is_refused(site: Site) -> None:
    prompt_id = site.done("cat.json", "x", outputs=2)
    (site.folders.outbox / "cat_1.png").write_text("<script>alert(1)</script>")
    assert site.get(f"/picture/{prompt_id}/1").status == 403  # judged by its bytes, not its name
    # 40,000 x 40,000 pixels in a few hundred bytes: refused before anything is decoded.
    (site.folders.outbox / "cat_2.png").write_bytes(_png_header(40_000, 40_000))
    assert site.get(f"/thumb/{prompt_id}/2").status == 403
    assert not (site.folders.state / "thumbs").exists() or not list((site.folders.state / "thumbs").iterdir())


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000))


def test_a_preset_image_is_its_own_reference_once_filed(tmp_path: Path) -> None:
    site = Site(tmp_path / "site", presets={"recolor": tmp_path / "site" / "inbox" / "recolor"})
    try:
        folder = site.presets["recolor"]
        claimed = folder / ".processing" / "1" / "car.png"
        prompt_id = site.store.add("recolor/car.png", claimed, "recolor")
        site.store.set_references(prompt_id, [{"file": ".processing/1/car.png", "sha256": "0" * 64}])
        data = site.image(claimed, "car")
        assert site.get(f"/reference/{prompt_id}/1").body == data  # not filed yet: where it was claimed
        site.store.failed(prompt_id, "submit", "refused", None)
        filed = site.folders.failed / "recolor" / "car.png"
        filed.parent.mkdir(parents=True)
        claimed.rename(filed)
        site.store.filed(prompt_id, filed)
        assert site.get(f"/reference/{prompt_id}/1").body == data
    finally:
        site.close()


def test_every_answer_has_the_security_headers(site: Site, locked: Site) -> None:
    site.done("cat.json", "x", outputs=1)
    answers = [
        site.get(p) for p in ("/", "/static/app.js", "/status.json", "/metrics", "/nope", "/thumb/1/1")
    ]
    answers += [site.get("/", method="POST"), locked.get("/status.json"), locked.get("/login?token=no")]
    for answer in answers:
        assert answer.headers["content-security-policy"] == CSP
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["x-frame-options"] == "DENY"
        assert answer.headers["referrer-policy"] == "no-referrer"
        assert "Python" not in answer.headers["server"]
    assert site.get("/", method="POST").status == 405  # read-only
    page = site.get("/").body.decode()
    assert "<script src=" in page and "<script>" not in page and " on" not in page.split("<body>")[1]
    assert "<style" not in page and "style=" not in page


def test_metrics_route_is_the_text_format(site: Site) -> None:
    site.done("cat.json", "x")
    site.metrics.prompt_taken()
    answer = site.get("/metrics")
    assert answer.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    families = {f.name: f for f in text_string_to_metric_families(answer.body.decode())}
    assert families["scenario_watch_prompts_taken"].samples[0].value == 1
    assert families["scenario_watch_jobs_in_flight"].samples[0].value == 0


def test_a_token_guards_everything_but_the_login(locked: Site) -> None:
    prompt_id = locked.done("cat.json", "x", outputs=1)
    paths = (
        "/",
        "/status.json",
        "/metrics",
        "/static/app.js",
        f"/picture/{prompt_id}/1",
        f"/thumb/{prompt_id}/1",
    )
    for path in paths:
        assert locked.get(path).status == 401, path
        assert locked.get(path, {"Authorization": "Bearer wrong-token-wrong-token"}).status == 401
        assert locked.get(path, {"Authorization": f"Bearer {TOKEN}"}).status == 200, path
    assert locked.get("/status.json").headers["www-authenticate"].startswith("Bearer")
    assert locked.get(f"/login?token={TOKEN[:-1]}").status == 401
    login = locked.get(f"/login?token={TOKEN}")
    assert login.status == 303 and login.headers["location"] == "/"
    cookie = login.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
    session = cookie.split(";")[0]
    assert locked.get("/status.json", {"Cookie": session}).status == 200
    assert locked.get("/status.json", {"Cookie": session[:-1] + "0"}).status == 401
    assert TOKEN.encode() not in locked.get("/status.json", {"Cookie": session}).body


def test_without_a_token_only_loopback_host_names_are_answered(site: Site) -> None:
    # A web page whose DNS name is rebound to 127.0.0.1 sends its own name as Host: it gets nothing.
    assert site.get("/status.json", {"Host": "evil.example:80"}).status == 421
    assert site.get("/status.json", {"Host": f"localhost:{site.listener.port}"}).status == 200
    assert site.get("/status.json", {"Host": "[::1]:1"}).status == 200


def test_a_non_loopback_address_needs_a_token(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[http]\nlisten = "0.0.0.0:8765"\n')
    with pytest.raises(ConfigError, match="not a loopback address: set \\[http\\] token"):
        load_settings(config, env={"HOME": str(tmp_path)})
    result = run_cli("config", "-c", str(config))  # any command that reads the settings: exit 2
    assert result.returncode == 2 and "not a loopback address" in result.stderr
    config.write_text('[http]\nlisten = "0.0.0.0:8765"\ntoken = "short"\n')
    with pytest.raises(ConfigError, match="at least 16 characters"):
        load_settings(config, env={"HOME": str(tmp_path)})
    for bad in ("8765", "localhost", "::1:8765", "host:99999"):
        config.write_text(f'[http]\nlisten = "{bad}"\n')
        with pytest.raises(ConfigError, match=r"http\.listen"):
            load_settings(config, env={"HOME": str(tmp_path)})
    # The listener checks again (settings built without load_settings must not slip through).
    unchecked = HttpSettings.model_construct(listen="0.0.0.0:0", token=None)
    with pytest.raises(ConfigError, match="not a loopback address"):
        Listener(unchecked, dict, None, None, None)  # type: ignore[arg-type]


def test_a_flood_of_idle_connections_costs_no_more_than_the_limit(site: Site) -> None:
    idle = [socket.create_connection(("127.0.0.1", site.listener.port)) for _ in range(MAX_CONNECTIONS)]
    try:
        # Every slot holds a connection that sends nothing: one more is closed unread, at once.
        def dropped() -> bool:
            with socket.create_connection(("127.0.0.1", site.listener.port), timeout=5) as extra:
                extra.sendall(b"GET /status.json HTTP/1.0\r\n\r\n")
                return extra.recv(100) == b""

        wait_for(dropped, 10, "a connection beyond the limit to be dropped")
    finally:
        for conn in idle:
            conn.close()
    # Until the server has seen the idle ones go it still drops a new one (wait_for: not yet).
    wait_for(lambda: site.get("/status.json").status == 200, 10, "the slots to come back")


def test_login_without_a_token_configured_just_goes_to_the_page(site: Site) -> None:
    login = site.get("/login?token=anything")
    assert login.status == 303 and login.headers["location"] == "/" and "set-cookie" not in login.headers


def test_the_token_and_the_basic_auth_form_of_the_key_never_show(locked: Site) -> None:
    basic = base64.b64encode(f"{API_KEY}:{API_SECRET}".encode()).decode()
    locked.failed("x.json", "submit", f"Authorization: Basic {basic}; token {TOKEN}", None)
    body = locked.get("/status.json", {"Authorization": f"Bearer {TOKEN}"}).body.decode()
    assert "Authorization: Basic ********; token ********" in body
    assert basic not in body and TOKEN not in body
