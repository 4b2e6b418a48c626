"""Events published inside a handler, before the ack (at-least-once through redelivery), carry
the id of their fact: a redelivered message re-publishes the same event under the same id, so
consumers drop the duplicate. The handlers are called as plain functions (no broker); the
runner's ``file.failed`` is checked against the real broker."""

from __future__ import annotations

import pytest

from common.bus.publisher import RecordingPublisher
from common.bus.service import Context
from common.bus.topology import declare_topology
from common.messages import CreatedCopy, FileArchived, FileIngested, FileReady, ReplicaCreated, fact_id
from daemons.ingest.handlers import ingest_file
from daemons.ingest.handlers import open_resources as ingest_resources
from daemons.monitor.steps import MonitorState, Thresholds
from daemons.replicator.handlers import _announce
from tests.conftest import publish_raw, queue_depth, running, wait_for
from tests.runner_fixtures import event, make_service

DATASET = "lst1.20261123.run012345.dl0"


async def test_a_redelivered_file_ready_re_announces_file_ingested_under_the_same_id(settings):
    src = settings.landing_areas["lst1"] / "r/a.fits"
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_bytes(b"hello")
    other = settings.landing_areas["lst1"] / "r/b.fits"
    other.write_bytes(b"other")
    publisher = RecordingPublisher()
    async with ingest_resources(settings, publisher) as resources:
        ctx = Context(daemon="ingest", settings=settings, publisher=publisher, resources=resources)
        msg = FileReady(path=str(src), dataset=DATASET)
        await ingest_file(msg, ctx)
        await ingest_file(msg, ctx)  # redelivered
        await ingest_file(FileReady(path=str(src), dataset=DATASET), ctx)  # the instrument said it twice
        await ingest_file(FileReady(path=str(other), dataset=DATASET), ctx)
    first, again, twice, b = publisher.of_type(FileIngested)
    assert first.id == again.id == twice.id != b.id


async def test_a_redelivered_replica_request_re_announces_replica_created_under_the_same_id(settings):
    publisher = RecordingPublisher()
    ctx = Context(daemon="replicator", settings=settings, publisher=publisher, resources=None)
    a = CreatedCopy(name="r/a.fits", pfn="r/a.fits", size=5, adler32="062c0215")
    b = CreatedCopy(name="r/b.fits", pfn="r/b.fits", size=5, adler32="06610220")
    await _announce(ctx, "disk2", [a, None, b])
    await _announce(ctx, "disk2", [b, a])  # the bulk request again: its copies found made
    await _announce(ctx, "disk3", [a, b])  # the same files elsewhere: another fact
    await _announce(ctx, "disk2", [a])
    one, again, elsewhere, alone = publisher.of_type(ReplicaCreated)
    assert one.id == again.id
    assert len({one.id, elsewhere.id, alone.id}) == 3


@pytest.mark.integration
async def test_a_message_dead_lettered_again_announces_file_failed_under_the_same_id(settings, broker):
    channel = await broker.channel()
    await declare_topology(channel, settings)
    failed = await channel.declare_queue(exclusive=True)
    await failed.bind(settings.bus.exchange, "file.failed")
    async with running([make_service([])], settings):
        # The same event (same id) twice, as after a redelivery: two dead letters, one fact.
        await publish_raw(broker, settings, "file.ready", event("permanent", id_="ev-1"))
        await publish_raw(broker, settings, "file.ready", event("permanent", id_="ev-1"))
        await publish_raw(broker, settings, "file.ready", event("permanent", id_="ev-2"))
        await wait_for(lambda: _depth_is(broker, settings.dead_queue("ingest"), 3))
        ids: list[str] = []

        async def three() -> bool:
            while (m := await failed.get(fail=False)) is not None:
                ids.append(str(m.message_id))
            return len(ids) == 3

        await wait_for(three)
    await channel.close()
    assert ids[0] == ids[1] != ids[2]


async def _depth_is(broker, name: str, n: int) -> bool:  # type: ignore[no-untyped-def]
    return await queue_depth(broker, name) == n


def test_the_monitor_counts_an_event_sent_again_under_its_id_once():
    state = MonitorState(Thresholds(1.0, 3, 10, 60))
    archived = FileArchived(
        id=fact_id("file.archived", "tape1", "a", "A00001", "1"), name="a", storage="tape1",
        cartridge="A00001", fseq=1,
    )  # fmt: skip
    other = archived.model_copy(update={"id": fact_id("file.archived", "tape1", "b", "A00001", "2")})
    for msg in (archived, archived, other, archived):  # the outbox sent ``archived`` again twice
        state.observe(msg)
    assert (state.events["file.archived"], state.duplicates, state.messages) == (2, 2, 4)
