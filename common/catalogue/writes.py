"""Writes other than ingest registration: endpoints, request outcomes, replicas, history rows.

Every write is an upsert keyed by something the caller already has (endpoint name, message id,
file x storage) so that a redelivered message repeating a write changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from common.catalogue import schema as s
from common.catalogue.sql import check_fits, storage_ids, upsert, utcnow
from common.config import StorageEndpoint

EndpointState = Literal["online", "readonly", "down"]
ENDPOINT_STATES: tuple[EndpointState, ...] = ("online", "readonly", "down")


async def sync_endpoints(conn: AsyncConnection, endpoints: Mapping[str, StorageEndpoint]) -> None:
    """Configuration owns kind, backend, root and attributes; the catalogue owns ``state`` (an
    operator may have marked an endpoint down, and a restart must not bring it back online)."""
    now = utcnow()
    rows = [
        {
            "name": name,
            "kind": e.kind,
            "backend": e.backend,
            # Where it is, for people: a remote endpoint's url (credentials are never in it).
            "root": e.url if e.url and e.backend in ("xrootd", "https") else str(e.root),
            "attributes": dict(e.attributes),
            "state": "online",
            "updated": now,
        }
        for name, e in endpoints.items()
    ]
    for row in rows:
        check_fits(s.storage_endpoints, row)
    await upsert(
        conn, s.storage_endpoints, rows, ["name"], ["kind", "backend", "root", "attributes", "updated"]
    )


async def set_endpoint_state(conn: AsyncConnection, name: str, state: EndpointState) -> None:
    if state not in ENDPOINT_STATES:
        raise ValueError(f"endpoint state must be one of {', '.join(ENDPOINT_STATES)}, not {state!r}")
    ep = s.storage_endpoints
    res = await conn.execute(ep.update().where(ep.c.name == name).values(state=state, updated=utcnow()))
    if res.rowcount == 0:
        raise KeyError(f"unknown storage endpoint {name!r}")


async def add_event(
    conn: AsyncConnection,
    *,
    name: str,
    daemon: str,
    type: str,
    outcome: str,
    attempt: int = 1,
    storage: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    row = {
        "name": name, "time": utcnow(), "daemon": daemon, "type": type, "outcome": outcome,
        "attempt": attempt, "storage": storage, "detail": detail,
    }  # fmt: skip
    check_fits(s.events, row)
    await conn.execute(s.events.insert().values(**row))


async def record_request(
    conn: AsyncConnection,
    *,
    request_id: str,
    kind: str,
    state: str,
    attempts: int,
    reason: str | None,
    error: str | None,
    name: str | None,
    path: str | None,
    dataset: str | None,
) -> None:
    """Upsert one ``requests`` row. Name / path / dataset already known are not erased by a
    later call that lacks them (a failure before parsing the message knows less)."""
    now = utcnow()
    row = {
        "id": request_id, "kind": kind, "state": state, "attempts": attempts, "reason": reason,
        "error": error, "name": name, "path": path, "dataset": dataset, "created": now, "updated": now,
    }  # fmt: skip
    check_fits(s.requests, row)
    update = ["state", "attempts", "updated"]
    if state != "done":
        update += ["reason", "error"]
    update += [k for k in ("name", "path", "dataset") if row[k] is not None]
    await upsert(conn, s.requests, [row], ["id"], update)


async def set_replica(
    conn: AsyncConnection,
    *,
    name: str,
    storage: str,
    pfn: str,
    state: str,
    cartridge: str | None = None,
    fseq: int | None = None,
    member_offset: int | None = None,
) -> None:
    """Create or update the replica of file ``name`` on ``storage`` (unique per file x storage);
    ``member_offset``: a tape copy inside an aggregate (see ``common.catalogue.tape``)."""
    fid = await conn.scalar(select(s.files.c.id).where(s.files.c.name == name))
    if fid is None:
        raise KeyError(f"no file named {name!r}")
    sid = (await storage_ids(conn, {storage}))[storage]
    now = utcnow()
    row = {
        "file_id": fid, "storage_id": sid, "pfn": pfn, "state": state, "cartridge": cartridge,
        "fseq": fseq, "member_offset": member_offset, "created": now, "updated": now,
    }  # fmt: skip
    check_fits(s.replicas, row)
    await upsert(
        conn, s.replicas, [row], ["file_id", "storage_id"],
        ["pfn", "state", "cartridge", "fseq", "member_offset", "updated"],
    )  # fmt: skip
