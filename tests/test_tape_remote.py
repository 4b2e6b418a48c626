"""Archiving to tape from a remote disk copy (XRootD, WebDAV), against the real XRootD server: the
file's only disk copy is on the server; the tape daemon downloads it to a node-local staging file,
verified, writes it to the simulated tape from there and removes the staging file. A remote copy
that is corrupt on the server is marked bad and its file fails (no other source); a staging file
a killed daemon left is removed at start-up."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from common.catalogue import Source
from common.config import Settings, load_settings
from common.storage import PosixStorage
from common.storage.devserver import LocalXrootd
from daemons.ingest.handlers import service as ingest_service
from daemons.tape.handlers import service as tape_service
from daemons.tape.staging import prefer_local, staging_dir
from tests.cli_fixtures import spool
from tests.conftest import queue_depth, running, wait_for
from tests.replication_fixtures import count_on, make_files, name_of, publish_ready
from tests.tape_fixtures import as_json, bind, drain, names_on_tape, on_tape, tape_config, tape_copies
from tests.xrootd_fixtures import remote_dir, xrootd_server  # noqa: F401  (fixtures)

pytestmark = pytest.mark.integration
SERVICES = [ingest_service, tape_service]
# A batch waits for 5 queued files (never for age): the test corrupts one before the mount.
POLICY = "mount_min_files = 5\nmount_min_bytes = 1000000000\nmount_max_age = 3600\npoll_interval = 0.1"
# Tapes large enough for the batch on one or two cartridges.
LIBRARY = (
    'root = "tape-library"\ndrives = 2\npools = { raw = 3 }\nscratch_cartridges = 1\n'
    "capacity_bytes = 1000000\ntime_scale = 0\ndurable = false"
)


def remote_disk1(tmp_path: Path, tag: str, server: LocalXrootd, where: str, backend: str) -> Path:
    """The tape config, its first (ingest's) disk endpoint on the server: the only disk copy."""
    path = tape_config(tmp_path, tag, library=LIBRARY, policy=POLICY)
    if backend == "xrootd":
        endpoint = f'backend = "xrootd"\nurl = "{server.root_url("site-a")}/{where}"'
    else:
        url = server.https_url("site-a")
        endpoint = f'backend = "https"\nurl = "{url}/{where}"\nca_path = "{server.ca_file}"'
    text = path.read_text()
    assert 'root = "storage/disk1"' in text
    path.write_text(text.replace('root = "storage/disk1"', endpoint, 1))
    return path


def corrupt_behind_the_server(path: Path) -> None:
    """Flip one byte (same size: only a checksum tells) and move the modification time on, so the
    server recomputes its cached adler32 (with the time kept it would go on reporting the good one,
    and the download's mismatch could not be told from a transfer's: the copy would stay queued)."""
    before = path.stat()
    data = bytearray(path.read_bytes())
    data[1000] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 2_000_000_000))


async def _count(settings: Settings, storage: str, n: int, state: str = "available") -> bool:
    return await count_on(settings, storage, state) == n


@pytest.mark.parametrize("backend", ["xrootd", "https"])
async def test_files_whose_only_disk_copy_is_remote_are_archived_through_a_staging_file(
    tmp_path: Path,
    tag: str,
    broker,
    xrootd_server: LocalXrootd,  # noqa: F811
    remote_dir: str,  # noqa: F811
    backend: str,
) -> None:
    path = remote_disk1(tmp_path, tag, xrootd_server, remote_dir, backend)
    settings = load_settings(path)
    staging = staging_dir(settings.state_dir)
    staging.mkdir(parents=True)
    (staging / "7.deadbeef0000").write_bytes(b"left by a killed tape daemon")
    files = make_files(settings, 5, size=150_000)
    names = [name_of(settings, p) for p, _ in files]
    corrupt = names[1]
    async with running(SERVICES, settings):
        assert list(staging.iterdir()) == []  # the leftover went at start-up
        failed = await bind(broker, settings, "file.failed")
        await publish_ready(broker, settings, files[:4])
        await wait_for(lambda: _count(settings, "tape1", 4, "queued"), timeout=60)
        corrupt_behind_the_server(xrootd_server.path("site-a", f"{remote_dir}/{corrupt}"))
        await publish_ready(broker, settings, files[4:])
        await wait_for(lambda: _count(settings, "tape1", 4), timeout=60)
        await wait_for(lambda: _count(settings, "tape1", 1, "failed"), timeout=30)
        assert await queue_depth(broker, settings.dead_queue("tape")) == 0
    copies = await tape_copies(settings)
    lib_root = settings.tape_libraries["default"].root
    for (_, content), name in zip(files, names, strict=True):
        if name == corrupt:
            continue
        state, vid, fseq = copies[name]
        assert state == "available"
        assert fseq is not None
        assert (lib_root / "cartridges" / str(vid) / f"{fseq:08d}").read_bytes() == content
    assert names_on_tape(await on_tape(settings)) == sorted(n for n in names if n != corrupt)
    # The corrupt copy is marked bad (the server's checksum says so) and the file fails.
    [(_, event)] = await drain(failed)
    assert (event["name"], event["reason"]) == (corrupt, "no_source")
    shown = as_json(spool(path, "show", corrupt, "--json"))
    assert {r["storage"]: r["state"] for r in shown["replicas"]} == {"disk1": "bad", "tape1": "failed"}
    # Nothing left in staging; the server holds the files and no temporary.
    assert list(staging.iterdir()) == []
    held = sorted(p.name for p in xrootd_server.path("site-a", remote_dir).rglob("*") if p.is_file())
    assert held == sorted(Path(n).name for n in names)


def test_a_mounted_copy_is_preferred_to_a_remote_one(tmp_path: Path) -> None:
    local = PosixStorage("local", tmp_path)
    remote = object()  # anything that is not mounted here
    sources = [Source("far", "a"), Source("local", "a"), Source("gone", "a")]
    ordered = prefer_local(sources, {"local": local, "far": remote})  # type: ignore[dict-item]
    assert [s.storage for s in ordered] == ["local", "far", "gone"]
