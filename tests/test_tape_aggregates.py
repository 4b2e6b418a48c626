"""Small files on tape packed into aggregates: the tar and its index, hostile names, members
verified one by one on write and on read, the writer packing a batch (one bad member failed
alone), the catalogue's member offsets, reconciliation after a kill, a recall reading one member's
bytes only, and the ``[tape]`` settings. Real files and the simulated library throughout; no
broker (the writer and reconciliation run against the catalogue directly)."""

from __future__ import annotations

import hashlib
import os
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy import Connection, select

from common.catalogue import Catalogue
from common.catalogue import schema as s
from common.catalogue.recall import ReadItem, TapeCopy
from common.config import Settings, TapeSettings, load_settings
from common.errors import Permanent, SpoolError
from common.storage import PosixStorage
from common.tape import SimulatedLibrary, SimulatedLibraryConfig, TapeChecksumMismatch, TapeMember, aggregate
from daemons.ingest.handlers import service as ingest_service
from daemons.recall import delivery
from daemons.tape import reconcile, steps, writer
from daemons.tape.writer import Env
from tests.conftest import running, start_daemon, wait_for
from tests.replication_fixtures import count_on, make_files, name_of, publish_ready
from tests.storage_fixtures import adler
from tests.tape_fixtures import AGGREGATING, HOLDER, LIBRARY, queue_for_tape, tape_config, writer_harness

HOSTILE = [
    "../../etc/passwd",
    "/abs/olute.fits",
    "new\nline.fits",
    "x" * 900 + "/long.fits",
    "ümlaut/日本語.fits",
    "./././a",
    "",
    "lone\udc80surrogate",  # a name decoded with surrogateescape: its raw byte in pax, escaped in the index
]


def _files(directory: Path, sizes: list[int]) -> list[tuple[Path, bytes]]:
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for i, size in enumerate(sizes):
        data = os.urandom(size)
        path = directory / f"src{i}"
        path.write_bytes(data)
        out.append((path, data))
    return out


# --- the tar and its index ---------------------------------------------------------------------
def test_an_aggregate_is_a_tar_whose_index_gives_each_member_back_by_offset(tmp_path: Path) -> None:
    sources = _files(tmp_path / "src", [0, 1, 511, 512, 513, 5000, 70_000])
    names = [f"night/f{i}.fits" for i in range(len(sources))]
    b = aggregate.Builder(tmp_path / "a.tar")
    for i, ((path, data), name) in enumerate(zip(sources, names, strict=True)):
        m = b.add(None, path, name, str(100 + i), len(data), adler(data))
        assert m.offset % aggregate.BLOCK == 0 and m.size == len(data)
    size, adler32 = b.seal()
    agg = tmp_path / "a.tar"
    assert (size, adler32) == (agg.stat().st_size, adler(agg.read_bytes()))
    assert size % aggregate.RECORD == 0
    index = aggregate.read_index(agg)
    assert index == b.members and [m.name for m in index] == names
    for m, (_path, data) in zip(index, sources, strict=True):
        assert aggregate.read_member(agg, m) == data
    assert aggregate.verify(agg, index) == []
    # Any tar reader sees the members (under our names), the logical name in a pax record, and
    # the same bytes; the index is the last member.
    with tarfile.open(agg) as tar:
        infos = tar.getmembers()
        assert [i.name for i in infos] == [m.member for m in index] + [aggregate.INDEX_NAME]
        assert [i.pax_headers.get(aggregate.NAME_RECORD) for i in infos[:-1]] == names
        assert [i.offset_data for i in infos[:-1]] == [m.offset for m in index]
        for info, (_path, data) in zip(infos, sources, strict=False):
            fobj = tar.extractfile(info)
            assert fobj is not None and fobj.read() == data


