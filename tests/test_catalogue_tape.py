"""Tape copies in the catalogue (SQLite and PostgreSQL): queueing, queue statistics, taking a
batch, moving it to another cartridge, recording, requeueing, failing, in-flight copies."""

# Fixtures imported from catalogue_fixtures (not conftest) reappear as test parameters:
# ruff: noqa: F811

from __future__ import annotations

from common.catalogue import Catalogue
from common.catalogue import tape as db
from tests.catalogue_fixtures import catalogue, catalogue_url, rec  # noqa: F401
from tests.tape_fixtures import HOLDER


async def _queue(cat: Catalogue, *names: str, priority: int = 3) -> None:
    for name in names:
        assert await cat.tape.ensure_queued(name, "tape1", priority) == db.TapeCopy("queued", None, None)


async def test_copies_queue_once_and_the_queue_reports_count_bytes_age_priority(catalogue: Catalogue) -> None:
    await catalogue.ingest.register([rec("a", size=100), rec("b", size=250), rec("c", size=50)])
    assert await catalogue.tape.ensure_queued("nosuch", "tape1", 3) is None
    await _queue(catalogue, "a", "b")
    await _queue(catalogue, "c", priority=7)
    await _queue(catalogue, "a")  # again: still one copy
    [stats] = await catalogue.tape.queue_stats(["tape1"])
    assert (stats.storage, stats.files, stats.bytes, stats.priority) == ("tape1", 3, 400, 7)
    assert stats.oldest is not None and stats.oldest.tzinfo is not None
    head = await catalogue.tape.queue_head("tape1", 10)
    assert [c.size for c in head] == [50, 100, 250]  # priority first, then age
    assert await catalogue.tape.queue_stats(["disk2"]) == []


async def test_a_batch_is_taken_once_moved_recorded_and_the_rest_requeued(catalogue: Catalogue) -> None:
    await catalogue.ingest.register([rec(n) for n in "abcd"])
    await _queue(catalogue, *"abcd")
    ids = [c.replica_id for c in await catalogue.tape.queue_head("tape1", 10)]
    batch = await catalogue.tape.take_batch(ids[:3], "A00001", holder=HOLDER)
    assert [f.name for f in batch] == ["a", "b", "c"]
    assert batch[0].sources == (db.Source("disk1", "/srv/disk1/a"),)
    assert await catalogue.tape.take_batch(ids[:3], "A00002", holder=HOLDER) == []  # already taken
    [stats] = await catalogue.tape.queue_stats(["tape1"])
    assert stats.files == 1
    await catalogue.tape.point_to(ids[1:3], "A00002", holder=HOLDER)
    flight = await catalogue.tape.in_flight(["tape1"])
    assert [(x.name, x.cartridge) for x in flight] == [("a", "A00001"), ("b", "A00002"), ("c", "A00002")]
    done = [db.Archived(ids[0], "a", "tape1", "A00001", 1), db.Archived(ids[1], "b", "tape1", "A00002", 1)]
    assert await catalogue.tape.record_archived(done, holder=HOLDER) == done
    assert await catalogue.tape.record_archived(done, holder=HOLDER) == []  # recorded once
    assert await catalogue.tape.requeue([ids[2]], holder=HOLDER) == 1
    view = await catalogue.queries.show_file("b")
    assert view is not None
    [tape] = [r for r in view.replicas if r.storage == "tape1"]
    assert (tape.state, tape.cartridge, tape.fseq) == ("available", "A00002", 1)
    assert [e.type for e in await catalogue.queries.history("b")][-1] == "file.archived"
    assert await catalogue.tape.files_per_cartridge() == {"A00001": 1, "A00002": 1}
    assert await catalogue.tape.ensure_queued("b", "tape1", 3) == db.TapeCopy("available", "A00002", 1)
    [stats] = await catalogue.tape.queue_stats(["tape1"])
    assert stats.files == 2  # c back in the queue, d never left it


async def test_a_failed_copy_is_queued_again_when_asked_again(catalogue: Catalogue) -> None:
    await catalogue.ingest.register([rec("a")])
    await _queue(catalogue, "a")
    [head] = await catalogue.tape.queue_head("tape1", 10)
    await catalogue.tape.take_batch([head.replica_id], "A00001", holder=HOLDER)
    await catalogue.tape.mark_failed(head.replica_id, holder=HOLDER)
    assert await catalogue.tape.in_flight(["tape1"]) == []
    await _queue(catalogue, "a")
    assert len(await catalogue.tape.queue_head("tape1", 10)) == 1


async def test_a_batch_of_requests_is_decided_in_order_as_one_request_each(catalogue: Catalogue) -> None:
    """``ensure_queued_many`` (the handler's group commit) answers each request as
    ``ensure_queued`` would, in order: unknown names None, a name asked twice queued once, with
    the higher priority, a failed copy queued again, a copy on tape reported where it is."""
    await catalogue.ingest.register([rec(n) for n in "abcd"])
    await _queue(catalogue, "c", "d")
    c_id, d_id = [c.replica_id for c in await catalogue.tape.queue_head("tape1", 10)]
    await catalogue.tape.take_batch([c_id], "A00001", holder=HOLDER)
    await catalogue.tape.record_archived([db.Archived(c_id, "c", "tape1", "A00001", 4)], holder=HOLDER)
    await catalogue.tape.take_batch([d_id], "A00001", holder=HOLDER)
    assert await catalogue.tape.mark_failed(d_id, holder=HOLDER)
    W = db.Wanted
    got = await catalogue.tape.ensure_queued_many(
        [W("a", "tape1", 3), W("nosuch", "tape1", 3), W("a", "tape1", 9), W("b", "tape1", 2),
         W("c", "tape1", 3), W("d", "tape1", 5)]
    )  # fmt: skip
    queued = db.TapeCopy("queued", None, None)
    assert got == [queued, None, queued, queued, db.TapeCopy("available", "A00001", 4), queued]
    [stats] = await catalogue.tape.queue_stats(["tape1"])
    assert (stats.files, stats.priority) == (3, 9)  # a, b, d; a at the higher of its two priorities


async def test_the_queue_head_is_read_in_write_order_from_an_index_not_sorted(catalogue: Catalogue) -> None:
    """A writer asks for its next window every 2,000 files: sorting every queued copy each time
    (a night's backlog is hundreds of thousands) cost the tape daemon CPU and SQLite memory."""
    await catalogue.ingest.register([rec("a", size=100)])
    await _queue(catalogue, "a")
    stmt = db.queue_head_statement("tape1", 2000)
    async with catalogue.engine.connect() as conn:
        sql = str(stmt.compile(conn.sync_connection, compile_kwargs={"literal_binds": True}))
        explain = "EXPLAIN QUERY PLAN " if conn.dialect.name == "sqlite" else "EXPLAIN "
        if conn.dialect.name == "postgresql":  # a one-row table sorts cheaper: can the index serve it?
            await conn.exec_driver_sql("SET LOCAL enable_sort = off")
        plan = "\n".join(" ".join(map(str, row)) for row in await conn.exec_driver_sql(explain + sql))
    assert "ix_replicas_queue_order" in plan, plan
    assert "TEMP B-TREE" not in plan and "Sort" not in plan, plan
