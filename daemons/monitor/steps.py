"""The monitor's pure bookkeeping: who is alive, what flowed, and failures grouped by cause.

No I/O here: ``MonitorState.observe`` takes a decoded message and returns the alerts it warrants;
the handler (``handlers.py``) publishes them. Unit tests drive it with plain messages and a clock.

Decisions:

- **Liveness** of an instance comes from the time its last heartbeat was *sent* (clamped to the
  monitor's clock), against ``bus.heartbeat_interval`` of the monitor's configuration: late after
  ``monitor.heartbeat_late`` intervals (2), dead after ``monitor.heartbeat_dead`` (4). The send time,
  not the arrival time, so a monitor catching up on a backlog does not call a dead daemon alive.
  Hosts therefore need synchronised clocks (NTP), as for any log correlation.
- **Failure groups** are keyed by (daemon, reason code, endpoint when the fact names one): ten
  thousand failures of one cause are one line with a count, first and last time and one example
  with its full error text; a rare cause is its own line, never averaged away.
- **One alert per new group**, not per file: the first failure of a (daemon, reason, endpoint)
  raises one ``alert.raised`` (kind ``endpoint_paused`` when the fact is the replicator's breaker
  pausing an endpoint, else ``new_failure_reason``). The active monitor saves the state in the
  catalogue (``snapshot``, ``role``) and a successor restores it: a group present there is a cause
  already alerted, never alerted again. A group evicted beyond ``max_groups`` alerts again.
- **Throughput over time** comes from the monitor's own samples (``sample``, once per poll) of two
  monotonic totals: messages it saw, and work each daemon reported done in its heartbeats. A
  heartbeat carries its process's running count, so the monitor adds the increase since the
  instance's previous heartbeat; a restarted process is a new instance and starts from zero, and
  the work an instance did before the monitor started is not counted as throughput now.
- Counting is at-least-once like the bus: a message redelivered to the monitor is counted twice.
  The monitor acks a delivery only once a save holding its count is committed (``consumer``), so
  counts survive a killed monitor; ``snapshot`` lists what is saved and what is not.
- **What is believed**: every fact passes ``intake.check_fact`` first (Spool's own users only for
  Spool's facts, numbers finite and in range, times with a UTC offset...). A refused fact changes
  nothing but ``refused`` (by reason) and ``last_refused``. Labels (reasons, storages, daemons) are
  bounded by ``intake.Labels``: beyond the known and the first few unknown values, ``other``.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from itertools import pairwise
from typing import Any, Literal

from common.messages import AlertRaised, DaemonHeartbeat, FileIngested, Message, ReplicaCreated, utcnow
from daemons.monitor.intake import (
    MAX_INSTANCES,
    TOO_MANY_INSTANCES,
    MonitorLabels,
    Refused,
    check_fact,
    cut,
    read_details,
)
from daemons.monitor.stalls import Stall, Stalls

Liveness = Literal["alive", "late", "dead"]
NEW_FAILURE_REASON = "new_failure_reason"
ENDPOINT_PAUSED = "endpoint_paused"
# Failure facts that do not name their daemon: who publishes them.
PUBLISHED_BY = {"endpoint.paused": "replicator"}
# Fields naming the endpoint (storage) a failure fact is about, in order of preference.
ENDPOINT_FIELDS = ("storage", "destination", "endpoint")
MAX_ERROR_TEXT = 4000
# Samples kept for the throughput chart: 30 minutes at the default 5 s poll interval.
HISTORY_POINTS = 360


def liveness(age: float, interval: float, late: float, dead: float) -> Liveness:
    """State of an instance whose last heartbeat is ``age`` seconds old."""
    if age >= dead * interval:
        return "dead"
    if age >= late * interval:
        return "late"
    return "alive"


@dataclass(frozen=True)
class Thresholds:
    interval: float  # bus.heartbeat_interval
    late: float = 2.0
    dead: float = 4.0
    forget: float = 3600.0  # seconds after which a dead instance is dropped


@dataclass
class Instance:
    daemon: str
    instance: str
    host: str
    pid: int
    version: str
    started: datetime
    last_heartbeat: datetime
    in_flight: int = 0
    processed: int = 0
    dead_lettered: int = 0
    retried: int = 0
    queue: str | None = None
    # From the heartbeat's details (the runner's counts): retries and dead letters by reason, and
    # the handling-time histogram {"buckets": [...], "counts": [...], "sum": s}.
    retried_by_reason: dict[str, int] = field(default_factory=dict)
    dead_by_reason: dict[str, int] = field(default_factory=dict)
    handling: dict[str, Any] | None = None
    # (seconds held, what) of the delivery its handlers have held longest, at that heartbeat.
    oldest_delivery: tuple[float, str] | None = None


@dataclass
class InstanceView:
    """An instance as shown to the operator: its last heartbeat plus the state derived from it."""

    daemon: str
    instance: str
    host: str
    pid: int
    version: str
    started: datetime
    last_heartbeat: datetime
    age: float
    state: Liveness
    in_flight: int
    processed: int
    dead_lettered: int
    retried: int
    queue: str | None


@dataclass
class FailureGroup:
    daemon: str
    reason: str
    endpoint: str | None
    count: int
    first: datetime
    last: datetime
    example: str | None  # a file name (or path / message id) that failed this way
    message_id: str | None
    error: str  # the example's full error text


@dataclass(frozen=True)
class FailureFact:
    daemon: str
    reason: str
    endpoint: str | None
    error: str
    example: str | None
    message_id: str | None


# Message classes with a ``reason`` field, looked up once per class: most messages the monitor sees
# have none, and a missing attribute on a pydantic model is an exception raised and caught.
_HAS_REASON: dict[type[Message], bool] = {}


def failure_fact(msg: Message) -> FailureFact | None:
    """A message stating that something failed (``file.failed``, ``endpoint.paused``, ...): any
    model with a ``reason`` code. Alerts carry a reason too but are the monitor's own echo."""
    cls = type(msg)
    has_reason = _HAS_REASON.get(cls)
    if has_reason is None:
        has_reason = _HAS_REASON[cls] = "reason" in cls.model_fields and cls is not AlertRaised
    if not has_reason:
        return None
    reason = getattr(msg, "reason", None)
    if not isinstance(reason, str):
        return None
    daemon = getattr(msg, "daemon", None) or PUBLISHED_BY.get(msg.ROUTING_KEY) or msg.source
    endpoint = next((v for f in ENDPOINT_FIELDS if isinstance(v := getattr(msg, f, None), str)), None)
    example = getattr(msg, "name", None) or getattr(msg, "path", None)
    message_id = getattr(msg, "message_id", None) or msg.id
    error = str(getattr(msg, "error", "") or "")
    return FailureFact(
        str(daemon), reason, endpoint, error[:MAX_ERROR_TEXT], cut(example), cut(message_id, 256)
    )


