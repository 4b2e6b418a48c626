"""The replicator's circuit breaker, its pure part: the failures that open it, and which copy may
go by the shared state as last read (the shared transitions: tests/test_replicator_shared.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from common.catalogue.transfers import EndpointView
from daemons.replicator.breaker import FailureCount, admission

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
ME, OTHER, DEAD = "replicator@a:1:x", "replicator@b:2:y", "replicator@c:3:z"
LIVE = [ME, OTHER]


def test_opens_after_k_consecutive_failures_only() -> None:
    count = FailureCount(failures_to_open=3)
    assert not count.record_failure()
    assert not count.record_failure()
    count.record_success()  # resets the count
    assert not count.record_failure()
    assert not count.record_failure()
    assert count.record_failure()
    assert not count.record_failure()  # counting starts again (the breaker is open by then)


def test_a_failure_no_retry_mends_opens_it_at_once() -> None:
    assert FailureCount(failures_to_open=5).record_failure(at_once=True)


def test_closed_lets_every_copy_go() -> None:
    assert admission(EndpointView("online", "ok"), ME, LIVE, NOW) == "go"


def test_paused_copies_wait_until_the_cooldown_is_over_then_one_may_probe() -> None:
    cooling = EndpointView("online", "paused", until=NOW + timedelta(seconds=1), cooldown=10)
    assert admission(cooling, ME, LIVE, NOW) == "wait"
    assert admission(cooling, ME, LIVE, NOW + timedelta(seconds=1)) == "try_probe"
    # A pause with no end (left before the breaker was shared): due at once.
    assert admission(EndpointView("online", "paused"), ME, LIVE, NOW) == "try_probe"


def test_while_a_live_instance_probes_the_others_and_itself_wait() -> None:
    assert admission(EndpointView("online", "probing", prober=OTHER), ME, LIVE, NOW) == "wait"
    assert admission(EndpointView("online", "probing", prober=ME), ME, LIVE, NOW) == "wait"


def test_a_dead_probers_probe_may_be_taken_over() -> None:
    assert admission(EndpointView("online", "probing", prober=DEAD), ME, LIVE, NOW) == "try_probe"
