"""The daemons of a chaos run, each its own ``spool run <daemon>`` process, and what happened to
them: started, killed, stopped, and every exit the harness did not ask for.

One config file per node: with one, each daemon runs once (its key is the daemon's name); with
several (the several-node run), each daemon runs once per node and its key is ``<daemon>@<node>``
(``a``, ``b``, ... in the order of the files), so the instances' logs, starts and exits stay apart.

A supervisor (``watch``) plays systemd's ``Restart=always``: whatever ends a daemon, it is started
again after a short delay. An exit the harness did not cause is recorded with its code and the
last lines of the daemon's log; exit 3 (broker or catalogue unreachable, the CLI's code for it)
while the private broker is down or just back is what a daemon should do then, anything else is a
finding.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DAEMONS = ("ingest", "replicator", "tape", "recall", "monitor")
BROKER_UNREACHABLE = 3  # spool.main's exit code for an unreachable broker / catalogue


def daemon_env() -> dict[str, str]:
    """The harness's environment without Spool overrides (``SPOOL_AMQP_URL`` would send a daemon
    to the shared broker): the run's config file alone decides."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPOOL_") or k.startswith("SPOOL_TEST_")}
    # PYTHONFAULTHANDLER: a daemon found stuck gets SIGABRT and writes every thread's stack to its log.
    return {**env, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}


@dataclass
class Exit:
    """An exit the harness did not ask for."""

    daemon: str  # the instance's key (``ingest`` or ``ingest@a``)
    code: int
    at: float  # seconds since the run started
    during_outage: bool
    log_tail: str

    @property
    def expected(self) -> bool:
        return self.code == BROKER_UNREACHABLE and self.during_outage


@dataclass
class Daemon:
    name: str  # the instance's key: the daemon's name, or ``<daemon>@<node>`` with several nodes
    daemon: str  # which daemon (one of DAEMONS)
    config: Path
    process: subprocess.Popen[bytes] | None = None
    restart_at: float | None = None  # monotonic time of the next start, when not running
    stopping: bool = False  # the harness signalled it: its exit is expected
    starts: int = 0
    started_at: float = 0.0  # monotonic
    pids: list[int] = field(default_factory=list)  # of every process started (heartbeats name them)


def node_label(i: int) -> str:
    return "abcdefghijklmnopqrstuvwxyz"[i]


