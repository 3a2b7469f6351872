"""Preparation: a claimed file made a checked Prompt, in one pass a reader follows top to bottom.

The steps, in order: what kind of file it is (a prompt file, a `.txt` sidecar in the inbox, an image
in a preset's folder) and what its keys fall back on; read it (bounded, never through a link) into
the prompt's keys; check them against the model's schema, `[defaults]` (and a preset's keys) where the
file is silent, every problem at once; check the references, once. The dispatcher's accept, `validate`,
`estimate` and the backlog's estimate all come here. What it calls are leaves: `prompt` (strict JSON,
keys against the schema, the output stem), `reference` (the reference rules), `sidecar` (the `.txt`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from scenario_watch.errors import PromptError
from scenario_watch.intake.names import Skip, classify, is_json_name, is_text_name
from scenario_watch.journal.rows import Row
from scenario_watch.prepare import sidecar
from scenario_watch.prepare.presets import Preset
from scenario_watch.prepare.prompt import (
    Prompt,
    PromptRules,
    check_keys,
    output_stem,
    parse_json,
    read_prompt_bytes,
)
from scenario_watch.prepare.reference import REFERENCES, Reference, check_references, claimed_image


def prepare(
    path: Path,
    preset: Preset | None = None,
    *,
    name: str,
    base_dir: Path,
    rules: PromptRules,
    wait_text: bool = False,
) -> Prompt:
    """Any claimed file as a checked prompt; PromptError listing every problem.

    `name` is the file's name (relative to its watched folder): its stem is the default output stem.
    `base_dir` is the folder relative references are looked up in. MissingReference when a reference
    file that may still arrive is all that is wrong; TextPending while a preset image's `.txt` may
    follow (`wait_text`); OSError when the file cannot be read.
    """
    label = os.path.basename(name)
    checked: dict[str, Reference] = {}  # references this pass has checked already (a preset's image)

    # 1. What the file is, read bounded and never through a link, as the prompt's keys.
    if preset is not None and not is_json_name(path.name):
        # An image in a preset's folder: the preset's keys, its `.txt` (if one follows) in the preset's
        # prompt, the image itself as the first reference.
        text = sidecar.preset_text(Path(name), base_dir, wait=wait_text)
        hint = f"only images (and JSON prompt files) start work in the folder of [presets.{preset.name}]"
        image = claimed_image(path, os.path.relpath(path, base_dir), label, hint)
        checked[image.entry] = image
        raw: dict[str, Any] = {**preset.keys, REFERENCES: [image.entry, *preset.keys.get(REFERENCES, [])]}
        prompt = sidecar.with_text(preset.keys.get("prompt"), text)
        if prompt is not None:
            raw["prompt"] = prompt
        defaults: Mapping[str, Any] = rules.defaults
    elif preset is None and is_text_name(path.name):
        # A `.txt` in the inbox: its text is the prompt, the image of its name the first reference.
        raw = {"prompt": sidecar.read_text(path, label), REFERENCES: [sidecar.image_of(label, base_dir)]}
        defaults = rules.defaults
    else:
        # A JSON prompt file: its own keys; in a preset's folder the preset's keys are its defaults.
        raw = parse_json(read_prompt_bytes(path))
        defaults = rules.defaults if preset is None else {**rules.defaults, **preset.keys}

    rules = replace(rules, defaults=defaults)
    return checked_prompt(raw, name=name, base_dir=base_dir, rules=rules, checked=checked)


def checked_prompt(
    raw: Mapping[str, Any],
    *,
    name: str,
    base_dir: Path,
    rules: PromptRules,
    checked: Mapping[str, Reference] | None = None,
) -> Prompt:
    """Steps 2 and 3 of `prepare`: a prompt's keys checked against the schema, then its references."""
    # 2. Every key against the model's schema, the defaults where the file is silent, and the stem.
    values, problems = check_keys(raw, rules.schema, rules.defaults)
    stem = output_stem(raw, name, problems)

    # 3. The references, once: which are asset ids, which local image files (where, and of what type).
    try:
        references = check_references(values.pop(REFERENCES, None) or [], base_dir, rules.roots, checked)
    except PromptError as exc:
        if not problems:
            raise  # a missing file alone may still arrive (MissingReference)
        # Every problem at once, references too: fixing one must not reveal the next. With other
        # problems the file is invalid anyway, so a missing reference is not waited for.
        raise PromptError(problems + exc.problems, hint=exc.hint) from None
    if problems:
        raise PromptError(problems)

    # Only what the schema lists reaches the API, in the schema's order.
    inputs = {key: values[key] for key in rules.schema.inputs if key in values}
    return Prompt(inputs=inputs, stem=stem, references=references)


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
