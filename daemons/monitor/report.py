"""What the monitor knows, as one JSON document: ``/api/status``, and what ``spool status`` shows.

The same keys are produced by ``common.status.direct_status`` when the monitor is not running
(with ``daemons``, ``events``, ``throughput`` and ``alerts`` then ``null`` and ``missing`` saying
why), so the CLI renders one shape. ``None`` always means "not known", never zero.

``monitor.role`` says whether this monitor is ``active`` or ``standby`` (``daemons.monitor.role``),
with ``active_instance`` and when the state shown was saved; a standby shows the active one's last
saved state and says so in ``missing``.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from pydantic_core import to_jsonable_python

from common import __version__
from common.bus.queue_stats import QueueReport
from common.catalogue import EndpointInfo
from common.messages import utcnow
from daemons.monitor.steps import MonitorState

if TYPE_CHECKING:
    from daemons.monitor.role import RoleKeeper


@dataclass
class Observed:
    """What the monitor's poller saw last (queues from the broker, endpoints from the catalogue)."""

    queues: QueueReport | None = None
    endpoints: list[EndpointInfo] | None = None
    catalogue_error: str | None = "not looked at yet"
    started: datetime = field(default_factory=utcnow)
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)


def status_document(
    state: MonitorState, observed: Observed, *, now: datetime | None = None, role: RoleKeeper | None = None
) -> dict[str, Any]:
    now = now or state.clock()
    missing: list[str] = []
    described: dict[str, Any] = role.describe() if role is not None else {"role": "active"}
    if described["role"] == "standby":
        saved = described.get("state_saved_at")
        missing.append(
            f"live counts (standby monitor; active: {described.get('active_instance') or 'none'}; "
            f"showing the state it saved at {saved.isoformat() if saved else 'never'})"
        )
        if described.get("catalogue_error"):
            missing.append(f"the monitor role ({described['catalogue_error']})")
    if observed.queues is None:
        missing.append("queues (not looked at yet)")
    else:
        missing += observed.queues.missing
    if observed.catalogue_error is not None:
        missing.append(f"endpoint states ({observed.catalogue_error})")
    doc: dict[str, Any] = {
        "source": "monitor",
        "time": now,
        "monitor": {
            "reachable": True,
            "host": observed.host,
            "pid": observed.pid,
            "version": __version__,
            "started": observed.started,
            "heartbeat_interval": state.thresholds.interval,
            "late_after": state.thresholds.late * state.thresholds.interval,
            "dead_after": state.thresholds.dead * state.thresholds.interval,
            **described,
        },
        "daemons": state.daemons(now),
        "queues": observed.queues,
        "failures": state.failure_groups(),
        "stalled": [s.as_dict() for s in state.stalls.current()],
        "endpoints": observed.endpoints,
        "events": dict(sorted(state.events.items())),
        "malformed": {
            "total": sum(state.malformed.values()),
            "by_reason": dict(state.malformed),
            "last": state.last_malformed,
        },
        "refused": {
            "total": sum(state.refused.values()),
            "by_reason": dict(state.refused),
            "last": state.last_refused,
        },
        "moved_bytes": _moved(state),
        "tape_mounts": state.tape_mounts,
        "messages": state.messages,
        "duplicates": state.duplicates,
        "processed": dict(sorted(state.processed.items())),
        "throughput": state.throughput(),
        "alerts": list(reversed(state.alerts)),
        "missing": missing,
    }
    return to_jsonable_python(doc)  # type: ignore[no-any-return]


def _moved(state: MonitorState) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for (event, storage), n in state.moved_bytes.items():
        out.setdefault(event, {})[storage] = n
    return out
