"""From a physical file name (a path or URL on an endpoint) back to the ``pfn`` the catalogue keeps.

A replica's ``pfn`` is its path *relative to the endpoint's root* (``common.storage``'s
``pfn_of``; for a remote endpoint the path below the base of its ``root://`` / ``davs://`` URL).
Outside systems (a storage dump, a DIRAC ``getLFNForPFN`` call, a consistency check) hold the
full thing instead: ``/srv/disk1/lst1/run1/f.fits``, ``file:///srv/...``,
``root://eos.example.org:1094//eos/spool/lst1/run1/f.fits``. This module only takes the root off,
lexically, the way the backends put it on: no file system or server is asked. A path that is not
below the root, or that has a ``..`` component, is not this endpoint's (``None``).
"""

from __future__ import annotations

from urllib.parse import urlsplit

REMOTE_SCHEMES = frozenset({"root", "xroot", "davs", "https", "http", "dav"})


def _clean(path: str) -> list[str] | None:
    """The components of ``path`` ("." and empty ones dropped); None when one is ``..``."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    return None if ".." in parts or any("\x00" in p for p in parts) else parts


def _below(path: str, base: str) -> str | None:
    """``path`` relative to ``base``, compared component by component; None when not strictly below."""
    inner, outer = _clean(path), _clean(base)
    if inner is None or outer is None or len(inner) <= len(outer) or inner[: len(outer)] != outer:
        return None
    return "/".join(inner[len(outer) :])


def _same_server(a: str, b: str) -> bool:
    """Scheme families and host:port equal (``root`` and ``xroot`` are one protocol; ``davs`` and
    ``https`` too). Host names compare without case, as DNS does."""
    family = {"xroot": "root", "davs": "https", "dav": "http"}
    x, y = urlsplit(a), urlsplit(b)
    return family.get(x.scheme, x.scheme) == family.get(y.scheme, y.scheme) and (
        (x.hostname or "").lower(),
        x.port,
    ) == ((y.hostname or "").lower(), y.port)


def relative_pfn(root: str, physical: str) -> str | None:
    """The catalogue ``pfn`` of ``physical`` on the endpoint whose catalogue ``root`` is given
    (a directory for posix and tape endpoints, a URL for remote ones), or None when ``physical``
    does not lie below that root. A relative ``physical`` is taken as a ``pfn`` already."""
    if not physical or "\x00" in physical:
        return None
    scheme = urlsplit(physical).scheme if "://" in physical else ""
    root_scheme = urlsplit(root).scheme if "://" in root else ""
    if scheme == "file":
        physical, scheme = urlsplit(physical).path, ""
    if scheme:
        if scheme not in REMOTE_SCHEMES or not root_scheme or not _same_server(physical, root):
            return None
        return _below(urlsplit(physical).path, urlsplit(root).path)
    if not physical.startswith("/"):
        parts = _clean(physical)
        return "/".join(parts) if parts else None
    base = urlsplit(root).path if root_scheme else root
    return _below(physical, base)
