"""What every CLI command shares: settings from the global options, output as JSON or tables."""

from __future__ import annotations

import dataclasses
import json
import sys
from datetime import date, datetime
from enum import Enum
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.text import Text

from common.config import Settings, load_settings

# Markup off: what the CLI prints is mostly data (error messages, names, reasons from the bus and
# the catalogue), and Rich would read ``[bold]`` in it as markup - dropping it, or failing on a
# stray ``[/]``. Styling is given explicitly instead (``Text``, ``styled``, ``style=``).
# Not wrapped at a width when the output is not a terminal: a script reading a path or a count
# from a line must not find it split where an 80-column default fell (tables keep their layout).
console = Console(markup=False, soft_wrap=not sys.stdout.isatty())
err_console = Console(stderr=True, markup=False, soft_wrap=not sys.stderr.isatty())


def styled(text: object, style: str) -> Text:
    """``text`` (data, printed as it is) in ``style``; join pieces with ``Text.assemble``."""
    return Text(str(text), style)


def one_line(text: object) -> str:
    """A message on one line: an error is one line on stderr, whatever the message held."""
    return " | ".join(part.strip() for part in str(text).splitlines() if part.strip())


def print_error(message: object, label: str = "error") -> None:
    """The one line a failed command leaves on stderr: ``error: ...`` (label red), no markup."""
    err_console.print(
        Text.assemble((f"{label}:", "red"), " ", one_line(message)), highlight=False, soft_wrap=True
    )


class UserError(Exception):
    """A mistake of the operator (unknown file, bad argument): one line, exit code 1, no traceback."""


def settings_from(ctx: typer.Context) -> Settings:
    obj = ctx.ensure_object(dict)
    if "settings" not in obj:
        obj["settings"] = load_settings(obj.get("config"))
    return obj["settings"]  # type: ignore[no-any-return]


def jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [jsonable(v) for v in value]
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(jsonable(value), indent=2, sort_keys=False) + "\n")


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
