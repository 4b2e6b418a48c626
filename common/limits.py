"""The bounds of everything that may arrive from outside: one place, one number per limit.

Why bounds at all: a field without one is an amplifier. One ``recall.request`` of 100,000 names
grew the catalogue by ~95 MB and wrote 60 MB log lines; 2 MB of metadata was copied before it was
refused. Each limit below is far above what an instrument sends and far below what hurts.

Decisions (operator-facing; ``docs/security.md`` lists them):

- a body above ``MAX_BODY_BYTES`` or JSON nested deeper than ``MAX_JSON_DEPTH`` is ``undecodable``
  before it is parsed (``json.loads`` of deep nesting raises ``RecursionError``);
- string lengths are counted in characters where the catalogue column is (identifiers, names,
  datasets), in UTF-8 bytes where the file system is (paths: 4096 bytes, a component 255 bytes);
- control characters (U+0000-U+001F, U+007F) are refused in identifiers, names, datasets, paths and
  metadata keys: they end up in logs, terminals and file names;
- numbers: sizes 0..1 PiB, priorities 0..9, counters 0..2**53, metadata integers in int64, floats
  finite;
- metadata: at most 64 keys, a key 1..128 characters, a string value at most 512 characters, the
  whole at most 16 KiB as JSON;
- lists: ``names`` of a recall / replica request at most 10,000 entries and 1 MiB in all;
  ``parents`` at most 1,000.
"""

from __future__ import annotations

import json
import re
from typing import Any

# --- bodies --------------------------------------------------------------------------------------
MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_JSON_DEPTH = 32

# --- strings (characters unless the name says bytes) ---------------------------------------------
MAX_ID = 256  # message ids, correlation ids, sources, rule ids (the catalogue's String(256))
MAX_NAME = 1024  # a logical file name (the catalogue's files.name)
MAX_DATASET = 255  # a dataset name (datasets.name)
MAX_ENDPOINT = 64  # storage endpoint, library, drive, cartridge names
MAX_REASON = 64  # a reason code (requests.reason)
MAX_TEXT = 4096  # error text and summaries: truncated, never refused (Spool writes them)
MAX_PATH_BYTES = 4096  # PATH_MAX
MAX_COMPONENT_BYTES = 255  # NAME_MAX of every common file system
MAX_TIMESTAMP = 64  # an ISO 8601 timestamp as text

# --- numbers -------------------------------------------------------------------------------------
MAX_SIZE = 2**50  # 1 PiB: no instrument writes one file that large
MAX_COUNT = 2**53  # counters (attempts, files, pids, heartbeat totals): exact in a double
MAX_SECONDS = 1e9  # durations in seconds (~31 years)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

# --- lists and maps ------------------------------------------------------------------------------
MAX_NAMES = 10_000  # names of one recall.request / replica.request, copies of one replica.created
MAX_NAMES_BYTES = 1024 * 1024
MAX_PARENTS = 1000
MAX_META_KEYS = 64
MAX_META_KEY = 128  # the catalogue's file_metadata.key
MAX_META_STR = 512  # the catalogue's file_metadata.value_str
MAX_META_BYTES = 16 * 1024
MAX_DETAILS_BYTES = 64 * 1024  # a heartbeat's details
MAX_FAILED_NAMES = MAX_NAMES  # names listed as failed in one recall.completed

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# JSON strings (with their escapes) and brackets: enough to measure nesting without parsing.
_JSON_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


def no_control(text: str) -> str:
    """Refuse control characters and text that is not valid Unicode (lone surrogates from JSON
    ``\\ud800`` escapes cannot be written to a log, a database or a file name)."""
    found = _CONTROL.search(text)
    if found:
        raise ValueError(f"contains a control character (U+{ord(found.group()):04X})")
    utf8_bytes(text)
    return text


def utf8_bytes(text: str) -> int:
    try:
        return len(text.encode())
    except UnicodeEncodeError:
        raise ValueError("is not valid Unicode (a lone surrogate)") from None


def check_path_bytes(text: str, *, max_bytes: int = MAX_PATH_BYTES) -> None:
    """A path's whole length and each component's, in bytes (what the kernel counts)."""
    total = utf8_bytes(text)
    if total > max_bytes:
        raise ValueError(f"is {total} bytes long, at most {max_bytes} allowed")
    for part in text.split("/"):
        if len(part.encode()) > MAX_COMPONENT_BYTES:
            raise ValueError(
                f"has a component of {len(part.encode())} bytes, at most {MAX_COMPONENT_BYTES} allowed"
            )


def too_long_component(text: str) -> str | None:
    """The first path component longer than the file system allows, or None."""
    for part in text.split("/"):
        if len(part.encode(errors="surrogatepass")) > MAX_COMPONENT_BYTES:
            return part
    return None


def json_depth_exceeds(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether JSON ``body`` nests arrays / objects deeper than ``limit``, without parsing it.

    Fast path: fewer brackets than the limit cannot nest deeper. Otherwise one regular-expression
    pass over strings and brackets (C speed; strings are skipped whole, escapes included).
    """
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    depth = 0
    for token in _JSON_TOKEN.finditer(body):
        t = token.group()
        if t in (b"[", b"{"):
            depth += 1
            if depth > limit:
                return True
        elif t in (b"]", b"}"):
            depth -= 1
    return False


def nesting_exceeds(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether decoded data (msgpack) nests lists / maps deeper than ``limit``; iterative, so a
    hostile depth cannot exhaust the interpreter's stack."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        if depth >= limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def json_size(value: Any) -> int:
    """Bytes of ``value`` as compact JSON (the measure of metadata and heartbeat details)."""
    try:
        return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode())
    except UnicodeEncodeError:
        raise ValueError("is not valid Unicode (a lone surrogate)") from None
    except (TypeError, ValueError) as exc:
        raise ValueError(f"is not plain JSON data ({exc})") from None


def truncate(text: str, limit: int = MAX_TEXT) -> str:
    """Shorten text Spool writes itself (errors, summaries), marking the cut."""
    if len(text) <= limit:
        return text
    return text[: limit - 20] + f"... ({len(text) - limit + 20} more)"
