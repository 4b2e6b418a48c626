"""Metadata after ingest: setting and removing a file's or a dataset's metadata, its history, and
the list of fields in use.

A change (``metadata.set`` from the bus, ``spool meta set|unset``) runs as one transaction: the
typed rows (``file_metadata`` / ``dataset_metadata``) and, for a file, the JSON kept for display
(``files.meta``) are rewritten for the keys it names, one history row is added (``events`` for a
file, ``dataset_events`` for a dataset) and the change's id is recorded ``done`` in ``requests``
(kind ``metadata``), and a ``metadata.changed`` event is queued in the outbox (the replicator
places a changed file by the rules again). A redelivered change finds its id done and changes
nothing (no second history row); an id already used by another request is refused (``id_conflict``).

A dataset's metadata lives in its typed rows only; the value shown is read back from them
(``stored_value``): ``typed_value`` fills the columns so that every value type is told apart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import Connection, Table, and_, case, delete, func, insert, select, update

from common import limits
from common.catalogue import outbox
from common.catalogue import schema as s
from common.catalogue.filters import typed_value
from common.catalogue.models import check_metadata
from common.catalogue.sql import check_fits, insert_ignore_sync, utcnow
from common.messages import MetadataChanged, MetaValue, fact_id

Scope = Literal["file", "dataset"]
ChangeOutcome = Literal["changed", "duplicate"]
KIND = "metadata"


_VALUE_ROW = ("key", "value_num", "value_int", "value_str")
_DATASET_ROW = ("dataset_id", *_VALUE_ROW)


class UnknownTarget(KeyError):
    """The file or dataset a change names is not in the catalogue."""


class IdConflict(ValueError):
    """The change's id was already used by another request."""


class TooMuchMetadata(ValueError):
    """After the change, the target's metadata would exceed the bounds of one file's (keys, bytes)."""


@dataclass(frozen=True, slots=True)
class MetadataChange:
    """One change: ``set`` these keys, remove ``unset`` ones, on a file or a dataset."""

    id: str
    scope: Scope
    target: str
    set: Mapping[str, MetaValue]
    unset: Sequence[str]
    daemon: str  # who applied it: ingest (metadata.set) or cli
    source: str | None = None  # the publisher's CloudEvents source


@dataclass(frozen=True, slots=True)
class FieldUse:
    """One metadata key in use, per scope and value type, with how many files / datasets have it."""

    scope: Scope
    key: str
    type: str  # int | float | str | bool | null
    count: int


def stored_value(num: float | None, exact: int | None, text: str | None) -> MetaValue:
    """The value ``typed_value`` stored as these columns."""
    if text is not None:
        if exact in (0, 1) and text == ("true" if exact else "false") and num == float(exact):
            return bool(exact)
        return text
    if exact is not None:
        return exact
    return num


def _type_of(t: Table) -> Any:
    """SQL spelling of ``stored_value``'s choice (the type of each stored value)."""
    return case(
        (and_(t.c.value_str.in_(("true", "false")), t.c.value_int.in_((0, 1))), "bool"),
        (t.c.value_str.is_not(None), "str"),
        (t.c.value_int.is_not(None), "int"),
        (t.c.value_num.is_not(None), "float"),
        else_="null",
    )


def dataset_values(conn: Connection, dataset_ids: Sequence[int]) -> dict[int, dict[str, MetaValue]]:
    dm = s.dataset_metadata
    out: dict[int, dict[str, MetaValue]] = {i: {} for i in dataset_ids}
    if not dataset_ids:
        return out
    rows = conn.execute(
        select(dm.c.dataset_id, dm.c.key, dm.c.value_num, dm.c.value_int, dm.c.value_str)
        .where(dm.c.dataset_id.in_(list(dataset_ids)))
        .order_by(dm.c.dataset_id, dm.c.key)
    )
    for did, key, num, exact, text in rows:
        out[did][key] = stored_value(num, exact, text)
    return out


def of_dataset(conn: Connection, name: str) -> dict[str, MetaValue] | None:
    did = conn.scalar(select(s.datasets.c.id).where(s.datasets.c.name == name))
    return None if did is None else dataset_values(conn, [did])[did]


def add_dataset_metadata(conn: Connection, values: Mapping[int, Mapping[str, MetaValue]]) -> None:
    """Metadata of datasets being created (the fields of their names): a row already there (a
    concurrent creator's, the same values) is kept."""
    rows = [
        dict(zip(_DATASET_ROW, (did, k, *typed_value(v)), strict=True))
        for did, meta in values.items()
        for k, v in meta.items()
    ]
    insert_ignore_sync(conn, s.dataset_metadata, rows, ["dataset_id", "key"])


def _prior(conn: Connection, change: MetadataChange) -> ChangeOutcome | None:
    rq = s.requests
    row = conn.execute(
        select(rq.c.kind, rq.c.state, rq.c.name, rq.c.dataset).where(rq.c.id == change.id)
    ).first()
    if row is None:
        return None
    target = row.name if change.scope == "file" else row.dataset
    if row.kind != KIND or target != change.target:
        raise IdConflict(f"change id {change.id!r} was already used for another request")
    return "duplicate"


