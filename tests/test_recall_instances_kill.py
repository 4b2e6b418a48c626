"""Two recall daemons on one PostgreSQL catalogue and one library (issue 19), real processes: they
share a request's cartridges, one is killed with SIGKILL in the middle of a read, and the other
puts its files back once its lease has run out and reads them. Every file is delivered once, the
request completes once, and no cartridge is read by both at once."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from sqlalchemy import Connection, select

from common.bus.topology import declare_topology
from common.catalogue import Catalogue
from common.catalogue import schema as s
from common.catalogue.sql import utcnow
from common.config import Settings, load_settings
from common.tape import SimulatedLibrary
from tests.catalogue_fixtures import pg_database
from tests.conftest import start_daemon, wait_for
from tests.recall_fixtures import (
    Events,
    archive,
    contents,
    recall_config,
    recalled_history,
    register,
    request,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Four drives (two mounts for each daemon); a 3 kB file takes 0.3 s to read, so a cartridge of 15
# files is one window read in 4.5 s, recorded every 2 s (``RECORD_SECONDS``): the kill lands after
# a first record, with files of the window still to read.
LIBRARY = (
    'root = "tape-library"\ndrives = 4\npools = { tape1 = 4, tape2 = 2 }\nscratch_cartridges = 0\n'
    "capacity_bytes = 4000000\ndurable = false\n"
)
SLOW = (
    "time_scale = 1.0\ntiming = { mount_seconds = 0.5, unmount_seconds = 0.5, locate_average_seconds = 0.0, "
    "read_rate = 10000.0 }"
)
LEASE = 3.0
# Two drives each: the first daemon to plan does not take every cartridge.
RECALL = "poll_interval = 0.1\nbuffer_wait = 1.0\nretry_delay = 0.5\npin_seconds = 3600\nmax_drives = 2"
VIDS = ["A00001", "A00002", "A00003", "A00004"]
PER_CARTRIDGE = 15
FILES = PER_CARTRIDGE * len(VIDS)


def _staging(conn: Connection) -> list[tuple[str, str]]:
    """(cartridge, holder) of every file ``staging`` whose holder's lease stands."""
    rf, inst = s.recall_files, s.instances
    live = select(inst.c.id).where(inst.c.expires > utcnow())
    stmt = select(rf.c.cartridge, rf.c.holder).where(
        rf.c.state == "staging", rf.c.holder.in_(live.scalar_subquery())
    )
    return [(x.cartridge, x.holder) for x in conn.execute(stmt)]


def _done(conn: Connection, rid: str) -> int:
    rf = s.recall_files
    return len(conn.execute(select(rf.c.name).where(rf.c.recall_id == rid, rf.c.state == "done")).all())


class Watch:
    """Samples the library's drives and the catalogue's live readers while the daemons run."""

    def __init__(self, settings: Settings, catalogue: Catalogue) -> None:
        self.settings, self.catalogue = settings, catalogue
        self.samples = 0
        self.two_drives: list[dict[str, list[str]]] = []  # a cartridge in two drives at once
        self.two_readers: list[dict[str, set[str]]] = []  # a cartridge read by two live instances
        self.readers: dict[str, set[str]] = defaultdict(set)  # cartridge -> instances seen reading it
        self.sessions: set[str] = set()  # library sessions seen holding a drive

    async def run(self) -> None:
        lib = await SimulatedLibrary.open(self.settings.tape_libraries["default"])
        try:
            while True:
                where: dict[str, list[str]] = defaultdict(list)
                for d in await lib.list_drives():
                    if d.vid is not None:
                        where[d.vid].append(d.drive_id)
                    if d.claim is not None:
                        self.sessions.add(d.claim)
                if any(len(v) > 1 for v in where.values()):
                    self.two_drives.append(dict(where))
                held: dict[str, set[str]] = defaultdict(set)
                for vid, holder in await self.catalogue.read(_staging):
                    held[vid].add(holder)
                    self.readers[vid].add(holder)
                if any(len(h) > 1 for h in held.values()):
                    self.two_readers.append(dict(held))
                self.samples += 1
                await asyncio.sleep(0.02)
        finally:
            await lib.close()


def _pid(holder: str) -> int:
    """The process of an instance id ``recall@node:pid:random``."""
    return int(holder.split(":")[-2])


