"""Settings sections: [folders], [defaults], and what the daemon writes and shows: [images], [http]..."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from scenario_watch.deliver import naming
from scenario_watch.errors import ConfigError
from scenario_watch.shell.listen import is_loopback, split_listen

MIN_TOKEN = 16  # [http] token: shorter ones can be guessed over the network


class Section(BaseModel):
    """A [section] of the configuration: unknown keys are errors, defaults are checked too."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


class FolderSettings(Section):
    """[folders]: where prompts arrive, outputs go, prompts are filed, and the journal lives."""

    inbox: Path = Path("~/scenario-watch/inbox")
    outbox: Path = Path("~/scenario-watch/outbox")
    done: Path = Path("~/scenario-watch/done")
    failed: Path = Path("~/scenario-watch/failed")
    state: Path = Path("~/scenario-watch/state")

    @field_validator("inbox", "outbox", "done", "failed", "state")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return Path(os.path.abspath(value.expanduser()))

    def check_apart(self, recursive: bool, ignored: Callable[[str], bool]) -> None:
        """Refuse folders that would feed the daemon its own files: with done/ as the inbox, every filed
        prompt would be claimed and paid for again, for ever; outputs in the inbox, taken for prompts.
        Inside a recursive inbox, a folder the watcher skips (`ignored`: `.done`, [watch] ignore) is fine."""
        for name in ("outbox", "done", "failed", "state"):
            path = getattr(self, name)
            watched = path.is_relative_to(self.inbox) and not any(
                ignored(part) for part in path.relative_to(self.inbox).parts
            )
            if path == self.inbox or (recursive and watched):
                where = (
                    "the inbox" if path == self.inbox else "inside the inbox, watched with [watch] recursive"
                )
                raise ConfigError(f"folders.{name} is {where} ({path}): give it a folder of its own")
            if name != "state" and path == self.state:
                raise ConfigError(f"folders.{name} is the state folder ({path}): give it a folder of its own")


class HttpSettings(Section):
    """[http]: the listener for /metrics, /status.json and the live page (off unless `listen` is set)."""

    listen: str | None = None  # HOST:PORT ([::1]:PORT for IPv6); port 0 takes a free one
    token: SecretStr | None = None  # required unless `listen` is a loopback address

    @field_validator("listen", "token")  # in this order, even when unset: `token` sees a checked `listen`
    @classmethod
    def _check(cls, value: Any, info: ValidationInfo) -> Any:
        listen = value if info.field_name == "listen" else info.data.get("listen")
        host = split_listen(listen)[0] if listen is not None else None
        if info.field_name == "listen":
            return value
        if value is not None and len(value.get_secret_value()) < MIN_TOKEN:
            raise ValueError(f"at least {MIN_TOKEN} characters (e.g. `openssl rand -hex 16`)")
        # Anyone who can reach the port would see every prompt and picture: outside loopback, a token.
        if host is not None and not is_loopback(host) and value is None:
            raise ValueError(f"listen = {listen!r} is not a loopback address: set [http] token")
        return value


class MetricsSettings(Section):
    """[metrics]: the Prometheus text also written to a file (node_exporter's textfile collector)."""

    textfile: Path | None = None
    interval: float = Field(15.0, gt=0, le=86400)

    @field_validator("textfile")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return None if value is None else Path(os.path.abspath(value.expanduser()))


class ImageSettings(Section):
    """[images]: what is done to input images before upload (images.py)."""

    normalize: bool = True
    max_side: int = Field(0, ge=0, le=65535)  # pixels; 0: no downscaling


class OutboxSettings(Section):
    """[outbox]: how outputs are named, in which format, with what written into them."""

    name: str = naming.DEFAULT
    format: Literal["original", "png", "jpeg", "webp"] = "original"
    quality: int = Field(90, ge=1, le=100)
    metadata: bool = True

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        try:
            return naming.check(value)
        except ConfigError as exc:  # reported with the key and where it came from, like any other
            raise PydanticCustomError("name_template", str(exc)) from None


class JournalSettings(Section):
    """[journal]: how long finished prompts stay in the journal (retention.py)."""

    keep_days: float = Field(90.0, ge=0)  # 0: keep every prompt

    @field_validator("keep_days")
    @classmethod
    def _whole_day(cls, value: float) -> float:
        # Today's spend is read from the journal (the daily budget): it must not be pruned.
        if 0 < value < 1:
            raise ValueError("must be at least 1 (today's spend stays in the journal), or 0 to keep all")
        return value


class GenerateDefaults(BaseModel):
    """[defaults]: generate inputs applied where a prompt file is silent; the model's schema judges them."""

    model_config = ConfigDict(extra="allow")  # checked against the live schema at start (presets.py)

    @model_validator(mode="before")
    @classmethod
    def _env_json(cls, data: Any) -> Any:
        """SCENARIO_WATCH_DEFAULTS__SEED=5 arrives as "5": a number or boolean written as JSON is one."""
        return {k: _json_scalar(v) for k, v in data.items()} if isinstance(data, dict) else data


def _json_scalar(value: Any) -> Any:
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            decoded = json.loads(value)
            if isinstance(decoded, bool | int | float):
                return decoded
    return value


class PresetSettings(BaseModel):
    """[presets.NAME]: any prompt-file key (checked by presets.py against the schema) plus `folder`."""

    model_config = ConfigDict(extra="allow")  # the prompt keys: the model's schema decides, not this class

    folder: Path | None = None  # default: <inbox>/NAME/

    @field_validator("folder")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return None if value is None else Path(os.path.abspath(value.expanduser()))
