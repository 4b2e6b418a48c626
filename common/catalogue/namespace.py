"""The namespace questions DIRAC users ask of a file catalogue, one page at a time.

Logical names are '/'-separated paths; a *directory* is any prefix ending before a '/'. There is
no directory table: a directory exists while a file's name lies below it, so every question here
is one statement over a range of the unique index on ``files.name``.

Why a range and not ``LIKE 'prefix%'``: a name may hold ``%`` or ``_`` (LIKE's wildcards), and
PostgreSQL can only use an index for LIKE when it plans with the pattern's value (a prepared
statement's generic plan scans the table). ``name >= P AND name < P'`` (``P'``: P with its last
character moved one code point up) is exactly "starts with P" in a byte-wise collation (SQLite's
binary one; the "C" collation the column has on PostgreSQL, see ``schema.Name``) and is an index
range on both.

Paging is by *keyset*: each function takes the key of the last row the caller saw (``after``) and
returns rows strictly beyond it, so page N costs what page 1 does and a listing stays consistent
while files are added. The keys are plain values; making them opaque is the caller's business.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import ColumnElement, and_, func, literal, select, text, union_all
from sqlalchemy.ext.asyncio import AsyncConnection

from common.catalogue import schema as s
from common.catalogue.filters import MetaFilter, conditions
from common.catalogue.models import DatasetInfo, FileInfo
from common.catalogue.physical import relative_pfn
from common.catalogue.sql import chunks

f, d, r, ep, fm = s.files, s.datasets, s.replicas, s.storage_endpoints, s.file_metadata

EntryKind = Literal["directory", "file"]
# Range aggregates per statement in a directory listing (SQLite allows 500 SELECTs in a compound).
_COMPOUND = 200
# getMetadataFields walks the distinct keys one index seek each; past this many it stops.
MAX_FIELDS = 10_000


@dataclass(frozen=True, slots=True)
class Entry:
    """One entry of a directory: a sub-directory (files and bytes below it) or a file (1, size).
    A name can be both at once (``a/b`` a file and ``a/b/c`` another): two entries."""

    name: str  # the last component
    path: str  # the whole logical name (of the directory, without a trailing '/')
    kind: EntryKind
    files: int
    bytes: int


@dataclass(frozen=True, slots=True)
class EndpointShare:
    """The replicas one endpoint holds of the files under a directory, in one state."""

    endpoint: str
    state: str
    files: int
    bytes: int


@dataclass(frozen=True, slots=True)
class DirectorySize:
    path: str
    files: int
    bytes: int
    replicas: list[EndpointShare]


@dataclass(frozen=True, slots=True)
class DumpRow:
    """One replica on an endpoint (``spool rse dump``); ``id`` is the replica's, the page key."""

    id: int
    name: str
    pfn: str
    size: int
    adler32: str
    state: str


@dataclass(frozen=True, slots=True)
class ReplicaRow:
    name: str
    endpoint: str
    kind: str
    state: str
    pfn: str


@dataclass(frozen=True, slots=True)
class MetadataField:
    """A metadata key in use; ``numeric``: some value compares as a number, ``text``: as a string."""

    key: str
    numeric: bool
    text: bool


@dataclass(frozen=True, slots=True)
class Existence:
    name: str
    file: bool
    directory: bool


class UnknownEndpoint(LookupError):
    """The endpoint named is not in the catalogue."""


def directory_of(path: str) -> str:
    """The key prefix of directory ``path``: ``""`` for the top, else ``path/`` without any
    leading, trailing or repeated '/' (``/lst1//run1/`` -> ``lst1/run1/``)."""
    parts = [p for p in path.split("/") if p]
    return "/".join(parts) + "/" if parts else ""


def _starts_with(column: Any, prefix: str) -> ColumnElement[bool]:
    """``column`` starts with ``prefix``, as an index range (module docstring)."""
    upper = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    return and_(column >= prefix, column < upper)


def _under(prefix: str) -> list[ColumnElement[bool]]:
    return [_starts_with(f.c.name, prefix)] if prefix else []


async def list_directory(
    conn: AsyncConnection, path: str, *, after: tuple[str, int] | None, limit: int
) -> list[Entry]:
    """The entries right under ``path``, in the order of their names with a directory's read as
    ``name/`` (a file ``a`` comes before a directory ``a``, a file ``a-b`` too, since '-' < '/').

    Found by a *skip scan* of the name index (one recursive statement, ``_walk_sql``): from the first name
    below ``path``, each step seeks the first name beyond the entry just found, leaping over a whole
    sub-directory (every name starting with ``dir/`` is below ``dir0``). A page of entries costs
    one seek each, however many files lie below them; then each directory's files and bytes are
    one range of the index (``_sizes``). ``after``: ``(name, 1 for a directory / 0 for a file)``
    of the last entry seen.
    """
    prefix = directory_of(path)
    if after is None:
        start, strictly = prefix, False
    elif after[1]:
        start, strictly = prefix + after[0] + "0", False
    else:
        start, strictly = prefix + after[0], True
    names = await _walk(conn, prefix, start, strictly, limit)
    entries: list[tuple[str, bool]] = []
    for name in names:
        rest = name[len(prefix) :]
        component, slash, _ = rest.partition("/")
        entries.append((component, bool(slash)))
    return await _sizes(conn, prefix, entries)


