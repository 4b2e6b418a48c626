"""Reading a WebDAV ``207 Multi-Status`` answer (``PROPFIND``), guarded.

The XML comes from a remote server, so it is parsed defensively with the standard library alone
(``defusedxml`` is not a dependency): the body is read up to ``MAX_MULTISTATUS_BYTES`` and refused
beyond, and any document with a ``<!DOCTYPE`` (the only place entities can be declared, hence the
"billion laughs" and external-entity attacks) is refused before ``xml.etree`` sees it. A WebDAV
server never needs a DOCTYPE.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from urllib.parse import unquote, urlsplit

# A directory of ~100k entries answers a few tens of MiB; anything larger is not a listing.
MAX_MULTISTATUS_BYTES = 64 * 1024 * 1024
_DAV = "{DAV:}"
_DOCTYPE = re.compile(rb"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)


class UnsafeXml(ValueError):
    """The answer is too large, declares a DOCTYPE / entities, or is not well-formed XML."""


@dataclass(frozen=True, slots=True)
class DavEntry:
    """One ``<D:response>``: its path (percent-decoded, no scheme/host) and what was asked of it."""

    path: str
    is_dir: bool
    size: int | None
    quota_available: int | None = None
    # getlastmodified (RFC 1123 date), as seconds since the epoch; None when not given / not a date.
    mtime: float | None = None


def _int(element: ET.Element | None) -> int | None:
    if element is None or element.text is None:
        return None
    try:
        return int(element.text.strip())
    except ValueError:
        return None


def _date(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return parsedate_to_datetime(text.strip()).timestamp()
    except (TypeError, ValueError, IndexError):
        return None


def parse_multistatus(body: bytes, *, max_bytes: int = MAX_MULTISTATUS_BYTES) -> list[DavEntry]:
    """The entries of a multistatus document; ``UnsafeXml`` when it is refused.

    Only ``200`` propstats are read (a server answers ``404`` for the properties it has not), and
    a resource is a directory when its ``resourcetype`` holds ``collection`` (or, as XrdHttp and
    LCGDM also say, ``iscollection`` is 1).
    """
    if len(body) > max_bytes:
        raise UnsafeXml(f"multistatus answer of {len(body)} bytes exceeds {max_bytes}")
    if _DOCTYPE.search(body):
        raise UnsafeXml("multistatus answer declares a DOCTYPE or entities: refused")
    try:
        root = ET.fromstring(body)
    except ET.ParseError as exc:
        raise UnsafeXml(f"multistatus answer is not well-formed XML: {exc}") from None
    entries: list[DavEntry] = []
    for response in root.iter(f"{_DAV}response"):
        href = response.findtext(f"{_DAV}href")
        if not href:
            continue
        is_dir = False
        size: int | None = None
        quota: int | None = None
        mtime: float | None = None
        for propstat in response.iter(f"{_DAV}propstat"):
            status = propstat.findtext(f"{_DAV}status") or ""
            if " 200 " not in f"{status} ":
                continue
            for prop in propstat.iter(f"{_DAV}prop"):
                rtype = prop.find(f"{_DAV}resourcetype")
                if rtype is not None and rtype.find(f"{_DAV}collection") is not None:
                    is_dir = True
                if (prop.findtext(f"{_DAV}iscollection") or "").strip() == "1":
                    is_dir = True
                size = _int(prop.find(f"{_DAV}getcontentlength")) if size is None else size
                quota = _int(prop.find(f"{_DAV}quota-available-bytes")) if quota is None else quota
                mtime = _date(prop.findtext(f"{_DAV}getlastmodified")) if mtime is None else mtime
        entries.append(DavEntry(unquote(urlsplit(href.strip()).path), is_dir, size, quota, mtime))
    return entries


QUOTA_REQUEST = (
    b'<?xml version="1.0" encoding="utf-8"?>\n'
    b'<D:propfind xmlns:D="DAV:"><D:prop><D:quota-available-bytes/><D:quota-used-bytes/>'
    b"</D:prop></D:propfind>"
)
LIST_REQUEST = (
    b'<?xml version="1.0" encoding="utf-8"?>\n'
    b'<D:propfind xmlns:D="DAV:"><D:prop><D:resourcetype/><D:getcontentlength/>'
    b"<D:getlastmodified/></D:prop></D:propfind>"
)
