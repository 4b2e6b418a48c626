"""``catalogue.history``: the requests' outcomes and the files' events (see ``common.catalogue.writes``)."""

from __future__ import annotations

from typing import Any

from common.catalogue import writes
from common.catalogue.repositories import Repository


class HistoryRepository(Repository):
    __slots__ = ()

    async def record_failure(
        self,
        *,
        request_id: str,
        kind: str,
        daemon: str,
        reason: str,
        error: str,
        attempts: int,
        final: bool,
        name: str | None = None,
        path: str | None = None,
        dataset: str | None = None,
    ) -> None:
        """Remember the latest failure of a request (``failed`` when final, else ``retrying``) and
        add it to the history of the file (by name, else by source path, else by request id)."""
        state = "failed" if final else "retrying"
        async with self._catalogue.begin() as conn:
            await writes.record_request(
                conn, request_id=request_id, kind=kind, state=state, attempts=attempts,
                reason=reason, error=error, name=name, path=path, dataset=dataset,
            )  # fmt: skip
            await writes.add_event(
                conn,
                name=name or path or request_id,
                daemon=daemon,
                type="file.failed" if final else "file.retry",
                outcome=state,
                attempt=attempts,
                detail={"request_id": request_id, "kind": kind, "reason": reason, "error": error},
            )

    async def record_done(
        self,
        *,
        request_id: str,
        kind: str,
        attempts: int = 1,
        name: str | None = None,
        path: str | None = None,
        dataset: str | None = None,
    ) -> None:
        """Mark a request done (its earlier reason / error stay for the record)."""
        async with self._catalogue.begin() as conn:
            await writes.record_request(
                conn, request_id=request_id, kind=kind, state="done", attempts=attempts,
                reason=None, error=None, name=name, path=path, dataset=dataset,
            )  # fmt: skip

    async def record_event(
        self,
        *,
        name: str,
        daemon: str,
        type: str,
        outcome: str = "ok",
        attempt: int = 1,
        storage: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        async with self._catalogue.begin() as conn:
            await writes.add_event(
                conn, name=name, daemon=daemon, type=type, outcome=outcome,
                attempt=attempt, storage=storage, detail=detail,
            )  # fmt: skip
