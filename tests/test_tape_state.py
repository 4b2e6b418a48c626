"""The simulated library's state file (``common.tape.statelog``): a snapshot and a line per
transaction. A write appends what it changed whatever the library's size; sessions see each
other's lines and compactions; a torn or unreadable tail, an interrupted compaction and a
version 1 file are handled at open; and writers SIGKILLed at random points lose nothing they
were told was written."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from common.tape import SimulatedLibrary, SimulatedLibraryConfig, statelog
from common.tape.statelog import HEADER_LEN, LEGACY_STATE_FILE, STATE_FILE, Change
from common.tape.transitions import Txn
from tests.storage_fixtures import adler

REPO = Path(__file__).resolve().parent.parent


def config(root: Path, cartridges: int = 2, **overrides: Any) -> SimulatedLibraryConfig:
    values: dict[str, Any] = {
        "root": root, "drives": 2, "pools": {"raw": cartridges}, "scratch_cartridges": 0,
        "capacity_bytes": 1_000_000, "time_scale": 0.0, "durable": False,
    }  # fmt: skip
    values.update(overrides)
    return SimulatedLibraryConfig(**values)


def state_lines(root: Path) -> list[bytes]:
    return (root / STATE_FILE).read_bytes().splitlines(keepends=True)


async def write(lib: SimulatedLibrary, drive: str, tmp_path: Path, name: str, data: bytes, **kw: Any) -> int:
    src = tmp_path / "src"
    src.write_bytes(data)
    return await lib.write(drive, src, name, len(data), adler(data), **kw)


async def test_a_write_appends_what_it_changed_whatever_the_number_of_cartridges(tmp_path: Path) -> None:
    """The root of the recall benchmark's hour-long set-up: every write rewrote every header."""
    appended = {}
    for cartridges in (4, 400):
        root = tmp_path / f"lib{cartridges}"
        async with await SimulatedLibrary.open(config(root, cartridges)) as lib:
            await lib.mount("DR01", "A00001")
            await write(lib, "DR01", tmp_path, "warm-up", b"w" * 100, flush=False)
            before = (root / STATE_FILE).stat().st_size
            await write(lib, "DR01", tmp_path, "f", b"x" * 100, flush=False)
            appended[cartridges] = (root / STATE_FILE).stat().st_size - before
            assert lib._store.state.compactions == 1  # the new library's snapshot only
        changes = [Change.model_validate_json(line) for line in state_lines(root)[-2:]]
        assert [sorted(c.drives) for c in changes] == [["DR01"], ["DR01"]]  # begin and finish
        assert sorted(changes[0].cartridges) == ["A00001"]  # space and fseq taken
    assert abs(appended[4] - appended[400]) < 20 and appended[400] < 3000  # timestamps' digits vary
    assert (tmp_path / "lib400" / STATE_FILE).stat().st_size > 400 * 100  # the snapshot has them all


