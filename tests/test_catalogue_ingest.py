"""Batch registration of ingested files: outcomes, idempotency, atomicity (SQLite and PostgreSQL)."""

# Fixtures imported from catalogue_fixtures (not conftest) reappear as test parameters:
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import Connection, select

from common.catalogue import Catalogue, IngestRecord, MetaFilter, UnknownStorageError
from common.catalogue import schema as s
from common.catalogue.filters import typed_value
from common.catalogue.sql import upsert_sync
from common.messages import MetaValue
from tests.catalogue_fixtures import ENDPOINTS, catalogue, catalogue_url, raw_rows, rec, statements  # noqa: F401


async def test_registering_a_file_records_file_dataset_replica_request_and_history(
    catalogue: Catalogue,
) -> None:
    r = rec("a.fits", metadata={"run": 12345, "telescope": "LST1"}, parents=["raw/a.bin"], attempt=2)
    [out] = await catalogue.ingest.register([r])

    assert out.outcome == "registered"
    assert out.pfn == "/srv/disk1/a.fits"
    assert out.file is not None and (out.file.size, out.file.adler32) == (1000, "0badcafe")
    view = await catalogue.queries.show_file("a.fits")
    assert view is not None
    assert view.dataset == "lst1.20261123.run012345.dl0"
    assert view.metadata == {"run": 12345, "telescope": "LST1"}
    assert view.parents == ["raw/a.bin"]
    assert [(x.storage, x.state, x.pfn) for x in view.replicas] == [
        ("disk1", "available", "/srv/disk1/a.fits")
    ]
    [ds] = await catalogue.queries.list_datasets()
    assert (ds.name, ds.state, ds.files, ds.bytes) == ("lst1.20261123.run012345.dl0", "open", 1, 1000)
    req = (await catalogue.queries.request_state(["ev-a.fits"]))["ev-a.fits"]
    assert (req.kind, req.state, req.name, req.path, req.attempts) == (
        "ingest", "done", "a.fits", "/landing/a.fits", 2,
    )  # fmt: skip
    [ev] = await catalogue.queries.history("a.fits")
    assert (ev.daemon, ev.type, ev.outcome, ev.storage, ev.attempt) == (
        "ingest", "file.ingested", "ok", "disk1", 2,
    )  # fmt: skip
    assert ev.detail is not None and ev.detail["event_id"] == "ev-a.fits"


async def test_duplicate_event_id_is_reported_as_duplicate(catalogue: Catalogue) -> None:
    await catalogue.ingest.register([rec("a")])
    [again] = await catalogue.ingest.register([rec("a")])

    assert again.outcome == "duplicate_event"
    assert again.file is not None and again.file.name == "a"
    assert again.pfn == "/srv/disk1/a"  # enough to re-announce file.ingested
    assert len(await catalogue.queries.history("a")) == 1  # a redelivery adds no noise


async def test_same_name_and_checksum_under_a_new_event_id_is_a_duplicate_and_records_the_event(
    catalogue: Catalogue,
) -> None:
    await catalogue.ingest.register([rec("a")])
    [dup] = await catalogue.ingest.register([rec("a", event_id="second")])

    assert dup.outcome == "duplicate"
    assert (await catalogue.queries.request_state(["second"]))["second"].state == "done"
    assert [e.outcome for e in await catalogue.queries.history("a")] == ["ok", "duplicate"]
    [again] = await catalogue.ingest.register([rec("a", event_id="second")])
    assert again.outcome == "duplicate_event"


async def test_same_name_other_checksum_is_a_conflict_and_writes_nothing(catalogue: Catalogue) -> None:
    await catalogue.ingest.register([rec("a", metadata={"run": 1})])
    before = await catalogue.queries.counts()
    [conflict] = await catalogue.ingest.register(
        [rec("a", event_id="other", adler32="00000001", metadata={"run": 2}, storage="disk2")]
    )

    assert conflict.outcome == "conflict"
    assert conflict.file is not None and conflict.file.adler32 == "0badcafe"  # what it clashes with
    assert await catalogue.queries.counts() == before
    assert await catalogue.queries.request_state(["other"]) == {}
    view = await catalogue.queries.show_file("a")
    assert view is not None and view.metadata == {"run": 1} and len(view.replicas) == 1


