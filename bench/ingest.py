"""End-to-end ingest throughput: Spool's ingest daemon against a raw RabbitMQ round trip.

One run measures, on the same broker with the same client settings:

1. **raw round trip**: N CloudEvent-sized messages published exactly as ``spool ingest`` publishes
   (``common.bus.external.publish_cloudevents``: persistent, mandatory, confirms pipelined in
   a sliding window) to a durable quorum queue, consumed by a separate process with the daemon's prefetch,
   acking each message; timed from the first publish to the last ack;
2. **Spool ingest**: N small files written to a landing area (not timed), their ``file.ready``
   CloudEvents (size and adler32 included) published the same way, the ingest daemon running as a
   separate process (``python -m daemons --config CFG run ingest``); timed from the first
   publish until the catalogue counts N files. The daemon's RSS (children included) is sampled
   every 0.1 s from its start to its exit.

Everything is isolated like the integration tests: own exchange, own queue prefix, own state
directory (a temporary one unless ``--state-dir``); the queues and exchanges are deleted at the end.
A benchmark prints figures and does not judge them: the exit code is 0 unless something broke
(files lost or dead-lettered, daemon crashed or exiting non-zero).

    .venv/bin/python bench/ingest.py                        # 50,000 files of 1 KiB
    .venv/bin/python bench/ingest.py --files 200000 --json  # RSS must not grow with the backlog
"""

from __future__ import annotations

import sys

# Run as ``python bench/ingest.py``, the bench directory heads sys.path, where a script named like a
# standard-library module (``copy.py``) would shadow it for every import below. Drop that entry.
if sys.path and sys.path[0] and __file__.startswith(sys.path[0]) and __name__ == "__main__":
    sys.path.pop(0)

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sqlite3
import tempfile
import threading
import time
import tomllib
import uuid
import zlib
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import psutil
from aio_pika.abc import AbstractRobustConnection

from common.bus.connection import connect
from common.bus.dead import browse
from common.bus.external import publish_cloudevents
from common.bus.topology import declare_topology, delete_topology
from common.codec import to_cloudevent
from common.config import BusSettings, Settings, load_settings
from common.messages import FileReady, new_id

