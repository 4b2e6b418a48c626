"""Several instances of one daemon: one against two on the same work, and how they share it.

One run, the same N small files in every phase, each phase on a fresh catalogue (a new PostgreSQL
database, or SQLite for the comparison), its own exchange and queue prefix, its daemons as
processes (``python -m daemons --config CFG run <daemon>``, as ``bench/night.py`` starts them):

- ``ingest x1``, ``ingest x2``: ingest process(es) consuming, then the N ``file.ready`` events
  published (as ``bench/ingest.py`` publishes them); timed from the first publish until the
  catalogue counts N files;
- ``ingest x1 sqlite``: the same with SQLite, for the PostgreSQL / SQLite ratio;
- ``replicator x1``, ``replicator x2``: the N files registered on ``disk1`` (the sample files'
  own directory), a rule asking for a copy of each on ``offsite``, replicator process(es)
  consuming, then the rule evaluated by the bench with the replicator's own
  ``evaluate_new_rules`` (so the work, bulk ``replica.request`` s of ``BULK`` files, is the same
  whatever the number of instances: which instance evaluates a rule is not measured here);
  timed from the evaluation's start until N copies are available on ``offsite``;
- ``... x2 backlog``: the fair-sharing case the issue names. The whole backlog is queued first,
  one instance is started and, once it consumes, the second one: the first takes its prefetch at
  once and one more for each message it finishes while the second starts up. Printed: the
  messages queued, and how many were still in the queue when the second began consuming (what the
  first holds is what the second can never have). Timed from the first start (the rate is for
  information: it includes a start-up).

- ``... x1 queued``, ``... x2 queued``: the same work queued first, every instance started at
  once, the clock started when the last one consumes (the files done before it are not counted):
  two against one without the bench's own publishing sharing the cores and setting the pace, so
  what is left between the two rates is what a second instance costs (``..._two_of_one_queued``).

For each phase: files/s, each instance's share of the work (the messages it handled, from its
last ``daemon.heartbeat``: ``processed``; an ingest message is a file, a replicator message is a
bulk request of up to ``BULK`` files), CPU seconds per daemon process (its children included;
in a backlog phase from its start),
of the broker and PostgreSQL (if visible), and the ratios issue 19 asks for: two instances against
one (>= 0.9: coordinating costs little) for ingest and the replicator, PostgreSQL against SQLite
ingest (>= 0.7). ``--rounds`` repeats the phases in turn (A B A B: a shared machine's speed
swings) and the best rate of each phase counts. On a two-core machine two processes share the
same two cores, so two instances can at best match one; the figures for larger machines come from
running this there (the machine's cores are printed). Like every bench it prints figures and does
not judge them: exit 1 only when something broke.

    .venv/bin/python bench/scale.py                         # 20,000 files, 2 rounds
    .venv/bin/python bench/scale.py --files 5000 --rounds 1 --json
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as ``python bench/scale.py``: the bench directory heads sys.path and the repository is not on
# it. Swap the two (as bench/night.py does).
if sys.path and sys.path[0] and __file__.startswith(sys.path[0]) and __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import asyncio
import contextlib
import math
import os
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import psutil
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from bench.chaos.fleet import REPO, daemon_env
from bench.ingest import (
    DEFAULT_AMQP_URL,
    BenchError,
    CpuClock,
    Progress,
    cleanup_broker,
    make_files,
    queue_info,
    run_in_state_dir,
    verdict,
)
from bench.night import DaemonSampler, catalogue_url, others_cpu, postgres_server, stage_counts
from common import codec
from common.bus.connection import connect
from common.bus.external import publish_cloudevents
from common.bus.publisher import AmqpPublisher
from common.bus.topology import declare_topology
from common.catalogue import Catalogue, IngestRecord
from common.catalogue.policy import Rule
from common.config import Settings, load_settings
from common.logging import LogChoice, configure_logging
from common.messages import DaemonHeartbeat
from common.placement import BULK
from daemons.replicator.rules import evaluate_new_rules

TARGET_TWO_OF_ONE = 0.9  # two instances' rate / one instance's, ingest and replicator
TARGET_PG_OF_SQLITE = 0.7  # PostgreSQL ingest / SQLite ingest
HEARTBEAT = 1.0  # [bus] heartbeat_interval of the daemons: their shares are read from heartbeats
POLL = 0.2


@dataclass(frozen=True)
class Phase:
    name: str
    daemon: str  # "ingest" or "replicator"
    instances: int
    catalogue: str  # "postgresql" or "sqlite"
    backlog: bool = False  # queued first, instances started one after the other
    queued: bool = False  # queued first, every instance started at once, timed once all consume


PHASES = (
    Phase("ingest x1", "ingest", 1, "postgresql"),
    Phase("ingest x2", "ingest", 2, "postgresql"),
    Phase("ingest x1 sqlite", "ingest", 1, "sqlite"),
    Phase("ingest x2 backlog", "ingest", 2, "postgresql", backlog=True),
    Phase("ingest x1 queued", "ingest", 1, "postgresql", queued=True),
    Phase("ingest x2 queued", "ingest", 2, "postgresql", queued=True),
    Phase("replicator x1", "replicator", 1, "postgresql"),
    Phase("replicator x2", "replicator", 2, "postgresql"),
    Phase("replicator x2 backlog", "replicator", 2, "postgresql", backlog=True),
    Phase("replicator x1 queued", "replicator", 1, "postgresql", queued=True),
    Phase("replicator x2 queued", "replicator", 2, "postgresql", queued=True),
)
STAGE = {"ingest": "registered", "replicator": "offsite"}  # bench.night.stage_counts' key


# --- configuration ---------------------------------------------------------------------------------
def write_config(
    path: Path, state: Path, files: Path, phase: Phase, url: str, args: argparse.Namespace
) -> Path:
    """A phase's settings: production defaults except the isolated names, heartbeats every second
    (the shares are read from them) and, for the replicator, rules never evaluated by the daemons
    (the bench evaluates the rule: see the module docstring). ``[daemons.*]`` only when
    ``--prefetch`` / ``--concurrency`` are given: the defaults are what is measured."""
    tag = uuid.uuid4().hex[:10]
    if phase.daemon == "ingest":  # the sample files are the landing area, copies go to disk1
        places = f'[storage.disk1]\nroot = "storage/disk1"\n[landing_areas]\nlst1 = "{files}"\n'
    else:  # the sample files are disk1's copies, the rule asks for one on offsite
        places = f'[storage.disk1]\nroot = "{files}"\n'
    tuning = "".join(
        f"{key} = {value}\n"
        for key, value in (("prefetch", args.prefetch), ("concurrency", args.concurrency))
        if value is not None
    )
    text = f"""
