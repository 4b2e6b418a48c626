"""A daemon starting while the broker is unreachable or shutting down exits with code 3 and one
line on stderr (a JSON log line, ``daemon_failed``), never with a traceback.

The daemons are real processes (``spool run ingest``) talking to the real RabbitMQ through
``tests/tcp_proxy.py``, which closes their connection at a chosen step of the start-up the way a
node shutting down does (``Connection.Close 320 CONNECTION_FORCED``) or by dropping the socket,
then refuses new connections. The shared broker itself is never stopped.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from common.bus.publisher import Publisher
from common.bus.service import Service
from common.config import Settings
from common.errors import Retryable
from common.messages import DaemonHeartbeat
from common.runtime import Process
from tests.conftest import AMQP_URL, write_config
from tests.tcp_proxy import (
    BASIC_CONSUME,
    BASIC_PUBLISH,
    CHANNEL_OPEN,
    CONFIRM_SELECT,
    QUEUE_DECLARE,
    TcpProxy,
    ThreadedTcpProxy,
)

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent
CONNECTION_START_OK = (10, 11)  # the client's first method: the handshake


@pytest.fixture
def config_file(tmp_path: Path, tag: str) -> Path:
    """The suite's test configuration with small copies in a thread of the daemon: a copy process
    is another process writing to the same stderr, with a start-up race of its own (a parent
    leaving before its first frame gives an EOFError traceback), which is not what is tested."""
    state = tmp_path / "state"
    (state / "landing").mkdir(parents=True)
    path = write_config(tmp_path / "spool.toml", state, tag)
    text = path.read_text()
    assert 'root = "storage/disk1"\n' in text
    path.write_text(
        text.replace('root = "storage/disk1"\n', 'root = "storage/disk1"\nsmall_copies = "thread"\n')
    )
    return path


def _upstream() -> tuple[str, int]:
    url = aio_pika.connection.make_url(AMQP_URL)
    return url.host or "127.0.0.1", url.port or 5672


async def _run_daemon(config: Path, url: str, daemon: str = "ingest") -> tuple[int, list[str]]:
    """``spool run DAEMON`` against ``url``; its exit code and stderr lines (warning level: the
    copy process's info line about its parent leaving is not what is asserted here)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "daemons", "--config", str(config), "run", daemon,
        cwd=ROOT, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "SPOOL_BUS__URL": url, "SPOOL_LOG__LEVEL": "warning"},
    )  # fmt: skip
    try:
        _, err = await asyncio.wait_for(process.communicate(), timeout=90)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, err.decode().splitlines()


def _the_one_line(code: int, lines: list[str]) -> dict[str, Any]:
    assert code == 3, lines
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0]
    record: dict[str, Any] = json.loads(lines[0])
    assert record["event"] == "daemon_failed" and record["level"] == "error" and record["exit_code"] == 3
    assert record["daemon"] == "ingest"
    return record


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_start_against_a_port_where_nothing_listens_exits_3_with_one_line(config_file):
    code, lines = await _run_daemon(config_file, f"amqp://guest:guest@127.0.0.1:{_free_port()}/")
    record = _the_one_line(code, lines)
    assert record["reason"] == "broker_unreachable"
    assert "guest:***@127.0.0.1" in record["error"] and "guest:guest" not in record["error"]


# (what the client sends when the broker goes away, which one, what the line names)
MOMENTS = {
    "handshake": (CONNECTION_START_OK, 1, False, "broker_unreachable", "cannot reach RabbitMQ"),
    "topology_channel": (CHANNEL_OPEN, 1, False, "broker_unavailable", "declaring the topology"),
    "topology_queues": (QUEUE_DECLARE, 3, False, "broker_unavailable", "declaring the topology"),
    "publisher_channel": (CHANNEL_OPEN, 2, False, "broker_unavailable", "opening the publisher's channel"),
    # The answer to the publisher's Confirm.Select goes through, then the connection is closed:
    # the daemon learns it at whichever step comes next (timing decides which).
    "publisher_ready": (CONFIRM_SELECT, 2, True, "broker_unavailable", "the publisher's channel|of ingest"),
    "service_channel": (CHANNEL_OPEN, 3, False, "broker_unavailable", "opening the channel of ingest"),
    "consumer": (BASIC_CONSUME, 1, False, "broker_unavailable", "starting the consumer of ingest"),
}


@pytest.mark.slow
@pytest.mark.parametrize("forced", [True, False], ids=["connection_forced", "socket_dropped"])
@pytest.mark.parametrize("moment", MOMENTS)
async def test_broker_closing_during_start_up_exits_3_with_one_line(config_file, broker, moment, forced):
    method, nth, after_reply, reason, step = MOMENTS[moment]
    async with TcpProxy(*_upstream()) as proxy:
        proxy.cut_on(method, nth, forced=forced, then_refuse=True, after_reply=after_reply)
        code, lines = await _run_daemon(config_file, proxy.url(AMQP_URL))
        assert proxy.fired.is_set()
    record = _the_one_line(code, lines)
    assert record["reason"] == reason and re.search(step, record["error"]), record


@pytest.mark.slow
def test_threaded_proxy_serves_synchronous_callers_the_same_cut(config_file, broker):
    with ThreadedTcpProxy(*_upstream()) as proxy:
        proxy.cut_on(CHANNEL_OPEN, 2, forced=True)
        done = subprocess.run(
            [sys.executable, "-m", "daemons", "--config", str(config_file), "run", "ingest"],
            cwd=ROOT, capture_output=True, text=True, timeout=90,
            env={**os.environ, "SPOOL_BUS__URL": proxy.url(AMQP_URL), "SPOOL_LOG__LEVEL": "warning"},
        )  # fmt: skip
        assert proxy.proxy.fired.is_set()
    record = _the_one_line(done.returncode, done.stderr.splitlines())
    assert "opening the publisher's channel" in record["error"]


async def test_resources_publishing_when_the_broker_goes_away_fail_the_start_with_broker_unavailable(
    settings: Settings, broker
):
    """A service whose resources publish while they open (an outbox relayed at start): the
    publish fails, and the start fails with it, naming the step."""
    published = asyncio.Event()

    @asynccontextmanager
    async def publishing_resources(settings: Settings, publisher: Publisher) -> AsyncIterator[None]:
        beat = DaemonHeartbeat(
            daemon="ingest", instance="x", host="h", pid=1, version="0", started=datetime.now(UTC)
        )
        await publisher.publish(beat)
        published.set()
        yield None

    async with TcpProxy(*_upstream()) as proxy:
        proxy.cut_on(BASIC_PUBLISH, 1, forced=True, then_refuse=True)
        bus = settings.bus.model_copy(update={"url": proxy.url(AMQP_URL)})
        process = Process(
            [Service("ingest", resources=publishing_resources)], settings.model_copy(update={"bus": bus})
        )
        with pytest.raises(Retryable) as failed:
            await asyncio.wait_for(process.run(), timeout=60)
    assert failed.value.reason == "broker_unavailable"
    assert "opening the resources of ingest" in failed.value.message
    assert not published.is_set() and process.runners == []


async def test_a_resource_failing_while_the_broker_is_up_is_not_blamed_on_the_broker(
    settings: Settings, broker
):
    @asynccontextmanager
    async def catalogue_down(settings: Settings, publisher: Publisher) -> AsyncIterator[None]:
        raise ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 5432)")
        yield None

    process = Process([Service("ingest", resources=catalogue_down)], settings)
    with pytest.raises(ConnectionRefusedError):
        await asyncio.wait_for(process.run(), timeout=60)
