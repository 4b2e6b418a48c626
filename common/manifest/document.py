"""A release manifest as a document: what it holds, its canonical bytes, and reading one safely.

The manifest is one JSON file (``<dataset>.manifest.json``) that travels with a copy of a dataset:

    {"format": "spool-manifest/1", "dataset": "...", "created": "2026-12-07T21:40:00Z",
     "key_id": "...", "files": [{"name": "...", "size": 123, "sha256": "<64 hex>"}, ...],
     "signature": "<base64 of the Ed25519 signature>"}

``files`` is sorted by name, names unique. The signature is over the **canonical bytes** of the
document without its ``signature`` member: JSON with sorted keys, no whitespace, UTF-8, integers
only (``canonical_bytes``). So a verifier re-encodes what it parsed and checks the signature over
that: re-indenting the file does not break it, changing any value does.

The manifest is hostile input (it arrives with the copy, from anywhere): ``parse`` bounds its
size before reading JSON, its nesting, its counts and every field, and refuses a name that could
leave the directory it is checked in (absolute, ``..``, ``.``, empty component, NUL or another
control character, over the file system's lengths). Every refusal is a ``ManifestRefused`` with
one line saying what is wrong.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from common import limits
from common.storage.checksum import normalise_sha256

FORMAT = "spool-manifest/1"
# 10,000 files with 1 KiB names are about 11 MB of JSON; a dataset holds at most a few thousand.
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
MAX_FILES = 100_000
MAX_KEY_ID = 64
SIGNATURE_BYTES = 64  # Ed25519
_MEMBERS = {"format", "dataset", "created", "key_id", "files", "signature"}
_FILE_MEMBERS = {"name", "size", "sha256"}


class ManifestRefused(Exception):
    """The manifest cannot be used: malformed, oversized, unsafe names. One line, for people."""


@dataclass(frozen=True, slots=True)
class ManifestEntry:
    name: str
    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class Manifest:
    dataset: str
    created: str  # ISO 8601, UTC, seconds ("2026-12-07T21:40:00Z")
    key_id: str
    files: tuple[ManifestEntry, ...]
    signature: bytes = b""

    def unsigned(self) -> dict[str, Any]:
        """The document without its signature: what is signed (through ``canonical_bytes``)."""
        return {
            "format": FORMAT,
            "dataset": self.dataset,
            "created": self.created,
            "key_id": self.key_id,
            "files": [{"name": f.name, "size": f.size, "sha256": f.sha256} for f in self.files],
        }

    def signed_bytes(self) -> bytes:
        return canonical_bytes(self.unsigned())

    def encode(self) -> bytes:
        """The file's bytes: the document with its signature, one file entry per line."""
        doc = self.unsigned()
        files = doc.pop("files")
        head = json.dumps(doc, ensure_ascii=False, sort_keys=True)[:-1]
        lines = ",\n  ".join(json.dumps(f, ensure_ascii=False, sort_keys=True) for f in files)
        sig = base64.b64encode(self.signature).decode()
        return f'{head}, "signature": "{sig}",\n "files": [\n  {lines}\n ]}}\n'.encode()


