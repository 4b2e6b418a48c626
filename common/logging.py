"""structlog set-up: JSON lines when stderr is not a terminal, readable console lines when it is.

Per-message context (daemon, message id, correlation id, file name, attempt) is bound with
``structlog.contextvars.bound_contextvars`` by the consumer runner, so every line a handler logs
carries it without passing a logger around.
"""

from __future__ import annotations

import logging
import sys

import structlog

from common.config import LogSettings


def configure_logging(settings: LogSettings | None = None, daemon: str | None = None) -> None:
    settings = settings or LogSettings()
    level = logging.getLevelNamesMapping().get(settings.level.upper(), logging.INFO)
    as_json = settings.format == "json" or (settings.format == "auto" and not sys.stderr.isatty())
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer()
    )
    processors: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
        renderer,
    ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    if daemon:
        structlog.contextvars.bind_contextvars(daemon=daemon)
    # Libraries log through the standard library; keep their noise at WARNING.
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)  # type: ignore[no-any-return]
