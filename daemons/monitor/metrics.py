"""Prometheus metrics, computed at scrape time from the monitor's state.

A custom collector rather than counters updated on every message: the handler stays a dictionary
update, liveness (which depends on *now*) is always current, and nothing is kept twice.

Per-instance counters (``processed``, ``retried``, ``dead_lettered``) are the heartbeat's own
monotonic counts, labelled by ``daemon`` and ``instance`` (a restarted process is a new instance,
hence a new series): sum them by ``daemon`` in PromQL. Retries and dead letters by reason, and
the handling-time histogram ``spool_handling_seconds``, come from the runner's counts that every
heartbeat carries; the histogram is summed over a daemon's known instances.

``spool_monitor_active`` is 1 on the active monitor and 0 on a standby (``daemons.monitor.role``),
which exports nothing else but its process's own ``process_*``: Prometheus may scrape both
monitors and every sum stays right.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from daemons.monitor.report import Observed
from daemons.monitor.role import RoleKeeper
from daemons.monitor.steps import MonitorState

LIVENESS = ("alive", "late", "dead")
MAX_EXPORTED = 1e300


class MonitorCollector(Collector):
    def __init__(self, state: MonitorState, observed: Observed, role: RoleKeeper | None = None) -> None:
        self.state = state
        self.observed = observed
        self.role = role

    def collect(self) -> Iterator[Metric]:
        active = self.role is None or self.role.active
        role = _gauge("spool_monitor_active", "1 on the active monitor, 0 on a standby.", [])
        role.add_metric([], 1.0 if active else 0.0)
        yield role
        if not active:  # a standby's figures are the active one's: scraping both sums nothing twice
            return
        yield from self._daemons()
        yield from self._reasons_and_handling()
        yield from self._events()
        yield from self._queues()

    def _daemons(self) -> Iterator[Metric]:
        views = self.state.daemons()
        per = ["daemon", "instance", "host"]
        processed = _counter("spool_processed_messages", "Messages handled successfully (heartbeats).", per)
        retried = _counter("spool_retried_messages", "Messages sent to a retry tier (heartbeats).", per)
        dead = _counter("spool_dead_lettered_messages", "Messages dead-lettered (heartbeats).", per)
        in_flight = _gauge("spool_in_flight_messages", "Messages an instance is handling now.", per)
        age = _gauge("spool_heartbeat_age_seconds", "Seconds since the last heartbeat was sent.", per)
        count = _gauge("spool_daemon_instances", "Instances per daemon and liveness.", ["daemon", "state"])
        per_state: dict[tuple[str, str], int] = {}
        for v in views:
            key = [v.daemon, v.instance, v.host]
            processed.add_metric(key, _v(v.processed))
            retried.add_metric(key, _v(v.retried))
            dead.add_metric(key, _v(v.dead_lettered))
            in_flight.add_metric(key, _v(v.in_flight))
            age.add_metric(key, _v(v.age))
            per_state[(v.daemon, v.state)] = per_state.get((v.daemon, v.state), 0) + 1
        for daemon in sorted({v.daemon for v in views}):
            for state in LIVENESS:
                count.add_metric([daemon, state], _v(per_state.get((daemon, state), 0)))
        yield from (processed, retried, dead, in_flight, age, count)

    def _reasons_and_handling(self) -> Iterator[Metric]:
        per = ["daemon", "instance", "host", "reason"]
        retries = _counter("spool_retries", "Messages sent to a retry tier, by reason (heartbeats).", per)
        dead = _counter("spool_dead_letters", "Messages dead-lettered, by reason (heartbeats).", per)
        handling = HistogramMetricFamily(
            "spool_handling_seconds", "Time handlers took per message (heartbeats).", labels=["daemon"]
        )
        summed: dict[str, tuple[list[float], list[int], float]] = {}
        for i in self.state.instances.values():
            for reason, n in sorted(i.retried_by_reason.items()):
                retries.add_metric([i.daemon, i.instance, i.host, reason], _v(n))
            for reason, n in sorted(i.dead_by_reason.items()):
                dead.add_metric([i.daemon, i.instance, i.host, reason], _v(n))
            h = i.handling
            if h is None:
                continue
            known = summed.get(i.daemon)
            if known is None:
                summed[i.daemon] = (h["buckets"], list(h["counts"]), h["sum"])
            elif known[0] == h["buckets"]:  # instances of one version share the buckets
                summed[i.daemon] = (known[0], [a + b for a, b in zip(known[1], h["counts"], strict=True)],
                                    known[2] + h["sum"])  # fmt: skip
        for daemon, (bounds, counts, total) in sorted(summed.items()):
            cumulative, running = [], 0
            for bound, n in zip([*(str(b) for b in bounds), "+Inf"], counts, strict=True):
                running += n
                cumulative.append((bound, _v(running)))
            handling.add_metric([daemon], cumulative, sum_value=_v(total))
        yield from (retries, dead, handling)

    def _events(self) -> Iterator[Metric]:
        s = self.state
        events = _counter("spool_events", "Messages seen on the bus, by type.", ["type"])
        for key, n in sorted(s.events.items()):
            events.add_metric([key], _v(n))
        malformed = _counter(
            "spool_malformed_events", "Undecodable / unknown / invalid messages ignored.", ["reason"]
        )
        for reason, n in sorted(s.malformed.items()):
            malformed.add_metric([reason], _v(n))
        failures = _counter(
            "spool_failures",
            "Failure facts (file.failed, endpoint.paused, ...) by daemon, reason and endpoint.",
            ["daemon", "reason", "endpoint"],
        )
        for g in s.failure_groups():
            failures.add_metric([g.daemon, g.reason, g.endpoint or ""], _v(g.count))
        moved = _counter(
            "spool_moved_bytes",
            "Bytes of verified copies (file.ingested, replica.created).",
            ["event", "storage"],
        )
        for (event, storage), n in sorted(s.moved_bytes.items()):
            moved.add_metric([event, storage], _v(n))
        mounts = _counter("spool_tape_mounts", "Tape mount events seen.", [])
        mounts.add_metric([], _v(s.tape_mounts))
        alerts = _counter("spool_alerts", "Alerts raised by the monitor.", ["kind"])
        for kind, n in sorted(s.alerts_raised.items()):
            alerts.add_metric([kind], _v(n))
        refused = _counter(
            "spool_refused_facts",
            "Facts the monitor did not believe (see daemons/monitor/intake.py).",
            ["reason"],
        )
        for reason, n in sorted(s.refused.items()):
            refused.add_metric([reason], _v(n))
        folded = _counter(
            "spool_folded_label_values", "Label values counted under 'other' (beyond the bound).", ["label"]
        )
        for labels in s.labels.all():
            folded.add_metric([labels.name], _v(labels.folded))
        yield from (events, malformed, failures, moved, mounts, alerts, refused, folded)

    def _queues(self) -> Iterator[Metric]:
        report = self.observed.queues
        up = _gauge("spool_management_api_up", "1 when the RabbitMQ management API answered.", [])
        up.add_metric([], _v(1 if report is not None and report.management.reachable else 0))
        yield up
        if report is None:
            return
        per = ["daemon", "queue"]
        ready = _gauge("spool_queue_ready_messages", "Messages waiting in a work queue.", per)
        unacked = _gauge("spool_queue_unacked_messages", "Delivered, not yet acked (in flight).", per)
        consumers = _gauge("spool_queue_consumers", "Consumers of a work queue.", per)
        retrying = _gauge(
            "spool_queue_retrying_messages", "Messages waiting in a retry tier.", [*per, "tier"]
        )
        dead = _gauge("spool_queue_dead_messages", "Messages in a dead-letter queue.", per)
        for q in report.queues:
            if q.ready is not None:
                ready.add_metric([q.daemon, q.queue], _v(q.ready))
            if q.in_flight is not None:
                unacked.add_metric([q.daemon, q.queue], _v(q.in_flight))
            if q.consumers is not None:
                consumers.add_metric([q.daemon, q.queue], _v(q.consumers))
            for t in q.retry:
                if t.waiting is not None:
                    retrying.add_metric([q.daemon, t.queue, str(t.tier)], _v(t.waiting))
            if q.dead is not None:
                dead.add_metric([q.daemon, q.dead_queue], _v(q.dead))
        yield from (ready, unacked, consumers, retrying, dead)


def _v(value: float) -> float:
    """A value Prometheus' text format can carry: finite, within the float range. The monitor's
    facts are checked at its door (``intake``); its own sums are clamped here, the last guard of
    /metrics answering at all."""
    try:
        number = float(value)
    except (OverflowError, TypeError, ValueError):
        return MAX_EXPORTED if isinstance(value, int) and value > 0 else 0.0
    if math.isnan(number):
        return 0.0
    return max(-MAX_EXPORTED, min(MAX_EXPORTED, number))


def _counter(name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=labels)


def _gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)


def build_registry(
    state: MonitorState, observed: Observed, role: RoleKeeper | None = None
) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MonitorCollector(state, observed, role))
    ProcessCollector(registry=registry)  # the monitor's own CPU / memory / file descriptors
    return registry
