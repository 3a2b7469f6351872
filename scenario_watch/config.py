"""Settings: a TOML file, environment overrides and credentials, validated once at start."""

from __future__ import annotations

import difflib
import os
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from scenario_watch.errors import ConfigError
from scenario_watch.intake.names import is_ignored
from scenario_watch.logs import MASK
from scenario_watch.sections import (
    FolderSettings,
    GenerateDefaults,
    HttpSettings,
    ImageSettings,
    JournalSettings,
    MetricsSettings,
    OutboxSettings,
    PresetSettings,
    Section,
)

MODEL_ID = "model_google-gemini-pro-image-editing"
SANDBOX_KEY = "sandbox-key"
SANDBOX_SECRET = "sandbox-secret"


CONFIG_SEARCH = (
    Path("scenario-watch.toml"),
    Path("~/.config/scenario-watch/config.toml"),
    Path("/etc/scenario-watch/config.toml"),
)


class ApiSettings(Section):
    base_url: str = "https://api.cloud.scenario.com/v1"
    model_id: str = MODEL_ID
    project_id: str | None = None
    request_timeout: float = Field(30.0, gt=0, le=600)
    # A generate answer that was lost: how long after sending before "it made no job" is believed
    # (above the usual gateway deadlines of 30-60 s: a slow gateway may still create the job).
    lost_answer_wait: float = Field(180.0, ge=0)
    # How often the model's input schema is fetched again (seconds).
    schema_refresh: float = Field(21600.0, gt=0)
    key: SecretStr | None = None
    secret: SecretStr | None = None

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with https:// (or http:// for a local simulator)")
        return value.rstrip("/")


class JobSettings(Section):
    max_in_flight: int = Field(8, ge=1, le=1000)
    poll_interval: float = Field(2.0, gt=0, le=3600)
    poll_max_interval: float = Field(15.0, gt=0, le=3600)
    timeout: float = Field(900.0, gt=0)


class WatchSettings(Section):
    polling: bool | Literal["auto"] = "auto"
    settle: float = Field(2.0, ge=0, le=3600)
    rescan_interval: float = Field(60.0, gt=0)
    ignore: list[str] = Field(default_factory=list)
    recursive: bool = False
    reference_roots: list[Path] = Field(default_factory=list)
    reference_wait: float = Field(60.0, ge=0)
    move_references: bool = False

    @field_validator("reference_roots")
    @classmethod
    def _expand(cls, value: list[Path]) -> list[Path]:
        return [Path(os.path.abspath(root.expanduser())) for root in value]


class HookSettings(Section):
    """Commands run after a prompt is filed (argv lists, no shell)."""

    on_done: list[str] = Field(default_factory=list)
    on_failed: list[str] = Field(default_factory=list)
    timeout: float = Field(60.0, gt=0, le=86400)


class BudgetSettings(Section):
    daily: float = Field(0.0, ge=0)  # creative units per UTC day; 0: no cap
    max_per_prompt: float = Field(0.0, ge=0)  # a prompt estimated above it fails; 0: no limit


class LogSettings(Section):
    format: Literal["auto", "json", "console"] = "auto"
    level: Literal["debug", "info", "warning", "error"] = "info"


