"""systemd: the sd_notify protocol of the real daemon, and the unit files (verify, security, content)."""

from __future__ import annotations

import itertools
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import DaemonProcess, Folders, StartDaemon, cli_env, wait_for

from scenario_watch.shell.notify import Notifier

ROOT = Path(__file__).resolve().parent.parent
SYSTEM_UNIT = ROOT / "systemd" / "scenario-watch.service"
USER_UNIT = ROOT / "systemd" / "user" / "scenario-watch.service"
WATCHDOG_USEC = 400_000  # so the daemon pings every 0.2 s
STATUS = re.compile(r"STATUS=queued (\d+), in flight (\d+), done (\d+), failed (\d+)")
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")


# -- a stand-in for systemd's end of $NOTIFY_SOCKET ------------------------------------------------------


class NotifySocket:
    """An AF_UNIX datagram socket like the one systemd listens on; `address` goes into $NOTIFY_SOCKET."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.lines: list[str] = []  # every assignment received, in order

    def close(self) -> None:
        self.sock.close()

    def wait(self, matches: Callable[[str], object], timeout: float, what: str, start: int = 0) -> int:
        """The index of the first line from `start` on that matches, reading (bounded) until one does."""
        deadline = time.monotonic() + timeout
        checked = start
        while True:
            for index in range(checked, len(self.lines)):
                if matches(self.lines[index]):
                    return index
            checked = max(checked, len(self.lines))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {what} within {timeout} s; received {self.lines[start:]}")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.lines.extend(data.decode().splitlines())

    def collect(self, seconds: float) -> list[str]:
        """Everything that arrives within `seconds` (an observation window, not a synchronisation)."""
        first, deadline = len(self.lines), time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            self.sock.settimeout(remaining)
            try:
                self.lines.extend(self.sock.recv(4096).decode().splitlines())
            except TimeoutError:
                break
        return self.lines[first:]


@pytest.fixture
def notify_socket() -> Iterator[Callable[[str], NotifySocket]]:
    """Bind a notify socket: "path" (a file in a short temp dir: sun_path has 108 bytes) or "abstract"."""
    made: list[NotifySocket] = []
    with tempfile.TemporaryDirectory(prefix="sdnotify-") as folder:

        def make(kind: str) -> NotifySocket:
            if kind == "abstract":
                address = f"@scenario-watch-test/{uuid.uuid4().hex}"
            else:
                address = os.path.join(folder, f"notify-{len(made)}")
            made.append(NotifySocket(address))
            return made[-1]

        yield make
        for sock in made:
            sock.close()


def systemd_env(sock: NotifySocket, **extra: str) -> dict[str, str]:
    """The daemon's environment as systemd sets it for Type=notify with WatchdogSec=."""
    env = cli_env(NOTIFY_SOCKET=sock.address, WATCHDOG_USEC=str(WATCHDOG_USEC), **extra)
    env.pop("WATCHDOG_PID", None)  # in case the tests themselves run under systemd
    return env


def counts(line: str) -> tuple[int, ...] | None:
    """(queued, in flight, done, failed) of a STATUS= line; None for any other line."""
    match = STATUS.fullmatch(line)
    return tuple(int(n) for n in match.groups()) if match else None


# -- the notify protocol, against the real daemon process ----------------------------------------------


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_ready_status_watchdog_then_stopping_and_exit_0_on_sigterm(
    kind: str, daemon: StartDaemon, notify_socket: Callable[[str], NotifySocket]
) -> None:
    sock = notify_socket(kind)
    proc = daemon(env=systemd_env(sock))

    ready = sock.wait(lambda line: line == "READY=1", 20, "READY=1")
    status = sock.wait(counts, 10, "STATUS= with counts", start=ready)
    assert counts(sock.lines[status]) == (0, 0, 0, 0)

    pings = [sock.wait(lambda line: line == "WATCHDOG=1", 5, "the first WATCHDOG=1", start=ready)]
    for n in (2, 3):
        pings.append(sock.wait(lambda line: line == "WATCHDOG=1", 5, f"WATCHDOG=1 #{n}", start=pings[-1] + 1))
    # Every WATCHDOG_USEC/2 (0.2 s), not in a busy loop: about 5 pings a second, not hundreds.
    window = sock.collect(1.0)
    assert window.count("WATCHDOG=1") <= 1.0 / (WATCHDOG_USEC / 2e6) + 2, window
    assert sock.lines.count("READY=1") == 1

    stop_sent = time.monotonic()
    proc.proc.send_signal(signal.SIGTERM)
    sock.wait(lambda line: line == "STOPPING=1", 5, "STOPPING=1 after SIGTERM", start=len(sock.lines))
    code = proc.proc.wait(timeout=max(0.1, 5 - (time.monotonic() - stop_sent)))
    assert code == 0, proc.output()
    assert time.monotonic() - stop_sent < 5
    assert "daemon.stopped" in proc.output()
    assert "systemd.notify_failed" not in proc.output()


