"""A preset's own [images] and [outbox] keys: checked at start like the global ones, used for its prompts."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from conftest import Folders, StartDaemon, generate_posts, move_in, run_cli, wait_for, write_config
from imagemaker import encode, exif_block, photo
from PIL import Image

from scenario_watch.config import load_settings
from scenario_watch.deliver import provenance
from scenario_watch.errors import ConfigError
from scenario_watch.prepare import sidecar
from scenario_watch.prepare.presets import load_presets
from scenario_watch.sandbox import Sandbox

IN_PROCESS = True  # conftest: `daemon` runs in this process, on a manual clock shared with `sandbox`

PHONE = encode(photo(64, 32), "JPEG", exif=exif_block(orientation=6, gps=True))


def test_a_presets_own_keys_apply_to_its_prompts_only(
    folders: Folders, sandbox: Sandbox, daemon: StartDaemon
) -> None:
    preset = {
        "prompt": "paint it",
        "normalize": False,
        "name": "{stem}-v{index}",
        "format": "webp",
        "quality": 70,
        "metadata": False,
    }
    write_config(folders, sandbox.base_url, presets={"paint": preset})
    daemon()
    move_in(folders, folders.inbox / "paint", "car.jpg", PHONE)
    (folders.inbox / "phone.jpg").write_bytes(PHONE)
    folders.drop("plain.json", {"prompt": "global settings", "referenceImages": ["phone.jpg"]})
    wait_for(lambda: (folders.done / "paint" / "car.jpg").exists(), what="the preset's image done")
    wait_for(lambda: (folders.done / "plain.json").exists(), what="the inbox prompt done")

    by_prompt = {post.body["prompt"]: post for post in generate_posts(sandbox)}
    assert "normalize" not in by_prompt["paint it"].body  # taken out of the prompt's keys
    # normalize = false: the preset's reference goes up byte for byte; the inbox's is made upright.
    assert sandbox.asset_bytes(by_prompt["paint it"].body["referenceImages"][0]) == PHONE
    assert sandbox.asset_bytes(by_prompt["global settings"].body["referenceImages"][0]) != PHONE

    manifest = json.loads((folders.outbox / "paint" / "car.manifest.json").read_text())
    [entry] = manifest["files"]
    assert entry["file"] == "car-v1.webp" and entry["mimeType"] == "image/webp"
    data = (folders.outbox / "paint" / entry["file"]).read_bytes()
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "WEBP"
    assert provenance.read(data) is None  # metadata = false
    plain = json.loads((folders.outbox / "plain.manifest.json").read_text())
    assert plain["files"][0]["file"] == "plain_1.png"  # the global [outbox]: original format, default name
    assert provenance.read((folders.outbox / "plain_1.png").read_bytes()) is not None


def config_with(tmp_path: Path, preset: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(f'[folders]\ninbox = "{tmp_path / "in"}"\n\n[presets.paint]\nprompt = "x"\n{preset}\n')
    return path


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ('name = "../{stem}"', "[presets.paint] name: name template '../{stem}' uses '..'"),
        ('name = "/srv/{stem}"', "is an absolute path"),
        ('name = "{stem}_{colour}"', "names an unknown token {colour}"),
        ('name = "{stem}_{idnex}"', "did you mean {index}?"),
        ('format = "gif"', "[presets.paint] format: Input should be 'original', 'png', 'jpeg' or 'webp'"),
        ("quality = 0", "[presets.paint] quality: Input should be greater than or equal to 1"),
        ('normalize = "yes please"', "[presets.paint] normalize: Input should be a valid boolean"),
        ("max_side = -1", "[presets.paint] max_side: Input should be greater than or equal to 0"),
    ],
)
def test_a_bad_preset_key_is_a_config_error(tmp_path: Path, line: str, says: str) -> None:
    settings = load_settings(config_with(tmp_path, line), env={"HOME": str(tmp_path)}).settings
    with pytest.raises(ConfigError) as caught:
        load_presets(settings)
    assert says in str(caught.value)


def test_a_preset_template_that_escapes_the_outbox_stops_run_with_exit_2(tmp_path: Path) -> None:
    result = run_cli("run", "-c", str(config_with(tmp_path, 'name = "../../{stem}_{index}"')), timeout=30)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "[presets.paint] name" in result.stderr and "inside the outbox" in result.stderr


def test_preset_keys_default_to_the_global_sections(tmp_path: Path) -> None:
    path = config_with(tmp_path, "quality = 55")
    globals_ = '\n[outbox]\nformat = "jpeg"\nquality = 80\n[images]\nmax_side = 512\n'
    path.write_text(path.read_text() + globals_)
    [preset] = load_presets(load_settings(path, env={"HOME": str(tmp_path)}).settings).values()
    assert (preset.outbox.format, preset.outbox.quality, preset.images.max_side) == ("jpeg", 55, 512)
    assert "quality" not in preset.keys


def test_the_readmes_image_examples_load_and_do_what_they_say(tmp_path: Path) -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("\n## Images\n", 1)[1].split("\n## ", 1)[0]
    blocks = [block.split("```", 1)[0] for block in section.split("```toml\n")[1:]]
    assert len(blocks) == 2
    path = tmp_path / "c.toml"
    path.write_text(f'[folders]\ninbox = "{tmp_path / "in"}"\n\n' + "\n".join(blocks))
    presets = load_presets(load_settings(path, env={"HOME": str(tmp_path)}).settings)
    paint, thumbs = presets["paint"], presets["thumbs"]
    assert sidecar.with_text(paint.keys["prompt"], "at dusk") == (
        "A watercolour of this photo on rough paper. at dusk"
    )
    assert sidecar.with_text(paint.keys["prompt"], None) == "A watercolour of this photo on rough paper."
    assert (thumbs.images.normalize, thumbs.outbox.format, thumbs.outbox.quality) == (False, "webp", 75)
    assert (thumbs.outbox.name, thumbs.outbox.metadata) == ("{date}/{stem}-v{index}", False)
    assert thumbs.keys == {"prompt": "Clean product shot on white"}
