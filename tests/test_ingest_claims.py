"""Two ingest instances and one new name: one copies and registers it, the other waits
(``common.catalogue.ingest_claims``, ``daemons.ingest.handlers``).

Catalogue level on SQLite and PostgreSQL: who gets a name, a dead holder's name taken over by one
survivor only, registration ending the claim. Process level: two ingest processes on one
PostgreSQL catalogue receiving, for each new name, two announcements of different files at once:
each name registered once, its bytes on disk the registered ones, the other announcement a
``name_conflict``."""

from __future__ import annotations

import asyncio
import random
import signal
import zlib
from datetime import timedelta
from pathlib import Path

import pytest

from common.catalogue import Catalogue
from common.catalogue.ingest_claims import REGISTERED
from common.catalogue.sql import utcnow
from common.cli.publish import publish_events
from common.config import load_settings
from common.instance import InstanceLease
from common.storage import is_temp_name
from common.storage.checksum import adler32_of_file
from tests.catalogue_fixtures import catalogue, catalogue_url, pg_database, rec
from tests.conftest import dead_reasons, start_daemon, wait_for, write_config

FIXTURES = (catalogue, catalogue_url)  # the catalogue tests run on SQLite and on PostgreSQL
DATASET = "lst1.20261123.run012345.dl0"


async def instance(catalogue: Catalogue, node: str, lease: float = 30.0) -> InstanceLease:
    lease_ = InstanceLease(catalogue, "ingest", node, lease, on_lost=lambda: None)
    await lease_.start()
    return lease_


async def test_a_name_is_one_instances_until_registered_or_its_holder_dies(catalogue: Catalogue) -> None:
    a, b, c = [await instance(catalogue, n) for n in ("node-a", "node-b", "node-c")]
    try:
        now = utcnow()
        assert await catalogue.ingest.claim_names(["x", "y"], a.id, now) == {}
        assert await catalogue.ingest.claim_names(["x", "z"], b.id, now) == {"x": a.id}
        assert await catalogue.ingest.claim_names(["x"], a.id, now) == {}  # its own again (a retry)
        # Registered: the claim is gone with the registration, and a claim now is refused: a copy
        # would overwrite the registered file (the event is retried and its look-up decides).
        [outcome] = await catalogue.ingest.register([rec("x")])
        assert outcome.outcome == "registered"
        assert await catalogue.ingest.claim_names(["x"], b.id, now) == {"x": REGISTERED}
        assert await catalogue.ingest.claim_names(["x"], a.id, now) == {"x": REGISTERED}
        # A failed attempt gives the name back.
        await catalogue.ingest.release_names(["y"], a.id)
        assert await catalogue.ingest.claim_names(["y"], c.id, now) == {}
        # b's lease runs out: its name "z" goes to the next claimant, once.
        await catalogue.instances.renew(b.id, utcnow(), utcnow() - timedelta(seconds=1))
        taken = await asyncio.gather(
            catalogue.ingest.claim_names(["z", "w"], a.id, utcnow()),
            catalogue.ingest.claim_names(["w", "z"], c.id, utcnow()),
        )
        assert sorted(len(t) for t in taken) == [0, 2], taken
        winner = a.id if taken[0] == {} else c.id
        assert all(holder == winner for t in taken for holder in t.values())
        # Claims of dead instances are dropped at an instance's start.
        await catalogue.instances.renew(c.id, utcnow(), utcnow() - timedelta(seconds=1))
        assert await catalogue.ingest.drop_dead_claims(utcnow()) == (3 if winner == c.id else 1)  # and "y"
    finally:
        for lease in (a, b, c):
            await lease.stop()


async def test_many_instances_claiming_at_once_get_each_name_once(catalogue: Catalogue) -> None:
    leases = [await instance(catalogue, f"node-{i}") for i in range(4)]
    names = [f"run/{i:04d}" for i in range(300)]
    try:
        orders = [random.Random(i).sample(names, len(names)) for i in range(len(leases))]
        refused = await asyncio.gather(
            *(
                catalogue.ingest.claim_names(o, lease.id, utcnow())
                for o, lease in zip(orders, leases, strict=True)
            )
        )
        owner: dict[str, str] = {}
        for lease, r in zip(leases, refused, strict=True):
            for name in set(names) - r.keys():
                assert name not in owner, f"{name} claimed by {owner[name]} and {lease.id}"
                owner[name] = lease.id
        assert owner.keys() == set(names)
    finally:
        for lease in leases:
            await lease.stop()


# --- two ingest processes ------------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.slow
async def test_two_ingest_processes_racing_on_new_names_register_each_once(tmp_path: Path, tag: str) -> None:
    n = 120
    async with pg_database() as url:
        config = write_config(
            tmp_path / "spool.toml", tmp_path / "var", tag,
            catalogue=f'url = "{url}"\nlease_seconds = 5',
        )  # fmt: skip
        settings = load_settings(config)
        landing = settings.landing_areas["lst1"]
        rng = random.Random(7)
        events, contents = [], {}
        for i in range(n):
            name = f"{DATASET}/subrun{i:05d}.fits.fz"
            for side in ("a", "b"):  # two different files announced under one name
                path = landing / side / f"{i:05d}.fits.fz"
                path.parent.mkdir(parents=True, exist_ok=True)
                data = rng.randbytes(256 * 1024)
                path.write_bytes(data)
                adler = f"{zlib.adler32(data):08x}"
                contents.setdefault(name, set()).add(adler)
                events.append({
                    "specversion": "1.0", "id": f"ev-{side}-{i}", "source": "test-daq", "type": "file.ready",
                    "data": {"path": str(path), "name": name, "dataset": DATASET, "size": len(data),
                             "adler32": adler},
                })  # fmt: skip
        procs = [start_daemon(config, "ingest", tmp_path / f"ingest-{k}.log") for k in range(2)]
        try:
            async with await Catalogue.open(url) as cat:

                async def both_consuming() -> bool:
                    return len(await cat.instances.live_ids("ingest", utcnow())) == 2

                await wait_for(both_consuming, timeout=60)
                await asyncio.sleep(1.0)  # consumers attached after their lease
                await publish_events(settings, events, quiet=True)

                async def settled() -> bool:
                    counts = await cat.queries.counts()
                    return counts.files == n and counts.requests.get("failed", 0) >= n

                await wait_for(settled, timeout=120)
                files = await cat.queries.list_files(dataset=DATASET, limit=n + 10)
                root = settings.storage["disk1"].root
                for f in files:
                    assert f.adler32 in contents[f.name]
                    assert adler32_of_file(root / f.name) == f.adler32, f"{f.name}: the other copy's bytes"
                assert [p for p in root.rglob("*") if is_temp_name(p.name)] == []
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                assert p.wait(timeout=60) == 0
        import aio_pika

        connection = await aio_pika.connect_robust(settings.bus.url)
        try:
            reasons = await dead_reasons(connection, settings)
        finally:
            await connection.close()
        assert sorted(set(reasons)) == ["name_conflict"] and len(reasons) == n
