"""``spool instances``: which daemon processes run where, their leases, and the work they hold
that has been in progress too long.

Read from the catalogue (``common.catalogue.instances``): every daemon process registers there with
a lease it renews, so this answers for every node sharing the catalogue, whether or not a
monitor runs. An instance whose lease ran out is dead as far as the others are concerned (its
work is settled by a survivor); its row stays an hour, so the list shows who died and when.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Annotated, Any

import typer
from rich.table import Table

from common.catalogue import Catalogue
from common.catalogue.sql import utcnow
from common.cli import app
from common.cli._util import console, print_json, settings_from, styled
from common.cli.query import JsonOpt

# Work in progress longer than this is listed as stalled (the monitor has its own limits).
DEFAULT_STALL = 1800.0


def _ago(then: datetime, now: datetime) -> str:
    s = int((now - then).total_seconds())
    sign, s = ("in ", -s) if s < 0 else ("", s)
    text = f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
    return f"{sign}{text}" if sign else f"{text} ago"


@app.command("instances")
def instances(
    ctx: typer.Context,
    daemon: Annotated[str | None, typer.Option("--daemon", help="Only this daemon's instances.")] = None,
    stall: Annotated[
        float, typer.Option("--stall", help="Seconds after which held work is listed as stalled.", min=1)
    ] = DEFAULT_STALL,
    json_out: JsonOpt = False,
) -> None:
    """Every daemon instance on every node (lease alive or run out), and work held too long."""
    settings = settings_from(ctx)

    async def go() -> tuple[list[Any], list[Any]]:
        async with await Catalogue.open(settings.catalogue.url) as c:
            rows = await c.instances.listing(daemon)
            limits = dict.fromkeys(("tape_write", "tape_read", "recall"), stall)
            return rows, await c.instances.stalled_work(limits, utcnow())

    rows, stalled = asyncio.run(go())
    now = utcnow()
    if json_out:
        print_json({
            "instances": [
                {"id": i.id, "daemon": i.daemon, "node": i.node, "pid": i.pid,
                 "started": i.started.isoformat(), "renewed": i.renewed.isoformat(),
                 "expires": i.expires.isoformat(), "alive": i.expires > now}
                for i in rows
            ],
            "stalled": [
                {"kind": w.kind, "holder": w.holder, "items": w.items, "since": w.since.isoformat(),
                 "example": w.example}
                for w in stalled
            ],
        })  # fmt: skip
        return
    if not rows:
        console.print("no daemon instance has registered with this catalogue")
    else:
        table = Table("daemon", "node", "pid", "started", "lease", "instance")
        for i in rows:
            lease = (
                f"renewed {_ago(i.renewed, now)}"
                if i.expires > now
                else styled(f"ran out {_ago(i.expires, now)}", "red")
            )
            table.add_row(i.daemon, i.node, str(i.pid), _ago(i.started, now), lease, i.id)
        console.print(table)
    for w in stalled:
        who = w.holder or "nobody"
        console.print(
            styled(
                f"stalled {w.kind}: {w.items} held by {who} since {_ago(w.since, now)} (e.g. {w.example})",
                "red",
            )
        )
