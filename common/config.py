"""Configuration: one TOML file, overridden by ``SPOOL_*`` environment variables.

Precedence (highest first): keyword arguments (tests), environment, the TOML file, defaults.
The file is chosen by ``--config`` on the CLI, else ``SPOOL_CONFIG``, else ``config/spool.toml``
when it exists, else built-in defaults only. Nested keys are reached from the environment with a
double underscore: ``SPOOL_BUS__MAX_ATTEMPTS=5``, ``SPOOL_CATALOGUE__URL=postgresql+asyncpg://...``.
``SPOOL_AMQP_URL`` (the design brief's name) is accepted as ``bus.url``.

Relative paths in the file are resolved against ``state_dir`` for storage roots and against the
working directory otherwise, so ``make demo`` keeps everything under ``./var``.
"""

from __future__ import annotations

import os
import re
import socket
import stat
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from common.errors import ConfigError
from common.nomenclature import FieldValue, Nomenclature, compile_nomenclature
from common.patterns import NamePattern, PatternError, compile_pattern
from common.tape.config import SimulatedLibraryConfig

DEFAULT_CONFIG_PATH = Path("config/spool.toml")
DAEMON_NAMES = ("ingest", "replicator", "tape", "recall", "monitor")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BusSettings(_Strict):
    url: str = "amqp://guest:guest@localhost:5672/"
    # A RabbitMQ cluster: one URL per node, which may differ only in host and port (one user,
    # vhost and scheme: the nodes share them). Empty: ``url`` is the only broker; given: ``url`` is
    # its first entry (management API, broker setup). ``common.bus.connection`` tries them in a
    # per-process shuffled order and moves to the next when its node goes. From the environment
    # as a comma-separated list or JSON: ``SPOOL_BUS__URLS=amqp://u:p@n1:5672/,amqp://u:p@n2:5672/``.
    urls: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Replicas of each work queue (a quorum queue) when it is first declared: RabbitMQ's
    # ``x-quorum-initial-group-size``. None: the argument is not sent and the broker's default
    # applies (``quorum_cluster_size``, 3 nodes, or fewer in a smaller cluster). Existing queues
    # keep their members and their arguments: changing this on a running deployment makes the
    # redeclaration fail (``common.bus.topology``); grow existing queues with
    # ``rabbitmq-queues grow <node> all`` instead.
    quorum_initial_group_size: int | None = Field(default=None, ge=1)
    # The type of the retry-delay and dead-letter queues ("side queues"; the work queues are always
    # quorum). "classic": on the node that first declared them, the one-node default. "quorum":
    # replicated like the work queues (a retry queue dead-letters back at-least-once), what a
    # cluster wants: with classic ones, the death of their node parks no retry and holds the dead
    # letters until it is back. Chosen when the queues are first declared; changing it on a
    # deployment whose queues exist is refused like any other argument (operator guide, "RabbitMQ
    # cluster": the conversion).
    side_queues: Literal["classic", "quorum"] = "classic"
    exchange: str = "spool"
    # Work queues are "<queue_prefix>.<daemon>"; tests use a unique prefix (and exchange) each.
    queue_prefix: str = "spool"
    # One TTL delay queue per tier, in seconds; attempt n waits retry_tiers[min(n-1, last)].
    retry_tiers: list[float] = Field(default_factory=lambda: [5.0, 30.0, 120.0, 600.0, 1800.0])
    # Attempts (first delivery included) before a Retryable error becomes a dead letter.
    max_attempts: int = Field(default=8, ge=1)
    # Quorum-queue safety net for a process that dies while holding a message (never the policy).
    delivery_limit: int = Field(default=20, ge=1)
    heartbeat_interval: float = Field(default=15.0, gt=0)
    # Grace period for in-flight handlers on SIGTERM before the channel is closed (broker requeues).
    stop_grace: float = Field(default=30.0, ge=0)
    connect_timeout: float = Field(default=10.0, gt=0)
    # Broker users whose messages Spool trusts as its own: internal commands (replica.request,
    # tape.archive, ...), Spool's x-spool-* headers and heartbeats. Spool's publishers set the AMQP
    # ``user_id`` property and RabbitMQ refuses a ``user_id`` other than the connection's user, so
    # a delivery carrying one of these names was sent by that user. Empty: the user of ``url``.
    spool_users: list[str] = Field(default_factory=list)
    # TLS (``url = "amqps://..."``, RabbitMQ's TLS listener, usually port 5671): the CA
    # certificates that sign the broker's certificate (a PEM file; None: the system's), and a
    # client certificate and its key (PEM; one file may hold both) when the broker asks for one.
    # The broker's name is checked against its certificate unless tls_check_hostname is false.
    # The management API (https with amqps) is verified with the same CA.
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_check_hostname: bool = True

    @field_validator("urls", mode="before")
    @classmethod
    def _urls_from_text(cls, v: Any) -> Any:
        """The environment's form: ``a,b,c`` or a JSON list."""
        if not isinstance(v, str):
            return v
        text = v.strip()
        if text.startswith("["):
            import json

            try:
                return json.loads(text)
            except ValueError as exc:
                raise ValueError(f"not a JSON list of URLs: {exc}") from None
        return [part.strip() for part in text.split(",") if part.strip()]

    @model_validator(mode="after")
    def _one_cluster(self) -> BusSettings:
        """``urls``: the nodes of one cluster, ``url`` its first (or refused when it names another)."""
        if not self.urls:
            return self
        from urllib.parse import urlsplit

        if "url" in self.model_fields_set and self.url not in self.urls:
            raise ValueError("url and urls both set and url is not one of urls: give the nodes in urls only")
        first = urlsplit(self.urls[0])
        seen: set[str] = set()
        for url in self.urls:
            parts = urlsplit(url)
            if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
                raise ValueError(f"urls: {_redacted(url)} is not an amqp:// or amqps:// URL with a host")
            same = (parts.scheme, parts.username, parts.password, parts.path, parts.query)
            if same != (first.scheme, first.username, first.password, first.path, first.query):
                raise ValueError(
                    f"urls: {_redacted(url)} differs from {_redacted(self.urls[0])} in more than host and "
                    "port (scheme, user, password, vhost and options are the cluster's, one for all nodes)"
                )
            if parts.netloc.lower() in seen:
                raise ValueError(f"urls: {_redacted(url)} is given twice")
            seen.add(parts.netloc.lower())
        self.url = self.urls[0]
        return self

    def broker_urls(self) -> list[str]:
        """Every node to connect to: ``urls``, or ``url`` alone."""
        return list(self.urls) or [self.url]

    @model_validator(mode="after")
    def _tls_needs_amqps(self) -> BusSettings:
        from urllib.parse import parse_qs, urlsplit

        # ``url`` is ``urls[0]`` by now, and every entry of ``urls`` has its scheme and query.
        parts = urlsplit(self.url)
        given = [k for k in ("tls_ca", "tls_cert", "tls_key") if getattr(self, k) is not None]
        if given and parts.scheme != "amqps":
            raise ValueError(f"{', '.join(given)} set but url is {parts.scheme}:// (plain): use amqps://")
        if self.tls_key is not None and self.tls_cert is None:
            raise ValueError("tls_key needs tls_cert (the client certificate it belongs to)")
        # aio-pika also reads TLS options from the URL's query (cafile, no_verify_ssl, ...); one
        # place for them, and no way to switch verification off by a URL.
        in_url = sorted(set(parse_qs(parts.query)) & _URL_TLS_OPTIONS)
        if in_url:
            raise ValueError(f"TLS options in url ({', '.join(in_url)}): use tls_ca, tls_cert, tls_key")
        return self

    def trusted_users(self) -> frozenset[str]:
        """``spool_users``, or the user of ``url`` (``guest`` when it names none)."""
        if self.spool_users:
            return frozenset(self.spool_users)
        return frozenset({self.user})

    @property
    def user(self) -> str:
        """The broker user ``url`` connects as (RabbitMQ's default ``guest`` when it names none)."""
        from urllib.parse import unquote, urlsplit

        return unquote(urlsplit(self.url).username or "guest")

    @field_validator("retry_tiers")
    @classmethod
    def _tiers_positive(cls, v: list[float]) -> list[float]:
        if not v or any(t <= 0 for t in v):
            raise ValueError("retry_tiers must be a non-empty list of positive seconds")
        return v