state_dir = "{state}"
[bus]
url = "{args.amqp_url}"
exchange = "spool-scale-{tag}"
queue_prefix = "s{tag}"
heartbeat_interval = {HEARTBEAT}
stop_grace = 10
[catalogue]
url = "{url}"
{places}[storage.offsite]
root = "storage/offsite"
[replication]
poll_interval = 3600
{f"[daemons.{phase.daemon}]" + chr(10) + tuning if tuning else ""}[log]
level = "warning"
format = "json"
"""
    path.write_text(text.lstrip())
    return path


# --- the instances -------------------------------------------------------------------------------
@dataclass
class Instance:
    index: int
    process: subprocess.Popen[bytes]
    sampler: DaemonSampler
    log: Path


def start_instance(config: Path, daemon: str, index: int, logs: Path) -> Instance:
    """One daemon process, as ``bench.chaos.fleet.Fleet.start`` starts one (several per daemon here)."""
    log = logs / f"{daemon}-{index}.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "daemons", "--config", str(config), "run", daemon],
            stdout=out, stderr=out, stdin=subprocess.DEVNULL, cwd=REPO, env=daemon_env(),
        )  # fmt: skip
    sampler = DaemonSampler(process.pid, interval=0.5)
    sampler.start()
    return Instance(index, process, sampler, log)


def check_alive(instances: list[Instance]) -> None:
    for i in instances:
        if i.process.poll() is not None:
            tail = i.log.read_text(errors="replace")[-1500:]
            raise BenchError(f"instance {i.index} exited with {i.process.returncode}:\n{tail}")


async def wait_consumers(connection: Any, queue: str, n: int, instances: list[Instance]) -> None:
    deadline = time.monotonic() + 120
    while True:
        info = await queue_info(connection, queue)
        if info is not None and info[1] >= n:
            return
        check_alive(instances)
        if time.monotonic() > deadline:
            raise BenchError(f"{queue}: {info[1] if info else 0} consumer(s) after 120 s, {n} expected")
        await asyncio.sleep(0.1)


async def stop_instances(instances: list[Instance], grace: float) -> list[int | None]:
    """SIGTERM all, then each one's exit code (None: killed after ``grace``)."""
    for i in instances:
        if i.process.poll() is None:
            i.process.send_signal(signal.SIGTERM)
    codes: list[int | None] = []
    for i in instances:
        deadline = time.monotonic() + grace
        while i.process.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if i.process.poll() is None:
            i.process.kill()
            i.process.wait()
            codes.append(None)
        else:
            codes.append(i.process.returncode)
        i.sampler.stop()
    return codes


