"""The monitor against the real broker: liveness from heartbeats (and death of a killed daemon, whose
in-flight messages are shown returning to ready), failures grouped by cause, one alert per new
cause (and one for an endpoint the replicator's breaker paused), malformed messages counted and
ignored, Prometheus metrics."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import msgpack
import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.bus.service import Context, Service
from common.config import load_settings
from common.errors import Permanent
from common.messages import (
    DaemonHeartbeat,
    EndpointPaused,
    EndpointResumed,
    FileFailed,
    FileIngested,
    ReplicaRequest,
    TapeMounted,
)
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
                [sys.executable, "-m", "daemons", "--config", str(config_file), "run", "ingest"],
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


# A consumer as a daemon holds work: its connection named like a Spool daemon's, five messages
# delivered and never acked. Killed with SIGKILL, as a crashed daemon would be.
HOLDER = """
import asyncio, sys, aio_pika
async def main(url, queue):
    conn = await aio_pika.connect(url, client_properties={"connection_name": "spool-ingest@node-killed"})
    channel = await conn.channel()
    await channel.set_qos(prefetch_count=5)
    held = []
    async def keep(message):
        held.append(message)
        if len(held) == 5:
            print("holding", flush=True)
    await (await channel.get_queue(queue)).consume(keep)
    await asyncio.Event().wait()
asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


@pytest.mark.slow
async def test_messages_held_by_a_killed_consumer_are_shown_returning_to_ready(settings, broker, topology):
    for i in range(8):
        await publish_raw(broker, settings, "file.ready", cloudevent({"path": f"/l/{i}", "dataset": "d"}))
    async with running([monitor_service], settings) as process:
        res = resources_of(process)
        holder = await asyncio.create_subprocess_exec(
            sys.executable, "-c", HOLDER, settings.bus.url, settings.queue("ingest"),
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            assert holder.stdout is not None
            assert await asyncio.wait_for(holder.stdout.readline(), timeout=60) == b"holding\n"
            # The management API refreshes its figures every 5 s; the monitor looks every 0.5 s.
            # Queue and channel figures are refreshed apart: wait for the holder to be listed too.
            await wait_for(lambda: _ingest_is(res, ready=3, in_flight=5, held=True), timeout=60, interval=0.5)
            await asyncio.sleep(1.1)  # /api/status is rebuilt at most once a second
            held = _ingest_queue(await get_json(_url(res, "/api/status")))
            holder.send_signal(signal.SIGKILL)
            await holder.wait()
            await wait_for(lambda: _ingest_is(res, ready=8, in_flight=0), timeout=60, interval=0.5)
            returned = _ingest_queue(await get_json(_url(res, "/api/status")))
        finally:
            if holder.returncode is None:
                holder.kill()
                await holder.wait()
    assert [(h["daemon"], h["host"], h["unacked"]) for h in held["holders"]] == [("ingest", "node-killed", 5)]
    assert (held["ready"], held["in_flight"], held["consumers"]) == (3, 5, 1)
    assert (returned["ready"], returned["in_flight"], returned["consumers"]) == (8, 0, 0)
    assert returned["holders"] == []


def _ingest_queue(doc: dict[str, Any]) -> dict[str, Any]:
    return next(q for q in doc["queues"]["queues"] if q["daemon"] == "ingest")


async def _ingest_is(res: Any, *, ready: int, in_flight: int, held: bool = False) -> bool:
    report = res.observed.queues
    if report is None:
        return False
    ingest = next(q for q in report.queues if q.daemon == "ingest")
    return (ingest.ready, ingest.in_flight) == (ready, in_flight) and (not held or bool(ingest.holders))


async def test_an_endpoint_paused_by_the_breaker_raises_one_alert_even_when_paused_again(
    settings, broker, topology
):
    """The replicator's breaker may pause, probe, and pause the same endpoint again and again."""
    paused = [
        EndpointPaused(storage="disk2", reason="destination_not_writable", error="no write pools online",
                       failures=5, cooldown=30 * 2**i)
        for i in range(3)
    ]  # fmt: skip
    resumed = EndpointResumed(storage="disk2", paused_seconds=30, waiting=0)
    channel, alerts = await _alert_queue(broker, settings)
    async with running([monitor_service], settings) as process:
        res = resources_of(process)
        await publish_many(broker, settings, [paused[0], resumed, paused[1], paused[2]])
        await wait_for(lambda: _is(res.state.events["endpoint.paused"] == 3))
        await wait_for(lambda: _is(not res.pending_alerts and (res.flushing is None or res.flushing.done())))
        await wait_for(lambda: _is(res.state.events["alert.raised"] == 1))  # the monitor hears itself
        raised = await _alerts_in(alerts)
        doc = await get_json(_url(res, "/api/status"))
    await channel.close()
    assert len(raised) == 1
    alert = msgpack.unpackb(raised[0].body)
    assert (alert["kind"], alert["daemon"], alert["endpoint"]) == ("endpoint_paused", "replicator", "disk2")
    assert "disk2" in alert["summary"] and "no write pools online" in alert["summary"]
    [group] = doc["failures"]
    assert (group["reason"], group["endpoint"], group["count"]) == ("destination_not_writable", "disk2", 3)


async def test_the_monitor_resumes_counting_after_its_channel_is_closed_by_the_broker(
    settings, broker, topology
):
    """Its runner consumes below aio-pika's consumer bookkeeping, so it must re-create its consumer
    itself when the robust channel comes back (after a channel error, or a reconnection)."""
    batch = [_failed("ingest", "file_missing", "gone", f"f{i}") for i in range(100)]
    async with running([monitor_service], settings) as process:
        res = resources_of(process)
        [runner] = process.runners
        await publish_many(broker, settings, batch)
        await wait_for(lambda: _is(res.state.events["file.failed"] == 100))
        await wait_for(lambda: _idle(process))  # acked: nothing of the first batch comes back
        with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):  # the broker closes the channel
            await runner.channel.declare_queue(f"no-such-queue-{settings.bus.queue_prefix}", passive=True)
        again = [_failed("ingest", "file_missing", "gone", f"g{i}") for i in range(100)]  # new ids
        await publish_many(broker, settings, again)
        await wait_for(lambda: _is(res.state.events["file.failed"] == 200), timeout=60)
        assert not process.stop_requested.is_set()
    assert res.state.failures[("ingest", "file_missing", None)].count == 200


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


