"""Rules, locks, wanted copies, parked copies and reaping in the catalogue (SQLite and PostgreSQL)."""

# Fixtures imported from catalogue_fixtures (not conftest) reappear as test parameters:
# ruff: noqa: F811

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from common.catalogue import Catalogue, CopyRecord
from common.catalogue.policy import Rule, endpoint_attributes
from tests.catalogue_fixtures import ENDPOINTS, catalogue, catalogue_url, rec  # noqa: F401

TABLE = {n: endpoint_attributes(n, e.kind, e.attributes) for n, e in ENDPOINTS.items()}
TO_PIC = Rule("to-pic", endpoints="site=PIC", datasets=".*")
TO_TAPE = Rule("to-tape", endpoints="kind=tape", datasets=r".*\.dl0")


async def states(cat: Catalogue, name: str) -> dict[str, str]:
    view = await cat.show_file(name)
    assert view is not None
    return {r.storage: r.state for r in view.replicas}


async def copied(cat: Catalogue, name: str, storage: str) -> None:
    await cat.record_copies([CopyRecord(f"req-{name}-{storage}", name, storage, name, 1, "disk1")])


async def test_plan_locks_copies_and_is_idempotent(catalogue: Catalogue) -> None:
    await catalogue.register_ingested([rec("a"), rec("b", dataset="lst1.20261123.run012345.dl1")])
    items = [("a", "lst1.20261123.run012345.dl0", {}), ("b", "lst1.20261123.run012345.dl1", {})]
    gone = Rule("gone", endpoints="disk2", datasets=".*")  # removed since the caller loaded it
    assert await catalogue.plan_copies(items, [gone], TABLE) == [[], []]
    await catalogue.add_rule(TO_PIC)
    await catalogue.add_rule(TO_TAPE)
    first = await catalogue.plan_copies(items, [TO_PIC, TO_TAPE], TABLE)
    assert [(w.storage, w.kind) for w in first[0]] == [("disk2", "disk"), ("tape1", "tape")]
    assert [(w.storage, w.kind) for w in first[1]] == [("disk2", "disk")]
    assert await states(catalogue, "a") == {"disk1": "available", "disk2": "queued", "tape1": "queued"}
    # A redelivered event asks again for what is still missing, and adds nothing.
    again = await catalogue.plan_copies(items, [TO_PIC, TO_TAPE], TABLE)
    assert again == first
    await copied(catalogue, "a", "disk2")
    third = await catalogue.plan_copies(items[:1], [TO_PIC, TO_TAPE], TABLE)
    assert [w.storage for w in third[0]] == ["tape1"]
    views = {v.rule.id: v.replicas for v in await catalogue.rule_views()}
    assert views == {"to-pic": {"available": 1, "queued": 1}, "to-tape": {"queued": 1}}


async def test_rules_stored_evaluated_listed_and_removed(catalogue: Catalogue) -> None:
    await catalogue.register_ingested([rec(f"f{i}", metadata={"run": i}) for i in range(5)])
    rule = Rule("odd-runs", endpoints="disk2", metadata=("run>=3",))
    await catalogue.add_rule(rule)
    with pytest.raises(KeyError, match="already exists"):
        await catalogue.add_rule(rule)
    assert [r.id for r in await catalogue.new_rules(datetime.now(UTC) + timedelta(seconds=1))] == ["odd-runs"]
    page = await catalogue.files_for_rule(rule, after_id=0, limit=10)
    assert [name for _, name, _, _ in page] == ["f3", "f4"]
    wanted = await catalogue.plan_copies([(n, d, m) for _, n, d, m in page], [rule], TABLE)
    assert sum(len(w) for w in wanted) == 2
    await copied(catalogue, "f3", "disk2")
    await catalogue.activate_rule("odd-runs")
    assert await catalogue.new_rules(datetime.now(UTC) + timedelta(seconds=1)) == []
    (view,) = await catalogue.rule_views()
    assert view.replicas == {"available": 1, "queued": 1}
    # Removing releases both: the queued copy is cancelled, the made one becomes reapable.
    assert await catalogue.remove_rule("odd-runs") == 2
    assert await states(catalogue, "f4") == {"disk1": "available"}
    assert [(r.name, r.storage) for r in await catalogue.reapable()] == [("f3", "disk2")]
    with pytest.raises(KeyError):
        await catalogue.remove_rule("odd-runs")


async def test_config_rules_sync_adds_changes_and_removes_only_config_rules(catalogue: Catalogue) -> None:
    cli_rule = Rule("by-hand", endpoints="disk2", datasets=".*")
    await catalogue.add_rule(cli_rule)
    a = Rule("a", endpoints="disk2", datasets=".*", origin="config")
    assert await catalogue.sync_config_rules([a]) == ["a"]
    assert await catalogue.sync_config_rules([a]) == []  # unchanged: nothing to re-evaluate
    changed = Rule("a", endpoints="disk2", datasets=".*", copies=1, priority=7, origin="config")
    assert await catalogue.sync_config_rules([changed]) == ["a"]
    assert {r.id: r.priority for r in await catalogue.load_rules()} == {"a": 7, "by-hand": 3}
    assert await catalogue.sync_config_rules([]) == ["a"]
    assert [r.id for r in await catalogue.load_rules()] == ["by-hand"]