class Heartbeats:
    """The last ``daemon.heartbeat`` of each process (by pid), heard on a queue of the bench's own."""

    def __init__(self) -> None:
        self.last: dict[int, tuple[float, DaemonHeartbeat]] = {}

    async def listen(self, connection: Any, settings: Settings) -> None:
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(settings.bus.exchange, DaemonHeartbeat.ROUTING_KEY)
        await queue.consume(self._on_message, no_ack=True)

    async def _on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        beat = codec.decode(
            message.body, message.content_type, DaemonHeartbeat.ROUTING_KEY, message.message_id
        )
        assert isinstance(beat, DaemonHeartbeat)
        self.last[beat.pid] = (time.monotonic(), beat)

    async def settled(self, instances: list[Instance], since: float) -> dict[int, int]:
        """Messages each instance handled: from a heartbeat sent after ``since`` with nothing in
        flight (every handler has returned). Waits a few heartbeat intervals at most."""
        deadline = time.monotonic() + 10 * HEARTBEAT + 10
        while True:
            beats = {i.index: self.last.get(i.process.pid) for i in instances}
            if all(b is not None and b[0] > since and b[1].in_flight == 0 for b in beats.values()):
                return {k: b[1].processed for k, b in beats.items() if b is not None}
            if time.monotonic() > deadline:
                late = [k for k, b in beats.items() if b is None or b[0] <= since or b[1].in_flight]
                raise BenchError(f"no settled heartbeat from instance(s) {late} after the work was done")
            await asyncio.sleep(0.1)


# --- the work ------------------------------------------------------------------------------------
@dataclass
class Work:
    files: Path  # the sample files' directory (ingest's landing area, the replicator's disk1)
    events: list[dict[str, Any]]  # their file.ready CloudEvents

    def records(self) -> list[IngestRecord]:
        """The files as registered on disk1 (name and pfn: the path under ``files``)."""
        out = []
        for e in self.events:
            d = e["data"]
            relpath = str(Path(d["path"]).relative_to(self.files))
            out.append(IngestRecord(event_id=e["id"], name=relpath, dataset=d["dataset"], size=d["size"],
                                    adler32=d["adler32"], storage="disk1", pfn=relpath))  # fmt: skip
        return out