async def test_two_recall_daemons_share_a_request_and_one_killed_mid_read_loses_nothing(
    tmp_path, tag, broker
) -> None:
    async with pg_database() as url:

        def config_with(library: str) -> Path:
            sections = {"tape_libraries.default": library, "recall": RECALL,
                        "catalogue": f'url = "{url}"\nlease_seconds = {LEASE}'}  # fmt: skip
            return recall_config(tmp_path, tag, **sections)

        files = contents(FILES)
        names = sorted(files)
        fast = load_settings(config_with(LIBRARY + "time_scale = 0.0"))  # archived at once
        await register(fast, files)
        n = PER_CARTRIDGE
        await archive(fast, {vid: names[i * n : (i + 1) * n] for i, vid in enumerate(VIDS)}, files)
        config = config_with(LIBRARY + SLOW)  # read slowly, by the daemons
        settings = load_settings(config)
        channel = await broker.channel()
        await declare_topology(channel, settings)  # the daemons are not up yet to declare it
        events = await Events.watch(broker, settings)
        logs = [tmp_path / "recall-1.log", tmp_path / "recall-2.log"]
        procs = [start_daemon(config, "recall", log) for log in logs]
        async with await Catalogue.open(url) as cat:

            async def both_up() -> bool:
                return len(await cat.instances.live_ids("recall", utcnow())) == 2

            await wait_for(both_up, timeout=60)
            watch = Watch(settings, cat)
            watcher = asyncio.create_task(watch.run())
            try:
                rid = await request(broker, settings, names=names)

                async def reading() -> Counter[str]:  # instance -> files it has staging now
                    return Counter(holder for _, holder in await cat.read(_staging))

                async def mid_read() -> bool:  # files recorded, and an instance with many to read
                    staging = await reading()
                    return await cat.read(_done, rid) >= 4 and max(staging.values(), default=0) >= 5

                await wait_for(mid_read, timeout=120, interval=0.02)
                ((holder, _),) = (await reading()).most_common(1)
                victim = next(p for p in procs if p.pid == _pid(holder))
                victim.send_signal(signal.SIGKILL)
                assert victim.wait(timeout=10) == -signal.SIGKILL
                assert await cat.read(_done, rid) < FILES, "the kill came too late to prove anything"
                survivor = next(p for p in procs if p is not victim)
                done = await events.completion(rid, timeout=180)

                # What the victim recorded but never announced is published by the survivor once
                # the victim's lease has run out.
                async def announced() -> bool:
                    await events.poll()
                    return set(events.recalled(rid)) == set(names)

                await wait_for(announced, timeout=60)
            finally:
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)
                for proc in procs:
                    if proc.poll() is None:
                        proc.send_signal(signal.SIGTERM)
                codes = [_wait(proc) for proc in procs]

            assert codes[procs.index(survivor)] == 0, logs[procs.index(survivor)].read_text()[-3000:]
            assert (done["files"], done["failed"]) == (FILES, [])
            assert await cat.read(_done, rid) == FILES
            # Each file delivered once: one fact in its history, one message id on the bus (an
            # announcement repeated after a kill keeps its id); one completion.
            await events.poll()
            ids: dict[str, set[str | None]] = defaultdict(set)
            for key, body, message_id in events.seen:
                ids[body.get("name") or key].add(message_id)
            assert {n: len(ids[n]) for n in names} == dict.fromkeys(names, 1)
            assert len(ids["recall.completed"]) == 1
            for name in names:
                assert await recalled_history(settings, name) == 1, name
                assert (settings.storage["disk2"].root / name).read_bytes() == files[name]
            # The work was shared, and taken over: both instances read cartridges, the survivor
            # among them the victim's (its files put back after the lease and read again).
            readers = {h for hs in watch.readers.values() for h in hs}
            assert {_pid(h) for h in readers} == {p.pid for p in procs}, watch.readers
            assert any(len({_pid(h) for h in watch.readers[v]}) == 2 for v in watch.readers), (
                "no cartridge changed hands"
            )
            assert watch.samples > 50
            assert watch.two_drives == [] and watch.two_readers == []
            survivor_log = logs[procs.index(survivor)].read_text()
            assert "recall_reads_reclaimed" in survivor_log


def _wait(proc: subprocess.Popen[bytes]) -> int:
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        return proc.wait()
