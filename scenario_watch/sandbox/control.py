"""The /_sandbox/ control endpoints: drive a sandbox that runs in another process (no auth, never faulted)."""

from __future__ import annotations

from dataclasses import asdict

from scenario_watch.sandbox.endpoints import INVALID, Context, Reply, parse_json
from scenario_watch.sandbox.faults import Fault


def control(ctx: Context, method: str, path: str, raw: bytes) -> Reply:
    """The /_sandbox/ endpoints: drive a sandbox that runs in another process (no auth, never faulted)."""
    body = parse_json(raw)
    try:
        if body is INVALID:
            raise ValueError("the body is not valid JSON")
        match method, path:
            case "POST", "/_sandbox/faults":
                faults = [Fault.from_json(item) for item in (body if isinstance(body, list) else [body])]
                for fault in faults:
                    ctx.faults.add(fault)
                return Reply(204)
            case "DELETE", "/_sandbox/faults":
                ctx.faults.clear()
                return Reply(204)
            case "GET", "/_sandbox/requests":
                return Reply(200, [asdict(record) for record in ctx.recorder.snapshot()])
            case "GET", "/_sandbox/state":
                return Reply(
                    200, {"generate_jobs": list(ctx.world.generate_jobs), "jobs": ctx.world.statuses()}
                )
            case "GET", "/_sandbox/knobs":
                return Reply(200, ctx.world.knobs())
            case "POST", "/_sandbox/knobs":
                ctx.world.set_knobs(body)
                return Reply(200, ctx.world.knobs())
            case "POST", "/_sandbox/fail-next-jobs":
                if not isinstance(body, dict):
                    raise ValueError("expected a JSON object {n, error, hint, status}")
                n = body.get("n", 1)
                if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                    raise ValueError("n must be a positive integer")
                ctx.world.fail_next_jobs(
                    n,
                    str(body.get("error", "Generation failed")),
                    str(body.get("hint", "")),
                    str(body.get("status", "failure")),
                )
                return Reply(204)
        return Reply(404, {"reason": f"No control endpoint {method} {path}"})
    except ValueError as exc:
        return Reply(400, {"reason": str(exc)})
