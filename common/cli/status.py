"""``spool status`` (one screen: daemons, queues, failures by cause, endpoints) and ``spool queues``.

Both take ``--json`` and ``--watch N`` (refresh every N seconds until Ctrl-C; with ``--json`` one
compact document per line). Unknown figures print as ``?``, never as 0, and what could not be
reached is named under the tables.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any

import typer
from pydantic_core import to_jsonable_python
from rich.console import Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from common.bus.queue_stats import queue_report
from common.cli import app
from common.cli._util import console, print_error, print_json, settings_from
from common.status import gather_status

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
WatchOpt = Annotated[
    float | None,
    typer.Option("--watch", "-w", min=0.5, help="Refresh every N seconds until Ctrl-C.", show_default=False),
]
STATE_STYLE = {"alive": "green", "late": "yellow", "dead": "bold red", "online": "green"}
MAX_FAILURE_LINES = 20


@app.command()
def status(ctx: typer.Context, json_out: JsonOpt = False, watch: WatchOpt = None) -> None:
    """Daemons (alive / late / dead), queues (ready, in flight and who holds it, retrying, dead),
    failures grouped by cause, endpoint states. From the monitor when it runs, else directly."""
    settings = settings_from(ctx)
    _show(lambda: asyncio.run(gather_status(settings)), render_status, json_out, watch, _status_seen)


@app.command()
def queues(ctx: typer.Context, json_out: JsonOpt = False, watch: WatchOpt = None) -> None:
    """Every Spool queue: ready, in flight (and who holds it), retrying per tier, dead."""
    settings = settings_from(ctx)

    def fetch() -> dict[str, Any]:
        return to_jsonable_python(asyncio.run(queue_report(settings)))  # type: ignore[no-any-return]

    _show(fetch, lambda doc: render_queues(doc, detail=True), json_out, watch, _queues_seen)


def _show(
    fetch: Callable[[], dict[str, Any]],
    render: Callable[[dict[str, Any]], RenderableType],
    json_out: bool,
    watch: float | None,
    saw_something: Callable[[dict[str, Any]], bool],
) -> None:
    doc = fetch()
    if watch is None:
        if json_out:
            print_json(doc)
        else:
            console.print(render(doc))
        problem = _problem(doc)
        if problem is not None:
            print_error(problem[1], f"error ({problem[0]})")
        if problem is not None or not saw_something(doc):
            raise typer.Exit(3)  # scripts must not read what could not be seen as "all empty"
        return
    try:
        if json_out:
            while True:
                sys.stdout.write(json.dumps(doc) + "\n")
                sys.stdout.flush()
                time.sleep(watch)
                doc = fetch()
        with Live(render(doc), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(watch)
                live.update(render(fetch()), refresh=True)
    except KeyboardInterrupt:
        return


def _queues_seen(doc: dict[str, Any]) -> bool:
    return bool(doc["amqp"]["reachable"] or doc["management"]["reachable"])


def _problem(doc: dict[str, Any]) -> tuple[str, str] | None:
    """(reason, one line) when the broker - the heart of the system - cannot be read: down, or
    none of Spool's queues declared yet. What else answered is still shown above that line."""
    queues = doc["queues"] if isinstance(doc.get("queues"), dict) else doc  # status, or queues
    if not queues["amqp"]["reachable"]:
        return "broker_unreachable", queues["amqp"]["error"] or "RabbitMQ did not answer"
    missing = _undeclared(doc)
    return None if missing is None else ("queue_missing", missing)


def _undeclared(doc: dict[str, Any]) -> str | None:
    """The broker answered but none of Spool's work queues exist (no daemon ever started with this
    ``queue_prefix``): said in one line, and a non-zero exit, rather than a table of ``?``."""
    queues = doc["queues"] if isinstance(doc.get("queues"), dict) else doc  # status, or queues
    if not queues["amqp"]["reachable"] or any(q["ready"] is not None for q in queues["queues"]):
        return None
    names = ", ".join(q["queue"] for q in queues["queues"])
    return f"no Spool queue exists yet ({names}): queues are declared when a daemon first starts"


def _status_seen(doc: dict[str, Any]) -> bool:
    return doc["source"] == "monitor" or _queues_seen(doc["queues"]) or doc["endpoints"] is not None


# --- rendering (of the JSON documents, so monitor and direct answers render alike) ----------------
def render_status(doc: dict[str, Any]) -> RenderableType:
    parts: list[RenderableType] = []
    mon = doc["monitor"]
    if doc["source"] == "monitor" and mon.get("role") == "standby":  # daemons/monitor/role.py
        saved = mon.get("state_saved_at")
        active = mon.get("active_instance") or "none"
        parts.append(Text(
            f"standby monitor on {mon['host']} (pid {mon['pid']}; active: {active}),"
            f" showing the state saved {'at ' + _hms(saved) if saved else 'never'}", "yellow",
        ))  # fmt: skip
    elif doc["source"] == "monitor":
        parts.append(Text(f"monitor on {mon['host']} (pid {mon['pid']}), as of {_hms(doc['time'])}", "dim"))
    else:
        parts.append(Text("monitor not running: showing what the broker and the catalogue tell", "yellow"))
    parts.append(_daemons(doc["daemons"]))
    parts += [_stalled(s) for s in doc.get("stalled") or []]
    if doc.get("throughput"):
        parts.append(_throughput(doc["throughput"][-1]))
    parts.append(render_queues(doc["queues"], detail=False, missing=False))
    parts.append(_failures(doc["failures"]))
    parts.append(_endpoints(doc["endpoints"]))
    if doc.get("malformed") and doc["malformed"]["total"]:
        by = ", ".join(f"{r} {n}" for r, n in doc["malformed"]["by_reason"].items())
        parts.append(Text(f"malformed messages ignored by the monitor: {doc['malformed']['total']} ({by})"))
    parts += [Text(f"missing: {m}", "yellow") for m in doc["missing"]]
    return Group(*parts)


