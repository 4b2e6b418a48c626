"""``spool broker setup|declare|convert-side-queues``: least-privilege RabbitMQ users for Spool, and
its queues.

``setup --print`` writes a ``rabbitmqctl`` script to stdout; ``setup --apply`` does the same through
the management API (administrator credentials: those of ``bus.url`` / ``monitor.management_url``,
or ``--admin-user`` with ``--admin-password-file``) and then declares every queue as the operator
user. Either way the passwords and ``.env`` files of the users are in ``--secrets-dir`` (mode 0600)
and the configuration snippet that makes Spool trust exactly its own users is written there as
``spool-broker.toml`` and shown. What each user may do: ``common.bus.permissions``.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import aiormq
import typer

from common.bus import permissions
from common.bus.broker_setup import (
    SNIPPET_NAME,
    SecretsDir,
    apply,
    rabbitmqctl_script,
    url_for,
    write_user_files,
)
from common.bus.connection import connect
from common.bus.management import ManagementEndpoint, ManagementUnreachable, endpoint_for
from common.bus.topology import declare_topology
from common.cli import app
from common.cli._util import UserError, console, settings_from
from common.config import BusSettings, Settings

broker_app = typer.Typer(help="RabbitMQ users, permissions and queues for Spool.", no_args_is_help=True)
app.add_typer(broker_app, name="broker")


@broker_app.command("setup")
def setup(
    ctx: typer.Context,
    secrets_dir: Annotated[
        Path,
        typer.Option("--secrets-dir", help="Directory of the users' password and .env files (mode 0700)."),
    ],
    print_: Annotated[
        bool, typer.Option("--print", help="Print rabbitmqctl commands; change nothing.")
    ] = False,
    apply_: Annotated[bool, typer.Option("--apply", help="Apply through the management HTTP API.")] = False,
    publisher: Annotated[
        list[str], typer.Option("--publisher", help="An external publisher user to create (repeatable).")
    ] = [],  # noqa: B006
    area: Annotated[
        list[str],
        typer.Option("--area", help="Landing area the --publisher of the same rank may announce in."),
    ] = [],  # noqa: B006
    user_prefix: Annotated[
        str | None, typer.Option(help="Daemon users are <prefix>-<daemon> (default: bus.queue_prefix).")
    ] = None,
    admin_user: Annotated[str | None, typer.Option(help="Management API administrator (--apply).")] = None,
    admin_password_file: Annotated[
        Path | None, typer.Option(help="File holding the administrator's password (--apply).")
    ] = None,
) -> None:
    """Create (--apply) or print (--print) per-daemon users, the operator user and external publishers."""
    if print_ == apply_:
        raise UserError("give exactly one of --print and --apply")
    settings = settings_from(ctx)
    try:
        for name in publisher:
            permissions.check_user_name(name)
        grants = permissions.plan(settings, publisher, user_prefix=user_prefix)
        bound = permissions.bind_publishers(settings, publisher, area)
        secrets = SecretsDir(secrets_dir)
        secrets.prepare()
        passwords = write_user_files(settings, grants, secrets)
    except (ValueError, OSError) as exc:
        raise UserError(str(exc)) from None
    snippet = permissions.config_snippet(grants, bound)
    secrets.write_private(secrets.directory / SNIPPET_NAME, snippet)
    if print_:
        script = rabbitmqctl_script(settings, grants, secrets)
        commented = "".join(f"# {line}\n" if line else "#\n" for line in snippet.splitlines())
        typer.echo(
            script + f"\n# Configuration (also in {secrets.directory / SNIPPET_NAME}):\n" + commented,
            nl=False,
        )
        return
    endpoint = endpoint_for(settings.bus, settings.monitor.management_url)
    if admin_user is not None:
        endpoint = _with_admin(endpoint, admin_user, admin_password_file)
    operator = next(g for g in grants if g.role == "operator")
    try:
        asyncio.run(apply(settings, grants, passwords, endpoint))
    except ManagementUnreachable as exc:
        raise UserError(str(exc)) from None
    asyncio.run(_declare(settings, url_for(settings.bus.url, operator.user, passwords[operator.user])))
    for g in grants:
        console.print(f"{g.user:<28} {g.role:<18} {secrets.env_file(g.user)}", highlight=False)
    console.print(
        f"\nqueues declared; configuration (also in {secrets.directory / SNIPPET_NAME}):\n", highlight=False
    )
    typer.echo(snippet, nl=False)


def _with_admin(endpoint: ManagementEndpoint, user: str, password_file: Path | None) -> ManagementEndpoint:
    if password_file is None:
        raise UserError("--admin-user needs --admin-password-file (a password is never an argument)")
    try:
        password = password_file.read_text().strip()
    except OSError as exc:
        raise UserError(f"--admin-password-file {password_file}: {exc.strerror}") from None
    return replace(endpoint, user=user, password=password)


async def _declare(settings: Settings, url: str) -> None:
    """Declare the exchange and every daemon's queues (as ``url``'s user: the operator)."""
    given = {**settings.bus.model_dump(), "url": url}
    if settings.bus.urls:  # a cluster: every node, as url's user
        from urllib.parse import unquote, urlsplit

        parts = urlsplit(url)
        user, password = unquote(parts.username or "guest"), unquote(parts.password or "guest")
        del given["url"]
        given["urls"] = [url_for(u, user, password) for u in settings.bus.urls]
    bus = BusSettings.model_validate(given)
    connection = await connect(bus, name="spool-broker-setup")
    try:
        channel = await connection.channel()
        await declare_topology(channel, settings)
        await channel.close()
    except aiormq.exceptions.ChannelAccessRefused as exc:
        raise UserError(f"RabbitMQ refused user {bus.user!r} to declare Spool's queues: {exc}") from None
    finally:
        await connection.close()


@broker_app.command("declare")
def declare(ctx: typer.Context) -> None:
    """Declare the exchange and every daemon's queues (run as the operator user, or any user
    allowed to configure them), so commands wait in their queue for a daemon not started yet."""
    settings = settings_from(ctx)
    asyncio.run(_declare(settings, settings.bus.url))
    console.print(
        f"declared exchange {settings.bus.exchange} and the queues of every daemon", highlight=False
    )


@broker_app.command("convert-side-queues")
def convert_side_queues(ctx: typer.Context) -> None:
    """Give every retry and dead-letter queue the type of ``bus.side_queues`` (classic or quorum),
    keeping their messages. Stop every daemon first; run as the operator user."""
    settings = settings_from(ctx)
    asyncio.run(_convert(settings))


async def _convert(settings: Settings) -> None:
    from common.bus.side_queues import ConversionRefused, convert

    connection = await connect(settings.bus, name="spool-broker-convert")
    try:
        done = await convert(connection, settings, say=lambda line: console.print(line, highlight=False))
    except ConversionRefused as exc:
        raise UserError(str(exc)) from None
    finally:
        await connection.close()
    moved = sum(done.moved.values())
    console.print(
        f"{len(done.replaced)} queue(s) declared again as {settings.bus.side_queues}, "
        f"{moved} message(s) kept",
        highlight=False,
    )
