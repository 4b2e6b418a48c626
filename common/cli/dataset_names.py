"""``spool dataset name``: a valid dataset name built from the fields of the configured
nomenclature (``[datasets] nomenclature``, ``common.nomenclature``).

Fields are given as options named after them, ``--telescope lst1 --run 12345`` (or
``--run=12345``), since they are the site's own: Typer cannot declare them, so the command takes
its extra arguments and reads them as ``--field value`` pairs. ``--pattern N`` picks the N-th
nomenclature (from 1) when several are configured; with one, it is that one. ``--json`` prints
the name with its fields as they would be stored.
"""

from __future__ import annotations

from typing import Annotated

import typer

from common.cli._util import UserError, console, print_json, settings_from
from common.cli.dataset_group import dataset_app
from common.nomenclature import FieldError, Nomenclature


def field_options(args: list[str]) -> dict[str, str]:
    """``--key value`` / ``--key=value`` pairs; ``UserError`` on anything else or a repeated key."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise UserError(f"expected --<field> <value>, got {arg[:80]!r}")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise UserError(f"--{key} needs a value")
            value = args[i + 1]
            i += 1
        key = key.replace("-", "_")
        if key in out:
            raise UserError(f"--{key} given twice")
        out[key] = value
        i += 1
    return out


def _pick(patterns: list[Nomenclature], number: int | None) -> Nomenclature:
    if not patterns:
        raise UserError("no nomenclature is configured ([datasets] nomenclature in the config file)")
    if number is None:
        if len(patterns) > 1:
            listed = "; ".join(f"{i}: {p.text}" for i, p in enumerate(patterns, 1))
            raise UserError(f"several nomenclatures are configured, pick one with --pattern N ({listed})")
        return patterns[0]
    if not 1 <= number <= len(patterns):
        raise UserError(f"--pattern {number}: there are {len(patterns)} nomenclature(s), numbered from 1")
    return patterns[number - 1]


@dataset_app.command(
    "name", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
)  # fmt: skip
def name(
    ctx: typer.Context,
    pattern: Annotated[int | None, typer.Option("--pattern", help="Which nomenclature (from 1).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Build a valid dataset name from its fields: spool dataset name --telescope lst1 --run 12345 ..."""
    settings = settings_from(ctx)
    chosen = _pick(settings.datasets.nomenclatures(), pattern)
    given = field_options(list(ctx.args))
    try:
        built = chosen.name_from(given)
    except FieldError as exc:
        raise UserError(str(exc)) from None
    if json_out:
        print_json({"name": built, "pattern": chosen.text, "fields": chosen.parse(built)})
        return
    console.print(built)
