"""Several recall instances on one catalogue (issue 19), on SQLite and PostgreSQL: a file is staged
by one instance, a cartridge read by one instance at a time, a dead instance's reads put back by
one survivor and never a live one's, and a stale instance's late records change nothing.

Each instance is a second engine on the catalogue (as another process, or node, holds), with a
lease row of its own; "dead" is a lease that ran out."""

# Fixtures imported from catalogue_fixtures (not conftest) reappear as test parameters:
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import os
import random
from collections import defaultdict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import Connection, select

from common.bus.publisher import RecordingPublisher
from common.catalogue import Catalogue
from common.catalogue import recall as db
from common.catalogue import schema as s
from common.catalogue.instances import InstanceInfo
from common.catalogue.sql import utcnow
from common.config import RecallSettings
from common.messages import FileRecalled, RecallCompleted
from common.storage import PosixStorage
from common.tape import SimulatedLibrary, SimulatedLibraryConfig, TapeTiming
from daemons.recall.announce import Announcer
from daemons.recall.scheduler import Scheduler
from tests.catalogue_fixtures import catalogue, catalogue_url, rec  # noqa: F401
from tests.conftest import wait_for
from tests.race_fixtures import second  # noqa: F401
from tests.recall_fixtures import SIZE, archive_on_tape, recall_endpoints

LIB = "lib"
PIN = datetime(2030, 1, 1, tzinfo=UTC)


async def instance(cat: Catalogue, name: str, seconds: float = 60.0) -> str:
    """A registered recall instance whose lease stands for ``seconds`` (negative: ran out)."""
    now = utcnow()
    iid = f"recall@{name}:{os.getpid()}:{random.getrandbits(32):08x}"
    info = InstanceInfo(iid, "recall", name, os.getpid(), now, now, now + timedelta(seconds=seconds))
    await cat.instances.register(info)
    return iid


async def expire(cat: Catalogue, iid: str) -> None:
    """The instance's lease runs out (its process was killed, or paused past it)."""
    now = utcnow()
    await cat.instances.renew(iid, now, now - timedelta(seconds=1))


async def on_tape(cat: Catalogue, layout: dict[str, int]) -> list[str]:
    """``layout``: vid -> files, named ``<vid>/<fseq>``, whose only copy is on tape1."""
    names = [f"{vid}/{n}" for vid, count in layout.items() for n in range(1, count + 1)]
    await cat.ingest.register([rec(n) for n in names])
    for name in names:
        vid, fseq = name.split("/")
        await cat.replication.set_replica(
            name=name, storage="tape1", pfn=name, state="available", cartridge=vid, fseq=int(fseq)
        )
        await cat.replication.set_replica(
            name=name, storage="disk1", pfn=f"/srv/disk1/{name}", state="deleted"
        )
    return names


async def requested(cat: Catalogue, rid: str, names: list[str]) -> None:
    """A request for ``names`` to disk2, each file's tape copy chosen (as a scheduler pass does)."""
    await cat.recall.create_recall(db.RecallSpec(id=rid, destination="disk2", priority=3, names=tuple(names)))
    pending = await cat.recall.pending(10_000, rid)
    await cat.recall.assign([(p.recall_id, p.name, p.tape[0]) for p in pending])


def delivered(items: list[db.ReadItem]) -> list[db.Delivery]:
    return [db.Delivery(i.file_id, i.name, i.destination, i.name, PIN, f"{i.copy.cartridge}/{i.copy.fseq}")
            for i in {i.file_id: i for i in items}.values()]  # fmt: skip


def _rows(conn: Connection) -> dict[tuple[str, str], tuple[str, str | None]]:
    rf = s.recall_files
    return {(x.recall_id, x.name): (x.state, x.holder)
            for x in conn.execute(select(rf.c.recall_id, rf.c.name, rf.c.state, rf.c.holder))}  # fmt: skip


def _claims(conn: Connection) -> dict[tuple[str, str], str]:
    c = s.recall_cartridges
    return {(x.library, x.vid): x.holder for x in conn.execute(select(c))}


async def rows(cat: Catalogue) -> dict[tuple[str, str], tuple[str, str | None]]:
    return await cat.read(_rows)


