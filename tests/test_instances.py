"""Instances of a daemon sharing one catalogue (``common.catalogue.instances``,
``common.instance``): leases, who counts as dead, roles held by one instance at a time."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from datetime import timedelta

from sqlalchemy import insert, select

from common.catalogue import Catalogue
from common.catalogue import instances as db
from common.catalogue.schema import files, ingest_claims, recall_files, recalls, replicas, storage_endpoints
from common.catalogue.sql import utcnow
from common.instance import InstanceLease, held_lease
from tests.catalogue_fixtures import catalogue, catalogue_url, rec

FIXTURES = (catalogue, catalogue_url)  # every test runs on SQLite and on PostgreSQL


async def test_a_lease_renewed_in_time_stands_and_one_that_ran_out_is_lost(catalogue: Catalogue) -> None:
    stops: list[str] = []
    lease = InstanceLease(catalogue, "tape", "node-a", 3.0, on_lost=lambda: stops.append("stop"))
    await lease.start()
    try:
        assert lease.id.startswith("tape@node-a:") and lease.valid()
        assert [i.id for i in await catalogue.instances.listing("tape")] == [lease.id]
        assert await lease.renew() and stops == []
        # The process paused past its lease (or the catalogue was unreachable): another instance may
        # already be settling its work, so the lease is not renewed but lost, and the process stops.
        now = utcnow()
        await catalogue.instances.renew(lease.id, now, now - timedelta(seconds=1))
        assert not await lease.renew()
        assert stops == ["stop"] and lease.lost and not lease.valid()
        assert not await lease.renew() and stops == ["stop"]  # said once
    finally:
        await lease.stop()
    # A lost lease's row stays (expired) for the successor to see as dead; pruning removes it.
    assert await catalogue.instances.live_ids("tape", utcnow()) == []
    assert await catalogue.instances.prune(utcnow() + timedelta(seconds=1)) == 1


async def test_a_clean_stop_hands_over_at_once(catalogue: Catalogue) -> None:
    async with (
        held_lease(catalogue, "ingest", "node-a", 30.0) as a,
        held_lease(catalogue, "ingest", "node-b", 30.0) as b,
    ):
        assert a.id != b.id
        assert await catalogue.instances.live_ids("ingest", utcnow()) == sorted([a.id, b.id])
        assert await catalogue.instances.live_ids("tape", utcnow()) == []
    assert await catalogue.instances.listing() == []


async def test_work_of_dead_missing_and_no_holders_is_settleable_a_live_ones_is_not(
    catalogue: Catalogue,
) -> None:
    async with held_lease(catalogue, "ingest", "node-a", 30.0) as alive:
        dead = InstanceLease(catalogue, "ingest", "node-b", 3.0, on_lost=lambda: None)
        await dead.start()
        await dead.stop()  # gone at once
        expired = InstanceLease(catalogue, "ingest", "node-c", 3.0, on_lost=lambda: None)
        await expired.start()
        now = utcnow()
        await catalogue.instances.renew(expired.id, now, now - timedelta(seconds=1))

        def settleable(conn):  # type: ignore[no-untyped-def]
            conn.execute(insert(ingest_claims), [
                {"name": name, "holder": holder, "claimed": now}
                for name, holder in [("a", alive.id), ("b", dead.id), ("c", expired.id), ("d", "unknown")]
            ])  # fmt: skip
            stmt = select(ingest_claims.c.name).where(db.held_by_dead(ingest_claims.c.holder, utcnow()))
            return sorted(conn.scalars(stmt))

        assert await catalogue.write(settleable) == ["b", "c", "d"]
        await expired.stop()


async def test_a_role_has_one_holder_until_released_or_expired(catalogue: Catalogue) -> None:
    now = utcnow()
    later = now + timedelta(seconds=30)
    results = await asyncio.gather(
        *(catalogue.instances.claim_role("monitor", f"m{i}", now, later) for i in range(4))
    )
    assert sorted(results) == [False, False, False, True]
    holder = await catalogue.instances.role_holder("monitor", now)
    assert holder == f"m{results.index(True)}"
    other = "m0" if holder != "m0" else "m1"
    assert await catalogue.instances.claim_role("monitor", holder, now, later)  # renewing its own
    assert not await catalogue.instances.claim_role("monitor", other, now, later)
    # Expired: the next claimant takes it; the old holder's release then leaves the new one alone.
    assert await catalogue.instances.claim_role(
        "monitor", other, later + timedelta(seconds=1), later + timedelta(seconds=60)
    )
    await catalogue.instances.release_role("monitor", holder)
    assert await catalogue.instances.role_holder("monitor", later + timedelta(seconds=2)) == other
    await catalogue.instances.release_role("monitor", other)
    assert await catalogue.instances.role_holder("monitor", now) is None


async def test_a_restarted_instance_forgets_its_nodes_dead_predecessors_only(catalogue: Catalogue) -> None:
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid, now = int(gone.stdout), utcnow()
    later = now + timedelta(seconds=300)
    rows = {
        "dead-here": ("tape", "node-a", dead_pid),  # killed on this node: forgotten at once
        "alive-here": ("tape", "node-a", os.getpid()),  # a neighbour process on this node
        "dead-elsewhere": ("tape", "node-b", dead_pid),  # another node's pid means nothing here
        "other-daemon": ("ingest", "node-a", dead_pid),
    }
    for instance_id, (daemon, node, pid) in rows.items():
        await catalogue.instances.register(db.InstanceInfo(instance_id, daemon, node, pid, now, now, later))
    lease = InstanceLease(catalogue, "tape", "node-a", 30.0)
    await lease.start()
    try:
        left = {i.id for i in await catalogue.instances.listing()}
        assert left == {"alive-here", "dead-elsewhere", "other-daemon", lease.id}
    finally:
        await lease.stop()


async def test_work_in_progress_past_its_limit_is_named_with_its_holder(catalogue: Catalogue) -> None:
    await catalogue.ingest.register([rec("a"), rec("b"), rec("c")])
    now = utcnow()
    old, recent = now - timedelta(seconds=600), now - timedelta(seconds=5)

    def lay(conn):  # type: ignore[no-untyped-def]
        ids = dict(conn.execute(select(files.c.name, files.c.id)).all())
        tape = conn.scalar(select(storage_endpoints.c.id).where(storage_endpoints.c.name == "tape1"))
        conn.execute(insert(replicas), [
            {"file_id": ids[n], "storage_id": tape, "pfn": n, "state": "archiving", "cartridge": "V00001",
             "created": old, "updated": upd, "holder": "tape@node-a:12:ab", "priority": 3}
            for n, upd in (("a", old), ("b", recent))
        ])  # fmt: skip
        conn.execute(insert(recalls), [
            {"id": rid, "state": "active", "destination": "disk1", "priority": 3, "files": 2, "done": 1,
             "failed": 0, "created": old, "updated": upd, "announced": False}
            for rid, upd in (("r-old", old), ("r-new", recent))
        ])  # fmt: skip
        conn.execute(insert(recall_files), [
            {"recall_id": "r-old", "name": "c", "file_id": ids["c"], "state": "staging",
             "cartridge": "V00002", "fseq": 4, "updated": old, "holder": "recall@node-b:34:cd",
             "announced": False},
        ])  # fmt: skip

    await catalogue.write(lay)
    limits = {"tape_write": 300.0, "tape_read": 300.0, "recall": 300.0}
    found = {w.kind: w for w in await catalogue.instances.stalled_work(limits, now)}
    assert found.keys() == {"tape_write", "tape_read", "recall"}
    w = found["tape_write"]
    assert (w.holder, w.items, w.since, w.example) == ("tape@node-a:12:ab", 1, old, "a on V00001")
    r = found["tape_read"]
    assert (r.holder, r.items, r.example) == ("recall@node-b:34:cd", 1, "c from V00002")
    assert (found["recall"].items, found["recall"].example) == (1, "recall r-old: 1 of 2 files settled")
    # Within their limits, nothing is stalled; a kind without a limit is not looked at.
    assert await catalogue.instances.stalled_work({"tape_write": 3600.0}, now) == []
