"""The library's directory: state file, per-cartridge journals, file data, and process sessions.

Layout under the root::

    library.jsonl                drives and cartridge headers: a snapshot, then a line of changes
                                 per transaction (``common.tape.statelog``)
    lock                         flock(2) taken around every read-modify-write of the state
    sessions/<token>.lock        one per open library object, flock-ed for its lifetime
    cartridges/<VID>/journal.jsonl   the cartridge's file list, append-only (one JSON record a line)
    cartridges/<VID>/<fseq:08d>      the file's bytes as "written on tape"
    cartridges/<VID>/.<fseq:08d>.<session>.tmp   data on its way (renamed when complete)

Why a journal per cartridge rather than the file list inside the state file: a tape is append-
only, so its catalogue is too, and appending one fsync-ed line per file keeps a write O(1) where
rewriting a growing list would make filling a cartridge quadratic. A line torn by a crash is the
journal's last one; it is ignored and truncated under the lock. The state file holds a header per
cartridge and is appended to the same way: a transaction writes only the drives and headers it
changed.

Buffered writes (``write(flush=False)``) append their ``reserve`` and ``written`` lines without
fsync; the flush fsyncs the group's data files, then appends their ``commit`` lines with one fsync
(``journal_syncs`` counts them). Lines lost to a power cut are lines of files not committed yet,
which recovery drops anyway; cartridge headers are recomputed from the journals at open.

Several processes may share a library (the tape and the recall daemons each open it). Every
transaction holds the ``lock`` file and re-reads the state, so nobody works from a stale copy.
A session lock file tells the living from the dead: the kernel drops a flock when its process dies,
so whoever can take a session's lock knows that session is gone and may undo what it left half
done. Both rely on flock, hence a local file system.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
from array import array
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from common.tape.library import TapeFile
from common.tape.statelog import (
    STATE_FILE,
    TEMP_SUFFIX,
    LibraryState,
    StateFile,
    fsync_dir,
)

__all__ = ["JOURNAL", "STATE_FILE", "CartridgeFiles", "LibraryState", "Store", "fsync_dir"]

JOURNAL = "journal.jsonl"
# Replayed journals kept in memory, the most recently used: a night fills cartridge after cartridge
# and each kept every file it holds (the tape daemon's memory grew with the library). One that was
# let go is replayed again from its file when asked for (a full one: under a second).
JOURNALS_KEPT = 8


class JournalEntry:
    """A file of a replayed journal not committed yet (being written, or written and waiting for
    its flush): a flush group's worth at most. Committed files move to ``Committed``."""

    __slots__ = ("adler32", "fseq", "line", "name", "offset", "size", "state", "written_at")

    def __init__(self, raw: dict[str, Any], line: tuple[int, int]) -> None:
        f = TapeFile.model_validate(raw)  # validated once, as the journal is replayed
        self.fseq, self.name, self.size, self.adler32 = f.fseq, f.name, f.size, f.adler32
        self.offset, self.state, self.written_at = f.offset, f.state, f.written_at
        self.line = line  # where its reserve record is in the journal (offset, length)

    @property
    def end(self) -> int:
        return self.offset + self.size


class Committed:
    """A cartridge's committed files as columns in fseq order: each one's fseq, end on tape, where
    its reserve record is in the journal, and when it was committed; the rest (name, checksum, an
    aggregate's index) is read back from that record when asked for.

    A night's cartridge holds tens of thousands of files, and an object per file (~800 B with its
    name and numbers) was the tape daemon's largest growth: 70 MB of 500,000 files. As columns a
    file costs 40 B, and nothing but a listing or a read of that file needs more.
    """

    def __init__(self) -> None:
        self.fseq, self.end, self.line_at, self.line_len = array("q"), array("q"), array("q"), array("q")
        self.at = array("d")

    def __len__(self) -> int:
        return len(self.fseq)

    def find(self, fseq: int) -> int | None:
        i = bisect_left(self.fseq, fseq)
        return i if i < len(self.fseq) and self.fseq[i] == fseq else None

    def add(self, entry: JournalEntry, at: float) -> None:
        """Files are committed in fseq order (one writer per cartridge), so this appends; a
        journal replayed in another order still ends sorted."""
        self.remove(entry.fseq)
        i = bisect_left(self.fseq, entry.fseq)
        values: tuple[float, ...] = (entry.fseq, entry.end, *entry.line, at)
        for column, value in zip(self._columns(), values, strict=True):
            column.insert(i, value)  # ints into the "q" columns, the time into the "d" one

    def remove(self, fseq: int) -> bool:
        i = self.find(fseq)
        if i is None:
            return False
        for column in self._columns():
            del column[i]
        return True

    def _columns(self) -> tuple[array[Any], ...]:
        return self.fseq, self.end, self.line_at, self.line_len, self.at


