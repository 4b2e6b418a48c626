"""The read-only HTTP query API, ``/api/v1/...``: the catalogue's DIRAC-style questions for
external systems (a DIRAC plugin, a pipeline), served by the monitor's web server.

Every monitor serves it, the standby ones too: it only reads the catalogue, through a connection
of its own opened at the first question (a catalogue unreachable then is a 503 with the reason, and
the next question tries again). The token protecting the dashboard protects it (``web``).

Answers are JSON. A listing answers ``{"items": [...], "next": <cursor or null>}``: at most
``limit`` items (default 100, at most 1000), and ``next`` the opaque cursor of the following page
(keyset paging: ``common.catalogue.namespace``). A refused parameter is a 400 (404 for a name the
catalogue does not hold) with ``{"error": {"parameter": ..., "message": ...}}``. The routes and
their parameters are described in ``openapi`` (served at ``/api/v1/openapi.json``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any

import structlog
from aiohttp import web
from sqlalchemy.exc import SQLAlchemyError

from common.catalogue import Catalogue
from common.catalogue.namespace import UnknownEndpoint
from common.catalogue.schema import MAX_NAME
from common.errors import SpoolError
from common.log_folding import ReasonThrottle
from daemons.monitor.api_params import (
    MAX_DEPTH,
    MAX_PFN,
    BadParameter,
    Query,
    encode_cursor,
    is_count,
    is_text,
)
from daemons.monitor.openapi import document

log = structlog.get_logger("spool.monitor")

PREFIX = "/api/v1"
_UNAVAILABLE = ReasonThrottle()

Route = Callable[[Catalogue, Query, web.Request], Awaitable[Any]]


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON")


def _json(body: Any, status: int = 200) -> web.Response:
    if dataclasses.is_dataclass(body) and not isinstance(body, type):
        body = dataclasses.asdict(body)
    text = json.dumps(body, default=_plain, separators=(",", ":"), ensure_ascii=False)
    return web.Response(text=text, status=status, content_type="application/json")


def error(status: int, message: str, parameter: str | None = None) -> web.Response:
    return _json({"error": {"parameter": parameter, "message": message}}, status)


def page(rows: Sequence[Any], limit: int, listing: str, key: Callable[[Any], list[Any]]) -> dict[str, Any]:
    """``rows`` holds up to ``limit + 1`` rows: one more than shown says a next page exists."""
    shown = list(rows[:limit])
    more = len(rows) > limit
    return {
        "items": [dataclasses.asdict(r) for r in shown],
        "next": encode_cursor(listing, key(shown[-1])) if more and shown else None,
    }


class QueryApi:
    """The ``/api/v1`` routes over one catalogue URL (``add_routes``; ``close`` at the end)."""

    def __init__(self, catalogue_url: str) -> None:
        self._url = catalogue_url
        self._catalogue: Catalogue | None = None
        self._opening = asyncio.Lock()

    def add_routes(self, router: web.UrlDispatcher) -> None:
        for path, route in self.routes().items():
            router.add_get(PREFIX + path, self._serve(route))

    def routes(self) -> dict[str, Route]:
        """Path below ``/api/v1`` -> the question; ``openapi`` describes the same paths."""
        return {
            "/files": file_metadata,
            "/replicas": replicas,
            "/exists": exists,
            "/find": find,
            "/datasets": datasets,
            "/directory": directory,
            "/directory/size": directory_size,
            "/lfn": lfn_for_pfn,
            "/endpoints": endpoints,
            "/endpoints/{endpoint}/dump": dump,
            "/ancestors": ancestors,
            "/descendants": descendants,
            "/metadata/fields": metadata_fields,
        }

    def add_openapi(self, router: web.UrlDispatcher) -> None:
        body = json.dumps(document(), separators=(",", ":")).encode()

        async def serve(request: web.Request) -> web.Response:
            return web.Response(body=body, content_type="application/json")

        router.add_get(PREFIX + "/openapi.json", serve)

    async def close(self) -> None:
        if self._catalogue is not None:
            await self._catalogue.close()
            self._catalogue = None

    async def _open(self) -> Catalogue:
        async with self._opening:
            if self._catalogue is None:
                self._catalogue = await Catalogue.open(self._url)
            return self._catalogue

    def _serve(self, route: Route) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def serve(request: web.Request) -> web.Response:
            query = Query(request.query)
            try:
                catalogue = await self._open()
                return _json(await route(catalogue, query, request))
            except BadParameter as exc:
                return error(exc.status, exc.message, exc.parameter)
            except (SpoolError, SQLAlchemyError, OSError) as exc:
                text = exc.message if isinstance(exc, SpoolError) else str(exc).splitlines()[0][:300]
                admitted, folded = _UNAVAILABLE.admit(type(exc).__name__)
                if admitted:
                    log.warning("api_catalogue_unavailable", error=text, similar_since_last_line=folded)
                return error(503, f"catalogue unavailable: {text}")

        return serve


# --- the questions ---------------------------------------------------------------------------------
async def file_metadata(c: Catalogue, q: Query, request: web.Request) -> Any:
    """getFileMetadata / isFile: everything about one file."""
    name = q.required("name", most=MAX_NAME)
    q.done()
    view = await c.queries.show_file(name)
    if view is None:
        raise BadParameter("name", f"no file named {name!r}", 404)
    return view


async def replicas(c: Catalogue, q: Query, request: web.Request) -> Any:
    """getReplicas: every replica (endpoint, state, pfn) of up to 100 files; an unknown name maps
    to an empty list (DIRAC reports it as failed; the caller sees it the same)."""
    names = q.names()
    q.done()
    out: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for row in await c.namespace.replicas(names):
        out[row.name].append({"endpoint": row.endpoint, "kind": row.kind, "state": row.state, "pfn": row.pfn})
    return {"replicas": out}


async def exists(c: Catalogue, q: Query, request: web.Request) -> Any:
    """exists / isFile / isDirectory for up to 100 names."""
    names = q.names()
    q.done()
    return {"items": [dataclasses.asdict(x) for x in await c.namespace.exists(names)]}


async def find(c: Catalogue, q: Query, request: web.Request) -> Any:
    """findFilesByMetadata: ``filter`` in the ``spool find`` syntax, repeated (all must hold)."""
    filters = q.filters()
    dataset = q.text("dataset", most=255)
    limit = q.limit()
    after = q.cursor("find", lambda k: len(k) == 1 and is_text(k[0]))
    q.done()
    if not filters and dataset is None:
        raise BadParameter("filter", "give at least one filter or a dataset")
    rows = await c.namespace.find_page(
        filters, dataset=dataset, after=after[0] if after else None, limit=limit + 1
    )
    return page(rows, limit, "find", lambda x: [x.name])


async def datasets(c: Catalogue, q: Query, request: web.Request) -> Any:
    """Datasets with their files and bytes, by name."""
    limit = q.limit()
    after = q.cursor("datasets", lambda k: len(k) == 1 and is_text(k[0], 255))
    q.done()
    rows = await c.namespace.datasets_page(after=after[0] if after else None, limit=limit + 1)
    return page(rows, limit, "datasets", lambda x: [x.name])


async def directory(c: Catalogue, q: Query, request: web.Request) -> Any:
    """listDirectory: the entries right under ``path`` (sub-directories with files and bytes)."""
    path = q.text("path", most=MAX_NAME, least=0, default="")
    assert path is not None
    limit = q.limit()
    after = q.cursor("directory", lambda k: len(k) == 2 and is_text(k[0]) and k[1] in (0, 1))
    q.done()
    key = (after[0], int(after[1])) if after else None
    rows = await c.namespace.list_directory(path, after=key, limit=limit + 1)
    if not rows and key is None and path.strip("/"):
        raise BadParameter("path", f"no directory {path!r} (no file is named below it)", 404)
    return page(rows, limit, "directory", lambda x: [x.name, 1 if x.kind == "directory" else 0])


async def directory_size(c: Catalogue, q: Query, request: web.Request) -> Any:
    """getDirectorySize / getDirectoryReplicas: files and bytes below ``path``, and the copies of
    them per endpoint and state."""
    path = q.text("path", most=MAX_NAME, least=0, default="")
    assert path is not None
    q.done()
    return await c.namespace.directory_size(path)


async def lfn_for_pfn(c: Catalogue, q: Query, request: web.Request) -> Any:
    """getLFNForPFN: the logical name of a physical path or URL on an endpoint."""
    endpoint = q.required("endpoint", most=64)
    pfn = q.required("pfn", most=MAX_PFN)
    q.done()
    try:
        name = await c.namespace.lfn_for_pfn(endpoint, pfn)
    except UnknownEndpoint:
        raise BadParameter("endpoint", f"no endpoint named {endpoint!r}", 404) from None
    if name is None:
        raise BadParameter("pfn", f"no replica at {pfn!r} on {endpoint}", 404)
    return {"endpoint": endpoint, "pfn": pfn, "name": name}


async def endpoints(c: Catalogue, q: Query, request: web.Request) -> Any:
    """getStorageElements: the endpoints, their kind and states."""
    q.done()
    return {
        "items": [
            {"name": e.name, "kind": e.kind, "backend": e.backend, "state": e.state, "health": e.health}
            for e in await c.endpoints.all()
        ]
    }


async def dump(c: Catalogue, q: Query, request: web.Request) -> Any:
    """An endpoint's dump: every replica on it (name, pfn, size, adler32, state), paged."""
    endpoint = request.match_info["endpoint"]
    if not is_text(endpoint, 64):
        raise BadParameter("endpoint", "an endpoint name is 1 to 64 characters")
    limit = q.limit()
    after = q.cursor("dump", lambda k: len(k) == 1 and is_count(k[0]))
    q.done()
    try:
        rows = await c.namespace.dump_page(endpoint, after=after[0] if after else None, limit=limit + 1)
    except UnknownEndpoint:
        raise BadParameter("endpoint", f"no endpoint named {endpoint!r}", 404) from None
    return page(rows, limit, "dump", lambda x: [x.id])


