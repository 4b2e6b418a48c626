"""Catalogue questions: ``spool show``, ``ls``, ``find``, ``datasets``, ``trace``. ``--json`` on each."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.table import Table
from rich.text import Text

from common.catalogue import Catalogue, parse_filter
from common.catalogue.datasets import STATES as DATASET_STATES
from common.cli import app
from common.cli._util import UserError, console, fmt_bytes, print_json, settings_from, styled
from common.config import Settings

T = TypeVar("T")
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def with_catalogue(settings: Settings, work: Callable[[Catalogue], Awaitable[T]]) -> T:
    async def go() -> T:
        catalogue = await Catalogue.open(settings.catalogue.url)
        try:
            return await work(catalogue)
        finally:
            await catalogue.close()

    return asyncio.run(go())


@app.command()
def show(ctx: typer.Context, name: str, json_out: JsonOpt = False) -> None:
    """Everything about one file: size, checksum, metadata, provenance, replicas, last error."""
    view = with_catalogue(settings_from(ctx), lambda c: c.queries.show_file(name))
    if view is None:
        raise UserError(f"no file named {name!r} in the catalogue")
    if json_out:
        print_json(view)
        return
    console.print(styled(view.name, "bold"))
    console.print(f"  dataset   {view.dataset}")
    console.print(f"  size      {view.size} ({fmt_bytes(view.size)})")
    console.print(f"  adler32   {view.adler32}")
    console.print(f"  sha256    {view.sha256 or '(not recorded)'}")
    console.print(f"  created   {view.created.isoformat()}")
    if view.metadata:
        console.print("  metadata  " + ", ".join(f"{k}={v}" for k, v in sorted(view.metadata.items())))
    if view.parents:
        console.print("  parents   " + ", ".join(view.parents))
    if view.children:
        console.print("  children  " + ", ".join(view.children))
    table = Table(
        "storage", "kind", "state", "pfn", "tape", "updated", title="replicas", title_justify="left"
    )
    for r in view.replicas:
        tape = f"{r.cartridge}#{r.fseq}" if r.cartridge else ""
        if r.member_offset is not None:  # a member of an aggregate: at this byte of the tape file
            tape += f"@{r.member_offset}"
        table.add_row(r.storage, r.kind, r.state, r.pfn, tape, r.updated.isoformat(timespec="seconds"))
    console.print(table)
    if view.last_error is not None and view.last_error.reason:
        e = view.last_error
        console.print(
            Text.assemble(
                "  last error ", (str(e.reason), "red"), f" ({e.state}, {e.attempts} attempts): {e.error}"
            )
        )


@app.command("ls")
def ls(
    ctx: typer.Context,
    prefix: Annotated[str | None, typer.Argument(help="List logical names starting with this.")] = None,
    dataset: Annotated[str | None, typer.Option("--dataset", "-d")] = None,
    limit: Annotated[int, typer.Option(help="At most this many.")] = 1000,
    dirs: Annotated[
        bool, typer.Option("--dirs", help="PREFIX is a directory: its entries, with files and bytes.")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """List the files of a dataset, or under a name prefix; with --dirs, a directory's entries."""
    if dirs:
        if dataset is not None:
            raise UserError("--dirs lists a directory of logical names, not a dataset")
        if limit < 1:
            raise UserError("--limit must be at least 1")
        from common.cli.namespace import list_directory  # it imports this module

        list_directory(ctx, prefix or "", limit, json_out)
        return
    files = with_catalogue(
        settings_from(ctx), lambda c: c.queries.list_files(dataset=dataset, prefix=prefix, limit=limit)
    )
    _print_files(files, json_out)


