"""Logs are JSON lines, the libraries' too: the standard library's records go through structlog,
identical ones are folded, expected broker errors are warnings without a traceback.

The unit tests log through real standard-library loggers into a captured stderr; the integration
test cuts a real daemon's broker connection (``tests/tcp_proxy.py``) and reads its stderr."""

# The fixture imported from logging_fixtures (not conftest) reappears as a test parameter:
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
import pytest
import structlog

from common.config import LogSettings, Settings
from common.log_folding import ReasonThrottle
from common.logging import configure_logging
from tests.conftest import AMQP_URL, cloudevent, queue_depth, wait_for
from tests.logging_fixtures import LIBRARY_LOGGERS, captured  # noqa: F401
from tests.tcp_proxy import TcpProxy

SPOOL_FIELDS = {"level", "timestamp", "logger", "daemon", "event"}


def _raised(exc: BaseException) -> BaseException:
    """``exc`` with a traceback, as a library would log it."""
    try:
        raise exc
    except BaseException as caught:
        return caught


def test_library_records_are_json_lines_with_the_fields_of_spools_own(captured):
    configure_logging(LogSettings(format="json"), daemon="ingest")
    structlog.get_logger("spool.runtime").info("started", services="ingest")
    logging.getLogger("sqlalchemy.pool").warning("pool %s overflowed by %d", "catalogue", 3)
    logging.getLogger("sqlalchemy.engine").info("below the libraries' level: not written")

    own, library = captured.records()
    assert own.keys() >= SPOOL_FIELDS and library.keys() >= SPOOL_FIELDS
    assert (own["logger"], own["level"], own["daemon"]) == ("spool.runtime", "info", "ingest")
    assert library["event"] == "pool catalogue overflowed by 3"
    assert (library["logger"], library["level"], library["daemon"]) == (
        "sqlalchemy.pool",
        "warning",
        "ingest",
    )
    assert len(captured.lines()) == 2


def test_identical_library_warnings_are_folded_and_the_count_follows(captured):
    configure_logging(LogSettings(format="json"), daemon="ingest", repeat_window=0.3)
    warn = logging.getLogger("aio_pika.message").warning
    started = time.monotonic()
    for _ in range(64):
        warn("Reject is not sent since channel is closed")
    assert time.monotonic() - started < 0.3
    warn("another text is another line")
    assert [r["event"] for r in captured.records()] == [
        "Reject is not sent since channel is closed",
        "another text is another line",
    ]
    time.sleep(0.35)  # the window ends; the next record written brings the count along
    logging.getLogger("aiormq.connection").warning("something else")
    count = captured.records()[2]
    assert count["event"] == "Reject is not sent since channel is closed"
    assert count["similar_since_last_line"] == 63
    assert (count["level"], count["logger"]) == ("warning", "aio_pika.message")
    # After the window the same text is a line again, counted from zero.
    warn("Reject is not sent since channel is closed")
    assert "similar_since_last_line" not in captured.records()[-1]


def test_records_differing_only_in_object_addresses_are_folded(captured):
    configure_logging(LogSettings(format="json"), daemon="ingest")
    for address in ("0x7f0236b9cdd0", "0x7f0235a669d0", "0x7f0235a56440"):
        logging.getLogger("aio_pika.tools").warning("Callback <RobustChannel object at %s> error", address)
    assert [r["event"] for r in captured.records()] == [
        "Callback <RobustChannel object at 0x7f0236b9cdd0> error"
    ]


def test_counts_still_folded_are_written_when_logging_shuts_down(captured):
    configure_logging(LogSettings(format="json"), daemon="ingest")
    for _ in range(5):
        logging.getLogger("aio_pika.robust_connection").warning("Connection attempt failed: refused")
    assert len(captured.lines()) == 1
    for handler in logging.getLogger().handlers:  # what logging.shutdown does at exit
        handler.close()
    last = captured.records()[-1]
    assert last["event"] == "Connection attempt failed: refused" and last["similar_since_last_line"] == 4


