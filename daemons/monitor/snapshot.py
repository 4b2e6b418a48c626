"""The monitor's state as a JSON document, saved in the catalogue and restored by a successor.

Pure: ``dump`` reads a ``MonitorState`` (and the alerts raised but not published yet), ``restore``
writes a document back into an existing state *in place* (the web server, the metrics collector
and the poller hold that object). The catalogue side is ``common.catalogue.monitor_state``; when
and by whom it is written is ``daemons.monitor.role`` and ``daemons.monitor.consumer``.

What is saved: message counts (total, by type, malformed and refused by reason with the last of
each, duplicates), bytes moved, tape mounts, work done per daemon, every failure group (count,
first and last time, example, full error), the alerts raised (the last 100, the count by kind, and
those not published yet, which the successor publishes), and every instance heard from with its
last heartbeat. A group present is a cause already alerted: the successor raises no second alert
for it.

What is not: the throughput samples (the chart starts again), the ids of recent events that
recognise a repeated fact (a fact published again across a take-over counts twice), and which
unknown label values were met first (the bound on them starts again).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from common.messages import AlertRaised
from daemons.monitor.stalls import Stalls
from daemons.monitor.steps import FailureGroup, Instance, MonitorState, RecentIds

VERSION = 1


class UnreadableSnapshot(ValueError):
    """A saved document this monitor cannot restore (another version, or damaged)."""


def dump(state: MonitorState, pending_alerts: Sequence[AlertRaised] = ()) -> dict[str, Any]:
    return {
        "version": VERSION,
        "started": _time(state.started),
        "messages": state.messages,
        "duplicates": state.duplicates,
        "events": dict(state.events),
        "malformed": dict(state.malformed),
        "last_malformed": state.last_malformed,
        "refused": dict(state.refused),
        "last_refused": state.last_refused,
        "moved_bytes": [[event, storage, n] for (event, storage), n in state.moved_bytes.items()],
        "tape_mounts": state.tape_mounts,
        "processed": dict(state.processed),
        "alerts_raised": dict(state.alerts_raised),
        "alerts": [a.model_dump(mode="json") for a in state.alerts],
        "pending_alerts": [a.model_dump(mode="json") for a in pending_alerts],
        "failures": [_group(g) for g in state.failures.values()],
        "instances": [_instance(i) for i in state.instances.values()],
        "stalls": state.stalls.dump(),
    }


def restore(state: MonitorState, doc: dict[str, Any]) -> list[AlertRaised]:
    """Replace what ``state`` counted by ``doc``; return the alerts still to publish.
    ``UnreadableSnapshot`` (and ``state`` untouched) when ``doc`` cannot be read."""
    try:
        if doc.get("version") != VERSION:
            raise UnreadableSnapshot(f"saved state version {doc.get('version')!r}, expected {VERSION}")
        failures = {}
        for raw in doc["failures"]:
            g = _read_group(raw)
            failures[(g.daemon, g.reason, g.endpoint)] = g
        instances = {}
        for raw in doc["instances"]:
            i = _read_instance(raw)
            instances[(i.daemon, i.instance)] = i
        alerts = [AlertRaised.model_validate(a) for a in doc["alerts"]]
        stalls = Stalls(state.stalls.limits)
        stalls.restore(doc.get("stalls", {}))  # absent in a document saved before stalls
        pending = [AlertRaised.model_validate(a) for a in doc["pending_alerts"]]
        moved: Counter[tuple[str, str]] = Counter()
        for event, storage, n in doc["moved_bytes"]:
            moved[(str(event), str(storage))] = int(n)
        values = {
            "started": datetime.fromisoformat(doc["started"]) if doc["started"] else state.started,
            "messages": int(doc["messages"]),
            "duplicates": int(doc["duplicates"]),
            "events": _counter(doc["events"]),
            "malformed": _counter(doc["malformed"]),
            "last_malformed": _text_map(doc["last_malformed"]),
            "refused": _counter(doc["refused"]),
            "last_refused": _text_map(doc["last_refused"]),
            "moved_bytes": moved,
            "tape_mounts": int(doc["tape_mounts"]),
            "processed": {str(k): int(v) for k, v in doc["processed"].items()},
            "alerts_raised": _counter(doc["alerts_raised"]),
        }
    except UnreadableSnapshot:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UnreadableSnapshot(f"saved state unreadable: {type(exc).__name__}: {exc}") from None
    # Everything read: now assign (a half-restored state would mix two monitors' counts).
    for name, value in values.items():
        setattr(state, name, value)
    state.failures = failures
    state.instances = instances
    state.stalls = stalls
    state.alerts.clear()
    state.alerts.extend(alerts)
    # Facts this process recognised before are not repeats for the restored counts (a delivery it
    # gave back when it lost the role comes back to be counted), and the chart's rates would jump.
    state.recent = RecentIds(state.recent.size)
    state.history.clear()
    return pending


def _time(t: datetime | None) -> str | None:
    return None if t is None else t.isoformat()


def _counter(raw: dict[str, Any]) -> Counter[str]:
    return Counter({str(k): int(v) for k, v in raw.items()})


def _text_map(raw: dict[str, Any] | None) -> dict[str, str] | None:
    return None if raw is None else {str(k): str(v) for k, v in raw.items()}


def _group(g: FailureGroup) -> dict[str, Any]:
    return {
        "daemon": g.daemon, "reason": g.reason, "endpoint": g.endpoint, "count": g.count,
        "first": g.first.isoformat(), "last": g.last.isoformat(), "example": g.example,
        "message_id": g.message_id, "error": g.error,
    }  # fmt: skip


def _read_group(raw: dict[str, Any]) -> FailureGroup:
    return FailureGroup(
        daemon=str(raw["daemon"]), reason=str(raw["reason"]), endpoint=_opt(raw["endpoint"]),
        count=int(raw["count"]), first=datetime.fromisoformat(raw["first"]),
        last=datetime.fromisoformat(raw["last"]), example=_opt(raw["example"]),
        message_id=_opt(raw["message_id"]), error=str(raw["error"]),
    )  # fmt: skip


def _instance(i: Instance) -> dict[str, Any]:
    return {
        "daemon": i.daemon, "instance": i.instance, "host": i.host, "pid": i.pid, "version": i.version,
        "started": i.started.isoformat(), "last_heartbeat": i.last_heartbeat.isoformat(),
        "in_flight": i.in_flight, "processed": i.processed, "dead_lettered": i.dead_lettered,
        "retried": i.retried, "queue": i.queue, "retried_by_reason": i.retried_by_reason,
        "dead_by_reason": i.dead_by_reason, "handling": i.handling,
    }  # fmt: skip


def _read_instance(raw: dict[str, Any]) -> Instance:
    return Instance(
        daemon=str(raw["daemon"]), instance=str(raw["instance"]), host=str(raw["host"]),
        pid=int(raw["pid"]), version=str(raw["version"]), started=datetime.fromisoformat(raw["started"]),
        last_heartbeat=datetime.fromisoformat(raw["last_heartbeat"]), in_flight=int(raw["in_flight"]),
        processed=int(raw["processed"]), dead_lettered=int(raw["dead_lettered"]),
        retried=int(raw["retried"]), queue=_opt(raw["queue"]),
        retried_by_reason={str(k): int(v) for k, v in raw["retried_by_reason"].items()},
        dead_by_reason={str(k): int(v) for k, v in raw["dead_by_reason"].items()},
        handling=raw["handling"],
    )  # fmt: skip


def _opt(value: Any) -> str | None:
    return None if value is None else str(value)
