"""Work in progress for longer than its kind's limit: the monitor's ``stalled`` alerts.

Pure bookkeeping, like ``steps``. Two sources report what is in progress:

- **heartbeats**: each instance's runner names the delivery a handler has held longest
  (``details.oldest_delivery``: seconds, what). Held past ``delivery`` seconds it is stalled: a
  copy that does not end, a handler waiting on something that will not come. Reported per
  instance; a heartbeat without it (or under the limit) clears that instance's stall.
- **the catalogue** (the poller, ``common.catalogue.stalls``): tape copies ``archiving`` past
  ``tape_write``, recall files ``staging`` past ``tape_read``, recall requests without progress
  past ``recall``, each by the instance holding them.

A stall raises **one** ``alert.raised`` (kind ``stalled``) when it appears, naming the holder
(daemon, host, pid: the instance id is ``daemon@node:pid:random``, a heartbeat's holder is
``daemon@host:pid``) and the work; it stays listed (``spool status``, the dashboard) while it
lasts and is forgotten when its source no longer reports it, so the same holder stalling again
later alerts again. Saved with the monitor's state (``snapshot``): a successor does not alert
again for a stall already alerted.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from common.messages import AlertRaised

STALLED = "stalled"
KINDS = ("delivery", "tape_write", "tape_read", "recall")
MAX_STALLS = 1000  # listed at once; beyond, the oldest are dropped (a flood is one alert each anyway)
WHAT = {
    "delivery": "a delivery held by its handler",
    "tape_write": "tape copies being written",
    "tape_read": "recall files being read from tape",
    "recall": "recall requests without progress",
}


@dataclass
class Stall:
    kind: str
    holder: str  # who holds the work ("nobody" for a request waiting)
    daemon: str
    what: str  # one example of the work
    since: datetime  # the work's start (or last progress)
    items: int = 1

    @property
    def key(self) -> tuple[str, str, str]:
        # A delivery is itself (its message id is in ``what``); catalogue work is one per holder.
        return (self.kind, self.holder, self.what if self.kind == "delivery" else "")

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "holder": self.holder, "daemon": self.daemon, "what": self.what,
                "since": self.since.isoformat(), "items": self.items}  # fmt: skip


def daemon_of(holder: str) -> str:
    return holder.split("@", 1)[0] if "@" in holder else "recall"


class Stalls:
    def __init__(self, limits: dict[str, float]) -> None:
        self.limits = limits
        # source -> the stalls it reported last; a source is "catalogue" or a heartbeat's instance.
        self.by_source: dict[str, dict[tuple[str, str, str], Stall]] = {}

    def report(self, source: str, found: list[Stall]) -> list[AlertRaised]:
        """``source`` now reports ``found`` (replacing what it reported before); the alerts for the
        stalls no source had reported."""
        known = {key for stalls in self.by_source.values() for key in stalls}
        now = {s.key: s for s in found}
        if now:
            self.by_source[source] = now
        else:
            self.by_source.pop(source, None)
        self._bound()
        return [_alert(s) for key, s in now.items() if key not in known]

    def heartbeat(self, source: str, daemon: str, holder: str, oldest: tuple[float, str] | None,
                  at: datetime) -> list[AlertRaised]:  # fmt: skip
        limit = self.limits.get("delivery")
        if oldest is None or limit is None or oldest[0] <= limit:
            return self.report(source, [])
        since = at - timedelta(seconds=oldest[0])
        return self.report(source, [Stall("delivery", holder, daemon, oldest[1], since)])

    def forget(self, source: str) -> None:
        self.by_source.pop(source, None)

    def current(self) -> list[Stall]:
        return sorted(
            (s for stalls in self.by_source.values() for s in stalls.values()), key=lambda s: s.since
        )

    def _bound(self) -> None:
        stalls = self.current()
        for s in stalls[: max(0, len(stalls) - MAX_STALLS)]:
            for source, entries in list(self.by_source.items()):
                if entries.pop(s.key, None) is not None and not entries:
                    del self.by_source[source]

    # --- saved with the monitor's state ------------------------------------------------------
    def dump(self) -> dict[str, list[dict[str, Any]]]:
        return {source: [s.as_dict() for s in stalls.values()] for source, stalls in self.by_source.items()}

    def restore(self, doc: dict[str, list[dict[str, Any]]]) -> None:
        self.by_source = {
            source: {s.key: s for s in (_stall(d) for d in entries)} for source, entries in doc.items()
        }


def _stall(d: dict[str, Any]) -> Stall:
    return Stall(
        d["kind"], d["holder"], d["daemon"], d["what"], datetime.fromisoformat(d["since"]), d["items"]
    )


def _alert(s: Stall) -> AlertRaised:
    many = f"{s.items} " if s.items > 1 else ""
    what = WHAT.get(s.kind, s.kind)
    summary = f"stalled: {many}{what} by {s.holder} since {s.since:%Y-%m-%d %H:%M:%S}Z: {s.what}"
    return AlertRaised(
        kind=STALLED, summary=summary[:1000], daemon=s.daemon, reason=s.kind, example=s.what[:1000],
    )  # fmt: skip