def test_a_count_line_is_written_after_the_objects_its_record_named_are_torn_down(captured):
    class Callback:  # as aio-pika's OneShotCallback, whose repr fails once it has run
        def __init__(self) -> None:
            self.callback = "on_close"

        def __repr__(self) -> str:
            return f"<OneShotCallback: cb={self.callback}>"

    configure_logging(LogSettings(format="json"), daemon="ingest")
    callback = Callback()
    for _ in range(3):
        logging.getLogger("aio_pika.tools").error(
            "Callback %r error: %s: %s", callback, "RuntimeError", RuntimeError("<Connection> closed")
        )
    del callback.callback
    for handler in logging.getLogger().handlers:
        handler.close()
    first, count = captured.records()
    assert (
        count["event"]
        == first["event"]
        == "Callback <OneShotCallback: cb=on_close> error: RuntimeError: <Connection> closed"
    )
    assert count["similar_since_last_line"] == 2
    assert (
        count["level"] == first["level"] == "warning"
        and count["error"] == "RuntimeError: <Connection> closed"
    )


@pytest.mark.parametrize(
    ("logger", "level", "message", "args", "exc", "error"),
    [
        (
            "aiormq.connection", logging.WARNING, "Cancelling cause reader exited abnormally", (),
            ConnectionResetError(104, "Connection reset by peer"),
            "ConnectionResetError: [Errno 104] Connection reset by peer",
        ),
        (
            "aio_pika.robust_connection", logging.ERROR, "Reconnect attempt failed", (),
            aiormq.exceptions.AMQPConnectionError("Server connection unexpectedly closed"),
            "AMQPConnectionError: Server connection unexpectedly closed",
        ),
        (
            "asyncio", logging.ERROR, "Future exception was never retrieved", (),
            aiormq.exceptions.ChannelInvalidStateError("<Channel: 1> closed"),
            "ChannelInvalidStateError: <Channel: 1> closed",
        ),
        (
            "aio_pika.tools", logging.ERROR, "Callback %r error: %s: %s",
            ("<cb>", "RuntimeError", RuntimeError("<Connection: amqp://127.0.0.1> closed")), None,
            "RuntimeError: <Connection: amqp://127.0.0.1> closed",
        ),
        (
            "aiormq.connection", logging.ERROR,
            'Unexpected connection close from remote "%s", Connection.Close(reply_code=%r, reply_text=%r)',
            ("amqp://127.0.0.1", 320, "CONNECTION_FORCED - broker forced connection closure"), None, None,
        ),
    ],
)  # fmt: skip
def test_expected_broker_errors_are_warnings_with_the_error_text_and_no_traceback(
    captured, logger, level, message, args, exc, error
):
    configure_logging(LogSettings(format="json"), daemon="ingest")
    exc_info = _raised(exc) if exc is not None else None
    logging.getLogger(logger).log(level, message, *args, exc_info=exc_info)

    [line] = captured.lines()
    record = json.loads(line)
    assert record["level"] == "warning" and record["logger"] == logger
    assert "exception" not in record and "Traceback" not in line
    assert record.get("error") == error


def test_unexpected_exceptions_keep_their_traceback_in_one_json_field(captured):
    configure_logging(LogSettings(format="json"), daemon="ingest")
    logging.getLogger("aiormq.channel").error(
        "Consumer callback failed", exc_info=_raised(ValueError("a bug"))
    )
    # A bug met while handling a lost connection is still a bug.
    try:
        try:
            raise ConnectionResetError(104, "Connection reset by peer")
        except ConnectionResetError:
            raise KeyError("tag") from None
    except KeyError as bug:
        logging.getLogger("aio_pika.robust_channel").error("Restore failed", exc_info=bug)
    # A broker error logged by another library than the AMQP ones is not calmed either.
    logging.getLogger("sqlalchemy.pool").error("pool reset failed", exc_info=_raised(ConnectionResetError()))

    lines = captured.lines()
    records = [json.loads(line) for line in lines]
    assert len(lines) == 3 and [r["level"] for r in records] == ["error", "error", "error"]
    assert records[0]["exception"].startswith("Traceback") and "ValueError: a bug" in records[0]["exception"]
    assert "KeyError: 'tag'" in records[1]["exception"]
    assert "ConnectionResetError" in records[2]["exception"]


def test_on_a_console_library_records_are_console_lines(captured):
    configure_logging(LogSettings(format="console"), daemon="ingest")
    logging.getLogger("aiormq.connection").warning("Connection %r was blocked", "conn")
    [line] = captured.lines()
    assert (
        not line.startswith("{") and "Connection 'conn' was blocked" in line and "aiormq.connection" in line
    )


def test_configured_twice_a_record_is_written_once(captured):
    configure_logging(LogSettings(format="json"), daemon="ingest")
    configure_logging(LogSettings(format="json"), daemon="ingest")
    logging.getLogger("aiormq.connection").warning("once")
    assert len(captured.lines()) == 1


