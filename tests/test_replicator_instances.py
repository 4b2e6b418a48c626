"""Two replicator instances on one catalogue (SQLite and PostgreSQL), against the real broker:
``max_transfers`` holds for the endpoint, not per instance, and both instances copy; the breaker
one instance opens parks the other's copies too, and one probe resumes the endpoint for both."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from common.catalogue import Catalogue
from common.catalogue.schema import transfer_slots
from common.catalogue.sql import utcnow
from common.config import load_settings
from daemons.ingest.handlers import service as ingest_service
from daemons.replicator.handlers import service as replicator_service
from tests.catalogue_fixtures import catalogue_url
from tests.conftest import queue_depth, running, wait_for
from tests.replication_fixtures import (
    count_on,
    drain,
    events_of,
    make_files,
    max_attempts,
    publish_ready,
    remount,
    replication_config,
    tmpfs,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
FIXTURES = (catalogue_url,)  # on SQLite and on PostgreSQL

FILES = 80
SLOW = 0.03  # seconds added to each copy, so that copies overlap


class Concurrency:
    """Copies into one endpoint running at once, whichever instance runs them."""

    def __init__(self) -> None:
        self.now = 0
        self.most = 0
        self.by_instance: Counter[str] = Counter()

    def wrap(self, instance: str, copy: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.now += 1
            self.most = max(self.most, self.now)
            self.by_instance[instance] += 1
            try:
                await asyncio.sleep(SLOW)
                return await copy(*args, **kwargs)
            finally:
                self.now -= 1

        return counted


def _replicator(process: Any) -> Any:
    return next(r.resources for r in process.runners if r.service.name == "replicator")


async def test_two_instances_never_copy_more_than_max_transfers_into_one_endpoint_together(
    tmp_path: Path, tag: str, broker: Any, catalogue_url: str
) -> None:
    path = replication_config(
        tmp_path, tag,
        **{"rules.offsite": 'datasets = ".*"\nendpoints = "disk2"', "catalogue": f'url = "{catalogue_url}"'},
    )  # fmt: skip
    # disk2 takes two copies at once; every copy is a transfer of its own (no batches of small
    # ones), so each instance alone would run two: four together without the shared slots.
    text = path.read_text().replace(
        'root = "storage/disk2"', 'root = "storage/disk2"\nmax_transfers = 2\nbatch_copy_bytes = 0'
    )
    path.write_text(text)
    settings = load_settings(path)
    files = make_files(settings, FILES, size=4096)
    seen = Concurrency()
    rows_most = 0
    holders: set[str] = set()

    async def sample_slot_rows(cat: Catalogue) -> None:
        nonlocal rows_most
        while True:
            held = await cat.transfers.slot_holders("disk2", utcnow())
            rows_most = max(rows_most, sum(held.values()))
            holders.update(held)
            await asyncio.sleep(0.01)

    async with (
        running([ingest_service, replicator_service], settings) as a,
        running([replicator_service], settings) as b,
        await Catalogue.open(settings.catalogue.url) as cat,
    ):
        ids = {}
        for name, process in (("a", a), ("b", b)):
            res = _replicator(process)
            ids[name] = res.lease.id
            disk2 = res.storages["disk2"]
            disk2.copy_verified = seen.wrap(name, disk2.copy_verified)
        assert ids["a"] != ids["b"]
        assert sorted(await cat.instances.live_ids("replicator", utcnow())) == sorted(ids.values())
        sampler = asyncio.create_task(sample_slot_rows(cat))
        try:
            # In waves, so that ingest asks for the copies in several requests, which the broker
            # hands to both instances.
            for start in range(0, FILES, 10):
                await publish_ready(broker, settings, files[start : start + 10])
                await asyncio.sleep(0.2)
            await wait_for(lambda: _copied(settings, FILES), timeout=120)
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
    assert seen.most == 2, f"{seen.most} copies into disk2 at once"  # the limit, and reached
    assert seen.by_instance["a"] > 0 and seen.by_instance["b"] > 0, seen.by_instance
    assert sum(seen.by_instance.values()) >= FILES
    assert 1 <= rows_most <= 2 and holders <= set(ids.values())
    # Both stopped cleanly: their slots and leases are gone.
    async with await Catalogue.open(settings.catalogue.url) as cat:
        holders_left = await cat.read(lambda conn: set(conn.scalars(select(transfer_slots.c.holder))))
        assert holders_left == {None}
        assert await cat.instances.live_ids("replicator", utcnow()) == []


async def _copied(settings: Any, n: int) -> bool:
    return await count_on(settings, "disk2") >= n


async def test_one_instances_pause_holds_for_both_and_one_probe_resumes_the_endpoint(
    tmp_path: Path, tag: str, broker: Any, catalogue_url: str
) -> None:
    """disk2 read-only (a tmpfs remounted; root only): one ``endpoint.paused`` whichever instance
    counted the failures, every copy parked by both, then after ``rw`` one ``endpoint.resumed``
    and every copy made."""
    path = replication_config(
        tmp_path, tag,
        **{"rules.cnaf": 'datasets = ".*"\nendpoints = "disk2"', "catalogue": f'url = "{catalogue_url}"'},
    )  # fmt: skip
    settings = load_settings(path)
    files = make_files(settings, 30)
    with tmpfs(settings.storage["disk2"].root, "64m") as root:
        remount(root, "ro")
        async with (
            running([ingest_service, replicator_service], settings) as a,
            running([replicator_service], settings) as b,
        ):
            watch = await events_of(broker, settings, "endpoint.*")
            parked: Counter[str] = Counter()  # copies each instance was told to park
            for name, process in (("a", a), ("b", b)):
                _count_waits(_replicator(process).health, name, parked)
            for start in range(0, 30, 10):
                await publish_ready(broker, settings, files[start : start + 10])
                await asyncio.sleep(0.2)
            await wait_for(lambda: _waiting(settings, "disk2", 30), timeout=60)
            views = [_replicator(p).health.view("disk2") for p in (a, b)]
            assert {v.health for v in views} <= {"paused", "probing"}
            assert parked["a"] > 0 and parked["b"] > 0, parked  # both instances held back
            remount(root, "rw")
            await wait_for(lambda: _copied(settings, 30), timeout=60)
            await wait_for(lambda: _health_is(settings, "disk2", "ok"), timeout=30)
        events = await drain(watch)
    kinds = [k for k, _ in events]
    assert kinds.count("endpoint.paused") == 1 and kinds[0] == "endpoint.paused", kinds
    assert kinds.count("endpoint.resumed") == 1, kinds
    # Before the pause reached an instance, its copies failed at most once each (retried later).
    assert await max_attempts(settings) <= 2
    assert await queue_depth(broker, settings.dead_queue("replicator")) == 0


async def _waiting(settings: Any, name: str, n: int) -> bool:
    async with await Catalogue.open(settings.catalogue.url) as c:
        return await c.replication.waiting_count(name) == n


async def _health_is(settings: Any, name: str, health: str) -> bool:
    async with await Catalogue.open(settings.catalogue.url) as c:
        return {e.name: e.health for e in await c.endpoints.all()}[name] == health


def _count_waits(health: Any, instance: str, parked: Counter[str]) -> None:
    admit = health.admit

    async def counted(name: str) -> str:
        decided: str = await admit(name)
        if decided == "wait":
            parked[instance] += 1
        return decided

    health.admit = counted
