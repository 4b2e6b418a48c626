"""Two tape daemon processes sharing one simulated library and one PostgreSQL catalogue (issue 19):
both write the pool's queue; one is killed (SIGKILL) in the middle of a batch; once its lease has
run out the survivor settles its copies against the cartridges and writes the rest. Every file
ends ``available`` on tape once in the catalogue, and no file is committed twice in the library."""

from __future__ import annotations

import json
import signal
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, func, select

from common.catalogue import Catalogue
from common.catalogue import schema as s
from common.config import Settings, load_settings
from daemons.ingest.handlers import service as ingest_service
from tests.catalogue_fixtures import pg_database
from tests.conftest import queue_depth, running, start_daemon, wait_for
from tests.replication_fixtures import count_on, make_files, name_of, publish_ready
from tests.tape_fixtures import listed, names_on_tape, on_tape, placed, tape_config, tape_copies

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FILES = 300
# Three drives (two writers, one spare), four 1 MB cartridges for the pool; real sleeps, short
# enough that the whole run takes about half a minute and long enough that a kill lands in the
# middle of a batch: a 2 kB file takes 0.06 s to write, a flush (synchronous tape mark) 0.3 s.
LIBRARY = (
    'root = "tape-library"\ndrives = 3\npools = { raw = 4 }\nscratch_cartridges = 0\n'
    "capacity_bytes = 1000000\ntime_scale = 1\ndurable = true\n"
    "timing = { mount_seconds = 0.3, unmount_seconds = 0.3, locate_average_seconds = 0.2,"
    " write_rate = 40000, read_rate = 40000, sync_seconds = 0.3 }"
)
# Batches of 40 files, so both instances write batches of the pool side by side.
POLICY = (
    "mount_min_files = 5\nmount_min_bytes = 1000000000\nmount_max_age = 0.5\npoll_interval = 0.1\n"
    "batch_max_files = 40\nflush_files = 10\nrecord_every = 10"
)


def _holders(conn: Connection) -> dict[str, int]:
    """instance id -> copies ``archiving`` it holds."""
    r = s.replicas
    stmt = select(r.c.holder, func.count()).where(r.c.state == "archiving").group_by(r.c.holder)
    return {holder: n for holder, n in conn.execute(stmt)}


async def _archiving_of(settings: Settings) -> dict[int, int]:
    """pid -> copies ``archiving`` its instance holds (an instance id is ``tape@node:pid:random``)."""
    async with await Catalogue.open(settings.catalogue.url) as cat:
        held = await cat.read(_holders)
    return {int(h.split(":")[-2]): n for h, n in held.items() if h is not None}


def _reconciled(log: Path) -> list[dict[str, Any]]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("event") == "archive_reconciled":
            out.append(entry)
    return out


@asynccontextmanager
async def _catalogue(backend: str) -> AsyncIterator[str]:
    """The ``[catalogue]`` section: a fresh PostgreSQL database, or the node's SQLite file."""
    if backend == "sqlite":
        yield "lease_seconds = 3"
        return
    async with pg_database() as url:
        yield f'url = "{url}"\nlease_seconds = 3'


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
async def test_two_tape_daemons_share_a_library_and_the_survivor_settles_a_killed_ones_copies(
    tmp_path: Path, tag: str, broker, backend: str
) -> None:
    """PostgreSQL: as on two nodes; SQLite: two daemons of one node sharing its catalogue."""
    async with _catalogue(backend) as catalogue:
        path = tape_config(tmp_path, tag, library=LIBRARY, policy=POLICY, catalogue=catalogue)
        settings = load_settings(path)
        files = make_files(settings, FILES, size=2000)
        async with running([ingest_service], settings):
            await publish_ready(broker, settings, files)
            await wait_for(lambda: _queued(settings, FILES), timeout=120)

        logs = [tmp_path / "tape-a.log", tmp_path / "tape-b.log"]
        procs = [start_daemon(path, "tape", log) for log in logs]
        try:
            # Both write; the victim is killed while it holds copies of a batch in flight.
            async def both_writing() -> bool:
                held = await _archiving_of(settings)
                return all(held.get(p.pid, 0) > 0 for p in procs) and await count_on(settings, "tape1") >= 60

            victim = procs[0]
            # Frozen first (SIGSTOP), then killed only while it holds copies: on a loaded machine
            # its batch could end between a look and the kill, leaving nothing to settle.
            left = 0
            for _ in range(20):
                await wait_for(both_writing, timeout=120, interval=0.05)
                victim.send_signal(signal.SIGSTOP)
                left = (await _archiving_of(settings)).get(victim.pid, 0)
                if left > 0:
                    break
                victim.send_signal(signal.SIGCONT)
            assert left > 0, "the victim never held copies of a batch when looked at"
            victim.send_signal(signal.SIGKILL)
            assert victim.wait(timeout=10) == -signal.SIGKILL
            assert await count_on(settings, "tape1") < FILES, "the kill came too late to prove anything"

            await wait_for(lambda: _available(settings, FILES), timeout=240, interval=0.2)
            await wait_for(lambda: _depth_is(broker, settings.queue("tape"), 0), timeout=60)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            codes = [proc.wait(timeout=60) for proc in procs]
        assert codes[1] == 0, logs[1].read_text()[-3000:]  # the survivor stops cleanly

        # The survivor settled the victim's copies (once its lease had run out) and took the rest.
        settled = [e for e in _reconciled(logs[1]) if any(f":{victim.pid}:" in str(h) for h in e["holders"])]
        assert settled, logs[1].read_text()[-3000:]
        assert sum(int(e["recorded_from_tape"]) + int(e["requeued"]) for e in settled) >= left

        copies = await tape_copies(settings)
        tapes = await on_tape(settings)
        names = sorted(name_of(settings, p) for p, _ in files)
        # Every file available on tape once in the catalogue ...
        assert sorted(copies) == names and {st for st, _, _ in copies.values()} == {"available"}
        # ... committed once in the library (every cartridge listed): none written twice ...
        committed = Counter(name for files_on in tapes.values() for _, name in files_on)
        assert [n for n, k in committed.items() if k > 1] == []
        assert names_on_tape(tapes) == names
        # ... and where the catalogue says it is, with the file's bytes.
        assert placed(copies) == listed(tapes)
        root = settings.tape_libraries["default"].root
        for p, content in files:
            _, vid, fseq = copies[name_of(settings, p)]
            assert (root / "cartridges" / str(vid) / f"{fseq:08d}").read_bytes() == content
        # Both wrote (the survivor's cartridges and the victim's).
        assert sum(1 for on_cart in tapes.values() if on_cart) >= 2
        async with await Catalogue.open(settings.catalogue.url) as cat:
            assert await cat.read(_holders) == {}  # nothing left archiving
            instances = await cat.instances.listing("tape")
        # The survivor stopped cleanly (its row removed); the victim's stays, expired.
        assert [i.pid for i in instances] == [victim.pid]


async def _queued(settings: Settings, n: int) -> bool:
    return await count_on(settings, "tape1", "queued") == n


async def _available(settings: Settings, n: int) -> bool:
    return await count_on(settings, "tape1") == n


async def _depth_is(broker, name: str, n: int) -> bool:  # type: ignore[no-untyped-def]
    return await queue_depth(broker, name) == n
