"""Two monitor processes on one PostgreSQL catalogue and one bus (``daemons.monitor.role``): one
consumes, the other stands by; when the active one is killed (SIGKILL) the standby takes over
with the saved counts and failure groups, and raises no second alert for a cause already alerted."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from common import codec
from common.config import load_settings
from common.messages import FileFailed, FileIngested, Message
from tests.catalogue_fixtures import pg_database
from tests.conftest import queue_consumers, start_daemon, wait_for, write_config
from tests.monitor_fixtures import free_port, publish_many

pytestmark = pytest.mark.integration


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    async with pg_database() as url:
        yield url


def _config(tmp_path: Path, name: str, tag: str, pg_url: str) -> Path:
    state = tmp_path / name
    (state / "landing").mkdir(parents=True, exist_ok=True)
    monitor = "\n".join([
        'http_host = "127.0.0.1"', f"http_port = {free_port()}", "poll_interval = 0.5",
        "save_interval = 0.5", "heartbeat_late = 20", "heartbeat_dead = 40",
    ])  # fmt: skip
    catalogue = f'url = "{pg_url}"\nlease_seconds = 3'
    return write_config(tmp_path / f"{name}.toml", state, tag, monitor=monitor, catalogue=catalogue)


@pytest.fixture
def config_file(tmp_path: Path, tag: str, pg_url: str) -> Path:
    return _config(tmp_path, "a", tag, pg_url)


async def _status(config: Path) -> dict[str, Any] | None:
    port = load_settings(config).monitor.http_port
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as session,
            session.get(f"http://127.0.0.1:{port}/api/status") as response,
        ):
            return await response.json() if response.status == 200 else None  # type: ignore[no-any-return]
    except (aiohttp.ClientError, TimeoutError):
        return None


async def _role(config: Path) -> str | None:
    doc = await _status(config)
    return None if doc is None else doc["monitor"]["role"]


def _failed(reason: str, n: int) -> FileFailed:
    return FileFailed(daemon="ingest", reason=reason, error=f"{reason} on f{n}", attempts=4, name=f"f{n}")


def _ingested(n: int) -> FileIngested:
    return FileIngested(name=f"ok{n}", dataset="d", size=10, adler32="1", storage="disk1", pfn=f"/p/ok{n}")


def _counts(doc: dict[str, Any]) -> tuple[dict[str, int], dict[str, int]]:
    events = {k: v for k, v in doc["events"].items() if k in ("file.ingested", "file.failed")}
    groups = {g["reason"]: g["count"] for g in doc["failures"]}
    return events, groups


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()


async def test_the_standby_takes_over_the_killed_monitors_counts_and_alerts_nothing_twice(
    settings, broker, topology, tmp_path: Path, tag: str, pg_url: str, config_file: Path
) -> None:
    config_b = _config(tmp_path, "b", tag, pg_url)
    channel = await broker.channel()
    alerts = await channel.declare_queue(exclusive=True)
    await alerts.bind(settings.bus.exchange, "alert.raised")
    logs = tmp_path / "a.log", tmp_path / "b.log"
    a = start_daemon(config_file, "monitor", logs[0])
    b: subprocess.Popen[bytes] | None = None
    try:
        await wait_for(lambda: _is_role(config_file, "active"), timeout=60)
        b = start_daemon(config_b, "monitor", logs[1])
        await wait_for(lambda: _standby_of(config_b), timeout=60)
        doc_a, doc_b = await _status(config_file), await _status(config_b)
        assert doc_a is not None and doc_b is not None
        assert doc_b["monitor"]["active_instance"] == doc_a["monitor"]["instance"]
        assert any("standby monitor" in m for m in doc_b["missing"])
        # Exactly one consumes the monitor's queue.
        queue = settings.queue("monitor")
        assert await queue_consumers(broker, queue) == 1

        # N facts, failures of two causes among them.
        first: list[Message] = [_ingested(n) for n in range(200)]
        first += [_failed("checksum_mismatch", n) for n in range(30)]
        first += [_failed("disk_full", n) for n in range(3)]
        await publish_many(broker, settings, first)
        expected = ({"file.ingested": 200, "file.failed": 33}, {"checksum_mismatch": 30, "disk_full": 3})
        await wait_for(lambda: _shows(config_file, expected), timeout=60)
        # The standby shows the saved state: the active monitor saved all of it.
        await wait_for(lambda: _shows(config_b, expected), timeout=60)
        await asyncio.sleep(1)  # the acks of the last save sent

        os.kill(a.pid, signal.SIGKILL)
        a.wait()
        # M more while nobody consumes: they wait in the durable queue.
        second: list[Message] = [_ingested(n) for n in range(200, 300)]
        second += [_failed("checksum_mismatch", n) for n in range(30, 40)] + [_failed("io_error", 1)]
        await publish_many(broker, settings, second)
        await wait_for(lambda: _is_role(config_b, "active"), timeout=30)
        groups = {"checksum_mismatch": 40, "disk_full": 3, "io_error": 1}
        total = ({"file.ingested": 300, "file.failed": 44}, groups)
        await wait_for(lambda: _shows(config_b, total), timeout=60)
        assert await queue_consumers(broker, queue) == 1
        await asyncio.sleep(1)  # an alert raised twice would be out by now
        raised: Counter[str] = Counter()
        while (m := await alerts.get(no_ack=True, fail=False)) is not None:
            alert = codec.decode(m.body, m.content_type, "alert.raised", m.message_id)
            raised[alert.reason] += 1  # type: ignore[attr-defined]
        assert raised == {"checksum_mismatch": 1, "disk_full": 1, "io_error": 1}
        doc = await _status(config_b)
        assert doc is not None and doc["monitor"]["role"] == "active"
        assert doc["monitor"]["state_saved_by"] == doc["monitor"]["instance"]
        assert {g["reason"]: g["example"] for g in doc["failures"]}["disk_full"] == "f0"
    finally:
        await channel.close()
        _stop(a)
        if b is not None:
            b.send_signal(signal.SIGTERM)
            try:
                b.wait(timeout=30)
            except subprocess.TimeoutExpired:
                _stop(b)
    assert b.returncode == 0, logs[1].read_text()[-3000:]
    # B stopped cleanly: it saved last and released the role.
    from common.catalogue import Catalogue
    from common.catalogue.repositories.monitor_state import MonitorStateRepository
    from common.catalogue.sql import utcnow

    async with await Catalogue.open(pg_url) as cat:
        assert await cat.instances.role_holder("monitor", utcnow()) is None
        saved = await MonitorStateRepository(cat).load("monitor")
    assert saved is not None and saved.doc["events"]["file.ingested"] == 300


async def _is_role(config: Path, role: str) -> bool:
    return await _role(config) == role


async def _standby_of(config: Path) -> bool:
    doc = await _status(config)
    monitor = None if doc is None else doc["monitor"]
    return monitor is not None and monitor["role"] == "standby" and monitor["active_instance"] is not None


async def _shows(config: Path, expected: tuple[dict[str, int], dict[str, int]]) -> bool:
    doc = await _status(config)
    return doc is not None and _counts(doc) == expected
