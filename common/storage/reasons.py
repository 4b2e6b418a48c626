"""Reason codes of the posix backend's errors, and the errno -> ``SpoolError`` mapping.

Why a module of its own: the copy engine, the temporary files and the backend all turn an
``OSError`` into a classified error, and the replicator acts on *which side* is at fault (a bad
source replica is marked bad and another source tried; a destination problem is retried or trips
the endpoint's breaker). Written once here, the three agree.

Source problems a retry cannot fix are ``Permanent``; anything about the destination (read-only,
full, I/O error) is ``Retryable``, because an operator can fix the endpoint and the work should
then simply resume.
"""

from __future__ import annotations

import errno
import os

from common.errors import Permanent, Retryable, SpoolError
from common.reasons import codes_blaming
from common.storage.checksum import normalise_adler32, normalise_sha256

_NOT_WRITABLE = {errno.EACCES, errno.EROFS, errno.EPERM}
_FULL = {errno.ENOSPC, errno.EDQUOT}

# --- reason codes of copy_verified ---------------------------------------------------------------
# Which side of a copy a code blames is registered with the code (``blames`` in ``common.reasons``);
# the sets are read from there, the names below are for the raise sites.
# Source side: the replica being copied *from*. Permanent ones mean "this source replica is bad or
# gone, mark it so and pick another"; source_io_error (Retryable) may be a flaky mount.
SOURCE_MISSING = "source_missing"  # Permanent: no file at the source path
SOURCE_CORRUPT = "source_corrupt"  # Permanent: wrong size or checksum, or not a regular file
SOURCE_IO_ERROR = "source_io_error"  # Retryable: the source could not be read
# Destination side: this endpoint. All Retryable: an operator can fix the endpoint.
DESTINATION_NOT_WRITABLE = "destination_not_writable"
DISK_FULL = "disk_full"  # ENOSPC / EDQUOT, or the copy would eat into min_free_bytes
STORAGE_IO_ERROR = "storage_io_error"
CHECKSUM_MISMATCH = "checksum_mismatch"  # the written copy differs from a source that is good
SOURCE_REASONS = codes_blaming("source")
DESTINATION_REASONS = codes_blaming("destination")
# Neither side: the request itself is wrong (Permanent); retrying or another source cannot help.
# ``path_outside_area`` is also what a symlink on the *destination* path is (``confined``): the
# destination's problem, never the source's (a healthy source copy is not marked bad for it).
# A symlink on a source replica's path is ``source_corrupt``: that copy cannot be read safely.
REQUEST_REASONS = codes_blaming("request")


def _name_too_long(exc: OSError, path: str | os.PathLike[str]) -> SpoolError | None:
    """ENAMETOOLONG is the file system's verdict on the name itself: no retry changes it."""
    if exc.errno == errno.ENAMETOOLONG:
        return Permanent("name_too_long", f"{os.fspath(path)[:300]}: {exc.strerror or exc}")
    return None


def _source_error(exc: OSError, path: str | os.PathLike[str]) -> SpoolError:
    """An ingest source (a landing-area file): a symlink anywhere on its path (``ELOOP``; an
    escape, ``EXDEV``) is ``path_outside_area``, as ``common.storage.confined`` decides."""
    if (too_long := _name_too_long(exc, path)) is not None:
        return too_long
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return Permanent("file_missing", f"source {path} does not exist")
    if exc.errno in (errno.ELOOP, errno.EXDEV):
        return Permanent("path_outside_area", f"source {path}: a symbolic link on the path (not followed)")
    if exc.errno == errno.ENXIO:  # a socket or a device without a driver
        return Permanent("not_a_file", f"source {path} is not a regular file")
    return Retryable("source_io_error", f"reading source {path}: {exc.strerror or exc}")


def _destination_error(exc: OSError, path: str | os.PathLike[str]) -> SpoolError:
    if (too_long := _name_too_long(exc, path)) is not None:
        return too_long
    text = exc.strerror or str(exc)
    if exc.errno in _NOT_WRITABLE:
        return Retryable("destination_not_writable", f"cannot write {path}: {text}")
    if exc.errno in _FULL:
        return Retryable("disk_full", f"no space left writing {path}: {text}")
    return Retryable("storage_io_error", f"writing {path}: {text}")


def _replica_source_error(exc: OSError, path: str | os.PathLike[str]) -> SpoolError:
    """Like ``_source_error``, with reason codes the replicator can tell from destination ones."""
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return Permanent(SOURCE_MISSING, f"source replica {path} does not exist")
    if exc.errno in (errno.ELOOP, errno.EXDEV, errno.ENXIO):  # a symlink on the path; a socket
        return Permanent(
            SOURCE_CORRUPT, f"source replica {path} is not a regular file reached without a symlink"
        )
    return Retryable(SOURCE_IO_ERROR, f"reading source replica {path}: {exc.strerror or exc}")


def expected_sha256(text: str | None) -> str | None:
    """An expected sha256 from a caller (catalogue, event) as 64 lower-case hex digits, or None;
    ``Permanent("invalid_checksum")`` when it is not one."""
    try:
        return normalise_sha256(text)
    except ValueError as exc:
        raise Permanent("invalid_checksum", str(exc)) from None


def expected_adler32(text: str) -> str:
    """An expected checksum from a caller (catalogue, event) in canonical form;
    ``Permanent("invalid_checksum")`` when it is not one (every backend refuses it alike)."""
    try:
        return normalise_adler32(text)
    except ValueError as exc:
        raise Permanent("invalid_checksum", str(exc)) from None
