"""Where the tape daemon reads a file from: a mounted disk copy as it is, a remote one (XRootD,
WebDAV) through a node-local staging file.

Why a staging file: the library writes a file of this node's file system onto the cartridge
(``TapeLibrary.write`` reads a path, verifying size and adler32 as it goes), and a drive must be
fed at its own pace, not at a wide-area network's. The remote copy is downloaded first, into
``<state_dir>/tape-staging/``, verified by the backend's ``download`` (adler32 of the bytes
received against the catalogue's), and written to tape from there; the staging file is removed
after the write whatever happened. The aggregates of small files are built here too
(``aggregate-<random>.tar``, removed once written). Each tape daemon instance stages in a
directory of its own, ``<state_dir>/tape-staging/<instance id>/`` (``instance_dir``), so several
instances may share a node and its state directory. A killed instance leaves at most the file (or
the download's temporary) it was staging and the aggregates it was building: at start-up and
on the scheduler's ticks ``clean`` removes the directories of the instances no longer alive
(their lease ran out or they stopped: ``common.instance``) and whatever lies in
``tape-staging/`` itself (left by a daemon older than per-instance directories); a clean stop
removes its own (``forget``).

A posix copy is preferred when the file has one (``prefer_local``): no download at all.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

from common.catalogue import Source
from common.errors import Permanent, SpoolError
from common.storage import PosixStorage, StorageBackend
from common.storage.checksum import normalise_adler32

STAGING_DIR = "tape-staging"


def staging_dir(state_dir: Path) -> Path:
    # Resolved once: the staging files are opened with no symlink followed (common.storage.confined)
    # and a state_dir behind a symlinked parent is the operator's choice, not an attack.
    return Path(os.path.realpath(state_dir)) / STAGING_DIR


def instance_dir(root: Path, instance: str) -> Path:
    """The staging directory of one tape daemon instance under ``root`` (``staging_dir``)."""
    return root / _dir_name(instance)


def _dir_name(instance: str) -> str:
    return re.sub(r"[^A-Za-z0-9@._-]", "_", instance)


def entries(root: Path) -> list[str]:
    """The names in ``root``, read before the live instances are (``clean``)."""
    try:
        return sorted(os.listdir(root))
    except FileNotFoundError:
        return []


def clean(root: Path, seen: Iterable[str], live: Iterable[str]) -> int:
    """Remove, of the entries ``seen`` in ``root``, what no live instance stages in: the
    directories of dead instances and loose files; returns how many files.

    ``seen`` is read before ``live``: an instance registers its lease before it makes its
    directory, so a directory seen belongs to an instance that is in ``live`` if it is alive (read
    the other way round, a neighbour starting in between would lose its new directory)."""
    keep = {_dir_name(i) for i in live}
    removed = 0
    for name in seen:
        path = root / name
        try:
            if path.is_dir() and not path.is_symlink():
                if name in keep:
                    continue
                removed += sum(len(files) for _, _, files in os.walk(path))
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink()
                removed += 1
        except FileNotFoundError:
            continue
    return removed


def forget(directory: Path) -> None:
    """A clean stop: this instance's staging directory goes (its batches removed their files)."""
    shutil.rmtree(directory, ignore_errors=True)


def prefer_local(sources: Iterable[Source], storages: Mapping[str, StorageBackend]) -> list[Source]:
    """The sources in the catalogue's order, those mounted on this node first (no download)."""
    return sorted(sources, key=lambda s: not isinstance(storages.get(s.storage), PosixStorage))


async def fetch(
    storage: StorageBackend, source: Source, directory: Path, *, tag: str, size: int, adler32: str
) -> tuple[Path, bool]:
    """The file on this node to write to tape, and whether it is a staging file (the caller
    removes it with ``discard`` once written).

    Errors are the source's: ``path_outside_area`` (a posix pfn escaping its root), the backend's
    download errors (``source_missing``, ``endpoint_unavailable``, ``transfer_timeout`` ...). A
    download whose bytes do not match is told apart: when the server's own checksum of the copy
    differs too, that copy is corrupt (``source_corrupt``, Permanent); otherwise the transfer was
    (``checksum_mismatch`` as raised, retryable).
    """
    if isinstance(storage, PosixStorage):
        return storage.resolve(source.pfn), False
    await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
    local = directory / f"{tag}.{secrets.token_hex(6)}"
    try:
        await storage.download(source.pfn, local, size=size, adler32=adler32)
    except SpoolError as err:
        await asyncio.to_thread(local.unlink, missing_ok=True)
        if err.reason == "checksum_mismatch":
            await _judge_copy(storage, source, size, adler32)
        raise
    except BaseException:
        await asyncio.to_thread(local.unlink, missing_ok=True)
        raise
    return local, True


async def _judge_copy(storage: StorageBackend, source: Source, size: int, adler32: str) -> None:
    """After a download that did not match: raise ``source_corrupt`` when the server agrees the
    copy is not the catalogue's file; return (keep the transfer's error) when it cannot tell."""
    try:
        found = await storage.stat(source.pfn, checksum=True)
    except SpoolError:
        return
    where = storage.url(source.pfn)
    if found is None:
        raise Permanent("source_missing", f"{where} is gone")
    if found.size != size or (found.adler32 is not None and found.adler32 != normalise_adler32(adler32)):
        raise Permanent(
            "source_corrupt",
            f"{where} has {found.size} bytes, adler32 {found.adler32}; expected {size} bytes, {adler32}",
        )


def discard(path: Path) -> None:
    path.unlink(missing_ok=True)
