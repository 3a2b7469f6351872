"""The `scenario-watch` command: argument parsing and exit codes only."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scenario_watch import __version__, logs
from scenario_watch.api.client import ScenarioClient
from scenario_watch.api.jobs import format_cost
from scenario_watch.config import Loaded, Settings, describe, load_settings, require_credentials
from scenario_watch.dispatch.references import DryRunReferences
from scenario_watch.errors import ConfigError, PromptError, ScenarioWatchError
from scenario_watch.health import cannot_write
from scenario_watch.intake import backlog
from scenario_watch.journal.store import Store
from scenario_watch.prepare.preparation import prepare_file
from scenario_watch.prepare.presets import load_presets, select_preset
from scenario_watch.prepare.prompt import rules_from_settings
from scenario_watch.prepare.schema import BUILTIN, ModelSchema, parse_model, show
from scenario_watch.prepare.schema_source import cached_schema
from scenario_watch.shell import retry, status
from scenario_watch.shell.instance import InstanceLock, limit_heap_arenas, lock_path
from scenario_watch.shell.status import JOURNAL, SANDBOX_JOURNAL

if TYPE_CHECKING:  # requests is loaded by the commands that talk to the API only: `status` stays quick
    from scenario_watch.api.client import ScenarioClient

EXIT_OK, EXIT_INPUT, EXIT_CONFIG = 0, 1, 2
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # 141, as a shell reports a process killed by SIGPIPE
# The simulator's jobs and assets, kept beside its journal so a restarted `run --sandbox` resumes.
SANDBOX_WORLD = "sandbox-world.json"
IGNORED_CREDENTIALS = "ignoring real credentials: the sandbox needs none"

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
    try:
        args = _parser().parse_args(argv)
        return int(args.handler(args))
    except ConfigError as exc:
        print(f"scenario-watch: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return EXIT_OK
    except BrokenPipeError:
        # The reader left (`status | head`). Python's recipe: send what is still buffered to
        # /dev/null so the flush at exit does not fail again, and exit as a process killed by
        # SIGPIPE would (128 + 13, what `cat big | head` reports): `set -o pipefail` scripts can
        # tell the output was cut short. SIGPIPE itself stays ignored: the daemon must not die of it.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE


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
    validate.add_argument(
        "--sandbox", action="store_true", help="against the schema `run --sandbox` last saw (no account)"
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
    take = command("take", "take files a preset left alone (in its folder before the preset)", cmd_take)
    take.add_argument("preset", metavar="PRESET")
    take.add_argument("files", nargs="*", metavar="FILE", help="file names in the preset's folder")
    take.add_argument("--all", action="store_true", help="every file the preset left alone")
    take.add_argument("--sandbox", action="store_true", help="the journal of `run --sandbox`")
    estimate = command(
        "estimate", "the creative-unit cost of prompt files (dryRun), generating nothing", cmd_estimate
    )
    estimate.add_argument("files", nargs="+", type=Path, metavar="FILE")
    estimate.add_argument(
        "--preset", metavar="NAME", help="price images (or JSON files) as [presets.NAME] takes them"
    )
    estimate.add_argument(
        "--sandbox", action="store_true", help="ask the built-in simulator: no credentials, no cost"
    )
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
    from scenario_watch.shell.daemon import Daemon

    loaded = load_settings(args.config, sandbox=args.sandbox)
    settings = loaded.settings
    if args.sandbox and settings.http.listen is None:  # the live page, at a free loopback port
        settings.http.listen = "127.0.0.1:0"
    creds = require_credentials(loaded)
    logs.configure(settings.log.format, settings.log.level, secrets=creds)
    log = logs.get()
    for warning in loaded.warnings:
        log.warning("config.warning", warning=warning)
    if loaded.ignored_credentials:
        log.info("sandbox.credentials_ignored", note=IGNORED_CREDENTIALS, sources=loaded.ignored_credentials)
    journal = SANDBOX_JOURNAL if args.sandbox else JOURNAL
    limit_heap_arenas()
    with _lock(settings.folders.state, journal):
        sandbox = None
        base_url = settings.api.base_url
        if args.sandbox:
            from scenario_watch.sandbox import Sandbox

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
            if args.sandbox:  # where a new user looks: the live page's address on stderr too
                return daemon.run(lambda: print(f"live page: {daemon.watching.url}/", file=sys.stderr))
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
    from scenario_watch.api.client import ScenarioClient

    key, secret = require_credentials(loaded)
    api = loaded.settings.api
    return ScenarioClient(
        base_url, key, secret, model_id=api.model_id, project_id=api.project_id, timeout=api.request_timeout
    )


# -- validate / estimate ------------------------------------------------------------------------------


def cmd_validate(args: argparse.Namespace) -> int:
    """Check prompt files offline, against the schema the daemon last fetched (else the built-in one)."""
    settings = _settings_or_none(args.config)
    rules = rules_from_settings(
        settings, _schema(settings, journal=SANDBOX_JOURNAL if args.sandbox else JOURNAL)
    )
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
            # Values as JSON (the prompt file's language): useGoogleSearch=false, not Python's False.
            params = ", ".join(f"{k}={show(v)}" for k, v in prompt.inputs.items() if k != "prompt")
            refs = f", {len(prompt.references)} reference(s)" if prompt.references else ""
            print(f"{path}: ok -> {prompt.stem}_N ({params or 'API defaults'}{refs})")
    return EXIT_INPUT if bad else EXIT_OK


def _schema(
    settings: Settings | None, client: ScenarioClient | None = None, journal: str = JOURNAL
) -> ModelSchema:
    """The model's schema: live if a client can ask, else as the daemon's journal cached it, else built in."""
    if client is not None:
        try:
            return parse_model(client.get_model(), "live", time.time())
        except (ScenarioWatchError, OSError, ValueError):
            pass
    path = settings.folders.state / journal if settings is not None else None
    if path is None or not path.exists():
        return BUILTIN
    store = Store(path)
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
    if loaded.credentials is None:
        raise ConfigError(
            "estimate asks the Scenario API for a price (a dry run: nothing is generated or paid), which "
            "needs credentials: set SCENARIO_API_KEY and SCENARIO_API_SECRET, or try "
            "`scenario-watch estimate --sandbox FILE...` (the built-in simulator: no account, its own prices)"
        )
    if loaded.ignored_credentials:
        print(f"scenario-watch: {IGNORED_CREDENTIALS}", file=sys.stderr)
    sandbox = None
    base_url = loaded.settings.api.base_url
    if args.sandbox:
        from scenario_watch.sandbox import Sandbox

        sandbox = Sandbox().start()
        base_url = sandbox.base_url
    client = _client(loaded, base_url)
    rules = rules_from_settings(loaded.settings, _schema(loaded.settings, client))
    preset = select_preset(loaded.settings, args.preset, rules.schema)
    total, bad = 0.0, 0
    references = DryRunReferences(client)  # a local reference file is priced as one entry, as sent
    try:
        for path in args.files:
            try:
                cost = client.estimate(references.inputs(prepare_file(path, preset, rules)))
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
        print(status.report_text(settings, path, json_lines=args.json, watch=args.watch), flush=True)
        if not args.watch:
            return EXIT_OK
        time.sleep(1.0)  # Ctrl-C ends it (main() turns KeyboardInterrupt into exit 0)


def cmd_retry(args: argparse.Namespace) -> int:
    """Move failed prompts back into the inbox."""
    settings = load_settings(args.config).settings
    folders, presets = settings.folders, {n: p.folder for n, p in load_presets(settings, None).items()}
    if not args.names and not args.all:
        print("scenario-watch: name failed prompts to retry, or use --all", file=sys.stderr)
        return EXIT_CONFIG
    names = (
        retry.everything(folders.failed)
        if args.all
        else [retry.name_in(folders.failed, n) for n in args.names]
    )
    if not names:
        print(f"nothing to retry in {folders.failed}")
        return EXIT_OK
    lines = [line for name in names for line in retry.send_back(folders, name, presets)]
    print("\n".join(lines))
    return EXIT_INPUT if any(line.endswith(f"not in {folders.failed}") for line in lines) else EXIT_OK


def cmd_take(args: argparse.Namespace) -> int:
    """Release files a preset left alone: the daemon takes them (now if it runs, else at its next start)."""
    settings = load_settings(args.config, sandbox=args.sandbox).settings
    if bool(args.files) == args.all:
        print("scenario-watch: name the files to take, or use --all", file=sys.stderr)
        return EXIT_CONFIG
    preset = select_preset(settings, args.preset, None)  # its folder: the keys are the daemon's to judge
    assert preset is not None  # a name was given
    journal = settings.folders.state / (SANDBOX_JOURNAL if args.sandbox else JOURNAL)
    lines, bad = backlog.take(journal, preset.name, preset.folder, None if args.all else args.files)
    print("\n".join(lines))
    return EXIT_INPUT if bad else EXIT_OK


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
    from scenario_watch.sandbox import main_serve

    main_serve(args.port, cdn_port=args.cdn_port, generation_seconds=args.generation_seconds)
    return EXIT_OK
