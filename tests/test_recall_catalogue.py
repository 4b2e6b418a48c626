"""The recall tables on SQLite and PostgreSQL: requests, pending files and their copies, delivery
with pinning, completion decided once, the outbox, recovery after a kill."""

# Fixtures imported from catalogue_fixtures (not conftest) reappear as test parameters:
# ruff: noqa: F811

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import Connection, select

from common.catalogue import Catalogue
from common.catalogue import recall as db
from common.catalogue import schema as s
from common.config import StorageEndpoint
from tests.catalogue_fixtures import ENDPOINTS, catalogue, catalogue_url, rec  # noqa: F401

DATASET = "lst1.20261123.run012345.dl0"
PIN = datetime(2030, 1, 1, tzinfo=UTC)


async def archived(cat: Catalogue, *names: str, vid: str = "A00001", storage: str = "tape1") -> None:
    """Files whose only copies are on tape (fseq in the order given); their ingest copy is gone."""
    await cat.endpoints.sync({**ENDPOINTS, "tape2": StorageEndpoint(kind="tape", root=Path("/t2"))})
    await cat.ingest.register([rec(n) for n in names])
    for fseq, name in enumerate(names, start=1):
        await cat.replication.set_replica(name=name, storage=storage, pfn=f"{vid}/{fseq}", state="available",
                              cartridge=vid, fseq=fseq)  # fmt: skip
        await cat.replication.set_replica(
            name=name, storage="disk1", pfn=f"/srv/disk1/{name}", state="deleted"
        )


def spec(id_: str, *names: str, dataset: str | None = None, destination: str = "disk2") -> db.RecallSpec:
    return db.RecallSpec(id=id_, destination=destination, priority=3, names=names, dataset=dataset,
                         reply_to="amq.gen-reply", correlation_id="corr-1")  # fmt: skip


def delivery(name: str, fid: int, destination: str = "disk2") -> db.Delivery:
    return db.Delivery(fid, name, destination, name, PIN, "A00001/1 (tape1)")


async def test_a_request_is_recorded_once_and_unknown_names_fail_alone(catalogue: Catalogue) -> None:
    await archived(catalogue, "a", "b")
    first = await catalogue.recall.create_recall(spec("r1", "a", "nope", "b", "a"))
    again = await catalogue.recall.create_recall(spec("r1", "a"))

    assert first is not None and again is not None
    assert (first.new, first.files, first.unknown, first.settled) == (True, 3, ("nope",), db.Settled())
    assert (again.new, again.files) == (False, 3)
    view = await catalogue.recall.status("r1")
    assert view is not None
    assert (view.state, view.files, view.failed, view.queued) == ("active", 3, 1, 2)
    assert {(x.name, x.state, x.reason) for x in view.file_states} == {
        ("a", "queued", None), ("b", "queued", None), ("nope", "failed", "unknown_file"),
    }  # fmt: skip


async def test_a_dataset_recall_takes_every_file_and_an_unknown_dataset_is_refused(
    catalogue: Catalogue,
) -> None:
    await archived(catalogue, "a", "b", "c")
    created = await catalogue.recall.create_recall(spec("r1", dataset=DATASET))
    assert created is not None and created.files == 3
    assert await catalogue.recall.create_recall(spec("r2", dataset="lst1.20991231.run000001.dl0")) is None


async def test_a_request_of_nothing_but_unknown_names_completes_at_once(catalogue: Catalogue) -> None:
    created = await catalogue.recall.create_recall(spec("r1", "x", "y"))
    assert created is not None
    (completion,) = created.settled.completed
    assert (completion.state, completion.files, completion.failed) == ("failed", 2, ("x", "y"))
    assert (completion.reply_to, completion.correlation_id) == ("amq.gen-reply", "corr-1")


