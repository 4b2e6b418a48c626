"""What the daemons may ask of a tape library, whatever sits behind it.

The tape and recall daemons talk to a ``TapeLibrary`` only: the simulator (``SimulatedLibrary``)
today, an LTFS-mounted or SCSI library later. The protocol is deliberately close to what a real
library offers — claim a drive, load a cartridge, locate, append a file, read a file, unload — so
that a real backend is a translation, not a redesign, and so that a scheduling strategy measured
against the simulator means something on real hardware.

Records are plain pydantic models that every backend fills in. Failures are ``common.errors``
outcomes with stable reason codes (the monitor groups by them):

=====================  ==========  ============================================================
reason                 class       meaning
=====================  ==========  ============================================================
drive_broken           Retryable   the drive is out of order (another drive may serve)
drive_busy             Retryable   another operation or another process holds the drive
mount_failed           Retryable   the cartridge did not load (it is back in its slot)
cartridge_in_use       Retryable   the cartridge sits in another drive
cartridge_disabled     Retryable   an operator disabled the cartridge
cartridge_full         Retryable   not enough room left for this file: pick another cartridge
cartridge_not_writable Retryable   the cartridge is suspect or disabled; do not append to it
no_cartridge           Retryable   the pool has no cartridge with room and no scratch is left
tape_read_error        Permanent   the file's data is missing or short on the cartridge
tape_checksum_mismatch Permanent   the data read back differs from the checksum recorded at write
tape_write_error       Retryable   the library's own storage failed while writing
storage_io_error       Retryable   the destination of a read could not be written
file_missing           Permanent   the source of a write does not exist
size_mismatch/         Permanent   the source of a write is not what was announced
checksum_mismatch
source_io_error        Retryable   the source of a write could not be read
not_mounted            Permanent   the operation needs a cartridge in the drive (a caller bug)
not_claimed            Permanent   releasing a drive another session claimed (a caller bug)
unknown_drive/         Permanent   no such drive / cartridge / file sequence number
unknown_cartridge/
unknown_fseq
invalid_checksum/      Permanent   bad arguments (an adler32 that is not hex, a negative size,
invalid_size/                      making a cartridge with data scratch again)
invalid_state
=====================  ==========  ============================================================

Aggregates (``common.tape.aggregate``): a tape file may hold many small files. ``write(...,
members=[TapeMember, ...])`` keeps their index with the file (``list_files`` returns it, so
reconciliation finds a member without the catalogue); ``read(..., member=TapeMember)`` locates to
the member's first byte and reads only its ``size`` bytes, verified against its adler32 — a
member's recall costs that locate and those bytes, not the aggregate's.

The two media errors mark the cartridge ``suspect`` (readable, never appended to again): a
recall daemon should try another copy, an operator should look at the cartridge.

Writes are buffered as on a real drive: ``write(..., flush=False)`` puts the file on the tape
behind a buffered tape mark and returns its fseq, but the file is not durable yet and is not
listed (``list_files``) nor readable; ``flush(drive_id)`` writes a synchronous tape mark that makes
everything this session wrote on the mounted cartridge since the last flush durable at once (one
back-hitch, ``TapeTiming.sync_seconds``). Only then may a caller record the files as on tape. What
was written but not flushed is lost when the writer dies, when it releases the drive, or when the
flush fails: a writer records nothing before the flush and writes those files again. ``write``
with the default ``flush=True`` is a write followed by a flush (a synchronous tape mark per file,
the slow way). Unloading a cartridge (``unmount``, or ``mount`` of another) flushes first, as a
drive writes out its buffer before it unloads.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal, NamedTuple, Protocol, runtime_checkable

from pydantic import BaseModel, Field

from common.errors import Permanent

CartridgeState = Literal["scratch", "filling", "full", "suspect", "disabled"]
DriveStatus = Literal["idle", "mounting", "locating", "writing", "reading", "unmounting", "broken"]
# "writing": space and fseq are reserved and the data is on its way; only ever seen by another
# process, or after a crash (then it is dropped on the next open). "written": the data is complete
# behind a buffered tape mark, ``write(flush=False)`` returned its fseq, but no synchronous tape
# mark followed yet (dropped like "writing" if its writer dies or gives the drive up).
# "committed": the data is complete and durable (flushed).
FileState = Literal["writing", "written", "committed"]


class TapeMember(BaseModel):
    """One member of an aggregate tape file (``common.tape.aggregate``): its bytes are ``size``
    bytes from ``offset`` within the tape file. ``name`` is the logical name (data, never a path),
    ``member`` the name inside the tar."""

    name: str
    member: str = ""
    offset: int = Field(ge=0)
    size: int = Field(ge=0)
    adler32: str

    @property
    def end(self) -> int:
        return self.offset + self.size


class TapeFile(BaseModel):
    """One file on a cartridge, in the order it was written."""

    fseq: int = Field(ge=1)
    name: str
    size: int = Field(ge=0)
    adler32: str
    # Byte position of the file's first byte along the tape: what locate times are computed from.
    offset: int = Field(ge=0)
    state: FileState = "committed"
    written_at: float = 0.0
    # An aggregate: its members' index, as given to ``write`` (the aggregate's last tar member
    # holds the same). Reconciliation finds a member's file and offset here.
    members: list[TapeMember] | None = None

    @property
    def end(self) -> int:
        return self.offset + self.size


class Cartridge(BaseModel):
    """A cartridge (volume) of the library and where it is."""

    vid: str
    # None: a scratch cartridge not yet given to a pool (``allocate_cartridge`` assigns one).
    pool: str | None = None
    capacity: int = Field(ge=0)
    used_bytes: int = Field(default=0, ge=0)
    state: CartridgeState = "scratch"
    files: int = Field(default=0, ge=0)  # committed files
    next_fseq: int = Field(default=1, ge=1)
    drive: str | None = None  # the drive it is in (or being loaded into); None: in its slot
    mounts: int = Field(default=0, ge=0)  # lifetime loads, as libraries track for media wear
    # Fault injection: the next this-many mounts of this cartridge fail with ``mount_failed``.
    fail_mounts: int = Field(default=0, ge=0)

    @property
    def free_bytes(self) -> int:
        return max(0, self.capacity - self.used_bytes)


class DriveUsage(BaseModel):
    """Simulated seconds a drive spent per activity, and what it moved: the benchmark's yardstick."""

    mount_seconds: float = 0.0
    locate_seconds: float = 0.0
    write_seconds: float = 0.0
    read_seconds: float = 0.0
    unmount_seconds: float = 0.0
    flush_seconds: float = 0.0  # synchronous tape marks (back-hitches)
    flushes: int = 0
    mounts: int = 0
    unmounts: int = 0
    files_written: int = 0
    bytes_written: int = 0
    files_read: int = 0
    bytes_read: int = 0

    @property
    def total_seconds(self) -> float:
        return (
            self.mount_seconds
            + self.locate_seconds
            + self.write_seconds
            + self.read_seconds
            + self.unmount_seconds
            + self.flush_seconds
        )

    def plus(self, other: DriveUsage) -> DriveUsage:
        """Field-wise sum (for library totals)."""
        mine, theirs = self.model_dump(), other.model_dump()
        return DriveUsage.model_validate({k: v + theirs[k] for k, v in mine.items()})


