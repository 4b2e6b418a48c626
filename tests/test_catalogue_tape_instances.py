"""Several tape daemon instances on one catalogue (issue 19), SQLite and PostgreSQL: the copies a
batch takes name their holder; reconciliation settles only those no live instance holds, each by
one survivor; a stale instance's late records change nothing; two instances taking one queue at
once never get the same copy."""

# Fixtures imported from catalogue_fixtures / race_fixtures reappear as test parameters:
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import Connection, select

from common.bus.publisher import RecordingPublisher
from common.catalogue import Catalogue
from common.catalogue import schema as s
from common.catalogue import tape as db
from common.catalogue.sql import utcnow
from common.instance import InstanceLease
from common.messages import FileFailed
from common.tape import SimulatedLibrary, SimulatedLibraryConfig, TapeLibrary
from daemons.relay import OutboxRelay
from daemons.tape import steps
from daemons.tape.reconcile import reconcile
from tests.catalogue_fixtures import catalogue, catalogue_url, rec  # noqa: F401
from tests.race_fixtures import Interlude, second  # noqa: F401
from tests.storage_fixtures import adler

TARGETS = {"tape1": steps.TapeTarget("tape1", "default", "tape1")}


@pytest.fixture
async def library(tmp_path: Path) -> AsyncIterator[SimulatedLibrary]:
    config = SimulatedLibraryConfig(
        root=tmp_path / "lib", drives=2, pools={"tape1": 3}, scratch_cartridges=0,
        capacity_bytes=1_000_000, time_scale=0, durable=False,
    )  # fmt: skip
    async with await SimulatedLibrary.open(config) as lib:
        yield lib


async def _lease(cat: Catalogue, node: str) -> InstanceLease:
    lease = InstanceLease(cat, "tape", node, 30.0, on_lost=lambda: None)
    await lease.start()
    return lease


async def _expire(cat: Catalogue, lease: InstanceLease) -> None:
    """The instance stops renewing (killed, paused): its lease has run out for everyone."""
    assert lease._task is not None
    lease._task.cancel()
    now = utcnow()
    await cat.instances.renew(lease.id, now, now - timedelta(seconds=1))


CONTENT = {f"f{i}": bytes([i]) * (100 + i) for i in range(12)}


async def _queued(cat: Catalogue, names: list[str]) -> dict[str, int]:
    """The files registered and queued for tape1; name -> replica id."""
    await cat.ingest.register([rec(n, size=len(CONTENT[n]), adler32=adler(CONTENT[n])) for n in names])
    for n in names:
        await cat.tape.ensure_queued(n, "tape1", 3)
    return await cat.read(_replica_ids)


def _replica_ids(conn: Connection) -> dict[str, int]:
    f, r = s.files, s.replicas
    return {n: i for n, i in conn.execute(select(f.c.name, r.c.id).join(r, r.c.file_id == f.c.id))}


async def _take(cat: Catalogue, ids: dict[str, int], names: list[str], vid: str, holder: str) -> None:
    got = await cat.tape.take_batch([ids[n] for n in names], vid, holder=holder)
    assert sorted(f.name for f in got) == sorted(names)


async def _commit(library: TapeLibrary, tmp_path: Path, vid: str, names: list[str]) -> dict[str, int]:
    """``names`` written and flushed on ``vid`` (what a writer did before it died); name -> fseq."""
    drive = await library.claim_drive("test", vid=vid)
    assert drive is not None
    await library.mount(drive, vid)
    fseqs = {}
    for n in names:
        path = tmp_path / n
        path.write_bytes(CONTENT[n])
        fseqs[n] = await library.write(drive, path, n, len(CONTENT[n]), adler(CONTENT[n]), flush=False)
    await library.flush(drive)
    await library.release_drive(drive)
    return fseqs


def _states(conn: Connection) -> dict[str, tuple[str, str | None, int | None, str | None]]:
    f, r = s.files, s.replicas
    stmt = select(f.c.name, r.c.state, r.c.cartridge, r.c.fseq, r.c.holder).join(r, r.c.file_id == f.c.id)
    return {name: (state, vid, fseq, holder) for name, state, vid, fseq, holder in conn.execute(stmt)}


def _archived_events(conn: Connection) -> list[str]:
    o = s.outbox
    return sorted(o_id for (o_id,) in conn.execute(select(o.c.id).where(o.c.routing_key == "file.archived")))


async def _settle(cat: Catalogue, library: TapeLibrary, holder: str, idle: list[str]) -> tuple[int, int]:
    """One reconciliation round of the instance ``holder``, no batch of its own on ``idle``."""
    relay = OutboxRelay(cat, RecordingPublisher())
    return await reconcile(cat, relay, {"default": library}, TARGETS, ["tape1"], holder, idle)


