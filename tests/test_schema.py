"""The model's input schema: parsing the live answer, the built-in table, checking values, caching."""

from __future__ import annotations

from typing import Any

import pytest

from scenario_watch.prepare.schema import BUILTIN, ModelInput, check_value, from_json, parse_model, to_json

# Shaped like GET /v1/models/{id} (scenario-sdk 2.4.0 ModelRetrieveResponse): no seed, as the 2026-08
# skill says of Gemini image models; extra fields the daemon does not use.
LIVE: dict[str, Any] = {
    "model": {
        "id": "model_google-gemini-pro-image-editing",
        "type": "custom",
        "status": "trained",
        "name": "Gemini 3 Pro Image Editing",
        "inputs": [
            {
                "name": "prompt",
                "type": "string",
                "required": {"always": True},
                "prompt": True,
                "label": "Prompt",
            },
            {"name": "referenceImages", "type": "file_array", "kind": "image", "max": 14, "label": "Images"},
            {
                "name": "aspectRatio",
                "type": "string",
                "allowedValues": ["21:9", "16:9", "1:1", "9:16", "auto"],
                "default": "auto",
            },
            {"name": "resolution", "type": "string", "allowedValues": ["1K", "2K", "4K"], "costImpact": True},
            {"name": "useGoogleSearch", "type": "boolean", "default": False, "costImpact": True},
            {"name": "numOutputs", "type": "number", "min": 1, "max": 4, "step": 1, "default": 1},
            {"name": "strength", "type": "number", "min": 0, "max": 1, "step": 0.05, "hint": "how much"},
            {"name": "tags", "type": "string_array", "maxLength": 3, "required": {"ifDefined": {"x": "y"}}},
            {"type": "string"},  # no name: skipped, not fatal
        ],
    }
}


def test_parse_a_live_model() -> None:
    schema = parse_model(LIVE, "live", 1_800_000_000.0)
    assert schema.model_id == "model_google-gemini-pro-image-editing"
    assert list(schema.inputs) == [
        "prompt",
        "referenceImages",
        "aspectRatio",
        "resolution",
        "useGoogleSearch",
        "numOutputs",
        "strength",
        "tags",
    ]
    assert schema.inputs["prompt"].required
    assert not schema.inputs["tags"].required  # conditional: the API judges it
    assert schema.inputs["tags"].max == 3  # maxLength bounds an array's items
    assert schema.inputs["resolution"].cost_impact and not schema.inputs["aspectRatio"].cost_impact
    assert schema.inputs["numOutputs"] == ModelInput("numOutputs", "number", None, 1, 4, 1, 1, False, False)
    assert "seed" not in schema.inputs
    assert schema.describe() == "live schema of model_google-gemini-pro-image-editing (8 inputs)"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([], "not a JSON object"),
        ({"model": {"id": "m"}}, "lists no inputs"),
        ({"model": {"id": "m", "inputs": {"prompt": {}}}}, "lists no inputs"),
        ({"model": {"id": "m", "inputs": [{"name": "image", "type": "file"}]}}, "has no prompt input"),
    ],
)
def test_unusable_model_answers_say_why(body: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_model(body, "live", None)


def test_builtin_is_the_documented_table() -> None:
    assert list(BUILTIN.inputs) == [
        "prompt",
        "referenceImages",
        "aspectRatio",
        "resolution",
        "useGoogleSearch",
        "numOutputs",
        "seed",
    ]
    assert BUILTIN.inputs["referenceImages"].max == 14
    assert BUILTIN.inputs["seed"].max == 2147483647
    assert BUILTIN.describe() == "built-in schema (the API could not be asked)"


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("numOutputs", 2, None),
        ("numOutputs", 9, "numOutputs: must be a whole number from 1 to 4 (got 9)"),
        ("numOutputs", 0, "numOutputs: must be a whole number from 1 to 4 (got 0)"),
        ("numOutputs", 2.0, "numOutputs: must be a whole number from 1 to 4 (got 2.0)"),
        ("numOutputs", 1.5, "numOutputs: must be a whole number from 1 to 4 (got 1.5)"),
        ("numOutputs", True, "numOutputs: must be a whole number from 1 to 4 (got true)"),
        ("numOutputs", "2", 'numOutputs: must be a whole number from 1 to 4 (got "2")'),
        ("numOutputs", None, None),  # not given: fine, the API's default
        ("strength", 0.35, None),
        ("strength", 0.33, "strength: must be a number from 0 to 1 in steps of 0.05 (got 0.33)"),
        ("strength", 1.5, "strength: must be a number from 0 to 1 in steps of 0.05 (got 1.5)"),
        ("strength", False, "strength: must be a number from 0 to 1 in steps of 0.05 (got false)"),
        ("useGoogleSearch", True, None),
        ("useGoogleSearch", 1, "useGoogleSearch: must be true or false (got 1)"),
        ("useGoogleSearch", "yes", 'useGoogleSearch: must be true or false (got "yes")'),
        ("aspectRatio", "16:9", None),
        ("aspectRatio", "4:3", 'aspectRatio: must be one of 21:9, 16:9, 1:1, 9:16, auto (got "4:3")'),
        ("resolution", 2, "resolution: must be one of 1K, 2K, 4K (got 2)"),
        ("prompt", "a fox", None),
        ("prompt", "   ", 'prompt: must be a non-empty string (got "   ")'),
        ("prompt", 5, "prompt: must be a non-empty string (got 5)"),
        ("prompt", None, "'prompt' is required: a non-empty string"),
        ("referenceImages", ["a.png", "asset_x"], None),
        ("referenceImages", "a.png", 'referenceImages must be a list, even for one image: ["a.png"]'),
        ("referenceImages", ["x"] * 15, "referenceImages has more than 14 entries"),
        ("referenceImages", ["a.png", 3], "referenceImages: each entry must be a non-empty string (got 3)"),
        ("tags", ["a", "b", "c", "d"], "tags has more than 3 entries"),
        ("seed", 7, "'seed' is not an input of model model_google-gemini-pro-image-editing (live schema)"),
    ],
)
def test_check_value(key: str, value: Any, problem: str | None) -> None:
    found = check_value(parse_model(LIVE, "live", None), key, value)
    if problem is None:
        assert found is None
    else:
        assert found is not None and found.startswith(problem), found


def test_builtin_seed_bounds() -> None:
    assert check_value(BUILTIN, "seed", 2147483647) is None
    assert check_value(BUILTIN, "seed", 2147483648) == (
        "seed: must be a whole number from 0 to 2147483647 (got 2147483648)"
    )
    assert check_value(BUILTIN, "seed", -1) is not None


def test_unknown_key_hints_a_near_miss_or_lists_the_inputs() -> None:
    assert check_value(BUILTIN, "promt", "x") == (
        "'promt' is not an input of model model_google-gemini-pro-image-editing (built-in schema): "
        "did you mean 'prompt'?"
    )
    message = check_value(BUILTIN, "style", "x")
    assert message is not None and message.endswith(
        "remove it (inputs: prompt, referenceImages, aspectRatio, resolution, useGoogleSearch, "
        "numOutputs, seed)"
    )


def test_json_round_trip_comes_back_cached() -> None:
    live = parse_model(LIVE, "live", 1_800_000_000.0)
    cached = from_json(to_json(live))
    assert cached.source == "cached"
    assert cached.inputs == live.inputs
    assert cached.model_id == live.model_id
    assert cached.fetched_at == 1_800_000_000.0
    assert cached.describe() == "cached schema from 2027-01-15 08:00 UTC"
    assert from_json(to_json(BUILTIN)).inputs == BUILTIN.inputs
