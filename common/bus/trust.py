"""Who sent a delivery: Spool itself, or an external publisher.

RabbitMQ validates the AMQP ``user_id`` property: a message whose ``user_id`` is not the user of
the connection that published it is refused by the broker. Spool's publishers always set it, so a
delivery whose ``user_id`` is one of ``bus.trusted_users()`` came from a Spool daemon (or CLI run
with a Spool user). Anything else (no ``user_id``, another user) is external: it may send only the
external contract (``file.ready``, ``recall.request``), its ``x-spool-*`` headers are ignored and
its heartbeats are not believed.
"""

from __future__ import annotations

from common.config import BusSettings


def is_spool_user(user_id: str | None, bus: BusSettings) -> bool:
    """Whether a delivery with this AMQP ``user_id`` was published by one of Spool's own users."""
    return user_id is not None and user_id in bus.trusted_users()
