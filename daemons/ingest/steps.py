"""Pure decisions of ingest: where a file is, what it is called, whether it is new.

No I/O (a landing area's own path is resolved once, the operator's), so each rule is unit-tested
directly. Where a file is is decided on the name as written (``locate``); whether that name leads
to a regular file in the area without a symlink is decided by the kernel when the file is opened
(``common.storage.confined``), never here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from common.config import DatasetSettings
from common.errors import Permanent
from common.storage.paths import inside, real_root, relative_to

Verdict = Literal["new", "duplicate", "conflict"]


@dataclass(frozen=True)
class Located:
    area: str
    # The area's real path joined with ``relpath`` (a string: per file). Opened with no symlink
    # followed at any component (``confined.open_regular``), so it cannot lead out of the area.
    source: str
    relpath: str  # path relative to the landing area: the default logical name


def locate(path: str, landing_areas: Mapping[str, Path]) -> Located:
    """Find the landing area holding ``path`` lexically; escaping every area is
    ``path_outside_area``.

    An absolute path is matched against each area's configured path and its real path; a relative
    one is taken in the first area. ``..`` components are refused. Symlinks are not resolved (no
    cache of resolved names to go stale): the copy opens the file with none followed, so a link
    anywhere below the area, pointing out of it or not, is refused at that moment.
    """
    for area, root in landing_areas.items():
        root_text = os.fspath(root)
        try:
            source = inside(root_text, path)
        except Permanent:
            continue
        return Located(area, source, relative_to(source, real_root(root_text)))
    raise Permanent(
        "path_outside_area", f"{path} is not inside any landing area ({', '.join(landing_areas)})"
    )


def logical_name(requested: str | None, located: Located) -> str:
    """The file's logical name: as given, else its path relative to the landing area.

    A given name must be a clean relative path: it becomes the replica's path on disk endpoints.
    """
    name = requested if requested is not None else located.relpath
    parts = name.split("/")
    bad_part = any(p in ("..", ".") for p in parts) or "" in parts[:-1]
    if not name or name.startswith("/") or bad_part or "\x00" in name:
        raise Permanent("invalid_name", f"logical name {name!r} must be a relative path without '..'")
    if name.endswith("/") or located.relpath == "" or located.relpath == ".":
        raise Permanent("not_a_file", f"{located.source} is a directory, not a file")
    return name


def check_dataset(dataset: str, rules: DatasetSettings) -> None:
    if not rules.matches(dataset):
        raise Permanent(
            "bad_dataset_name",
            f"dataset {dataset!r} matches none of the naming patterns {rules.patterns + rules.nomenclature}",
        )


def compare_existing(
    size: int | None, adler32: str | None, existing_size: int, existing_adler32: str
) -> Verdict:
    """Same name already registered: same content is a duplicate, other content a conflict.

    ``adler32`` may be unknown (the event did not carry one); the caller then passes the checksum it
    computed of the source.
    """
    if size is not None and size != existing_size:
        return "conflict"
    if adler32 is not None and adler32 != existing_adler32:
        return "conflict"
    return "duplicate"
