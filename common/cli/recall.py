"""``spool recall ...``: bring files back from tape, follow a recall.

``request`` publishes exactly the ``recall.request`` CloudEvent an external system would; with
``--wait`` it also asks for the completion on its own reply queue (the AMQP ``reply_to`` of the
contract) and shows a progress bar read from the catalogue meanwhile. ``status`` and ``list`` are
catalogue queries; ``status`` of a request the daemon refused (dead-lettered) shows its reason.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import uuid
from typing import Annotated, Any

import aio_pika
import aiormq
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from common import codec
from common.bus.connection import connect
from common.bus.external import declare_if_allowed
from common.bus.permissions import reply_queue_prefix
from common.catalogue import Catalogue
from common.catalogue import recall as db
from common.cli import app
from common.cli._util import UserError, console, print_json, settings_from, styled
from common.cli.query import JsonOpt, with_catalogue
from common.config import Settings
from common.errors import Permanent, Retryable
from common.messages import RecallRequest, new_id

# Per-file parts, left out of ``list --json``.
_DETAIL = ("failures", "waiting", "cartridges", "failures_not_listed", "waiting_not_listed")
# Files ``status`` lists (failed, and waiting with --json) unless told otherwise: a 100,000-file
# request listed whole took seconds; the counts give the totals.
STATUS_FILES = 1000
recall_app = typer.Typer(help="Bring files back from tape and follow recalls.", no_args_is_help=True)
app.add_typer(recall_app, name="recall")


@recall_app.command("request")
def request(
    ctx: typer.Context,
    names: Annotated[list[str] | None, typer.Argument(help="Logical names of the files.")] = None,
    dataset: Annotated[str | None, typer.Option("--dataset", "-d", help="Recall a whole dataset.")] = None,
    to: Annotated[
        str | None, typer.Option("--to", help="Destination disk endpoint (default: the first).")
    ] = None,
    priority: Annotated[int, typer.Option(min=0, max=9, help="0-9; higher mounts first.")] = 3,
    wait: Annotated[bool, typer.Option("--wait", help="Follow it until recall.completed.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Publish a recall.request, as an external system would; print its id."""
    settings = settings_from(ctx)
    if not names and dataset is None:
        raise UserError("name the files to recall, or give --dataset")
    if to is not None and (to not in settings.storage or settings.storage[to].kind != "disk"):
        disks = ", ".join(n for n, ep in settings.storage.items() if ep.kind == "disk")
        raise UserError(f"--to {to!r} is not a disk endpoint ({disks})")
    msg = RecallRequest(
        id=new_id(), source=f"spool-cli@{socket.gethostname()}:{os.getpid()}", names=list(names or []),
        dataset=dataset, destination=to, priority=priority,
    )  # fmt: skip
    completion = asyncio.run(_request(settings, msg, wait, quiet=json_out))
    if json_out:
        print_json({"id": msg.id, "completed": completion})
        return
    console.print(f"recall request {msg.id} published", highlight=False)
    if completion is not None:
        failed = completion.get("failed") or []
        console.print(f"completed: {completion.get('files')} file(s), {len(failed)} failed", highlight=False)
        for name in failed:
            console.print(f"  failed: {name}", highlight=False)
        if failed:
            raise typer.Exit(1)


