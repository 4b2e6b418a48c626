"""A small test service standing in for a daemon in the consumer-runner tests: named ``ingest`` so
it consumes ``file.ready``; its behaviour per message is chosen by ``metadata.behave``."""

from __future__ import annotations

import asyncio
from typing import Any

from common.bus.service import Context, Service
from common.errors import Permanent, Retryable
from common.messages import FileReady
from tests.conftest import cloudevent


def make_service(seen: list[tuple[str, int]]) -> Service:
    service = Service("ingest")
    failures: list[tuple[str, str, int, bool]] = []

    @service.handler(FileReady)
    async def handle(msg: FileReady, ctx: Context[Any]) -> None:
        behave = str(msg.metadata.get("behave", "ok"))
        seen.append((behave, ctx.attempt))
        if behave == "retry_twice" and ctx.attempt < 3:
            raise Retryable("endpoint_down", "no write pools online")
        if behave == "always_retry":
            raise Retryable("endpoint_down", "no write pools online")
        if behave == "permanent":
            raise Permanent("checksum_mismatch", "adler32 differs")
        if behave == "crash":
            raise ZeroDivisionError("bug")
        if behave == "slow":
            await asyncio.sleep(1.5)

    @service.failure_hook
    async def record(msg, err, attempt, final, ctx) -> None:
        failures.append((err.reason, getattr(msg, "path", None), attempt, final))

    service.failures = failures  # type: ignore[attr-defined]
    return service


def event(behave: str, id_: str | None = None) -> bytes:
    return cloudevent({"path": f"/land/{behave}", "dataset": "d", "metadata": {"behave": behave}}, id_=id_)
