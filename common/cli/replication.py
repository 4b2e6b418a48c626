"""``spool rse ...`` (storage endpoints) and ``spool rule ...`` (replication rules)."""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from common.catalogue import Catalogue
from common.catalogue.policy import PolicyError, Rule, check_rule
from common.cli import app
from common.cli._util import UserError, console, fmt_bytes, print_json, settings_from, styled
from common.cli.namespace import rse_dump
from common.cli.query import JsonOpt, with_catalogue
from common.config import StorageEndpoint
from common.errors import SpoolError
from common.placement import endpoint_table
from common.storage import open_storage

rse_app = typer.Typer(help="Storage endpoints: state, health, usage.", no_args_is_help=True)
rule_app = typer.Typer(help="Replication rules: where copies of which files must live.", no_args_is_help=True)
app.add_typer(rse_app, name="rse")
app.add_typer(rule_app, name="rule")
rse_app.command("dump")(rse_dump)

STATES = ("online", "readonly", "down")
# Delete failures that are the endpoint's, not one copy's: ``rse evict`` stops at the first.
ENDPOINT_DOWN = frozenset({"endpoint_unavailable", "auth_failed", "transfer_timeout"})
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw]?)")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``12h``, ``30d``, ``2w`` -> seconds."""
    m = _DURATION_RE.fullmatch(text.strip())
    if not m or float(m.group(1)) <= 0:
        raise UserError(f"cannot read the duration {text!r} (examples: 3600, 90m, 12h, 30d)")
    return float(m.group(1)) * _UNIT[m.group(2)]


def _since(t: datetime | None) -> str:
    if t is None:
        return ""
    seconds = int((datetime.now(UTC) - t).total_seconds())
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
        if seconds >= 3600
        else f"{seconds // 60}m{seconds % 60:02d}s"
    )


# --- rse -----------------------------------------------------------------------------------------
async def _endpoints(c: Catalogue) -> list[dict[str, Any]]:
    usage = {u.name: u for u in await c.endpoints.usage()}
    out = []
    for e in await c.endpoints.all():
        u = usage.get(e.name)
        out.append(
            {
                "name": e.name, "kind": e.kind, "backend": e.backend, "root": e.root,
                "attributes": e.attributes, "state": e.state, "health": e.health,
                "health_reason": e.health_reason, "health_since": e.health_since, "updated": e.updated,
                "replicas": u.replicas if u else {}, "bytes_available": u.bytes_available if u else 0,
            }
        )  # fmt: skip
    return out


@rse_app.command("list")
def rse_list(ctx: typer.Context, json_out: JsonOpt = False) -> None:
    """Every endpoint: operator state, breaker health, copies by state, volume."""
    rows = with_catalogue(settings_from(ctx), _endpoints)
    if json_out:
        print_json(rows)
        return
    table = Table("name", "kind", "state", "health", "available", "queued", "waiting", "bad/failed", "volume")
    for r in rows:
        reps = r["replicas"]
        health = r["health"]
        if health != "ok":
            health = Text.assemble((health, "red"), f" {_since(r['health_since'])}")
        state = r["state"] if r["state"] == "online" else styled(r["state"], "yellow")
        table.add_row(
            r["name"], r["kind"], state, health, str(reps.get("available", 0)), str(reps.get("queued", 0)),
            str(reps.get("waiting", 0)), str(reps.get("bad", 0) + reps.get("failed", 0)),
            fmt_bytes(r["bytes_available"]),
        )  # fmt: skip
    console.print(table)
    for r in rows:
        if r["health"] != "ok" and r["health_reason"]:
            console.print(f"  {r['name']} paused: {r['health_reason']}")


@rse_app.command("show")
def rse_show(ctx: typer.Context, name: str, json_out: JsonOpt = False) -> None:
    """One endpoint in full."""
    rows = [r for r in with_catalogue(settings_from(ctx), _endpoints) if r["name"] == name]
    if not rows:
        raise UserError(f"no storage endpoint named {name!r}")
    row = rows[0]
    if json_out:
        print_json(row)
        return
    for key, value in row.items():
        if key == "replicas":
            value = ", ".join(f"{k} {v}" for k, v in sorted(value.items())) or "none"
        elif key == "bytes_available":
            value = fmt_bytes(value)
        elif isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        console.print(f"  {key:<14} {'' if value is None else value}")


