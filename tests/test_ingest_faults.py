"""Faults with real processes: SIGKILL mid-run, SIGTERM drain, broker restart. Nothing may be lost,
nothing registered twice, no temporary file left behind."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import pytest

from bench.chaos.broker import PrivateBroker, available
from common.bus.topology import declare_topology
from common.catalogue import Catalogue
from common.cli.publish import publish_events
from common.config import Settings, load_settings
from common.storage import is_temp_name
from common.storage.checksum import adler32_of_file
from tests.conftest import (
    AMQP_URL,
    cloudevent,
    publish_raw,
    queue_depth,
    start_daemon,
    wait_for,
    write_config,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
DATASET = "lst1.20261123.run012345.dl0"
REPO = Path(__file__).resolve().parent.parent


def write_night(settings: Settings, n: int) -> list[dict]:
    rng = random.Random(n)
    events = []
    for i in range(n):
        path = settings.landing_areas["lst1"] / f"run012345/subrun{i:05d}.fits.fz"
        path.parent.mkdir(parents=True, exist_ok=True)
        data = rng.randbytes(1024)
        path.write_bytes(data)
        events.append(
            {
                "specversion": "1.0",
                "id": f"ev-{i}",
                "source": "test-daq",
                "type": "file.ready",
                "data": {
                    "path": str(path),
                    "dataset": DATASET,
                    "size": 1024,
                    "adler32": f"{zlib.adler32(data):08x}",
                },
            }
        )
    return events


async def night_being_ingested(
    settings: Settings, config_file: Path, log: Path, n: int
) -> subprocess.Popen[bytes]:
    """``n`` files announced to a freshly started ingest process; returns that process."""
    events = write_night(settings, n)
    proc = start_daemon(config_file, "ingest", log)
    await publish_events(settings, events, quiet=True)
    return proc


async def registered(settings: Settings) -> int:
    async with await Catalogue.open(settings.catalogue.url) as c:
        return (await c.queries.counts()).files


async def assert_every_file_once_and_verified(settings: Settings, n: int) -> None:
    async with await Catalogue.open(settings.catalogue.url) as c:
        counts = await c.queries.counts()
        files = await c.queries.list_files(dataset=DATASET, limit=n + 10)
    assert counts.files == n
    assert counts.replicas.get("available") == n
    root = settings.storage["disk1"].root
    for f in files:
        assert adler32_of_file(root / f.name) == f.adler32, f.name
    leftovers = [p for p in root.rglob("*") if is_temp_name(p.name)]
    assert leftovers == []


async def test_ingest_killed_three_times_registers_every_file_exactly_once(
    settings, config_file, broker, topology, tmp_path
):
    n = 2000
    log = tmp_path / "ingest.log"
    proc = await night_being_ingested(settings, config_file, log, n)
    try:
        for threshold in (300, 800, 1300):
            await wait_for(lambda t=threshold: _at_least(settings, t), timeout=120, interval=0.02)
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=10) == -signal.SIGKILL
            assert await registered(settings) < n, "the kill came too late to prove anything"
            proc = start_daemon(config_file, "ingest", log)
        await wait_for(lambda: _at_least(settings, n), timeout=180, interval=0.2)
        await wait_for(lambda: _depth_is(broker, settings.queue("ingest"), 0), timeout=30)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    assert code == 0, log.read_text()[-3000:]
    assert await queue_depth(broker, settings.dead_queue("ingest")) == 0
    await assert_every_file_once_and_verified(settings, n)


async def test_sigterm_drains_in_flight_work_and_exits_zero(
    settings, config_file, broker, topology, tmp_path
):
    n = 600
    log = tmp_path / "ingest.log"
    proc = await night_being_ingested(settings, config_file, log, n)
    await wait_for(lambda: _at_least(settings, 50), timeout=60, interval=0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert '"stopping"' in text and '"stopped"' in text
    # What was not finished is back in the queue: a later pass handles it, nothing is lost.
    proc = start_daemon(config_file, "ingest", log, "--once")
    assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    await assert_every_file_once_and_verified(settings, n)


async def test_second_sigterm_exits_at_once(settings, config_file, broker, topology, tmp_path):
    log = tmp_path / "ingest.log"
    proc = start_daemon(config_file, "ingest", log)
    await wait_for(lambda: _has_consumer(broker, settings), timeout=30)
    # Hold the catalogue's write lock so the handler stays in flight and the first SIGTERM drains.
    import sqlite3

    db = sqlite3.connect(settings.catalogue.url.split("///", 1)[1], isolation_level=None)
    db.execute("BEGIN IMMEDIATE")
    try:
        src = settings.landing_areas["lst1"] / "run012345/held.fits.fz"
        src.parent.mkdir(parents=True, exist_ok=True)
        src.write_bytes(b"held")
        await publish_raw(broker, settings, "file.ready", cloudevent({"path": str(src), "dataset": DATASET}))
        await asyncio.sleep(1.5)
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        assert proc.poll() is None, "the first SIGTERM must wait for the in-flight handler"
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=5)  # far less than stop_grace (10 s) and the 30 s busy timeout
    finally:
        db.execute("ROLLBACK")
        db.close()
    assert code == 128 + signal.SIGTERM
    assert "second_signal_exiting_now" in log.read_text()


@pytest.fixture
def private_node(tmp_path: Path, tag: str) -> Iterator[PrivateBroker]:
    """A RabbitMQ node of the test's own (the chaos harness's): restarting the shared broker would
    cut every other test's connections, another pytest-xdist worker's included."""
    why = available()
    if why is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the broker restart test must run on CI: {why}")
        pytest.skip(why)
    node = PrivateBroker(tmp_path, tag)
    node.start()
    try:
        yield node
    finally:
        node.close()


async def test_broker_restart_mid_stream_loses_nothing(private_node: PrivateBroker, tmp_path: Path, tag: str):
    n = 1500
    (tmp_path / "state" / "landing").mkdir(parents=True)
    config_file = write_config(tmp_path / "spool.toml", tmp_path / "state", tag)
    config_file.write_text(config_file.read_text().replace(AMQP_URL, private_node.url))
    settings = load_settings(config_file)
    connection = await aio_pika.connect(private_node.url, timeout=60)
    try:
        await declare_topology(await connection.channel(), settings)
    finally:
        await connection.close()
    log = tmp_path / "ingest.log"
    proc = await night_being_ingested(settings, config_file, log, n)
    try:
        await wait_for(lambda: _at_least(settings, 200), timeout=60, interval=0.02)
        assert await asyncio.to_thread(private_node.stop_app)
        await asyncio.sleep(2)
        assert await asyncio.to_thread(private_node.start_app)
        assert proc.poll() is None, "the daemon must survive a broker restart"
        await wait_for(lambda: _at_least(settings, n), timeout=180, interval=0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    assert code == 0, log.read_text()[-3000:]
    await assert_every_file_once_and_verified(settings, n)


async def _at_least(settings: Settings, n: int) -> bool:
    return await registered(settings) >= n


async def _depth_is(broker, name: str, n: int) -> bool:
    return await queue_depth(broker, name) == n


async def _has_consumer(broker, settings: Settings) -> bool:
    channel = await broker.channel()
    try:
        q = await channel.declare_queue(settings.queue("ingest"), passive=True)
        return (q.declaration_result.consumer_count or 0) > 0
    finally:
        await channel.close()
