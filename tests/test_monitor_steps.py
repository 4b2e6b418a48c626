"""The monitor's pure bookkeeping, driven with plain messages and a settable clock."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import CollectorRegistry

from common.messages import (
    AlertRaised,
    CreatedCopy,
    DaemonHeartbeat,
    EndpointPaused,
    FileFailed,
    FileIngested,
    ReplicaCreated,
)
from daemons.monitor.report import Observed, status_document
from daemons.monitor.steps import ENDPOINT_PAUSED, NEW_FAILURE_REASON, MonitorState, Thresholds, liveness
from daemons.monitor.web import WebServer

T0 = datetime(2026, 11, 23, 2, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def state(clock: Clock) -> MonitorState:
    return MonitorState(Thresholds(interval=15.0, late=2.0, dead=4.0, forget=3600.0), clock=clock)


def beat(clock: Clock, instance: str = "i1", daemon: str = "ingest", **kw: object) -> DaemonHeartbeat:
    return DaemonHeartbeat(
        daemon=daemon, instance=instance, host="node1", pid=42, version="0.1.0", started=T0,
        time=clock.now, **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def failed(reason: str, name: str, error: str = "boom", daemon: str = "ingest") -> FileFailed:
    return FileFailed(daemon=daemon, reason=reason, error=error, attempts=1, name=name)


@pytest.mark.parametrize(
    ("age", "expected"),
    [(0, "alive"), (29.9, "alive"), (30, "late"), (59.9, "late"), (60, "dead"), (1e6, "dead")],
)
def test_liveness_is_late_after_two_intervals_and_dead_after_four(age: float, expected: str) -> None:
    assert liveness(age, 15.0, 2.0, 4.0) == expected


def test_a_heartbeat_makes_an_instance_alive_then_late_then_dead(state: MonitorState, clock: Clock) -> None:
    state.observe(beat(clock, processed=7, in_flight=3, details={"retried": 2, "queue": "spool.ingest"}))
    [view] = state.daemons()
    assert (view.state, view.processed, view.in_flight, view.retried, view.host) == (
        "alive",
        7,
        3,
        2,
        "node1",
    )
    clock.advance(31)
    assert state.daemons()[0].state == "late"
    clock.advance(30)
    assert state.daemons()[0].state == "dead"
    state.observe(beat(clock))
    assert state.daemons()[0].state == "alive"


def test_an_older_heartbeat_arriving_late_does_not_roll_an_instance_back(
    state: MonitorState, clock: Clock
) -> None:
    old = beat(clock, processed=1)
    clock.advance(10)
    state.observe(beat(clock, processed=5))
    state.observe(old)
    assert state.daemons()[0].processed == 5


def test_a_heartbeat_from_a_clock_ahead_counts_as_now(state: MonitorState, clock: Clock) -> None:
    ahead = beat(clock)
    clock.now = T0 - timedelta(seconds=120)
    state.observe(ahead)
    assert state.daemons()[0].age == 0


def test_dead_instances_are_forgotten_after_forget_after(state: MonitorState, clock: Clock) -> None:
    state.observe(beat(clock, instance="old"))
    clock.advance(3600)
    state.observe(beat(clock, instance="new"))
    assert state.prune() == []
    clock.advance(61)
    assert state.prune() == ["old"]
    assert [v.instance for v in state.daemons()] == ["new"]


def test_ten_thousand_failures_of_one_cause_and_three_of_another_are_two_lines(state: MonitorState) -> None:
    for i in range(10_000):
        state.observe(failed("destination_not_writable", f"run1/f{i}", "no write pools online"))
    for i in range(3):
        state.observe(failed("checksum_mismatch", f"run2/g{i}", f"adler32 differs: file {i}"))
    groups = state.failure_groups()
    assert [(g.reason, g.count) for g in groups] == [
        ("destination_not_writable", 10_000),
        ("checksum_mismatch", 3),
    ]
    rare = groups[1]
    assert rare.example == "run2/g0" and rare.error == "adler32 differs: file 0"
    assert rare.first <= rare.last


def test_a_new_reason_raises_exactly_one_alert(state: MonitorState) -> None:
    alerts = [
        a for i in range(50) for a in state.observe(failed("disk_full", f"f{i}", "ENOSPC on /srv/disk1"))
    ]
    assert len(alerts) == 1
    alert = alerts[0]
    assert isinstance(alert, AlertRaised) and alert.kind == NEW_FAILURE_REASON
    assert (alert.daemon, alert.reason, alert.example) == ("ingest", "disk_full", "f0")
    assert "ENOSPC" in alert.summary
    assert state.observe(failed("name_conflict", "x"))[0].reason == "name_conflict"


def test_failures_are_grouped_per_endpoint_when_the_fact_names_one(state: MonitorState) -> None:
    for storage in ("disk2", "disk2", "disk3"):
        state.observe(
            EndpointPaused(storage=storage, reason="storage_io_error", error="EIO", failures=5, cooldown=30)
        )
    groups = {(g.daemon, g.reason, g.endpoint): g.count for g in state.failure_groups()}
    assert groups == {
        ("replicator", "storage_io_error", "disk2"): 2,
        ("replicator", "storage_io_error", "disk3"): 1,
    }


def test_the_monitors_own_alerts_are_not_failures(state: MonitorState) -> None:
    [alert] = state.observe(failed("disk_full", "f"))
    assert state.observe(alert) == []
    assert len(state.failure_groups()) == 1 and state.events["alert.raised"] == 1


def copy(name: str, size: int) -> CreatedCopy:
    return CreatedCopy(name=name, pfn=name, size=size, adler32="00000001")


def test_events_and_moved_bytes_are_counted_by_type_and_storage(state: MonitorState) -> None:
    state.observe(FileIngested(name="a", dataset="d", size=100, adler32="00000001", storage="disk1", pfn="a"))
    state.observe(ReplicaCreated(storage="disk2", copies=[copy("a", 100)]))
    # A bulk request's copies arrive in one event: every copy's bytes count.
    state.observe(ReplicaCreated(storage="disk2", copies=[copy("b", 50), copy("c", 25)]))
    assert state.events == {"file.ingested": 1, "replica.created": 2}
    assert state.moved_bytes == {("file.ingested", "disk1"): 100, ("replica.created", "disk2"): 175}


def test_malformed_messages_are_counted_by_reason_with_the_last_one_kept(state: MonitorState) -> None:
    state.observe_malformed("file.ready", "undecodable", "body is not valid JSON")
    state.observe_malformed("no.such", "unknown_type", "unknown message type 'no.such'")
    assert state.malformed == {"undecodable": 1, "unknown_type": 1}
    assert state.last_malformed is not None and state.last_malformed["routing_key"] == "no.such"


def test_status_document_is_json_with_unknowns_named(state: MonitorState, clock: Clock) -> None:
    state.observe(beat(clock))
    state.observe(failed("disk_full", "f"))
    doc = status_document(state, Observed())
    assert doc["source"] == "monitor" and doc["daemons"][0]["state"] == "alive"
    assert doc["failures"][0]["reason"] == "disk_full" and doc["failures"][0]["count"] == 1
    assert doc["queues"] is None and any("queues" in m for m in doc["missing"])
    assert doc["alerts"][0]["kind"] == NEW_FAILURE_REASON


def test_an_endpoint_paused_alert_names_the_endpoint_and_comes_once(state: MonitorState) -> None:
    def paused() -> EndpointPaused:
        return EndpointPaused(
            storage="disk2", reason="storage_io_error", error="EIO", failures=5, cooldown=30
        )

    [alert] = state.observe(paused())
    assert (alert.kind, alert.daemon, alert.endpoint) == (ENDPOINT_PAUSED, "replicator", "disk2")
    assert alert.summary.startswith("endpoint disk2 paused by the replicator")
    assert state.observe(paused()) == [] and state.alerts_raised == {ENDPOINT_PAUSED: 1}


def test_throughput_is_the_rate_between_samples_of_messages_and_heartbeat_work(
    state: MonitorState, clock: Clock
) -> None:
    state.observe(beat(clock, processed=0))
    state.sample()
    clock.advance(10)
    for i in range(40):
        state.observe(failed("disk_full", f"f{i}"))
    state.observe(beat(clock, processed=100))
    state.observe(beat(clock, daemon="replicator", instance="r1", processed=30))
    state.sample()
    [point] = state.throughput()
    assert point["seconds"] == 10 and point["messages"] == 4.2  # 40 failures and 2 heartbeats
    assert point["processed"] == {"ingest": 10.0, "replicator": 3.0}
    doc = status_document(state, Observed())
    assert doc["throughput"][0]["processed"]["ingest"] == 10.0 and doc["processed"]["ingest"] == 100


def test_a_restarted_daemon_adds_its_new_work_and_one_older_than_the_monitor_starts_from_zero(
    clock: Clock,
) -> None:
    clock.advance(60)  # the monitor starts a minute after the daemons
    state = MonitorState(Thresholds(interval=15.0), clock=clock)
    state.observe(beat(clock, instance="old", processed=5000))  # work done before the monitor ran
    state.observe(beat(clock, instance="old", processed=5010))
    assert state.processed == {"ingest": 10}
    restarted = beat(clock, instance="new", processed=7)
    restarted = restarted.model_copy(update={"started": clock.now})
    state.observe(restarted)  # a new process counts from zero: all of its work is new
    assert state.processed == {"ingest": 17}


def test_the_status_document_is_built_once_per_interval_for_all_viewers() -> None:
    built = []
    now = [0.0]

    def status() -> dict[str, object]:
        built.append(now[0])
        return {"source": "monitor", "n": len(built)}

    server = WebServer(CollectorRegistry(), status, status_max_age=1.0, clock=lambda: now[0])
    first = server.status_body()
    now[0] = 0.9
    assert server.status_body() is first and len(built) == 1
    now[0] = 1.0
    assert json.loads(server.status_body()) == {"source": "monitor", "n": 2}
    assert server.status_computations == 2
