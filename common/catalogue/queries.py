"""Read-only questions, DIRAC-catalogue style: is it a file, its metadata, replicas, provenance.

Each function takes an open connection so the facade decides transaction scope; none writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import ColumnElement, Integer, Select, and_, func, literal_column, select
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from common.catalogue import find
from common.catalogue import schema as s
from common.catalogue.filters import MetaFilter
from common.catalogue.models import (
    Counts,
    DatasetInfo,
    EndpointInfo,
    EventInfo,
    FileInfo,
    FileView,
    Relative,
    ReplicaInfo,
    RequestInfo,
)
from common.catalogue.sql import chunks

f, d, r, ep, rq, pv = s.files, s.datasets, s.replicas, s.storage_endpoints, s.requests, s.provenance

_FILE_COLS = (f.c.name, d.c.name, f.c.size, f.c.adler32, f.c.created, f.c.sha256)
ERROR_STATES = ("retrying", "failed")


def _files() -> Select[Any]:
    return select(*_FILE_COLS).join(d, d.c.id == f.c.dataset_id)


def _file_info(row: Sequence[Any]) -> FileInfo:
    return FileInfo(row[0], row[1], row[2], row[3], row[4], row[5])


def _request_info(row: Row[Any]) -> RequestInfo:
    return RequestInfo(
        row.id, row.kind, row.state, row.name, row.path, row.dataset, row.attempts,
        row.reason, row.error, row.created, row.updated,
    )  # fmt: skip


def name_prefix(conn: AsyncConnection, prefix: str) -> ColumnElement[bool]:
    """Case-sensitive "name starts with" that can use the unique index on ``files.name``.

    SQLite's LIKE ignores ASCII case, so there a half-open range in its binary collation is used;
    on PostgreSQL the column has the "C" collation, where LIKE is case-sensitive and indexable.
    """
    if conn.dialect.name == "sqlite":
        upper = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        return and_(f.c.name >= prefix, f.c.name < upper)
    return f.c.name.startswith(prefix, autoescape=True)


async def request_state(conn: AsyncConnection, ids: Sequence[str]) -> dict[str, RequestInfo]:
    out: dict[str, RequestInfo] = {}
    for part in chunks(list(dict.fromkeys(ids))):
        for row in await conn.execute(select(rq).where(rq.c.id.in_(part))):
            out[row.id] = _request_info(row)
    return out


async def last_error(conn: AsyncConnection, name: str) -> RequestInfo | None:
    stmt = (
        select(rq)
        .where(rq.c.name == name, rq.c.state.in_(ERROR_STATES))
        .order_by(rq.c.updated.desc())
        .limit(1)
    )
    row = (await conn.execute(stmt)).first()
    return _request_info(row) if row else None


async def show_file(conn: AsyncConnection, name: str) -> FileView | None:
    row = (await conn.execute(select(f.c.id, f.c.meta, *_FILE_COLS).join(d).where(f.c.name == name))).first()
    if row is None:
        return None
    fid = row[0]
    parents = (
        await conn.scalars(select(pv.c.parent_name).where(pv.c.child_id == fid).order_by(pv.c.parent_name))
    ).all()
    children = (
        await conn.scalars(select(f.c.name).join(pv, pv.c.child_id == f.c.id).where(pv.c.parent_name == name))
    ).all()
    reps = await conn.execute(
        select(
            ep.c.name,
            ep.c.kind,
            r.c.state,
            r.c.pfn,
            r.c.cartridge,
            r.c.fseq,
            r.c.created,
            r.c.updated,
            r.c.member_offset,
        )
        .join(ep, ep.c.id == r.c.storage_id)
        .where(r.c.file_id == fid)
        .order_by(ep.c.name)
    )
    return FileView(
        name=row.name,
        dataset=row[3],
        size=row.size,
        adler32=row.adler32,
        created=row.created,
        metadata=dict(row.meta or {}),
        parents=list(parents),
        children=sorted(children),
        replicas=[ReplicaInfo(*rep) for rep in reps],
        last_error=await last_error(conn, name),
        sha256=row.sha256,
    )


async def list_files(
    conn: AsyncConnection, *, dataset: str | None, prefix: str | None, limit: int, offset: int
) -> list[FileInfo]:
    stmt = _files()
    if dataset is not None:
        stmt = stmt.where(d.c.name == dataset)
    if prefix:
        stmt = stmt.where(name_prefix(conn, prefix))
    stmt = stmt.order_by(f.c.name).limit(limit).offset(offset)
    return [_file_info(row) for row in await conn.execute(stmt)]


async def find_files(
    conn: AsyncConnection, filters: Sequence[MetaFilter], *, dataset: str | None, limit: int
) -> list[FileInfo]:
    """Files by file and dataset metadata together (``common.catalogue.find``), by name."""
    rows = await find.find(conn, filters, dataset=dataset, limit=limit)
    return [FileInfo(row[2], row[3], row[4], row[5], row[6]) for row in rows]


async def list_datasets(conn: AsyncConnection, *, state: str | None = None) -> list[DatasetInfo]:
    per_ds = select(f.c.dataset_id, func.count().label("n"), func.sum(f.c.size).label("b"))
    if state is not None:  # count only the files of the datasets listed
        per_ds = per_ds.join(d, d.c.id == f.c.dataset_id).where(d.c.state == state)
    counted = per_ds.group_by(f.c.dataset_id).subquery()
    stmt = (
        select(d.c.name, d.c.state, d.c.created, counted.c.n, counted.c.b)
        .outerjoin(counted, counted.c.dataset_id == d.c.id)
        .order_by(d.c.name)
    )
    if state is not None:
        stmt = stmt.where(d.c.state == state)
    return [DatasetInfo(n, st, c, int(k or 0), int(b or 0)) for n, st, c, k, b in await conn.execute(stmt)]


async def relatives(conn: AsyncConnection, name: str, *, up: bool, max_depth: int) -> list[Relative]:
    """Transitive ancestors (``up``) or descendants, nearest depth first.

    The recursive CTE walks ``(name, depth)`` pairs with UNION (duplicates dropped) and stops at
    ``max_depth``, so a cycle in the provenance (bad input happens) ends instead of hanging.
    """
    one = literal_column("1", Integer)
    if up:
        base = select(pv.c.parent_name.label("name"), one.label("depth")).join(f, f.c.id == pv.c.child_id)
        walk = base.where(f.c.name == name).cte("walk", recursive=True)
        step = (
            select(pv.c.parent_name, walk.c.depth + 1)
            .select_from(walk.join(f, f.c.name == walk.c.name).join(pv, pv.c.child_id == f.c.id))
            .where(walk.c.depth < max_depth)
        )
    else:
        base = select(f.c.name.label("name"), one.label("depth")).join(pv, pv.c.child_id == f.c.id)
        walk = base.where(pv.c.parent_name == name).cte("walk", recursive=True)
        step = (
            select(f.c.name, walk.c.depth + 1)
            .select_from(walk.join(pv, pv.c.parent_name == walk.c.name).join(f, f.c.id == pv.c.child_id))
            .where(walk.c.depth < max_depth)
        )
    walk = walk.union(step)
    nearest = select(walk.c.name, func.min(walk.c.depth).label("depth")).group_by(walk.c.name).subquery()
    stmt = (
        select(nearest.c.name, nearest.c.depth, f.c.id.is_not(None))
        .outerjoin(f, f.c.name == nearest.c.name)
        .where(nearest.c.name != name)
        .order_by(nearest.c.depth, nearest.c.name)
    )
    return [Relative(n, int(depth), bool(known)) for n, depth, known in await conn.execute(stmt)]


async def history(conn: AsyncConnection, name: str) -> list[EventInfo]:
    e = s.events
    stmt = select(e).where(e.c.name == name).order_by(e.c.time, e.c.id)
    return [
        EventInfo(x.id, x.name, x.time, x.daemon, x.type, x.outcome, x.attempt, x.storage, x.detail)
        for x in await conn.execute(stmt)
    ]


async def requests_in(conn: AsyncConnection, states: Sequence[str], limit: int) -> list[RequestInfo]:
    stmt = select(rq).where(rq.c.state.in_(states)).order_by(rq.c.updated.desc()).limit(limit)
    return [_request_info(row) for row in await conn.execute(stmt)]


async def endpoints(conn: AsyncConnection) -> list[EndpointInfo]:
    rows = await conn.execute(
        select(
            ep.c.name, ep.c.kind, ep.c.backend, ep.c.root, ep.c.attributes, ep.c.state, ep.c.updated,
            ep.c.health, ep.c.health_reason, ep.c.health_since,
        )
        .order_by(ep.c.id)
    )  # fmt: skip
    return [EndpointInfo(**row._mapping) for row in rows]


async def counts(conn: AsyncConnection) -> Counts:
    n_files, n_bytes = (await conn.execute(select(func.count(), func.coalesce(func.sum(f.c.size), 0)))).one()
    n_datasets = await conn.scalar(select(func.count()).select_from(d))
    by_replica = await conn.execute(select(r.c.state, func.count()).group_by(r.c.state))
    by_request = await conn.execute(select(rq.c.state, func.count()).group_by(rq.c.state))
    return Counts(
        files=int(n_files),
        bytes=int(n_bytes),
        datasets=int(n_datasets or 0),
        replicas={st: int(n) for st, n in by_replica},
        requests={st: int(n) for st, n in by_request},
    )
