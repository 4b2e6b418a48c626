"""Ed25519 keys of release manifests: reading them, naming them, signing and checking with them.

A signing key is a secret: its file must be a regular file nobody but its owner may read (mode
0600 or stricter, as the broker's password files), opened without following a symlink and
without blocking. It may be PEM (``openssl genpkey -algorithm ed25519``, PKCS#8) or the raw 32
bytes. A public key is PEM (``openssl pkey -pubout``, SubjectPublicKeyInfo) or the raw 32 bytes.

A key's **id** is what a manifest names to say which key signed it: by default the key's
fingerprint, ``ed25519:`` and the first 16 hex digits of the sha256 of its raw public bytes, so
that a verifier given several public keys (rotation) finds the right one without a table. An
operator may name keys themselves (``[manifests] key_id``); a verifier then says which id each
public key has (``--key ID=FILE``).
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

MAX_KEY_FILE_BYTES = 16 * 1024
RAW_KEY_BYTES = 32


class KeyFileError(Exception):
    """A key file that cannot be used (one line, never the key's content)."""


@dataclass(frozen=True, slots=True)
class PublicKey:
    key_id: str
    key: Ed25519PublicKey

    def verifies(self, signature: bytes, data: bytes) -> bool:
        try:
            self.key.verify(signature, data)
        except InvalidSignature:
            return False
        return True


def fingerprint(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


def _read_key_file(path: Path, *, secret: bool) -> bytes:
    try:
        # A secret is not read through a symlink (as the broker's password files); a public key
        # may be one (``current.pub`` -> the key of the year).
        nofollow = os.O_NOFOLLOW if secret else 0
        fd = os.open(path, os.O_RDONLY | nofollow | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise KeyFileError(f"key file {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(f"key file {path}: not a regular file")
        if secret and info.st_mode & 0o077:
            raise KeyFileError(
                f"signing key {path} is readable by others (mode {stat.S_IMODE(info.st_mode):o}): chmod 600"
            )
        data = os.read(fd, MAX_KEY_FILE_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"key file {path}: larger than a key file ({MAX_KEY_FILE_BYTES} bytes)")
    return data


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    data = _read_key_file(path, secret=True)
    if len(data) == RAW_KEY_BYTES:
        return Ed25519PrivateKey.from_private_bytes(data)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise KeyFileError(
            f"signing key {path}: not a PEM or raw Ed25519 private key (or encrypted)"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"signing key {path}: a {type(key).__name__}, not an Ed25519 key")
    return key


def load_public_key(spec: str) -> PublicKey:
    """A verifier's ``--key``: ``FILE`` (known by its fingerprint) or ``ID=FILE``."""
    key_id, sep, name = spec.partition("=")
    if not sep:
        key_id, name = "", spec
    path = Path(name)
    data = _read_key_file(path, secret=False)
    public: object
    if len(data) == RAW_KEY_BYTES:
        public = Ed25519PublicKey.from_public_bytes(data)
    else:
        try:
            public = serialization.load_pem_public_key(data)
        except (ValueError, TypeError):
            try:  # a private key given where the public one was expected: use its public half
                public = serialization.load_pem_private_key(data, password=None).public_key()
            except (ValueError, TypeError):
                raise KeyFileError(f"public key {path}: not a PEM or raw Ed25519 public key") from None
    if not isinstance(public, Ed25519PublicKey):
        raise KeyFileError(f"public key {path}: a {type(public).__name__}, not an Ed25519 key")
    return PublicKey(key_id or fingerprint(public), public)


def write_new_key(private_path: Path, public_path: Path) -> str:
    """Make a new key pair: the private key PEM (mode 0600, never replacing a file), the public
    key PEM next to it. Returns the new key's fingerprint."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    public = key.public_key()
    public_path.write_bytes(
        public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return fingerprint(public)