async def prepare_catalogue(url: str, settings: Settings, phase: Phase, work: Work) -> None:
    """Migrated (while the daemons start, which is safe, or before a backlog is queued: not
    timed); for the replicator, the files registered on disk1 and the rule stored (``new``:
    evaluated when the phase's clock starts)."""
    catalogue = await Catalogue.open(url)
    try:
        await catalogue.endpoints.sync(settings.storage)
        if phase.daemon == "replicator":
            records = work.records()
            for i in range(0, len(records), 1000):
                await catalogue.ingest.register(records[i : i + 1000])
            await catalogue.replication.add_rule(Rule("scale", endpoints="offsite", datasets=r"lst1\..*"))
    finally:
        await catalogue.close()


async def publish_work(connection: Any, url: str, settings: Settings, phase: Phase, work: Work) -> int:
    """The phase's work onto the bus; returns the messages published."""
    if phase.daemon == "ingest":
        return await publish_cloudevents(connection, settings.bus.exchange, work.events)
    # The replicator's own evaluation of the rule, from here: a settle time of ~0 (the rule is not
    # waiting for any ingest), the requests published with the bench's connection.
    quick = settings.model_copy(
        update={"replication": settings.replication.model_copy(update={"poll_interval": 1e-3})}
    )
    await asyncio.sleep(0.01)
    catalogue = await Catalogue.open(url)
    try:
        publisher = await AmqpPublisher.create(connection, settings.bus.exchange, "spool-scale")
        await evaluate_new_rules(catalogue, publisher, quick)
    finally:
        await catalogue.close()
    return math.ceil(len(work.events) / BULK)  # at least; a dataset's tail is a bulk of its own


# --- one phase -----------------------------------------------------------------------------------
@dataclass
class Result:
    phase: str
    round: int
    files: int
    done: int  # files the catalogue counted at the end (registered, or copied to offsite)
    seconds: float
    publish_seconds: float
    shares: dict[int, int]  # instance -> messages handled
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    left_for_second: int | None = None  # backlog: messages still queued when the second joined
    queued: int | None = None  # backlog: messages queued before the first started

    @property
    def rate(self) -> float:
        # A queued phase whose first instance did everything before the last one consumed has
        # no files left to time (a tiny run only).
        return self.files / self.seconds if self.files else 0.0


async def run_phase(args: argparse.Namespace, state: Path, work: Work, phase: Phase, round_: int) -> Result:
    here = state / "phases" / f"{phase.name.replace(' ', '-')}-{round_}"
    (here / "logs").mkdir(parents=True)
    total = len(work.events)
    async with catalogue_url(phase.catalogue, here) as url:
        config = write_config(here / "spool.toml", here, work.files, phase, url, args)
        settings = load_settings(config)
        connection = await connect(settings.bus, name="spool-scale")
        engine = create_async_engine(url)
        instances: list[Instance] = []
        try:
            await declare_topology(await connection.channel(), settings)
            beats = Heartbeats()
            await beats.listen(connection, settings)
            return await _measure(args, settings, connection, engine, url, work, phase, round_, beats,
                                  instances, here / "logs", total)  # fmt: skip
        finally:
            codes = await stop_instances(instances, settings.bus.stop_grace + 20)
            await engine.dispose()
            await connection.close()
            await cleanup_broker(settings)
            bad = [f"instance {k} {c}" for k, c in enumerate(codes) if c != 0]
            if bad and sys.exc_info()[0] is None:
                raise BenchError(f"{phase.name}: exiting non-zero after SIGTERM: {', '.join(bad)}")


