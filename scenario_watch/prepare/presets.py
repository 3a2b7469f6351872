"""Preset folders: a standing prompt from the configuration; each image dropped in its folder is one prompt.

`[presets.NAME]` holds prompt-file keys (checked against the model's schema at start) and `folder`
(default `<inbox>/NAME/`). An image there becomes the preset's prompt with the image as its first
reference; a JSON prompt file there takes the preset's keys as its defaults. Prompts from a preset
are named `NAME/<file>` in the journal, so their outputs go to `<outbox>/NAME/` (and the originals to
`done/NAME/` or `failed/NAME/`), just as a subfolder of a recursive inbox keeps its name.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError

from scenario_watch.config import Settings
from scenario_watch.errors import ConfigError, PromptError, UnsafeFile
from scenario_watch.files import open_regular
from scenario_watch.intake.names import Skip, classify, is_json_name, is_text_name
from scenario_watch.journal.rows import Row
from scenario_watch.prepare import sidecar
from scenario_watch.prepare.prompt import (
    HEAD_BYTES,
    IMAGE_KINDS,
    MAX_REFERENCE_BYTES,
    REFERENCES,
    Prompt,
    PromptRules,
    image_type,
    parse_prompt,
    prepare_prompt,
)
from scenario_watch.prepare.schema import BUILTIN, ModelSchema, check_value
from scenario_watch.sections import ImageSettings, OutboxSettings

SectionT = TypeVar("SectionT", ImageSettings, OutboxSettings)

PRESET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


# Keys of [images] and [outbox] a preset may set for its own prompts (over the global sections).
IMAGE_KEYS = frozenset(ImageSettings.model_fields)  # normalize, max_side
OUTBOX_KEYS = frozenset(OutboxSettings.model_fields)  # name, format, quality, metadata


@dataclass(frozen=True)
class Preset:
    """One `[presets.NAME]`: its folder, its prompt-file keys, its [images] and [outbox] settings."""

    name: str
    folder: Path
    keys: dict[str, Any]
    images: ImageSettings = field(default_factory=ImageSettings)
    outbox: OutboxSettings = field(default_factory=OutboxSettings)

    def rules(self, base: PromptRules) -> PromptRules:
        """The rules of a JSON prompt file in this folder: the preset's keys over `[defaults]`."""
        return replace(base, defaults={**base.defaults, **self.keys})


def load_presets(settings: Settings, schema: ModelSchema | None = BUILTIN) -> dict[str, Preset]:
    """Every `[presets.NAME]`, checked; ConfigError naming the preset and the key otherwise.

    `schema` None checks names and folders only: the daemon checks the keys once it has the live schema.
    """
    presets: dict[str, Preset] = {}
    for name, raw in settings.presets.items():
        where = f"[presets.{name}]"
        if not PRESET_NAME.fullmatch(name):
            raise ConfigError(
                f"{where}: a preset's name must be letters, digits, '_', '-' or '.' (it names a folder)"
            )
        keys = dict(raw.model_extra or {})
        images = _section(ImageSettings, settings.images, keys, IMAGE_KEYS, where)
        outbox = _section(OutboxSettings, settings.outbox, keys, OUTBOX_KEYS, where)
        problems = [] if schema is None else _problems(schema, keys, required=True)
        if problems:
            raise ConfigError(f"invalid configuration: {where} " + "; ".join(problems))
        presets[name] = Preset(name, raw.folder or settings.folders.inbox / name, keys, images, outbox)
    _check_folders(presets, settings)
    return presets


def _section(
    model: type[SectionT], base: SectionT, keys: dict[str, Any], own: frozenset[str], where: str
) -> SectionT:
    """The global section with the preset's own keys of it (taken out of `keys`), checked the same way."""
    mine = {key: keys.pop(key) for key in list(keys) if key in own}
    if not mine:
        return base
    try:
        return model.model_validate({**base.model_dump(), **mine})
    except ValidationError as exc:
        problems = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()]
        raise ConfigError(f"invalid configuration: {where} " + "; ".join(problems)) from None


def _problems(schema: ModelSchema, keys: Mapping[str, Any], *, required: bool) -> list[str]:
    """What is wrong with prompt keys for the model (`required`: a missing required input too)."""
    problems = [problem for key, value in keys.items() if (problem := check_value(schema, key, value))]
    if required:
        problems += [
            problem
            for key in schema.inputs
            if key not in keys and (problem := check_value(schema, key, None))
        ]
    # Every message names the key; the model is named once, where the message does not already.
    return [p if schema.model_id in p else f"{p} (model {schema.model_id}, {schema.label})" for p in problems]


def check_against(settings: Settings, schema: ModelSchema) -> dict[str, Preset]:
    """At start, with the model's schema as the API tells it now: every preset and `[defaults]`.

    A preset key or a `[defaults]` key the model does not take (or a value it refuses) is a ConfigError
    naming the key and the model: found at start, not on every prompt.
    """
    defaults = settings.defaults.model_dump(exclude_none=True)
    problems = _problems(schema, defaults, required=False)
    if problems:
        raise ConfigError("invalid configuration: [defaults] " + "; ".join(problems))
    return load_presets(settings, schema)


