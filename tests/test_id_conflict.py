"""Issue 16, class 4 (one id, two meanings), through the real broker and real daemons: an event id
re-used for other content is a permanent ``id_conflict`` — dead-lettered once, visible, answered on
``reply_to`` for a recall — and the first record stays as it was; the same id with the same content
stays an idempotent duplicate."""

from __future__ import annotations

import json
import uuid
from typing import Any

import aio_pika
import pytest

from common.catalogue import Catalogue
from common.config import Settings
from daemons.ingest.handlers import service as ingest_service
from daemons.recall.handlers import service as recall_service
from tests.conftest import cloudevent, dead_reasons, make_file, publish_raw, queue_depth, running, wait_for
from tests.recall_fixtures import DATASET as RECALL_DATASET
from tests.recall_fixtures import Events, contents, recall_settings, register, status

pytestmark = pytest.mark.integration
DATASET = "lst1.20261123.run012345.dl0"


async def depth_is(broker, name: str, n: int) -> bool:
    return await queue_depth(broker, name) == n


async def files(settings: Settings) -> int:
    async with await Catalogue.open(settings.catalogue.url) as c:
        return (await c.queries.counts()).files


# --- file.ready ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change",
    ["other_path", "other_name", "other_dataset", "other_size", "other_adler32", "other_path_after_failure"],
)
async def test_a_file_ready_id_reused_for_another_file_is_an_id_conflict(
    settings: Settings, broker, topology, change
):
    first = make_file(settings, "run012345/first.fits", b"first")
    second = make_file(settings, "run012345/second.fits", b"second file")
    first_event: dict[str, Any] = {"path": str(first), "dataset": DATASET}
    if change == "other_path_after_failure":
        first_event = {"path": str(first.parent / "missing.fits"), "dataset": DATASET}
    again = {
        "other_path": {"path": str(second), "dataset": DATASET},
        "other_name": {"path": str(first), "dataset": DATASET, "name": "renamed/first.fits"},
        "other_dataset": {"path": str(first), "dataset": "lst1.20261124.run012346.dl0"},
        "other_size": {"path": str(first), "dataset": DATASET, "size": 999},
        "other_adler32": {"path": str(first), "dataset": DATASET, "adler32": "deadbeef"},
        "other_path_after_failure": {"path": str(second), "dataset": DATASET},
    }[change]
    expected_dead = (
        ["file_missing", "id_conflict"] if change == "other_path_after_failure" else ["id_conflict"]
    )
    async with running([ingest_service], settings):
        await publish_raw(broker, settings, "file.ready", cloudevent(first_event, id_="ev-shared"))
        if change == "other_path_after_failure":
            await wait_for(lambda: depth_is(broker, settings.dead_queue("ingest"), 1))
        else:
            await wait_for(lambda: _files_are(settings, 1))
        await publish_raw(broker, settings, "file.ready", cloudevent(again, id_="ev-shared"))
        await wait_for(lambda: depth_is(broker, settings.dead_queue("ingest"), len(expected_dead)))
        # The daemon is alive and still ingests.
        good = make_file(settings, "run012345/good.fits", b"good")
        await publish_raw(broker, settings, "file.ready", cloudevent({"path": str(good), "dataset": DATASET}))
        registered = 1 if change == "other_path_after_failure" else 2
        await wait_for(lambda: _files_are(settings, registered))
    assert await dead_reasons(broker, settings, "ingest") == expected_dead
    async with await Catalogue.open(settings.catalogue.url) as c:
        request = (await c.queries.request_state(["ev-shared"]))["ev-shared"]
        second_view = await c.queries.show_file("run012345/second.fits")
        renamed = await c.queries.show_file("renamed/first.fits")
        history = await c.queries.history("run012345/second.fits")
    # The first record is unchanged: its path, its state.
    assert request.path.endswith("first.fits" if change != "other_path_after_failure" else "missing.fits")
    assert request.reason != "id_conflict"
    assert second_view is None and renamed is None
    root = settings.storage["disk1"].root
    assert not (root / "run012345/second.fits").exists() and not (root / "renamed").exists()
    if change in ("other_path", "other_path_after_failure"):  # visible in the second file's history
        assert [e.detail["reason"] for e in history] == ["id_conflict"]


