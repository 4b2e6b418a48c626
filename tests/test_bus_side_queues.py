"""The retry and dead-letter queues as quorum queues (``bus.side_queues = "quorum"``), and the
conversion of a deployment's existing ones (``spool broker convert-side-queues``), on the real
broker. (Their members on each node of a cluster: tests/test_bus_cluster.py.)"""

from __future__ import annotations

import base64
import json
import urllib.request
from typing import Any
from urllib.parse import quote

import aio_pika
import pytest

from common.bus import dead as deadletters
from common.bus import headers as H
from common.bus.side_queues import HOLDING_SUFFIX, ConversionRefused, convert
from common.bus.topology import dead_queue_arguments, declare_topology, retry_queue_arguments
from common.config import BusSettings, Settings
from common.errors import ConfigError
from tests.conftest import publish_raw, queue_depth, running, wait_for
from tests.runner_fixtures import event, make_service

MANAGEMENT = "http://127.0.0.1:15672/api"


def with_bus(settings: Settings, **changes: Any) -> Settings:
    return settings.model_copy(update={"bus": settings.bus.model_copy(update=changes)})


def queue_type(name: str) -> str:
    auth = base64.b64encode(b"guest:guest").decode()
    request = urllib.request.Request(
        f"{MANAGEMENT}/queues/%2F/{quote(name, safe='')}", headers={"Authorization": f"Basic {auth}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return str(json.load(response)["type"])


def test_the_side_queues_arguments_follow_the_setting() -> None:
    classic = Settings(bus=BusSettings())
    assert dead_queue_arguments(classic) == {"x-queue-mode": "lazy"}
    assert "x-queue-type" not in retry_queue_arguments(classic, "ingest", 5)
    quorum = Settings(bus=BusSettings(side_queues="quorum", quorum_initial_group_size=3))
    retry = retry_queue_arguments(quorum, "ingest", 5)
    assert retry["x-queue-type"] == "quorum" and retry["x-quorum-initial-group-size"] == 3
    # What makes an expired retry leave its queue only once the work queue has it.
    assert (retry["x-dead-letter-strategy"], retry["x-overflow"]) == ("at-least-once", "reject-publish")
    assert (retry["x-message-ttl"], retry["x-dead-letter-routing-key"]) == (5000, quorum.queue("ingest"))
    assert dead_queue_arguments(quorum) == {"x-queue-type": "quorum", "x-quorum-initial-group-size": 3}
    with pytest.raises(ValueError, match="classic"):
        BusSettings(side_queues="mirrored")  # type: ignore[arg-type]


@pytest.mark.integration
async def test_retries_and_dead_letters_go_through_quorum_side_queues(settings, broker):
    settings = with_bus(settings, side_queues="quorum")
    seen: list[tuple[str, int]] = []
    async with running([make_service(seen)], settings):
        assert {queue_type(settings.retry_queue("ingest", 0)), queue_type(settings.dead_queue("ingest"))} == {
            "quorum"
        }
        await publish_raw(broker, settings, "file.ready", event("retry_twice"))
        await publish_raw(broker, settings, "file.ready", event("always_retry", "ev-dead"), message_id="m-1")
        await wait_for(lambda: _depth_is(broker, settings.dead_queue("ingest"), 1), timeout=30)
    assert [a for b, a in seen if b == "retry_twice"] == [1, 2, 3]
    assert [a for b, a in seen if b == "always_retry"] == [1, 2, 3, 4]
    [letter] = await deadletters.browse(broker, [settings.dead_queue("ingest")])
    assert (letter.reason, letter.attempts, letter.message_id) == ("endpoint_down", 4, "m-1")
    # Browsing gave it back: a quorum queue returns unacked gets like a classic one.
    assert await queue_depth(broker, settings.dead_queue("ingest")) == 1


@pytest.mark.integration
async def test_conversion_keeps_every_message_and_refuses_while_a_daemon_consumes(settings, broker):
    # A deployment of classic side queues, long retry tiers (a parked retry is still parked when
    # the conversion runs), one parked retry and three dead letters: two of Spool's, and one
    # published by an outsider with forged Spool headers.
    classic = with_bus(settings, retry_tiers=[60.0, 120.0])
    quorum = with_bus(classic, side_queues="quorum")
    channel = await broker.channel()
    await declare_topology(channel, classic)
    await channel.close()
    dead, retry = classic.dead_queue("ingest"), classic.retry_queue("ingest", 1)
    await _put(broker, retry, b"parked", {H.ATTEMPT: 2}, as_spool=True)
    await _put(broker, dead, b"first", {H.REASON: "checksum_mismatch"}, as_spool=True)
    await _put(broker, dead, b"forged", {H.REASON: "checksum_mismatch"}, as_spool=False)
    await _put(broker, dead, b"third", {H.REASON: "endpoint_down"}, as_spool=True)

    # The daemons' new configuration is refused until the queues are converted.
    channel = await broker.channel()
    with pytest.raises(ConfigError, match="exists with other arguments"):
        await declare_topology(channel, quorum)

    async with running([make_service([])], classic):
        with pytest.raises(ConversionRefused, match="consumer"):
            await convert(broker, quorum)

    done = await convert(broker, quorum)
    assert set(done.replaced) == {
        q for d in ("ingest", "replicator", "tape", "recall", "monitor")
        for q in [quorum.dead_queue(d), quorum.retry_queue(d, 0), quorum.retry_queue(d, 1)]
    }  # fmt: skip
    assert done.moved == {retry: 1, dead: 3, dead + HOLDING_SUFFIX: 3}
    assert {queue_type(dead), queue_type(retry)} == {"quorum"}
    channel = await broker.channel()
    await declare_topology(channel, quorum)  # the new configuration is accepted now
    await channel.close()

    letters = await deadletters.browse(broker, [dead])
    assert [x.body for x in letters] == [b"first", b"forged", b"third"]  # in their order
    # Spool's own keep their story; the outsider's forged reason is not believed after the copy.
    assert [x.reason for x in letters] == ["checksum_mismatch", "unknown", "endpoint_down"]
    # The parked retry went on to its work queue (early), still counted as attempt 2.
    [parked] = await _drain(broker, quorum.queue("ingest"))
    assert parked.body == b"parked" and parked.headers[H.ATTEMPT] == 2

    # A second run has nothing to do; one after an interruption between the two moves finishes
    # the move back.
    assert (await convert(broker, quorum)).replaced == []
    channel = await broker.channel()
    await channel.declare_queue(dead + HOLDING_SUFFIX, durable=True, arguments=dead_queue_arguments(quorum))
    await channel.close()
    await _put(broker, dead + HOLDING_SUFFIX, b"left behind", {H.REASON: "endpoint_down"}, as_spool=True)
    assert (await convert(broker, quorum)).moved == {dead + HOLDING_SUFFIX: 1}
    assert [x.body for x in await deadletters.browse(broker, [dead])][-1] == b"left behind"
    with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
        channel = await broker.channel()
        await channel.declare_queue(dead + HOLDING_SUFFIX, passive=True)


async def _put(broker, queue: str, body: bytes, headers: dict[str, Any], *, as_spool: bool) -> None:
    from common.bus.publisher import connection_user

    channel = await broker.channel(publisher_confirms=True)
    user = connection_user(broker) if as_spool else None
    message = aio_pika.Message(body, headers=headers, user_id=user, delivery_mode=2)
    await channel.default_exchange.publish(message, routing_key=queue, mandatory=True)
    await channel.close()


async def _drain(broker, queue: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    channel = await broker.channel()
    q = await channel.get_queue(queue)
    out = []
    while (m := await q.get(no_ack=True, fail=False)) is not None:
        out.append(m)
    await channel.close()
    return out


async def _depth_is(broker, queue: str, n: int) -> bool:
    return await queue_depth(broker, queue) == n
