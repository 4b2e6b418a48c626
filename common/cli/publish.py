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
from common.bus.topology import declare_topology
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
    for p in paths:
        if p.is_dir():
            yield from sorted(q for q in p.rglob("*") if q.is_file())
        elif p.exists():
            yield p
        else:
            raise UserError(f"{p} does not exist")


def file_ready_event(
    path: Path, dataset: str, *, checksum: bool, meta: dict[str, MetaValue], parents: list[str], source: str
) -> dict[str, Any]:
    from common.codec import to_cloudevent

    absolute = path.absolute()
    msg = FileReady(
        id=new_id(),
        source=source,
        path=str(absolute),
        dataset=dataset,
        size=absolute.stat().st_size,
        adler32=adler32_of_file(absolute) if checksum else None,
        metadata=meta,
        parents=parents,
    )
    return to_cloudevent(msg)


async def publish_events(settings: Settings, events: list[dict[str, Any]], *, quiet: bool = False) -> int:
    from common.bus.external import publish_cloudevents

    connection = await connect(settings.bus, name="spool-cli")
    try:
        channel = await connection.channel()
        await declare_topology(channel, settings)
        await channel.close()
        if quiet:
            return await publish_cloudevents(connection, settings.bus.exchange, events)
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
                connection, settings.bus.exchange, events, on_sent=lambda n: bar.update(task, completed=n)
            )
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
        for p in expand(paths)
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
