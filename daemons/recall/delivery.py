"""Moving a recalled file's bytes into the destination buffer, verified, under its final name.

From tape to a mounted (posix) destination: the library reads the file into a staging directory
inside the destination's root (``.spool-recall/``: same file system, so the final ``rename`` is
atomic), verifying its adler32 on the way; the result is compared once more with the catalogue's
size and checksum (the tape's own record and the catalogue must agree), then renamed onto the
file's name and the directory fsync-ed. A kill at any instruction leaves either nothing under the
final name or a complete, verified file; leftovers in the staging directory are removed at
start-up.

Containment (issue 16): the staging directory and the destination are reached by descriptor
from the root, never through a symlink (``common.storage.confined``). A ``.spool-recall`` planted
as a symlink (or a file) is refused: start-up deletes nothing through it (a warning,
``recall_staging_refused``) and a read is refused with ``path_outside_area`` (the destination's
problem: no tape copy is blamed). The library writes through ``/proc/self/fd/<staging dir>``, the
directory already opened, so no name is looked up again between the check and the write.

From tape to a remote destination (XRootD, WebDAV): the same read and checks into a node-local
staging directory (``<local>/<endpoint>/``, the daemon's ``<state_dir>/recall-staging``), then
``upload`` (atomic on the server, verified by the server's checksum), and the staging file removed
whatever happened. Only this process uses that directory (several recall instances on one node
each have a ``state_dir`` of their own), so start-up empties it whatever the age of what is there.

From disk (a copy already on another disk endpoint): both mounted here, ``PosixStorage.
copy_verified`` (the replicator's kernel copy with a read-back checksum); otherwise the
destination's ``copy_from`` (third-party where the pair can, else through this node).

Free space: statvfs of a mounted root; a remote endpoint's ``free_space`` (None when its protocol
does not tell: the scheduler then does not hold reads back for it).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import secrets
import stat
import time
from pathlib import Path

import structlog

from common.catalogue.recall import ReadItem
from common.errors import Permanent, SpoolError
from common.storage import PosixStorage, StorageBackend, confined
from common.storage.paths import below, real_root
from common.storage.tempfiles import destination_refused
from common.tape import TapeChecksumMismatch, TapeLibrary, TapeMember

log = structlog.get_logger("spool.recall")

STAGING_DIR = ".spool-recall"


def staging_dir(storage: StorageBackend, local: Path) -> Path:
    """Where reads for ``storage`` are staged: inside its root when mounted, else node-local."""
    if isinstance(storage, PosixStorage):
        return storage.root / STAGING_DIR
    return local / storage.name


def _open_staging(storage: StorageBackend, local: Path, *, create: bool) -> int:
    """The staging directory, open: a posix endpoint's ``.spool-recall`` beneath its root, with
    neither followed if a symlink (``ELOOP``); else the node-local one (its last component not
    followed). With ``create``, made where missing. ``FileNotFoundError`` without."""
    if isinstance(storage, PosixStorage):
        root, name = real_root(storage.root), STAGING_DIR
        if create:
            os.makedirs(root, 0o755, exist_ok=True)  # the operator's root, made on first write
    else:
        directory = local / storage.name
        if create:
            directory.parent.mkdir(parents=True, exist_ok=True)
        # The daemon's own directory (its state_dir may sit behind a symlink): resolved here.
        root, name = os.path.realpath(directory.parent), directory.name
    rootfd = confined.open_root(root)
    try:
        try:
            return _open_dir(name, rootfd)
        except FileNotFoundError:
            if not create:
                raise
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o700, dir_fd=rootfd)
        return _open_dir(name, rootfd)
    finally:
        os.close(rootfd)


def _open_dir(name: str, dirfd: int) -> int:
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
    except NotADirectoryError:
        raise OSError(errno.ELOOP, f"{name} is a symbolic link or a file, not a directory") from None


def clean_staging(storage: StorageBackend, local: Path, older_than: float = 0.0) -> int:
    """Remove what interrupted reads left in the staging directory; returns how many files.
    ``older_than`` spares a shared (posix) endpoint's reads by others; the node-local directory
    of a remote endpoint is this daemon's alone and is emptied. Only regular files directly in
    the directory are removed, each by ``unlinkat`` in the directory opened without following a
    symlink: a ``.spool-recall`` symlink (to anywhere) makes it delete nothing."""
    directory = staging_dir(storage, local)
    try:
        dirfd = _open_staging(storage, local, create=False)
    except FileNotFoundError:
        return 0
    except OSError as exc:
        log.warning("recall_staging_refused", storage=storage.name, path=str(directory), error=str(exc))
        return 0
    deadline = time.time() - (older_than if isinstance(storage, PosixStorage) else 0.0)
    removed = 0
    try:
        for name in os.listdir(dirfd):
            try:
                st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
                if stat.S_ISREG(st.st_mode) and st.st_mtime <= deadline:
                    os.unlink(name, dir_fd=dirfd)
                    removed += 1
            except FileNotFoundError:
                continue
    finally:
        os.close(dirfd)
    return removed


async def free_space(storage: StorageBackend) -> int | None:
    """Free bytes of the destination; None when a remote endpoint cannot tell."""
    if isinstance(storage, PosixStorage):
        return await asyncio.to_thread(_posix_free, storage)
    return await storage.free_space()


def _posix_free(storage: PosixStorage) -> int:
    """statvfs of the root (created if missing, so statvfs can answer)."""
    storage.root.mkdir(parents=True, exist_ok=True)
    return storage.free_bytes()


async def read_from_tape(
    library: TapeLibrary, drive: str, item: ReadItem, storage: StorageBackend, local: Path
) -> str:
    """Read ``item`` off the mounted cartridge into ``storage``; returns its pfn there. ``local``
    is the node-local staging directory used for a remote destination.

    A member of an aggregate (``item.member_offset``) is read alone: the library locates to it and
    reads its ``item.size`` bytes, verified against ``item.adler32``.

    Raises ``TapeChecksumMismatch`` when the bytes are not the catalogue's file (the library's
    own check, or ours against the catalogue), other ``SpoolError``s as the library classifies them
    (and, for a remote destination, as its ``upload`` does: ``disk_full``, ``endpoint_unavailable``
    ...: none of them is the tape copy's fault). A symlink on the staging or destination path is
    ``path_outside_area`` (the destination's).
    """
    rel = below(storage.root, item.name, storage.name) if isinstance(storage, PosixStorage) else None
    try:
        dirfd = await asyncio.to_thread(_open_staging, storage, local, create=True)
    except OSError as exc:
        raise destination_refused(exc, os.fspath(staging_dir(storage, local))) from None
    name = f"{item.file_id}.{secrets.token_hex(6)}"
    # The directory opened above, by descriptor: the library's writes cannot be redirected.
    temp = Path(f"/proc/self/fd/{dirfd}/{name}")
    try:
        try:
            if item.member_offset is None:
                result = await library.read(drive, item.copy.fseq, temp, verify=True)
            else:  # a member of an aggregate: only its bytes, checked against the catalogue's
                member = TapeMember(
                    name=item.name, offset=item.member_offset, size=item.size, adler32=item.adler32
                )
                result = await library.read(drive, item.copy.fseq, temp, verify=True, member=member)
            if result.size != item.size or result.adler32 != item.adler32:
                raise TapeChecksumMismatch(item.copy.cartridge, item.copy.fseq, item.adler32, result.adler32)
            if item.sha256 is not None and result.sha256 is not None and result.sha256 != item.sha256:
                # Same size and adler32, other bytes: the strong checksum recorded at ingest sees it.
                raise TapeChecksumMismatch(
                    item.copy.cartridge, item.copy.fseq, item.sha256, result.sha256, algorithm="sha256"
                )
            if rel is not None:
                assert isinstance(storage, PosixStorage)
                await asyncio.to_thread(_place, dirfd, name, real_root(storage.root), rel)
                return rel
            done = await storage.upload(temp, item.name, size=item.size, adler32=item.adler32)
        finally:
            await asyncio.to_thread(_unlink_quietly, dirfd, name)
    finally:
        os.close(dirfd)
    return done.relpath


def _unlink_quietly(dirfd: int, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dirfd)


def _place(dirfd: int, name: str, root: str, rel: str) -> None:
    """Rename the staged file onto ``rel`` beneath ``root`` (directories made, none followed if a
    symlink), then fsync the directory."""
    try:
        parent = confined.parent_of(root, rel, create=True, make_root=True)
    except OSError as exc:
        raise destination_refused(exc, f"{root}/{rel}") from None
    try:
        os.rename(name, parent.name, src_dir_fd=dirfd, dst_dir_fd=parent.fd)
        os.fsync(parent.fd)
        for created_in in parent.created_in:
            os.fsync(created_in)
    except OSError as exc:
        raise destination_refused(exc, f"{root}/{rel}") from None
    finally:
        parent.close()


async def copy_from_disk(
    source: StorageBackend,
    pfn: str,
    dest: StorageBackend,
    name: str,
    size: int,
    adler32: str,
    sha256: str | None = None,
) -> str:
    """Copy an available disk replica to ``dest`` under ``name``, verified (posix to posix: sha256
    too, when recorded, in the read-back's pass); returns its pfn."""
    if isinstance(source, PosixStorage) and isinstance(dest, PosixStorage):
        try:
            path = source.resolve(pfn)
        except SpoolError as err:  # the catalogue's pfn escapes its root: that copy is unusable
            raise Permanent("source_corrupt", f"source replica {pfn!r}: {err.message}") from None
        copied = await dest.copy_verified(
            path, name, expected_size=size, expected_adler32=adler32, fsync=True, expected_sha256=sha256
        )
        return copied.pfn
    done = await dest.copy_from(source, pfn, name, size=size, adler32=adler32)
    return done.relpath
