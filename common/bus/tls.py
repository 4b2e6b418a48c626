"""TLS towards RabbitMQ: one ``ssl.SSLContext`` from ``bus.tls_*`` for AMQP and the management API.

Verification is always on: the broker's certificate must chain to ``bus.tls_ca`` (or the system's
CAs when it is unset) and, unless ``bus.tls_check_hostname`` is false, name the host of the URL
(DNS or IP subject alternative name). There is deliberately no setting that turns verification
off: a site testing with a self-signed broker gives its certificate as ``tls_ca``.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from common.config import BusSettings
from common.errors import ConfigError


def is_tls(bus: BusSettings) -> bool:
    return bus.url.startswith("amqps://")


def client_context(bus: BusSettings) -> ssl.SSLContext:
    """The context every TLS connection to the broker uses; ``ConfigError`` naming the bad file."""
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=_file(bus.tls_ca, "tls_ca"))
    except ssl.SSLError as exc:
        raise ConfigError(f"bus.tls_ca {bus.tls_ca}: no CA certificate in it ({exc.reason or exc})") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = bus.tls_check_hostname
    if bus.tls_cert is not None:
        cert = str(bus.tls_cert)
        _file(bus.tls_cert, "tls_cert")
        try:
            context.load_cert_chain(cert, _file(bus.tls_key, "tls_key"))
        except ssl.SSLError as exc:
            raise ConfigError(
                f"bus.tls_cert {bus.tls_cert} / tls_key {bus.tls_key}: not a certificate and its key "
                f"({exc.reason or exc})"
            ) from None
    return context


def _file(path: Path | None, key: str) -> str | None:
    if path is None:
        return None
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"bus.{key} {path}: {exc.strerror}") from None
    return str(path)


def tls_failure(exc: BaseException) -> ssl.SSLError | None:
    """The TLS error behind a failed connection (aiormq re-raises it as its own), if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        # aiohttp wraps the handshake's error in one of its own that is also an SSLError.
        inner = getattr(current, "certificate_error", None) or getattr(current, "os_error", None)
        if isinstance(inner, ssl.SSLError):
            return inner
        if isinstance(current, ssl.SSLError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def describe(error: ssl.SSLError) -> str:
    """One line for the operator: what the handshake said, without the C file and line."""
    verify_message = getattr(error, "verify_message", None)
    if isinstance(error, ssl.SSLCertVerificationError) and verify_message:
        return f"certificate verify failed: {verify_message}"
    return str(getattr(error, "reason", None) or error).lower().replace("_", " ")
