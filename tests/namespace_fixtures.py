"""A small namespace for the DIRAC-style questions (catalogue, HTTP API and client tests): nested
directories, a name that is a prefix of another, a name that is both a file and a directory, and
names holding LIKE's wildcards ``%`` and ``_``, spread over two datasets and three endpoints."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from prometheus_client import CollectorRegistry

from common.catalogue import Catalogue
from daemons.monitor.api import QueryApi
from daemons.monitor.web import WebServer
from tests.catalogue_fixtures import rec

# name -> (dataset, size, metadata)
TREE: dict[str, tuple[str, int, dict[str, int | str]]] = {
    "lst1/run1/a.fits": ("ds.a", 10, {"run": 1, "telescope": "LST1"}),
    "lst1/run1/b.fits": ("ds.a", 20, {"run": 1, "telescope": "LST1"}),
    "lst1/run1/sub/c.fits": ("ds.a", 30, {"run": 1, "telescope": "LST2"}),
    "lst1/run10/d.fits": ("ds.a", 40, {"run": 10, "telescope": "LST1"}),
    "lst1/run1x": ("ds.b", 50, {"run": 11}),  # a file whose name extends the directory "lst1/run1"
    "lst1/run%/e.fits": ("ds.b", 60, {"mode": "50%"}),
    "lst1/run_/f.fits": ("ds.b", 70, {"mode": "a_b"}),
    "lst1/runXY/g.fits": ("ds.b", 80, {}),  # what "run_" or "run%" would also match as a pattern
    "lst2/h.fits": ("ds.b", 90, {"run": 2}),
    "lst2": ("ds.b", 5, {}),  # a file and a directory of one name
}


async def plant_tree(catalogue: Catalogue) -> None:
    """Register ``TREE`` (replicas on disk1 at the logical name, from ingest), then a disk2 copy
    of the run1 files at another layout, and a tape copy of one."""
    await catalogue.ingest.register(
        [rec(n, dataset=ds, size=size, metadata=meta, pfn=n) for n, (ds, size, meta) in TREE.items()]
    )
    for name in ("lst1/run1/a.fits", "lst1/run1/b.fits", "lst1/run1/sub/c.fits"):
        await catalogue.replication.set_replica(
            name=name, storage="disk2", pfn=f"spool/{name}", state="available"
        )
    await catalogue.replication.set_replica(
        name="lst1/run1/a.fits", storage="tape1", pfn="T0001/1", state="copying", cartridge="T0001", fseq=1
    )


TOKEN = "s3cret-api-token"


@asynccontextmanager
async def api_server(catalogue_url: str, *, token: str | None = TOKEN) -> AsyncIterator[str]:
    """The monitor's web server with the query API on ``catalogue_url``, on a free loopback
    port; yields its base URL (``http://127.0.0.1:PORT``)."""
    web = WebServer(CollectorRegistry(), lambda: {}, token=token, api=QueryApi(catalogue_url))
    await web.start("127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{web.port}"
    finally:
        await web.stop()


@pytest.fixture
async def planted(catalogue: Catalogue) -> Catalogue:
    """``catalogue`` (SQLite and PostgreSQL) holding ``TREE``."""
    await plant_tree(catalogue)
    return catalogue


@pytest.fixture
async def api(planted: Catalogue, catalogue_url: str) -> AsyncIterator[str]:
    """The base URL of a query API on ``planted``'s catalogue, protected by ``TOKEN``."""
    async with api_server(catalogue_url) as url:
        yield url