def utc_stamp(when: datetime | None = None) -> str:
    return (when or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def canonical_bytes(doc: dict[str, Any]) -> bytes:
    """The one byte encoding that is signed: sorted keys, no spaces, UTF-8, no NaN."""
    return json.dumps(
        doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def check_name(name: object) -> str:
    """A file name of a manifest: a clean relative path that stays below the directory checked.

    ``ValueError`` saying why otherwise. Lexical only: the opens themselves are confined too.
    """
    if not isinstance(name, str):
        raise ValueError("a file name must be a string")
    if not name or len(name) > limits.MAX_NAME:
        raise ValueError(f"a file name must be 1-{limits.MAX_NAME} characters")
    if "\x00" in name:
        raise ValueError(f"file name {name!r} contains a NUL byte")
    try:
        limits.no_control(name)
        limits.check_path_bytes(name)
    except ValueError as exc:
        raise ValueError(f"file name {name!r} {exc}") from None
    if name.startswith("/"):
        raise ValueError(f"file name {name!r} is absolute")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(
            f"file name {name!r} has an empty, '.' or '..' component (it could leave the directory)"
        )
    return name


def parse(raw: bytes) -> Manifest:
    """The manifest in ``raw`` (a file's bytes), every field checked; ``ManifestRefused`` if not."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestRefused(f"manifest is {len(raw)} bytes, at most {MAX_MANIFEST_BYTES} allowed")
    if limits.json_depth_exceeds(raw, 4):
        raise ManifestRefused("manifest nests deeper than a manifest does")
    try:
        doc = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ManifestRefused(f"manifest is not valid JSON: {exc}") from None
    try:
        return _manifest(doc)
    except (ValueError, TypeError) as exc:
        raise ManifestRefused(f"manifest refused: {exc}") from None


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


def _manifest(doc: Any) -> Manifest:
    if not isinstance(doc, dict):
        raise ValueError("the document must be a JSON object")
    if set(doc) != _MEMBERS:
        missing, extra = sorted(_MEMBERS - set(doc)), sorted(set(doc) - _MEMBERS)
        raise ValueError(f"members missing {missing}, unknown {extra}")
    if doc["format"] != FORMAT:
        raise ValueError(f"format {str(doc['format'])[:40]!r} is not {FORMAT!r}")
    dataset = _text(doc["dataset"], "dataset", limits.MAX_DATASET)
    created = _text(doc["created"], "created", limits.MAX_TIMESTAMP)
    key_id = _text(doc["key_id"], "key_id", MAX_KEY_ID)
    files = doc["files"]
    if not isinstance(files, list):
        raise ValueError("files must be a list")
    if len(files) > MAX_FILES:
        raise ValueError(f"{len(files)} files, at most {MAX_FILES} allowed")
    entries = tuple(_entry(f) for f in files)
    names = [e.name for e in entries]
    if names != sorted(names) or len(set(names)) != len(names):
        raise ValueError("files must be sorted by name, each name once")
    return Manifest(dataset, created, key_id, entries, _signature(doc["signature"]))


def _text(value: Any, what: str, limit: int) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= limit:
        raise ValueError(f"{what} must be a string of 1-{limit} characters")
    try:
        return limits.no_control(value)
    except ValueError as exc:
        raise ValueError(f"{what} {exc}") from None


def _entry(item: Any) -> ManifestEntry:
    if not isinstance(item, dict) or set(item) != _FILE_MEMBERS:
        raise ValueError(f"each file must be an object with exactly {sorted(_FILE_MEMBERS)}")
    name = check_name(item["name"])
    size = item["size"]
    if type(size) is not int or not 0 <= size <= limits.MAX_SIZE:  # bool is not a size
        raise ValueError(f"{name!r}: size must be an integer 0-{limits.MAX_SIZE}")
    sha = item["sha256"]
    try:
        good = normalise_sha256(sha) == sha  # lower case only: the canonical bytes are signed
    except ValueError:
        good = False
    if not good:
        raise ValueError(f"{name!r}: sha256 must be 64 lower-case hexadecimal digits")
    return ManifestEntry(name, size, sha)


def _signature(value: Any) -> bytes:
    if not isinstance(value, str) or len(value) > 4 * SIGNATURE_BYTES:
        raise ValueError("signature must be base64 text of an Ed25519 signature")
    try:
        sig = base64.b64decode(value, validate=True)
    except binascii.Error:
        raise ValueError("signature is not valid base64") from None
    if len(sig) != SIGNATURE_BYTES:
        raise ValueError(f"signature is {len(sig)} bytes, an Ed25519 signature is {SIGNATURE_BYTES}")
    return sig