async def _files_are(settings: Settings, n: int) -> bool:
    return await files(settings) == n


async def test_a_file_ready_id_resent_with_the_same_content_is_a_duplicate(
    settings: Settings, broker, topology
):
    src = make_file(settings, "run012345/same.fits", b"same")
    body = cloudevent({"path": str(src), "dataset": DATASET, "metadata": {"run": 1}}, id_="ev-same")
    async with running([ingest_service], settings) as process:
        await publish_raw(broker, settings, "file.ready", body)
        await wait_for(lambda: _files_are(settings, 1))
        await publish_raw(broker, settings, "file.ready", body)

        async def processed() -> bool:
            return process.runners[0].stats.processed >= 2

        await wait_for(processed)
    assert await dead_reasons(broker, settings, "ingest") == []
    assert await files(settings) == 1


# --- recall.request ------------------------------------------------------------------------------
async def publish_recall(
    broker, settings: Settings, event_id: str, data: dict[str, Any], reply_to: str | None = None
) -> None:
    event = {"specversion": "1.0", "id": event_id, "source": "test", "type": "recall.request", "data": data}
    channel = await broker.channel(publisher_confirms=True)
    exchange = await channel.get_exchange(settings.bus.exchange)
    await exchange.publish(
        aio_pika.Message(
            json.dumps(event).encode(),
            content_type="application/cloudevents+json",
            message_id=event_id,
            reply_to=reply_to,
            correlation_id=f"job-{event_id}",
        ),
        routing_key="recall.request",
    )
    await channel.close()


def reply_queue(settings: Settings) -> str:
    """A reply queue by the pattern recall answers on (``common.bus.admission``)."""
    return f"{settings.bus.queue_prefix}.reply.{uuid.uuid4().hex}"


async def next_reply(queue: aio_pika.abc.AbstractQueue) -> dict[str, Any]:
    got: list[aio_pika.abc.AbstractIncomingMessage] = []

    async def replied() -> bool:
        if (m := await queue.get(fail=False, no_ack=True)) is not None:
            got.append(m)
        return bool(got)

    await wait_for(replied, timeout=60)
    assert got[0].content_type == "application/cloudevents+json"
    return json.loads(got[0].body)


@pytest.mark.parametrize(
    "change",
    [
        {"names": ["run42/f000.fits", "run42/f001.fits", "run42/other.fits"]},
        {"names": ["run42/f000.fits"]},
        {"names": ["run42/f000.fits", "run42/f001.fits"], "priority": 9},
        {"names": ["run42/f000.fits", "run42/f001.fits"], "destination": "disk1"},
        {"dataset": RECALL_DATASET},
    ],
    ids=["more_names", "fewer_names", "other_priority", "other_destination", "dataset_instead"],
)
async def test_a_recall_id_reused_with_other_content_is_refused_and_answered(tmp_path, tag, broker, change):
    settings = recall_settings(tmp_path, tag)
    catalogue_files = contents(2)
    await register(settings, catalogue_files, keep_on_disk=list(catalogue_files))
    channel = await broker.channel()
    replies = await channel.declare_queue(reply_queue(settings), exclusive=True)
    events = None
    rid = uuid.uuid4().hex
    first = {"names": ["run42/f000.fits", "run42/f001.fits"], "destination": "disk2", "priority": 3}
    async with running([recall_service], settings):
        events = await Events.watch(broker, settings)
        await publish_recall(broker, settings, rid, first, reply_to=replies.name)
        completed = await next_reply(replies)
        assert completed["data"]["request_id"] == rid and "reason" not in completed["data"]
        await publish_recall(broker, settings, rid, {**first, **change}, reply_to=replies.name)
        refused = await next_reply(replies)
        await wait_for(lambda: depth_is(broker, settings.dead_queue("recall"), 1))
        # Alive: a new request is still served.
        other = uuid.uuid4().hex
        await publish_recall(broker, settings, other, {"names": ["run42/f000.fits"], "destination": "disk2"})
        await events.completion(other)
    assert (refused["type"], refused["data"]["request_id"]) == ("recall.completed", rid)
    assert refused["data"]["reason"] == "id_conflict" and refused["data"]["files"] == 0
    assert refused["id"] != completed["id"]
    assert await dead_reasons(broker, settings, "recall") == ["id_conflict"]
    view = await status(settings, rid)  # the first request, unchanged
    assert view is not None
    assert (view.state, view.files, view.done, view.priority, view.destination) == ("done", 2, 2, 3, "disk2")
    async with await Catalogue.open(settings.catalogue.url) as c:
        assert rid not in await c.queries.request_state([rid])  # no failure recorded over it
    await channel.close()


