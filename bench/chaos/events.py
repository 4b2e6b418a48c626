"""The harness's own witness on the bus: a durable queue bound to ``#`` on Spool's exchange, on the
run's broker, declared before any daemon starts and read at the end. Durable, and every Spool
message is persistent, so what was published before a broker outage is still there after it. On a
cluster it is a quorum queue: a classic one lives on one node, and while that node is down what is
routed to it is gone.

Only facts count: an event published at least once is enough (the bus is at-least-once), so each
is keyed by what it states (the file, the copy, the request), never by how often it came.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

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
    # daemon.heartbeat: per process (pid, instance) its daemon and the most it said it processed
    processed: dict[tuple[int, str], tuple[str, int]] = field(default_factory=dict)

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
        elif key == "daemon.heartbeat":
            at = (int(e["pid"]), str(e["instance"]))
            before = self.processed.get(at, ("", 0))[1]
            self.processed[at] = (str(e["daemon"]), max(before, int(e.get("processed") or 0)))


async def connect_any(urls: list[str]) -> aio_pika.abc.AbstractConnection:
    """To the first node that answers."""
    error: Exception | None = None
    for url in urls:
        try:
            return await aio_pika.connect(url, timeout=10)
        except Exception as exc:  # that node is down: the next
            error = exc
    raise ConnectionError(f"no broker node answers: {error!r}")


def _arguments(quorum: bool) -> dict[str, Any] | None:
    return {"x-queue-type": "quorum"} if quorum else None


async def declare(urls: list[str], quorum: bool = False, exchange: str = "spool") -> None:
    connection = await connect_any(urls)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(QUEUE, durable=True, arguments=_arguments(quorum))
        await queue.bind(exchange, "#")
    finally:
        await connection.close()


async def read_all(urls: list[str], quorum: bool = False, idle: float = 3.0) -> Seen:
    """Everything the witness queue holds, until it has been empty for ``idle`` seconds."""
    seen = Seen()
    connection = await connect_any(urls)
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=2000)
        queue = await channel.declare_queue(QUEUE, durable=True, arguments=_arguments(quorum))
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
