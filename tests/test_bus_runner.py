"""The consumer runner against the real broker: acks, retry tiers, dead letters, events, heartbeats.

A small test service stands in for a daemon (named ``ingest`` so it consumes ``file.ready``); its
behaviour per message is chosen by ``metadata.behave``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aio_pika
import msgpack
import pytest

from common.bus import headers as H
from common.bus.publisher import AmqpPublisher
from common.bus.service import Context, Service
from common.errors import Permanent, Retryable
from common.messages import FileReady
from tests.conftest import cloudevent, publish_raw, queue_depth, running, wait_for
from tests.runner_fixtures import event, make_service

pytestmark = pytest.mark.integration


async def dead_letters(connection, settings) -> list[aio_pika.abc.AbstractIncomingMessage]:
    channel = await connection.channel()
    queue = await channel.get_queue(settings.dead_queue("ingest"))
    out = []
    while (m := await queue.get(no_ack=True, fail=False)) is not None:
        out.append(m)
    await channel.close()
    return out


async def test_handled_message_is_acked_and_queue_empties(settings, broker):
    seen: list[tuple[str, int]] = []
    async with running([make_service(seen)], settings):
        await publish_raw(broker, settings, "file.ready", event("ok"))
        await wait_for(lambda: _true(seen))
        await wait_for(lambda: _depth_is(broker, settings.queue("ingest"), 0))
    assert seen == [("ok", 1)]
    assert await queue_depth(broker, settings.queue("ingest")) == 0


async def test_retryable_goes_through_tiers_with_attempt_header_then_succeeds(settings, broker):
    seen: list[tuple[str, int]] = []
    async with running([make_service(seen)], settings) as process:
        await publish_raw(broker, settings, "file.ready", event("retry_twice"))
        await wait_for(lambda: _true(len(seen) == 3), timeout=15)
        await wait_for(lambda: _true(process.runners[0].stats.processed == 1))
    assert seen == [("retry_twice", 1), ("retry_twice", 2), ("retry_twice", 3)]
    assert await dead_letters(broker, settings) == []


async def test_retryable_exhausting_attempts_is_dead_lettered_with_headers(settings, broker):
    seen: list[tuple[str, int]] = []
    service = make_service(seen)
    async with running([service], settings):
        await publish_raw(broker, settings, "file.ready", event("always_retry", "ev-1"), message_id="amqp-1")
        await wait_for(lambda: _depth_is(broker, settings.dead_queue("ingest"), 1), timeout=20)
    assert [a for _, a in seen] == [1, 2, 3, 4]  # max_attempts = 4 in the test config
    [dead] = await dead_letters(broker, settings)
    h = dead.headers
    assert h[H.REASON] == "endpoint_down"
    assert "gave up after 4 attempts" in h[H.ERROR]
    assert (h[H.ATTEMPTS], h[H.DAEMON], h[H.ROUTING_KEY]) == (4, "ingest", "file.ready")
    assert h[H.HOST] and h[H.TIME]
    assert dead.message_id == "amqp-1"  # AMQP properties survive the trip through the tiers
    assert json.loads(dead.body)["id"] == "ev-1"  # the original body, untouched
    assert service.failures[-1] == ("endpoint_down", "/land/always_retry", 4, True)  # type: ignore[attr-defined]
    assert [f[3] for f in service.failures] == [False, False, False, True]  # type: ignore[attr-defined]


async def test_permanent_goes_straight_to_dead_letter_and_announces_file_failed(settings, broker, topology):
    channel = await broker.channel()
    watcher = await channel.declare_queue(exclusive=True)
    await watcher.bind(settings.bus.exchange, "file.failed")
    seen: list[tuple[str, int]] = []
    async with running([make_service(seen)], settings):
        await publish_raw(broker, settings, "file.ready", event("permanent"))
        await wait_for(lambda: _depth_is(broker, settings.dead_queue("ingest"), 1))
        failed = await _get(watcher)
    assert seen == [("permanent", 1)]
    body = msgpack.unpackb(failed.body)
    assert (body["reason"], body["daemon"], body["path"], body["attempts"]) == (
        "checksum_mismatch",
        "ingest",
        "/land/permanent",
        1,
    )
    await channel.close()


@pytest.mark.parametrize(
    ("body", "content_type", "reason"),
    [
        (b"{malformed", "application/cloudevents+json", "undecodable"),
        (json.dumps({"hello": "world"}).encode(), "application/cloudevents+json", "not_cloudevent"),
        (cloudevent({"dataset": "d"}), "application/cloudevents+json", "invalid_message"),
        (b"\x00\x01", "application/octet-stream", "undecodable"),
    ],
)
async def test_undecodable_or_invalid_message_is_dead_lettered_and_daemon_keeps_running(
    settings, broker, body, content_type, reason
):
    seen: list[tuple[str, int]] = []
    async with running([make_service(seen)], settings):
        await publish_raw(broker, settings, "file.ready", body, content_type=content_type)
        await wait_for(lambda: _depth_is(broker, settings.dead_queue("ingest"), 1))
        await publish_raw(broker, settings, "file.ready", event("ok"))
        await wait_for(lambda: _true(seen == [("ok", 1)]))
    [dead] = await dead_letters(broker, settings)
    assert dead.headers[H.REASON] == reason
    assert dead.body == body


async def test_unexpected_exception_is_retried_then_dead_as_unexpected_error(settings, broker):
    seen: list[tuple[str, int]] = []
    async with running([make_service(seen)], settings):
        await publish_raw(broker, settings, "file.ready", event("crash"))
        await wait_for(lambda: _depth_is(broker, settings.dead_queue("ingest"), 1), timeout=20)
    assert len(seen) == 4
    [dead] = await dead_letters(broker, settings)
    assert dead.headers[H.REASON] == "unexpected_error"
    assert "ZeroDivisionError" in dead.headers[H.ERROR]


async def test_stop_lets_in_flight_handler_finish_before_closing(settings, broker):
    seen: list[tuple[str, int]] = []
    async with running([make_service(seen)], settings) as process:
        await publish_raw(broker, settings, "file.ready", event("slow"))
        await wait_for(lambda: _true(process.runners[0].in_flight == 1))
    # the block's exit requested the stop while the handler slept; it finished and was acked
    assert process.runners[0].stats.processed == 1
    assert await queue_depth(broker, settings.queue("ingest")) == 0


async def test_heartbeats_name_the_daemon_and_its_counts(settings, broker, topology):
    channel = await broker.channel()
    watcher = await channel.declare_queue(exclusive=True)
    await watcher.bind(settings.bus.exchange, "daemon.heartbeat")
    async with running([make_service([])], settings):
        beat = msgpack.unpackb((await _get(watcher)).body)
    assert beat["daemon"] == "ingest" and beat["pid"] > 0 and "in_flight" in beat
    await channel.close()


async def test_heartbeats_name_the_delivery_held_longest(settings, broker, topology):
    """What the monitor calls stalled: a handler holding a delivery, its age growing, named."""
    channel = await broker.channel()
    watcher = await channel.declare_queue(exclusive=True)
    await watcher.bind(settings.bus.exchange, "daemon.heartbeat")
    service = Service("ingest", describe=lambda msg: {"file": getattr(msg, "path", None)})
    release = asyncio.Event()

    @service.handler(FileReady)
    async def hold(msg: FileReady, ctx: Context[None]) -> None:
        if msg.metadata.get("behave") == "hold":
            await release.wait()

    async with running([service], settings) as process:
        await publish_raw(broker, settings, "file.ready", event("ok"))
        await publish_raw(broker, settings, "file.ready", event("hold", id_="held-1"))
        await wait_for(lambda: _true(process.runners[0].in_flight == 1))
        await asyncio.sleep(1.2)
        while True:  # a heartbeat sent after the hold began
            beat = msgpack.unpackb((await _get(watcher)).body)
            oldest = beat["details"].get("oldest_delivery")
            if oldest and oldest["seconds"] >= 1.0:
                break
        assert oldest["what"] == "file.ready held-1 file=/land/hold"
        release.set()
        await wait_for(lambda: _true(process.runners[0].in_flight == 0))
        assert process.runners[0].oldest_delivery() is None
    await channel.close()


async def test_publish_of_an_unroutable_message_is_an_error_not_silence(settings, broker):
    channel = await broker.channel()
    await channel.declare_exchange(settings.bus.exchange, aio_pika.ExchangeType.TOPIC, durable=True)
    await channel.close()
    publisher = await AmqpPublisher.create(broker, settings.bus.exchange, "test")
    with pytest.raises(Retryable) as info:
        await publisher.publish(FileReady(path="/a", dataset="d"))  # no queue bound to file.ready yet
    assert info.value.reason == "unroutable"
    await publisher.close()


async def test_publisher_confirms_reach_the_work_queue_as_msgpack(settings, broker):
    seen: list[tuple[str, int]] = []
    async with running([make_service(seen)], settings) as process:
        # A second queue bound to the same key shows the message as it travelled.
        channel = await broker.channel()
        side = await channel.declare_queue(exclusive=True)
        await side.bind(settings.bus.exchange, FileReady.ROUTING_KEY)
        sent = FileReady(path="/a", dataset="d", metadata={"behave": "ok"})
        await process.runners[0].publisher.publish(sent)  # returns once the broker confirmed
        copy = await _get(side)
        await wait_for(lambda: _true(seen == [("ok", 1)]))
        await channel.close()
    assert copy.content_type == "application/msgpack"
    body = msgpack.unpackb(copy.body)
    assert (body["id"], body["path"], body["metadata"]) == (sent.id, "/a", {"behave": "ok"})
    assert copy.message_id == sent.id and copy.delivery_mode == aio_pika.DeliveryMode.PERSISTENT


# --- helpers ------------------------------------------------------------------------------------
async def _true(value: Any) -> bool:
    return bool(value)


async def _depth_is(broker, name: str, n: int) -> bool:
    return await queue_depth(broker, name) == n


async def _get(
    queue: aio_pika.abc.AbstractQueue, timeout: float = 10.0
) -> aio_pika.abc.AbstractIncomingMessage:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        msg = await queue.get(no_ack=True, fail=False)
        if msg is not None:
            return msg
        await asyncio.sleep(0.05)
    raise AssertionError("no message arrived")


async def test_every_log_line_about_a_message_carries_its_context(settings, broker, topology):
    from structlog.contextvars import merge_contextvars
    from structlog.testing import capture_logs

    service = Service("ingest", describe=lambda msg: {"file": getattr(msg, "path", None)})

    @service.handler(FileReady)
    async def handle(msg: FileReady, ctx: Context[Any]) -> None:
        ctx.log.info("working")
        raise Permanent("checksum_mismatch", "adler32 differs")

    with capture_logs(processors=[merge_contextvars]) as logs:
        async with running([service], settings):
            await publish_raw(broker, settings, "file.ready", event("logged", "ev-log"))
            await wait_for(lambda: _depth_is(broker, settings.dead_queue("ingest"), 1))
    lines = [e for e in logs if e.get("message_id") == "ev-log"]
    assert {e["event"] for e in lines} >= {"working", "dead_lettered"}
    for e in lines:
        assert (e["daemon"], e["attempt"], e["file"]) == ("ingest", 1, "/land/logged")
        assert e["correlation_id"] == "ev-log"


def test_handling_times_fill_a_cumulative_histogram_shape() -> None:
    from common.bus.consumer import HANDLING_BUCKETS, HandlingTimes

    h = HandlingTimes()
    for seconds in (0.0005, 0.001, 0.02, 400.0):
        h.observe(seconds)
    doc = h.as_dict()
    assert doc["buckets"] == list(HANDLING_BUCKETS) and len(doc["counts"]) == len(HANDLING_BUCKETS) + 1
    assert doc["counts"][0] == 2  # <= 1 ms (the bound is inclusive, as Prometheus' "le")
    assert doc["counts"][HANDLING_BUCKETS.index(0.025)] == 1
    assert doc["counts"][-1] == 1  # beyond the last bound: +Inf
    assert doc["sum"] == 0.0005 + 0.001 + 0.02 + 400.0
