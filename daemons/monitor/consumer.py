"""The monitor's own consumer: the standard runner's guarantees at the monitor's volume.

The monitor receives a copy of every message of the pipeline (each file is at least a command and
an event), and its handling is a few dictionary updates. Profiled under the standard
``common.bus.consumer.Runner``, nearly all its time went to what that runner spends per delivery
to serve handlers that wait: an aio-pika message object, two tasks, a ``Context``, bound log
context, and one ack frame written to the socket per message. So this runner:

- observes each delivery synchronously, with no ``await`` in between, so deliveries are observed
  in the order the broker sent them; no ``Context``, no bound log context, no semaphore;
- acks through the runner's ``AckWindow`` with a larger batch: one ``multiple`` frame per
  ``ACK_EVERY`` deliveries, or ``ACK_DELAY`` seconds after the first unacked one. Because
  observation is in delivery order, the window's head is always finished;
- publishes alerts from their own task (``MonitorResources.observe``), so a slow confirm never
  holds up counting.

It overrides the base ``Runner``'s extension points (``deliver``, ``ack_window``, ``in_flight``)
and nothing else: consumption on the underlying aiormq channel, re-creation of the consumer after a
reconnection or after the broker cancelled it (its queue deleted), and the final flush of acks on
drain are the base ``Runner``'s. At-least-once holds as before: a message is acked only after it was counted;
acks still pending when a channel dies are redelivered by the broker and counted again, as any
redelivery always was.
"""

from __future__ import annotations

from typing import Any

import aiormq
import structlog
from aiormq.abc import DeliveredMessage

from common import codec
from common.bus import headers as H
from common.bus.acks import AckWindow
from common.bus.consumer import Runner
from common.bus.retry import classify
from common.log_folding import FoldedLog

log = structlog.get_logger("spool.monitor")

# One ack frame per this many deliveries, at most half the prefetch so the broker never waits on us.
ACK_EVERY = 200
# ... or this long after the first delivery not acked yet, so a quiet bus still gets its acks.
ACK_DELAY = 0.05


class MonitorRunner(Runner):
    """``Runner`` for the monitor service: same queue, prefetch, stop and drain contract."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # One line per cause per minute: the monitor sees every bad message of the whole bus.
        self._lines = FoldedLog(log)

    def ack_window(self, channel: aiormq.abc.AbstractChannel) -> AckWindow:
        prefetch = self.settings.daemon(self.service.name).prefetch
        return AckWindow(channel, every=max(1, min(ACK_EVERY, prefetch // 2)), delay=ACK_DELAY)

    @property
    def in_flight(self) -> int:
        """Deliveries counted but not acked yet (a batch, for at most ``ACK_DELAY``)."""
        return len(self.acks) if self.acks is not None else 0

    # --- per delivery ---------------------------------------------------------------------------
    async def deliver(self, message: DeliveredMessage) -> None:
        """Observe one delivery. No ``await`` before the ack bookkeeping: see the module docstring."""
        props = message.header.properties
        headers = props.headers
        routing_key = str((headers and headers.get(H.ROUTING_KEY)) or message.routing_key or "")
        try:
            msg = codec.decode(message.body, props.content_type, routing_key, props.message_id)
        except Exception as exc:  # undecodable / unknown / invalid: counted, acked, never parked
            self._malformed(routing_key, exc)
        else:
            try:
                self.resources.observe(msg, props.user_id)
                self.stats.processed += 1
            except Exception as exc:  # a bug in the bookkeeping must not stall the whole bus
                self._bug(exc)
        acks = self.acks
        if acks is not None and acks.channel is message.channel:  # else: a replaced channel's
            tag = message.delivery_tag or 0
            acks.delivered(tag)
            acks.ack(tag)

    def _malformed(self, routing_key: str, exc: Exception) -> None:
        err = classify(exc)
        self.stats.ignored += 1
        self._lines.warning(
            f"ignored:{err.reason}", "malformed_ignored", exc=exc,
            reason=err.reason, error=_printable(err.message[:500]), routing_key=_printable(routing_key[:255]),
        )  # fmt: skip
        self.resources.state.observe_malformed(routing_key, err.reason, err.message)

    def _bug(self, exc: Exception) -> None:
        self._lines.error("observe_failed", "observe_failed", exc=exc, exc_info=exc)


def _printable(text: str) -> str:
    """``text`` as a log line can carry it: a lone surrogate (valid in JSON) escaped, not raised."""
    return text.encode("utf-8", "backslashreplace").decode()
