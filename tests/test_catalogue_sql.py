"""The driver-level helpers of ``common.catalogue.sql``: what they write equals what SQLAlchemy's
own processing writes, and the statement sizes they use stay few (no database needed)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from sqlalchemy.dialects.postgresql import asyncpg
from sqlalchemy.dialects.sqlite import pysqlite

from common.catalogue import schema as s
from common.catalogue.sql import (
    MAX_ROWS,
    _flat_json,
    _ladder,
    bind_processor,
    ignore_tail,
    json_processor,
    upsert_tail,
)

DIALECTS = [pysqlite.dialect(), asyncpg.dialect()]

FLAT: list[dict[str, Any]] = [
    {},
    {"run": 12345, "subrun": 0},
    {"big": 2**63 - 1, "small": -(2**63), "beyond": 10**30},
    {"f": 0.1, "g": -0.0, "h": 1e16, "i": 5e-324, "j": 1.7976931348623157e308, "k": 123456789.123456789},
    {"t": True, "f": False, "n": None},
    {
        "s": "",
        "u": "ünïcödé € 😀",
        "q": '"quoted"',
        "b": "back\\slash",
        "c": "\n\t\r\x00\x1f\x7f",
        "l": "\u2028",
    },
    {"ключ": "значение", "😀": "k", "": "empty key", 'a"b': 1},
    {"event_id": "ev-1", "path": "/landing/a", "source": None, "pfn": "/srv/disk1/a"},
]
NOT_FLAT: list[Any] = [
    {"nested": {"a": 1}},
    {"list": [1, 2]},
    {"nan": float("nan")},
    {"inf": float("inf")},
    {1: "int key"},
    [1, 2],
    None,
    "text",
]


@pytest.mark.parametrize("value", FLAT)
def test_flat_json_is_json_dumps_to_the_byte(value: dict[str, Any]) -> None:
    assert _flat_json(value) == json.dumps(value)


@pytest.mark.parametrize("value", NOT_FLAT[:5])
def test_flat_json_declines_what_it_does_not_cover(value: dict[Any, Any]) -> None:
    assert _flat_json(value) is None


@pytest.mark.parametrize("dialect", DIALECTS, ids=lambda d: d.name)
@pytest.mark.parametrize("column", [s.files.c.meta, s.events.c.detail], ids=str)
def test_json_processor_writes_what_the_column_processor_writes(column: Any, dialect: Any) -> None:
    fast, core = json_processor(column, dialect), bind_processor(column, dialect)
    assert fast is not core  # the shortcut is in use on both backends
    for value in FLAT + NOT_FLAT[:4]:
        assert fast(value) == core(value), value


def test_json_processor_falls_back_when_the_dialect_serialises_otherwise() -> None:
    dialect = pysqlite.dialect(json_serializer=lambda obj: json.dumps(obj, ensure_ascii=False))
    fast, core = json_processor(s.files.c.meta, dialect), bind_processor(s.files.c.meta, dialect)
    assert fast(FLAT[5]) == core(FLAT[5]) != json.dumps(FLAT[5])


@pytest.mark.parametrize("count", [0, 1, 2, 3, 100, 255, 256, 257, 511, 512, 513, 1300, 5000])
def test_ladder_adds_up_with_few_statement_sizes(count: int) -> None:
    sizes = list(_ladder(count))
    assert sum(sizes) == count
    assert all(0 < n <= MAX_ROWS and n & (n - 1) == 0 for n in sizes)  # powers of two
    assert len(set(sizes)) == len(sizes) - sizes.count(MAX_ROWS) + min(1, sizes.count(MAX_ROWS))


@pytest.mark.parametrize("dialect", DIALECTS, ids=lambda d: d.name)
def test_conflict_tails_read_the_same_on_both_backends(dialect: Any) -> None:
    tail = upsert_tail(
        dialect, ("file_id", "storage_id"), ("state", "pfn"), table=s.replicas, fill=("tombstone",)
    )
    assert tail == (
        " ON CONFLICT (file_id, storage_id) DO UPDATE SET state = excluded.state, pfn = excluded.pfn,"
        " tombstone = coalesce(replicas.tombstone, excluded.tombstone)"
    )
    assert ignore_tail(dialect, ("rule_id", "file_id")) == " ON CONFLICT (rule_id, file_id) DO NOTHING"
    with pytest.raises(TypeError, match="table"):
        upsert_tail(dialect, ("id",), (), fill=("tombstone",))