def _walk_sql(conn: AsyncConnection, bounded: bool, strictly: bool) -> str:
    position = "instr" if conn.dialect.name == "sqlite" else "strpos"
    upper = " AND f.name < :upper" if bounded else ""
    first = ">" if strictly else ">="
    # The component of walk.name ends at its first '/' after the prefix: a directory's next entry is
    # at "<prefix><component>0" or beyond, a file's right after it. One lower bound (">= skip", the
    # file itself excluded by "<>"), so that the index is entered there: given "> walk.name" too,
    # SQLite ranged over that bound instead and read every name below the directory.
    rest = "substr(walk.name, :plen + 1)"
    skip = (
        f"CASE WHEN {position}({rest}, '/') > 0 "
        f"THEN substr(walk.name, 1, :plen + {position}({rest}, '/') - 1) || '0' ELSE walk.name END"
    )
    return (
        "WITH RECURSIVE walk(name, n) AS ("
        f" SELECT (SELECT min(f.name) FROM files f WHERE f.name {first} :start{upper}), 1"
        " UNION ALL"
        f" SELECT (SELECT min(f.name) FROM files f WHERE f.name >= {skip} AND f.name <> walk.name{upper}),"
        " walk.n + 1 FROM walk WHERE walk.name IS NOT NULL AND walk.n < :limit"
        ") SELECT name FROM walk WHERE name IS NOT NULL ORDER BY n"
    )


async def _walk(conn: AsyncConnection, prefix: str, start: str, strictly: bool, limit: int) -> list[str]:
    """The first name of each of up to ``limit`` entries from ``start`` on (``_walk_sql``)."""
    params: dict[str, Any] = {"start": start, "plen": len(prefix), "limit": limit}
    if prefix:
        params["upper"] = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    stmt = text(_walk_sql(conn, bool(prefix), strictly))
    return [row[0] for row in await conn.execute(stmt, params)]


async def _sizes(conn: AsyncConnection, prefix: str, entries: list[tuple[str, bool]]) -> list[Entry]:
    """Files and bytes of each entry: one index range per directory, one look-up per file."""
    totals: dict[tuple[str, bool], tuple[int, int]] = {}
    dirs = [c for c, is_dir in entries if is_dir]
    for part in chunks(dirs, _COMPOUND):
        ranges = [
            select(literal(c), func.count(), func.coalesce(func.sum(f.c.size), 0)).where(
                _starts_with(f.c.name, prefix + c + "/")
            )
            for c in part
        ]
        for c, n, b in await conn.execute(union_all(*ranges) if len(ranges) > 1 else ranges[0]):
            totals[c, True] = (int(n), int(b))
    files = [prefix + c for c, is_dir in entries if not is_dir]
    for part in chunks(files):
        for name, size in await conn.execute(select(f.c.name, f.c.size).where(f.c.name.in_(part))):
            totals[name[len(prefix) :], False] = (1, int(size))
    out = []
    for c, is_dir in entries:
        n, b = totals.get((c, is_dir), (0, 0))  # (0, 0): removed between the two statements
        out.append(Entry(c, prefix + c, "directory" if is_dir else "file", n, b))
    return out


async def directory_size(conn: AsyncConnection, path: str) -> DirectorySize:
    """Files and bytes below ``path`` and, per endpoint and replica state, the copies of them."""
    prefix = directory_of(path)
    n, b = (
        await conn.execute(select(func.count(), func.coalesce(func.sum(f.c.size), 0)).where(*_under(prefix)))
    ).one()
    stmt = (
        select(ep.c.name, r.c.state, func.count(), func.coalesce(func.sum(f.c.size), 0))
        .select_from(f.join(r, r.c.file_id == f.c.id).join(ep, ep.c.id == r.c.storage_id))
        .where(*_under(prefix))
        .group_by(ep.c.name, r.c.state)
        .order_by(ep.c.name, r.c.state)
    )
    shares = [EndpointShare(e, st, int(k), int(v)) for e, st, k, v in await conn.execute(stmt)]
    return DirectorySize(prefix.rstrip("/"), int(n), int(b), shares)


async def exists(conn: AsyncConnection, names: Sequence[str]) -> list[Existence]:
    """For each name: a file of that name? a directory (some file below it)? Two index seeks."""
    out = []
    for name in names:
        is_file = await conn.scalar(select(f.c.id).where(f.c.name == name).limit(1)) is not None
        prefix = directory_of(name)
        is_dir = (
            bool(prefix) and await conn.scalar(select(f.c.id).where(*_under(prefix)).limit(1)) is not None
        )
        out.append(Existence(name, is_file, is_dir))
    return out


async def _endpoint(conn: AsyncConnection, name: str) -> tuple[int, str]:
    row = (await conn.execute(select(ep.c.id, ep.c.root).where(ep.c.name == name))).first()
    if row is None:
        raise UnknownEndpoint(name)
    return int(row[0]), str(row[1])