async def test_reaper_never_takes_the_last_copy_nor_a_locked_one(catalogue: Catalogue) -> None:
    await catalogue.register_ingested([rec("x"), rec("y")])
    keep = Rule("keep", endpoints="disk2", datasets=".*")
    await catalogue.add_rule(keep)
    await catalogue.plan_copies([("x", "d", {}), ("y", "d", {})], [keep], TABLE)
    await copied(catalogue, "x", "disk2")
    await copied(catalogue, "y", "disk2")
    assert await catalogue.reapable() == []  # locked by "keep"
    await catalogue.remove_rule("keep")
    # y's only other copy (the ingest one) goes bad: its disk2 copy is now the last one.
    await catalogue.set_replica_state("y", "disk1", "bad")
    items = await catalogue.reapable()
    assert [(r.name, r.storage) for r in items] == [("x", "disk2")]
    assert await catalogue.begin_delete(items[0].replica_id)
    await catalogue.finish_delete(items[0])
    assert await states(catalogue, "x") == {"disk1": "available"}
    assert await states(catalogue, "y") == {"disk1": "bad", "disk2": "available"}
    history = [e.type for e in await catalogue.history("x")]
    assert "replica.deleted" in history


async def test_lifetime_ends_the_lock_then_the_copy_is_reapable(catalogue: Catalogue) -> None:
    await catalogue.register_ingested([rec("t")])
    short = Rule("short", endpoints="disk2", datasets=".*", lifetime=0.3)
    forever = Rule("forever", endpoints="disk2", metadata=("run=1",))  # does not select "t"
    await catalogue.add_rule(short)
    await catalogue.add_rule(forever)
    await catalogue.plan_copies([("t", "d", {})], [short, forever], TABLE)
    await copied(catalogue, "t", "disk2")
    assert await catalogue.reapable() == []
    await asyncio.sleep(0.4)
    assert await catalogue.expire_locks() == 1
    assert [r.name for r in await catalogue.reapable()] == ["t"]


async def test_a_copy_another_rule_holds_is_not_reaped(catalogue: Catalogue) -> None:
    await catalogue.register_ingested([rec("s")])
    a = Rule("a", endpoints="disk2", datasets=".*")
    b = Rule("b", endpoints="site=PIC", datasets=".*")
    await catalogue.add_rule(a)
    await catalogue.add_rule(b)
    wanted = await catalogue.plan_copies([("s", "d", {})], [a, b], TABLE)
    assert [w.storage for w in wanted[0]] == ["disk2"]  # one copy serves both rules
    await copied(catalogue, "s", "disk2")
    await catalogue.remove_rule("a")
    assert await catalogue.reapable() == []


async def test_parked_copies_page_by_priority_and_once_per_resume(catalogue: Catalogue) -> None:
    await catalogue.register_ingested([rec(f"p{i}") for i in range(7)])
    for i in range(7):
        await catalogue.park(f"p{i}", "disk2", priority=i % 3)
    assert await catalogue.waiting_count("disk2") == 7
    cutoff = datetime.now(UTC)
    seen: list[tuple[int, str]] = []
    after = None
    while rows := await catalogue.waiting("disk2", 3, parked_before=cutoff, after=after):
        seen += [(p, n) for p, _, n in rows]
        after = (rows[-1][0], rows[-1][1])
    assert [p for p, _ in seen] == [2, 2, 1, 1, 0, 0, 0]
    assert sorted(n for _, n in seen) == [f"p{i}" for i in range(7)]
    await asyncio.sleep(0.01)
    await catalogue.park("p0", "disk2", priority=0)  # parked again during the resume
    rows = await catalogue.waiting("disk2", 10, parked_before=cutoff)
    assert "p0" not in [n for _, _, n in rows]


async def test_replica_task_lists_sources_and_whether_a_rule_needs_the_copy(catalogue: Catalogue) -> None:
    await catalogue.register_ingested([rec("q")])
    task = await catalogue.replica_task("q", "disk2")
    assert task is not None
    assert (task.state, task.needed, [s.storage for s in task.sources]) == (None, False, ["disk1"])
    rule = Rule("r", endpoints="disk2", datasets=".*", priority=6)
    await catalogue.add_rule(rule)
    await catalogue.plan_copies([("q", "d", {})], [rule], TABLE)
    task = await catalogue.replica_task("q", "disk2")
    assert task is not None and (task.state, task.needed, task.priority) == ("queued", True, 6)
    assert await catalogue.replica_task("nope", "disk2") is None
    usage = {u.name: u for u in await catalogue.endpoint_usage()}
    assert usage["disk1"].replicas == {"available": 1} and usage["disk1"].bytes_available == 1000
    assert usage["disk2"].replicas == {"queued": 1}


async def test_replica_tasks_in_bulk_answer_like_one_at_a_time(catalogue: Catalogue) -> None:
    await catalogue.register_ingested([rec(f"m{i}") for i in range(6)])
    rule = Rule("r", endpoints="disk2", datasets=".*")
    await catalogue.add_rule(rule)
    await catalogue.plan_copies([(f"m{i}", "d", {}) for i in range(3)], [rule], TABLE)
    await copied(catalogue, "m0", "disk2")
    await catalogue.park("m1", "disk2", 7)
    pairs = [(f"m{i}", "disk2") for i in range(6)] + [("m0", "disk1"), ("nope", "disk2")]
    bulk = await catalogue.replica_tasks(pairs)
    assert bulk == [await catalogue.replica_task(n, s) for n, s in pairs]
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