async def _relatives(c: Catalogue, q: Query, *, up: bool) -> Any:
    name = q.required("name", most=MAX_NAME)
    depth = q.integer("depth", default=MAX_DEPTH, least=1, most=MAX_DEPTH)
    limit = q.limit()
    listing = "ancestors" if up else "descendants"
    after = q.cursor(listing, lambda k: len(k) == 2 and is_count(k[0]) and is_text(k[1]))
    q.done()
    rows = await (c.queries.ancestors if up else c.queries.descendants)(name, max_depth=depth)
    if after is not None:  # nearest first, then by name: the order the walk returns
        rows = [r for r in rows if (r.depth, r.name) > (after[0], after[1])]
    return page(rows[: limit + 1], limit, listing, lambda x: [x.depth, x.name])


async def ancestors(c: Catalogue, q: Query, request: web.Request) -> Any:
    """getFileAncestors: every ancestor, nearest first, to ``depth`` generations."""
    return await _relatives(c, q, up=True)


async def descendants(c: Catalogue, q: Query, request: web.Request) -> Any:
    """getFileDescendents: every descendant, nearest first, to ``depth`` generations."""
    return await _relatives(c, q, up=False)


async def metadata_fields(c: Catalogue, q: Query, request: web.Request) -> Any:
    """getMetadataFields: the metadata keys in use and whether they compare as numbers or text."""
    q.done()
    return {"items": [dataclasses.asdict(x) for x in await c.namespace.metadata_fields()]}
