"""Every reason code Spool emits: the one registry (code, class, meaning).

A reason code is the short snake_case word that says why something failed: the ``reason`` of a
``common.errors`` outcome (``x-spool-reason`` on a dead letter, ``file.failed``, the catalogue's last
error), of a fact the monitor refuses, of a ``spool`` command's error line. Operators group, retry
and purge by them, so they are stable, and each is written down here once. The docs' table
(docs/event-contract.md) is generated from ``REASONS`` (``python -m common.reasons --markdown``)
and tests/test_reason_registry.py walks the source: a code raised anywhere but not registered, or
registered but used nowhere, fails it.

Raise sites keep passing the code as a string literal (no lookup per message); this module is plain
data, cheap to import, and imports nothing of Spool's.

A code has the classes its raise sites give it: some are raised as ``Permanent`` in one place and
``Retryable`` in another (``checksum_mismatch``: the ingest source differs from the event for good;
a replica's written copy differs, worth another try), and the entry says so.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Literal

Class = Literal["invalid", "permanent", "retryable", "refused", "cli", "dead_letter", "outcome", "log"]
Side = Literal["source", "destination", "request"]

# What each class means for the message, the fact or the command (the legend of the docs' table).
CLASSES: dict[Class, str] = {
    "invalid": (
        "the body could not be decoded or validated (`InvalidMessage`): dead-lettered at once, no handler "
        "runs"
    ),
    "permanent": "cannot succeed as sent (`Permanent`): dead-lettered at once, `file.failed` published",
    "retryable": (
        "transient (`Retryable`): retried with back-off until `bus.max_attempts`, then dead-lettered"
    ),
    "refused": (
        "a fact the monitor does not believe: counted in `spool_refused_facts_total{reason}`, else ignored"
    ),
    "cli": "a `spool` command's error line `error (<reason>): ...` (exit code 1, 3 or 70)",
    "dead_letter": "the reason `spool dead` shows for a dead letter the runner did not label",
    "outcome": "recorded as one file's failure in a request that goes on (never raised)",
    "log": "a log line's `reason` only",
}


@dataclass(frozen=True, slots=True)
class Reason:
    code: str
    classes: frozenset[Class]
    meaning: str
    # For the storage backends' copy errors: which side of a replica copy is at fault (the
    # replicator marks a bad source and tries another; a destination problem trips its breaker).
    blames: Side | None = None


def _registry(*entries: Reason) -> dict[str, Reason]:
    out: dict[str, Reason] = {}
    for entry in entries:
        assert entry.code not in out, f"reason {entry.code!r} registered twice"
        out[entry.code] = entry
    return out


def _r(code: str, classes: str, meaning: str, blames: Side | None = None) -> Reason:
    named = frozenset(classes.split())
    assert named and named <= CLASSES.keys(), f"reason {code!r}: unknown class in {classes!r}"
    return Reason(code, named, meaning, blames)  # type: ignore[arg-type]


# Alphabetical: the order of the docs' table, where an operator looks a code up.
REASONS: dict[str, Reason] = _registry(
    _r(
        "area_not_permitted",
        "permanent",
        "the landing area is listed in `landing_publishers` without this publisher",
    ),
    _r(
        "auth_failed",
        "retryable",
        "a remote endpoint refused the credentials (HTTP 401/403, XRootD auth) or its certificate is not "
        "trusted: the endpoint is paused at once",
    ),
    _r("bad_dataset_name", "permanent", "the dataset matches none of `datasets.patterns`"),
    _r("broker_error", "cli", "RabbitMQ answered a command with an AMQP error"),
    _r(
        "broker_tls_failed",
        "retryable",
        "the TLS handshake with RabbitMQ failed (certificate, CA, host name)",
    ),
    _r("broker_unavailable", "retryable", "publishing failed: RabbitMQ went away or did not confirm in time"),
    _r("broker_unreachable", "retryable", "no connection to RabbitMQ (refused, unknown host, timed out)"),
    _r("cartridge_disabled", "retryable", "an operator disabled the cartridge"),
    _r(
        "cartridge_full",
        "retryable",
        "not enough room left on the cartridge for this file: another cartridge is picked",
    ),
    _r("cartridge_in_use", "retryable", "the cartridge sits in another drive"),
    _r(
        "cartridge_not_writable",
        "retryable",
        "the cartridge is suspect or disabled: nothing is appended to it",
    ),
    _r("catalogue", "cli", "the catalogue database answered a command with an error"),
    _r(
        "catalogue_unavailable",
        "retryable",
        "the catalogue database cannot be reached or opened (closed port, missing `state_dir` parent)",
    ),
    _r(
        "checksum_mismatch",
        "permanent retryable outcome",
        "adler32 differs: an ingest source is not what its event announced (permanent); a written copy "
        "differs from its good source (retried, counts against the endpoint); every tape copy of a recalled "
        "file failed its checksum (the file fails)",
        "destination",
    ),
    _r("config", "log", "`spool run` stopped on a configuration mistake (the `daemon_failed` log line)"),
    _r(
        "copy_being_deleted",
        "retryable",
        "the reaper is deleting the copy at this destination: the request waits for it",
    ),
    _r(
        "dataset_closed",
        "permanent",
        "a new file announced into a dataset that is closed (or complete, archived, deleted): "
        "refused before any byte moves",
    ),
    _r(
        "delivery_limit",
        "dead_letter",
        "a consumer died holding the message `bus.delivery_limit` times (dead-lettered by the broker)",
    ),
    _r(
        "destination_not_writable",
        "retryable",
        "the destination refuses writes (read-only export, permission denied, HTTP 405/409)",
        "destination",
    ),
    _r(
        "disk_full",
        "retryable",
        "no space (ENOSPC, quota, HTTP 507, kXR_NoSpace) or the copy would eat into `min_free_bytes`",
        "destination",
    ),
    _r("drive_broken", "retryable", "the tape drive is out of order (another drive may serve)"),
    _r("drive_busy", "retryable", "another operation or process holds the tape drive"),
    _r(
        "endpoint_state_changing",
        "retryable",
        "a copy's endpoint changed state three times while the replicator parked it (paused, resumed, "
        "paused): tried again shortly",
    ),
    _r(
        "endpoint_unavailable",
        "retryable",
        "a remote endpoint cannot be reached or answers 5xx: counts against its breaker",
    ),
    _r(
        "exchange_missing",
        "retryable",
        "the `spool` exchange does not exist yet (start a daemon or run `spool broker declare`)",
    ),
    _r(
        "field_too_long",
        "refused",
        "a heartbeat's instance, version, host or queue name is longer than a label may be",
    ),
    _r("file_missing", "permanent", "the announced file (or a tape write's source) does not exist"),
    _r(
        "id_conflict",
        "permanent",
        "the event or request id was already used for another file or request (the first is unchanged)",
    ),
    _r(
        "instance_lease_lost",
        "retryable log",
        "this daemon instance's lease is running out (renewals failing): its tape batch stops, what it had "
        "not flushed is dropped, its copies go back to the queue or to the instance that takes them over",
    ),
    _r(
        "internal_error", "cli", "a bug: an exception of no known class (`SPOOL_DEBUG=1` shows the traceback)"
    ),
    _r("invalid_checksum", "permanent", "an expected adler32 that is not 8 hex digits", "request"),
    _r(
        "invalid_details",
        "refused",
        "a heartbeat's details (counts by reason, handling histogram) have the wrong shape or types",
    ),
    _r(
        "invalid_message",
        "invalid permanent cli",
        "a missing or unknown field, a wrong type (no coercion), a bound exceeded, a relative path, a type "
        "that does not match the routing key; a recall naming neither files nor a dataset",
    ),
    _r("invalid_name", "permanent", "the given logical name is absolute or contains `..`"),
    _r(
        "invalid_reply_to",
        "permanent",
        "`reply_to` is not a reply queue (`<queue_prefix>.reply.<name>` or direct reply-to)",
    ),
    _r("invalid_size", "permanent", "a negative or impossible expected size", "request"),
    _r("invalid_state", "permanent", "a tape library request the cartridge's state forbids (a caller bug)"),
    _r("invalid_text", "refused", "a fact's text is not valid Unicode (a lone surrogate)"),
    _r(
        "metadata_too_large",
        "permanent",
        "after a `metadata.set` the file's or dataset's metadata would have more than 64 keys or 16 KiB",
    ),
    _r("mount_failed", "retryable", "the cartridge did not load (it is back in its slot)"),
    _r("naive_timestamp", "refused", "a fact's time has no UTC offset"),
    _r(
        "name_being_ingested",
        "retryable",
        "another ingest instance is copying this new name; by the retry it is registered",
    ),
    _r(
        "name_conflict",
        "permanent",
        "the logical name is registered with another size or checksum (never overwritten)",
    ),
    _r(
        "name_too_long",
        "permanent",
        "a path or name component over 255 bytes, a name over 1024 characters (also ENAMETOOLONG)",
    ),
    _r("no_cartridge", "retryable", "the tape pool has no cartridge with room and no scratch left"),
    _r(
        "no_copy",
        "outcome",
        "a recalled file has no available copy on disk or tape, and none is being archived",
    ),
    _r(
        "no_source", "permanent", "no usable source replica is left for a copy (each was tried and found bad)"
    ),
    _r("not_a_file", "permanent", "the path is a directory, socket or device, not a regular file"),
    _r("not_a_tape_endpoint", "permanent", "a tape request names an endpoint that is not a tape one"),
    _r("not_claimed", "permanent", "releasing a tape drive another session claimed (a caller bug)"),
    _r(
        "not_cloudevent",
        "invalid",
        "JSON without `specversion` / `id` / `source` / `type`, or another CloudEvents version",
    ),
    _r("not_mounted", "permanent", "the tape operation needs a cartridge in the drive (a caller bug)"),
    _r(
        "not_permitted",
        "permanent",
        "a routing key other than `file.ready` / `recall.request` / `dataset.close` from a user not "
        "in `bus.spool_users`",
    ),
    _r("number_out_of_range", "refused", "a fact's number is not finite, negative or at least 2^63"),
    _r("os_error", "cli", "the file system refused what a command needed"),
    _r(
        "path_outside_area",
        "permanent",
        "the path is outside every landing area or storage root, has a `..` component, or a symbolic link on"
        " it (never followed)",
        "request",
    ),
    _r("publish_failed", "retryable", "some events of `spool publish` were not confirmed by RabbitMQ"),
    _r("publish_nacked", "retryable", "RabbitMQ did not confirm a publish"),
    _r("publish_refused", "permanent", "RabbitMQ refused a publish from a command (permissions, `user_id`)"),
    _r(
        "queue_missing", "cli", "the queue does not exist yet: queues are declared when a daemon first starts"
    ),
    _r("size_mismatch", "permanent", "the file's size differs from what was announced"),
    _r(
        "source_corrupt",
        "permanent",
        "a source replica has the wrong size or checksum, or is not a regular file reached without a "
        "symlink: it is marked bad",
        "source",
    ),
    _r(
        "source_io_error",
        "retryable",
        "a source could not be read this time (flaky mount, source server failing): another source is tried",
        "source",
    ),
    _r(
        "source_missing",
        "permanent",
        "a source replica is gone (ENOENT, HTTP 404, kXR_NotFound): it is marked bad and another source "
        "tried",
        "source",
    ),
    _r(
        "storage_io_error",
        "retryable",
        "the storage failed a read, write or listing (I/O error, an unforeseen server answer)",
        "destination",
    ),
    _r(
        "tape_checksum_mismatch",
        "permanent",
        "data read back from tape differs from the checksum recorded at write: the cartridge turns suspect",
    ),
    _r(
        "tape_read_error",
        "permanent",
        "a file's data is missing or short on the cartridge: the cartridge turns suspect",
    ),
    _r("tape_write_error", "retryable", "the tape library's own storage failed while writing"),
    _r("too_many_connections", "log", "the monitor's HTTP server refused a connection beyond its limit"),
    _r(
        "too_many_instances",
        "refused",
        "a heartbeat of a new instance while the monitor lists its maximum, none of them dead",
    ),
    _r(
        "transfer_timeout",
        "retryable",
        "a remote transfer passed its deadline or stalled: counts against the endpoint",
    ),
    _r(
        "undecodable",
        "invalid",
        "the body is not JSON / msgpack, has an unsupported content type, is over 4 MiB, nested deeper than "
        "32, or holds `NaN` / `Infinity` / endless digits",
    ),
    _r(
        "unexpected_error",
        "retryable",
        "a bug in a handler: logged once with its traceback, retried up to `bus.max_attempts`",
    ),
    _r("unknown", "dead_letter", "a dead letter without any reason header"),
    _r("unknown_cartridge", "permanent", "no such cartridge in the tape library"),
    _r("unknown_daemon", "refused", "a heartbeat of a daemon Spool does not have"),
    _r(
        "unknown_dataset",
        "permanent",
        "a recall, a `dataset.close` or a `metadata.set` names a dataset the catalogue does not know",
    ),
    _r("unknown_drive", "permanent", "no such drive in the tape library"),
    _r(
        "unknown_file",
        "permanent outcome",
        "a name the catalogue does not know (a `metadata.set`'s file; in a recall, that file fails and the "
        "rest goes on)",
    ),
    _r("unknown_fseq", "permanent", "no file at this sequence number on the cartridge"),
    _r(
        "unknown_storage",
        "permanent",
        "the storage endpoint is not configured (or not a disk one where a disk one is needed)",
    ),
    _r("unknown_type", "invalid", "a message type Spool does not know, or no handler for it in this daemon"),
    _r(
        "unreachable",
        "cli",
        "a network service a command needs did not answer (refused, timed out, unknown host)",
    ),
    _r("unroutable", "retryable", "no queue is bound for the routing key (is the topology declared?)"),
    _r(
        "untrusted_sender",
        "refused",
        "a fact other than `file.ready` / `recall.request` / `dataset.close` not sent by one of "
        "Spool's users",
    ),
    _r(
        "wrong_endpoint_kind",
        "permanent",
        "a disk copy was asked for on a tape endpoint (the tape daemon writes there)",
    ),
)


def codes_blaming(side: Side) -> frozenset[str]:
    """The codes of copy errors that put the fault on ``side`` (``common.storage.reasons``)."""
    return frozenset(code for code, entry in REASONS.items() if entry.blames == side)


def markdown() -> str:
    """The docs' table: a legend of the classes, then one row per code."""
    lines = ["| class | what happens |", "|---|---|"]
    lines += [f"| {name} | {text} |" for name, text in CLASSES.items()]
    lines += ["", "| reason | class | meaning |", "|---|---|---|"]
    for entry in REASONS.values():
        classes = ", ".join(c for c in CLASSES if c in entry.classes)  # in the legend's order
        lines.append(f"| `{entry.code}` | {classes} | {entry.meaning} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if argv != ["--markdown"]:
        print("usage: python -m common.reasons --markdown", file=sys.stderr)
        return 2
    sys.stdout.write(markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
