"""The recall scheduler without a broker: a real catalogue, library and disk buffer, a recording
publisher. Late requests join a running mount when they are ahead of the head; priority orders
mounts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from common.bus.publisher import RecordingPublisher
from common.catalogue import Catalogue
from common.catalogue import recall as db
from common.config import RecallSettings
from common.messages import FileRecalled, RecallCompleted
from common.storage import PosixStorage
from common.tape import SimulatedLibrary, SimulatedLibraryConfig, TapeLibrary, TapeTiming
from daemons.recall.announce import Announcer
from daemons.recall.scheduler import Scheduler
from daemons.recall.steps import CartridgeKey
from tests.conftest import wait_for
from tests.recall_fixtures import SIZE, archive_on_tape, recall_endpoints


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


@asynccontextmanager
async def _rig(tmp_path: Path, layout: dict[str, int], read_seconds: float) -> AsyncIterator[Rig]:
    endpoints = recall_endpoints(tmp_path)
    # One drive; a read takes ``read_seconds`` of real time (late requests have time to arrive),
    # mounts none.
    timing = TapeTiming(
        mount_seconds=0, unmount_seconds=0, locate_average_seconds=0, read_rate=SIZE / max(read_seconds, 1e-3)
    )
    config = SimulatedLibraryConfig(
        root=tmp_path / "lib", drives=1, pools={"tape1": 2}, scratch_cartridges=0, capacity_bytes=10**6,
        timing=timing, time_scale=0.0, durable=False,
    )  # fmt: skip
    cat = await Catalogue.open(f"sqlite+aiosqlite:///{tmp_path}/catalogue.db")
    await cat.endpoints.sync(endpoints)
    lib = await SimulatedLibrary.open(config)
    await archive_on_tape(tmp_path, cat, lib, layout)
    await lib.close()
    lib = await SimulatedLibrary.open(config.model_copy(update={"time_scale": 1.0 if read_seconds else 0.0}))
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


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    async with _rig(tmp_path, {"A00001": 10, "A00002": 3}, 0.8) as r:
        yield r


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


# --- read-ahead windows (issue 18) ------------------------------------------------------------------
async def _states(rig: Rig, rid: str) -> dict[str, str]:
    view = await rig.catalogue.recall.status(rid)
    assert view is not None
    return {x.name: x.state for x in view.file_states}


async def test_a_windows_files_go_staging_together_before_the_first_is_read(rig: Rig) -> None:
    await rig.recall("r", *(f"A00001/{n}" for n in (1, 3, 5)))
    runner = asyncio.create_task(rig.scheduler.run())
    try:

        async def staged() -> bool:
            return "staging" in (await _states(rig, "r")).values()

        await wait_for(staged, timeout=30, interval=0.01)
        assert await _states(rig, "r") == dict.fromkeys(("A00001/1", "A00001/3", "A00001/5"), "staging")
        assert rig.recalled() == []

        async def done() -> bool:
            return rig.completed() == ["r"]

        await wait_for(done, timeout=30)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
    assert rig.recalled() == ["A00001/1", "A00001/3", "A00001/5"]


async def test_a_bad_copy_in_a_window_fails_that_file_alone(tmp_path: Path) -> None:
    async with _rig(tmp_path, {"A00001": 8}, 0.0) as rig:
        rig.scheduler.read_window = 3  # the bad file in the middle of the second window
        path = rig.library.data_path("A00001", 5)
        data = bytearray(path.read_bytes())
        data[10] ^= 0xFF
        path.write_bytes(bytes(data))
        await rig.recall("r", *(f"A00001/{n}" for n in range(1, 9)))

        await rig.scheduler.until_idle()

        states = await _states(rig, "r")
        assert states.pop("A00001/5") == "failed"
        assert set(states.values()) == {"done"}
        assert rig.recalled() == [f"A00001/{n}" for n in (1, 2, 3, 4, 6, 7, 8)]
        [completion] = rig.publisher.of_type(RecallCompleted)
        assert completion.failed == ["A00001/5"]


async def test_a_window_takes_the_files_that_fit_and_a_full_buffer_waits(tmp_path: Path) -> None:
    async with _rig(tmp_path, {"A00001": 6}, 0.0) as rig:
        scheduler = rig.scheduler
        full_until = asyncio.get_running_loop().time() + 0.3
        windows: list[int] = []
        read_window = scheduler._read_window

        async def free(destination: str) -> int | None:  # full at first, then room for 2.5 files
            return 0 if asyncio.get_running_loop().time() < full_until else 5 * SIZE // 2

        async def counted(key: CartridgeKey, library: TapeLibrary, drive: str, groups: Any) -> int:
            windows.append(len(groups))
            return await read_window(key, library, drive, groups)

        scheduler._free = free  # type: ignore[method-assign]
        scheduler._read_window = counted  # type: ignore[method-assign]
        await rig.recall("r", *(f"A00001/{n}" for n in range(1, 7)))
        await scheduler.pass_once()  # plans with the room known then: no mount while full
        await asyncio.sleep(0.4)
        await scheduler.until_idle()

        assert windows and max(windows) <= 2 and sum(windows) == 6
        assert rig.recalled() == [f"A00001/{n}" for n in range(1, 7)]
        assert scheduler.in_flight["buffer"] == 0


async def test_a_mount_stopped_mid_window_then_restarted_delivers_every_file_once(tmp_path: Path) -> None:
    async with _rig(tmp_path, {"A00001": 6}, 0.3) as rig:
        rig.scheduler.record_seconds = 3600.0  # read files stay unrecorded until the window ends
        names = [f"A00001/{n}" for n in range(1, 7)]
        await rig.recall("r", *names)
        await rig.scheduler.pass_once()
        await asyncio.sleep(1.0)  # a few files read and in place, none recorded
        await rig.scheduler.stop()  # as a kill: nothing more is written
        assert rig.recalled() == []
        assert set((await _states(rig, "r")).values()) == {"staging"}

        again = Scheduler(
            catalogue=rig.catalogue, libraries={"lib": rig.library},
            storages=rig.scheduler.storages, endpoints=recall_endpoints(tmp_path),
            settings=rig.scheduler.settings, announcer=Announcer(rig.catalogue, rig.publisher),
        )  # fmt: skip
        await again.start()
        await again.until_idle()

        assert sorted(rig.recalled()) == names  # each once
        assert rig.completed() == ["r"]
        assert all((tmp_path / "buffer" / n).exists() for n in names)


async def test_catalogue_statements_of_a_pass_do_not_grow_with_the_files(tmp_path: Path) -> None:
    """Planning, staging, reading and completing requests costs a number of catalogue statements
    that does not depend on how many files they hold (each a request of its own, the worst case)."""

    async def statements(where: Path, n: int) -> int:
        async with _rig(where, {"A00001": n}, 0.0) as rig:
            rig.scheduler.record_seconds = 3600.0  # recorded per window, as with the defaults
            for i in range(1, n + 1):
                await rig.recall(f"r{i:03d}", f"A00001/{i}")
            count = 0

            def counted(*_: object) -> None:
                nonlocal count
                count += 1

            engines = [rig.catalogue._engine.sync_engine]
            if rig.catalogue._sync_engine is not None:
                engines.append(rig.catalogue._sync_engine)
            for engine in engines:
                event.listen(engine, "before_cursor_execute", counted)
            try:
                await rig.scheduler.until_idle()
            finally:
                for engine in engines:
                    event.remove(engine, "before_cursor_execute", counted)
            assert len(rig.completed()) == n
            return count

    few = await statements(tmp_path / "few", 10)
    many = await statements(tmp_path / "many", 60)
    assert many <= few + 5, (few, many)


async def test_mounts_of_the_standing_plan_start_without_reading_the_queue_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One drive, two cartridges: the second mount starts from the plan the first pass made; the
    queue is read again only once the plan is used up (to find nothing left)."""
    reads = 0
    pending = db.pending

    def counted(*args: Any) -> list[db.PendingFile]:
        nonlocal reads
        reads += 1
        return pending(*args)

    monkeypatch.setattr(db, "pending", counted)
    async with _rig(tmp_path, {"A00001": 3, "A00002": 3}, 0.0) as rig:
        await rig.recall("r", "A00001/1", "A00001/3", "A00002/2")

        await rig.scheduler.until_idle()

        assert rig.completed() == ["r"] and reads == 2
        await rig.recall("late", "A00002/3")  # a request makes the next pass read the queue
        await rig.scheduler.until_idle()
        assert rig.completed() == ["r", "late"] and reads == 4


def test_a_queue_slow_to_read_keeps_its_plan_longer_so_reading_stays_a_small_share() -> None:
    """A 100,000-file request's queue read every 10 s made planning quadratic in the request's
    size: the plan now stands at least 1 / PLAN_TIME_SHARE times as long as its read took."""
    from daemons.recall.scheduler import PLAN_MAX_AGE, PLAN_TIME_SHARE, plan_age

    assert plan_age(0.0) == plan_age(0.01) == PLAN_MAX_AGE  # a small queue: the usual age
    for read in (1.0, 5.0, 30.0):
        assert plan_age(read) >= PLAN_MAX_AGE and read / plan_age(read) <= PLAN_TIME_SHARE + 1e-9
    assert plan_age(5.0) > plan_age(1.0)