SELF = Path(__file__).resolve()
REPO = SELF.parent.parent
DEFAULT_AMQP_URL = os.environ.get("SPOOL_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
FILES_PER_RUN = 1000  # files per landing sub-directory, one dataset each
RAW_ROUTING_KEY = "bench.raw"
TARGET_RATE = 1000.0  # files/s
TARGET_RATIO = 0.3
TARGET_RSS_MB = 250.0
POLL = 0.2
STALL = 120.0  # seconds without a new file registered: the run is stuck


class BenchError(Exception):
    """Something broke (not merely slow): reported in one paragraph, exit code 1."""


# --- defaults from the documented configuration ------------------------------------------------
def documented_ingest_settings() -> tuple[int, int]:
    """(prefetch, concurrency) of ``[daemons.ingest]`` in config/spool.toml, else 256 / 64."""
    try:
        with (REPO / "config" / "spool.toml").open("rb") as f:
            ingest = tomllib.load(f).get("daemons", {}).get("ingest", {})
        return int(ingest.get("prefetch", 256)), int(ingest.get("concurrency", 64))
    except (OSError, tomllib.TOMLDecodeError, ValueError):
        return 256, 64


def write_config(path: Path, state_dir: Path, tag: str, url: str, prefetch: int, concurrency: int) -> Path:
    """An isolated configuration, as the tests' ``write_config`` builds one, with production timings."""
    lines = [
        f'state_dir = "{state_dir}"',
        "[bus]",
        f'url = "{url}"',
        f'exchange = "spool-bench-{tag}"',
        f'queue_prefix = "b{tag}"',
        "[storage.disk1]",
        'root = "storage/disk1"',
        "[landing_areas]",
        'lst1 = "landing"',
        "[daemons.ingest]",
        f"prefetch = {prefetch}",
        f"concurrency = {concurrency}",
        "[log]",
        'level = "warning"',
        'format = "json"',
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


# --- progress ------------------------------------------------------------------------------------
class Progress:
    """One self-overwriting line on a terminal, a line every few seconds otherwise."""

    def __init__(self, every: float = 5.0) -> None:
        self.tty = sys.stderr.isatty()
        self.every = every
        self._last = 0.0

    def show(self, text: str, *, force: bool = False) -> None:
        now = time.monotonic()
        if self.tty:
            if force or now - self._last >= 0.1:
                sys.stderr.write(f"\r\x1b[K{text}")
                sys.stderr.flush()
                self._last = now
        elif force or now - self._last >= self.every:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()
            self._last = now

    def done(self, text: str) -> None:
        if self.tty:
            sys.stderr.write(f"\r\x1b[K{text}\n")
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()


def say(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


# --- the sample files ----------------------------------------------------------------------------
def make_files(landing: Path, files: int, size: int) -> list[dict[str, Any]]:
    """Write ``files`` files of ``size`` random bytes; return their ``file.ready`` CloudEvents.

    The events carry size and adler32 computed from the bytes written (what ``spool ingest`` would
    read back) and, like a typical DL0 file, two metadata keys and one parent.
    """
    day = datetime.now(UTC).strftime("%Y%m%d")
    progress = Progress()
    events: list[dict[str, Any]] = []
    started = time.monotonic()
    for i in range(files):
        run, subrun = 1 + i // FILES_PER_RUN, i % FILES_PER_RUN
        directory = landing / "bench" / f"run{run:06d}"
        if subrun == 0:
            directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"subrun{subrun:04d}.fits.fz"
        data = os.urandom(size)
        path.write_bytes(data)
        msg = FileReady(
            id=new_id(),
            source="bench-daq",
            path=str(path),
            dataset=f"lst1.{day}.run{run:06d}.dl0",
            size=size,
            adler32=f"{zlib.adler32(data) & 0xFFFFFFFF:08x}",
            metadata={"run": run, "subrun": subrun},
            parents=[f"raw/run{run:06d}/subrun{subrun:04d}.bin"],
        )
        events.append(to_cloudevent(msg))
        if i % 500 == 0:
            progress.show(f"writing files: {i:,}/{files:,}")
    elapsed = time.monotonic() - started
    progress.done(f"wrote {files:,} files of {size:,} B in {elapsed:.1f} s under {landing}")
    return events


# --- process sampling ----------------------------------------------------------------------------
class ProcessSampler(threading.Thread):
    """Peak RSS of a process and its children, sampled every ``interval`` s until it exits/stop()."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        super().__init__(name=f"rss-{pid}", daemon=True)
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self.last = 0
        self.samples = 0
        self._halt = threading.Event()

    def rss(self) -> int:
        total = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                total += p.memory_info().rss
        return total

    def cpu_seconds(self) -> float:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            t = self.proc.cpu_times()
            return t.user + t.system + t.children_user + t.children_system
        return float("nan")

    def run(self) -> None:
        while True:
            try:
                rss = self.rss()
            except psutil.NoSuchProcess:
                return
            self.last = rss
            self.peak = max(self.peak, rss)
            self.samples += 1
            if self._halt.wait(self.interval):
                return

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


class CpuClock:
    """CPU seconds used by this process, the RabbitMQ node (if visible) and one other process."""

    def __init__(self) -> None:
        self.me = psutil.Process()
        self.broker = _find_broker()

    def read(self) -> dict[str, float]:
        out: dict[str, float] = {}
        t = self.me.cpu_times()
        out["bench"] = t.user + t.system
        if self.broker is not None:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                b = self.broker.cpu_times()
                out["broker"] = b.user + b.system
        return out


def _find_broker() -> psutil.Process | None:
    for p in psutil.process_iter(["name"]):
        if p.info.get("name") == "beam.smp":
            return p
    return None


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in after if k in before}


# --- broker helpers ------------------------------------------------------------------------------
async def queue_info(connection: AbstractRobustConnection, name: str) -> tuple[int, int] | None:
    """(messages, consumers) of a queue, or None when it does not exist (yet)."""
    channel = await connection.channel()
    try:
        underlay = await channel.get_underlay_channel()
        ok = await underlay.queue_declare(name, passive=True)
        return (ok.message_count or 0, ok.consumer_count or 0) if ok is not None else None
    except aio_pika.exceptions.ChannelClosed:
        return None
    finally:
        with contextlib.suppress(Exception):
            await channel.close()


# --- raw round trip ------------------------------------------------------------------------------
@dataclass
class RawResult:
    messages: int
    seconds: float
    publish_seconds: float
    consumer_peak_rss_mb: float
    cpu_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.messages / self.seconds


def raw_names(settings: Settings) -> tuple[str, str]:
    """(exchange, queue) of the raw round trip, derived from the run's isolated names."""
    return f"{settings.bus.exchange}.raw", f"{settings.bus.queue_prefix}.raw"


async def delete_raw_topology(connection: AbstractRobustConnection, settings: Settings) -> None:
    exchange_name, queue_name = raw_names(settings)
    channel = await connection.channel()
    try:
        await channel.queue_delete(queue_name)
        await channel.exchange_delete(exchange_name)
    finally:
        with contextlib.suppress(Exception):
            await channel.close()


async def raw_consumer(url: str, queue_name: str, prefetch: int, count: int) -> None:
    """Child process of the raw round trip: consume and ack ``count`` messages, report timings."""
    connection = await connect(BusSettings(url=url), name="spool-bench-raw-consumer")
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=prefetch)
    queue = await channel.get_queue(queue_name, ensure=False)
    done = asyncio.Event()
    seen = 0
    first = last = 0.0

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        nonlocal seen, first, last
        if not seen:
            first = time.monotonic()
        await message.ack()
        seen += 1
        if seen >= count:
            last = time.monotonic()
            done.set()

    await queue.consume(on_message)
    print("ready", flush=True)
    await done.wait()
    print(json.dumps({"first_delivery": first, "last_ack": last, "count": seen}), flush=True)
    await connection.close()


async def raw_round_trip(
    connection: AbstractRobustConnection,
    settings: Settings,
    events: list[dict[str, Any]],
    prefetch: int,
    give_up_after: float,
) -> RawResult:
    """Publish the events (as ``bench.raw``) to one quorum queue, consumed by a child process."""
    exchange_name, queue_name = raw_names(settings)
    setup = await connection.channel()
    exchange = await setup.declare_exchange(exchange_name, aio_pika.ExchangeType.TOPIC, durable=True)
    queue = await setup.declare_queue(queue_name, durable=True, arguments={"x-queue-type": "quorum"})
    await queue.bind(exchange, routing_key=RAW_ROUTING_KEY)
    child = await asyncio.create_subprocess_exec(
        sys.executable, str(SELF), "--raw-consumer", queue_name,
        "--amqp-url", settings.bus.url, "--prefetch", str(prefetch), "--files", str(len(events)),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert child.stdout is not None
    sampler = ProcessSampler(child.pid)
    sampler.start()
    clock = CpuClock()
    try:
        line = await asyncio.wait_for(child.stdout.readline(), timeout=60)
        if line.strip() != b"ready":
            raise BenchError(f"raw consumer did not start (said {line!r}, exit code {child.returncode})")
        progress = Progress()
        total = len(events)
        cpu0 = clock.read() | {"consumer": sampler.cpu_seconds()}
        t0 = time.monotonic()
        await publish_cloudevents(
            connection, exchange_name, ({**e, "type": RAW_ROUTING_KEY} for e in events),
            on_sent=lambda n: progress.show(f"raw round trip: published {n:,}/{total:,}"),
        )  # fmt: skip
        published = time.monotonic() - t0
        progress.done(f"raw round trip: published {total:,} in {published:.1f} s, waiting for the consumer")
        line = await asyncio.wait_for(child.stdout.readline(), timeout=give_up_after)
        cpu1 = clock.read() | {"consumer": sampler.cpu_seconds()}
        if not line:
            raise BenchError(f"raw consumer exited early (exit code {await child.wait()})")
        report = json.loads(line)
        await asyncio.wait_for(child.wait(), timeout=30)
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
        sampler.stop()
        with contextlib.suppress(Exception):
            await setup.close()
        await delete_raw_topology(connection, settings)
    return RawResult(
        messages=report["count"],
        seconds=report["last_ack"] - t0,
        publish_seconds=published,
        consumer_peak_rss_mb=sampler.peak / 2**20,
        cpu_seconds=_delta(cpu1, cpu0),
    )


# --- Spool ingest --------------------------------------------------------------------------------
@dataclass
class SpoolResult:
    files: int
    seconds: float
    publish_seconds: float
    peak_rss_mb: float
    ready_rss_mb: float
    final_rss_mb: float
    rss_samples: int
    exit_code: int | None
    cpu_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.files / self.seconds


def count_files(db: sqlite3.Connection) -> int:
    row = db.execute("SELECT count(*) FROM files").fetchone()
    return int(row[0])


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:]) or "(empty log)"


async def wait_consuming(
    connection: AbstractRobustConnection, queue: str, daemon: asyncio.subprocess.Process, log: Path
) -> None:
    deadline = time.monotonic() + 60
    while True:
        info = await queue_info(connection, queue)
        if info is not None and info[1] > 0:
            return
        if daemon.returncode is not None:
            raise BenchError(
                f"the ingest daemon exited with {daemon.returncode} at start-up:\n{log_tail(log)}"
            )
        if time.monotonic() > deadline:
            raise BenchError(f"the ingest daemon did not consume {queue} within 60 s:\n{log_tail(log)}")
        await asyncio.sleep(0.1)


async def first_dead_letter(connection: AbstractRobustConnection, queue: str) -> str:
    letters = await browse(connection, [queue], limit=1)
    if not letters:
        return "(could not read it)"
    d = letters[0]
    return f"reason {d.reason}: {d.error}"


async def spool_ingest(
    connection: AbstractRobustConnection,
    settings: Settings,
    config: Path,
    events: list[dict[str, Any]],
    give_up_after: float,
    backlog: bool = False,
) -> SpoolResult:
    log = settings.state_dir / "ingest-daemon.log"
    total = len(events)
    if backlog:
        # A night queued while ingest was down: every event waits in the queue before it starts,
        # and the clock runs from the daemon's start to the last file registered.
        channel = await connection.channel()
        await declare_topology(channel, settings)
        await channel.close()
        await publish_cloudevents(connection, settings.bus.exchange, events)
        say(f"backlog: {total:,} file.ready events queued before the daemon starts")
    spawned = time.monotonic()
    with log.open("ab") as log_file:
        daemon = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "daemons", "--config", str(config), "run", "ingest",
            stdout=log_file, stderr=log_file, cwd=REPO,
        )  # fmt: skip
    sampler = ProcessSampler(daemon.pid)
    sampler.start()
    clock = CpuClock()
    db: sqlite3.Connection | None = None
    publishing: asyncio.Task[int] | None = None
    try:
        say(f"ingest daemon started (pid {daemon.pid}, log {log})")
        await wait_consuming(connection, settings.queue("ingest"), daemon, log)
        ready_rss = sampler.rss()
        db_path = settings.catalogue.url.split("///", 1)[1]
        db = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
        # (With a backlog the daemon may have registered files already: the state dir was empty.)
        if not backlog and (await asyncio.to_thread(count_files, db)) > 0:
            raise BenchError(f"the catalogue {db_path} is not empty")

        progress = Progress()
        sent = 0

        def on_sent(n: int) -> None:
            nonlocal sent
            sent = n

        dead_queue = settings.dead_queue("ingest")
        cpu0 = clock.read() | {"daemon": sampler.cpu_seconds()}
        t0 = spawned if backlog else time.monotonic()
        publishing = asyncio.create_task(
            _already_published(total)
            if backlog
            else publish_cloudevents(connection, settings.bus.exchange, events, on_sent=on_sent)
        )
        published_at = 0.0

        def on_published(_: asyncio.Task[int]) -> None:
            nonlocal published_at
            published_at = time.monotonic()

        publishing.add_done_callback(on_published)
        last_n, last_change = 0, t0
        while True:
            n = await asyncio.to_thread(count_files, db)
            now = time.monotonic()
            if publishing.done():
                publishing.result()  # surfaces a publish failure
            if n != last_n:
                last_n, last_change = n, now
            if n >= total:
                end = now
                break
            dead = await queue_info(connection, dead_queue)
            if dead is not None and dead[0]:
                why = await first_dead_letter(connection, dead_queue)
                raise BenchError(f"{dead[0]} event(s) dead-lettered in {dead_queue}; first: {why}")
            if daemon.returncode is not None:
                raise BenchError(f"the ingest daemon exited with {daemon.returncode}:\n{log_tail(log)}")
            if now - t0 > give_up_after or now - last_change > STALL:
                depth = await queue_info(connection, settings.queue("ingest"))
                why = "no progress" if now - last_change > STALL else "time limit"
                raise BenchError(
                    f"gave up after {now - t0:.0f} s ({why}): {n:,}/{total:,} files registered, "
                    f"{sent:,} published, {depth[0] if depth else '?'} in {settings.queue('ingest')}"
                )
            rate = n / (now - t0) if now > t0 else 0.0
            progress.show(
                f"spool ingest: {n:,}/{total:,} registered, {sent:,} published, {rate:,.0f} files/s, "
                f"RSS {sampler.last / 2**20:.0f} MB (peak {sampler.peak / 2**20:.0f})"
            )
            await asyncio.sleep(POLL)
        cpu1 = clock.read() | {"daemon": sampler.cpu_seconds()}
        await publishing
        publish_seconds = published_at - t0
        progress.done(f"spool ingest: {total:,} files registered in {end - t0:.1f} s")
        final_rss = sampler.rss()
    finally:
        if publishing is not None and not publishing.done():
            publishing.cancel()
            with contextlib.suppress(BaseException):
                await publishing
        if db is not None:
            db.close()
        exit_code = await stop_daemon(daemon, settings.bus.stop_grace + 30)
        sampler.stop()
    if exit_code != 0:
        raise BenchError(f"the ingest daemon exited with {exit_code} after SIGTERM:\n{log_tail(log)}")
    return SpoolResult(
        files=total,
        seconds=end - t0,
        publish_seconds=publish_seconds,
        peak_rss_mb=sampler.peak / 2**20,
        ready_rss_mb=ready_rss / 2**20,
        final_rss_mb=final_rss / 2**20,
        rss_samples=sampler.samples,
        exit_code=exit_code,
        cpu_seconds=_delta(cpu1, cpu0),
    )