async def test_reconcile_leaves_a_live_instances_copies_alone_and_settles_its_own_leftovers(
    catalogue: Catalogue, library: SimulatedLibrary
) -> None:
    a, b = await _lease(catalogue, "node-a"), await _lease(catalogue, "node-b")
    try:
        ids = await _queued(catalogue, ["f0", "f1", "f2", "f3"])
        await _take(catalogue, ids, ["f0", "f1"], "A00001", a.id)
        await _take(catalogue, ids, ["f2", "f3"], "A00002", b.id)
        flight = await catalogue.tape.in_flight(["tape1"])
        assert {(x.name, x.holder) for x in flight} == {
            ("f0", a.id), ("f1", a.id), ("f2", b.id), ("f3", b.id)
        }  # fmt: skip

        # A, with a batch of its own running on tape1: nothing is its to settle.
        assert await _settle(catalogue, library, a.id, []) == (0, 0)
        # A, with no batch of its own on tape1: its own rows (a failed batch's leftovers) only.
        assert await _settle(catalogue, library, a.id, ["tape1"]) == (0, 2)
        states = await catalogue.read(_states)
        assert {n: states[n][0] for n in ids} == {
            "f0": "queued",
            "f1": "queued",
            "f2": "archiving",
            "f3": "archiving",
        }
        assert states["f0"][3] is None and states["f2"][3] == b.id
        # B's rows stay B's while its lease stands, whatever A's clock says about its batches.
        assert await catalogue.tape.settleable(["tape1"], a.id, ["tape1"]) == []
        assert await catalogue.tape.take_over([ids["f2"], ids["f3"]], a.id) == []
    finally:
        await a.stop()
        await b.stop()


async def test_a_dead_instances_copies_are_settled_once_by_one_of_two_survivors(
    catalogue: Catalogue, second: Catalogue, library: SimulatedLibrary, tmp_path: Path
) -> None:
    """C wrote f0, f1 (flushed) and was writing f2, f3 on A00001 when it died. Survivors A and B
    reconcile at once: A's take-over is paused after its update; B's whole reconcile runs in that
    window and settles nothing (PostgreSQL: the rows A is taking are skipped, not waited for);
    A then records f0, f1 from the cartridge and requeues f2, f3, each once."""
    a, b = await _lease(catalogue, "node-a"), await _lease(second, "node-b")
    dead = await _lease(catalogue, "node-c")
    try:
        ids = await _queued(catalogue, ["f0", "f1", "f2", "f3"])
        await _take(catalogue, ids, ["f0", "f1", "f2", "f3"], "A00001", dead.id)
        fseqs = await _commit(library, tmp_path, "A00001", ["f0", "f1"])
        # Alive, the dead one's rows are nobody else's.
        assert await catalogue.tape.settleable(["tape1"], a.id, ["tape1"]) == []
        await _expire(catalogue, dead)
        rows = await catalogue.tape.settleable(["tape1"], a.id, ["tape1"])
        assert {(x.name, x.holder) for x in rows} == {(n, dead.id) for n in ids}

        others = Interlude(lambda: _settle(second, library, b.id, ["tape1"]))

        def a_takes(conn: Connection) -> list[int]:
            others.install(conn, "UPDATE replicas")  # A's rows taken, not committed yet
            return db.take_over(conn, [x.replica_id for x in rows], a.id, utcnow())

        assert await catalogue.write(a_takes) == sorted(ids.values())
        assert await others.result() == (0, 0)
        if catalogue.engine.dialect.name == "postgresql":
            assert others.finished_in_window  # skipped, never waited for A's locks

        # A settles what it took (its own rows now, no batch of its own running).
        assert await _settle(catalogue, library, a.id, ["tape1"]) == (2, 2)
        assert await _settle(second, library, b.id, ["tape1"]) == (
            0,
            0,
        )
        states = await catalogue.read(_states)
        assert {n: states[n] for n in ids} == {
            "f0": ("available", "A00001", fseqs["f0"], None),
            "f1": ("available", "A00001", fseqs["f1"], None),
            "f2": ("queued", None, None, None),
            "f3": ("queued", None, None, None),
        }
        assert await catalogue.read(_archived_events) == sorted(
            db.archived_event(db.Archived(0, n, "tape1", "A00001", fseqs[n])).id for n in ("f0", "f1")
        )  # announced once each
    finally:
        await a.stop()
        await b.stop()
        await dead.stop()


