"""Rules, locks, wanted copies, parked copies and reaping in the catalogue (SQLite and PostgreSQL)."""

# Fixtures imported from catalogue_fixtures (not conftest) reappear as test parameters:
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Connection, bindparam, func, or_, select, update

from common.catalogue import Catalogue, CopyRecord, ReplicaTask, Source, policy, replication
from common.catalogue import schema as s
from common.catalogue.policy import Placement, Rule, endpoint_attributes
from common.catalogue.sql import insert_ignore_sync, upsert_sync
from tests.catalogue_fixtures import ENDPOINTS, catalogue, catalogue_url, raw_rows, rec, statements  # noqa: F401

TABLE = {n: endpoint_attributes(n, e.kind, e.attributes) for n, e in ENDPOINTS.items()}
TO_PIC = Rule("to-pic", endpoints="site=PIC", datasets=".*")
TO_TAPE = Rule("to-tape", endpoints="kind=tape", datasets=r".*\.dl0")


async def states(cat: Catalogue, name: str) -> dict[str, str]:
    view = await cat.queries.show_file(name)
    assert view is not None
    return {r.storage: r.state for r in view.replicas}


async def copied(cat: Catalogue, name: str, storage: str) -> None:
    await cat.replication.record_copies(
        [CopyRecord(f"req-{name}-{storage}", name, storage, name, 1, "disk1")]
    )


async def test_plan_locks_copies_and_is_idempotent(catalogue: Catalogue) -> None:
    await catalogue.ingest.register([rec("a"), rec("b", dataset="lst1.20261123.run012345.dl1")])
    items: list[tuple[str, str, dict[str, Any]]] = [
        ("a", "lst1.20261123.run012345.dl0", {}),
        ("b", "lst1.20261123.run012345.dl1", {}),
    ]
    gone = Rule("gone", endpoints="disk2", datasets=".*")  # removed since the caller loaded it
    assert await catalogue.replication.plan_copies(items, [gone], TABLE) == [[], []]
    await catalogue.replication.add_rule(TO_PIC)
    await catalogue.replication.add_rule(TO_TAPE)
    first = await catalogue.replication.plan_copies(items, [TO_PIC, TO_TAPE], TABLE)
    assert [(w.storage, w.kind) for w in first[0]] == [("disk2", "disk"), ("tape1", "tape")]
    assert [(w.storage, w.kind) for w in first[1]] == [("disk2", "disk")]
    assert await states(catalogue, "a") == {"disk1": "available", "disk2": "queued", "tape1": "queued"}
    # A redelivered event asks again for what is still missing, and adds nothing.
    again = await catalogue.replication.plan_copies(items, [TO_PIC, TO_TAPE], TABLE)
    assert again == first
    await copied(catalogue, "a", "disk2")
    third = await catalogue.replication.plan_copies(items[:1], [TO_PIC, TO_TAPE], TABLE)
    assert [w.storage for w in third[0]] == ["tape1"]
    views = {v.rule.id: v.replicas for v in await catalogue.replication.rule_views()}
    assert views == {"to-pic": {"available": 1, "queued": 1}, "to-tape": {"queued": 1}}


async def test_rules_stored_evaluated_listed_and_removed(catalogue: Catalogue) -> None:
    await catalogue.ingest.register([rec(f"f{i}", metadata={"run": i}) for i in range(5)])
    rule = Rule("odd-runs", endpoints="disk2", metadata=("run>=3",))
    await catalogue.replication.add_rule(rule)
    with pytest.raises(KeyError, match="already exists"):
        await catalogue.replication.add_rule(rule)
    assert [
        r.id for r in await catalogue.replication.new_rules(datetime.now(UTC) + timedelta(seconds=1))
    ] == ["odd-runs"]
    page = await catalogue.replication.files_for_rule(rule, limit=10)
    assert [x.name for x in page] == ["f3", "f4"]
    assert [x.metadata for x in page] == [{"run": 3}, {"run": 4}]
    # Without metadata (no rule places by it): the same files, selected by it all the same.
    bare = await catalogue.replication.files_for_rule(rule, limit=10, metadata=False)
    assert bare == [x._replace(metadata={}) for x in page]
    wanted = await catalogue.replication.plan_copies(
        [(x.name, x.dataset, x.metadata) for x in page], [rule], TABLE
    )
    assert sum(len(w) for w in wanted) == 2
    await copied(catalogue, "f3", "disk2")
    await catalogue.replication.activate_rule("odd-runs")
    assert await catalogue.replication.new_rules(datetime.now(UTC) + timedelta(seconds=1)) == []
    (view,) = await catalogue.replication.rule_views()
    assert view.replicas == {"available": 1, "queued": 1}
    # Removing releases both: the queued copy is cancelled, the made one becomes reapable.
    assert await catalogue.replication.remove_rule("odd-runs") == 2
    assert await states(catalogue, "f4") == {"disk1": "available"}
    assert [(r.name, r.storage) for r in await catalogue.replication.reapable()] == [("f3", "disk2")]
    with pytest.raises(KeyError):
        await catalogue.replication.remove_rule("odd-runs")


