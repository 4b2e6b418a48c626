"""``spool dataset show``: one dataset's state, volume, copies and what it still lacks, and why.

Set-based on purpose: a dataset may hold 100,000 files and the answer must come within a second
(``bench/datasets.py``). Each figure is one grouped statement over the dataset's files (the
``files.dataset_id`` index, then each file's copies and locks by their ``file_id`` indexes);
only the listed examples of missing copies (a few) look up their file's last error one by one.
Looking up each copy's row is most of the cost, so the view walks the copies once; the copies
the rules want per endpoint (another walk, over the locks) only when asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, and_, exists, func, literal_column, or_, select

from common.catalogue import schema as s

d, f, r, ep, lk, rq = s.datasets, s.files, s.replicas, s.storage_endpoints, s.locks, s.requests

EXAMPLES = 20


@dataclass(frozen=True, slots=True)
class CopyCount:
    storage: str
    kind: str
    state: str
    copies: int
    bytes: int


@dataclass(frozen=True, slots=True)
class Wanted:
    """Copies the dataset's rules want on one endpoint (files locked there), and how many lack."""

    storage: str
    kind: str
    files: int
    missing: int
    missing_by_state: dict[str, int]  # the missing copy's replica state ("none": no row yet)


@dataclass(frozen=True, slots=True)
class MissingCopy:
    name: str
    storage: str
    state: str
    reason: str | None  # the file's last error, if it has one
    error: str | None


@dataclass(frozen=True, slots=True)
class DatasetView:
    name: str
    state: str
    created: datetime
    last_file: datetime | None
    closed_at: datetime | None
    closed_by: str | None
    completed_at: datetime | None
    archived_at: datetime | None
    deleted_at: datetime | None
    deleted_by: str | None
    files: int
    bytes: int
    without_copy: int  # files with no available copy anywhere
    copies: list[CopyCount]
    wanted: list[Wanted] | None  # asked for (``wanted=True``): another walk over the locks
    missing: list[MissingCopy]  # the first ``EXAMPLES`` missing copies, with their last error


def _live(now: datetime) -> Any:
    return or_(lk.c.expires.is_(None), lk.c.expires > now)


def dataset_view(conn: Connection, name: str, now: datetime, wanted: bool = False) -> DatasetView | None:
    """The view; ``wanted`` adds the copies the rules want per endpoint (the copies' states
    already say what is missing: placement writes a ``queued`` row with each lock, so a copy not
    ``available`` is one a rule asked for; this counts them from the locks, at about the cost of
    the rest of the view again)."""
    row = conn.execute(
        select(
            d.c.id, d.c.name, d.c.state, d.c.created, d.c.last_file, d.c.closed_at, d.c.closed_by,
            d.c.completed_at, d.c.archived_at, d.c.deleted_at, d.c.deleted_by,
        ).where(d.c.name == name)
    ).first()  # fmt: skip
    if row is None:
        return None
    dataset_id = row.id
    names = _endpoints(conn)
    files, size = conn.execute(
        select(func.count(), func.coalesce(func.sum(f.c.size), 0)).where(f.c.dataset_id == dataset_id)
    ).one()
    available = exists().where(r.c.file_id == f.c.id, r.c.state == "available")
    without = conn.scalar(select(func.count()).where(f.c.dataset_id == dataset_id, ~available))
    return DatasetView(
        row.name, row.state, row.created, row.last_file, row.closed_at, row.closed_by,
        row.completed_at, row.archived_at, row.deleted_at, row.deleted_by,
        int(files), int(size), int(without or 0),
        _copies(conn, dataset_id, names), _wanted(conn, dataset_id, now, names) if wanted else None,
        _missing(conn, dataset_id, now, names),
    )  # fmt: skip


def _endpoints(conn: Connection) -> dict[int, tuple[str, str]]:
    return {i: (n, k) for i, n, k in conn.execute(select(ep.c.id, ep.c.name, ep.c.kind))}


def _copies(conn: Connection, dataset_id: int, names: dict[int, tuple[str, str]]) -> list[CopyCount]:
    # Grouped by the endpoint's id (the replica row has it), named in Python: no join per copy.
    stmt = (
        select(r.c.storage_id, r.c.state, func.count(), func.coalesce(func.sum(f.c.size), 0))
        .select_from(f.join(r, r.c.file_id == f.c.id))
        .where(f.c.dataset_id == dataset_id)
        .group_by(r.c.storage_id, r.c.state)
    )
    rows = [CopyCount(*names[sid], st, int(c), int(b)) for sid, st, c, b in conn.execute(stmt)]
    return sorted(rows, key=lambda c: (c.storage, c.state))


def _wanted(
    conn: Connection, dataset_id: int, now: datetime, names: dict[int, tuple[str, str]]
) -> list[Wanted]:
    """Per endpoint and state of the copy there, the files a live lock wants there (counted once
    however many rules lock them: distinct files within one endpoint)."""
    copy = r.alias("copy")
    copy_state = func.coalesce(copy.c.state, literal_column("'none'"))
    stmt = (
        select(lk.c.storage_id, copy_state, func.count(func.distinct(lk.c.file_id)))
        .select_from(
            f.join(lk, lk.c.file_id == f.c.id).outerjoin(
                copy, and_(copy.c.file_id == lk.c.file_id, copy.c.storage_id == lk.c.storage_id)
            )
        )
        .where(f.c.dataset_id == dataset_id, _live(now))
        .group_by(lk.c.storage_id, copy_state)
    )
    per: dict[int, dict[str, int]] = {}
    for sid, state, count in conn.execute(stmt):
        per.setdefault(sid, {})[state] = int(count)
    out = []
    for sid, by_state in per.items():
        missing = {st: n for st, n in by_state.items() if st != "available"}
        out.append(Wanted(*names[sid], sum(by_state.values()), sum(missing.values()), missing))
    return sorted(out, key=lambda w: w.storage)


def _missing(
    conn: Connection, dataset_id: int, now: datetime, names: dict[int, tuple[str, str]]
) -> list[MissingCopy]:
    """The first missing copies in file order (the walk stops at ``EXAMPLES``), each with its
    file's last error."""
    copy = r.alias("copy")
    stmt = (
        select(f.c.id, f.c.name, lk.c.storage_id, func.coalesce(copy.c.state, literal_column("'none'")))
        .distinct()
        .select_from(
            f.join(lk, lk.c.file_id == f.c.id).outerjoin(
                copy, and_(copy.c.file_id == lk.c.file_id, copy.c.storage_id == lk.c.storage_id)
            )
        )
        .where(
            f.c.dataset_id == dataset_id, _live(now), or_(copy.c.state.is_(None), copy.c.state != "available")
        )
        .order_by(f.c.id, lk.c.storage_id)
        .limit(EXAMPLES)
    )
    out = []
    for _, name, sid, state in conn.execute(stmt).all():
        last = conn.execute(
            select(rq.c.reason, rq.c.error)
            .where(rq.c.name == name, rq.c.reason.is_not(None))
            .order_by(rq.c.updated.desc())
            .limit(1)
        ).first()
        out.append(MissingCopy(name, names[sid][0], state, *(last or (None, None))))
    return out
