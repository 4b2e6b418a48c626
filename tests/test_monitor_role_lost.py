"""A monitor whose role is taken from it (its lease ran out and another instance claimed it) stops
consuming and gives back what it counted but had not saved; when it holds the role again it starts
from the saved state and counts each of those messages once. On SQLite, one host."""

from __future__ import annotations

import asyncio
import io
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from sqlalchemy import Connection, update

from common.catalogue.schema import role_leases
from common.catalogue.sql import utcnow
from common.cli.status import render_status
from common.config import load_settings
from common.messages import FileIngested, Message
from daemons.monitor.handlers import service as monitor_service
from daemons.monitor.report import status_document
from tests.conftest import queue_depth, running, wait_for, write_config
from tests.monitor_fixtures import free_port, publish_many, resources_of

pytestmark = pytest.mark.integration


@pytest.fixture
def config_file(tmp_path: Path, tag: str) -> Path:
    state = tmp_path / "state"
    (state / "landing").mkdir(parents=True)
    # Saves only at a stop or when half the prefetch waits: what it counts stays unsaved (unacked).
    monitor = "\n".join([
        'http_host = "127.0.0.1"', f"http_port = {free_port()}", "poll_interval = 0.5",
        "save_interval = 60", "heartbeat_late = 20", "heartbeat_dead = 40",
    ])  # fmt: skip
    return write_config(
        tmp_path / "spool.toml",
        state,
        tag,
        monitor=monitor,
        catalogue="lease_seconds = 3",
        **{"daemons.monitor": "prefetch = 1000"},
    )


def _ingested(n: int) -> FileIngested:
    return FileIngested(name=f"ok{n}", dataset="d", size=10, adler32="1", storage="disk1", pfn=f"/p/ok{n}")


def _counted(res: Any) -> int:
    return int(res.state.events.get("file.ingested", 0))


@pytest.mark.parametrize("noticed_by", ["renewal", "save"])
async def test_a_monitor_that_lost_its_role_gives_back_what_it_had_not_saved(
    config_file: Path, broker, topology, noticed_by: str
) -> None:
    settings = load_settings(config_file)
    async with running([monitor_service], settings) as process:
        res = resources_of(process)
        assert res.role.active
        if noticed_by == "save":  # no renewal round comes first: the refused save tells
            res.role._task.cancel()
        # 40 counted, saved at once (a checkpoint asked for by hand), acked.
        await publish_many(broker, settings, [_ingested(n) for n in range(40)])
        await wait_for(lambda: _is(_counted(res) == 40), timeout=30)
        await res.runner.checkpoint()
        saved = await res.role.load()
        assert saved is not None and saved.doc["events"]["file.ingested"] == 40
        # 25 more, counted and not saved: held unacked (with the monitor's own heartbeats).
        messages: list[Message] = [_ingested(n) for n in range(40, 65)]
        await publish_many(broker, settings, messages)
        await wait_for(lambda: _is(_counted(res) == 65 and res.runner.in_flight >= 25), timeout=30)

        # Another instance holds the role now (as after this one's lease ran out unrenewed).
        def steal(conn: Connection) -> None:
            later = utcnow() + timedelta(seconds=60)
            conn.execute(update(role_leases).values(holder="monitor@elsewhere", expires=later))

        await res.role.catalogue.write(steal)
        runner = res.runner
        if noticed_by == "save":
            await asyncio.wait_for(runner.checkpoint(), timeout=10)
            await res.role.step()  # a standby's round (its loop is stopped here): finds who is active
        await wait_for(lambda: _is(not (res.role.active or runner.consuming or runner.in_flight)), 10)
        # The 25 went back to the queue, and what comes now waits there too (with the heartbeats
        # of the monitor itself).
        await publish_many(broker, settings, [_ingested(n) for n in range(65, 75)])
        await wait_for(lambda: _depth_at_least(broker, settings, 35), timeout=30)
        # Standby, it shows the saved state (40), says so, and its /metrics say only that.
        await wait_for(lambda: _is(_counted(res) == 40), timeout=10)
        doc = status_document(res.state, res.observed, role=res.role)
        assert doc["monitor"]["role"] == "standby"
        assert doc["monitor"]["active_instance"] == "monitor@elsewhere"
        console = Console(width=200, record=True, file=io.StringIO())
        console.print(render_status(doc))  # what `spool status` prints
        text = console.export_text()
        assert "standby monitor on" in text and "active: monitor@elsewhere" in text
        metrics = [m.name for m in res.web._registry.collect()]
        assert "spool_monitor_active" in metrics and "spool_events" not in metrics

        # The other instance goes away (clean stop): this one takes the role back, restores the
        # save (40) and counts the 35 waiting, each once.
        await res.role.catalogue.instances.release_role("monitor", "monitor@elsewhere")
        if noticed_by == "save":
            res.role.start()
        await wait_for(lambda: _is(res.role.active and _counted(res) == 75), timeout=30)
        await wait_for(lambda: _is(res.runner.consuming), timeout=10)
        assert _counted(res) == 75
    # The clean stop saved last and released the role.
    from common.catalogue import Catalogue
    from common.catalogue.repositories.monitor_state import MonitorStateRepository

    async with await Catalogue.open(settings.catalogue.url) as cat:
        saved = await MonitorStateRepository(cat).load("monitor")
        assert await cat.instances.role_holder("monitor", utcnow()) is None
    assert saved is not None and saved.doc["events"]["file.ingested"] == 75


async def _is(value: bool) -> bool:
    return value


async def _depth_at_least(broker: Any, settings: Any, n: int) -> bool:
    return await queue_depth(broker, settings.queue("monitor")) >= n
