"""The daemon against a sandbox where the live API differs from the docs (issue 12), end to end."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import Folders, StartDaemon, generate_posts, run_cli, wait_for, write_config

from scenario_watch.sandbox import Fault, Sandbox
from scenario_watch.sandbox.models import MODEL_ID


def manifests(folders: Folders) -> dict[str, dict[str, Any]]:
    return {
        p.name.removesuffix(".manifest.json"): json.loads(p.read_text())
        for p in folders.outbox.glob("*.manifest.json")
    }


def assert_paid_once(folders: Folders, sandbox: Sandbox, names: list[str]) -> None:
    """Each prompt done with its own job, every paid job delivered to exactly one prompt."""
    found = manifests(folders)
    assert sorted(found) == sorted(names)
    jobs = [m["jobId"] for m in found.values()]
    assert len(set(jobs)) == len(jobs)  # no job shared (none adopted twice)
    assert sorted(jobs) == sorted(sandbox.generate_jobs)  # no job paid and left behind, none foreign
    for name, manifest in found.items():  # each job is the one made from this prompt's text
        assert sandbox.job(manifest["jobId"])["metadata"]["input"]["prompt"] == f"prompt {name}"


def test_live_api_that_differs_from_the_docs(folders: Folders, sandbox: Sandbox, daemon: StartDaemon) -> None:
    """No seed input, 5.5 per output, string echoes, a busy team listing, one in five answers lost."""
    sandbox.set_knobs(
        seed_input=False, cost_per_output=5.5, echo_strings=True, team_noise=0.5, lost_answer_rate=0.2
    )
    write_config(folders, sandbox.base_url, jobs={"max_in_flight": 6, "poll_interval": 0.05})
    proc = daemon()
    names = [f"p{n:02}" for n in range(20)]
    for name in names:
        folders.drop(f"{name}.json", {"prompt": f"prompt {name}", "numOutputs": 1})
    folders.drop("seeded.json", {"prompt": "prompt seeded", "seed": 7})
    wait_for(lambda: len(folders.names(folders.done)) == 20, timeout=90, what="20 done")
    wait_for(lambda: (folders.failed / "seeded.error.json").exists(), what="seeded failed")
    report = json.loads((folders.failed / "seeded.error.json").read_text())
    assert "'seed'" in report["error"] and MODEL_ID in report["error"] and report["stage"] == "validate"
    posts = generate_posts(sandbox)
    assert all("seed" not in post.body for post in posts)  # 0 requests with an input the model lacks
    assert all(post.body["prompt"] != "prompt seeded" for post in posts)  # failed locally, cost nothing
    assert_paid_once(folders, sandbox, names)
    assert all(m["creativeUnitsCost"] == 5.5 for m in manifests(folders).values())
    assert proc.saw("job.adopted")  # lost answers really happened, and were reconciled


def test_answers_arriving_after_the_client_gave_up_are_not_paid_twice(
    folders: Folders, sandbox: Sandbox, daemon: StartDaemon
) -> None:
    """A slow gateway: 30 % of generate calls answered after 3.5 s; the client gives up after 2.5 s."""
    sandbox.set_knobs(late_answer_rate=0.3, late_answer_delay=3.5)
    write_config(
        folders,
        sandbox.base_url,
        api={"request_timeout": 2.5, "lost_answer_wait": 4.5},
        jobs={"max_in_flight": 16, "poll_interval": 0.05},
    )
    proc = daemon()
    names = [f"s{n:02}" for n in range(40)]
    for name in names:
        folders.drop(f"{name}.json", {"prompt": f"prompt {name}"})
    wait_for(lambda: len(folders.names(folders.done)) == 40, timeout=150, what="40 done")
    assert_paid_once(folders, sandbox, names)
    assert proc.saw("job.reconcile_wait")  # some answers were late, and the daemon waited for them


def test_a_teammates_identical_job_is_not_taken_while_ours_may_exist(
    folders: Folders, sandbox: Sandbox, daemon: StartDaemon
) -> None:
    """Two candidates with our input but only one lost answer of ours: wait, neither adopt nor resend."""
    body = {"prompt": "prompt shared words"}
    sandbox.add_foreign_job(dict(body))
    sandbox.inject(Fault(route="generate", kind="reset", after=True))  # ours is created, the answer lost
    write_config(folders, sandbox.base_url, jobs={"timeout": 4.0})
    proc = daemon()
    folders.drop("shared.json", body)
    wait_for(lambda: (folders.failed / "shared.error.json").exists(), timeout=30, what="failed, not resent")
    report = json.loads((folders.failed / "shared.error.json").read_text())
    assert "teammate" in report["error"] and "not resent" in report["hint"]
    assert len(generate_posts(sandbox)) == 1 and proc.saw("job.reconcile_wait")


def test_foreign_and_upload_jobs_in_the_listing_do_not_block_reconcile(
    folders: Folders, sandbox: Sandbox, daemon: StartDaemon
) -> None:
    sandbox.set_knobs(echo_model_id=True)  # jobs say which model made them
    sandbox.add_foreign_job({"prompt": "someone else's"})
    sandbox.add_foreign_job({}, job_type="upload")
    sandbox.add_foreign_job({"prompt": "prompt mine"}, model_id="model_other")
    sandbox.inject(Fault(route="generate", kind="reset", after=True))
    daemon()
    folders.drop("mine.json", {"prompt": "prompt mine"})
    wait_for(lambda: (folders.done / "mine.json").exists(), timeout=30, what="done")
    assert_paid_once(folders, sandbox, ["mine"])


def test_a_lost_answer_that_made_nothing_is_resent_only_after_the_quiet_period(
    folders: Folders, sandbox: Sandbox, daemon: StartDaemon
) -> None:
    sandbox.inject(Fault(route="generate", kind="reset"))  # the request is dropped: no job
    write_config(folders, sandbox.base_url, api={"lost_answer_wait": 3.0})
    proc = daemon()
    folders.drop("quiet.json", {"prompt": "prompt quiet"})
    wait_for(lambda: (folders.done / "quiet.json").exists(), timeout=30, what="done")
    first, second = generate_posts(sandbox)
    assert second.time - first.time >= 3.0  # no verdict before the server's deadline
    assert proc.saw("job.reconciled", found=False) and len(sandbox.generate_jobs) == 1


def test_plan_403_fails_the_prompt_and_the_queue_goes_on(
    folders: Folders, sandbox: Sandbox, daemon: StartDaemon
) -> None:
    sandbox.set_knobs(plan_required="This model requires the Pro plan")
    proc = daemon()
    folders.drop("a.json", {"prompt": "prompt a"})
    folders.drop("b.json", {"prompt": "prompt b"})
    wait_for(lambda: len(folders.names(folders.failed)) == 4, what="both failed with reports")
    report = json.loads((folders.failed / "a.error.json").read_text())
    assert "Pro plan" in report["error"] and "plan" in report["hint"]
    assert not proc.saw("api.auth_failed")  # not a credentials problem: nothing blocked
    sandbox.set_knobs(plan_required=None)
    folders.drop("c.json", {"prompt": "prompt c"})
    wait_for(lambda: (folders.done / "c.json").exists(), what="the queue goes on")


def test_rate_limit_with_action_limit_lowers_the_in_flight_cap(
    folders: Folders, sandbox: Sandbox, daemon: StartDaemon
) -> None:
    sandbox.parallel_limit = 2
    sandbox.generation_seconds = 0.5
    write_config(folders, sandbox.base_url, jobs={"max_in_flight": 8, "poll_interval": 0.05})
    proc = daemon()
    for n in range(8):
        folders.drop(f"r{n}.json", {"prompt": f"prompt r{n}"})
    wait_for(lambda: len(folders.names(folders.done)) == 8, timeout=60, what="8 done")
    assert proc.saw("api.parallel_limit", limit=2)
    assert len([e for e in proc.events() if e.get("event") == "api.parallel_limit"]) == 1  # logged once
    refused = [r for r in sandbox.requests if "/generate/" in r.path and r.status == 429]
    assert len(refused) <= 8 - 2  # only the first wave meets 429s: then the daemon keeps to the limit


def test_schema_is_cached_for_a_start_without_network(folders: Folders, sandbox: Sandbox) -> None:
    sandbox.set_knobs(seed_input=False)
    (folders.inbox / "one.json").write_text(json.dumps({"prompt": "prompt one"}))
    assert run_cli("run", "--once", "-c", str(folders.config)).returncode == 0
    shown = run_cli("config", "-c", str(folders.config))
    assert "cached schema from" in shown.stdout
    # The API is gone: the cached schema (no seed) still refuses a seed, offline.
    write_config(folders, "http://127.0.0.1:9/v1")
    (folders.inbox / "two.json").write_text(json.dumps({"prompt": "prompt two", "seed": 1}))
    result = run_cli("run", "--once", "-c", str(folders.config))
    assert result.returncode == 0 and "model.schema_cached" in result.stdout
    report = json.loads((folders.failed / "two.error.json").read_text())
    assert "'seed'" in report["error"] and "cached schema" in report["error"]


@pytest.mark.parametrize("cost", [5.5, 5])
def test_estimate_prints_costs_as_numbers(folders: Folders, sandbox: Sandbox, cost: float) -> None:
    sandbox.set_knobs(cost_per_output=cost)
    prompt = folders.root / "e.json"
    prompt.write_text(json.dumps({"prompt": "prompt e", "numOutputs": 2}))
    result = run_cli("estimate", "-c", str(folders.config), str(prompt))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{prompt}: {cost * 2:g} creative units" in result.stdout
