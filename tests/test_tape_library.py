"""The simulated tape library against real files: data round trips, the timing model on the
simulated clocks, space and allocation, persistence and crash recovery, faults, and sharing one
library between objects and processes.

Durations are asserted on each drive's simulated clock (``usage()``), never on wall time, except
where ``time_scale`` itself is the subject. Crashes are real: a child process is killed with
SIGKILL in the middle of a write.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from common.errors import Permanent, Retryable
from common.tape import (
    SimulatedLibrary,
    SimulatedLibraryConfig,
    TapeChecksumMismatch,
    TapeLibrary,
    TapeTiming,
)
from tests.storage_fixtures import adler, alter_keeping_adler32

REPO = Path(__file__).resolve().parent.parent
KB = 1000

Factory = Callable[..., Awaitable[SimulatedLibrary]]


def config(root: Path, **overrides: Any) -> SimulatedLibraryConfig:
    """A small, fast library: 2 drives, pool "raw" of 2 cartridges + 2 scratch, 10 kB tapes."""
    values: dict[str, Any] = {
        "root": root,
        "drives": 2,
        "pools": {"raw": 2},
        "scratch_cartridges": 2,
        "capacity_bytes": 10 * KB,
        "time_scale": 0.0,
    }
    values.update(overrides)
    return SimulatedLibraryConfig(**values)


@pytest.fixture
async def open_lib(tmp_path: Path) -> AsyncIterator[Factory]:
    """Opens libraries on ``tmp_path/lib`` (overridable) and closes whatever is still open."""
    opened: list[SimulatedLibrary] = []

    async def factory(**overrides: Any) -> SimulatedLibrary:
        overrides.setdefault("root", tmp_path / "lib")
        lib = await SimulatedLibrary.open(config(**overrides))
        opened.append(lib)
        return lib

    yield factory
    for lib in opened:
        await lib.close()


def source(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / "src" / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


async def put(lib: SimulatedLibrary, drive: str, tmp_path: Path, name: str, data: bytes) -> int:
    return await lib.write(drive, source(tmp_path, name, data), name, len(data), adler(data))


async def reasons(coro: Awaitable[Any]) -> tuple[type[BaseException], str]:
    """The class and reason code of the classified error ``coro`` raises."""
    with pytest.raises((Retryable, Permanent)) as info:
        await coro
    return type(info.value), info.value.reason


# --- layout ----------------------------------------------------------------------------------


async def test_new_library_has_labelled_cartridges_and_drives(open_lib: Factory) -> None:
    lib = await open_lib()
    carts = await lib.list_cartridges()
    assert [(c.vid, c.pool, c.state, c.capacity) for c in carts] == [
        ("A00001", "raw", "scratch", 10 * KB),
        ("A00002", "raw", "scratch", 10 * KB),
        ("A00003", None, "scratch", 10 * KB),
        ("A00004", None, "scratch", 10 * KB),
    ]
    assert [(d.drive_id, d.vid, d.status) for d in await lib.list_drives()] == [
        ("DR01", None, "idle"),
        ("DR02", None, "idle"),
    ]
    assert isinstance(lib, TapeLibrary)


async def test_reopening_keeps_the_layout_even_if_the_config_changed(open_lib: Factory) -> None:
    first = await open_lib()
    await first.close()
    again = await open_lib(drives=5, pools={"raw": 7, "dst": 3}, capacity_bytes=99)
    assert [c.vid for c in await again.list_cartridges()] == ["A00001", "A00002", "A00003", "A00004"]
    assert len(await again.list_drives()) == 2
    assert {c.capacity for c in await again.list_cartridges()} == {10 * KB}


def test_config_refuses_more_cartridges_than_labels_can_number(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="do not fit"):
        SimulatedLibraryConfig(root=tmp_path, label_prefix="ABCD", scratch_cartridges=100)
    assert (
        SimulatedLibraryConfig(root=tmp_path, label_prefix="ABCD", scratch_cartridges=99).label(99)
        == "ABCD99"
    )


# --- data ------------------------------------------------------------------------------------


async def test_written_file_reads_back_with_its_bytes_and_adler32(open_lib: Factory, tmp_path: Path) -> None:
    lib = await open_lib()
    data = os.urandom(3000)
    await lib.mount("DR01", "A00001")
    fseq = await put(lib, "DR01", tmp_path, "f1", data)

    result = await lib.read("DR01", fseq, tmp_path / "out" / "f1")

    assert (tmp_path / "out" / "f1").read_bytes() == data
    assert result.size == 3000
    assert result.adler32 == adler(data)
    assert [f.name for f in (tmp_path / "out").iterdir()] == ["f1"]  # no temp file left


async def test_files_get_consecutive_fseqs_and_follow_each_other_on_tape(
    open_lib: Factory, tmp_path: Path
) -> None:
    lib = await open_lib()
    await lib.mount("DR01", "A00001")
    sizes = [100, 250, 40]
    fseqs = [await put(lib, "DR01", tmp_path, f"f{i}", b"x" * s) for i, s in enumerate(sizes)]

    files = await lib.list_files("A00001")
    assert fseqs == [1, 2, 3]
    assert [(f.fseq, f.name, f.offset, f.size, f.state) for f in files] == [
        (1, "f0", 0, 100, "committed"),
        (2, "f1", 100, 250, "committed"),
        (3, "f2", 350, 40, "committed"),
    ]
    (cart,) = [c for c in await lib.list_cartridges() if c.vid == "A00001"]
    assert (cart.used_bytes, cart.next_fseq, cart.files, cart.state) == (390, 4, 3, "filling")


async def test_write_refuses_a_source_that_is_not_what_was_announced(
    open_lib: Factory, tmp_path: Path
) -> None:
    lib = await open_lib()
    await lib.mount("DR01", "A00001")
    src = source(tmp_path, "f", b"payload")

    assert await reasons(lib.write("DR01", src, "f", 7, "00000001")) == (Permanent, "checksum_mismatch")
    assert await reasons(lib.write("DR01", src, "f", 8, adler(b"payload"))) == (Permanent, "size_mismatch")
    assert await reasons(lib.write("DR01", tmp_path / "nope", "f", 1, "1")) == (Permanent, "file_missing")

    assert await lib.list_files("A00001") == []
    assert sorted(p.name for p in lib.data_path("A00001", 1).parent.iterdir()) == ["journal.jsonl"]
    assert await put(lib, "DR01", tmp_path, "f", b"payload") == 1  # the fseq was not consumed
    assert (await lib.list_drives())[0].status == "idle"


async def test_write_and_read_check_a_recorded_sha256_in_the_same_pass(
    open_lib: Factory, tmp_path: Path
) -> None:
    """Issue 20: a source altered under an unchanged adler32 is refused by its sha256 before it is
    on tape; a good one is written, and a read reports the sha256 of the bytes it delivered."""
    lib = await open_lib()
    await lib.mount("DR01", "A00001")
    data = os.urandom(5000)
    altered = source(tmp_path, "bad", alter_keeping_adler32(data))
    want = hashlib.sha256(data).hexdigest()

    refused = lib.write("DR01", altered, "f", len(data), adler(data), sha256=want)
    assert await reasons(refused) == (Permanent, "checksum_mismatch")
    assert await lib.list_files("A00001") == []

    fseq = await lib.write("DR01", source(tmp_path, "good", data), "f", len(data), adler(data), sha256=want)
    got = await lib.read("DR01", fseq, tmp_path / "out" / "f")
    assert got == (len(data), adler(data), want)


# --- timing model ----------------------------------------------------------------------------


def test_locate_average_over_random_positions_is_the_configured_average() -> None:
    timing = TapeTiming()
    capacity = 18_000_000_000_000
    grid = [capacity * i // 200 for i in range(201)]
    mean = sum(timing.locate_seconds(a, b, capacity) for a in grid for b in grid) / len(grid) ** 2
    assert mean == pytest.approx(60.0, rel=0.02)
    assert timing.locate_seconds(0, capacity, capacity) == pytest.approx(180.0)


async def test_locate_time_is_proportional_to_distance_from_the_head(
    open_lib: Factory, tmp_path: Path
) -> None:
    lib = await open_lib(capacity_bytes=1_000_000, timing=TapeTiming(locate_average_seconds=60.0))
    await lib.mount("DR01", "A00001")
    for i in range(5):
        await put(lib, "DR01", tmp_path, f"f{i}", b"y" * 100_000)  # head ends at 500_000

    async def locate_seconds_of(call: Awaitable[Any]) -> float:
        before = (await lib.usage()).drives["DR01"].locate_seconds
        await call
        return (await lib.usage()).drives["DR01"].locate_seconds - before

    # The end-to-end locate is 3 x 60 s = 180 s for the whole 1 MB.
    assert await locate_seconds_of(lib.position("DR01", 1)) == pytest.approx(90.0)  # 500 kB back
    assert await locate_seconds_of(lib.position("DR01", 5)) == pytest.approx(72.0)  # 400 kB on
    assert await locate_seconds_of(lib.position("DR01", 5)) == 0.0  # already there
    # A read locates from where the head is (end of fseq 5 after reading it) to fseq 2.
    await lib.read("DR01", 5, tmp_path / "out5")
    assert await locate_seconds_of(lib.read("DR01", 2, tmp_path / "out2")) == pytest.approx(72.0)
    # Reading the next file in sequence costs no locate at all.
    assert await locate_seconds_of(lib.read("DR01", 3, tmp_path / "out3")) == 0.0
    # Locating to next_fseq is the end of data (500 kB), where the next write goes; fseq 3 ends at 300 kB.
    assert await locate_seconds_of(lib.position("DR01", 6)) == pytest.approx(36.0)


async def test_each_operation_charges_its_modelled_duration(open_lib: Factory, tmp_path: Path) -> None:
    timing = TapeTiming(
        mount_seconds=16, unmount_seconds=56, write_rate=1000.0, read_rate=500.0,
        file_overhead_seconds=0.5, sync_seconds=3.0,
    )  # fmt: skip
    lib = await open_lib(timing=timing)
    await lib.mount("DR01", "A00001")
    await put(lib, "DR01", tmp_path, "f", b"z" * 2000)  # a write with its synchronous tape mark
    await lib.read("DR01", 1, tmp_path / "out")
    await lib.unmount("DR01")

    u = (await lib.usage()).drives["DR01"]
    assert (u.mount_seconds, u.write_seconds, u.unmount_seconds, u.mounts, u.unmounts) == (16, 2.5, 56, 1, 1)
    assert (u.flush_seconds, u.flushes) == (3.0, 1)
    assert u.read_seconds == pytest.approx(4.0)
    assert u.locate_seconds == pytest.approx(3 * 60.0 * 2000 / (10 * KB))  # back to fseq 1 to read
    assert u.total_seconds == pytest.approx(16 + 2.5 + 3 + 4 + 56 + u.locate_seconds)
    assert (u.files_written, u.bytes_written, u.files_read, u.bytes_read) == (1, 2000, 1, 2000)
    assert (await lib.usage()).total == u  # the other drive did nothing


async def test_mounting_the_cartridge_already_in_the_drive_costs_nothing(open_lib: Factory) -> None:
    lib = await open_lib()
    assert await lib.mount("DR01", "A00001") is True  # loaded
    assert await lib.mount("DR01", "A00001", request="recall-7") is False  # already there

    drive = (await lib.list_drives())[0]
    assert (drive.vid, drive.request, drive.usage.mounts, drive.usage.mount_seconds) == (
        "A00001",
        "recall-7",
        1,
        16.0,
    )


async def test_mounting_another_cartridge_unloads_the_first(open_lib: Factory) -> None:
    lib = await open_lib()
    await lib.mount("DR01", "A00001")
    await lib.mount("DR01", "A00002")

    drive = (await lib.list_drives())[0]
    carts = {c.vid: c for c in await lib.list_cartridges()}
    assert (drive.vid, drive.usage.mounts, drive.usage.unmounts) == ("A00002", 2, 1)
    assert drive.usage.unmount_seconds == 56.0
    assert (carts["A00001"].drive, carts["A00002"].drive) == (None, "DR01")


async def test_time_scale_makes_a_mount_take_scaled_wall_time(open_lib: Factory) -> None:
    # Not durable: fsync latency on a busy machine is not what this test measures.
    lib = await open_lib(time_scale=0.02, durable=False)  # 16 s -> 0.32 s
    start = time.monotonic()
    await lib.mount("DR01", "A00001")
    elapsed = time.monotonic() - start

    assert 0.32 <= elapsed < 1.5  # scaled, neither skipped nor 16 s (nor a 10x slip: 3.2 s)
    assert (await lib.usage()).drives["DR01"].mount_seconds == 16.0


async def test_operations_on_different_drives_overlap(open_lib: Factory) -> None:
    lib = await open_lib(time_scale=0.05, durable=False)  # 16 s -> 0.8 s
    start = time.monotonic()
    await asyncio.gather(lib.mount("DR01", "A00001"), lib.mount("DR02", "A00002"))
    elapsed = time.monotonic() - start

    assert elapsed < 1.4  # one scaled mount, not two in a row (at least 1.6 s)
    assert [d.vid for d in await lib.list_drives()] == ["A00001", "A00002"]
    assert (await lib.usage()).total.mount_seconds == 32.0


# --- space and allocation --------------------------------------------------------------------


async def test_write_that_does_not_fit_is_refused_and_leaves_nothing(
    open_lib: Factory, tmp_path: Path
) -> None:
    lib = await open_lib()
    await lib.mount("DR01", "A00001")
    await put(lib, "DR01", tmp_path, "f1", b"a" * 6000)

    with pytest.raises(Retryable) as info:
        await put(lib, "DR01", tmp_path, "f2", b"b" * 6000)

    assert info.value.reason == "cartridge_full"
    assert "4000 bytes left" in info.value.message
    assert [f.fseq for f in await lib.list_files("A00001")] == [1]
    assert not lib.data_path("A00001", 2).exists()
    (cart,) = [c for c in await lib.list_cartridges() if c.vid == "A00001"]
    assert (cart.used_bytes, cart.next_fseq, cart.state) == (6000, 2, "filling")


async def test_filling_a_cartridge_exactly_marks_it_full(open_lib: Factory, tmp_path: Path) -> None:
    lib = await open_lib()
    await lib.mount("DR01", "A00001")
    await put(lib, "DR01", tmp_path, "f1", b"a" * (10 * KB))

    assert [c.state for c in await lib.list_cartridges() if c.vid == "A00001"] == ["full"]
    assert await reasons(put(lib, "DR01", tmp_path, "f2", b"b")) == (Retryable, "cartridge_full")


async def test_allocation_fills_the_pool_then_takes_scratch_then_gives_up(
    open_lib: Factory, tmp_path: Path
) -> None:
    lib = await open_lib()
    first = await lib.allocate_cartridge("raw", 6000)
    assert (first.vid, first.state) == ("A00001", "filling")
    await lib.mount("DR01", first.vid)
    await put(lib, "DR01", tmp_path, "f1", b"a" * 6000)

    assert (await lib.allocate_cartridge("raw", 4000)).vid == "A00001"  # still room for 4000
    assert (await lib.allocate_cartridge("raw", 4001)).vid == "A00002"  # the pool's next one
    # The second copy must go elsewhere: exclusion skips A00001 and A00002 (now filling, empty).
    third = await lib.allocate_cartridge("raw", 100, exclude_vids={"A00001", "A00002"})
    assert (third.vid, third.pool, third.state) == ("A00003", "raw", "filling")  # scratch joins the pool
    other = await lib.allocate_cartridge("dst", 100)
    assert (other.vid, other.pool) == ("A00004", "dst")
    assert await reasons(lib.allocate_cartridge("dst", 100, exclude_vids={"A00004"})) == (
        Retryable,
        "no_cartridge",
    )
    assert await reasons(lib.allocate_cartridge("raw", 10 * KB + 1)) == (Retryable, "no_cartridge")


async def test_allocation_prefers_a_filling_cartridge_already_mounted(
    open_lib: Factory, tmp_path: Path
) -> None:
    lib = await open_lib()
    for vid, drive, size in (("A00001", "DR01", 5000), ("A00002", "DR02", 100)):
        await lib.mount(drive, vid)
        await put(lib, drive, tmp_path, f"f-{vid}", b"q" * size)
    await lib.unmount("DR01")

    assert (await lib.allocate_cartridge("raw", 100)).vid == "A00002"  # in a drive beats fuller
    await lib.unmount("DR02")
    assert (await lib.allocate_cartridge("raw", 100)).vid == "A00001"  # then the fullest


async def test_suspect_and_disabled_cartridges_are_not_written_or_mounted(
    open_lib: Factory, tmp_path: Path
) -> None:
    lib = await open_lib()
    await lib.mount("DR01", "A00001")
    await lib.set_cartridge_state("A00001", "suspect")
    assert await reasons(put(lib, "DR01", tmp_path, "f", b"1")) == (Retryable, "cartridge_not_writable")
    await lib.set_cartridge_state("A00002", "disabled")
    assert await reasons(lib.mount("DR02", "A00002")) == (Retryable, "cartridge_disabled")
    assert await reasons(lib.set_cartridge_state("A00099", "full")) == (Permanent, "unknown_cartridge")


# --- persistence and crash recovery ----------------------------------------------------------


async def test_state_survives_reopen(open_lib: Factory, tmp_path: Path) -> None:
    lib = await open_lib()
    await lib.mount("DR01", "A00001")
    await put(lib, "DR01", tmp_path, "f1", b"persist me")
    await lib.set_cartridge_state("A00002", "disabled")
    usage = await lib.usage()
    await lib.close()

    again = await open_lib()
    drive = (await again.list_drives())[0]
    assert (drive.vid, drive.head, drive.status, drive.claim) == ("A00001", 10, "idle", None)
    assert await again.usage() == usage
    assert [(f.fseq, f.name, f.adler32) for f in await again.list_files("A00001")] == [
        (1, "f1", adler(b"persist me"))
    ]
    assert [c.state for c in await again.list_cartridges()][:2] == ["filling", "disabled"]
    assert await put(again, "DR01", tmp_path, "f2", b"more") == 2  # no remount needed, fseq goes on
    await again.read("DR01", 1, tmp_path / "back")
    assert (tmp_path / "back").read_bytes() == b"persist me"


async def test_open_drops_a_file_a_dead_session_left_writing(open_lib: Factory, tmp_path: Path) -> None:
    """Forged crash leftovers: a journal entry still "writing" whose data did land, a temp file,
    an unclaimed data file and a torn journal line. All of it goes; the fseq is reused."""
    lib = await open_lib()
    await lib.mount("DR01", "A00001")
    await put(lib, "DR01", tmp_path, "f1", b"kept")
    await lib.close()

    cdir = tmp_path / "lib" / "cartridges" / "A00001"
    dead = "0123456789abcdef"
    entry = {"fseq": 2, "name": "f2", "size": 3, "adler32": adler(b"new"), "offset": 4, "state": "writing"}
    with open(cdir / "journal.jsonl", "a") as j:
        j.write(json.dumps({"op": "reserve", "session": dead, "file": entry}) + "\n")
        j.write('{"op":"commit","fs')  # torn by the crash
    (cdir / "00000002").write_bytes(b"new")
    (cdir / f".00000003.{dead}.tmp").write_bytes(b"partial")
    (cdir / "00000009").write_bytes(b"nobody's")

    again = await open_lib()
    assert [f.fseq for f in await again.list_files("A00001")] == [1]
    assert sorted(p.name for p in cdir.iterdir()) == ["00000001", "journal.jsonl"]
    (cart,) = [c for c in await again.list_cartridges() if c.vid == "A00001"]
    assert (cart.used_bytes, cart.next_fseq, cart.files) == (4, 2, 1)
    assert await put(again, "DR01", tmp_path, "f2b", b"redo") == 2
    assert [(f.fseq, f.offset) for f in await again.list_files("A00001")] == [(1, 0), (2, 4)]
    assert (cdir / "journal.jsonl").read_bytes().endswith(b"\n")


CHILD = """
import asyncio, sys, zlib
from pathlib import Path
from common.tape import SimulatedLibrary, SimulatedLibraryConfig, TapeTiming