@dataclass
class CartridgeFiles:
    """A cartridge's journal replayed: its committed files, the ones on their way and who is
    writing them."""

    path: Path  # the journal (committed files' records are read back from it)
    pending: dict[int, JournalEntry] = field(default_factory=dict)  # reserved, not committed
    commits: Committed = field(default_factory=Committed)
    writers: dict[int, str] = field(default_factory=dict)  # fseq -> session, "writing" files only
    consumed: int = 0  # journal bytes replayed so far (complete lines only)
    # End of data and last fseq, kept as files are reserved: every write asks for both, and
    # computing them over every file of the cartridge made a night's writes quadratic (a full
    # cartridge holds thousands of files). None: unknown since a drop, computed on the next ask.
    _end: int | None = 0
    _last: int | None = 0
    _read_back: tuple[int, dict[str, Any]] | None = None  # the last record read back, for reads in a row

    def apply(self, record: dict[str, Any], line: tuple[int, int]) -> None:
        """Replay one record; ``line``: its offset and length in the journal."""
        op = record["op"]
        if op == "reserve":
            f = JournalEntry(record["file"], line)
            if f.fseq in self.pending or self.commits.remove(f.fseq):  # a reservation replaced:
                self._end = self._last = self._read_back = None  # its old extent no longer counts
            self.pending[f.fseq] = f
            self.writers[f.fseq] = record["session"]
            if self._end is not None and self._last is not None:
                self._end, self._last = max(self._end, f.end), max(self._last, f.fseq)
        elif op == "written":
            self.pending[record["fseq"]].state = "written"
        elif op == "commit":
            fseq = record["fseq"]
            self.commits.add(self.pending.pop(fseq), record["at"])
            self.writers.pop(fseq, None)
        elif op == "drop":
            if self.pending.pop(record["fseq"], None) is None:
                self.commits.remove(record["fseq"])
            self.writers.pop(record["fseq"], None)
            self._end = self._last = None
            self._read_back = None
        else:
            raise ValueError(f"unknown journal record {record!r}")

    def holds(self, fseq: int) -> bool:
        """Whether a record claims ``fseq`` (committed or on its way)."""
        return fseq in self.pending or self.commits.find(fseq) is not None

    def empty(self) -> bool:
        return not self.pending and not len(self.commits)

    def unflushed(self, session: str, *, states: tuple[str, ...] = ("written",)) -> list[int]:
        """Fseqs ``session`` wrote and did not flush yet (in ``states``), in order."""
        return sorted(n for n, s in self.writers.items() if s == session and self.pending[n].state in states)

    def committed(self) -> list[TapeFile]:
        """The committed files in fseq order, aggregates with their index (read from the journal)."""
        c = self.commits
        with open(self.path, "rb") as journal:
            return [
                TapeFile.model_validate(self._record(journal, c.line_at[i], c.line_len[i], c.at[i]))
                for i in range(len(c))
            ]

    def committed_count(self) -> int:
        return len(self.commits)

    def committed_file(self, fseq: int) -> TapeFile | None:
        """A committed file's place and size; an aggregate without its index (``committed`` has it)."""
        i = self.commits.find(fseq)
        if i is None:
            return None
        if self._read_back is None or self._read_back[0] != fseq:
            c = self.commits
            with open(self.path, "rb") as journal:
                raw = self._record(journal, c.line_at[i], c.line_len[i], c.at[i])
            raw["members"] = None
            self._read_back = (fseq, raw)
        return TapeFile.model_validate(self._read_back[1])

    @staticmethod
    def _record(journal: BinaryIO, line_at: int, line_len: int, at: float) -> dict[str, Any]:
        journal.seek(line_at)
        raw: dict[str, Any] = json.loads(journal.read(line_len))["file"]
        raw["state"], raw["written_at"] = "committed", at
        return raw

    def end_of_data(self) -> int:
        if self._end is None:
            ends = [f.end for f in self.pending.values()]
            self._end = max([*ends, max(self.commits.end, default=0)], default=0)
        return self._end

    def next_fseq(self) -> int:
        if self._last is None:
            last = self.commits.fseq[-1] if len(self.commits) else 0
            self._last = max([*self.pending, last])
        return self._last + 1