@dataclass
class Fleet:
    configs: list[Path]  # one per node
    logs: Path
    t0: float = field(default_factory=time.monotonic)
    daemons: dict[str, Daemon] = field(default_factory=dict)
    exits: list[Exit] = field(default_factory=list)
    # After each SIGTERM of ours: daemon, exit code, and whether it was serving (had its handler)
    # or still starting (then SIGTERM's default action ends it: -15, nothing taken yet).
    term_codes: list[tuple[str, int, bool]] = field(default_factory=list)
    outage_until: float = 0.0  # monotonic; exits before this (plus a grace) count as in the outage

    def __post_init__(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        several = len(self.configs) > 1
        self.daemons = {
            key: Daemon(key, name, config)
            for name in DAEMONS
            for i, config in enumerate(self.configs)
            for key in [f"{name}@{node_label(i)}" if several else name]
        }

    def instances(self, daemon: str) -> list[str]:
        """The keys of a daemon's instances, in node order."""
        return [k for k, d in self.daemons.items() if d.daemon == daemon]

    def key_of_pid(self, pid: int) -> str | None:
        return next((k for k, d in self.daemons.items() if pid in d.pids), None)

    def live_pids(self) -> set[int]:
        return {
            d.process.pid for d in self.daemons.values() if d.process is not None and d.process.poll() is None
        }

    def log_path(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def start(self, name: str) -> None:
        d = self.daemons[name]
        with self.log_path(name).open("ab") as out:
            d.process = subprocess.Popen(
                [sys.executable, "-m", "daemons", "--config", str(d.config), "run", d.daemon],
                stdout=out, stderr=out, stdin=subprocess.DEVNULL, cwd=REPO,
                env=daemon_env(),
            )  # fmt: skip
        d.restart_at, d.stopping = None, False
        d.starts += 1
        d.started_at = time.monotonic()
        d.pids.append(d.process.pid)

    def start_all(self) -> None:
        for key in self.daemons:
            self.start(key)

    def running(self, name: str) -> bool:
        p = self.daemons[name].process
        return p is not None and p.poll() is None

    def signal(self, name: str, sig: signal.Signals) -> bool:
        """Send ``sig`` to a running daemon; False when it was not running."""
        d = self.daemons[name]
        if not self.running(name):
            return False
        assert d.process is not None
        d.stopping = True
        d.process.send_signal(sig)
        return True

    async def wait_exit(self, name: str, timeout: float) -> int | None:
        p = self.daemons[name].process
        deadline = time.monotonic() + timeout
        while p is not None and p.poll() is None:
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(0.05)
        return None if p is None else p.returncode

    def schedule_restart(self, name: str, delay: float) -> None:
        self.daemons[name].restart_at = time.monotonic() + delay

    def _record_exit(self, d: Daemon, code: int) -> None:
        text = self.log_path(d.name).read_text(errors="replace")
        now = time.monotonic()
        in_outage = now <= self.outage_until + 15.0  # reconnecting daemons give up after ~10 s
        self.exits.append(Exit(d.name, code, now - self.t0, in_outage, text[-1500:]))

    async def watch(self, stop: asyncio.Event, restart_delay: float = 1.0) -> None:
        """Restart whatever ended, until ``stop``; record the exits nobody asked for."""
        while not stop.is_set():
            now = time.monotonic()
            for d in self.daemons.values():
                p = d.process
                if p is not None and p.poll() is not None and d.restart_at is None:
                    if not d.stopping:
                        self._record_exit(d, p.returncode)
                    d.restart_at = now + restart_delay
                if d.restart_at is not None and now >= d.restart_at and (p is None or p.poll() is not None):
                    self.start(d.name)
            await asyncio.sleep(0.1)

    def handles_sigterm(self, name: str) -> bool:
        """Whether the daemon has a SIGTERM handler (``SigCgt`` in /proc): a daemon serving has one;
        one whose main loop has ended (its ``finally`` restores the default) has not."""
        p = self.daemons[name].process
        if p is None or p.poll() is not None:
            return False
        try:
            status = Path(f"/proc/{p.pid}/status").read_text()
        except OSError:
            return True  # not Linux: cannot tell, assume it does
        caught = next(int(ln.split()[1], 16) for ln in status.splitlines() if ln.startswith("SigCgt:"))
        return bool(caught & (1 << (signal.SIGTERM - 1)))

    async def dump_stuck(self) -> list[str]:
        """Every running daemon without a SIGTERM handler gets SIGABRT (its stacks go to its log);
        returns a line per such daemon with the top of its main thread's stack."""
        found = []
        for name in self.daemons:
            settled = time.monotonic() - self.daemons[name].started_at > 30  # imports done long ago
            if self.running(name) and settled and not self.handles_sigterm(name):
                before = self.log_path(name).stat().st_size
                self.signal(name, signal.SIGABRT)
                await self.wait_exit(name, 10)
                with self.log_path(name).open("rb") as f:
                    f.seek(before)
                    dump = f.read().decode(errors="replace")
                frames = [ln.strip() for ln in dump.splitlines() if ln.strip().startswith("File ")][:4]
                stack = " <- ".join(frames)
                found.append(f"{name} had no SIGTERM handler (its run had ended; stuck): {stack}")
        return found

    def terminate(self, name: str) -> bool | None:
        """SIGTERM a running daemon; whether it was serving, None when it was not running."""
        if not self.running(name):
            return None
        serving = self.handles_sigterm(name)
        self.signal(name, signal.SIGTERM)
        return serving

    async def stop_all(self, grace: float) -> list[tuple[str, int, bool]]:
        """SIGTERM every running daemon and wait; one still running after ``grace`` s is killed
        (its code then -999). Returns (daemon, code, serving) as ``term_codes``."""
        signalled = {name: self.terminate(name) for name in self.daemons}
        codes = []
        for name, serving in signalled.items():
            if serving is None:
                continue
            code = await self.wait_exit(name, grace)
            if code is None and self.signal(name, signal.SIGKILL):
                await self.wait_exit(name, 10)
            codes.append((name, -999 if code is None else code, serving))
        return codes

    def kill_all(self) -> None:
        for name in self.daemons:
            self.signal(name, signal.SIGKILL)
