"""Operating on dead letters: list, show, retry, purge — optionally only those of one reason.

Dead-letter queues are classic queues, so browsing them is ``basic.get`` without ack and then
closing the channel: the broker puts every message back in its original position. Retry sends a
message straight back to the work queue it died in (through the default exchange, not the topic
exchange, so no other binding sees it twice) with its attempt count reset.

A revived message is published as the CLI's broker user and names its original sender in
``x-spool-sender`` (``common.bus.admission``): reviving never makes an external message trusted.
Spool's headers on a dead letter are believed only when the dead letter is Spool's own copy (its
``user_id`` a Spool user); a message the broker dead-lettered itself (delivery limit) is the
original as its sender sent it, whose ``x-spool-*`` headers (a forged work queue or routing key)
are ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from common.bus import admission
from common.bus import headers as H
from common.bus.publisher import connection_user, copy_of
from common.bus.topology import BINDINGS
from common.config import BusSettings, Settings


@dataclass
class DeadLetter:
    queue: str
    message_id: str | None
    routing_key: str
    reason: str
    error: str
    attempts: int
    daemon: str
    host: str
    time: str
    content_type: str | None
    body: bytes

    def summary(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("body")
        data["size"] = len(self.body)
        return data


def dead_queues(settings: Settings, queue: str | None = None) -> list[str]:
    """All dead-letter queues, or the one named (by daemon name or full queue name)."""
    if queue is None:
        return [settings.dead_queue(d) for d in BINDINGS]
    if queue in BINDINGS:
        return [settings.dead_queue(queue)]
    if queue.endswith(".dead"):
        return [queue]
    raise ValueError(f"unknown queue {queue!r}; use a daemon name ({', '.join(BINDINGS)}) or a .dead queue")


def _to_dead_letter(queue: str, msg: AbstractIncomingMessage) -> DeadLetter:
    h = msg.headers or {}
    reason = _text(h.get(H.REASON))
    if not reason and h.get("x-death"):
        # Dead-lettered by the broker's delivery-limit safety net, not by our runner.
        reason = "delivery_limit"
    return DeadLetter(
        queue=queue,
        message_id=msg.message_id,
        routing_key=_original_routing_key(msg),
        reason=reason or "unknown",
        error=_text(h.get(H.ERROR)),
        attempts=_as_int(h.get(H.ATTEMPTS) or h.get(H.ATTEMPT)),
        daemon=_text(h.get(H.DAEMON)),
        host=_text(h.get(H.HOST)),
        time=_text(h.get(H.TIME)),
        content_type=msg.content_type,
        body=msg.body,
    )


def _original_routing_key(msg: AbstractIncomingMessage) -> str:
    h = msg.headers or {}
    if h.get(H.ROUTING_KEY):
        return _text(h[H.ROUTING_KEY])
    deaths: Any = h.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        keys = deaths[0].get("routing-keys") or []
        if keys:
            return _text(keys[0])
    return msg.routing_key or ""


def _as_int(v: Any) -> int:
    try:
        return int(v or 0)
    except (TypeError, ValueError):
        return 0


def _text(v: Any) -> str:
    if v is None:
        return ""
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


async def browse(
    connection: AbstractRobustConnection,
    queues: Iterable[str],
    *,
    reason: str | None = None,
    limit: int | None = None,
) -> list[DeadLetter]:
    """Read dead letters without removing them."""
    found: list[DeadLetter] = []
    for queue_name in queues:
        channel = await connection.channel()
        try:
            queue = await channel.get_queue(queue_name, ensure=True)
            while limit is None or len(found) < limit:
                msg = await queue.get(no_ack=False, fail=False)
                if msg is None:
                    break
                letter = _to_dead_letter(queue_name, msg)
                if reason is None or letter.reason == reason:
                    found.append(letter)
        finally:
            await channel.close()  # un-acked gets go back, in order
    return found


async def take(
    connection: AbstractRobustConnection,
    settings: Settings,
    queues: Iterable[str],
    *,
    reason: str | None = None,
    message_id: str | None = None,
    requeue_to_work: bool,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Remove matching dead letters; when ``requeue_to_work`` send each back to its work queue first.

    Each message is re-published with a confirm *before* it is acked in the dead queue, so a failure
    halfway leaves a duplicate at worst, never a loss. Only the messages in a queue when it is
    opened are looked at: one that fails again at once and comes back meanwhile waits for the next
    run, instead of going round for ever.
    """
    moved = 0
    for queue_name in queues:
        channel = await connection.channel(publisher_confirms=True)
        try:
            queue = await channel.get_queue(queue_name, ensure=True)
            present = (await queue.declare()).message_count or 0
            for _ in range(present):
                msg = await queue.get(no_ack=False, fail=False)
                if msg is None:
                    break
                letter = _to_dead_letter(queue_name, msg)
                if (reason is not None and letter.reason != reason) or (
                    message_id is not None and letter.message_id != message_id
                ):
                    continue  # left unacked: returns to the queue when the channel closes
                if requeue_to_work:
                    trusted = _trusted_copy(msg, settings.bus)
                    await channel.default_exchange.publish(
                        _revived(msg, trusted, connection_user(connection)),
                        routing_key=_work_queue(queue_name, msg, trusted),
                        mandatory=True,
                    )
                await msg.ack()
                moved += 1
                if progress:
                    progress(moved)
        finally:
            await channel.close()
    return moved


def _trusted_copy(msg: AbstractIncomingMessage, bus: BusSettings) -> bool:
    """Whether Spool's headers on this dead letter are Spool's (the runner's copy)."""
    return admission.sender_of(msg.properties, bus).headers_trusted


def _work_queue(dead_queue: str, msg: AbstractIncomingMessage, trusted: bool) -> str:
    origin = _text((msg.headers or {}).get(H.QUEUE)) if trusted else ""
    return origin or dead_queue.removesuffix(".dead")


def _revived(msg: AbstractIncomingMessage, trusted: bool, user: str) -> aio_pika.Message:
    headers = {
        k: v
        for k, v in (msg.headers or {}).items()
        if not k.startswith("x-death") and (trusted or not k.startswith(H.PREFIX))
    }
    if not trusted:  # the original itself (broker dead-lettered): its publisher is its sender
        headers[H.SENDER] = msg.properties.user_id or ""
        # A routing key header is kept only when anyone may send it anyway (dead letters of
        # releases before x-spool-sender carry their file.ready's key only there).
        claimed = _text((msg.headers or {}).get(H.ROUTING_KEY))
        external = claimed in admission.EXTERNAL_ROUTING_KEYS
        headers[H.ROUTING_KEY] = claimed if external else _broker_routing_key(msg)
    else:
        headers[H.ROUTING_KEY] = _original_routing_key(msg)
        headers.setdefault(H.SENDER, msg.properties.user_id or "")
    headers[H.ATTEMPT] = 1
    for key in (H.ATTEMPTS, H.TIME, H.HOST):
        headers.pop(key, None)
    return copy_of(msg.body, msg.properties, headers, user_id=user)


def _broker_routing_key(msg: AbstractIncomingMessage) -> str:
    """The routing key the original was published with, as the broker recorded it."""
    deaths: Any = (msg.headers or {}).get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        keys = deaths[0].get("routing-keys") or []
        if keys:
            return _text(keys[0])
    return msg.routing_key or ""