class Settings(BaseSettings):
    """Every setting of the daemon; see example.toml for what each one does."""

    model_config = SettingsConfigDict(
        env_prefix="SCENARIO_WATCH_", env_nested_delimiter="__", extra="forbid", case_sensitive=False
    )

    api: ApiSettings = Field(default_factory=ApiSettings)
    folders: FolderSettings = Field(default_factory=FolderSettings)
    defaults: GenerateDefaults = Field(default_factory=GenerateDefaults)
    jobs: JobSettings = Field(default_factory=JobSettings)
    watch: WatchSettings = Field(default_factory=WatchSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    presets: dict[str, PresetSettings] = Field(default_factory=dict)
    hooks: HookSettings = Field(default_factory=HookSettings)
    budget: BudgetSettings = Field(default_factory=BudgetSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    journal: JournalSettings = Field(default_factory=JournalSettings)
    images: ImageSettings = Field(default_factory=ImageSettings)
    outbox: OutboxSettings = Field(default_factory=OutboxSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file arrives as init kwargs (load_settings reads it); the environment overrides it.
        """The environment overrides the file (which arrives as init kwargs)."""
        return (env_settings, init_settings)


@dataclass
class Loaded:
    """Validated settings plus where each value came from (for `scenario-watch config`)."""

    settings: Settings
    path: Path | None
    origins: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    # Where real credentials were found and left unused (a sandbox run needs none): names, never values.
    ignored_credentials: list[str] = field(default_factory=list)

    @property
    def credentials(self) -> tuple[str, str] | None:
        """The API key and secret, when both are set."""
        key, secret = self.settings.api.key, self.settings.api.secret
        if key is None or secret is None:
            return None
        return key.get_secret_value(), secret.get_secret_value()


def find_config(explicit: Path | None, env: Mapping[str, str]) -> Path | None:
    """The config file to read: -c, $SCENARIO_WATCH_CONFIG, then the usual places; None if there is none."""
    if explicit is not None:
        if not explicit.is_file():
            raise ConfigError(f"config file {explicit} {_not_a_file(explicit)}")
        return explicit
    if env.get("SCENARIO_WATCH_CONFIG"):
        path = _expand_home(Path(env["SCENARIO_WATCH_CONFIG"]), env)
        if not path.is_file():
            raise ConfigError(f"SCENARIO_WATCH_CONFIG names {path}, which {_not_a_file(path)}")
        return path
    for candidate in CONFIG_SEARCH:
        path = _expand_home(candidate, env)
        if path.is_file():
            return path
    return None


def _expand_home(path: Path, env: Mapping[str, str]) -> Path:
    """`~` against the HOME of `env` (the one load_settings was given), else the process's own."""
    if path.parts[:1] == ("~",) and env.get("HOME"):
        return Path(env["HOME"], *path.parts[1:])
    return path.expanduser()


def _not_a_file(path: Path) -> str:
    return "is a folder, not a file" if path.is_dir() else "does not exist"


def load_settings(
    explicit: Path | None = None, env: Mapping[str, str] | None = None, *, sandbox: bool = False
) -> Loaded:
    """Read, merge and validate the configuration; raise ConfigError with one clear line."""
    env = os.environ if env is None else env
    path = find_config(explicit, env)
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {path}: {exc}") from exc
    _check_keys(data, path)
    _check_env(env)
    env_values = _env_values(env)
    origins = {key: f"file {path}" for key in _flatten(data)}
    origins.update({key: f"env {name}" for key, name in env_values.items()})
    warnings: list[str] = []

    api = data.setdefault("api", {}) if isinstance(data.get("api", {}), dict) else {}
    ignored: list[str] = []
    for name, env_name, file_name in (
        ("key", "SCENARIO_API_KEY", "scenario-api-key"),
        ("secret", "SCENARIO_API_SECRET", "scenario-api-secret"),
    ):
        if sandbox:
            ignored += _real_credentials(env, env_name, file_name, name, api, path)
            api[name] = SANDBOX_KEY if name == "key" else SANDBOX_SECRET
            origins[f"api.{name}"] = "sandbox"
            continue
        value, origin = _credential(env, env_name, file_name)
        if value is not None:
            api[name] = value
            origins[f"api.{name}"] = origin
        elif name in api and path is not None and _readable_by_others(path):
            warnings.append(f"{path} holds api.{name} and is readable by other users: chmod 600 it")

    try:
        settings = Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, origins)) from exc
    if sandbox:  # SCENARIO_WATCH_API__KEY outranks the file's values: the sandbox's own go in last
        settings.api.key, settings.api.secret = SecretStr(SANDBOX_KEY), SecretStr(SANDBOX_SECRET)
    for name in ("key", "secret"):
        value = getattr(settings.api, name)
        if value is not None and not value.get_secret_value().isascii():
            # HTTP Basic auth cannot carry it; usually a quote or space pasted from a document.
            raise ConfigError(f"api.{name} (from {origins.get(f'api.{name}')}) has non-ASCII characters")
    if settings.jobs.poll_max_interval < settings.jobs.poll_interval:
        raise ConfigError("jobs.poll_max_interval must be at least jobs.poll_interval")
    ignore = settings.watch.ignore
    settings.folders.check_apart(settings.watch.recursive, lambda part: is_ignored(part, ignore))
    return Loaded(settings, path, origins, warnings, ignored)


def require_credentials(loaded: Loaded) -> tuple[str, str]:
    """The API key and secret, or a ConfigError saying how to provide them."""
    creds = loaded.credentials
    if creds is None:
        raise ConfigError(
            "no Scenario API credentials: set SCENARIO_API_KEY and SCENARIO_API_SECRET "
            "(or use --sandbox to try the built-in simulator)"
        )
    return creds


def describe(loaded: Loaded) -> list[tuple[str, str, str]]:
    """(key, value, origin) for every setting, secrets masked."""
    rows = []
    for key, value in _flatten(loaded.settings.model_dump(mode="json")).items():
        if key in ("api.key", "api.secret", "http.token") and value is not None:
            value = MASK
        rows.append((key, "" if value is None else str(value), loaded.origins.get(key, "default")))
    return rows


def _credential(env: Mapping[str, str], env_name: str, file_name: str) -> tuple[str | None, str]:
    if env.get(env_name):
        return env[env_name].strip(), f"env {env_name}"
    cred_dir = env.get("CREDENTIALS_DIRECTORY")
    if cred_dir:
        cred = Path(cred_dir) / file_name
        if cred.is_file():
            return cred.read_text(encoding="utf-8").strip(), f"credential {file_name}"
    return None, ""


def _real_credentials(
    env: Mapping[str, str],
    env_name: str,
    file_name: str,
    name: str,
    api: Mapping[str, Any],
    path: Path | None,
) -> list[str]:
    """Every place a real api.<name> was given (for a sandbox run to say it ignores them): names only."""
    found = [f"env {env_name}"] if env.get(env_name) else []
    cred_dir = env.get("CREDENTIALS_DIRECTORY")
    if cred_dir and (Path(cred_dir) / file_name).is_file():
        found.append(f"credential {file_name}")
    if name in api:
        found.append(f"file {path} [api] {name}")
    found += [f"env {n}" for n in env if n.upper() == f"SCENARIO_WATCH_API__{name.upper()}"]
    return found


def _readable_by_others(path: Path) -> bool:
    try:
        return bool(path.stat().st_mode & (stat.S_IRGRP | stat.S_IROTH))
    except OSError:
        return False


def _env_values(env: Mapping[str, str]) -> dict[str, str]:
    """Dotted keys set by SCENARIO_WATCH_<SECTION>__<KEY> variables, with the variable's name."""
    found = {}
    for name in env:
        upper = name.upper()
        if upper.startswith("SCENARIO_WATCH_") and "__" in upper:
            section, _, key = upper.removeprefix("SCENARIO_WATCH_").partition("__")
            found[f"{section.lower()}.{key.lower()}"] = name
    return found


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _check_keys(data: Mapping[str, Any], path: Path | None) -> None:
    """Unknown sections and keys name the near miss: a typo must not silently keep a default."""
    where = f"config file {path}" if path else "config"
    for section, values in data.items():
        if section not in Settings.model_fields:
            raise ConfigError(f"{where}: unknown section [{section}]{_near(section, Settings.model_fields)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: [{section}] must be a table of keys")
        if section == "presets":
            for name, table in values.items():
                if not isinstance(table, dict):  # `folder = ...` right under [presets]
                    raise ConfigError(
                        f"{where}: presets.{name} is not a preset: each preset is a table of its own,"
                        f" [presets.NAME] with its prompt and folder (see example.toml)"
                    )
        known = _section_keys(section)
        if known is None:
            continue  # [presets.NAME], [defaults]: the model's schema judges the keys (presets.py)
        for key in values:
            if key not in known:
                raise ConfigError(f"{where}: unknown key {section}.{key}{_near(key, known)}")


def _section_keys(section: str) -> Mapping[str, Any] | None:
    """A section's keys; None where the model's schema decides them ([defaults], [presets.NAME])."""
    fields = Settings.model_fields[section].annotation
    if (
        isinstance(fields, type)
        and issubclass(fields, BaseModel)
        and fields.model_config.get("extra") != "allow"
    ):
        return fields.model_fields
    return None


def _check_env(env: Mapping[str, str]) -> None:
    """SCENARIO_WATCH_* variables must name a setting: a mistyped override must not go unnoticed."""
    for name in env:
        upper = name.upper()
        if not upper.startswith("SCENARIO_WATCH_") or upper == "SCENARIO_WATCH_CONFIG":
            continue
        section, nested, key = upper.removeprefix("SCENARIO_WATCH_").lower().partition("__")
        where = f"environment variable {name} names no setting"
        if section not in Settings.model_fields:
            raise ConfigError(f"{where}: unknown section {section!r}{_near(section, Settings.model_fields)}")
        known = _section_keys(section)
        if nested and known is not None and key not in known:
            raise ConfigError(f"{where}: unknown key {section}.{key}{_near(key, known)}")


def _near(word: str, choices: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(choices)})"


def _describe(exc: ValidationError, origins: Mapping[str, str]) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"])
        origin = origins.get(key)
        suffix = f" (from {origin})" if origin else ""
        lines.append(f"{key}{suffix}: {err['msg']}")
    return "invalid configuration: " + "; ".join(lines)
