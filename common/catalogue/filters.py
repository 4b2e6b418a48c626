"""Metadata filters: ``run>=12000``, ``telescope=LST1,LST2``, ``mode!=calib``.

A value that reads as a number compares numerically, anything else as a string; quoting a value
(``run="012"``) forces a string and turns off the comma list. ``key=a,b`` means *in*, ``key!=a,b``
*not in*. A filter only matches files that have the key: ``!=`` means "has the key with another
value", not "lacks it".

Storage mirrors the parsing (see ``typed_value``): every number, and every string that reads as a
number, fills ``value_num`` (double precision); integers also fill ``value_int`` so equality stays
exact beyond 2**53 (nanosecond timestamps); strings and booleans fill ``value_str``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from sqlalchemy import ColumnElement, Table, and_, false, or_, select

from common.catalogue.schema import file_metadata as fm
from common.messages import MetaValue

Op = Literal["=", "!=", "<", "<=", ">", ">=", "in", "not in"]
Scalar = str | int | float

# Linear by construction: the value is everything after the operator, stripped in code. A lazy
# value group followed by ``\s*`` backtracked quadratically on spaces inside a value (30,000
# characters: 13 s with the GIL held).
_FILTER_RE = re.compile(r"\s*([^=!<>\s]+)\s*(==|!=|<=|>=|=|<|>)(.*)", re.DOTALL)
MAX_FILTER_LENGTH = 4096  # a filter is operator input (spool find, rules): refused beyond this
_NUMBER_RE = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_INT_RE = re.compile(r"[+-]?\d+")
_EXACT_FLOAT = 2**53  # beyond this a double no longer holds every integer
_INT64 = 2**63


def as_number(text: str) -> int | float | None:
    """The number a string spells (plain decimal or exponent notation), else None."""
    if _INT_RE.fullmatch(text):
        n = int(text)
        return n if -_INT64 <= n < _INT64 else float(n)
    if _NUMBER_RE.fullmatch(text):
        f = float(text)
        return f if math.isfinite(f) else None
    return None


def typed_value(value: MetaValue) -> tuple[float | None, int | None, str | None]:
    """``(value_num, value_int, value_str)`` stored for one metadata value."""
    if value is None:
        return None, None, None
    if isinstance(value, bool):
        return float(value), int(value), "true" if value else "false"
    if isinstance(value, int):
        return float(value), value, None
    if isinstance(value, float):
        return value, None, None
    num = as_number(value)
    if num is None:
        return None, None, value
    return float(num), num if isinstance(num, int) else None, value


@dataclass(frozen=True, slots=True)
class MetaFilter:
    key: str
    op: Op
    values: tuple[Scalar, ...]

    def __str__(self) -> str:
        shown = ",".join(str(v) for v in self.values)
        op = {"in": "=", "not in": "!="}.get(self.op, self.op)
        return f"{self.key}{op}{shown}"


def _unquote(text: str) -> str | None:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    return None


def _scalar(text: str) -> Scalar:
    quoted = _unquote(text)
    if quoted is not None:
        return quoted
    num = as_number(text)
    return text if num is None else num


def parse_filter(text: str) -> MetaFilter:
    """Parse ``key<op>value``; raise ``ValueError`` with the reason on anything else."""
    if len(text) > MAX_FILTER_LENGTH:
        raise ValueError(f"metadata filter {text[:40]!r}... is longer than {MAX_FILTER_LENGTH} characters")
    m = _FILTER_RE.fullmatch(text)
    if not m:
        raise ValueError(f"not a metadata filter: {text!r} (expected key=value, key>=value, key=a,b ...)")
    key, op, raw = m.group(1), m.group(2), m.group(3).strip()
    if raw == "":
        raise ValueError(f'{text!r}: missing value (use {key}="" for an empty string)')
    if op == "==":
        op = "="
    if op in ("=", "!=") and _unquote(raw) is None and "," in raw:
        items = [p.strip() for p in raw.split(",")]
        if any(not p for p in items):
            raise ValueError(f"{text!r}: empty item in list")
        return MetaFilter(key, "in" if op == "=" else "not in", tuple(_scalar(p) for p in items))
    return MetaFilter(key, op, (_scalar(raw),))  # type: ignore[arg-type]


def column_for(value: Scalar, t: Table = fm) -> tuple[ColumnElement[object], Scalar]:
    if isinstance(value, bool):
        return t.c.value_str, "true" if value else "false"
    if isinstance(value, int):
        if abs(value) > _EXACT_FLOAT:
            return t.c.value_int, value
        return t.c.value_num, float(value)
    if isinstance(value, float):
        return t.c.value_num, value
    return t.c.value_str, value


def value_condition(f: MetaFilter, t: Table = fm) -> ColumnElement[bool]:
    """The filter's comparison on the typed columns of ``t`` (``file_metadata`` or
    ``dataset_metadata``: the same shape)."""
    if f.op in ("in", "not in"):
        groups: dict[str, tuple[ColumnElement[object], list[Scalar]]] = {}
        for v in f.values:
            col, bound = column_for(v, t)
            groups.setdefault(col.key or "", (col, []))[1].append(bound)
        if f.op == "in":
            return or_(false(), *(col.in_(vals) for col, vals in groups.values()))
        return and_(*(or_(col.is_(None), col.not_in(vals)) for col, vals in groups.values()))
    col, v = column_for(f.values[0], t)
    match f.op:
        case "=":
            return col == v
        case "!=":
            return or_(col.is_(None), col != v)
        case "<":
            return col < v
        case "<=":
            return col <= v
        case ">":
            return col > v
        case ">=":
            return col >= v
    raise ValueError(f"unknown operator {f.op!r}")


def condition(f: MetaFilter, file_id: ColumnElement[int]) -> ColumnElement[bool]:
    """``file_id IN (files whose metadata satisfies f)``, index-friendly on (key, value_*)."""
    if not f.values:
        raise ValueError(f"filter on {f.key!r} has no value")
    sub = select(fm.c.file_id).where(fm.c.key == f.key, value_condition(f))
    return file_id.in_(sub)


def conditions(filters: Sequence[MetaFilter], file_id: ColumnElement[int]) -> list[ColumnElement[bool]]:
    return [condition(f, file_id) for f in filters]