async def _already_published(n: int) -> int:
    return n


async def stop_daemon(daemon: asyncio.subprocess.Process, grace: float) -> int | None:
    """SIGTERM, then its exit code; killed (and None returned) if it outlives ``grace``."""
    if daemon.returncode is not None:
        return daemon.returncode
    daemon.send_signal(signal.SIGTERM)
    try:
        return await asyncio.wait_for(daemon.wait(), timeout=grace)
    except TimeoutError:
        daemon.kill()
        await daemon.wait()
        return None


async def verify(settings: Settings, events: list[dict[str, Any]]) -> None:
    """After the daemon stopped: every event registered exactly once, nothing parked anywhere."""
    db = sqlite3.connect(settings.catalogue.url.split("///", 1)[1])
    try:
        files = count_files(db)
        done = db.execute("SELECT count(*) FROM requests WHERE state = 'done'").fetchone()[0]
    finally:
        db.close()
    if files != len(events) or done != len(events):
        raise BenchError(f"{len(events):,} events published, {files:,} files and {done:,} requests done")
    copies = settings.first_disk()[1].root
    on_disk = sum(len(names) for _, _, names in os.walk(copies))
    if on_disk != len(events):
        raise BenchError(f"{len(events):,} files ingested but {on_disk:,} files under {copies}")