async def test_same_name_other_size_is_a_conflict(catalogue: Catalogue) -> None:
    await catalogue.ingest.register([rec("a")])
    [out] = await catalogue.ingest.register([rec("a", event_id="e2", size=1001)])
    assert out.outcome == "conflict"


async def test_batch_with_same_name_twice_behaves_sequentially(catalogue: Catalogue) -> None:
    outs = await catalogue.ingest.register(
        [
            rec("a", event_id="e1"),
            rec("a", event_id="e2"),  # same content: duplicate of e1
            rec("a", event_id="e3", adler32="00000001"),  # conflicts with e1
            rec("a", event_id="e1"),  # e1 again: already done
            rec("b", event_id="e4"),
        ]
    )

    assert [o.outcome for o in outs] == [
        "registered",
        "duplicate",
        "conflict",
        "duplicate_event",
        "registered",
    ]
    assert all(o.file is not None and o.file.adler32 == "0badcafe" for o in outs[:4])
    counts = await catalogue.queries.counts()
    assert counts.files == 2 and counts.replicas == {"available": 2}
    assert set(await catalogue.queries.request_state(["e1", "e2", "e3", "e4"])) == {"e1", "e2", "e4"}


async def test_outcomes_come_back_in_record_order(catalogue: Catalogue) -> None:
    names = [f"f{i:03d}" for i in range(50)][::-1]
    outs = await catalogue.ingest.register([rec(n) for n in names])
    assert [o.name for o in outs] == names


async def test_unknown_storage_rolls_back_the_whole_batch(catalogue: Catalogue) -> None:
    with pytest.raises(UnknownStorageError, match="nowhere"):
        await catalogue.ingest.register([rec("a"), rec("b", storage="nowhere")])
    assert (await catalogue.queries.counts()).files == 0
    assert await catalogue.ingest.lookup_files(["a", "b"]) == {}


async def test_a_large_batch_is_registered_in_one_call(catalogue: Catalogue) -> None:
    records = [rec(f"big/{i:05d}", metadata={"i": i}, parents=[f"raw/{i}"]) for i in range(1300)]
    outs = await catalogue.ingest.register(records)

    assert {o.outcome for o in outs} == {"registered"}
    found = await catalogue.ingest.lookup_files([r.name for r in records] + ["missing"])
    assert len(found) == 1300 and "missing" not in found
    assert len(await catalogue.queries.request_state([r.event_id for r in records])) == 1300
    assert len(await catalogue.queries.find_files(["i>=1000"], limit=5000)) == 300


async def test_lookup_files_returns_only_registered_names(catalogue: Catalogue) -> None:
    await catalogue.ingest.register([rec("a", dataset="ds1", size=5, adler32="1")])
    found = await catalogue.ingest.lookup_files(["a", "b", "a"])
    assert list(found) == ["a"]
    assert (found["a"].dataset, found["a"].size, found["a"].adler32) == ("ds1", 5, "00000001")


async def test_success_after_failures_marks_request_done_and_keeps_the_last_reason(
    catalogue: Catalogue,
) -> None:
    await catalogue.history.record_failure(
        request_id="ev-a", kind="ingest", daemon="ingest", reason="source_unreadable",
        error="EIO", attempts=1, final=False, path="/landing/a",
    )  # fmt: skip
    await catalogue.ingest.register([rec("a", attempt=2)])

    req = (await catalogue.queries.request_state(["ev-a"]))["ev-a"]
    assert (req.state, req.attempts, req.reason, req.name) == ("done", 2, "source_unreadable", "a")
    view = await catalogue.queries.show_file("a")
    assert view is not None and view.last_error is None  # nothing is failing now


