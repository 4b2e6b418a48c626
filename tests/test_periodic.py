"""The one loop of periodic work (``common.periodic.every``): when rounds run, what an error does,
how a stop ends it."""

from __future__ import annotations

import asyncio
import time

import pytest
import structlog
from structlog.testing import capture_logs

from common.periodic import every, pause_for


class Rounds:
    """Work that records when each round began; rounds listed in ``failing`` raise."""

    def __init__(self, *, failing: tuple[int, ...] = (), seconds: float = 0.0) -> None:
        self.started: list[float] = []
        self.failing = failing
        self.seconds = seconds

    async def __call__(self) -> None:
        self.started.append(time.monotonic())
        if self.seconds:
            await asyncio.sleep(self.seconds)
        if len(self.started) in self.failing:
            raise RuntimeError(f"round {len(self.started)} failed")

    async def until(self, n: int, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.started) < n:
            assert time.monotonic() < deadline, f"only {len(self.started)} rounds in {timeout} s"
            await asyncio.sleep(0.005)


async def stopped(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_the_first_round_runs_at_once_and_the_next_ones_an_interval_after_each_ended():
    work = Rounds(seconds=0.02)
    begun = time.monotonic()
    task = asyncio.create_task(every(0.05, work, name="test"))
    await work.until(4)
    await stopped(task)
    assert work.started[0] - begun < 0.03
    gaps = [b - a for a, b in zip(work.started, work.started[1:], strict=False)]
    # Each gap is the round (0.02 s) plus the interval (0.05 s): rounds never overlap.
    assert all(0.069 <= gap < 0.2 for gap in gaps), gaps


def test_jitter_shortens_the_pause_by_at_most_its_fraction_of_the_interval():
    pauses = [pause_for(10.0, 0.2) for _ in range(2000)]
    assert all(8.0 <= p <= 10.0 for p in pauses)
    assert max(pauses) - min(pauses) > 1.5  # really drawn, across the whole range
    assert pause_for(10.0, 0.0) == 10.0


async def test_a_loop_with_jitter_keeps_its_pauses_within_the_bounds():
    work = Rounds()
    task = asyncio.create_task(every(0.05, work, name="test", jitter=0.5))
    await work.until(6)
    await stopped(task)
    gaps = [b - a for a, b in zip(work.started, work.started[1:], strict=False)]
    assert all(0.024 <= gap < 0.15 for gap in gaps), gaps


async def test_a_jitter_beyond_the_interval_is_refused():
    with pytest.raises(ValueError, match="jitter"):
        await every(1.0, Rounds(), name="test", jitter=1.5)


async def test_an_exception_is_logged_with_the_loops_name_and_the_rounds_go_on():
    work = Rounds(failing=(1, 2))
    with capture_logs() as logs:
        task = asyncio.create_task(every(0.01, work, name="reaper"))
        await work.until(4)
        await stopped(task)
    failed = [line for line in logs if line["event"] == "background_failed"]
    assert [(f["loop"], f["error"], f["error_type"], f["log_level"]) for f in failed] == [
        ("reaper", "round 1 failed", "RuntimeError", "error"),
        ("reaper", "round 2 failed", "RuntimeError", "error"),
    ]


async def test_the_failure_line_goes_through_the_callers_logger():
    work = Rounds(failing=(1,))
    with capture_logs() as logs:
        replicator = structlog.get_logger("spool.replicator")
        task = asyncio.create_task(every(0.01, work, name="rules", log=replicator))
        await work.until(2)
        await stopped(task)
    assert [line["event"] for line in logs] == ["background_failed"]


async def test_on_error_takes_the_exception_instead_of_the_plain_line():
    work = Rounds(failing=(1,))
    seen: list[Exception] = []
    with capture_logs() as logs:
        task = asyncio.create_task(every(0.01, work, name="test", on_error=seen.append))
        await work.until(3)
        await stopped(task)
    assert [str(e) for e in seen] == ["round 1 failed"]
    assert logs == []


async def test_a_failing_on_error_falls_back_to_the_plain_line_and_the_loop_goes_on():
    def broken(exc: Exception) -> None:
        raise KeyError("bug in the handler")

    work = Rounds(failing=(1,))
    with capture_logs() as logs:
        task = asyncio.create_task(every(0.01, work, name="test", on_error=broken))
        await work.until(3)
        await stopped(task)
    assert [(line["event"], line["error"]) for line in logs] == [("background_failed", "round 1 failed")]


async def test_a_stop_during_the_pause_ends_the_loop_at_once():
    work = Rounds()
    task = asyncio.create_task(every(60.0, work, name="test"))
    await work.until(1)
    begun = time.monotonic()
    await stopped(task)
    assert time.monotonic() - begun < 0.1
    assert len(work.started) == 1


async def test_a_stop_during_a_round_ends_the_loop_at_once_and_is_not_taken_for_an_error():
    work = Rounds(seconds=60.0)
    with capture_logs() as logs:
        task = asyncio.create_task(every(0.01, work, name="test"))
        await work.until(1)
        begun = time.monotonic()
        await stopped(task)
    assert time.monotonic() - begun < 0.1
    assert logs == []


async def test_a_wake_starts_the_next_round_without_waiting_for_the_interval():
    work = Rounds()
    wake = asyncio.Event()
    task = asyncio.create_task(every(60.0, work, name="test", wake=wake))
    await work.until(1)
    wake.set()
    await work.until(2, timeout=1.0)
    await stopped(task)


async def test_a_wake_during_a_round_is_not_lost():
    wake = asyncio.Event()
    started: list[float] = []

    async def round_that_is_woken() -> None:
        started.append(time.monotonic())
        if len(started) == 1:
            await asyncio.sleep(0)
            wake.set()  # something new arrived while this round ran

    task = asyncio.create_task(every(60.0, round_that_is_woken, name="test", wake=wake))
    deadline = time.monotonic() + 1.0
    while len(started) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    await stopped(task)
    assert len(started) == 2
