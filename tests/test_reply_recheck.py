"""A ``reply_to`` stored before replies were confined to reply queues is checked again when recall
answers: nothing is ever sent to a work queue, whatever the catalogue holds."""

from __future__ import annotations

from typing import Any

import aio_pika
import pytest

from common.catalogue import recall as db
from common.errors import Permanent
from common.messages import RecallRequest
from daemons.recall.announce import Announcer


class _Raw:
    """The publisher interface recall replies through, remembering where each reply went."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def publish(self, msg: Any, *, correlation_id: str | None = None) -> None:
        pass

    async def publish_raw(self, queue: str, message: aio_pika.Message) -> None:
        self.sent.append(queue)


@pytest.mark.parametrize(
    ("reply_to", "sent"),
    [
        ("spool.reply.alice.1f2e", True),
        ("amq.rabbitmq.reply-to", True),
        ("spool.ingest", False),
        ("spool.ingest.dead", False),
        ("amq.gen-abc", False),
        ("other.reply.x", False),
        ("spool.reply.", False),
    ],
)
async def test_a_completion_is_sent_only_to_a_reply_queue(reply_to: str, sent: bool) -> None:
    raw = _Raw()
    announcer = Announcer(catalogue=None, publisher=raw, queue_prefix="spool")  # type: ignore[arg-type]
    done = db.Completion("r1", "done", 1, (), reply_to, "c1")
    await announcer._reply(done)
    assert raw.sent == ([reply_to] if sent else [])


async def test_a_refusal_is_not_sent_to_a_work_queue() -> None:
    raw = _Raw()
    announcer = Announcer(catalogue=None, publisher=raw, queue_prefix="spool")  # type: ignore[arg-type]
    request = RecallRequest(names=["a"], destination="disk")
    await announcer.refuse(request, "spool.tape", None, Permanent("unknown_storage", "no"))
    await announcer.refuse(request, "spool.reply.bob.7", None, Permanent("unknown_storage", "no"))
    assert raw.sent == ["spool.reply.bob.7"]