def stop(proc: DaemonProcess, sock: NotifySocket) -> None:
    """SIGTERM, reading the socket meanwhile (an unread socket fills up and blocks the sender)."""
    proc.proc.send_signal(signal.SIGTERM)
    sock.wait(lambda line: line == "STOPPING=1", 5, "STOPPING=1 after SIGTERM", start=len(sock.lines))
    assert proc.proc.wait(timeout=5) == 0, proc.output()  # one signal: a second one would force a failure
    proc.stop()


def test_status_follows_a_prompt_from_in_flight_to_done(
    folders: Folders, daemon: StartDaemon, notify_socket: Callable[[str], NotifySocket]
) -> None:
    sock = notify_socket("path")
    proc = daemon(env=systemd_env(sock))
    ready = sock.wait(lambda line: line == "READY=1", 20, "READY=1")
    idle = sock.wait(counts, 10, "the first STATUS=", start=ready)
    assert counts(sock.lines[idle]) == (0, 0, 0, 0)

    folders.drop("lighthouse.json", {"prompt": "a lighthouse at dusk"})
    # Claimed, validated and submitted in one tick, so "in flight 1" is always reported before "done 1".
    flying = sock.wait(lambda line: counts(line) == (0, 1, 0, 0), 20, "STATUS in flight 1", start=idle + 1)
    done = sock.wait(lambda line: counts(line) == (0, 0, 1, 0), 20, "STATUS done 1", start=flying + 1)
    statuses = [line for line in sock.lines[: done + 1] if line.startswith("STATUS=")]
    assert all(a != b for a, b in itertools.pairwise(statuses)), "STATUS= only when it changes"
    wait_for(lambda: folders.names(folders.done) == ["lighthouse.json"], 10, "the prompt filed in done/")
    stop(proc, sock)


def test_notifier_is_silent_without_the_variables() -> None:
    notifier = Notifier({})
    assert notifier.address == ""
    assert notifier.watchdog_every is None
    notifier.send("READY=1")  # nowhere to send: no error, no socket
    assert Notifier({"WATCHDOG_USEC": "400000"}).address == ""


