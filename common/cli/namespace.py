"""The namespace questions on the command line: ``spool ls --dirs``, ``spool du``, ``spool lfn``,
``spool rse dump`` (the catalogue's ``namespace`` repository; docs/dirac.md maps each to DIRAC)."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.table import Table

from common.catalogue import Catalogue
from common.catalogue.namespace import Entry, UnknownEndpoint
from common.cli import app
from common.cli._util import UserError, console, fmt_bytes, print_json, settings_from
from common.cli.query import JsonOpt, with_catalogue

# Rows per read transaction of a dump: large enough that a million replicas is 200 short reads,
# small enough that a page is a few MB in memory.
DUMP_PAGE = 5000


def list_directory(ctx: typer.Context, path: str, limit: int, json_out: bool) -> None:
    """``spool ls --dirs [PATH]`` (called by ``ls`` in ``common.cli.query``)."""
    entries: list[Entry] = with_catalogue(
        settings_from(ctx), lambda c: c.namespace.list_directory(path, limit=limit)
    )
    if json_out:
        print_json(entries)
        return
    table = Table("name", "files", "bytes")
    for e in entries:
        shown = e.name + "/" if e.kind == "directory" else e.name
        table.add_row(shown, str(e.files), fmt_bytes(e.bytes))
    console.print(table)
    console.print(
        f"{len(entries)} entries" + (f" (the first {limit}: --limit)" if len(entries) == limit else "")
    )


@app.command("du")
def du(
    ctx: typer.Context,
    path: Annotated[str, typer.Argument(help="A directory of logical names ('' or /: everything).")] = "",
    json_out: JsonOpt = False,
) -> None:
    """Files and bytes under a directory, and their copies per endpoint and state."""
    size = with_catalogue(settings_from(ctx), lambda c: c.namespace.directory_size(path))
    if json_out:
        print_json(size)
        return
    console.print(f"{size.path or '/'}: {size.files} file(s), {fmt_bytes(size.bytes)}")
    table = Table("endpoint", "state", "files", "bytes")
    for share in size.replicas:
        table.add_row(share.endpoint, share.state, str(share.files), fmt_bytes(share.bytes))
    console.print(table)


@app.command("lfn")
def lfn(
    ctx: typer.Context,
    endpoint: Annotated[str, typer.Argument(help="The storage endpoint (spool rse list).")],
    pfn: Annotated[str, typer.Argument(help="A path or URL on it, or its path below the endpoint's root.")],
    json_out: JsonOpt = False,
) -> None:
    """The logical name of a physical file on an endpoint."""

    async def work(c: Catalogue) -> str | None:
        try:
            return await c.namespace.lfn_for_pfn(endpoint, pfn)
        except UnknownEndpoint:
            raise UserError(f"no endpoint named {endpoint!r} in the catalogue") from None

    name = with_catalogue(settings_from(ctx), work)
    if name is None:
        raise UserError(f"no replica at {pfn!r} on {endpoint}")
    if json_out:
        print_json({"endpoint": endpoint, "pfn": pfn, "name": name})
    else:
        sys.stdout.write(name + "\n")


def rse_dump(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The endpoint.")],
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """Every replica on an endpoint, one line each: name, pfn, size, adler32, state (tab-separated).

    Streamed a page at a time (constant memory, whatever the endpoint holds), in no particular
    order: sort it to compare with a listing of the storage."""

    async def work(c: Catalogue) -> None:
        out = sys.stdout
        try:
            async for row in c.namespace.dump(name, page=DUMP_PAGE):
                if json_out:
                    fields = {"name": row.name, "pfn": row.pfn, "size": row.size, "adler32": row.adler32,
                              "state": row.state}  # fmt: skip
                    out.write(json.dumps(fields, ensure_ascii=False) + "\n")
                else:
                    out.write(f"{row.name}\t{row.pfn}\t{row.size}\t{row.adler32}\t{row.state}\n")
        except UnknownEndpoint:
            raise UserError(f"no endpoint named {name!r} in the catalogue") from None

    try:
        with_catalogue(settings_from(ctx), work)
        sys.stdout.flush()
    except BrokenPipeError:  # `spool rse dump X | head`: the reader has what it wanted
        sys.stderr.close()