async def main(root: str, src: str) -> None:
    cfg = SimulatedLibraryConfig(root=Path(root), drives=2, pools={"raw": 2}, scratch_cartridges=2,
                                 capacity_bytes=10_000, time_scale=1.0,
                                 timing=TapeTiming(mount_seconds=0, write_rate=10.0))
    lib = await SimulatedLibrary.open(cfg)
    drive = await lib.claim_drive("doomed writer")
    await lib.mount(drive, "A00001")
    data = Path(src).read_bytes()
    await lib.write(drive, Path(src), "doomed", len(data), f"{zlib.adler32(data):08x}")  # 100 s

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def kill_writer_mid_write(tmp_path: Path) -> None:
    """Run a child process that claims DR01, mounts A00001 and is SIGKILLed while writing fseq 1."""
    src = source(tmp_path, "doomed", b"d" * 1000)
    # The crash comes once the data has landed (it is copied first, then the modelled 100 s pass):
    # the worst case, complete bytes on tape that nobody was told about.
    landed = tmp_path / "lib" / "cartridges" / "A00001" / "00000001"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path / "lib"), str(src)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while not landed.exists():
            assert child.poll() is None, child.stderr.read().decode() if child.stderr else ""
            assert time.monotonic() < deadline, "the child never started writing"
            await asyncio.sleep(0.02)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()


