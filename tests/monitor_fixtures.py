"""Helpers for the monitor, management and ``spool status`` tests: a config with a free HTTP port
and a short poll interval, access to a running monitor's resources, publishing many events."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp

from common import codec
from common.bus.publisher import connection_user
from common.config import Settings
from common.messages import Message
from tests.conftest import write_config


def free_port() -> int:
    """A port free now (the monitor binds it a moment later; good enough on a test machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def monitor_config(tmp_path: Path, tag: str, **monitor: str) -> Path:
    state = tmp_path / "state"
    (state / "landing").mkdir(parents=True, exist_ok=True)
    # Generous liveness thresholds (10 s / 20 s at the tests' 0.5 s heartbeats): on a loaded machine
    # a heartbeat may well be a second late, and only the liveness test is about liveness.
    keys = {
        "http_host": '"127.0.0.1"', "http_port": str(free_port()), "poll_interval": "0.5",
        "heartbeat_late": "20", "heartbeat_dead": "40", **monitor,
    }  # fmt: skip
    body = "\n".join(f"{k} = {v}" for k, v in keys.items())
    return write_config(tmp_path / "spool.toml", state, tag, monitor=body)


def resources_of(process: Any) -> Any:
    """The running monitor's ``MonitorResources`` (``running([monitor_service], ...)``)."""
    [runner] = [r for r in process.runners if r.service.name == "monitor"]
    return runner.resources


async def get_json(url: str) -> Any:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def get_text(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200
        return await response.text()


async def publish_many(
    connection: aio_pika.abc.AbstractRobustConnection, settings: Settings, messages: list[Message]
) -> None:
    """Publish Spool messages (msgpack) with confirms, a window of them at a time, as Spool's own
    publishers do: with the connection's user as ``user_id`` (``common.bus.admission``)."""
    user_id = connection_user(connection)
    channel = await connection.channel(publisher_confirms=True)
    exchange = await channel.get_exchange(settings.bus.exchange)
    window = 500
    for start in range(0, len(messages), window):
        await asyncio.gather(
            *(
                exchange.publish(
                    aio_pika.Message(
                        codec.encode(m), content_type=codec.MSGPACK, message_id=m.id, user_id=user_id
                    ),
                    routing_key=m.ROUTING_KEY,
                )
                for m in messages[start : start + window]
            )
        )
    await channel.close()
