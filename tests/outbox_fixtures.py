"""Fixtures of the outbox tests: a catalogue (on SQLite and on PostgreSQL, through
``catalogue_url``, which a test module imports from ``tests.catalogue_fixtures``), a queue hearing
every event of the test's exchange, a live publisher and one whose connection is gone."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest

from common.bus.publisher import AmqpPublisher
from common.catalogue import Catalogue
from common.config import Settings
from common.messages import FileArchived, fact_id
from tests.conftest import wait_for


def archived(i: int) -> FileArchived:
    """A ``file.archived`` event of file ``i`` (its fact id derived as the tape writer's)."""
    name = f"run1/f{i:03d}.fits"
    return FileArchived(
        id=fact_id("file.archived", "tape1", name, "A00001", str(i)),
        name=name, storage="tape1", cartridge="A00001", fseq=i,
    )  # fmt: skip


@pytest.fixture
async def cat(catalogue_url: str) -> AsyncIterator[Catalogue]:
    catalogue = await Catalogue.open(catalogue_url)
    try:
        yield catalogue
    finally:
        await catalogue.close()


@pytest.fixture
async def listener(broker: Any, settings: Settings, topology: None) -> AsyncIterator[Any]:
    """A queue bound to every event of the test's exchange."""
    channel = await broker.channel()
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(settings.bus.exchange, "#")
    yield queue
    await channel.close()


@pytest.fixture
async def live(broker: Any, settings: Settings, topology: None) -> AsyncIterator[AmqpPublisher]:
    publisher = await AmqpPublisher.create(broker, settings.bus.exchange, "test")
    yield publisher
    await publisher.close()


@pytest.fixture
async def dead(settings: Settings, topology: None) -> AmqpPublisher:
    """A publisher whose connection to the broker is gone (as during an outage)."""
    connection = await aio_pika.connect(settings.bus.url)
    publisher = await AmqpPublisher.create(connection, settings.bus.exchange, "test")  # type: ignore[arg-type]
    await connection.close()
    return publisher


async def received(queue: Any, n: int) -> list[tuple[str, str]]:
    """(routing key, message id) of the next ``n`` messages, in order."""
    out: list[tuple[str, str]] = []

    async def got_all() -> bool:
        while (m := await queue.get(fail=False)) is not None:
            await m.ack()
            out.append((m.routing_key, m.message_id))
        return len(out) >= n

    await wait_for(got_all, timeout=30)
    return out


async def nothing_more(queue: Any) -> bool:
    return await queue.get(fail=False) is None
