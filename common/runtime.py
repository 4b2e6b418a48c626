"""Running one or several services in one process, and stopping them in order.

Start: connect (robust) -> declare the topology -> open each service's resources -> start
consuming -> tell systemd READY=1 -> heartbeats and watchdog pings. A broker that is unreachable,
or closes the connection at any step before consuming, ends the start with one
``Retryable`` (``broker_unreachable`` / ``broker_unavailable``; exit code 3 under ``spool run``).

Stop (SIGTERM / SIGINT, or the ``once`` pass finished): stop taking messages -> let in-flight
handlers finish within ``bus.stop_grace`` -> close the channels (the broker requeues whatever is
unacked) -> close resources -> close the connection. A second signal exits at once.

**A stop always ends.** A worker thread can be stuck where no cancellation reaches it (``open()``
of a FIFO, a hung network file system, a syscall that never returns), and the interpreter waits
for such threads at exit. So a daemon process of its own (``spool run``) arms a watchdog thread
when the stop begins: ``bus.stop_grace`` + ``STOP_BOUND`` seconds later, if the process is still
there, it logs one ``stop_overran`` line naming what was still running (per daemon, the ids of
the messages whose handlers were cancelled at the end of the grace; every other thread, with the
function it is in), flushes the logs and ends the process
with ``os._exit(EXIT_STOP_OVERRAN)``. The broker requeues whatever was unacked; systemd sees a
distinct exit code. A process embedding the services (tests, benchmarks) is not ended for them.
The stop begins on the event loop, so a loop that is itself stuck (a blocking call on it) never
begins one: that is what the systemd watchdog (``WatchdogSec``; its pings stop) ends.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Coroutine, Sequence
from contextlib import AsyncExitStack, ExitStack, suppress
from datetime import UTC, datetime
from typing import Any, TypeVar

import aiormq
import structlog
from aio_pika.abc import AbstractRobustConnection

from common import __version__, systemd
from common.bus.connection import connect
from common.bus.consumer import Runner
from common.bus.publisher import AmqpPublisher, connection_user
from common.bus.service import Service
from common.bus.topology import declare_for
from common.bus.trust import is_spool_user
from common.config import Settings
from common.errors import ConfigError, Retryable, SpoolError
from common.logging import libraries_quiet, one_line
from common.messages import DaemonHeartbeat
from common.periodic import every

log = structlog.get_logger("spool.runtime")
T = TypeVar("T")
# Seconds a stop may take beyond ``bus.stop_grace`` (closing channels, resources, the connection)
# before the watchdog ends the process, and the exit code it ends it with (EX_SOFTWARE).
STOP_BOUND = 5.0
EXIT_STOP_OVERRAN = 70


class Process:
    """Owns the connection, the publisher and one ``Runner`` per service."""

    def __init__(
        self, services: Sequence[Service], settings: Settings, *, once: bool = False, tune_gc: bool = False
    ) -> None:
        self.services = list(services)
        self.settings = settings
        self.once = once
        # A daemon process of its own (``spool run``) tunes the garbage collector and ends itself
        # when a stop overruns; a process embedding the services (tests, benchmarks) decides for
        # itself.
        self.tune_gc = tune_gc
        self.bounded_stop = tune_gc
        self.stop_requested = asyncio.Event()
        self.runners: list[Runner] = []
        self.instance = uuid.uuid4().hex[:12]
        self.started = datetime.now(UTC)
        self._signals = 0

    def request_stop(self) -> None:
        self.stop_requested.set()

    async def run(self) -> int:
        names = "+".join(s.name for s in self.services)
        # Until the services consume, broker trouble ends the process with one line of Spool's own
        # (``Retryable``: exit code 3 under ``spool run``); the AMQP libraries' lines (with their
        # tracebacks) would only repeat it.
        with ExitStack() as quiet:
            quiet.enter_context(libraries_quiet())
            connection = await connect(self.settings.bus, name=f"spool-{names}@{socket.gethostname()}")
            # aio-pika logs the loss and each failed attempt (warnings); the recovery is ours to say.
            connection.reconnect_callbacks.add(
                lambda _connection: log.info("broker_reconnected", services=names)
            )
            try:
                async with AsyncExitStack() as stack:
                    publisher = await self._start(connection, stack, names)
                    quiet.close()
                    await self._serve(publisher, names)
            finally:
                self._remove_signal_handlers()
                await connection.close()
        log.info("stopped", services=names)
        return 0

    async def _start(
        self, connection: AbstractRobustConnection, stack: AsyncExitStack, names: str
    ) -> AmqpPublisher:
        """Declare the topology, open the publisher, each service's resources and channel, consume.

        A broker that closes or drops the connection meanwhile (a node shutting down, a restart)
        fails whichever step was under way with whatever aio-pika raises there (``ConnectionClosed``,
        ``RuntimeError: ... closed``, ``ChannelInvalidStateError``, ...): all of them become one
        ``Retryable('broker_unavailable')`` naming the step. No retry here: systemd (or whoever
        runs the daemon) starts it again, from a clean state, after ``RestartSec``.
        """
        user = connection_user(connection)
        if not is_spool_user(user, self.settings.bus):
            # Its retry copies and commands would be treated as external (attempts never counted,
            # commands refused): refuse to start rather than loop.
            raise ConfigError(
                f"the daemon's broker user {user!r} (bus.url) is not one of bus.spool_users "
                f"({', '.join(sorted(self.settings.bus.trusted_users()))})"
            )
        step = "declaring the topology"
        try:
            await declare_for(connection, self.settings, [s.name for s in self.services])
            step = "opening the publisher's channel"
            publisher = await AmqpPublisher.create(connection, self.settings.bus.exchange, f"spool-{names}")
            stack.push_async_callback(_close_quietly, publisher)  # last: resources may publish
            for service in self.services:
                resources = None
                if service.resources is not None:
                    step = f"opening the resources of {service.name}"
                    resources = await stack.enter_async_context(service.resources(self.settings, publisher))
                step = f"opening the channel of {service.name}"
                channel = await connection.channel()
                step = f"starting the consumer of {service.name}"
                runner_class = service.runner or Runner
                runner = runner_class(service, self.settings, channel, publisher, resources)
                await runner.start()
                self.runners.append(runner)
        except (Exception, asyncio.CancelledError) as exc:
            if not _broker_gone(exc, connection):
                raise
            detail = exc.message if isinstance(exc, SpoolError) else one_line(exc)
            raise Retryable("broker_unavailable", f"RabbitMQ went away while {step}: {detail}") from None
        return publisher

    async def _serve(self, publisher: AmqpPublisher, names: str) -> None:
        """Consume until asked to stop, then stop taking messages and drain."""
        self._install_signal_handlers()
        if self.tune_gc:
            tune_gc()
        systemd.ready()
        beats = every(
            self.settings.bus.heartbeat_interval,
            lambda: self._heartbeat(publisher),
            name="heartbeats",
            log=log,
        )
        background = [asyncio.create_task(beats)]
        if (interval := systemd.watchdog_interval()) is not None:
            background.append(asyncio.create_task(every(interval, _watchdog_ping, name="watchdog", log=log)))
        if self.once:
            background.append(asyncio.create_task(self._stop_when_idle()))
        log.info("started", services=names, instance=self.instance, once=self.once)
        await self.stop_requested.wait()
        systemd.stopping()
        log.info("stopping", services=names)
        if self.bounded_stop:
            arm_stop_watchdog(self.settings.bus.stop_grace + STOP_BOUND, self._in_flight)
        for runner in self.runners:
            await runner.stop_consuming()
        await asyncio.gather(*(r.drain(self.settings.bus.stop_grace) for r in self.runners))
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)

    def _in_flight(self) -> dict[str, Any]:
        """Per daemon: the messages whose handlers were cancelled at the end of the grace (their
        threads may still run), or how many are in flight if the grace has not ended."""
        return {r.service.name: r.abandoned[:20] or r.in_flight for r in self.runners}

    # --- signals ---------------------------------------------------------------------------------
    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _remove_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second_signal_exiting_now", signal=sig.name)
            os._exit(128 + sig.value)
        log.info("signal_received", signal=sig.name)
        self.stop_requested.set()

    # --- background duties ----------------------------------------------------------------------
    async def _heartbeat(self, publisher: AmqpPublisher) -> None:
        """One heartbeat per service (every ``bus.heartbeat_interval``): who is alive, its counts."""
        for runner in self.runners:
            beat = DaemonHeartbeat(
                daemon=runner.service.name,
                instance=self.instance,
                host=socket.gethostname(),
                pid=os.getpid(),
                version=__version__,
                started=self.started,
                in_flight=runner.in_flight,
                processed=runner.stats.processed,
                failed=runner.stats.dead,
                details={
                    "retried": runner.stats.retried,
                    "queue": runner.queue_name,
                    "retried_by_reason": dict(runner.stats.retried_by_reason),
                    "dead_by_reason": dict(runner.stats.dead_by_reason),
                    "handling": runner.stats.handling.as_dict(),
                    **_oldest(runner),
                },
            )
            try:
                await publisher.publish(beat)
            except SpoolError as exc:
                log.warning("heartbeat_not_published", error=exc.message)

    async def _stop_when_idle(self) -> None:
        """``once`` mode: stop after the work queues stayed empty with nothing in flight."""
        quiet = 0
        while quiet < 3:
            await asyncio.sleep(0.2)
            busy = False
            for runner in self.runners:
                if runner.busy or await runner.queue_depth():
                    busy = True
            quiet = 0 if busy else quiet + 1
        self.stop_requested.set()


async def _watchdog_ping() -> None:
    systemd.watchdog_ping()


def arm_stop_watchdog(seconds: float, in_flight: Any = dict) -> threading.Thread:
    """End the process ``seconds`` from now, unless it ended before (see the module docstring).

    A daemon thread: it does not keep the process alive, it keeps running while the interpreter
    waits for the other threads at exit, and it needs neither the event loop nor a free worker.
    ``in_flight`` is called then, for the ``stop_overran`` line.
    """
    deadline = time.monotonic() + seconds

    def watch() -> None:
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(left)
        try:
            log.error(
                "stop_overran", seconds=seconds, exit_code=EXIT_STOP_OVERRAN,
                in_flight=_safely(in_flight), threads=_still_running(),
            )  # fmt: skip
        finally:
            _flush_logs()
            os._exit(EXIT_STOP_OVERRAN)

    thread = threading.Thread(target=watch, name="spool-stop-watchdog", daemon=True)
    thread.start()
    return thread


def _safely(call: Any) -> Any:
    try:
        return call()
    except Exception as exc:  # the loop's state may be torn down: the line matters more
        return repr(exc)


def _still_running() -> list[str]:
    """Every other thread alive, with the function (file:line) it is in: what blocked the stop."""
    frames = sys._current_frames()
    me = threading.get_ident()
    running = []
    for thread in threading.enumerate():
        if thread.ident == me:
            continue
        frame = frames.get(thread.ident or -1)
        where = f" in {frame.f_code.co_name} ({frame.f_code.co_filename}:{frame.f_lineno})" if frame else ""
        running.append(f"{thread.name}{where}")
    return running


def _flush_logs() -> None:
    for handler in logging.getLogger().handlers:
        with suppress(Exception):
            handler.flush()
    for stream in (sys.stderr, sys.stdout):
        with suppress(Exception):
            stream.flush()


def _broker_gone(exc: BaseException, connection: AbstractRobustConnection) -> bool:
    """Whether ``exc`` is the broker's doing: a connection-level error, or any error raised while
    the connection is closed or being replaced (aio-pika raises ``RuntimeError`` and others then).
    A task cancelled from outside is not: it is being stopped."""
    if isinstance(exc, asyncio.CancelledError):
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            return False
    if isinstance(exc, aiormq.exceptions.AMQPConnectionError):
        return True
    # Anything else (a ConnectionRefusedError may be the catalogue's) only with the connection gone.
    transport = connection.transport
    return connection.is_closed or transport is None or transport.connection.is_closed


async def _close_quietly(publisher: AmqpPublisher) -> None:
    """Close the publisher's channel; on a connection already gone there is nothing to close."""
    with suppress(aiormq.exceptions.AMQPError, ConnectionError, RuntimeError):
        await publisher.close()