async def _measure(
    args: argparse.Namespace, settings: Settings, connection: Any, engine: AsyncEngine, url: str, work: Work,
    phase: Phase, round_: int, beats: Heartbeats, instances: list[Instance], logs: Path, total: int,
) -> Result:  # fmt: skip
    queue = settings.queue(phase.daemon)
    config = settings.state_dir / "spool.toml"
    clock, postgres = CpuClock(), postgres_server() if phase.catalogue == "postgresql" else None
    publishing: asyncio.Task[int] | None = None
    joining: asyncio.Task[int] | None = None
    published = 0.0
    queued: int | None = None  # backlog: messages in the queue before the first instance started
    counted = 0  # queued: files done before the clock started (while the instances came up)
    daemon_cpu0: dict[int, float] = {}  # from 0 but in a queued phase (an instance joining later too)
    if phase.queued:
        await prepare_catalogue(url, settings, phase, work)
        await publish_work(connection, url, settings, phase, work)
        info = await queue_info(connection, queue)
        queued = info[0] if info else None
        instances.extend(start_instance(config, phase.daemon, k, logs) for k in range(phase.instances))
        await wait_consumers(connection, queue, phase.instances, instances)
        cpu0 = others_cpu(clock, postgres)
        daemon_cpu0 = {i.index: i.sampler.cpu for i in instances}
        t0 = time.monotonic()
        counted = (await stage_counts(engine))[STAGE[phase.daemon]]
    elif phase.backlog:
        await prepare_catalogue(url, settings, phase, work)
        t0 = time.monotonic()
        await publish_work(connection, url, settings, phase, work)
        published = time.monotonic() - t0
        info = await queue_info(connection, queue)
        queued = info[0] if info else None
        cpu0 = others_cpu(clock, postgres)
        t0 = time.monotonic()
        instances.append(start_instance(config, phase.daemon, 0, logs))
        await wait_consumers(connection, queue, 1, instances)
        joining = asyncio.create_task(_second_joins(connection, queue, config, phase, instances, logs))
    else:
        # The daemons start (and migrate, which is safe at once) while the bench prepares.
        instances.extend(start_instance(config, phase.daemon, k, logs) for k in range(phase.instances))
        await prepare_catalogue(url, settings, phase, work)
        await wait_consumers(connection, queue, phase.instances, instances)
        cpu0 = others_cpu(clock, postgres)
        t0 = time.monotonic()
        publishing = asyncio.create_task(publish_work(connection, url, settings, phase, work))
    progress, stage = Progress(), STAGE[phase.daemon]
    last_n, last_change = 0, t0
    left: int | None = None
    try:
        while True:
            n = (await stage_counts(engine))[stage]
            now = time.monotonic()
            if publishing is not None and publishing.done() and not published:
                publishing.result()  # surfaces a publish failure
                published = now - t0
            if n != last_n:
                last_n, last_change = n, now
            if n >= total:
                end = now
                break
            dead = await queue_info(connection, settings.dead_queue(phase.daemon))
            if dead is not None and dead[0]:
                raise BenchError(
                    f"{phase.name}: {dead[0]} message(s) dead-lettered in {settings.dead_queue(phase.daemon)}"
                )
            check_alive(instances)
            if joining is not None and joining.done():
                joining.result()  # surfaces a failed start
            if now - last_change > args.stall:
                raise BenchError(f"{phase.name}: no progress for {args.stall:.0f} s at {n:,}/{total:,} files")
            progress.show(
                f"{phase.name} (round {round_}): {n:,}/{total:,} files, "
                f"{n / max(now - t0, 1e-9):,.0f} files/s"
            )
            await asyncio.sleep(POLL)
        if joining is not None:  # the first may have done everything before the second consumed
            left = await joining
    except BaseException:
        for task in (publishing, joining):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        raise
    progress.done(
        f"{phase.name} (round {round_}): {total:,} files in {end - t0:.1f} s "
        f"({total / (end - t0):,.0f} files/s)"
    )
    shares = await beats.settled(instances, end)
    await asyncio.sleep(0.6)  # a last CPU sample of every instance
    cpu = {f"{phase.daemon}-{i.index}": i.sampler.cpu - daemon_cpu0.get(i.index, 0.0) for i in instances}
    after = others_cpu(clock, postgres)
    cpu |= {k: after[k] - cpu0[k] for k in after if k in cpu0}
    return Result(phase.name, round_, total - counted, last_n, end - t0, published, shares, cpu, left, queued)