def is_tape_mount(routing_key: str) -> bool:
    """Tape mount events (``tape.mounted``, ``tape.mount``): counted, whatever their payload."""
    return routing_key.startswith("tape.mount")


@dataclass(frozen=True)
class Sample:
    """Running totals at one moment; the chart plots the rate between consecutive samples."""

    time: datetime
    messages: int  # every message the monitor saw (malformed ones included)
    processed: dict[str, int]  # per daemon: work reported done in heartbeats since the monitor started


class RecentIds:
    """Ids of the last ``size`` events. Facts are sent at least once, a repeat under the same id
    (a redelivered message, an outbox row published again after a kill): inside this window it
    is recognised and not counted twice. About 120 bytes per id."""

    def __init__(self, size: int = 100_000) -> None:
        self.size = size
        self._ids: set[str] = set()
        self._order: deque[str] = deque()

    def seen(self, id_: str) -> bool:
        """True when ``id_`` came before (inside the window); remembers it otherwise."""
        if id_ in self._ids:
            return True
        self._ids.add(id_)
        self._order.append(id_)
        if len(self._order) > self.size:
            self._ids.discard(self._order.popleft())
        return False


@dataclass
class MonitorState:
    thresholds: Thresholds
    clock: Callable[[], datetime] = utcnow
    max_groups: int = 1000
    instances: dict[tuple[str, str], Instance] = field(default_factory=dict)
    events: Counter[str] = field(default_factory=Counter)
    malformed: Counter[str] = field(default_factory=Counter)
    last_malformed: dict[str, str] | None = None
    failures: dict[tuple[str, str, str | None], FailureGroup] = field(default_factory=dict)
    moved_bytes: Counter[tuple[str, str]] = field(default_factory=Counter)  # (event, storage)
    tape_mounts: int = 0
    alerts: deque[AlertRaised] = field(default_factory=lambda: deque(maxlen=100))
    alerts_raised: Counter[str] = field(default_factory=Counter)
    messages: int = 0
    duplicates: int = 0  # events seen again under the same id, not counted again
    recent: RecentIds = field(default_factory=RecentIds, repr=False)
    processed: dict[str, int] = field(default_factory=dict)  # per daemon, see ``Sample``
    history: deque[Sample] = field(default_factory=lambda: deque(maxlen=HISTORY_POINTS))
    started: datetime | None = None  # the clock's time at creation unless given
    labels: MonitorLabels = field(default_factory=MonitorLabels.create, repr=False)
    refused: Counter[str] = field(default_factory=Counter)  # facts not believed, by reason
    last_refused: dict[str, str] | None = None
    # Told of each refusal (the handlers log them, folded per reason).
    on_refused: Callable[[str, Refused], None] | None = field(default=None, repr=False)
    # Work in progress past its limit (``stalls``): from the heartbeats and the poller.
    stalls: Stalls = field(default_factory=lambda: Stalls({}))

    def __post_init__(self) -> None:
        if self.started is None:
            self.started = self.clock()

    # --- input ---------------------------------------------------------------------------------
    def observe(self, msg: Message, *, trusted: bool = True) -> list[AlertRaised]:
        """Account for one message; return the alerts it raises (at most one). ``trusted``: the
        delivery came from one of Spool's broker users (see ``intake``).

        On the monitor's hot path (every message of the pipeline): cheap checks first."""
        key = msg.ROUTING_KEY
        self.messages += 1
        try:
            check_fact(msg, trusted=trusted)
            if isinstance(msg, DaemonHeartbeat):
                alerts = self._heartbeat(msg)
                self.events[key] += 1
                self._remember(alerts)
                return alerts
        except Refused as refused:
            self._refuse(key, refused)
            return []
        if self.recent.seen(msg.id):
            self.duplicates += 1
            return []
        self.events[key] += 1
        if isinstance(msg, FileIngested | ReplicaCreated):
            self.moved_bytes[(key, self.labels.storages(msg.storage))] += msg.size
        if is_tape_mount(key):
            self.tape_mounts += 1
        fact = failure_fact(msg)
        if fact is None:
            return []
        alert = self._failure(self._bounded(fact), msg.time, paused=key == "endpoint.paused")
        return [alert] if alert is not None else []

    def _refuse(self, routing_key: str, refused: Refused) -> None:
        self.refused[refused.reason] += 1
        self.last_refused = {
            "routing_key": routing_key[:255], "reason": refused.reason,
            "error": refused.detail[:MAX_ERROR_TEXT], "time": self.clock().isoformat(),
        }  # fmt: skip
        if self.on_refused is not None:
            self.on_refused(routing_key, refused)

    def _bounded(self, fact: FailureFact) -> FailureFact:
        """The fact with its labels bounded (``intake.Labels``): the failure table stays small."""
        labels = self.labels
        endpoint = None if fact.endpoint is None else labels.storages(fact.endpoint)
        return replace(
            fact, daemon=labels.daemons(fact.daemon), reason=labels.reasons(fact.reason), endpoint=endpoint
        )

    def observe_malformed(self, routing_key: str, reason: str, error: str) -> None:
        self.messages += 1
        self.malformed[self.labels.malformed(reason)] += 1
        self.last_malformed = {
            "routing_key": routing_key[:255], "reason": reason, "error": error[:MAX_ERROR_TEXT],
            "time": self.clock().isoformat(),
        }  # fmt: skip

    def _heartbeat(self, beat: DaemonHeartbeat) -> list[AlertRaised]:
        sent = min(beat.time, self.clock())
        key = (beat.daemon, beat.instance)
        known = self.instances.get(key)
        if known is not None and known.last_heartbeat > sent:
            return []  # an older heartbeat arriving late (concurrent handlers, redelivery)
        details = read_details(beat.details, self.labels.reasons)
        if known is None and len(self.instances) >= MAX_INSTANCES and not self._make_room():
            raise Refused(TOO_MANY_INSTANCES, f"{MAX_INSTANCES} instances listed, none of them dead")
        if known is not None:
            done = max(0, beat.processed - known.processed)
        else:  # first heartbeat of this instance: its work since the monitor started, if any
            done = beat.processed if self.started is not None and beat.started >= self.started else 0
        self.processed[beat.daemon] = self.processed.get(beat.daemon, 0) + done
        self.instances[key] = Instance(
            daemon=beat.daemon, instance=beat.instance, host=beat.host, pid=beat.pid,
            version=beat.version, started=beat.started, last_heartbeat=sent,
            in_flight=beat.in_flight, processed=beat.processed, dead_lettered=beat.failed,
            retried=details.retried, queue=details.queue,
            retried_by_reason=details.retried_by_reason or {}, dead_by_reason=details.dead_by_reason or {},
            handling=details.handling, oldest_delivery=details.oldest_delivery,
        )  # fmt: skip
        holder = f"{beat.daemon}@{beat.host}:{beat.pid}"
        return self.stalls.heartbeat(beat.instance, beat.daemon, holder, details.oldest_delivery, sent)

    def _remember(self, alerts: list[AlertRaised]) -> None:
        for alert in alerts:
            self.alerts.append(alert)
            self.alerts_raised[alert.kind] += 1

    def observe_stalled(self, found: list[Stall]) -> list[AlertRaised]:
        """The catalogue's work in progress past its limits (the poller's look); new ones alert."""
        alerts = self.stalls.report("catalogue", found)
        self._remember(alerts)
        return alerts

    def _make_room(self) -> bool:
        """Forget the dead instance heard from least recently, if any; whether one was."""
        now = self.clock()
        t = self.thresholds
        dead = [
            i for i in self.instances.values()
            if liveness((now - i.last_heartbeat).total_seconds(), t.interval, t.late, t.dead) == "dead"
        ]  # fmt: skip
        if not dead:
            return False
        oldest = min(dead, key=lambda i: i.last_heartbeat)
        del self.instances[(oldest.daemon, oldest.instance)]
        return True

    def _failure(self, fact: FailureFact, when: datetime, *, paused: bool = False) -> AlertRaised | None:
        key = (fact.daemon, fact.reason, fact.endpoint)
        group = self.failures.get(key)
        if group is not None:
            group.count += 1
            group.first = min(group.first, when)
            group.last = max(group.last, when)
            return None
        if len(self.failures) >= self.max_groups:
            oldest = min(self.failures, key=lambda k: self.failures[k].last)
            del self.failures[oldest]
        self.failures[key] = FailureGroup(
            daemon=fact.daemon, reason=fact.reason, endpoint=fact.endpoint, count=1, first=when,
            last=when, example=fact.example or fact.message_id, message_id=fact.message_id,
            error=fact.error,
        )  # fmt: skip
        where = f" on {fact.endpoint}" if fact.endpoint else ""
        if paused:
            kind = ENDPOINT_PAUSED
            summary = f"endpoint {fact.endpoint} paused by the {fact.daemon}: {fact.reason}: "
            summary += fact.error[:300]
        else:
            kind = NEW_FAILURE_REASON
            summary = f"{fact.daemon}: new failure reason {fact.reason}{where}: {fact.error[:300]}"
        alert = AlertRaised(
            kind=kind,
            summary=summary,
            daemon=fact.daemon, reason=fact.reason, endpoint=fact.endpoint,
            example=fact.example or fact.message_id, error=fact.error,
        )  # fmt: skip
        self.alerts.append(alert)
        self.alerts_raised[alert.kind] += 1
        return alert

    def sample(self, now: datetime | None = None) -> Sample:
        """Record the running totals now (called once per poll) for ``throughput``."""
        point = Sample(now or self.clock(), self.messages, dict(self.processed))
        self.history.append(point)
        return point

    # --- views ---------------------------------------------------------------------------------
    def throughput(self) -> list[dict[str, Any]]:
        """Rates between consecutive samples, oldest first: messages/s on the bus and, per daemon,
        work done/s. A daemon absent from the earlier sample starts from zero."""
        points: list[dict[str, Any]] = []
        samples = list(self.history)
        for before, after in pairwise(samples):
            seconds = (after.time - before.time).total_seconds()
            if seconds <= 0:
                continue
            processed = {
                daemon: round((n - before.processed.get(daemon, 0)) / seconds, 1)
                for daemon, n in sorted(after.processed.items())
            }
            points.append({
                "time": after.time, "seconds": round(seconds, 3),
                "messages": round((after.messages - before.messages) / seconds, 1), "processed": processed,
            })  # fmt: skip
        return points

    def daemons(self, now: datetime | None = None) -> list[InstanceView]:
        now = now or self.clock()
        t = self.thresholds
        views = []
        for i in self.instances.values():
            age = max(0.0, (now - i.last_heartbeat).total_seconds())
            views.append(
                InstanceView(
                    daemon=i.daemon, instance=i.instance, host=i.host, pid=i.pid, version=i.version,
                    started=i.started, last_heartbeat=i.last_heartbeat, age=round(age, 3),
                    state=liveness(age, t.interval, t.late, t.dead), in_flight=i.in_flight,
                    processed=i.processed, dead_lettered=i.dead_lettered, retried=i.retried,
                    queue=i.queue,
                )
            )  # fmt: skip
        return sorted(views, key=lambda v: (v.daemon, v.host, v.started))

    def failure_groups(self) -> list[FailureGroup]:
        """Biggest first; equal counts newest first. Every group is listed, rare ones included."""
        return sorted(self.failures.values(), key=lambda g: (-g.count, -g.last.timestamp()))

    def prune(self, now: datetime | None = None) -> list[str]:
        """Forget instances dead for longer than ``thresholds.forget``; return their ids."""
        now = now or self.clock()
        limit = self.thresholds.forget + self.thresholds.dead * self.thresholds.interval
        gone = [k for k, i in self.instances.items() if (now - i.last_heartbeat).total_seconds() > limit]
        for key in gone:
            del self.instances[key]
            self.stalls.forget(key[1])
        return [instance for _daemon, instance in gone]
