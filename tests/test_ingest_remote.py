"""Ingest into a remote first endpoint (XRootD and WebDAV), against the real XRootD server: files
uploaded from the landing area, verified by the server's checksum, registered; a file that is not
what its event says refused before any byte is sent, and nothing left on the server."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from common.bus.dead import browse
from common.catalogue import Catalogue
from common.config import Settings, load_settings
from common.storage.devserver import LocalXrootd
from daemons.ingest.handlers import service as ingest_service
from tests.conftest import cloudevent, publish_raw, queue_depth, running, wait_for, write_config
from tests.replication_fixtures import DATASET, make_files, name_of, publish_ready
from tests.storage_fixtures import adler
from tests.xrootd_fixtures import remote_dir, xrootd_server  # noqa: F401  (fixtures)

pytestmark = pytest.mark.integration


def remote_first(tmp_path: Path, tag: str, server: LocalXrootd, where: str, backend: str) -> Settings:
    """A config whose first (ingest's) disk endpoint is on the server."""
    if backend == "xrootd":
        endpoint = f'backend = "xrootd"\nurl = "{server.root_url("site-a")}/{where}"'
    else:
        endpoint = (
            f'backend = "https"\nurl = "{server.https_url("site-a")}/{where}"\nca_path = "{server.ca_file}"'
        )
    path = write_config(tmp_path / "spool.toml", tmp_path / "state", tag)
    text = path.read_text()
    assert 'root = "storage/disk1"' in text
    path.write_text(text.replace('root = "storage/disk1"', endpoint, 1))
    return load_settings(path)


async def registered(settings: Settings, n: int) -> bool:
    async with await Catalogue.open(settings.catalogue.url) as cat:
        return (await cat.queries.counts()).files == n


@pytest.mark.parametrize("backend", ["xrootd", "https"])
async def test_ingest_uploads_to_a_remote_first_endpoint_and_refuses_a_wrong_file(
    tmp_path: Path,
    tag: str,
    broker,
    xrootd_server: LocalXrootd,  # noqa: F811
    remote_dir: str,  # noqa: F811
    backend: str,
) -> None:
    settings = remote_first(tmp_path, tag, xrootd_server, remote_dir, backend)
    files = make_files(settings, 5, size=200_000)
    liar = settings.landing_areas["lst1"] / "night" / "liar.fits"
    liar.write_bytes(b"not what the event says" * 100)
    async with running([ingest_service], settings):
        await publish_ready(broker, settings, files)
        body = cloudevent(
            {"path": str(liar), "dataset": DATASET, "size": liar.stat().st_size, "adler32": "00000001"},
            id_=uuid.uuid4().hex,
        )
        await publish_raw(broker, settings, "file.ready", body)
        await wait_for(lambda: registered(settings, 5), timeout=60)
        await wait_for(lambda: _dead(broker, settings, 1), timeout=60)
    on_server = xrootd_server.path("site-a", remote_dir)
    for path, content in files:
        name = name_of(settings, path)
        assert (on_server / name).read_bytes() == content
    letters = await browse(broker, [settings.dead_queue("ingest")])
    assert [d.reason for d in letters] == ["checksum_mismatch"]
    # Nothing of the refused file reached the server, and no temporary stayed.
    assert sorted(p.name for p in on_server.rglob("*") if p.is_file()) == sorted(p.name for p, _ in files)
    async with await Catalogue.open(settings.catalogue.url) as cat:
        shown = await cat.queries.show_file(name_of(settings, files[0][0]))
    assert shown is not None and shown.adler32 == adler(files[0][1])
    assert [r.storage for r in shown.replicas] == ["disk1"]


async def _dead(broker, settings: Settings, n: int) -> bool:
    return await queue_depth(broker, settings.dead_queue("ingest")) == n
