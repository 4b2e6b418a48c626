"""The copy process (``common/storage/copy_process.py``) that runs an endpoint's small copies.

Real processes throughout: the copier is found as a child of this process, stopped with SIGSTOP to
hold a batch in flight, killed with SIGKILL, sent SIGTERM; and a daemon-like parent is killed to
show the copier does not outlive it.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.config import StorageEndpoint
from common.errors import Permanent, Retryable
from common.storage import CopyResult, PosixStorage, is_temp_name
from tests.storage_fixtures import adler

REPO = Path(__file__).resolve().parent.parent


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def landing(tmp_path: Path) -> Path:
    d = tmp_path / "landing"
    d.mkdir()
    return d


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[PosixStorage]:
    s = PosixStorage("disk1", StorageEndpoint(root=tmp_path / "disk1"))
    assert s.endpoint.small_copies == "process"  # the default
    yield s
    s.close()


def small_file(landing: Path, name: str, size: int = 1024) -> tuple[Path, bytes]:
    data = os.urandom(size)
    path = landing / name
    path.write_bytes(data)
    return path, data


async def put(storage: PosixStorage, src: Path, data: bytes, relpath: str) -> CopyResult:
    return await storage.put_from(
        src, relpath, expected_size=len(data), expected_adler32=adler(data), fsync=False
    )


def copier_pid(storage: PosixStorage) -> int:
    assert storage._copiers and storage._copiers[0].pid is not None
    return storage._copiers[0].pid


async def started_copier(storage: PosixStorage, landing: Path) -> tuple[Path, bytes, int]:
    """One small copy made, so the copier runs: (its source, the bytes, the copier's pid)."""
    src, data = small_file(landing, "a.dat")
    await put(storage, src, data, "x/warm.dat")
    return src, data, copier_pid(storage)


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if is_temp_name(p.name)] if root.exists() else []


async def test_small_copies_run_in_a_child_process_and_come_back_verified(
    storage: PosixStorage, landing: Path
) -> None:
    files = [small_file(landing, f"f{i}.dat", 100 + i) for i in range(150)]
    results = await asyncio.gather(*(put(storage, p, d, f"night/{p.name}") for p, d in files))
    pid = copier_pid(storage)
    assert pid != os.getpid()
    assert os.readlink(f"/proc/{pid}/exe") == os.readlink("/proc/self/exe")
    with open(f"/proc/{pid}/stat") as f:
        assert int(f.read().rsplit(")", 1)[1].split()[1]) == os.getpid()  # our child
    for (src, data), res in zip(files, results, strict=True):
        assert res.pfn == f"night/{src.name}"
        assert res.adler32 == adler(data) and res.size == len(data)
        assert res.path.read_bytes() == data
    # verify() of small files goes the same way, and says what is wrong.
    assert (
        await storage.verify("night/f0.dat", expected_size=100, expected_adler32=adler(files[0][1])) is None
    )
    assert await storage.verify("night/f0.dat", expected_size=100, expected_adler32="00000001") is not None
    assert await storage.verify("night/none.dat", expected_size=100, expected_adler32="00000001") == "missing"
    assert storage._copiers and storage._copiers[0].started == 1


async def test_the_copy_process_can_be_started_before_the_first_copy_and_then_serves_it(
    storage: PosixStorage, landing: Path
) -> None:
    await storage.start_copy_process()  # as a daemon does when it starts
    pid = copier_pid(storage)
    assert alive(pid)
    await storage.start_copy_process()  # running already: nothing more
    src, data = small_file(landing, "a.dat")
    assert (await put(storage, src, data, "x/a.dat")).path.read_bytes() == data
    assert copier_pid(storage) == pid and storage._copiers[0].started == 1 and len(storage._copiers) == 1


