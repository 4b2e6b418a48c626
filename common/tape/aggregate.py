"""Small files packed into one tape file: a POSIX tar (pax) with an index as its last member.

Why: each tape file costs the drive a header and a tape mark (``TapeTiming.file_overhead_seconds``),
which for a 1 MB file is most of its drive time. Files below ``[tape] aggregate_below`` are copied
into an aggregate staged on the tape daemon's node, and the aggregate is written as one tape file.

Layout, a standard archive any ``tar`` reads (``tar tvf``, ``tar xf``)::

    [pax header][ustar header][member data, padded to 512]   per member, in write order
    [ustar header][index JSON, padded to 512]                 SPOOL-INDEX.json
    [two zero blocks][zero padding to a 10240-byte record]

Member names inside the tar are ours, never the logical name: ``<n:06d>-<tag>`` (its position and
the caller's tag, the tape copy's replica id), so a hostile logical name (``../../etc/passwd``, a
newline, 4,000 characters) cannot become a path for whoever extracts the archive. The logical
name travels in a pax record (``SPOOL.name``, which tar readers show but never use as a path)
and in the index. The index lists each member's logical name, tar name, data offset within the
aggregate, size and adler32: the catalogue holds the same (each member's tape copy records the
aggregate's fseq and the member's offset), and the index lets a cartridge be read without it.
Reading back never trusts a name: a member is read by the offset and size the catalogue gives
and verified against the catalogue's adler32.

Verification: each member's bytes are checksummed as they are copied into the aggregate and
compared with the size and adler32 the caller announces (the catalogue's) before the aggregate
goes to tape; a member that does not match is cut off again (the file truncated back to where its
header began) and the error raised with the codes ``TapeLibrary.write`` uses, so the caller fails
that member alone. The aggregate's own adler32 (computed as it is built) is what the library
checks when it writes it; ``verify`` re-reads an aggregate member by member.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tarfile
import threading
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import Permanent, Retryable
from common.storage.checksum import ADLER32_START, CHUNK_SIZE, chunk_buffer, format_adler32
from common.tape.data import Aborted, open_source
from common.tape.library import TapeMember

FORMAT = "spool-aggregate/1"
INDEX_NAME = "SPOOL-INDEX.json"
NAME_RECORD = "SPOOL.name"  # pax record carrying the logical name
BLOCK = tarfile.BLOCKSIZE  # 512
RECORD = tarfile.RECORDSIZE  # 10240
# Bytes a member adds beside its data, for planning an aggregate's size: a pax header block and
# its records (the logical name: up to two blocks for the longest names), the ustar header, and
# at most a block of padding.
MEMBER_OVERHEAD = 5 * BLOCK


def _pad(n: int) -> int:
    return -n % BLOCK


@dataclass
class Builder:
    """An aggregate being built in ``path`` (created; removed by ``discard``).

    ``add`` copies one member, verified; ``seal`` writes the index and the end of the archive and
    returns the aggregate's size and adler32. Blocking: callers run it in a worker thread.
    """

    path: Path
    members: list[TapeMember] = field(default_factory=list)
    size: int = 0  # bytes written so far (the end of the last member's padding)
    _adler: int = ADLER32_START  # of everything written so far
    _fd: int = -1

    def __post_init__(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise _staging_error(self.path, exc) from None

    @property
    def data_bytes(self) -> int:
        return sum(m.size for m in self.members)

    def add(
        self,
        cancelled: threading.Event | None,
        source: Path,
        name: str,
        tag: str,
        size: int,
        adler32: str,
        sha256: str | None = None,
    ) -> TapeMember:
        """Append ``source`` as the member for logical ``name``, verified against ``size`` and
        ``adler32`` (normalised hex), and ``sha256`` when given (the catalogue's, computed in the
        same pass); returns its index entry. On any error the aggregate is as it
        was before the call, and the error is the one ``TapeLibrary.write`` would raise:
        ``file_missing``, ``not_a_file``, ``path_outside_area``, ``size_mismatch``,
        ``checksum_mismatch`` (Permanent), ``source_io_error``, ``tape_write_error`` (Retryable)."""
        start, adler_before = self.size, self._adler
        src = open_source(source)
        try:
            info = tarfile.TarInfo(f"{len(self.members) + 1:06d}-{tag}")
            info.size, info.mode, info.mtime = size, 0o644, int(time.time())
            info.pax_headers = {NAME_RECORD: name}
            try:
                header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
            except UnicodeError:  # a name pax cannot carry: the index still has it
                info.pax_headers = {}
                header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
            self._write(header)
            offset = self.size
            total, actual, digest = self._copy(cancelled, src, source, size, sha256 is not None)
            if total != size:
                raise Permanent("size_mismatch", f"source {source} has {total} bytes, announced {size}")
            if actual != adler32:
                raise Permanent(
                    "checksum_mismatch", f"source {source} has adler32 {actual}, announced {adler32}"
                )
            if digest != sha256:
                raise Permanent(
                    "checksum_mismatch", f"source {source} has sha256 {digest}, recorded {sha256}"
                )
            self._write(bytes(_pad(size)))
        except BaseException:
            self._cut(start, adler_before)
            raise
        finally:
            os.close(src)
        member = TapeMember(name=name, member=info.name, offset=offset, size=size, adler32=adler32)
        self.members.append(member)
        return member

    def seal(self) -> tuple[int, str]:
        """Write the index member and the end of the archive; returns (size, adler32)."""
        body = index_bytes(self.members)
        info = tarfile.TarInfo(INDEX_NAME)
        info.size, info.mode, info.mtime = len(body), 0o644, int(time.time())
        self._write(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict"))
        self._write(body + bytes(_pad(len(body))) + bytes(2 * BLOCK))
        self._write(bytes(-self.size % RECORD))
        os.close(self._fd)
        self._fd = -1
        return self.size, format_adler32(self._adler)

    def discard(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    # --- plumbing ------------------------------------------------------------------------------
    def _write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            raise _staging_error(self.path, exc) from None
        self._adler = zlib.adler32(data, self._adler)
        self.size += len(data)

    def _copy(
        self, cancelled: threading.Event | None, src: int, source: Path, size: int, sha256: bool
    ) -> tuple[int, str, str | None]:
        """Stream ``src`` into the aggregate (at most ``size`` + 1 bytes: a longer source is a
        mismatch, found without copying all of it); returns (bytes, adler32 of them, and their
        sha256 when asked: the same read feeds both)."""
        buf = chunk_buffer()
        value, total = ADLER32_START, 0
        digest = hashlib.sha256() if sha256 else None
        while True:
            if cancelled is not None and cancelled.is_set():
                raise Aborted()
            want = min(CHUNK_SIZE, size + 1 - total)
            try:
                n = os.readv(src, [memoryview(buf)[:want]]) if want > 0 else 0
            except OSError as exc:
                raise Retryable("source_io_error", f"reading {source}: {exc.strerror or exc}") from None
            if n == 0:
                return total, format_adler32(value), None if digest is None else digest.hexdigest()
            chunk = memoryview(buf)[:n]
            value = zlib.adler32(chunk, value)
            if digest is not None:
                digest.update(chunk)
            total += n
            self._write(chunk)

    def _cut(self, start: int, adler: int) -> None:
        """Back to the state before a member that failed: the file truncated to where it began."""
        try:
            os.ftruncate(self._fd, start)
            os.lseek(self._fd, start, os.SEEK_SET)
        except OSError as exc:
            raise _staging_error(self.path, exc) from None
        self.size, self._adler = start, adler


def _staging_error(path: Path, exc: OSError) -> Retryable:
    return Retryable("tape_write_error", f"staging aggregate {path}: {exc.strerror or exc}")


def index_bytes(members: Iterable[TapeMember]) -> bytes:
    """The index member's content: JSON, ASCII only (any name escaped), one member a line."""
    lines = [json.dumps({"format": FORMAT}, sort_keys=True)]
    lines += [json.dumps(m.model_dump(mode="json"), sort_keys=True, ensure_ascii=True) for m in members]
    return ("\n".join(lines) + "\n").encode("ascii")


