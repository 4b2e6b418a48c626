"""The copy decisions of rule placement (``common.catalogue.planning``), without a database."""

from __future__ import annotations

from collections.abc import Sequence

from common.catalogue.planning import FilePlan, plan_file
from common.catalogue.policy import Placement, Rule, endpoint_attributes, rank_rules

ENDPOINTS = {
    "disk1": endpoint_attributes("disk1", "disk", {"site": "CERN"}),
    "disk2": endpoint_attributes("disk2", "disk", {"site": "PIC"}),
    "tape1": endpoint_attributes("tape1", "tape", {"site": "CERN"}),
}
TO_DISK2 = Rule("to-disk2", endpoints="disk2", datasets="raw", priority=5, lifetime=60.0)
TO_TAPE = Rule("to-tape", endpoints="tape1", datasets="raw")


def plan(
    states: dict[str, str], *rules: Rule, locked: frozenset[str] = frozenset(), dataset: str = "raw"
) -> FilePlan:
    ranked = rank_rules(rules or (TO_DISK2,), ENDPOINTS)
    return plan_file(ranked, name="f1", dataset=dataset, metadata={}, states=states, locked=locked)


def storages(placements: Sequence[Placement]) -> list[str]:
    return [p.storage for p in placements]


def test_a_file_with_no_copy_there_gets_a_new_queued_copy_and_asks_for_it() -> None:
    p = plan({"disk1": "available"})
    assert storages(p.locks) == storages(p.create) == storages(p.request) == ["disk2"]
    assert p.requeue == []
    assert p.states == {"disk1": "available", "disk2": "queued"}
    (lock,) = p.locks
    assert (lock.rule_id, lock.priority, lock.expires_in) == ("to-disk2", 5, 60.0)


def test_a_bad_or_failed_copy_goes_back_to_the_queue_and_is_asked_for() -> None:
    for state in ("bad", "failed"):
        p = plan({"disk2": state})
        assert storages(p.requeue) == storages(p.request) == ["disk2"]
        assert p.create == []
        assert p.states == {"disk2": "queued"}


def test_a_queued_copy_is_asked_for_again_without_a_new_row() -> None:
    p = plan({"disk2": "queued"})
    assert storages(p.locks) == storages(p.request) == ["disk2"]
    assert p.create == p.requeue == []


def test_present_parked_or_deleting_copies_hold_a_lock_and_ask_for_nothing() -> None:
    for state in ("available", "waiting", "deleting"):
        p = plan({"disk2": state})
        assert storages(p.locks) == ["disk2"]
        assert p.create == p.requeue == p.request == []
        assert p.states == {"disk2": state}


def test_unchanged_states_are_the_same_dict_and_changed_ones_a_new_one() -> None:
    states = {"disk2": "available"}
    assert plan(states).states is states
    before = {"disk1": "available"}
    assert plan(before).states is not before and before == {"disk1": "available"}


def test_a_file_the_rules_do_not_select_plans_nothing() -> None:
    p = plan({}, TO_DISK2, TO_TAPE, dataset="calib")
    assert p.locks == p.create == p.requeue == p.request == [] and p.states == {}


def test_each_rule_places_its_own_copy_and_each_is_asked_for_once() -> None:
    p = plan({}, TO_DISK2, TO_TAPE)
    assert sorted(storages(p.create)) == sorted(storages(p.request)) == ["disk2", "tape1"]
    assert p.states == {"disk2": "queued", "tape1": "queued"}


def test_two_rules_sharing_an_endpoint_take_two_locks_and_ask_once() -> None:
    also = Rule("also-disk2", endpoints="site=PIC", datasets="raw", priority=2)
    p = plan({"disk2": "bad"}, TO_DISK2, also, locked=frozenset({"disk2"}))
    assert sorted(lk.rule_id for lk in p.locks) == ["also-disk2", "to-disk2"]
    assert storages(p.requeue) == ["disk2"] and len(p.request) == 1


def test_a_locked_endpoint_counts_as_present_when_choosing_among_several() -> None:
    anywhere = Rule("one-disk", endpoints="kind=disk", datasets="raw")
    p = plan({}, anywhere, locked=frozenset({"disk1"}))
    assert storages(p.locks) == ["disk1"]  # shares the endpoint another rule's lock holds
    assert storages(p.create) == ["disk1"]  # whose copy row is missing: made