def render_queues(doc: dict[str, Any], *, detail: bool, missing: bool = True) -> RenderableType:
    table = Table(title="queues", title_justify="left")
    for col in ("daemon", "ready", "in flight", "held by", "retrying", "dead", "consumers"):
        table.add_column(col, justify="left" if col in ("daemon", "held by") else "right")
    if detail:
        table.add_column("retry tiers (waiting)")
    for q in doc["queues"]:
        row = [
            q["daemon"], _n(q["ready"]), _n(q["in_flight"]), _holders(q["holders"]), _n(q["retrying"]),
            Text(_n(q["dead"]), "bold red" if q["dead"] else ""), _n(q["consumers"]),
        ]  # fmt: skip
        if detail:
            row.append(" ".join(f"{t['delay']:g}s:{_n(t['waiting'])}" for t in q["retry"]))
        table.add_row(*row)
    if not missing:
        return table
    return Group(table, *(Text(f"missing: {m}", "yellow") for m in doc["missing"]))


def _daemons(daemons: list[dict[str, Any]] | None) -> RenderableType:
    if daemons is None:
        return Text("daemons: unknown without the monitor", "dim")
    table = Table(title="daemons", title_justify="left")
    for col in (
        "daemon",
        "state",
        "host",
        "pid",
        "version",
        "heartbeat",
        "in flight",
        "processed",
        "retried",
    ):
        table.add_column(col)
    table.add_column("dead")
    for d in daemons:
        table.add_row(
            d["daemon"], Text(d["state"], STATE_STYLE.get(d["state"], "")), d["host"], str(d["pid"]),
            d["version"], f"{d['age']:.0f}s ago", str(d["in_flight"]), str(d["processed"]),
            str(d["retried"]), str(d["dead_lettered"]),
        )  # fmt: skip
    if not daemons:
        table.add_row("(no heartbeat seen yet)", *[""] * 9)
    return table


def _throughput(point: dict[str, Any]) -> RenderableType:
    """The latest rates (the dashboard draws them over time)."""
    rates = [f"bus {point['messages']:g} msg/s"]
    rates += [f"{daemon} {rate:g}/s" for daemon, rate in point["processed"].items()]
    return Text(f"throughput over the last {point['seconds']:.0f} s: " + ", ".join(rates))


def _stalled(s: dict[str, Any]) -> RenderableType:
    """Work in progress past its limit (the monitor's ``stalled``): who holds it, since when."""
    many = f" ({s['items']} items)" if s.get("items", 1) > 1 else ""
    return Text(
        f"stalled {s['kind']}{many}: held by {s['holder']} since {_hms(s['since'])}: {s['what']}", "red"
    )


def _failures(groups: list[dict[str, Any]] | None) -> RenderableType:
    if groups is None:
        return Text("failures: unknown", "dim")
    table = Table(title="failures by cause", title_justify="left")
    # Count, daemon and reason never wrap: they are what an operator greps for and retries by.
    for col in ("count", "daemon", "reason"):
        table.add_column(col, justify="right" if col == "count" else "left", no_wrap=True)
    for col in ("endpoint", "first", "last", "example", "error"):
        table.add_column(col, overflow="fold", ratio=3 if col == "error" else 1)
    for g in groups[:MAX_FAILURE_LINES]:
        reason = g["reason"] + (f" ({g['state']})" if g.get("state") == "retrying" else "")
        table.add_row(
            str(g["count"]), g["daemon"], Text(reason, "red"), g["endpoint"] or "", _hms(g["first"]),
            _hms(g["last"]), g["example"] or "", (g["error"] or "")[:160],
        )  # fmt: skip
    if len(groups) > MAX_FAILURE_LINES:
        table.caption = f"{len(groups) - MAX_FAILURE_LINES} more causes: spool status --json"
    if not groups:
        table.add_row("0", "", "no failures", *[""] * 5)
    return table


def _endpoints(endpoints: list[dict[str, Any]] | None) -> RenderableType:
    if endpoints is None:
        return Text("endpoints: unknown", "dim")
    table = Table("endpoint", "kind", "state", "root", title="endpoints", title_justify="left")
    if not endpoints:
        table.add_row("(none registered)", "", "", "")
    for e in endpoints:
        style = STATE_STYLE.get(e["state"], "yellow")
        table.add_row(e["name"], e["kind"], Text(e["state"], style), e["root"])
    return table


def _holders(holders: list[dict[str, Any]] | None) -> str:
    if holders is None:
        return "?"
    out = []
    for h in holders:
        who = h["daemon"] or h["connection"]
        out.append(f"{who}@{h['host'] or '?'} ({h['unacked']}{'*' if h['shared'] else ''})")
    return ", ".join(out)


def _n(value: int | None) -> str:
    return "?" if value is None else str(value)


def _hms(iso: str) -> str:
    """Times in tables: the time of day when it is today (UTC), else the date too."""
    when = datetime.fromisoformat(iso)
    today = datetime.now(when.tzinfo).date()
    return when.strftime("%H:%M:%S" if when.date() == today else "%Y-%m-%d %H:%M")