def _check_folders(presets: Mapping[str, Preset], settings: Settings) -> None:
    """Refuse folders that would take another folder's files, or feed a preset its own outputs."""
    folders = settings.folders
    special = {
        folders.inbox: "the inbox",
        folders.done: "done/",
        folders.failed: "failed/",
        folders.state: "state/",
    }
    owner: dict[Path, str] = {}
    for preset in presets.values():
        where = f"[presets.{preset.name}] folder"
        if preset.folder in special:
            raise ConfigError(
                f"{where} is {special[preset.folder]} ({preset.folder}): give it a folder of its own"
            )
        if preset.folder in owner:
            raise ConfigError(
                f"{where} is also the folder of [presets.{owner[preset.folder]}]: {preset.folder}"
            )
        owner[preset.folder] = preset.name
    # A preset's outputs go to <outbox>/NAME/: a preset watching that folder is fed by it.
    feeds = {name: owner.get(folders.outbox / name) for name in presets}
    for start in presets:
        seen, current = [start], feeds[start]
        while current is not None:
            if current in seen:
                loop = " -> ".join([*seen[seen.index(current) :], current])
                raise ConfigError(
                    f"[presets.{start}]: its outputs would come back to it ({loop}): every image would be "
                    "generated again and again; point the folders elsewhere"
                )
            seen.append(current)
            current = feeds[current]


def image_prompt(
    image: Path, preset: Preset, *, name: str, base_dir: Path, rules: PromptRules, text: str | None = None
) -> Prompt:
    """The prompt an image makes in a preset folder: the preset's keys, the image as first reference;
    `text` (its `.txt`) goes into the preset's prompt where it says `{text}`, else after it."""
    label = os.path.basename(name)
    try:
        with open_regular(image) as handle:
            size = os.fstat(handle.fileno()).st_size
            head = handle.read(HEAD_BYTES)
    except UnsafeFile as exc:
        raise PromptError([f"{label} is {exc.kind}: refused, never read"], hint=exc.hint) from None
    if image_type(head) is None:
        raise PromptError(
            [f"{label} is not {IMAGE_KINDS} (judged by its bytes, not its name)"],
            hint=f"only images (and JSON prompt files) start work in the folder of [presets.{preset.name}]",
        )
    if size > MAX_REFERENCE_BYTES:
        raise PromptError(
            [f"{label} is larger than {MAX_REFERENCE_BYTES >> 20} MiB, the most Scenario takes"]
        )
    entry = os.path.relpath(image, base_dir)
    body = {**preset.keys, REFERENCES: [entry, *preset.keys.get(REFERENCES, [])]}
    prompt = sidecar.with_text(preset.keys.get("prompt"), text)
    if prompt is not None:
        body["prompt"] = prompt
    return parse_prompt(json.dumps(body).encode(), name=name, base_dir=base_dir, rules=rules)


def prepare(
    path: Path,
    preset: Preset | None,
    *,
    name: str,
    base_dir: Path,
    rules: PromptRules,
    wait_text: bool = False,
) -> Prompt:
    """Any claimed file as a prompt: a prompt file (with its preset's defaults), a `.txt` beside an
    image in the inbox, or a preset's image (with its `.txt`: TextPending while `wait_text`)."""
    if preset is None:
        if is_text_name(path.name):
            return sidecar.text_prompt(path, name=name, base_dir=base_dir, rules=rules)
        return prepare_prompt(path, name=name, base_dir=base_dir, rules=rules)
    if is_json_name(path.name):
        return prepare_prompt(path, name=name, base_dir=base_dir, rules=preset.rules(rules))
    text = sidecar.preset_text(Path(name), base_dir, wait=wait_text)
    return image_prompt(path, preset, name=name, base_dir=base_dir, rules=rules, text=text)


def prompt_folder(row: Row, inbox: Path, presets: Mapping[str, Preset]) -> Path:
    """The folder a prompt arrived in, where its relative references are looked up."""
    preset = presets.get(row.preset) if row.preset else None
    return preset.folder if preset is not None else row.folder(inbox)


def find_preset(presets: Mapping[str, Preset], name: str | None) -> Preset | None:
    """The preset a row names; PromptError when the configuration no longer has it."""
    if name is None:
        return None
    preset = presets.get(name)
    if preset is None:
        raise PromptError(
            [f"[presets.{name}] is no longer in the configuration"], hint="add it back and retry"
        )
    return preset


def select_preset(
    settings: Settings | None, name: str | None, schema: ModelSchema | None = BUILTIN
) -> Preset | None:
    """The preset named by `--preset` (checked as at start; `schema` None: its folder only)."""
    if name is None:
        return None
    presets = load_presets(settings, schema) if settings is not None else {}
    if name not in presets:
        raise ConfigError(
            f"no [presets.{name}] in the configuration (presets: {', '.join(presets) or 'none'})"
        )
    return presets[name]


def prepare_file(path: Path, preset: Preset | None, rules: PromptRules) -> Prompt:
    """A file named on the command line, judged as the daemon judges it in the inbox or preset folder."""
    verdict = classify(path.name, ".", recursive=False, images=preset is not None)
    if isinstance(verdict, Skip):  # one rule for the watcher and validate: .JSON is fine, .txt is not
        hint = (
            "name it *.json, or NAME.txt beside NAME.jpg"
            if preset is None
            else "give it an image's name (.png, .jpg ...) or *.json"
        )
        raise PromptError([f"{verdict.reason}: the daemon would skip it"], hint=hint)
    return prepare(path, preset, name=path.name, base_dir=path.parent, rules=rules)