def test_hostile_logical_names_never_become_paths_in_the_tar(tmp_path: Path) -> None:
    sources = _files(tmp_path / "src", [10] * len(HOSTILE))
    b = aggregate.Builder(tmp_path / "a.tar")
    for i, ((path, data), name) in enumerate(zip(sources, HOSTILE, strict=True)):
        b.add(None, path, name, str(i), len(data), adler(data))
    b.seal()
    index = aggregate.read_index(tmp_path / "a.tar")
    assert [m.name for m in index] == HOSTILE  # carried as data
    with tarfile.open(tmp_path / "a.tar") as tar:
        pax = [i.pax_headers.get(aggregate.NAME_RECORD) for i in tar.getmembers()[:-1]]
    assert pax == HOSTILE
    assert all(m.member.isascii() and "/" not in m.member and "\n" not in m.member for m in index)
    out = tmp_path / "out"
    with tarfile.open(tmp_path / "a.tar") as tar:
        tar.extractall(out, filter="data")  # what an operator's tar would do
    extracted = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert extracted == sorted([m.member for m in index] + [aggregate.INDEX_NAME])
    for m, (_path, data) in zip(index, sources, strict=True):
        assert (out / m.member).read_bytes() == data


@pytest.mark.parametrize(
    ("damage", "reason"),
    [("missing", "file_missing"), ("bytes", "checksum_mismatch"), ("size", "size_mismatch")],
)
def test_a_member_that_does_not_match_is_cut_off_and_the_rest_goes_on(
    tmp_path: Path, damage: str, reason: str
) -> None:
    (a, da), (bad, dbad), (c, dc) = _files(tmp_path / "src", [3000, 4000, 5000])
    b = aggregate.Builder(tmp_path / "a.tar")
    b.add(None, a, "a", "1", len(da), adler(da))
    before = b.size
    if damage == "missing":
        bad.unlink()
    elif damage == "bytes":
        bad.write_bytes(bytes([dbad[0] ^ 1]) + dbad[1:])
    else:
        bad.write_bytes(dbad + b"x")
    with pytest.raises(SpoolError) as err:
        b.add(None, bad, "bad", "2", len(dbad), adler(dbad))
    assert err.value.reason == reason
    assert b.size == before == (tmp_path / "a.tar").stat().st_size  # cut back where it began
    b.add(None, c, "c", "3", len(dc), adler(dc))
    b.seal()
    index = aggregate.read_index(tmp_path / "a.tar")
    assert [m.name for m in index] == ["a", "c"]
    assert aggregate.verify(tmp_path / "a.tar", index) == []
    assert aggregate.read_member(tmp_path / "a.tar", index[1]) == dc


def test_verify_names_the_damaged_member(tmp_path: Path) -> None:
    sources = _files(tmp_path / "src", [2000, 2000, 2000])
    b = aggregate.Builder(tmp_path / "a.tar")
    for i, (path, data) in enumerate(sources):
        b.add(None, path, f"m{i}", str(i), len(data), adler(data))
    b.seal()
    agg = tmp_path / "a.tar"
    raw = bytearray(agg.read_bytes())
    raw[b.members[1].offset + 7] ^= 0xFF
    agg.write_bytes(bytes(raw))
    assert aggregate.verify(agg, b.members) == ["m1"]


# --- the library: an aggregate is one tape file; a member is read alone ------------------------
async def _library_with_aggregate(
    tmp_path: Path, sizes: list[int]
) -> tuple[SimulatedLibrary, list[TapeMember], list[bytes], int]:
    lib = await SimulatedLibrary.open(
        SimulatedLibraryConfig(root=tmp_path / "lib", drives=1, pools={"raw": 1}, time_scale=0.0)
    )
    sources = _files(tmp_path / "src", sizes)
    b = aggregate.Builder(tmp_path / "a.tar")
    for i, (path, data) in enumerate(sources):
        b.add(None, path, f"m{i}", str(i), len(data), adler(data))
    size, adler32 = b.seal()
    await lib.mount("DR01", "A00001")
    plain = tmp_path / "plain"
    plain.write_bytes(os.urandom(1000))
    await lib.write("DR01", plain, "plain", 1000, adler(plain.read_bytes()))
    fseq = await lib.write("DR01", b.path, "agg.tar", size, adler32, flush=False, members=b.members)
    assert await lib.flush("DR01") == [fseq]
    return lib, b.members, [d for _p, d in sources], fseq


