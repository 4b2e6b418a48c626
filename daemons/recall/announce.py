"""Publishing what recall settled: ``file.recalled``, ``recall.completed`` and the reply.

An outbox over the catalogue: an outcome is committed first, published second, and flagged
``announced`` third. A kill between the last two publishes it again after the restart — with
the same message id (derived from the request id and the file name), so a consumer that drops
duplicates by id, as the CloudEvents contract asks, sees each fact once. When the broker is
unreachable the outcome stays unannounced and ``flush`` publishes it later.

Recall's other fact, ``tape.mounted``, has no row of its own: it goes through the catalogue's
generic outbox (``common.catalogue.outbox``), published by a relay that ``flush`` drives too.
The two outboxes keep one contract (committed first, published after, again at start, same id);
recall's stays flags on its own rows because completion and the ``reply_to`` reply hang on them.

The reply to a request's AMQP ``reply_to`` is a CloudEvents JSON ``recall.completed`` (the
requester may not speak msgpack) sent through the default exchange, with the request's
correlation id. A reply queue that no longer exists is logged and given up: the requester left.

A request refused outright (``refuse``: an ``id_conflict``, an unknown destination or dataset) is
answered the same way, with a ``recall.completed`` carrying ``reason`` and ``error``, so its sender
is never left waiting; it goes only to ``reply_to`` (the request was never recorded, so no
``recall.completed`` event describes it).
"""

from __future__ import annotations

import json
from typing import Protocol, runtime_checkable

import aio_pika

from common import codec
from common.bus.admission import is_reply_queue
from common.bus.publisher import Publisher
from common.catalogue import Catalogue
from common.catalogue import recall as db
from common.errors import SpoolError
from common.logging import get_logger
from common.messages import FileRecalled, RecallCompleted, RecallRequest, TapeMounted, fact_id, new_id
from daemons.relay import OutboxRelay

log = get_logger("spool.recall")
FLUSH_BATCH = 5000


@runtime_checkable
class RawPublisher(Protocol):
    """A publisher that can also send to a queue directly (``AmqpPublisher``)."""

    async def publish_raw(self, queue: str, message: aio_pika.Message) -> None: ...


def stable_id(*parts: str) -> str:
    """The same message id for the same fact, however many times it is published."""
    return fact_id(*parts)


def file_recalled(x: db.Recalled) -> FileRecalled:
    return FileRecalled(
        id=stable_id("file.recalled", x.recall_id, x.name),
        name=x.name,
        storage=x.storage,
        request_id=x.recall_id,
        correlation_id=x.correlation_id,
    )


def recall_completed(c: db.Completion) -> RecallCompleted:
    return RecallCompleted(
        id=stable_id("recall.completed", c.recall_id),
        request_id=c.recall_id,
        files=c.files,
        failed=list(c.failed),
        correlation_id=c.correlation_id,
    )


class Announcer:
    def __init__(
        self,
        catalogue: Catalogue,
        publisher: Publisher,
        queue_prefix: str = "spool",
        holder: str | None = None,
    ) -> None:
        self.catalogue = catalogue
        self.publisher = publisher
        # Replies go only to reply queues (``common.bus.admission``): the runner refuses a request
        # with another ``reply_to``, and a ``reply_to`` stored before that rule is checked again here.
        self.queue_prefix = queue_prefix
        self.behind = False  # something could not be published: ``flush`` retries it
        # The generic outbox (``tape.mounted``), its rows claimed under this instance's lease.
        self.relay = OutboxRelay(catalogue, publisher, holder=holder)

    async def publish(self, settled: db.Settled) -> bool:
        """Publish and flag as announced; False (and ``behind``) when the broker refused."""
        if not settled:
            return True
        try:
            for x in settled.recalled:
                await self.publisher.publish(file_recalled(x), correlation_id=x.correlation_id)
            for c in settled.completed:
                await self.publisher.publish(recall_completed(c), correlation_id=c.correlation_id)
                await self._reply(c)
        except SpoolError as exc:
            log.warning("recall_announce_postponed", reason=exc.reason, error=exc.message)
            self.behind = True
            return False
        await self.catalogue.recall.mark_announced(settled)
        for c in settled.completed:
            log.info(
                "recall_completed", recall=c.recall_id, state=c.state, files=c.files, failed=len(c.failed)
            )
        return True

    async def mounted(self, msg: TapeMounted) -> None:
        """A cartridge was loaded: ``tape.mounted`` committed to the outbox, then published."""
        await self.catalogue.outbox.add([msg])
        await self.relay.send_now()
        self.behind = self.behind or self.relay.outage

    async def flush(self) -> None:
        """Publish whatever is settled but unannounced (after a restart, or a broker outage)."""
        self.behind = False
        await self.relay.flush()
        if self.relay.outage:
            self.behind = True
            return
        while True:
            settled = await self.catalogue.recall.unannounced(FLUSH_BATCH)
            if not await self.publish(settled):
                return
            if max(len(settled.recalled), len(settled.completed)) < FLUSH_BATCH:
                return

    async def refuse(
        self, msg: RecallRequest, reply_to: str | None, correlation_id: str | None, err: SpoolError
    ) -> None:
        """Answer a request refused outright on its ``reply_to`` (nothing when it has none)."""
        if reply_to is None:
            return
        answer = RecallCompleted(
            id=new_id(),  # not the request's completion fact: a reply of its own
            request_id=msg.id,
            files=0,
            failed=list(msg.names),
            reason=err.reason,
            error=err.message,
            correlation_id=correlation_id,
        )
        await self._send_reply(reply_to, answer, correlation_id or msg.id)

    async def _reply(self, c: db.Completion) -> None:
        if c.reply_to is None:
            return
        await self._send_reply(c.reply_to, recall_completed(c), c.correlation_id or c.recall_id)

    async def _send_reply(self, reply_to: str, answer: RecallCompleted, correlation_id: str) -> None:
        if not isinstance(self.publisher, RawPublisher):
            return
        if not is_reply_queue(reply_to, self.queue_prefix):
            log.warning(
                "recall_reply_refused", recall=answer.request_id, reply_to=reply_to[:300],
                error="reply_to is not a reply queue: nothing sent",
            )  # fmt: skip
            return
        event = codec.to_cloudevent(answer)
        message = aio_pika.Message(
            json.dumps(event).encode(),
            content_type=codec.CLOUDEVENTS_JSON,
            message_id=event["id"],
            correlation_id=correlation_id,
            type=RecallCompleted.ROUTING_KEY,
        )
        try:
            await self.publisher.publish_raw(reply_to, message)
        except SpoolError as exc:
            if exc.reason != "unroutable":
                raise
            log.warning(
                "recall_reply_undeliverable", recall=answer.request_id, reply_to=reply_to, error=exc.message
            )
