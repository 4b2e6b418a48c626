"""A consumer cancelled by the broker itself (an operator deleted the daemon's queue): the runner says
so, declares its queues again and consumes again, retries while the broker refuses, and the daemon
never goes on running without receiving.

A small test service stands in for a daemon (named ``ingest`` so it consumes ``file.ready``); the
monitor runs as itself.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from structlog.testing import capture_logs

from common.bus.service import Context, Service
from common.bus.topology import work_queue_arguments
from common.config import Settings, load_settings
from common.messages import FileFailed, FileReady
from common.runtime import Process
from daemons.monitor.handlers import service as monitor_service
from tests.conftest import cloudevent, publish_raw, queue_depth, wait_for
from tests.monitor_fixtures import monitor_config, publish_many, resources_of

pytestmark = pytest.mark.integration


def make_service(seen: list[str]) -> Service:
    service = Service("ingest")

    @service.handler(FileReady)
    async def handle(msg: FileReady, ctx: Context[Any]) -> None:
        seen.append(msg.path)

    return service


@asynccontextmanager
async def daemon(
    services: list[Service], settings: Settings
) -> AsyncIterator[tuple[Process, asyncio.Task[int]]]:
    """``tests.conftest.running``, with the process's task at hand: the tests assert it still runs."""
    process = Process(services, settings)
    task = asyncio.create_task(process.run())
    try:
        await wait_for(lambda: _started(process, len(services), task), timeout=30)
        yield process, task
    finally:
        process.request_stop()
        assert await asyncio.wait_for(task, timeout=60) == 0


async def test_deleted_work_queue_is_declared_again_and_consumed(settings, broker):
    """(a) the cancel is logged as an error naming the queue and counted, (b) the queue comes back
    with its binding and one consumer, so a message published afterwards is handled, (c) the
    daemon kept running throughout."""
    name = settings.queue("ingest")
    seen: list[str] = []
    with capture_logs() as logs:
        async with daemon([make_service(seen)], settings) as (process, task):
            [runner] = process.runners
            await publish_raw(broker, settings, "file.ready", _event("/land/before"))
            await wait_for(lambda: _true(runner.stats.processed == 1))

            await _delete_queue(broker, name)
            await wait_for(lambda: _true(_lines(logs, "consumer_cancelled_by_broker")))
            assert not runner.consuming
            await wait_for(lambda: _true(runner.consuming), timeout=15)

            await publish_raw(broker, settings, "file.ready", _event("/land/after"))
            await wait_for(lambda: _true(runner.stats.processed == 2))
            assert await _consumers(broker, name) == 1
            assert not task.done() and not process.stop_requested.is_set()
            assert runner.stats.cancelled_by_broker == 1
    assert seen == ["/land/before", "/land/after"]
    [cancel] = _lines(logs, "consumer_cancelled_by_broker")
    assert (cancel["log_level"], cancel["queue"], cancel["daemon"]) == ("error", name, "ingest")
    [recovered] = _lines(logs, "consumer_recovered")
    assert (recovered["queue"], recovered["attempts"]) == (name, 1)
    assert _lines(logs, "consumer_recovery_failed") == []


async def test_recovery_retries_with_a_backoff_while_the_broker_refuses(settings, broker):
    """A classic queue of the same name, created before the runner's first attempt, makes the broker
    refuse the quorum queue (PRECONDITION_FAILED): each refusal is logged, the runner keeps
    trying, and consumes from its own queue once the stray one is gone."""
    name = settings.queue("ingest")
    seen: list[str] = []
    with capture_logs() as logs:
        async with daemon([make_service(seen)], settings) as (process, task):
            [runner] = process.runners
            await _replace_by_classic_queue(broker, name)
            await wait_for(lambda: _true(_lines(logs, "consumer_recovery_failed")), timeout=15)
            assert not runner.consuming and not task.done()

            await _delete_queue(broker, name)
            await wait_for(lambda: _true(runner.consuming), timeout=20)
            await publish_raw(broker, settings, "file.ready", _event("/land/after"))
            await wait_for(lambda: _true(seen == ["/land/after"]))
            assert not task.done()
            # The queue is the daemon's quorum queue again: declaring it as configured is accepted.
            channel = await broker.channel()
            await channel.declare_queue(
                name, durable=True, arguments=work_queue_arguments(settings, "ingest")
            )
            await channel.close()
            assert await _consumers(broker, name) == 1
    failures = _lines(logs, "consumer_recovery_failed")
    assert failures[0]["log_level"] == "error" and failures[0]["queue"] == name
    assert "exists with other arguments" in failures[0]["error"]
    assert [f["retry_in"] for f in failures] == [2.0 * 2**i for i in range(len(failures))]
    assert _lines(logs, "consumer_recovered")[0]["attempts"] == len(failures) + 1


