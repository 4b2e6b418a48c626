"""``spool``: the operator's command line, a thin client of ``common``.

Every user mistake (unreachable broker, bad config, unknown file) ends in one red line on stderr
and a non-zero exit code, never a traceback: ``main`` is the one place that maps them.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Sequence
from typing import Annotated

import typer

from common.cli._util import UserError, err_console, settings_from
from common.errors import ConfigError, SpoolError

app = typer.Typer(
    name="spool",
    help="Spool: archive lifecycle for scientific instruments (ingest, replicate, tape, recall, monitor).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _global(
    ctx: typer.Context,
    config: Annotated[
        str | None,
        typer.Option("--config", "-c", help="TOML config file (default: $SPOOL_CONFIG, config/spool.toml)"),
    ] = None,
) -> None:
    ctx.ensure_object(dict)["config"] = config
    # The CLI reports broker trouble in one line of its own; aio-pika's connection warnings would
    # only repeat it. ``spool run`` turns them back on (a daemon's reconnects are worth logging).
    for noisy in ("aio_pika", "aiormq"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)


@app.command()
def run(
    ctx: typer.Context,
    daemon: Annotated[
        str, typer.Argument(help="ingest | replicator | tape | recall | monitor | all (all in one process)")
    ],
    once: Annotated[bool, typer.Option(help="Handle what is queued, then exit.")] = False,
) -> None:
    """Run one daemon, or all of them in one process, until SIGTERM."""
    from common.logging import configure_logging, get_logger
    from common.runtime import run_loop, run_services
    from daemons import registry

    settings = settings_from(ctx)
    try:
        services = registry.load_all() if daemon == "all" else [registry.load(daemon)]
    except KeyError as exc:
        raise UserError(str(exc.args[0])) from None
    for noisy in ("aio_pika", "aiormq"):
        logging.getLogger(noisy).setLevel(logging.NOTSET)
    configure_logging(settings.log, daemon=None if daemon == "all" else daemon)
    try:
        code = run_loop(run_services(services, settings, once=once))
    except SpoolError as exc:
        # A daemon's stderr is its log: the one line that says why it stopped is a log line too
        # (JSON when not on a terminal). Exit code 3 as for every broker / catalogue failure.
        get_logger("spool.cli").error("daemon_failed", reason=exc.reason, error=exc.message, exit_code=3)
        raise typer.Exit(3) from None
    raise typer.Exit(code)


# Sub-command modules register themselves on ``app`` when imported. Importing every one costs
# about a second (SQLAlchemy, Alembic, aio-pika, aiohttp, ...), which an operator feels on each
# `spool status`; so ``main`` imports only the module of the command being run, and all of them
# for `spool --help` or an unknown command. (Whoever drives ``app`` without ``main`` calls
# ``load_commands()`` first.)
COMMAND_MODULES: dict[str, str] = {
    "ingest": "publish",
    **dict.fromkeys(("show", "ls", "find", "datasets", "lineage", "trace"), "query"),
    "dead": "dead",
    "broker": "broker",
    "demo": "demo",
    **dict.fromkeys(("status", "queues"), "status"),
    **dict.fromkeys(("rule", "rse"), "replication"),
    "recall": "recall",
    **dict.fromkeys(("tape", "drive"), "tape"),
}
_OPTIONS_WITH_VALUE = {"--config", "-c"}


def load_commands(argv: Sequence[str] | None = None) -> None:
    """Register the sub-commands ``argv`` needs (every one when it names none of them)."""
    wanted = set(COMMAND_MODULES.values())
    args = list(argv or [])
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in _OPTIONS_WITH_VALUE:
            i += 2
            continue
        if arg.startswith("-"):
            i += 1
            continue
        if arg in COMMAND_MODULES:
            wanted = {COMMAND_MODULES[arg]}
        break
    for module in sorted(wanted):
        importlib.import_module(f"common.cli.{module}")


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point. Typer (standalone mode) handles usage errors and exits; Spool's own errors
    propagate out of it and are turned into one line here."""
    args = list(argv) if argv is not None else sys.argv[1:]
    try:
        load_commands(args)
        app(args=args)
    except (ConfigError, UserError) as exc:
        err_console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2 if isinstance(exc, ConfigError) else 1)
    except SpoolError as exc:
        err_console.print(f"[red]error ({exc.reason}):[/red] {exc.message}", highlight=False, soft_wrap=True)
        sys.exit(3)
    except Exception as exc:
        # SQLAlchemy is imported only by commands that use the catalogue: if it is not loaded,
        # the error cannot be one of its own.
        sa_exc = sys.modules.get("sqlalchemy.exc")
        if sa_exc is None or not isinstance(exc, sa_exc.SQLAlchemyError):
            raise
        err_console.print(
            f"[red]error (catalogue):[/red] {str(exc).splitlines()[0]}", highlight=False, soft_wrap=True
        )
        sys.exit(3)
    except KeyboardInterrupt:
        sys.exit(130)
