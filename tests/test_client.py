"""``common.client.SpoolClient`` against a real RabbitMQ and a real monitor web server on a real
catalogue (SQLite and PostgreSQL)."""

# Fixtures imported from the fixtures modules reappear as test parameters:
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid

import aio_pika
import pytest

from common import codec
from common.client import ApiError, PublishError, SpoolClient
from common.config import Settings
from common.messages import FileReady, RecallRequest
from tests.catalogue_fixtures import catalogue, catalogue_url  # noqa: F401
from tests.conftest import AMQP_URL, REPO
from tests.namespace_fixtures import TOKEN, TREE, api, planted  # noqa: F401


async def _bound_queue(
    broker: aio_pika.abc.AbstractRobustConnection, exchange: str, key: str
) -> tuple[aio_pika.abc.AbstractChannel, aio_pika.abc.AbstractQueue]:
    channel = await broker.channel()
    queue = await channel.declare_queue(f"client-test-{uuid.uuid4().hex[:8]}", exclusive=True)
    await queue.bind(exchange, key)
    return channel, queue


async def _one(queue: aio_pika.abc.AbstractQueue) -> aio_pika.abc.AbstractIncomingMessage:
    for _ in range(50):
        message = await queue.get(fail=False)
        if message is not None:
            return message
        await asyncio.sleep(0.1)
    raise AssertionError("nothing arrived")


async def test_file_ready_reaches_a_bound_queue_as_the_contract_says(
    settings: Settings, broker: aio_pika.abc.AbstractRobustConnection, topology: None
) -> None:
    channel, queue = await _bound_queue(broker, settings.bus.exchange, "file.ready")
    async with SpoolClient(amqp_url=AMQP_URL, exchange=settings.bus.exchange, source="lst1-daq") as client:
        event_id = await client.publish_file_ready(
            "/data/landing/lst1/run1/f.fits", "lst1.20261123.run000001.dl0",
            size=2048, adler32="1a2b3c4d", metadata={"run": 1, "telescope": "LST1"}, parents=["raw/f0"],
        )  # fmt: skip
    message = await _one(queue)
    assert message.content_type == "application/cloudevents+json"
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.message_id == event_id and message.user_id == "guest"
    # Spool's own decoder takes it: the event is what ingest accepts from outside.
    decoded = codec.decode(message.body, message.content_type, "file.ready", message.message_id)
    assert isinstance(decoded, FileReady) and decoded.id == event_id
    assert (decoded.path, decoded.size, decoded.adler32, decoded.metadata, decoded.parents) == (
        "/data/landing/lst1/run1/f.fits", 2048, "1a2b3c4d", {"run": 1, "telescope": "LST1"}, ["raw/f0"],
    )  # fmt: skip
    await channel.close()


async def test_recall_request_reaches_a_bound_queue(
    settings: Settings, broker: aio_pika.abc.AbstractRobustConnection, topology: None
) -> None:
    channel, queue = await _bound_queue(broker, settings.bus.exchange, "recall.request")
    async with SpoolClient(amqp_url=AMQP_URL, exchange=settings.bus.exchange) as client:
        event_id = await client.publish_recall_request(
            dataset="lst1.20261123.run000001.dl0", destination="disk1", priority=7, reply_to="spool.reply.me"
        )
        with pytest.raises(ValueError):
            await client.publish_recall_request(destination="disk1")
    message = await _one(queue)
    decoded = codec.decode(message.body, message.content_type, "recall.request", message.message_id)
    assert isinstance(decoded, RecallRequest) and decoded.id == event_id
    assert (decoded.dataset, decoded.destination, decoded.priority) == (
        "lst1.20261123.run000001.dl0",
        "disk1",
        7,
    )
    assert message.reply_to == "spool.reply.me"
    await channel.close()


