"""Logging captured as the tests read it: what ``configure_logging`` wrote to stderr, as lines or
JSON records, with the logging configuration restored after each test."""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

LIBRARY_LOGGERS = ("aio_pika", "aiormq", "asyncio", "sqlalchemy")


class Captured:
    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys
        self.text = ""

    def lines(self) -> list[str]:
        self.text += self.capsys.readouterr().err
        return self.text.splitlines()

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines()]


@pytest.fixture
def captured(capsys: pytest.CaptureFixture[str]) -> Iterator[Captured]:
    """stderr captured (``configure_logging`` writes to the ``sys.stderr`` of its call); the
    logging configuration (root handlers and level, structlog, context variables, library levels,
    the uncaught-exception hooks) restored afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    hooks = sys.excepthook, threading.excepthook
    libraries = {name: logging.getLogger(name).level for name in LIBRARY_LOGGERS}
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET)
    try:
        yield Captured(capsys)
    finally:
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
        for handler in handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(level)
        for name, old in libraries.items():
            logging.getLogger(name).setLevel(old)
        structlog.reset_defaults()
        structlog.contextvars.clear_contextvars()
        sys.excepthook, threading.excepthook = hooks
