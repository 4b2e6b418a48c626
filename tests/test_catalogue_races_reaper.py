"""The reaper against a recall's pin and a rule's placement, on SQLite and PostgreSQL.

- A recall that pins a copy after the reaper's pass listed it (``reapable``) keeps it: the claim
  (``begin_delete``) re-checks the tombstone in its own transaction. An operator's eviction
  (``begin_evict``) still frees a pinned copy.
- A rule's placement that meets a copy while the reaper deletes it (``deleting``) records its lock
  and asks for nothing; the reaper's end (``finish_delete``) sees the lock and asks for the copy
  again, so it ends up available. Before, the row went and the rule held a copy missing for good.
- PostgreSQL: a placement that read the copies just before the reaper's claim or end, and writes
  its lock just after, is waited for (it share-locks its files first). SQLite serialises writers,
  so the same tests there guard the single-writer path.
"""

# Fixtures imported from catalogue_fixtures / race_fixtures reappear as test parameters:
# ruff: noqa: F811

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Connection, select

from common import codec
from common.catalogue import Catalogue, CopyRecord, Reapable, replication
from common.catalogue import recall as rdb
from common.catalogue import schema as s
from common.catalogue.engine import writer
from common.catalogue.policy import Rule, endpoint_attributes
from common.cli.replication import evict_copies
from common.config import StorageEndpoint
from common.messages import ReplicaRequest
from tests.catalogue_fixtures import ENDPOINTS, catalogue, catalogue_url, rec  # noqa: F401
from tests.race_fixtures import Interlude, second  # noqa: F401

PIN = datetime(2030, 1, 1, tzinfo=UTC)
TABLE = {n: endpoint_attributes(n, e.kind, e.attributes) for n, e in ENDPOINTS.items()}
LATE = Rule("late", endpoints="disk2", datasets=".*")


async def _reapable_copy(cat: Catalogue, name: str = "x") -> Reapable:
    """A replicator-made copy on disk2 that no rule holds: tombstoned at once, listed by a pass."""
    await cat.ingest.register([rec(name)])
    await cat.replication.record_copies([CopyRecord(f"req-{name}", name, "disk2", name, 1, "disk1")])
    (item,) = await cat.replication.reapable()
    return item


async def _file_id(cat: Catalogue, name: str) -> int:
    fid = await cat.read(lambda c: c.scalar(select(s.files.c.id).where(s.files.c.name == name)))
    assert fid is not None
    return int(fid)


async def _state_on_disk2(cat: Catalogue, name: str = "x") -> str | None:
    view = await cat.queries.show_file(name)
    assert view is not None
    return next((x.state for x in view.replicas if x.storage == "disk2"), None)


async def _requests_in_outbox(cat: Catalogue) -> list[ReplicaRequest]:
    pending = await cat.outbox.unsent(100)
    out = [codec.decode(p.body, codec.MSGPACK, p.routing_key) for p in pending]
    return [m for m in out if isinstance(m, ReplicaRequest)]


# --- a recall's pin against the reaper's claim ----------------------------------------------------
async def test_a_copy_a_recall_pinned_after_the_reaper_listed_it_is_not_claimed(catalogue: Catalogue) -> None:
    item = await _reapable_copy(catalogue)
    delivery = rdb.Delivery(await _file_id(catalogue, "x"), "x", "disk2", "x", PIN, "disk1")
    assert await catalogue.recall.deliver(delivery) is not None  # pinned until 2030

    assert await catalogue.replication.begin_delete(item.replica_id) is False
    assert await _state_on_disk2(catalogue) == "available"
    assert await catalogue.replication.reapable() == []


async def test_a_claim_waits_for_a_recall_pinning_the_copy_and_then_leaves_it(
    catalogue: Catalogue, second: Catalogue
) -> None:
    item = await _reapable_copy(catalogue)
    delivery = rdb.Delivery(await _file_id(catalogue, "x"), "x", "disk2", "x", PIN, "disk1")

    async with writer(second.engine).connect() as conn:
        tx = await conn.begin()
        assert await conn.run_sync(rdb.deliver, delivery) is not None  # the copy's row locked
        claim = asyncio.create_task(catalogue.replication.begin_delete(item.replica_id))
        await asyncio.sleep(0.5)
        assert not claim.done()  # waits for the delivery
        await tx.commit()
    assert await claim is False
    assert await _state_on_disk2(catalogue) == "available"


