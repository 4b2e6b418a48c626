"""A Python client for systems outside Spool: publish its two commands, ask the catalogue.

For a DIRAC plugin, a pipeline or a DAQ written in Python that wants neither the ``spool`` CLI nor
raw AMQP (docs/client.md)::

    async with SpoolClient("https://monitor:9464", token=TOKEN, amqp_url=URL) as spool:
        await spool.publish_file_ready("/data/landing/lst1/run1/f.fits", "lst1.20261123.run000001.dl0",
                                       size=2147483648, adler32="1a2b3c4d", metadata={"run": 1})
        async for f in spool.find(["run>=1", "telescope=LST1"]):
            print(f["name"])

Publishing follows docs/event-contract.md: a CloudEvents 1.0 event in structured JSON mode to
the topic exchange (routing key = the event type), persistent, with the connection's user as the
AMQP ``user_id``, ``mandatory`` and publisher confirms: a call returns once the broker has the
event in a queue, and raises ``PublishError`` when no queue is bound for it (``unroutable``), the
broker refuses it (``publish_nacked``) or the exchange does not exist (``exchange_missing``).
Spool checks every field itself (strictly, and bounded); the client does not coerce anything.

The questions go to the monitor's read-only HTTP API (``/api/v1``, docs/operator-guide.md); a
listing is an async iterator that fetches the pages as it is consumed. A refused question raises
``ApiError`` with the HTTP status and the parameter the API named.

Deliberately light: aio-pika and aiohttp (both optional: each is imported on first use), the
standard library, nothing of Spool's own, so the module can be copied into another project.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

if TYPE_CHECKING:
    import aio_pika.abc
    import aiohttp

CLOUDEVENTS_JSON = "application/cloudevents+json"
API_PREFIX = "/api/v1"
MAX_PAGE = 1000  # the API's bound on ``limit``
MAX_NAMES = 100  # names per replicas / exists question


class SpoolClientError(Exception):
    """Anything this client raises on purpose."""


class PublishError(SpoolClientError):
    """The broker did not take an event: ``reason`` is ``unroutable``, ``publish_nacked``,
    ``exchange_missing`` or ``broker_unreachable``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


class ApiError(SpoolClientError):
    """The query API refused a question: ``status`` (400, 401, 404, 503...) and the ``parameter``
    it named, if any."""

    def __init__(self, status: int, message: str, parameter: str | None = None) -> None:
        super().__init__(f"HTTP {status}" + (f" ({parameter})" if parameter else "") + f": {message}")
        self.status = status
        self.parameter = parameter
        self.message = message


def cloudevent(
    type_: str, data: Mapping[str, Any], *, source: str, event_id: str | None = None
) -> dict[str, Any]:
    """A CloudEvents 1.0 event in structured mode, as docs/event-contract.md describes it."""
    return {
        "specversion": "1.0",
        "id": event_id or str(uuid.uuid4()),
        "source": source,
        "type": type_,
        "time": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "data": dict(data),
    }


def _given(**fields: Any) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