@pytest.mark.parametrize(("usec", "every"), [("400000", 0.2), ("30000000", 15.0), ("0", None), ("x", None)])
def test_notifier_pings_at_half_of_watchdog_usec(usec: str, every: float | None) -> None:
    assert Notifier({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": usec}).watchdog_every == every


# -- MemoryDenyWriteExecute=yes with this CPython and these dependencies --------------------------------

# Put on PYTHONPATH, this re-executes the interpreter under a seccomp filter equal to the one systemd
# installs for MemoryDenyWriteExecute=yes (systemd.exec(5)): refuse mmap with PROT_WRITE|PROT_EXEC,
# mprotect/pkey_mprotect with PROT_EXEC, shmat with SHM_EXEC. Seccomp filters survive execve.
MDWE_SITECUSTOMIZE = """
import os
import sys

if os.environ.get("MDWE_FILTER") != "on":
    import ctypes
    import platform
    import struct

    audit_arch, nr = {
        "x86_64": (0xC000003E, {"mmap": 9, "mprotect": 10, "pkey_mprotect": 329, "shmat": 30}),
        "aarch64": (0xC00000B7, {"mmap": 222, "mprotect": 226, "pkey_mprotect": 288, "shmat": 196}),
    }[platform.machine()]
    LD, AND, JEQ, JSET, RET = 0x20, 0x54, 0x15, 0x45, 0x06
    ALLOW, EPERM = 0x7FFF0000, 0x00050001
    PROT_WRITE, PROT_EXEC, SHM_EXEC, ARG2 = 2, 4, 0o100000, 16 + 2 * 8
    program = [
        (LD, 4), (JEQ, audit_arch, None, "allow"), (LD, 0),
        (JEQ, nr["mmap"], "mmap", None), (JEQ, nr["mprotect"], "prot", None),
        (JEQ, nr["pkey_mprotect"], "prot", None), (JEQ, nr["shmat"], "shm", None), (RET, ALLOW),
        "mmap", (LD, ARG2), (AND, PROT_WRITE | PROT_EXEC), (JEQ, PROT_WRITE | PROT_EXEC, "deny", "allow"),
        "prot", (LD, ARG2), (JSET, PROT_EXEC, "deny", "allow"),
        "shm", (LD, ARG2), (JSET, SHM_EXEC, "deny", "allow"),
        "deny", (RET, EPERM),
        "allow", (RET, ALLOW),
    ]
    labels, at = {}, 0
    for op in program:
        if isinstance(op, str):
            labels[op] = at
        else:
            at += 1
    code = []
    for op in (op for op in program if not isinstance(op, str)):
        here = len(code) + 1
        jump = lambda label: 0 if label is None else labels[label] - here
        k = op[1]
        code.append(struct.pack("HBBI", op[0], *((jump(op[2]), jump(op[3])) if len(op) == 4 else (0, 0)), k))
    filters = ctypes.create_string_buffer(b"".join(code))

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    libc = ctypes.CDLL(None, use_errno=True)
    fprog = Program(len(code), ctypes.addressof(filters))
    # PR_SET_NO_NEW_PRIVS (as NoNewPrivileges=yes), then PR_SET_SECCOMP with SECCOMP_MODE_FILTER.
    if libc.prctl(38, 1, 0, 0, 0) or libc.prctl(22, 2, ctypes.byref(fprog), 0, 0):
        raise OSError(ctypes.get_errno(), "cannot install the MemoryDenyWriteExecute filter")
    os.environ["MDWE_FILTER"] = "on"
    os.execv(sys.executable, sys.orig_argv)
"""

MDWE_PROBE = """
import ctypes, mmap, ssl
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    print("wx-allowed")
except PermissionError:
    print("wx-refused")
page = mmap.mmap(-1, 4096)
address = ctypes.addressof(ctypes.c_char.from_buffer(page))
libc = ctypes.CDLL(None, use_errno=True)
print("exec-refused" if libc.mprotect(ctypes.c_void_p(address), 4096, 5) else "exec-allowed")
ssl.create_default_context()
print("ssl")
"""


@pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() not in ("x86_64", "aarch64"),
    reason="the seccomp filter in this test knows x86_64 and aarch64 syscall numbers",
)
def test_daemon_works_under_memory_deny_write_execute(
    tmp_path: Path, folders: Folders, daemon: StartDaemon, notify_socket: Callable[[str], NotifySocket]
) -> None:
    site = tmp_path / "mdwe"
    site.mkdir()
    (site / "sitecustomize.py").write_text(MDWE_SITECUSTOMIZE)
    pythonpath = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    probe = subprocess.run(
        [sys.executable, "-c", MDWE_PROBE],
        env=cli_env(PYTHONPATH=pythonpath),
        capture_output=True,
        text=True,
        timeout=60,
    )
    if "cannot install the MemoryDenyWriteExecute filter" in probe.stderr:
        pytest.skip(f"seccomp filters are not available here: {probe.stderr.strip().splitlines()[-1]}")
    # The filter really refuses what systemd refuses (else this test would prove nothing).
    assert probe.stdout.split() == ["wx-refused", "exec-refused", "ssl"], probe.stdout + probe.stderr

    sock = notify_socket("path")
    proc = daemon(env=systemd_env(sock, PYTHONPATH=pythonpath))
    status = Path(f"/proc/{proc.proc.pid}/status").read_text()
    assert re.search(r"^Seccomp:\s+2$", status, re.M), status  # the daemon itself runs filtered
    ready = sock.wait(lambda line: line == "READY=1", 20, "READY=1")
    folders.drop("aurora.json", {"prompt": "a purple aurora", "numOutputs": 2})
    sock.wait(lambda line: counts(line) == (0, 0, 1, 0), 30, "STATUS done 1", start=ready)
    assert sorted(folders.names(folders.outbox)) == ["aurora.manifest.json", "aurora_1.png", "aurora_2.png"]
    stop(proc, sock)
    assert "Traceback" not in proc.output()


# -- the unit files ------------------------------------------------------------------------------------


def service_settings(unit: Path) -> list[tuple[str, str]]:
    """The (key, value) assignments of the [Service] section, in order (keys may repeat)."""
    section, found = "", []
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            found.append((key, value))
    return found


@pytest.mark.parametrize("unit", [SYSTEM_UNIT, USER_UNIT], ids=["system", "user"])
def test_units_notify_restart_and_take_secrets_only_as_credentials(unit: Path) -> None:
    settings = service_settings(unit)
    one = dict(settings)
    assert one["Type"] == "notify"
    assert one["Restart"] == "on-failure"
    assert one["KillSignal"] == "SIGTERM"
    assert 5 <= int(one["TimeoutStopSec"].removesuffix("s")) <= 30
    assert int(one["WatchdogSec"].removesuffix("s")) >= 10
    assert one["MemoryDenyWriteExecute"] == "yes"
    assert one["RestrictAddressFamilies"] == "AF_INET AF_INET6 AF_UNIX"
    assert one["UMask"] in ("0027", "0007")  # outputs group-readable
    credentials = sorted(value.partition(":")[0] for key, value in settings if key == "LoadCredential")
    assert credentials == ["scenario-api-key", "scenario-api-secret"]
    # No secret in the unit, its environment or the command line (comments may explain the fallback).
    assert not [key for key, _ in settings if key in ("Environment", "EnvironmentFile", "PassEnvironment")]
    assert not [value for _, value in settings if "SCENARIO_API_" in value]
    exec_start = one["ExecStart"].split()
    assert Path(exec_start[0].replace("%h", "/home/someone")).is_absolute()
    assert exec_start[1:3] == ["run", "-c"]


def test_system_unit_writes_only_its_folders_and_state() -> None:
    settings = service_settings(SYSTEM_UNIT)
    one = dict(settings)
    writable = sorted(path for key, value in settings if key == "ReadWritePaths" for path in value.split())
    assert writable == [f"/srv/scenario-watch/{name}" for name in ("done", "failed", "inbox", "outbox")]
    assert one["StateDirectory"] == "scenario-watch"
    assert one["ProtectSystem"] == "strict"
    assert one["CapabilityBoundingSet"] == ""
    assert one["ExecStart"].split()[3] == "/etc/scenario-watch/config.toml"
    assert one["User"] and one["User"] != "root"


def executable_copy(unit: Path, folder: Path, text: str | None = None) -> Path:
    """A copy whose ExecStart runs this venv's scenario-watch: verify fails when the binary is missing."""
    binary = Path(sys.executable).with_name("scenario-watch")
    if not binary.exists():
        pytest.skip(f"{binary} does not exist (install the project into this environment)")
    source = unit.read_text() if text is None else text
    rewritten, n = re.subn(r"^ExecStart=\S+/scenario-watch ", f"ExecStart={binary} ", source, flags=re.M)
    assert n == 1, "ExecStart= should run .../scenario-watch"
    folder.mkdir(parents=True, exist_ok=True)
    copy = folder / unit.name
    copy.write_text(rewritten)
    return copy


def analyze(*args: str, user: bool, runtime: Path) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    runtime.mkdir(mode=0o700, exist_ok=True)
    # A user manager needs $XDG_RUNTIME_DIR even to load units; a private one keeps the real one alone.
    env = dict(os.environ, SYSTEMD_PAGER="", SYSTEMD_COLORS="0", XDG_RUNTIME_DIR=str(runtime))
    command = [SYSTEMD_ANALYZE, *(["--user"] if user else []), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)


OTHER_UNIT = re.compile(
    r"^(\S*/)?[\w@\\:.-]+\.(service|socket|target|mount|automount|swap|path|timer|slice|scope):"
)


def verify_problems(unit: Path, *, user: bool, runtime: Path) -> list[str]:
    """What `systemd-analyze verify` says about `unit`; complaints naming only *other* units are ignored.

    verify exits 0 on unknown keys and unparsable values (it only warns), so any output counts.
    """
    result = analyze("verify", "--man=no", str(unit), user=user, runtime=runtime)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    problems = [line for line in lines if unit.name in line or not OTHER_UNIT.match(line)]
    if result.returncode != 0 and not problems:
        problems = [f"exit status {result.returncode}", *lines]
    return problems


@pytest.fixture
def verifiable(tmp_path: Path) -> Callable[[bool], Path]:
    """Skip when verify cannot check even a trivial valid unit here; else the runtime dir to use."""

    def check(user: bool) -> Path:
        runtime = tmp_path / "runtime"
        control = tmp_path / "control" / "control-unit.service"
        control.parent.mkdir()
        control.write_text(
            f"[Unit]\nDescription=control\n[Service]\nType=oneshot\nExecStart={sys.executable} -c pass\n"
        )
        problems = verify_problems(control, user=user, runtime=runtime)
        if problems:
            pytest.skip(f"systemd-analyze verify fails on a trivial unit here: {problems}")
        return runtime

    return check


@needs_systemd_analyze
@pytest.mark.parametrize(("unit", "user"), [(SYSTEM_UNIT, False), (USER_UNIT, True)], ids=["system", "user"])
def test_systemd_analyze_verify_is_clean(
    unit: Path, user: bool, tmp_path: Path, verifiable: Callable[[bool], Path]
) -> None:
    runtime = verifiable(user)
    copy = executable_copy(unit, tmp_path / "units")
    assert verify_problems(copy, user=user, runtime=runtime) == []


@needs_systemd_analyze
@pytest.mark.parametrize(
    ("unit", "user", "typo", "reported"),
    [
        (SYSTEM_UNIT, False, ("NoNewPrivileges=", "NoNewPrivilegs="), "NoNewPrivilegs"),
        (SYSTEM_UNIT, False, ("WatchdogSec=30s", "WatchdogSec=thirty"), "thirty"),
        (USER_UNIT, True, ("LockPersonality=", "LockPersonalty="), "LockPersonalty"),
    ],
    ids=["system-key", "system-value", "user-key"],
)
def test_verify_check_catches_a_broken_unit(
    unit: Path,
    user: bool,
    typo: tuple[str, str],
    reported: str,
    tmp_path: Path,
    verifiable: Callable[[bool], Path],
) -> None:
    """The verify test is not vacuous: one wrong key or value in a copy of the unit fails it."""
    runtime = verifiable(user)
    text = unit.read_text()
    assert typo[0] in text
    copy = executable_copy(unit, tmp_path / "units", text.replace(typo[0], typo[1], 1))
    problems = verify_problems(copy, user=user, runtime=runtime)
    assert any(reported in line for line in problems), problems


@needs_systemd_analyze
def test_system_unit_exposure_is_at_most_2(tmp_path: Path) -> None:
    # The copy differs only in ExecStart's path (some versions check that it exists, offline too).
    copy = executable_copy(SYSTEM_UNIT, tmp_path / "units")
    result = analyze(
        "security", "--offline=true", "--no-pager", str(copy), user=False, runtime=tmp_path / "rt"
    )
    match = re.search(r"Overall exposure level for scenario-watch\.service: (\d+(?:\.\d+)?)", result.stdout)
    assert match, result.stdout + result.stderr
    exposed = [line for line in result.stdout.splitlines() if line.startswith("✗")]
    assert float(match.group(1)) <= 2.0, "\n".join(exposed)