def _merged(current: Mapping[str, MetaValue], change: MetadataChange) -> dict[str, MetaValue]:
    merged = {k: v for k, v in current.items() if k not in change.unset}
    merged.update(change.set)
    try:
        check_metadata(merged)
        if len(merged) > limits.MAX_META_KEYS:
            raise ValueError(f"would have {len(merged)} keys, at most {limits.MAX_META_KEYS}")
        size = limits.json_size(merged)
        if size > limits.MAX_META_BYTES:
            raise ValueError(f"would be {size} bytes as JSON, at most {limits.MAX_META_BYTES}")
    except ValueError as exc:
        raise TooMuchMetadata(f"{change.scope} {change.target!r}: metadata {exc}") from None
    return merged


def _rewrite_rows(conn: Connection, table: Table, owner: str, owner_id: int, change: MetadataChange) -> None:
    keys = sorted({*change.set, *change.unset})
    conn.execute(delete(table).where(table.c[owner] == owner_id, table.c.key.in_(keys)))
    rows = [
        dict(zip((owner, *_VALUE_ROW), (owner_id, k, *typed_value(v)), strict=True))
        for k, v in change.set.items()
    ]
    if rows:
        conn.execute(insert(table), rows)


def apply(conn: Connection, change: MetadataChange) -> ChangeOutcome:
    """Apply one change (see the module docstring); ``UnknownTarget``, ``IdConflict``,
    ``TooMuchMetadata`` refuse it with nothing written."""
    if _prior(conn, change) is not None:
        return "duplicate"
    now = utcnow()
    detail: dict[str, Any] = {"request_id": change.id, "set": dict(change.set), "unset": list(change.unset)}
    if change.source:
        detail["source"] = change.source
    if change.scope == "file":
        f = s.files
        row = conn.execute(
            select(f.c.id, f.c.meta, s.datasets.c.name.label("dataset"))
            .join(s.datasets, s.datasets.c.id == f.c.dataset_id)
            .where(f.c.name == change.target)
        ).first()
        if row is None:
            raise UnknownTarget(f"no file named {change.target!r}")
        dataset = row.dataset
        merged = _merged(dict(row.meta or {}), change)
        conn.execute(update(f).where(f.c.id == row.id).values(meta=merged))
        _rewrite_rows(conn, s.file_metadata, "file_id", row.id, change)
        event = {"name": change.target, "daemon": change.daemon, "type": "metadata.set", "outcome": "ok",
                 "attempt": 1, "storage": None, "detail": detail, "time": now}  # fmt: skip
        check_fits(s.events, event)
        conn.execute(insert(s.events), [event])
    else:
        d = s.datasets
        did = conn.scalar(select(d.c.id).where(d.c.name == change.target))
        if did is None:
            raise UnknownTarget(f"no dataset named {change.target!r}")
        dataset = change.target
        _merged(dataset_values(conn, [did])[did], change)
        _rewrite_rows(conn, s.dataset_metadata, "dataset_id", did, change)
        event = {"dataset": change.target, "daemon": change.daemon, "type": "metadata.set", "outcome": "ok",
                 "detail": detail, "time": now}  # fmt: skip
        check_fits(s.dataset_events, event)
        conn.execute(insert(s.dataset_events), [event])
    request = {
        "id": change.id, "kind": KIND, "state": "done", "attempts": 1, "reason": None, "error": None,
        "name": change.target if change.scope == "file" else None, "path": None,
        "dataset": change.target if change.scope == "dataset" else None, "created": now, "updated": now,
    }  # fmt: skip
    check_fits(s.requests, request)
    conn.execute(insert(s.requests), [request])
    # The fact, for the replicator (a rule's metadata filters may select the file now) and for
    # anyone listening: published by the outbox relay, once, whichever path made the change.
    changed = MetadataChanged(
        id=fact_id("metadata.changed", change.id), request_id=change.id, dataset=dataset,
        file=change.target if change.scope == "file" else None, keys=[*change.set, *change.unset],
    )  # fmt: skip
    outbox.add(conn, [changed])
    return "changed"


def fields(conn: Connection) -> list[FieldUse]:
    """Every metadata key in use, per scope and type, with its count (a scan of both tables)."""
    out: list[FieldUse] = []
    for scope, table in (("file", s.file_metadata), ("dataset", s.dataset_metadata)):
        kind = _type_of(table).label("type")
        stmt = select(table.c.key, kind, func.count()).group_by(table.c.key, kind).order_by(table.c.key, kind)
        out += [FieldUse(scope, key, str(t), int(n)) for key, t, n in conn.execute(stmt)]  # type: ignore[arg-type]
    return out


def dataset_history(conn: Connection, name: str) -> list[dict[str, Any]]:
    e = s.dataset_events
    stmt = select(e.c.time, e.c.daemon, e.c.type, e.c.outcome, e.c.detail).where(e.c.dataset == name)
    return [dict(row._mapping) for row in conn.execute(stmt.order_by(e.c.time, e.c.id))]
