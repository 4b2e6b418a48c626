"""Moving a recalled file's bytes into the destination buffer, verified, under its final name.

From tape to a mounted (posix) destination: the library reads the file into a staging directory
inside the destination's root (``.spool-recall/``: same file system, so the final ``rename`` is
atomic), verifying its adler32 on the way; the result is compared once more with the catalogue's
size and checksum (the tape's own record and the catalogue must agree), then renamed onto the
file's name and the directory fsync-ed. A kill at any instruction leaves either nothing under the
final name or a complete, verified file; leftovers in the staging directory are removed at
start-up.

From tape to a remote destination (XRootD, WebDAV): the same read and checks into a node-local
staging directory (``<local>/<endpoint>/``, the daemon's ``<state_dir>/recall-staging``), then
``upload`` (atomic on the server, verified by the server's checksum), and the staging file removed
whatever happened. Only this daemon uses that directory (one recall daemon per catalogue), so
start-up empties it whatever the age of what is there.

From disk (a copy already on another disk endpoint): both mounted here, ``PosixStorage.
copy_verified`` (the replicator's kernel copy with a read-back checksum); otherwise the
destination's ``copy_from`` (third-party where the pair can, else through this node).

Free space: statvfs of a mounted root; a remote endpoint's ``free_space`` (None when its protocol
does not tell: the scheduler then does not hold reads back for it).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from pathlib import Path

from common.catalogue.recall import ReadItem
from common.storage import PosixStorage, StorageBackend
from common.tape import TapeChecksumMismatch, TapeLibrary

STAGING_DIR = ".spool-recall"


def staging_dir(storage: StorageBackend, local: Path) -> Path:
    """Where reads for ``storage`` are staged: inside its root when mounted, else node-local."""
    if isinstance(storage, PosixStorage):
        return storage.root / STAGING_DIR
    return local / storage.name


def clean_staging(storage: StorageBackend, local: Path, older_than: float = 0.0) -> int:
    """Remove what interrupted reads left in the staging directory; returns how many files.
    ``older_than`` spares a shared (posix) endpoint's reads by others; the node-local directory
    of a remote endpoint is this daemon's alone and is emptied."""
    directory = staging_dir(storage, local)
    if not directory.is_dir():
        return 0
    deadline = time.time() - (older_than if isinstance(storage, PosixStorage) else 0.0)
    removed = 0
    for entry in os.scandir(directory):
        try:
            if (
                entry.is_file(follow_symlinks=False)
                and entry.stat(follow_symlinks=False).st_mtime <= deadline
            ):
                os.unlink(entry.path)
                removed += 1
        except FileNotFoundError:
            continue
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

    Raises ``TapeChecksumMismatch`` when the bytes are not the catalogue's file (the library's
    own check, or ours against the catalogue), other ``SpoolError``s as the library classifies them
    (and, for a remote destination, as its ``upload`` does: ``disk_full``, ``endpoint_unavailable``
    ...: none of them is the tape copy's fault).
    """
    final = storage.resolve(item.name) if isinstance(storage, PosixStorage) else None
    directory = staging_dir(storage, local)
    await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
    temp = directory / f"{item.file_id}.{secrets.token_hex(6)}"
    try:
        result = await library.read(drive, item.copy.fseq, temp, verify=True)
        if result.size != item.size or result.adler32 != item.adler32:
            raise TapeChecksumMismatch(item.copy.cartridge, item.copy.fseq, item.adler32, result.adler32)
        if final is not None:
            await asyncio.to_thread(_place, temp, final)
        else:
            done = await storage.upload(temp, item.name, size=item.size, adler32=item.adler32)
    except BaseException:
        await asyncio.to_thread(temp.unlink, missing_ok=True)
        raise
    if final is not None:
        assert isinstance(storage, PosixStorage)
        return storage.pfn_of(final)
    await asyncio.to_thread(temp.unlink, missing_ok=True)
    return done.relpath


def _place(temp: Path, final: Path) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(temp, final)
    fd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def copy_from_disk(
    source: StorageBackend, pfn: str, dest: StorageBackend, name: str, size: int, adler32: str
) -> str:
    """Copy an available disk replica to ``dest`` under ``name``, verified; returns its pfn."""
    if isinstance(source, PosixStorage) and isinstance(dest, PosixStorage):
        copied = await dest.copy_verified(
            source.resolve(pfn), name, expected_size=size, expected_adler32=adler32, fsync=True
        )
        return copied.pfn
    done = await dest.copy_from(source, pfn, name, size=size, adler32=adler32)
    return done.relpath
