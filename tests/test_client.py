"""The API client over real loopback HTTP against the sandbox: typed errors, costs, listing, uploads."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import KEY, SECRET, wait_for

from scenario_watch.api.client import (
    DIRECT_UPLOAD_LIMIT,
    DIRECT_UPLOAD_MARGIN,
    ScenarioClient,
    direct_body_size,
    is_plan_refusal,
)
from scenario_watch.api.jobs import format_cost, parse_job
from scenario_watch.config import MODEL_ID
from scenario_watch.errors import AuthError, NotFound, PlanError, PromptError, RateLimited
from scenario_watch.prepare.preparation import checked_prompt
from scenario_watch.prepare.prompt import PromptRules
from scenario_watch.prepare.schema import check_value, parse_model
from scenario_watch.sandbox import Fault, Sandbox


@pytest.fixture
def client(sandbox: Sandbox) -> Iterator[ScenarioClient]:
    c = ScenarioClient(sandbox.base_url, KEY, SECRET, model_id=MODEL_ID, timeout=5.0, retries=0)
    yield c
    c.close()


@pytest.mark.parametrize(
    ("reason", "plan"),
    [
        ("This model requires a Pro plan", True),
        ("Upgrade your subscription to use this model", True),
        ("Your tier does not include custom models", True),
        ("You do not have permission to use this model", True),
        ("No access to this model for your team", True),
        ("Forbidden", False),
        ("Invalid API key", False),
        ("This API key is not scoped to project proj_1", False),
        ("Missing permission: assets:write", False),
        ("The key was revoked; explained at https://help.scenario.com/planet", False),
    ],
)
def test_which_403_reasons_speak_of_the_plan(reason: str, plan: bool) -> None:
    assert is_plan_refusal(reason) is plan


def test_403_for_the_plan_is_not_a_credentials_problem(sandbox: Sandbox, client: ScenarioClient) -> None:
    reason = "This model requires a higher plan: upgrade your subscription"
    sandbox.inject(Fault(route="generate", kind="status", status=403, reason=reason))
    with pytest.raises(PlanError) as plan:
        client.generate({"prompt": "x"})
    assert plan.value.reason == reason and plan.value.status == 403
    assert not isinstance(plan.value, AuthError)
    sandbox.inject(Fault(route="generate", kind="status", status=403, reason="API key not scoped to project"))
    with pytest.raises(AuthError) as auth:
        client.generate({"prompt": "x"})
    assert auth.value.status == 403
    wrong = ScenarioClient(sandbox.base_url, KEY, "wrong", model_id=MODEL_ID, timeout=5.0, retries=0)
    with pytest.raises(AuthError) as bad:
        wrong.get_job("job_x")
    wrong.close()
    assert bad.value.status == 401


def test_429_carries_the_parallel_limit(sandbox: Sandbox, client: ScenarioClient) -> None:
    sandbox.generation_seconds = 5.0
    sandbox.parallel_limit = 1
    client.generate({"prompt": "first"})
    with pytest.raises(RateLimited) as caught:
        client.generate({"prompt": "second"})
    assert caught.value.limit == 1
    assert caught.value.retry_after is None  # the sandbox sends no Retry-After here
    sandbox.inject(Fault(route="generate", kind="status", status=429, retry_after=2, reason="slow down"))
    with pytest.raises(RateLimited) as plain:
        client.generate({"prompt": "third"})
    assert plain.value.retry_after == 2.0 and plain.value.limit is None


def test_costs_are_numbers(sandbox: Sandbox, client: ScenarioClient) -> None:
    job, cost = client.generate({"prompt": "x", "numOutputs": 2})
    assert cost == 10.0 and isinstance(cost, float)
    done = wait_for(lambda: (j := client.get_job(job.job_id)).final and j, what="job final")
    assert done.cost == 10.0
    assert done.job_type == "custom"
    assert 0.0 <= done.progress <= 1.0
    assert client.estimate({"prompt": "x", "resolution": "4K"}) == 10.0
    assert [format_cost(c) for c in (10.0, 5.5, 0.1 + 0.2, None)] == ["10", "5.5", "0.3", "?"]


def test_fractional_costs(sandbox: Sandbox, client: ScenarioClient) -> None:
    sandbox.cost_per_output = 5.5
    assert client.estimate({"prompt": "x"}) == 5.5
    job, cost = client.generate({"prompt": "x", "numOutputs": 3})
    assert cost == 16.5
    done = wait_for(lambda: (j := client.get_job(job.job_id)).final and j, what="job final")
    assert done.cost == 16.5 and format_cost(done.cost) == "16.5"


def test_plan_required_is_a_plan_error(sandbox: Sandbox, client: ScenarioClient) -> None:
    sandbox.plan_required = "This model is available on the Pro plan and above: upgrade to use it"
    with pytest.raises(PlanError, match="Pro plan"):
        client.generate({"prompt": "x"})
    assert client.get_model()["model"]["id"] == MODEL_ID  # the credentials still work


def test_get_model_is_the_live_schema(sandbox: Sandbox, client: ScenarioClient) -> None:
    live = parse_model(client.get_model(), "live", 1.0)
    assert live.model_id == MODEL_ID and "seed" in live.inputs
    assert check_value(live, "numOutputs", 5) == "numOutputs: must be a whole number from 1 to 4 (got 5)"
    sandbox.seed_input = False
    without = parse_model(client.get_model(), "live", 2.0)
    assert "seed" not in without.inputs
    with pytest.raises(PromptError, match="'seed' is not an input of model"):
        checked_prompt(
            {"prompt": "x", "seed": 7}, name="p.json", base_dir=Path("."), rules=PromptRules(without)
        )
    with pytest.raises(NotFound):
        client.get_model("model_nope")


def test_job_model_id_when_the_listing_echoes_it(sandbox: Sandbox, client: ScenarioClient) -> None:
    sandbox.echo_model_id = True
    job, _ = client.generate({"prompt": "x"})
    assert client.get_job(job.job_id).model_id == MODEL_ID
    assert client.get_job(job.job_id).job_type == "custom"


def test_job_parsing_is_tolerant() -> None:
    job = parse_job(
        {
            "jobId": "job_1",
            "jobType": "custom",
            "status": "in-progress",
            "progress": 1.7,
            "billing": {"cuCost": 2.25},
            "metadata": {"input": {"prompt": "x", "modelId": "model_a"}},
        }
    )
    assert job is not None
    assert (job.progress, job.cost, job.job_type, job.model_id) == (1.0, 2.25, "custom", "model_a")
    top = parse_job({"id": "job_2", "modelId": "model_b", "progress": -1, "billing": {"cuCost": True}})
    assert top is not None and (top.model_id, top.progress, top.cost) == ("model_b", 0.0, None)
    upload = parse_job({"jobId": "job_3", "jobType": "upload", "metadata": {"modelId": "model_c"}})
    assert upload is not None and (upload.job_type, upload.model_id, upload.input) == (
        "upload",
        "model_c",
        {},
    )


def test_list_jobs_follows_tokens_through_empty_pages(sandbox: Sandbox, client: ScenarioClient) -> None:
    since = (
        (datetime.now(UTC) - timedelta(seconds=5)).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )
    made = {client.generate({"prompt": f"p{n}"})[0].job_id for n in range(5)}
    listed = [job.job_id for job in client.list_jobs(since, page_size=2)]
    assert sorted(listed) == sorted(made)
    pages = [r for r in sandbox.requests if r.method == "GET" and r.path == "/v1/jobs"]
    assert len(pages) >= 4  # 2 + 2 + an empty page with a token + 1


def test_direct_upload_stays_a_margin_under_the_body_limit(sandbox: Sandbox, client: ScenarioClient) -> None:
    limit = DIRECT_UPLOAD_LIMIT - DIRECT_UPLOAD_MARGIN
    # The largest image that still goes base64 is found on the JSON body's size, not the image's.
    guess = limit * 3 // 4
    size = max(n for n in range(guess - 100, guess) if direct_body_size(n, "a.png") < limit)
    assert direct_body_size(size + 1, "a.png") >= limit
    for n, path in ((size, "/v1/assets"), (size + 1, "/v1/uploads")):
        data = b"\x89PNG\r\n\x1a\n" + bytes([n % 251]) * (n - 8)
        asset_id = client.upload_image(data, "a.png", "image/png")
        assert sandbox.asset_bytes(asset_id) == data
        assert [r.path for r in sandbox.requests if r.method == "POST"][
            -1 if path == "/v1/assets" else -2
        ] == path
