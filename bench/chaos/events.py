"""The harness's own witness on the bus: a durable queue bound to ``#`` on Spool's exchange, on the
private broker, declared before any daemon starts and read at the end. Durable, and every Spool
message is persistent, so what was published before a broker outage is still there after it.

Only facts count: an event published at least once is enough (the bus is at-least-once), so each
is keyed by what it states (the file, the copy, the request), never by how often it came.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field

import aio_pika
import msgpack

QUEUE = "chaos.witness"


@dataclass
class Seen:
    ingested: set[str] = field(default_factory=set)  # names
    created: set[tuple[str, str]] = field(default_factory=set)  # (name, storage)
    archived: set[tuple[str, str]] = field(default_factory=set)  # (name, storage)
    recalled: set[tuple[str, str]] = field(default_factory=set)  # (request id, name)
    completed: set[str] = field(default_factory=set)  # recall request ids
    failed: Counter[str] = field(default_factory=Counter)  # file.failed by reason
    by_type: Counter[str] = field(default_factory=Counter)  # messages per routing key
    duplicates: Counter[str] = field(default_factory=Counter)  # same message id seen again
    ids: set[str] = field(default_factory=set)

    def add(self, key: str, message_id: str | None, body: bytes, content_type: str | None) -> None:
        self.by_type[key] += 1
        if message_id:
            if message_id in self.ids:
                self.duplicates[key] += 1
            self.ids.add(message_id)
        if content_type != "application/msgpack":
            return  # the harness's own CloudEvents (file.ready, recall.request)
        e = msgpack.unpackb(body)
        if key == "file.ingested":
            self.ingested.add(e["name"])
        elif key == "replica.created":
            self.created.update((c["name"], e["storage"]) for c in e["copies"])
        elif key == "file.archived":
            self.archived.add((e["name"], e["storage"]))
        elif key == "file.recalled":
            self.recalled.add((e["request_id"], e["name"]))
        elif key == "recall.completed":
            self.completed.add(e["request_id"])
        elif key == "file.failed":
            self.failed[e.get("reason") or "?"] += 1


async def declare(url: str, exchange: str = "spool") -> None:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(QUEUE, durable=True)
        await queue.bind(exchange, "#")
    finally:
        await connection.close()


async def read_all(url: str, idle: float = 3.0) -> Seen:
    """Everything the witness queue holds, until it has been empty for ``idle`` seconds."""
    seen = Seen()
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=2000)
        queue = await channel.declare_queue(QUEUE, durable=True)
        last = asyncio.get_running_loop().time()

        async def on_message(m: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal last
            seen.add(m.routing_key or "", m.message_id, m.body, m.content_type)
            last = asyncio.get_running_loop().time()
            await m.ack()

        tag = await queue.consume(on_message)
        while asyncio.get_running_loop().time() - last < idle:
            await asyncio.sleep(0.2)
        await queue.cancel(tag)
    finally:
        await connection.close()
    return seen