async def recalled_facts(cat: Catalogue) -> int:
    def count(conn: Connection) -> int:
        return len(conn.execute(select(s.events.c.id).where(s.events.c.type == "file.recalled")).all())

    return await cat.read(count)


# --- a file staged once, a cartridge read by one instance at a time -----------------------------
async def test_two_instances_reading_at_once_share_the_cartridges_and_never_take_a_file_twice(
    catalogue: Catalogue, second: Catalogue
) -> None:
    vids = [f"A0000{n}" for n in range(1, 7)]
    names = await on_tape(catalogue, dict.fromkeys(vids, 5))
    await requested(catalogue, "r1", names)
    await requested(catalogue, "r2", names[::3])  # files wanted by two requests: read once for both
    a, b = await instance(catalogue, "node-a"), await instance(catalogue, "node-b")
    reading: dict[str, str] = {}  # vid -> the instance reading it now (seen from here)
    staged: dict[str, list[tuple[str, str]]] = {a: [], b: []}
    completed: list[str] = []

    async def work(cat: Catalogue, me: str, order: list[str]) -> None:
        """A mount loop reduced to its catalogue statements: claim, window, stage, record."""
        while True:
            busy = False
            for vid in order:
                if not await cat.recall.claim_cartridge(LIB, vid, me, utcnow()):
                    busy = True
                    continue
                assert vid not in reading, f"{vid} claimed by {me} while {reading.get(vid)} reads it"
                reading[vid] = me
                head = 0
                while window := await cat.recall.window_on_cartridge(["tape1"], vid, head, 2):
                    keys = [i.key for i in window]
                    mine = set(await cat.recall.set_state(keys, "staging", holder=me, now=utcnow()))
                    staged[me] += sorted(mine)
                    await asyncio.sleep(0.01)  # reading: the other instance goes on meanwhile
                    settled, refused = await cat.recall.deliver_many(
                        delivered([i for i in window if i.key in mine]), me
                    )
                    assert refused == ()
                    completed.extend(c.recall_id for c in settled.completed)
                    head = max(i.copy.fseq for i in window)
                del reading[vid]
                await cat.recall.release_cartridge(LIB, vid, me)
            if not busy and not await cat.recall.pending(1):
                return
            await asyncio.sleep(0.01)

    await asyncio.wait_for(asyncio.gather(work(catalogue, a, vids), work(second, b, vids)), timeout=120)

    assert set(staged[a]).isdisjoint(staged[b])
    assert len(staged[a]) == len(set(staged[a])) and len(staged[b]) == len(set(staged[b]))
    assert sorted(staged[a] + staged[b]) == sorted((await rows(catalogue)).keys())
    assert staged[a] and staged[b], "one instance did all the work: nothing was shared"
    assert set((await rows(catalogue)).values()) == {("done", None)}
    assert sorted(completed) == ["r1", "r2"]  # each completion decided once
    assert await recalled_facts(catalogue) == len(names) + len(names[::3])


async def test_a_file_two_instances_stage_at_once_is_staged_by_one(
    catalogue: Catalogue, second: Catalogue
) -> None:
    names = await on_tape(catalogue, {"A00001": 40})
    await requested(catalogue, "r1", names)
    a, b = await instance(catalogue, "node-a"), await instance(catalogue, "node-b")
    keys = [("r1", n) for n in names]
    for _ in range(5):
        random.shuffle(keys)
        got_a, got_b = await asyncio.gather(
            catalogue.recall.set_state(keys, "staging", holder=a, now=utcnow()),
            second.recall.set_state(keys[::-1], "staging", holder=b, now=utcnow()),
        )
        assert set(got_a).isdisjoint(got_b) and sorted(got_a + got_b) == sorted(keys)
        held = await rows(catalogue)
        assert {held[k] for k in got_a} <= {("staging", a)} and {held[k] for k in got_b} <= {("staging", b)}
        # Each puts back its own rows only: b's stay b's when a puts back every key.
        await catalogue.recall.set_state(keys, "queued", holder=a)
        after = await rows(catalogue)
        assert {after[k] for k in got_a} <= {("queued", None)} and {after[k] for k in got_b} <= {
            ("staging", b)
        }
        await second.recall.set_state(keys, "queued", holder=b)
        assert set((await rows(catalogue)).values()) == {("queued", None)}


