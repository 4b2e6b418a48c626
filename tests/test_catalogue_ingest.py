"""Batch registration of ingested files: outcomes, idempotency, atomicity (SQLite and PostgreSQL)."""

# Fixtures imported from catalogue_fixtures (not conftest) reappear as test parameters:
# ruff: noqa: F811

from __future__ import annotations

import asyncio

import pytest

from common.catalogue import Catalogue, IngestRecord, UnknownStorageError
from tests.catalogue_fixtures import ENDPOINTS, catalogue, catalogue_url, rec  # noqa: F401


async def test_registering_a_file_records_file_dataset_replica_request_and_history(
    catalogue: Catalogue,
) -> None:
    r = rec("a.fits", metadata={"run": 12345, "telescope": "LST1"}, parents=["raw/a.bin"], attempt=2)
    [out] = await catalogue.register_ingested([r])

    assert out.outcome == "registered"
    assert out.pfn == "/srv/disk1/a.fits"
    assert out.file is not None and (out.file.size, out.file.adler32) == (1000, "0badcafe")
    view = await catalogue.show_file("a.fits")
    assert view is not None
    assert view.dataset == "lst1.20261123.run012345.dl0"
    assert view.metadata == {"run": 12345, "telescope": "LST1"}
    assert view.parents == ["raw/a.bin"]
    assert [(x.storage, x.state, x.pfn) for x in view.replicas] == [
        ("disk1", "available", "/srv/disk1/a.fits")
    ]
    [ds] = await catalogue.list_datasets()
    assert (ds.name, ds.state, ds.files, ds.bytes) == ("lst1.20261123.run012345.dl0", "open", 1, 1000)
    req = (await catalogue.request_state(["ev-a.fits"]))["ev-a.fits"]
    assert (req.kind, req.state, req.name, req.path, req.attempts) == (
        "ingest", "done", "a.fits", "/landing/a.fits", 2,
    )  # fmt: skip
    [ev] = await catalogue.history("a.fits")
    assert (ev.daemon, ev.type, ev.outcome, ev.storage, ev.attempt) == (
        "ingest", "file.ingested", "ok", "disk1", 2,
    )  # fmt: skip
    assert ev.detail is not None and ev.detail["event_id"] == "ev-a.fits"


async def test_duplicate_event_id_is_reported_as_duplicate(catalogue: Catalogue) -> None:
    await catalogue.register_ingested([rec("a")])
    [again] = await catalogue.register_ingested([rec("a")])

    assert again.outcome == "duplicate_event"
    assert again.file is not None and again.file.name == "a"
    assert again.pfn == "/srv/disk1/a"  # enough to re-announce file.ingested
    assert len(await catalogue.history("a")) == 1  # a redelivery adds no noise


async def test_same_name_and_checksum_under_a_new_event_id_is_a_duplicate_and_records_the_event(
    catalogue: Catalogue,
) -> None:
    await catalogue.register_ingested([rec("a")])
    [dup] = await catalogue.register_ingested([rec("a", event_id="second")])

    assert dup.outcome == "duplicate"
    assert (await catalogue.request_state(["second"]))["second"].state == "done"
    assert [e.outcome for e in await catalogue.history("a")] == ["ok", "duplicate"]
    [again] = await catalogue.register_ingested([rec("a", event_id="second")])
    assert again.outcome == "duplicate_event"


async def test_same_name_other_checksum_is_a_conflict_and_writes_nothing(catalogue: Catalogue) -> None:
    await catalogue.register_ingested([rec("a", metadata={"run": 1})])
    before = await catalogue.counts()
    [conflict] = await catalogue.register_ingested(
        [rec("a", event_id="other", adler32="00000001", metadata={"run": 2}, storage="disk2")]
    )

    assert conflict.outcome == "conflict"
    assert conflict.file is not None and conflict.file.adler32 == "0badcafe"  # what it clashes with
    assert await catalogue.counts() == before
    assert await catalogue.request_state(["other"]) == {}
    view = await catalogue.show_file("a")
    assert view is not None and view.metadata == {"run": 1} and len(view.replicas) == 1