async def test_pending_files_carry_their_usable_copies(catalogue: Catalogue) -> None:
    await archived(catalogue, "a", "b", "c")
    await catalogue.replication.set_replica(
        name="a", storage="tape2", pfn="B1/4", state="available", cartridge="B1", fseq=4
    )
    await catalogue.replication.set_replica(name="b", storage="disk1", pfn="/srv/disk1/b", state="available")
    await catalogue.replication.set_replica(
        name="c", storage="tape1", pfn="A00001/3", state="bad", cartridge="A00001", fseq=3
    )
    await catalogue.replication.set_replica(name="c", storage="tape2", pfn="", state="queued")
    await catalogue.recall.create_recall(spec("r1", "a", "b", "c"))

    files = {p.name: p for p in await catalogue.recall.pending(100)}
    assert files["a"].tape == (db.TapeCopy("tape1", "A00001", 1), db.TapeCopy("tape2", "B1", 4))
    assert files["b"].disk == (db.DiskCopy("disk1", "/srv/disk1/b"),)
    assert (files["c"].tape, files["c"].blocked, files["c"].damaged) == ((), True, True)
    assert files["a"].chosen is None


async def test_the_next_file_of_a_cartridge_is_the_first_queued_beyond_the_head(catalogue: Catalogue) -> None:
    await archived(catalogue, "a", "b", "c", "d")
    await catalogue.recall.create_recall(spec("r1", "d", "b"))
    await catalogue.recall.create_recall(spec("r2", "c", "b"))
    files = await catalogue.recall.pending(100)
    await catalogue.recall.assign([(p.recall_id, p.name, p.tape[0]) for p in files])

    first = await catalogue.recall.next_on_cartridge(["tape1"], "A00001", 0)
    assert [(i.recall_id, i.name, i.copy.fseq) for i in first] == [("r1", "b", 2), ("r2", "b", 2)]
    after = await catalogue.recall.next_on_cartridge(["tape1"], "A00001", 2)
    assert [(i.name, i.copy.fseq) for i in after] == [("c", 3)]
    assert await catalogue.recall.next_on_cartridge(["tape2"], "A00001", 0) == []
    assert await catalogue.recall.next_on_cartridge(["tape1"], "A00001", 4) == []


def _replica(conn: Connection, name: str, storage: str) -> tuple[str, datetime | None]:
    row = conn.execute(
        select(s.replicas.c.state, s.replicas.c.tombstone)
        .join(s.files, s.files.c.id == s.replicas.c.file_id)
        .join(s.storage_endpoints, s.storage_endpoints.c.id == s.replicas.c.storage_id)
        .where(s.files.c.name == name, s.storage_endpoints.c.name == storage)
    ).one()
    return row.state, row.tombstone


async def test_delivery_pins_the_copy_settles_every_request_and_completes_once(catalogue: Catalogue) -> None:
    await archived(catalogue, "a", "b")
    await catalogue.recall.create_recall(spec("r1", "a", "b"))
    await catalogue.recall.create_recall(spec("r2", "a"))
    await catalogue.recall.create_recall(spec("r3", "a", destination="disk1"))
    ids = {p.name: p.file_id for p in await catalogue.recall.pending(100)}

    first = await catalogue.recall.deliver(delivery("a", ids["a"]))
    assert first is not None
    assert [(x.recall_id, x.name, x.storage) for x in first.recalled] == [
        ("r1", "a", "disk2"),
        ("r2", "a", "disk2"),
    ]
    assert [(c.recall_id, c.state) for c in first.completed] == [("r2", "done")]
    assert await catalogue.read(_replica, "a", "disk2") == ("available", PIN)
    repeat = await catalogue.recall.deliver(delivery("a", ids["a"]))
    assert repeat == db.Settled()  # nothing waits for it any more: nothing to announce twice

    second = await catalogue.recall.deliver(delivery("b", ids["b"]))
    assert second is not None and [c.recall_id for c in second.completed] == ["r1"]
    view = await catalogue.recall.status("r1")
    assert view is not None and (view.state, view.done, view.failed) == ("done", 2, 0)
    assert view.completed is not None
    assert [x.name for x in (await catalogue.queries.history("a")) if x.type == "file.recalled"] == ["a", "a"]