async def test_concurrent_writers_register_each_name_exactly_once(catalogue_url: str) -> None:
    """Two processes (here: two engines) ingesting overlapping names at the same time."""
    one, two = await Catalogue.open(catalogue_url), await Catalogue.open(catalogue_url)
    try:
        await one.endpoints.sync(ENDPOINTS)
        names = [f"n{i:03d}" for i in range(200)]
        backwards = names[::-1]  # the other writer walks the names the other way, batches straddling
        batches_one = [[rec(n, event_id=f"1-{n}") for n in names[i : i + 20]] for i in range(0, 200, 20)]
        batches_two = [[rec(n, event_id=f"2-{n}") for n in backwards[i : i + 30]] for i in range(0, 200, 30)]

        async def run(cat: Catalogue, batches: list[list[IngestRecord]]) -> list[str]:
            return [o.outcome for b in batches for o in await cat.ingest.register(b)]

        a, b = await asyncio.gather(run(one, batches_one), run(two, batches_two))
        assert sorted(a + b).count("registered") == 200
        assert set(a + b) <= {"registered", "duplicate"}
        assert (await one.queries.counts()).files == 200
    finally:
        await one.close()
        await two.close()


async def test_empty_batch_is_a_no_op(catalogue: Catalogue) -> None:
    assert await catalogue.ingest.register([]) == []


# --- The driver-level path: rows as the SQLAlchemy Core statements wrote them -------------------
#
# ``ingest.register`` sends SQL text and pre-converted values to the driver. These tests hold it
# to the Core statements it replaced, on both backends: the same raw values (types included), read
# back identically through the ordinary queries, and no column left to a default.

AWKWARD_METADATA: dict[str, MetaValue] = {
    "run": 12345,
    "big": 2**62 + 1,  # beyond 32 bits, and beyond the integers a double holds exactly
    "negative": -(2**63),
    "ratio": 0.1,
    "tiny": 5e-324,
    "flag": True,
    "off": False,
    "label": 'ünïcödé € 😀 "quoted" \\ back\nslash',
    "zero_padded": "012",  # reads as a number: value_num and value_str
    "exp": "1e3",
    "nothing": None,
}
_RAW_QUERIES = {
    "files": "SELECT dataset_id, size, adler32, meta, created FROM files WHERE id = :id",
    "file_metadata": "SELECT key, value_num, value_int, value_str FROM file_metadata WHERE file_id = :id",
    "provenance": "SELECT parent_name FROM provenance WHERE child_id = :id",
    "replicas": "SELECT storage_id, pfn, state, cartridge, fseq, created, updated, tombstone, priority"
    " FROM replicas WHERE file_id = :id",
    "requests": "SELECT kind, path, dataset, state, attempts, reason, error, created, updated"
    " FROM requests WHERE name = :name",
    "events": "SELECT time, daemon, type, outcome, attempt, storage, detail FROM events WHERE name = :name",
}


def _awkward(name: str) -> IngestRecord:
    """A record whose stored rows differ from another's only by ``name`` (in the event id too)."""
    return rec(name, metadata=AWKWARD_METADATA, parents=["p/one", "p/two"], source=None, attempt=3,
               pfn="/srv/disk1/same", path="/landing/same")  # fmt: skip


