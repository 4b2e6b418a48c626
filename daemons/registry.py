"""Which daemons exist, by name: the one list ``spool run`` and the contract tests walk."""

from __future__ import annotations

import importlib

from common.bus.service import Service

# name -> "module:attribute" of its Service; ``spool run all`` starts them in this order.
SERVICES: dict[str, str] = {
    "ingest": "daemons.ingest.handlers:service",
    "replicator": "daemons.replicator.handlers:service",
    "tape": "daemons.tape.handlers:service",
    "recall": "daemons.recall.handlers:service",
    "monitor": "daemons.monitor.handlers:service",
}


def load(name: str) -> Service:
    try:
        target = SERVICES[name]
    except KeyError:
        raise KeyError(f"unknown daemon {name!r}; known: {', '.join(SERVICES)}") from None
    module, attr = target.split(":")
    service = getattr(importlib.import_module(module), attr)
    assert isinstance(service, Service)
    return service


def load_all() -> list[Service]:
    return [load(name) for name in SERVICES]
