"""The simulated model: its live input schema (GET /v1/models/{id}), validation driven by it, pricing."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, TypeGuard

MODEL_ID = "model_google-gemini-pro-image-editing"
ASPECT_RATIOS = ("21:9", "16:9", "3:2", "4:3", "5:4", "1:1", "4:5", "3:4", "2:3", "9:16", "auto")
RESOLUTIONS = ("1K", "2K", "4K")
MAX_REFERENCES = 14
SEED_MAX = 2_147_483_647
MODEL_CREATED_AT = "2025-11-20T00:00:00.000Z"

# The inputs in the order the API lists them; `seed` is appended only while the seed knob is on.
BASE_INPUTS: tuple[dict[str, Any], ...] = (
    {
        "name": "prompt",
        "type": "string",
        "label": "Prompt",
        "required": {"always": True},
        "description": "What to generate, or how to edit the reference images.",
    },
    {
        "name": "referenceImages",
        "type": "file_array",
        "kind": "image",
        "label": "Reference images",
        "max": MAX_REFERENCES,
        "description": "Asset ids of up to 14 images to edit or draw from.",
    },
    {"name": "aspectRatio", "type": "string", "allowedValues": list(ASPECT_RATIOS), "default": "auto"},
    {
        "name": "resolution",
        "type": "string",
        "allowedValues": list(RESOLUTIONS),
        "default": "2K",
        "costImpact": True,
    },
    {"name": "useGoogleSearch", "type": "boolean", "default": False, "costImpact": True},
    {"name": "numOutputs", "type": "number", "min": 1, "max": 4, "step": 1, "default": 1, "costImpact": True},
)
SEED_INPUT: dict[str, Any] = {
    "name": "seed",
    "type": "number",
    "min": 0,
    "max": SEED_MAX,
    "step": 1,
    "hint": "Leave empty for a random seed.",
}


class ApiError(Exception):
    """An API answer other than success: HTTP status, the `reason` and optional `details`."""

    def __init__(self, status: int, reason: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.status, self.reason, self.details = status, reason, details


def model_inputs(seed_input: bool) -> list[dict[str, Any]]:
    """The model's input list as GET /v1/models/{id} shows it (fresh copies)."""
    return copy.deepcopy([*BASE_INPUTS, SEED_INPUT] if seed_input else list(BASE_INPUTS))


def model_answer(model_id: str, seed_input: bool) -> dict[str, Any]:
    """GET /v1/models/{modelId}; 404 for any model but ours."""
    if model_id != MODEL_ID:
        raise ApiError(404, f"Model not found: {model_id}")
    return {
        "model": {
            "id": MODEL_ID,
            "name": "Gemini 3 Pro Image Editing",
            "type": "custom",  # the SDK's enum has no Gemini type; third-party models are "custom" there
            "status": "trained",
            "source": "other",
            "privacy": "public",
            "custom": False,
            "capabilities": ["txt2img", "img2img"],
            "collectionIds": [],
            "exampleAssetIds": [],
            "tags": [],
            "trainingImagesNumber": 0,
            "createdAt": MODEL_CREATED_AT,
            "updatedAt": MODEL_CREATED_AT,
            "inputs": model_inputs(seed_input),
        }
    }


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(spec: dict[str, Any], value: Any, known_asset: Callable[[str], bool]) -> None:
    """Check one input against its schema entry; ApiError(400) names the field."""
    name, kind = spec["name"], spec["type"]
    if kind == "string":
        allowed = spec.get("allowedValues")
        if allowed is not None and value not in allowed:
            raise ApiError(400, f"{name} must be one of {', '.join(allowed)}")
        if not isinstance(value, str) or (spec.get("required") and not value.strip()):
            raise ApiError(400, f"{name} is required and must be a non-empty string")
    elif kind == "file_array":
        if not isinstance(value, list):  # the live API drops a bare string silently; the sandbox says so
            raise ApiError(400, f"{name} must be an array of asset ids")
        if len(value) > spec["max"]:
            raise ApiError(400, f"{name} accepts at most {spec['max']} images, got {len(value)}")
        for index, ref in enumerate(value):
            if not isinstance(ref, str) or not known_asset(ref):
                raise ApiError(400, f"{name}[{index}]: asset {ref!r} not found")
    elif kind == "number":
        if not _is_int(value) or not spec["min"] <= value <= spec["max"]:
            raise ApiError(400, f"{name} must be an integer from {spec['min']} to {spec['max']}")
    elif not isinstance(value, bool):
        raise ApiError(400, f"{name} must be a boolean")


def validate_inputs(body: Any, known_asset: Callable[[str], bool], seed_input: bool) -> None:
    """Check generate inputs against the list GET /v1/models shows; ApiError(400) names the bad field."""
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object of model inputs")
    inputs = model_inputs(seed_input)
    unknown = sorted(set(body) - {spec["name"] for spec in inputs})
    if unknown:
        raise ApiError(400, f"Unknown parameter(s) for this model: {', '.join(unknown)}")
    for spec in inputs:
        if spec["name"] in body:
            _check(spec, body[spec["name"]], known_asset)
        elif spec.get("required", {}).get("always"):
            raise ApiError(400, f"{spec['name']} is required and must be a non-empty string")


def number(value: float) -> int | float:
    """A whole number as an int (so default answers keep today's integers), anything else as a float."""
    return int(value) if float(value).is_integer() else value


def cost_of(body: dict[str, Any], per_output: float) -> int | float:
    """Creative units: `per_output` per output (doubled at 4K), plus 2 with Google search."""
    each = per_output * (2 if body.get("resolution") == "4K" else 1)
    return number(each * int(body.get("numOutputs", 1)) + (2 if body.get("useGoogleSearch") else 0))


def estimate(body: dict[str, Any], per_output: float) -> dict[str, Any]:
    """The cost fields of a generate or dryRun answer."""
    cost = cost_of(body, per_output)
    return {"creativeUnitsCost": cost, "creativeUnitsDiscount": 0, "costDetails": {"custom-generation": cost}}


def echoed(body: dict[str, Any], echo_strings: bool) -> dict[str, Any]:
    """The inputs as metadata.input shows them: numbers as strings when the API normalises them so."""
    if not echo_strings:
        return copy.deepcopy(body)
    return {
        key: str(value)
        if isinstance(value, int | float) and not isinstance(value, bool)
        else copy.deepcopy(value)
        for key, value in body.items()
    }
