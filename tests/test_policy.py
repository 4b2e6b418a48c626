"""Replication policy decisions: which files a rule selects, which endpoints it names, placement."""

from __future__ import annotations

import pytest

from common.catalogue.filters import parse_filter
from common.catalogue.policy import (
    EndpointExpression,
    PolicyError,
    Rule,
    check_rule,
    endpoint_attributes,
    filter_matches,
    place,
    plan,
)

ENDPOINTS = {
    "disk1": endpoint_attributes("disk1", "disk", {"site": "LOCAL"}),
    "pic1": endpoint_attributes("pic1", "disk", {"site": "PIC"}),
    "pic2": endpoint_attributes("pic2", "disk", {"site": "PIC"}),
    "cnaf": endpoint_attributes("cnaf", "disk", {"site": "CNAF", "tier": "1"}),
    "tape1": endpoint_attributes("tape1", "tape", {"site": "PIC"}),
}


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("pic1", ["pic1"]),
        ("site=PIC", ["pic1", "pic2", "tape1"]),
        ("site=PIC&kind=disk", ["pic1", "pic2"]),
        ("site=PIC & kind!=disk", ["tape1"]),
        ("site=CNAF|name=disk1", ["disk1", "cnaf"]),
        ("tier=1", ["cnaf"]),
        ("site=NOWHERE", []),
    ],
)
def test_endpoint_expressions_select_by_name_and_attributes(expr: str, expected: list[str]) -> None:
    assert EndpointExpression.parse(expr).select(ENDPOINTS) == expected


@pytest.mark.parametrize("bad", ["", "site=", "=PIC", "site=PIC&&kind=disk", "a b"])
def test_unreadable_endpoint_expressions_are_refused(bad: str) -> None:
    with pytest.raises(PolicyError):
        EndpointExpression.parse(bad)


def test_rule_naming_an_unknown_endpoint_is_refused_with_the_known_ones() -> None:
    with pytest.raises(PolicyError, match=r"matches no endpoint \(known: disk1, pic1"):
        check_rule(Rule("r1", endpoints="nosuch", datasets=".*"), ENDPOINTS)
    with pytest.raises(PolicyError, match="asks for 3 copies but"):
        check_rule(Rule("r1", endpoints="site=PIC&kind=disk", copies=3, datasets=".*"), ENDPOINTS)
    assert check_rule(Rule("r1", endpoints="site=PIC&kind=disk", copies=2, datasets=".*"), ENDPOINTS) == [
        "pic1",
        "pic2",
    ]


def test_rule_needs_a_selection_and_valid_parts() -> None:
    with pytest.raises(PolicyError, match="dataset pattern and / or metadata"):
        Rule("r", endpoints="pic1")
    with pytest.raises(PolicyError, match="dataset pattern"):
        Rule("r", endpoints="pic1", datasets="(")
    with pytest.raises(PolicyError, match="not a metadata filter"):
        Rule("r", endpoints="pic1", metadata=("???",))
    with pytest.raises(PolicyError, match="priority"):
        Rule("r", endpoints="pic1", datasets=".*", priority=12)


def test_rule_selects_by_dataset_pattern_and_metadata() -> None:
    rule = Rule(
        "r", endpoints="pic1", datasets=r"lst1\..*\.dl0", metadata=("run>=100", "telescope=LST1,LST2")
    )
    assert rule.selects("lst1.20261124.run000100.dl0", {"run": 100, "telescope": "LST1"})
    assert not rule.selects("lst1.20261124.run000100.dl1", {"run": 100, "telescope": "LST1"})
    assert not rule.selects("lst1.20261124.run000100.dl0", {"run": 99, "telescope": "LST1"})
    assert not rule.selects("lst1.20261124.run000100.dl0", {"run": 100})  # lacks the key


@pytest.mark.parametrize(
    ("text", "meta", "expected"),
    [
        ("run=7", {"run": 7}, True),
        ("run=7", {"run": "7"}, True),  # a string reading as a number compares as one
        ("run<7", {"run": 6.5}, True),
        ("run>7", {"run": 7}, False),
        ("mode!=calib", {"mode": "data"}, True),
        ("mode!=calib", {}, False),
        ("mode=a,b", {"mode": "b"}, True),
        ("mode!=a,b", {"mode": "c"}, True),
        ("ok=true", {"ok": True}, True),
        ("run=7", {"run": "seven"}, False),
    ],
)
def test_metadata_filters_evaluate_like_the_catalogue(text: str, meta: dict, expected: bool) -> None:  # type: ignore[type-arg]
    assert filter_matches(parse_filter(text), meta) is expected


def test_placement_is_deterministic_and_spreads_files() -> None:
    rule = Rule("r", endpoints="site=PIC&kind=disk", datasets=".*")
    chosen = [place(rule, f"f{i}", ["pic1", "pic2"], set())[0] for i in range(200)]
    assert chosen == [place(rule, f"f{i}", ["pic1", "pic2"], set())[0] for i in range(200)]
    assert 60 < chosen.count("pic1") < 140


def test_placement_reuses_an_endpoint_that_already_holds_the_file() -> None:
    rule = Rule("r", endpoints="site=PIC&kind=disk", datasets=".*")
    for i in range(50):
        assert place(rule, f"f{i}", ["pic1", "pic2"], {"pic2"}) == ["pic2"]


def test_overlapping_rules_share_copies_instead_of_adding() -> None:
    a = Rule("a", endpoints="site=PIC", datasets=".*")
    b = Rule("b", endpoints="site=PIC&kind=disk", datasets=".*")
    c = Rule("c", endpoints="kind=tape", datasets=".*")
    for i in range(50):
        placements = plan([a, b, c], ENDPOINTS, file_name=f"f{i}", dataset="d", metadata={}, have={"disk1"})
        storages = {p.storage for p in placements}
        # b's copy is on a PIC disk, and a (any PIC endpoint) reuses it or the tape copy c wants.
        assert len(storages) <= 2
        assert any(s in ("pic1", "pic2") for s in storages) and "tape1" in storages


def test_a_rule_already_satisfied_by_the_ingest_copy_wants_nothing_new() -> None:
    rule = Rule("r", endpoints="kind=disk", datasets=".*")
    placements = plan([rule], ENDPOINTS, file_name="f", dataset="d", metadata={}, have={"disk1"})
    assert [p.storage for p in placements] == ["disk1"]