async def test_a_copy_ingest_made_stays_unpinned_and_a_later_pin_only_extends(catalogue: Catalogue) -> None:
    await archived(catalogue, "a", "b")
    await catalogue.replication.set_replica(name="a", storage="disk1", pfn="/srv/disk1/a", state="available")
    await catalogue.recall.create_recall(spec("r1", "a", "b", destination="disk1"))
    await catalogue.recall.create_recall(spec("r2", "b", destination="disk1"))
    ids = {p.name: p.file_id for p in await catalogue.recall.pending(100)}

    await catalogue.recall.deliver(delivery("a", ids["a"], "disk1"))
    assert await catalogue.read(_replica, "a", "disk1") == ("available", None)
    later = db.Delivery(ids["b"], "b", "disk1", "b", PIN + timedelta(days=1), "x")
    await catalogue.recall.deliver(later)
    await catalogue.recall.deliver(db.Delivery(ids["b"], "b", "disk1", "b", PIN, "x"))
    assert (await catalogue.read(_replica, "b", "disk1"))[1] == PIN + timedelta(days=1)


async def test_failures_complete_a_request_as_failed_with_their_names(catalogue: Catalogue) -> None:
    await archived(catalogue, "a", "b")
    await catalogue.recall.create_recall(spec("r1", "a", "b"))
    ids = {p.name: p.file_id for p in await catalogue.recall.pending(100)}
    await catalogue.recall.deliver(delivery("a", ids["a"]))

    settled = await catalogue.recall.fail([("r1", "b")], "checksum_mismatch", "A00001 fseq 2: ...")
    (completion,) = settled.completed
    assert (completion.state, completion.failed) == ("failed", ("b",))
    assert await catalogue.recall.fail([("r1", "b")], "again", "") == db.Settled()


async def test_the_outbox_holds_what_was_not_announced(catalogue: Catalogue) -> None:
    await archived(catalogue, "a")
    await catalogue.recall.create_recall(spec("r1", "a"))
    (p,) = await catalogue.recall.pending(100)
    settled = await catalogue.recall.deliver(delivery("a", p.file_id))
    assert settled is not None

    assert await catalogue.recall.unannounced() == settled  # as if killed before publishing
    await catalogue.recall.mark_announced(settled)
    assert await catalogue.recall.unannounced() == db.Settled()


async def test_staging_rows_go_back_to_the_queue_at_start(catalogue: Catalogue) -> None:
    await archived(catalogue, "a", "b")
    await catalogue.recall.create_recall(spec("r1", "a", "b"))
    await catalogue.recall.set_state([("r1", "a")], "staging")
    assert [p.name for p in await catalogue.recall.pending(100)] == ["b"]

    assert await catalogue.recall.recover() == 1
    assert [p.name for p in await catalogue.recall.pending(100)] == ["a", "b"]


async def test_a_bad_tape_copy_says_whether_another_is_left(catalogue: Catalogue) -> None:
    await archived(catalogue, "a", "b")
    await catalogue.replication.set_replica(
        name="a", storage="tape2", pfn="B1/1", state="available", cartridge="B1", fseq=1
    )
    await catalogue.recall.create_recall(spec("r1", "a", "b"))
    ids = {p.name: p.file_id for p in await catalogue.recall.pending(100)}

    assert await catalogue.recall.tape_copy_bad(ids["a"], "tape1", "tape_checksum_mismatch", "x")
    assert not await catalogue.recall.tape_copy_bad(ids["b"], "tape1", "tape_checksum_mismatch", "x")
    assert await catalogue.read(_replica, "a", "tape1") == ("bad", None)
    assert [e.type for e in await catalogue.queries.history("b")][-1] == "replica.bad"


async def test_a_recalled_copy_whose_pin_ran_out_is_reapable_while_the_tape_copy_stays(
    catalogue: Catalogue,
) -> None:
    await archived(catalogue, "a", "b")
    await catalogue.recall.create_recall(spec("r1", "a", "b"))
    ids = {p.name: p.file_id for p in await catalogue.recall.pending(100)}
    expired = datetime.now(UTC) - timedelta(seconds=1)
    await catalogue.recall.deliver(db.Delivery(ids["a"], "a", "disk2", "a", expired, "x"))
    await catalogue.recall.deliver(delivery("b", ids["b"]))  # pinned until 2030

    assert [(x.name, x.storage) for x in await catalogue.replication.reapable()] == [("a", "disk2")]