class Drive(BaseModel):
    """A drive: what is in it, where its head is, what it is doing and for whom."""

    drive_id: str
    vid: str | None = None
    head: int = Field(default=0, ge=0)  # byte position along the mounted tape
    status: DriveStatus = "idle"
    since: float = 0.0  # wall-clock time of the last status change
    request: str | None = None  # free-form label of the work it serves (set by claim / mount)
    claim: str | None = None  # session holding the drive between operations (``claim_drive``)
    op: str | None = None  # id of the operation running now
    op_session: str | None = None  # session running it (so a dead one can be detected)
    broken: bool = False
    usage: DriveUsage = Field(default_factory=DriveUsage)


class LibraryUsage(BaseModel):
    drives: dict[str, DriveUsage]
    total: DriveUsage


class ReadResult(NamedTuple):
    """What ``read`` delivered: the size and the adler32 computed while reading, and its sha256
    (computed in the same pass) where the library reads the bytes itself; None where it cannot."""

    size: int
    adler32: str
    sha256: str | None = None


class TapeChecksumMismatch(Permanent):
    """The bytes read back do not match the checksum recorded when the file was written."""

    def __init__(self, vid: str, fseq: int, expected: str, actual: str, algorithm: str = "adler32") -> None:
        super().__init__(
            "tape_checksum_mismatch",
            f"{vid} fseq {fseq}: read {algorithm} {actual}, recorded {expected}",
        )
        self.vid = vid
        self.fseq = fseq
        self.expected = expected
        self.actual = actual


