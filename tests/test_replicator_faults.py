"""Replicator faults with real file systems and real processes: a destination made read-only for a
while, a destination disk that fills up, an operator taking an endpoint offline, the daemon killed
with SIGKILL mid-run. Work for a sick endpoint waits (parked, no attempt burnt) and completes once
the endpoint is well; nothing is copied twice, nothing is lost, no temporary file stays."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from common.catalogue import Catalogue
from common.config import Settings, load_settings
from common.storage.checksum import adler32_of_file
from daemons.ingest.handlers import service as ingest_service
from daemons.replicator.handlers import service as replicator_service
from tests.cli_fixtures import spool
from tests.conftest import queue_depth, running, start_daemon, wait_for
from tests.replication_fixtures import (
    available_on,
    count_on,
    drain,
    events_of,
    make_files,
    max_attempts,
    name_of,
    publish_ready,
    registered,
    remount,
    replication_config,
    temp_files,
    tmpfs,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parent.parent
TO_DISK2 = {"rules.cnaf": 'datasets = ".*"\nendpoints = "disk2"'}


async def all_copied(settings: Settings, n: int) -> bool:
    return await count_on(settings, "disk2") == n


def assert_copies_verified(settings: Settings, files: list[tuple[Path, bytes]]) -> None:
    root = settings.storage["disk2"].root
    for src, content in files:
        assert (root / name_of(settings, src)).read_bytes() == content
    assert temp_files(root) == []


async def test_read_only_destination_pauses_the_endpoint_then_everything_completes(tmp_path, tag, broker):
    path = replication_config(tmp_path, tag, **TO_DISK2)
    settings = load_settings(path)
    files = make_files(settings, 30)
    with tmpfs(settings.storage["disk2"].root, "64m") as root:
        remount(root, "ro")
        async with running([ingest_service, replicator_service], settings):
            watch = await events_of(broker, settings, "endpoint.*")
            await publish_ready(broker, settings, files)
            await wait_for(lambda: _health_is(settings, "disk2", "paused"), timeout=60)
            listed = {r["name"]: r for r in json.loads(spool(path, "rse", "list", "--json").stdout)}
            assert listed["disk2"]["health"] == "paused"
            assert "destination_not_writable" in listed["disk2"]["health_reason"]
            await wait_for(lambda: _waiting(settings, "disk2", 30), timeout=60)
            remount(root, "rw")
            await wait_for(lambda: all_copied(settings, 30), timeout=60)
            await wait_for(lambda: _health_is(settings, "disk2", "ok"), timeout=30)
        assert_copies_verified(settings, files)
        events = await drain(watch)
    kinds = [k for k, _ in events]
    assert kinds[0] == "endpoint.paused" and "endpoint.resumed" in kinds
    assert events[0][1]["reason"] == "destination_not_writable"
    # Breaker opened after 3 failures: at most those burnt one attempt; nothing went dead.
    assert await queue_depth(broker, settings.dead_queue("replicator")) == 0
    assert await max_attempts(settings) <= 2


async def _health_is(settings: Settings, name: str, health: str) -> bool:
    async with await Catalogue.open(settings.catalogue.url) as c:
        return {e.name: e.health for e in await c.endpoints.all()}[name] == health


async def _waiting(settings: Settings, name: str, n: int) -> bool:
    async with await Catalogue.open(settings.catalogue.url) as c:
        return await c.replication.waiting_count(name) == n


async def test_full_destination_disk_is_classified_paused_and_recovers(tmp_path, tag, broker):
    settings = load_settings(replication_config(tmp_path, tag, **TO_DISK2))
    files = make_files(settings, 12, size=256 * 1024)  # 3 MiB in all, into a 1 MiB file system
    with tmpfs(settings.storage["disk2"].root, "1m") as root:
        async with running([ingest_service, replicator_service], settings):
            watch = await events_of(broker, settings, "endpoint.*")
            await publish_ready(broker, settings, files)
            await wait_for(lambda: _health_is(settings, "disk2", "paused"), timeout=60)
            # The event goes out through the outbox after the pause's commit: wait for it.
            paused: list[tuple[str, dict]] = []  # type: ignore[type-arg]

            async def heard() -> bool:
                paused.extend(await drain(watch))
                return bool(paused)

            await wait_for(heard, timeout=30)
            assert paused[0][0] == "endpoint.paused" and paused[0][1]["reason"] == "disk_full"
            remount(root, "size=16m")  # the operator adds space
            await wait_for(lambda: all_copied(settings, 12), timeout=60)
        assert_copies_verified(settings, files)
    assert await queue_depth(broker, settings.dead_queue("replicator")) == 0


async def test_endpoint_set_down_by_the_operator_waits_without_attempts(tmp_path, tag, broker):
    path = replication_config(tmp_path, tag, **TO_DISK2)
    settings = load_settings(path)
    files = make_files(settings, 10)
    async with running([ingest_service, replicator_service], settings):
        assert spool(path, "rse", "set", "disk2", "--state", "down").returncode == 0
        await wait_for(lambda: _state_seen(settings), timeout=10)
        await publish_ready(broker, settings, files)
        await wait_for(lambda: _waiting(settings, "disk2", 10), timeout=60)
        assert await available_on(settings, "disk2") == set()
        assert spool(path, "rse", "set", "disk2", "--state", "online").returncode == 0
        await wait_for(lambda: all_copied(settings, 10), timeout=60)
    assert await max_attempts(settings) == 0  # no request ever failed
    bad = spool(path, "rse", "set", "nosuch", "--state", "down")
    assert bad.returncode == 1 and "no storage endpoint named 'nosuch'" in bad.stderr


async def _state_seen(settings: Settings) -> bool:
    async with await Catalogue.open(settings.catalogue.url) as c:
        return {e.name: e.state for e in await c.endpoints.all()}["disk2"] == "down"


async def test_replicator_killed_mid_run_every_copy_exactly_once_and_verified(tmp_path, tag, broker):
    n = 1000
    path = replication_config(tmp_path, tag, **TO_DISK2)
    settings = load_settings(path)
    files = make_files(settings, n, size=64 * 1024)
    async with running([ingest_service], settings):
        await publish_ready(broker, settings, files)
        await wait_for(lambda: registered(settings, n), timeout=120)
    log = tmp_path / "replicator.log"
    proc = start_daemon(path, "replicator", log)
    try:
        for threshold in (150, 500):
            await wait_for(lambda t=threshold: _copied_at_least(settings, t), timeout=120, interval=0.02)
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=10) == -signal.SIGKILL
            assert await count_on(settings, "disk2") < n, "the kill came too late to prove anything"
            proc = start_daemon(path, "replicator", log)
        await wait_for(lambda: all_copied(settings, n), timeout=180, interval=0.2)
        await wait_for(lambda: _depth_is(broker, settings.queue("replicator"), 0), timeout=60)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    assert code == 0, log.read_text()[-3000:]
    assert await queue_depth(broker, settings.dead_queue("replicator")) == 0
    root = settings.storage["disk2"].root
    on_disk = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert on_disk == sorted(name_of(settings, p) for p, _ in files)  # exactly once, no temp files
    async with await Catalogue.open(settings.catalogue.url) as c:
        counts = await c.queries.counts()
        for info in await c.queries.list_files(limit=n):
            assert adler32_of_file(root / info.name) == info.adler32
    assert counts.replicas == {"available": 2 * n}


async def _copied_at_least(settings: Settings, n: int) -> bool:
    return await count_on(settings, "disk2") >= n


async def _depth_is(broker, name: str, n: int) -> bool:  # type: ignore[no-untyped-def]
    return await queue_depth(broker, name) == n