async def test_a_large_request_with_mixed_outcomes_is_counted_and_completed_once(
    catalogue: Catalogue,
) -> None:
    """Counters are added to, not recounted: failures and deliveries in any mix, keys repeated or
    already settled, still make the request's counters its files' states, and complete it once."""
    names = [f"m{i:03d}" for i in range(30)]
    await archived(catalogue, *names)
    await catalogue.recall.create_recall(spec("r1", *names, "nowhere"))  # one unknown: failed at once
    await catalogue.recall.create_recall(spec("r2", "m000", "m001"))
    ids = {p.name: p.file_id for p in await catalogue.recall.pending(100)}
    await catalogue.recall.assign(
        [("r1", n, db.TapeCopy("tape1", "A00001", i + 1)) for i, n in enumerate(names)]
    )
    await catalogue.recall.set_state([("r1", n) for n in names[:10]], "staging")

    settled = await catalogue.recall.fail(
        [("r1", n) for n in names[5:15]] + [("r1", "m005"), ("r1", "nowhere")], "no_copy", "gone"
    )
    assert settled == db.Settled()  # 10 failed, the unknown one was failed already
    for n in names[:5] + names[15:29]:
        assert await catalogue.recall.deliver(delivery(n, ids[n])) is not None
    view = await catalogue.recall.status("r1")
    assert view is not None and (view.state, view.done, view.failed, view.queued) == ("active", 19, 11, 1)
    planned = {f.cartridge for f in view.file_states if f.name != "nowhere"}
    assert planned == {"A00001"}  # the plan was recorded for every row

    last = await catalogue.recall.deliver(delivery(names[29], ids[names[29]]))
    assert last is not None
    (completion,) = last.completed
    assert (completion.recall_id, completion.state, completion.files) == ("r1", "failed", 31)
    assert completion.failed == tuple(sorted([*names[5:15], "nowhere"]))
    r2 = await catalogue.recall.status("r2")
    assert r2 is not None and (r2.state, r2.done, r2.failed) == ("done", 2, 0)
    assert await catalogue.recall.fail([("r1", names[29])], "again", "") == db.Settled()


async def test_the_sweep_repairs_a_counter_left_short_that_deliveries_only_add_to(
    catalogue: Catalogue,
) -> None:
    await archived(catalogue, "a", "b")
    await catalogue.recall.create_recall(spec("r1", "a", "b"))
    ids = {p.name: p.file_id for p in await catalogue.recall.pending(100)}
    await catalogue.recall.deliver(delivery("a", ids["a"]))
    await catalogue.write(_counter_short, "r1")  # what issue 14 left: a settlement not counted
    last = await catalogue.recall.deliver(delivery("b", ids["b"]))
    assert last is not None and last.completed == ()
    (repaired,) = await catalogue.recall.complete_settled()
    assert (repaired.recall_id, repaired.state, repaired.files) == ("r1", "done", 2)


def _counter_short(conn: Connection, recall_id: str) -> None:
    conn.execute(s.recalls.update().where(s.recalls.c.id == recall_id).values(done=0))