async def test_reading_a_member_reads_and_charges_only_its_bytes(tmp_path: Path) -> None:
    lib, members, datas, fseq = await _library_with_aggregate(tmp_path, [50_000, 7_000, 90_000])
    try:
        listed = await lib.list_files("A00001")
        assert [f.members for f in listed] == [None, members]  # the index kept with the file
        before = (await lib.usage()).total
        m = members[1]
        out = tmp_path / "out"
        got = await lib.read("DR01", fseq, out, member=m)
        assert out.read_bytes() == datas[1] and got == (
            m.size,
            m.adler32,
            hashlib.sha256(datas[1]).hexdigest(),
        )
        used = (await lib.usage()).total
        assert used.bytes_read - before.bytes_read == m.size == 7_000  # not the aggregate's size
        assert used.files_read - before.files_read == 1
        assert used.read_seconds - before.read_seconds == pytest.approx(lib.timing.read_seconds(m.size))
        agg = listed[1]
        # The locate took the head to the member's first byte (from the end of data, backwards).
        locate = lib.timing.locate_seconds(agg.end, agg.offset + m.offset, lib.config.capacity_bytes)
        assert used.locate_seconds - before.locate_seconds == pytest.approx(locate)
        [drive] = await lib.list_drives()
        assert drive.head == agg.offset + m.end
    finally:
        await lib.close()


async def test_a_corrupted_member_is_a_tape_checksum_mismatch_and_its_neighbours_still_read(
    tmp_path: Path,
) -> None:
    lib, members, datas, fseq = await _library_with_aggregate(tmp_path, [4000, 4000, 4000])
    try:
        data = lib.data_path("A00001", fseq)
        raw = bytearray(data.read_bytes())
        raw[members[0].offset + 100] ^= 0xFF
        data.write_bytes(bytes(raw))
        with pytest.raises(TapeChecksumMismatch) as err:
            await lib.read("DR01", fseq, tmp_path / "bad", member=members[0])
        assert err.value.reason == "tape_checksum_mismatch"
        assert not (tmp_path / "bad").exists()
        [cart] = [c for c in await lib.list_cartridges() if c.vid == "A00001"]
        assert cart.state == "suspect"  # readable, never appended to again
        await lib.read("DR01", fseq, tmp_path / "ok", member=members[2])
        assert (tmp_path / "ok").read_bytes() == datas[2]
        with pytest.raises(Permanent) as beyond:
            far = members[2].model_copy(update={"offset": members[2].offset + 10**6})
            await lib.read("DR01", fseq, tmp_path / "far", member=far)
        assert beyond.value.reason == "tape_read_error"
    finally:
        await lib.close()


async def test_recall_delivery_reads_one_member_into_the_destination(tmp_path: Path) -> None:
    lib, members, datas, fseq = await _library_with_aggregate(tmp_path, [30_000, 12_345, 30_000])
    dest = PosixStorage("disk2", tmp_path / "disk2")
    try:
        m = members[1]
        item = ReadItem(
            "r1", "run/f1.fits", 7, m.size, m.adler32, "disk2", TapeCopy("tape1", "A00001", fseq), m.offset
        )
        before = (await lib.usage()).total.bytes_read
        pfn = await delivery.read_from_tape(lib, "DR01", item, dest, tmp_path / "local")
        assert (tmp_path / "disk2" / pfn).read_bytes() == datas[1]
        assert (await lib.usage()).total.bytes_read - before == m.size
        wrong = ReadItem("r1", "run/f2.fits", 8, m.size, adler(b"other"), "disk2", item.copy, m.offset)
        with pytest.raises(TapeChecksumMismatch):
            await delivery.read_from_tape(lib, "DR01", wrong, dest, tmp_path / "local")
        assert not (tmp_path / "disk2" / "run/f2.fits").exists()
    finally:
        await dest.aclose()
        await lib.close()


