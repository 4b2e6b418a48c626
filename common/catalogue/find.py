"""``spool find``: files by their own metadata and their dataset's, together.

Semantics of a filter's key (docs/operator-guide.md, "Finding files by metadata"):

- ``key``: the file's own value when the file has the key, else its dataset's. A file inherits its
  dataset's metadata (the fields of the dataset's name, what was set on the dataset) and may
  override a key with its own value;
- ``dataset.key``: the dataset's value only; ``file.key``: the file's own value only (also the
  way to a file key that itself starts with ``dataset.``).

Every filter must hold (AND). As for file metadata alone, a filter matches only where the key is
present (``!=`` means "has the key with another value").

How it stays fast (docs/benchmarks.md, "find over metadata"): a plain key is asked first whether
any dataset carries it and whether any file does (one index probe each); a key only files carry
is the plain file condition, one only datasets carry the plain dataset condition, and only a key
both carry needs the inheritance rule (file value, or the dataset's where the file lacks the key).
Conditions on file metadata are ``files.id IN (SELECT file_id ...)`` over the ``(key, value_*)``
indexes, each a set the database intersects; dataset conditions go through ``files.dataset_id``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import ColumnElement, and_, exists, func, literal, not_, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection

from common.catalogue import schema as s
from common.catalogue.filters import MetaFilter, value_condition
from common.catalogue.metadata import dataset_values
from common.catalogue.models import ReplicaInfo
from common.catalogue.sql import chunks
from common.messages import MetaValue

f, d, fm, dm = s.files, s.datasets, s.file_metadata, s.dataset_metadata
DATASET_PREFIX = "dataset."
FILE_PREFIX = "file."


@dataclass(frozen=True, slots=True)
class FoundFile:
    """A file ``spool find --json`` lists: with its metadata, its dataset's and its replicas."""

    name: str
    dataset: str
    size: int
    adler32: str
    created: Any
    metadata: dict[str, Any]
    dataset_metadata: dict[str, MetaValue]
    replicas: list[ReplicaInfo]


# A condition matching at most this many files drives the query (its set of ids, the others
# probed per file); when every condition matches more, files are walked in name order and each
# condition probed per file until ``limit`` match. Either way the work is bounded by about
# DRIVE_AT or limit / (the share of files that match) probes, never by every match of a broad
# condition (three broad conditions over 1,000,000 files were ~300,000 ids each, intersected).
DRIVE_AT = 20_000
PAGE = 10_000  # files read in name order at a time when no condition drives


@dataclass(frozen=True, slots=True)
class _Condition:
    """One filter as two equivalent SQL forms: a probe of the current file (``EXISTS`` over the
    primary keys), and, where it can be counted cheaply, the set of ids it selects (``driver``)."""

    probe: ColumnElement[bool]
    driver: ColumnElement[bool] | None = None
    matches: Any = None  # a SELECT of the files it matches, for counting up to DRIVE_AT


def _file_cond(flt: MetaFilter) -> _Condition:
    where = (fm.c.key == flt.key, value_condition(flt, fm))
    probe = exists().where(fm.c.file_id == f.c.id, *where)
    # Counted on the (key, value_*) index alone: selecting file_id would read each row (SQLite's
    # secondary indexes hold the rowid, not file_id), 20,000 reads for a broad condition.
    return _Condition(probe, f.c.id.in_(select(fm.c.file_id).where(*where)), select(literal(1)).where(*where))


def _dataset_probe(flt: MetaFilter) -> ColumnElement[bool]:
    return exists().where(dm.c.dataset_id == f.c.dataset_id, dm.c.key == flt.key, value_condition(flt, dm))


def _dataset_cond(flt: MetaFilter) -> _Condition:
    datasets = select(dm.c.dataset_id).where(dm.c.key == flt.key, value_condition(flt, dm))
    matches = select(f.c.id).where(f.c.dataset_id.in_(datasets))
    return _Condition(_dataset_probe(flt), f.c.dataset_id.in_(datasets), matches)


def _inherited_cond(flt: MetaFilter) -> _Condition:
    own = exists().where(fm.c.file_id == f.c.id, fm.c.key == flt.key)
    return _Condition(or_(_file_cond(flt).probe, and_(not_(own), _dataset_probe(flt))))


async def _carried(conn: AsyncConnection, table: Any, key: str) -> bool:
    return bool(await conn.scalar(select(exists().where(table.c.key == key))))


async def _resolve(conn: AsyncConnection, flt: MetaFilter) -> _Condition:
    if not flt.values:
        raise ValueError(f"filter on {flt.key!r} has no value")
    if flt.key.startswith(DATASET_PREFIX) and len(flt.key) > len(DATASET_PREFIX):
        return _dataset_cond(replace(flt, key=flt.key[len(DATASET_PREFIX) :]))
    if flt.key.startswith(FILE_PREFIX) and len(flt.key) > len(FILE_PREFIX):
        return _file_cond(replace(flt, key=flt.key[len(FILE_PREFIX) :]))
    if not await _carried(conn, dm, flt.key):
        return _file_cond(flt)
    if not await _carried(conn, fm, flt.key):
        return _dataset_cond(flt)
    return _inherited_cond(flt)


