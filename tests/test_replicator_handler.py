"""The replicator's handler called as a plain function: real SQLite catalogue and disk endpoints,
publishers that only record. No broker involved.

Files get into the catalogue the way they do in production: through the ingest handler, whose
recorded ``replica.request``s (its rules want copies on disk2 and disk3) are then handed to
``replicate``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from common.bus.publisher import RecordingPublisher
from common.bus.service import Context
from common.config import Settings
from common.errors import Permanent
from common.messages import FileReady, ReplicaCreated, ReplicaRequest
from daemons.ingest.handlers import IngestResources, ingest_file
from daemons.ingest.handlers import open_resources as ingest_resources
from daemons.replicator.handlers import ReplicatorResources, open_resources, replicate
from tests.replication_fixtures import DATASET, adler, replica_states, replication_settings
from tests.storage_fixtures import alter_keeping_adler32

RULES = {
    "rules.cnaf": 'datasets = ".*"\nendpoints = "disk2"',
    "rules.pic": 'datasets = ".*"\nendpoints = "disk3"',
}


@pytest.fixture
def settings(tmp_path: Path, tag: str) -> Settings:
    return replication_settings(tmp_path, tag, **RULES)


@pytest.fixture
async def ingest(settings: Settings) -> AsyncIterator[Context[IngestResources]]:
    publisher = RecordingPublisher()
    async with ingest_resources(settings, publisher) as resources:
        yield Context(daemon="ingest", settings=settings, publisher=publisher, resources=resources)


@pytest.fixture
async def ctx(
    settings: Settings, ingest: Context[IngestResources]
) -> AsyncIterator[Context[ReplicatorResources]]:
    publisher = RecordingPublisher()
    async with open_resources(settings, publisher) as resources:
        yield Context(daemon="replicator", settings=settings, publisher=publisher, resources=resources)


async def ingested(
    ingest: Context[Any], settings: Settings, rel: str, content: bytes
) -> dict[str, ReplicaRequest]:
    """Ingest one file; returns the replica.requests ingest asked for it, by destination."""
    path = settings.landing_areas["lst1"] / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    await ingest_file(FileReady(path=str(path), dataset=DATASET), ingest)
    return {r.destination: r for r in ingest.publisher.of_type(ReplicaRequest) if r.name == rel}


def resent(ctx: Context[Any]) -> list[ReplicaRequest]:
    """The single-file requests the handler re-sent (rule_id None, as the bulk request's). The
    replicator's rules loop, running alongside, publishes requests too: bulk ones, or single
    ones naming their rule."""
    return [r for r in ctx.publisher.of_type(ReplicaRequest) if r.name is not None and r.rule_id is None]


def on_disk(settings: Settings, storage: str, name: str) -> bytes:
    return (settings.storage[storage].root / name).read_bytes()


async def test_a_requested_copy_is_made_verified_recorded_and_announced(ctx, ingest, settings):
    content = os.urandom(3000)
    requests = await ingested(ingest, settings, "r/a.fits", content)
    assert set(requests) == {"disk2", "disk3"}  # both rules asked, through ingest's one request path

    await replicate(requests["disk2"], ctx)

    [event] = ctx.publisher.of_type(ReplicaCreated)
    assert event.storage == "disk2"
    assert [(c.name, c.size, c.adler32) for c in event.copies] == [("r/a.fits", 3000, adler(content))]
    assert on_disk(settings, "disk2", "r/a.fits") == content
    states = await replica_states(settings)
    assert states[("r/a.fits", "disk2")] == "available"
    assert states[("r/a.fits", "disk3")] == "queued"  # the other request is not served by this one


async def test_a_repeated_request_verifies_the_copy_and_announces_it_again(ctx, ingest, settings):
    content = os.urandom(500)
    requests = await ingested(ingest, settings, "r/again.fits", content)
    await replicate(requests["disk2"], ctx)
    copy = settings.storage["disk2"].root / "r/again.fits"
    made = copy.stat().st_mtime_ns

    await replicate(requests["disk2"], ctx)

    assert len(ctx.publisher.of_type(ReplicaCreated)) == 2
    assert copy.stat().st_mtime_ns == made  # verified where it is, not copied again


async def test_a_missing_source_is_marked_bad_and_another_source_is_read(ctx, ingest, settings):
    content = os.urandom(2048)
    requests = await ingested(ingest, settings, "r/b.fits", content)
    await replicate(requests["disk3"], ctx)  # a second source
    # disk1 ranks before disk3 for disk2 (no site in common, equally busy: by name).
    (settings.storage["disk1"].root / "r/b.fits").unlink()

    await replicate(requests["disk2"], ctx)

    assert on_disk(settings, "disk2", "r/b.fits") == content
    states = await replica_states(settings)
    assert states[("r/b.fits", "disk1")] == "bad"
    assert states[("r/b.fits", "disk2")] == "available"
    assert [e.storage for e in ctx.publisher.of_type(ReplicaCreated)] == ["disk3", "disk2"]


async def test_a_corrupt_only_source_is_marked_bad_and_the_request_fails_for_good(ctx, ingest, settings):
    content = os.urandom(1024)
    requests = await ingested(ingest, settings, "r/c.fits", content)
    (settings.storage["disk1"].root / "r/c.fits").write_bytes(bytes(len(content)))  # same size, other bytes

    with pytest.raises(Permanent) as caught:
        await replicate(requests["disk2"], ctx)

    assert caught.value.reason == "no_source"
    assert "disk1" in caught.value.message  # the sources tried are named
    states = await replica_states(settings)
    assert states[("r/c.fits", "disk1")] == "bad"
    assert states[("r/c.fits", "disk2")] != "available"
    assert not (settings.storage["disk2"].root / "r/c.fits").exists()
    assert ctx.publisher.of_type(ReplicaCreated) == []


@pytest.mark.parametrize("size", [1024, 3 * 1024 * 1024], ids=["batched", "threaded"])
async def test_a_source_altered_under_its_adler32_fails_on_its_recorded_sha256(ctx, ingest, settings, size):
    """Issue 20: sha256 checked on a posix hop. The source keeps its size and adler32 (four bytes
    moved so that adler32's sums stay equal): only the sha256 ingest recorded can see it."""
    content = os.urandom(size)
    requests = await ingested(ingest, settings, "r/s.fits", content)
    (settings.storage["disk1"].root / "r/s.fits").write_bytes(alter_keeping_adler32(content))

    with pytest.raises(Permanent) as caught:
        await replicate(requests["disk2"], ctx)

    assert caught.value.reason == "no_source"
    states = await replica_states(settings)
    assert states[("r/s.fits", "disk1")] == "bad"
    assert not (settings.storage["disk2"].root / "r/s.fits").exists()
    history = await ctx.resources.catalogue.queries.history("r/s.fits")
    [bad] = [e for e in history if e.type == "replica.bad"]
    assert bad.detail["reason"] == "source_corrupt" and "sha256" in bad.detail["error"]


async def test_a_copy_altered_under_its_adler32_is_found_on_a_repeated_request(ctx, ingest, settings):
    content = os.urandom(2000)
    requests = await ingested(ingest, settings, "r/v.fits", content)
    await replicate(requests["disk2"], ctx)
    (settings.storage["disk2"].root / "r/v.fits").write_bytes(alter_keeping_adler32(content))

    await replicate(requests["disk2"], ctx)

    history = await ctx.resources.catalogue.queries.history("r/v.fits")
    [bad] = [e for e in history if e.type == "replica.bad"]
    assert bad.storage == "disk2" and bad.detail["problem"].startswith("sha256 ")


async def test_a_destination_that_is_not_a_disk_endpoint_is_refused(ctx, ingest, settings):
    requests = await ingested(ingest, settings, "r/d.fits", b"d")
    wrong = requests["disk2"].model_copy(update={"destination": "disk9"})
    with pytest.raises(Permanent) as caught:
        await replicate(wrong, ctx)
    assert caught.value.reason == "unknown_storage"


async def test_a_bulk_request_copies_its_files_in_one_announcement_and_fails_once_for_unknown_names(
    ctx, ingest, settings
):
    contents = {f"bulk/f{i}.fits": os.urandom(700 + i) for i in range(5)}
    for name, content in contents.items():
        await ingested(ingest, settings, name, content)
    unknown = ["bulk/never-ingested-1.fits", "bulk/never-ingested-2.fits"]
    bulk = ReplicaRequest(names=[*contents, *unknown], destination="disk2")

    with pytest.raises(Permanent) as caught:
        await replicate(bulk, ctx)

    # Known files first: copied, recorded and announced together; then one failure for the rest.
    assert caught.value.reason == "unknown_file"
    assert caught.value.message.startswith("2 of the 7 files of this bulk request are not in the catalogue")
    [event] = ctx.publisher.of_type(ReplicaCreated)
    assert event.storage == "disk2"
    assert {(c.name, c.size, c.adler32) for c in event.copies} == {
        (n, len(b), adler(b)) for n, b in contents.items()
    }
    for name, content in contents.items():
        assert on_disk(settings, "disk2", name) == content
    states = await replica_states(settings)
    assert all(states[(n, "disk2")] == "available" for n in contents)
    # A file of a bulk request failing alone would be re-sent as its own request: none did here.
    assert resent(ctx) == []


async def test_a_bulk_file_that_cannot_be_copied_is_resent_as_a_request_of_its_own(ctx, ingest, settings):
    contents = {f"mixed/f{i}.fits": os.urandom(900) for i in range(3)}
    for name, content in contents.items():
        await ingested(ingest, settings, name, content)
    (settings.storage["disk1"].root / "mixed/f1.fits").unlink()  # its only source is gone

    await replicate(ReplicaRequest(names=list(contents), destination="disk2", priority=5), ctx)

    [event] = ctx.publisher.of_type(ReplicaCreated)
    assert sorted(c.name for c in event.copies) == ["mixed/f0.fits", "mixed/f2.fits"]
    [alone] = resent(ctx)
    assert (alone.name, alone.destination, alone.priority) == ("mixed/f1.fits", "disk2", 5)