# --- report --------------------------------------------------------------------------------------
def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def report(args: argparse.Namespace, raw: RawResult, spool: SpoolResult) -> dict[str, Any]:
    ratio = spool.rate / raw.rate
    rows = [
        ("raw RabbitMQ round trip", f"{raw.rate:,.0f} msg/s", f"{raw.seconds:.1f}", "", ""),
        ("Spool ingest", f"{spool.rate:,.0f} files/s", f"{spool.seconds:.1f}",
         f">= {TARGET_RATE:,.0f} files/s", verdict(spool.rate >= TARGET_RATE)),
        ("ratio Spool / raw", f"{ratio:.2f}", "", f">= {TARGET_RATIO}", verdict(ratio >= TARGET_RATIO)),
        ("ingest daemon peak RSS", f"{spool.peak_rss_mb:,.0f} MB", "", f"< {TARGET_RSS_MB:.0f} MB",
         verdict(spool.peak_rss_mb < TARGET_RSS_MB)),
    ]  # fmt: skip
    print(
        f"\nSpool ingest benchmark: {args.files:,} files of {args.size:,} B, prefetch {args.prefetch}, "
        f"concurrency {args.concurrency}, SQLite catalogue, {psutil.cpu_count()} CPUs"
        + (", backlog queued before the daemon starts" if args.backlog else "")
    )
    head = ("", "figure", "seconds", "target", "")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(5)]
    for row in [head, *rows]:
        print(
            "  ".join(
                str(c).ljust(w) if i in (0, 3) else str(c).rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
        )
    cpu_raw = ", ".join(f"{k} {v:.1f}" for k, v in raw.cpu_seconds.items())
    cpu_spool = ", ".join(f"{k} {v:.1f}" for k, v in spool.cpu_seconds.items())
    print(
        f"  publishing alone: raw {raw.messages / raw.publish_seconds:,.0f} msg/s, "
        f"spool {spool.files / spool.publish_seconds:,.0f} msg/s (the daemon consumes meanwhile)"
    )
    print(f"  CPU seconds, raw round trip: {cpu_raw}")
    print(f"  CPU seconds, Spool ingest:   {cpu_spool}")
    print(f"  daemon RSS: {spool.ready_rss_mb:.0f} MB when consuming started, "
          f"{spool.final_rss_mb:.0f} MB at the end, peak {spool.peak_rss_mb:.0f} MB "
          f"({spool.rss_samples} samples); raw consumer peak "
          f"{raw.consumer_peak_rss_mb:.0f} MB")  # fmt: skip
    return {
        "files": args.files, "size": args.size, "prefetch": args.prefetch, "concurrency": args.concurrency,
        "cpus": psutil.cpu_count(),
        "raw": asdict(raw) | {"rate": raw.rate},
        "spool": asdict(spool) | {"rate": spool.rate},
        "ratio": ratio,
        "targets": {
            "rate": spool.rate >= TARGET_RATE, "ratio": ratio >= TARGET_RATIO,
            "rss": spool.peak_rss_mb < TARGET_RSS_MB,
        },
    }  # fmt: skip


# --- main ----------------------------------------------------------------------------------------
async def bench(args: argparse.Namespace, state: Path) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:10]
    (state / "landing").mkdir(parents=True, exist_ok=True)
    config = write_config(state / "spool.toml", state, tag, args.amqp_url, args.prefetch, args.concurrency)
    settings = load_settings(config)
    say(f"state under {state}; exchange {settings.bus.exchange}, queues {settings.bus.queue_prefix}.*")
    events = make_files(next(iter(settings.landing_areas.values())), args.files, args.size)
    os.sync()  # or the first fsync of the daemon pays for flushing the landing files
    # From here SIGTERM cancels this task as a first Ctrl-C does: the finally blocks below still run
    # with the loop and the connection alive, so the daemon is stopped and the queues are deleted.
    # (Before, while files are written, main's handler turns it into KeyboardInterrupt.)
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    timeout = 300 + args.files / 20  # gives up below 20 files/s (and after STALL s without progress)
    connection = await connect(settings.bus, name="spool-bench")
    try:
        raw = await raw_round_trip(connection, settings, events, args.prefetch, timeout)
        say(f"raw round trip: {raw.rate:,.0f} msg/s ({raw.seconds:.1f} s)")
        spool = await spool_ingest(connection, settings, config, events, timeout, backlog=args.backlog)
        await verify(settings, events)
    except (aio_pika.exceptions.AMQPError, RuntimeError, ConnectionError) as exc:
        if connection.is_closed or not connection.connected.is_set():
            raise BenchError(f"lost the broker connection, figures void: {exc!r}") from exc
        raise
    finally:
        await connection.close()
        await cleanup_broker(settings)
    return report(args, raw, spool)