# --- settings ----------------------------------------------------------------------------------
def test_aggregate_settings_are_checked() -> None:
    assert TapeSettings().aggregate_below == 64 * 2**20
    assert TapeSettings(aggregate_below=0).aggregate_below == 0  # off
    with pytest.raises(ValidationError, match="must not exceed aggregate_size"):
        TapeSettings(aggregate_below=2000, aggregate_size=1000)
    for bad in ({"aggregate_below": -1}, {"aggregate_size": 0}, {"aggregate_max_files": 0}):
        with pytest.raises(ValidationError):
            TapeSettings(**bad)


# --- the writer, the catalogue and reconciliation ----------------------------------------------
Harness = tuple[Settings, Catalogue, Env, SimulatedLibrary]


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    settings = load_settings(tape_config(tmp_path, "agg", policy=AGGREGATING + "\naggregate_max_files = 5"))
    async with writer_harness(settings, tmp_path / "staging") as (catalogue, env, library):
        yield settings, catalogue, env, library


def _tape_rows(conn: Connection) -> dict[str, tuple[str, str | None, int | None, int | None]]:
    f, r, ep = s.files, s.replicas, s.storage_endpoints
    stmt = (
        select(f.c.name, r.c.state, r.c.cartridge, r.c.fseq, r.c.member_offset)
        .join(r, r.c.file_id == f.c.id)
        .join(ep, ep.c.id == r.c.storage_id)
        .where(ep.c.name == "tape1")
    )
    return {row[0]: tuple(row[1:]) for row in conn.execute(stmt)}  # type: ignore[misc]


def _check_on_tape(library: SimulatedLibrary, rows: dict[str, Any], files: dict[str, bytes]) -> None:
    """Every available copy's bytes are the file's, at its fseq (and offset in an aggregate)."""
    for name, (state, vid, fseq, offset) in rows.items():
        if state != "available":
            continue
        raw = library.data_path(vid, fseq).read_bytes()
        start = offset or 0
        assert raw[start : start + len(files[name])] == files[name], name


async def test_a_batch_of_small_files_goes_to_tape_as_aggregates_of_one_tape_file_each(
    harness: Harness,
) -> None:
    settings, catalogue, env, library = harness
    # 7 small files (5 an aggregate at most), a large one (written as a plain file), 2 small ones.
    files = await queue_for_tape(settings, catalogue, [3000] * 7 + [20_000] + [3000] * 2)
    target = steps.targets(settings.storage)["tape1"]
    assert await writer.run_batch(env, target, library, "test") == 10
    rows = await catalogue.read(_tape_rows)
    assert {st for st, *_ in rows.values()} == {"available"}
    big = "night/f007.fits"
    assert rows[big][3] is None  # a plain tape file
    aggregates = {(vid, fseq) for n, (_st, vid, fseq, off) in rows.items() if off is not None}
    assert len(aggregates) == 2  # 5 + 4 members (the 4th holds the two after the large file)
    _check_on_tape(library, rows, files)
    tape_files = [tf for c in await library.list_cartridges() for tf in await library.list_files(c.vid)]
    assert len(tape_files) == 3
    assert (await library.usage()).total.files_written == 3  # three per-file overheads, not ten
    for tf in tape_files:
        if tf.members is None:
            assert tf.name == big
            continue
        assert tf.name.startswith(writer.AGGREGATE_PREFIX)
        for m in tf.members:
            assert rows[m.name][2:] == (tf.fseq, m.offset)
        data = library.data_path(rows[tf.members[0].name][1], tf.fseq)
        assert aggregate.read_index(data) == tf.members  # the cartridge tells without the catalogue
        assert aggregate.verify(data, tf.members) == []
    assert sum((await catalogue.tape.files_per_cartridge()).values()) == 3  # counted in tape files
    view = await catalogue.queries.show_file("night/f000.fits")  # what `spool show` prints
    assert view is not None
    [copy] = [r for r in view.replicas if r.storage == "tape1"]
    assert (copy.fseq, copy.member_offset) == rows["night/f000.fits"][2:]
    assert not list(env.staging.iterdir())  # staging files removed


