"""The recall scheduler without a broker: a real catalogue, library and disk buffer, a recording
publisher. Late requests join a running mount when they are ahead of the head; priority orders
mounts."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from common.bus.publisher import RecordingPublisher
from common.catalogue import Catalogue, IngestRecord
from common.catalogue import recall as db
from common.config import RecallSettings, StorageEndpoint
from common.messages import FileRecalled, RecallCompleted
from common.storage import PosixStorage
from common.tape import SimulatedLibrary, SimulatedLibraryConfig, TapeTiming
from daemons.recall.announce import Announcer
from daemons.recall.scheduler import Scheduler
from tests.conftest import wait_for
from tests.storage_fixtures import adler

SIZE = 2000


@dataclass
class Rig:
    catalogue: Catalogue
    library: SimulatedLibrary
    scheduler: Scheduler
    publisher: RecordingPublisher

    async def recall(self, rid: str, *names: str, priority: int = 3) -> None:
        spec = db.RecallSpec(id=rid, destination="buffer", priority=priority, names=names)
        await self.catalogue.recall.create_recall(spec)
        self.scheduler.wake()

    def recalled(self) -> list[str]:
        return [m.name for m in self.publisher.of_type(FileRecalled)]

    def completed(self) -> list[str]:
        return [m.request_id for m in self.publisher.of_type(RecallCompleted)]


async def _archive(tmp_path: Path, cat: Catalogue, lib: SimulatedLibrary, layout: dict[str, int]) -> None:
    """``layout``: vid -> number of files, named ``<vid>/<fseq>``; only their tape copy is left."""
    source = tmp_path / "source"
    for vid, n in layout.items():
        await lib.mount("DR01", vid)
        for fseq in range(1, n + 1):
            name = f"{vid}/{fseq}"
            data = os.urandom(SIZE)
            source.write_bytes(data)
            checksum = adler(data)
            assert await lib.write("DR01", source, name, SIZE, checksum) == fseq
            await cat.ingest.register(
                [IngestRecord(event_id=name, name=name, dataset="lst1.20261124.run000001.dl0", size=SIZE,
                              adler32=checksum, storage="landing", pfn=name)]
            )  # fmt: skip
            await cat.replication.set_replica(name=name, storage="landing", pfn=name, state="deleted")
            await cat.replication.set_replica(
                name=name, storage="tape1", pfn=name, state="available", cartridge=vid, fseq=fseq
            )
    await lib.unmount("DR01")


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    endpoints = {
        "landing": StorageEndpoint(root=tmp_path / "landing"),
        "buffer": StorageEndpoint(root=tmp_path / "buffer"),
        "tape1": StorageEndpoint(kind="tape", backend="simulated", library="lib"),
    }
    # One drive; a read takes 0.8 s of real time (late requests have time to arrive), mounts none.
    timing = TapeTiming(mount_seconds=0, unmount_seconds=0, locate_average_seconds=0, read_rate=SIZE / 0.8)
    config = SimulatedLibraryConfig(
        root=tmp_path / "lib", drives=1, pools={"tape1": 2}, scratch_cartridges=0, capacity_bytes=10**6,
        timing=timing, time_scale=0.0, durable=False,
    )  # fmt: skip
    cat = await Catalogue.open(f"sqlite+aiosqlite:///{tmp_path}/catalogue.db")
    await cat.endpoints.sync(endpoints)
    lib = await SimulatedLibrary.open(config)
    await _archive(tmp_path, cat, lib, {"A00001": 10, "A00002": 3})
    await lib.close()
    lib = await SimulatedLibrary.open(config.model_copy(update={"time_scale": 1.0}))
    storage = PosixStorage("buffer", endpoints["buffer"])
    publisher = RecordingPublisher()
    scheduler = Scheduler(
        catalogue=cat, libraries={"lib": lib}, storages={"buffer": storage}, endpoints=endpoints,
        settings=RecallSettings(poll_interval=0.05), announcer=Announcer(cat, publisher),
    )  # fmt: skip
    # Each file recorded as soon as read (a window still stages and reads together): the late
    # requests below are sent once A00001/4 is announced, while the window is being read.
    scheduler.record_seconds = 0.0
    await scheduler.start()
    try:
        yield Rig(cat, lib, scheduler, publisher)
    finally:
        await scheduler.stop()
        await lib.close()
        storage.close()
        await cat.close()


async def test_a_late_request_ahead_of_the_head_joins_the_mount_and_one_behind_waits(rig: Rig) -> None:
    runner = asyncio.create_task(rig.scheduler.run())
    try:
        await rig.recall("first", *(f"A00001/{n}" for n in (2, 4, 6, 8, 10)))

        async def read_up_to_4() -> bool:
            return "A00001/4" in rig.recalled()

        await wait_for(read_up_to_4, timeout=30, interval=0.01)
        await rig.recall("ahead", "A00001/7")
        await rig.recall("behind", "A00001/1")

        async def all_done() -> bool:
            return len(rig.completed()) == 3

        await wait_for(all_done, timeout=30)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)

    assert rig.recalled() == [f"A00001/{n}" for n in (2, 4, 6, 7, 8, 10, 1)]
    assert rig.completed() == ["ahead", "first", "behind"]


async def test_priority_orders_mounts(rig: Rig) -> None:
    await rig.recall("bulk", "A00001/1", "A00001/2", priority=2)
    await rig.recall("urgent", "A00002/3", priority=9)
    before = (await rig.library.usage()).total.mounts

    await rig.scheduler.until_idle()

    assert rig.recalled() == ["A00002/3", "A00001/1", "A00001/2"]
    assert rig.completed() == ["urgent", "bulk"]
    assert (await rig.library.usage()).total.mounts - before == 2


async def test_a_destination_the_operator_took_offline_waits_then_receives(rig: Rig) -> None:
    await rig.catalogue.endpoints.set_state("buffer", "readonly")
    await rig.recall("r", "A00002/1")
    for _ in range(3):
        await rig.scheduler.pass_once()
    assert rig.recalled() == []

    await rig.catalogue.endpoints.set_state("buffer", "online")
    await rig.scheduler.until_idle()
    assert (rig.recalled(), rig.completed()) == (["A00002/1"], ["r"])