async def test_a_handler_in_flight_when_its_queue_is_deleted_finishes_on_the_same_channel(settings, broker):
    """Its ack after the cancel is accepted (the broker forgets the delivery with its queue) and the
    ack window goes on across the new consumer: no channel error, no reopen."""
    name = settings.queue("ingest")
    seen: list[str] = []
    release = asyncio.Event()
    service = Service("ingest")

    @service.handler(FileReady)
    async def handle(msg: FileReady, ctx: Context[Any]) -> None:
        if msg.path == "/land/slow":
            await release.wait()
        seen.append(msg.path)

    async with daemon([service], settings) as (process, task):
        [runner] = process.runners
        channel = await runner.channel.get_underlay_channel()
        await publish_raw(broker, settings, "file.ready", _event("/land/slow"))
        await wait_for(lambda: _true(runner.in_flight == 1))
        await _delete_queue(broker, name)
        await wait_for(lambda: _true(runner.stats.cancelled_by_broker == 1))
        release.set()
        await wait_for(lambda: _true(runner.stats.processed == 1))
        await wait_for(lambda: _true(runner.consuming), timeout=15)
        for i in range(3):
            await publish_raw(broker, settings, "file.ready", _event(f"/land/after{i}"))
        await wait_for(lambda: _true(runner.stats.processed == 4))
        await asyncio.sleep(0.5)  # the coalesced acks went out: a refused one would close the channel
        assert await runner.channel.get_underlay_channel() is channel and not channel.is_closed
        assert not task.done()
    assert seen == ["/land/slow", "/land/after0", "/land/after1", "/land/after2"]
    assert await _consumers(broker, name) == 0
    assert await queue_depth(broker, name) == 0  # acked, not requeued by the stop


async def test_stopping_while_recovery_waits_is_prompt(settings, broker):
    """The backoff's wait does not hold up a stop, and no consumer comes back after it."""
    name = settings.queue("ingest")
    with capture_logs() as logs:
        async with daemon([make_service([])], settings) as (process, _task):
            [runner] = process.runners
            await _replace_by_classic_queue(broker, name)
            await wait_for(lambda: _true(_lines(logs, "consumer_recovery_failed")), timeout=15)
            started = time.monotonic()
        assert time.monotonic() - started < 5  # the next attempt was 2 s away, stop_grace is 10 s
        assert not runner.consuming
    assert _lines(logs, "consumer_recovered") == []
    assert await _consumers(broker, name) == 0


@pytest.fixture
def monitor_settings(tmp_path: Path, tag: str) -> Settings:
    """The monitor's test config; same tag as ``settings``, so ``broker`` cleans its queues up."""
    return load_settings(monitor_config(tmp_path / "monitor", tag))


async def test_monitor_consumes_again_after_its_queue_is_deleted(monitor_settings, broker):
    settings = monitor_settings
    name = settings.queue("monitor")
    with capture_logs() as logs:
        async with daemon([monitor_service], settings) as (process, task):
            [runner] = process.runners
            res = resources_of(process)
            await publish_many(broker, settings, [_failed("f0")])
            await wait_for(lambda: _true(res.state.events["file.failed"] == 1))

            await _delete_queue(broker, name)
            await wait_for(
                lambda: _true(runner.consuming and runner.stats.cancelled_by_broker == 1), timeout=15
            )
            await publish_many(broker, settings, [_failed("f1")])
            await wait_for(lambda: _true(res.state.events["file.failed"] == 2))
            assert await _consumers(broker, name) == 1
            assert not task.done()
    [cancel] = _lines(logs, "consumer_cancelled_by_broker")
    assert (cancel["queue"], cancel["daemon"]) == (name, "monitor")


# --- helpers ------------------------------------------------------------------------------------
def _event(path: str) -> bytes:
    return cloudevent({"path": path, "dataset": "d"})


def _failed(name: str) -> FileFailed:
    return FileFailed(daemon="ingest", reason="file_missing", error="gone", attempts=1, name=name)


def _lines(logs: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == event]


async def _true(value: Any) -> bool:
    return bool(value)


async def _started(process: Process, n: int, task: asyncio.Task[int]) -> bool:
    if task.done():
        task.result()  # surface the start-up error
    return len(process.runners) == n


async def _delete_queue(broker: aio_pika.abc.AbstractRobustConnection, name: str) -> None:
    """What ``rabbitmqctl delete_queue`` or the management UI does: the broker cancels its consumers."""
    channel = await broker.channel()
    await channel.queue_delete(name)
    await channel.close()


async def _replace_by_classic_queue(broker: aio_pika.abc.AbstractRobustConnection, name: str) -> None:
    """Delete the work queue and at once declare a classic queue of that name in its place (well
    within the runner's first second)."""
    channel = await broker.channel()
    await channel.queue_delete(name)
    await channel.declare_queue(name, durable=True, robust=False)
    await channel.close()


async def _consumers(broker: aio_pika.abc.AbstractRobustConnection, name: str) -> int:
    channel = await broker.channel()
    try:
        queue = await channel.declare_queue(name, passive=True, robust=False)
        return queue.declaration_result.consumer_count or 0
    finally:
        await channel.close()
