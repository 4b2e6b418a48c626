"""Recall to a remote destination (XRootD, WebDAV), against the real XRootD server: files read off
tape are staged on this node, verified, uploaded (the server's checksum checks them) and the
staging file removed; files that still have a disk copy are copied by the destination's
``copy_from`` without a mount. The bytes on the server are the files'; nothing is left in staging
and no temporary on the server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from common.config import load_settings
from common.storage.devserver import LocalXrootd
from daemons.recall.handlers import service as recall_service
from tests.cli_fixtures import spool
from tests.conftest import running
from tests.recall_fixtures import (
    Events,
    archive,
    contents,
    mounts,
    recall_config,
    register,
    replica,
    request,
    status,
)
from tests.xrootd_fixtures import remote_dir, xrootd_server  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def remote_config(tmp_path: Path, tag: str, server: LocalXrootd, where: str) -> Path:
    """The recall config with two remote disk endpoints: x1 (root://) and h1 (https), their
    directories made on the server as a site's would be (XRootD answers ``query space`` of a
    missing directory with ``oss.free=0``: the recall would wait for room for ever)."""
    for endpoint in ("x1", "h1"):
        directory = on_server(server, where, endpoint)
        directory.mkdir(parents=True)
        for made in (directory, directory.parent):
            made.chmod(0o777)  # the server's user writes below them
    return recall_config(
        tmp_path, tag,
        **{
            "storage.x1": f'backend = "xrootd"\nurl = "{server.root_url("site-a")}/{where}/x1"',
            "storage.h1": f'backend = "https"\nurl = "{server.https_url("site-b")}/{where}/h1"\n'
            f'ca_path = "{server.ca_file}"',
        },
    )  # fmt: skip


def on_server(server: LocalXrootd, where: str, endpoint: str) -> Path:
    site = "site-a" if endpoint == "x1" else "site-b"
    return server.path(site, f"{where}/{endpoint}")


def files_below(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


@pytest.mark.parametrize("endpoint", ["x1", "h1"])
async def test_files_read_off_tape_are_uploaded_to_a_remote_destination(
    tmp_path: Path,
    tag: str,
    broker,
    xrootd_server: LocalXrootd,  # noqa: F811
    remote_dir: str,  # noqa: F811
    endpoint: str,
) -> None:
    path = remote_config(tmp_path, tag, xrootd_server, remote_dir)
    settings = load_settings(path)
    files = contents(6, size=120_000)
    names = sorted(files)
    await register(settings, files)  # on tape only
    await archive(settings, {"A00001": names[:3], "A00002": names[3:]}, files)
    staging = settings.state_dir / "recall-staging" / endpoint
    staging.mkdir(parents=True)
    (staging / "3.0123456789ab").write_bytes(b"left by a killed recall daemon")
    before = await mounts(settings)

    async with running([recall_service], settings):
        events = await Events.watch(broker, settings)
        rid = await request(broker, settings, names=names, destination=endpoint)
        done = await events.completion(rid)

    assert (done["files"], done["failed"]) == (6, [])
    assert sorted(events.recalled(rid)) == names
    assert await mounts(settings) - before == 2
    remote = on_server(xrootd_server, remote_dir, endpoint)
    for name in names:
        assert (remote / name).read_bytes() == files[name]
        copy = await replica(settings, name, endpoint)
        assert copy.state == "available" and copy.tombstone is not None  # pinned
    assert files_below(remote) == names  # no temporary left on the server
    assert files_below(staging) == []  # the leftover went at start-up, each read's after it


async def test_files_with_a_disk_copy_are_copied_to_remote_destinations_without_a_mount_and_evicted(
    tmp_path: Path,
    tag: str,
    broker,
    xrootd_server: LocalXrootd,  # noqa: F811
    remote_dir: str,  # noqa: F811
) -> None:
    path = remote_config(tmp_path, tag, xrootd_server, remote_dir)
    settings = load_settings(path)
    files = contents(4, size=80_000)
    names = sorted(files)
    await register(settings, files, keep_on_disk=set(names))
    await archive(settings, {"A00001": names}, files)
    before = await mounts(settings)

    async with running([recall_service], settings):
        events = await Events.watch(broker, settings)
        to_x1 = await request(broker, settings, names=names, destination="x1")  # posix -> xrootd
        assert (await events.completion(to_x1))["failed"] == []
        to_h1 = await request(broker, settings, names=names[:2], destination="h1")  # a disk copy -> https
        assert (await events.completion(to_h1))["failed"] == []

    assert await mounts(settings) == before
    for endpoint, wanted in (("x1", names), ("h1", names[:2])):
        remote = on_server(xrootd_server, remote_dir, endpoint)
        assert files_below(remote) == wanted
        for name in wanted:
            assert (remote / name).read_bytes() == files[name]
            assert (await replica(settings, name, endpoint)).state == "available"
    assert not (settings.state_dir / "recall-staging").exists() or all(
        files_below(d) == [] for d in (settings.state_dir / "recall-staging").iterdir()
    )

    # ``spool rse evict`` deletes through the backend: from h1 (https) at once ...
    evicted = spool(path, "rse", "evict", "h1", *names[:2], "--yes", "--json")
    assert evicted.returncode == 0, evicted.stderr
    assert json.loads(evicted.stdout) == {"evicted": names[:2], "kept": []}
    assert files_below(on_server(xrootd_server, remote_dir, "h1")) == []
    # ... from x1 (root://): a directory the server may not write refuses the first delete, which
    # is reported (exit 1) and stops the eviction; the copy waits as ``deleting``, the file stays.
    x1 = on_server(xrootd_server, remote_dir, "x1")
    locked = x1 / Path(names[0]).parent
    locked.chmod(0o555)
    try:
        refused = spool(path, "rse", "evict", "x1", *names, "--yes", "--json")
    finally:
        locked.chmod(0o777)
    assert refused.returncode == 1, refused.stderr
    report = json.loads(refused.stdout)
    assert (report["evicted"], report["kept"]) == ([], [])
    [failure] = report["failed"]
    assert failure["name"] == names[0] and failure["reason"] == "auth_failed"
    assert (await replica(settings, names[0], "x1")).state == "deleting"
    assert files_below(x1) == names
    again = spool(path, "rse", "evict", "x1", *names, "--yes", "--json")
    assert again.returncode == 0, again.stderr
    # The copy left ``deleting`` is the reaper's now (it retries its own claims), not evict's.
    assert json.loads(again.stdout) == {"evicted": names[1:], "kept": []}
    assert files_below(x1) == names[:1]
    assert [await replica(settings, n, "x1") for n in names[1:]] == [None] * 3  # rows gone


async def test_a_destination_refusing_the_upload_keeps_the_files_queued_and_staging_empty(
    tmp_path: Path,
    tag: str,
    broker,
    xrootd_server: LocalXrootd,  # noqa: F811
    remote_dir: str,  # noqa: F811
) -> None:
    path = remote_config(tmp_path, tag, xrootd_server, remote_dir)
    settings = load_settings(path)
    files = contents(3, size=50_000)
    names = sorted(files)
    await register(settings, files)
    await archive(settings, {"A00001": names}, files)
    remote = on_server(xrootd_server, remote_dir, "x1")
    staging = settings.state_dir / "recall-staging" / "x1"
    remote.chmod(0o555)  # the server may not write there: every upload is refused
    try:
        async with running([recall_service], settings):
            events = await Events.watch(broker, settings)
            rid = await request(broker, settings, names=names, destination="x1")
            await asyncio.sleep(3)  # reads and refused uploads, retried every retry_delay
            await events.poll()
            assert events.recalled(rid) == []
            view = await status(settings, rid)
            assert view is not None and (view.state, view.done, view.failed) == ("active", 0, 0)
            assert files_below(staging) == []  # each refused upload's staging file removed
            remote.chmod(0o777)
            done = await events.completion(rid)
    finally:
        remote.chmod(0o777)
    assert (done["files"], done["failed"]) == (3, [])
    for name in names:
        assert (remote / name).read_bytes() == files[name]
    assert files_below(remote) == names
    assert files_below(staging) == []
