"""The daemons' parts of a dataset's lifecycle, with real storage and a real catalogue (SQLite and
PostgreSQL): the ingest handler refusing a file whose dataset closes between its look-up and its
registration (the copy removed), and the replicator's lifecycle round run by two instances at once:
one dataset.completed, and a deleted dataset's bytes removed from the endpoints it serves."""

# Fixtures imported from catalogue_fixtures (not conftest) reappear as test parameters:
# ruff: noqa: F811

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from common.bus.publisher import RecordingPublisher
from common.bus.service import Context
from common.catalogue import Catalogue, CopyRecord
from common.catalogue import schema as s
from common.config import Settings, load_settings
from common.errors import Permanent
from common.messages import FileReady
from common.storage import open_storage
from daemons.ingest.handlers import ingest_file, open_resources
from daemons.replicator.datasets import lifecycle_round
from tests.catalogue_fixtures import catalogue_url, rec  # noqa: F401
from tests.conftest import write_config

DS = "lst1.20261123.run012345.dl0"


async def test_a_close_between_look_up_and_registration_refuses_the_file_and_removes_its_copy(settings):
    publisher = RecordingPublisher()
    async with open_resources(settings, publisher) as res:
        ctx = Context(daemon="ingest", settings=settings, publisher=publisher, resources=res)
        src = settings.landing_areas["lst1"] / "run012345/a.fits"
        src.parent.mkdir(parents=True)
        src.write_bytes(b"first")
        await ingest_file(FileReady(path=str(src), dataset=DS), ctx)  # the dataset exists, open
        look_up = res.lookups.submit

        async def look_up_then_close(key: tuple[str, str, str]) -> Any:
            known = await look_up(key)  # ingest sees the dataset open ...
            await res.catalogue.datasets.close(DS, "cli:alice", datetime.now(UTC))  # ... then it closes
            return known

        res.lookups.submit = look_up_then_close  # type: ignore[method-assign]
        late = src.with_name("late.fits")
        late.write_bytes(b"late")
        with pytest.raises(Permanent) as refused:
            await ingest_file(FileReady(path=str(late), dataset=DS), ctx)
        assert refused.value.reason == "dataset_closed"
    root = settings.storage["disk1"].root
    assert sorted(p.name for p in root.rglob("*") if p.is_file()) == ["a.fits"]


def replicator_settings(tmp_path: Path, tag: str, url: str) -> Settings:
    config = write_config(
        tmp_path / "spool.toml", tmp_path / "state", tag,
        catalogue=f'url = "{url}"', datasets="settle_seconds = 0",
        **{"storage.disk2": 'root = "storage/disk2"'},
    )  # fmt: skip
    return load_settings(config)


async def _ingested(cat: Catalogue, settings: Settings, names: list[str]) -> None:
    """Files registered with a copy on each disk endpoint, the bytes really there."""
    await cat.endpoints.sync(settings.storage)
    await cat.ingest.register([rec(n, pfn=n) for n in names])
    await cat.replication.record_copies([CopyRecord(f"r-{n}", n, "disk2", n, 1, "disk1") for n in names])
    for endpoint in ("disk1", "disk2"):
        for n in names:
            path = settings.storage[endpoint].root / n
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"bytes of " + n.encode())


async def outbox_keys(cat: Catalogue) -> list[str]:
    return list(
        await cat.read(lambda c: c.scalars(select(s.outbox.c.routing_key).order_by(s.outbox.c.seq)).all())
    )


async def test_two_replicator_instances_complete_a_dataset_once_and_delete_its_bytes(
    tmp_path: Path, tag: str, catalogue_url: str
) -> None:
    settings = replicator_settings(tmp_path, tag, catalogue_url)
    instances = [await Catalogue.open(catalogue_url) for _ in range(2)]
    storages = {n: open_storage(n, e) for n, e in settings.storage.items() if e.kind == "disk"}
    kicks: list[int] = []
    try:
        cat = instances[0]
        names = [f"night/f{i:03d}.fits" for i in range(40)]
        await _ingested(cat, settings, names)
        await cat.datasets.close(DS, "event:daq", datetime.now(UTC))

        async def both() -> None:
            await asyncio.gather(
                *(lifecycle_round(c, settings, storages, lambda: kicks.append(1)) for c in instances)
            )

        await both()
        assert await outbox_keys(cat) == ["dataset.completed"] and kicks == [1]
        await both()
        assert await outbox_keys(cat) == ["dataset.completed"]

        result = await cat.datasets.request_delete(DS, "cli:alice", False, datetime.now(UTC))
        assert (result.outcome, result.disk_copies) == ("deleting", 80)
        await both()
        for endpoint in ("disk1", "disk2"):
            root = settings.storage[endpoint].root
            assert [p for p in root.rglob("*") if p.is_file()] == []
        assert (await cat.datasets.states([DS]))[DS] == "deleted"
        history = await cat.queries.history(names[0])
        deleted = sorted(e.storage for e in history if e.type == "replica.deleted")
        assert deleted == ["disk1", "disk2"]  # once each, whichever instance deleted the bytes
    finally:
        for storage in storages.values():
            await storage.aclose()
        for c in instances:
            await c.close()


async def test_a_copy_the_endpoint_does_not_serve_waits_for_an_instance_that_does(
    tmp_path: Path, tag: str, catalogue_url: str
) -> None:
    """An instance deletes only on the endpoints it serves; the dataset stays ``deleting``."""
    settings = replicator_settings(tmp_path, tag, catalogue_url)
    async with await Catalogue.open(catalogue_url) as cat:
        await _ingested(cat, settings, ["night/a.fits"])
        await cat.datasets.request_delete(DS, "cli:alice", True, datetime.now(UTC))
        disk1 = open_storage("disk1", settings.storage["disk1"])
        try:
            await lifecycle_round(cat, settings, {"disk1": disk1}, lambda: None)
        finally:
            await disk1.aclose()
        assert (await cat.datasets.states([DS]))[DS] == "deleting"
        assert (settings.storage["disk2"].root / "night/a.fits").exists()
        assert not (settings.storage["disk1"].root / "night/a.fits").exists()
