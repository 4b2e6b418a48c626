"""The WebDAV client under the ``https`` backend: one ``aiohttp`` session per endpoint, requests
sent with the credentials and followed through trusted redirects only, the paths confined and
encoded, and the plain verbs (``HEAD``, ``DELETE``, ``MKCOL``, ``PROPFIND``) read into answers.

One ``aiohttp.ClientSession`` per endpoint (pooled TLS connections, bounded); a renewed client
certificate (``https_auth``) retires it: new connections present the new one, transfers in flight
finish on the old session. Redirects (dCache sends clients to its pool nodes) are followed by
hand, only to the URL's own host or ``redirect_hosts`` and only over https, at most
``MAX_REDIRECTS`` times: the token is never sent anywhere else. Paths are confined before any
request: a relpath with ``..``, ``.``, an empty component, a NUL or a leading ``/`` is
``Permanent("path_outside_area")``; every component is percent-encoded.

``_WebDavClient`` is the base class of ``HttpsStorage`` (``common.storage.https``), which makes
the copies (atomic, verified) out of these requests: a base class rather than a member so a
request costs no extra hop. Apart so the plumbing every request goes through, the part that
decides where a token may be sent, reads in one place.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import errno
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urljoin, urlsplit, urlunsplit

import aiohttp
import structlog

from common.config import StorageEndpoint
from common.errors import ConfigError, Permanent, Retryable, SpoolError
from common.storage.checksum import normalise_adler32
from common.storage.https_auth import _BearerToken, _credential_stamp, _renewed_context, _ssl_context
from common.storage.https_errors import Side, exception_error, status_error
from common.storage.interface import ObjectStat
from common.storage.webdav_xml import MAX_MULTISTATUS_BYTES, DavEntry, UnsafeXml, parse_multistatus

log = structlog.get_logger("spool.storage")

PATH_OUTSIDE_AREA = "path_outside_area"
MAX_REDIRECTS = 5
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_READ_BUFFER = 4 * 1024 * 1024
_ERROR_BODY_BYTES = 64 * 1024


# A request that met a connection the server had closed is sent again this many times.
_STALE_RETRIES = 2
_NOT_RESENT = frozenset({"COPY", "MOVE"})


def _stale_connection(exc: BaseException) -> bool:
    """A kept-alive connection the server had closed (before it read this request)."""
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return True
    return isinstance(exc, aiohttp.ClientOSError) and exc.errno in (errno.EPIPE, errno.ECONNRESET)


def parse_adler32_digest(values: builtins.list[str]) -> str | None:
    """The adler32 in RFC 3230 ``Digest`` header values (``adler32=0a1b2c3d``), canonical form.

    Lenient: several digests in one header or several headers, any case for the algorithm, hex
    with or without leading zeros, and base64 of the 4 bytes (the RFC's form for other
    algorithms, which some servers apply to all). None when no adler32 is given.
    """
    for value in values:
        for item in value.split(","):
            alg, sep, text = item.partition("=")
            if not sep or alg.strip().lower() != "adler32":
                continue
            text = text.strip().strip('"')
            try:
                return normalise_adler32(text)
            except ValueError:
                pass
            try:
                raw = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                continue
            if len(raw) == 4:
                return raw.hex()
    return None


async def _read_bounded(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The response body, at most ``limit`` bytes (``UnsafeXml`` beyond: never held in memory)."""
    chunks: builtins.list[bytes] = []
    total = 0
    async for chunk in resp.content.iter_chunked(256 * 1024):
        total += len(chunk)
        if total > limit:
            raise UnsafeXml(f"answer larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _refuse(resp: aiohttp.ClientResponse, side: Side, what: str) -> SpoolError:
    """The classified error for an answer that is not the one expected."""
    return status_error(resp.status, await _error_text(resp), side=side, what=what)


async def _error_text(resp: aiohttp.ClientResponse) -> str:
    """The start of an error answer's body, for the classification and the message."""
    try:
        raw = await resp.content.read(_ERROR_BODY_BYTES)
    except (aiohttp.ClientError, OSError, TimeoutError):
        return ""
    return raw.decode("utf-8", errors="replace")


class _WebDavClient:
    """Requests to one WebDAV endpoint (see the module docstring); ``HttpsStorage`` builds on it."""

    def __init__(
        self,
        name: str,
        endpoint: StorageEndpoint,
        *,
        metadata_timeout: float | None,
        max_redirects: int,
    ) -> None:
        if endpoint.backend != "https" or not endpoint.url:
            raise ConfigError(f"storage.{name}: the https backend needs backend = 'https' and a url")
        self.name = name
        self.endpoint = endpoint
        self.max_redirects = max_redirects
        self._metadata_timeout = metadata_timeout or endpoint.transfer_timeout_floor
        parts = urlsplit(endpoint.url)
        if parts.hostname is None or parts.query or parts.fragment:
            raise ConfigError(f"storage.{name}: url must be scheme://host[:port]/base, no query")
        base_path = parts.path.rstrip("/")
        # Requests always go over https (davs is its WebDAV spelling); people see the url as set.
        self._base = urlunsplit(("https", parts.netloc, base_path, "", ""))
        self._public_base = urlunsplit((parts.scheme, parts.netloc, base_path, "", ""))
        self._base_path = unquote(base_path)  # how PROPFIND hrefs spell it
        self._allowed_hosts = {parts.hostname.lower(), *(h.lower() for h in endpoint.redirect_hosts)}
        self._ssl = _ssl_context(endpoint, name)
        self._cert_stamp = _credential_stamp(endpoint)
        self._retired: builtins.list[aiohttp.ClientSession] = []
        self._token = _BearerToken(endpoint.token_file) if endpoint.token_file is not None else None
        self._session_obj: aiohttp.ClientSession | None = None
        self._known_dirs: set[tuple[str, ...]] = set()

    # -- paths ----------------------------------------------------------------------------------
    def _components(self, relpath: str, *, allow_root: bool = False) -> builtins.list[str]:
        """``relpath`` split into components, refused unless it stays below the base."""
        text = str(relpath)
        if allow_root and text.strip("/") == "":
            return []
        if allow_root:
            text = text.rstrip("/")
        problem = None
        if "\x00" in text:
            problem = "contains a NUL byte"
        elif text.startswith("/"):
            problem = "is absolute"
        elif any(p in ("", ".", "..") for p in text.split("/")):
            problem = "has an empty, '.' or '..' component"
        if problem is not None:
            raise Permanent(PATH_OUTSIDE_AREA, f"path {text!r} {problem}: not inside {self.name}")
        return text.split("/")

    def _url_of(self, parts: builtins.list[str]) -> str:
        return self._base + "".join("/" + quote(p, safe="") for p in parts)

    def _public(self, url: str) -> str:
        """A request URL for messages: no query (dCache pool redirects carry tokens there)."""
        p = urlsplit(url)
        return urlunsplit((p.scheme, p.netloc, p.path, "", ""))

    def url(self, relpath: str) -> str:
        parts = self._components(relpath, allow_root=True)
        return self._public_base + "".join("/" + quote(p, safe="") for p in parts)

    def local_path(self, relpath: str) -> Path | None:
        return None

    # -- HTTP -----------------------------------------------------------------------------------
    def _session(self) -> aiohttp.ClientSession:
        if (
            self.endpoint.cert is not None
            and (renewed := _renewed_context(self.endpoint, self.name, self._cert_stamp)) is not None
        ):
            # A renewed certificate (grid proxies are renewed every few hours): new connections
            # present it; transfers in flight finish on the old session, closed at aclose.
            self._ssl, self._cert_stamp = renewed
            if self._session_obj is not None:
                self._retired.append(self._session_obj)
                self._session_obj = None
                log.info("https_certificate_reloaded", storage=self.name)
        if self._session_obj is None or self._session_obj.closed:
            connector = aiohttp.TCPConnector(
                ssl=self._ssl,
                limit=max(8, 2 * self.endpoint.max_transfers),
                ttl_dns_cache=300,
            )
            self._session_obj = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._metadata_timeout),
                trust_env=False,
                auto_decompress=False,
                # aiohttp pauses the socket at 64 KiB buffered by default: downloads ran at a
                # third of the speed of uploads here.
                read_bufsize=_READ_BUFFER,
            )
        return self._session_obj

    def _auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token.value()}"} if self._token is not None else {}

    def _check_redirect(self, method: str, url: str, target: str) -> None:
        p = urlsplit(target)
        host = (p.hostname or "").lower()
        if p.scheme != "https" or host not in self._allowed_hosts:
            raise Retryable(
                "endpoint_unavailable",
                f"{method} {self._public(url)}: redirect to {p.scheme}://{host or '?'} refused "
                f"(only https to {sorted(self._allowed_hosts)}; see redirect_hosts)",
            )

    async def _send(
        self,
        method: str,
        url: str,
        *,
        side: Side,
        transfer: bool = False,
        headers: dict[str, str] | None = None,
        body: Callable[[], Any] | None = None,
        client_timeout: aiohttp.ClientTimeout | None = None,
    ) -> aiohttp.ClientResponse:
        """Send, following redirects to trusted hosts only; the caller releases the response.

        ``body`` makes the request body afresh for each hop (a 307 wants it sent again).
        """
        session = self._session()
        timeout = client_timeout or aiohttp.ClientTimeout(total=self._metadata_timeout)
        for _hop in range(self.max_redirects + 1):
            what = f"{method} {self._public(url)}"
            for attempt in range(_STALE_RETRIES + 1):
                try:
                    resp = await session.request(
                        method,
                        url,
                        headers={**(headers or {}), **self._auth_headers()},
                        data=body() if body is not None else None,
                        allow_redirects=False,
                        timeout=timeout,
                    )
                    break
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    # XrdHttp closes a kept-alive connection after some error answers (a 500);
                    # the next request on it from the pool meets a broken pipe / a disconnect
                    # before the server read it. Sent again on another connection, except what
                    # must not run twice (a third-party copy, a rename).
                    if attempt < _STALE_RETRIES and method not in _NOT_RESENT and _stale_connection(exc):
                        continue
                    raise exception_error(exc, side=side, what=what, transfer=transfer) from None
            location = resp.headers.get("Location")
            if resp.status not in _REDIRECTS or not location:
                return resp
            resp.close()
            target = urljoin(url, location)
            self._check_redirect(method, url, target)
            log.debug("https_redirect", storage=self.name, method=method, to=self._public(target))
            url = target
            if resp.status == 303:
                method, body = "GET", None
        raise Retryable(
            "endpoint_unavailable", f"{method} {self._public(url)}: more than {self.max_redirects} redirects"
        )

    async def _head(self, url: str, *, checksum: bool, side: Side = "metadata") -> ObjectStat | None:
        headers = {"Want-Digest": "adler32"} if checksum else {}
        resp = await self._send("HEAD", url, side=side, headers=headers)
        async with resp:
            if resp.status in (404, 410):
                return None
            if resp.status != 200:
                raise status_error(resp.status, "", side=side, what=f"HEAD {self._public(url)}")
            try:
                size = int(resp.headers.get("Content-Length", ""))
            except ValueError:
                raise Retryable("storage_io_error", f"HEAD {self._public(url)}: no Content-Length") from None
            digest = parse_adler32_digest(resp.headers.getall("Digest", [])) if checksum else None
            return ObjectStat(size, digest)

    async def _delete_url(self, url: str, *, side: Side = "destination") -> bool:
        resp = await self._send("DELETE", url, side=side)
        async with resp:
            if resp.status in (404, 410):
                return False
            if resp.status in (200, 202, 204):
                return True
            raise await _refuse(resp, side, f"DELETE {self._public(url)}")

    async def _make_dirs(self, dirs: builtins.list[str]) -> None:
        """``MKCOL`` each missing directory from the top (cached); an existing one is fine."""
        for depth in range(1, len(dirs) + 1):
            key = tuple(dirs[:depth])
            if key in self._known_dirs:
                continue
            url = self._url_of(list(key)) + "/"
            resp = await self._send("MKCOL", url, side="destination")
            async with resp:
                # 201 made; 405 "exists" (RFC 4918; XrdHttp answers 201 again); 301 on a dir.
                if resp.status not in (200, 201, 204, 301, 405):
                    raise await _refuse(resp, "destination", f"MKCOL {self._public(url)}")
            if len(self._known_dirs) > 4096:
                self._known_dirs.clear()
            self._known_dirs.add(key)

    async def _propfind(self, url: str, depth: int, request: bytes) -> builtins.list[DavEntry] | None:
        resp = await self._send(
            "PROPFIND",
            url,
            side="metadata",
            headers={"Depth": str(depth), "Content-Type": 'application/xml; charset="utf-8"'},
            body=lambda: request,
        )
        async with resp:
            what = f"PROPFIND {self._public(url)}"
            if resp.status in (404, 410):
                return None
            if resp.status != 207:
                raise await _refuse(resp, "metadata", what)
            try:
                return parse_multistatus(await _read_bounded(resp, MAX_MULTISTATUS_BYTES))
            except UnsafeXml as exc:
                raise Retryable("storage_io_error", f"{what}: {exc}") from None
            except (aiohttp.ClientError, OSError) as exc:
                raise exception_error(exc, side="metadata", what=what, transfer=False) from None

    def _relative(self, path: str) -> str | None:
        """A PROPFIND href's path relative to the base; None when it is not below it."""
        path = path.rstrip("/")
        if path == self._base_path:
            return ""
        if not path.startswith(self._base_path + "/"):
            return None
        rel = path[len(self._base_path) + 1 :]
        if any(p in ("", ".", "..") for p in rel.split("/")):
            return None
        return rel

    def _token_or_none(self) -> str | None:
        return self._token.value() if self._token is not None else None