async def test_an_unroutable_event_raises(broker: aio_pika.abc.AbstractRobustConnection, tag: str) -> None:
    channel = await broker.channel()
    name = f"client-test-unbound-{tag}"
    await channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, auto_delete=True)
    try:
        async with SpoolClient(amqp_url=AMQP_URL, exchange=name) as client:
            with pytest.raises(PublishError) as caught:
                await client.publish_file_ready("/data/landing/f", "lst1.20261123.run000001.dl0")
            assert caught.value.reason == "unroutable"
    finally:
        await channel.exchange_delete(name)
        await channel.close()


async def test_a_missing_exchange_raises(broker: aio_pika.abc.AbstractRobustConnection, tag: str) -> None:
    async with SpoolClient(amqp_url=AMQP_URL, exchange=f"no-such-exchange-{tag}") as client:
        with pytest.raises(PublishError) as caught:
            await client.publish_file_ready("/data/landing/f", "lst1.20261123.run000001.dl0")
    assert caught.value.reason == "exchange_missing"


async def test_an_unreachable_broker_raises() -> None:
    async with SpoolClient(amqp_url="amqp://guest:guest@127.0.0.1:1/", timeout=5) as client:
        with pytest.raises(PublishError) as caught:
            await client.publish_file_ready("/data/landing/f", "ds")
    assert caught.value.reason == "broker_unreachable"


async def test_questions_iterate_every_page(api: str) -> None:
    async with SpoolClient(api, token=TOKEN) as client:
        entries = [e async for e in client.list_directory("lst1", page_size=1)]
        assert [e["name"] for e in entries] == ["run%", "run1", "run10", "run1x", "runXY", "run_"]
        found = [f["name"] async for f in client.find(["run>=1", "run<=10"], page_size=2)]
        assert found == [n for n in sorted(TREE) if 1 <= int(TREE[n][2].get("run", 0)) <= 10]
        assert len(found) == 5
        dumped = [r["name"] async for r in client.dump("disk1", page_size=3)]
        assert sorted(dumped) == sorted(TREE)
        assert [d["name"] async for d in client.datasets(page_size=1)] == ["ds.a", "ds.b"]
        assert (await client.directory_size("lst1/run1"))["files"] == 3
        assert await client.lfn_for_pfn("disk2", "/srv/disk2/spool/lst1/run1/a.fits") == "lst1/run1/a.fits"
        assert await client.lfn_for_pfn("disk2", "/srv/disk2/elsewhere") is None
        file = await client.file("lst1/run_/f.fits")
        assert file is not None and file["metadata"] == {"mode": "a_b"}
        assert await client.file("lst1/run_/nothing") is None
        names = [f"missing{i}" for i in range(150)] + ["lst2"]  # more than one question's worth
        replicas = await client.replicas(names)
        assert len(replicas) == 151 and [r["endpoint"] for r in replicas["lst2"]] == ["disk1"]
        exists = await client.exists(["lst2", "lst1"])
        assert [(x["file"], x["directory"]) for x in exists] == [(True, True), (False, True)]
        assert [x["key"] for x in await client.metadata_fields()] == ["mode", "run", "telescope"]
        assert [x["name"] for x in await client.endpoints()] == ["disk1", "disk2", "tape1"]
        assert [x["name"] async for x in client.ancestors("lst2")] == []


async def test_refusals_raise_api_error_naming_the_parameter(api: str) -> None:
    async with SpoolClient(api, token=TOKEN) as client:
        with pytest.raises(ApiError) as bad:
            [f async for f in client.find(["run"])]
        assert (bad.value.status, bad.value.parameter) == (400, "filter")
        with pytest.raises(ApiError) as unknown:
            await client.lfn_for_pfn("nowhere", "/x")
        assert (unknown.value.status, unknown.value.parameter) == (404, "endpoint")
    async with SpoolClient(api, token="wrong") as client:
        with pytest.raises(ApiError) as refused:
            await client.directory_size()
        assert refused.value.status == 401


def test_the_client_imports_neither_sqlalchemy_nor_spool_modules() -> None:
    code = (
        "import sys, common.client\n"
        "heavy = ('sqlalchemy', 'pydantic', 'aio_pika', 'aiohttp')\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in heavy\n"
        "          or (m.startswith('common.') and m != 'common.client')]\n"
        "print(loaded)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
