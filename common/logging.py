"""structlog set-up: JSON lines when stderr is not a terminal, readable console lines when it is.

Per-message context (daemon, message id, correlation id, file name, attempt) is bound with
``structlog.contextvars.bound_contextvars`` by the consumer runner, so every line a handler logs
carries it without passing a logger around.

The libraries (aio-pika, aiormq, asyncio, SQLAlchemy, ...) log through the standard library. Their
records go through the same processors (structlog's ``ProcessorFormatter`` with a
``foreign_pre_chain``), so they are the same JSON lines as Spool's own, with ``level``,
``timestamp``, ``logger`` and ``daemon``; a traceback is one JSON field, never lines of its own.
Two things keep a broker restart from burying the operator in them:

- **Folding**: identical records (logger, level, text but object addresses) within
  ``REPEAT_WINDOW`` seconds give one line; the count of the others is a later line with
  ``similar_since_last_line=N`` (``common.log_folding``, which folds Spool's own repeated
  failure lines too). At one broker restart aio-pika wrote the same warning 64 times within a
  millisecond.
- **Expected broker errors are warnings without a traceback**: a lost connection, a closed channel,
  a refused reconnection are what a robust connection exists for; the exception's one-line text is
  kept in ``error``. Anything else keeps its level and its traceback.

Folding never hides a bug: the **first occurrence of each distinct exception type** (per process)
is always let through, whole with its traceback, whatever its reason's window says
(``common.log_folding.first_of_its_type``); only its repeats are folded.

**Every line is capped** at ``MAX_LINE`` characters (``cap_line``, the last step before
rendering), whatever a field holds: a message's 30 MB name list, an exception's text, a library's
repr. The largest fields are cut first, each keeping its head (and, for a traceback, its tail:
the exception itself) and saying how much was cut: ``...[12345 chars cut]``. An exception nobody
caught (in a thread, or ending the process) is written as such a line too (``thread_failed``,
``uncaught_exception``), not as a raw traceback.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import re
import socket
import sys
import threading
import time
from collections.abc import Hashable, Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any, Protocol, TextIO

import structlog

from common.log_folding import ReasonThrottle

# Seconds within which identical library records are folded into one line (as the consumer's).
REPEAT_WINDOW = 60.0
# The libraries whose connection errors are expected at a broker restart.
BROKER_LIBRARIES = ("aiormq", "aio_pika", "pamqp", "asyncio")
# RabbitMQ's reply code when it closes connections on shutdown / restart (CONNECTION_FORCED).
CONNECTION_FORCED = 320
NETWORK_ERRNOS = {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.EHOSTDOWN, errno.ECONNREFUSED}
EventDict = MutableMapping[str, Any]
# Object addresses in a library's text ("<RobustChannel object at 0x7f...>") do not make it another
# record: one per channel is still the same message.
_ADDRESS = re.compile(r"0x[0-9a-fA-F]+")

# The longest line written (characters of the rendered line, a few less for the renderer's own).
MAX_LINE = 8192
# At most this many fields per line, and this long a field name; the rest is cut and counted.
MAX_FIELDS = 48
MAX_KEY = 64
# Each field is left at least this long when fields must share the line.
MIN_FIELD = 64


class FoldingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes standard-library records, identical ones within ``window`` folded into one line.

    The count of what was folded comes as a copy of the last folded record carrying
    ``similar_since_last_line``, written once its window ended (checked as records arrive, at
    most once a second) and when the handler closes (process exit).
    """

    def __init__(self, stream: IO[str], window: float = REPEAT_WINDOW) -> None:
        super().__init__(stream)
        self.throttle = ReasonThrottle(window)
        self._folded: dict[Hashable, logging.LogRecord] = {}
        self._fold_lock = threading.Lock()
        self._next_sweep = 0.0

    def handle(self, record: logging.LogRecord) -> bool:
        if getattr(record, "similar_since_last_line", None) is not None:
            return bool(super().handle(record))  # a count, written as it comes
        try:
            text = record.getMessage()
        except Exception:  # a malformed record: let the standard machinery report it
            return bool(super().handle(record))
        key = (record.name, record.levelno, _ADDRESS.sub("0x", text))
        exc = record.exc_info[1] if record.exc_info else _argument_exception(record.args)
        with self._fold_lock:
            admitted, folded = self.throttle.admit(key, exc)
            if not admitted:
                self._folded[key] = _frozen(record, text)
            elif folded:  # came back after its window, before a sweep reported the count
                self._folded.pop(key, None)
                record.similar_since_last_line = folded
            counts = self._sweep(time.monotonic())
        for count in counts:
            super().handle(count)
        return bool(super().handle(record)) if admitted else False

    def _sweep(self, now: float, *, everything: bool = False) -> list[logging.LogRecord]:
        if not everything and now < self._next_sweep:
            return []
        self._next_sweep = now + min(1.0, self.throttle.window)
        counts = []
        for key, n in self.throttle.due(everything=everything):
            last = self._folded.pop(key, None)
            if last is not None:
                last.similar_since_last_line = n
                counts.append(last)
        return counts

    def close(self) -> None:
        with self._fold_lock:
            counts = self._sweep(time.monotonic(), everything=True)
        for count in counts:
            super().handle(count)
        super().close()


