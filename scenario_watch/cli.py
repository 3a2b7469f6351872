"""The `scenario-watch` command: argument parsing and exit codes only."""

from __future__ import annotations

import argparse
import hashlib
import json
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__, logs, status
from .config import Loaded, Settings, describe, load_settings, require_credentials
from .errors import ConfigError, PromptError, ScenarioWatchError
from .files import move_no_clobber
from .finisher import error_file_for
from .health import cannot_write
from .instance import InstanceLock, lock_path
from .jobs import format_cost
from .presets import prepare_file, select_preset
from .prompt import rules_from_settings
from .schema import BUILTIN, ModelSchema, parse_model
from .status import JOURNAL, SANDBOX_JOURNAL
from .store import Store

if TYPE_CHECKING:  # requests is loaded by the commands that talk to the API only: `status` stays quick
    from .client import ScenarioClient

EXIT_OK, EXIT_INPUT, EXIT_CONFIG = 0, 1, 2
# The simulator's jobs and assets, kept beside its journal so a restarted `run --sandbox` resumes.
SANDBOX_WORLD = "sandbox-world.json"
# Failed at these stages, a prompt's job may have succeeded at Scenario: `retry` adopts it, never pays twice.
RETRY_ADOPTS = frozenset({"timeout", "download"})

DESCRIPTION = """\
Turn a folder into a queue for Scenario's Gemini 3 Pro image-editing model.

Drop JSON prompt files such as {"prompt": "a lighthouse at dusk", "numOutputs": 2}
into the inbox; the images appear in the outbox as NAME_1.png ... with NAME.manifest.json,
and the prompt file moves to done/ (or to failed/ beside NAME.error.json saying why).

Start with:  scenario-watch run --sandbox     (a built-in simulator: no account, no cost)
"""

