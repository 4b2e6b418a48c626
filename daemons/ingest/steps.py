"""Pure decisions of ingest: where a file is, what it is called, whether it is new.

No I/O beyond resolving paths, so each rule is unit-tested directly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from common.config import DatasetSettings
from common.errors import Permanent
from common.storage.paths import inside, real_dir, relative_to

Verdict = Literal["new", "duplicate", "conflict"]


@dataclass(frozen=True)
class Located:
    area: str
    source: str  # resolved absolute path of the file in its landing area (a string: per file)
    relpath: str  # path relative to the landing area: the default logical name


def locate(path: str, landing_areas: Mapping[str, Path]) -> Located:
    """Find the landing area holding ``path``; escaping every area is ``path_outside_area``.

    Symlinks are resolved first, so a link inside an area pointing outside it is refused too.
    """
    for area, root in landing_areas.items():
        root_text = os.fspath(root)
        try:
            source = inside(root_text, path)
        except Permanent:
            continue
        return Located(area, source, relative_to(source, real_dir(root_text)))
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
            "bad_dataset_name", f"dataset {dataset!r} matches none of the naming patterns {rules.patterns}"
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