@pytest.fixture
def compact_often(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compact once the lines outweigh the snapshot: every few transactions on a small library."""
    monkeypatch.setattr(statelog, "MIN_LOG_BYTES", 0)
    monkeypatch.setattr(statelog, "COMPACT_RATIO", 1)


async def test_sessions_see_each_other_through_lines_and_compactions(
    tmp_path: Path, compact_often: None
) -> None:
    root = tmp_path / "lib"
    a = await SimulatedLibrary.open(config(root))
    b = await SimulatedLibrary.open(config(root))
    try:
        assert await a.claim_drive("a") == "DR01" and await b.claim_drive("b") == "DR02"
        await a.mount("DR01", "A00001")
        await b.mount("DR02", "A00002")
        generations, lines = set(), set()
        for n in range(12):
            writer, drive, vid, other = (a, "DR01", "A00001", b) if n % 2 else (b, "DR02", "A00002", a)
            await write(writer, drive, tmp_path, f"f{n}", b"y" * (n + 1))
            generations.add((root / STATE_FILE).read_bytes()[:HEADER_LEN])
            lines.add(len(state_lines(root)))
            drives = {d.drive_id: d for d in await other.list_drives()}
            assert drives[drive].usage.files_written == n // 2 + 1
            assert drives[drive].head == sum(range(n % 2 + 1, n + 2, 2))
            (cart,) = [c for c in await other.list_cartridges() if c.vid == vid]
            assert (cart.files, cart.next_fseq, cart.used_bytes) == (
                n // 2 + 1,
                n // 2 + 2,
                drives[drive].head,
            )
        assert len(generations) > 2  # compactions happened between the looks
        assert a._store.state.compactions + b._store.state.compactions > 2
        assert max(lines) > 1  # and lines between them
    finally:
        await a.close()
        await b.close()


def _via_getitem(t: Txn) -> None:
    t.state.cartridges["A00001"].mounts = 11
    t.dirty = True


def _via_get(t: Txn) -> None:
    cart = t.state.cartridges.get("A00002")
    assert cart is not None
    cart.mounts = 12
    t.dirty = True


def _via_values(t: Txn) -> None:
    for cart in t.state.cartridges.values():
        if cart.vid == "A00003":
            cart.mounts = 13
    t.dirty = True


def _via_items(t: Txn) -> None:
    for vid, cart in t.state.cartridges.items():
        if vid == "A00004":
            cart.mounts = 14
    t.dirty = True


def _via_replacement(t: Txn) -> None:
    t.state.cartridges["A00005"] = t.state.cartridges["A00005"].model_copy(update={"mounts": 15})
    t.dirty = True


async def test_a_header_changed_however_it_was_reached_is_saved(tmp_path: Path) -> None:
    """Only the headers a transaction was handed are compared at save: every way of reaching
    one counts as handed."""
    root = tmp_path / "lib"
    async with (
        await SimulatedLibrary.open(config(root, cartridges=6)) as lib,
        await SimulatedLibrary.open(config(root)) as other,
    ):
        for change in (_via_getitem, _via_get, _via_values, _via_items, _via_replacement):
            await lib._txn(change)
        mounts = {c.vid: c.mounts for c in await other.list_cartridges()}
        assert mounts == {"A00001": 11, "A00002": 12, "A00003": 13, "A00004": 14, "A00005": 15, "A00006": 0}

        def remove(t: Txn) -> None:
            del t.state.cartridges["A00006"]

        with pytest.raises(TypeError, match="never removed"):
            await lib._txn(remove)
        assert len(await lib.list_cartridges()) == 6


async def test_a_torn_last_line_is_ignored_and_cut_off_by_the_next_change(tmp_path: Path) -> None:
    """A process killed while appending leaves part of a line: a transaction that never returned."""
    root = tmp_path / "lib"
    async with await SimulatedLibrary.open(config(root)) as lib:
        await lib.mount("DR01", "A00001")
    torn = Change.model_validate_json(state_lines(root)[-1])
    torn.drives["DR01"].broken = True
    line = torn.model_dump_json().encode()
    with open(root / STATE_FILE, "ab") as f:
        f.write(line[: len(line) // 2])

    async with await SimulatedLibrary.open(config(root)) as lib:
        (drive, _) = await lib.list_drives()
        assert (drive.vid, drive.broken) == ("A00001", False)
        await lib.set_drive_broken("DR02")
    lines = state_lines(root)
    assert all(line.endswith(b"\n") for line in lines)
    for line in lines[1:]:
        Change.model_validate_json(line)  # every line whole: the torn part is gone
    async with await SimulatedLibrary.open(config(root)) as lib:
        assert [(d.vid, d.broken) for d in await lib.list_drives()] == [("A00001", False), (None, True)]


async def test_the_state_ends_at_a_line_that_does_not_parse(tmp_path: Path) -> None:
    """After a power cut the unsynced tail may hold zeros before later lines that did land: the
    state stops at the first bad line (a prefix of the history) and the next change cuts the rest."""
    root = tmp_path / "lib"
    async with await SimulatedLibrary.open(config(root)) as lib:
        await lib.mount("DR01", "A00001")
    later = Change.model_validate_json(state_lines(root)[-1])
    later.drives["DR01"].broken = True
    with open(root / STATE_FILE, "ab") as f:
        f.write(b"\0" * 40 + b"\n" + later.model_dump_json().encode() + b"\n")

    async with await SimulatedLibrary.open(config(root)) as lib:
        assert not (await lib.list_drives())[0].broken
        await lib.set_drive_broken("DR02")
    assert b"\0" not in (root / STATE_FILE).read_bytes()
    async with await SimulatedLibrary.open(config(root)) as lib:
        assert [d.broken for d in await lib.list_drives()] == [False, True]


async def test_an_interrupted_compaction_leaves_the_old_state_and_its_temp_goes(tmp_path: Path) -> None:
    root = tmp_path / "lib"
    async with await SimulatedLibrary.open(config(root)) as lib:
        await lib.mount("DR01", "A00001")
    (root / f".{STATE_FILE}.0123456789ab.tmp").write_bytes(b'{"generation":"half a snap')

    with capture_logs() as logs:
        async with await SimulatedLibrary.open(config(root)) as lib:
            assert (await lib.list_drives())[0].vid == "A00001"
    assert not list(root.glob(".*.tmp"))
    assert any("interrupted state save" in str(e.get("note")) for e in logs)


async def test_a_version_1_state_file_is_converted_at_open(tmp_path: Path) -> None:
    root = tmp_path / "lib"
    async with await SimulatedLibrary.open(config(root)) as lib:
        await lib.mount("DR01", "A00001")
        await write(lib, "DR01", tmp_path, "f", b"v1")
        await lib.set_cartridge_state("A00002", "disabled")
        drives, carts = await lib.list_drives(), await lib.list_cartridges()
    state = json.loads(state_lines(root)[0])["state"]
    state.update(version=1, drives={d.drive_id: d.model_dump() for d in drives})
    state["cartridges"] = {c.vid: c.model_dump() for c in carts}
    (root / LEGACY_STATE_FILE).write_text(json.dumps(state, indent=2))
    (root / STATE_FILE).unlink()

    with capture_logs() as logs:
        async with await SimulatedLibrary.open(config(root)) as lib:
            assert await lib.list_drives() == drives
            assert await lib.list_cartridges() == carts
            assert [f.name for f in await lib.list_files("A00001")] == ["f"]
    assert not (root / LEGACY_STATE_FILE).exists()
    assert json.loads(state_lines(root)[0])["state"]["version"] == statelog.STATE_VERSION
    assert any(STATE_FILE in str(e.get("note")) for e in logs)


# --- writers killed at random points --------------------------------------------------------

KILLED_WRITER = """
import asyncio, sys, zlib
from pathlib import Path
from common.tape import SimulatedLibrary, SimulatedLibraryConfig, statelog

statelog.MIN_LOG_BYTES, statelog.COMPACT_RATIO = 0, 1  # a compaction every few transactions

async def main(root: str, src: str, round_: str) -> None:
    cfg = SimulatedLibraryConfig(root=Path(root), drives=2, pools={"raw": 2}, scratch_cartridges=0,
                                 capacity_bytes=10**9, time_scale=0.0, durable=False)
    lib = await SimulatedLibrary.open(cfg)
    drive = await lib.claim_drive("writer", vid="A00001")
    await lib.mount(drive, "A00001")
    data = Path(src).read_bytes()
    checksum = f"{zlib.adler32(data):08x}"
    for group in range(10**6):
        names = [f"r{round_}g{group}f{n}" for n in range(3)]
        fseqs = [await lib.write(drive, Path(src), name, len(data), checksum, flush=False) for name in names]
        assert await lib.flush(drive) == fseqs
        print("flushed", *(f"{name}={fseq}" for name, fseq in zip(names, fseqs)), flush=True)

asyncio.run(main(*sys.argv[1:]))
"""


def _reported(line: bytes, into: dict[str, int]) -> bool:
    """Parse a writer's "flushed name=fseq ..." line (its logs go to stdout too)."""
    words = line.decode().split()
    if words[:1] != ["flushed"]:
        return False
    into.update((name, int(fseq)) for name, fseq in (w.split("=") for w in words[1:]))
    return True


async def _run_and_kill(root: Path, src: Path, round_: int, rng: random.Random) -> dict[str, int]:
    """Start a writer, let it report some flushed groups, SIGKILL it a moment later wherever it
    is; what it reported: file name -> fseq."""
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(root), str(src), str(round_)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert child.stdout is not None and child.stderr is not None
    reported: dict[str, int] = {}
    try:
        groups = rng.randint(1, 12)
        while groups:
            line = await asyncio.to_thread(child.stdout.readline)
            assert line, child.stderr.read().decode()
            groups -= _reported(line, reported)
        await asyncio.sleep(rng.uniform(0, 0.01))
    finally:
        child.send_signal(signal.SIGKILL)
        rest = child.communicate()[0]
    for line in rest.split(b"\n")[:-1]:  # lines that made it out whole before the kill
        _reported(line, reported)
    assert child.returncode == -signal.SIGKILL
    return reported


async def test_writers_killed_at_random_points_lose_nothing_they_were_told_was_written(
    tmp_path: Path,
) -> None:
    """Rounds of a writer (buffered writes, a flush every three files, compactions every few
    transactions) killed at a random moment; after each the library, reopened, lists every file
    a flush reported with its fseq, its headers and clocks agree with that, and the next writer
    carries on after the last committed file without a remount."""
    root, src, size = tmp_path / "lib", tmp_path / "src", 100
    src.write_bytes(b"k" * size)
    rng = random.Random(18)
    reported: dict[str, int] = {}
    generations = set()
    for round_ in range(8):
        reported |= await _run_and_kill(root, src, round_, rng)
        generations.add((root / STATE_FILE).read_bytes()[:HEADER_LEN])
        async with await SimulatedLibrary.open(config(root, capacity_bytes=10**9)) as lib:
            listed = {f.name: f.fseq for f in await lib.list_files("A00001")}
            assert {name: listed.get(name) for name in reported} == reported
            assert sorted(listed.values()) == list(range(1, len(listed) + 1))
            (cart,) = [c for c in await lib.list_cartridges() if c.vid == "A00001"]
            assert (cart.files, cart.next_fseq, cart.used_bytes) == (
                len(listed),
                len(listed) + 1,
                len(listed) * size,
            )
            usage = await lib.usage()
            assert usage.total.mounts == 1  # the cartridge stayed in its drive through every kill
            assert usage.total.files_written >= len(reported)
            assert usage.total.flushes >= len(reported) // 3
    assert len(generations) > 1


# --- a kill at each point of a state update -------------------------------------------------

KILLED_IN_UPDATE = """
import asyncio, os, signal, sys, zlib
from pathlib import Path
from common.tape import SimulatedLibrary, SimulatedLibraryConfig, statelog

def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)

def arm(point: str) -> None:
    real_pwrite, real_replace = os.pwrite, os.replace
    if point.startswith("compaction"):
        statelog.MIN_LOG_BYTES, statelog.COMPACT_RATIO = 0, 0  # the next save compacts
    def pwrite(fd, data, at):
        if point == "mid_line":
            real_pwrite(fd, bytes(data[: len(data) // 2]), at)
            die()
        n = real_pwrite(fd, data, at)
        die()  # after_line: the whole line, no fsync, the transaction never returns
    def replace(src, dst):
        if Path(dst).name != statelog.STATE_FILE:
            return real_replace(src, dst)  # a file's data going into place
        if point == "compaction_before_replace":
            die()
        real_replace(src, dst)
        die()  # compaction_after_replace: before the directory's fsync
    os.pwrite, os.replace = pwrite, replace

async def main(root: str, src: str, point: str) -> None:
    cfg = SimulatedLibraryConfig(root=Path(root), drives=2, pools={"raw": 2}, scratch_cartridges=0,
                                 capacity_bytes=10**6, time_scale=0.0, durable=True)
    lib = await SimulatedLibrary.open(cfg)
    drive = await lib.claim_drive("writer")
    await lib.mount(drive, "A00001")
    data = Path(src).read_bytes()
    checksum = f"{zlib.adler32(data):08x}"
    await lib.write(drive, Path(src), "kept", len(data), checksum)
    await lib.set_cartridge_state("A00002", "disabled")
    arm(point)
    await lib.write(drive, Path(src), "doomed", len(data), checksum)  # its first save dies

asyncio.run(main(*sys.argv[1:]))
"""


def _left_by_the_kill(root: Path) -> str:
    """Which point the kill hit, told from what it left: the doomed write's first update marks
    the drive "writing"."""
    raw = (root / STATE_FILE).read_bytes()
    if not raw.endswith(b"\n"):
        return "mid_line"
    if list(root.glob(".*.tmp")):
        return "compaction_before_replace"
    lines = raw.splitlines()
    if len(lines) == 1:
        state = json.loads(lines[0])["state"]
        return "compaction_after_replace" if state["drives"]["DR01"]["status"] == "writing" else "?"
    return "after_line" if Change.model_validate_json(lines[-1]).drives["DR01"].status == "writing" else "?"


@pytest.mark.parametrize(
    "point", ["mid_line", "after_line", "compaction_before_replace", "compaction_after_replace"]
)
async def test_a_kill_at_any_point_of_a_state_update_loses_nothing_that_returned(
    tmp_path: Path, point: str
) -> None:
    root, src = tmp_path / "lib", tmp_path / "src"
    src.write_bytes(b"s" * 100)
    child = subprocess.run(
        [sys.executable, "-c", KILLED_IN_UPDATE, str(root), str(src), point],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, timeout=60,
    )  # fmt: skip
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()
    assert _left_by_the_kill(root) == point

    async with await SimulatedLibrary.open(config(root)) as lib:
        assert [(f.fseq, f.name) for f in await lib.list_files("A00001")] == [(1, "kept")]
        carts = {c.vid: c for c in await lib.list_cartridges()}
        assert (carts["A00001"].files, carts["A00001"].next_fseq, carts["A00001"].used_bytes) == (1, 2, 100)
        assert carts["A00002"].state == "disabled"  # the transaction before the kill returned: kept
        (drive, _) = await lib.list_drives()
        assert (drive.vid, drive.status, drive.op, drive.claim) == ("A00001", "idle", None, None)
        assert (drive.usage.mounts, drive.usage.files_written, drive.usage.flushes) == (1, 1, 1)
        assert await write(lib, "DR01", tmp_path, "next", b"n" * 10) == 2
    assert not list(root.glob(".*.tmp"))
    for line in state_lines(root)[1:]:
        Change.model_validate_json(line)
