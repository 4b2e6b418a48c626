"""Issue 16, class 11: ``file.archived`` keeps its file's correlation id, also when the tape writer
records copies it did not see asked for (a restart in between, reconciliation from a cartridge).
SQLite and PostgreSQL."""

# Fixtures imported from catalogue_fixtures (not conftest) reappear as test parameters:
# ruff: noqa: F811

from __future__ import annotations

from common.catalogue import Catalogue
from common.catalogue import tape as db
from tests.catalogue_fixtures import catalogue, catalogue_url, rec  # noqa: F401
from tests.tape_fixtures import HOLDER


async def test_archived_events_carry_the_writers_id_else_the_files_ingest_event_id(
    catalogue: Catalogue,
) -> None:
    await catalogue.ingest.register([rec("a"), rec("b")])
    for name in ("a", "b"):
        await catalogue.tape.ensure_queued(name, "tape1", 3)
    ids = [c.replica_id for c in await catalogue.tape.queue_head("tape1", 10)]
    await catalogue.tape.take_batch(ids, "A00001", holder=HOLDER)
    done = [
        db.Archived(ids[0], "a", "tape1", "A00001", 1, "from-the-request"),
        db.Archived(ids[1], "b", "tape1", "A00001", 2),  # forgotten: a restart since tape.archive
    ]
    assert await catalogue.tape.record_archived(done, holder=HOLDER) == done
    rows = await catalogue.outbox.unsent(10)
    by_key = {row.routing_key: [] for row in rows}
    for row in rows:
        by_key[row.routing_key].append(row.correlation_id)
    assert sorted(by_key["file.archived"]) == ["ev-b", "from-the-request"]
    for name, expected in (("a", "from-the-request"), ("b", "ev-b")):
        [archived] = [e for e in await catalogue.queries.history(name) if e.type == "file.archived"]
        assert (archived.detail or {})["correlation_id"] == expected


def test_the_writers_memory_of_correlation_ids_is_bounded() -> None:
    ids = db.Correlations(limit=3)
    for i in range(5):
        ids.remember(f"f{i}", "tape1", f"c{i}")
    ids.remember("none", "tape1", None)
    assert [ids.take(f"f{i}", "tape1") for i in range(5)] == [None, None, "c2", "c3", "c4"]
    assert ids.take("f4", "tape1") is None  # taken once