async def test_a_dead_lettered_copy_is_grouped_under_its_destination_endpoint(settings, broker, topology):
    """The runner's ``file.failed`` names the endpoint the work was for, so two full disks are two
    causes, not one spread over every file."""
    failing = Service("replicator")

    @failing.handler(ReplicaRequest)
    async def copy(msg: ReplicaRequest, ctx: Context[None]) -> None:
        raise Permanent("destination_not_writable", f"{msg.destination}: no write pools online")

    requests = [ReplicaRequest(name=f"run1/f{i}", destination=f"disk{2 + i % 2}") for i in range(6)]
    async with running([failing, monitor_service], settings) as process:
        res = resources_of(process)
        await publish_many(broker, settings, requests)
        await wait_for(lambda: _is(res.state.events["file.failed"] == 6))
    groups = {(g.daemon, g.reason, g.endpoint): g.count for g in res.state.failure_groups()}
    assert groups == {
        ("replicator", "destination_not_writable", "disk2"): 3,
        ("replicator", "destination_not_writable", "disk3"): 3,
    }


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
    # Every delivery was acked: what is left is at most a heartbeat the monitor itself sent while
    # it stopped (after its consumer was cancelled), waiting for the next monitor.
    channel = await broker.channel()
    queue = await channel.declare_queue(settings.queue("monitor"), passive=True)
    left = []
    while (m := await queue.get(no_ack=True, fail=False)) is not None:
        left.append((m.routing_key, m.redelivered))
    await channel.close()
    assert set(left) <= {("daemon.heartbeat", False)}


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
                TapeMounted(library="default", drive="DR01", cartridge="A00001", purpose="archive"),
                DaemonHeartbeat(
                    daemon="replicator",
                    instance="r1",
                    host="node7",
                    pid=42,
                    version="t",
                    started=datetime.now(UTC),
                    processed=3,
                    failed=1,
                    details={
                        "retried": 2,
                        "retried_by_reason": {"disk_full": 2},
                        "dead_by_reason": {"no_source": 1},
                        "handling": {"buckets": [0.1, 1.0], "counts": [2, 3, 1], "sum": 9.5},
                    },
                ),
            ],
        )
        await wait_for(
            lambda: _is(res.state.events["file.failed"] == 1 and res.state.events["file.ingested"] == 2)
        )
        await wait_for(lambda: _is(res.state.events["tape.mounted"] == 1))
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
    assert samples[("spool_tape_mounts_total", ())] == 1
    replicator = (("daemon", "replicator"), ("host", "node7"), ("instance", "r1"))
    assert samples[("spool_retries_total", (*replicator, ("reason", "disk_full")))] == 2
    assert samples[("spool_dead_letters_total", (*replicator, ("reason", "no_source")))] == 1
    histogram = [
        (dict(labels), v) for (n, labels), v in samples.items() if n == "spool_handling_seconds_bucket"
    ]
    buckets = {labels["le"]: v for labels, v in histogram if labels["daemon"] == "replicator"}
    assert buckets == {"0.1": 2, "1.0": 5, "+Inf": 6}
    assert samples[("spool_handling_seconds_sum", (("daemon", "replicator"),))] == 9.5
    monitor_handling = [v for (n, labels), v in samples.items() if n == "spool_handling_seconds_count"
                        and dict(labels)["daemon"] == "monitor"]  # fmt: skip
    assert monitor_handling and monitor_handling[0] >= 0
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