async def _second_joins(
    connection: Any, queue: str, config: Path, phase: Phase, instances: list[Instance], logs: Path
) -> int:
    """The second instance of a backlog phase, started once the first consumes; returns the
    messages still in the queue (not delivered to the first) when last seen before the second
    consumed: read after, the second's own prefetch would be gone already."""
    instances.append(start_instance(config, phase.daemon, 1, logs))
    deadline, ready = time.monotonic() + 120, 0
    while True:
        info = await queue_info(connection, queue)
        if info is not None and info[1] >= 2:
            return ready
        ready = info[0] if info is not None else ready
        check_alive(instances)
        if time.monotonic() > deadline:
            raise BenchError(f"{queue}: the second instance does not consume after 120 s")
        await asyncio.sleep(0.05)


# --- report --------------------------------------------------------------------------------------
def summarize(results: list[Result], phases: list[Phase]) -> dict[str, Any]:
    """Per phase: its best round (the highest rate) and every round's rate; the ratios."""
    best: dict[str, Result] = {}
    for r in results:
        if r.phase not in best or r.rate > best[r.phase].rate:
            best[r.phase] = r
    out: dict[str, Any] = {"phases": {}}
    for p in phases:
        b = best[p.name]
        handled = sum(b.shares.values())
        out["phases"][p.name] = {
            "daemon": p.daemon, "instances": p.instances, "catalogue": p.catalogue, "backlog": p.backlog,
            "files": b.files, "files_done": min(r.done for r in results if r.phase == p.name),
            "seconds": b.seconds, "rate": b.rate,
            "publish_seconds": b.publish_seconds,
            "rates": [r.rate for r in results if r.phase == p.name],
            "messages": {str(k): v for k, v in sorted(b.shares.items())},
            "shares": {str(k): v / handled if handled else 0.0 for k, v in sorted(b.shares.items())},
            "cpu_seconds": b.cpu_seconds, "left_for_second": b.left_for_second,
            "queued": b.queued,
        }  # fmt: skip

    def ratio(a: str, b: str) -> float | None:
        return best[a].rate / best[b].rate if a in best and b in best else None

    out["ratios"] = {
        "ingest_two_of_one": ratio("ingest x2", "ingest x1"),
        "replicator_two_of_one": ratio("replicator x2", "replicator x1"),
        "ingest_postgresql_of_sqlite": ratio("ingest x1", "ingest x1 sqlite"),
        "ingest_two_of_one_queued": ratio("ingest x2 queued", "ingest x1 queued"),
        "replicator_two_of_one_queued": ratio("replicator x2 queued", "replicator x1 queued"),
    }
    return out