class Store:
    """Blocking access to the directory; the caller serialises calls and runs them off the loop."""

    def __init__(self, root: Path, *, durable: bool = True) -> None:
        self.root = root
        self.durable = durable
        self.state = StateFile(root, durable=durable)
        self.sessions = root / "sessions"
        self.cartridges = root / "cartridges"
        self._lock_fd: int | None = None
        self._session_fd: int | None = None
        self.session: str | None = None
        self._journals: OrderedDict[str, CartridgeFiles] = OrderedDict()
        self.journal_syncs = 0  # fsyncs of journals: one per flush (tests count them)

    # --- the library lock ----------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        if self._lock_fd is None:
            self.root.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    # --- state ---------------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.state.exists()

    def load(self) -> LibraryState:
        """The state as the file holds it now (call under the lock): the kept one, brought up to
        date with what other processes changed (``common.tape.statelog``)."""
        return self.state.load()

    def save(self, state: LibraryState, *, sync: bool = True) -> None:
        """Record what the transaction changed; ``sync=False``: not durable (buffered writes: the
        headers are recomputed from the journals after a crash)."""
        self.state.save(state, sync=sync)

    def forget(self) -> None:
        """Drop the kept state: the next ``load`` reads the file (after a failed transaction)."""
        self.state.forget()

    def initialise(self, state: LibraryState) -> None:
        """Create the directories and empty journals, then the state file last (it marks success)."""
        for vid in state.cartridges:
            d = self.cartridge_dir(vid)
            d.mkdir(parents=True, exist_ok=True)
            (d / JOURNAL).touch()
            fsync_dir(d)
        fsync_dir(self.cartridges)
        self.state.compact(state)

    def remove_stale_state_temps(self) -> int:
        """Temp files of a state compaction interrupted by a crash (only safe under the lock)."""
        return self.state.remove_stale_temps()

    # --- cartridge data ------------------------------------------------------------------------
    def cartridge_dir(self, vid: str) -> Path:
        return self.cartridges / vid

    def data_path(self, vid: str, fseq: int) -> Path:
        return self.cartridge_dir(vid) / f"{fseq:08d}"

    def sync_data(self, vid: str, fseqs: list[int]) -> None:
        """Make the data of ``fseqs`` durable: each file, then the directory once."""
        if not self.durable or not fseqs:
            return
        for n in fseqs:
            fd = os.open(self.data_path(vid, n), os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(self.cartridge_dir(vid))

    def temp_path(self, vid: str, fseq: int, session: str) -> Path:
        return self.cartridge_dir(vid) / f".{fseq:08d}.{session}{TEMP_SUFFIX}"

    @staticmethod
    def temp_owner(name: str) -> str | None:
        """The session of a data temp file name, None if ``name`` is not one."""
        parts = name.split(".")
        if len(parts) == 4 and parts[0] == "" and parts[1].isdigit() and parts[3] == TEMP_SUFFIX[1:]:
            return parts[2]
        return None

    # --- journals ------------------------------------------------------------------------------
    def journal(self, vid: str) -> CartridgeFiles:
        """The cartridge's files, after replaying what other processes appended since last time."""
        path = self.cartridge_dir(vid) / JOURNAL
        cf = self._journals.get(vid)
        if cf is None:
            cf = self._journals[vid] = CartridgeFiles(path)
            while len(self._journals) > JOURNALS_KEPT:
                self._journals.popitem(last=False)
        else:
            self._journals.move_to_end(vid)
        with open(path, "rb") as f:
            f.seek(cf.consumed)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]
        at = cf.consumed
        for line in complete.splitlines(keepends=True):
            if line.strip():
                cf.apply(json.loads(line), (at, len(line)))
            at += len(line)
        cf.consumed += len(complete)
        return cf

    def append(self, vid: str, *records: dict[str, Any], sync: bool = True) -> CartridgeFiles:
        """Append records (under the lock), dropping a tail torn by an earlier crash; durably
        (one fsync for all of them) unless ``sync`` is False."""
        cf = self.journal(vid)
        path = self.cartridge_dir(vid) / JOURNAL
        lines = [json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in records]
        data = b"".join(lines)
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            if os.fstat(fd).st_size != cf.consumed:
                os.ftruncate(fd, cf.consumed)
            os.lseek(fd, cf.consumed, os.SEEK_SET)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if self.durable and sync:
                os.fsync(fd)
                self.journal_syncs += 1
        finally:
            os.close(fd)
        at = cf.consumed
        for r, line in zip(records, lines, strict=True):
            cf.apply(r, (at, len(line)))
            at += len(line)
        cf.consumed += len(data)
        return cf

    # --- sessions ------------------------------------------------------------------------------
    def open_session(self) -> str:
        """Start this object's session (under the library lock, so nobody judges it dead early)."""
        self.sessions.mkdir(exist_ok=True)
        token = secrets.token_hex(8)
        fd = os.open(self.sessions / f"{token}.lock", os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._session_fd, self.session = fd, token
        return token

    def close_session(self) -> None:
        if self._session_fd is not None and self.session is not None:
            (self.sessions / f"{self.session}.lock").unlink(missing_ok=True)
            os.close(self._session_fd)  # releases the flock
        self._session_fd, self.session = None, None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def prune_sessions(self) -> None:
        """Remove the lock files of sessions whose process is gone (``alive`` does the removing)."""
        for p in self.sessions.glob("*.lock"):
            self.alive(p.stem)

    def alive(self, session: str) -> bool:
        """Whether the session's process still runs (call under the library lock)."""
        if session == self.session:
            return True
        path = self.sessions / f"{session}.lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        path.unlink(missing_ok=True)  # we could lock it: its owner is gone
        return False
