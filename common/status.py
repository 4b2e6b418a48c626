"""The status document ``spool status`` shows: from the monitor when it runs, otherwise assembled
directly from the broker and the catalogue, with what is then missing named.

The monitor serves the document at ``/api/status`` (``daemons.monitor.report``). Without it, queues
still come from the broker (``common.bus.queue_stats``), failures from the catalogue's failed and
retrying requests grouped by (daemon, reason), endpoint states from the catalogue; daemon liveness,
event counts and alerts need the monitor and are ``null``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import aiohttp
from pydantic_core import to_jsonable_python

from common.bus.queue_stats import queue_report
from common.catalogue import Catalogue, EndpointInfo, RequestInfo
from common.config import Settings

# Failed / retrying requests read from the catalogue to group when the monitor is not running.
DIRECT_FAILURE_LIMIT = 10_000
# Seconds `spool status` waits for the monitor before showing what it can get directly.
MONITOR_TIMEOUT = 3.0


class MonitorUnreachable(Exception):
    pass


def monitor_url(settings: Settings) -> str:
    m = settings.monitor
    if m.url:
        return m.url.rstrip("/")
    host = m.http_host if m.http_host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{m.http_port}"


async def fetch_monitor_status(settings: Settings) -> dict[str, Any]:
    url = f"{monitor_url(settings)}/api/status"
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=MONITOR_TIMEOUT)) as session,
            session.get(url) as response,
        ):
            if response.status != 200:
                raise MonitorUnreachable(f"{url} answered HTTP {response.status}")
            doc = await response.json(content_type=None)
    except aiohttp.ClientConnectorError:
        raise MonitorUnreachable(f"nothing answers at {monitor_url(settings)}") from None
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
        raise MonitorUnreachable(f"{url}: {exc or type(exc).__name__}") from None
    if not isinstance(doc, dict) or doc.get("source") != "monitor":
        raise MonitorUnreachable(f"{url} is not a Spool monitor")
    return doc


async def gather_status(settings: Settings) -> dict[str, Any]:
    """The monitor's document, or the direct one when the monitor cannot be reached."""
    try:
        return await fetch_monitor_status(settings)
    except MonitorUnreachable as exc:
        return await direct_status(settings, monitor_error=str(exc))


async def direct_status(settings: Settings, *, monitor_error: str) -> dict[str, Any]:
    queues = await queue_report(settings)
    missing = [f"daemon liveness, event counts and alerts (monitor not running: {monitor_error})"]
    missing += queues.missing
    endpoints: list[EndpointInfo] | None = None
    failures: list[dict[str, Any]] | None = None
    try:
        catalogue = await Catalogue.open(settings.catalogue.url)
        try:
            endpoints = await catalogue.endpoints()
            requests = await catalogue.failed_requests(DIRECT_FAILURE_LIMIT, include_retrying=True)
        finally:
            await catalogue.close()
        failures = group_requests(requests)
        if len(requests) >= DIRECT_FAILURE_LIMIT:
            missing.append(f"failures older than the newest {DIRECT_FAILURE_LIMIT} failed requests")
    except Exception as exc:  # SQLAlchemy / driver errors: say so, show the rest
        text = str(exc).splitlines()[0] if str(exc) else repr(exc)
        missing.append(f"failures and endpoint states (catalogue unavailable: {text})")
    doc = {
        "source": "direct",
        "time": datetime.now(UTC),
        "monitor": {"reachable": False, "url": monitor_url(settings), "error": monitor_error},
        "daemons": None,
        "queues": queues,
        "failures": failures,
        "endpoints": endpoints,
        "events": None,
        "malformed": None,
        "moved_bytes": None,
        "tape_mounts": None,
        "alerts": None,
        "missing": missing,
    }
    return to_jsonable_python(doc)  # type: ignore[no-any-return]


def group_requests(requests: list[RequestInfo]) -> list[dict[str, Any]]:
    """Failed / retrying requests as failure groups (the monitor's shape), biggest first.

    ``requests`` come newest first, so each group's example is its most recent failure.
    """
    groups: dict[tuple[str, str, str], dict[str, Any]] = {}
    for r in requests:
        key = (r.kind, r.reason or "unknown", r.state)
        group = groups.get(key)
        if group is None:
            groups[key] = {
                "daemon": r.kind, "reason": key[1], "endpoint": None, "state": r.state, "count": 1,
                "first": r.updated, "last": r.updated, "example": r.name or r.path or r.id,
                "message_id": r.id, "error": r.error or "",
            }  # fmt: skip
            continue
        group["count"] += 1
        group["first"] = min(group["first"], r.updated)
        group["last"] = max(group["last"], r.updated)
    return sorted(groups.values(), key=lambda g: (-g["count"], -g["last"].timestamp()))
