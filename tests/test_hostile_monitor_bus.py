"""Issue 16, class 6 against the real broker: liveness only from Spool's own users, and hostile
values sent over the bus leave ``/metrics`` and ``/api/status`` answering 200, small, and the
monitor counting.

A second RabbitMQ user (``forger``), with full permissions on a vhost of the test's own, is created
through the management API for each test and deleted afterwards, with the vhost."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aio_pika
import aiohttp
import msgpack
import pytest
from prometheus_client.parser import text_string_to_metric_families

from common import codec
from common.messages import DaemonHeartbeat, FileFailed
from daemons.monitor.handlers import service as monitor_service
from tests.conftest import AMQP_URL, running, wait_for
from tests.monitor_fixtures import monitor_config, publish_many, resources_of

pytestmark = pytest.mark.integration
MANAGEMENT = "http://127.0.0.1:15672/api"
ADMIN = {"Authorization": "Basic " + base64.b64encode(b"guest:guest").decode()}
FORGER = "forger"


async def _management(method: str, path: str, body: dict[str, Any] | None = None) -> None:
    async with (
        aiohttp.ClientSession(headers=ADMIN) as session,
        session.request(method, MANAGEMENT + path, json=body) as response,
    ):
        assert response.status in (200, 201, 204, 404), await response.text()


@pytest.fixture
async def vhost(tag: str) -> AsyncIterator[str]:
    """A vhost of this test's own, where guest (Spool's user here) and ``forger`` may do anything."""
    name = f"spool-test-{tag}"
    path = quote(name, safe="")
    password = f"pw-{tag}"
    await _management("PUT", f"/vhosts/{path}")
    await _management("PUT", f"/users/{FORGER}-{tag}", {"password": password, "tags": ""})
    everything = {"configure": ".*", "write": ".*", "read": ".*"}
    await _management("PUT", f"/permissions/{path}/guest", everything)
    await _management("PUT", f"/permissions/{path}/{FORGER}-{tag}", everything)
    try:
        yield name
    finally:
        await _management("DELETE", f"/users/{FORGER}-{tag}")
        await _management("DELETE", f"/vhosts/{path}")


@pytest.fixture
def config_file(tmp_path: Path, tag: str, vhost: str) -> Path:
    path = monitor_config(tmp_path, tag)
    text = path.read_text()
    assert AMQP_URL in text
    path.write_text(text.replace(AMQP_URL, AMQP_URL.rstrip("/") + "/" + quote(vhost, safe="")))
    return path


def _forger_url(settings: Any, tag: str) -> str:
    return settings.bus.url.replace("guest:guest@", f"{FORGER}-{tag}:pw-{tag}@")


async def _publish_as_forger(settings: Any, tag: str, messages: list[Any], user_id: str | None) -> None:
    connection = await aio_pika.connect(_forger_url(settings, tag))
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(settings.bus.exchange)
        for m in messages:
            body = aio_pika.Message(
                codec.encode(m), content_type=codec.MSGPACK, message_id=m.id, user_id=user_id
            )
            await exchange.publish(body, routing_key=m.ROUTING_KEY)
    finally:
        await connection.close()


def _beat(instance: str, when: datetime, **kw: Any) -> DaemonHeartbeat:
    return DaemonHeartbeat(
        daemon="ingest", instance=instance, host="node1", pid=4242, version="0.1",
        started=when - timedelta(hours=2), time=when, **kw,
    )  # fmt: skip


def _ingest_states(res: Any) -> dict[str, str]:
    return {v.instance: v.state for v in res.state.daemons() if v.daemon == "ingest"}


async def _is(value: bool) -> bool:
    return value


async def _http(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.text()


@pytest.mark.parametrize("user_id", [None, "forger"], ids=["no-user-id", "own-user-id"])
async def test_a_heartbeat_forged_by_another_broker_user_does_not_show_a_stopped_daemon_alive(
    settings, broker, topology, tag, user_id
):
    now = datetime.now(UTC)
    async with running([monitor_service], settings) as process:
        res = resources_of(process)
        # The daemon's real last heartbeat, an hour old: it stopped.
        await publish_many(broker, settings, [_beat("stopped", now - timedelta(hours=1))])
        await wait_for(lambda: _is(_ingest_states(res) == {"stopped": "dead"}))
        forged = [_beat("stopped", datetime.now(UTC), processed=10**6), _beat("phantom", datetime.now(UTC))]
        await _publish_as_forger(settings, tag, forged, f"{FORGER}-{tag}" if user_id else None)
        # A good fact after them (published once they were confirmed): seen means they were too.
        await publish_many(
            broker, settings, [FileFailed(daemon="ingest", reason="disk_full", error="e", attempts=1)]
        )
        await wait_for(lambda: _is(res.state.events["file.failed"] == 1))
        status, body = await _http(f"http://127.0.0.1:{res.web.port}/api/status")
        metrics_status, metrics = await _http(f"http://127.0.0.1:{res.web.port}/metrics")
    assert _ingest_states(res) == {"stopped": "dead"}
    assert res.state.refused["untrusted_sender"] == 2
    assert res.state.processed.get("ingest", 0) == 0
    assert status == 200 and metrics_status == 200
    doc = json.loads(body)
    assert [(d["instance"], d["state"]) for d in doc["daemons"] if d["daemon"] == "ingest"] == [
        ("stopped", "dead")
    ]
    assert doc["refused"]["by_reason"] == {"untrusted_sender": 2}
    assert 'spool_refused_facts_total{reason="untrusted_sender"} 2.0' in metrics


async def test_a_forger_cannot_claim_spools_user_id(settings, broker, topology, tag):
    """RabbitMQ itself refuses a ``user_id`` other than the publishing connection's user."""
    async with running([monitor_service], settings) as process:
        res = resources_of(process)
        with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed):
            await _publish_as_forger(settings, tag, [_beat("phantom", datetime.now(UTC))], "guest")
        await publish_many(
            broker, settings, [FileFailed(daemon="ingest", reason="disk_full", error="e", attempts=1)]
        )
        await wait_for(lambda: _is(res.state.events["file.failed"] == 1))
    assert "phantom" not in _ingest_states(res)


