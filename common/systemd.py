"""``sd_notify`` without libsystemd: tell the service manager we are ready, alive and stopping.

A ``Type=notify`` unit is "started" only once the daemon says ``READY=1`` (after it connected to
the broker and the catalogue), so ``systemctl start`` and units ordered after it wait for real
readiness. With ``WatchdogSec=`` systemd kills and restarts a daemon that stops pinging; pinging
from the event loop proves the loop itself is not stuck. Outside systemd (``$NOTIFY_SOCKET`` unset:
a terminal, docker, tests) every call is a cheap no-op returning False.

The protocol is one datagram of ``KEY=value`` lines to the AF_UNIX socket named in
``$NOTIFY_SOCKET``; a leading ``@`` means the Linux abstract namespace.
"""

from __future__ import annotations

import os
import socket


def _address() -> str | None:
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if addr.startswith("@"):
        return "\0" + addr[1:]
    if addr.startswith("/"):
        return addr
    return None  # unset, or a transport we do not speak (vsock:)


def notify(state: str) -> bool:
    """Send ``state`` (newline-separated ``KEY=value`` lines) to systemd; True if it was sent.

    Never raises and never blocks: a notification is advice to the service manager, and losing one
    must not take the daemon down.
    """
    addr = _address()
    if addr is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            sock.connect(addr)
            sock.sendall(state.encode())
    except OSError:
        return False
    return True


def ready() -> bool:
    """Start-up finished: systemd marks the unit active."""
    return notify("READY=1")


def stopping() -> bool:
    """Graceful stop begun (draining in-flight work)."""
    return notify("STOPPING=1")


def status(text: str) -> bool:
    """One line shown by ``systemctl status``."""
    return notify("STATUS=" + " ".join(text.splitlines()))


def watchdog_ping() -> bool:
    """Reset the watchdog timer; call every ``watchdog_interval()`` seconds."""
    return notify("WATCHDOG=1")


def extend_timeout(seconds: float) -> bool:
    """Ask for more time for the current start-up or stop phase (a long drain, a tape unmount)."""
    return notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings (half of ``WatchdogSec``), or None when no watchdog applies.

    ``$WATCHDOG_PID`` names the process the watchdog is meant for; a child that inherited the
    environment must not ping on the parent's behalf.
    """
    pid = os.environ.get("WATCHDOG_PID")
    if pid is not None:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2_000_000