async def test_an_operator_still_evicts_a_copy_a_recall_pinned(catalogue: Catalogue, tmp_path: Path) -> None:
    await _reapable_copy(catalogue)
    delivery = rdb.Delivery(await _file_id(catalogue, "x"), "x", "disk2", "x", PIN, "disk1")
    await catalogue.recall.deliver(delivery)
    endpoint = StorageEndpoint(root=tmp_path / "disk2")
    endpoint.root.mkdir()
    (endpoint.root / "x").write_bytes(b"recalled")

    assert await evict_copies(catalogue, "disk2", endpoint, names=["x"]) == {"evicted": ["x"], "kept": []}
    assert not (endpoint.root / "x").exists()
    assert await _state_on_disk2(catalogue) is None


# --- a rule's placement against a copy being deleted ----------------------------------------------
async def test_a_copy_a_rule_placed_while_it_was_being_deleted_is_asked_for_again_and_made(
    catalogue: Catalogue,
) -> None:
    item = await _reapable_copy(catalogue)
    assert await catalogue.replication.begin_delete(
        item.replica_id
    )  # the reaper claimed it, deletes the bytes
    await catalogue.replication.add_rule(LATE)
    assert await catalogue.replication.plan_copies([("x", "d", {})], [LATE], TABLE) == [
        []
    ]  # a lock, no request

    asked_again = await catalogue.replication.finish_delete(item)  # the bytes are gone

    assert await _state_on_disk2(catalogue) == "queued"  # a lock holds it: asked for again
    assert asked_again is True
    (again,) = await _requests_in_outbox(catalogue)  # published by any daemon's outbox relay
    assert (again.name, again.destination, again.rule_id) == ("x", "disk2", "late")
    task = await catalogue.replication.replica_task("x", "disk2")
    assert task is not None and task.needed and task.state == "queued"  # the replicator copies it
    await catalogue.replication.record_copies([CopyRecord(again.id, "x", "disk2", "x", 1, "disk1")])
    assert await _state_on_disk2(catalogue) == "available"
    assert await catalogue.replication.reapable() == []  # the rule holds it
    history = [(e.type, e.storage) for e in await catalogue.queries.history("x")]
    assert history[-2:] == [("replica.deleted", "disk2"), ("replica.created", "disk2")]


async def test_a_copy_nobody_locked_meanwhile_is_just_gone(catalogue: Catalogue) -> None:
    item = await _reapable_copy(catalogue)
    assert await catalogue.replication.begin_delete(item.replica_id)
    assert await catalogue.replication.finish_delete(item) is False
    assert await _state_on_disk2(catalogue) is None
    assert await _requests_in_outbox(catalogue) == []


def _place_late(others: Interlude) -> Callable[[Connection], list[list[replication.Wanted]]]:
    def place(conn: Connection) -> list[list[replication.Wanted]]:
        # Right after it read the file's copies, before it writes its lock.
        others.install(conn, "replicas.state FROM replicas")
        return replication.plan_copies(conn, [("x", "d", {})], [LATE], TABLE)

    return place


async def test_the_reapers_end_waits_for_a_placement_that_read_the_copy_deleting(
    catalogue: Catalogue, second: Catalogue
) -> None:
    item = await _reapable_copy(catalogue)
    assert await catalogue.replication.begin_delete(item.replica_id)
    await catalogue.replication.add_rule(LATE)

    others = Interlude(lambda: second.replication.finish_delete(item))
    assert await catalogue.write(_place_late(others)) == [[]]  # read: deleting (present)

    asked_again = await others.result()
    assert await _state_on_disk2(catalogue) == "queued"  # the end saw the lock: asked for again
    assert asked_again is True
    assert [(x.name, x.destination) for x in await _requests_in_outbox(catalogue)] == [("x", "disk2")]


async def test_the_reapers_claim_waits_for_a_placement_that_read_the_copy_available(
    catalogue: Catalogue, second: Catalogue
) -> None:
    item = await _reapable_copy(catalogue)
    await catalogue.replication.add_rule(LATE)

    others = Interlude(lambda: second.replication.begin_delete(item.replica_id))
    assert await catalogue.write(_place_late(others)) == [[]]  # read: available

    assert await others.result() is False  # the claim saw the lock
    assert await _state_on_disk2(catalogue) == "available"
