"""Credentials of the ``xrootd`` backend: the bearer token and the X.509 (GSI) identity.

A bearer token (``token_file``, re-read when its mtime changes) travels as the
``authz=Bearer%20<token>`` CGI of every request (the ZTN / SciTokens convention); it never appears
in ``url()``, in errors or in logs (``xrootd_errors.scrub``). X.509 (GSI) is the client library's
business: it reads ``X509_USER_PROXY`` or ``X509_USER_CERT`` / ``X509_USER_KEY`` and
``X509_CERT_DIR`` from the environment; an endpoint's ``cert`` / ``key`` / ``ca_path`` are put
there when set (one identity per process: the environment is process-wide). Apart from the
backend (``common.storage.xrootd``) so what may carry a secret is in one short module.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote

import structlog

from common.config import StorageEndpoint
from common.errors import Retryable

log = structlog.get_logger("spool.storage.xrootd")


def _x509_environment(endpoint: StorageEndpoint) -> None:
    """Hand an endpoint's certificate, key and CA directory to the client library (GSI reads the
    ``X509_*`` environment). One identity per process: a second, different one is refused loudly."""
    pairs = (("X509_USER_CERT", endpoint.cert), ("X509_USER_KEY", endpoint.key or endpoint.cert))
    wanted = [(k, str(v)) for k, v in pairs if endpoint.cert is not None and v is not None]
    if endpoint.ca_path is not None and endpoint.ca_path.is_dir():
        wanted.append(("X509_CERT_DIR", str(endpoint.ca_path)))
    for key, value in wanted:
        current = os.environ.get(key)
        if current is not None and current != value:
            log.warning("x509_environment_conflict", variable=key, kept=current, ignored=value)
            continue
        os.environ[key] = value


class _Token:
    """A bearer token from a file, re-read when the file's mtime changes (tokens are renewed by
    an agent every few minutes; the daemon keeps running)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._stamp: int | None = None
        self._cgi = ""

    def cgi(self) -> str:
        if self.path is None:
            return ""
        try:
            stamp = os.stat(self.path).st_mtime_ns
            if stamp != self._stamp:
                token = self.path.read_text().strip()
                self._cgi, self._stamp = f"authz=Bearer%20{quote(token, safe='')}", stamp
        except OSError as exc:
            raise Retryable(
                "auth_failed", f"cannot read token file {self.path}: {exc.strerror or exc}"
            ) from None
        return self._cgi
