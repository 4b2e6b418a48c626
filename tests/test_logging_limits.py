"""Issue 16: every log line is capped (class 5), and folding never hides the first traceback of a
new exception type (class 11). Logged through the real configuration into a captured stderr, as in
``tests/test_logging.py``."""

# The fixture imported from logging_fixtures (not conftest) reappears as a test parameter:
# ruff: noqa: F811

from __future__ import annotations

import json
import logging
import re
import threading
from typing import Any

import pytest
import structlog

from common.bus.service import Context, Service
from common.config import LogSettings
from common.log_folding import ReasonThrottle
from common.logging import MAX_LINE, configure_logging
from common.messages import FileReady
from tests.conftest import cloudevent, publish_raw, running, wait_for
from tests.logging_fixtures import Captured, captured  # noqa: F401

CUT = re.compile(r"\.\.\.\[(\d+) chars cut\]")


def only_line(captured: Captured) -> tuple[str, dict[str, Any]]:
    [line] = captured.lines()
    assert len(line) <= MAX_LINE, len(line)
    return line, json.loads(line)


def cut_of(text: str) -> int:
    return sum(int(n) for n in CUT.findall(text))


# --- capped lines ----------------------------------------------------------------------------------
def test_a_huge_field_is_cut_with_a_marker_saying_how_much(captured):
    configure_logging(LogSettings(format="json"), daemon="recall")
    names = "run42/" + "n" * 3_000_000
    structlog.get_logger("spool.recall").warning("refused", reason="too_many_names", names=names)
    _line, record = only_line(captured)
    assert (record["event"], record["reason"], record["daemon"]) == ("refused", "too_many_names", "recall")
    assert record["names"].startswith("run42/nnn")
    assert len(record["names"]) - len(CUT.search(record["names"]).group(0)) + cut_of(record["names"]) == len(
        names
    )


def test_lists_and_mappings_from_messages_are_cut_too(captured):
    configure_logging(LogSettings(format="json"), daemon="recall")
    names = [f"run42/file{i:06d}.fits" for i in range(100_000)]
    reasons = {f"reason_{i}": i for i in range(100_000)}
    structlog.get_logger("spool.recall").error("bulk", names=names, reasons=reasons, files=len(names))
    _line, record = only_line(captured)
    assert record["files"] == 100_000  # small fields stay whole
    assert record["names"].startswith('["run42/file000000.fits"') and cut_of(record["names"]) > 0
    assert cut_of(record["reasons"]) > 0


def test_an_exception_text_is_cut_keeping_the_traceback_head_and_the_error_at_its_end(captured):
    configure_logging(LogSettings(format="json"), daemon="ingest")
    try:
        raise ValueError("bad name " + "x" * 1_000_000 + " END")
    except ValueError as exc:
        structlog.get_logger("spool.consumer").error("retrying", reason="unexpected_error", exc_info=exc)
    _line, record = only_line(captured)
    assert record["exception"].startswith("Traceback (most recent call last)")
    assert record["exception"].endswith(" END") and cut_of(record["exception"]) > 900_000


def test_a_library_record_with_a_huge_text_is_capped(captured):
    configure_logging(LogSettings(format="json"), daemon="ingest")
    logging.getLogger("sqlalchemy.engine").warning("statement failed: %s", "SELECT " + "'x', " * 500_000)
    _line, record = only_line(captured)
    assert record["event"].startswith("statement failed: SELECT") and cut_of(record["event"]) > 0
    assert record["logger"] == "sqlalchemy.engine"


def test_many_fields_and_huge_field_names_are_capped(captured):
    configure_logging(LogSettings(format="json"), daemon="monitor")
    fields = {f"k{i}": "v" * 100 for i in range(10_000)}
    fields["n" * 100_000] = 1
    structlog.get_logger("spool.monitor").info("heartbeat", **fields)
    _line, record = only_line(captured)
    assert record["fields_cut"] > 9_000
    assert all(len(key) <= 64 for key in record)


def test_text_that_escapes_in_json_is_capped_on_its_rendered_size(captured):
    configure_logging(LogSettings(format="json"), daemon="ingest")
    structlog.get_logger("spool.ingest").warning("refused", path='"\\\x01' * 200_000, name="é" * 100_000)
    only_line(captured)


def test_a_console_line_is_capped_too(captured):
    configure_logging(LogSettings(format="console"), daemon="ingest")
    structlog.get_logger("spool.ingest").warning("refused", path="p" * 1_000_000)
    [line] = captured.lines()
    assert len(line) <= MAX_LINE + 200 and "chars cut]" in line  # the console adds its colours


