"""``spool``: the operator's command line, a thin client of ``common``.

``common`` knows no daemon: the daemons ``spool run`` starts come from whoever calls ``main``
(``main(argv, daemons=registry)``). The ``spool`` program itself (the console script,
``python -m daemons``: ``daemons.program``) passes ``daemons.registry``.

Every user mistake (unreachable broker, bad config, unknown file) ends in one red line on stderr
and a non-zero exit code, never a traceback: ``main`` is the one place that maps them.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Protocol

import typer

try:  # typer >= 0.24 carries its own copy of Click's exceptions
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
except ImportError:  # pragma: no cover - older typer, on Click itself
    from click.exceptions import ClickException, NoArgsIsHelpError  # type: ignore[no-redef]

from common.cli._util import UserError, print_error, settings_from
from common.cli.errors import EXIT_BUG, bug, classify

if TYPE_CHECKING:
    from common.bus.service import Service


class DaemonRegistry(Protocol):
    """Which daemons ``spool run`` may start, by name (``daemons.registry`` is one)."""

    def load(self, name: str) -> Service:
        """The daemon called ``name``; ``KeyError`` (naming the known ones) if there is none."""

    def load_all(self) -> list[Service]:
        """Every daemon, in the order ``spool run all`` starts them."""


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

    registry: DaemonRegistry | None = ctx.obj.get("daemons")
    if registry is None:
        raise UserError(
            "this command knows no daemons: start them with the spool program (`python -m daemons run`)"
        )
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
    except Exception as exc:
        # A daemon's stderr is its log: the one line that says why it stopped is a log line too
        # (JSON when not on a terminal). Operator mistakes (catalogue, state_dir, broker) are
        # classified as the CLI's are; a bug keeps its traceback, inside that one JSON line.
        known = classify(exc)
        log = get_logger("spool.cli")
        if known is None:
            log.error("daemon_failed", reason="internal_error", exit_code=EXIT_BUG, exc_info=exc)
            raise typer.Exit(EXIT_BUG) from None
        log.error(
            "daemon_failed", reason=known.reason or "config", error=known.message, exit_code=known.exit_code
        )
        raise typer.Exit(known.exit_code) from None
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
    "instances": "instances",
    # The three dataset modules (lifecycle, names, manifests) are joined at the merge.
    "dataset": "dataset_manifest",
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


def main(argv: Sequence[str] | None = None, *, daemons: DaemonRegistry | None = None) -> None:
    """Entry point; ``daemons``: what ``spool run`` may start (none: ``spool run`` refuses).
    Typer (standalone mode) handles usage errors and exits; every other failure propagates out of
    it and is turned into one line here (``common.cli.errors.classify``)."""
    args = list(argv) if argv is not None else sys.argv[1:]
    try:
        load_commands(args)
        # Not standalone: usage mistakes (an unknown option, a missing one) come here too, and are
        # one line like every other mistake, not Click's box of usage text.
        code = app(args=args, prog_name="spool", standalone_mode=False, obj={"daemons": daemons})
    except KeyboardInterrupt:
        sys.exit(130)
    except NoArgsIsHelpError:
        app(args=[*args, "--help"], prog_name="spool")  # a group alone: its help, as before
    except ClickException as exc:
        ctx = getattr(exc, "ctx", None)
        print_error(exc.format_message() + (f" ({ctx.command_path} --help)" if ctx is not None else ""))
        sys.exit(exc.exit_code)
    except typer.Abort:
        print_error("aborted")
        sys.exit(1)
    except Exception as exc:
        known = classify(exc)
        if known is None:
            if os.environ.get("SPOOL_DEBUG"):
                raise
            known = bug(exc)
        print_error(known.message, "error" if known.reason is None else f"error ({known.reason})")
        sys.exit(known.exit_code)
    sys.exit(code if isinstance(code, int) else 0)  # typer.Exit(n) returns n when not standalone
