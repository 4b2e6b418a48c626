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
Then one of three ways, chosen per query:

- ``set``: a condition matching at most ``DRIVE_AT`` files drives: its set of ids, the others
  probed per file; the first ``limit`` matches by name;
- ``stream`` (a file or dataset condition, none that small): files are read in name order a page
  at a time, every condition probed, while the matches so far say the rest lies within
  ``WALK_AHEAD`` pages; past that (the matches are sparse or come late in name order) the file or
  dataset condition a sample of ``SAMPLE`` files finds most selective streams the rest from its
  own ``(key, value_*)`` index range (index order, not name order), the others probed per file,
  until ``limit`` match: about ``limit / P(the others | the source)`` probes wherever the matches
  lie by name. Which files come back when more than ``limit`` match is then the first page's
  matches and any others (not the first by name); all are listed by name. An inherited condition
  never streams: its file index misses the files inheriting the key from their dataset (it is
  probed, with the inheritance rule, like every other condition);
- ``walk`` (only inherited conditions): files read in name order a page at a time, each probed;
  the first ``limit`` matches by name.

Within one value of an equality condition the index lists files in id order (in the bench, name
order): streaming from ``mode=wobble,on`` would meet late matches as the walk does; a range over
values uncorrelated with names (``azimuth>=180``) does not. The sample picks on selectivity only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import ColumnElement, and_, case, exists, func, literal, not_, or_, select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from common.catalogue import schema as s
from common.catalogue.filters import MetaFilter, column_for, value_condition
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
# Files, spread evenly over the ids, on which each condition is probed to pick the one to stream
# from when none drives: enough to tell a condition matching 15 % from one matching 90 %, a few
# milliseconds of probes.
SAMPLE = 256
# A streamable find keeps walking by name while the matches found so far say the rest lies
# within this many more pages: pages read in name order are cheap (neighbouring files share the
# database's pages), a stream's probes land on random pages (~4 times the cost per file).
WALK_AHEAD = 3


@dataclass(frozen=True, slots=True)
class _Condition:
    """One filter as two equivalent SQL forms: a probe of the current file (``EXISTS`` over the
    primary keys), and, where it can be counted cheaply, the set of ids it selects (``driver``)."""

    probe: ColumnElement[bool]
    driver: ColumnElement[bool] | None = None
    matches: Any = None  # a SELECT of the files it matches, for counting up to DRIVE_AT
    # A SELECT of one column in index order, and the files column it equals (``id``: the file's
    # own metadata; ``dataset_id``: its dataset's), to stream the matching files from.
    source: tuple[Any, str] | None = None


def _file_cond(flt: MetaFilter) -> _Condition:
    where = (fm.c.key == flt.key, value_condition(flt, fm))
    probe = exists().where(fm.c.file_id == f.c.id, *where)
    # Counted on the (key, value_*) index alone: selecting file_id would read each row (SQLite's
    # secondary indexes hold the rowid, not file_id), 20,000 reads for a broad condition.
    ids = select(fm.c.file_id).where(*where).order_by(fm.c.key, column_for(flt.values[0], fm)[0])
    return _Condition(probe, f.c.id.in_(ids), select(literal(1)).where(*where), (ids, "id"))


def _dataset_probe(flt: MetaFilter) -> ColumnElement[bool]:
    return exists().where(dm.c.dataset_id == f.c.dataset_id, dm.c.key == flt.key, value_condition(flt, dm))


def _dataset_cond(flt: MetaFilter) -> _Condition:
    datasets = select(dm.c.dataset_id).where(dm.c.key == flt.key, value_condition(flt, dm))
    matches = select(f.c.id).where(f.c.dataset_id.in_(datasets))
    return _Condition(_dataset_probe(flt), f.c.dataset_id.in_(datasets), matches, (datasets, "dataset_id"))


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


Found = tuple[int, int, str, str, int, str, Any, dict[str, Any]]
_COLUMNS = (f.c.id, f.c.dataset_id, f.c.name, d.c.name, f.c.size, f.c.adler32, f.c.created, f.c.meta)