async def test_two_survivors_reconciling_at_once_settle_each_copy_once(
    catalogue: Catalogue, second: Catalogue, library: SimulatedLibrary, tmp_path: Path
) -> None:
    """The same without a pause, truly at once, on two engines, over several cartridges."""
    a, b = await _lease(catalogue, "node-a"), await _lease(second, "node-b")
    dead = await _lease(catalogue, "node-c")
    try:
        names = sorted(CONTENT)
        ids = await _queued(catalogue, names)
        await _take(catalogue, ids, names[:6], "A00001", dead.id)
        await _take(catalogue, ids, names[6:], "A00002", dead.id)
        committed = await _commit(library, tmp_path, "A00001", names[:4]) | await _commit(
            library, tmp_path, "A00002", names[6:8]
        )
        await _expire(catalogue, dead)
        results = await asyncio.gather(
            _settle(catalogue, library, a.id, ["tape1"]),
            _settle(second, library, b.id, ["tape1"]),
        )
        assert (sum(r[0] for r in results), sum(r[1] for r in results)) == (6, 6)
        again = await asyncio.gather(
            _settle(catalogue, library, a.id, ["tape1"]),
            _settle(second, library, b.id, ["tape1"]),
        )
        assert again == [(0, 0), (0, 0)]  # what either took, it settled in the same round
        states = await catalogue.read(_states)
        assert {n for n, st in states.items() if st[0] == "available"} == set(committed)
        assert {n for n, st in states.items() if st[0] == "queued"} == set(names) - set(committed)
        assert len(await catalogue.read(_archived_events)) == 6
    finally:
        await a.stop()
        await b.stop()
        await dead.stop()


async def test_a_stale_instance_records_nothing_over_its_successor(
    catalogue: Catalogue, library: SimulatedLibrary, tmp_path: Path
) -> None:
    """C's lease ran out while its process went on (paused): A requeued C's copies and took
    them into a batch of its own. C's late records, requeues, failures and cartridge moves
    match no row: the copies stay A's."""
    a = await _lease(catalogue, "node-a")
    stale = await _lease(catalogue, "node-c")
    try:
        ids = await _queued(catalogue, ["f0", "f1", "f2"])
        await _take(catalogue, ids, ["f0", "f1", "f2"], "A00001", stale.id)
        await _expire(catalogue, stale)
        assert await _settle(catalogue, library, a.id, ["tape1"]) == (0, 3)
        late = [db.Archived(ids["f0"], "f0", "tape1", "A00001", 1)]
        # Requeued: C's records find no copy of its own.
        assert await catalogue.tape.record_archived(late, holder=stale.id) == []
        assert {st[0] for st in (await catalogue.read(_states)).values()} == {"queued"}
        # Taken by A's batch: still nothing of C's.
        await _take(catalogue, ids, ["f0", "f1", "f2"], "A00002", a.id)
        before = await catalogue.read(_states)
        assert await catalogue.tape.record_archived(late, holder=stale.id) == []
        assert await catalogue.tape.requeue([ids["f1"]], holder=stale.id) == 0
        event = FileFailed(daemon="tape", reason="no_source", error="x", attempts=1, name="f2")
        assert not await catalogue.tape.mark_failed(ids["f2"], event, holder=stale.id)
        await catalogue.tape.point_to(list(ids.values()), "A00003", holder=stale.id)
        assert await catalogue.read(_states) == before
        assert {st[:2] + st[3:] for st in before.values()} == {("archiving", "A00002", a.id)}
        assert await catalogue.read(_archived_events) == []
        assert await catalogue.outbox.backlog() == 0  # no file.failed either
        # A's own records apply, and clear the holder.
        mine = [db.Archived(ids["f0"], "f0", "tape1", "A00002", 1)]
        assert await catalogue.tape.record_archived(mine, holder=a.id) == mine
        assert (await catalogue.read(_states))["f0"] == ("available", "A00002", 1, None)
    finally:
        await a.stop()
        await stale.stop()


