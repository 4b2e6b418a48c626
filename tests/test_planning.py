"""The copy decisions of rule placement (``common.catalogue.planning``), without a database."""

from __future__ import annotations

from common.catalogue.planning import BatchPlan, Wanted, plan_batch
from common.catalogue.policy import Rule, endpoint_attributes, rank_rules

ENDPOINTS = {
    "disk1": endpoint_attributes("disk1", "disk", {"site": "CERN"}),
    "disk2": endpoint_attributes("disk2", "disk", {"site": "PIC"}),
    "tape1": endpoint_attributes("tape1", "tape", {"site": "CERN"}),
}
SIDS = {"disk1": 11, "disk2": 12, "tape1": 13}
KINDS = {"disk1": "disk", "disk2": "disk", "tape1": "tape"}
TO_DISK2 = Rule("to-disk2", endpoints="disk2", datasets="raw", priority=5, lifetime=60.0)
TO_TAPE = Rule("to-tape", endpoints="tape1", datasets="raw")


def plan(
    states: dict[int, dict[str, str]],
    *rules: Rule,
    names: tuple[str, ...] = ("f1",),
    locked: dict[int, set[str]] | None = None,
    dataset: str = "raw",
) -> BatchPlan:
    return plan_batch(
        [(name, dataset, {}) for name in names],
        rank_rules(rules or (TO_DISK2,), ENDPOINTS),
        file_ids={"f1": 1, "f2": 2},
        states=states,
        locked=locked or {},
        storage_ids=SIDS,
        kinds=KINDS,
        expires=lambda lifetime: f"in {lifetime:g} s",
    )


def test_a_file_with_no_copy_there_gets_a_lock_a_new_queued_copy_and_a_request() -> None:
    states = {1: {"disk1": "available"}}
    p = plan(states)
    assert p.locks == [("to-disk2", 1, 12, "in 60 s")]
    assert p.create == [(1, 12, "f1", 5)] and p.requeue == []
    assert p.wanted == [[Wanted("f1", "disk2", "disk", 5, "to-disk2")]]
    assert states == {1: {"disk1": "available", "disk2": "queued"}}


def test_a_bad_or_failed_copy_goes_back_to_the_queue_and_is_asked_for() -> None:
    for state in ("bad", "failed"):
        p = plan({1: {"disk2": state}})
        assert p.requeue == [(1, 12, 5)] and p.create == []
        assert [w.storage for w in p.wanted[0]] == ["disk2"]


def test_a_queued_copy_is_asked_for_again_without_a_new_row() -> None:
    p = plan({1: {"disk2": "queued"}})
    assert len(p.locks) == 1 and p.create == p.requeue == []
    assert [w.storage for w in p.wanted[0]] == ["disk2"]


def test_present_parked_or_deleting_copies_hold_a_lock_and_ask_for_nothing() -> None:
    for state in ("available", "waiting", "deleting"):
        states = {1: {"disk2": state}}
        p = plan(states)
        assert p.locks == [("to-disk2", 1, 12, "in 60 s")]
        assert p.create == p.requeue == [] and p.wanted == [[]]
        assert states == {1: {"disk2": state}}


def test_a_file_the_rules_do_not_select_or_without_a_row_plans_nothing() -> None:
    assert plan({}, TO_DISK2, TO_TAPE, dataset="calib") == BatchPlan([], [], [], [[]])
    assert plan({}, names=("unknown",)) == BatchPlan([], [], [], [[]])


def test_each_rule_places_its_own_copy_a_rule_without_lifetime_holds_forever() -> None:
    p = plan({}, TO_DISK2, TO_TAPE)
    assert sorted(p.locks) == [("to-disk2", 1, 12, "in 60 s"), ("to-tape", 1, 13, None)]
    assert sorted(w.storage for w in p.wanted[0]) == ["disk2", "tape1"]


def test_two_rules_sharing_an_endpoint_take_two_locks_and_ask_once() -> None:
    also = Rule("also-disk2", endpoints="site=PIC", datasets="raw", priority=2)
    p = plan({1: {"disk2": "bad"}}, TO_DISK2, also, locked={1: {"disk2"}})
    assert sorted(lk[0] for lk in p.locks) == ["also-disk2", "to-disk2"]
    assert p.requeue == [(1, 12, 5)] and len(p.wanted[0]) == 1


def test_a_locked_endpoint_counts_as_present_when_choosing_among_several() -> None:
    anywhere = Rule("one-disk", endpoints="kind=disk", datasets="raw")
    p = plan({}, anywhere, locked={1: {"disk1"}})
    assert [lk[2] for lk in p.locks] == [11]  # shares the endpoint another rule's lock holds


def test_a_name_twice_in_a_batch_is_planned_against_what_the_first_left() -> None:
    p = plan({}, names=("f1", "f1", "f2"))
    assert p.create == [(1, 12, "f1", 5), (2, 12, "f2", 5)]  # one new row for f1, not two
    assert [len(w) for w in p.wanted] == [1, 1, 1]  # f1 asked for twice (queued), as a redelivery is


def test_a_lock_expiry_is_computed_once_per_lifetime() -> None:
    asked: list[float] = []
    plan_batch(
        [("f1", "raw", {}), ("f2", "raw", {})],
        rank_rules([TO_DISK2], ENDPOINTS),
        file_ids={"f1": 1, "f2": 2},
        states={},
        locked={},
        storage_ids=SIDS,
        kinds=KINDS,
        expires=lambda lifetime: asked.append(lifetime) or lifetime,
    )
    assert asked == [60.0]