async def _request(
    settings: Settings, msg: RecallRequest, wait: bool, *, quiet: bool
) -> dict[str, Any] | None:
    connection = await connect(settings.bus, name="spool-cli")
    try:
        await declare_if_allowed(connection, settings)
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        try:  # passive: needs no permission
            exchange = await channel.get_exchange(settings.bus.exchange, ensure=True)
        except aio_pika.exceptions.ChannelNotFoundEntity as exc:
            raise Retryable(
                "exchange_missing", f"{exc}: start a daemon or run `spool broker declare`"
            ) from None
        replies = await _reply_queue(connection, channel, settings) if wait else None
        event = codec.to_cloudevent(msg)
        try:
            await exchange.publish(
                aio_pika.Message(
                    json.dumps(event).encode(), content_type=codec.CLOUDEVENTS_JSON, message_id=msg.id,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT, correlation_id=msg.id,
                    reply_to=replies.name if replies else None, user_id=settings.bus.user,
                ),
                routing_key=msg.ROUTING_KEY,
                mandatory=True,
            )  # fmt: skip
        except aiormq.exceptions.ChannelAccessRefused as exc:
            raise Permanent("publish_refused", f"RabbitMQ refused the recall.request: {exc}") from None
        except aiormq.exceptions.DeliveryError as exc:
            raise Retryable(
                "unroutable", f"no queue took the recall.request (is the topology declared?): {exc}"
            ) from None
        if replies is None:
            return None
        return await _follow(settings, msg.id, replies, quiet=quiet)
    finally:
        await connection.close()


async def _reply_queue(
    connection: aio_pika.abc.AbstractRobustConnection,
    channel: aio_pika.abc.AbstractChannel,
    settings: Settings,
) -> aio_pika.abc.AbstractQueue:
    """This user's own reply queue, ``<queue_prefix>.reply.<user>.<random>``: the name the
    recall daemon accepts as a ``reply_to`` and ``spool broker setup`` lets an external publisher
    configure and read (a server-named ``amq.gen-*`` queue needs permissions it does not have)."""
    user = settings.bus.user
    name = f"{reply_queue_prefix(settings, user)}{uuid.uuid4().hex}"
    try:
        return await channel.declare_queue(name, exclusive=True, auto_delete=True)
    except aiormq.exceptions.ChannelAccessRefused:
        raise UserError(
            f"RabbitMQ refused user {user!r} its reply queue {name!r}: it needs configure and read on "
            f"'{reply_queue_prefix(settings, user)}*' (spool broker setup --publisher {user})"
        ) from None


async def _follow(
    settings: Settings, recall_id: str, replies: aio_pika.abc.AbstractQueue, *, quiet: bool
) -> dict[str, Any]:
    """Wait for the reply; meanwhile show files done / failed from the catalogue."""
    catalogue = await Catalogue.open(settings.catalogue.url)
    try:
        with Progress(
            TextColumn("recall"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[note]}"),
            TimeElapsedColumn(), console=console, transient=True, disable=quiet,
        ) as bar:  # fmt: skip
            task = bar.add_task("recall", total=None, note="")
            while True:
                reply = await replies.get(no_ack=True, fail=False)
                if reply is not None:
                    data = json.loads(reply.body).get("data") or {}
                    if data.get("request_id") == recall_id:
                        return dict(data)
                view = await catalogue.recall.status(recall_id)
                if view is not None:
                    note = f"{view.failed} failed" if view.failed else ""
                    bar.update(task, total=view.files, completed=view.done + view.failed, note=note)
                else:
                    refused = (await catalogue.queries.request_state([recall_id])).get(recall_id)
                    if refused is not None and refused.state == "failed":
                        raise UserError(f"recall {recall_id} refused ({refused.reason}): {refused.error}")
                await asyncio.sleep(0.5)
    finally:
        await catalogue.close()


def _document(view: db.RecallView, detail: db.RecallSummary | None = None) -> dict[str, Any]:
    cartridges = detail.cartridges if detail is not None else {}
    return {
        "id": view.id, "state": view.state, "destination": view.destination, "dataset": view.dataset,
        "priority": view.priority, "reply_to": view.reply_to, "files": view.files, "done": view.done,
        "failed": view.failed, "queued": view.queued,
        "staging": sum(counts.get("staging", 0) for counts in cartridges.values()),
        "created": view.created, "updated": view.updated, "completed": view.completed,
        "cartridges": cartridges,
        "failures": [
            {"name": f.name, "reason": f.reason, "error": f.error}
            for f in (detail.failures if detail else ())
        ],
        "failures_not_listed": view.failed - len(detail.failures) if detail else 0,
        "waiting": [
            {"name": f.name, "state": f.state, "cartridge": f.cartridge, "fseq": f.fseq}
            for f in ((detail.waiting or ()) if detail else ())
        ],
        "waiting_not_listed": (
            detail.waiting_total - len(detail.waiting) if detail and detail.waiting is not None else 0
        ),
    }  # fmt: skip