def _redacted(url: str) -> str:
    """A URL for an error message, without its password."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl()


_PG_TLS_KEYS = ("sslmode", "sslrootcert", "sslcert", "sslkey")
_URL_TLS_OPTIONS = {"cafile", "capath", "cadata", "certfile", "keyfile", "no_verify_ssl"}


class CatalogueSettings(_Strict):
    # Empty means "<state_dir>/catalogue.db" (SQLite, WAL). PostgreSQL: postgresql+asyncpg://...
    url: str = ""
    # Daemons group their catalogue writes (ingest: registrations; replicator: copies; tape: archive
    # requests) into one transaction of at most batch_size, waiting batch_wait s.
    batch_size: int = Field(default=256, ge=1)
    batch_wait: float = Field(default=0.01, ge=0)
    echo: bool = False
    # Each daemon process holds a lease in the catalogue, renewed every third of this (seconds).
    # Work an instance holds (a tape copy being written, a recall file being read, a new name being
    # ingested) is taken over by another instance of the daemon once the lease has run out, so
    # this is how long a killed instance's work waits. Nodes' clocks must agree to well within it
    # (NTP). ``common.instance``.
    lease_seconds: float = Field(default=30.0, ge=3.0, le=3600.0)
    # PostgreSQL TLS, as libpq names it (the same keys may be given in the URL's query instead:
    # ``?sslmode=verify-full&sslrootcert=/etc/spool/pg-ca.pem``). sslmode: disable | allow |
    # prefer | require | verify-ca | verify-full; sslrootcert: the CA file that signs the server's
    # certificate; sslcert / sslkey: a client certificate and its key. See
    # ``common.catalogue.engine.ssl_argument`` for what each mode checks.
    sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] | None = None
    sslrootcert: Path | None = None
    sslcert: Path | None = None
    sslkey: Path | None = None

    @model_validator(mode="after")
    def _tls_into_url(self) -> CatalogueSettings:
        """Fold the TLS keys into the URL's query: every ``Catalogue.open(settings.catalogue.url)``
        then connects as configured, and the URL alone says how."""
        given = {k: str(v) for k in _PG_TLS_KEYS if (v := getattr(self, k)) is not None}
        if not given:
            return self
        if not self.url.startswith(("postgresql", "postgres")):
            raise ValueError(f"{', '.join(given)} apply to a PostgreSQL catalogue url only")
        from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

        parts = urlsplit(self.url)
        query = dict(parse_qsl(parts.query))
        for key, value in given.items():
            if key in query and query[key] != value:
                raise ValueError(f"{key} is {value!r} here but {query[key]!r} in url: give it once")
            query[key] = value
        self.url = urlunsplit(parts._replace(query=urlencode(query)))
        return self


class StorageEndpoint(_Strict):
    kind: Literal["disk", "tape"] = "disk"
    # posix: a directory (disk). simulated: a pool of a simulated tape library (tape).
    # xrootd: a remote XRootD endpoint (``url = "root://host:port//base"``: EOS, dCache, XRootD).
    # https: a remote WebDAV endpoint (``url = "davs://host:port/base"`` or ``https://``: dCache,
    # StoRM, XrdHttp). See common/storage/interface.py for what every backend promises.
    backend: Literal["posix", "simulated", "xrootd", "https"] = "posix"
    # Disk: the directory. Tape: unused (the library has its own root); may be left out.
    root: Path = Path("")
    # Remote backends: the endpoint's base URL. Credentials never go here (see token_file / cert).
    url: str | None = None
    # Remote backends: the endpoint can copy server to server (XRootD TPC, HTTP-TPC COPY).
    tpc: bool = False
    # https: how a third-party copy *into* this endpoint is made. "pull": COPY on this endpoint
    # with ``Source:`` (its server fetches; the default, what dCache and XrdHttp do best); "push":
    # COPY on the source with ``Destination:`` (for a destination that cannot fetch).
    tpc_mode: Literal["pull", "push"] = "pull"
    # A transfer with no progress for this long is cancelled as stalled and retried (remote: a hung
    # server, a third-party copy whose performance markers stopped moving, whatever its deadline;
    # posix: a copy process that answers none of its waiting batches is killed and abandoned).
    stall_seconds: float = Field(default=120.0, gt=0)
    # Remote backends: a bearer token read from this file (re-read when the file changes).
    token_file: Path | None = None
    # Remote backends: an X.509 client certificate and key (PEM; one file may hold both).
    cert: Path | None = None
    key: Path | None = None
    # Remote backends: the CA certificates to trust (a PEM file or a hashed directory); None: the
    # system's.
    ca_path: Path | None = None
    # https: hosts a redirect may lead to (dCache redirects to its pool nodes); none: the URL's own.
    redirect_hosts: list[str] = Field(default_factory=list)
    # Remote backends: a transfer may take size / min_rate seconds, never less than
    # transfer_timeout_floor; past that it is cancelled (``transfer_timeout``, retryable).
    min_rate: float = Field(default=1_000_000.0, gt=0)
    transfer_timeout_floor: float = Field(default=60.0, gt=0)

    @model_validator(mode="after")
    def _remote_needs_url(self) -> StorageEndpoint:
        schemes = {"xrootd": ("root://", "xroot://"), "https": ("davs://", "https://")}
        if self.backend in schemes:
            if not self.url or not self.url.startswith(schemes[self.backend]):
                raise ValueError(
                    f"backend {self.backend!r} needs url = '{schemes[self.backend][0]}host:port/...'"
                )
            if "@" in self.url.split("//", 2)[1].split("/", 1)[0]:
                raise ValueError("credentials do not belong in the url: use token_file or cert / key")
        return self

    # Tape only: the library (``[tape_libraries.<name>]``; "default" is created under state_dir
    # when not configured) and its tape pool (default: the endpoint's name). Several copies of a
    # file go to several tape endpoints, i.e. pools, so they never share a cartridge.
    library: str = "default"
    pool: str | None = None
    # Free-form attributes for replication rules (site=PIC, tier=1 ...).
    attributes: dict[str, str] = Field(default_factory=dict)
    # At start-up a daemon removes temporary files of copies interrupted by a crash. 0 removes all
    # of them: right when one ingest node writes to the endpoint. When several nodes share it, set
    # this above the longest copy (seconds) so a neighbour's copy in progress is left alone.
    stale_temp_age: float = Field(default=0.0, ge=0)
    # How copies are made durable before the catalogue records them. "batch": one syncfs of the
    # endpoint's file system per registration batch (group commit; far faster for small files);
    # "file": fsync of each file and its directory (for file systems where syncfs is costly, e.g.
    # one shared with unrelated heavy writers).
    durability: Literal["batch", "file"] = "batch"
    # Files announced with a size up to this many bytes are copied several to one worker-thread
    # hand-off instead of one hand-off each (cheaper for small files). 0: every copy on its own.
    # (Spelled ``inline_copy_bytes`` before, when small copies ran on the event loop: still read.)
    batch_copy_bytes: int = Field(
        default=65536, ge=0, validation_alias=AliasChoices("batch_copy_bytes", "inline_copy_bytes")
    )
    # Where those batches run. "process": a helper process of the daemon (common/storage/
    # copy_process.py), so their system calls never wait for the event loop's GIL; "thread": a
    # worker thread of the daemon (no extra process; tests that patch the copy code in-process).
    small_copies: Literal["process", "thread"] = "process"
    # How many such processes (each serves its batches in order, one core at most).
    copy_processes: int = Field(default=1, ge=1, le=64)
    # Replicator: copies written to this endpoint at once (its per-destination concurrency limit),
    # counted over every replicator instance sharing the catalogue (daemons/replicator/slots.py).
    max_transfers: int = Field(default=8, ge=1)
    # A copy that would leave less free space than this is refused as ``disk_full`` (a reserve for
    # other users of a shared file system). 0: only the file system's own ENOSPC counts.
    min_free_bytes: int = Field(default=0, ge=0)


class DatasetSettings(_Strict):
    # A dataset name must fully match one of these regular expressions, or one of the nomenclature
    # patterns below. They run on RE2 (linear time, see common.patterns): a pattern RE2 refuses
    # (backreferences, lookaround) fails the load.
    patterns: list[str] = Field(
        default_factory=lambda: [r"[a-z0-9]+\.\d{8}\.run\d{6}\.(dl0|dl1|dl2|dl3|r0|r1)"]
    )
    # Seconds a dataset may stay open without a new file before the ingest daemon closes it (the
    # time of its last file is kept to the minute: ``common.catalogue.ingest.LAST_FILE_GRAIN``)
    # (``common.catalogue.datasets``); None or 0: only a ``dataset.close`` event or
    # ``spool dataset close`` closes it.
    auto_close_after: float | None = Field(default=None, ge=0)
    # Seconds between the ingest daemon's looks for idle datasets.
    auto_close_interval: float = Field(default=60.0, gt=0)
    # Seconds a closed dataset waits before the replicator judges it complete: the locks ingest
    # writes just after registering a dataset's last files are in by then.
    settle_seconds: float = Field(default=10.0, ge=0)
    # Seconds between the replicator's looks at closed datasets (complete yet?) and at deleted
    # datasets' copies (each look walks the files of every closed dataset not complete yet).
    check_interval: float = Field(default=10.0, gt=0)
    # Patterns with named, typed fields (common.nomenclature), e.g.
    # "{telescope}.{date:%Y%m%d}.run{run:06d}.{level}": a name matching one is accepted, and its
    # fields become the dataset's metadata when ingest creates it (the first pattern that parses
    # it). A malformed pattern fails the load with one line naming it.
    nomenclature: list[str] = Field(default_factory=list, max_length=64)
    _compiled: list[NamePattern] = PrivateAttr(default_factory=list)
    _nomenclature: list[Nomenclature] = PrivateAttr(default_factory=list)

    @field_validator("patterns")
    @classmethod
    def _compiles(cls, v: list[str]) -> list[str]:
        for p in v:
            try:
                compile_pattern(p)
            except PatternError as exc:
                raise ValueError(str(exc)) from None
        return v

    @field_validator("nomenclature")
    @classmethod
    def _nomenclature_compiles(cls, v: list[str]) -> list[str]:
        for p in v:
            try:
                compile_nomenclature(p)
            except PatternError as exc:
                raise ValueError(str(exc)) from None
        return v

    def model_post_init(self, context: Any, /) -> None:
        self._compiled = [compile_pattern(p) for p in self.patterns]
        self._nomenclature = [compile_nomenclature(p) for p in self.nomenclature]

    def nomenclatures(self) -> list[Nomenclature]:
        if [n.text for n in self._nomenclature] != self.nomenclature:  # reassigned (tests)
            self._nomenclature = [compile_nomenclature(p) for p in self.nomenclature]
        return self._nomenclature

    def matches(self, name: str) -> bool:
        """Whether ``name`` fully matches one of the patterns or nomenclatures (names over 255
        characters never do)."""
        if [p.text for p in self._compiled] != self.patterns:  # reassigned after validation (tests)
            self._compiled = [compile_pattern(p) for p in self.patterns]
        return any(p.fullmatch(name) for p in self._compiled) or self.fields_of(name) is not None

    def fields_of(self, name: str) -> dict[str, FieldValue] | None:
        """The fields of ``name`` by the first nomenclature that parses it, else None."""
        for n in self.nomenclatures():
            fields = n.parse(name)
            if fields is not None:
                return fields
        return None


class DaemonSettings(_Strict):
    """``[daemons.<name>]``: how much of its queue one process takes at once.

    Several instances of a daemon share its queue: the broker hands each consumer messages until
    it holds ``prefetch`` unacked ones, round-robin among those with room. Whatever one instance
    holds beyond what it is working on is work the others can never have: an instance started
    first on a backlog takes ``prefetch`` messages at once. So ``prefetch`` should be what one
    process works on at once (``concurrency``) plus a small margin, counted in that daemon's
    messages. One ingest message is one small file handled in about a millisecond: 512 held are a
    fraction of a second of work. One replicator message is a bulk request of up to 256 files
    (``common.placement.BULK``): 512 held were up to 131,072 files, so the replicator took whole
    backlogs alone (issue 19); its defaults are ``REPLICATOR_DEFAULTS``.
    """

    # Messages the broker may hand us before we ack (bounds memory whatever the backlog, and what
    # one instance may hold while others wait: see the class docstring).
    prefetch: int = Field(default=512, ge=1)
    # Handlers running at once inside one process. High by default: handlers mostly wait (for a
    # batch commit, a confirm, a copy thread), and the more wait together the larger the batches.
    # At most ``prefetch`` can run: deliveries beyond it never arrive.
    concurrency: int = Field(default=256, ge=1)


# The replicator's defaults (a key given in ``[daemons.replicator]`` overrides its own): a bulk
# request of small files holds one of its destination's ``max_transfers`` copy slots (8 by
# default) while its batch is copied, and larger files one slot each, so 32 requests at once keep
# the slots of a few destinations busy with the next request already delivered, in a process that
# holds at most 32 x 256 files of a backlog; the rest stays in the queue for the other instances.
REPLICATOR_DEFAULTS: dict[str, int] = {"prefetch": 32, "concurrency": 32}
DAEMON_DEFAULTS: dict[str, dict[str, int]] = {"replicator": REPLICATOR_DEFAULTS}


class RuleSettings(_Strict):
    """A replication rule declared in the config file (``[rules.<id>]``); see ``common.catalogue.policy``."""

    # Which files: a regular expression the dataset name must fully match, and / or metadata
    # filters as ``spool find`` takes them ("run>=12000", "telescope=LST1"). At least one.
    datasets: str | None = None
    metadata: list[str] = Field(default_factory=list)
    # Where: an endpoint name, or an attribute expression over endpoints ("site=PIC&kind=disk";
    # "kind" and "name" are attributes of every endpoint).
    endpoints: str
    copies: int = Field(default=1, ge=1)
    # Seconds a copy made for this rule is kept after the file matched it; None: for ever.
    lifetime: float | None = Field(default=None, gt=0)
    priority: int = Field(default=3, ge=0, le=9)

    @model_validator(mode="after")
    def _selects_something(self) -> RuleSettings:
        if self.datasets is None and not self.metadata:
            raise ValueError("a rule needs 'datasets' (a pattern) and / or 'metadata' (filters)")
        return self


class ReplicationSettings(_Strict):
    # Circuit breaker: consecutive retryable failures writing to one endpoint that pause it, and
    # seconds before one probe copy is let through (doubling on each failed probe, up to the max).
    breaker_failures: int = Field(default=5, ge=1)
    breaker_cooldown: float = Field(default=30.0, gt=0)
    breaker_max_cooldown: float = Field(default=600.0, gt=0)
    # Seconds between looks at endpoint states (an operator's `spool rse set`), new rules to
    # evaluate, and copies whose lifetime ended.
    poll_interval: float = Field(default=2.0, gt=0)
    reaper_interval: float = Field(default=60.0, gt=0)


class TapeSettings(_Strict):
    """The tape daemon's archive policy (``[tape]``): when a pool's queue is worth a mount."""

    # A mount for writing happens when a pool's queued requests reach any of these (as in
    # production tape systems: enough bytes, enough files, or the oldest waited long enough).
    mount_min_bytes: int = Field(default=100_000_000_000, ge=1)
    mount_min_files: int = Field(default=10_000, ge=1)
    mount_max_age: float = Field(default=1800.0, gt=0)
    # At most this much is written in one mount before the drive is offered to others.
    batch_max_files: int = Field(default=50_000, ge=1)
    batch_max_bytes: int = Field(default=2_000_000_000_000, ge=1)
    # Seconds between looks at the queues.
    poll_interval: float = Field(default=1.0, gt=0)
    # Failed mounts of one cartridge (on any drive) before it is marked ``suspect`` and another
    # cartridge of the pool is taken.
    mount_failures_before_suspect: int = Field(default=3, ge=1)
    # Files are written behind buffered tape marks and made durable by a synchronous one (a
    # flush, one back-hitch of the drive) every ``flush_files`` files or ``flush_bytes`` bytes,
    # whichever comes first, and at the end of a batch: CTA's defaults (``taped
    # ArchiveFlushBytesFiles 32000000000,200``). Only then are they recorded; a kill before a
    # flush loses the files written since the last one, which are written again.
    flush_files: int = Field(default=200, ge=1)
    flush_bytes: int = Field(default=32_000_000_000, ge=1)
    # Files made durable by a flush are recorded in the catalogue (and announced) right after it,
    # at most this many per catalogue transaction.
    record_every: int = Field(default=64, ge=1)
    # Small files go to tape packed into aggregates (POSIX tar with an index, one tape file each,
    # ``common.tape.aggregate``): a file smaller than ``aggregate_below`` bytes is a member of an
    # aggregate of at most ``aggregate_size`` bytes and ``aggregate_max_files`` members, cut at the
    # end of each write batch. 0 writes every file as its own tape file. 64 MiB: the timing model's
    # 10 ms per tape file costs 3.6 MB of streaming at 360 MB/s, so below 64 MiB a file loses more
    # than 5 % of its drive time to that overhead (and a 1 MB file 78 %); above, packing saves
    # little. See docs/decisions.md, "Small files on tape: aggregates".
    aggregate_below: int = Field(default=64 * 2**20, ge=0)
    # 10 GiB: a 30 s stream at LTO-9 rate, so a member's recall locates within the aggregate
    # cheaply (about 0.1 s across it on an 18 TB tape) and a batch of small files is a few tape
    # files; a staging file this size is what the tape daemon's node holds per drive writing.
    aggregate_size: int = Field(default=10 * 2**30, ge=1)
    # Members per aggregate at most: its index (the last tar member, and the catalogue rows recorded
    # in one statement after the flush) stays a few MB.
    aggregate_max_files: int = Field(default=10_000, ge=1)

    @model_validator(mode="after")
    def _aggregates_fit(self) -> TapeSettings:
        if self.aggregate_below > self.aggregate_size:
            raise ValueError(
                f"aggregate_below ({self.aggregate_below}) must not exceed aggregate_size "
                f"({self.aggregate_size}): a file to aggregate must fit an aggregate"
            )
        return self


class RecallSettings(_Strict):
    """The recall daemon (``[recall]``)."""

    # Recalled disk copies are kept (pinned) this long, then may be deleted if another copy exists.
    pin_seconds: float = Field(default=86_400.0, gt=0)
    # Seconds between looks at pending recalls.
    poll_interval: float = Field(default=1.0, gt=0)
    # Files read in one mount at most, before the drive is offered to others.
    batch_max_files: int = Field(default=50_000, ge=1)
    # Drives recall may hold at once (the tape daemon needs some too); 0: every free drive.
    max_drives: int = Field(default=0, ge=0)
    # Seconds a mounted drive waits for room in a full destination buffer before it is released
    # (the files stay queued: recall waits for space, it never fails for lack of it).
    buffer_wait: float = Field(default=60.0, gt=0)
    # Seconds before a cartridge whose mount failed (drive broken, cartridge busy) is tried again.
    retry_delay: float = Field(default=30.0, gt=0)


class LogSettings(_Strict):
    level: str = "info"
    # auto: JSON when stderr is not a terminal, coloured console lines when it is.
    format: Literal["auto", "json", "console"] = "auto"


StallKind = Literal["delivery", "tape_write", "tape_read", "recall"]
DEFAULT_STALL_LIMITS: dict[StallKind, float] = {
    "delivery": 900.0, "tape_write": 3600.0, "tape_read": 3600.0, "recall": 7200.0
}  # fmt: skip


class MonitorSettings(_Strict):
    """The monitor daemon (``[monitor]``) and where ``spool status`` finds it.

    The monitor listens on 127.0.0.1 unless told otherwise. Listening on any other address needs
    a token (``token_file``, or the ``SPOOL_MONITOR_TOKEN`` environment variable, which wins): the
    monitor refuses to start without one, and with one, ``/api/status``, the dashboard and (unless
    ``metrics_public``) ``/metrics`` answer only requests carrying it (``Authorization: Bearer
    <token>``, or HTTP Basic with the token as password, which browsers prompt for). The token is
    never in the config file itself, nor in any log line.
    """

    # Prometheus /metrics, /api/status and the dashboard. 127.0.0.1: this host only. Another
    # address (0.0.0.0: every interface, as in a container) requires a token. Port 0 picks a free
    # one (tests).
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=9464, ge=0, le=65535)
    # A file holding the token (one line, at least 16 characters; e.g. `openssl rand -hex 32`),
    # readable by the monitor and by those who run `spool status`.
    token_file: Path | None = None
    # /metrics without the token even when one is set (Prometheus on a trusted network). By default
    # it needs the token too: Prometheus sends it with `authorization: {credentials_file: ...}`.
    metrics_public: bool = False
    # Seconds a connection may stay idle, or take to send a request's headers, before it is cut
    # (slow or half-sent requests must not hold the monitor's connections).
    http_request_timeout: float = Field(default=10.0, gt=0, le=600)
    # Where `spool status` reaches the monitor; empty: http://127.0.0.1:<http_port>.
    url: str = ""
    # RabbitMQ management API; empty: derived from bus.url (same host and credentials, port 15672,
    # https and 15671 for amqps). Used for in-flight (unacked) counts and who holds them.
    management_url: str = ""
    management_timeout: float = Field(default=5.0, gt=0)
    # Seconds between looks at queue depths and endpoint states.
    poll_interval: float = Field(default=5.0, gt=0)
    # Seconds between saves of the active monitor's state to the catalogue (a standby or a
    # restarted monitor starts from it); deliveries are acked once saved, so this is also how long
    # one may wait for its ack (or until half of daemons.monitor.prefetch wait). daemons/monitor/role.py.
    save_interval: float = Field(default=1.0, gt=0, le=60)
    # Work in progress longer than this (seconds) is stalled: one alert.raised of kind "stalled"
    # naming the holder, listed by `spool status` and the dashboard while it lasts
    # (daemons/monitor/stalls.py). delivery: a message held by a daemon's handler (a copy, a
    # request being served); tape_write: tape copies being written; tape_read: recall files being
    # read; recall: a recall request without progress. A kind left out is not watched.
    stall_limits: dict[StallKind, float] = Field(default_factory=lambda: dict(DEFAULT_STALL_LIMITS))

    @field_validator("stall_limits")
    @classmethod
    def _positive_limits(cls, v: dict[StallKind, float]) -> dict[StallKind, float]:
        bad = [k for k, seconds in v.items() if not 0 < seconds < float("inf")]
        if bad:
            raise ValueError(f"stall_limits: {', '.join(bad)} must be a positive number of seconds")
        return v

    # An instance is late after heartbeat_late x bus.heartbeat_interval without a heartbeat, dead
    # after heartbeat_dead x; a dead instance is forgotten after forget_after seconds.
    heartbeat_late: float = Field(default=2.0, gt=0)
    heartbeat_dead: float = Field(default=4.0, gt=0)
    forget_after: float = Field(default=3600.0, gt=0)

    @model_validator(mode="after")
    def _dead_after_late(self) -> MonitorSettings:
        if self.heartbeat_dead <= self.heartbeat_late:
            raise ValueError("heartbeat_dead must be greater than heartbeat_late")
        return self

    def token(self) -> str | None:
        """The monitor's token: ``SPOOL_MONITOR_TOKEN``, else the content of ``token_file``, else
        ``None``. ``ConfigError`` (naming the source, never the content) when it cannot be used."""
        env = os.environ.get(MONITOR_TOKEN_ENV)
        if env is not None and env.strip():
            return _valid_token(env.strip(), MONITOR_TOKEN_ENV)
        if self.token_file is None:
            return None
        where = f"monitor.token_file {self.token_file}"
        try:
            # Non-blocking and checked for a regular file: a FIFO put there must not hang the start.
            fd = os.open(self.token_file, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise ConfigError(f"{where}: {exc.strerror}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ConfigError(f"{where}: not a regular file")
            raw = os.read(fd, MAX_TOKEN_LENGTH + 2)
        except OSError as exc:
            raise ConfigError(f"{where}: {exc.strerror}") from None
        finally:
            os.close(fd)
        try:
            text = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            raise ConfigError(f"{where}: the token must be ASCII") from None
        return _valid_token(text, where)


MONITOR_TOKEN_ENV = "SPOOL_MONITOR_TOKEN"
MIN_TOKEN_LENGTH = 16
MAX_TOKEN_LENGTH = 1024
_TOKEN_RE = re.compile(r"[!-~]+")  # printable ASCII, no spaces: it travels in an HTTP header


def _valid_token(token: str, where: str) -> str:
    if not MIN_TOKEN_LENGTH <= len(token) <= MAX_TOKEN_LENGTH or not _TOKEN_RE.fullmatch(token):
        raise ConfigError(
            f"{where}: the token must be {MIN_TOKEN_LENGTH} to {MAX_TOKEN_LENGTH} printable ASCII "
            "characters without spaces (e.g. `openssl rand -hex 32`)"
        )
    return token


def _default_daemons() -> dict[str, DaemonSettings]:
    return {name: daemon_settings(name) for name in DAEMON_NAMES}


def daemon_settings(name: str, configured: DaemonSettings | None = None) -> DaemonSettings:
    """``[daemons.<name>]`` as configured, key by key over that daemon's defaults (``DAEMON_DEFAULTS``)."""
    given = configured.model_dump(exclude_unset=True) if configured is not None else {}
    return DaemonSettings.model_validate(DAEMON_DEFAULTS.get(name, {}) | given)