async def lfn_for_pfn(conn: AsyncConnection, endpoint: str, physical: str) -> str | None:
    """The logical name of the replica at ``physical`` (a path or URL, or the catalogue's own
    relative pfn) on ``endpoint``; None when no replica there has it.

    Spool writes a file at its logical name below the root, so the name is tried first (a seek
    in the unique index); a replica placed elsewhere is found by scanning the endpoint's replicas.
    """
    sid, root = await _endpoint(conn, endpoint)
    pfn = relative_pfn(root, physical)
    if pfn is None:
        return None
    same = select(f.c.name).join(r, r.c.file_id == f.c.id).where(r.c.storage_id == sid, r.c.pfn == pfn)
    found = await conn.scalar(same.where(f.c.name == pfn))
    if found is None:
        found = await conn.scalar(same.order_by(f.c.name).limit(1))
    return found


async def dump(conn: AsyncConnection, endpoint: str, *, after: int | None, limit: int) -> list[DumpRow]:
    """Every replica on ``endpoint``, whatever its state, in replica id order from ``after`` on.

    By id, not name: the primary key's range is read from the page's start and stops after
    ``limit`` rows of this endpoint, so a whole dump reads the replicas table once."""
    sid, _root = await _endpoint(conn, endpoint)
    stmt = (
        select(r.c.id, f.c.name, r.c.pfn, f.c.size, f.c.adler32, r.c.state)
        .join(f, f.c.id == r.c.file_id)
        .where(r.c.storage_id == sid)
        .order_by(r.c.id)
        .limit(limit)
    )
    if after is not None:
        stmt = stmt.where(r.c.id > after)
    return [DumpRow(int(i), n, p, int(z), a, st) for i, n, p, z, a, st in await conn.execute(stmt)]


async def replicas(conn: AsyncConnection, names: Sequence[str]) -> list[ReplicaRow]:
    """The replicas of these files (every state), by name then endpoint."""
    out: list[ReplicaRow] = []
    stmt = select(f.c.name, ep.c.name, ep.c.kind, r.c.state, r.c.pfn).select_from(
        f.join(r, r.c.file_id == f.c.id).join(ep, ep.c.id == r.c.storage_id)
    )
    for part in chunks(list(dict.fromkeys(names))):
        rows = await conn.execute(stmt.where(f.c.name.in_(part)))
        out += [ReplicaRow(*row) for row in rows]
    return sorted(out, key=lambda x: (x.name, x.endpoint))


async def find_page(
    conn: AsyncConnection,
    filters: Sequence[MetaFilter],
    *,
    dataset: str | None,
    after: str | None,
    limit: int,
) -> list[FileInfo]:
    """Files matching every filter, by name, beyond ``after`` (findFilesByMetadata, paged)."""
    stmt = select(f.c.name, d.c.name, f.c.size, f.c.adler32, f.c.created).join(d, d.c.id == f.c.dataset_id)
    stmt = stmt.where(*conditions(filters, f.c.id))
    if dataset is not None:
        stmt = stmt.where(d.c.name == dataset)
    if after is not None:
        stmt = stmt.where(f.c.name > after)
    return [FileInfo(*row) for row in await conn.execute(stmt.order_by(f.c.name).limit(limit))]


async def datasets_page(conn: AsyncConnection, *, after: str | None, limit: int) -> list[DatasetInfo]:
    """Datasets by name beyond ``after``, with their files and bytes (counted for this page only,
    through the index on ``files.dataset_id``)."""
    stmt = select(d.c.id, d.c.name, d.c.state, d.c.created).order_by(d.c.name).limit(limit)
    if after is not None:
        stmt = stmt.where(d.c.name > after)
    rows = (await conn.execute(stmt)).all()
    sums: dict[int, tuple[int, int]] = {}
    if rows:
        per = (
            select(f.c.dataset_id, func.count(), func.coalesce(func.sum(f.c.size), 0))
            .where(f.c.dataset_id.in_([row[0] for row in rows]))
            .group_by(f.c.dataset_id)
        )
        sums = {int(i): (int(n), int(b)) for i, n, b in await conn.execute(per)}
    return [
        DatasetInfo(name=n, state=st, created=c, files=sums.get(i, (0, 0))[0], bytes=sums.get(i, (0, 0))[1])
        for i, n, st, c in rows
    ]


async def metadata_fields(conn: AsyncConnection) -> list[MetadataField]:
    """Every metadata key in use, by name (getMetadataFields). The distinct keys are walked one
    index seek each (``min(key) > previous``) instead of reading every file's metadata rows."""
    out: list[MetadataField] = []
    last: str | None = None
    has = select(fm.c.file_id).limit(1)
    while len(out) < MAX_FIELDS:
        nxt = select(func.min(fm.c.key))
        key = await conn.scalar(nxt if last is None else nxt.where(fm.c.key > last))
        if key is None:
            break
        numeric = await conn.scalar(has.where(fm.c.key == key, fm.c.value_num.is_not(None))) is not None
        text = await conn.scalar(has.where(fm.c.key == key, fm.c.value_str.is_not(None))) is not None
        out.append(MetadataField(key, numeric, text))
        last = key
    return out