def _frozen(record: logging.LogRecord, text: str) -> logging.LogRecord:
    """A copy of ``record`` kept for its count line: its text rendered now (the objects it names
    may be half torn down by the time the count is written) and no traceback (its first line had
    it); the exception itself stays, for ``_calm_broker_errors``."""
    exc = record.exc_info[1] if record.exc_info else _argument_exception(record.args)
    fields = {"msg": text, "args": None, "exc_info": None, "exc_text": None, "spool_exception": exc}
    return logging.makeLogRecord({**record.__dict__, **fields})


def _argument_exception(args: object) -> BaseException | None:
    """aio-pika's callback errors carry the exception as an argument, not as exc_info."""
    return next((a for a in args if isinstance(a, BaseException)), None) if isinstance(args, tuple) else None


# --- expected broker errors -------------------------------------------------------------------
def _is_broker_error(exc: BaseException) -> bool:
    """A connection to the broker lost, refused or closed, or a channel closed with it. The
    exception itself decides, not what it was raised during: a bug met while handling a lost
    connection is still a bug."""
    import aiormq.exceptions as amqp  # the CLI imports this module without needing aiormq

    if isinstance(exc, asyncio.CancelledError):  # aiormq cancels its waiters because of the loss
        inner = exc.__cause__
        return inner is not None and _is_broker_error(inner)
    if isinstance(
        exc,
        ConnectionError  # reset, refused, aborted, broken pipe
        | TimeoutError
        | socket.gaierror
        | asyncio.IncompleteReadError
        | amqp.AMQPConnectionError
        | amqp.ChannelInvalidStateError
        | amqp.ChannelClosed,
    ):
        return True
    if isinstance(exc, OSError):
        return exc.errno in NETWORK_ERRNOS
    # aio-pika's "<Connection ...> closed" / "<Channel ...> closed"
    return isinstance(exc, RuntimeError) and str(exc).rstrip().endswith("closed")


def one_line(exc: BaseException) -> str:
    """``Type: first line of the text`` -- what an operator needs of an expected error."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _calm_broker_errors(logger: Any, method: str, event: EventDict) -> EventDict:
    """Expected broker errors of the AMQP libraries: warning level, the error's text, no traceback."""
    # The formatter hands the record's arguments over (``pass_foreign_args``); never rendered.
    args = event.pop("positional_args", None)
    record: logging.LogRecord | None = event.get("_record")
    if record is None or not record.name.startswith(BROKER_LIBRARIES) or record.levelno < logging.WARNING:
        return event
    exc = record.exc_info[1] if record.exc_info else _argument_exception(args)
    exc = exc or getattr(record, "spool_exception", None)  # a count line's (``_frozen``)
    expected = exc is not None and _is_broker_error(exc)
    if not expected and str(event.get("event", "")).startswith("Unexpected connection close"):
        expected = f"reply_code={CONNECTION_FORCED}" in event["event"]  # broker shutdown / restart
    if not expected:
        return event
    event.pop("exc_info", None)
    if exc is not None:
        event["error"] = one_line(exc)
    if record.levelno > logging.WARNING:
        event["level"] = "warning"
    return event


