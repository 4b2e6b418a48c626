"""The replicator's circuit breaker: transitions driven by a fake clock."""

from __future__ import annotations

from daemons.replicator.breaker import CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make() -> tuple[CircuitBreaker, Clock]:
    clock = Clock()
    return CircuitBreaker(failures_to_open=3, cooldown=10, max_cooldown=35, clock=clock), clock


def test_opens_after_k_consecutive_failures_only() -> None:
    b, _ = make()
    assert not b.record_failure("disk_full", "x")
    assert not b.record_failure("disk_full", "x")
    b.record_success()  # resets the count
    assert not b.record_failure("disk_full", "x")
    assert not b.record_failure("disk_full", "x")
    assert b.admit() == "go"
    assert b.record_failure("disk_full", "x")
    assert b.state == "open" and b.admit() == "wait"


def test_one_probe_after_cooldown_then_resume() -> None:
    b, clock = make()
    for _ in range(3):
        b.record_failure("destination_not_writable", "EROFS")
    clock.now += 9.9
    assert b.admit() == "wait"
    clock.now += 0.2
    assert b.admit() == "probe"
    assert b.admit() == "wait"  # only one probe at a time
    assert b.record_success() is True
    assert b.state == "closed" and b.admit() == "go"


def test_failed_probe_doubles_the_cooldown_up_to_the_maximum() -> None:
    b, clock = make()
    for _ in range(3):
        b.record_failure("disk_full", "x")
    cooldowns = []
    for _ in range(4):
        clock.now += b.current_cooldown
        assert b.admit() == "probe"
        b.record_failure("disk_full", "still full")
        cooldowns.append(b.current_cooldown)
    assert cooldowns == [20, 35, 35, 35]
    clock.now += 35
    assert b.admit() == "probe"
    assert b.record_success()
    assert b.current_cooldown == 10


def test_a_probe_that_tells_nothing_lets_the_next_copy_probe() -> None:
    b, clock = make()
    for _ in range(3):
        b.record_failure("disk_full", "x")
    clock.now += 10
    assert b.admit() == "probe"
    b.release_probe()
    assert b.admit() == "probe"


def test_late_failures_of_copies_started_before_the_pause_do_not_extend_it() -> None:
    b, clock = make()
    for _ in range(3):
        b.record_failure("disk_full", "x")
    opened = b.opened_at
    clock.now += 5
    assert not b.record_failure("disk_full", "late")
    assert b.opened_at == opened
