"""Checking a copy of a dataset against its signed manifest, offline: no catalogue, no broker.

Order: the signature first (a manifest that does not verify says nothing about the files, so
they are not read), then every file of the manifest, then what is there and should not be.

The copy is a directory holding the files under their manifest names (the layout of a posix
endpoint, whose pfn is the logical name: an endpoint's root works as the directory). Every open
is confined beneath it (``common.storage.confined``: no symlink followed at any component,
non-blocking, regular files only), so a hostile manifest or a planted symlink cannot make the
check read outside it. "Added" files are looked for in the directories that hold the manifest's
files (one level each, not their sub-directories; the temporaries of copies in progress and the
manifest file itself are not counted).

Files are hashed in a pool of threads: sha256 releases the GIL, so the check runs at the
machine's sha256 speed on as many cores as it has (bench/manifest.py measures both).
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from common.manifest.document import Manifest, ManifestEntry
from common.manifest.keys import PublicKey
from common.storage import confined
from common.storage.paths import real_root
from common.storage.tempfiles import is_temp_name

CHUNK = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong, as one line for people. ``kind``: ``unknown_key``, ``signature``,
    ``missing``, ``size``, ``changed``, ``not_a_file``, ``unreadable``, ``added``."""

    kind: str
    name: str | None
    text: str


def check_signature(manifest: Manifest, keys: Sequence[PublicKey]) -> Problem | None:
    """None when one of ``keys`` has the manifest's key id and verifies its signature."""
    matching = [k for k in keys if k.key_id == manifest.key_id]
    if not matching:
        given = ", ".join(sorted({k.key_id for k in keys})) or "none"
        return Problem(
            "unknown_key",
            None,
            f"unknown key: the manifest is signed by key id {manifest.key_id!r}; "
            f"the keys given have ids {given}",
        )
    data = manifest.signed_bytes()
    if any(k.verifies(manifest.signature, data) for k in matching):
        return None
    return Problem(
        "signature",
        None,
        f"signature invalid: the signature does not verify with key {manifest.key_id!r}"
        " (the manifest was edited after signing, or signed by another key with that id)",
    )


def check_directory(
    root: Path,
    manifest: Manifest,
    *,
    ignore: Sequence[Path] = (),
    threads: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[Problem]:
    """Every problem of the copy under ``root``, in the manifest's order then the added files.
    ``ignore``: files not to count as added (the manifest itself when kept there)."""
    top = real_root(root)
    workers = threads or min(32, (os.cpu_count() or 1) + 1)
    problems: list[Problem] = []
    with ThreadPoolExecutor(workers, thread_name_prefix="manifest-check") as pool:
        for part in pool.map(lambda part: [_check_file(top, e) for e in part], _parts(manifest.files)):
            problems += [p for p in part if p is not None]
            if progress is not None:
                progress(len(part))
    problems += _added(top, manifest, {os.path.realpath(p) for p in ignore})
    return problems


_local = threading.local()
# Files handed to a worker at once: a task per file cost ~0.25 ms of the pool's own work on this
# machine (a future, a lock, a wake-up), as much as hashing 100 KiB; a part of up to 64 files or
# PART_BYTES amortises it and still spreads large files over the threads.
PART_FILES = 64
PART_BYTES = 64 * 1024 * 1024


def _parts(entries: Sequence[ManifestEntry]) -> Iterator[list[ManifestEntry]]:
    part: list[ManifestEntry] = []
    size = 0
    for e in entries:
        part.append(e)
        size += e.size
        if len(part) >= PART_FILES or size >= PART_BYTES:
            yield part
            part, size = [], 0
    if part:
        yield part


def _check_file(top: str, entry: ManifestEntry) -> Problem | None:
    name = entry.name
    try:
        fd, st = confined.open_regular_beneath(top, name)
    except confined.NotARegularFile as exc:
        return Problem("not_a_file", name, f"not a file: {name} is {exc.what}")
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return Problem("missing", name, f"missing: {name}")
        if confined.is_refused(exc):
            return Problem(
                "not_a_file", name, f"not a file: {name} has a symbolic link on its path (not followed)"
            )
        return Problem("unreadable", name, f"unreadable: {name}: {exc.strerror or exc}")
    try:
        if st.st_size != entry.size:
            return Problem(
                "size", name, f"size differs: {name} has {st.st_size} bytes, expected {entry.size}"
            )
        try:
            size, digest = _sha256_fd(fd)
        except OSError as exc:
            return Problem("unreadable", name, f"unreadable: {name}: {exc.strerror or exc}")
    finally:
        os.close(fd)
    if size != entry.size:  # changed while read
        return Problem("size", name, f"size differs: {name} has {size} bytes, expected {entry.size}")
    if digest != entry.sha256:
        return Problem("changed", name, f"changed: {name}: sha256 {digest}, expected {entry.sha256}")
    return None


def _sha256_fd(fd: int) -> tuple[int, str]:
    """Size and sha256 of an open file, through one page-aligned buffer per thread (the kernel's
    copy into a page-aligned buffer is several times faster here: ``common.storage.kernel``)."""
    buf: mmap.mmap | None = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = mmap.mmap(-1, CHUNK)
    view = memoryview(buf)
    digest = hashlib.sha256()
    total = 0
    while n := os.preadv(fd, [buf], total):
        digest.update(view[:n])
        total += n
    return total, digest.hexdigest()


def _added(top: str, manifest: Manifest, ignore: set[str]) -> list[Problem]:
    names = {e.name for e in manifest.files}
    out: list[Problem] = []
    for directory in sorted({os.path.dirname(n) for n in names}):
        try:
            dfd = confined.open_dir_beneath(top, directory)
        except OSError:
            continue  # its files are reported missing already
        try:
            with os.scandir(dfd) as entries:
                listed = sorted((e.name, e.stat(follow_symlinks=False).st_mode) for e in entries)
        finally:
            os.close(dfd)
        for base, mode in listed:
            name = f"{directory}/{base}" if directory else base
            if stat.S_ISDIR(mode) or name in names or is_temp_name(base):
                continue
            if os.path.join(top, name) in ignore:
                continue
            out.append(Problem("added", name, f"added: {name} is not in the manifest"))
    return out