async def test_a_recall_id_resent_with_the_same_content_is_a_redelivery(tmp_path, tag, broker):
    settings = recall_settings(tmp_path, tag)
    catalogue_files = contents(2)
    await register(settings, catalogue_files, keep_on_disk=list(catalogue_files))
    rid = uuid.uuid4().hex
    # Names in another order, one repeated: the same set, the same request.
    data = {"names": ["run42/f000.fits", "run42/f001.fits"], "destination": "disk2"}
    again = {"names": ["run42/f001.fits", "run42/f000.fits", "run42/f001.fits"], "destination": "disk2"}
    async with running([recall_service], settings) as process:
        events = await Events.watch(broker, settings)
        await publish_recall(broker, settings, rid, data)
        await events.completion(rid)
        await publish_recall(broker, settings, rid, again)

        async def processed() -> bool:
            return process.runners[0].stats.processed >= 2

        await wait_for(processed)
    assert await dead_reasons(broker, settings, "recall") == []


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ({"names": ["run42/f000.fits"], "destination": "nowhere"}, "unknown_storage"),
        ({"dataset": "lst1.19990101.run000001.dl0"}, "unknown_dataset"),
    ],
)
async def test_a_recall_refused_outright_is_answered_on_reply_to(tmp_path, tag, broker, data, reason):
    settings = recall_settings(tmp_path, tag)
    channel = await broker.channel()
    replies = await channel.declare_queue(reply_queue(settings), exclusive=True)
    rid = uuid.uuid4().hex
    async with running([recall_service], settings):
        await publish_recall(broker, settings, rid, data, reply_to=replies.name)
        answer = await next_reply(replies)
        await wait_for(lambda: depth_is(broker, settings.dead_queue("recall"), 1))
    assert (answer["data"]["request_id"], answer["data"]["reason"]) == (rid, reason)
    assert await dead_reasons(broker, settings, "recall") == [reason]
    await channel.close()


async def test_a_recall_of_too_many_names_is_one_dead_letter_and_no_catalogue_growth(tmp_path, tag, broker):
    settings = recall_settings(tmp_path, tag)
    catalogue_files = contents(1)
    await register(settings, catalogue_files, keep_on_disk=list(catalogue_files))
    hostile = [
        {"names": [f"n/{i:06d}" for i in range(100_000)]},  # too many names
        {"names": ["x" * 1000] * 3000},  # 3 MB of names
        {"names": ["x" * 1000] * 30_000},  # a 30 MB body
    ]
    async with running([recall_service], settings):
        events = await Events.watch(broker, settings)
        for data in hostile:
            await publish_recall(broker, settings, uuid.uuid4().hex, data)
        await wait_for(lambda: depth_is(broker, settings.dead_queue("recall"), len(hostile)))
        ok = uuid.uuid4().hex
        await publish_recall(broker, settings, ok, {"names": ["run42/f000.fits"], "destination": "disk2"})
        await events.completion(ok)
    assert sorted(await dead_reasons(broker, settings, "recall")) == [
        "invalid_message",
        "invalid_message",
        "undecodable",
    ]
    async with await Catalogue.open(settings.catalogue.url) as c:
        assert [v.id for v in await c.recall.list_recalls(100)] == [ok]
