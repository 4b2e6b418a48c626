"""A daemon as data: its name, its handlers, its resources. Registering changes nothing else.

    service = Service("ingest", resources=open_ingest_resources)

    @service.handler(FileReady)
    async def ingest(msg: FileReady, ctx: Context) -> None: ...

The handler stays a plain coroutine function: a unit test calls it with a ``Context`` holding a
``RecordingPublisher`` and real or fake resources. The runner (``common.bus.consumer``) turns its
outcome into ack / retry / dead letter.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import structlog

from common.bus.publisher import Publisher
from common.config import Settings
from common.errors import SpoolError
from common.messages import Message

if TYPE_CHECKING:  # the runner module imports this one
    from common.bus.consumer import Runner

R = TypeVar("R")
M = TypeVar("M", bound=Message)


@dataclass
class Context(Generic[R]):
    """What a handler may use: nothing arrives by global lookup."""

    daemon: str
    settings: Settings
    publisher: Publisher
    resources: R
    log: Any = field(default_factory=lambda: structlog.get_logger())
    attempt: int = 1
    correlation_id: str | None = None
    # The AMQP ``reply_to`` of the delivery: where the sender wants the outcome (recall.completed).
    reply_to: str | None = None
    # Who sent the message: the AMQP ``user_id`` of the delivery (validated by RabbitMQ), or, on
    # Spool's own retry / dead-letter copies, the original publisher's (``common.bus.admission``).
    # ``None`` when the publisher set none; ``common.bus.trust.is_spool_user`` says whether it is
    # one of Spool's own.
    user_id: str | None = None


Handler = Callable[[Any, Context[Any]], Awaitable[None]]
# Called after a failure, before the message is retried or dead-lettered, to record it (last
# error per file). ``msg`` is None when the body could not be decoded.
FailureHook = Callable[[Message | None, SpoolError, int, bool, Context[Any]], Awaitable[None]]
ResourceFactory = Callable[[Settings, Publisher], AbstractAsyncContextManager[Any]]
# Called with the routing key and the classified error of a delivery that could not be decoded or
# has no handler, when the service prefers counting it to dead-lettering it (see ``Service``).
MalformedHook = Callable[[str, SpoolError, Context[Any]], Awaitable[None]]


@dataclass
class Route:
    model: type[Message]
    handler: Handler


@dataclass
class Service:
    name: str
    resources: ResourceFactory | None = None
    routes: dict[str, Route] = field(default_factory=dict)
    on_failure: FailureHook | None = None
    # Extra log context for a message, e.g. the file name ("file" key), bound for every line.
    describe: Callable[[Message], dict[str, Any]] = lambda msg: {}
    # An observer of the whole bus (the monitor) handles every known type in one handler, and
    # counts what it cannot read instead of dead-lettering it: its dead-letter queue would fill
    # with everyone else's bad messages and nobody would read it. Work daemons leave both unset.
    fallback: Handler | None = None
    on_malformed: MalformedHook | None = None
    # A service whose deliveries call for another consumption strategy brings a ``Runner`` subclass
    # (the monitor: batched acks, no per-message task, since it sees every message of the bus),
    # overriding the extension points ``Runner`` documents.
    runner: type[Runner] | None = None

    def handler(self, model: type[M]) -> Callable[[Callable[[M, Context[Any]], Awaitable[None]]], Any]:
        def register(func: Callable[[M, Context[Any]], Awaitable[None]]) -> Any:
            if model.ROUTING_KEY in self.routes:
                raise ValueError(f"{self.name}: two handlers for {model.ROUTING_KEY}")
            self.routes[model.ROUTING_KEY] = Route(model, func)  # type: ignore[arg-type]
            return func

        return register

    def failure_hook(self, func: FailureHook) -> FailureHook:
        self.on_failure = func
        return func

    def any_message(self, func: Handler) -> Handler:
        """Register the handler of every routing key without a handler of its own."""
        self.fallback = func
        return func

    def malformed_hook(self, func: MalformedHook) -> MalformedHook:
        """Undecodable, unknown or invalid deliveries go to ``func`` and are acked, not dead-lettered."""
        self.on_malformed = func
        return func


async def no_resources(settings: Settings, publisher: Publisher) -> AsyncIterator[None]:
    yield None