def parse_index(body: bytes) -> list[TapeMember]:
    lines = body.decode("ascii").splitlines()
    if not lines or json.loads(lines[0]).get("format") != FORMAT:
        raise ValueError("not a spool aggregate index")
    # json, not pydantic's parser: a name may hold a lone surrogate, escaped as ``\udXXX``.
    return [TapeMember.model_validate(json.loads(line)) for line in lines[1:] if line]


def read_index(path: Path) -> list[TapeMember]:
    """The index of the aggregate at ``path`` (its last member), for reading a cartridge without
    the catalogue. Names in it are data, never paths."""
    with tarfile.open(path, "r:") as tar:
        last = None
        for info in tar:
            last = info
        if last is None or last.name != INDEX_NAME or not last.isfile():
            raise ValueError(f"{path}: no {INDEX_NAME} as the last member")
        fobj = tar.extractfile(last)
        assert fobj is not None
        return parse_index(fobj.read())


def read_member(path: Path, member: TapeMember) -> bytes:
    """One member's bytes, by offset and size (tests and tools; the library reads spans itself)."""
    with open(path, "rb") as fh:
        fh.seek(member.offset)
        return fh.read(member.size)


def verify(path: Path, members: Iterable[TapeMember]) -> list[str]:
    """Each member re-read by offset and checked against its size and adler32; returns the
    logical names of those that do not match (empty: the aggregate is intact)."""
    bad: list[str] = []
    with open(path, "rb") as fh:
        for m in members:
            fh.seek(m.offset)
            value, left = ADLER32_START, m.size
            while left:
                chunk = fh.read(min(CHUNK_SIZE, left))
                if not chunk:
                    break
                value = zlib.adler32(chunk, value)
                left -= len(chunk)
            if left or format_adler32(value) != m.adler32:
                bad.append(m.name)
    return bad