async def test_a_write_killed_midway_is_dropped_on_open_and_the_tape_stays_mounted(
    open_lib: Factory, tmp_path: Path
) -> None:
    await kill_writer_mid_write(tmp_path)
    assert (tmp_path / "lib" / "cartridges" / "A00001" / "00000001").exists()  # data landed, no commit

    lib = await open_lib()
    drive = (await lib.list_drives())[0]
    assert (drive.vid, drive.status, drive.claim, drive.op) == ("A00001", "idle", None, None)
    assert await lib.list_files("A00001") == []
    assert not lib.data_path("A00001", 1).exists()
    assert len(os.listdir(tmp_path / "lib" / "sessions")) == 1  # only ours; the dead one is pruned
    assert await lib.claim_drive("next writer") == "DR02"  # the empty drive first
    assert await put(lib, "DR01", tmp_path, "again", b"again") == 1  # fseq reused, no remount
    assert (await lib.usage()).drives["DR01"].mounts == 1


async def test_an_open_library_frees_what_a_killed_neighbour_held(open_lib: Factory, tmp_path: Path) -> None:
    lib = await open_lib()  # opened before the neighbour starts, so no reopen cleans up for us
    await kill_writer_mid_write(tmp_path)

    assert await lib.claim_drive("survivor", vid="A00001") == "DR01"  # the dead claim is gone
    drive = (await lib.list_drives())[0]
    assert (drive.vid, drive.status, drive.request) == ("A00001", "idle", "survivor")
    assert await lib.list_files("A00001") == []
    assert await put(lib, "DR01", tmp_path, "again", b"again") == 1