def test_reason_throttle_hands_over_the_counts_of_ended_windows():
    throttle = ReasonThrottle(window=0.05)
    assert throttle.admit("x") == (True, 0)
    assert throttle.admit("x") == (False, 0) and throttle.admit("y") == (True, 0)
    assert throttle.due() == []
    time.sleep(0.06)
    assert throttle.due() == [("x", 1)]  # "y" ended with nothing folded: forgotten
    assert throttle.admit("x") == (True, 0)


# --- a real daemon whose broker connection is cut -------------------------------------------------
def _landing_events(settings: Settings, n: int) -> list[bytes]:
    landing = settings.landing_areas["lst1"] / "run1"
    landing.mkdir(parents=True, exist_ok=True)
    events = []
    for i in range(n):
        path = landing / f"f{i:04d}.fits"
        path.write_bytes(os.urandom(512))
        events.append(cloudevent({"path": str(path), "dataset": "lst1.20261123.run012345.dl0"}))
    return events


@pytest.mark.integration
@pytest.mark.slow
async def test_daemon_stderr_stays_json_lines_through_a_broker_connection_cut(
    config_file: Path, settings: Settings, broker, topology
):
    channel = await broker.channel(publisher_confirms=True)
    exchange = await channel.get_exchange(settings.bus.exchange)
    for body in _landing_events(settings, 300):  # in flight when the connection is cut
        await exchange.publish(
            aio_pika.Message(body, content_type="application/cloudevents+json"), routing_key="file.ready"
        )
    upstream = aio_pika.connection.make_url(AMQP_URL)
    async with TcpProxy(upstream.host or "127.0.0.1", upstream.port or 5672) as proxy:
        daemon = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "daemons", "--config", str(config_file), "run", "ingest",
            cwd=Path(__file__).resolve().parent.parent, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "SPOOL_BUS__URL": proxy.url(AMQP_URL)},
        )  # fmt: skip
        assert daemon.stderr is not None
        lines: list[str] = []

        async def read() -> None:
            assert daemon.stderr is not None
            async for raw in daemon.stderr:
                lines.append(raw.decode())

        reading = asyncio.create_task(read())
        try:
            await wait_for(lambda: _logged(lines, "started"), timeout=60)
            assert proxy.cut(forced=True) == 1  # the broker closes the connection, as on shutdown
            await proxy.refuse()  # and stays away for a few reconnection attempts (every 2 s)
            await asyncio.sleep(5)
            await proxy.accept()
            await wait_for(lambda: _logged(lines, "broker_reconnected"), timeout=30)
            await wait_for(lambda: _drained(broker, settings), timeout=60)
        finally:
            daemon.send_signal(signal.SIGTERM)
            await asyncio.wait_for(daemon.wait(), timeout=60)
            await reading
    assert daemon.returncode == 0

    records = [_json(line) for line in lines]  # every line is one JSON document
    for record in records:
        if record.get("process") == "copier":  # the daemon's copy process: a process of its own
            continue
        assert record.keys() >= SPOOL_FIELDS, record
        assert record["daemon"] == "ingest"
    library = [r for r in records if r["logger"].startswith(("aio_pika", "aiormq", "asyncio"))]
    assert library, "the cut was logged by the AMQP libraries"
    assert all(r["level"] == "warning" and "exception" not in r for r in library), library
    assert all("Traceback" not in line for line in lines)
    # Reconnection attempts failed every 2 s for 5 s: one line, then its count.
    lines_per_text = Counter((r["logger"], r["event"]) for r in library if "similar_since_last_line" not in r)
    assert max(lines_per_text.values()) == 1, lines_per_text
    folded = [r for r in library if "similar_since_last_line" in r]
    assert folded and all(r["similar_since_last_line"] >= 1 for r in folded)


def _json(line: str) -> dict[str, Any]:
    try:
        record: dict[str, Any] = json.loads(line)
    except json.JSONDecodeError:
        pytest.fail(f"not a JSON line: {line!r}")
    return record


async def _logged(lines: list[str], event: str) -> bool:
    return any(f'"event": "{event}"' in line for line in lines)


async def _drained(broker: aio_pika.abc.AbstractRobustConnection, settings: Settings) -> bool:
    return await queue_depth(broker, settings.queue("ingest")) == 0
