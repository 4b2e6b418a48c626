"""The library's drives and cartridge headers on disk: a snapshot and the changes since, so that a
transaction writes what it changed, not the whole library.

``library.jsonl`` holds one JSON document a line:

- the first is the snapshot, ``{"generation": "<16 hex>", "state": {...}}`` (``LibraryState``);
- then one line per transaction that changed anything: the whole record of each drive and each
  cartridge it changed, ``{"drives": {...}, "cartridges": {...}}`` (``Change``).

Why not one state file replaced whole: a write changes one drive and one cartridge, but replacing
the file rewrote every cartridge's header, twice per file written. With 400 cartridges that was
most of a write's cost (the recall benchmark's set-up of 200,000 files took over an hour; the
tape daemon spent 17 % of its worker threads' time in it in the night benchmark), and it grew
with the library. A line costs what changed. Once the lines outweigh the snapshot
(``compact_at``) the file is written again as a fresh snapshot under a new generation: temp file,
fsync, ``os.replace``, so a crash leaves the old file or the new one, never a mix.

Reading: every transaction first brings the kept state up to date, under the library lock. The
generation, at a fixed place at the start of the file, tells whether the file is still the one
the kept state came from; then only the lines appended since (by other processes) are read,
otherwise the whole file. A random generation rather than a timestamp or an inode: both can
repeat after a replace.

Durability — a kill at any point loses no transaction that returned, a power cut none that was
synced:

- a transaction's line is appended with one write and, unless the transaction says it need not
  survive a power cut (``sync=False``: buffered writes, whose headers are recomputed from the
  journals at open), fsync-ed before the transaction returns;
- a last line without its newline is a transaction that never returned (killed while appending):
  it is ignored, and cut off by the next append. A line that does not parse ends the log the same
  way: after a power cut the file's unsynced tail may hold zeros, and only lines of transactions
  that did not need to survive live there; stopping at the first keeps the state a prefix of the
  history, as the journals' recovery assumes.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from common.tape.library import Cartridge, Drive

STATE_VERSION = 2
STATE_FILE = "library.jsonl"
# Version 1: the whole state in one JSON file, replaced at every transaction. Converted at open.
LEGACY_STATE_FILE = "library.json"
TEMP_SUFFIX = ".tmp"
GENERATION_PREFIX = b'{"generation":"'
GENERATION_HEX = 16
HEADER_LEN = len(GENERATION_PREFIX) + GENERATION_HEX + 1  # and the closing quote
# Compact once the lines appended since the snapshot are this many times its size (and at least
# MIN_LOG_BYTES): a full read (a new session, or after a failed transaction) then parses at most
# a few snapshots' worth, and a compaction's cost is spread over many transactions.
COMPACT_RATIO = 2
MIN_LOG_BYTES = 256 * 1024


class LibraryState(BaseModel):
    """The drives and cartridge headers (the cartridges' files are in their journals)."""

    version: int = STATE_VERSION
    created_at: float = 0.0
    drives: dict[str, Drive] = Field(default_factory=dict)
    cartridges: dict[str, Cartridge] = Field(default_factory=dict)


class Snapshot(BaseModel):
    """The file's first line. ``generation`` first: it is read at a fixed offset."""

    generation: str = Field(pattern=rf"^[0-9a-f]{{{GENERATION_HEX}}}$")
    state: LibraryState


class Change(BaseModel):
    """One transaction's line: the new record of every drive and cartridge it changed."""

    drives: dict[str, Drive] = Field(default_factory=dict)
    cartridges: dict[str, Cartridge] = Field(default_factory=dict)


def library_exists(root: Path) -> bool:
    """Whether ``root`` holds a library (in either format)."""
    return (root / STATE_FILE).is_file() or (root / LEGACY_STATE_FILE).is_file()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` so a crash leaves either the old or the new content."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}{TEMP_SUFFIX}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(path.parent)


@functools.cache
def _nested(cls: type[BaseModel]) -> tuple[str, ...]:
    """Fields of ``cls`` that hold a model (a drive's ``usage``): changed in place, so compared
    field by field too. One level deep is all the records have; deeper would go unseen."""
    names = []
    for name, info in cls.model_fields.items():
        kind = info.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            if _nested(kind):
                raise TypeError(f"{cls.__name__}.{name}: models nested two deep are not tracked")
            names.append(name)
    return tuple(names)


Fingerprint = tuple[dict[str, Any], ...]


def _fingerprint(m: BaseModel) -> Fingerprint:
    """Shallow copies of the record's fields, and of its nested models' fields."""
    return (m.__dict__.copy(), *(getattr(m, n).__dict__.copy() for n in _nested(type(m))))


def _unchanged(m: BaseModel, kept: Fingerprint | None) -> bool:
    if kept is None or m.__dict__ != kept[0]:
        return False
    return all(getattr(m, n).__dict__ == k for n, k in zip(_nested(type(m)), kept[1:], strict=True))


class HandedOut(dict[str, Cartridge]):
    """The cartridge headers, remembering which ones were handed out since ``watch``: only those
    can have been changed in place, so only those are compared at save. Comparing every header
    at every save cost more than the save itself with 400 cartridges. Iterating over the values
    hands out every one; removing a header is not a change a line can record."""

    __slots__ = ("handed",)

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.handed: set[str] | None = set()  # None: all of them

    def watch(self) -> None:
        self.handed = set()

    def __getitem__(self, key: str) -> Cartridge:
        value = super().__getitem__(key)
        if self.handed is not None:
            self.handed.add(key)
        return value

    def get(self, key: str, default: Any = None) -> Any:
        if self.handed is not None and key in self:
            self.handed.add(key)
        return super().get(key, default)

    def __setitem__(self, key: str, value: Cartridge) -> None:
        super().__setitem__(key, value)
        if self.handed is not None:
            self.handed.add(key)

    def values(self) -> Any:
        self.handed = None
        return super().values()

    def items(self) -> Any:
        self.handed = None
        return super().items()

    def copy(self) -> dict[str, Cartridge]:
        self.handed = None
        return dict(super().items())

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("cartridge headers are never removed from a library's state")

    __delitem__ = pop = popitem = clear = setdefault = _refuse


class StateFile:
    """``library.jsonl``: load, save and compact. Call every method under the library lock."""

    def __init__(self, root: Path, *, durable: bool = True) -> None:
        self.path = root / STATE_FILE
        self.legacy_path = root / LEGACY_STATE_FILE
        self.durable = durable
        self.compactions = 0  # snapshots written by this object (tests count them)
        self._state: LibraryState | None = None
        self._header = b""  # the first HEADER_LEN bytes of the file the kept state came from
        self._consumed = 0  # bytes of the file applied to the kept state (complete lines)
        self._snapshot_bytes = 0
        self._kept_drives: dict[str, Fingerprint] = {}
        self._kept_cartridges: dict[str, Fingerprint] = {}

    def exists(self) -> bool:
        return self.path.is_file()

    def convert_legacy(self) -> bool:
        """Turn a version 1 ``library.json`` into a snapshot (once, at open); True if it did."""
        if not self.legacy_path.is_file():
            return False
        if not self.path.is_file():  # else a conversion stopped after its replace: that one counts
            state = LibraryState.model_validate_json(self.legacy_path.read_bytes())
            if state.version != 1:
                raise RuntimeError(f"{self.legacy_path}: state version {state.version}, expected 1")
            state.version = STATE_VERSION
            self.compact(state)
        self.legacy_path.unlink()
        fsync_dir(self.path.parent)
        return True

    def load(self) -> LibraryState:
        """The state as the file holds it now. The object given is the kept one, which
        transactions change in place: one that fails part-way must ``forget`` it."""
        with open(self.path, "rb") as f:
            if self._state is not None and os.pread(f.fileno(), HEADER_LEN, 0) == self._header:
                size = os.fstat(f.fileno()).st_size
                if size >= self._consumed:
                    if size > self._consumed:
                        f.seek(self._consumed)
                        self._apply(f.read())
                    self._watch(self._state)
                    return self._state
            f.seek(0)
            data = f.read()
        self.forget()
        end = data.find(b"\n") + 1
        if end == 0:
            raise RuntimeError(f"{self.path}: no complete snapshot line")
        snapshot = Snapshot.model_validate_json(data[:end])
        if snapshot.state.version != STATE_VERSION:
            raise RuntimeError(
                f"{self.path}: state version {snapshot.state.version}, expected {STATE_VERSION}"
            )
        state = snapshot.state
        self._keep_all(state)
        self._header, self._consumed, self._snapshot_bytes = data[:HEADER_LEN], end, end
        self._state = state
        self._apply(data[end:])
        self._watch(state)
        return state

    def save(self, state: LibraryState, *, sync: bool = True) -> None:
        """Append what changed since the last load or save as one line; ``sync=False``: no fsync
        (the line is still whole or absent after a kill, but may be lost to a power cut)."""
        if state is not self._state:
            self.compact(state)  # a state built elsewhere (a new library): it becomes the snapshot
            return
        drives = {k: d for k, d in state.drives.items() if not _unchanged(d, self._kept_drives.get(k))}
        carts = {k: c for k, c in self._handed_out(state) if not _unchanged(c, self._kept_cartridges.get(k))}
        if not drives and not carts:
            self._watch(state)
            return
        line = Change(drives=drives, cartridges=carts).model_dump_json().encode() + b"\n"
        if self._consumed + len(line) - self._snapshot_bytes > self._compact_at():
            self.compact(state)
            return
        fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            if os.fstat(fd).st_size != self._consumed:
                os.ftruncate(fd, self._consumed)  # a torn line a killed process left
            view = memoryview(line)
            at = self._consumed
            while view:
                n = os.pwrite(fd, view, at)
                view, at = view[n:], at + n
            if self.durable and sync:
                os.fsync(fd)
        except BaseException:
            self.forget()  # the line may be on disk in part or whole: read the file again
            raise
        finally:
            os.close(fd)
        self._consumed += len(line)
        self._keep(drives, carts)
        self._watch(state)

    def compact(self, state: LibraryState) -> None:
        """Write ``state`` as a new snapshot, replacing the file (always durable if the library is:
        it replaces lines that were synced)."""
        self.forget()
        generation = secrets.token_hex(GENERATION_HEX // 2)
        data = Snapshot(generation=generation, state=state).model_dump_json().encode() + b"\n"
        assert data.startswith(GENERATION_PREFIX)
        write_atomically(self.path, data, self.durable)
        self.compactions += 1
        self._keep_all(state)
        self._header, self._consumed, self._snapshot_bytes = data[:HEADER_LEN], len(data), len(data)
        self._state = state
        self._watch(state)

    def forget(self) -> None:
        """Drop the kept state: the next ``load`` reads the whole file (after a failed transaction)."""
        self._state = None
        self._header = b""
        self._kept_drives, self._kept_cartridges = {}, {}

    def remove_stale_temps(self) -> int:
        """Temp files of a compaction interrupted by a crash (only safe under the lock)."""
        n = 0
        for name in (STATE_FILE, LEGACY_STATE_FILE):
            for p in self.path.parent.glob(f".{name}.*{TEMP_SUFFIX}"):
                p.unlink(missing_ok=True)
                n += 1
        return n

    def _compact_at(self) -> int:
        return max(MIN_LOG_BYTES, COMPACT_RATIO * self._snapshot_bytes)

    def _apply(self, data: bytes) -> None:
        """Apply the complete lines of ``data`` (what follows ``_consumed``) to the kept state."""
        assert self._state is not None
        complete = data[: data.rfind(b"\n") + 1]
        for line in complete.splitlines(keepends=True):
            try:
                change = Change.model_validate_json(line)
            except ValidationError:
                break  # the end of what survived a power cut (module docstring)
            self._state.drives.update(change.drives)
            self._state.cartridges.update(change.cartridges)
            self._keep(change.drives, change.cartridges)
            self._consumed += len(line)

    def _keep(self, drives: dict[str, Drive], cartridges: dict[str, Cartridge]) -> None:
        for k, d in drives.items():
            self._kept_drives[k] = _fingerprint(d)
        for k, c in dict.items(cartridges):
            self._kept_cartridges[k] = _fingerprint(c)

    @staticmethod
    def _handed_out(state: LibraryState) -> list[tuple[str, Cartridge]]:
        """The headers that may have changed since the last load or save (without marking them)."""
        carts = state.cartridges
        handed = carts.handed if isinstance(carts, HandedOut) else None
        if handed is None:
            return list(dict.items(carts))
        return [(k, dict.__getitem__(carts, k)) for k in handed]

    @staticmethod
    def _watch(state: LibraryState) -> None:
        """From now on, note which headers are handed out (the next save compares only those)."""
        if not isinstance(state.cartridges, HandedOut):
            state.cartridges = HandedOut(state.cartridges)
        state.cartridges.watch()

    def _keep_all(self, state: LibraryState) -> None:
        self._kept_drives, self._kept_cartridges = {}, {}
        self._keep(state.drives, state.cartridges)
