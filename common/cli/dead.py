"""``spool dead list|show|retry|purge``: inspect dead letters and act on them, by reason too."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, TypeVar

import typer
from aio_pika.abc import AbstractRobustConnection
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from common.bus import dead as deadletters
from common.bus.connection import connect
from common.cli import app
from common.cli._util import UserError, console, err_console, print_json, settings_from
from common.config import Settings

T = TypeVar("T")
dead_app = typer.Typer(
    help="Dead letters: list, show, retry, purge (by queue and reason).", no_args_is_help=True
)
app.add_typer(dead_app, name="dead")

QueueOpt = Annotated[
    str | None, typer.Option("--queue", "-q", help="Daemon name or .dead queue (default: all).")
]
ReasonOpt = Annotated[
    str | None, typer.Option("--reason", "-r", help="Only dead letters with this reason code.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _with_broker(settings: Settings, work: Callable[[AbstractRobustConnection], Awaitable[T]]) -> T:
    async def go() -> T:
        connection = await connect(settings.bus, name="spool-cli")
        try:
            return await work(connection)
        finally:
            await connection.close()

    return asyncio.run(go())


@contextmanager
def _counting(label: str) -> Iterator[Callable[[int], None] | None]:
    """A running count on stderr while dead letters are moved (10,000 take several seconds);
    nothing when stderr is not a terminal, so scripts and ``--json`` output stay clean."""
    if not err_console.is_terminal:
        yield None
        return
    columns = (SpinnerColumn(), TextColumn(label + " {task.completed}"), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=True) as bar:
        task = bar.add_task(label, total=None)
        yield lambda n: bar.update(task, completed=n)


def _queues(settings: Settings, queue: str | None) -> list[str]:
    try:
        return deadletters.dead_queues(settings, queue)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _find(letters: list[deadletters.DeadLetter], wanted: str) -> deadletters.DeadLetter | None:
    """The dead letter ``wanted`` names: by AMQP message id, else by the event id in its body."""
    found = next((d for d in letters if d.message_id == wanted), None)
    return found or next((d for d in letters if event_id(d) == wanted), None)


def _message_id(settings: Settings, queues: list[str], given: str | None) -> str | None:
    """``--id`` of retry / purge, which may be a CloudEvent id: the AMQP message id it names."""
    if given is None:
        return None
    letters = _with_broker(settings, lambda c: deadletters.browse(c, queues))
    found = _find(letters, given)
    return found.message_id if found is not None and found.message_id else given


@dead_app.command("list")
def list_(
    ctx: typer.Context,
    queue: QueueOpt = None,
    reason: ReasonOpt = None,
    by_reason: Annotated[bool, typer.Option("--by-reason", help="One line per reason with a count.")] = False,
    limit: Annotated[int, typer.Option(help="At most this many messages read.")] = 10000,
    json_out: JsonOpt = False,
) -> None:
    """List dead letters (they stay in their queue)."""
    settings = settings_from(ctx)
    letters = _with_broker(
        settings, lambda c: deadletters.browse(c, _queues(settings, queue), reason=reason, limit=limit)
    )
    if by_reason:
        counts = Counter((d.queue, d.reason) for d in letters)
        rows = [{"queue": q, "reason": r, "count": n} for (q, r), n in counts.most_common()]
        if json_out:
            print_json(rows)
            return
        table = Table("queue", "reason", "count")
        for row in rows:
            table.add_row(str(row["queue"]), str(row["reason"]), str(row["count"]))
        console.print(table)
        return
    if json_out:
        print_json([d.summary() for d in letters])
        return
    table = Table("queue", "message id", "reason", "attempts", "time", "error")
    for d in letters:
        table.add_row(d.queue, d.message_id or "", d.reason, str(d.attempts), d.time[:19], d.error[:100])
    console.print(table)
    console.print(f"{len(letters)} dead letter(s)")


@dead_app.command()
def show(ctx: typer.Context, message_id: str, queue: QueueOpt = None, json_out: JsonOpt = False) -> None:
    """One dead letter in full: headers and body. MESSAGE_ID is its AMQP message id or the event id
    inside its body (a CloudEvent's ``id``), whichever the operator has at hand."""
    settings = settings_from(ctx)
    letters = _with_broker(settings, lambda c: deadletters.browse(c, _queues(settings, queue)))
    match = _find(letters, message_id)
    if match is None:
        raise UserError(f"no dead letter with message id or event id {message_id!r}")
    data: dict[str, Any] = match.summary()
    data["event_id"] = event_id(match)
    data["body"] = _body_text(match)
    if json_out:
        print_json(data)
        return
    for key, value in data.items():
        console.print(Text.assemble((f"{key:>12}", "bold"), f"  {value}"), highlight=False)


MAX_ID_BODY = 1 << 20  # bodies above this are not decoded to look for an id


def event_id(letter: deadletters.DeadLetter) -> str | None:
    """The event id inside a dead letter's body: a CloudEvent's (or a bare JSON payload's) ``id``,
    or a Spool message's; None when the body has none or cannot be read (it may be why it died)."""
    if len(letter.body) > MAX_ID_BODY:
        return None
    try:
        if letter.content_type == "application/msgpack":
            import msgpack

            doc = msgpack.unpackb(letter.body, raw=False)
        else:
            doc = json.loads(letter.body)
    except Exception:  # undecodable bodies are dead letters too; they have no event id
        return None
    found = doc.get("id") if isinstance(doc, dict) else None
    return found if isinstance(found, str) else None


def _body_text(letter: deadletters.DeadLetter) -> Any:
    if letter.content_type == "application/msgpack":
        import msgpack

        try:
            return msgpack.unpackb(letter.body, raw=False)
        except Exception:
            return repr(letter.body[:2000])
    return letter.body[:20000].decode(errors="replace")


@dead_app.command()
def retry(
    ctx: typer.Context,
    queue: QueueOpt = None,
    reason: ReasonOpt = None,
    message_id: Annotated[
        str | None, typer.Option("--id", help="Only this message (AMQP message id or CloudEvent id).")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Send dead letters back to their work queue with a fresh attempt count (after fixing the cause)."""
    settings = settings_from(ctx)
    queues = _queues(settings, queue)
    message_id = _message_id(settings, queues, message_id)
    with _counting("sent back") as progress:
        moved = _with_broker(
            settings,
            lambda c: deadletters.take(
                c,
                settings,
                queues,
                reason=reason,
                message_id=message_id,
                requeue_to_work=True,
                progress=progress,
            ),
        )
    if json_out:
        print_json({"retried": moved})
    else:
        console.print(f"sent {moved} dead letter(s) back to their work queue")


@dead_app.command()
def purge(
    ctx: typer.Context,
    queue: QueueOpt = None,
    reason: ReasonOpt = None,
    message_id: Annotated[
        str | None, typer.Option("--id", help="Only this message (AMQP message id or CloudEvent id).")
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Delete dead letters for good."""
    settings = settings_from(ctx)
    queues = _queues(settings, queue)
    message_id = _message_id(settings, queues, message_id)
    if not yes:
        what = f"reason {reason!r}" if reason else "every reason"
        typer.confirm(f"Delete dead letters of {what} from {', '.join(queues)}?", abort=True)
    with _counting("purged") as progress:
        removed = _with_broker(
            settings,
            lambda c: deadletters.take(
                c,
                settings,
                queues,
                reason=reason,
                message_id=message_id,
                requeue_to_work=False,
                progress=progress,
            ),
        )
    if json_out:
        print_json({"purged": removed})
    else:
        console.print(f"purged {removed} dead letter(s)")
