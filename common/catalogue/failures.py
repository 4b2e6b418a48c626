"""Failure groups straight from the catalogue, for `spool status` when the monitor is not running:
the monitor's shape (daemon, reason, endpoint, count, first, last, example), from the requests
table's failed and retrying rows."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, and_, func, select

from common.catalogue.schema import requests as rq

# Request states that are failures, final or not yet.
FAILURE_STATES = ("failed", "retrying")
# Failure groups read from the catalogue at most (causes, not files: a night has a handful).
MAX_GROUPS = 500


def failure_groups(conn: Connection) -> list[dict[str, Any]]:
    """Failed and retrying requests as failure groups (the monitor's shape), biggest first, each
    with its newest failure as the example. One grouped query, then one look-up per group that
    walks the (state, updated) index from the newest end."""
    updated = rq.c.updated
    grouped = (
        select(
            rq.c.kind, rq.c.reason, rq.c.state, func.count().label("n"),
            func.min(updated, type_=updated.type).label("first"),
            func.max(updated, type_=updated.type).label("last"),
        )
        .where(rq.c.state.in_(FAILURE_STATES))
        .group_by(rq.c.kind, rq.c.reason, rq.c.state)
        .order_by(func.count().desc())
        .limit(MAX_GROUPS)
    )  # fmt: skip
    groups = []
    for kind, reason, state, n, first, last in conn.execute(grouped).all():
        same_reason = rq.c.reason.is_(None) if reason is None else rq.c.reason == reason
        example = conn.execute(
            select(rq.c.id, rq.c.name, rq.c.path, rq.c.error)
            .where(and_(rq.c.state == state, rq.c.kind == kind, same_reason))
            .order_by(updated.desc())
            .limit(1)
        ).first()
        request_id, name, path, error = example if example is not None else (None, None, None, None)
        groups.append({
            "daemon": kind, "reason": reason or "unknown", "endpoint": None, "state": state, "count": n,
            "first": first, "last": last, "example": name or path or request_id, "message_id": request_id,
            "error": error or "",
        })  # fmt: skip
    return sorted(groups, key=lambda g: (-g["count"], -g["last"].timestamp()))
