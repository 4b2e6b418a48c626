"""Query parameters of the HTTP query API, parsed strictly: anyone holding the token may send
anything, so every value is bounded, typed without coercion, and a bad one is a ``BadParameter``
naming it (a 400 with a JSON body), never an exception from deeper down (a 500).

Page cursors are opaque to clients: base64url of a small JSON array whose first item names the
listing it belongs to, so a cursor of one listing handed to another is refused, not misread. They
are not signed: a forged cursor can only ask for a page the caller may read anyway, and its items
are type-checked like any other parameter.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable, Iterable
from typing import Any

from multidict import MultiMapping

from common.catalogue.filters import MAX_FILTER_LENGTH, MetaFilter, parse_filter
from common.catalogue.schema import MAX_NAME

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
MAX_NAMES = 100  # names in one replicas / exists question
MAX_FILTERS = 32
MAX_PFN = 4096
MAX_CURSOR = 2048
MAX_DEPTH = 100
_DIGITS = re.compile(r"[0-9]{1,7}")


class BadParameter(ValueError):
    """A query parameter the API refuses: ``status`` 400, or 404 for a name the catalogue lacks."""

    def __init__(self, parameter: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.parameter = parameter
        self.message = message
        self.status = status


class Query:
    """The query string of one request; reading a parameter marks it known, ``done`` refuses the
    rest (a misspelt ``limt`` must not silently fall back to the default)."""

    def __init__(self, params: MultiMapping[str]) -> None:
        self._params = params
        self._read: set[str] = set()

    def done(self) -> None:
        for key in self._params:
            if key not in self._read:
                raise BadParameter(key[:64], f"unknown parameter {key[:64]!r}")

    def all(self, key: str, *, most: int) -> list[str]:
        self._read.add(key)
        values = self._params.getall(key, [])
        if len(values) > most:
            raise BadParameter(key, f"at most {most} values of {key!r}")
        return list(values)

    def one(self, key: str) -> str | None:
        values = self.all(key, most=1)
        return values[0] if values else None

    def text(self, key: str, *, most: int, least: int = 1, default: str | None = None) -> str | None:
        value = self.one(key)
        if value is None:
            return default
        return checked_text(key, value, least=least, most=most)

    def required(self, key: str, *, most: int, least: int = 1) -> str:
        value = self.text(key, most=most, least=least)
        if value is None:
            raise BadParameter(key, f"{key!r} is required")
        return value

    def integer(self, key: str, *, default: int, least: int, most: int) -> int:
        value = self.one(key)
        if value is None:
            return default
        if not _DIGITS.fullmatch(value) or not least <= int(value) <= most:
            raise BadParameter(key, f"{key!r} must be a whole number from {least} to {most}")
        return int(value)

    def limit(self) -> int:
        return self.integer("limit", default=DEFAULT_LIMIT, least=1, most=MAX_LIMIT)

    def names(self, key: str = "name") -> list[str]:
        values = self.all(key, most=MAX_NAMES)
        if not values:
            raise BadParameter(key, f"{key!r} is required (1 to {MAX_NAMES} of them)")
        return [checked_text(key, v, least=1, most=MAX_NAME) for v in values]

    def filters(self) -> list[MetaFilter]:
        out = []
        for raw in self.all("filter", most=MAX_FILTERS):
            if len(raw) > MAX_FILTER_LENGTH or "\x00" in raw:
                raise BadParameter("filter", f"a filter is at most {MAX_FILTER_LENGTH} characters, no NUL")
            try:
                out.append(parse_filter(raw))
            except ValueError as exc:
                raise BadParameter("filter", str(exc)) from None
        return out

    def cursor(self, listing: str, check: Callable[[list[Any]], bool]) -> list[Any] | None:
        """The key items of the ``next`` cursor of ``listing`` (None on a first page); ``check``
        says whether the items have the listing's types."""
        raw = self.one("next")
        if raw is None:
            return None
        items = decode_cursor(raw)
        if items is None or not items or items[0] != listing or not check(items[1:]):
            raise BadParameter("next", "not a cursor of this listing (pass back the 'next' of the last page)")
        return items[1:]


def checked_text(key: str, value: str, *, least: int, most: int) -> str:
    if not least <= len(value) <= most:
        raise BadParameter(key, f"{key!r} must be {least} to {most} characters")
    if "\x00" in value:
        raise BadParameter(key, f"{key!r} must not contain a NUL character")
    return value


def encode_cursor(listing: str, key: Iterable[Any]) -> str:
    raw = json.dumps([listing, *key], separators=(",", ":"), ensure_ascii=False).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(text: str) -> list[Any] | None:
    if len(text) > MAX_CURSOR:
        return None
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
        items = json.loads(raw.decode(), parse_constant=_refuse)
    except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError):
        return None
    return items if isinstance(items, list) else None


def _refuse(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def is_text(x: Any, most: int = MAX_NAME) -> bool:
    return isinstance(x, str) and 0 < len(x) <= most


def is_count(x: Any) -> bool:
    return type(x) is int and 0 <= x < 2**63
