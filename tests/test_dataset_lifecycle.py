"""A dataset's lifecycle in the catalogue (SQLite and PostgreSQL): open -> closed -> complete ->
archived, the refusal of new files once closed (the registration's own check too), auto-close,
one dataset.completed however many replicators look, and deletion down to tombstones."""

# Fixtures imported from catalogue_fixtures (not conftest) reappear as test parameters:
# ruff: noqa: F811

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select, update

from common import codec
from common.catalogue import Catalogue, CopyRecord
from common.catalogue import schema as s
from common.catalogue.datasets import doomed_copies
from common.catalogue.policy import Rule, endpoint_attributes
from tests.catalogue_fixtures import ENDPOINTS, catalogue, catalogue_url, rec  # noqa: F401

DS = "lst1.20261123.run012345.dl0"
TABLE = {n: e for n, e in ((n, endpoint_attributes(n, e.kind, e.attributes)) for n, e in ENDPOINTS.items())}
TO_PIC = Rule("to-pic", endpoints="site=PIC", datasets=".*")
TO_TAPE = Rule("to-tape", endpoints="kind=tape", datasets=".*")
WEEK = Rule("for-a-week", endpoints="site=PIC", datasets=".*", lifetime=7 * 86400.0)


def now() -> datetime:
    return datetime.now(UTC)


def later() -> datetime:
    """A settle time that has passed for anything closed until now."""
    return now() + timedelta(seconds=1)


async def state(cat: Catalogue, name: str = DS) -> str | None:
    return (await cat.datasets.states([name])).get(name)


async def with_rules(cat: Catalogue, names: list[str], *rules: Rule) -> None:
    for rule in rules:
        await cat.replication.add_rule(rule)
        await cat.replication.activate_rule(rule.id)
    await cat.replication.plan_copies([(n, DS, {}) for n in names], list(rules), TABLE)


async def copied(cat: Catalogue, name: str, storage: str) -> None:
    await cat.replication.record_copies(
        [CopyRecord(f"req-{name}-{storage}", name, storage, name, 1, "disk1")]
    )


async def archived_on_tape(cat: Catalogue, name: str) -> None:
    def go(conn: Any) -> None:
        fid = conn.scalar(select(s.files.c.id).where(s.files.c.name == name))
        conn.execute(
            update(s.replicas)
            .where(s.replicas.c.file_id == fid, s.replicas.c.storage_id.in_(_tape_ids()))
            .values(state="available", cartridge="VOL001", fseq=1)
        )

    await cat.write(go)


def _tape_ids() -> Any:
    return select(s.storage_endpoints.c.id).where(s.storage_endpoints.c.kind == "tape").scalar_subquery()


async def outbox_events(cat: Catalogue) -> list[tuple[str, dict[str, Any]]]:
    def go(conn: Any) -> list[tuple[str, bytes]]:
        return [
            tuple(r)
            for r in conn.execute(select(s.outbox.c.routing_key, s.outbox.c.body).order_by(s.outbox.c.seq))
        ]

    rows = await cat.read(go)
    return [(key, codec.decode(body, "application/msgpack", key).model_dump()) for key, body in rows]


# --- closing ------------------------------------------------------------------------------------
async def test_close_moves_an_open_dataset_once_and_knows_unknown_ones(catalogue: Catalogue) -> None:
    await catalogue.ingest.register([rec("a")])
    assert await state(catalogue) == "open"
    assert await catalogue.datasets.close(DS, "cli:alice", now()) == "closed"
    assert await catalogue.datasets.close(DS, "event:daq", now()) == "already"
    assert await catalogue.datasets.close("lst1.20261123.run099999.dl0", "cli:alice", now()) == "unknown"
    view = await catalogue.datasets.show(DS, now())
    assert view is not None and (view.state, view.closed_by) == ("closed", "cli:alice")
    assert view.closed_at is not None


