"""Replicator faults with a remote destination, against the real XRootD server: the server stopped
while copies are due, an export that fills up, an export that refuses writes. Each ends in its
reason, the breaker pauses the endpoint instead of burning attempts, the endpoint resumes when the
server is well, nothing is lost and no partial file stays under its final name."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from common.catalogue import Catalogue
from common.config import Settings, load_settings
from common.storage.devserver import LocalXrootd
from daemons.ingest.handlers import service as ingest_service
from daemons.replicator.handlers import service as replicator_service
from tests.conftest import queue_depth, running, wait_for
from tests.replication_fixtures import (
    count_on,
    drain,
    events_of,
    make_files,
    max_attempts,
    name_of,
    publish_ready,
    replication_config,
)
from tests.xrootd_fixtures import remote_dir, xrootd_server  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SERVICES = [ingest_service, replicator_service]
SERVER_GONE = ("endpoint_unavailable", "transfer_timeout")


def remote_settings(tmp_path: Path, tag: str, url: str, **extra: str) -> Settings:
    endpoint = f'backend = "xrootd"\nurl = "{url}"\ntransfer_timeout_floor = 10'
    return load_settings(
        replication_config(
            tmp_path,
            tag,
            **{"storage.remote": endpoint, "rules.offsite": 'datasets = ".*"\nendpoints = "remote"', **extra},
        )
    )


async def health_of(settings: Settings, name: str) -> tuple[str, str | None]:
    async with await Catalogue.open(settings.catalogue.url) as cat:
        endpoint = {e.name: e for e in await cat.endpoints.all()}[name]
    return endpoint.health, endpoint.health_reason


async def health_is(settings: Settings, name: str, health: str) -> bool:
    return (await health_of(settings, name))[0] == health


def assert_on_server(directory: Path, settings: Settings, files: list[tuple[Path, bytes]]) -> None:
    for path, content in files:
        assert (directory / name_of(settings, path)).read_bytes() == content
    found = sorted(p.name for p in directory.rglob("*") if p.is_file())
    assert found == sorted(p.name for p, _ in files), "a temporary or a stray file stayed"


async def test_server_stopped_pauses_the_endpoint_and_everything_completes_when_it_is_back(
    tmp_path: Path,
    tag: str,
    broker,
    xrootd_server: LocalXrootd,  # noqa: F811
    remote_dir: str,  # noqa: F811
) -> None:
    settings = remote_settings(tmp_path, tag, f"{xrootd_server.root_url('site-a')}/{remote_dir}")
    files = make_files(settings, 20, size=100_000)
    xrootd_server.stop()
    try:
        async with running(SERVICES, settings):
            watch = await events_of(broker, settings, "endpoint.*")
            await publish_ready(broker, settings, files)
            await wait_for(lambda: health_is(settings, "remote", "paused"), timeout=120)
            _, reason = await health_of(settings, "remote")
            # Refused at once, or the client library's reconnection attempts outlast the deadline.
            assert reason is not None and reason.startswith(SERVER_GONE)
            xrootd_server.start()
            await wait_for(lambda: _copied(settings, 20), timeout=180)
            await wait_for(lambda: health_is(settings, "remote", "ok"), timeout=60)
            events = await drain(watch)
    finally:
        if xrootd_server.process is None or xrootd_server.process.poll() is not None:
            xrootd_server.start()
    kinds = [k for k, _ in events]
    assert kinds[0] == "endpoint.paused" and events[0][1]["reason"] in SERVER_GONE
    assert "endpoint.resumed" in kinds
    assert await queue_depth(broker, settings.dead_queue("replicator")) == 0
    assert await max_attempts(settings) <= 2  # the breaker stopped the attempts, none went dead
    assert_on_server(xrootd_server.path("site-a", remote_dir), settings, files)


async def test_full_export_is_disk_full_paused_and_recovers_when_space_is_added(
    tmp_path: Path,
    tag: str,
    broker,
    xrootd_server: LocalXrootd,  # noqa: F811
    remote_dir: str,  # noqa: F811
) -> None:
    export = xrootd_server.path("site-full")
    if not export.is_mount():
        pytest.skip("the full export is a tmpfs mounted by the server's start (needs root)")
    settings = remote_settings(tmp_path, tag, f"{xrootd_server.root_url('site-full')}/{remote_dir}")
    files = make_files(settings, 12, size=1024 * 1024)  # 12 MiB into a 4 MiB file system
    try:
        async with running(SERVICES, settings):
            watch = await events_of(broker, settings, "endpoint.*")
            await publish_ready(broker, settings, files)
            await wait_for(lambda: health_is(settings, "remote", "paused"), timeout=120)
            # The event goes out through the outbox after the pause's commit: wait for it.
            paused: list[tuple[str, dict]] = []  # type: ignore[type-arg]

            async def heard() -> bool:
                paused.extend(await drain(watch))
                return bool(paused)

            await wait_for(heard, timeout=30)
            assert paused[0][0] == "endpoint.paused" and paused[0][1]["reason"] == "disk_full"
            # Nothing partial under a final name while full: every file there is complete.
            for path, content in files:
                there = export / remote_dir / name_of(settings, path)
                assert not there.exists() or there.read_bytes() == content
            subprocess.run(["mount", "-o", "remount,size=64m", str(export)], check=True)  # space added
            await wait_for(lambda: _copied(settings, 12), timeout=180)
    finally:
        subprocess.run(["mount", "-o", f"remount,size={xrootd_server.full_bytes}", str(export)], check=False)
    assert await queue_depth(broker, settings.dead_queue("replicator")) == 0
    assert_on_server(export / remote_dir, settings, files)
    subprocess.run(["rm", "-rf", str(export / remote_dir)], check=False)  # give the space back


async def test_read_only_export_pauses_the_endpoint_without_dead_letters(
    tmp_path: Path,
    tag: str,
    broker,
    xrootd_server: LocalXrootd,  # noqa: F811
    remote_dir: str,  # noqa: F811
) -> None:
    settings = remote_settings(tmp_path, tag, f"{xrootd_server.root_url('site-ro')}/{remote_dir}")
    files = make_files(settings, 10)
    async with running(SERVICES, settings):
        await publish_ready(broker, settings, files)
        await wait_for(lambda: health_is(settings, "remote", "paused"), timeout=120)
        _, reason = await health_of(settings, "remote")
        assert reason is not None and reason.startswith("destination_not_writable")
        await wait_for(lambda: _waiting(settings, "remote", 10), timeout=120)
    assert await queue_depth(broker, settings.dead_queue("replicator")) == 0
    assert not (xrootd_server.path("site-ro") / remote_dir).exists()


async def _copied(settings: Settings, n: int) -> bool:
    return await count_on(settings, "remote") == n


async def _waiting(settings: Settings, name: str, n: int) -> bool:
    async with await Catalogue.open(settings.catalogue.url) as cat:
        return await cat.replication.waiting_count(name) == n