async def test_same_name_other_size_is_a_conflict(catalogue: Catalogue) -> None:
    await catalogue.register_ingested([rec("a")])
    [out] = await catalogue.register_ingested([rec("a", event_id="e2", size=1001)])
    assert out.outcome == "conflict"


async def test_batch_with_same_name_twice_behaves_sequentially(catalogue: Catalogue) -> None:
    outs = await catalogue.register_ingested(
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
    counts = await catalogue.counts()
    assert counts.files == 2 and counts.replicas == {"available": 2}
    assert set(await catalogue.request_state(["e1", "e2", "e3", "e4"])) == {"e1", "e2", "e4"}


async def test_outcomes_come_back_in_record_order(catalogue: Catalogue) -> None:
    names = [f"f{i:03d}" for i in range(50)][::-1]
    outs = await catalogue.register_ingested([rec(n) for n in names])
    assert [o.name for o in outs] == names


async def test_unknown_storage_rolls_back_the_whole_batch(catalogue: Catalogue) -> None:
    with pytest.raises(UnknownStorageError, match="nowhere"):
        await catalogue.register_ingested([rec("a"), rec("b", storage="nowhere")])
    assert (await catalogue.counts()).files == 0
    assert await catalogue.lookup_files(["a", "b"]) == {}


async def test_a_large_batch_is_registered_in_one_call(catalogue: Catalogue) -> None:
    records = [rec(f"big/{i:05d}", metadata={"i": i}, parents=[f"raw/{i}"]) for i in range(1300)]
    outs = await catalogue.register_ingested(records)

    assert {o.outcome for o in outs} == {"registered"}
    found = await catalogue.lookup_files([r.name for r in records] + ["missing"])
    assert len(found) == 1300 and "missing" not in found
    assert len(await catalogue.request_state([r.event_id for r in records])) == 1300
    assert len(await catalogue.find_files(["i>=1000"], limit=5000)) == 300


async def test_lookup_files_returns_only_registered_names(catalogue: Catalogue) -> None:
    await catalogue.register_ingested([rec("a", dataset="ds1", size=5, adler32="1")])
    found = await catalogue.lookup_files(["a", "b", "a"])
    assert list(found) == ["a"]
    assert (found["a"].dataset, found["a"].size, found["a"].adler32) == ("ds1", 5, "00000001")


async def test_success_after_failures_marks_request_done_and_keeps_the_last_reason(
    catalogue: Catalogue,
) -> None:
    await catalogue.record_failure(
        request_id="ev-a", kind="ingest", daemon="ingest", reason="source_unreadable",
        error="EIO", attempts=1, final=False, path="/landing/a",
    )  # fmt: skip
    await catalogue.register_ingested([rec("a", attempt=2)])

    req = (await catalogue.request_state(["ev-a"]))["ev-a"]
    assert (req.state, req.attempts, req.reason, req.name) == ("done", 2, "source_unreadable", "a")
    view = await catalogue.show_file("a")
    assert view is not None and view.last_error is None  # nothing is failing now


async def test_concurrent_writers_register_each_name_exactly_once(catalogue_url: str) -> None:
    """Two processes (here: two engines) ingesting overlapping names at the same time."""
    one, two = await Catalogue.open(catalogue_url), await Catalogue.open(catalogue_url)
    try:
        await one.sync_endpoints(ENDPOINTS)
        names = [f"n{i:03d}" for i in range(200)]
        backwards = names[::-1]  # the other writer walks the names the other way, batches straddling
        batches_one = [[rec(n, event_id=f"1-{n}") for n in names[i : i + 20]] for i in range(0, 200, 20)]
        batches_two = [[rec(n, event_id=f"2-{n}") for n in backwards[i : i + 30]] for i in range(0, 200, 30)]

        async def run(cat: Catalogue, batches: list[list[IngestRecord]]) -> list[str]:
            return [o.outcome for b in batches for o in await cat.register_ingested(b)]

        a, b = await asyncio.gather(run(one, batches_one), run(two, batches_two))
        assert sorted(a + b).count("registered") == 200
        assert set(a + b) <= {"registered", "duplicate"}
        assert (await one.counts()).files == 200
    finally:
        await one.close()
        await two.close()


async def test_empty_batch_is_a_no_op(catalogue: Catalogue) -> None:
    assert await catalogue.register_ingested([]) == []