async def cleanup_broker(settings: Settings) -> None:
    """Delete the run's queues and exchanges on a fresh connection (the run's may be broken)."""
    try:
        connection = await connect(settings.bus, name="spool-bench-cleanup")
    except Exception as exc:
        names = f"queues {settings.bus.queue_prefix}.* and exchange {settings.bus.exchange}"
        say(f"could not delete {names}: {exc}")
        return
    try:
        await delete_raw_topology(connection, settings)
        channel = await connection.channel()
        await delete_topology(channel, settings)
        await channel.close()
    finally:
        await connection.close()


def main() -> None:
    prefetch, concurrency = documented_ingest_settings()
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--files", type=int, default=50_000, help="files (and messages) (default: 50000)")
    p.add_argument("--size", type=int, default=1024, help="bytes per file (default: 1024)")
    p.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="where files, catalogue and log go (default: a temporary directory, removed)",
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary state directory")
    p.add_argument("--amqp-url", default=DEFAULT_AMQP_URL, help="RabbitMQ (default: $SPOOL_TEST_AMQP_URL)")
    p.add_argument("--prefetch", type=int, default=prefetch, help=f"ingest prefetch (default: {prefetch})")
    p.add_argument(
        "--concurrency", type=int, default=concurrency, help=f"ingest concurrency (default: {concurrency})"
    )
    p.add_argument("--json", action="store_true", help="also print the figures as one JSON object")
    p.add_argument(
        "--backlog", action="store_true",
        help="queue every event before the daemon starts (time from its start to the last file)",
    )  # fmt: skip
    p.add_argument("--raw-consumer", metavar="QUEUE", help=argparse.SUPPRESS)
    args = p.parse_args()  # fmt: skip

    if args.raw_consumer:
        asyncio.run(raw_consumer(args.amqp_url, args.raw_consumer, args.prefetch, args.files))
        return
    if args.files < 1 or args.size < 0:
        p.error("--files must be positive and --size not negative")

    run_in_state_dir(p, args, "spool-bench-", bench)