def report(f: dict[str, Any]) -> None:
    print(f"\nSeveral instances: {f['files']:,} files of {f['size']:,} B per phase, {f['rounds']} round(s) "
          f"(best rate counts), {f['cpus']} CPUs; defaults under test: {f['settings']}")  # fmt: skip
    print(
        f"  {'phase':<22} {'files/s':>8} {'seconds':>8} {'publish s':>9}  {'rounds files/s':<18} "
        f"{'share (messages)':<24} CPU s"
    )
    for name, p in f["phases"].items():
        rounds = " ".join(f"{r:,.0f}" for r in p["rates"])
        share = " / ".join(f"{100 * s:.0f}% ({p['messages'][k]:,})" for k, s in p["shares"].items())
        cpu = ", ".join(f"{k} {v:.1f}" for k, v in p["cpu_seconds"].items())
        print(f"  {name:<22} {p['rate']:>8,.0f} {p['seconds']:>8.1f} {p['publish_seconds']:>9.1f}  "
              f"{rounds:<18} {share:<24} {cpu}")  # fmt: skip
        if p["left_for_second"] is not None:
            print(
                f"  {'':<22} of {p['queued'] or 0:,} message(s) queued, {p['left_for_second']:,} still there "
                "just before the second instance began consuming (the first had taken the rest: up to its "
                "prefetch at once, then one for each it finished)"
            )
    print("  publish s: publishing the work (consumed meanwhile: near 'seconds', the publishing set the"
          " pace, not the daemons; a backlog is queued before the clock starts; a queued phase's clock"
          " starts once every instance consumes, its rate counts the files done after)\n")  # fmt: skip
    targets = {"ingest_two_of_one": TARGET_TWO_OF_ONE, "replicator_two_of_one": TARGET_TWO_OF_ONE,
               "ingest_two_of_one_queued": TARGET_TWO_OF_ONE,
               "replicator_two_of_one_queued": TARGET_TWO_OF_ONE,
               "ingest_postgresql_of_sqlite": TARGET_PG_OF_SQLITE}  # fmt: skip
    for key, target in targets.items():
        value = f["ratios"].get(key)
        if value is not None:
            print(
                f"  {key.replace('_', ' '):<30} {value:5.2f}   target >= {target}  {verdict(value >= target)}"
            )
    print(f"\n  On {f['cpus']} CPUs two instances share the cores one instance has; the figures for a larger "
          "machine come from running this bench there.")  # fmt: skip


# --- main ----------------------------------------------------------------------------------------
async def bench(args: argparse.Namespace, state: Path) -> dict[str, Any]:
    # Warnings only: the rule's evaluation in this process logs as the replicator would.
    configure_logging(LogChoice(level="warning", format="console"))
    files = state / "files"
    files.mkdir(parents=True)
    work = Work(files, make_files(files, args.files, args.size))
    os.sync()  # or the daemons' first syncs pay for flushing the sample files
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    phases = [p for p in PHASES if not args.only or any(word in p.name for word in args.only)]
    results: list[Result] = []
    for round_ in range(1, args.rounds + 1):  # A B A B: each phase once per round, in turn
        for phase in phases:
            results.append(await run_phase(args, state, work, phase, round_))
    prefetch = args.prefetch if args.prefetch is not None else "default"
    concurrency = args.concurrency if args.concurrency is not None else "default"
    return {
        "files": args.files, "size": args.size, "rounds": args.rounds, "cpus": psutil.cpu_count(),
        "settings": f"prefetch {prefetch}, concurrency {concurrency}", "bulk": BULK,
        **summarize(results, phases),
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--files", type=int, default=20_000, help="files per phase (default: 20000)")
    p.add_argument("--size", type=int, default=1024, help="bytes per file (default: 1024)")
    p.add_argument("--rounds", type=int, default=2, help="every phase this many times, in turn (default: 2)")
    p.add_argument(
        "--only", nargs="*", help="phases whose name contains one of these words (ingest, x2, ...)"
    )
    p.add_argument("--prefetch", type=int, default=None, help="[daemons.*] prefetch (default: Spool's)")
    p.add_argument("--concurrency", type=int, default=None, help="[daemons.*] concurrency (default: Spool's)")
    p.add_argument("--stall", type=float, default=120.0, help="give up after this long without progress")
    p.add_argument("--state-dir", type=Path, default=None,
                   help="files, catalogues, logs (default: a temporary directory, removed)")  # fmt: skip
    p.add_argument("--keep", action="store_true", help="keep the temporary state directory")
    p.add_argument("--amqp-url", default=DEFAULT_AMQP_URL, help="RabbitMQ (default: $SPOOL_TEST_AMQP_URL)")
    p.add_argument("--json", action="store_true", help="also print the figures as one JSON object")
    args = p.parse_args()
    if args.files < 1 or args.size < 0 or args.rounds < 1:
        p.error("--files and --rounds must be positive, --size not negative")
    run_in_state_dir(p, args, "spool-scale-", bench, show=report)


if __name__ == "__main__":
    main()
