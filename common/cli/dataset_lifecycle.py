"""``spool dataset close | show | delete``: a dataset's lifecycle (``common.catalogue.datasets``).

The CLI only changes the catalogue: closing is one update; deleting marks the dataset and its
copies, and the replicator (which reaches the endpoints) removes the bytes. ``--json`` on each.
"""

from __future__ import annotations

import dataclasses
import getpass
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from common.catalogue import Catalogue
from common.catalogue.dataset_view import DatasetView
from common.catalogue.datasets import DeleteRequest
from common.catalogue.sql import utcnow
from common.cli._util import UserError, console, fmt_bytes, print_json, settings_from, styled
from common.cli.dataset_group import dataset_app
from common.cli.query import JsonOpt, with_catalogue
from common.manifest.release import manifest_on_close


def _who() -> str:
    try:
        return f"cli:{getpass.getuser()}"[:255]
    except (KeyError, OSError):  # no name for this uid (a container)
        return "cli"


@dataset_app.command("close")
def close(ctx: typer.Context, name: str, json_out: JsonOpt = False) -> None:
    """Close a dataset: no new file is accepted into it; it completes once its copies are made."""
    settings = settings_from(ctx)

    async def close_it(c: Catalogue) -> tuple[str, Path | None]:
        outcome = await c.datasets.close(name, _who(), utcnow())
        # The close that changed the state writes the release manifest where a key is configured.
        manifest = await manifest_on_close(c, name, settings) if outcome == "closed" else None
        return outcome, manifest

    outcome, manifest = with_catalogue(settings, close_it)
    if outcome == "unknown":
        raise UserError(f"no dataset named {name!r} in the catalogue")
    if json_out:
        print_json({"dataset": name, "outcome": outcome, "manifest": str(manifest) if manifest else None})
        return
    said = {"closed": "closed", "already": "was already closed", "deleted": "is deleted"}[outcome]
    console.print(f"{name} {said}" + (f"; release manifest {manifest}" if manifest else ""))


@dataset_app.command("show")
def show(
    ctx: typer.Context,
    name: str,
    wanted: Annotated[
        bool, typer.Option("--wanted", help="Also count the copies the rules want per endpoint (slower).")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """A dataset's state, files, bytes, copies per endpoint by state, and what is missing, and why."""
    view = with_catalogue(settings_from(ctx), lambda c: c.datasets.show(name, utcnow(), wanted=wanted))
    if view is None:
        raise UserError(f"no dataset named {name!r} in the catalogue")
    if json_out:
        print_json(view)
        return
    _print_view(view)


def _print_view(v: DatasetView) -> None:
    console.print(styled(v.name, "bold"))
    console.print(f"  state     {v.state}")
    console.print(f"  files     {v.files} ({fmt_bytes(v.bytes)})")
    stamps = [
        ("created", v.created, None), ("last file", v.last_file, None),
        ("closed", v.closed_at, v.closed_by), ("completed", v.completed_at, None),
        ("archived", v.archived_at, None), ("deleted", v.deleted_at, v.deleted_by),
    ]  # fmt: skip
    for label, when, who in stamps:
        if when is not None:
            console.print(
                f"  {label:<9} {when.isoformat(timespec='seconds')}" + (f" by {who}" if who else "")
            )
    if v.without_copy:
        console.print(Text.assemble("  ", (f"{v.without_copy} file(s) without any available copy", "red")))
    copies = Table("storage", "kind", "state", "copies", "bytes", title="copies", title_justify="left")
    for c in v.copies:
        copies.add_row(c.storage, c.kind, c.state, str(c.copies), fmt_bytes(c.bytes))
    console.print(copies)
    if v.wanted:
        wanted = Table(
            "storage",
            "kind",
            "wanted",
            "missing",
            "missing by state",
            title="wanted by rules",
            title_justify="left",
        )
        for w in v.wanted:
            by_state = ", ".join(f"{st} {n}" for st, n in sorted(w.missing_by_state.items()))
            wanted.add_row(w.storage, w.kind, str(w.files), str(w.missing), by_state)
        console.print(wanted)
    for m in v.missing:
        why = f"{m.reason}: {m.error}" if m.reason else "no error recorded"
        console.print(
            Text.assemble(
                "  missing ", (m.storage, "bold"), f" {m.name} ({m.state}) ", (why, "red" if m.reason else "")
            )
        )


@dataset_app.command("delete")
def delete(
    ctx: typer.Context,
    name: str,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Delete even while a rule without lifetime holds the dataset.")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Delete every copy of a dataset's files, on every endpoint (tape copies are marked deleted).

    The catalogue keeps the files and copies as tombstones (``spool trace`` shows their history);
    the replicator removes the bytes. The dataset's name is not reused. Refused while a
    replication rule without lifetime holds the dataset, unless ``--force``."""
    settings = settings_from(ctx)
    if not yes:
        view = with_catalogue(settings, lambda c: c.datasets.show(name, utcnow()))
        if view is None:
            raise UserError(f"no dataset named {name!r} in the catalogue")
        typer.confirm(
            f"delete dataset {name} ({view.files} files, {fmt_bytes(view.bytes)}) and all its copies?",
            abort=True,
        )
    result = with_catalogue(settings, lambda c: c.datasets.request_delete(name, _who(), force, utcnow()))
    if result.outcome == "unknown":
        raise UserError(f"no dataset named {name!r} in the catalogue")
    if result.outcome == "held":
        raise UserError(
            f"dataset {name!r} is held by replication rule(s) without lifetime: {', '.join(result.holders)}"
            " (remove the rule, or --force)"
        )
    if json_out:
        print_json({"dataset": name, **_jsonable(result)})
        return
    if result.outcome == "already":
        console.print(f"{name} is already deleted (or being deleted)")
        return
    console.print(
        f"{name}: deleting {result.files} file(s): {result.disk_copies} disk cop(ies) to be removed by the"
        f" replicator, {result.tape_copies} tape cop(ies) marked deleted"
    )
    if result.holders:
        console.print(f"  forced past rule(s): {', '.join(result.holders)}")


def _jsonable(result: DeleteRequest) -> dict[str, object]:
    return dataclasses.asdict(result)
