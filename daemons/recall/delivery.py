"""Moving a recalled file's bytes into the destination buffer, verified, under its final name.

From tape: the library reads the file into a staging directory inside the destination's root
(``.spool-recall/``: same file system, so the final ``rename`` is atomic), verifying its adler32
on the way; the result is compared once more with the catalogue's size and checksum (the tape's
own record and the catalogue must agree), then renamed onto the file's name and the directory
fsync-ed. A kill at any instruction leaves either nothing under the final name or a complete,
verified file; leftovers in the staging directory are removed at start-up.

From disk (a copy already on another disk endpoint): ``PosixStorage.copy_verified``, the
replicator's kernel copy with a read-back checksum.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from pathlib import Path

from common.catalogue.recall import ReadItem
from common.storage import PosixStorage
from common.tape import TapeChecksumMismatch, TapeLibrary

STAGING_DIR = ".spool-recall"


def staging_dir(storage: PosixStorage) -> Path:
    return storage.root / STAGING_DIR


def clean_staging(storage: PosixStorage, older_than: float = 0.0) -> int:
    """Remove what interrupted reads left in the staging directory; returns how many files."""
    directory = staging_dir(storage)
    if not directory.is_dir():
        return 0
    deadline = time.time() - older_than
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


def free_bytes(storage: PosixStorage) -> int:
    """Free space of the destination (its root is created if missing, so statvfs can answer)."""
    storage.root.mkdir(parents=True, exist_ok=True)
    return storage.free_bytes()


async def read_from_tape(library: TapeLibrary, drive: str, item: ReadItem, storage: PosixStorage) -> str:
    """Read ``item`` off the mounted cartridge into ``storage``; returns its pfn there.

    Raises ``TapeChecksumMismatch`` when the bytes are not the catalogue's file (the library's
    own check, or ours against the catalogue), other ``SpoolError``s as the library classifies them.
    """
    final = storage.resolve(item.name)
    directory = staging_dir(storage)
    await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
    temp = directory / f"{item.file_id}.{secrets.token_hex(6)}"
    try:
        result = await library.read(drive, item.copy.fseq, temp, verify=True)
        if result.size != item.size or result.adler32 != item.adler32:
            raise TapeChecksumMismatch(item.copy.cartridge, item.copy.fseq, item.adler32, result.adler32)
        await asyncio.to_thread(_place, temp, final)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return storage.pfn_of(final)


def _place(temp: Path, final: Path) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(temp, final)
    fd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def copy_from_disk(
    source: PosixStorage, pfn: str, dest: PosixStorage, name: str, size: int, adler32: str
) -> str:
    """Copy an available disk replica to ``dest`` under ``name``, verified; returns its pfn."""
    copied = await dest.copy_verified(
        source.resolve(pfn), name, expected_size=size, expected_adler32=adler32, fsync=True
    )
    return copied.pfn
