"""The local side of the ``xrootd`` backend's uploads and downloads: a local file read in
sequence with a running adler32, and a download's local temporary, fsynced and renamed onto its
final name only on ``commit``.

Blocking file I/O: the backend (``common.storage.xrootd``) calls these in worker threads. Local
errors are classified with ``xrootd_errors.local_reason`` (a missing source is Permanent,
everything else Retryable), so a local disk's fault is never blamed on the server.
"""

from __future__ import annotations

import contextlib
import os
import stat
import zlib
from pathlib import Path

from common.errors import Permanent, Retryable, SpoolError
from common.storage.checksum import ADLER32_START
from common.storage.tempfiles import temp_name_for
from common.storage.xrootd_errors import local_reason


class _LocalReader:
    """Sequential reads of a local file with a running adler32 (runs in worker threads)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None
        self.adler = ADLER32_START

    def read(self, n: int) -> bytes:
        try:
            if self.fd is None:
                # Non-blocking, and a regular file only (issue 16): a FIFO must not hang the thread.
                self.fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                if not stat.S_ISREG(os.fstat(self.fd).st_mode):
                    raise Permanent("source_corrupt", f"source {self.path} is not a regular file")
            data = os.read(self.fd, n)
        except OSError as exc:
            reason = local_reason(exc.errno or 0, str(exc).lower(), "source")
            error = Permanent if reason == "source_missing" else Retryable
            raise error(reason, f"reading {self.path}: {exc.strerror or exc}") from None
        self.adler = zlib.adler32(data, self.adler)
        return data

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)


class _LocalWriter:
    """A download's local temporary beside its final name; ``commit`` fsyncs and renames it."""

    def __init__(self, final: Path) -> None:
        self.final = final
        self.tmp = final.parent / temp_name_for(final.name)
        self.size = 0
        self.adler = ADLER32_START
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            self.fd: int | None = os.open(
                self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644
            )
        except OSError as exc:
            raise self._error(exc) from None

    def _error(self, exc: OSError) -> SpoolError:
        reason = local_reason(exc.errno or 0, str(exc).lower(), "destination")
        return Retryable(reason, f"writing {self.tmp}: {exc.strerror or exc}")

    def write(self, data: bytes) -> None:
        assert self.fd is not None
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError as exc:
            raise self._error(exc) from None
        self.size += len(data)
        self.adler = zlib.adler32(data, self.adler)

    def commit(self) -> None:
        assert self.fd is not None
        try:
            os.fsync(self.fd)
            fd, self.fd = self.fd, None
            os.close(fd)
            os.replace(self.tmp, self.final)
        except OSError as exc:
            raise self._error(exc) from None

    def discard(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)