async def test_a_new_file_into_a_closed_dataset_is_refused_by_the_registration_itself(
    catalogue: Catalogue,
) -> None:
    """The race: the close lands after ingest looked (it saw the dataset open): the registration
    transaction reads the state again and refuses the file; a duplicate of a file registered
    before the close is still a duplicate (at-least-once delivery)."""
    await catalogue.ingest.register([rec("before")])
    await catalogue.datasets.close(DS, "cli:alice", now())
    outcomes = await catalogue.ingest.register([rec("after"), rec("before", event_id="again")])
    assert [o.outcome for o in outcomes] == ["dataset_closed", "duplicate"]
    assert await catalogue.ingest.lookup_files(["after"]) == {}
    # Another, open dataset in the same batch is not affected.
    other = "lst1.20261123.run012345.dl1"
    [ok] = await catalogue.ingest.register([rec("elsewhere", dataset=other)])
    assert ok.outcome == "registered"


async def test_auto_close_closes_only_datasets_idle_long_enough(catalogue: Catalogue) -> None:
    other = "lst1.20261123.run012346.dl0"
    await catalogue.ingest.register([rec("a"), rec("b", dataset=other)])
    assert await catalogue.datasets.auto_close(now() - timedelta(hours=1), now()) == []

    def age(conn: Any) -> None:  # DS's last file an hour and a half ago
        stmt = update(s.datasets).where(s.datasets.c.name == DS)
        conn.execute(stmt.values(last_file=now() - timedelta(minutes=90)))

    await catalogue.write(age)
    assert await catalogue.datasets.auto_close(now() - timedelta(hours=1), now()) == [DS]
    assert (await state(catalogue), await state(catalogue, other)) == ("closed", "open")
    view = await catalogue.datasets.show(DS, now())
    assert view is not None and view.closed_by == "auto-close"
    # A new file keeps a dataset open: its last_file moves.
    await catalogue.ingest.register([rec("c", dataset=other)])
    assert await catalogue.datasets.auto_close(now() - timedelta(seconds=30), now()) == []


async def test_auto_close_and_registration_at_once_never_leave_a_file_in_a_closed_dataset(
    catalogue_url: str,
) -> None:
    """Two catalogues (two daemons): a registration and an auto-close race; whichever order the
    database puts them in, a file registered means it came before the close."""
    a, b = await Catalogue.open(catalogue_url), await Catalogue.open(catalogue_url)
    try:
        await a.endpoints.sync(ENDPOINTS)
        await a.ingest.register([rec("first")])
        for i in range(10):
            registering = a.ingest.register([rec(f"f{i}")])
            closing = b.datasets.auto_close(now() + timedelta(hours=1), now())  # everything is idle
            [outcome], closed = await asyncio.gather(registering, closing)
            if closed:  # closed before or after the registration: never a registration after it
                assert outcome.outcome in ("registered", "dataset_closed")
                reopened = update(s.datasets).where(s.datasets.c.name == DS).values(state="open")
                await a.write(lambda conn, stmt=reopened: conn.execute(stmt))
            if outcome.outcome == "registered":
                files = await a.queries.list_files(dataset=DS, limit=100)
                assert f"f{i}" in [f.name for f in files]
    finally:
        await a.close()
        await b.close()


# --- complete / archived --------------------------------------------------------------------------
async def test_closed_dataset_completes_when_its_wanted_disk_copies_are_there(catalogue: Catalogue) -> None:
    await catalogue.ingest.register([rec("a"), rec("b")])
    await with_rules(catalogue, ["a", "b"], TO_PIC)
    assert await catalogue.datasets.advance(later(), now()) == []  # still open
    await catalogue.datasets.close(DS, "cli:alice", now())
    assert await catalogue.datasets.advance(now() - timedelta(minutes=1), now()) == []  # not settled
    assert await catalogue.datasets.advance(later(), now()) == []  # copies missing
    await copied(catalogue, "a", "disk2")
    assert await catalogue.datasets.advance(later(), now()) == []
    await copied(catalogue, "b", "disk2")
    [event] = await catalogue.datasets.advance(later(), now())
    assert (event.ROUTING_KEY, event.dataset, event.files, event.bytes) == ("dataset.completed", DS, 2, 2000)
    assert await state(catalogue) == "complete"  # its rules want no tape copy: it stays complete
    assert await catalogue.datasets.advance(later(), now()) == []
    [(key, body)] = await outbox_events(catalogue)
    assert key == "dataset.completed" and body["dataset"] == DS