def test_an_exception_nobody_caught_in_a_thread_is_a_capped_line(captured):
    configure_logging(LogSettings(format="json"), daemon="ingest")

    def fail() -> None:
        raise ValueError("x" * 1_000_000)

    thread = threading.Thread(target=fail, name="copier")
    thread.start()
    thread.join()
    _line, record = only_line(captured)
    assert (record["event"], record["thread"], record["level"]) == ("thread_failed", "copier", "error")
    assert "ValueError: xxx" in record["exception"] and cut_of(record["exception"]) > 900_000


def test_ordinary_lines_are_left_as_they_are(captured):
    configure_logging(LogSettings(format="json"), daemon="ingest")
    structlog.get_logger("spool.ingest").info("ingested", file="run42/a.fits", size=2558, names=["a", "b"])
    _line, record = only_line(captured)
    assert (record["file"], record["size"], record["names"]) == ("run42/a.fits", 2558, ["a", "b"])


# --- the first of each exception type is never folded -----------------------------------------------
def test_the_throttle_lets_through_the_first_of_each_exception_type_and_folds_its_repeats():
    class FirstBug(Exception):
        pass

    class SecondBug(Exception):
        pass

    throttle = ReasonThrottle(window=60)
    assert throttle.admit("retry:unexpected_error", FirstBug()) == (True, 0)
    assert throttle.admit("retry:unexpected_error", FirstBug()) == (False, 0)
    assert throttle.admit("retry:unexpected_error", FirstBug()) == (False, 0)
    # Another bug under the same reason, within the window: its one traceback is written, with
    # the count of what was folded before it.
    assert throttle.admit("retry:unexpected_error", SecondBug()) == (True, 2)
    assert throttle.admit("retry:unexpected_error", SecondBug()) == (False, 0)
    assert throttle.admit("retry:unexpected_error", FirstBug()) == (False, 0)


def test_the_exception_being_handled_counts_when_none_is_given():
    class HandledBug(Exception):
        pass

    throttle = ReasonThrottle(window=60)
    assert throttle.admit("observe_failed") == (True, 0)
    try:
        raise HandledBug("new")
    except HandledBug:
        assert throttle.admit("observe_failed") == (True, 0)
        assert throttle.admit("observe_failed") == (False, 0)


def test_library_records_of_a_new_exception_type_are_not_folded(captured):
    class PoolBug(Exception):
        pass

    class OtherPoolBug(Exception):
        pass

    configure_logging(LogSettings(format="json"), daemon="ingest")
    fail = logging.getLogger("sqlalchemy.pool").error
    for exc in (PoolBug("a"), PoolBug("b"), OtherPoolBug("c"), OtherPoolBug("d"), PoolBug("e")):
        try:
            raise exc
        except Exception as caught:
            fail("pool reset failed", exc_info=caught)
    records = captured.records()
    assert [r["exception"].splitlines()[-1].split(".")[-1] for r in records] == [
        "PoolBug: a",
        "OtherPoolBug: c",
    ]
    assert records[1]["similar_since_last_line"] == 1  # PoolBug("b"), folded before it


@pytest.mark.integration
async def test_a_second_bug_under_the_same_reason_keeps_its_traceback(captured, settings, broker, topology):
    class ParserBug(Exception):
        pass

    class StoreBug(Exception):
        pass

    bugs = {"/l/1": ParserBug, "/l/2": ParserBug, "/l/3": StoreBug}
    service = Service("ingest")

    called: list[str] = []

    @service.handler(FileReady)
    async def handle(msg: FileReady, ctx: Context[Any]) -> None:
        called.append(msg.path)
        raise bugs[msg.path](f"bug at {msg.path}")

    configure_logging(LogSettings(format="json"), daemon="ingest")
    async with running([service], settings):
        for path in bugs:
            await publish_raw(broker, settings, "file.ready", cloudevent({"path": path, "dataset": "d"}))
            await wait_for(lambda p=path: _true(p in called))  # in order: /l/1 is the first ParserBug
    retrying = [r for r in captured.records() if r.get("event") == "retrying"]
    shown = [r["exception"].splitlines()[-1] for r in retrying if "exception" in r]
    assert any("ParserBug: bug at /l/1" in s for s in shown)
    assert any("StoreBug: bug at /l/3" in s for s in shown)  # not folded into ParserBug's window
    assert not any("/l/2" in s for s in shown)  # the repeat is folded


async def _true(value: bool) -> bool:
    return value