async def test_cancelled_write_leaves_no_file_and_a_free_drive(open_lib: Factory, tmp_path: Path) -> None:
    lib = await open_lib(time_scale=1.0, timing=TapeTiming(mount_seconds=0, write_rate=10.0))
    await lib.mount("DR01", "A00001")
    task = asyncio.create_task(put(lib, "DR01", tmp_path, "slow", b"s" * 1000))  # 100 s
    while (await lib.list_drives())[0].status != "writing":
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    drive = (await lib.list_drives())[0]
    assert (drive.status, drive.op, drive.vid) == ("idle", None, "A00001")
    assert drive.usage.write_seconds == 0.0  # aborted work is not charged
    assert sorted(os.listdir(lib.data_path("A00001", 1).parent)) == ["journal.jsonl"]
    assert await put(lib, "DR01", tmp_path, "quick", b"") == 1


# --- faults ----------------------------------------------------------------------------------


async def test_broken_drive_refuses_mounts_and_is_not_handed_out(open_lib: Factory) -> None:
    lib = await open_lib()
    await lib.set_drive_broken("DR01")

    assert await reasons(lib.mount("DR01", "A00001")) == (Retryable, "drive_broken")
    assert (await lib.list_drives())[0].status == "broken"
    assert await lib.claim_drive("w1") == "DR02"
    assert await lib.claim_drive("w2") is None  # DR02 taken, DR01 broken
    await lib.set_drive_broken("DR01", broken=False)
    await lib.mount("DR01", "A00001")
    assert (await lib.list_drives())[0].vid == "A00001"