async def test_tape_copies_make_a_complete_dataset_archived(catalogue: Catalogue) -> None:
    await catalogue.ingest.register([rec("a")])
    await with_rules(catalogue, ["a"], TO_TAPE)
    await catalogue.datasets.close(DS, "cli:alice", now())
    [completed] = await catalogue.datasets.advance(later(), now())
    assert completed.ROUTING_KEY == "dataset.completed" and await state(catalogue) == "complete"
    await archived_on_tape(catalogue, "a")
    [archived] = await catalogue.datasets.advance(later(), now())
    assert archived.ROUTING_KEY == "dataset.archived" and await state(catalogue) == "archived"
    view = await catalogue.datasets.show(DS, now())
    assert view is not None and view.completed_at is not None and view.archived_at is not None


async def test_a_rule_not_yet_walked_holds_completion_back(catalogue: Catalogue) -> None:
    await catalogue.ingest.register([rec("a")])
    await catalogue.replication.add_rule(TO_PIC)  # state new: may still lock copies of "a"
    await catalogue.datasets.close(DS, "cli:alice", now())
    assert await catalogue.datasets.advance(later(), now()) == []
    await catalogue.replication.activate_rule(TO_PIC.id)
    assert [e.ROUTING_KEY for e in await catalogue.datasets.advance(later(), now())] == ["dataset.completed"]


async def test_two_replicators_judging_at_once_send_one_completed_event(catalogue_url: str) -> None:
    cats = [await Catalogue.open(catalogue_url) for _ in range(2)]
    try:
        await cats[0].endpoints.sync(ENDPOINTS)
        await cats[0].ingest.register([rec(f"f{i}") for i in range(50)])
        await cats[0].datasets.close(DS, "cli:alice", now())
        results = await asyncio.gather(*(c.datasets.advance(later(), now()) for c in cats))
        assert sorted(len(r) for r in results) == [0, 1]
        assert [k for k, _ in await outbox_events(cats[0])] == ["dataset.completed"]
    finally:
        for c in cats:
            await c.close()


# --- deleting -------------------------------------------------------------------------------------
async def test_delete_is_refused_while_a_rule_without_lifetime_holds_the_dataset(
    catalogue: Catalogue,
) -> None:
    await catalogue.ingest.register([rec("a")])
    await with_rules(catalogue, ["a"], TO_PIC, TO_TAPE)
    held = await catalogue.datasets.request_delete(DS, "cli:alice", False, now())
    assert (held.outcome, held.holders) == ("held", ["to-pic", "to-tape"])
    assert await state(catalogue) == "open"
    unknown = await catalogue.datasets.request_delete("lst1.20261123.run099999.dl0", "cli:a", True, now())
    assert unknown.outcome == "unknown"


async def test_a_rule_with_a_lifetime_does_not_hold_a_dataset(catalogue: Catalogue) -> None:
    await catalogue.ingest.register([rec("a")])
    await with_rules(catalogue, ["a"], WEEK)
    result = await catalogue.datasets.request_delete(DS, "cli:alice", False, now())
    assert (result.outcome, result.holders) == ("deleting", [])


