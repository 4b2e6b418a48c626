"""The tape daemon's handler called as a plain function: real SQLite catalogue, disk endpoint and
simulated library, a publisher that only records. No broker involved."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from common.bus.publisher import RecordingPublisher
from common.bus.service import Context
from common.catalogue import Catalogue, IngestRecord
from common.config import Settings, load_settings
from common.errors import Permanent
from common.messages import FileArchived, TapeArchive
from daemons.tape.handlers import TapeResources, archive, open_resources
from tests.replication_fixtures import DATASET, adler
from tests.tape_fixtures import tape_config, tape_copies

# Nothing is worth a mount: a queued copy stays queued while the test looks.
NEVER = "mount_min_files = 100000\nmount_min_bytes = 1000000000\nmount_max_age = 3600\npoll_interval = 0.1"
# Every queued copy is worth a mount at once.
AT_ONCE = "mount_min_files = 1\nmount_min_bytes = 1000000000\nmount_max_age = 0.01\npoll_interval = 0.05"


def tape_settings(tmp_path: Path, tag: str, policy: str) -> Settings:
    return load_settings(tape_config(tmp_path, tag, policy=policy))


@asynccontextmanager
async def handler_context(settings: Settings) -> AsyncIterator[Context[TapeResources]]:
    publisher = RecordingPublisher()
    async with open_resources(settings, publisher) as resources:
        yield Context(daemon="tape", settings=settings, publisher=publisher, resources=resources)


async def registered(settings: Settings, name: str, content: bytes) -> None:
    """A file as ingest leaves it: registered, with its copy on disk1."""
    path = settings.storage["disk1"].root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    async with await Catalogue.open(settings.catalogue.url) as cat:
        await cat.endpoints.sync(settings.storage)
        await cat.ingest.register(
            [IngestRecord(event_id=uuid.uuid4().hex, name=name, dataset=DATASET, size=len(content),
                          adler32=adler(content), storage="disk1", pfn=name)]
        )  # fmt: skip


@pytest.fixture
async def ctx(tmp_path: Path, tag: str) -> AsyncIterator[Context[TapeResources]]:
    settings = tape_settings(tmp_path, tag, NEVER)
    await registered(settings, "r/a.fits", os.urandom(2000))
    async with handler_context(settings) as ctx:
        yield ctx


async def test_an_archive_request_is_queued_for_the_writer_and_acked_without_an_event(ctx):
    await archive(TapeArchive(name="r/a.fits", destination="tape1", priority=7), ctx)
    assert (await tape_copies(ctx.settings))["r/a.fits"] == ("queued", None, None)
    assert ctx.publisher.published == []  # file.archived comes from the writer, once on tape


async def test_a_repeated_archive_request_leaves_one_queued_copy(ctx):
    msg = TapeArchive(name="r/a.fits", destination="tape1")
    await archive(msg, ctx)
    await archive(msg, ctx)
    assert await tape_copies(ctx.settings) == {"r/a.fits": ("queued", None, None)}


async def test_an_unknown_file_is_refused_for_good(ctx):
    with pytest.raises(Permanent) as caught:
        await archive(TapeArchive(name="r/never-ingested.fits", destination="tape1"), ctx)
    assert caught.value.reason == "unknown_file"
    assert await tape_copies(ctx.settings) == {}


@pytest.mark.parametrize(
    ("destination", "reason"), [("disk1", "not_a_tape_endpoint"), ("tape9", "unknown_storage")]
)
async def test_a_destination_that_is_not_a_tape_endpoint_is_refused(ctx, destination, reason):
    with pytest.raises(Permanent) as caught:
        await archive(TapeArchive(name="r/a.fits", destination=destination), ctx)
    assert caught.value.reason == reason
    assert await tape_copies(ctx.settings) == {}


async def test_a_request_for_a_copy_already_on_tape_announces_it_again_under_the_same_id(tmp_path, tag):
    settings = tape_settings(tmp_path, tag, AT_ONCE)
    await registered(settings, "r/b.fits", os.urandom(3000))
    async with handler_context(settings) as ctx:
        msg = TapeArchive(name="r/b.fits", destination="tape1")
        await archive(msg, ctx)
        for _ in range(200):  # the scheduler mounts and writes it (through the outbox: one event)
            state, cartridge, fseq = (await tape_copies(settings))["r/b.fits"]
            if state == "available" and ctx.publisher.of_type(FileArchived):
                break
            await asyncio.sleep(0.05)
        assert state == "available" and cartridge is not None and fseq is not None
        [written] = ctx.publisher.of_type(FileArchived)

        await archive(msg, ctx)

        again = ctx.publisher.of_type(FileArchived)[1:]
        assert [(e.id, e.name, e.cartridge, e.fseq) for e in again] == [
            (written.id, "r/b.fits", cartridge, fseq)
        ]


async def test_a_bulk_request_queues_its_known_files_then_fails_once_for_the_unknown_ones(ctx):
    """Bulk ``tape.archive`` (``names``): every known file queued in one go, the unknown names
    one permanent failure of the request, after the others (``common.errors.unknown_names``)."""
    await registered(ctx.settings, "r/c.fits", os.urandom(100))
    msg = TapeArchive(names=["r/a.fits", "r/nope-1.fits", "r/c.fits", "r/nope-2.fits"], destination="tape1")
    with pytest.raises(Permanent) as caught:
        await archive(msg, ctx)
    assert caught.value.reason == "unknown_file"
    assert "2 of the 4 files" in caught.value.message and "r/nope-2.fits" in caught.value.message
    assert await tape_copies(ctx.settings) == {
        "r/a.fits": ("queued", None, None), "r/c.fits": ("queued", None, None)
    }  # fmt: skip
    await archive(TapeArchive(names=["r/a.fits", "r/c.fits"], destination="tape1"), ctx)  # again
    assert len(await tape_copies(ctx.settings)) == 2


async def test_a_bulk_request_announces_each_copy_on_tape_under_its_own_correlation_id(tmp_path, tag):
    settings = tape_settings(tmp_path, tag, AT_ONCE)
    names = ["r/d.fits", "r/e.fits"]
    for name in names:
        await registered(settings, name, os.urandom(500))
    async with handler_context(settings) as ctx:
        await archive(TapeArchive(names=names, destination="tape1", correlation_ids=["c-d", "c-e"]), ctx)
        for _ in range(200):  # the scheduler writes both
            copies = await tape_copies(settings)
            archived = len(ctx.publisher.of_type(FileArchived))
            if all(copies[n][0] == "available" for n in names) and archived == 2:
                break
            await asyncio.sleep(0.05)
        written = {e.name: e.correlation_id for e in ctx.publisher.of_type(FileArchived)}
        assert written == {"r/d.fits": "c-d", "r/e.fits": "c-e"}

        await archive(TapeArchive(names=names, destination="tape1", correlation_ids=["x-d", "x-e"]), ctx)

        again = {e.name: e.correlation_id for e in ctx.publisher.of_type(FileArchived)[2:]}
        assert again == {"r/d.fits": "x-d", "r/e.fits": "x-e"}
