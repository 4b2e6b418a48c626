"""The monitor against the real broker: liveness from heartbeats (and death of a killed daemon),
failures grouped by cause, one alert per new cause, malformed messages counted and ignored,
Prometheus metrics."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import aio_pika
import msgpack
import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.config import load_settings
from common.messages import DaemonHeartbeat, FileFailed, FileIngested
from daemons.monitor.handlers import service as monitor_service
from tests.conftest import cloudevent, publish_raw, queue_depth, running, wait_for
from tests.monitor_fixtures import get_json, get_text, monitor_config, publish_many, resources_of

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def config_file(tmp_path: Path, tag: str) -> Path:
    return monitor_config(tmp_path, tag)


@pytest.fixture
def strict_liveness(tmp_path: Path, tag: str) -> Path:
    """The production multipliers (late after 2 heartbeat intervals, dead after 4)."""
    return monitor_config(tmp_path / "strict", tag, heartbeat_late="2", heartbeat_dead="4")


def _url(res: Any, path: str) -> str:
    return f"http://127.0.0.1:{res.web.port}{path}"


def _state_of(res: Any, daemon: str, pid: int) -> str | None:
    return next((v.state for v in res.state.daemons() if v.daemon == daemon and v.pid == pid), None)


async def _idle(process: Any) -> bool:
    return all(r.in_flight == 0 for r in process.runners)


async def _alerts_in(queue: aio_pika.abc.AbstractQueue) -> list[aio_pika.abc.AbstractIncomingMessage]:
    out = []
    while (m := await queue.get(no_ack=True, fail=False)) is not None:
        out.append(m)
    return out


async def _alert_queue(broker: Any, settings: Any) -> tuple[Any, aio_pika.abc.AbstractQueue]:
    channel = await broker.channel()
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(settings.bus.exchange, "alert.raised")
    return channel, queue


async def test_heartbeats_make_a_daemon_alive_and_a_killed_daemon_shows_dead(
    strict_liveness, broker, topology, tmp_path
):
    settings = load_settings(strict_liveness)
    config_file = strict_liveness
    async with running([monitor_service], settings) as process:
        res = resources_of(process)
        with (tmp_path / "ingest.log").open("wb") as log:
            daemon = subprocess.Popen(
                [sys.executable, "-m", "common.cli", "--config", str(config_file), "run", "ingest"],
                cwd=REPO, stdout=log, stderr=log,
            )  # fmt: skip
            try:
                await wait_for(lambda: _is(_state_of(res, "ingest", daemon.pid) == "alive"), timeout=60)
                daemon.kill()
                daemon.wait()
                await wait_for(lambda: _is(_state_of(res, "ingest", daemon.pid) == "dead"), timeout=30)
            finally:
                if daemon.poll() is None:
                    daemon.kill()
                    daemon.wait()
        doc = await get_json(_url(res, "/api/status"))
    [entry] = [d for d in doc["daemons"] if d["daemon"] == "ingest"]
    assert entry["state"] == "dead" and entry["pid"] == daemon.pid
    assert entry["age"] >= doc["monitor"]["dead_after"] == 4 * settings.bus.heartbeat_interval


async def test_ten_thousand_failures_of_one_cause_and_three_of_another_show_as_two_lines(
    settings, broker, topology
):
    common_cause = [
        _failed("replicator", "destination_not_writable", "disk2: no write pools online", f"run1/f{i}")
        for i in range(10_000)
    ]
    rare = [
        _failed("ingest", "checksum_mismatch", f"adler32 differs for g{i}: 1a2b != 3c4d", f"run2/g{i}")
        for i in range(3)
    ]
    channel, alerts = await _alert_queue(broker, settings)
    async with running([monitor_service], settings) as process:
        res = resources_of(process)
        await publish_many(broker, settings, common_cause + rare)
        await wait_for(lambda: _is(res.state.events["file.failed"] == 10_003), timeout=180)
        await wait_for(lambda: _idle(process))
        doc = await get_json(_url(res, "/api/status"))
        raised = await _alerts_in(alerts)
    await channel.close()
    lines = [(f["daemon"], f["reason"], f["count"]) for f in doc["failures"]]
    assert lines == [("replicator", "destination_not_writable", 10_000), ("ingest", "checksum_mismatch", 3)]
    rare_line = doc["failures"][1]
    assert rare_line["example"] == "run2/g0" and rare_line["error"] == "adler32 differs for g0: 1a2b != 3c4d"
    assert datetime.fromisoformat(rare_line["first"]) <= datetime.fromisoformat(rare_line["last"])
    assert len(raised) == 2


async def test_a_new_failure_reason_raises_exactly_one_alert_on_the_bus(settings, broker, topology):
    failures = [
        _failed("ingest", "disk_full", "ENOSPC writing to /srv/disk1", f"run3/f{i}") for i in range(40)
    ]
    channel, alerts = await _alert_queue(broker, settings)
    async with running([monitor_service], settings) as process:
        res = resources_of(process)
        await publish_many(broker, settings, failures)
        await wait_for(lambda: _is(res.state.events["file.failed"] == 40))
        await wait_for(lambda: _idle(process))
        await wait_for(lambda: _is(res.state.events["alert.raised"] == 1))  # the monitor hears itself
        raised = await _alerts_in(alerts)
    await channel.close()
    assert len(raised) == 1
    alert = msgpack.unpackb(raised[0].body)
    assert (alert["kind"], alert["daemon"], alert["reason"]) == ("new_failure_reason", "ingest", "disk_full")
    assert alert["example"] == "run3/f0" and "ENOSPC" in alert["error"]


async def test_malformed_messages_are_counted_and_acked_not_dead_lettered(settings, broker, topology):
    async with running([monitor_service], settings) as process:
        res = resources_of(process)
        await publish_raw(broker, settings, "file.ingested", b"\xc1\xc1 not msgpack", "application/msgpack")
        await publish_raw(broker, settings, "file.ready", b"{not json", "application/json")
        await publish_raw(broker, settings, "no.such.type", cloudevent({}, type_="no.such.type"))
        await publish_raw(
            broker, settings, "file.ingested", b'{"name": "missing the rest"}', "application/json"
        )
        await publish_many(
            broker, settings, [FileFailed(daemon="ingest", reason="disk_full", error="x", attempts=1)]
        )
        await wait_for(lambda: _is(sum(res.state.malformed.values()) == 4))
        await wait_for(lambda: _is(res.state.events["file.failed"] == 1))  # still observing
        await wait_for(lambda: _idle(process))
        assert not process.stop_requested.is_set()
        assert process.runners[0].stats.ignored == 4
        status = await get_json(_url(res, "/api/status"))
    assert res.state.malformed == {"undecodable": 2, "unknown_type": 1, "invalid_message": 1}
    assert status["malformed"]["total"] == 4
    assert await queue_depth(broker, settings.dead_queue("monitor")) == 0
    assert await queue_depth(broker, settings.queue("monitor")) == 0


async def test_metrics_endpoint_exposes_counters_and_gauges(settings, broker, topology):
    async with running([monitor_service], settings) as process:
        res = resources_of(process)
        await publish_many(
            broker,
            settings,
            [
                FileIngested(name="a", dataset="d", size=1000, adler32="00000001", storage="disk1", pfn="a"),
                FileIngested(name="b", dataset="d", size=24, adler32="00000001", storage="disk1", pfn="b"),
                FileFailed(daemon="ingest", reason="file_missing", error="gone", attempts=1, name="c"),
            ],
        )
        await wait_for(
            lambda: _is(res.state.events["file.failed"] == 1 and res.state.events["file.ingested"] == 2)
        )
        await wait_for(lambda: _is(res.state.events[DaemonHeartbeat.ROUTING_KEY] > 0))
        # the first look may predate the monitor's own consumer: wait for one that shows it
        await wait_for(lambda: _is(_consumers(res, "monitor") == 1))
        text = await get_text(_url(res, "/metrics"))
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("spool_events_total", (("type", "file.ingested"),))] == 2
    assert samples[("spool_moved_bytes_total", (("event", "file.ingested"), ("storage", "disk1")))] == 1024
    key = ("spool_failures_total", (("daemon", "ingest"), ("endpoint", ""), ("reason", "file_missing")))
    assert samples[key] == 1
    assert samples[("spool_daemon_instances", (("daemon", "monitor"), ("state", "alive")))] == 1
    assert samples[("spool_tape_mounts_total", ())] == 0
    assert ("spool_alerts_total", (("kind", "new_failure_reason"),)) in samples
    monitor_queue = (("daemon", "monitor"), ("queue", settings.queue("monitor")))
    assert ("spool_queue_ready_messages", monitor_queue) in samples
    assert samples[("spool_queue_consumers", monitor_queue)] == 1
    assert any(name == "spool_processed_messages_total" for name, _ in samples)
    assert any(name == "spool_queue_dead_messages" for name, _ in samples)


def _consumers(res: Any, daemon: str) -> int | None:
    report = res.observed.queues
    return None if report is None else next(q.consumers for q in report.queues if q.daemon == daemon)


async def _is(value: bool) -> bool:
    return value


def _failed(daemon: str, reason: str, error: str, name: str) -> FileFailed:
    return FileFailed(daemon=daemon, reason=reason, error=error, attempts=1, name=name)