async def test_a_cartridge_has_one_live_reader_and_a_dead_readers_is_taken_over(
    catalogue: Catalogue, second: Catalogue
) -> None:
    a, b = await instance(catalogue, "node-a"), await instance(catalogue, "node-b")
    now = utcnow
    # Claimed at once by both, cartridge after cartridge: one each.
    for n in range(10):
        vid = f"B{n:05d}"
        won = await asyncio.gather(
            catalogue.recall.claim_cartridge(LIB, vid, a, now()),
            second.recall.claim_cartridge(LIB, vid, b, now()),
        )
        assert sorted(won) == [False, True], vid
    assert await catalogue.recall.claim_cartridge(LIB, "A00001", a, now())
    assert await catalogue.recall.claim_cartridge(LIB, "A00001", a, now())  # its own, again
    assert not await second.recall.claim_cartridge(LIB, "A00001", b, now())
    assert ("lib", "A00001") in await second.recall.cartridges_held(now(), b)
    assert ("lib", "A00001") not in await catalogue.recall.cartridges_held(now(), a)
    assert await catalogue.recall.claim_cartridge("other-lib", "A00001", a, now())  # another tape
    await catalogue.recall.release_cartridge(LIB, "A00001", b)  # not b's: stays a's
    assert not await second.recall.claim_cartridge(LIB, "A00001", b, now())
    await catalogue.recall.release_cartridge(LIB, "A00001", a)
    assert await second.recall.claim_cartridge(LIB, "A00001", b, now())
    # b dies holding it: a takes it over; b, stale, claims nothing more (not even its own).
    await expire(catalogue, b)
    assert ("lib", "A00001") not in await catalogue.recall.cartridges_held(now(), a)
    assert await catalogue.recall.claim_cartridge(LIB, "A00001", a, now())
    assert not await second.recall.claim_cartridge(LIB, "A00001", b, now())
    assert not await second.recall.claim_cartridge(LIB, "C00001", b, now())


# --- a dead instance's reads -----------------------------------------------------------------
async def test_a_dead_instances_staging_files_are_put_back_by_one_survivor_and_a_live_ones_stay(
    catalogue: Catalogue, second: Catalogue
) -> None:
    names = await on_tape(catalogue, {"A00001": 30, "A00002": 10})
    await requested(catalogue, "r1", names)
    live = await instance(catalogue, "node-live")
    theirs = [("r1", n) for n in names[30:]]
    assert len(await catalogue.recall.set_state(theirs, "staging", holder=live, now=utcnow())) == 10
    assert await catalogue.recall.claim_cartridge(LIB, "A00002", live, utcnow())
    for round_ in range(4):
        dead = await instance(catalogue, f"node-dead{round_}")
        lost = [("r1", n) for n in names[:30]]
        assert await catalogue.recall.claim_cartridge(LIB, "A00001", dead, utcnow())
        assert len(await catalogue.recall.set_state(lost, "staging", holder=dead, now=utcnow())) == 30
        assert await catalogue.recall.recover(utcnow()) == 0  # its lease stands: nothing is put back
        await expire(catalogue, dead)

        counts = await asyncio.gather(catalogue.recall.recover(utcnow()), second.recall.recover(utcnow()))

        assert sum(counts) == 30, counts  # each row put back once
        after = await rows(catalogue)
        assert {after[k] for k in lost} == {("queued", None)}
        assert {after[k] for k in theirs} == {("staging", live)}
        assert await catalogue.read(_claims) == {("lib", "A00002"): live}  # the dead one's dropped
        # The dead instance, stale, records nothing and puts nothing back any more.
        assert await catalogue.recall.set_state(lost, "staging", holder=dead, now=utcnow()) == []


