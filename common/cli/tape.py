"""``spool tape list`` and ``spool drive list``: what the tape library holds and what its drives do.

Both read the library itself (its state is shared by every process through its directory; opening
it is cheap and only ever repairs what dead processes left half done), and ``tape list`` sets the
catalogue's count of files per cartridge beside the library's own: the two agree unless something
is amiss. A library not created yet (no tape daemon has run) is simply not listed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import typer
from rich.table import Table
from rich.text import Text

from common.catalogue import Catalogue
from common.cli import app
from common.cli._util import UserError, console, fmt_bytes, print_json, settings_from, styled
from common.cli.query import JsonOpt
from common.config import LogSettings, Settings
from common.logging import configure_logging
from common.tape import TapeLibrary, open_library
from common.tape.statelog import library_exists

T = TypeVar("T")

tape_app = typer.Typer(help="Tape cartridges: pool, state, fill, files.", no_args_is_help=True)
drive_app = typer.Typer(
    help="Tape drives: what each one does, with which cartridge, for whom.", no_args_is_help=True
)
app.add_typer(tape_app, name="tape")
app.add_typer(drive_app, name="drive")

LibraryOpt = Annotated[str | None, typer.Option("--library", help="Only this library (default: all).")]


def _each_library(
    settings: Settings, only: str | None, work: Callable[[str, TapeLibrary], Awaitable[list[T]]]
) -> list[T]:
    """``work(name, library)`` for every configured library that exists on disk, concatenated."""
    names = [n for n in settings.tape_libraries if only is None or n == only]
    if only is not None and not names:
        known = ", ".join(settings.tape_libraries) or "none"
        raise UserError(f"no tape library named {only!r} (configured: {known})")

    # The library logs through structlog (to stdout unless configured): keep stdout for the answer,
    # and only what is worth an operator's attention (repairs of a dead process's leftovers).
    configure_logging(LogSettings(level="warning", format=settings.log.format))

    async def go() -> list[T]:
        out: list[T] = []
        for name in names:
            config = settings.tape_libraries[name]
            if not library_exists(config.root):
                continue  # never opened by a daemon: nothing to show, and nothing to create here
            library = await open_library(config)
            try:
                out += await work(name, library)
            finally:
                await library.close()
        return out

    return asyncio.run(go())


def _catalogued(settings: Settings) -> dict[str, int]:
    async def go() -> dict[str, int]:
        async with await Catalogue.open(settings.catalogue.url) as c:
            return await c.tape.files_per_cartridge()

    return asyncio.run(go())


def _age(seconds: float) -> str:
    s = max(0, int(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


@tape_app.command("list")
def tape_list(
    ctx: typer.Context,
    library: LibraryOpt = None,
    pool: Annotated[str | None, typer.Option("--pool", help="Only this pool.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Every cartridge: pool, state, fill, files on it (library) and recorded (catalogue)."""
    settings = settings_from(ctx)

    async def cartridges(name: str, lib: TapeLibrary) -> list[dict[str, Any]]:
        return [
            {
                "library": name, "vid": c.vid, "pool": c.pool, "state": c.state,
                "used_bytes": c.used_bytes, "capacity": c.capacity,
                "fill": round(100.0 * c.used_bytes / c.capacity, 1) if c.capacity else 0.0,
                "files": c.files, "drive": c.drive, "mounts": c.mounts,
            }
            for c in await lib.list_cartridges(pool)
        ]  # fmt: skip

    rows = _each_library(settings, library, cartridges)
    recorded = _catalogued(settings) if rows else {}
    for row in rows:
        row["catalogued"] = recorded.get(row["vid"], 0)
    if json_out:
        print_json(rows)
        return
    if not rows:
        console.print("no cartridges (no tape library configured or created yet)")
        return
    several = len({r["library"] for r in rows}) > 1  # the library column only when it tells apart
    table = Table(*(["library"] if several else []), "vid", "pool", "state", "used / capacity", "fill",
                  "files", "catalogued", "drive")  # fmt: skip
    for r in rows:
        state = r["state"] if r["state"] not in ("suspect", "disabled") else styled(r["state"], "red")
        table.add_row(
            *([r["library"]] if several else []), r["vid"], r["pool"] or "-", state,
            f"{fmt_bytes(r['used_bytes'])} / {fmt_bytes(r['capacity'])}", f"{r['fill']:.1f}%",
            str(r["files"]), str(r["catalogued"]), r["drive"] or "",
        )  # fmt: skip
    console.print(table)


@drive_app.command("list")
def drive_list(ctx: typer.Context, library: LibraryOpt = None, json_out: JsonOpt = False) -> None:
    """Every drive: idle / mounting / writing / reading / broken ..., its cartridge, the request it
    serves, since when."""
    settings = settings_from(ctx)

    async def drives(name: str, lib: TapeLibrary) -> list[dict[str, Any]]:
        return [
            {
                "library": name, "drive": d.drive_id, "status": d.status, "cartridge": d.vid,
                "request": d.request, "claimed": d.claim is not None, "broken": d.broken,
                "since": datetime.fromtimestamp(d.since, UTC) if d.since else None,
            }
            for d in await lib.list_drives()
        ]  # fmt: skip

    rows = _each_library(settings, library, drives)
    if json_out:
        print_json(rows)
        return
    if not rows:
        console.print("no drives (no tape library configured or created yet)")
        return
    now = time.time()
    several = len({r["library"] for r in rows}) > 1
    table = Table(*(["library"] if several else []), "drive", "status", "cartridge", "request", "since")
    for r in rows:
        status: str | Text = r["status"] if r["status"] != "broken" else styled("broken", "red")
        if r["claimed"] and r["status"] == "idle":
            status = "idle (claimed)"
        since = r["since"]
        table.add_row(
            *([r["library"]] if several else []), r["drive"], status, r["cartridge"] or "",
            r["request"] or "",
            f"{since.isoformat(timespec='seconds')} ({_age(now - since.timestamp())} ago)" if since else "",
        )  # fmt: skip
    console.print(table)