@rse_app.command("set")
def rse_set(
    ctx: typer.Context,
    name: str,
    state: Annotated[str, typer.Option("--state", help="online | readonly | down")],
) -> None:
    """Set an endpoint's state. Copies to an endpoint that is not online wait (no attempt is used)
    and resume when it is online again."""
    if state not in STATES:
        raise UserError(f"--state must be one of {', '.join(STATES)}")

    async def work(c: Catalogue) -> None:
        try:
            await c.endpoints.set_state(name, state)  # type: ignore[arg-type]
        except KeyError:
            raise UserError(f"no storage endpoint named {name!r}") from None

    with_catalogue(settings_from(ctx), work)
    console.print(f"{name}: {state}")


# --- rule ----------------------------------------------------------------------------------------
@rule_app.command("add")
def rule_add(
    ctx: typer.Context,
    endpoints: Annotated[str, typer.Option("--endpoints", "-e", help="A name or e.g. 'site=PIC&kind=disk'.")],
    datasets: Annotated[
        str | None, typer.Option("--datasets", "-d", help="Dataset regex (full match).")
    ] = None,
    meta: Annotated[
        list[str] | None, typer.Option("--meta", "-m", help="Metadata filter, e.g. run>=100.")
    ] = None,
    copies: Annotated[int, typer.Option(help="How many copies among those endpoints.")] = 1,
    lifetime: Annotated[str | None, typer.Option(help="Keep the copies this long: 3600, 12h, 30d.")] = None,
    priority: Annotated[int, typer.Option(help="0-9, higher first.")] = 3,
    rule_id: Annotated[str | None, typer.Option("--id", help="Default: r-<random>.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Add a rule. Files already catalogued get their copies too (the replicator evaluates the
    rule within a few seconds); new files get them at ingest."""
    settings = settings_from(ctx)
    try:
        rule = Rule(
            id=rule_id or f"r-{uuid.uuid4().hex[:8]}", endpoints=endpoints, copies=copies, datasets=datasets,
            metadata=tuple(meta or ()), priority=priority,
            lifetime=parse_duration(lifetime) if lifetime else None, origin="cli",
        )  # fmt: skip
        chosen = check_rule(rule, endpoint_table(settings))
    except PolicyError as exc:
        raise UserError(str(exc)) from None

    async def work(c: Catalogue) -> None:
        try:
            await c.replication.add_rule(rule)
        except KeyError as exc:
            raise UserError(str(exc.args[0])) from None

    with_catalogue(settings, work)
    if json_out:
        print_json({**rule.describe(), "endpoints_matched": chosen})
        return
    console.print(f"rule {rule.id} added: {copies} cop{'y' if copies == 1 else 'ies'} on {', '.join(chosen)}")


def _rule_row(view: Any) -> dict[str, Any]:
    extra = {"created": view.created, "replicas": view.replicas, "declared_by": view.declared_by}
    return {**view.rule.describe(), **extra}


def _origin(r: dict[str, Any]) -> str:
    """``cli``, or ``config`` and the nodes whose files declare the rule."""
    nodes = r["declared_by"] if r["origin"] == "config" else []
    return f"config: {', '.join(nodes)}" if nodes else str(r["origin"])


@rule_app.command("list")
def rule_list(ctx: typer.Context, json_out: JsonOpt = False) -> None:
    """Every rule with the state of the copies it holds."""
    rows = [_rule_row(v) for v in with_catalogue(settings_from(ctx), lambda c: c.replication.rule_views())]
    if json_out:
        print_json(rows)
        return
    table = Table("id", "selects", "endpoints", "copies", "lifetime", "prio", "state", "copies by state")
    for r in rows:
        selects = " ".join(filter(None, [r["datasets"] and f"datasets~{r['datasets']}", *r["metadata"]]))
        reps = ", ".join(f"{k} {v}" for k, v in sorted(r["replicas"].items())) or "-"
        life = "" if r["lifetime"] is None else f"{r['lifetime']:g}s"
        table.add_row(
            r["id"], selects, r["endpoints"], str(r["copies"]), life, str(r["priority"]),
            f"{r['state']} ({_origin(r)})", reps,
        )  # fmt: skip
    console.print(table)


@rule_app.command("show")
def rule_show(ctx: typer.Context, rule_id: str, json_out: JsonOpt = False) -> None:
    """One rule in full."""
    rows = [_rule_row(v) for v in with_catalogue(settings_from(ctx), lambda c: c.replication.rule_views())]
    found = [r for r in rows if r["id"] == rule_id]
    if not found:
        raise UserError(f"no rule with id {rule_id!r}")
    if json_out:
        print_json(found[0])
        return
    for key, value in found[0].items():
        console.print(f"  {key:<10} {value}")


@rule_app.command("remove")
def rule_remove(
    ctx: typer.Context,
    rule_id: str,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Remove a rule. Its copies become eligible for deletion (the reaper never deletes a file's
    last copy, nor a copy another rule holds); copies not made yet are cancelled."""
    settings = settings_from(ctx)
    if not yes:
        typer.confirm(f"remove rule {rule_id} and release its copies?", abort=True)

    async def work(c: Catalogue) -> int:
        try:
            return await c.replication.remove_rule(rule_id)
        except KeyError:
            raise UserError(f"no rule with id {rule_id!r}") from None

    released = with_catalogue(settings, work)
    console.print(f"rule {rule_id} removed; {released} cop{'y' if released == 1 else 'ies'} released")


@rse_app.command("evict")
def rse_evict(
    ctx: typer.Context,
    name: str,
    names: Annotated[list[str] | None, typer.Argument(help="Logical names (or use --dataset).")] = None,
    dataset: Annotated[str | None, typer.Option("--dataset", "-d")] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Delete copies on an endpoint to free space (e.g. a disk buffer once the data is on tape).

    Never a file's last available copy, never a copy a replication rule holds: those are kept and
    listed. A file can be brought back with ``spool recall``. Works for any disk endpoint, mounted
    or remote (XRootD, WebDAV); a copy the endpoint refuses to delete is listed as failed (exit
    code 1) and left ``deleting``: the replicator's reaper deletes it later."""
    settings = settings_from(ctx)
    endpoint = settings.storage.get(name)
    if endpoint is None or endpoint.kind != "disk":
        raise UserError(f"{name!r} is not a configured disk endpoint")
    if not names and dataset is None:
        raise UserError("name files, or give --dataset")
    if not yes:
        what = f"dataset {dataset}" if dataset else f"{len(names or [])} file(s)"
        typer.confirm(f"delete the copies of {what} on {name} that have another copy?", abort=True)

    result = with_catalogue(
        settings, lambda c: evict_copies(c, name, endpoint, dataset=dataset, names=names or ())
    )
    if json_out:
        print_json(result)
        if result.get("failed"):
            raise typer.Exit(1)
        return
    console.print(f"{len(result['evicted'])} cop(ies) deleted from {name}")
    if result["kept"]:
        console.print(
            f"{len(result['kept'])} kept (the last copy, or held by a rule): "
            + ", ".join(result["kept"][:10])
        )
    for failed in result.get("failed", [])[:10]:
        console.print(
            Text.assemble(("not deleted", "red"), f" {failed['name']}: {failed['reason']}: {failed['error']}")
        )
    if result.get("failed"):
        raise typer.Exit(1)


async def evict_copies(
    c: Catalogue,
    name: str,
    endpoint: StorageEndpoint,
    *,
    dataset: str | None = None,
    names: Sequence[str] = (),
) -> dict[str, Any]:
    """Delete the copies on disk endpoint ``name`` that another available copy makes redundant and
    no rule holds (claimed one by one with the same check as the reaper), through the endpoint's
    backend (posix, xrootd, https).

    A delete the endpoint refuses is listed under ``failed`` (the key is there only then) and
    its copy stays ``deleting``, as the reaper leaves its own: the reaper retries it. A failure of
    the endpoint itself (unreachable, credentials refused, timed out) stops the eviction there:
    the copies not reached are left alone rather than each waiting for the same timeout."""
    storage = open_storage(name, endpoint)
    evicted: list[str] = []
    kept: list[str] = []
    failed: list[dict[str, str]] = []
    try:
        for item in await c.replication.copies_on(name, dataset=dataset, names=names):
            if not await c.replication.begin_evict(item.replica_id):
                kept.append(item.name)
                continue
            try:
                await storage.delete(item.pfn)
            except SpoolError as err:
                failed.append({"name": item.name, "reason": err.reason, "error": err.message})
                if err.reason in ENDPOINT_DOWN:
                    break
                continue
            await c.replication.finish_delete(item, by="operator", why="evicted")
            evicted.append(item.name)
    finally:
        await storage.aclose()
    result: dict[str, Any] = {"evicted": evicted, "kept": kept}
    if failed:
        result["failed"] = failed
    return result
