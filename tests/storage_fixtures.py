"""Helpers of the storage tests: what a copy in progress leaves on disk, both ways of writing one, and
the adler32 every test checks copies against."""

from __future__ import annotations

import contextlib
import hashlib
import os
import zlib
from pathlib import Path

import pytest

from common.storage import copy_engine, is_temp_name, tempfiles


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if is_temp_name(p.name)] if root.exists() else []


def unnamed_files_open(root: Path) -> list[str]:
    """Unnamed files (O_TMPFILE) this process has open under ``root``: the kernel shows them as
    ``<dir>/#<inode> (deleted)``; they vanish when their descriptor closes."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(str(root.resolve())) and target.endswith("(deleted)"):
                found.append(target)
    return found


def writing(root: Path) -> bool:
    """A copy is being written under ``root``: a temporary name, or an unnamed file."""
    return bool(leftovers(root) or unnamed_files_open(root))


@pytest.fixture(params=["unnamed", "named"])
def temp_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Copies written to an unnamed file (O_TMPFILE, where the file system has it) or, as on a
    file system without it, to a temporary name."""
    if request.param == "named":
        # Both modules that open unnamed files: the temporary files and the copy engine's shortcut.
        monkeypatch.setattr(tempfiles, "_O_TMPFILE", 0)
        monkeypatch.setattr(copy_engine, "_O_TMPFILE", 0)
    elif not tempfiles._O_TMPFILE:
        pytest.skip("no O_TMPFILE here")
    return request.param


def adler(data: bytes) -> str:
    """The adler32 of ``data`` as Spool writes it: eight lower-case hex digits (zlib's, the reference)."""
    return f"{zlib.adler32(data):08x}"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def alter_keeping_adler32(data: bytes) -> bytes:
    """``data`` with four bytes changed so that its size and adler32 stay the same: +1 at i,
    -1 at i+1, -1 at j, +1 at j+1 leaves adler32's sum A unchanged, and its weighted sum B too
    (each pair moves B by +1 and -1). Only a strong checksum sees the difference."""
    out = bytearray(data)
    i = next(k for k in range(len(out) - 1) if out[k] < 255 and out[k + 1] > 0)
    j = next(k for k in range(i + 2, len(out) - 1) if out[k] > 0 and out[k + 1] < 255)
    out[i] += 1
    out[i + 1] -= 1
    out[j] -= 1
    out[j + 1] += 1
    altered = bytes(out)
    assert altered != data and zlib.adler32(altered) == zlib.adler32(data)
    return altered