async def test_cartridge_stuck_in_a_broken_drive_is_reported(open_lib: Factory) -> None:
    lib = await open_lib()
    await lib.mount("DR01", "A00001")
    await lib.set_drive_broken("DR01")
    assert await reasons(lib.unmount("DR01")) == (Retryable, "drive_broken")
    assert await reasons(lib.claim_drive("recall", vid="A00001")) == (Retryable, "drive_broken")


async def test_injected_mount_failure_costs_the_load_time_and_leaves_the_drive_empty(
    open_lib: Factory,
) -> None:
    lib = await open_lib()
    await lib.fail_next_mounts("A00001")

    assert await reasons(lib.mount("DR01", "A00001")) == (Retryable, "mount_failed")
    drive = (await lib.list_drives())[0]
    assert (drive.vid, drive.status, drive.usage.mounts, drive.usage.mount_seconds) == (None, "idle", 0, 16.0)
    assert [c.drive for c in await lib.list_cartridges() if c.vid == "A00001"] == [None]
    await lib.mount("DR01", "A00001")  # the fault was for one mount only
    assert (await lib.list_drives())[0].usage.mounts == 1


async def test_corrupted_data_is_caught_by_adler32_on_read(open_lib: Factory, tmp_path: Path) -> None:
    lib = await open_lib()
    data = b"precious science" * 50
    await lib.mount("DR01", "A00001")
    await put(lib, "DR01", tmp_path, "f", data)
    stored = lib.data_path("A00001", 1)
    damaged = bytearray(stored.read_bytes())
    damaged[100] ^= 0xFF
    stored.write_bytes(bytes(damaged))

    with pytest.raises(TapeChecksumMismatch) as info:
        await lib.read("DR01", 1, tmp_path / "out" / "f")

    assert isinstance(info.value, Permanent)
    assert info.value.reason == "tape_checksum_mismatch"
    assert (info.value.expected, info.value.actual) == (adler(data), adler(bytes(damaged)))
    assert not (tmp_path / "out" / "f").exists()
    assert list((tmp_path / "out").iterdir()) == []
    assert [c.state for c in await lib.list_cartridges() if c.vid == "A00001"] == ["suspect"]
    # Without verification the bytes are delivered and the computed checksum tells the truth.
    raw = await lib.read("DR01", 1, tmp_path / "out" / "raw", verify=False)
    assert raw.adler32 == adler(bytes(damaged)) != adler(data)
    assert (tmp_path / "out" / "raw").read_bytes() == bytes(damaged)


