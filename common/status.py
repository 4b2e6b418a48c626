"""The status document ``spool status`` shows: from the monitor when it runs, otherwise assembled
directly from the broker and the catalogue, with what is then missing named.

The monitor serves the document at ``/api/status`` (``daemons.monitor.report``). Without it, queues
still come from the broker (``common.bus.queue_stats``), failures from the catalogue's failed and
retrying requests grouped by (kind, reason, state), endpoint states from the catalogue; daemon
liveness, event counts, throughput and alerts need the monitor and are ``null``.

Nothing here costs per file: the grouping is one ``GROUP BY`` in the catalogue plus one indexed
look-up per group for its newest example, so a night with 100,000 files and 10,000 failures answers
as fast as an empty one (``bench/status.py``).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import aiohttp
from pydantic_core import to_jsonable_python

from common.bus.queue_stats import queue_report
from common.config import Settings
from common.errors import ConfigError

if TYPE_CHECKING:
    from common.catalogue import EndpointInfo

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
        token = settings.monitor.token()  # a monitor listening beyond this host needs it
    except ConfigError as exc:
        raise MonitorUnreachable(str(exc)) from None
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=MONITOR_TIMEOUT)) as session,
            session.get(url, headers=headers) as response,
        ):
            if response.status == 401:
                why = "the token was refused" if token else "it needs a token"
                raise MonitorUnreachable(f"{url}: {why} (monitor.token_file or SPOOL_MONITOR_TOKEN)")
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
    """The broker's and the catalogue's answers, asked at the same time."""
    queues, (endpoints, failures, catalogue_gap) = await asyncio.gather(
        queue_report(settings), _from_catalogue(settings)
    )
    missing = [f"daemon liveness, event counts and alerts (monitor not running: {monitor_error})"]
    missing += queues.missing
    if catalogue_gap is not None:
        missing.append(catalogue_gap)
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
        "messages": None,
        "processed": None,
        "throughput": None,
        "alerts": None,
        "missing": missing,
    }
    return to_jsonable_python(doc)  # type: ignore[no-any-return]


async def _from_catalogue(
    settings: Settings,
) -> tuple[list[EndpointInfo] | None, list[dict[str, Any]] | None, str | None]:
    """Endpoint states and failure groups, and what is missing (``None``: nothing)."""
    # The catalogue (SQLAlchemy, Alembic) is imported only here: with the monitor running,
    # `spool status` never needs it, and importing it is most of the command's start-up time.
    from common.catalogue import Catalogue
    from common.catalogue.failures import MAX_GROUPS

    try:
        catalogue = await Catalogue.open(settings.catalogue.url)
        try:
            endpoints = await catalogue.endpoints.all()
            failures = await catalogue.queries.failure_groups()
        finally:
            await catalogue.close()
    except Exception as exc:  # SQLAlchemy / driver errors: say so, show the rest
        text = str(exc).splitlines()[0] if str(exc) else repr(exc)
        return None, None, f"failures and endpoint states (catalogue unavailable: {text})"
    gap = f"failure causes beyond the {MAX_GROUPS} biggest" if len(failures) >= MAX_GROUPS else None
    return endpoints, failures, gap