async def test_a_copy_process_that_cannot_start_does_not_fail_its_daemon(
    storage: PosixStorage, landing: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from common.storage import copy_process

    real_spawn = copy_process._spawn

    def broken_spawn() -> subprocess.Popen[bytes]:
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(copy_process, "_spawn", broken_spawn)
    await storage.start_copy_process()  # logged, not raised
    assert storage._copiers and storage._copiers[0].pid is None
    monkeypatch.setattr(copy_process, "_spawn", real_spawn)
    src, data = small_file(landing, "a.dat")
    assert (await put(storage, src, data, "x/a.dat")).path.read_bytes() == data  # started on demand


async def test_thread_mode_has_no_copy_process_to_start(tmp_path: Path) -> None:
    s = PosixStorage("disk1", StorageEndpoint(root=tmp_path / "d", small_copies="thread"))
    await s.start_copy_process()
    assert s._copiers == []


async def test_copy_processes_share_the_batches_and_never_exceed_their_number(
    tmp_path: Path, landing: Path
) -> None:
    storage = PosixStorage("disk1", StorageEndpoint(root=tmp_path / "disk1", copy_processes=2))
    try:
        files = [small_file(landing, f"f{i}.dat", 100 + i) for i in range(600)]  # many batches
        results = await asyncio.gather(*(put(storage, p, d, f"night/{p.name}") for p, d in files))
        assert len(storage._copiers) == 2
        pids = {c.pid for c in storage._copiers}
        assert len(pids) == 2 and os.getpid() not in pids
        assert all(c.started == 1 for c in storage._copiers)  # both served, neither restarted
        for (_src, data), res in zip(files, results, strict=True):
            assert res.path.read_bytes() == data
    finally:
        storage.close()
    assert storage._copiers == []


async def test_errors_cross_the_process_boundary_with_their_class_and_reason(
    storage: PosixStorage, landing: Path, tmp_path: Path
) -> None:
    good, data = small_file(landing, "good.dat")
    bad_sum, bad_data = small_file(landing, "bad.dat")
    outcomes = await asyncio.gather(
        put(storage, good, data, "a/good.dat"),
        storage.put_from(landing / "none.dat", "a/none.dat", expected_size=10, fsync=False),
        storage.put_from(
            bad_sum, "a/bad.dat", expected_size=len(bad_data), expected_adler32="00000001", fsync=False
        ),
        storage.put_from(good, "a/short.dat", expected_size=len(data) - 1, fsync=False),
        storage.copy_verified(
            tmp_path / "gone.dat", "a/gone.dat", expected_size=5, expected_adler32="1", fsync=False
        ),
        return_exceptions=True,
    )
    ok, missing, checksum, size, source = outcomes
    assert isinstance(ok, CopyResult) and ok.adler32 == adler(data)
    assert isinstance(missing, Permanent) and missing.reason == "file_missing"
    assert isinstance(checksum, Permanent) and checksum.reason == "checksum_mismatch"
    assert "expected 00000001" in checksum.message
    assert isinstance(size, Permanent) and size.reason == "size_mismatch"
    assert isinstance(source, Permanent) and source.reason == "source_missing"
    assert temp_files(storage.root) == []


async def test_a_copier_killed_between_batches_is_replaced(storage: PosixStorage, landing: Path) -> None:
    src, data, first = await started_copier(storage, landing)
    os.kill(first, signal.SIGKILL)
    assert wait_gone(first)
    res = await put(storage, src, data, "x/b.dat")
    assert res.path.read_bytes() == data
    assert copier_pid(storage) != first
    assert storage._copiers and storage._copiers[0].started == 2


async def test_a_copier_killed_during_a_batch_fails_that_batch_as_retryable_only(
    storage: PosixStorage, landing: Path
) -> None:
    src, data, pid = await started_copier(storage, landing)
    os.kill(pid, signal.SIGSTOP)  # the batch below is written to the pipe, never answered
    batch = [asyncio.create_task(put(storage, src, data, f"x/held{i}.dat")) for i in range(5)]
    await asyncio.sleep(0.3)
    assert not any(t.done() for t in batch)
    os.kill(pid, signal.SIGKILL)
    outcomes = await asyncio.wait_for(asyncio.gather(*batch, return_exceptions=True), 10)
    for err in outcomes:
        assert isinstance(err, Retryable), err
        assert err.reason == "storage_io_error"
        assert "copy process of disk1 failed" in err.message and "exited with code -9" in err.message
    res = await put(storage, src, data, "x/after.dat")  # the next batch gets a new copier
    assert res.path.read_bytes() == data
    assert copier_pid(storage) != pid


async def test_a_cancelled_batch_does_not_answer_for_the_next_one(
    storage: PosixStorage, landing: Path
) -> None:
    # The answers of a batch whose callers gave up stay in step: the next batch gets its own.
    src, data, pid = await started_copier(storage, landing)
    other, other_data = small_file(landing, "b.dat", 2048)
    os.kill(pid, signal.SIGSTOP)
    given_up = [asyncio.create_task(put(storage, src, data, f"x/old{i}.dat")) for i in range(3)]
    await asyncio.sleep(0.2)
    for t in given_up:
        t.cancel()
    await asyncio.gather(*given_up, return_exceptions=True)
    os.kill(pid, signal.SIGCONT)
    res = await asyncio.wait_for(put(storage, other, other_data, "x/new.dat"), 10)
    assert (res.pfn, res.size, res.adler32) == ("x/new.dat", 2048, adler(other_data))
    assert copier_pid(storage) == pid


async def test_sigterm_does_not_stop_the_copier_its_daemon_needs_it_to_drain(
    storage: PosixStorage, landing: Path
) -> None:
    src, data, pid = await started_copier(storage, landing)
    os.kill(pid, signal.SIGTERM)
    os.kill(pid, signal.SIGINT)
    await asyncio.sleep(0.2)
    assert alive(pid)
    await put(storage, src, data, "x/b.dat")
    assert copier_pid(storage) == pid


async def test_close_ends_the_copier_and_the_storage_starts_another_on_demand(
    storage: PosixStorage, landing: Path
) -> None:
    src, data, pid = await started_copier(storage, landing)
    storage.close()
    assert not alive(pid)  # exited and reaped by close itself
    await put(storage, src, data, "x/b.dat")
    assert copier_pid(storage) != pid


async def test_thread_mode_starts_no_process(tmp_path: Path, landing: Path) -> None:
    storage = PosixStorage("t", StorageEndpoint(root=tmp_path / "t", small_copies="thread"))
    src, data = small_file(landing, "a.dat")
    res = await put(storage, src, data, "x/a.dat")
    assert res.path.read_bytes() == data
    assert storage._copiers == []
    storage.close()


def test_the_copier_dies_with_its_parent_killed_by_sigkill(tmp_path: Path, landing: Path) -> None:
    # A daemon killed with SIGKILL must not leave its copier writing behind its successor.
    src, data = small_file(landing, "a.dat")
    script = textwrap.dedent(
        f"""
        import asyncio, sys, time
        from common.storage import PosixStorage

        async def main():
            s = PosixStorage("d", {str(tmp_path / "d")!r})
            await s.put_from({str(src)!r}, "a.dat", expected_size={len(data)}, fsync=False)
            print(s._copiers[0].pid, flush=True)
            time.sleep(60)

        asyncio.run(main())
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert alive(child)
        parent.kill()
        parent.wait(10)
        assert wait_gone(child), f"copier {child} outlived its parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


async def test_batches_sent_before_earlier_ones_are_answered_get_their_own_answers(
    storage: PosixStorage, landing: Path
) -> None:
    files = [small_file(landing, f"f{i}.dat", 200 + i) for i in range(9)]
    await put(storage, *files[0], "x/warm.dat")
    pid = copier_pid(storage)
    os.kill(pid, signal.SIGSTOP)  # batches pile up in the pipe (two sent, the rest waiting)
    groups = []
    for g in range(3):
        groups.append(
            [asyncio.create_task(put(storage, p, d, f"x/{g}/{p.name}")) for p, d in files[g * 3 : g * 3 + 3]]
        )
        await asyncio.sleep(0.1)  # a batch of its own
    os.kill(pid, signal.SIGCONT)
    for g, tasks in enumerate(groups):
        for (src, data), res in zip(files[g * 3 : g * 3 + 3], await asyncio.gather(*tasks), strict=True):
            assert (res.pfn, res.size, res.adler32) == (f"x/{g}/{src.name}", len(data), adler(data))
    assert copier_pid(storage) == pid


async def test_a_copier_found_dead_before_its_eof_is_read_still_fails_what_it_owed(
    storage: PosixStorage, landing: Path
) -> None:
    # The next batch finds the process gone before the reader has seen its EOF: the batch the dead
    # process owed still fails as retryable (it used to wait for ever), and a new process copies.
    src, data, pid = await started_copier(storage, landing)
    os.kill(pid, signal.SIGSTOP)
    owed = asyncio.create_task(put(storage, src, data, "x/owed.dat"))
    await asyncio.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)  # blocking: the event loop has not seen the EOF yet
    # Straight to the copy process: its write is queued before the loop next reads the pipe.
    assert storage._copiers
    after = asyncio.ensure_future(
        storage._copiers[0].run([("copy", (str(src), "x/after.dat", len(data), adler(data), False))])
    )
    with pytest.raises(Retryable) as err:
        await asyncio.wait_for(owed, 10)
    assert err.value.reason == "storage_io_error"
    [result] = await asyncio.wait_for(after, 10)
    assert isinstance(result, CopyResult) and result.path.read_bytes() == data
    assert copier_pid(storage) != pid


def test_batches_sent_ahead_are_bounded_by_their_bytes(tmp_path: Path) -> None:
    """The copy process is sent several batches ahead (so it is not left idle while the event loop
    is busy), about PIPELINED_BYTES of small copies: 4 batches of 256 x 64 KiB by default, never
    fewer than two, whatever the endpoint counts as small."""
    from common.storage import posix

    default = PosixStorage("d", StorageEndpoint(root=tmp_path))
    assert default.pipelined_batches() * posix.SMALL_BATCH * 65536 == posix.PIPELINED_BYTES
    assert default.pipelined_batches() == 4
    large = PosixStorage("l", StorageEndpoint(root=tmp_path, batch_copy_bytes=8 * 2**20))
    assert large.pipelined_batches() == posix.MIN_PIPELINED_BATCHES == 2
    two = PosixStorage("t", StorageEndpoint(root=tmp_path, copy_processes=2))
    assert two._small_batcher()._concurrency == 2 * default.pipelined_batches()
    for storage in (default, large, two):
        storage.close()


def test_the_copier_ends_quietly_when_its_parent_closed_the_answer_pipe(tmp_path: Path, capfd) -> None:  # type: ignore[no-untyped-def]
    """A parent that stopped (or gave up on it) closes its end: the copier's next answer meets a
    broken pipe, and it returns instead of dying with a traceback on the daemon's stderr."""
    import io

    from common.storage import copy_process

    class ClosedPipe(io.RawIOBase):
        def writable(self) -> bool:
            return True

        def write(self, b: object) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    endpoint = StorageEndpoint(root=tmp_path / "d")
    hello = {"name": "d", "root": str(endpoint.root), "min_free_bytes": 0, "chunk_size": 65536}
    src = tmp_path / "a.dat"
    src.write_bytes(b"x" * 100)
    batch = [["replicate", [str(src), "a.dat", 100, adler(b"x" * 100), False]]]
    stream_in = io.BytesIO(copy_process._frame(hello) + copy_process._frame(batch))
    thresholds = gc.get_threshold()  # serve tunes the collector, as in its own process
    try:
        returned = copy_process.serve(stream_in, ClosedPipe())  # type: ignore[arg-type]
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
    assert returned is None  # it returned (raised nothing) ...
    assert capfd.readouterr().err == ""  # ... and wrote no traceback


@pytest.mark.parametrize("loop_factory", ["uvloop", "asyncio"])
def test_closing_a_copy_process_never_closes_a_descriptor_opened_after(
    tmp_path: Path, loop_factory: str
) -> None:
    """The loop closes a pipe's descriptor on its next turn (uvloop the number itself), after the
    child was told to exit: a descriptor opened in between (the next copy process's pipe, a copy's
    file) must not be the one it closes."""
    import fcntl

    import uvloop

    from common.storage.copy_process import CopyProcess

    def is_open(fd: int) -> bool:
        try:
            fcntl.fcntl(fd, fcntl.F_GETFD)
            return True
        except OSError:
            return False

    async def main() -> list[int]:
        opened: list[int] = []
        for _ in range(2):
            copier = CopyProcess("disk1", StorageEndpoint(root=tmp_path / "disk1"), 1024 * 1024)
            await copier.start()
            pid = copier.pid
            assert pid is not None
            copier.close()
            assert wait_gone(pid, timeout=1.5)  # EOF reached it at once (no 2 s wait, no kill)
            r, w = os.pipe()  # the lowest free numbers: those the copier's pipes had
            opened += [r, w]
            await asyncio.sleep(0.05)  # the loop's turns that close the copier's transports
            assert is_open(r) and is_open(w)
        return opened

    factory = uvloop.new_event_loop if loop_factory == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        opened = runner.run(main())
    for fd in opened:
        os.close(fd)


def test_the_copier_imports_neither_pydantic_nor_the_daemon_stack() -> None:
    from common.storage import copy_process

    """The copier is one process per endpoint per daemon: what it imports is resident in each
    (48 MB with the config's pydantic and rich, 27 MB without)."""
    probe = (
        copy_process.CHILD_COMMAND.replace("main()", "")
        + "from common.logging import LogChoice, configure_logging; "
        + "configure_logging(LogChoice(format='json')); "
        + "print(sorted(m for m in ('pydantic', 'sqlalchemy', 'aio_pika', 'rich', 'common.config') "
        + "if sys.modules.get(m) is not None))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, str(os.getpid()), copy_process._IMPORT_ROOT],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


async def test_a_stalled_copier_is_abandoned_its_copies_retried_and_the_next_batch_served(
    tmp_path: Path, landing: Path
) -> None:
    # The finding: copy processes frozen for over a minute held 300 files in flight with no
    # end. A copier that answers none of its waiting batches for stall_seconds is killed without
    # waiting on it, its copies fail retryably, and a new one serves the next batch.
    storage = PosixStorage("disk1", StorageEndpoint(root=tmp_path / "disk1", stall_seconds=1.0))
    try:
        src, data, pid = await started_copier(storage, landing)
        await asyncio.sleep(1.5)  # idle longer than stall_seconds: nothing waits, nothing is stalled
        assert alive(pid)
        os.kill(pid, signal.SIGSTOP)  # frozen (a hung file system looks the same from here)
        t0 = time.monotonic()
        batch = [asyncio.create_task(put(storage, src, data, f"x/held{i}.dat")) for i in range(5)]
        outcomes = await asyncio.wait_for(asyncio.gather(*batch, return_exceptions=True), 10)
        waited = time.monotonic() - t0
        for err in outcomes:
            assert isinstance(err, Retryable), err
            assert err.reason == "transfer_timeout"
            assert "stalled" in err.message and "abandoned" in err.message
        assert 1.0 <= waited < 5.0, waited
        assert wait_gone(pid)
        res = await put(storage, src, data, "x/after.dat")
        assert res.path.read_bytes() == data and copier_pid(storage) != pid
    finally:
        storage.close()
