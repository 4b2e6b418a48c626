"""The replicator killed (SIGKILL) twice while copying to a remote (XRootD) destination: every copy
made exactly once and verified on the server's disk, nothing partial under a final name, and the
temporaries the kills left swept by the next start."""

from __future__ import annotations

import signal
import zlib
from pathlib import Path

import pytest

from common.config import load_settings
from common.storage.devserver import LocalXrootd
from daemons.ingest.handlers import service as ingest_service
from tests.conftest import queue_depth, running, start_daemon, wait_for
from tests.replication_fixtures import (
    count_on,
    make_files,
    name_of,
    publish_ready,
    registered,
    replication_config,
)
from tests.xrootd_fixtures import remote_dir, xrootd_server  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def files_on_server(directory: Path) -> tuple[list[str], list[str]]:
    """(final files, temporaries) below ``directory``, as paths relative to it."""
    finals, temps = [], []
    for p in directory.rglob("*"):
        if p.is_file():
            (temps if ".spool-tmp-" in p.name else finals).append(p.relative_to(directory).as_posix())
    return sorted(finals), sorted(temps)


async def test_replicator_killed_while_copying_to_a_remote_endpoint(
    tmp_path: Path,
    tag: str,
    broker,
    xrootd_server: LocalXrootd,  # noqa: F811
    remote_dir: str,  # noqa: F811
) -> None:
    n = 300
    endpoint = (
        f'backend = "xrootd"\nurl = "{xrootd_server.root_url("site-b")}/{remote_dir}"\nmax_transfers = 8'
    )
    path = replication_config(
        tmp_path,
        tag,
        **{"storage.remote": endpoint, "rules.offsite": 'datasets = ".*"\nendpoints = "remote"'},
    )
    settings = load_settings(path)
    files = make_files(settings, n, size=256 * 1024)
    async with running([ingest_service], settings):
        await publish_ready(broker, settings, files)
        await wait_for(lambda: registered(settings, n), timeout=120)
    log = tmp_path / "replicator.log"
    proc = start_daemon(path, "replicator", log)
    try:
        for threshold in (40, 120):
            await wait_for(lambda t=threshold: _copied_at_least(settings, t), timeout=180, interval=0.02)
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=10) == -signal.SIGKILL
            assert await count_on(settings, "remote") < n, "the kill came too late to prove anything"
            proc = start_daemon(path, "replicator", log)
        await wait_for(lambda: _copied_at_least(settings, n), timeout=300, interval=0.2)
        # The last start swept what the kills left (in the background: wait for it).
        directory = xrootd_server.path("site-b", remote_dir)
        await wait_for(lambda: _no_temporaries(directory), timeout=60)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    assert code == 0, log.read_text()[-3000:]
    assert await queue_depth(broker, settings.dead_queue("replicator")) == 0
    finals, temps = files_on_server(directory)
    assert finals == sorted(name_of(settings, p) for p, _ in files)  # each exactly once
    assert temps == []
    for src, content in files:  # every final file complete and the catalogue's
        stored = (directory / name_of(settings, src)).read_bytes()
        assert zlib.adler32(stored) == zlib.adler32(content) and stored == content


async def _copied_at_least(settings, n: int) -> bool:
    return await count_on(settings, "remote") >= n


async def _no_temporaries(directory: Path) -> bool:
    return files_on_server(directory)[1] == []
