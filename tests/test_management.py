"""The management API client and the queue report: in-flight messages with who holds them, and what
is still shown (and said to be missing) when the management API cannot be reached."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aio_pika
import pytest

from common.bus.management import Holder, derive_endpoint, holders_by_queue
from common.bus.queue_stats import passive_counts, queue_report
from common.config import load_settings
from daemons.monitor.handlers import service as monitor_service
from tests.conftest import cloudevent, publish_raw, running, wait_for
from tests.monitor_fixtures import free_port, get_json, monitor_config, resources_of


@pytest.fixture
def config_file(tmp_path: Path, tag: str) -> Path:
    return monitor_config(tmp_path, tag)


@pytest.mark.parametrize(
    ("amqp", "override", "base", "vhost", "user", "password"),
    [
        ("amqp://guest:guest@localhost:5672/", "", "http://localhost:15672", "/", "guest", "guest"),
        ("amqp://u:p%40ss@rabbit.site:5672/spool", "", "http://rabbit.site:15672", "spool", "u", "p@ss"),
        ("amqp://u:p@h/%2F", "", "http://h:15672", "/", "u", "p"),
        ("amqps://u:p@h:5671/", "", "https://h:15671", "/", "u", "p"),
        ("amqp://u:p@h/", "http://mgmt:8080", "http://mgmt:8080", "/", "u", "p"),
        ("amqp://u:p@h/v", "https://admin:secret@mgmt/", "https://mgmt:15671", "v", "admin", "secret"),
    ],
)
def test_management_endpoint_is_derived_from_the_amqp_url_unless_configured(
    amqp: str, override: str, base: str, vhost: str, user: str, password: str
) -> None:
    ep = derive_endpoint(amqp, override)
    assert (ep.base, ep.vhost, ep.user, ep.password) == (base, vhost, user, password)
    assert "password" not in repr(ep) and "user" not in repr(ep)


def test_a_management_url_that_is_not_http_is_refused() -> None:
    with pytest.raises(ValueError, match="management_url"):
        derive_endpoint("amqp://h/", "ftp://h")


def test_holders_join_consumers_channels_and_connections() -> None:
    channels = [
        {"name": "c1 (1)", "messages_unacknowledged": 5, "prefetch_count": 5,
         "connection_details": {"name": "c1", "peer_host": "10.0.0.7"}},
        {"name": "c2 (1)", "messages_unacknowledged": 2, "prefetch_count": 0,
         "connection_details": {"name": "c2", "peer_host": "10.0.0.8"}},
    ]  # fmt: skip
    connections = [
        {"name": "c1", "user_provided_name": "spool-ingest@node7", "peer_host": "10.0.0.7"},
        {"name": "c2", "user_provided_name": None, "peer_host": "10.0.0.8"},
    ]
    consumers = [
        {"queue": {"name": "spool.ingest"}, "channel_details": {"name": "c1 (1)"}, "prefetch_count": 5},
        {"queue": {"name": "spool.ingest"}, "channel_details": {"name": "c2 (1)"}, "prefetch_count": 3},
        {"queue": {"name": "other"}, "channel_details": {"name": "c2 (1)"}, "prefetch_count": 3},
        # stale record of a deleted quorum queue (RabbitMQ 3.10): no channel, ignored
        {"queue": {"name": "spool.ingest"}, "channel_details": [], "prefetch_count": 5},
    ]
    holders = holders_by_queue(consumers, channels, connections, {"spool.ingest"})
    assert holders == {
        "spool.ingest": [
            Holder("spool-ingest@node7", "ingest", "node7", "c1 (1)", 5, 5, shared=False),
            Holder("c2", None, "10.0.0.8", "c2 (1)", 2, 3, shared=True),
        ]
    }


@pytest.mark.integration
async def test_in_flight_messages_are_shown_with_the_consumer_holding_them(settings, broker, topology):
    holder = await aio_pika.connect(
        settings.bus.url, client_properties={"connection_name": "spool-holder@node42"}
    )
    held: list[aio_pika.abc.AbstractIncomingMessage] = []
    try:
        channel = await holder.channel()
        await channel.set_qos(prefetch_count=5)
        queue = await channel.get_queue(settings.queue("ingest"))

        async def keep(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            held.append(message)  # never acked: delivered, in flight

        await queue.consume(keep)
        for i in range(8):
            await publish_raw(broker, settings, "file.ready", cloudevent({"path": f"/l/{i}", "dataset": "d"}))
        await wait_for(lambda: _is(len(held) == 5))

        async def shows_holder() -> bool:
            report = await queue_report(settings)
            [ingest] = [q for q in report.queues if q.daemon == "ingest"]
            return ingest.in_flight == 5 and bool(ingest.holders)

        # the management API refreshes its figures every 5 s
        await wait_for(shows_holder, timeout=60, interval=1)
        report = await queue_report(settings)
    finally:
        await holder.close()
    [ingest] = [q for q in report.queues if q.daemon == "ingest"]
    assert (ingest.ready, ingest.in_flight, ingest.consumers) == (3, 5, 1)
    [who] = ingest.holders or []
    assert (who.daemon, who.host, who.connection, who.unacked) == (
        "holder",
        "node42",
        "spool-holder@node42",
        5,
    )
    assert report.management.reachable and report.amqp.reachable and report.missing == []


@pytest.mark.integration
async def test_without_the_management_api_queue_counts_still_come_from_amqp_and_the_gap_is_named(
    tmp_path, tag, broker
):
    closed = free_port()
    config = monitor_config(tmp_path / "unreachable", tag, management_url=f'"http://127.0.0.1:{closed}"')
    settings = load_settings(config)
    async with running([monitor_service], settings) as process:
        res = resources_of(process)
        await publish_raw(broker, settings, "file.ready", cloudevent({"path": "/l/x", "dataset": "d"}))
        await wait_for(lambda: _is(_ingest_ready(res.observed.queues) == 1))
        doc = await get_json(f"http://127.0.0.1:{res.web.port}/api/status")
    [ingest] = [q for q in doc["queues"]["queues"] if q["daemon"] == "ingest"]
    assert ingest["ready"] == 1 and ingest["consumers"] == 0 and ingest["dead"] == 0
    assert ingest["in_flight"] is None and ingest["holders"] is None  # unknown, not zero
    assert doc["queues"]["management"]["reachable"] is False
    assert any("in-flight" in m and "management API unreachable" in m for m in doc["missing"])


def _ingest_ready(report: object) -> int | None:
    if report is None:
        return None
    return next(q.ready for q in report.queues if q.daemon == "ingest")  # type: ignore[attr-defined]


async def _is(value: bool) -> bool:
    return value


async def test_asking_for_missing_queues_leaves_no_channel_open_on_the_connection(settings, broker) -> None:
    """A passive declare of a missing queue makes the broker close the channel; a robust channel
    then reopens itself unless closed by us. The monitor asks every few seconds: each look used to
    leave one channel per missing queue open on its connection, for the life of the daemon."""
    missing = [f"{settings.bus.queue_prefix}.missing-{n}" for n in range(3)]
    raw = broker.transport.connection
    before = set(raw.channels)
    for _ in range(4):
        assert await passive_counts(broker, missing) == dict.fromkeys(missing)
    await asyncio.sleep(0.5)  # a reopening channel would be back by now
    assert set(raw.channels) == before
