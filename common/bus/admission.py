"""What the runner believes of a delivery before any handler sees it: who sent it, which attempt
it is, under which routing key, and whether that sender may send it at all.

**The sender.** RabbitMQ validates the AMQP ``user_id`` property (a message whose ``user_id`` is
not its connection's user is refused), so ``user_id`` says who published a delivery.
``common.bus.trust.is_spool_user`` says whether that is one of Spool's own users.

**Spool's own copies.** The runner re-publishes a failed delivery into a retry-tier queue or a
dead-letter queue (``publish_raw`` + ``copy_of``), and ``spool dead retry`` sends a dead letter
back to its work queue. Those copies are published *by Spool* (``user_id`` = the daemon's or the
CLI's user) but are not *from* Spool: the copy carries the original sender in the ``x-spool-sender``
header (empty: the original had no ``user_id``). So:

- a delivery from a Spool user with ``x-spool-sender``: its sender is that header (a copy);
- a delivery from a Spool user without it: its sender is the Spool user (Spool's own message);
- any other delivery (another user, no ``user_id``): its sender is its ``user_id``, and **every**
  ``x-spool-*`` header on it is ignored: an external ``x-spool-attempt: 999`` is attempt 1, an
  external ``x-spool-routing-key`` or ``x-spool-sender`` is not read. The runner's copies of such a
  delivery drop those headers too (``spool_headers_of``), so nothing forged survives a retry.

The attempt count and routing key of a retry copy are therefore believed (the copy comes from a
Spool user), while whether its *content* is permitted is decided on the original sender, on every
delivery of it: a retry or a revival never turns an external message into a trusted one.

**What a sender may send.** External publishers (anything but a Spool sender) may send the
external contract only: ``file.ready``, ``recall.request`` and ``metadata.set``. Every other routing key is an
internal command or a fact of Spool's (``replica.request``, ``tape.archive``, events, heartbeats):
from anyone else it is ``Permanent("not_permitted")``, one dead letter, never handled.

**Where replies go.** ``reply_to`` must name a reply queue: ``<bus.queue_prefix>.reply.<name>``
(``<name>``: 1 to 128 letters, digits and ``._:=+/-``) or RabbitMQ's direct reply-to
(``amq.rabbitmq.reply-to`` and the ``.``-suffixed names the broker generates for it, at most 255
bytes, AMQP's limit for a queue name). Any other value (a daemon's work queue, a dead-letter queue,
a server-named ``amq.gen-`` queue, an empty string, ...) is
``Permanent("invalid_reply_to")`` before the handler runs, so nothing is ever sent there, whoever
the sender is. ``spool broker setup`` grants the reply-queue pattern to the users that need it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pamqp.commands import Basic

from common.bus import headers as H
from common.bus.publisher import DIRECT_REPLY_TO
from common.config import BusSettings
from common.errors import Permanent
from common.messages import DatasetClose, FileReady, MetadataSet, RecallRequest

# The external contract: what any publisher allowed on the exchange may send.
EXTERNAL_ROUTING_KEYS = frozenset(
    {FileReady.ROUTING_KEY, RecallRequest.ROUTING_KEY, DatasetClose.ROUTING_KEY, MetadataSet.ROUTING_KEY}
)
MAX_QUEUE_NAME = 255  # bytes: AMQP short string, RabbitMQ's limit for a queue name
# Characters of a reply queue's own name (a uuid, a job id, direct reply-to's base64 key).
_REPLY_NAME = re.compile(r"[A-Za-z0-9._:=+/-]+")
# The longest name after ``<queue_prefix>.reply.``: room for any id, none for smuggled payloads.
MAX_REPLY_NAME = 128


@dataclass(frozen=True, slots=True)
class Sender:
    """Who a delivery is from, and what of Spool's headers on it may be believed."""

    user_id: str | None  # the effective sender (the original's, for Spool's own copies)
    spool: bool  # the effective sender is one of Spool's users
    headers_trusted: bool  # the delivery itself came from a Spool user: its x-spool-* are Spool's


def sender_of(properties: Basic.Properties, bus: BusSettings | frozenset[str]) -> Sender:
    """``bus``: the settings, or their ``trusted_users()`` computed once (the runner's hot path)."""
    trusted = bus if isinstance(bus, frozenset) else bus.trusted_users()
    publisher = properties.user_id
    if publisher is None or publisher not in trusted:  # = common.bus.trust.is_spool_user
        return Sender(publisher, False, False)
    headers = properties.headers or {}
    if H.SENDER not in headers:
        return Sender(publisher, True, True)
    original = _text(headers[H.SENDER]) or None
    return Sender(original, original is not None and original in trusted, True)


def spool_headers_of(properties: Basic.Properties, sender: Sender) -> dict[str, Any]:
    """The headers a copy of this delivery keeps: all but the broker's ``x-death``, and Spool's
    own only when they were Spool's."""
    return {
        k: v
        for k, v in (properties.headers or {}).items()
        if k != "x-death" and (sender.headers_trusted or not k.startswith(H.PREFIX))
    }


def attempt_of(properties: Basic.Properties, sender: Sender) -> int:
    if not sender.headers_trusted:
        return 1
    value = (properties.headers or {}).get(H.ATTEMPT)
    try:
        return max(1, int(value))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 1


def routing_key_of(properties: Basic.Properties, delivered_as: str | None, sender: Sender) -> str:
    """The message's own routing key: a retry copy arrives under its work queue's name."""
    original = (properties.headers or {}).get(H.ROUTING_KEY) if sender.headers_trusted else None
    return _text(original) or delivered_as or ""


def check(routing_key: str, properties: Basic.Properties, sender: Sender, bus: BusSettings) -> None:
    """Raise ``Permanent`` when the sender may not send this, or wants replies sent elsewhere
    than to a reply queue."""
    if routing_key not in EXTERNAL_ROUTING_KEYS and not sender.spool:
        raise Permanent(
            "not_permitted",
            f"{routing_key!r} is accepted only from Spool's own broker users, "
            f"not from {sender.user_id or 'a publisher without user_id'!r}",
        )
    reply_to = properties.reply_to
    if reply_to is not None and not is_reply_queue(reply_to, bus.queue_prefix):
        shown = reply_to if len(reply_to) <= 80 else f"{reply_to[:80]}... ({len(reply_to)} chars)"
        raise Permanent(
            "invalid_reply_to",
            f"reply_to {shown!r} is not a reply queue ({bus.queue_prefix}.reply.<name> or {DIRECT_REPLY_TO})",
        )


def is_reply_queue(name: str, queue_prefix: str) -> bool:
    if not name or len(name.encode()) > MAX_QUEUE_NAME:
        return False
    if name == DIRECT_REPLY_TO:
        return True
    for prefix, longest in (
        (f"{DIRECT_REPLY_TO}.", MAX_QUEUE_NAME),
        (f"{queue_prefix}.reply.", MAX_REPLY_NAME),
    ):
        if name.startswith(prefix):
            own = name[len(prefix) :]
            return len(own) <= longest and _REPLY_NAME.fullmatch(own) is not None
    return False


def reply_queue_name(queue_prefix: str, suffix: str) -> str:
    """A reply queue's name that ``is_reply_queue`` accepts (``spool recall --wait``, clients)."""
    return f"{queue_prefix}.reply.{suffix}"


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
