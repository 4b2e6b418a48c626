"""The recall daemon's handler called as a plain function: real SQLite catalogue, disk endpoints
and simulated library, a publisher that only records (events, and replies sent to a queue). No
broker involved."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from common.bus.publisher import RecordingPublisher
from common.bus.service import Context
from common.errors import Permanent
from common.messages import FileRecalled, RecallCompleted, RecallRequest
from daemons.recall.handlers import RecallResources, open_resources, recall
from tests.conftest import wait_for
from tests.recall_fixtures import DATASET, contents, recall_settings, register, status


@dataclass
class ReplyRecordingPublisher(RecordingPublisher):
    """Also records what is sent straight to a queue (the replies on ``reply_to``)."""

    replies: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    async def publish_raw(self, queue: str, message: aio_pika.Message) -> None:
        self.replies.append((queue, json.loads(message.body)))


FILES = contents(3)


@pytest.fixture
async def ctx(tmp_path: Path, tag: str) -> AsyncIterator[Context[RecallResources]]:
    settings = recall_settings(tmp_path, tag)
    await register(settings, FILES, keep_on_disk=FILES)  # on disk1: served without a mount
    publisher = ReplyRecordingPublisher()
    async with open_resources(settings, publisher) as resources:
        yield Context(
            daemon="recall", settings=settings, publisher=publisher, resources=resources,
            reply_to=f"{settings.bus.queue_prefix}.reply.pipeline", correlation_id="corr-1",
        )  # fmt: skip


async def test_a_request_is_recorded_and_files_on_disk_are_served_at_once(ctx):
    msg = RecallRequest(names=sorted(FILES), destination="disk1")
    await recall(msg, ctx)

    view = await status(ctx.settings, msg.id)
    assert view is not None
    assert (view.state, view.destination, view.files, view.done, view.failed) == ("done", "disk1", 3, 3, 0)
    assert sorted(e.name for e in ctx.publisher.of_type(FileRecalled)) == sorted(FILES)
    [completed] = ctx.publisher.of_type(RecallCompleted)
    assert (completed.request_id, completed.files, completed.failed) == (msg.id, 3, [])
    [(queue, reply)] = ctx.publisher.replies  # the sender hears it on its reply queue
    assert queue == ctx.reply_to and reply["data"]["request_id"] == msg.id


async def test_an_unknown_name_fails_alone_and_the_rest_proceeds(ctx):
    msg = RecallRequest(names=[*sorted(FILES), "run42/never-ingested.fits"], destination="disk1")
    await recall(msg, ctx)

    view = await status(ctx.settings, msg.id)
    assert view is not None and (view.files, view.done, view.failed) == (4, 3, 1)
    [completed] = ctx.publisher.of_type(RecallCompleted)
    assert completed.failed == ["run42/never-ingested.fits"]


async def _settled(ctx: Context[RecallResources], recall_id: str) -> None:
    """Wait for the request to be complete and announced: the scheduler, running too, may be
    serving a file of it when the handler returns (the handler skips the files it serves)."""

    async def done() -> bool:
        view = await status(ctx.settings, recall_id)
        if view is None or view.state == "active":
            return False
        return not await ctx.resources.catalogue.recall.unannounced()

    await wait_for(done)


async def test_a_redelivered_request_changes_nothing(ctx):
    msg = RecallRequest(names=sorted(FILES), destination="disk1")
    await recall(msg, ctx)
    await _settled(ctx, msg.id)
    before = await status(ctx.settings, msg.id)
    await recall(msg, ctx)
    assert await status(ctx.settings, msg.id) == before


async def test_an_id_used_for_other_content_is_refused_and_answered_on_reply_to(ctx):
    first = RecallRequest(names=sorted(FILES)[:1], destination="disk1")
    await recall(first, ctx)
    await _settled(ctx, first.id)
    recorded = await status(ctx.settings, first.id)
    other = RecallRequest(id=first.id, names=sorted(FILES), destination="disk1")

    with pytest.raises(Permanent) as caught:
        await recall(other, ctx)

    assert caught.value.reason == "id_conflict"
    assert await status(ctx.settings, first.id) == recorded  # the first request stays as it was
    queue, answer = ctx.publisher.replies[-1]
    assert queue == ctx.reply_to
    assert answer["data"]["request_id"] == first.id and answer["data"]["reason"] == "id_conflict"
    assert answer["data"]["failed"] == sorted(FILES)


@pytest.mark.parametrize(
    ("request_fields", "reason"),
    [
        ({"names": ["run42/f000.fits"], "destination": "tape1"}, "unknown_storage"),
        ({"destination": "disk1"}, "invalid_message"),
        ({"dataset": "lst1.20991231.run999999.dl0", "destination": "disk1"}, "unknown_dataset"),
    ],
)
async def test_a_request_refused_outright_is_recorded_nowhere_and_answered(ctx, request_fields, reason):
    msg = RecallRequest(**request_fields)
    with pytest.raises(Permanent) as caught:
        await recall(msg, ctx)
    assert caught.value.reason == reason
    assert await status(ctx.settings, msg.id) is None
    [(queue, answer)] = ctx.publisher.replies
    assert queue == ctx.reply_to and answer["data"]["reason"] == reason
    assert ctx.publisher.of_type(RecallCompleted) == []  # a reply only, not an event on the bus


async def test_a_dataset_request_recalls_its_files(ctx):
    msg = RecallRequest(dataset=DATASET)  # no destination: the first disk endpoint
    await recall(msg, ctx)
    view = await status(ctx.settings, msg.id)
    assert view is not None and (view.destination, view.files, view.done) == ("disk1", 3, 3)
