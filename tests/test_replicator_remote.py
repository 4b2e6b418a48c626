"""The replicator with remote endpoints, against a real XRootD server (root:// and https/WebDAV):
every pair of issue 15 through the daemon itself, from a rule to verified bytes on the server.

posix -> xrootd, xrootd -> xrootd (third-party), xrootd -> https (through the node),
https -> https (HTTP third-party), https -> posix; each stage's source read from the catalogue's
history, each copy's bytes compared on the server's disk.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.catalogue import Catalogue
from common.config import Settings, load_settings
from common.storage.devserver import LocalXrootd
from daemons.ingest.handlers import service as ingest_service
from daemons.replicator.handlers import service as replicator_service
from tests.cli_fixtures import spool
from tests.conftest import queue_depth, running, wait_for
from tests.replication_fixtures import (
    available_on,
    make_files,
    name_of,
    publish_ready,
    replication_config,
    temp_files,
)
from tests.xrootd_fixtures import remote_dir, xrootd_server  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SERVICES = [ingest_service, replicator_service]


def remote_endpoints(server: LocalXrootd, where: str) -> dict[str, str]:
    """x1, x2 over root:// (sites A and B); h1, h2 over https (sites A and B), each in its own
    directory of the test's; all able to copy server to server."""
    ca = f'ca_path = "{server.ca_file}"'
    return {
        "storage.x1": f'backend = "xrootd"\nurl = "{server.root_url("site-a")}/{where}/x1"\ntpc = true',
        "storage.x2": f'backend = "xrootd"\nurl = "{server.root_url("site-b")}/{where}/x2"\ntpc = true',
        "storage.h1": f'backend = "https"\nurl = "{server.https_url("site-a")}/{where}/h1"\ntpc = true\n{ca}',
        "storage.h2": f'backend = "https"\nurl = "{server.https_url("site-b")}/{where}/h2"\ntpc = true\n{ca}',
    }


async def sources_of(settings: Settings, storage: str) -> set[str]:
    """The endpoints the copies on ``storage`` were made from (the catalogue's history)."""
    found: set[str] = set()
    async with await Catalogue.open(settings.catalogue.url) as cat:
        for info in await cat.queries.list_files(limit=1000):
            for event in await cat.queries.history(info.name):
                if event.type == "replica.created" and event.storage == storage and event.detail:
                    found.add(event.detail["source"])
    return found


async def copies_on(settings: Settings, storage: str, n: int) -> bool:
    return len(await available_on(settings, storage)) == n


async def test_every_pair_of_backends_through_the_replicator(
    tmp_path: Path,
    tag: str,
    broker,
    xrootd_server: LocalXrootd,  # noqa: F811
    remote_dir: str,  # noqa: F811
) -> None:
    path = replication_config(tmp_path, tag, **remote_endpoints(xrootd_server, remote_dir))
    settings = load_settings(path)
    files = make_files(settings, 6, size=300_000)
    names = [name_of(settings, p) for p, _ in files]
    server_dirs = {
        "x1": xrootd_server.path("site-a", f"{remote_dir}/x1"),
        "x2": xrootd_server.path("site-b", f"{remote_dir}/x2"),
        "h1": xrootd_server.path("site-a", f"{remote_dir}/h1"),
        "h2": xrootd_server.path("site-b", f"{remote_dir}/h2"),
    }

    def add_rule(rule: str, endpoint: str) -> None:
        added = spool(path, "rule", "add", "--id", rule, "--datasets", ".*", "--endpoints", endpoint)
        assert added.returncode == 0, added.stderr

    def set_state(endpoint: str, state: str) -> None:
        done = spool(path, "rse", "set", endpoint, "--state", state)
        assert done.returncode == 0, done.stderr

    async with running(SERVICES, settings):
        await publish_ready(broker, settings, files)
        await wait_for(lambda: copies_on(settings, "disk1", 6), timeout=60)
        add_rule("to-x1", "x1")  # posix -> xrootd (uploaded from this node)
        await wait_for(lambda: copies_on(settings, "x1", 6), timeout=120)
        add_rule("to-x2", "x2")  # xrootd -> xrootd: x1 ranks first (third-party copy)
        await wait_for(lambda: copies_on(settings, "x2", 6), timeout=120)
        set_state("disk1", "down")  # from here on, only remote sources can be read
        add_rule("to-h1", "h1")  # xrootd -> https (through the node)
        await wait_for(lambda: copies_on(settings, "h1", 6), timeout=120)
        add_rule("to-h2", "h2")  # https -> https: h1 ranks first (HTTP third-party copy)
        await wait_for(lambda: copies_on(settings, "h2", 6), timeout=120)
        set_state("x1", "down")
        set_state("x2", "down")
        add_rule("to-disk2", "disk2")  # https -> posix (downloaded into the mounted endpoint)
        await wait_for(lambda: copies_on(settings, "disk2", 6), timeout=120)
        assert await queue_depth(broker, settings.dead_queue("replicator")) == 0

    assert await sources_of(settings, "x1") == {"disk1"}
    assert await sources_of(settings, "x2") == {"x1"}
    assert await sources_of(settings, "h1") <= {"x1", "x2"}
    assert await sources_of(settings, "h2") == {"h1"}
    assert await sources_of(settings, "disk2") <= {"h1", "h2"}
    for (_, content), name in zip(files, names, strict=True):
        for endpoint, directory in server_dirs.items():
            assert (directory / name).read_bytes() == content, f"{name} on {endpoint}"
        assert (settings.storage["disk2"].root / name).read_bytes() == content
    for directory in server_dirs.values():  # no temporary left behind on the servers
        left = sorted(p.name for p in directory.rglob("*") if p.is_file())
        assert left == sorted(Path(n).name for n in names)
    assert temp_files(settings.storage["disk2"].root) == []
    # `spool rse list` shows a remote endpoint by its url.
    rses = {r["name"]: r for r in json.loads(spool(path, "rse", "list", "--json").stdout)}
    assert str(rses["x1"]["root"]).startswith("root://127.0.0.1:")
