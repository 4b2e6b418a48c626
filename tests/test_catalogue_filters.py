"""Parsing metadata filters and validating what ingest asks the catalogue to store (no database)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from common.catalogue import IngestRecord, MetaFilter, check_metadata, parse_filter
from common.catalogue.filters import typed_value
from tests.catalogue_fixtures import rec


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("run>=12000", MetaFilter("run", ">=", (12000,))),
        ("run == 5", MetaFilter("run", "=", (5,))),
        ("energy<1.5e3", MetaFilter("energy", "<", (1500.0,))),
        ("tel=LST1", MetaFilter("tel", "=", ("LST1",))),
        ("tel!=LST1", MetaFilter("tel", "!=", ("LST1",))),
        ("tel=LST1,LST2, 3", MetaFilter("tel", "in", ("LST1", "LST2", 3))),
        ("tel!=a,b", MetaFilter("tel", "not in", ("a", "b"))),
        ('run="012"', MetaFilter("run", "=", ("012",))),
        ("note='a,b'", MetaFilter("note", "=", ("a,b",))),
        ("x>-2", MetaFilter("x", ">", (-2,))),
        ("x=nan", MetaFilter("x", "=", ("nan",))),  # not a finite number: a string
        ("x=1_000", MetaFilter("x", "=", ("1_000",))),
        ("obs.mode<=b", MetaFilter("obs.mode", "<=", ("b",))),
    ],
)
def test_parse_filter(text: str, expected: MetaFilter) -> None:
    assert parse_filter(text) == expected


@pytest.mark.parametrize("text", ["run", "=5", "run=", "run>=", "run=1,,2", "a b=1"])
def test_malformed_filters_are_refused_with_a_reason(text: str) -> None:
    with pytest.raises(ValueError):
        parse_filter(text)


def test_filter_prints_back_as_typed() -> None:
    assert str(parse_filter("tel=LST1,LST2")) == "tel=LST1,LST2"
    assert str(parse_filter("run>=3")) == "run>=3"


@pytest.mark.parametrize(
    ("value", "stored"),
    [
        (12, (12.0, 12, None)),
        (1.5, (1.5, None, None)),
        ("LST1", (None, None, "LST1")),
        ("0042", (42.0, 42, "0042")),
        (True, (1.0, 1, "true")),
        (None, (None, None, None)),
    ],
)
def test_typed_value_columns(value: object, stored: tuple[object, ...]) -> None:
    assert typed_value(value) == stored  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "metadata",
    [
        {"x" * 200: 1},
        {"": 1},
        {"big": 2**64},
        {"nan": float("nan")},
        {"long": "y" * 600},
    ],
)
def test_metadata_the_catalogue_cannot_index_is_rejected_not_truncated(metadata: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError):
        check_metadata(metadata)
    with pytest.raises(ValidationError):
        rec("a", metadata=metadata)


def test_ingest_record_normalises_adler32_and_drops_repeated_parents() -> None:
    r = rec("a", adler32="ABC", parents=["p", "q", "p"])
    assert r.adler32 == "00000abc"
    assert r.parents == ["p", "q"]
    with pytest.raises(ValidationError):
        rec("a", adler32="xyz")
    with pytest.raises(ValidationError):
        IngestRecord(event_id="e", name="a", dataset="d", size=-1, adler32="1", storage="s", pfn="p")
