"""Publishing with publisher confirms and ``mandatory``.

``Publisher`` is the small interface step logic sees; ``RecordingPublisher`` implements it for unit
tests. ``AmqpPublisher.publish`` returns only once the broker confirmed the message, and raises
``Retryable`` if it was returned as unroutable or nacked: silence is never success. Concurrent
handlers each await their own confirm, so confirms are pipelined on the channel rather than one
round trip per message in sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractExchange
from pamqp.commands import Basic

from common import codec
from common.errors import Retryable
from common.messages import Message

PERSISTENT = int(aio_pika.DeliveryMode.PERSISTENT)
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"  # RabbitMQ's pseudo-queue (and its generated names)


class Publisher(Protocol):
    async def publish(self, msg: Message, *, correlation_id: str | None = None) -> None:
        """Publish a command or event on the ``spool`` exchange under ``msg.ROUTING_KEY``."""


@dataclass
class RecordingPublisher:
    """Test double: remembers what step logic published, in order."""

    published: list[Message] = field(default_factory=list)

    async def publish(self, msg: Message, *, correlation_id: str | None = None) -> None:
        self.published.append(msg)

    def of_type(self, model: type[Message]) -> list[Any]:
        return [m for m in self.published if isinstance(m, model)]


class AmqpPublisher:
    def __init__(
        self, channel: AbstractChannel, exchange: AbstractExchange, app_id: str, user_id: str | None = None
    ) -> None:
        self._channel = channel
        self._exchange = exchange
        self._app_id = app_id
        # The connection's user, as the AMQP ``user_id`` of every message: RabbitMQ refuses any
        # other value, so consumers can tell Spool's own messages (``common.bus.trust``).
        self._user_id = user_id

    @classmethod
    async def create(
        cls, connection: aio_pika.abc.AbstractRobustConnection, exchange_name: str, app_id: str
    ) -> AmqpPublisher:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.get_exchange(exchange_name, ensure=False)
        return cls(channel, exchange, app_id, connection_user(connection))

    async def publish(self, msg: Message, *, correlation_id: str | None = None) -> None:
        # Properties built directly (pamqp), not through ``aio_pika.Message``, whose per-attribute
        # checks showed in ingest profiles. No attempt header: absent means attempt 1.
        properties = Basic.Properties(
            content_type=codec.MSGPACK,
            delivery_mode=PERSISTENT,
            message_id=msg.id,
            correlation_id=correlation_id or msg.correlation_id,
            message_type=msg.ROUTING_KEY,
            app_id=self._app_id,
            timestamp=msg.time,
            user_id=self._user_id,
        )
        await self._send(self._exchange.name, codec.encode(msg), properties, msg.ROUTING_KEY)

    async def publish_raw(self, queue: str, message: aio_pika.Message) -> None:
        """Send straight to a queue through the default exchange (retry tiers, dead letters,
        replies), as this connection's user like every message (a copy names its original sender
        in a header: ``common.bus.admission``)."""
        properties = message.properties
        properties.user_id = self._user_id
        # RabbitMQ (3.10 measured) returns a reply to a direct reply-to name as unroutable although
        # it delivered it: not ``mandatory`` there (a requester gone meanwhile loses its reply).
        mandatory = not queue.startswith(DIRECT_REPLY_TO)
        await self._send("", message.body, properties, queue, mandatory=mandatory)

    async def _send(
        self,
        exchange: str,
        body: bytes,
        properties: Basic.Properties,
        routing_key: str,
        *,
        mandatory: bool = True,
    ) -> None:
        try:
            # The robust channel's current aiormq channel (a new one after a reconnection).
            channel = await self._channel.get_underlay_channel()
            # wait=False: not also a future for "written to the socket"; the broker's confirm is
            # what counts, and a channel that dies first fails it (raised below).
            confirmation = await cast(aiormq.Channel, channel).basic_publish(  # ``wait``: not in the ABC
                body, exchange=exchange, routing_key=routing_key, properties=properties, mandatory=mandatory,
                wait=False,
            )  # fmt: skip
        except aiormq.exceptions.DeliveryError as exc:  # returned as unroutable (or nacked)
            raise Retryable("unroutable", f"broker returned {routing_key!r}: {exc}") from None
        except (
            aiormq.exceptions.AMQPError,
            aiormq.exceptions.ChannelInvalidStateError,
            ConnectionError,
        ) as exc:
            raise Retryable("broker_unavailable", f"publish of {routing_key!r} failed: {exc!r}") from None
        if confirmation is not None and not isinstance(confirmation, Basic.Ack):
            raise Retryable("publish_nacked", f"broker did not confirm {routing_key!r}: {confirmation!r}")

    async def close(self) -> None:
        if not self._channel.is_closed:
            await self._channel.close()


def connection_user(connection: aio_pika.abc.AbstractConnection) -> str:
    """The broker user a connection logged in as (RabbitMQ's default, ``guest``, when unnamed)."""
    return cast(aio_pika.Connection, connection).url.user or "guest"


def copy_of(
    body: bytes,
    properties: Basic.Properties,
    headers: dict[str, Any],
    *,
    expiration: float | None = None,
    user_id: str | None = None,
) -> aio_pika.Message:
    """A persistent copy of a received message with new headers (retry tiers, dead letters, revival).

    Body and AMQP properties are kept as they came, so a message looks the same in every queue it
    passes through; only Spool's headers tell its story. Not the ``user_id``: the copy is published
    by whoever copies it (``user_id``, or the publisher's own in ``publish_raw``), and carries the
    original's in ``x-spool-sender``. ``expiration`` (seconds) is the retry's jittered delay.
    """
    return aio_pika.Message(
        body,
        headers=headers,
        content_type=properties.content_type,
        content_encoding=properties.content_encoding,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=properties.message_id,
        correlation_id=properties.correlation_id,
        type=properties.message_type,
        app_id=properties.app_id,
        timestamp=properties.timestamp,
        reply_to=properties.reply_to,
        expiration=expiration,
        user_id=user_id,
    )