async def test_a_stale_instances_records_after_a_survivor_took_its_files_change_nothing(
    catalogue: Catalogue, second: Catalogue
) -> None:
    names = await on_tape(catalogue, {"A00001": 4})
    await requested(catalogue, "r1", names)
    stale, survivor = await instance(catalogue, "node-a"), await instance(catalogue, "node-b")
    keys = [("r1", n) for n in names]
    assert await catalogue.recall.claim_cartridge(LIB, "A00001", stale, utcnow())
    window = await catalogue.recall.window_on_cartridge(["tape1"], "A00001", 0, 10)
    assert sorted(await catalogue.recall.set_state(keys, "staging", holder=stale, now=utcnow())) == sorted(
        keys
    )
    await expire(catalogue, stale)  # paused past its lease: a survivor takes over
    assert await second.recall.recover(utcnow()) == 4
    before = await rows(catalogue)

    # Files put back, not yet taken again: the stale instance's record, put-back, failure change nothing.
    assert await catalogue.recall.deliver_many(delivered(window), stale) == (db.Settled(), ())
    assert await catalogue.recall.deliver(delivered(window)[0], stale) == db.Settled()
    assert await catalogue.recall.set_state(keys, "queued", holder=stale) == []
    assert await catalogue.recall.fail(keys, "tape_read_error", "late", stale) == db.Settled()
    assert await rows(catalogue) == before

    # The survivor takes the cartridge and the files; the stale records still change nothing.
    assert await second.recall.claim_cartridge(LIB, "A00001", survivor, utcnow())
    assert sorted(await second.recall.set_state(keys, "staging", holder=survivor, now=utcnow())) == sorted(
        keys
    )
    taken = await rows(catalogue)
    assert await catalogue.recall.deliver_many(delivered(window), stale) == (db.Settled(), ())
    assert await catalogue.recall.fail(keys, "tape_read_error", "late", stale) == db.Settled()
    assert await catalogue.recall.set_state(keys, "queued", holder=stale) == []
    assert await rows(catalogue) == taken
    assert await recalled_facts(catalogue) == 0
    view = await catalogue.queries.show_file(names[0])
    assert view is not None and "disk2" not in {x.storage for x in view.replicas}  # no copy recorded

    settled, refused = await second.recall.deliver_many(delivered(window), survivor)
    assert refused == () and sorted(x.name for x in settled.recalled) == sorted(names)
    assert [c.recall_id for c in settled.completed] == ["r1"]
    assert await recalled_facts(catalogue) == 4


async def test_a_clean_stop_hands_its_reads_and_cartridges_over_at_once(
    catalogue: Catalogue, second: Catalogue
) -> None:
    names = await on_tape(catalogue, {"A00001": 3})
    await requested(catalogue, "r1", names)
    a, b = await instance(catalogue, "node-a"), await instance(catalogue, "node-b")
    keys = [("r1", n) for n in names]
    assert await catalogue.recall.claim_cartridge(LIB, "A00001", a, utcnow())
    await catalogue.recall.set_state(keys[:2], "staging", holder=a, now=utcnow())
    await second.recall.set_state(keys[2:], "staging", holder=b, now=utcnow())

    assert await catalogue.recall.let_go(a) == 2

    after = await rows(catalogue)
    assert [after[k] for k in keys] == [("queued", None), ("queued", None), ("staging", b)]
    assert await second.recall.claim_cartridge(LIB, "A00001", b, utcnow())


async def test_staging_without_a_holder_is_the_single_scheduler_of_before(catalogue: Catalogue) -> None:
    """A scheduler without a lease (benchmark, tests) stages rows nobody holds: no instance's to
    put back, and anyone's to recover, as before issue 19."""
    names = await on_tape(catalogue, {"A00001": 2})
    await requested(catalogue, "r1", names)
    assert len(await catalogue.recall.set_state([("r1", names[0])], "staging")) == 1
    holder = await instance(catalogue, "node-a")
    assert await catalogue.recall.set_state([("r1", names[0])], "queued", holder=holder) == []
    assert await catalogue.recall.recover(utcnow()) == 1