async def test_missing_or_short_data_is_a_tape_read_error(open_lib: Factory, tmp_path: Path) -> None:
    lib = await open_lib()
    await lib.mount("DR01", "A00001")
    await put(lib, "DR01", tmp_path, "a", b"a" * 100)
    await put(lib, "DR01", tmp_path, "b", b"b" * 100)
    lib.data_path("A00001", 1).unlink()
    lib.data_path("A00001", 2).write_bytes(b"b" * 60)

    assert await reasons(lib.read("DR01", 1, tmp_path / "a")) == (Permanent, "tape_read_error")
    assert await reasons(lib.read("DR01", 2, tmp_path / "b")) == (Permanent, "tape_read_error")
    assert await reasons(lib.read("DR01", 3, tmp_path / "c")) == (Permanent, "unknown_fseq")
    assert not (tmp_path / "b").exists()
    assert (await lib.list_drives())[0].status == "idle"


# --- sharing ---------------------------------------------------------------------------------


async def test_two_sessions_share_drives_and_cartridges_safely(open_lib: Factory, tmp_path: Path) -> None:
    tape = await open_lib()
    recall = await open_lib()

    assert await tape.claim_drive("archive raw") == "DR01"
    assert await recall.claim_drive("recall 1") == "DR02"
    await tape.mount("DR01", "A00001")
    await put(tape, "DR01", tmp_path, "f", b"shared")

    assert await reasons(recall.mount("DR01", "A00002")) == (Retryable, "drive_busy")
    assert await reasons(recall.mount("DR02", "A00001")) == (Retryable, "cartridge_in_use")
    assert await recall.claim_drive("recall 2", vid="A00001") is None  # wait for it
    assert await reasons(recall.release_drive("DR01")) == (Permanent, "not_claimed")
    assert [f.name for f in await recall.list_files("A00001")] == ["f"]  # sees the other's write

    await tape.close()  # releases its claim; the tape stays in DR01
    await recall.release_drive("DR02")
    assert await recall.claim_drive("recall 2", vid="A00001") == "DR01"
    await recall.mount("DR01", "A00001")  # already there: free
    assert (await recall.read("DR01", 1, tmp_path / "got")).adler32 == adler(b"shared")
    assert (await recall.usage()).total.mounts == 1