async def _count_upto(conn: AsyncConnection, matches: Any, cap: int) -> int:
    return int(await conn.scalar(select(func.count()).select_from(matches.limit(cap + 1).subquery())) or 0)


async def conditions(
    conn: AsyncConnection, filters: Sequence[MetaFilter], dataset: str | None = None
) -> tuple[list[ColumnElement[bool]], bool]:
    """The WHERE clauses of a find, and whether one of them drives it: the most selective
    countable condition as a set of ids when it matches at most ``DRIVE_AT`` files, every other
    one as a probe of the current file (see ``DRIVE_AT``)."""
    conds = [await _resolve(conn, flt) for flt in filters]
    if dataset is not None:  # the files of one dataset: at most a few thousand, a good driver
        in_dataset = f.c.dataset_id.in_(select(d.c.id).where(d.c.name == dataset))
        conds.append(_Condition(in_dataset, in_dataset, select(f.c.id).where(in_dataset)))
    best: tuple[int, int] | None = None
    for i, c in enumerate(conds):
        if c.matches is None:
            continue
        n = await _count_upto(conn, c.matches, DRIVE_AT)
        if n <= DRIVE_AT and (best is None or n < best[0]):
            best = (n, i)
    clauses = [c.driver if best is not None and i == best[1] and c.driver is not None else c.probe
               for i, c in enumerate(conds)]  # fmt: skip
    return clauses, best is not None


Found = tuple[int, int, str, str, int, str, Any, dict[str, Any]]
_COLUMNS = (f.c.id, f.c.dataset_id, f.c.name, d.c.name, f.c.size, f.c.adler32, f.c.created, f.c.meta)


async def find(
    conn: AsyncConnection, filters: Sequence[MetaFilter], *, dataset: str | None, limit: int
) -> list[Found]:
    """(file id, dataset id, name, dataset, size, adler32, created, meta) of the matches, by name.

    Driven by a selective condition: one statement. Otherwise files are read in name order a page
    of ``PAGE`` names at a time (the page's bounds read from the name index first), each page's
    files probed, until ``limit`` match: the bounds make every database walk the name index
    whatever its estimates (PostgreSQL, misled by the mixed values of ``value_num`` across keys,
    hashed 500,000 rows of one condition and sorted the join instead: 5.4 s).
    """
    where, driven = await conditions(conn, filters, dataset)
    base = select(*_COLUMNS).join(d, d.c.id == f.c.dataset_id).where(*where).order_by(f.c.name)
    if driven:
        return [tuple(row) for row in await conn.execute(base.limit(limit))]  # type: ignore[misc]
    out: list[Found] = []
    after: str | None = None
    while len(out) < limit:
        names = select(f.c.name).order_by(f.c.name).offset(PAGE - 1).limit(1)
        upper = await conn.scalar(names.where(f.c.name > after) if after is not None else names)
        page = base
        if after is not None:
            page = page.where(f.c.name > after)
        if upper is not None:
            page = page.where(f.c.name <= upper)
        out += [tuple(row) for row in await conn.execute(page.limit(limit - len(out)))]  # type: ignore[misc]
        if upper is None:
            break
        after = upper
    return out


async def details(
    conn: AsyncConnection, rows: Sequence[tuple[int, int, str, str, int, str, Any, dict[str, Any]]]
) -> list[FoundFile]:
    """The found files with their replicas and their datasets' metadata: one query per few
    hundred files for each, never one per file."""
    r, ep = s.replicas, s.storage_endpoints
    replicas: dict[int, list[ReplicaInfo]] = {row[0]: [] for row in rows}
    for part in chunks([row[0] for row in rows]):
        stmt = (
            select(
                r.c.file_id, ep.c.name, ep.c.kind, r.c.state, r.c.pfn, r.c.cartridge, r.c.fseq,
                r.c.created, r.c.updated, r.c.member_offset,
            )
            .join(ep, ep.c.id == r.c.storage_id)
            .where(r.c.file_id.in_(part))
            .order_by(r.c.file_id, ep.c.name)
        )  # fmt: skip
        for fid, *rest in await conn.execute(stmt):
            replicas[fid].append(ReplicaInfo(*rest))
    ds_meta: dict[int, dict[str, MetaValue]] = {}
    for part in chunks(sorted({row[1] for row in rows})):
        ds_meta.update(await conn.run_sync(dataset_values, list(part)))
    return [
        FoundFile(name, ds, size, adler, created, dict(meta or {}), ds_meta.get(did, {}), replicas[fid])
        for fid, did, name, ds, size, adler, created, meta in rows
    ]
