"""naming: output name templates, checked at start, rendered safely whatever the values."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import PurePosixPath

import pytest

from scenario_watch.deliver.naming import DEFAULT, MAX_COMPONENT, check, fields, render
from scenario_watch.errors import ConfigError

WHEN = datetime(2026, 3, 1, 23, 59, 7, tzinfo=timezone(timedelta(hours=-2)))  # 01:59:07 UTC, 2 March


def name(template: str = DEFAULT, **values: object) -> PurePosixPath:
    arguments: dict[str, object] = {"stem": "beach", "index": 1, "when": WHEN} | values
    return render(template, **arguments)


def test_the_default_is_stem_underscore_index() -> None:
    assert name() == PurePosixPath("beach_1")
    assert fields(DEFAULT) == {"stem", "index"}


def test_every_token() -> None:
    template = "{date}/{preset}/{model}/{job_id}_{time}_{stem}_{index:03}"
    got = name(template, preset="recolor", job_id="job_1", model="model_x", index=2)
    assert got == PurePosixPath("2026-03-02/recolor/model_x/job_1_015907_beach_002")


def test_an_empty_preset_folder_is_left_out() -> None:
    assert name("{date}/{preset}/{stem}_{index}") == PurePosixPath("2026-03-02/beach_1")
    assert name("{preset}_{stem}") == PurePosixPath("_beach")


@pytest.mark.parametrize(
    "stem",
    [
        "../../etc/passwd",
        "..",
        ".",
        "/abs/path",
        "a\\b",
        "x\x00y",
        "new\nline",
        ".hidden",
        "",
        "   ",
        "a/../../b",
    ],
)
def test_hostile_values_stay_one_name_inside_the_outbox(stem: str) -> None:
    for template in (DEFAULT, "{stem}", "{date}/{stem}/{index}"):
        got = name(template, stem=stem, preset="../up", model="/m", job_id="..")
        assert not got.is_absolute()
        assert ".." not in got.parts and "." not in got.parts
        assert not any(part.startswith(".") for part in got.parts)
        assert len(got.parts) == template.count("/") + 1  # a value never adds or removes a folder
        assert all("\x00" not in part and "\n" not in part and "\\" not in part for part in got.parts)


def test_a_long_value_is_cut_to_fit_a_file_name_keeping_the_rest() -> None:
    got = name("{stem}_{index}", stem="é" * 500, index=3)
    assert len(str(got).encode()) <= MAX_COMPONENT and str(got).endswith("_3")
    assert str(got).startswith("éé")  # cut on a character boundary, not inside one


def test_preset_hostile_values_in_folders() -> None:
    assert name("{preset}/{stem}", preset="../../x") == PurePosixPath("_._.._x/beach")
    assert name("{preset}/{stem}", preset=".") == PurePosixPath("_/beach")


def test_date_and_time_need_an_aware_moment() -> None:
    with pytest.raises(ValueError, match="aware"):
        name(when=datetime(2026, 1, 1))  # naive: the point of the test
    assert name("{date}_{time}", when=datetime(2026, 1, 1, 5, 6, 7, tzinfo=UTC)) == PurePosixPath(
        "2026-01-01_050607"
    )


@pytest.mark.parametrize(
    ("template", "says"),
    [
        ("{stem}_{idx}", "unknown token {idx} (did you mean {index}?)"),
        ("{promt}", "unknown token {promt}"),
        ("{}", "unknown token {}"),
        ("{stem.upper}", "unknown token"),
        ("{stem!r}", "only {index} takes a format"),
        ("{stem:>9}", "only {index} takes a format"),
        ("{index:/>9}", "only {index} takes a format"),
        ("../{stem}", "must stay inside the outbox"),
        ("{date}/../{stem}", "must stay inside the outbox"),
        ("./{stem}", "inside the outbox"),
        ("/srv/{stem}", "absolute path"),
        ("{date}//{stem}", "empty folder name"),
        ("{stem}/", "empty folder name"),
        ("", "is empty"),
        ("  ", "is empty"),
        ("{date}/{preset}", "may give an empty file name"),
        (".{stem}", "hidden name"),
        ("a\\{stem}", "backslash"),
        ("{stem", "literal brace"),
        ("x" * 150 + "{stem}", "longer than"),
    ],
)
def test_bad_templates_are_config_errors(template: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        check(template)
    assert says in str(caught.value)
    assert str(caught.value).startswith(f"name template {template!r}")


def test_good_templates_pass_unchanged() -> None:
    for template in (
        DEFAULT,
        "{date}/{preset}/{stem}_{index}",
        "out/{job_id}-{index:02d}",
        "{{literal}}_{stem}",
    ):
        assert check(template) == template
    assert name("{{literal}}_{stem}") == PurePosixPath("{literal}_beach")