@runtime_checkable
class TapeLibrary(Protocol):
    """The narrow interface of a tape library. Every method may raise ``Retryable``/``Permanent``.

    A typical write: ``claim_drive`` → ``allocate_cartridge`` → ``mount`` → ``write(flush=False)``
    (n times, a ``flush`` every so many files and at the end; record files only after the flush
    that covered them) → ``release_drive`` (the cartridge stays in the drive, so the next batch
    for it costs no mount; what was not flushed is dropped).
    A typical recall: ``claim_drive(vid=...)`` → ``mount`` → ``read`` in fseq order → release.
    """

    async def list_cartridges(self, pool: str | None = None) -> list[Cartridge]: ...

    async def list_drives(self) -> list[Drive]: ...

    async def list_files(self, vid: str) -> list[TapeFile]:
        """Committed files of ``vid`` in fseq order."""
        ...

    async def usage(self) -> LibraryUsage: ...

    async def claim_drive(self, request: str, *, vid: str | None = None) -> str | None:
        """Reserve a usable drive for ``request``; None when every drive is taken.

        With ``vid``: the drive already holding it if that one is free (no mount needed), else
        None while it is busy; otherwise an empty drive, else the idle drive unused the longest.
        """
        ...

    async def release_drive(self, drive_id: str) -> None:
        """Give the drive up; files written on it since the last flush are dropped."""
        ...

    async def allocate_cartridge(
        self, pool: str, needed_bytes: int, *, exclude_vids: frozenset[str] | set[str] = frozenset()
    ) -> Cartridge:
        """A cartridge of ``pool`` to append ``needed_bytes`` to; raises ``no_cartridge``."""
        ...

    async def set_cartridge_state(self, vid: str, state: CartridgeState) -> None: ...

    async def mount(self, drive_id: str, vid: str, *, request: str | None = None) -> bool:
        """Load ``vid`` into the drive; True when a cartridge was loaded, False when it was there."""
        ...

    async def position(self, drive_id: str, fseq: int) -> None: ...

    async def write(
        self,
        drive_id: str,
        source: Path,
        name: str,
        size: int,
        adler32: str,
        *,
        flush: bool = True,
        members: Sequence[TapeMember] | None = None,
        sha256: str | None = None,
    ) -> int:
        """Append ``source`` at the end of data of the mounted cartridge; returns its fseq.

        ``sha256`` (64 lower-case hex digits, the catalogue's): checked too where the library reads
        the bytes itself, in the same pass as adler32 (``checksum_mismatch``); a library that
        cannot ignores it.

        With ``flush=False`` the file is not durable (nor listed, nor readable) until ``flush``.
        ``members``: the file is an aggregate with this index (kept with the file, ``list_files``).
        """
        ...

    async def flush(self, drive_id: str) -> list[int]:
        """Make what this session wrote on the drive's cartridge since the last flush durable
        (one synchronous tape mark); returns those fseqs in order (empty: nothing to flush)."""
        ...

    async def read(
        self, drive_id: str, fseq: int, dest: Path, *, verify: bool = True, member: TapeMember | None = None
    ) -> ReadResult:
        """Copy ``fseq`` to ``dest``, verified against the checksum recorded at write. With
        ``member``: only its span of the file (locate to it, read ``member.size`` bytes), verified
        against ``member.adler32`` (the caller's, i.e. the catalogue's record)."""
        ...

    async def unmount(self, drive_id: str) -> None: ...

    async def close(self) -> None: ...