async def test_a_dead_instances_copies_wait_while_another_session_holds_their_cartridge(
    catalogue: Catalogue, library: SimulatedLibrary, tmp_path: Path
) -> None:
    """C's lease ran out but its process may still be writing: while a live library session
    other than ours holds the cartridge C's copies name, they wait; on a cartridge one of our own
    batches has in its drive they are settled (the library dropped C's unflushed files before
    that batch could claim the drive)."""
    a = await _lease(catalogue, "node-a")
    dead = await _lease(catalogue, "node-c")
    other = await SimulatedLibrary.open(library.config)
    try:
        ids = await _queued(catalogue, ["f0", "f1", "f2", "f3"])
        await _take(catalogue, ids, ["f0", "f1"], "A00001", dead.id)
        await _take(catalogue, ids, ["f2", "f3"], "A00002", dead.id)
        await _expire(catalogue, dead)
        mine = await library.claim_drive("our batch", vid="A00001")
        theirs = await other.claim_drive("a stale writer", vid="A00002")
        assert mine is not None and theirs is not None
        await library.mount(mine, "A00001")
        await other.mount(theirs, "A00002")
        relay = OutboxRelay(catalogue, RecordingPublisher())
        libraries = {"default": library}

        async def settle() -> tuple[int, int]:
            return await reconcile(
                catalogue, relay, libraries, TARGETS, ["tape1"], a.id, ["tape1"], lambda: {mine}
            )

        # Not knowing the drive is its own batch's, A waits for both cartridges.
        assert await _settle(catalogue, library, a.id, ["tape1"]) == (0, 0)
        assert await settle() == (0, 2)
        states = await catalogue.read(_states)
        assert {n: states[n][0] for n in ids} == {
            "f0": "queued", "f1": "queued", "f2": "archiving", "f3": "archiving"
        }  # fmt: skip
        assert states["f2"][3] == dead.id  # not even taken over: left as they were
        await other.release_drive(theirs)
        assert await settle() == (0, 2)
        assert {st[0] for st in (await catalogue.read(_states)).values()} == {"queued"}
    finally:
        await other.close()
        await a.stop()
        await dead.stop()


async def test_rows_left_before_holders_existed_are_anyones_to_settle(
    catalogue: Catalogue, library: SimulatedLibrary
) -> None:
    a = await _lease(catalogue, "node-a")
    try:
        ids = await _queued(catalogue, ["f0"])
        await _take(catalogue, ids, ["f0"], "A00001", a.id)
        await catalogue.write(lambda c: c.execute(s.replicas.update().values(holder=None)))
        assert await _settle(catalogue, library, a.id, []) == (0, 1)
    finally:
        await a.stop()


async def test_two_instances_taking_one_queue_at_once_never_get_the_same_copy(
    catalogue: Catalogue, second: Catalogue
) -> None:
    """Both read the same queue head and take overlapping windows, in opposite orders, many times
    at once (PostgreSQL, READ COMMITTED: waiting for each other's row locks in two orders was a
    deadlock; the rows one took, found again by their update time, could be the other's)."""
    names = [f"g{i:03d}" for i in range(300)]
    await catalogue.ingest.register([rec(n) for n in names])
    await catalogue.tape.ensure_queued_many([db.Wanted(n, "tape1", 3) for n in names])
    taken: dict[str, list[int]] = {"a": [], "b": []}

    async def instance(cat: Catalogue, who: str, order: int) -> None:
        while True:
            head = [c.replica_id for c in await cat.tape.queue_head("tape1", 40)]
            if not head:
                return
            window = head[::order]
            got = await cat.tape.take_batch(window, "A00001" if who == "a" else "A00002", holder=who)
            taken[who] += [f.replica_id for f in got]
            await asyncio.sleep(random.random() / 100)

    await asyncio.gather(instance(catalogue, "a", 1), instance(second, "b", -1))
    assert not set(taken["a"]) & set(taken["b"])
    assert len(taken["a"]) + len(taken["b"]) == len(names) == len(set(taken["a"]) | set(taken["b"]))
    flight = await catalogue.tape.in_flight(["tape1"])
    assert {x.replica_id: x.holder for x in flight} == {
        **{rid: "a" for rid in taken["a"]}, **{rid: "b" for rid in taken["b"]}
    }  # fmt: skip


async def test_a_take_does_not_wait_for_a_copy_another_instance_is_taking(
    catalogue: Catalogue, second: Catalogue
) -> None:
    names = [f"h{i}" for i in range(6)]
    await catalogue.ingest.register([rec(n) for n in names])
    await catalogue.tape.ensure_queued_many([db.Wanted(n, "tape1", 3) for n in names])
    head = [c.replica_id for c in await catalogue.tape.queue_head("tape1", 10)]
    others = Interlude(lambda: second.tape.take_batch(head, "A00002", holder="b"))

    def a_takes(conn: Connection) -> list[db.BatchFile]:
        others.install(conn, "UPDATE replicas")
        return db.take_batch(conn, head[:4], "A00001", holder="a")

    assert [f.replica_id for f in await catalogue.write(a_takes)] == head[:4]
    got = [f.replica_id for f in await others.result()]
    if catalogue.engine.dialect.name == "postgresql":
        assert others.finished_in_window and got == head[4:]  # the free ones, at once
    else:
        assert got == head[4:]  # after A's commit (one writer at a time)
