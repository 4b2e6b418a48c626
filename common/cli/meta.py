"""``spool meta set|unset|fields``: metadata of files and datasets after ingest.

``set`` and ``unset`` apply one change directly on the catalogue, as the ingest daemon applies a
``metadata.set`` event (``common.catalogue.metadata``): bounded by the same message model, recorded
in the history (``spool trace NAME``, ``spool trace --dataset NAME``) with daemon ``cli``.

A value is typed as ``spool find`` reads one: a number when it reads as one, ``true`` / ``false``
a boolean, ``null`` no value, anything else a string; quoting (``run='012'``) forces a string.
"""

from __future__ import annotations

from typing import Annotated

import typer
from pydantic import ValidationError
from rich.table import Table

from common.catalogue import Catalogue, check_metadata
from common.catalogue.filters import as_number
from common.catalogue.metadata import IdConflict, MetadataChange, TooMuchMetadata, UnknownTarget
from common.cli import app
from common.cli._util import UserError, console, print_json, settings_from
from common.cli.query import with_catalogue
from common.messages import MetadataSet, MetaValue, new_id

meta_app = typer.Typer(
    help="Metadata of files and datasets: set, unset, the fields in use.", no_args_is_help=True
)
app.add_typer(meta_app, name="meta")

DatasetOpt = Annotated[bool, typer.Option("--dataset", "-d", help="TARGET is a dataset, not a file.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def typed(text: str) -> MetaValue:
    """A value as written on the command line (see the module docstring)."""
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    if text in ("true", "false"):
        return text == "true"
    if text == "null":
        return None
    num = as_number(text)
    return text if num is None else num


def assignments(items: list[str]) -> dict[str, MetaValue]:
    out: dict[str, MetaValue] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise UserError(f"expected key=value, got {item[:80]!r}")
        if key in out:
            raise UserError(f"{key!r} given twice")
        out[key] = typed(value)
    return out


def _apply(
    ctx: typer.Context, target: str, dataset: bool, set_: dict[str, MetaValue], unset: list[str]
) -> None:
    try:
        check_metadata(set_)  # one line naming the key (the model's union would name each type it tried)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    try:
        # The event's own model: the same bounds (keys, lengths, 64-bit integers, count, size).
        msg = MetadataSet(
            file=None if dataset else target, dataset=target if dataset else None, set=set_, unset=unset
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise UserError(f"{where + ': ' if where else ''}{first['msg']}") from None
    change = MetadataChange(
        id=new_id(), scope="dataset" if dataset else "file", target=target, set=dict(msg.set),
        unset=list(msg.unset), daemon="cli", source="spool-cli",
    )  # fmt: skip

    async def work(c: Catalogue) -> str:
        return await c.metadata.apply(change)

    try:
        with_catalogue(settings_from(ctx), work)
    except (UnknownTarget, IdConflict, TooMuchMetadata) as exc:
        raise UserError(str(exc.args[0])) from None
    what = "dataset" if dataset else "file"
    done = [f"{k}={v}" for k, v in change.set.items()] + [f"-{k}" for k in change.unset]
    console.print(f"{what} {target}: {', '.join(done)}")


@meta_app.command("set")
def set_(
    ctx: typer.Context,
    target: Annotated[str, typer.Argument(help="A file's logical name (a dataset's with --dataset).")],
    values: Annotated[list[str], typer.Argument(help="key=value ... (run=12345 quality=good note='007')")],
    dataset: DatasetOpt = False,
) -> None:
    """Set metadata of a file or a dataset (recorded in its history)."""
    _apply(ctx, target, dataset, assignments(values), [])


@meta_app.command("unset")
def unset(
    ctx: typer.Context,
    target: Annotated[str, typer.Argument(help="A file's logical name (a dataset's with --dataset).")],
    keys: Annotated[list[str], typer.Argument(help="The keys to remove.")],
    dataset: DatasetOpt = False,
) -> None:
    """Remove metadata keys of a file or a dataset (recorded in its history)."""
    if len(set(keys)) != len(keys):
        raise UserError("a key is given twice")
    _apply(ctx, target, dataset, {}, keys)


@meta_app.command("fields")
def fields(ctx: typer.Context, json_out: JsonOpt = False) -> None:
    """The metadata keys in use, per scope (file, dataset) and value type, with their counts."""
    rows = with_catalogue(settings_from(ctx), lambda c: c.metadata.fields())
    if json_out:
        print_json(rows)
        return
    table = Table("scope", "key", "type", "count")
    for r in rows:
        table.add_row(r.scope, r.key, r.type, str(r.count))
    console.print(table)
