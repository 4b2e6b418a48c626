"""A copy between two endpoints that cannot copy server to server: through this node.

The order of preference for a copy of ``source:relpath`` to ``dest``, decided by the destination
backend's ``copy_from``:

1. third-party copy, when ``dest.can_pull_from(source)`` (XRootD TPC between two XRootD endpoints,
   HTTP-TPC where both ends are configured ``tpc = true``): no byte crosses this node;
2. straight from / to this node's file system when one side is mounted here (``local_path``):
   ``dest.upload(local)`` from a posix source, ``source.download(relpath, local)`` into a posix
   destination;
3. otherwise ``stream_via_node`` (here): downloaded into a temporary file of this node, verified,
   then uploaded and verified by the destination's server. The temporary is removed whatever
   happens. A node-local file rather than a pipe between the two protocols keeps each side's
   verification, retry and deadline its own, at the cost of one local write and read.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from common.storage.interface import CopyDone, StorageBackend
from common.storage.posix import PosixStorage


async def stream_via_node(
    source: StorageBackend,
    source_relpath: str,
    dest: StorageBackend,
    relpath: str,
    *,
    size: int,
    adler32: str,
    scratch: Path | None = None,
) -> CopyDone:
    """Copy through a temporary file in ``scratch`` (default: the system's temporary directory)."""
    with tempfile.TemporaryDirectory(prefix="spool-stream-", dir=scratch) as tmp:
        local = Path(tmp) / "copy"
        await source.download(source_relpath, local, size=size, adler32=adler32)
        done = await dest.upload(local, relpath, size=size, adler32=adler32)
    return CopyDone(done.relpath, done.size, done.adler32, "streamed")


async def verify_stored(storage: StorageBackend, relpath: str, *, size: int, adler32: str) -> str | None:
    """None when the copy at ``relpath`` is the expected file, else what is wrong (for logs).

    Mounted here: read back (``PosixStorage.verify``). Remote: the server's size and adler32 (never
    the bytes over the network). A server that cannot tell a checksum is trusted on the size: a
    good copy is not destroyed for want of an answer.
    """
    if isinstance(storage, PosixStorage):
        return await storage.verify(relpath, expected_size=size, expected_adler32=adler32)
    found = await storage.stat(relpath, checksum=True)
    if found is None:
        return "missing"
    if found.size != size:
        return f"{found.size} bytes, expected {size}"
    if found.adler32 is not None and found.adler32 != adler32.lower().rjust(8, "0"):
        return f"adler32 {found.adler32}, expected {adler32}"
    return None
