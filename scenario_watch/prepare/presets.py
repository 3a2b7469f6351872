"""Preset folders, the configuration side: each `[presets.NAME]` loaded and checked, with its folder.

`[presets.NAME]` holds prompt-file keys (checked against the model's schema at start) and `folder`
(default `<inbox>/NAME/`). An image there becomes the preset's prompt with the image as its first
reference; a JSON prompt file there takes the preset's keys as its defaults. Prompts from a preset
are named `NAME/<file>` in the journal, so their outputs go to `<outbox>/NAME/` (and the originals to
`done/NAME/` or `failed/NAME/`), just as a subfolder of a recursive inbox keeps its name. How one
file in the folder becomes a prompt is preparation's (`preparation.py`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError

from scenario_watch.config import Settings
from scenario_watch.errors import ConfigError
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
