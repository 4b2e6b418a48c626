"""AckWindow: coalesced acks never cover an unfinished delivery, and none is forgotten.

The channel is a recording fake (the window's only collaborator); what the broker does with
the frames is proven by the runner's integration tests against the real RabbitMQ.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from common.bus.acks import AckWindow


class RecordingChannel:
    def __init__(self) -> None:
        self.frames: list[tuple[str, int, bool]] = []
        self.is_closed = False

    async def basic_ack(self, tag: int, multiple: bool = False) -> None:
        self.frames.append(("ack", tag, multiple))

    async def basic_nack(self, tag: int, multiple: bool = False, requeue: bool = True) -> None:
        self.frames.append(("nack", tag, multiple))


def acked(frames: list[tuple[str, int, bool]], delivered: list[int]) -> set[int]:
    """The tags the broker would consider acked after these frames (multiple = all up to tag)."""
    out: set[int] = set()
    for kind, tag, multiple in frames:
        if kind != "ack":
            continue
        out |= {t for t in delivered if t <= tag} if multiple else {tag}
    return out


def window(**kwargs: Any) -> tuple[AckWindow, RecordingChannel]:
    channel = RecordingChannel()
    return AckWindow(channel, **kwargs), channel  # type: ignore[arg-type]


async def test_finished_run_is_acked_in_one_multiple_frame() -> None:
    acks, channel = window(delay=0.01)
    for tag in range(1, 51):
        acks.delivered(tag)
    for tag in range(1, 51):
        acks.ack(tag)
    await asyncio.sleep(0.05)
    assert channel.frames == [("ack", 50, True)]
    assert len(acks) == 0


async def test_unfinished_head_is_never_covered_and_others_are_acked_alone_after_hold() -> None:
    acks, channel = window(delay=0.01, hold=0.1)
    for tag in (1, 2, 3):
        acks.delivered(tag)
    acks.ack(2)
    acks.ack(3)
    await asyncio.sleep(0.03)
    assert channel.frames == []  # 1 still running: nothing may cover it yet
    await asyncio.sleep(0.15)
    assert 1 not in acked(channel.frames, [1, 2, 3])
    assert acked(channel.frames, [1, 2, 3]) == {2, 3}
    assert all(not multiple for _, _, multiple in channel.frames)
    acks.ack(1)
    await asyncio.sleep(0.05)
    assert channel.frames[-1] == ("ack", 1, True)
    assert len(acks) == 0


async def test_requeued_delivery_is_sent_at_once_and_not_acked_by_a_later_multiple() -> None:
    acks, channel = window(delay=0.01)
    for tag in (1, 2, 3):
        acks.delivered(tag)
    await acks.nack(2)
    assert channel.frames == [("nack", 2, False)]
    acks.ack(1)
    acks.ack(3)
    await asyncio.sleep(0.05)
    # A multiple ack up to 3 is fine: 2 left the channel's unacked set with its nack.
    assert channel.frames[1:] == [("ack", 3, True)]


async def test_flush_sends_every_finished_ack_at_once() -> None:
    acks, channel = window(delay=10, hold=10)
    for tag in (1, 2, 3, 4):
        acks.delivered(tag)
    for tag in (1, 2, 4):
        acks.ack(tag)
    await acks.flush()
    assert acked(channel.frames, [1, 2, 3, 4]) == {1, 2, 4}
    assert ("ack", 2, True) in channel.frames  # the head run 1-2 in one frame, 4 alone
    assert len(acks) == 0


async def test_a_full_batch_is_flushed_without_waiting_for_the_delay() -> None:
    acks, channel = window(every=10, delay=10)
    for tag in range(1, 11):
        acks.delivered(tag)
        acks.ack(tag)
    await asyncio.sleep(0.01)
    assert channel.frames == [("ack", 10, True)]


@pytest.mark.parametrize("seed", range(5))
async def test_random_completion_order_acks_each_delivery_exactly_once(seed: int) -> None:
    import random

    rng = random.Random(seed)
    acks, channel = window(every=7, delay=0.002, hold=0.01)
    tags = list(range(1, 301))
    for tag in tags:
        acks.delivered(tag)
    order = tags[:]
    rng.shuffle(order)
    requeued = set(order[:10])
    for i, tag in enumerate(order):
        if tag in requeued:
            await acks.nack(tag)
        else:
            acks.ack(tag)
        if i % 13 == 0:
            await asyncio.sleep(0.003)
    await asyncio.sleep(0.05)
    await acks.flush()
    single = [t for kind, t, multiple in channel.frames if kind == "ack" and not multiple]
    assert len(single) == len(set(single))
    assert acked(channel.frames, tags) | requeued == set(tags)
    # No frame names a tag twice, and no ack names a requeued tag (the broker would close the channel).
    named = [t for _, t, _ in channel.frames]
    assert len(named) == len(set(named))
