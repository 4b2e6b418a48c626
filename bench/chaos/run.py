"""One chaos run, start to end: private broker, catalogue, night, daemons, faults, then the
invariants. ``run_chaos`` is what ``python -m bench.chaos`` and ``tests/test_chaos.py`` call.

Timeline: the broker boots; every daemon starts as its own process; the night's ``file.ready``
events go out at ``rate`` a second while a seeded schedule of faults runs (SIGKILL of a random
daemon, restarted after a short delay; SIGTERM, answered by a drain and exit 0; broker outages,
``stop_app`` .. ``start_app``); tape-only datasets are recalled as soon as they are on tape.
Faults stop once every event and recall has been sent (and a little after, so recalls meet some);
then the harness waits until the catalogue says the work is done and the queues are empty, stops
the daemons with SIGTERM and checks everything. The seed fixes the schedule (which fault, which
daemon, which pause, which files), not the machine's timing, so a replay is close, not identical.

Several nodes (``Options.cluster``): the broker is the three-node cluster of ``.ci/services.sh``
(the run in a vhost of its own), every daemon runs once per node (``instances`` config files,
differing in ``node`` and ``state_dir``, sharing the catalogue, the storage roots, the landing area
and the library), and the broker's faults are a node's VM SIGKILLed and started again: no daemon
may exit for it, the others' nodes serve. Every daemon has at least one instance SIGKILLed.
"""

from __future__ import annotations

import asyncio
import logging
import random
import shutil
import signal
import tempfile
import time
import uuid
import warnings
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from common.config import Settings, load_settings

from . import events, invariants
from .broker import ClusterBroker, PrivateBroker
from .fleet import DAEMONS, Fleet, node_label
from .invariants import Check
from .workload import (
    PG_ADMIN_URL,
    Night,
    Publisher,
    Recall,
    Recalls,
    make_night,
    pg_database,
    publish_night,
    recall_request,
    write_config,
)  # fmt: skip


@dataclass
class Options:
    files: int = 20_000
    datasets: int = 40
    rate: float = 100.0  # file.ready events a second
    seed: int | None = None
    catalogue: str = "sqlite"  # or "postgresql"
    fault_gap: tuple[float, float] = (3.0, 9.0)  # seconds between two faults
    outage: tuple[float, float] = (8.0, 20.0)  # seconds the broker is stopped
    outage_share: float = 0.06  # of the faults, when the minimum below is met
    term_share: float = 0.1
    min_outages: int = 3
    min_kills: int = 10
    settle_timeout: float = 900.0
    workdir: Path | None = None
    keep: bool = False
    cluster: bool = False  # the three-node cluster; broker faults are node kills (then ``outage``: down time)
    instances: int = 1  # of each daemon, one per node
    pg_admin_url: str = PG_ADMIN_URL
    say: Callable[[str], None] = field(default=lambda s: print(s, flush=True))

    @classmethod
    def short(cls, **kw: Any) -> Options:
        """The slow-test size: a few hundred files, outages of a few seconds, about two minutes."""
        base: dict[str, Any] = dict(files=600, datasets=6, rate=20.0, fault_gap=(1.0, 3.0), outage=(3.0, 6.0),
                                    min_outages=2, min_kills=3, settle_timeout=420.0)  # fmt: skip
        return cls(**{**base, **kw})

    @classmethod
    def several_nodes(cls, short: bool = False, **kw: Any) -> Options:
        """Every daemon twice on the cluster, PostgreSQL: ``make chaos-cluster`` (5,000 files) or the
        slow test's size (a few hundred). One broker node killed (down 10-25 s, then its boot)."""
        base: dict[str, Any] = dict(
            files=5000, datasets=20, rate=50.0, catalogue="postgresql", cluster=True, instances=2,
            outage=(10.0, 25.0), outage_share=0.03, min_outages=1, min_kills=8,
        )  # fmt: skip
        if short:
            base |= dict(files=300, datasets=4, rate=15.0, fault_gap=(1.5, 3.0), min_kills=5,
                         settle_timeout=420.0)  # fmt: skip
        return cls(**{**base, **kw})