# Allocations between two young-generation collections (CPython's default is 700).
GC_GEN0_THRESHOLD = 20_000


def tune_gc() -> None:
    """Collect garbage less often, and never walk what start-up built.

    A daemon allocates a few hundred short-lived objects per message (frames, futures, models, SQL
    rows); with the default thresholds the collector ran every few messages and, now and then,
    walked every long-lived object (SQLAlchemy metadata, pydantic schemas, caches): a third of the
    catalogue's CPU per record in one profile, and pauses that starve the worker threads of the
    GIL (figures: docs/decisions.md, "Garbage collector tuning"). ``gc.freeze`` moves everything
    alive once the services are open out of the collector's sight; reference counting still frees
    what becomes unreferenced.
    """
    gc.freeze()
    _gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, max(gen1, 20), max(gen2, 100))


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run a daemon's main coroutine on uvloop when it is installed (a dependency on Linux).

    The daemons are event-loop bound (AMQP frames, futures, callbacks): docs/decisions.md, "uvloop".
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


async def run_services(services: Sequence[Service], settings: Settings, *, once: bool = False) -> int:
    """Run ``services`` as this process's daemon (``spool run``), garbage collector tuned."""
    return await Process(services, settings, once=once, tune_gc=True).run()


def _oldest(runner: Runner) -> dict[str, Any]:
    """The delivery a handler has held longest: the monitor's ``stalled`` alert reads it."""
    oldest = runner.oldest_delivery()
    if oldest is None:
        return {}
    return {"oldest_delivery": {"seconds": round(oldest[0], 1), "what": oldest[1][:300]}}
