"""systemd's notify protocol (READY, STATUS, WATCHDOG, STOPPING) in a few lines, and the status line."""

from __future__ import annotations

import socket
from collections.abc import Mapping

from scenario_watch import logs

log = logs.get()


def status_line(queued: int, in_flight: int, done: int, failed: int) -> str:
    """The one-line summary systemd shows in `systemctl status`."""
    return f"queued {queued}, in flight {in_flight}, done {done}, failed {failed}"


class Notifier:
    """sd_notify over $NOTIFY_SOCKET (no dependency); silent when unset."""

    def __init__(self, env: Mapping[str, str]) -> None:
        address = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        usec = env.get("WATCHDOG_USEC", "")
        # systemd's advice: ping at half the watchdog period.
        self.watchdog_every = int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 else None
        self.next_watchdog = 0.0
        self._last_status = ""

    def send(self, message: str) -> None:
        """Send one notification datagram (errors are logged, never raised)."""
        if not self.address:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.connect(self.address)
                sock.sendall(message.encode())
        except OSError as exc:
            log.warning("systemd.notify_failed", error=str(exc))

    def next_due(self) -> float | None:
        """When the next watchdog ping is due (monotonic), or None without a watchdog."""
        return self.next_watchdog if self.watchdog_every else None

    def wants_status(self) -> bool:
        """Whether a status line is worth computing (only under systemd)."""
        return bool(self.address)

    def tick(self, now: float, status: str | None) -> None:
        """Ping the watchdog when due; send the status line when it changed."""
        if self.watchdog_every and now >= self.next_watchdog:
            self.send("WATCHDOG=1")
            self.next_watchdog = now + self.watchdog_every
        if status is not None and status != self._last_status:
            self._last_status = status
            self.send(f"STATUS={status}")
