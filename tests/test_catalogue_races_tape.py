"""A tape copy asked for again while another writer queues it and takes it into a batch, on SQLite
and PostgreSQL: the batch's copy stays the batch's, and the file is written to tape once.

Before ``ensure_queued`` locked the copy it reads (PostgreSQL, READ COMMITTED), a second
``tape.archive`` handler and the scheduler's ``take_batch`` could run between its read (``failed``)
and its update, which then put the copy back from ``archiving`` to ``queued``: the batch's
``record_archived`` matched nothing and the copy waited in the queue to be written again. SQLite
serialises writers, so there the same test guards the single-writer path.
"""

# Fixtures imported from catalogue_fixtures / race_fixtures reappear as test parameters:
# ruff: noqa: F811

from __future__ import annotations

from sqlalchemy import Connection

from common.catalogue import Catalogue
from common.catalogue import tape as db
from tests.catalogue_fixtures import catalogue, catalogue_url, rec  # noqa: F401
from tests.race_fixtures import Interlude, second  # noqa: F401
from tests.tape_fixtures import HOLDER


async def _failed_copy(cat: Catalogue, name: str) -> int:
    """A tape copy of ``name`` that failed (no usable disk source, say): the next ask re-queues it."""
    await cat.ingest.register([rec(name)])
    await cat.tape.ensure_queued(name, "tape1", 3)
    (head,) = await cat.tape.queue_head("tape1", 10)
    assert await cat.tape.take_batch([head.replica_id], "A00001", holder=HOLDER)
    assert await cat.tape.mark_failed(head.replica_id, holder=HOLDER)
    return head.replica_id


async def test_a_copy_asked_for_again_while_taken_into_a_batch_stays_in_the_batch_and_is_written_once(
    catalogue: Catalogue, second: Catalogue
) -> None:
    rid = await _failed_copy(catalogue, "x")

    async def other_handler_then_scheduler() -> list[db.BatchFile]:
        await second.tape.ensure_queued("x", "tape1", 3)
        return await second.tape.take_batch([rid], "A00002", holder=HOLDER)

    others = Interlude(other_handler_then_scheduler)

    def ask_again(conn: Connection) -> db.TapeCopy | None:
        others.install(conn, "FROM replicas")  # right after it read the copy's state
        return db.ensure_queued(conn, "x", "tape1", 5)

    copy = await catalogue.write(ask_again)
    batch = await others.result()

    assert copy == db.TapeCopy("queued", None, None)  # it was failed when this ask decided
    assert [b.replica_id for b in batch] == [rid]  # and the scheduler took it after that
    written = db.Archived(rid, "x", "tape1", "A00002", 1)
    assert await catalogue.tape.record_archived([written], holder=HOLDER) == [written]
    assert await catalogue.tape.queue_head("tape1", 10) == []  # nothing left to write again
    view = await catalogue.queries.show_file("x")
    assert view is not None
    assert [(x.storage, x.state, x.cartridge, x.fseq) for x in view.replicas if x.storage == "tape1"] == [
        ("tape1", "available", "A00002", 1)
    ]


async def test_an_ask_that_waits_for_a_batch_being_taken_reports_the_copy_being_written(
    catalogue: Catalogue, second: Catalogue
) -> None:
    """The other order: the scheduler's batch is decided while the handler's ask waits; the ask
    then sees ``archiving`` and leaves it (the handler acks, the batch writes it)."""
    rid = await _failed_copy(catalogue, "y")
    await catalogue.tape.ensure_queued("y", "tape1", 3)  # queued again

    others = Interlude(lambda: second.tape.ensure_queued("y", "tape1", 5))

    def take(conn: Connection) -> list[db.BatchFile]:
        others.install(conn, "UPDATE replicas")  # the copy is ours (archiving), not committed
        return db.take_batch(conn, [rid], "A00003", holder=HOLDER)

    assert [b.replica_id for b in await catalogue.write(take)] == [rid]
    assert await others.result() == db.TapeCopy("archiving", "A00003", None)
    written = db.Archived(rid, "y", "tape1", "A00003", 1)
    assert await catalogue.tape.record_archived([written], holder=HOLDER) == [written]