async def test_the_summary_counts_what_the_file_states_list(catalogue: Catalogue) -> None:
    """``spool recall status`` counts in the catalogue: the same cartridges, states (in the order
    the per-file listing met them), failures and waiting files as the per-file view."""
    names = [f"s{i:02d}" for i in range(12)]
    await archived(catalogue, *names[:6])
    await archived(catalogue, *names[6:], vid="A00002")
    await catalogue.recall.create_recall(spec("r1", *reversed(names), "nowhere"))
    ids = {p.name: p.file_id for p in await catalogue.recall.pending(100)}
    plan = [
        ("r1", n, db.TapeCopy("tape1", "A00001" if i < 6 else "A00002", i % 6 + 1))
        for i, n in enumerate(names)
    ]
    await catalogue.recall.assign(plan[:10])  # s10, s11: no copy chosen yet
    await catalogue.recall.set_state([("r1", "s04"), ("r1", "s07")], "staging")
    for n in ("s01", "s03", "s08"):
        await catalogue.recall.deliver(delivery(n, ids[n]))
    await catalogue.recall.fail([("r1", "s00"), ("r1", "s09")], "no_copy", "gone")

    full = await catalogue.recall.status("r1")
    got = await catalogue.recall.summary("r1", with_waiting=True)
    assert full is not None and got is not None
    per_cartridge: dict[str, dict[str, int]] = {}
    for x in full.file_states:
        counts = per_cartridge.setdefault(x.cartridge or "-", {})
        counts[x.state] = counts.get(x.state, 0) + 1
    assert [(k, list(v.items())) for k, v in sorted(per_cartridge.items())] == [
        (k, list(v.items())) for k, v in got.cartridges.items()
    ]
    assert got.failures == tuple(x for x in full.file_states if x.state == "failed")
    assert got.waiting == tuple(x for x in full.file_states if x.state in ("queued", "staging"))
    assert got.view == replace(full, file_states=())
    assert (await catalogue.recall.summary("r1")).waiting is None  # type: ignore[union-attr]
    assert await catalogue.recall.summary("nope") is None


async def test_a_window_is_recorded_in_one_delivery_and_a_copy_being_deleted_is_refused_alone(
    catalogue: Catalogue,
) -> None:
    """``deliver_many``: several files, several requests and both destinations in one transaction;
    a destination copy the reaper is deleting right now is refused (its file id returned), the
    others recorded; announced in the order given."""
    await archived(catalogue, "a", "b", "c")
    await catalogue.recall.create_recall(spec("r1", "c", "a", "b"))
    await catalogue.recall.create_recall(spec("r2", "b"))
    await catalogue.recall.create_recall(spec("r3", "a", destination="disk1"))
    ids = {p.name: p.file_id for p in await catalogue.recall.pending(100)}
    await catalogue.replication.set_replica(name="c", storage="disk2", pfn="c", state="deleting")

    settled, refused = await catalogue.recall.deliver_many(
        [delivery("b", ids["b"]), delivery("c", ids["c"]), delivery("a", ids["a"]),
         delivery("a", ids["a"], destination="disk1")]
    )  # fmt: skip

    assert refused == (ids["c"],)
    assert [(x.recall_id, x.name, x.storage) for x in settled.recalled] == [
        ("r1", "b", "disk2"), ("r2", "b", "disk2"), ("r1", "a", "disk2"), ("r3", "a", "disk1"),
    ]  # fmt: skip
    assert sorted((c.recall_id, c.state) for c in settled.completed) == [("r2", "done"), ("r3", "done")]
    r1 = await catalogue.recall.status("r1")
    assert r1 is not None and (r1.state, r1.done) == ("active", 2)
    assert {x.name: x.state for x in r1.file_states} == {"a": "done", "b": "done", "c": "queued"}
    assert await catalogue.read(_replica, "a", "disk1") == ("available", PIN)


async def test_the_summary_lists_a_bounded_page_of_files_with_the_totals(catalogue: Catalogue) -> None:
    names = [f"p{i:02d}" for i in range(10)]
    await archived(catalogue, *names)
    await catalogue.recall.create_recall(spec("r1", *names, "gone1", "gone2", "gone3"))

    got = await catalogue.recall.summary("r1", with_waiting=True, limit=4)

    assert got is not None and got.waiting is not None
    assert [x.name for x in got.waiting] == names[:4] and got.waiting_total == 10
    assert [x.name for x in got.failures] == ["gone1", "gone2", "gone3"]
    small = await catalogue.recall.summary("r1", limit=2)
    assert small is not None and [x.name for x in small.failures] == ["gone1", "gone2"]
    assert small.view.failed == 3