@dataclass(frozen=True, slots=True)
class Plan:
    """How a find runs: ``how`` is ``set`` (a selective condition's ids drive, the others probed),
    ``stream`` (a page of files in name order, then ``source``'s files in its index order, the
    others probed) or ``walk`` (files in name order, every condition probed); ``where`` the
    clauses on ``files`` (every condition's probe, but the driving set's)."""

    how: str
    where: list[ColumnElement[bool]]
    source: tuple[Any, str] | None = None
    others: list[ColumnElement[bool]] | None = None  # ``stream``: every condition's but the source's
    conditions: tuple[_Condition, ...] = ()  # ``stream``: to pick the source from (``with_source``)


async def _sampled(conn: AsyncConnection, conds: Sequence[_Condition]) -> list[int]:
    """How many of ``SAMPLE`` files spread evenly over the ids each condition matches."""
    # Two statements: SQLite reads min() or max() alone off the index, both together by a scan.
    lo, hi = await conn.scalar(select(func.min(f.c.id))), await conn.scalar(select(func.max(f.c.id)))
    if lo is None or hi is None:
        return [0] * len(conds)
    ids = sorted({lo + (hi - lo) * i // SAMPLE for i in range(SAMPLE)})
    counts = [func.coalesce(func.sum(case((c.probe, 1), else_=0)), 0) for c in conds]
    return [int(n) for n in (await conn.execute(select(*counts).where(f.c.id.in_(ids)))).one()]


async def plan(conn: AsyncConnection, filters: Sequence[MetaFilter], dataset: str | None = None) -> Plan:
    """The way a find runs (see the module's docstring): the most selective countable condition
    as a set of ids when it matches at most ``DRIVE_AT`` files; else the streamable condition the
    sample finds most selective as the source; else the walk by name."""
    conds = [await _resolve(conn, flt) for flt in filters]
    if dataset is not None:  # the files of one dataset: at most a few thousand, a good driver
        one = select(d.c.id).where(d.c.name == dataset)
        in_dataset = f.c.dataset_id.in_(one)
        conds.append(
            _Condition(in_dataset, in_dataset, select(f.c.id).where(in_dataset), (one, "dataset_id"))
        )
    best: tuple[int, int] | None = None
    for i, c in enumerate(conds):
        if c.matches is None:
            continue
        n = await _count_upto(conn, c.matches, DRIVE_AT)
        if n <= DRIVE_AT and (best is None or n < best[0]):
            best = (n, i)
    if best is not None:
        where = [c.driver if i == best[1] and c.driver is not None else c.probe for i, c in enumerate(conds)]
        return Plan("set", where)
    streamable = [c for c in conds if c.source is not None]
    if not streamable:
        return Plan("walk", [c.probe for c in conds])
    return Plan("stream", [c.probe for c in conds], conditions=tuple(conds))


async def with_source(conn: AsyncConnection, p: Plan) -> Plan:
    """A ``stream`` plan with its source: the streamable condition the sample finds most
    selective (asked only once the first page by name fell short: the sample's probes land on
    random pages, ~100 ms on SQLite at 1,000,000 files, more than a page that suffices)."""
    streamable = [c for c in p.conditions if c.source is not None]
    shares = await _sampled(conn, streamable) if len(streamable) > 1 else [0]
    source = streamable[shares.index(min(shares))]
    # The source's rows are its condition's matches: only the others are probed.
    return replace(p, source=source.source, others=[c.probe for c in p.conditions if c is not source])


def statement(p: Plan, dialect: str = "sqlite") -> Any:
    """The find's SELECT of ``_COLUMNS``: for ``stream`` from the source's rows in its index
    order, unordered (the database stops at the LIMIT); otherwise in name order."""
    if p.source is None:
        return select(*_COLUMNS).join(d, d.c.id == f.c.dataset_id).where(*p.where).order_by(f.c.name)
    ids, column = p.source
    # PostgreSQL: the source kept a subquery (OFFSET 0) in the order of its ``(key, value_*)``
    # index, which it then reads (otherwise it scanned the primary key for the key: file id order,
    # the late matches again). SQLite flattens the plain subquery and reads that index anyway.
    src = (ids.offset(0) if dialect == "postgresql" else ids.order_by(None)).subquery("driver")
    return (
        select(*_COLUMNS)
        .select_from(src)
        .join(f, f.c[column] == src.c[0])
        .join(d, d.c.id == f.c.dataset_id)
        .where(*(p.others or []))
    )


def walked(p: Plan) -> Any:
    """The find's SELECT in name order, every condition probed per file (``walk``, and
    ``stream``'s first page)."""
    return select(*_COLUMNS).join(d, d.c.id == f.c.dataset_id).where(*p.where).order_by(f.c.name)


async def find(
    conn: AsyncConnection, filters: Sequence[MetaFilter], *, dataset: str | None, limit: int
) -> list[Found]:
    """(file id, dataset id, name, dataset, size, adler32, created, meta) of the matches, by name.

    Which files when more than ``limit`` match: with a selective condition (``set``) or only
    inherited ones (``walk``), the first ``limit`` by name; otherwise (``stream``) any ``limit``
    matching files, listed by name: the first by name would mean reading every match of a broad
    condition. ``--limit`` above the number of matches always gives them all.

    The walk reads a page of ``PAGE`` names at a time (the page's bounds read from the name index
    first), each page's files probed, until ``limit`` match: the bounds make every database walk
    the name index whatever its estimates (PostgreSQL, misled by the mixed values of ``value_num``
    across keys, hashed 500,000 rows of one condition and sorted the join instead: 5.4 s).
    """
    p = await plan(conn, filters, dataset)
    if p.how == "set":
        return [tuple(row) for row in await conn.execute(statement(p).limit(limit))]  # type: ignore[misc]
    out: list[Found] = []
    after: str | None = None
    pages = 0
    while len(out) < limit:
        names = select(f.c.name).order_by(f.c.name).offset(PAGE - 1).limit(1)
        upper = await conn.scalar(names.where(f.c.name > after) if after is not None else names)
        page = walked(p)
        if after is not None:
            page = page.where(f.c.name > after)
        if upper is not None:
            page = page.where(f.c.name <= upper)
        out += [tuple(row) for row in await conn.execute(page.limit(limit - len(out)))]  # type: ignore[misc]
        if upper is None:
            break
        after = upper
        pages += 1
        if p.how == "stream" and len(out) < limit and (limit - len(out)) * pages > WALK_AHEAD * len(out):
            # The walk would need more than WALK_AHEAD pages at the rate so far: the rest from
            # the source.
            p = await with_source(conn, p)
            rest = statement(p, conn.dialect.name).where(f.c.name > after).limit(limit - len(out))
            out += sorted(await _streamed(conn, rest), key=lambda row: row[2])
            break
    return out


# PostgreSQL's planner, misled by ``value_num``'s values mixed across keys (it estimated 3,000
# rows for ``n_events>=500000`` in 60,000 files; there are 30,000), hashed whole conditions, or
# streamed from another condition than the sampled one (``mode=wobble,on``: its index lists the
# matches in id order, late in name order again: 1.3 s at 1,000,000 files). For this statement
# only: the joins in the order written (the source first), nested loops over index scans (each
# other condition a probe per file), no parallel workers or JIT to start for 1,000 rows.
STREAM_SETTINGS = {
    "join_collapse_limit": "1",
    "from_collapse_limit": "1",
    "enable_seqscan": "off",
    "enable_bitmapscan": "off",
    "enable_hashjoin": "off",
    "enable_mergejoin": "off",
    "max_parallel_workers_per_gather": "0",
    "jit": "off",
}


async def _streamed(conn: AsyncConnection, stmt: Any) -> list[Found]:
    if conn.dialect.name != "postgresql":
        return [tuple(row) for row in await conn.execute(stmt)]  # type: ignore[misc]
    for name, value in STREAM_SETTINGS.items():
        await conn.execute(text(f"SET LOCAL {name} = {value}"))
    try:
        return [tuple(row) for row in await conn.execute(stmt)]  # type: ignore[misc]
    finally:
        for name in STREAM_SETTINGS:
            await conn.execute(text(f"SET LOCAL {name} TO DEFAULT"))


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
