"""The sandbox over real loopback HTTP: the API contract it simulates, its CDN, and every fault knob."""

from __future__ import annotations

import base64
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import requests

from scenario_watch.sandbox import Fault, Sandbox
from scenario_watch.sandbox.images import make_png, sniff_mime

MODEL = "model_google-gemini-pro-image-editing"


def wait_until(condition: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Poll until truthy (bounded); the value, or an AssertionError."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.01)
    return value


def png_info(data: bytes) -> tuple[int, int, bytes]:
    """Width, height and decompressed pixel data of a PNG (checks signature, chunk CRCs, IEND)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, dict[bytes, bytes]()
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body)
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + length
    assert b"IEND" in chunks
    width, height, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, colour) == (8, 2)
    return width, height, zlib.decompress(chunks[b"IDAT"])


@pytest.fixture
def sb() -> Iterator[Sandbox]:
    with Sandbox(generation_seconds=0.2) as sandbox:
        yield sandbox


@pytest.fixture
def api(sb: Sandbox) -> Iterator[requests.Session]:
    with requests.Session() as session:
        session.auth = (sb.key, sb.secret)
        yield session


@pytest.fixture
def cdn() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


def generate(sb: Sandbox, api: requests.Session, body: Any, **params: str) -> requests.Response:
    return api.post(f"{sb.base_url}/generate/custom/{MODEL}", json=body, params=params, timeout=10)


def finished_job(sb: Sandbox, api: requests.Session, job_id: str) -> dict[str, Any]:
    def poll() -> dict[str, Any] | None:
        job: dict[str, Any] = api.get(f"{sb.base_url}/jobs/{job_id}", timeout=10).json()["job"]
        return job if job["status"] in ("success", "failure", "canceled") else None

    job: dict[str, Any] = wait_until(poll)
    return job


# -- the happy path ---------------------------------------------------------------------------------


def test_requests_without_the_right_credentials_get_401(sb: Sandbox) -> None:
    url = f"{sb.base_url}/jobs/job_x"
    assert requests.get(url, timeout=5).status_code == 401
    bad = requests.get(url, auth=(sb.key, "wrong"), timeout=5)
    assert bad.status_code == 401 and bad.json() == {"reason": "Unauthorized"}
    assert [r.has_auth for r in sb.requests] == [False, True]
    assert "wrong" not in repr(sb.requests)


def test_generate_poll_asset_and_cdn_bytes(sb: Sandbox, api: requests.Session, cdn: requests.Session) -> None:
    body = {"prompt": "a lighthouse", "numOutputs": 2, "resolution": "1K"}
    resp = generate(sb, api, body, projectId="proj_ignored")
    assert resp.status_code == 200 and resp.headers["Content-Type"] == "application/json"
    answer = resp.json()
    assert answer["creativeUnitsCost"] == 10 and answer["costDetails"] == {"custom-generation": 10}
    job_id = answer["job"]["jobId"]
    assert job_id.startswith("job_") and sb.generate_jobs == [job_id]
    seen: list[str] = []

    def poll() -> dict[str, Any] | None:
        job: dict[str, Any] = api.get(f"{sb.base_url}/jobs/{job_id}", timeout=5).json()["job"]
        if not seen or seen[-1] != job["status"]:
            seen.append(job["status"])
        return job if job["status"] == "success" else None

    job = wait_until(poll)
    order = ["pending", "queued", "warming-up", "in-progress", "finalizing", "success"]
    assert seen == sorted(seen, key=order.index)
    assert [h["status"] for h in job["statusHistory"]] == order
    assert job["progress"] == 1 and job["jobType"] == "custom"
    assert job["createdAt"].endswith("Z") and len(job["createdAt"]) == len("2025-01-01T00:00:00.000Z")
    assert job["billing"] == {"cuCost": 10, "cuDiscount": 0}
    assert job["metadata"]["input"] == body
    assert sb.job(job_id) == job
    asset_ids = job["metadata"]["assetIds"]
    assert len(asset_ids) == 2 and len(set(asset_ids)) == 2
    for asset_id in asset_ids:
        asset = api.get(f"{sb.base_url}/assets/{asset_id}", timeout=5).json()["asset"]
        assert asset["mimeType"] == "image/png" and asset["status"] == "success"
        assert asset["url"].startswith(sb.cdn_url + f"/assets/{asset_id}.png?Expires=")
        image = cdn.get(asset["url"], timeout=5)
        assert image.status_code == 200 and image.headers["Content-Type"] == "image/png"
        assert image.content == sb.asset_bytes(asset_id)
        assert int(image.headers["Content-Length"]) == len(image.content) == asset["properties"]["size"]
        width, height, pixels = png_info(image.content)
        assert (width, height) == (asset["properties"]["width"], asset["properties"]["height"]) == (256, 256)
        assert len(pixels) == height * (1 + 3 * width)
    assert sb.asset_bytes(asset_ids[0]) != sb.asset_bytes(asset_ids[1])
    assert all(not r.has_auth for r in sb.requests if r.server == "cdn")


def test_download_endpoint_gives_a_fresh_url(
    sb: Sandbox, api: requests.Session, cdn: requests.Session
) -> None:
    job = finished_job(sb, api, generate(sb, api, {"prompt": "p"}).json()["job"]["jobId"])
    asset_id = job["metadata"]["assetIds"][0]
    url = f"{sb.base_url}/assets/{asset_id}/download"
    answer = api.post(url, json={"targetFormat": "png"}, timeout=5).json()
    assert answer["mimeType"] == "image/png"
    assert cdn.get(answer["url"], timeout=5).content == sb.asset_bytes(asset_id)
    assert api.post(url, json={"targetFormat": "bmp"}, timeout=5).status_code == 400


def test_failed_and_canceled_jobs(sb: Sandbox, api: requests.Session) -> None:
    sb.fail_next_jobs(1, error="Content blocked", hint="Rephrase the prompt")
    sb.fail_next_jobs(1, error="Canceled by an admin", status="canceled")
    failed = finished_job(sb, api, generate(sb, api, {"prompt": "a"}).json()["job"]["jobId"])
    canceled = finished_job(sb, api, generate(sb, api, {"prompt": "b"}).json()["job"]["jobId"])
    ok = finished_job(sb, api, generate(sb, api, {"prompt": "c"}).json()["job"]["jobId"])
    assert failed["status"] == "failure" and failed["metadata"]["assetIds"] == []
    assert (
        failed["metadata"]["error"] == "Content blocked"
        and failed["metadata"]["hint"] == "Rephrase the prompt"
    )
    assert canceled["status"] == "canceled" and "hint" not in canceled["metadata"]
    assert ok["status"] == "success"


def test_unknown_job_and_route_are_404(sb: Sandbox, api: requests.Session) -> None:
    assert api.get(f"{sb.base_url}/jobs/job_nope", timeout=5).json() == {"reason": "Job not found"}
    for resp in (
        api.get(f"{sb.base_url}/nothing", timeout=5),
        api.post(f"{sb.base_url}/generate/custom/model_other", json={"prompt": "x"}, timeout=5),
        api.get(f"{sb.base_url}/assets/asset_nope", timeout=5),
    ):
        assert resp.status_code == 404 and isinstance(resp.json()["reason"], str)
    assert sb.generate_jobs == []


# -- validation, pricing, limits --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "cost"),
    [
        ({"prompt": "x"}, 5),
        ({"prompt": "x", "resolution": "4K", "numOutputs": 2}, 20),
        ({"prompt": "x", "numOutputs": 3, "useGoogleSearch": True}, 17),
    ],
)
def test_dry_run_prices_and_creates_nothing(sb: Sandbox, api: requests.Session, body: Any, cost: int) -> None:
    resp = generate(sb, api, body, dryRun="true")
    assert resp.status_code == 269
    assert resp.json() == {
        "creativeUnitsCost": cost,
        "creativeUnitsDiscount": 0,
        "costDetails": {"custom-generation": cost},
    }
    assert sb.generate_jobs == []
    assert api.get(f"{sb.base_url}/jobs", timeout=5).json()["jobs"] == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "prompt"),
        ({"prompt": "  "}, "prompt"),
        ({"prompt": 3}, "prompt"),
        ({"promt": "x"}, "promt"),
        ({"prompt": "x", "referenceImages": "asset_abc"}, "referenceImages"),
        ({"prompt": "x", "referenceImages": ["asset_unknown"]}, "asset_unknown"),
        ({"prompt": "x", "referenceImages": ["a"] * 15}, "referenceImages"),
        ({"prompt": "x", "aspectRatio": "2:1"}, "aspectRatio"),
        ({"prompt": "x", "resolution": "8K"}, "resolution"),
        ({"prompt": "x", "numOutputs": 0}, "numOutputs"),
        ({"prompt": "x", "numOutputs": 5}, "numOutputs"),
        ({"prompt": "x", "numOutputs": True}, "numOutputs"),
        ({"prompt": "x", "seed": -1}, "seed"),
        ({"prompt": "x", "seed": 2**31}, "seed"),
        ({"prompt": "x", "useGoogleSearch": "yes"}, "useGoogleSearch"),
        (["prompt"], "JSON object"),
    ],
)
def test_bad_inputs_get_400_naming_the_field(
    sb: Sandbox, api: requests.Session, body: Any, field: str
) -> None:
    resp = generate(sb, api, body)
    assert resp.status_code == 400
    assert field in resp.json()["reason"]
    assert generate(sb, api, body, dryRun="true").status_code == 400
    assert sb.generate_jobs == []


def test_invalid_json_body_is_400(sb: Sandbox, api: requests.Session) -> None:
    resp = api.post(f"{sb.base_url}/generate/custom/{MODEL}", data=b"{nope", timeout=5)
    assert resp.status_code == 400 and "JSON" in resp.json()["reason"]


def test_parallel_limit_gives_429_until_jobs_finish(sb: Sandbox, api: requests.Session) -> None:
    sb.parallel_limit = 2
    sb.generation_seconds = 0.5
    assert [generate(sb, api, {"prompt": str(n)}).status_code for n in range(2)] == [200, 200]
    refused = generate(sb, api, {"prompt": "third"})
    assert refused.status_code == 429 and "Retry-After" not in refused.headers
    assert refused.json() == {
        "reason": "Too many parallel jobs",
        "details": {"actionName": "custom-generation", "actionLimit": 2},
    }
    assert generate(sb, api, {"prompt": "estimate"}, dryRun="true").status_code == 269
    assert len(sb.generate_jobs) == 2
    wait_until(lambda: generate(sb, api, {"prompt": "third"}).status_code == 200)
    assert len(sb.generate_jobs) == 3


# -- the CDN ------------------------------------------------------------------------------------------


def test_cdn_refuses_expired_tampered_and_authorized_requests(
    sb: Sandbox, api: requests.Session, cdn: requests.Session
) -> None:
    job = finished_job(sb, api, generate(sb, api, {"prompt": "p"}).json()["job"]["jobId"])
    asset_id = job["metadata"]["assetIds"][0]
    url = api.get(f"{sb.base_url}/assets/{asset_id}", timeout=5).json()["asset"]["url"]
    assert cdn.get(url, timeout=5).status_code == 200
    with_auth = cdn.get(url, auth=(sb.key, sb.secret), timeout=5)
    assert with_auth.status_code == 400
    tampered = cdn.get(url.replace("Signature=", "Signature=0"), timeout=5)
    assert tampered.status_code == 403 and b"Invalid signature" in tampered.content
    sb.url_ttl = -1
    expired_url = api.get(f"{sb.base_url}/assets/{asset_id}", timeout=5).json()["asset"]["url"]
    expired = cdn.get(expired_url, timeout=5)
    assert expired.status_code == 403 and b"Request has expired" in expired.content
    assert cdn.get(f"{sb.cdn_url}/assets/{asset_id}.png", timeout=5).status_code == 403


# -- job listing ----------------------------------------------------------------------------------------


def list_all(sb: Sandbox, api: requests.Session, **params: Any) -> tuple[list[str], list[int]]:
    """Follow tokens to the end: the job ids, and the size of each page."""
    ids: list[str] = []
    sizes: list[int] = []
    token = None
    while True:
        query = dict(params, **({"paginationToken": token} if token else {}))
        answer = api.get(f"{sb.base_url}/jobs", params=query, timeout=5).json()
        ids += [job["jobId"] for job in answer["jobs"]]
        sizes.append(len(answer["jobs"]))
        token = answer.get("nextPaginationToken")
        if not token:
            return ids, sizes


def test_job_listing_paginates_newest_first_with_an_empty_page(sb: Sandbox, api: requests.Session) -> None:
    created = [generate(sb, api, {"prompt": f"job {n}"}).json()["job"] for n in range(5)]
    ids, sizes = list_all(sb, api, pageSize=2)
    assert ids == [job["jobId"] for job in reversed(created)]
    assert sizes == [2, 2, 0, 1]
    assert list_all(sb, api)[1] == [5]  # default page size 10: one page, no token
    after = created[2]["createdAt"]
    newer, _ = list_all(sb, api, createdAfter=after, pageSize=100)
    assert set(newer) == {job["jobId"] for job in created if job["createdAt"] > after}  # same ISO format
    assert list_all(sb, api, createdAfter="2000-01-01T00:00:00Z")[0] == ids
    assert list_all(sb, api, createdAfter="2999-01-01T00:00:00.000Z")[0] == []


@pytest.mark.parametrize(
    "params", [{"createdAfter": "yesterday"}, {"pageSize": 0}, {"pageSize": 101}, {"paginationToken": "%%"}]
)
def test_job_listing_rejects_bad_parameters(
    sb: Sandbox, api: requests.Session, params: dict[str, Any]
) -> None:
    resp = api.get(f"{sb.base_url}/jobs", params=params, timeout=5)
    assert resp.status_code == 400 and resp.json()["reason"]


# -- faults --------------------------------------------------------------------------------------------


def test_status_fault_with_retry_after_then_normal_again(sb: Sandbox, api: requests.Session) -> None:
    sb.inject(Fault(route="job", kind="status", status=503, retry_after=1.5, reason="busy", times=2))
    url = f"{sb.base_url}/jobs/job_x"
    for _ in range(2):
        resp = api.get(url, timeout=5)
        assert resp.status_code == 503 and resp.headers["Retry-After"] == "1.5"
        assert resp.json() == {"reason": "busy"}
    assert api.get(url, timeout=5).status_code == 404
    assert [r.status for r in sb.requests] == [503, 503, 404]


def test_reset_fault_is_a_connection_error(sb: Sandbox, api: requests.Session) -> None:
    sb.inject(Fault(route="jobs", kind="reset"))
    with pytest.raises(requests.ConnectionError):
        api.get(f"{sb.base_url}/jobs", timeout=5)
    assert sb.requests[-1].status == 0
    assert api.get(f"{sb.base_url}/jobs", timeout=5).status_code == 200


def test_delay_fault_answers_late(sb: Sandbox, api: requests.Session) -> None:
    sb.inject(Fault(route="jobs", kind="delay", delay=0.3))
    started = time.monotonic()
    assert api.get(f"{sb.base_url}/jobs", timeout=5).status_code == 200
    assert time.monotonic() - started >= 0.3
    sb.inject(Fault(route="jobs", kind="delay", delay=1.0))
    with pytest.raises(requests.Timeout):
        api.get(f"{sb.base_url}/jobs", timeout=0.3)


def test_malformed_and_truncated_api_answers(sb: Sandbox, api: requests.Session) -> None:
    sb.inject(Fault(route="jobs", kind="malformed"))
    resp = api.get(f"{sb.base_url}/jobs", timeout=5)
    assert resp.status_code == 200
    with pytest.raises(requests.JSONDecodeError):
        resp.json()
    sb.inject(Fault(route="jobs", kind="truncated"))
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        api.get(f"{sb.base_url}/jobs", timeout=5)


def test_truncated_cdn_download_is_a_short_read(
    sb: Sandbox, api: requests.Session, cdn: requests.Session
) -> None:
    job = finished_job(sb, api, generate(sb, api, {"prompt": "p"}).json()["job"]["jobId"])
    asset_id = job["metadata"]["assetIds"][0]
    url = api.get(f"{sb.base_url}/assets/{asset_id}", timeout=5).json()["asset"]["url"]
    sb.inject(Fault(route="cdn", kind="truncated"))
    received = bytearray()
    with (
        pytest.raises(requests.exceptions.ChunkedEncodingError),
        cdn.get(url, stream=True, timeout=5) as resp,
    ):
        assert int(resp.headers["Content-Length"]) == len(sb.asset_bytes(asset_id))
        for chunk in resp.iter_content(8192):
            received += chunk
    assert 0 < len(received) < len(sb.asset_bytes(asset_id))
    assert cdn.get(url, timeout=5).content == sb.asset_bytes(asset_id)


def test_id_shape_and_missing_fields(sb: Sandbox, api: requests.Session) -> None:
    sb.inject(Fault(route="generate", kind="id_shape"))
    job = generate(sb, api, {"prompt": "p"}).json()["job"]
    assert "jobId" not in job and job["id"] == sb.generate_jobs[0]
    sb.inject(Fault(route="job", kind="missing_fields"))
    bare = api.get(f"{sb.base_url}/jobs/{job['id']}", timeout=5).json()["job"]
    assert bare["jobId"] == job["id"] and "status" not in bare and "metadata" not in bare


def test_generate_fault_before_creates_nothing_and_after_creates_the_job(
    sb: Sandbox, api: requests.Session
) -> None:
    sb.inject(Fault(route="generate", kind="status", status=500))
    assert generate(sb, api, {"prompt": "before"}).status_code == 500
    assert sb.generate_jobs == []
    sb.inject(Fault(route="generate", kind="reset", after=True))
    with pytest.raises(requests.ConnectionError):
        generate(sb, api, {"prompt": "after"})
    assert len(sb.generate_jobs) == 1
    assert sb.job(sb.generate_jobs[0])["metadata"]["input"] == {"prompt": "after"}
    listed = api.get(f"{sb.base_url}/jobs", timeout=5).json()["jobs"]
    assert [job["jobId"] for job in listed] == sb.generate_jobs


def test_faults_apply_in_order_to_matching_routes_only(sb: Sandbox, api: requests.Session) -> None:
    sb.inject(Fault(route="asset", kind="status", status=502))
    sb.inject(Fault(route="any", kind="status", status=500))
    sb.inject(Fault(route="any", kind="status", status=503, times=-1))
    assert api.get(f"{sb.base_url}/jobs", timeout=5).status_code == 500
    assert api.get(f"{sb.base_url}/assets/x", timeout=5).status_code == 502
    assert [api.get(f"{sb.base_url}/jobs", timeout=5).status_code for _ in range(3)] == [503] * 3
    sb.clear_faults()
    assert api.get(f"{sb.base_url}/jobs", timeout=5).status_code == 200


def test_fault_fields_are_validated() -> None:
    for raw, words in [
        ({"route": "nowhere", "kind": "reset"}, "route"),
        ({"route": "job", "kind": "explode"}, "kind"),
        ({"route": "job", "kind": "reset", "times": 0}, "times"),
        ({"route": "job", "kind": "reset", "delay": "1"}, "delay"),
        ({"route": "job", "kind": "reset", "color": "red"}, "color"),
        ({"kind": "reset"}, "route"),
    ]:
        with pytest.raises(ValueError, match=words):
            Fault.from_json(raw)
    assert Fault.from_json({"route": "cdn", "kind": "delay", "delay": 2}) == Fault("cdn", "delay", delay=2)


# -- uploads -------------------------------------------------------------------------------------------


def test_small_upload_becomes_a_reference_image(
    sb: Sandbox, api: requests.Session, cdn: requests.Session
) -> None:
    data = make_png("my reference")
    resp = api.post(
        f"{sb.base_url}/assets", json={"image": base64.b64encode(data).decode(), "name": "ref.png"}, timeout=5
    )
    asset = resp.json()["asset"]
    assert resp.status_code == 200 and asset["id"].startswith("asset_") and asset["mimeType"] == "image/png"
    assert cdn.get(asset["url"], timeout=5).content == data == sb.asset_bytes(asset["id"])
    job = generate(sb, api, {"prompt": "edit", "referenceImages": [asset["id"]]}).json()["job"]
    assert job["metadata"]["input"]["referenceImages"] == [asset["id"]]
    jpeg = api.post(
        f"{sb.base_url}/assets", json={"image": base64.b64encode(b"\xff\xd8\xff" + b"0" * 10).decode()}
    )
    assert jpeg.json()["asset"]["mimeType"] == "image/jpeg"


@pytest.mark.parametrize(
    ("image", "words"),
    [
        ("not base64!!", "base64"),
        (base64.b64encode(b"plain text, not an image").decode(), "format"),
        (base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(6 * 1024 * 1024)).decode(), "/v1/uploads"),
    ],
)
def test_bad_small_uploads_get_400(sb: Sandbox, api: requests.Session, image: str, words: str) -> None:
    resp = api.post(f"{sb.base_url}/assets", json={"image": image, "name": "x.png"}, timeout=10)
    assert resp.status_code == 400 and words in resp.json()["reason"]


def multipart(
    sb: Sandbox, api: requests.Session, cdn: requests.Session, data: bytes, parts: int, file_size: int
) -> dict[str, Any]:
    """Run the whole multipart flow; the upload's final state."""
    body = {
        "fileName": "big.png",
        "contentType": "image/png",
        "kind": "image",
        "parts": parts,
        "fileSize": file_size,
    }
    upload = api.post(f"{sb.base_url}/uploads", json=body, timeout=5).json()["upload"]
    assert upload["status"] == "pending" and [p["number"] for p in upload["parts"]] == list(
        range(1, parts + 1)
    )
    size = -(-len(data) // parts)
    for part in upload["parts"]:
        assert part["url"].startswith(sb.cdn_url + "/uploads/") and part["expires"].endswith("Z")
        chunk = data[(part["number"] - 1) * size : part["number"] * size]
        assert cdn.put(part["url"], data=chunk, auth=(sb.key, sb.secret), timeout=5).status_code == 400
        assert cdn.put(part["url"], data=chunk, timeout=5).status_code == 200
    url = f"{sb.base_url}/uploads/{upload['id']}"
    done = api.post(f"{url}/action", json={"action": "complete"}, timeout=5).json()["upload"]
    assert done["status"] == "complete"
    seen: list[str] = []

    def poll() -> dict[str, Any] | None:
        state: dict[str, Any] = api.get(url, timeout=5).json()["upload"]
        seen.append(state["status"])
        return state if state["status"] in ("imported", "failed") else None

    final: dict[str, Any] = wait_until(poll)
    assert set(seen) <= {"validating", "validated", "imported", "failed"}
    return final


def test_multipart_upload_imports_an_asset(sb: Sandbox, api: requests.Session, cdn: requests.Session) -> None:
    data = make_png("a big reference")
    final = multipart(sb, api, cdn, data, parts=3, file_size=len(data))
    assert final["status"] == "imported"
    assert sb.asset_bytes(final["entityId"]) == data
    assert generate(sb, api, {"prompt": "x", "referenceImages": [final["entityId"]]}).status_code == 200


def test_multipart_upload_fails_on_a_size_mismatch(
    sb: Sandbox, api: requests.Session, cdn: requests.Session
) -> None:
    data = make_png("short")
    final = multipart(sb, api, cdn, data, parts=2, file_size=len(data) + 1)
    assert final["status"] == "failed" and "fileSize" in final["errorMessage"] and "entityId" not in final


def test_completing_with_a_missing_part_is_400(sb: Sandbox, api: requests.Session) -> None:
    body = {"fileName": "a.png", "contentType": "image/png", "kind": "image", "parts": 2, "fileSize": 10}
    upload = api.post(f"{sb.base_url}/uploads", json=body, timeout=5).json()["upload"]
    resp = api.post(f"{sb.base_url}/uploads/{upload['id']}/action", json={"action": "complete"}, timeout=5)
    assert resp.status_code == 400 and "1, 2" in resp.json()["reason"]


# -- control endpoints, lifecycle, images --------------------------------------------------------------


def test_control_endpoints(sb: Sandbox, api: requests.Session) -> None:
    control = sb.base_url.removesuffix("/v1") + "/_sandbox"
    faults = [
        {"route": "jobs", "kind": "status", "status": 502},
        {"route": "jobs", "kind": "status", "status": 504},
    ]
    assert requests.post(f"{control}/faults", json=faults, timeout=5).status_code == 204
    assert (
        requests.post(f"{control}/faults", json={"route": "x", "kind": "reset"}, timeout=5).status_code == 400
    )
    assert api.get(f"{sb.base_url}/jobs", timeout=5).status_code == 502
    assert requests.delete(f"{control}/faults", timeout=5).status_code == 204
    assert api.get(f"{sb.base_url}/jobs", timeout=5).status_code == 200
    fail = {"n": 1, "error": "nope", "hint": "try again", "status": "failure"}
    assert requests.post(f"{control}/fail-next-jobs", json=fail, timeout=5).status_code == 204
    job_id = generate(sb, api, {"prompt": "p"}).json()["job"]["jobId"]
    assert finished_job(sb, api, job_id)["metadata"]["error"] == "nope"
    state = requests.get(f"{control}/state", timeout=5).json()
    assert state == {"generate_jobs": [job_id], "jobs": {job_id: "failure"}}
    records = requests.get(f"{control}/requests", timeout=5).json()
    assert [r["status"] for r in records][:2] == [502, 200]
    assert records[2]["body"] == {"prompt": "p"} and records[2]["has_auth"] is True
    assert not any("_sandbox" in r["path"] for r in records)


def test_stop_is_idempotent_and_drops_keep_alive_connections() -> None:
    sandbox = Sandbox().start()
    with requests.Session() as session:
        assert session.get(f"{sandbox.base_url}/jobs", timeout=5).status_code == 401
        sandbox.stop()
        sandbox.stop()
        with pytest.raises(requests.ConnectionError):
            session.get(f"{sandbox.base_url}/jobs", timeout=5)


def test_main_serve_prints_its_address_and_stops_on_sigterm() -> None:
    code = "from scenario_watch.sandbox import main_serve; main_serve(0, generation_seconds=0.1)"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "http://127.0.0.1:" in line and "sandbox-key" in line and "sandbox-secret" in line
        base_url = line.split()[2]
        assert requests.get(f"{base_url}/jobs", auth=("sandbox-key", "sandbox-secret"), timeout=5).ok
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_images_are_valid_deterministic_distinct_and_fast() -> None:
    first = make_png("asset_1\nprompt")
    assert first == make_png("asset_1\nprompt") != make_png("asset_2\nprompt")
    width, height, pixels = png_info(first)
    assert (width, height) == (256, 256) and len(pixels) == 256 * (1 + 3 * 256)
    assert sniff_mime(first) == "image/png" and sniff_mime(b"GIF89a....") == "image/gif"
    assert sniff_mime(b"RIFF\0\0\0\0WEBPVP8 ") == "image/webp" and sniff_mime(b"hello") is None
    started = time.perf_counter()
    for n in range(20):
        make_png(f"speed {n}")
    assert (time.perf_counter() - started) / 20 < 0.05  # generous: the target is a few ms


def test_request_records_have_bodies_and_queries(sb: Sandbox, api: requests.Session) -> None:
    generate(sb, api, {"prompt": "recorded"}, dryRun="true", projectId="p1")
    record = sb.requests[-1]
    assert record.server == "api" and record.method == "POST" and record.status == 269
    assert record.path == f"/v1/generate/custom/{MODEL}" and record.query == {
        "dryRun": "true",
        "projectId": "p1",
    }
    assert record.body == {"prompt": "recorded"} and record.has_auth and record.time <= time.monotonic()
    assert json.dumps(record.body)


# -- the live contract: model schema and knobs --------------------------------------------------------


def test_model_schema_lists_the_inputs_and_the_seed_knob_removes_seed(
    sb: Sandbox, api: requests.Session
) -> None:
    answer = api.get(f"{sb.base_url}/models/{MODEL}", timeout=5).json()["model"]
    assert (answer["id"], answer["type"], answer["status"]) == (MODEL, "custom", "trained") and answer["name"]
    inputs = {item["name"]: item for item in answer["inputs"]}
    assert list(inputs) == [
        "prompt",
        "referenceImages",
        "aspectRatio",
        "resolution",
        "useGoogleSearch",
        "numOutputs",
        "seed",
    ]
    assert inputs["prompt"]["type"] == "string" and inputs["prompt"]["required"] == {"always": True}
    assert inputs["referenceImages"]["type"] == "file_array" and inputs["referenceImages"]["max"] == 14
    assert inputs["aspectRatio"]["default"] == "auto" and "21:9" in inputs["aspectRatio"]["allowedValues"]
    assert inputs["resolution"] == {
        "name": "resolution",
        "type": "string",
        "allowedValues": ["1K", "2K", "4K"],
        "default": "2K",
        "costImpact": True,
    }
    assert inputs["useGoogleSearch"]["type"] == "boolean" and inputs["useGoogleSearch"]["default"] is False
    assert {k: inputs["numOutputs"][k] for k in ("type", "min", "max", "step", "default", "costImpact")} == {
        "type": "number",
        "min": 1,
        "max": 4,
        "step": 1,
        "default": 1,
        "costImpact": True,
    }
    assert (inputs["seed"]["min"], inputs["seed"]["max"], inputs["seed"]["step"]) == (0, 2147483647, 1)
    other = api.get(f"{sb.base_url}/models/model_other", timeout=5)
    assert other.status_code == 404 and isinstance(other.json()["reason"], str)

    sb.seed_input = False
    names = [
        item["name"] for item in api.get(f"{sb.base_url}/models/{MODEL}", timeout=5).json()["model"]["inputs"]
    ]
    assert "seed" not in names and len(names) == 6
    refused = generate(sb, api, {"prompt": "x", "seed": 7})
    assert refused.status_code == 400
    assert refused.json() == {"reason": "Unknown parameter(s) for this model: seed"}
    assert generate(sb, api, {"prompt": "x"}).status_code == 200 and len(sb.generate_jobs) == 1


def test_fractional_cost_per_output_in_answers_estimates_and_billing(
    sb: Sandbox, api: requests.Session
) -> None:
    sb.cost_per_output = 5.5
    for body, cost in [
        ({"prompt": "x"}, 5.5),
        ({"prompt": "x", "resolution": "4K"}, 11),
        ({"prompt": "x", "numOutputs": 3, "useGoogleSearch": True}, 18.5),
    ]:
        estimate = generate(sb, api, body, dryRun="api").json()
        assert estimate["creativeUnitsCost"] == cost and estimate["costDetails"] == {
            "custom-generation": cost
        }
        answer = generate(sb, api, body).json()
        assert answer["creativeUnitsCost"] == cost and answer["job"]["billing"]["cuCost"] == cost
        listed = api.get(f"{sb.base_url}/jobs/{answer['job']['jobId']}", timeout=5).json()["job"]
        assert listed["billing"]["cuCost"] == cost
    assert type(generate(sb, api, {"prompt": "x", "resolution": "4K"}).json()["creativeUnitsCost"]) is int


def test_echo_strings_turns_numbers_into_strings_in_metadata_input(
    sb: Sandbox, api: requests.Session
) -> None:
    sb.echo_strings = True
    job = generate(sb, api, {"prompt": "x", "seed": 7, "numOutputs": 2, "useGoogleSearch": True}).json()[
        "job"
    ]
    expected = {"prompt": "x", "seed": "7", "numOutputs": "2", "useGoogleSearch": True}
    assert job["metadata"]["input"] == expected
    listed = api.get(f"{sb.base_url}/jobs", timeout=5).json()["jobs"]
    assert [j["metadata"]["input"] for j in listed] == [expected]
    assert len(finished_job(sb, api, job["jobId"])["metadata"]["assetIds"]) == 2


def listing(sb: Sandbox, api: requests.Session) -> list[dict[str, Any]]:
    jobs: list[dict[str, Any]] = api.get(f"{sb.base_url}/jobs", params={"pageSize": 100}, timeout=5).json()[
        "jobs"
    ]
    return jobs


def test_team_noise_adds_a_teammates_job_and_an_upload_repeatably(api: requests.Session) -> None:
    def noisy_run() -> list[dict[str, Any]]:
        with Sandbox(generation_seconds=0.2, rng_seed=42) as sandbox:
            sandbox.team_noise = 1.0
            assert generate(sandbox, api, {"prompt": "ours", "numOutputs": 2}).status_code == 200
            return listing(sandbox, api)

    jobs = noisy_run()
    assert sorted(job["jobType"] for job in jobs) == ["custom", "custom", "upload"]
    ours = [job for job in jobs if job["metadata"].get("input", {}).get("prompt") == "ours"]
    theirs = [job for job in jobs if job["jobType"] == "custom" and job not in ours]
    upload = next(job for job in jobs if job["jobType"] == "upload")
    assert len(ours) == len(theirs) == 1
    assert theirs[0]["metadata"]["input"]["prompt"] != "ours" and theirs[0]["authorId"] != ours[0]["authorId"]
    assert "input" not in upload["metadata"]
    again = noisy_run()
    assert [job["metadata"].get("input") for job in again] == [job["metadata"].get("input") for job in jobs]


def test_no_team_noise_by_default_and_planted_foreign_jobs(sb: Sandbox, api: requests.Session) -> None:
    body = {"prompt": "same", "aspectRatio": "1:1"}
    ours = generate(sb, api, body).json()["job"]["jobId"]
    assert [job["jobId"] for job in listing(sb, api)] == [ours]
    twin = sb.add_foreign_job(dict(body))
    upload = sb.add_foreign_job({}, job_type="upload")
    jobs = listing(sb, api)
    assert [job["jobId"] for job in jobs] == [upload, twin, ours] and sb.generate_jobs == [ours]
    assert jobs[1]["metadata"]["input"] == body and jobs[1]["jobType"] == "custom"
    assert jobs[0]["jobType"] == "upload" and "input" not in jobs[0]["metadata"]
    sb.echo_model_id = True
    other = sb.add_foreign_job({"prompt": "elsewhere"}, model_id="model_other")
    assert sb.job(other)["metadata"]["input"] == {"prompt": "elsewhere", "modelId": "model_other"}


def test_plan_required_refuses_generate_only(sb: Sandbox, api: requests.Session) -> None:
    sb.plan_required = "This model requires the Pro plan"
    for params in ({}, {"dryRun": "true"}):
        refused = generate(sb, api, {"prompt": "x"}, **params)
        assert refused.status_code == 403 and refused.json() == {"reason": "This model requires the Pro plan"}
    assert api.get(f"{sb.base_url}/jobs", timeout=5).status_code == 200
    assert api.get(f"{sb.base_url}/models/{MODEL}", timeout=5).status_code == 200
    assert sb.generate_jobs == []
    sb.plan_required = None
    assert generate(sb, api, {"prompt": "x"}).status_code == 200


def test_lost_answers_create_the_job(sb: Sandbox, api: requests.Session) -> None:
    sb.lost_answer_rate = 1.0
    with pytest.raises(requests.ConnectionError):
        generate(sb, api, {"prompt": "lost"})
    assert [job["metadata"]["input"] for job in listing(sb, api)] == [{"prompt": "lost"}]
    assert generate(sb, api, {"prompt": "estimate"}, dryRun="true").status_code == 269
    assert generate(sb, api, {"promt": "invalid"}).status_code == 400  # nothing created: nothing to lose
    assert len(sb.generate_jobs) == 1


def test_lost_answer_rate_is_a_repeatable_probability(api: requests.Session) -> None:
    def outcomes() -> list[bool]:
        with Sandbox(generation_seconds=0.05, rng_seed=7) as sandbox:
            sandbox.lost_answer_rate = 0.5
            answered = []
            for n in range(12):
                try:
                    answered.append(generate(sandbox, api, {"prompt": str(n)}).status_code == 200)
                except requests.ConnectionError:
                    answered.append(False)
            assert len(sandbox.generate_jobs) == 12
            return answered

    first = outcomes()
    assert first == outcomes() and 0 < sum(first) < 12


def test_late_answers_create_the_job_only_after_the_delay(sb: Sandbox, api: requests.Session) -> None:
    sb.set_knobs(late_answer_rate=1.0, late_answer_delay=0.6)
    started = time.time()
    with pytest.raises(requests.Timeout):
        generate_timeout(sb, api, {"prompt": "slow"}, 0.2)
    assert listing(sb, api) == [] and sb.generate_jobs == []  # the slow gateway has not passed it on yet
    job = wait_until(lambda: listing(sb, api))[0]
    assert job["metadata"]["input"] == {"prompt": "slow"}
    created = datetime.fromisoformat(job["createdAt"].replace("Z", "+00:00")).timestamp()
    assert created >= started + 0.6 - 0.01
    assert generate(sb, api, {"prompt": "x"}, dryRun="true").status_code == 269  # estimates are not late


def test_terminal_history_off_leaves_the_final_status_out_of_the_history(
    sb: Sandbox, api: requests.Session
) -> None:
    control = sb.base_url.removesuffix("/v1") + "/_sandbox/knobs"
    assert requests.get(control, timeout=5).json()["terminal_history"] is True
    sb.fail_next_jobs(1, error="Content blocked")
    failed_on = finished_job(sb, api, generate(sb, api, {"prompt": "a"}).json()["job"]["jobId"])
    ok_on = finished_job(sb, api, generate(sb, api, {"prompt": "b"}).json()["job"]["jobId"])
    assert [h["status"] for h in failed_on["statusHistory"]][-1] == "failure"
    assert [h["status"] for h in ok_on["statusHistory"]][-1] == "success"
    resp = requests.post(control, json={"terminal_history": False}, timeout=5)
    assert resp.status_code == 200 and resp.json()["terminal_history"] is False and not sb.terminal_history
    # The switch applies to every answer from now on, jobs finished before it included.
    running = ["pending", "queued", "warming-up", "in-progress", "finalizing"]
    for before in (failed_on, ok_on):
        now = api.get(f"{sb.base_url}/jobs/{before['jobId']}", timeout=5).json()["job"]
        assert [h["status"] for h in now["statusHistory"]] == running
        assert now["statusHistory"] == before["statusHistory"][:-1]
        assert {k: v for k, v in now.items() if k != "statusHistory"} == {
            k: v for k, v in before.items() if k != "statusHistory"
        }  # status, progress, updatedAt, assets, error: as with the knob on
    sb.fail_next_jobs(1, error="Canceled", status="canceled")
    canceled = finished_job(sb, api, generate(sb, api, {"prompt": "c"}).json()["job"]["jobId"])
    ok = finished_job(sb, api, generate(sb, api, {"prompt": "d"}).json()["job"]["jobId"])
    assert canceled["status"] == "canceled" and canceled["metadata"]["error"] == "Canceled"
    assert ok["status"] == "success" and ok["progress"] == 1 and len(ok["metadata"]["assetIds"]) == 1
    for job in (canceled, ok):
        assert [h["status"] for h in job["statusHistory"]] == running
    mid = generate(sb, api, {"prompt": "e"}).json()["job"]["jobId"]
    shown = api.get(f"{sb.base_url}/jobs/{mid}", timeout=5).json()["job"]
    assert shown["status"] == shown["statusHistory"][-1]["status"] != "success"  # running: untouched
    assert requests.post(control, json={"terminal_history": 0}, timeout=5).status_code == 400


def generate_timeout(sb: Sandbox, api: requests.Session, body: Any, timeout: float) -> requests.Response:
    return api.post(f"{sb.base_url}/generate/custom/{MODEL}", json=body, timeout=timeout)


def test_knobs_over_http_and_their_checks(sb: Sandbox, api: requests.Session) -> None:
    control = sb.base_url.removesuffix("/v1") + "/_sandbox/knobs"
    defaults = requests.get(control, timeout=5).json()
    assert defaults["seed_input"] is True and defaults["cost_per_output"] == 5 and defaults["team_noise"] == 0
    resp = requests.post(control, json={"plan_required": "Pro only", "cost_per_output": 2.5}, timeout=5)
    assert resp.status_code == 200 and resp.json()["plan_required"] == "Pro only"
    assert sb.plan_required == "Pro only" and sb.cost_per_output == 2.5
    assert generate(sb, api, {"prompt": "x"}).status_code == 403
    for bad, word in [
        ({"no_such_knob": 1}, "no_such_knob"),
        ({"seed_input": "no"}, "seed_input"),
        ({"team_noise": 2}, "team_noise"),
        ({"cost_per_output": True}, "cost_per_output"),
        ({"plan_required": 3, "echo_strings": True}, "plan_required"),
        ([1, 2], "object"),
    ]:
        refused = requests.post(control, json=bad, timeout=5)
        assert refused.status_code == 400 and word in refused.json()["reason"]
    assert sb.echo_strings is False  # a refused request changes nothing
    with pytest.raises(ValueError, match="late_answer_delay"):
        sb.late_answer_delay = -1


def test_uploads_make_upload_jobs_in_the_listing(
    sb: Sandbox, api: requests.Session, cdn: requests.Session
) -> None:
    data = make_png("listed")
    asset = api.post(
        f"{sb.base_url}/assets", json={"image": base64.b64encode(data).decode(), "name": "a.png"}, timeout=5
    ).json()["asset"]
    final = multipart(sb, api, cdn, data, parts=2, file_size=len(data))
    jobs = listing(sb, api)
    assert [job["jobType"] for job in jobs] == ["upload", "upload"] and sb.generate_jobs == []
    assert [job["metadata"]["assetIds"] for job in jobs] == [[final["entityId"]], [asset["id"]]]
    assert all("input" not in job["metadata"] for job in jobs)
    assert final["jobId"] == jobs[0]["jobId"]


# -- the state file -----------------------------------------------------------------------------------


def test_state_file_keeps_jobs_and_assets_across_a_restart(
    tmp_path: Path, api: requests.Session, cdn: requests.Session
) -> None:
    state = tmp_path / "sandbox.json"
    data = make_png("kept")
    with Sandbox(generation_seconds=1.0, state_file=state) as first:
        asset_id = api.post(
            f"{first.base_url}/assets", json={"image": base64.b64encode(data).decode()}, timeout=5
        ).json()["asset"]["id"]
        job = generate(first, api, {"prompt": "survives", "referenceImages": [asset_id]}).json()["job"]
        url = api.get(f"{first.base_url}/assets/{asset_id}", timeout=5).json()["asset"]["url"]
    assert state.exists() and not list(tmp_path.glob(".*.tmp"))
    with Sandbox(generation_seconds=0.1, state_file=state) as second:
        assert second.generate_jobs == [job["jobId"]]
        again = api.get(f"{second.base_url}/jobs/{job['jobId']}", timeout=5).json()["job"]
        assert again["createdAt"] == job["createdAt"] and again["status"] != "success"  # still running
        done = finished_job(second, api, job["jobId"])  # its own 1 s timeline, not the new 0.1 s
        assert done["status"] == "success" and done["metadata"]["input"]["referenceImages"] == [asset_id]
        fresh = api.get(f"{second.base_url}/assets/{asset_id}", timeout=5).json()["asset"]["url"]
        assert cdn.get(fresh, timeout=5).content == data
        # The signing key is kept too: a URL signed before the restart still works on the new CDN port.
        assert cdn.get(second.cdn_url + "/" + url.split("/", 3)[3], timeout=5).content == data
        generated = done["metadata"]["assetIds"][0]
        image = second.asset_bytes(generated)
    with Sandbox(state_file=state) as third:
        assert third.asset_bytes(generated) == image
        assert [j["jobType"] for j in listing(third, api)] == ["custom", "upload"]


def test_a_corrupt_state_file_starts_empty_with_one_warning(
    tmp_path: Path, api: requests.Session, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "sandbox.json"
    state.write_text('{"version": 1, "jobs": [')
    with Sandbox(state_file=state) as sandbox:
        assert listing(sandbox, api) == []
        generate(sandbox, api, {"prompt": "fresh"})
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 1 and "corrupt" in warnings[0] and str(state) in warnings[0]
    with Sandbox(state_file=state) as sandbox:
        assert len(sandbox.generate_jobs) == 1