@app.command()
def find(
    ctx: typer.Context,
    filters: Annotated[list[str], typer.Argument(help="key=value, key>=10, key<5, key!=x, key=a,b,c (in).")],
    dataset: Annotated[str | None, typer.Option("--dataset", "-d")] = None,
    limit: Annotated[int, typer.Option(help="At most this many.")] = 1000,
    json_out: JsonOpt = False,
) -> None:
    """Find files by their metadata and their dataset's (all conditions must hold).

    A key matches the file's own value, else its dataset's; dataset.KEY only the dataset's,
    file.KEY only the file's. --json lists each file with its metadata, its dataset's and its
    replicas."""
    try:
        parsed = [parse_filter(f) for f in filters]
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if json_out:
        found = with_catalogue(
            settings_from(ctx), lambda c: c.queries.find_detailed(parsed, dataset=dataset, limit=limit)
        )
        print_json(found)
        return
    files = with_catalogue(
        settings_from(ctx), lambda c: c.queries.find_files(parsed, dataset=dataset, limit=limit)
    )
    _print_files(files, json_out)


@app.command()
def datasets(
    ctx: typer.Context,
    state: Annotated[
        str | None,
        typer.Option(
            help="Only datasets in this state: open, closed, complete, archived, deleting, deleted."
        ),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Datasets with their state, file counts and volume."""
    if state is not None and state not in DATASET_STATES:
        raise UserError(f"--state is one of {', '.join(DATASET_STATES)}, not {state!r}")
    rows = with_catalogue(settings_from(ctx), lambda c: c.queries.list_datasets(state=state))
    if json_out:
        print_json(rows)
        return
    table = Table("dataset", "state", "files", "bytes", "created")
    for d in rows:
        table.add_row(
            d.name, d.state, str(d.files), fmt_bytes(d.bytes), d.created.isoformat(timespec="seconds")
        )
    console.print(table)


@app.command()
def lineage(
    ctx: typer.Context,
    name: str,
    direction: Annotated[str, typer.Option(help="ancestors | descendants")] = "ancestors",
    json_out: JsonOpt = False,
) -> None:
    """Provenance: every ancestor (or descendant) of a file, with its depth."""
    if direction not in ("ancestors", "descendants"):
        raise UserError("--direction is ancestors or descendants")

    async def work(c: Catalogue) -> Any:
        return await (c.queries.ancestors(name) if direction == "ancestors" else c.queries.descendants(name))

    rows = with_catalogue(settings_from(ctx), work)
    if json_out:
        print_json(rows)
        return
    for r in rows:
        mark = "" if r.registered else "  (not registered)"
        console.print(f"{'  ' * r.depth}{r.name}{mark}")


@app.command()
def trace(
    ctx: typer.Context,
    name: str,
    dataset: Annotated[bool, typer.Option("--dataset", "-d", help="NAME is a dataset: its history.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """The life of a file (or, with --dataset, of a dataset): every recorded event, oldest first."""
    if dataset:
        _trace_dataset(ctx, name, json_out)
        return
    rows = with_catalogue(settings_from(ctx), lambda c: c.queries.history(name))
    if not rows:
        raise UserError(f"no history for {name!r}")
    if json_out:
        print_json(rows)
        return
    table = Table("time", "daemon", "event", "outcome", "attempt", "storage", "detail")
    for e in rows:
        detail = ", ".join(f"{k}={v}" for k, v in (e.detail or {}).items())
        table.add_row(
            e.time.isoformat(timespec="seconds"),
            e.daemon,
            e.type,
            e.outcome,
            str(e.attempt),
            e.storage or "",
            detail,
        )
    console.print(table)


def _trace_dataset(ctx: typer.Context, name: str, json_out: bool) -> None:
    rows = with_catalogue(settings_from(ctx), lambda c: c.queries.dataset_history(name))
    if not rows:
        raise UserError(f"no history for dataset {name!r}")
    if json_out:
        print_json(rows)
        return
    table = Table("time", "daemon", "event", "outcome", "detail")
    for e in rows:
        detail = ", ".join(f"{k}={v}" for k, v in (e["detail"] or {}).items())
        table.add_row(e["time"].isoformat(timespec="seconds"), e["daemon"], e["type"], e["outcome"], detail)
    console.print(table)


def _print_files(files: list[Any], json_out: bool) -> None:
    if json_out:
        print_json(files)
        return
    table = Table("name", "dataset", "size", "adler32", "created")
    for f in files:
        table.add_row(
            f.name, f.dataset, fmt_bytes(f.size), f.adler32, f.created.isoformat(timespec="seconds")
        )
    console.print(table)
    console.print(f"{len(files)} file(s)")