# --- two schedulers ----------------------------------------------------------------------------
async def test_two_schedulers_share_a_request_on_one_library_and_read_each_file_once(
    catalogue: Catalogue, second: Catalogue, tmp_path: Path
) -> None:
    """The scheduler itself, twice, on either backend: two instances (a catalogue engine, a library
    session and a lease row each, one drive each) share a request's cartridges."""
    endpoints = recall_endpoints(tmp_path)
    await catalogue.endpoints.sync(endpoints)
    timing = TapeTiming(mount_seconds=0, unmount_seconds=0, locate_average_seconds=0, read_rate=SIZE / 0.05)
    config = SimulatedLibraryConfig(
        root=tmp_path / "lib", drives=2, pools={"tape1": 4}, scratch_cartridges=0, capacity_bytes=10**6,
        timing=timing, time_scale=0.0, durable=False,
    )  # fmt: skip
    layout = {f"A0000{n}": 4 for n in range(1, 5)}
    async with await SimulatedLibrary.open(config) as lib:
        await archive_on_tape(tmp_path, catalogue, lib, layout)
    names = [f"{vid}/{n}" for vid, count in layout.items() for n in range(1, count + 1)]
    reading: dict[tuple[str, str], str] = {}  # cartridge -> the instance reading it now
    read_by: dict[str, set[str]] = defaultdict(set)  # instance -> cartridges it read
    publishers = [RecordingPublisher(), RecordingPublisher()]
    schedulers: list[Scheduler] = []
    buffers: list[PosixStorage] = []
    for cat, publisher in zip((catalogue, second), publishers, strict=True):
        holder = await instance(cat, f"node-{len(schedulers)}")
        lib = await SimulatedLibrary.open(config.model_copy(update={"time_scale": 1.0}))
        buffer = PosixStorage("buffer", endpoints["buffer"])
        buffers.append(buffer)
        scheduler = Scheduler(
            catalogue=cat, libraries={"lib": lib}, storages={"buffer": buffer},
            endpoints=endpoints, settings=RecallSettings(poll_interval=0.05, max_drives=1),
            announcer=Announcer(cat, publisher), holder=holder, reclaim_interval=1.0,
        )  # fmt: skip
        scheduler._read_window = _watched(scheduler, scheduler._read_window, reading, read_by)  # type: ignore[method-assign,assignment]
        await scheduler.start()
        schedulers.append(scheduler)
    await catalogue.recall.create_recall(
        db.RecallSpec(id="r", destination="buffer", priority=3, names=tuple(names))
    )
    runners = [asyncio.create_task(x.run()) for x in schedulers]
    try:

        async def completed() -> bool:
            return sum(len(p.of_type(RecallCompleted)) for p in publishers) >= 1

        await wait_for(completed, timeout=60)
    finally:
        for task in runners:
            task.cancel()
        await asyncio.gather(*runners, return_exceptions=True)
        for x in schedulers:
            await x.stop()
            await x.let_go()
            await x.libraries["lib"].close()
        for buffer in buffers:
            buffer.close()

    recalled = [m.name for p in publishers for m in p.of_type(FileRecalled)]
    assert sorted(recalled) == sorted(names)  # each once, whoever read it
    assert sum(len(p.of_type(RecallCompleted)) for p in publishers) == 1
    assert all(read_by.values()) and len(read_by) == 2, read_by  # both read
    first, other = read_by.values()
    assert first.isdisjoint(other)  # a cartridge read whole by one: one drive each, 4 files each
    assert all((tmp_path / "buffer" / n).exists() for n in names)
    assert await catalogue.read(_claims) == {}  # every claim released


def _watched(
    scheduler: Scheduler,
    read_window: Callable[..., Awaitable[int]],
    reading: dict[tuple[str, str], str],
    read_by: dict[str, set[str]],
) -> Callable[..., Awaitable[int]]:
    """``read_window`` noting which instance reads which cartridge, refusing a second reader and
    a read of a cartridge the catalogue does not show claimed by the reader."""
    me = scheduler.holder or ""

    async def watched(key: tuple[str, str], *args: object) -> int:
        assert key not in reading, f"{key} read by {me} while {reading.get(key)} reads it"
        reading[key] = me
        assert (await scheduler.catalogue.read(_claims)).get(key) == me  # claimed in the catalogue
        read_by[me].add(key[1])
        try:
            return await read_window(key, *args)
        finally:
            del reading[key]

    return watched