async def test_forced_delete_marks_copies_and_ends_in_tombstones(catalogue: Catalogue) -> None:
    await catalogue.ingest.register([rec("a"), rec("b")])
    await with_rules(catalogue, ["a", "b"], TO_PIC, TO_TAPE)
    await copied(catalogue, "a", "disk2")
    await archived_on_tape(catalogue, "a")
    result = await catalogue.datasets.request_delete(DS, "cli:alice", True, now())
    assert (result.outcome, result.files, result.holders) == ("deleting", 2, ["to-pic", "to-tape"])
    assert (result.disk_copies, result.tape_copies) == (3, 2)  # a@disk1, b@disk1, a@disk2; a, b on tape
    assert await state(catalogue) == "deleting"
    assert (await catalogue.datasets.request_delete(DS, "cli:alice", True, now())).outcome == "already"

    copies = await catalogue.read(doomed_copies, 100)
    assert sorted((c.name, c.storage) for c in copies) == [("a", "disk1"), ("a", "disk2"), ("b", "disk1")]
    assert await catalogue.datasets.settle_deletions(now()) == []  # bytes still there
    for c in copies:
        await catalogue.datasets.copy_deleted(c, now())
    before = [k for k, _ in await outbox_events(catalogue)]
    assert await catalogue.datasets.settle_deletions(now()) == [DS]
    assert await state(catalogue) == "deleted"
    # Stated once, in the same transaction: a second settle finds nothing more to say.
    assert await catalogue.datasets.settle_deletions(now()) == []
    new = [(k, b) for k, b in await outbox_events(catalogue)][len(before) :]
    assert [(k, b["dataset"], b["files"]) for k, b in new] == [("dataset.deleted", DS, 2)]

    # Tombstones: the files and their copies stay, the history says why.
    view = await catalogue.queries.show_file("a")
    assert view is not None and {r.storage: r.state for r in view.replicas} == {
        "disk1": "deleted", "disk2": "deleted", "tape1": "deleted",
    }  # fmt: skip
    trace = [(e.type, e.storage) for e in await catalogue.queries.history("a")]
    assert ("dataset.delete", None) in trace and ("replica.deleted", "disk2") in trace
    # Its name is not reused: a new file announced into it is refused.
    [refused] = await catalogue.ingest.register([rec("c")])
    assert refused.outcome == "dataset_closed"


async def test_a_copy_finished_after_the_delete_began_is_deleted_too(catalogue: Catalogue) -> None:
    await catalogue.ingest.register([rec("a")])
    await with_rules(catalogue, ["a"], TO_PIC)
    await catalogue.datasets.request_delete(DS, "cli:alice", True, now())
    await copied(catalogue, "a", "disk2")  # a replicator finishing a copy it had started
    await catalogue.datasets.settle_deletions(now())
    assert sorted(c.storage for c in await catalogue.read(doomed_copies, 100)) == ["disk1", "disk2"]


# --- reading --------------------------------------------------------------------------------------
async def test_list_datasets_by_state(catalogue: Catalogue) -> None:
    other = "lst1.20261123.run012346.dl0"
    await catalogue.ingest.register([rec("a"), rec("b", dataset=other), rec("c", dataset=other)])
    await catalogue.datasets.close(other, "cli:alice", now())
    closed = await catalogue.queries.list_datasets(state="closed")
    assert [(d.name, d.files) for d in closed] == [(other, 2)]
    assert [d.name for d in await catalogue.queries.list_datasets(state="open")] == [DS]
    assert len(await catalogue.queries.list_datasets()) == 2


async def test_show_counts_copies_per_endpoint_and_says_what_is_missing_and_why(catalogue: Catalogue) -> None:
    await catalogue.ingest.register([rec("a"), rec("b"), rec("c")])
    await with_rules(catalogue, ["a", "b", "c"], TO_PIC)
    await copied(catalogue, "a", "disk2")
    await catalogue.history.record_failure(
        request_id="req-b", kind="replica", daemon="replicator", reason="disk_full", error="no space left",
        attempts=4, final=True, name="b", path=None, dataset=None,
    )  # fmt: skip
    view = await catalogue.datasets.show(DS, now())
    assert view is not None and view.wanted is None  # counted only when asked for
    assert (view.files, view.bytes, view.without_copy) == (3, 3000, 0)
    copies = {(c.storage, c.state): c.copies for c in view.copies}
    assert copies == {("disk1", "available"): 3, ("disk2", "available"): 1, ("disk2", "queued"): 2}
    missing = {(m.name, m.storage): (m.state, m.reason) for m in view.missing}
    assert missing == {("b", "disk2"): ("queued", "disk_full"), ("c", "disk2"): ("queued", None)}
    view = await catalogue.datasets.show(DS, now(), wanted=True)
    assert view is not None and view.wanted is not None
    [wanted] = view.wanted
    assert (wanted.storage, wanted.files, wanted.missing, wanted.missing_by_state) == (
        "disk2",
        3,
        2,
        {"queued": 2},
    )
    missing = {(m.name, m.storage): (m.state, m.reason) for m in view.missing}
    assert missing == {("b", "disk2"): ("queued", "disk_full"), ("c", "disk2"): ("queued", None)}
    assert await catalogue.datasets.show("lst1.20261123.run099999.dl0", now()) is None