@dataclass
class Faults:
    kills: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DAEMONS, 0))
    terms: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DAEMONS, 0))
    outages: list[float] = field(default_factory=list)  # seconds the broker could not be reached
    nodes_killed: list[str] = field(default_factory=list)  # on a cluster: the node of each outage
    instances_killed: list[str] = field(default_factory=list)  # keys, in order

    def line(self) -> str:
        k = ", ".join(f"{d} {n}" for d, n in self.kills.items() if n)
        t = ", ".join(f"{d} {n}" for d, n in self.terms.items() if n)
        o = ", ".join(f"{s:.0f}" for s in self.outages)
        if self.nodes_killed:
            nodes = ", ".join(f"{n} {s:.0f} s" for n, s in zip(self.nodes_killed, self.outages, strict=True))
            broker = f"{len(self.outages)} broker nodes SIGKILLed and started again ({nodes})"
        else:
            broker = f"{len(self.outages)} broker outages ({o} s)"
        return (f"{sum(self.kills.values())} SIGKILLs ({k}); {sum(self.terms.values())} SIGTERMs ({t}); "
                f"{broker}")  # fmt: skip


@dataclass
class Report:
    seed: int
    options: Options
    faults: Faults
    checks: list[Check]
    seconds: float
    notes: list[str]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


@asynccontextmanager
async def catalogue_url(opts: Options, state: Path) -> AsyncIterator[str]:
    if opts.catalogue == "sqlite":
        yield f"sqlite+aiosqlite:///{state}/catalogue.db"
    else:
        async with pg_database(opts.pg_admin_url) as url:
            yield url


async def run_chaos(opts: Options) -> Report:
    seed = opts.seed if opts.seed is not None else random.SystemRandom().randrange(1_000_000)
    say = opts.say
    for noisy in ("aio_pika", "aiormq"):  # the harness's own reconnections during outages
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    # aio-pika's __del__ of a connection the broker dropped during an outage
    warnings.filterwarnings("ignore", message="coroutine 'Connection.close' was never awaited")
    say(f"chaos: seed {seed} (--seed {seed} replays the schedule); {opts.files} files, {opts.catalogue}")
    work = Path(tempfile.mkdtemp(prefix="spool-chaos-", dir=opts.workdir))
    broker: PrivateBroker | ClusterBroker
    broker = (
        ClusterBroker(uuid.uuid4().hex[:8]) if opts.cluster else PrivateBroker(work, uuid.uuid4().hex[:8])
    )
    fleet: Fleet | None = None
    try:
        t0 = time.monotonic()
        await asyncio.to_thread(broker.start)
        if isinstance(broker, ClusterBroker):
            say(f"RabbitMQ cluster up in {broker.boot_seconds:.1f} s, the run in vhost {broker.vhost}")
        else:
            up = f"up in {broker.boot_seconds:.1f} s"
            say(f"private RabbitMQ node {broker.node} on port {broker.port}, {up}")
        state = work / "state"
        (state / "landing").mkdir(parents=True)
        night = make_night(state / "landing", opts.files, opts.datasets, random.Random(f"{seed}-files"))
        mb, sets = night.total_bytes / 1e6, len(night.datasets)
        tape_only = len(night.tape_only)
        say(f"night: {len(night.files)} files, {mb:.1f} MB, {sets} datasets ({tape_only} tape-only), {work}")
        async with catalogue_url(opts, state) as url:
            configs = _configs(opts, work, state, broker.urls, url, night)
            settings = load_settings(configs[0])
            fleet = Fleet(configs, work / "logs")
            report = await _run(opts, seed, night, settings, url, broker, fleet, t0)
            fleet = None
        return report
    finally:
        if fleet is not None:
            fleet.kill_all()
        broker.close()
        if not opts.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            say(f"kept {work}")


def _configs(
    opts: Options, work: Path, state: Path, amqp_urls: list[str], url: str, night: Night
) -> list[Path]:
    """One config file per node; with several, each its own ``node`` and ``state_dir`` (the
    staging areas a daemon empties at start), everything else shared."""
    if opts.instances == 1:
        return [write_config(work / "spool.toml", state, amqp_urls, url, night)]
    side = "quorum" if opts.cluster else None
    out = []
    for i in range(opts.instances):
        node = f"chaos-{node_label(i)}"
        (work / node).mkdir()
        out.append(write_config(work / f"{node}.toml", work / node, amqp_urls, url, night, shared=state,
                                node=node, side_queues=side))  # fmt: skip
    return out