async def _status(
    c: Catalogue, recall_id: str, with_waiting: bool = True, limit: int | None = STATUS_FILES
) -> dict[str, Any] | None:
    """Counted in the catalogue (``summary``); the waiting files are listed only for ``--json``,
    at most ``limit`` of them and of the failed ones (None: all)."""
    detail = await c.recall.summary(recall_id, with_waiting, limit)
    if detail is not None:
        return _document(detail.view, detail)
    refused = (await c.queries.request_state([recall_id])).get(recall_id)
    if refused is None:
        return None
    return {"id": recall_id, "state": refused.state, "reason": refused.reason, "error": refused.error,
            "files": 0, "done": 0, "failed": 0, "queued": 0}  # fmt: skip


@recall_app.command("status")
def status(
    ctx: typer.Context,
    recall_id: str,
    json_out: JsonOpt = False,
    files: Annotated[
        int,
        typer.Option("--files", min=0, help="List at most N failed (and, with --json, waiting) files."),
    ] = STATUS_FILES,
    all_files: Annotated[bool, typer.Option("--all-files", help="List every one of them.")] = False,
) -> None:
    """One recall: state, files done / failed (with reasons) / waiting, per cartridge."""
    limit = None if all_files else files
    doc = with_catalogue(settings_from(ctx), lambda c: _status(c, recall_id, json_out, limit))
    if doc is None:
        raise UserError(f"no recall request {recall_id!r}")
    if json_out:
        print_json(doc)
        return
    console.print(styled(f"recall {doc['id']}", "bold"), f" {doc['state']}", highlight=False)
    if "cartridges" not in doc:
        console.print(f"  refused: {doc['reason']}: {doc['error']}", highlight=False)
        return
    what = f"dataset {doc['dataset']}" if doc["dataset"] else "named files"
    console.print(f"  {what} -> {doc['destination']}, priority {doc['priority']}", highlight=False)
    console.print(
        f"  files {doc['files']}: done {doc['done']}, failed {doc['failed']}, "
        f"queued {doc['queued'] - doc['staging']}, reading {doc['staging']}",
        highlight=False,
    )
    table = Table("cartridge", "queued", "reading", "done", "failed")
    for vid, counts in doc["cartridges"].items():
        table.add_row(
            vid, *(str(counts.get(k, 0)) for k in ("queued", "staging", "done", "failed"))
        )  # fmt: skip
    console.print(table)
    for f in doc["failures"]:
        line = f"{f['name']}: {f['reason']} ({f['error']})"
        console.print(" ", styled("failed", "red"), line, highlight=False)
    if doc["failures_not_listed"]:
        more = doc["failures_not_listed"]
        console.print(f"  ... and {more} more failed (--files N, --all-files)", highlight=False)


@recall_app.command("list")
def list_(
    ctx: typer.Context,
    active: Annotated[bool, typer.Option("--active", help="Only recalls still running.")] = False,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 50,
    json_out: JsonOpt = False,
) -> None:
    """Recent recalls, newest first."""
    views = with_catalogue(settings_from(ctx), lambda c: c.recall.list_recalls(limit, active))
    if json_out:
        print_json(
            [{key: value for key, value in _document(view).items() if key not in _DETAIL} for view in views]
        )
        return
    table = Table("id", "state", "destination", "priority", "files", "done", "failed", "queued", "created")
    for v in views:
        table.add_row(
            v.id, v.state, v.destination, str(v.priority), str(v.files), str(v.done), str(v.failed),
            str(v.queued), v.created.strftime("%Y-%m-%d %H:%M:%S"),
        )  # fmt: skip
    console.print(table)
