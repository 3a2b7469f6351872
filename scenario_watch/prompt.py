"""The prompt-file model: read bounded bytes, parse strictly, validate, apply [defaults]."""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import ErrorDetails

from .config import AspectRatio, GenerateDefaults, NumOutputs, Resolution, Seed, StrictBool
from .errors import MissingReference, PromptError, UnsafeFile
from .files import open_regular, read_regular

MAX_PROMPT_BYTES = 1024 * 1024
MAX_REFERENCES = 14
MAX_REFERENCE_BYTES = 50 * 1024 * 1024
MAX_NAME_LENGTH = 120

# What each key allows, in words, for error messages a person can act on.
RULES = {
    "prompt": "a non-empty string",
    "referenceImages": f"a list of up to {MAX_REFERENCES} image file names or asset ids",
    "aspectRatio": "one of " + ", ".join(get_args(AspectRatio)),
    "resolution": "one of 1K, 2K, 4K",
    "numOutputs": "a whole number from 1 to 4",
    "useGoogleSearch": "true or false",
    "seed": "a whole number from 0 to 2147483647",
    "name": "a plain file name without / or \\ (it names the outputs)",
}

# Magic bytes of the image types Scenario accepts as references.
IMAGE_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
)


class PromptFile(BaseModel):
    """The JSON object a person drops into the inbox; only `prompt` is required."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1)
    referenceImages: list[Any] | None = Field(None, max_length=MAX_REFERENCES)
    aspectRatio: AspectRatio | None = None
    resolution: Resolution | None = None
    numOutputs: NumOutputs | None = None
    useGoogleSearch: StrictBool | None = None
    seed: Seed | None = None
    name: str | None = Field(None, min_length=1)

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("blank")
        return value


@dataclass(frozen=True)
class Reference:
    """One entry of referenceImages: a Scenario asset id, or a local image file."""

    entry: str
    asset_id: str | None = None
    path: Path | None = None
    mime_type: str | None = None


@dataclass
class Prompt:
    """A validated prompt: the generate inputs (defaults applied) and where its outputs go."""

    inputs: dict[str, Any]
    stem: str
    references: list[Reference] = field(default_factory=list)


def read_prompt_bytes(path: Path) -> bytes:
    """The file's bytes, refusing early anything too big to be a prompt."""
    data = read_regular(path, MAX_PROMPT_BYTES)  # a symlink, FIFO or folder: UnsafeFile, unread
    if len(data) > MAX_PROMPT_BYTES:
        raise PromptError([f"the file is larger than {MAX_PROMPT_BYTES // 1024} KiB: not a prompt file"])
    return data