async def test_a_bad_member_fails_alone_and_the_rest_of_its_aggregate_is_written(harness: Harness) -> None:
    settings, catalogue, env, library = harness
    files = await queue_for_tape(settings, catalogue, [3000] * 4)
    bad = "night/f001.fits"
    disk = settings.storage["disk1"].root / bad
    disk.write_bytes(b"\0" + files[bad][1:])  # corrupt on disk: same size, other checksum
    target = steps.targets(settings.storage)["tape1"]
    assert await writer.run_batch(env, target, library, "test") == 3
    rows = await catalogue.read(_tape_rows)
    assert rows[bad][0] == "failed"
    assert {rows[n][0] for n in files if n != bad} == {"available"}
    assert len({rows[n][1:3] for n in files if n != bad}) == 1  # one aggregate
    _check_on_tape(library, rows, files)
    view = await catalogue.queries.show_file(bad)
    assert view is not None and {r.storage: r.state for r in view.replicas}["disk1"] == "bad"
    history = [e for e in await catalogue.queries.history(bad) if e.type == "replica.bad"]
    assert history and history[0].detail["reason"] == "checksum_mismatch"


async def test_an_aggregate_not_flushed_is_lost_whole_and_one_flushed_but_not_recorded_is_reconciled(
    harness: Harness, tmp_path: Path
) -> None:
    """What a kill leaves: the library drops an aggregate written behind a buffered tape mark
    (its members go back to the queue); one flushed whose records never came is found in the
    cartridge's list of files, each member at the aggregate's fseq and its own offset."""
    settings, catalogue, env, library = harness
    files = await queue_for_tape(settings, catalogue, [3000] * 6)
    names = sorted(files)
    head = await catalogue.tape.queue_head("tape1", 100)
    batch = await catalogue.tape.take_batch([c.replica_id for c in head], "A00001", holder=HOLDER)
    by_name = {f.name: f for f in batch}
    root = settings.storage["disk1"].root

    def build(path: Path, members: list[str]) -> tuple[aggregate.Builder, int, str]:
        b = aggregate.Builder(path)
        for n in members:
            b.add(None, root / n, n, str(by_name[n].replica_id), len(files[n]), adler(files[n]))
        size, adler32 = b.seal()
        return b, size, adler32

    flushed, size1, a1 = build(tmp_path / "one.tar", names[:3])
    lost, size2, a2 = build(tmp_path / "two.tar", names[3:])
    await library.mount("DR01", "A00001")
    fseq = await library.write("DR01", flushed.path, "one", size1, a1, flush=False, members=flushed.members)
    await library.flush("DR01")
    # A writer killed after its write, before the flush: another session, then its death.
    other = await SimulatedLibrary.open(settings.tape_libraries["default"])
    await library.release_drive("DR01")
    drive = await other.claim_drive("other", vid="A00001")
    assert drive == "DR01"
    await other.write(drive, lost.path, "two", size2, a2, flush=False, members=lost.members)
    other._store.close_session()  # as a SIGKILL would: no flush, no release
    target = steps.targets(settings.storage)
    recorded, requeued = await reconcile.reconcile(
        catalogue, env.relay, {"default": library}, target, ["tape1"], env.holder, ["tape1"]
    )
    assert (recorded, requeued) == (3, 3)
    rows = await catalogue.read(_tape_rows)
    offsets = {m.name: m.offset for m in flushed.members}
    for n in names[:3]:
        assert rows[n] == ("available", "A00001", fseq, offsets[n])
    assert {rows[n][0] for n in names[3:]} == {"queued"}
    _check_on_tape(library, rows, files)
    # The next batch writes the three again, once.
    assert await writer.run_batch(env, target["tape1"], library, "test") == 3
    rows = await catalogue.read(_tape_rows)
    assert {st for st, *_ in rows.values()} == {"available"}
    _check_on_tape(library, rows, files)
    on_tape = [m.name for tf in await library.list_files("A00001") for m in tf.members or []]
    assert sorted(on_tape) == names  # each once


