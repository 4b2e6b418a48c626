"""Storage endpoints (RSEs): where replicas live.

Daemons obtain an endpoint with ``open_storage(name, settings.storage[name])`` and talk to it only
through the ``Storage`` protocol, so a later backend (an LTFS-mounted cartridge, an object store)
slots in without touching them. Paths from messages are named with ``common.storage.paths``
(no ``..``, nothing outside the root) and opened with ``common.storage.confined`` (beneath the
root, no symlink followed, at the moment of each open).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from common.errors import Permanent
from common.storage.checksum import adler32_of_bytes, adler32_of_file, format_adler32, normalise_adler32
from common.storage.copy_engine import CopyResult
from common.storage.paths import resolve_inside
from common.storage.tempfiles import is_temp_name

if TYPE_CHECKING:
    from common.config import StorageEndpoint
    from common.storage.interface import StorageBackend
    from common.storage.posix import PosixStorage

__all__ = [
    "CopyResult",
    "PosixStorage",
    "Storage",
    "StorageBackend",
    "adler32_of_bytes",
    "adler32_of_file",
    "format_adler32",
    "is_temp_name",
    "normalise_adler32",
    "open_storage",
    "resolve_inside",
]


# Imported on first use (PEP 562): the copy process imports this package for its engine, and the
# backends bring the config and pydantic with them (the copier was 48 MB resident with them).
_LAZY = {"PosixStorage": "common.storage.posix", "StorageBackend": "common.storage.interface"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@runtime_checkable
class Storage(Protocol):
    """What the daemons need from an endpoint; ``pfn``/``relpath`` are paths inside it."""

    name: str
    kind: str

    async def put_from(
        self,
        source: Path,
        relpath: str,
        *,
        expected_size: int | None = None,
        expected_adler32: str | None = None,
        fsync: bool = True,
    ) -> CopyResult: ...

    def exists(self, relpath: str) -> bool: ...

    def size_of(self, relpath: str) -> int: ...

    async def checksum(self, relpath: str) -> str: ...

    async def delete(self, relpath: str) -> bool: ...

    def free_bytes(self) -> int: ...

    def cleanup_temp(self, older_than: float = 0) -> int: ...


def open_storage(name: str, endpoint: StorageEndpoint) -> StorageBackend:
    """The backend object for a configured disk endpoint: ``posix`` (a directory on this node),
    ``xrootd`` (``root://``) or ``https`` (WebDAV). All serve ``StorageBackend``; the posix one
    also has the fast local copy paths the daemons use when both ends are mounted here.

    Tape endpoints are refused: their root holds a tape library (cartridges, drives), which only
    the tape backend may write; a plain file copy into it would bypass the library's bookkeeping.
    """
    if endpoint.kind == "disk":
        if endpoint.backend == "posix":
            from common.storage.posix import PosixStorage

            return PosixStorage(name, endpoint)
        if endpoint.backend == "xrootd":
            # Imported here: the XRootD client library is loaded only by nodes that use it.
            from common.storage.xrootd import XrootdStorage

            return XrootdStorage(name, endpoint)
        if endpoint.backend == "https":
            from common.storage.https import HttpsStorage

            return HttpsStorage(name, endpoint)
    raise Permanent(
        "unknown_storage",
        f"storage {name!r}: no disk backend for kind={endpoint.kind!r} backend={endpoint.backend!r}",
    )
