"""The ingest handler called as a plain function: real SQLite catalogue and storage, a publisher
that only records. No broker involved."""

from __future__ import annotations

import asyncio

import pytest

from common.bus.publisher import RecordingPublisher
from common.bus.service import Context
from common.errors import Permanent
from common.messages import FileIngested, FileReady
from daemons.ingest.handlers import ingest_file, open_resources
from tests.storage_fixtures import adler

DATASET = "lst1.20261123.run012345.dl0"


@pytest.fixture
async def ctx(settings):
    publisher = RecordingPublisher()
    async with open_resources(settings, publisher) as resources:
        yield Context(daemon="ingest", settings=settings, publisher=publisher, resources=resources)


def landed(settings, rel: str, content: bytes):
    path = settings.landing_areas["lst1"] / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


async def test_new_file_publishes_file_ingested_with_verified_checksum(ctx, settings):
    src = landed(settings, "r/a.fits", b"hello")
    await ingest_file(FileReady(path=str(src), dataset=DATASET, adler32=adler(b"hello")), ctx)
    [event] = ctx.publisher.of_type(FileIngested)
    assert (event.name, event.size, event.storage) == ("r/a.fits", 5, "disk1")
    assert event.adler32 == adler(b"hello")


async def test_redelivered_event_republishes_without_copying_again(ctx, settings):
    src = landed(settings, "r/b.fits", b"once")
    msg = FileReady(path=str(src), dataset=DATASET)
    await ingest_file(msg, ctx)
    replica = settings.storage["disk1"].root / "r/b.fits"
    first_mtime = replica.stat().st_mtime_ns
    src.unlink()  # the landing copy may be gone by the time a redelivery arrives
    await ingest_file(msg, ctx)
    assert len(ctx.publisher.of_type(FileIngested)) == 2
    assert replica.stat().st_mtime_ns == first_mtime


async def test_concurrent_events_for_one_name_with_different_content_never_overwrite(ctx, settings):
    src_a = landed(settings, "r/c.fits", b"version A")
    other = landed(settings, "elsewhere/c.fits", b"version B, longer")
    a = FileReady(path=str(src_a), dataset=DATASET)
    b = FileReady(path=str(other), dataset=DATASET, name="r/c.fits")
    results = await asyncio.gather(ingest_file(a, ctx), ingest_file(b, ctx), return_exceptions=True)
    errors = [r for r in results if isinstance(r, Exception)]
    assert len(errors) == 1 and isinstance(errors[0], Permanent) and errors[0].reason == "name_conflict"
    [event] = ctx.publisher.of_type(FileIngested)
    stored = (settings.storage["disk1"].root / "r/c.fits").read_bytes()
    assert event.size == len(stored)  # what is registered is what is on disk


async def test_name_locks_do_not_accumulate_over_a_night(ctx, settings):
    for i in range(20):
        src = landed(settings, f"r/n{i}.fits", b"n" * i)
        await ingest_file(FileReady(path=str(src), dataset=DATASET), ctx)
    assert ctx.resources._locks == {}