def _core_insert(conn: Connection, r: IngestRecord, now: datetime) -> None:
    """What ``ingest.register`` sent through SQLAlchemy Core before it went to the driver."""
    ds = conn.execute(select(s.datasets.c.id).where(s.datasets.c.name == r.dataset)).scalar_one()
    ep = s.storage_endpoints
    sid = conn.execute(select(ep.c.id).where(ep.c.name == r.storage)).scalar_one()
    file = {"name": r.name, "dataset_id": ds, "size": r.size, "adler32": r.adler32, "meta": r.metadata}
    fid = conn.execute(s.files.insert().returning(s.files.c.id), [file | {"created": now}]).scalar_one()
    typed = [
        dict(zip(("value_num", "value_int", "value_str"), typed_value(v), strict=True))
        for v in r.metadata.values()
    ]
    conn.execute(
        s.file_metadata.insert(),
        [{"file_id": fid, "key": k} | m for k, m in zip(r.metadata, typed, strict=True)],
    )
    conn.execute(s.provenance.insert(), [{"child_id": fid, "parent_name": p} for p in r.parents])
    replica = {"file_id": fid, "storage_id": sid, "pfn": r.pfn, "state": "available", "cartridge": None}
    conn.execute(s.replicas.insert(), [replica | {"fseq": None, "created": now, "updated": now}])
    request: dict[str, Any] = {"id": r.event_id, "kind": "ingest", "name": r.name, "path": r.path}
    request |= {"dataset": r.dataset, "state": "done", "attempts": r.attempt, "reason": None, "error": None}
    request |= {"created": now, "updated": now}
    upsert_sync(
        conn, s.requests, [request], ["id"], ["state", "attempts", "name", "path", "dataset", "updated"]
    )
    detail = {"event_id": r.event_id, "path": r.path, "source": r.source, "pfn": r.pfn}
    event = {"name": r.name, "time": now, "daemon": "ingest", "type": "file.ingested", "outcome": "ok"}
    conn.execute(s.events.insert(), [event | {"attempt": r.attempt, "storage": r.storage, "detail": detail}])


async def test_driver_level_rows_equal_the_rows_core_statements_wrote(catalogue: Catalogue) -> None:
    [out] = await catalogue.ingest.register([_awkward("file-by-driver")])
    assert out.file is not None
    now = out.file.created

    def compare(conn: Connection) -> None:
        _core_insert(conn, _awkward("file-by-core"), now)
        by_driver = raw_rows(conn, "file-by-driver", _RAW_QUERIES)
        by_core = raw_rows(conn, "file-by-core", _RAW_QUERIES)
        for table, rows in by_core.items():
            assert rows, table
            assert by_driver[table] == rows, table

    await catalogue.write(compare)


async def test_driver_level_rows_read_back_through_the_ordinary_queries(catalogue: Catalogue) -> None:
    [out] = await catalogue.ingest.register([_awkward("a")])
    assert out.file is not None
    now = out.file.created
    assert now.tzinfo is UTC or now.utcoffset() == UTC.utcoffset(None)

    view = await catalogue.queries.show_file("a")
    assert view is not None
    assert view.metadata == AWKWARD_METADATA
    assert {k: type(v) for k, v in view.metadata.items()} == {k: type(v) for k, v in AWKWARD_METADATA.items()}
    assert view.created == now and view.created.utcoffset() is not None
    assert view.parents == ["p/one", "p/two"]
    [replica] = view.replicas
    assert (replica.state, replica.pfn, replica.cartridge, replica.fseq) == (
        "available",
        "/srv/disk1/same",
        None,
        None,
    )
    assert replica.created == replica.updated == now
    assert (await catalogue.ingest.lookup_files(["a"]))["a"] == out.file
    assert await catalogue.ingest.known(["ev-a", "ev-b"], ["a", "b"]) == ({"ev-a"}, {"a": out.file})

    label = MetaFilter("label", "=", (str(AWKWARD_METADATA["label"]),))
    for query in ("big=4611686018427387905", "negative<=-9223372036854775808", "ratio=0.1", "tiny>0",
                  "flag=true", "off=false", label, "zero_padded=12", 'zero_padded="012"', "exp=1000",
                  "run=12345"):  # fmt: skip
        assert [f.name for f in await catalogue.queries.find_files([query])] == ["a"], query
    assert await catalogue.queries.find_files(["big=4611686018427387904"]) == []

    [ev] = await catalogue.queries.history("a")
    assert ev.time == now and ev.time.utcoffset() is not None
    assert ev.detail == {
        "event_id": "ev-a",
        "path": "/landing/same",
        "source": None,
        "pfn": "/srv/disk1/same",
    }
    req = (await catalogue.queries.request_state(["ev-a"]))["ev-a"]
    assert (req.kind, req.state, req.attempts, req.reason, req.error) == ("ingest", "done", 3, None, None)
    assert req.created == req.updated == now


