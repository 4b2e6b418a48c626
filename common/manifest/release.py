"""Making the signed manifest of a closed dataset from the catalogue.

``manifest_on_close`` is what the dataset-close paths call (ingest's ``dataset.close`` handler and
auto-close, ``spool dataset close``) once their close changed the dataset's state: the node that
closes it writes the manifest when it has a signing key. ``write_release_manifest(catalogue,
dataset, settings)`` writes ``<manifests.directory>/<dataset>.manifest.json`` (atomically: a
temporary in the same directory, fsync-ed, renamed) and returns its path; ``spool dataset
manifest`` calls the same.

Refused (``ReleaseRefused``, one line): an unknown dataset, a dataset still open (its content may
still change: a manifest is a statement about a finished release), a dataset with files whose
sha256 was never recorded (registered before migration 0016: named, up to a few), no signing key
configured or a key file that cannot be used.
"""

from __future__ import annotations

import os
import secrets
from datetime import datetime
from pathlib import Path
from urllib.parse import quote

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.catalogue import Catalogue
from common.catalogue.releases import ReleaseContents
from common.config import Settings
from common.logging import get_logger
from common.manifest.document import Manifest, ManifestEntry, check_name, utc_stamp
from common.manifest.keys import KeyFileError, fingerprint, load_signing_key

log = get_logger("spool.manifest")
SHOWN_MISSING = 5  # files lacking sha256 named in the refusal; the rest counted


class ReleaseRefused(Exception):
    """No manifest for this dataset (why, in one line)."""


def build_manifest(
    contents: ReleaseContents,
    key: Ed25519PrivateKey,
    key_id: str | None = None,
    created: datetime | None = None,
) -> Manifest:
    """The signed manifest of a closed dataset's ``contents`` (pure: no I/O)."""
    if contents.state == "open":
        raise ReleaseRefused(f"dataset {contents.dataset!r} is open: close it before its release manifest")
    lacking = [f.name for f in contents.files if f.sha256 is None]
    if lacking:
        shown = ", ".join(lacking[:SHOWN_MISSING])
        more = f" and {len(lacking) - SHOWN_MISSING} more" if len(lacking) > SHOWN_MISSING else ""
        raise ReleaseRefused(
            f"dataset {contents.dataset!r}: {len(lacking)} files have no sha256 recorded "
            f"(registered before sha256 was): {shown}{more}"
        )
    entries = []
    for f in sorted(contents.files, key=lambda f: f.name):  # code point order, whatever the SQL collation
        try:
            check_name(f.name)
        except ValueError as exc:
            raise ReleaseRefused(f"dataset {contents.dataset!r}: {exc}") from None
        assert f.sha256 is not None
        entries.append(ManifestEntry(f.name, f.size, f.sha256))
    unsigned = Manifest(
        contents.dataset, utc_stamp(created), key_id or fingerprint(key.public_key()), tuple(entries)
    )
    return Manifest(
        unsigned.dataset, unsigned.created, unsigned.key_id, unsigned.files, key.sign(unsigned.signed_bytes())
    )


def signing_key(settings: Settings) -> Ed25519PrivateKey:
    path = settings.manifests.signing_key
    if path is None:
        raise ReleaseRefused("no signing key: set [manifests] signing_key (see `spool dataset keygen`)")
    try:
        return load_signing_key(path)
    except KeyFileError as exc:
        raise ReleaseRefused(str(exc)) from None


async def release_manifest(catalogue: Catalogue, dataset: str, settings: Settings) -> Manifest:
    contents = await catalogue.queries.release_contents(dataset)
    if contents is None:
        raise ReleaseRefused(f"no dataset named {dataset!r} in the catalogue")
    return build_manifest(contents, signing_key(settings), settings.manifests.key_id)


def manifest_file_name(dataset: str) -> str:
    """``<dataset>.manifest.json``, the dataset name quoted so it is one safe file name."""
    safe = quote(dataset, safe="._-")
    return ("%2E" + safe[1:] if safe.startswith(".") else safe) + ".manifest.json"


async def write_release_manifest(
    catalogue: Catalogue, dataset: str, settings: Settings, out: Path | None = None
) -> Path:
    """Write the dataset's signed manifest (default: into ``[manifests] directory``); its path."""
    manifest = await release_manifest(catalogue, dataset, settings)
    path = out or settings.manifests.directory / manifest_file_name(dataset)
    write_atomically(path, manifest.encode())
    return path


async def manifest_on_close(catalogue: Catalogue, dataset: str, settings: Settings) -> Path | None:
    """The release manifest of a dataset just closed, written when this node has a signing key
    (``[manifests] signing_key``); None when it has none (decided: a node without the key leaves
    the manifest to ``spool dataset manifest`` on one that has it) or when the manifest is refused.
    A refusal is a warning, never a failure of the close: the close is committed already, and the
    manifest can be made again later (``spool dataset manifest NAME``)."""
    if settings.manifests.signing_key is None:
        return None
    try:
        path = await write_release_manifest(catalogue, dataset, settings)
    except (ReleaseRefused, OSError) as exc:
        log.warning("release_manifest_not_written", dataset=dataset, error=str(exc))
        return None
    log.info("release_manifest_written", dataset=dataset, path=str(path))
    return path


def write_atomically(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