EPILOG = """\
configuration: -c FILE, else $SCENARIO_WATCH_CONFIG, ./scenario-watch.toml,
~/.config/scenario-watch/config.toml, /etc/scenario-watch/config.toml (see example.toml).
credentials: SCENARIO_API_KEY and SCENARIO_API_SECRET, or systemd LoadCredential= files
scenario-api-key / scenario-api-secret.
exit codes: 0 ok, 1 a problem with your input, 2 a configuration or usage error.
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, run the command; the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except ConfigError as exc:
        print(f"scenario-watch: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scenario-watch",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"scenario-watch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, handler: Any, config: bool = True) -> argparse.ArgumentParser:
        """Add a subcommand with its handler (and -c FILE)."""
        p = sub.add_parser(
            name, help=help, description=help, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        p.set_defaults(handler=handler)
        if config:
            p.add_argument("-c", "--config", type=Path, metavar="FILE", help="the TOML configuration file")
        return p

    run = command("run", "run the daemon: watch the inbox, generate, fill the outbox", cmd_run)
    run.add_argument(
        "--once", action="store_true", help="process what is waiting and every pending job, then exit"
    )
    run.add_argument(
        "--sandbox", action="store_true", help="use the built-in local simulator: no credentials, no cost"
    )
    validate = command(
        "validate", "check prompt files offline; one line per problem, exit 1 if any", cmd_validate
    )
    validate.add_argument("files", nargs="+", type=Path, metavar="FILE")
    validate.add_argument(
        "--preset", metavar="NAME", help="check images (or JSON files) as [presets.NAME] takes them"
    )
    show = command(
        "status", "whether the daemon runs, each prompt in flight and what it waits for, spend", cmd_status
    )
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.add_argument("--watch", action="store_true", help="redraw every second until Ctrl-C")
    show.add_argument("--sandbox", action="store_true", help="the journal of `run --sandbox`")
    retry = command("retry", "move failed prompts back into the inbox", cmd_retry)
    retry.add_argument(
        "names", nargs="*", metavar="NAME", help="file names in failed/ (with or without .json)"
    )
    retry.add_argument("--all", action="store_true", help="every failed prompt")
    estimate = command(
        "estimate", "the creative-unit cost of prompt files (dryRun), generating nothing", cmd_estimate
    )
    estimate.add_argument("files", nargs="+", type=Path, metavar="FILE")
    estimate.add_argument(
        "--preset", metavar="NAME", help="price images (or JSON files) as [presets.NAME] takes them"
    )
    estimate.add_argument("--sandbox", action="store_true", help="ask the built-in simulator")
    config = command("config", "the effective settings and where each came from (secrets masked)", cmd_config)
    config.add_argument("--json", action="store_true", help="machine-readable output")
    sandbox = command("sandbox", "run the local Scenario API simulator alone", cmd_sandbox, config=False)
    sandbox.add_argument("--port", type=int, default=8790, help="API port (default 8790; 0 picks a free one)")
    sandbox.add_argument(
        "--cdn-port", type=int, default=0, help="CDN port for signed asset URLs (default: free)"
    )
    sandbox.add_argument("--generation-seconds", type=float, default=3.0, help="how long a job takes")
    return parser


# -- run ----------------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    """Run the daemon (one per journal) until stopped, or until drained with --once."""
    from .daemon import Daemon

    loaded = load_settings(args.config, sandbox=args.sandbox)
    settings = loaded.settings
    creds = require_credentials(loaded)
    logs.configure(settings.log.format, settings.log.level, secrets=creds)
    log = logs.get()
    for warning in loaded.warnings:
        log.warning("config.warning", warning=warning)
    journal = SANDBOX_JOURNAL if args.sandbox else JOURNAL
    with _lock(settings.folders.state, journal):
        sandbox = None
        base_url = settings.api.base_url
        if args.sandbox:
            from .sandbox import Sandbox

            world = settings.folders.state / SANDBOX_WORLD
            sandbox = Sandbox(generation_seconds=3.0, state_file=world).start()
            base_url = sandbox.base_url
            log.info("sandbox.started", api=base_url, note="simulated Scenario API: no account, no cost")
        client = _client(loaded, base_url)
        try:
            daemon = Daemon(settings, client, once=args.once, journal=journal)
            signal.signal(signal.SIGTERM, daemon.request_stop)
            signal.signal(signal.SIGINT, daemon.request_stop)
            if not args.once:
                log.info("daemon.hint", drop=f"drop *.json prompt files into {settings.folders.inbox}")
            return daemon.run()
        finally:
            if sandbox is not None:
                sandbox.stop()


def _lock(state: Path, journal: str) -> InstanceLock:
    """One daemon per journal (exit 2 naming the other's PID); the state folder must be writable."""
    try:
        state.mkdir(parents=True, exist_ok=True)
        return InstanceLock.acquire(lock_path(state, journal))
    except OSError as exc:
        raise ConfigError(cannot_write(state, exc)) from exc


def _client(loaded: Loaded, base_url: str) -> ScenarioClient:
    from .client import ScenarioClient

    key, secret = require_credentials(loaded)
    api = loaded.settings.api
    return ScenarioClient(
        base_url, key, secret, model_id=api.model_id, project_id=api.project_id, timeout=api.request_timeout
    )


# -- validate / estimate ------------------------------------------------------------------------------


def cmd_validate(args: argparse.Namespace) -> int:
    """Check prompt files offline, against the schema the daemon last fetched (else the built-in one)."""
    settings = _settings_or_none(args.config)
    rules = rules_from_settings(settings, _schema(settings))
    preset = select_preset(settings, args.preset, rules.schema)
    bad = 0
    for path in args.files:
        try:
            prompt = prepare_file(path, preset, rules)
        except PromptError as exc:
            bad += 1
            for problem in exc.problems:
                print(f"{path}: {problem}")
            if exc.hint:
                print(f"{path}:   hint: {exc.hint}")
        except OSError as exc:
            bad += 1
            print(f"{path}: cannot read: {exc.strerror}")
        else:
            params = ", ".join(f"{k}={v}" for k, v in prompt.inputs.items() if k != "prompt")
            refs = f", {len(prompt.references)} reference(s)" if prompt.references else ""
            print(f"{path}: ok -> {prompt.stem}_N ({params or 'API defaults'}{refs})")
    return EXIT_INPUT if bad else EXIT_OK


def _schema(settings: Settings | None, client: ScenarioClient | None = None) -> ModelSchema:
    """The model's schema: live if a client can ask, else as the daemon's journal cached it, else built in."""
    if client is not None:
        try:
            return parse_model(client.get_model(), "live", time.time())
        except (ScenarioWatchError, OSError, ValueError):
            pass
    journal = settings.folders.state / JOURNAL if settings is not None else None
    if journal is None or not journal.exists():
        return BUILTIN
    from .schema_source import cached_schema

    store = Store(journal)
    try:
        return cached_schema(store) or BUILTIN
    finally:
        store.close()


def _settings_or_none(config: Path | None) -> Settings | None:
    """The settings for offline checks; without a usable config file, none (an explicit -c must load)."""
    try:
        return load_settings(config).settings
    except ConfigError:
        if config is not None:
            raise
        return None


def cmd_estimate(args: argparse.Namespace) -> int:
    """Price prompt files with a dry run, after the same checks as validate (against the live schema)."""
    loaded = load_settings(args.config, sandbox=args.sandbox)
    sandbox = None
    base_url = loaded.settings.api.base_url
    if args.sandbox:
        from .sandbox import Sandbox

        sandbox = Sandbox().start()
        base_url = sandbox.base_url
    client = _client(loaded, base_url)
    rules = rules_from_settings(loaded.settings, _schema(loaded.settings, client))
    preset = select_preset(loaded.settings, args.preset, rules.schema)
    total, bad = 0.0, 0
    try:
        for path in args.files:
            try:
                prompt = prepare_file(path, preset, rules)
                inputs = dict(prompt.inputs)
                assets = [ref.asset_id for ref in prompt.references if ref.asset_id]
                if assets:
                    inputs["referenceImages"] = assets
                cost = client.estimate(inputs)
            except PromptError as exc:
                bad += 1
                print(f"{path}: {exc}")
            except (OSError, ScenarioWatchError) as exc:
                bad += 1
                print(f"{path}: cannot estimate: {exc}")
            else:
                total += cost
                print(f"{path}: {format_cost(cost)} creative units")
    finally:
        client.close()
        if sandbox is not None:
            sandbox.stop()
    print(f"total: {format_cost(total)} creative units")
    return EXIT_INPUT if bad else EXIT_OK


# -- status / retry / config --------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    """Show whether the daemon runs and what each prompt waits for (--watch: redraw)."""
    settings = load_settings(args.config, sandbox=args.sandbox).settings
    state = settings.folders.state
    path, note = status.pick_journal(state, args.sandbox)
    if not path.exists():
        print(f"no journal at {path} yet: the daemon has not run with this configuration")
        return EXIT_OK
    if note:
        print(f"status: {note}", file=sys.stderr if args.json else sys.stdout)
    while True:
        store = Store(path)
        try:
            report = status.build(store, lock_path(state, path.name), settings.budget, time.time())
        finally:
            store.close()
        if args.json:
            print(json.dumps(report), flush=True)
        else:
            if args.watch:
                print("\x1b[H\x1b[2J", end="")  # clear the terminal: redraw in place
            print(status.render(report, path, status.inbox_waiting(settings.folders.inbox)), flush=True)
        if not args.watch:
            return EXIT_OK
        time.sleep(1.0)  # Ctrl-C ends it (main() turns KeyboardInterrupt into exit 0)


def cmd_retry(args: argparse.Namespace) -> int:
    """Move failed prompts back into the inbox."""
    folders = load_settings(args.config).settings.folders
    if not args.names and not args.all:
        print("scenario-watch: name failed prompts to retry, or use --all", file=sys.stderr)
        return EXIT_CONFIG
    if args.all:
        names = sorted(
            str(p.relative_to(folders.failed))
            for p in folders.failed.rglob("*.json")
            if not p.name.endswith(".error.json") and not p.name.startswith(".")
        )
    else:
        names = [n if n.endswith(".json") else f"{n}.json" for n in args.names]
    missing = 0
    for name in names:
        rel = Path(name)
        src = folders.failed / rel
        if rel.is_absolute() or ".." in rel.parts or not src.is_file():
            print(f"{name}: not in {folders.failed}")
            missing += 1
            continue
        error_file = error_file_for(src)
        job_id = _paid_job(error_file)
        if job_id is not None:  # its job may have finished: the daemon asks before paying again
            _adopt_later(folders.state, rel, src, job_id)
        dest = move_no_clobber(src, folders.inbox / rel.parent, rel.name)
        error_file.unlink(missing_ok=True)
        print(f"{name}: back in the inbox as {dest.relative_to(folders.inbox)}")
        if job_id is not None:
            print(f"{name}: its earlier job {job_id} is asked about first; it is delivered if it succeeded")
    return EXIT_INPUT if missing else EXIT_OK


def _paid_job(error_file: Path) -> str | None:
    """The job of a prompt that failed after Scenario took it (timeout, download): it may have succeeded."""
    try:
        report = json.loads(error_file.read_text())
    except (OSError, ValueError):
        return None
    job_id = report.get("jobId") if isinstance(report, dict) else None
    return job_id if isinstance(job_id, str) and report.get("stage") in RETRY_ADOPTS else None


def _adopt_later(state: Path, rel: Path, src: Path, job_id: str) -> None:
    """Note in the journal that made the job: when this file comes back, ask about the job first."""
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    for name in (JOURNAL, SANDBOX_JOURNAL):
        if not (state / name).exists():
            continue
        store = Store(state / name)
        try:
            if store.owns_job(job_id):
                store.adopt_later(str(rel), digest, job_id)
        finally:
            store.close()


def cmd_config(args: argparse.Namespace) -> int:
    """Show the effective settings, where each came from, and the model schema in use."""
    loaded = load_settings(args.config)
    rows = describe(loaded)
    if args.json:
        print(json.dumps({key: {"value": value, "from": origin} for key, value, origin in rows}))
        return EXIT_OK
    print(f"config file: {loaded.path or '(none: defaults)'}")
    print(f"model schema: {_schema(loaded.settings).describe()}")
    width = max(len(key) for key, _, _ in rows)
    for key, value, origin in rows:
        print(f"{key:<{width}}  {value or '-':<40}  {origin}")
    for warning in loaded.warnings:
        print(f"warning: {warning}")
    return EXIT_OK


def cmd_sandbox(args: argparse.Namespace) -> int:
    """Run the local API simulator in the foreground."""
    from .sandbox import main_serve

    main_serve(args.port, cdn_port=args.cdn_port, generation_seconds=args.generation_seconds)
    return EXIT_OK
