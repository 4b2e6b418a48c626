"""Publishing with publisher confirms and ``mandatory``.

``Publisher`` is the small interface step logic sees; ``RecordingPublisher`` implements it for unit
tests. ``AmqpPublisher.publish`` returns only once the broker confirmed the message, and raises
``Retryable`` if it was returned as unroutable or nacked: silence is never success. Concurrent
handlers each await their own confirm, so confirms are pipelined on the channel rather than one
round trip per message in sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage

from common import codec
from common.bus import headers as H
from common.errors import Retryable
from common.messages import Message


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
    def __init__(self, channel: AbstractChannel, exchange: AbstractExchange, app_id: str) -> None:
        self._channel = channel
        self._exchange = exchange
        self._app_id = app_id

    @classmethod
    async def create(
        cls, connection: aio_pika.abc.AbstractRobustConnection, exchange_name: str, app_id: str
    ) -> AmqpPublisher:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.get_exchange(exchange_name, ensure=False)
        return cls(channel, exchange, app_id)

    async def publish(self, msg: Message, *, correlation_id: str | None = None) -> None:
        message = aio_pika.Message(
            codec.encode(msg),
            content_type=codec.MSGPACK,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=msg.id,
            correlation_id=correlation_id or msg.correlation_id,
            type=msg.ROUTING_KEY,
            app_id=self._app_id,
            timestamp=msg.time,
            headers={H.ATTEMPT: 1},
        )
        await self._send(self._exchange, message, msg.ROUTING_KEY)

    async def publish_raw(self, queue: str, message: aio_pika.Message) -> None:
        """Send straight to a queue through the default exchange (retry tiers, dead letters)."""
        await self._send(self._channel.default_exchange, message, queue)

    async def _send(self, exchange: AbstractExchange, message: aio_pika.Message, routing_key: str) -> None:
        try:
            confirmation = await exchange.publish(message, routing_key=routing_key, mandatory=True)
        except aio_pika.exceptions.DeliveryError as exc:
            raise Retryable("unroutable", f"broker returned {routing_key!r}: {exc}") from None
        except (
            aiormq.exceptions.AMQPError,
            aiormq.exceptions.ChannelInvalidStateError,
            ConnectionError,
        ) as exc:
            raise Retryable("broker_unavailable", f"publish of {routing_key!r} failed: {exc!r}") from None
        if confirmation is not None and not _is_ack(confirmation):
            raise Retryable("publish_nacked", f"broker did not confirm {routing_key!r}: {confirmation!r}")

    async def close(self) -> None:
        if not self._channel.is_closed:
            await self._channel.close()


def copy_of(delivery: AbstractIncomingMessage, headers: dict[str, Any]) -> aio_pika.Message:
    """A persistent copy of a received message with new headers (retry tiers, dead letters, revival).

    Body and AMQP properties are kept as they came, so a message looks the same in every queue it
    passes through; only Spool's headers tell its story.
    """
    return aio_pika.Message(
        delivery.body,
        headers=headers,
        content_type=delivery.content_type,
        content_encoding=delivery.content_encoding,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=delivery.message_id,
        correlation_id=delivery.correlation_id,
        type=delivery.type,
        app_id=delivery.app_id,
        timestamp=delivery.timestamp,
        reply_to=delivery.reply_to,
    )


def _is_ack(confirmation: object) -> bool:
    from pamqp import commands

    return isinstance(confirmation, commands.Basic.Ack)