# --- capped lines ------------------------------------------------------------------------------
def cap_line(logger: Any, method: str, event: EventDict) -> EventDict:
    """Cut the event's fields so its rendered line stays within ``MAX_LINE`` characters.

    Sizes are measured as JSON text. Small fields are kept whole; the line's room is shared among
    the large ones (the largest cut most), each cut keeping its head and, for ``exception`` (a
    traceback, whose end names the error), its tail, with a marker saying how much was cut. A
    field that is not text and must be cut becomes the cut text of its JSON.
    """
    budget = MAX_LINE - 128
    if _quick_size(event) <= budget or _rendered_size(event) <= budget:
        return event  # the common case: nothing to do beyond measuring
    keys = list(event)
    capped: EventDict = {(k if len(k) <= MAX_KEY else _cut(k, MAX_KEY)): event[k] for k in keys[:MAX_FIELDS]}
    if len(keys) > MAX_FIELDS:
        capped["fields_cut"] = len(keys) - MAX_FIELDS
    originals = {k: v if isinstance(v, str) else _json(v) for k, v in capped.items()}
    room = budget - sum(len(k) + 6 for k in capped)
    # Cut from the originals, tighter each round while escapes made the estimate short.
    for _ in range(6):
        sizes = {k: _size(v) for k, v in capped.items()}
        if sum(sizes.values()) <= room:
            break
        shares = _shares({k: _size(v) for k, v in originals.items()}, max(room, MIN_FIELD * len(capped)))
        for key, share in shares.items():
            text = originals[key]
            limit = max(MIN_FIELD, share * len(text) // max(_size(text), 1))
            capped[key] = _cut(text, limit, keep_tail=key == "exception")
        room = room * 3 // 4
    return capped


def _quick_size(event: EventDict) -> int:
    """An upper bound of the rendered size, cheap for the usual short line: a character of text
    renders as at most 12 (an escaped surrogate pair); anything but text and numbers counts as a
    full line (measured exactly then)."""
    total = 0
    for key, value in event.items():
        kind = type(value)
        if kind is str:
            total += 12 * len(value) + len(key) + 8
        elif kind is int or kind is float or kind is bool or value is None:
            total += 32 + len(key)
        else:
            return MAX_LINE
    return total


def _rendered_size(event: EventDict) -> int:
    return sum(_size(value) + len(key) + 6 for key, value in event.items())


def _json(value: Any) -> str:
    try:
        return json.dumps(value, default=str)
    except (TypeError, ValueError, RecursionError):
        return repr(value)


def _size(value: Any) -> int:
    """The length of ``value`` rendered as JSON (``JSONRenderer`` escapes non-ASCII)."""
    if isinstance(value, str):
        if value.isascii() and value.isprintable():
            return len(value) + 2 + value.count('"') + value.count("\\")
        return len(json.dumps(value))
    if value is None or isinstance(value, bool | int | float):
        return 24
    return len(_json(value))


def _shares(sizes: dict[str, int], room: int) -> dict[str, int]:
    """The size each too-large field is cut to: fields below an equal share keep theirs, their
    unused share goes to the others (water filling)."""
    remaining = dict(sizes)
    while remaining:
        share = room // len(remaining)
        small = {k: v for k, v in remaining.items() if v <= share}
        if not small:
            return {k: max(share, MIN_FIELD) for k in remaining}
        for k, v in small.items():
            room -= v
            del remaining[k]
    return {}


def _cut(text: str, limit: int, *, keep_tail: bool = False) -> str:
    if len(text) <= limit:
        return text
    marker_room = 32
    keep = max(limit - marker_room, 16)
    cut = len(text) - keep
    if keep_tail:
        head, tail = keep // 2, keep - keep // 2
        return f"{text[:head]}...[{cut} chars cut]...{text[len(text) - tail :]}"
    return f"{text[:keep]}...[{cut} chars cut]"


def _add_logger_name(logger: Any, method: str, event: EventDict) -> EventDict:
    record: logging.LogRecord | None = event.get("_record")
    name = record.name if record is not None else getattr(logger, "name", None)
    if name:
        event["logger"] = name
    return event


class _NamedPrintLogger(structlog.PrintLogger):
    """structlog's print logger, knowing the name it was asked for (``get_logger(name)``)."""

    def __init__(self, file: TextIO, name: str | None) -> None:
        super().__init__(file)
        self.name = name


class LogStyle(Protocol):
    """What ``configure_logging`` reads: ``common.config.LogSettings``, or a ``LogChoice``."""

    @property
    def level(self) -> str: ...

    @property
    def format(self) -> str: ...


@dataclass(frozen=True)
class LogChoice:
    """Log settings without the config's pydantic model: the copy process does not import it."""

    level: str = "info"
    format: str = "auto"  # auto | json | console, as LogSettings


def configure_logging(
    settings: LogStyle | None = None, daemon: str | None = None, *, repeat_window: float = REPEAT_WINDOW
) -> None:
    settings = settings or LogChoice()
    level = logging.getLevelNamesMapping().get(settings.level.upper(), logging.INFO)
    as_json = settings.format == "json" or (settings.format == "auto" and not sys.stderr.isatty())
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer()
    )
    stream = sys.stderr

    def add_daemon(logger: Any, method: str, event: EventDict) -> EventDict:
        if daemon:  # also on records of threads that do not carry the context variables
            event.setdefault("daemon", daemon)
        return event

    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        add_daemon,
        structlog.processors.add_log_level,
        _add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            cap_line,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=lambda *args: _NamedPrintLogger(stream, args[0] if args else None),
        cache_logger_on_first_use=False,
    )
    if daemon:
        structlog.contextvars.bind_contextvars(daemon=daemon)

    handler = FoldingHandler(stream, repeat_window)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                *shared,
                structlog.stdlib.ExtraAdder(allow=["similar_since_last_line"]),
                _calm_broker_errors,
            ],
            pass_foreign_args=True,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.StackInfoRenderer(),
                structlog.processors.format_exc_info,
                cap_line,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for old in list(root.handlers):  # configured again (tests, the copy process): one handler
        if isinstance(old, FoldingHandler) or getattr(old, "stream", None) is stream:
            root.removeHandler(old)
    root.addHandler(handler)
    # Libraries' records below WARNING are noise to an operator (unless Spool's own level is higher).
    root.setLevel(max(level, logging.WARNING))
    # An exception nobody caught (in a thread, or ending the process) is a log line like any
    # other, capped, rather than a raw traceback of any length on stderr.
    threading.excepthook = _log_thread_exception
    sys.excepthook = _log_uncaught_exception


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit or args.exc_value is None:
        return
    thread = args.thread.name if args.thread is not None else None
    structlog.get_logger("spool.thread").error("thread_failed", thread=thread, exc_info=args.exc_value)


def _log_uncaught_exception(kind: type[BaseException], exc: BaseException, tb: Any) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, exc, tb)
        return
    structlog.get_logger("spool").critical("uncaught_exception", exc_info=exc.with_traceback(tb))


@contextmanager
def libraries_quiet(names: tuple[str, ...] = ("aio_pika", "aiormq", "asyncio")) -> Iterator[None]:
    """Silence the AMQP libraries for a block whose broker trouble is reported by Spool itself in
    one line (a daemon's start-up): their lines would only repeat it, with tracebacks."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for lg, old in zip(loggers, levels, strict=True):
            lg.setLevel(old)


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)  # type: ignore[no-any-return]