async def _run(
    opts: Options, seed: int, night: Night, settings: Settings, url: str,
    broker: PrivateBroker | ClusterBroker, fleet: Fleet, t0: float,
) -> Report:  # fmt: skip
    say = opts.say
    from common.bus.connection import connect
    from common.bus.topology import declare_topology

    connection = await connect(settings.bus, name="chaos-setup")
    await declare_topology(await connection.channel(), settings)  # file.ready routable from the start
    await connection.close()
    await events.declare(broker.urls, quorum=opts.cluster)
    stop_watch = asyncio.Event()
    fleet.start_all()
    watcher = asyncio.create_task(fleet.watch(stop_watch))
    engine = create_async_engine(url)
    publisher = Publisher(broker.urls)
    faults = Faults()
    published = [0]
    recalls = Recalls()
    notes: list[str] = []
    try:
        await _wait_catalogue(engine)
        if starting := await _idle_daemons(settings, opts.instances, wait=300):
            notes.append(f"not every daemon consuming when publishing began: {'; '.join(starting)}")
        say(f"daemons consuming after {time.monotonic() - t0:.0f} s")
        t_pub = time.monotonic()
        publishing = asyncio.create_task(
            publish_night(publisher, night, opts.rate, lambda n: published.__setitem__(0, n))
        )
        recalling = asyncio.create_task(_recaller(night, settings, engine, publisher, published, recalls,
                                                  random.Random(f"{seed}-recall"), notes))  # fmt: skip
        sent = lambda: publishing.done() and recalls.done.is_set()  # noqa: E731
        schedule = random.Random(f"{seed}-faults")
        faulting = asyncio.create_task(_faults(opts, fleet, broker, faults, schedule, sent))
        while not faulting.done():
            await asyncio.sleep(10)
            if not faulting.done():
                say(f"  {time.monotonic() - t0:5.0f} s  published {published[0]}  "
                    f"{await _progress(engine)}  {faults.line()}")  # fmt: skip
        await faulting
        say(f"faults over after {time.monotonic() - t_pub:.0f} s: {faults.line()}")
        await publishing
        await recalling
        say(f"every event and recall sent after {time.monotonic() - t_pub:.0f} s")
        settled = await _settle(opts, engine, night, recalls.requested, settings, t0)
        if not settled:
            notes.append(f"not settled within {opts.settle_timeout:.0f} s: checked as it stood")
        say(f"settled: {await _progress(engine)} after {time.monotonic() - t0:.0f} s")
        idle = await _idle_daemons(settings, opts.instances)
        stuck = await fleet.dump_stuck()
        held = await invariants.held_work(url, fleet.live_pids()) if opts.instances > 1 else None
    finally:
        stop_watch.set()
        await watcher
        final = await fleet.stop_all(grace=settings.bus.stop_grace + 20)
        await publisher.close()
        await engine.dispose()
    seen = await events.read_all(broker.urls, quorum=opts.cluster)
    snap = await invariants.snapshot(url)
    checks = invariants.catalogue_checks(snap, night, recalls.requested, settings)
    checks += await invariants.tape_checks(snap, settings)
    checks.append(invariants.event_checks(seen, night, recalls.requested))
    checks.append(invariants.exit_check(fleet.exits, fleet.term_codes, final))
    figure = f"{len(idle)} queues without a consumer, {len(stuck)} stuck"
    checks.append(invariants.check("every daemon consuming at the end, none stuck", figure, idle + stuck))
    if held is not None:
        checks.append(held)
        checks.append(invariants.shares_check(seen, fleet))
        checks.append(invariants.every_daemon_killed(faults.kills))
    seconds = time.monotonic() - t0
    report = Report(seed, opts, faults, checks, seconds, notes)
    starts = ", ".join(f"{n} {d.starts}" for n, d in fleet.daemons.items())
    say(
        f"did: {len(night.files)} files, {len(recalls.requested)} recalls; {faults.line()}; "
        f"{publisher.resent_batches} publish batches resent; daemon starts {starts}; {seconds:.0f} s in all"
    )
    if opts.instances > 1:
        killed = Counter(faults.instances_killed)
        say("SIGKILLs per instance: " + ", ".join(f"{k} {killed[k]}" for k in fleet.daemons))
    for note in notes:
        say(f"note: {note}")
    for c in checks:
        say(c.line())
    say(f"chaos {'PASSED' if report.ok else 'FAILED'} (seed {seed}, {opts.catalogue})")
    return report


