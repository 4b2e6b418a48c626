"""The monitor's ``stalled`` alerts (``daemons/monitor/stalls.py``): work held past its kind's limit
raises one alert naming the holder, is listed while it lasts, alerts again when it comes back
after clearing, and survives a take-over (saved with the state)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from common.messages import DaemonHeartbeat
from daemons.monitor.report import Observed, status_document
from daemons.monitor.snapshot import dump, restore
from daemons.monitor.stalls import STALLED, Stall, Stalls
from daemons.monitor.steps import MonitorState, Thresholds

LIMITS = {"delivery": 60.0, "tape_write": 600.0, "tape_read": 600.0, "recall": 600.0}
NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


def _state() -> MonitorState:
    return MonitorState(Thresholds(interval=15.0), clock=lambda: NOW, stalls=Stalls(dict(LIMITS)))


def _beat(held: float | None, what: str = "file.ready ev-1 file=/landing/a.fits", instance: str = "i1",
          pid: int = 4242) -> DaemonHeartbeat:  # fmt: skip
    details = {} if held is None else {"oldest_delivery": {"seconds": held, "what": what}}
    return DaemonHeartbeat(
        daemon="ingest", instance=instance, host="node-a", pid=pid, version="0.1.0",
        started=NOW - timedelta(hours=1), time=NOW, in_flight=3, details=details,
    )  # fmt: skip


def test_a_delivery_held_past_its_limit_alerts_once_naming_the_holder_then_clears() -> None:
    state = _state()
    assert state.observe(_beat(30.0)) == []  # held, under the limit
    [alert] = state.observe(_beat(61.0))
    assert alert.kind == STALLED and alert.daemon == "ingest" and alert.reason == "delivery"
    assert "ingest@node-a:4242" in alert.summary and alert.example == "file.ready ev-1 file=/landing/a.fits"
    assert state.observe(_beat(120.0)) == []  # the same delivery, still held: no second alert
    [listed] = state.stalls.current()
    assert (listed.holder, listed.since) == ("ingest@node-a:4242", NOW - timedelta(seconds=120))
    assert state.alerts_raised[STALLED] == 1 and state.alerts[-1] is alert
    # Another delivery of the same instance held too long is another stall.
    [other] = state.observe(_beat(70.0, what="file.ready ev-2 file=/landing/b.fits"))
    assert other.example.endswith("b.fits") and len(state.stalls.current()) == 1
    assert state.observe(_beat(None)) == [] and state.stalls.current() == []  # released: cleared
    assert len(state.observe(_beat(65.0, what="file.ready ev-2 file=/landing/b.fits"))) == 1  # back: again


def test_stalls_of_two_instances_are_apart_and_a_forgotten_instance_takes_its_own_away() -> None:
    state = _state()
    assert len(state.observe(_beat(61.0, instance="i1"))) == 1
    assert len(state.observe(_beat(61.0, instance="i2", pid=4343))) == 1  # another process
    assert len(state.stalls.current()) == 2
    state.stalls.forget("i1")
    assert len(state.stalls.current()) == 1


def test_catalogue_stalls_alert_once_per_holder_and_clear_when_no_longer_seen() -> None:
    state = _state()
    since = NOW - timedelta(hours=2)
    found = [
        Stall("tape_write", "tape@node-b:77:ab12", "tape", "lst1/a.fits on V00001", since, items=40),
        Stall("recall", "nobody", "recall", "recall r-1: 10 of 200 files settled", since),
    ]
    alerts = state.observe_stalled(found)
    assert sorted(a.reason for a in alerts) == ["recall", "tape_write"]
    tape = next(a for a in alerts if a.reason == "tape_write")
    assert "40 tape copies being written by tape@node-b:77:ab12" in tape.summary and tape.daemon == "tape"
    # Next look: the example moved on, the same holder still stalled: no new alert.
    moved = [Stall("tape_write", "tape@node-b:77:ab12", "tape", "lst1/b.fits on V00001", since, items=39)]
    assert state.observe_stalled(moved) == []
    assert [s.what for s in state.stalls.current()] == ["lst1/b.fits on V00001"]
    assert state.observe_stalled([]) == [] and state.stalls.current() == []


def test_stalls_are_saved_with_the_state_and_a_successor_does_not_alert_again() -> None:
    state = _state()
    state.observe(_beat(61.0))
    since = NOW - timedelta(hours=2)
    state.observe_stalled([Stall("tape_read", "recall@node-c:9:ff", "recall", "c from V00002", since)])
    doc = dump(state)
    successor = _state()
    restore(successor, doc)
    assert {s.kind for s in successor.stalls.current()} == {"delivery", "tape_read"}
    assert successor.observe(_beat(90.0)) == []
    assert successor.observe_stalled([Stall("tape_read", "recall@node-c:9:ff", "recall", "c", since)]) == []
    # What the status page shows.
    shown = status_document(successor, Observed())["stalled"]
    assert [(s["kind"], s["holder"]) for s in shown] == [
        ("tape_read", "recall@node-c:9:ff"),
        ("delivery", "ingest@node-a:4242"),
    ]


def test_a_kind_without_a_limit_is_not_watched() -> None:
    state = MonitorState(Thresholds(interval=15.0), clock=lambda: NOW, stalls=Stalls({"tape_write": 600.0}))
    assert state.observe(_beat(10_000.0)) == []
    assert state.stalls.current() == []