class SpoolClient:
    """``api_url``: the monitor's base URL (``http://host:9464``), with ``token`` its token;
    ``amqp_url``: the broker, for publishing. Either may be left out when unused."""

    def __init__(
        self,
        api_url: str | None = None,
        *,
        token: str | None = None,
        amqp_url: str | None = None,
        exchange: str = "spool",
        source: str = "spool-client",
        timeout: float = 30.0,
    ) -> None:
        self.api_url = api_url.rstrip("/") if api_url else None
        self.amqp_url = amqp_url
        self.exchange_name = exchange
        self.source = source
        self.timeout = timeout
        self._token = token
        self._http: aiohttp.ClientSession | None = None
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._exchange: aio_pika.abc.AbstractExchange | None = None
        self._user = "guest"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None
        if self._connection is not None:
            await self._connection.close()
            self._connection, self._exchange = None, None

    # --- publishing -----------------------------------------------------------------------------
    async def publish_file_ready(
        self,
        path: str,
        dataset: str,
        *,
        name: str | None = None,
        size: int | None = None,
        adler32: str | None = None,
        metadata: Mapping[str, str | int | float | bool | None] | None = None,
        parents: Sequence[str] | None = None,
        event_id: str | None = None,
    ) -> str:
        """Announce a complete file in a landing area; returns the event id (re-sending the same
        id is a no-op for Spool, so a caller unsure whether a publish got through sends it again)."""
        data = _given(
            path=path, dataset=dataset, name=name, size=size, adler32=adler32,
            metadata=dict(metadata) if metadata is not None else None,
            parents=list(parents) if parents is not None else None,
        )  # fmt: skip
        return await self.publish_event("file.ready", data, event_id=event_id)

    async def publish_recall_request(
        self,
        *,
        names: Sequence[str] | None = None,
        dataset: str | None = None,
        destination: str | None = None,
        priority: int | None = None,
        event_id: str | None = None,
        reply_to: str | None = None,
    ) -> str:
        """Ask for files (``names``) and / or a ``dataset`` back from tape onto ``destination``;
        ``recall.completed`` follows on the bus (and on ``reply_to``, a reply queue)."""
        if not names and dataset is None:
            raise ValueError("a recall request names files or a dataset")
        data = _given(
            names=list(names) if names else None, dataset=dataset, destination=destination, priority=priority
        )
        return await self.publish_event("recall.request", data, event_id=event_id, reply_to=reply_to)

    async def publish_event(
        self, type_: str, data: Mapping[str, Any], *, event_id: str | None = None, reply_to: str | None = None
    ) -> str:
        """Publish one CloudEvent (routing key ``type_``) with confirms and ``mandatory``."""
        import aio_pika
        import aiormq

        exchange = await self._exchange_to_publish()
        event = cloudevent(type_, data, source=self.source, event_id=event_id)
        message = aio_pika.Message(
            json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode(),
            content_type=CLOUDEVENTS_JSON,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=event["id"],
            user_id=self._user,  # RabbitMQ checks it is the connection's user
            reply_to=reply_to,
        )
        try:
            await exchange.publish(message, routing_key=type_, mandatory=True, timeout=self.timeout)
        except aiormq.exceptions.DeliveryError as exc:
            returned = exc.message is not None  # a returned message comes back with the error
            reason = "unroutable" if returned else "publish_nacked"
            why = f"no queue is bound for {type_!r}" if returned else "the broker did not take it"
            raise PublishError(reason, f"{why} on exchange {self.exchange_name!r}") from None
        except TimeoutError:
            raise PublishError("publish_nacked", f"no confirm within {self.timeout} s") from None
        return str(event["id"])

    async def _exchange_to_publish(self) -> aio_pika.abc.AbstractExchange:
        import aio_pika
        import aiormq
        from yarl import URL

        if self._exchange is not None:
            return self._exchange
        if not self.amqp_url:
            raise SpoolClientError("publishing needs amqp_url")
        try:
            self._connection = await aio_pika.connect_robust(self.amqp_url, timeout=self.timeout)
        except (OSError, aiormq.exceptions.AMQPError) as exc:
            raise PublishError("broker_unreachable", f"cannot connect to the broker: {exc}") from None
        self._user = URL(self.amqp_url).user or "guest"
        channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
        try:
            self._exchange = await channel.get_exchange(self.exchange_name, ensure=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            await self.close()
            raise PublishError(
                "exchange_missing", f"no exchange {self.exchange_name!r} on the broker"
            ) from None
        return self._exchange

    # --- questions ------------------------------------------------------------------------------
    async def file(self, name: str) -> dict[str, Any] | None:
        """getFileMetadata: size, adler32, metadata, provenance, replicas, last error; None when
        the catalogue has no such file."""
        return await self._get("/files", [("name", name)], missing=None)

    async def replicas(self, names: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
        """getReplicas: name -> its replicas (endpoint, kind, state, pfn); [] for an unknown name."""
        out: dict[str, list[dict[str, Any]]] = {}
        for part in _chunks(list(names), MAX_NAMES):
            body = await self._get("/replicas", [("name", n) for n in part])
            out.update(body["replicas"])
        return out

    async def exists(self, names: Iterable[str]) -> list[dict[str, Any]]:
        """exists / isFile / isDirectory: ``{"name", "file", "directory"}`` per name, in order."""
        out: list[dict[str, Any]] = []
        for part in _chunks(list(names), MAX_NAMES):
            out += (await self._get("/exists", [("name", n) for n in part]))["items"]
        return out

    def find(
        self, filters: Sequence[str], *, dataset: str | None = None, page_size: int = MAX_PAGE
    ) -> AsyncIterator[dict[str, Any]]:
        """findFilesByMetadata: files matching every filter (``spool find`` syntax), by name."""
        params = [("filter", x) for x in filters] + ([("dataset", dataset)] if dataset else [])
        return self._pages("/find", params, page_size)

    def datasets(self, *, page_size: int = MAX_PAGE) -> AsyncIterator[dict[str, Any]]:
        return self._pages("/datasets", [], page_size)

    def list_directory(self, path: str = "", *, page_size: int = MAX_PAGE) -> AsyncIterator[dict[str, Any]]:
        """listDirectory: the entries right under ``path`` (kind, files, bytes)."""
        return self._pages("/directory", [("path", path)], page_size)

    async def directory_size(self, path: str = "") -> dict[str, Any]:
        """getDirectorySize: files and bytes under ``path``, copies per endpoint and state."""
        return await self._get("/directory/size", [("path", path)])

    async def lfn_for_pfn(self, endpoint: str, pfn: str) -> str | None:
        """getLFNForPFN: the logical name at ``pfn`` on ``endpoint``, None when none is there."""
        body = await self._get("/lfn", [("endpoint", endpoint), ("pfn", pfn)], missing=None, missing_of="pfn")
        return None if body is None else str(body["name"])

    async def endpoints(self) -> list[dict[str, Any]]:
        return (await self._get("/endpoints", []))["items"]  # type: ignore[no-any-return]

    def dump(self, endpoint: str, *, page_size: int = MAX_PAGE) -> AsyncIterator[dict[str, Any]]:
        """Every replica on ``endpoint``: name, pfn, size, adler32, state."""
        from urllib.parse import quote

        return self._pages(f"/endpoints/{quote(endpoint, safe='')}/dump", [], page_size)

    def ancestors(
        self, name: str, *, depth: int = 100, page_size: int = MAX_PAGE
    ) -> AsyncIterator[dict[str, Any]]:
        """getFileAncestors: nearest first (name, depth, registered)."""
        return self._pages("/ancestors", [("name", name), ("depth", str(depth))], page_size)

    def descendants(
        self, name: str, *, depth: int = 100, page_size: int = MAX_PAGE
    ) -> AsyncIterator[dict[str, Any]]:
        """getFileDescendents: nearest first (name, depth, registered)."""
        return self._pages("/descendants", [("name", name), ("depth", str(depth))], page_size)

    async def metadata_fields(self) -> list[dict[str, Any]]:
        """getMetadataFields: each key in use, and whether it compares as a number or as text."""
        return (await self._get("/metadata/fields", []))["items"]  # type: ignore[no-any-return]

    async def _pages(
        self, path: str, params: list[tuple[str, str]], page_size: int
    ) -> AsyncIterator[dict[str, Any]]:
        cursor: str | None = None
        limit = str(max(1, min(page_size, MAX_PAGE)))
        while True:
            body = await self._get(path, [*params, ("limit", limit)] + ([("next", cursor)] if cursor else []))
            for item in body["items"]:
                yield item
            cursor = body["next"]
            if not cursor:
                return

    async def _get(
        self, path: str, params: list[tuple[str, str]], *, missing: Any = ..., missing_of: str | None = None
    ) -> Any:
        """GET one answer; a 404 returns ``missing`` when one is given (and, with ``missing_of``,
        only when the API named that parameter), else every non-200 raises ``ApiError``."""
        import aiohttp

        if not self.api_url:
            raise SpoolClientError("questions need api_url (the monitor's base URL)")
        if self._http is None:
            headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
            self._http = aiohttp.ClientSession(
                headers=headers, timeout=aiohttp.ClientTimeout(total=self.timeout)
            )
        try:
            async with self._http.get(self.api_url + API_PREFIX + path, params=params) as response:
                text = await response.text()
                if response.status == 200:
                    return json.loads(text)
                error = _error_of(text)
        except aiohttp.ClientError as exc:
            raise ApiError(0, f"cannot reach {self.api_url}: {exc}") from None
        parameter, message = error
        if response.status == 404 and missing is not ... and (missing_of is None or parameter == missing_of):
            return missing
        raise ApiError(response.status, message or text.strip()[:300], parameter)


def _error_of(text: str) -> tuple[str | None, str | None]:
    try:
        error = json.loads(text)["error"]
        return error.get("parameter"), error.get("message")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None, None


def _chunks(items: list[str], size: int) -> Iterable[list[str]]:
    if not items:
        raise ValueError("give at least one name")
    for i in range(0, len(items), size):
        yield items[i : i + size]