def run_in_state_dir(
    p: argparse.ArgumentParser,
    args: argparse.Namespace,
    prefix: str,
    bench: Callable[[argparse.Namespace, Path], Coroutine[Any, Any, dict[str, Any]]],
    show: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """A benchmark's run: ``bench(args, state)`` in ``--state-dir`` (which must be empty) or a
    temporary directory removed afterwards (unless ``--keep``, a failure or an interrupt); then
    ``show(figures)`` and, with ``--json``, the figures as one JSON line. Shared by the benches
    that start daemons (ingest, the night)."""
    if args.state_dir is not None:
        state = args.state_dir.absolute()
        if state.exists() and any(state.iterdir()):
            p.error(f"--state-dir {state} is not empty")
        state.mkdir(parents=True, exist_ok=True)
        remove = False
    else:
        state = Path(tempfile.mkdtemp(prefix=prefix))
        remove = not args.keep
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        figures = asyncio.run(bench(args, state))
    except BenchError as exc:
        say(f"\nBENCHMARK BROKE: {exc}")
        remove = False
        say(f"state kept under {state}")
        sys.exit(1)
    except (KeyboardInterrupt, asyncio.CancelledError):
        say("\ninterrupted")
        sys.exit(130)
    except Exception:
        remove = False
        say(f"state kept under {state}")
        raise
    finally:
        if remove:
            shutil.rmtree(state, ignore_errors=True)
    if show is not None:
        show(figures)
    if args.json:
        print(json.dumps(figures))
    if not remove:
        print(f"state kept under {state}")


if __name__ == "__main__":
    main()