async def test_a_rule_pages_through_every_file_it_selects_exactly_once(catalogue: Catalogue) -> None:
    """Pages of 4 over three datasets (interleaved ids, one not matched), with and without a
    metadata filter, and a rule with no dataset pattern: each selected file once, none other."""
    sets = ["a.20261123.run1.dl0", "b.20261123.run1.dl0", "c.20261123.run1.dl1"]
    await catalogue.ingest.register(
        [rec(f"f{i:02d}", dataset=sets[i % 3], metadata={"run": i}) for i in range(30)]
    )

    async def walk(rule: Rule) -> list[str]:
        after, names = (0, 0), []
        while page := await catalogue.replication.files_for_rule(rule, after=after, limit=4):
            assert len(page) <= 4
            names += [x.name for x in page]
            after = page[-1].cursor
        return names

    dl0 = await walk(Rule("dl0", endpoints="disk2", datasets=r".*\.dl0"))
    assert sorted(dl0) == sorted(f"f{i:02d}" for i in range(30) if i % 3 != 2)
    assert len(dl0) == len(set(dl0))
    late = await walk(Rule("late", endpoints="disk2", datasets=r".*\.dl0", metadata=("run>=20",)))
    assert sorted(late) == sorted(f"f{i:02d}" for i in range(20, 30) if i % 3 != 2)
    anywhere = await walk(Rule("any", endpoints="disk2", metadata=("run<7",)))
    assert anywhere == [f"f{i:02d}" for i in range(7)]  # by id


