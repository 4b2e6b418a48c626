"""Credentials of the ``https`` backend: the TLS context (trusted CAs, the client certificate)
and the bearer token.

``ca_path`` is a PEM file or a hashed directory (the system's CAs without it); the X.509
``cert`` / ``key``, when configured, are presented by every new connection and loaded again when
those files change (grid proxies are renewed every few hours: ``_renewed_context``). The bearer
token is read from ``token_file`` again whenever the file changes, so a token renewed by an
external agent is picked up; it never appears in a log, an error text or a repr. Apart from the
request plumbing (``common.storage.https_client``) so what may carry a secret is in one short
module.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

from common.config import StorageEndpoint
from common.errors import ConfigError, Retryable

Stamp = tuple[tuple[int, int, int], ...]


def _ssl_context(ep: StorageEndpoint, name: str) -> ssl.SSLContext:
    try:
        if ep.ca_path is None:
            ctx = ssl.create_default_context()
        elif ep.ca_path.is_dir():
            ctx = ssl.create_default_context(capath=str(ep.ca_path))
        else:
            ctx = ssl.create_default_context(cafile=str(ep.ca_path))
        if ep.cert is not None:
            ctx.load_cert_chain(str(ep.cert), str(ep.key) if ep.key is not None else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"storage.{name}: ca_path / cert / key: {exc}") from None
    return ctx


class _BearerToken:
    """The token in ``token_file``, read again when the file changes (mtime, size or inode)."""

    __slots__ = ("_stamp", "_value", "path")

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._value = ""

    def __repr__(self) -> str:
        return f"_BearerToken(path={str(self.path)!r})"  # never the token

    def value(self) -> str:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if stamp != self._stamp:
                text = self.path.read_text().strip()
                if not text or any(c in text for c in "\r\n\x00"):
                    raise Retryable("auth_failed", f"token file {self.path} is empty or not one line")
                self._value, self._stamp = text, stamp
        except OSError as exc:
            raise Retryable("auth_failed", f"token file {self.path}: {exc.strerror or exc}") from None
        return self._value


def _credential_stamp(endpoint: StorageEndpoint) -> Stamp:
    """When the client certificate / key files last changed (empty without a certificate)."""
    stamps = []
    for path in (endpoint.cert, endpoint.key):
        if path is not None:
            try:
                st = os.stat(path)
                stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                stamps.append((0, 0, 0))
    return tuple(stamps)


def _renewed_context(
    endpoint: StorageEndpoint, name: str, stamp: Stamp
) -> tuple[ssl.SSLContext, Stamp] | None:
    """A new TLS context and its stamp when the client certificate / key changed since ``stamp``
    (None when they did not). A half-written file is ``auth_failed``: tried again next time."""
    if (now := _credential_stamp(endpoint)) == stamp:
        return None
    try:
        return _ssl_context(endpoint, name), now
    except ConfigError as exc:
        raise Retryable("auth_failed", str(exc)) from None  # half-written: next time