HOSTILE_BEATS: list[dict[str, Any]] = [
    {"processed": 10**400},
    {"in_flight": -1},
    {"failed": 2**64},
    # Without a UTC offset (read as UTC), and recent: a heartbeat weeks old would be forgotten.
    {"time": datetime.now(UTC).replace(tzinfo=None).isoformat()},
    {"started": datetime.now(UTC).replace(tzinfo=None).isoformat()},
    {"details": {"retried_by_reason": {f"reason_{i}": 1 for i in range(100_000)}}},
    {"details": {"handling": {"buckets": [0.1], "counts": [1, 2], "sum": float("nan")}}},
    {"host": "\ud800"},  # a lone surrogate: valid JSON, not writable into /metrics
]


async def test_hostile_heartbeats_over_the_bus_leave_the_monitor_answering_and_counting(
    settings, broker, topology
):
    good = {"daemon": "ingest", "instance": "x", "host": "h", "pid": 1, "version": "v",
            "started": datetime.now(UTC).isoformat()}  # fmt: skip
    user = "guest"  # Spool's user here: believed as a sender, so only the door's checks stand
    async with running([monitor_service], settings) as process:
        res = resources_of(process)
        channel = await broker.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(settings.bus.exchange)
        for i, hostile in enumerate(HOSTILE_BEATS):
            body = json.dumps({**good, "instance": f"x{i}", **hostile}).encode()
            await exchange.publish(
                aio_pika.Message(body, content_type="application/json", user_id=user, message_id=f"h{i}"),
                routing_key="daemon.heartbeat",
            )
        # Malformed, with a lone surrogate in what its error message (and log line) quotes.
        bad_key = json.dumps({"path": "/l/x", "dataset": "d", "metadata": {"k\ud800": [1]}}).encode()
        await exchange.publish(
            aio_pika.Message(bad_key, content_type="application/json", message_id="m1"),
            routing_key="file.ready",
        )
        await channel.close()
        await publish_many(
            broker, settings, [FileFailed(daemon="ingest", reason="disk_full", error="e", attempts=1)]
        )
        await wait_for(lambda: _is(res.state.events["file.failed"] == 1))
        base = f"http://127.0.0.1:{res.web.port}"
        answers = [await _http(base + path) for path in ("/metrics", "/api/status", "/")]
        assert not process.stop_requested.is_set()
    assert [status for status, _ in answers] == [200, 200, 200]
    metrics = answers[0][1]
    list(text_string_to_metric_families(metrics))
    assert len(metrics) < 64 * 1024
    instances = {v.instance for v in res.state.daemons() if v.daemon == "ingest"}
    # Times without an offset are read as UTC (common.messages): x3 and x4 are believed. Every
    # other hostile heartbeat is refused whole, by the codec or at the monitor's door (the
    # 100,000 reasons too: details over 64 KiB).
    assert instances == {"x3", "x4"}
    malformed_file_ready = 1
    refused_or_malformed = sum(res.state.refused.values()) + sum(res.state.malformed.values())
    assert refused_or_malformed == len(HOSTILE_BEATS) - 2 + malformed_file_ready
    doc = json.loads(answers[1][1])
    assert doc["refused"]["total"] + doc["malformed"]["total"] == refused_or_malformed


async def test_msgpack_numbers_beyond_the_bound_over_the_bus(settings, broker, topology):
    async with running([monitor_service], settings) as process:
        res = resources_of(process)
        channel = await broker.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(settings.bus.exchange)
        fact = {
            "name": "a",
            "dataset": "d",
            "size": 2**64 - 1,
            "adler32": "00000001",
            "storage": "disk1",
            "pfn": "a",
        }
        await exchange.publish(
            aio_pika.Message(
                msgpack.packb(fact), content_type=codec.MSGPACK, user_id="guest", message_id="big"
            ),
            routing_key="file.ingested",
        )
        await channel.close()
        # Refused by the codec (sizes are bounded) or at the door: not believed either way.
        await wait_for(lambda: _is(sum(res.state.refused.values()) + sum(res.state.malformed.values()) == 1))
        status, _ = await _http(f"http://127.0.0.1:{res.web.port}/metrics")
    assert status == 200 and not res.state.moved_bytes