async def test_a_rules_pages_read_index_ranges_not_whole_datasets_on_sqlite(
    catalogue: Catalogue, statements: list[tuple[str, Any]]
) -> None:
    """Each page is an index range of one dataset (dataset_id = ? AND id > ?), not a sort of
    every remaining file of the rule's datasets (quadratic in the dataset's size)."""
    if catalogue.backend != "sqlite":
        pytest.skip("SQLite's query planner")
    await catalogue.ingest.register([rec(f"f{i:02d}") for i in range(20)])
    statements.clear()
    page = await catalogue.replication.files_for_rule(
        Rule("r", endpoints="disk2", datasets=".*"), after=(0, 0), limit=5
    )
    await catalogue.replication.files_for_rule(
        Rule("r", endpoints="disk2", datasets=".*"), after=page[-1].cursor, limit=5
    )
    reads = [(sql, p) for sql, p in statements if sql.startswith("SELECT files.id")]
    assert len(reads) == 2

    def plans(conn: Connection) -> list[list[str]]:
        return [[row[-1] for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", p)] for sql, p in reads]

    for plan in await catalogue.read(plans):
        assert plan == ["SEARCH files USING INDEX ix_files_dataset_id (dataset_id=? AND rowid>?)"], plan


async def test_config_rules_sync_adds_changes_and_removes_only_config_rules(catalogue: Catalogue) -> None:
    cli_rule = Rule("by-hand", endpoints="disk2", datasets=".*")
    await catalogue.replication.add_rule(cli_rule)
    a = Rule("a", endpoints="disk2", datasets=".*", origin="config")
    sync = catalogue.replication.sync_config_rules
    assert (await sync([a], "n1")).changed == ["a"]
    assert (await sync([a], "n1")).changed == []  # unchanged: nothing to re-evaluate
    changed = Rule("a", endpoints="disk2", datasets=".*", copies=1, priority=7, origin="config")
    assert (await sync([changed], "n1")).changed == ["a"]
    assert {r.id: r.priority for r in await catalogue.replication.load_rules()} == {"a": 7, "by-hand": 3}
    assert (await sync([], "n1")).changed == ["a"]
    assert [r.id for r in await catalogue.replication.load_rules()] == ["by-hand"]


async def rule_ids(cat: Catalogue) -> list[str]:
    return [r.id for r in await cat.replication.load_rules()]


async def declarers(cat: Catalogue) -> dict[str, list[str]]:
    def read(conn: Connection) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        rd = s.rule_declarations
        rows = conn.execute(select(rd.c.rule_id, rd.c.node).order_by(rd.c.node))
        for rule_id, node in rows:
            out.setdefault(rule_id, []).append(node)
        return out

    return await cat.read(read)


async def test_a_nodes_file_removes_a_rule_only_when_no_other_nodes_file_declares_it(
    catalogue: Catalogue,
) -> None:
    """Two nodes, each its own file, one catalogue: what one stops declaring stays while the
    other declares it; what only one declares is its own to add and remove."""
    sync = catalogue.replication.sync_config_rules
    shared = Rule("shared", endpoints="disk2", datasets=".*", origin="config")
    only_a = Rule("only-a", endpoints="disk2", datasets="a.*", origin="config")
    only_b = Rule("only-b", endpoints="disk2", datasets="b.*", origin="config")
    assert (await sync([shared, only_a], "node-a")).changed == ["shared", "only-a"]
    assert (await sync([shared, only_b], "node-b")).changed == ["only-b"]  # shared: declared too
    assert await declarers(catalogue) == {
        "only-a": ["node-a"], "only-b": ["node-b"], "shared": ["node-a", "node-b"]
    }  # fmt: skip

    assert (await sync([], "node-a")).changed == ["only-a"]  # shared stays: node-b declares it
    assert await rule_ids(catalogue) == ["only-b", "shared"]
    assert (await sync([shared, only_b], "node-b")).changed == []  # a restart of b changes nothing
    assert (await sync([], "node-b")).changed == ["only-b", "shared"]  # the last declarer lets go
    assert await rule_ids(catalogue) == [] and await declarers(catalogue) == {}


async def test_a_file_never_replaces_or_removes_a_rule_added_by_hand(catalogue: Catalogue) -> None:
    sync = catalogue.replication.sync_config_rules
    by_hand = Rule("archive", endpoints="disk2", datasets=".*", copies=1)
    await catalogue.replication.add_rule(by_hand)
    clash = Rule("archive", endpoints="disk2", datasets="other.*", priority=9, origin="config")
    result = await sync([clash], "node-a")
    assert (result.changed, result.refused) == ([], ["archive"])
    [kept] = await catalogue.replication.load_rules()
    assert (kept.origin, kept.datasets, kept.priority) == ("cli", ".*", 3)
    assert (await sync([], "node-a")).changed == [] and await rule_ids(catalogue) == ["archive"]


async def test_a_rule_redefined_by_one_node_keeps_the_others_declarations(catalogue: Catalogue) -> None:
    """The file started last carries the newest definition; the rule is not removed while a node
    that declared it before still does."""
    sync = catalogue.replication.sync_config_rules
    v1 = Rule("r", endpoints="disk2", datasets=".*", origin="config")
    v2 = Rule("r", endpoints="disk2", datasets=".*", priority=8, origin="config")
    await sync([v1], "node-a")
    await sync([v1], "node-b")
    assert (await sync([v2], "node-a")).changed == ["r"]
    [rule] = await catalogue.replication.load_rules()
    assert (rule.priority, rule.state) == (8, "new")  # existing files are evaluated again
    assert await declarers(catalogue) == {"r": ["node-a", "node-b"]}
    assert (await sync([], "node-a")).changed == []  # node-b still declares it
    assert await rule_ids(catalogue) == ["r"]


async def test_nodes_syncing_at_once_leave_each_rule_stored_once_with_both_declarations(
    catalogue: Catalogue,
) -> None:
    rules = [Rule(f"r{n}", endpoints="disk2", datasets=f"d{n}.*", origin="config") for n in range(5)]
    sync = catalogue.replication.sync_config_rules
    results = await asyncio.gather(*(sync(rules, f"node-{k}") for k in range(4)))
    assert sorted(i for r in results for i in r.changed) == [f"r{n}" for n in range(5)]  # each stored once
    assert await declarers(catalogue) == {f"r{n}": [f"node-{k}" for k in range(4)] for n in range(5)}


async def test_reaper_never_takes_the_last_copy_nor_a_locked_one(catalogue: Catalogue) -> None:
    await catalogue.ingest.register([rec("x"), rec("y")])
    keep = Rule("keep", endpoints="disk2", datasets=".*")
    await catalogue.replication.add_rule(keep)
    await catalogue.replication.plan_copies([("x", "d", {}), ("y", "d", {})], [keep], TABLE)
    await copied(catalogue, "x", "disk2")
    await copied(catalogue, "y", "disk2")
    assert await catalogue.replication.reapable() == []  # locked by "keep"
    await catalogue.replication.remove_rule("keep")
    # y's only other copy (the ingest one) goes bad: its disk2 copy is now the last one.
    await catalogue.replication.set_replica_state("y", "disk1", "bad")
    items = await catalogue.replication.reapable()
    assert [(r.name, r.storage) for r in items] == [("x", "disk2")]
    assert await catalogue.replication.begin_delete(items[0].replica_id)
    await catalogue.replication.finish_delete(items[0])
    assert await states(catalogue, "x") == {"disk1": "available"}
    assert await states(catalogue, "y") == {"disk1": "bad", "disk2": "available"}
    history = [e.type for e in await catalogue.queries.history("x")]
    assert "replica.deleted" in history


async def test_lifetime_ends_the_lock_then_the_copy_is_reapable(catalogue: Catalogue) -> None:
    await catalogue.ingest.register([rec("t")])
    short = Rule("short", endpoints="disk2", datasets=".*", lifetime=0.3)
    forever = Rule("forever", endpoints="disk2", metadata=("run=1",))  # does not select "t"
    await catalogue.replication.add_rule(short)
    await catalogue.replication.add_rule(forever)
    await catalogue.replication.plan_copies([("t", "d", {})], [short, forever], TABLE)
    await copied(catalogue, "t", "disk2")
    assert await catalogue.replication.reapable() == []
    await asyncio.sleep(0.4)
    assert await catalogue.replication.expire_locks() == 1
    assert [r.name for r in await catalogue.replication.reapable()] == ["t"]


async def test_a_copy_another_rule_holds_is_not_reaped(catalogue: Catalogue) -> None:
    await catalogue.ingest.register([rec("s")])
    a = Rule("a", endpoints="disk2", datasets=".*")
    b = Rule("b", endpoints="site=PIC", datasets=".*")
    await catalogue.replication.add_rule(a)
    await catalogue.replication.add_rule(b)
    wanted = await catalogue.replication.plan_copies([("s", "d", {})], [a, b], TABLE)
    assert [w.storage for w in wanted[0]] == ["disk2"]  # one copy serves both rules
    await copied(catalogue, "s", "disk2")
    await catalogue.replication.remove_rule("a")
    assert await catalogue.replication.reapable() == []


async def test_parked_copies_page_by_priority_and_once_per_resume(catalogue: Catalogue) -> None:
    await catalogue.ingest.register([rec(f"p{i}") for i in range(7)])
    await catalogue.endpoints.set_state("disk2", "readonly")  # copies are parked only then
    for i in range(7):
        await catalogue.replication.park(f"p{i}", "disk2", priority=i % 3)
    assert await catalogue.replication.waiting_count("disk2") == 7
    cutoff = datetime.now(UTC)
    seen: list[tuple[int, str]] = []
    after = None
    while rows := await catalogue.replication.waiting("disk2", 3, parked_before=cutoff, after=after):
        seen += [(p, n) for p, _, n in rows]
        after = (rows[-1][0], rows[-1][1])
    assert [p for p, _ in seen] == [2, 2, 1, 1, 0, 0, 0]
    assert sorted(n for _, n in seen) == [f"p{i}" for i in range(7)]
    await asyncio.sleep(0.01)
    await catalogue.replication.park("p0", "disk2", priority=0)  # parked again during the resume
    rows = await catalogue.replication.waiting("disk2", 10, parked_before=cutoff)
    assert "p0" not in [n for _, _, n in rows]


async def test_a_copy_is_not_parked_on_an_endpoint_writable_by_now(catalogue: Catalogue) -> None:
    """The replicator parks by its view as last read; an instance that resumed the endpoint since
    has re-sent what was parked until then, so a copy parked after would wait for the next pause's
    end. The catalogue refuses it: the replicator looks again and copies."""
    await catalogue.ingest.register([rec("w0"), rec("w1")])
    assert not await catalogue.replication.park("w0", "disk2", 0)  # online and healthy
    for health in ("paused", "probing"):
        await catalogue.endpoints.set_health("disk2", health)
        assert await catalogue.replication.park("w1", "disk2", 0)
    await catalogue.endpoints.set_health("disk2", "ok")
    for state in ("readonly", "down"):
        await catalogue.endpoints.set_state("disk2", state)
        assert await catalogue.replication.park("w1", "disk2", 0)
    assert await catalogue.replication.waiting_count("disk2") == 1  # w1 only


async def test_replica_task_lists_sources_and_whether_a_rule_needs_the_copy(catalogue: Catalogue) -> None:
    await catalogue.ingest.register([rec("q")])
    task = await catalogue.replication.replica_task("q", "disk2")
    assert task is not None
    assert (task.state, task.needed, [s.storage for s in task.sources]) == (None, False, ["disk1"])
    rule = Rule("r", endpoints="disk2", datasets=".*", priority=6)
    await catalogue.replication.add_rule(rule)
    await catalogue.replication.plan_copies([("q", "d", {})], [rule], TABLE)
    task = await catalogue.replication.replica_task("q", "disk2")
    assert task is not None and (task.state, task.needed, task.priority) == ("queued", True, 6)
    assert await catalogue.replication.replica_task("nope", "disk2") is None
    usage = {u.name: u for u in await catalogue.endpoints.usage()}
    assert usage["disk1"].replicas == {"available": 1} and usage["disk1"].bytes_available == 1000
    assert usage["disk2"].replicas == {"queued": 1}


async def test_replica_tasks_in_bulk_answer_like_one_at_a_time(catalogue: Catalogue) -> None:
    await catalogue.ingest.register([rec(f"m{i}") for i in range(6)])
    rule = Rule("r", endpoints="disk2", datasets=".*")
    await catalogue.replication.add_rule(rule)
    await catalogue.replication.plan_copies([(f"m{i}", "d", {}) for i in range(3)], [rule], TABLE)
    await copied(catalogue, "m0", "disk2")
    await catalogue.endpoints.set_health("disk2", "paused")
    assert await catalogue.replication.park("m1", "disk2", 7)
    pairs = [(f"m{i}", "disk2") for i in range(6)] + [("m0", "disk1"), ("nope", "disk2")]
    bulk = await catalogue.replication.replica_tasks(pairs)
    assert bulk == [await catalogue.replication.replica_task(n, s) for n, s in pairs]
    assert [t.state if t else None for t in bulk] == [
        "available",
        "waiting",
        "queued",
        None,
        None,
        None,
        "available",
        None,
    ]


# --- The driver-level paths: what the SQLAlchemy Core statements did ----------------------------
#
# ``plan_copies``, ``replica_tasks`` and ``record_copies`` send SQL text and pre-converted values to
# the driver. These tests hold them to the Core code they replaced (kept below as references), on
# both backends: the same raw values written (types included), the same answers, no column left to
# a default, and (SQLite) every lookup on an index of the file.

NOW = datetime(2026, 12, 1, 12, 0, 0, 123456, tzinfo=UTC)
SLOW = Rule("slow", endpoints="disk2", datasets=".*", priority=6, lifetime=3600.5)
ARCHIVE = Rule("archive", endpoints="kind=tape", datasets=".*")


@pytest.fixture
def fixed_now(monkeypatch: pytest.MonkeyPatch) -> datetime:
    """``replication``'s clock stopped at ``NOW`` (so that the Core references can use the same)."""
    monkeypatch.setattr(replication, "utcnow", lambda: NOW)
    return NOW


def _core_record_copies(conn: Connection, records: Sequence[CopyRecord], now: datetime) -> None:
    """``record_copies`` as it was in Core statements (77251ba), with the time given."""
    f, r, ep = s.files, s.replicas, s.storage_endpoints
    names = [c.name for c in records]
    ids = {n: i for i, n in conn.execute(select(f.c.id, f.c.name).where(f.c.name.in_(names)))}
    sids = {n: i for n, i in conn.execute(select(ep.c.name, ep.c.id))}
    wanted = {
        (ids[c.name], sids[c.storage]): c
        for c in sorted(records, key=lambda c: (c.name, c.storage))
        if c.name in ids
    }
    rows = conn.execute(select(r.c.file_id, r.c.storage_id).where(r.c.file_id.in_([k[0] for k in wanted])))
    existing = {(fid, sid) for fid, sid in rows if (fid, sid) in wanted}
    set_available = (
        update(r)
        .where(r.c.file_id == bindparam("fid"), r.c.storage_id == bindparam("sid"))
        .values(state="available", pfn=bindparam("new_pfn"), updated=now,
                tombstone=func.coalesce(r.c.tombstone, now))
    )  # fmt: skip
    params = [{"fid": k[0], "sid": k[1], "new_pfn": c.pfn} for k, c in wanted.items() if k in existing]
    if params:
        conn.execute(set_available, params)
    new_rows = [
        {"file_id": fid, "storage_id": sid, "pfn": c.pfn, "state": "available", "cartridge": None,
         "fseq": None, "created": now, "updated": now, "tombstone": now, "priority": 3}
        for (fid, sid), c in wanted.items()
        if (fid, sid) not in existing
    ]  # fmt: skip
    if new_rows:
        conn.execute(r.insert(), new_rows)
    request_rows = [
        {"id": c.request_id, "kind": "replica", "name": c.name, "path": None, "dataset": None,
         "state": "done", "attempts": c.attempt, "reason": None, "error": None,
         "created": now, "updated": now}
        for c in records
    ]  # fmt: skip
    upsert_sync(conn, s.requests, request_rows, ["id"], ["state", "attempts", "updated"])
    conn.execute(
        s.events.insert(),
        [
            {"name": c.name, "time": now, "daemon": "replicator", "type": "replica.created",
             "outcome": "ok", "attempt": c.attempt, "storage": c.storage,
             "detail": {"request_id": c.request_id, "source": c.source, "pfn": c.pfn}}
            for c in records
        ],
    )  # fmt: skip


def _core_replica_tasks(
    conn: Connection, items: Sequence[tuple[str, str]], now: datetime
) -> list[ReplicaTask | None]:
    """``replica_tasks`` as it was in Core statements (77251ba), with the time given."""
    f, r, ep, lk = s.files, s.replicas, s.storage_endpoints, s.locks
    ids = {n: i for i, n in conn.execute(select(f.c.id, f.c.name).where(f.c.name.in_([n for n, _ in items])))}
    sids = {n: i for n, i in conn.execute(select(ep.c.name, ep.c.id))}
    fids = sorted(set(ids.values()))
    info = {fid: (size, adler) for fid, size, adler in conn.execute(
        select(f.c.id, f.c.size, f.c.adler32).where(f.c.id.in_(fids))
    )}  # fmt: skip
    dest: dict[tuple[int, int], tuple[str, str, int]] = {}
    sources: dict[int, list[tuple[int, str, str]]] = {}
    rows = conn.execute(
        select(r.c.file_id, r.c.storage_id, r.c.state, r.c.pfn, r.c.priority, ep.c.name, ep.c.kind)
        .join(ep, ep.c.id == r.c.storage_id)
        .where(r.c.file_id.in_(fids))
        .order_by(ep.c.name)
    )
    for fid, sid, state, pfn, prio, ep_name, kind in rows:
        dest[(fid, sid)] = (state, pfn, prio)
        if state == "available" and kind == "disk":
            sources.setdefault(fid, []).append((sid, ep_name, pfn))
    live = {(fid, sid) for fid, sid in conn.execute(
        select(lk.c.file_id, lk.c.storage_id).where(
            lk.c.file_id.in_(fids), or_(lk.c.expires.is_(None), lk.c.expires > now)
        )
    )}  # fmt: skip
    out: list[ReplicaTask | None] = []
    for name, storage in items:
        fid = ids.get(name)
        if fid is None:
            out.append(None)
            continue
        sid, row = sids[storage], dest.get((fid, sids[storage]))
        out.append(
            ReplicaTask(
                name=name, size=info[fid][0], adler32=info[fid][1],
                state=row[0] if row else None, pfn=row[1] if row else None,
                needed=(fid, sid) in live, priority=row[2] if row else 3,
                sources=tuple(Source(n, pfn) for s_id, n, pfn in sources.get(fid, []) if s_id != sid),
            )
        )  # fmt: skip
    return out


def _core_plan_rows(
    conn: Connection, name: str, placements: Sequence[tuple[Rule, str]], now: datetime
) -> None:
    """The lock and queued-replica rows ``plan_copies`` wrote through Core for a file without copies
    on the placements' endpoints."""
    fid = conn.execute(select(s.files.c.id).where(s.files.c.name == name)).scalar_one()
    ep = s.storage_endpoints
    sids = {n: i for n, i in conn.execute(select(ep.c.name, ep.c.id))}
    locks = [
        {"rule_id": rule.id, "file_id": fid, "storage_id": sids[st], "created": now,
         "expires": now + timedelta(seconds=rule.lifetime) if rule.lifetime is not None else None}
        for rule, st in placements
    ]  # fmt: skip
    replicas = [
        {"file_id": fid, "storage_id": sids[st], "pfn": name, "state": "queued", "cartridge": None,
         "fseq": None, "created": now, "updated": now, "tombstone": None, "priority": rule.priority}
        for rule, st in placements
    ]  # fmt: skip
    insert_ignore_sync(conn, s.locks, locks, ["rule_id", "file_id", "storage_id"])
    insert_ignore_sync(conn, s.replicas, replicas, ["file_id", "storage_id"])


_RAW_QUERIES = {
    "replicas": "SELECT storage_id, pfn, state, cartridge, fseq, created, updated, tombstone, priority"
    " FROM replicas WHERE file_id = :id",
    "locks": "SELECT rule_id, storage_id, expires, created FROM locks WHERE file_id = :id",
    "requests": "SELECT id, kind, name, path, dataset, state, attempts, reason, error, created, updated"
    " FROM requests WHERE name = :name",
    "events": "SELECT name, time, daemon, type, outcome, attempt, storage, detail"
    " FROM events WHERE name = :name",
}


def _copy(
    name: str, storage: str = "disk2", pfn: str | None = None, request: str = "req", attempt: int = 2
) -> CopyRecord:
    return CopyRecord(f"{request}-{name}", name, storage, pfn or f"/srv/{storage}/{name}", attempt, "disk1")


async def test_driver_level_copy_rows_equal_the_rows_core_statements_wrote(
    catalogue: Catalogue, fixed_now: datetime
) -> None:
    # Each case twice: recorded by ``record_copies`` (-drv) and by the Core statements (-core).
    kinds = ("queued", "none", "tombstoned", "bad", "failed-before")
    pairs = [(f"{k}-drv", f"{k}-core") for k in kinds]
    await catalogue.ingest.register([rec(n) for pair in pairs for n in pair])
    await catalogue.replication.add_rule(SLOW)
    await catalogue.replication.plan_copies(
        [(n, "d", {}) for n in pairs[0]], [SLOW], TABLE
    )  # queued, priority 6
    earlier = NOW - timedelta(days=1)
    tombstoned = pairs[2]

    def prepare(conn: Connection) -> None:
        _core_record_copies(conn, [_copy(n, request="old") for n in tombstoned], earlier)
        for n in pairs[3]:
            replication.set_replica_state(conn, n, "disk1", "bad")
        failed = [
            {"id": f"req-{n}", "kind": "replica", "name": n, "path": None, "dataset": None,
             "state": "retrying", "attempts": 1, "reason": "io_error", "error": "boom",
             "created": earlier, "updated": earlier}
            for n in pairs[4]
        ]  # fmt: skip
        upsert_sync(conn, s.requests, failed, ["id"], ["state"])

    await catalogue.write(prepare)

    def batch(suffix: str) -> list[CopyRecord]:
        ks = [f"{k}-{suffix}" for k in kinds]
        return [
            _copy(ks[1], pfn="/first", request="first"),
            _copy(ks[0]),
            _copy(ks[1]),  # the same copy twice in a batch: the later one counts
            _copy(ks[2], pfn="/elsewhere"),
            _copy(ks[3], storage="disk1"),
            _copy(ks[4]),
            _copy(f"gone-{suffix}"),  # not in the catalogue: request and history only
            _copy(ks[0], storage="tape1", attempt=5),  # a request id twice: the last attempt counts
        ]

    await catalogue.replication.record_copies(batch("drv"))

    def compare(conn: Connection) -> None:
        _core_record_copies(conn, batch("core"), NOW)
        for drv, core in [*pairs, ("gone-drv", "gone-core")]:
            by_driver, by_core = raw_rows(conn, drv, _RAW_QUERIES), raw_rows(conn, core, _RAW_QUERIES)
            assert by_driver == {t: [tuple(_unmask(v, "drv", "core") for v in row) for row in rows]
                                 for t, rows in by_core.items()}, drv  # fmt: skip
            assert by_driver["requests"] and by_driver["events"], drv

    await catalogue.write(compare)
    views = {n: await catalogue.queries.show_file(n) for n, _ in pairs}
    replicas = {n: {x.storage: x for x in v.replicas} for n, v in views.items() if v is not None}
    assert (replicas["queued-drv"]["disk2"].state, replicas["queued-drv"]["disk2"].pfn) == (
        "available", "/srv/disk2/queued-drv",
    )  # fmt: skip
    assert replicas["none-drv"]["disk2"].pfn == "/srv/disk2/none-drv"
    assert replicas["bad-drv"]["disk1"].state == "available"
    # Copies the replicator made (or remade) are reapable once unlocked; the tombstone is kept.
    reapable = {(x.name, x.storage) for x in await catalogue.replication.reapable()}
    assert {("none-drv", "disk2"), ("tombstoned-drv", "disk2")} <= reapable
    assert ("queued-drv", "disk2") not in reapable  # locked by "slow"
    req = (await catalogue.queries.request_state(["req-failed-before-drv"]))["req-failed-before-drv"]
    assert (req.state, req.attempts, req.reason, req.error, req.created) == (
        "done",
        2,
        "io_error",
        "boom",
        earlier,
    )


def _unmask(value: tuple[str, Any], drv: str, core: str) -> tuple[str, Any]:
    """A masked value of a -core file as it reads for the -drv one (names embed the suffix)."""
    kind, v = value
    return kind, v.replace(core, drv) if isinstance(v, str) else v


async def test_driver_level_plan_rows_equal_the_rows_core_statements_wrote(
    catalogue: Catalogue, fixed_now: datetime
) -> None:
    await catalogue.ingest.register([rec("p-drv"), rec("p-core")])
    for rule in (SLOW, ARCHIVE):
        await catalogue.replication.add_rule(rule)
    [wanted] = await catalogue.replication.plan_copies([("p-drv", "d", {})], [SLOW, ARCHIVE], TABLE)
    assert [(w.storage, w.kind, w.priority, w.rule_id) for w in wanted] == [
        ("disk2", "disk", 6, "slow"),  # the higher priority first
        ("tape1", "tape", 3, "archive"),
    ]

    def compare(conn: Connection) -> None:
        _core_plan_rows(conn, "p-core", [(SLOW, "disk2"), (ARCHIVE, "tape1")], NOW)
        by_driver, by_core = raw_rows(conn, "p-drv", _RAW_QUERIES), raw_rows(conn, "p-core", _RAW_QUERIES)
        for table in ("replicas", "locks"):
            assert by_driver[table] == by_core[table], table
        assert len(by_driver["locks"]) == 2 and len(by_driver["replicas"]) == 3

    await catalogue.write(compare)
    # Read back through the ordinary queries.
    task = await catalogue.replication.replica_task("p-drv", "disk2")
    assert task is not None and (task.state, task.needed, task.priority) == ("queued", True, 6)
    [view] = [v for v in await catalogue.replication.rule_views() if v.rule.id == "slow"]
    assert view.replicas == {"queued": 2}  # p-drv's and p-core's


async def test_driver_level_replica_tasks_answer_like_the_core_statements(
    catalogue: Catalogue, fixed_now: datetime
) -> None:
    names = [f"t{i}" for i in range(7)]
    await catalogue.ingest.register([rec(n, size=100 + i, adler32=f"{i:08x}") for i, n in enumerate(names)])
    for rule in (SLOW, ARCHIVE):
        await catalogue.replication.add_rule(rule)
    await catalogue.replication.plan_copies([(n, "d", {}) for n in names[:4]], [SLOW, ARCHIVE], TABLE)
    await catalogue.replication.record_copies([_copy("t0"), _copy("t1", storage="tape1"), _copy("t5")])
    await catalogue.endpoints.set_health("disk2", "paused")
    assert await catalogue.replication.park("t2", "disk2", 8)
    await catalogue.replication.set_replica_state("t3", "disk1", "bad")

    def locks(conn: Connection) -> None:
        ids = {n: i for i, n in conn.execute(select(s.files.c.id, s.files.c.name))}
        ep = s.storage_endpoints
        sids = {n: i for n, i in conn.execute(select(ep.c.name, ep.c.id))}
        rows = [
            ("t4", "disk2", NOW - timedelta(microseconds=1)),  # expired
            ("t5", "disk2", NOW),  # expires now: no longer live
            ("t6", "disk2", NOW + timedelta(microseconds=1)),
            ("t6", "disk1", None),
        ]
        conn.execute(
            s.locks.insert(),
            [{"rule_id": "slow", "file_id": ids[n], "storage_id": sids[st], "expires": e, "created": NOW}
             for n, st, e in rows],
        )  # fmt: skip

    await catalogue.write(locks)
    pairs = [(n, st) for n in [*names, "nope"] for st in ENDPOINTS] + [("t0", "disk2"), ("t6", "disk2")]
    fast = await catalogue.replication.replica_tasks(pairs)
    assert fast == await catalogue.read(_core_replica_tasks, pairs, NOW)
    by_pair = dict(zip(pairs, fast, strict=True))
    t0 = by_pair[("t0", "tape1")]
    assert t0 is not None and [x.storage for x in t0.sources] == ["disk1", "disk2"]  # by endpoint name
    assert [by_pair[(n, "disk2")].needed for n in ("t4", "t5", "t6")] == [False, False, True]  # type: ignore[union-attr]
    assert by_pair[("nope", "disk1")] is None
    # Many files, more than one statement's worth.
    many = [rec(f"m{i:04d}") for i in range(1100)]
    for i in range(0, len(many), 256):
        await catalogue.ingest.register(many[i : i + 256])
    pairs = [(r.name, "disk2") for r in many]
    assert await catalogue.replication.replica_tasks(pairs) == await catalogue.read(
        _core_replica_tasks, pairs, NOW
    )


def _old_plan(
    rules: Sequence[Rule], endpoints: Any, *, file_name: str, dataset: str, metadata: Any, have: Any
) -> list[Placement]:
    """``policy.plan`` before it ranked the rules once for many files."""
    chosen: set[str] = set(have)
    out: list[Placement] = []
    selected = [(x, x.expression.select(endpoints)) for x in rules if x.selects(dataset, metadata)]
    for rule, candidates in sorted(selected, key=lambda rc: (len(rc[1]), -rc[0].priority, rc[0].id)):
        ranked = sorted(candidates, key=lambda e: (e not in chosen, policy._spread_key(file_name, e)))
        for storage in ranked[: rule.copies]:
            chosen.add(storage)
            out.append(Placement(rule.id, storage, rule.lifetime, rule.priority))
    return out


def test_placement_with_rules_ranked_once_is_the_placement_per_file() -> None:
    table = {f"d{i}": {"name": f"d{i}", "kind": "disk", "site": "A" if i % 2 else "B"} for i in range(6)}
    table["t"] = {"name": "t", "kind": "tape", "site": "A"}
    rules = [
        Rule("two-anywhere", endpoints="kind=disk", datasets=".*", copies=2),
        Rule("one-at-A", endpoints="site=A", datasets=r".*\.dl0", priority=5),
        Rule("tape", endpoints="kind=tape", metadata=("run>=3",)),
        Rule("b-pair", endpoints="site=B&kind=disk", datasets=".*", copies=2, lifetime=60.0),
        Rule("same-rank", endpoints="site=B&kind=disk", datasets=".*", copies=1),
        Rule("d3", endpoints="d3", datasets="x"),
    ]
    ranked = policy.rank_rules(rules, table)
    for i in range(200):
        for dataset, have in (("a.dl0", set()), ("a.dl1", {"d3"}), ("x", {"d0", "t"})):
            kw: dict[str, Any] = {"file_name": f"f{i}", "dataset": dataset, "metadata": {"run": i % 5}}
            kw["have"] = have
            expected = _old_plan(rules, table, **kw)
            assert policy.plan_ranked(ranked, **kw) == expected
            assert policy.plan(rules, table, **kw) == expected


async def test_every_insert_names_every_column_but_the_generated_id(
    catalogue: Catalogue, statements: list[tuple[str, Any]]
) -> None:
    """No column is left to a default: SQLAlchemy's Python-side defaults do not apply to SQL text."""
    await catalogue.ingest.register([rec("a")])
    await catalogue.replication.add_rule(SLOW)
    statements.clear()
    await catalogue.replication.plan_copies([("a", "d", {})], [SLOW], TABLE)
    await catalogue.replication.record_copies([_copy("a"), _copy("a", storage="tape1")])
    written: dict[str, list[set[str]]] = {}
    for sql, _ in statements:
        if match := re.match(r'INSERT INTO "?(\w+)"? \(([^)]*)\)', sql):
            written.setdefault(match[1], []).append({c.strip().strip('"') for c in match[2].split(",")})
    assert {t: len(cols) for t, cols in written.items()} == {
        "locks": 1,
        "replicas": 2,
        "requests": 1,
        "events": 1,
    }
    for name, column_sets in written.items():
        table = s.metadata.tables[name]
        generated = {c.name for c in table.primary_key.columns if c.autoincrement is True}
        for columns in column_sets:
            assert columns == {c.name for c in table.columns} - generated, name


async def test_every_lookup_probes_an_index_of_the_file_on_sqlite(
    catalogue: Catalogue, statements: list[tuple[str, Any]]
) -> None:
    """The replicator's lookups go by file (unique keys; the locks' (file_id, storage_id) index),
    never through a state or time index that would walk a growing part of a table."""
    if catalogue.backend != "sqlite":
        pytest.skip("SQLite's query planner")
    names = [f"f{i:03d}" for i in range(300)]
    for i in range(0, len(names), 150):
        await catalogue.ingest.register([rec(n) for n in names[i : i + 150]])
    await catalogue.replication.add_rule(SLOW)
    statements.clear()
    await catalogue.replication.plan_copies([(n, "d", {}) for n in names], [SLOW], TABLE)
    await catalogue.replication.replica_tasks([(n, "disk2") for n in names])
    await catalogue.replication.record_copies([_copy(n) for n in names])
    selects = [(sql, params) for sql, params in statements if sql.startswith("SELECT")]
    assert len(selects) >= 10

    def plans(conn: Connection) -> list[list[str]]:
        explain = [conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", params) for sql, params in selects]
        return [[row[-1] for row in rows] for rows in explain]

    index = (
        r"SEARCH \w+ USING (INTEGER PRIMARY KEY|(COVERING )?INDEX"
        r" (sqlite_autoindex_\w+|ix_locks_file_id_storage_id)) \(.*\)"
        r"|USE TEMP B-TREE FOR ORDER BY"
    )
    for (sql, _), plan in zip(selects, await catalogue.read(plans), strict=True):
        assert all(re.fullmatch(index, step) for step in plan), (sql[:80], plan)