async def _wait_catalogue(engine: AsyncEngine, timeout: float = 120) -> None:
    """Until a daemon has created the catalogue's tables (migrations run at start)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            async with engine.connect() as c:
                await c.execute(text("SELECT count(*) FROM recalls"))
                return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def _progress(engine: AsyncEngine) -> str:
    async with engine.connect() as c:
        files = (await c.execute(text("SELECT count(*) FROM files"))).scalar_one()
        rows = (await c.execute(text(
            "SELECT e.name, r.state, count(*) FROM replicas r "
            "JOIN storage_endpoints e ON e.id = r.storage_id "
            "GROUP BY e.name, r.state"))).all()  # fmt: skip
        recalls = (await c.execute(text("SELECT state, count(*) FROM recalls GROUP BY state"))).all()
    avail = {s: n for s, st, n in rows if st == "available"}
    pending = sum(n for _, st, n in rows if st in invariants.PENDING)
    rec = ", ".join(f"{st} {n}" for st, n in recalls) or "none"
    return (f"files {files}  available disk1 {avail.get('disk1', 0)} disk2 {avail.get('disk2', 0)} "
            f"tape1 {avail.get('tape1', 0)}  pending {pending}  recalls: {rec}")  # fmt: skip


async def _settle(
    opts: Options, engine: AsyncEngine, night: Night, recalls: list[Recall], settings: Settings, t0: float
) -> bool:
    """Until the catalogue shows the work done and every work queue has been empty for a while."""
    deadline = time.monotonic() + opts.settle_timeout
    last = time.monotonic()
    while time.monotonic() < deadline:
        snap = await invariants.snapshot(str(engine.url.render_as_string(hide_password=False)))
        if invariants.settled(snap, night, recalls) and await _queues_empty(settings, times=3):
            return True
        if time.monotonic() - last > 10:
            last = time.monotonic()
            opts.say(f"  {time.monotonic() - t0:5.0f} s  settling: {await _progress(engine)}")
        await asyncio.sleep(2)
    return False


async def _idle_daemons(settings: Settings, instances: int, wait: float = 30.0) -> list[str]:
    """Work queues with fewer consumers than instances of their daemon (the monitor: one, its
    active instance) once the run is over: a daemon that survived its faults, or a broker node's
    loss, but no longer serves. After giving restarts ``wait`` seconds. Also what the run waits
    for before it publishes, so that faults meet daemons that serve."""
    deadline = time.monotonic() + wait
    while True:
        idle = []
        connection = await events.connect_any(settings.bus.broker_urls())
        try:
            channel = await connection.channel()
            for daemon in DAEMONS:
                q = await channel.declare_queue(settings.queue(daemon), passive=True)
                want = 1 if daemon == "monitor" else instances
                if (got := q.declaration_result.consumer_count or 0) < want:
                    idle.append(f"{settings.queue(daemon)} has {got} consumers, {want} expected")
        finally:
            await connection.close()
        if not idle or time.monotonic() > deadline:
            return idle
        await asyncio.sleep(2)


async def _queues_empty(settings: Settings, times: int) -> bool:
    from common.bus.topology import BINDINGS

    names = [settings.queue(d) for d in BINDINGS if d != "monitor"]
    names += [settings.retry_queue(d, t) for d in BINDINGS if d != "monitor"
              for t in range(len(settings.bus.retry_tiers))]  # fmt: skip
    try:
        connection = await events.connect_any(settings.bus.broker_urls())
    except Exception:
        return False
    try:
        for i in range(times):
            channel = await connection.channel()
            for name in names:
                q = await channel.declare_queue(name, passive=True)
                if q.declaration_result.message_count:
                    return False
            await channel.close()
            if i < times - 1:
                await asyncio.sleep(1)
        return True
    finally:
        await connection.close()


async def _recaller(
    night: Night, settings: Settings, engine: AsyncEngine, publisher: Publisher, published: list[int],
    recalls: Recalls, rng: random.Random, notes: list[str],
) -> None:  # fmt: skip
    """Recall each tape-only dataset once it is wholly on tape: every other one evicted from disk
    and recalled whole to disk1 (read from tape), the rest some files to disk2 (from disk)."""
    from common.catalogue import Catalogue
    from common.cli.replication import evict_copies

    try:
        last_of = {f.dataset: i for i, f in enumerate(night.files)}
        for k, ds in enumerate(night.tape_only):
            files = night.of(ds)
            while published[0] <= last_of[ds] or await _on_tape(engine, ds) < len(files):
                await asyncio.sleep(1)
            if k % 2 == 0:
                r = Recall(uuid.uuid4().hex, "tape", ds, [f.name for f in files], "disk1")
                async with await Catalogue.open(settings.catalogue.url) as cat:
                    done = await evict_copies(cat, "disk1", settings.storage["disk1"], dataset=ds)
                r.evicted = len(done["evicted"])
            else:
                picked = rng.sample(files, min(20, len(files)))
                r = Recall(uuid.uuid4().hex, "disk", ds, [f.name for f in picked], "disk2")
            await publisher.send([("recall.request", recall_request(r), None)])
            recalls.requested.append(r)
    except Exception as exc:  # reported, and the run goes on to its checks
        notes.append(f"recalls stopped early: {exc!r}")
    finally:
        recalls.done.set()


async def _on_tape(engine: AsyncEngine, dataset: str) -> int:
    sql = text(
        "SELECT count(*) FROM replicas r JOIN files f ON f.id = r.file_id "
        "JOIN datasets d ON d.id = f.dataset_id JOIN storage_endpoints e ON e.id = r.storage_id "
        "WHERE d.name = :ds AND e.name = 'tape1' AND r.state = 'available'"
    )
    async with engine.connect() as c:
        return int((await c.execute(sql, {"ds": dataset})).scalar_one())


async def _faults(
    opts: Options, fleet: Fleet, broker: PrivateBroker | ClusterBroker, faults: Faults, rng: random.Random,
    workload_done: Callable[[], bool],
) -> None:  # fmt: skip
    """The seeded schedule: until the workload is sent (and 10 s more), one fault every
    ``fault_gap`` seconds, and at least ``min_outages`` outages (spread over the expected
    publishing time), ``min_kills`` SIGKILLs and one SIGTERM whatever the machine's pace.
    Faults stop at twice the publishing time plus a minute even if recalls are
    still to be sent: on a loaded machine a tape daemon killed every few seconds spends its life
    starting (10-20 s each time) and the recalls wait for tape, so the window could last forever.
    With several instances, the SIGKILLs go first to daemons none of whose instances was killed
    yet, so that every daemon loses one. On a cluster an outage is a node's VM SIGKILLed, and
    it runs beside the other faults (a node's boot takes a minute on a loaded machine), one at a
    time."""
    tasks: list[asyncio.Task[None]] = []
    try:
        await _fault_loop(opts, fleet, broker, faults, rng, workload_done, tasks)
    finally:
        for task in tasks:
            await task


async def _fault_loop(
    opts: Options, fleet: Fleet, broker: PrivateBroker | ClusterBroker, faults: Faults, rng: random.Random,
    workload_done: Callable[[], bool], node_kills: list[asyncio.Task[None]],
) -> None:  # fmt: skip
    t0 = time.monotonic()
    expected = opts.files / opts.rate
    cap = t0 + 2 * expected + 60
    done_at: float | None = None
    while True:
        for task in node_kills:
            if task.done() and task.exception() is not None:
                raise RuntimeError("a killed broker node did not come back") from task.exception()
        now = time.monotonic()
        # A node kill under way counts: the faults end while it boots, and the run waits for it.
        outages = len(node_kills) or len(faults.outages)
        enough = outages >= opts.min_outages and any(faults.terms.values())
        enough = enough and sum(faults.kills.values()) >= opts.min_kills
        enough = enough and (opts.instances == 1 or all(faults.kills.values()))
        if now > cap and enough:
            if not workload_done():
                opts.say(f"  faults stopped at {now - t0:.0f} s, before every recall was sent (the cap)")
            return
        if workload_done():
            done_at = done_at or now
            if now - done_at > 10 and enough:
                return
        await asyncio.sleep(rng.uniform(*opts.fault_gap))
        elapsed = time.monotonic() - t0
        due_outages = min(opts.min_outages, int(elapsed / expected * (opts.min_outages + 1)))
        roll = rng.random()
        outages, terms = len(node_kills) or len(faults.outages), sum(faults.terms.values())
        node_down = any(not t.done() for t in node_kills)
        broker_fault = outages < due_outages or (roll < opts.outage_share and outages >= opts.min_outages)
        if broker_fault and isinstance(broker, ClusterBroker) and not node_down:
            pause = rng.uniform(*opts.outage)
            node_kills.append(
                asyncio.create_task(_node_kill(broker, faults, rng.choice(broker.NODES), pause, opts.say))
            )
        elif broker_fault and isinstance(broker, PrivateBroker):
            await _outage(fleet, broker, faults, rng.uniform(*opts.outage), opts.say)
        elif roll < opts.outage_share + opts.term_share or (not terms and elapsed > expected / 3):
            await _term(fleet, faults, rng.choice(list(fleet.daemons)), rng.uniform(0.5, 2.0))
        else:
            await _kill(fleet, faults, _victim(fleet, faults, rng), rng.uniform(0.3, 3.0))


def _victim(fleet: Fleet, faults: Faults, rng: random.Random) -> str:
    """The instance to SIGKILL: any; with several instances, one of a daemon not yet hit if any."""
    if len(fleet.daemons) == len(DAEMONS):
        return rng.choice(DAEMONS)
    spared = [d for d in DAEMONS if not faults.kills[d]]
    return rng.choice(fleet.instances(rng.choice(spared or list(DAEMONS))))


async def _kill(fleet: Fleet, faults: Faults, name: str, delay: float) -> None:
    if fleet.signal(name, signal.SIGKILL):
        faults.kills[fleet.daemons[name].daemon] += 1
        faults.instances_killed.append(name)
        await fleet.wait_exit(name, 10)
        fleet.schedule_restart(name, delay)


async def _term(fleet: Fleet, faults: Faults, name: str, delay: float) -> None:
    serving = fleet.terminate(name)
    if serving is None:
        return
    faults.terms[fleet.daemons[name].daemon] += 1
    code = await fleet.wait_exit(name, 60)
    if code is None:  # did not drain in time: a finding, and the run goes on
        fleet.signal(name, signal.SIGKILL)
        code = await fleet.wait_exit(name, 10)
    fleet.term_codes.append((name, -999 if code is None else code, serving))
    fleet.schedule_restart(name, delay)


async def _outage(
    fleet: Fleet, broker: PrivateBroker, faults: Faults, pause: float, say: Callable[[str], None]
) -> None:
    t = time.monotonic()
    fleet.outage_until = t + pause + 30
    if not await asyncio.to_thread(broker.stop_app):
        say("  warning: rabbitmqctl stop_app failed")
    await asyncio.sleep(pause)
    if not await asyncio.to_thread(broker.start_app):
        raise RuntimeError("the private broker did not come back after an outage")
    faults.outages.append(time.monotonic() - t)
    fleet.outage_until = time.monotonic()


async def _node_kill(
    broker: ClusterBroker, faults: Faults, n: int, pause: float, say: Callable[[str], None]
) -> None:
    """SIGKILL node ``n``'s VM, leave it down ``pause`` seconds, start it again and wait for the
    three-node cluster. The daemons are not warned (no ``outage_until``): the other nodes serve,
    so an exit now is a finding."""
    t = time.monotonic()
    if not await asyncio.to_thread(broker.kill, n):
        say(f"  warning: {broker.node(n)} was not running")
        return
    say(f"  {broker.node(n)} SIGKILLed")
    await asyncio.sleep(pause)
    if not await asyncio.to_thread(broker.restart, n):
        raise RuntimeError(f"{broker.node(n)} did not come back into the cluster")
    faults.outages.append(time.monotonic() - t)
    faults.nodes_killed.append(broker.node(n))
    say(f"  {broker.node(n)} back in the cluster after {faults.outages[-1]:.0f} s")
