"""Prompt files checked against the model's schema: unknown keys, near misses, defaults, image sniffing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import Folders, run_cli, write_config

from scenario_watch.errors import MissingReference, PromptError
from scenario_watch.prepare.preparation import checked_prompt
from scenario_watch.prepare.preparation import prepare as prepare_prompt
from scenario_watch.prepare.prompt import PromptRules, parse_json
from scenario_watch.prepare.reference import image_type
from scenario_watch.prepare.schema import BUILTIN, parse_model
from scenario_watch.sandbox import Sandbox

MODEL = "model_google-gemini-pro-image-editing"
# The live schema as the 2026-08 skill describes it: no seed.
NO_SEED = parse_model(
    {
        "model": {
            "id": MODEL,
            "inputs": [
                {"name": "prompt", "type": "string", "required": {"always": True}},
                {"name": "referenceImages", "type": "file_array", "max": 14},
                {"name": "aspectRatio", "type": "string", "allowedValues": ["1:1", "16:9", "auto"]},
                {"name": "numOutputs", "type": "number", "min": 1, "max": 4, "step": 1},
            ],
        }
    },
    "live",
    None,
)
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32


def parse(body: Any, tmp_path: Path, **rules: Any) -> Any:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return checked_prompt(parse_json(data), name="p.json", base_dir=tmp_path, rules=PromptRules(**rules))


def problems(body: Any, tmp_path: Path, **rules: Any) -> list[str]:
    with pytest.raises(PromptError) as caught:
        parse(body, tmp_path, **rules)
    return caught.value.problems


def test_a_key_the_live_model_lacks_is_refused_naming_key_and_model(tmp_path: Path) -> None:
    assert problems({"prompt": "x", "seed": 7}, tmp_path, schema=NO_SEED) == [
        f"'seed' is not an input of model {MODEL} (live schema): "
        "remove it (inputs: prompt, referenceImages, aspectRatio, numOutputs, name)"
    ]
    # the built-in table has seed
    assert parse({"prompt": "x", "seed": 7}, tmp_path).inputs == {"prompt": "x", "seed": 7}


@pytest.mark.parametrize(
    ("key", "hint"),
    [("promt", "prompt"), ("numOutput", "numOutputs"), ("aspectratio", "aspectRatio"), ("nmae", "name")],
)
def test_near_misses_get_a_hint(tmp_path: Path, key: str, hint: str) -> None:
    [problem] = problems({"prompt": "x", key: 1}, tmp_path, schema=NO_SEED)
    assert problem.startswith(f"{key!r} is not an input of model {MODEL} (live schema)")
    assert problem.endswith(f"did you mean {hint!r}?")


def test_every_problem_is_listed(tmp_path: Path) -> None:
    found = problems({"numOutputs": 9, "aspectRatio": "2:1", "x": 1}, tmp_path, schema=NO_SEED)
    assert len(found) == 4
    assert "'prompt' is required: a non-empty string" in found


def test_defaults_apply_where_the_prompt_is_silent_and_are_checked(tmp_path: Path) -> None:
    prompt = parse(
        {"prompt": "x", "numOutputs": 3}, tmp_path, defaults={"numOutputs": 2, "aspectRatio": "1:1"}
    )
    assert prompt.inputs == {"prompt": "x", "aspectRatio": "1:1", "numOutputs": 3}
    assert problems({"prompt": "x"}, tmp_path, schema=NO_SEED, defaults={"seed": 7}) == [
        f"'seed' is not an input of model {MODEL} (live schema): "
        "remove it (inputs: prompt, referenceImages, aspectRatio, numOutputs) (from [defaults])"
    ]
    assert problems({"prompt": "x"}, tmp_path, schema=NO_SEED, defaults={"aspectRatio": "3:2"}) == [
        'aspectRatio: must be one of 1:1, 16:9, auto (got "3:2") (from [defaults])'
    ]
    # a prompt that sets the key itself is not held up by a bad default for it
    assert parse(
        {"prompt": "x", "aspectRatio": "1:1"}, tmp_path, schema=NO_SEED, defaults={"aspectRatio": "3:2"}
    )


def test_nothing_outside_the_schema_reaches_the_inputs(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(PNG)
    prompt = parse(
        {"prompt": "x", "name": "out", "referenceImages": ["a.png", "asset_1"], "numOutputs": None},
        tmp_path,
        schema=NO_SEED,
    )
    assert prompt.inputs == {"prompt": "x"}  # null means "not given"; references travel separately
    assert prompt.stem == "out"
    assert [(r.entry, r.asset_id, r.mime_type) for r in prompt.references] == [
        ("a.png", None, "image/png"),
        ("asset_1", "asset_1", None),
    ]
    assert "seed" not in parse({"prompt": "x"}, tmp_path).inputs  # no seed is made up


def test_json_errors_say_where_what_to_look_for_and_show_the_line(tmp_path: Path) -> None:
    assert problems(b'{"prompt": "cut', tmp_path) == [
        "not valid JSON: line 1, column 12: a string starts here and never ends — a missing closing quote: "
        '{"prompt": "cut'
    ]
    assert problems(b'{"prompt" "x"}', tmp_path) == [
        "not valid JSON: line 1, column 11: expected ':' after a key — a missing colon or quote near here: "
        '{"prompt" "x"}'
    ]
    # The comma is missing at the end of line 1; Python notices on line 2: both are shown.
    assert problems(b'{"prompt": "x"\n  "seed": 3}', tmp_path) == [
        "not valid JSON: line 2, column 3: expected ',' — a missing comma, quote or brace near here: "
        '"seed": 3} (after line 1: {"prompt": "x")'
    ]
    assert "a key in double quotes" in problems(b'{"prompt": "x",}', tmp_path)[0]
    # A long line is cut around the fault; a tab stays escaped (one line per problem).
    [long] = problems(b'{"prompt": "' + b"far " * 50 + b'" \t"seed": 1}', tmp_path)
    assert long.endswith('far far " \\t"seed": 1}') and ": ...ar far" in long, long
    assert len(long.partition("near here: ")[2]) <= 3 + 60 + 1  # "...", the excerpt, the escape's "\\"


def test_a_missing_reference_alone_can_be_waited_for(tmp_path: Path) -> None:
    with pytest.raises(MissingReference) as waiting:
        parse({"prompt": "x", "referenceImages": ["later.png", "asset_1", "later2.png"]}, tmp_path)
    assert len(waiting.value.problems) == 2 and waiting.value.hint
    with pytest.raises(PromptError) as caught:  # with another problem it is just invalid
        parse({"prompt": "x", "referenceImages": ["later.png", "../up.png"]}, tmp_path)
    assert not isinstance(caught.value, MissingReference)
    assert len(caught.value.problems) == 2


def test_prepare_prompt_reads_the_file_and_honours_reference_roots(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "logo.png").write_bytes(PNG)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    path = inbox / "x.json"
    path.write_text(json.dumps({"prompt": "x", "referenceImages": [str(shared / "logo.png")]}))
    with pytest.raises(PromptError, match="absolute path outside the inbox"):
        prepare_prompt(path, name="sub/x.json", base_dir=inbox, rules=PromptRules())
    prompt = prepare_prompt(path, name="sub/x.json", base_dir=inbox, rules=PromptRules(BUILTIN, {}, [shared]))
    assert prompt.stem == "x"
    assert prompt.references[0].path == shared / "logo.png"


def ftyp(major: bytes, *compatible: bytes) -> bytes:
    """An ISO-BMFF file's first box: size, 'ftyp', major brand, minor version, compatible brands."""
    body = b"ftyp" + major + b"\x00\x00\x00\x00" + b"".join(compatible)
    return (len(body) + 4).to_bytes(4, "big") + body + b"\x00\x00\x00\x08meta"