class ManifestSettings(_Strict):
    """Signed release manifests (``spool dataset manifest``; docs/operator-guide.md, "Verifiable
    releases"). ``signing_key``: an Ed25519 private key, PEM or raw, mode 0600 (refused when others
    may read it). ``key_id``: the id manifests name (default: the key's fingerprint). ``directory``:
    where manifests written when a dataset closes go (relative to ``state_dir``)."""

    signing_key: Path | None = None
    key_id: str | None = Field(default=None, min_length=1, max_length=64, pattern=r"^[!-~]+$")
    directory: Path = Path("manifests")


# A node's name: a host name's characters (``Settings.node``).
NODE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SPOOL_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    state_dir: Path = Path("var")
    # This node's name (default: its host name). Several nodes may share one catalogue, each with
    # its own file: the [rules.*] of a file are declared by its node, and a node's file never
    # removes a rule another node's file declares (``replication.sync_config_rules``).
    node: str = Field(default_factory=socket.gethostname, min_length=1, max_length=128, pattern=NODE_NAME)
    bus: BusSettings = Field(default_factory=BusSettings)
    catalogue: CatalogueSettings = Field(default_factory=CatalogueSettings)
    # Ordered: ingest copies into the first endpoint of kind "disk".
    storage: dict[str, StorageEndpoint] = Field(
        default_factory=lambda: {"disk1": StorageEndpoint(root=Path("storage/disk1"))}
    )
    # Name -> directory where instruments drop files; file.ready paths must lie inside one.
    landing_areas: dict[str, Path] = Field(default_factory=lambda: {"default": Path("landing")})
    # External broker users allowed to announce files in each landing area (``file.ready``'s
    # AMQP user_id): a source announces only in its own area. An area not named here accepts any
    # user; Spool's own users (``bus.trusted_users()``) may announce in every area.
    landing_publishers: dict[str, list[str]] = Field(default_factory=dict)
    datasets: DatasetSettings = Field(default_factory=DatasetSettings)
    daemons: dict[str, DaemonSettings] = Field(default_factory=_default_daemons)
    # Replication rules loaded at start (id -> rule); `spool rule add` adds more at run time.
    rules: dict[str, RuleSettings] = Field(default_factory=dict)
    replication: ReplicationSettings = Field(default_factory=ReplicationSettings)
    # Simulated tape libraries by name (root relative to state_dir); see common.tape.config.
    tape_libraries: dict[str, SimulatedLibraryConfig] = Field(default_factory=dict)
    tape: TapeSettings = Field(default_factory=TapeSettings)
    recall: RecallSettings = Field(default_factory=RecallSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    monitor: MonitorSettings = Field(default_factory=MonitorSettings)
    manifests: ManifestSettings = Field(default_factory=ManifestSettings)

    @model_validator(mode="after")
    def _resolve(self) -> Settings:
        self.state_dir = self.state_dir.expanduser().absolute()
        # Resolving writes into the endpoints and libraries (roots made absolute, a tape endpoint's
        # backend and pool): on copies, never on models the caller passed in and may pass to
        # another Settings with another state_dir (pydantic keeps given instances as they are).
        self.storage = {name: ep.model_copy() for name, ep in self.storage.items()}
        self.tape_libraries = {name: lib.model_copy() for name, lib in self.tape_libraries.items()}
        for name, ep in self.storage.items():
            if ep.kind == "tape":
                ep.backend = "simulated"
                ep.pool = ep.pool or name
                if ep.library == "default" and "default" not in self.tape_libraries:
                    self.tape_libraries["default"] = SimulatedLibraryConfig(root=Path("tape-library"))
                if ep.library not in self.tape_libraries:
                    raise ValueError(
                        f"storage.{name}.library: no tape library {ep.library!r} "
                        f"(configured: {', '.join(self.tape_libraries) or 'none'})"
                    )
            elif ep.backend == "simulated":
                raise ValueError(f"storage.{name}: backend 'simulated' is a tape library (kind = 'tape')")
            elif ep.backend == "posix" and ep.root == Path(""):
                raise ValueError(f"storage.{name}: a posix disk endpoint needs a root (its directory)")
            if not ep.root.is_absolute():
                ep.root = self.state_dir / ep.root
        for lib in self.tape_libraries.values():
            if not lib.root.is_absolute():
                lib.root = self.state_dir / lib.root
        for ep in self.storage.values():
            if ep.kind == "tape":
                ep.root = self.tape_libraries[ep.library].root  # shown by `spool rse show`
        self.landing_areas = {
            k: (v if v.is_absolute() else self.state_dir / v) for k, v in self.landing_areas.items()
        }
        if not self.manifests.directory.is_absolute():
            self.manifests.directory = self.state_dir / self.manifests.directory
        for name in dict.fromkeys([*DAEMON_NAMES, *self.daemons]):  # its section over its defaults
            self.daemons[name] = daemon_settings(name, self.daemons.get(name))
        if not self.catalogue.url:
            self.catalogue.url = f"sqlite+aiosqlite:///{self.state_dir / 'catalogue.db'}"
        if not any(ep.kind == "disk" for ep in self.storage.values()):
            raise ValueError("storage needs at least one endpoint of kind 'disk' (ingest copies there)")
        _refuse_overlapping_directories(self)
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _CONFIG_PATH_FOR_LOAD
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    # --- derived names, so no module spells a queue name by hand -----------------------------
    def queue(self, daemon: str) -> str:
        return f"{self.bus.queue_prefix}.{daemon}"

    def retry_queue(self, daemon: str, tier: int) -> str:
        return f"{self.bus.queue_prefix}.{daemon}.retry.{tier}"

    def dead_queue(self, daemon: str) -> str:
        return f"{self.bus.queue_prefix}.{daemon}.dead"

    def daemon(self, name: str) -> DaemonSettings:
        return self.daemons.get(name) or daemon_settings(name)

    def first_disk(self) -> tuple[str, StorageEndpoint]:
        return next((n, ep) for n, ep in self.storage.items() if ep.kind == "disk")


def _refuse_overlapping_directories(settings: Settings) -> None:
    """Refuse directories that would lose data by sharing a tree, naming both keys.

    Two disk endpoints on one directory let the reaper delete the only copy of a file while the
    catalogue still counts two; a storage root inside a landing area (or around one) makes the
    archive announce and ingest its own copies; a landing area inside another lets one instrument
    announce the other's files; a tape library sharing a tree with either mixes cartridges with
    data. Remote endpoints have no local root, and tape endpoints share their library's root, so
    only posix disk roots, tape library roots and landing areas are compared. Paths are compared
    after ``os.path.realpath`` (symlinked parents included; a missing tail is just normalised).
    """
    dirs: list[tuple[str, str, Path]] = []  # (kind, key, configured path)
    for name, ep in settings.storage.items():
        if ep.kind == "disk" and ep.backend == "posix":
            dirs.append(("disk", f"storage.{name}.root", ep.root))
    for name, lib in settings.tape_libraries.items():
        dirs.append(("library", f"tape_libraries.{name}.root", lib.root))
    for name, area in settings.landing_areas.items():
        dirs.append(("landing", f"landing_areas.{name}", area))
    for _, key, path in dirs:
        if path.exists() and not path.is_dir():
            raise ValueError(f"{key} {path} exists and is not a directory")
    real = [Path(os.path.realpath(path)) for _, _, path in dirs]
    for i, (kind_a, key_a, path_a) in enumerate(dirs):
        for j in range(i):
            kind_b, key_b, path_b = dirs[j]
            if kind_a == kind_b == "library":
                continue  # libraries keep their own cartridges apart; not this check's business
            a, b = real[i], real[j]
            if a == b:
                relation = "is the same directory as"
            elif b in a.parents:
                relation = "is inside"
            elif a in b.parents:
                relation = "contains"
            else:
                continue
            shown_a = f"{path_a}" if a == path_a else f"{path_a} (really {a})"
            shown_b = f"{path_b}" if b == path_b else f"{path_b} (really {b})"
            raise ValueError(f"{key_a} {shown_a} {relation} {key_b} {shown_b}")


# pydantic-settings builds sources inside the class; the chosen file travels through this slot.
_CONFIG_PATH_FOR_LOAD: Path | None = None


def config_path(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """The TOML file to read: explicit argument, else $SPOOL_CONFIG, else config/spool.toml if present."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("SPOOL_CONFIG")
    if env:
        return Path(env)
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None


def load_settings(path: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Read and validate the configuration; raise ``ConfigError`` naming the bad key."""
    global _CONFIG_PATH_FOR_LOAD
    chosen = config_path(path)
    if chosen is not None and not chosen.is_file():
        raise ConfigError(f"config file {chosen} does not exist")
    if "SPOOL_AMQP_URL" in os.environ and "SPOOL_BUS__URL" not in os.environ:
        bus = dict(overrides.pop("bus", {}) or {})
        bus.setdefault("url", os.environ["SPOOL_AMQP_URL"])
        overrides["bus"] = bus
    _CONFIG_PATH_FOR_LOAD = chosen
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, chosen)) from None
    except ValueError as exc:  # TOML syntax errors surface as ValueError subclasses
        raise ConfigError(f"{chosen}: {exc}") from None
    finally:
        _CONFIG_PATH_FOR_LOAD = None


def _describe(exc: ValidationError, path: Path | None) -> str:
    where = f" in {path}" if path else ""
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"{key}: {err['msg']}")
    return f"invalid configuration{where}: " + "; ".join(lines)