def parse_json(data: bytes) -> dict[str, Any]:
    """Decode and parse strictly: UTF-8, one JSON object, no NaN, no duplicate keys."""
    if not data.strip():
        raise PromptError(["the file is empty"], hint='write a JSON object such as {"prompt": "a red fox"}')
    if b"\x00" in data:
        raise PromptError(["the file is binary, not JSON text"])
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        problem = f"the file is not UTF-8 text (byte {data[exc.start]:#04x} at offset {exc.start})"
        raise PromptError([problem]) from None
    try:
        value = json.loads(text, parse_constant=_no_constant, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as exc:
        raise PromptError([f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"]) from None
    except RecursionError:
        raise PromptError(["not a prompt: the JSON is nested too deeply"]) from None
    except ValueError as exc:
        raise PromptError([str(exc)]) from None
    if not isinstance(value, dict):
        kind = {list: "an array", str: "a string", type(None): "null", bool: "a boolean"}.get(
            type(value), "a number"
        )
        raise PromptError(
            [f"the file holds {kind}; a prompt file is a JSON object"],
            hint='write a JSON object such as {"prompt": "a red fox"}',
        )
    return value


def load_prompt(
    data: bytes,
    *,
    file_name: str,
    base_dir: Path,
    defaults: GenerateDefaults | None = None,
    roots: Sequence[Path] = (),
) -> Prompt:
    """Parse and validate a prompt file's bytes; raise PromptError listing every problem."""
    raw = parse_json(data)
    try:
        model = PromptFile.model_validate(raw)
    except ValidationError as exc:
        problems = [_explain(err) for err in exc.errors()]
        raise PromptError(problems) from None
    references = [check_reference(entry, base_dir, roots) for entry in (model.referenceImages or [])]
    stem = safe_stem(model.name) if model.name is not None else _sanitise(Path(file_name).stem)
    inputs: dict[str, Any] = {}
    if defaults is not None:
        inputs.update(defaults.model_dump(exclude_none=True))
    inputs.update(model.model_dump(exclude_none=True, exclude={"name", "referenceImages"}))
    return Prompt(inputs=inputs, stem=stem, references=references)


def check_reference(entry: Any, base_dir: Path, roots: Sequence[Path] = ()) -> Reference:
    """Check one referenceImages entry offline: an asset id, or an image file in base_dir or a root."""
    if not isinstance(entry, str) or not entry:
        raise PromptError([f"referenceImages: each entry must be a non-empty string (got {_show(entry)})"])
    if "\x00" in entry:  # the OS refuses such paths with ValueError, not OSError
        raise PromptError([f"referenceImages: {entry!r} contains a NUL character"])
    if re.fullmatch(r"asset_[A-Za-z0-9_-]+", entry):
        return Reference(entry, asset_id=entry)
    path = base_dir / entry  # an absolute entry stays absolute
    problem = _reference_path_problem(Path(entry), path, [base_dir, *roots])
    if problem:
        raise PromptError([f"referenceImages: {entry!r} {problem}"])
    # In the inbox a reference is the file itself, never a symlink; under a reference root a symlink
    # is fine once it resolves inside the roots (checked above): open what it resolves to.
    in_inbox = _inside(Path(os.path.abspath(path)), [Path(os.path.abspath(base_dir))])
    target = path if in_inbox else path.resolve()
    try:
        with open_regular(target) as handle:
            size = os.fstat(handle.fileno()).st_size
            head = handle.read(16)
    except UnsafeFile as exc:
        problem = f"referenceImages: {entry!r} is {exc.kind}: refused (name an image file)"
        raise PromptError([problem]) from None
    except FileNotFoundError:
        raise MissingReference(
            [f"referenceImages: {entry!r} does not exist in {path.parent}"],
            hint="drop the image into the inbox beside the prompt file, or fix the name",
        ) from None
    except OSError as exc:
        raise PromptError([f"referenceImages: {entry!r} cannot be read: {exc.strerror}"]) from None
    mime = image_type(head)
    if mime is None:
        raise PromptError([f"referenceImages: {entry!r} is not a PNG, JPEG, GIF, WebP or TIFF image"])
    if size > MAX_REFERENCE_BYTES:
        raise PromptError([f"referenceImages: {entry!r} is larger than {MAX_REFERENCE_BYTES >> 20} MiB"])
    return Reference(entry, path=path, mime_type=mime)


def image_type(head: bytes) -> str | None:
    """The MIME type of an image judged by its first bytes, or None."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    for signature, mime in IMAGE_SIGNATURES:
        if head.startswith(signature):
            return mime
    return None


def safe_stem(name: str) -> str:
    """A `name` from a prompt file as an output stem; refuses anything that would leave the outbox."""
    if "/" in name or "\\" in name or "\x00" in name or name.strip() in (".", ".."):
        raise PromptError([f"name: {name!r} must be {RULES['name']}"])
    return _sanitise(name)


def _sanitise(name: str) -> str:
    cleaned = re.sub(r"[^\w.\- ]", "_", name).strip(" .")[:MAX_NAME_LENGTH]
    return cleaned or "prompt"


def _reference_path_problem(entry: Path, path: Path, roots: list[Path]) -> str | None:
    """Why a reference path is refused: it must stay inside the inbox or a reference root."""
    if ".." in entry.parts:
        return "leaves the inbox (..); name a file inside the inbox"
    resolved_roots = [root.resolve() for root in roots]
    if entry.is_absolute() and not _inside(Path(os.path.abspath(path)), resolved_roots):
        return "is an absolute path outside the inbox and [watch] reference_roots"
    if not _inside(path.resolve(), resolved_roots):
        return "is a symlink that points outside the inbox and [watch] reference_roots"
    return None


def _inside(candidate: Path, roots: Sequence[Path]) -> bool:
    return any(candidate == root or root in candidate.parents for root in roots)


def _explain(err: ErrorDetails) -> str:
    loc = [str(part) for part in err["loc"]]
    key = loc[0] if loc else "?"
    if err["type"] == "extra_forbidden":
        close = difflib.get_close_matches(key, list(RULES), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else f" (allowed: {', '.join(RULES)})"
        return f"unknown key {key!r}{hint}"
    if err["type"] == "missing":
        return f"{key!r} is required: {RULES.get(key, '')}".rstrip(": ")
    if key == "referenceImages" and err["type"] == "list_type" and isinstance(err["input"], str):
        return f'referenceImages must be a list, even for one image: ["{err["input"]}"]'
    if key == "referenceImages" and err["type"] == "too_long":
        return f"referenceImages has more than {MAX_REFERENCES} entries"
    return f"{key}: must be {RULES.get(key, err['msg'])} (got {_show(err['input'])})"


def _show(value: Any) -> str:
    shown = json.dumps(value, ensure_ascii=False, default=str)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def _no_constant(name: str) -> Any:
    raise ValueError(f"not valid JSON: {name} is not a number JSON allows")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"key {key!r} appears twice")
        result[key] = value
    return result