# --- a real kill ---------------------------------------------------------------------------------
async def _tape_files(settings: Settings) -> list[Any]:
    lib = await SimulatedLibrary.open(settings.tape_libraries["default"])
    try:
        return [tf for c in await lib.list_cartridges() for tf in await lib.list_files(c.vid)]
    finally:
        await lib.close()


async def _unflushed_aggregate(settings: Settings) -> bool:
    """An aggregate's data is on the tape behind a buffered tape mark, not committed yet."""
    root = settings.tape_libraries["default"].root
    data = sum(1 for p in root.glob("cartridges/*/*") if p.name.isdigit())  # first: commits follow
    return data > len(await _tape_files(settings)) and data > 0


@pytest.mark.integration
@pytest.mark.slow
async def test_tape_daemon_killed_while_writing_aggregates_archives_every_file_exactly_once(
    tmp_path: Path, tag: str, broker: Any
) -> None:
    n = 40
    # Durable and slow (an aggregate of ~6 files of 4 kB streams for 2 s, a flush takes 2 s), a
    # flush every 2 tape files: kills land between an aggregate's write and its flush.
    slow = (
        LIBRARY.replace("time_scale = 0", "time_scale = 1").replace("durable = false", "durable = true")
        + "\ntiming = { mount_seconds = 0.5, unmount_seconds = 0.5, locate_average_seconds = 0.5,"
        " write_rate = 20000, read_rate = 20000 }"
    )
    policy = AGGREGATING + "\nflush_files = 2"
    path = tape_config(tmp_path, tag, library=slow, policy=policy)
    settings = load_settings(path)
    files = make_files(settings, n, size=4000)
    async with running([ingest_service], settings):
        await publish_ready(broker, settings, files)
        await wait_for(lambda: _queued(settings, n), timeout=60)
    log = tmp_path / "tape.log"
    proc = start_daemon(path, "tape", log)
    try:
        # First kill: an aggregate written, not flushed. Second: later, whatever the writer does.
        for ready in (lambda: _unflushed_aggregate(settings), lambda: _available(settings, 12)):
            await wait_for(ready, timeout=120, interval=0.05)
            proc.kill()
            proc.wait(timeout=10)
            assert await count_on(settings, "tape1") < n, "the kill came too late to prove anything"
            proc = start_daemon(path, "tape", log)
        await wait_for(lambda: _available(settings, n, exactly=True), timeout=180, interval=0.2)
    finally:
        proc.terminate()
        code = proc.wait(timeout=60)
    assert code == 0, log.read_text()[-3000:]
    contents = {name_of(settings, p): data for p, data in files}
    async with await Catalogue.open(settings.catalogue.url) as cat:
        rows = await cat.read(_tape_rows)
    assert sorted(rows) == sorted(contents) and {st for st, *_ in rows.values()} == {"available"}
    tape_files = await _tape_files(settings)
    on_tape = [m.name for tf in tape_files for m in tf.members or []]
    on_tape += [tf.name for tf in tape_files if tf.members is None]
    assert sorted(on_tape) == sorted(contents)  # each file on tape once: none written twice
    assert any(tf.members for tf in tape_files)
    lib = await SimulatedLibrary.open(settings.tape_libraries["default"])
    try:
        _check_on_tape(lib, rows, contents)
    finally:
        await lib.close()
    assert not list((settings.state_dir / "tape-staging").glob("*"))


async def _queued(settings: Settings, n: int) -> bool:
    return await count_on(settings, "tape1", "queued") == n


async def _available(settings: Settings, n: int, exactly: bool = False) -> bool:
    got = await count_on(settings, "tape1")
    return got == n if exactly else got >= n