async def test_each_session_sees_every_change_the_other_made_since_its_last_look(open_lib: Factory) -> None:
    """A session keeps the state it parsed while the file holds the same bytes: any change by a
    neighbour, even one that leaves the file's size as it was, is seen at the next look."""
    a, b = await open_lib(), await open_lib()
    for broken, repaired in [("DR01", "DR02"), ("DR02", "DR01"), ("DR01", "DR02")]:
        await b.set_drive_broken(broken)
        await b.set_drive_broken(repaired, broken=False)
        assert {d.drive_id: d.broken for d in await a.list_drives()} == {broken: True, repaired: False}
        await a.set_cartridge_state("A00001", "disabled" if broken == "DR01" else "filling")
        want = "disabled" if broken == "DR01" else "filling"
        assert {c.vid: c.state for c in await b.list_cartridges("raw")}["A00001"] == want


async def test_a_transaction_that_fails_part_way_changes_nothing_even_in_memory(open_lib: Factory) -> None:
    lib = await open_lib()
    await lib.list_drives()  # the state is now kept in memory

    def change_then_fail(t: Any) -> None:
        t.state.drives["DR01"].broken = True
        t.state.cartridges["A00001"].used_bytes = 123
        raise RuntimeError("fails after changing the state")

    with pytest.raises(RuntimeError, match="after changing"):
        await lib._txn(change_then_fail)
    assert not {d.drive_id: d for d in await lib.list_drives()}["DR01"].broken
    assert {c.vid: c for c in await lib.list_cartridges()}["A00001"].used_bytes == 0
    assert await lib.claim_drive("after the failure") == "DR01"


async def test_listings_are_snapshots_not_the_live_state(open_lib: Factory) -> None:
    lib = await open_lib()
    drives, carts = await lib.list_drives(), await lib.list_cartridges()
    await lib.mount("DR01", "A00001")
    assert drives[0].vid is None and drives[0].usage.mounts == 0
    assert carts[0].drive is None
    assert (await lib.list_drives())[0].vid == "A00001"


async def test_closed_library_refuses_work(open_lib: Factory) -> None:
    lib = await open_lib()
    await lib.close()
    with pytest.raises(RuntimeError, match="closed"):
        await lib.list_drives()


def as_protocol(lib: SimulatedLibrary) -> TapeLibrary:
    """Checked by mypy: the simulator implements every method of the protocol with its signature."""
    return lib


# --- buffered writes: a synchronous tape mark every so many files ------------------------------


async def buffered(lib: SimulatedLibrary, drive: str, tmp_path: Path, name: str, data: bytes) -> int:
    src = source(tmp_path, name, data)
    return await lib.write(drive, src, name, len(data), adler(data), flush=False)


async def test_buffered_files_are_listed_and_readable_only_after_the_flush(
    open_lib: Factory, tmp_path: Path
) -> None:
    lib = await open_lib()
    await lib.mount("DR01", "A00001")
    assert [await buffered(lib, "DR01", tmp_path, f"f{n}", b"x" * 10) for n in range(3)] == [1, 2, 3]
    assert await lib.list_files("A00001") == []  # on the tape, not durable: not reported
    assert await reasons(lib.read("DR01", 1, tmp_path / "out")) == (Permanent, "unknown_fseq")
    (cart,) = [c for c in await lib.list_cartridges() if c.vid == "A00001"]
    assert (cart.used_bytes, cart.next_fseq, cart.files) == (30, 4, 0)  # space is taken already

    assert await lib.flush("DR01") == [1, 2, 3]
    assert [f.fseq for f in await lib.list_files("A00001")] == [1, 2, 3]
    assert await lib.flush("DR01") == []  # nothing new: no tape mark, nothing charged
    await lib.read("DR01", 2, tmp_path / "out")
    (cart,) = [c for c in await lib.list_cartridges() if c.vid == "A00001"]
    assert cart.files == 3


async def test_a_flush_syncs_the_journal_once_for_the_whole_group(open_lib: Factory, tmp_path: Path) -> None:
    lib = await open_lib()
    await lib.mount("DR01", "A00001")
    before = lib.journal_syncs
    for n in range(5):
        await buffered(lib, "DR01", tmp_path, f"f{n}", b"y" * 10)
    assert lib.journal_syncs == before  # buffered: no fsync at all
    await lib.flush("DR01")
    assert lib.journal_syncs == before + 1
    await put(lib, "DR01", tmp_path, "sync", b"z")  # the default: a synchronous tape mark per file
    assert lib.journal_syncs == before + 2


async def test_a_flush_is_charged_once_as_a_back_hitch(open_lib: Factory, tmp_path: Path) -> None:
    timing = TapeTiming(write_rate=1000.0, file_overhead_seconds=0.5, sync_seconds=3.0)
    lib = await open_lib(timing=timing)
    await lib.mount("DR01", "A00001")
    for n in range(4):
        await buffered(lib, "DR01", tmp_path, f"f{n}", b"w" * 1000)
    await lib.flush("DR01")
    u = (await lib.usage()).drives["DR01"]
    assert u.write_seconds == pytest.approx(4 * (1.0 + 0.5))
    assert (u.flush_seconds, u.flushes, u.files_written) == (3.0, 1, 4)