async def test_every_insert_of_a_batch_names_every_column_but_the_generated_id(
    catalogue: Catalogue, statements: list[tuple[str, Any]]
) -> None:
    """No column is left to a default: SQLAlchemy's Python-side defaults do not apply to SQL text."""
    await catalogue.ingest.register([rec("a", metadata={"run": 1}, parents=["p"], dataset="new-ds")])

    written: dict[str, set[str]] = {}
    for sql, _ in statements:
        if match := re.match(r'INSERT INTO "?(\w+)"? \(([^)]*)\)', sql):
            written[match[1]] = {c.strip().strip('"') for c in match[2].split(",")}
    tables = ("files", "file_metadata", "provenance", "replicas", "requests", "events")
    assert written.keys() >= set(tables)
    for name in tables:
        table = s.metadata.tables[name]
        generated = {c.name for c in table.primary_key.columns if c.autoincrement is True}
        assert written[name] == {c.name for c in table.columns} - generated, name


async def test_every_lookup_of_a_batch_probes_a_unique_key_on_sqlite(
    catalogue: Catalogue, statements: list[tuple[str, Any]]
) -> None:
    """Without statistics SQLite may prefer a non-unique index to a long ``IN`` list on a unique
    key: ``state = 'done' AND id IN (256 ids)`` walked every done request, at every batch."""
    if catalogue.backend != "sqlite":
        pytest.skip("SQLite's query planner")
    await catalogue.ingest.register([rec(f"f{i:03d}") for i in range(256)])
    statements.clear()
    # Half duplicates, half new files in a new dataset: every lookup of ``register`` runs.
    outs = await catalogue.ingest.register(
        [rec(f"f{i:03d}", event_id=f"again-{i}", dataset="ds2") for i in range(128, 384)]
    )
    assert {o.outcome for o in outs} == {"registered", "duplicate"}
    selects = [(sql, params) for sql, params in statements if sql.startswith("SELECT")]
    assert len(selects) >= 5

    def plans(conn: Connection) -> list[list[str]]:
        explain = [conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", params) for sql, params in selects]
        return [[row[-1] for row in rows] for rows in explain]

    unique = r"SEARCH \w+ USING (INTEGER PRIMARY KEY|(COVERING )?INDEX sqlite_autoindex_\w+) \(.*\)"
    for (sql, _), plan in zip(selects, await catalogue.read(plans), strict=True):
        assert all(re.fullmatch(unique, step) for step in plan), (sql[:80], plan)


async def test_the_batch_connection_has_a_large_page_cache_only_when_asked(tmp_path: Any) -> None:
    """Ingest's registrations need 64 MB of SQLite pages; every other daemon's batch connection has
    the readers' 16 MB (the tape daemon's filled 64 MB draining a night)."""
    from common.catalogue.engine import READER_CACHE_KIB, WRITER_CACHE_KIB

    def cache_kib(conn: Connection) -> int:
        return -int(conn.exec_driver_sql("PRAGMA cache_size").scalar_one())

    url = f"sqlite+aiosqlite:///{tmp_path / 'c.db'}"
    for asked, want in [(None, READER_CACHE_KIB), (WRITER_CACHE_KIB, WRITER_CACHE_KIB)]:
        kwargs = {} if asked is None else {"batch_cache_kib": asked}
        async with await Catalogue.open(url, **kwargs) as cat:
            assert await cat.write(cache_kib) == want
