"""The ingest handler called as a plain function: real SQLite catalogue and storage, a publisher
that only records. No broker involved."""

from __future__ import annotations

import asyncio

import pytest

from common.bus.publisher import RecordingPublisher
from common.bus.service import Context
from common.config import load_settings
from common.errors import Permanent
from common.messages import FileIngested, FileReady, ReplicaRequest, TapeArchive
from daemons.ingest.handlers import ingest_file, open_resources
from tests.conftest import write_config
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


async def test_the_copies_the_rules_want_are_requested_on_disk_and_tape_under_each_files_correlation_id(
    tmp_path, tag
):
    """``batches.request_copies`` is where ingest asks for copies, disk and tape, each under its
    file.ready's correlation id (in bulk requests when files come together)."""
    rules = {
        "storage.disk2": 'root = "storage/disk2"',
        "storage.tape1": 'kind = "tape"\nroot = "storage/tape1"',
        "rules.disk": 'datasets = ".*"\nendpoints = "disk2"',
        "rules.tape": 'datasets = ".*"\nendpoints = "tape1"',
    }
    state = tmp_path / "state"
    (state / "landing").mkdir(parents=True)
    settings = load_settings(write_config(tmp_path / "spool.toml", state, tag, **rules))
    publisher = RecordingPublisher()
    async with open_resources(settings, publisher) as resources:
        events = [
            FileReady(path=str(landed(settings, f"r/w{i}.fits", b"w" * i)), dataset=DATASET) for i in range(3)
        ]
        await asyncio.gather(
            *(
                ingest_file(e, Context(daemon="ingest", settings=settings, publisher=publisher,
                                       resources=resources, correlation_id=f"corr-{i}"))
                for i, e in enumerate(events)
            )
        )  # fmt: skip
    names = [f"r/w{i}.fits" for i in range(3)]
    tape = publisher.of_type(TapeArchive)
    assert {t.destination for t in tape} == {"tape1"}
    archive = {n: t.correlation_of(k, t.correlation_id) for t in tape for k, n in enumerate(t.files)}
    assert archive == {n: f"corr-{i}" for i, n in enumerate(names)}
    disk = publisher.of_type(ReplicaRequest)
    assert {r.destination for r in disk} == {"disk2"}
    asked = {
        n: r.correlation_of(k, r.correlation_id) for r in disk for k, n in enumerate(r.names or [r.name])
    }
    assert asked == {n: f"corr-{i}" for i, n in enumerate(names)}