async def test_releasing_the_drive_drops_what_was_not_flushed(open_lib: Factory, tmp_path: Path) -> None:
    lib = await open_lib()
    drive = await lib.claim_drive("writer")
    assert drive is not None
    await lib.mount(drive, "A00001")
    await buffered(lib, drive, tmp_path, "kept", b"k")
    await lib.flush(drive)
    await buffered(lib, drive, tmp_path, "lost", b"l")
    await lib.release_drive(drive)
    assert [f.name for f in await lib.list_files("A00001")] == ["kept"]
    assert not lib.data_path("A00001", 2).exists()
    assert await put(lib, drive, tmp_path, "next", b"n") == 2  # the fseq is reused


async def test_a_failed_write_keeps_the_files_buffered_before_it(open_lib: Factory, tmp_path: Path) -> None:
    lib = await open_lib()
    await lib.mount("DR01", "A00001")
    await buffered(lib, "DR01", tmp_path, "good", b"g")
    bad = source(tmp_path, "bad", b"bad")
    assert await reasons(lib.write("DR01", bad, "bad", 3, "00000001", flush=False)) == (
        Permanent,
        "checksum_mismatch",
    )
    assert await lib.flush("DR01") == [1]
    assert [f.name for f in await lib.list_files("A00001")] == ["good"]


async def test_unmounting_flushes_first(open_lib: Factory, tmp_path: Path) -> None:
    lib = await open_lib()
    await lib.mount("DR01", "A00001")
    await buffered(lib, "DR01", tmp_path, "f", b"f")
    await lib.unmount("DR01")
    assert [f.name for f in await lib.list_files("A00001")] == ["f"]
    assert (await lib.usage()).drives["DR01"].flushes == 1


CHILD_BUFFERED = """
import asyncio, os, signal, sys, zlib
from pathlib import Path
from common.tape import SimulatedLibrary, SimulatedLibraryConfig

async def main(root: str, src: str) -> None:
    cfg = SimulatedLibraryConfig(root=Path(root), drives=2, pools={"raw": 2}, scratch_cartridges=2,
                                 capacity_bytes=10_000, time_scale=0.0)
    lib = await SimulatedLibrary.open(cfg)
    drive = await lib.claim_drive("writer")
    await lib.mount(drive, "A00001")
    data = Path(src).read_bytes()
    for n in range(4):
        await lib.write(drive, Path(src), f"f{n}", len(data), f"{zlib.adler32(data):08x}", flush=False)
        if n == 1:
            await lib.flush(drive)
    os.kill(os.getpid(), signal.SIGKILL)  # two files flushed, two only written

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def test_a_kill_between_writes_and_flush_loses_the_unflushed_files(
    open_lib: Factory, tmp_path: Path
) -> None:
    src = source(tmp_path, "data", b"d" * 100)
    child = subprocess.run(
        [sys.executable, "-c", CHILD_BUFFERED, str(tmp_path / "lib"), str(src)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, timeout=60,
    )  # fmt: skip
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()
    assert (tmp_path / "lib" / "cartridges" / "A00001" / "00000004").exists()  # data was there

    lib = await open_lib()
    assert [(f.fseq, f.name) for f in await lib.list_files("A00001")] == [(1, "f0"), (2, "f1")]
    assert not lib.data_path("A00001", 3).exists() and not lib.data_path("A00001", 4).exists()
    (cart,) = [c for c in await lib.list_cartridges() if c.vid == "A00001"]
    assert (cart.used_bytes, cart.next_fseq, cart.files) == (200, 3, 2)


def test_speed_matching_keeps_the_host_rate_down_to_the_minimum_then_back_hitches() -> None:
    t = TapeTiming(write_rate=400.0, min_stream_rate=200.0, buffer_bytes=1000, sync_seconds=2.0)
    assert t.stream_rate(None) == 400.0  # the drive is the limit
    assert t.stream_rate(800.0) == 400.0
    assert t.stream_rate(300.0) == 300.0  # speed matching: slows down to the host, no loss
    assert t.stream_rate(200.0) == 200.0
    # Fed at 100 B/s a 1000-byte buffer takes 10 s to fill, and each one costs a 2 s back-hitch.
    assert t.stream_rate(100.0) == pytest.approx(1000 / 12)
    slow = t.model_copy(update={"feed_rate": 100.0})
    assert slow.write_seconds(1000) == pytest.approx(12.0)


def test_a_drive_slower_than_the_minimum_streaming_rate_is_never_penalised() -> None:
    t = TapeTiming(write_rate=1000.0)  # far below the LTO-9 177 MB/s floor (a test's toy drive)
    assert t.write_seconds(2000) == 2.0


def test_grouping_flushes_saves_a_back_hitch_per_file() -> None:
    t = TapeTiming(write_rate=100.0, file_overhead_seconds=0.1, sync_seconds=2.0)
    sizes = [100] * 10
    assert t.batch_write_seconds(sizes, flush_every=1) == pytest.approx(10 * 1.1 + 10 * 2.0)
    assert t.batch_write_seconds(sizes, flush_every=4) == pytest.approx(10 * 1.1 + 3 * 2.0)
    assert t.batch_write_seconds([], flush_every=4) == 0.0
    assert t.flush_seconds() == 2.0 and t.file_seconds(100) == pytest.approx(1.1)