@pytest.mark.parametrize(
    ("head", "mime"),
    [
        (ftyp(b"avif", b"mif1", b"miaf"), "image/avif"),
        (ftyp(b"avis", b"avis", b"msf1"), "image/avif"),
        (ftyp(b"mif1", b"mif1", b"avif"), "image/avif"),
        (ftyp(b"heic", b"mif1", b"heic"), "image/heic"),
        (ftyp(b"heix", b"mif1"), "image/heic"),
        (ftyp(b"msf1", b"msf1", b"hevc"), "image/heic"),
        (ftyp(b"mif1", b"mif1"), "image/heif"),
        (ftyp(b"isom", b"isom", b"mp41"), None),  # an MP4 video
        (ftyp(b"qt  "), None),
        (PNG, "image/png"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "image/webp"),
        (b"\xff\xd8\xff\xe0", "image/jpeg"),
        (b"II*\x00", "image/tiff"),
        (b"hello", None),
    ],
)
def test_image_type_by_bytes(head: bytes, mime: str | None) -> None:
    assert image_type(head[:64]) == mime


def test_avif_and_heic_references_are_accepted(tmp_path: Path) -> None:
    (tmp_path / "a.avif").write_bytes(ftyp(b"avif", b"mif1") + b"\x00" * 100)
    (tmp_path / "b.heic").write_bytes(ftyp(b"heic", b"mif1", b"heic") + b"\x00" * 100)
    (tmp_path / "c.mp4").write_bytes(ftyp(b"isom", b"mp41") + b"\x00" * 100)
    prompt = parse({"prompt": "x", "referenceImages": ["a.avif", "b.heic"]}, tmp_path)
    assert [r.mime_type for r in prompt.references] == ["image/avif", "image/heic"]
    assert problems({"prompt": "x", "referenceImages": ["c.mp4"]}, tmp_path) == [
        "referenceImages: 'c.mp4' is not a PNG, JPEG, GIF, WebP, TIFF, AVIF or HEIC image"
    ]


def test_estimate_accepts_a_reference_under_reference_roots(folders: Folders, sandbox: Sandbox) -> None:
    shared = folders.root / "shared"
    shared.mkdir()
    (shared / "logo.png").write_bytes(PNG)
    write_config(folders, sandbox.base_url, watch={"reference_roots": [str(shared)]})
    prompt = folders.root / "logo.json"
    prompt.write_text(json.dumps({"prompt": "x", "referenceImages": [str(shared / "logo.png")]}))
    for command in ("validate", "estimate"):  # one call site: both take the same rules
        result = run_cli(command, "-c", str(folders.config), str(prompt))
        assert result.returncode == 0, result.stdout + result.stderr
    assert "logo.json: 5 creative units" in result.stdout
    assert sandbox.generate_jobs == []
