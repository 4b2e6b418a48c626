"""``spool ingest``: announce files as ready, with the same CloudEvents an instrument would send."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from common.bus.connection import connect
from common.cli import app
from common.cli._util import UserError, console, print_json, settings_from
from common.config import Settings
from common.messages import FileReady, MetaValue, new_id
from common.storage.checksum import adler32_of_file


def parse_meta(pairs: list[str]) -> dict[str, MetaValue]:
    """``k=v`` pairs; values that read as int / float / true / false are typed, others stay strings."""
    meta: dict[str, MetaValue] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--meta expects key=value, got {pair!r}")
        meta[key] = _typed(raw)
    return meta


def _typed(raw: str) -> MetaValue:
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    for cast in (int, float):
        try:
            return cast(raw)  # type: ignore[no-any-return]
        except ValueError:
            pass
    return raw


def expand(paths: list[Path]) -> Iterator[Path]:
    """Regular files only: a FIFO or a device named on the command line would block the checksum
    (or never end), and is no file to archive."""
    for p in paths:
        if p.is_dir():
            yield from sorted(q for q in p.rglob("*") if q.is_file())
        elif p.is_file():
            yield p
        elif p.exists():
            raise UserError(f"{p} is not a regular file")
        else:
            raise UserError(f"{p} does not exist")


def files_to_announce(paths: list[Path], settings: Settings) -> list[Path]:
    """The files ``paths`` name (directories taken recursively), all inside landing areas.

    Checked before any file is read and before anything is published, so ``spool ingest /etc``
    puts nothing on the bus (no size, no checksum of a file outside): each argument first, so a
    directory outside is never walked, then each file found (a symlink inside a landing area to a
    file outside is outside). Inside means both lexically (the path as given, ``..`` resolved as
    text) and really (``realpath``: symlinked directories followed) under the same landing area.
    An external publisher bound to areas (``landing_publishers``) is held to its own areas, as
    ingest would hold it. One refusal names the count and the first path: one line, exit 1.
    """
    areas = [(name, Path(os.path.abspath(root)), Path(os.path.realpath(root)))
             for name, root in settings.landing_areas.items()]  # fmt: skip
    user = settings.bus.user
    foreign = _foreign_areas(settings, user)

    def refuse(outside: list[Path]) -> UserError:
        known = ", ".join(f"{name} = {lexical}" for name, lexical, _ in areas) or "none configured"
        return UserError(
            f"{len(outside)} path(s) outside every landing area, e.g. {outside[0]} (landing areas: {known}); "
            "nothing was published"
        )

    for p in paths:
        if not p.exists():
            raise UserError(f"{p} does not exist")
        area = _area_of(p, areas)
        if area is None:
            raise refuse([p])
        if area in foreign:
            raise UserError(
                f"{p} is in landing area {area!r}, where broker user {user!r} may not announce "
                f"(landing_publishers.{area}); nothing was published"
            )
    found = [Path(os.path.abspath(f)) for f in expand(paths)]
    outside = [f for f in found if _area_of(f, areas) in (None, *foreign)]
    if outside:
        raise refuse(outside)
    return found


def _area_of(path: Path, areas: list[tuple[str, Path, Path]]) -> str | None:
    lexical, real = Path(os.path.abspath(path)), Path(os.path.realpath(path))
    for name, area_lexical, area_real in areas:
        if lexical.is_relative_to(area_lexical) and real.is_relative_to(area_real):
            return name
    return None


def _foreign_areas(settings: Settings, user: str) -> set[str]:
    """Landing areas bound to other publishers than ``user`` (none for Spool's own users)."""
    if user in settings.bus.trusted_users():
        return set()
    return {area for area, users in settings.landing_publishers.items() if user not in users}


def file_ready_event(
    path: Path, dataset: str, *, checksum: bool, meta: dict[str, MetaValue], parents: list[str], source: str
) -> dict[str, Any]:
    from common.codec import to_cloudevent

    absolute = Path(os.path.abspath(path))
    msg = FileReady(
        id=new_id(),
        source=source,
        path=str(absolute),
        dataset=dataset,
        size=absolute.stat().st_size,
        adler32=adler32_of_file(Path(os.path.realpath(absolute)))
        if checksum
        else None,  # area checked before
        metadata=meta,
        parents=parents,
    )
    return to_cloudevent(msg)


async def publish_events(settings: Settings, events: list[dict[str, Any]], *, quiet: bool = False) -> int:
    from common.bus.external import declare_if_allowed, publish_cloudevents

    connection = await connect(settings.bus, name="spool-cli")
    try:
        await declare_if_allowed(connection, settings)
        user = settings.bus.user
        if quiet:
            return await publish_cloudevents(connection, settings.bus.exchange, events, user_id=user)
        with Progress(
            TextColumn("publishing"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        ) as bar:
            task = bar.add_task("publish", total=len(events))
            return await publish_cloudevents(
                connection, settings.bus.exchange, events, user_id=user,
                on_sent=lambda n: bar.update(task, completed=n),
            )  # fmt: skip
    finally:
        await connection.close()


@app.command()
def ingest(
    ctx: typer.Context,
    paths: Annotated[list[Path], typer.Argument(help="Files, or directories (taken recursively).")],
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="Dataset the files belong to.")],
    meta: Annotated[list[str], typer.Option("--meta", "-m", help="Metadata key=value (repeatable).")] = [],  # noqa: B006
    parent: Annotated[
        list[str], typer.Option("--parent", help="Logical name of a parent (repeatable).")
    ] = [],  # noqa: B006
    checksum: Annotated[bool, typer.Option(help="Compute adler32 here so ingest verifies it.")] = True,
    json_out: Annotated[bool, typer.Option("--json", help="Print the published event ids as JSON.")] = False,
) -> None:
    """Publish file.ready for each file, exactly as an external system would."""
    settings = settings_from(ctx)
    metadata = parse_meta(meta)
    source = f"spool-cli@{socket.gethostname()}:{os.getpid()}"
    events = [
        file_ready_event(p, dataset, checksum=checksum, meta=metadata, parents=parent, source=source)
        for p in files_to_announce(paths, settings)
    ]
    if not events:
        raise UserError("no files to ingest")
    sent = asyncio.run(publish_events(settings, events, quiet=json_out))
    if json_out:
        print_json(
            {"published": sent, "events": [{"id": e["id"], "path": e["data"]["path"]} for e in events]}
        )
    else:
        console.print(f"published {sent} file.ready event(s) for dataset {dataset}")
