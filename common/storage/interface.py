"""The one storage interface every daemon uses, whatever protocol reaches the endpoint.

A backend serves one configured disk endpoint (``posix``: a directory on the node; ``xrootd``:
``root://host:port//base``; ``https``: WebDAV at ``davs://`` / ``https://``). Daemons name files
by their path *relative to the endpoint* (``relpath``, the logical layout) and never build a
physical path or URL themselves: the backend confines ``relpath`` under its base and says where a
file lives (``url``, credentials removed, for logs, events and the catalogue).

Every method either returns or raises a classified ``SpoolError`` whose ``reason`` is one the
replicator, the breaker and the monitor already know (each backend module maps its protocol's
statuses and errnos onto them):

- destination failures the breaker counts: ``disk_full``, ``destination_not_writable``,
  ``storage_io_error``, ``endpoint_unavailable``, ``transfer_timeout``, ``auth_failed``;
- source failures (another source is tried): ``source_missing`` (404 / ENOENT: that source copy is
  ``bad``), ``source_io_error``;
- ``checksum_mismatch``: what the server reports after a copy is not the catalogue's value; the
  copy has been deleted before the error is raised.

Copies are atomic: a file appears under its final name only complete and verified (written to a
temporary name, checksum asked of the server, then renamed); on any failure the temporary is
removed, so no partial file is ever left under a final name.

A transfer has a deadline derived from its size (``deadline_for``): a hung server never holds a
copy for ever.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

# How a copy between two endpoints went: server to server, or through this node.
CopyMode = Literal["tpc", "streamed", "local"]


@dataclass(frozen=True, slots=True)
class ObjectStat:
    """What an endpoint says about one stored file."""

    size: int
    # adler32 as 8 lower-case hex digits, asked of the server (XRootD ``query checksum``, HTTP
    # ``Want-Digest``); None when it was not asked for or the server cannot tell.
    adler32: str | None = None


@dataclass(frozen=True, slots=True)
class ListedFile:
    """One file found by ``list`` (consistency checks: what the endpoint holds)."""

    relpath: str
    size: int
    # Seconds since the epoch, when the listing tells it (the sweep of stale temporaries needs it);
    # not part of what makes two listings equal.
    mtime: float | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class CopyDone:
    """A verified copy under its final name."""

    relpath: str
    size: int
    adler32: str
    mode: CopyMode
    # sha256 where this node read the bytes (ingest's upload reads the landing file); None when
    # the copy was verified by the server's adler32 alone.
    sha256: str | None = None


def deadline_for(size: int, min_rate: float, floor: float) -> float:
    """Seconds a transfer of ``size`` bytes may take: at ``min_rate`` bytes/s, never under ``floor``.

    A server that stops sending (or a third-party copy whose performance markers stop moving) is
    given up on after this; the copy is cancelled and its temporary removed.
    """
    return max(floor, size / min_rate if min_rate > 0 else floor)


@runtime_checkable
class StorageBackend(Protocol):
    """One disk endpoint, reached by its protocol. ``relpath`` is a path inside the endpoint."""

    name: str
    kind: str
    # "file", "root" or "https": which pairs can copy server to server.
    scheme: str

    def local_path(self, relpath: str) -> Path | None:
        """The file on this node's file system when the endpoint is mounted here (posix), confined
        under its root at the moment of the call; None for a remote endpoint. Lets a remote backend
        upload straight from a posix source (or download straight into a posix destination)."""
        ...

    def url(self, relpath: str) -> str:
        """Where ``relpath`` lives, for people (logs, events, ``spool show``); no credentials."""
        ...

    async def stat(self, relpath: str, *, checksum: bool = False) -> ObjectStat | None:
        """Size (and the server's adler32 when asked); None when there is no such file."""
        ...

    async def upload(self, local: Path, relpath: str, *, size: int, adler32: str) -> CopyDone:
        """Copy a local file to ``relpath``, verified by the server's checksum, atomically."""
        ...

    async def download(self, relpath: str, local: Path, *, size: int, adler32: str) -> CopyDone:
        """Copy ``relpath`` to a local file (written to a temporary name, verified, renamed)."""
        ...

    def can_pull_from(self, source: StorageBackend) -> bool:
        """True when this endpoint can fetch from ``source`` server to server (third-party copy)."""
        ...

    async def copy_from(
        self, source: StorageBackend, source_relpath: str, relpath: str, *, size: int, adler32: str
    ) -> CopyDone:
        """Copy a file of ``source`` here: third-party when ``can_pull_from(source)``, else
        streamed through this node. Verified and atomic like ``upload``."""
        ...

    async def delete(self, relpath: str) -> bool:
        """Remove ``relpath``; False when it was not there."""
        ...

    async def free_space(self) -> int | None:
        """Free space where the protocol tells it; None when it does not."""
        ...

    def list(self, prefix: str = "", *, temporaries: bool = False) -> AsyncIterator[ListedFile]:
        """Every file below ``prefix``, temporaries of copies in progress excluded; with
        ``temporaries``, those temporaries alone (with their ``mtime``), for the start-up sweep."""
        ...

    async def aclose(self) -> None:
        """Release connections, processes and threads of the backend."""
        ...
