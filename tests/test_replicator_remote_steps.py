"""Pure decisions of the replicator about remote endpoints: which sources copy server to server,
how they rank, and which failures pause an endpoint at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.catalogue import Source
from common.config import StorageEndpoint
from daemons.replicator import steps
from daemons.replicator.breaker import FailureCount


def xrootd(tpc: bool, site: str) -> StorageEndpoint:
    return StorageEndpoint(
        backend="xrootd", url=f"root://{site}:1094//data", tpc=tpc, attributes={"site": site}
    )


def webdav(tpc: bool, site: str) -> StorageEndpoint:
    return StorageEndpoint(
        backend="https", url=f"davs://{site}:2880/data", tpc=tpc, attributes={"site": site}
    )


STORAGE = {
    "local": StorageEndpoint(root=Path("/a"), attributes={"site": "DESY"}),
    "eos": xrootd(True, "CERN"),
    "eos_no_tpc": xrootd(False, "CERN"),
    "pic_root": xrootd(True, "PIC"),
    "pic_dav": webdav(True, "PIC"),
    "desy_dav": webdav(True, "DESY"),
    "desy_dav_no_tpc": webdav(False, "DESY"),
}


@pytest.mark.parametrize(
    ("source", "dest", "expected"),
    [
        ("eos", "pic_root", True),  # XRootD to XRootD: the destination's server pulls
        ("eos_no_tpc", "pic_root", True),  # the destination's setting is what counts for XRootD
        ("pic_root", "eos_no_tpc", False),  # destination not configured for TPC
        ("pic_dav", "desy_dav", True),  # HTTP-TPC: both ends able
        ("desy_dav_no_tpc", "pic_dav", False),  # HTTP pull needs the source to serve third parties
        ("pic_dav", "desy_dav_no_tpc", False),
        ("eos", "pic_dav", False),  # mixed protocols go through the node
        ("local", "eos", False),  # a mounted source is uploaded from this node
        ("eos", "local", False),
    ],
)
def test_third_party_copy_only_between_able_endpoints_of_one_protocol(
    source: str, dest: str, expected: bool
) -> None:
    assert steps.third_party_possible(STORAGE[source], STORAGE[dest]) is expected


def test_sources_that_copy_server_to_server_rank_before_same_site_ones() -> None:
    sources = [
        Source("local", "f"),
        Source("eos_no_tpc", "f"),
        Source("desy_dav", "f"),
        Source("pic_dav", "f"),
    ]
    ranked = steps.rank_sources(sources, "desy_dav_no_tpc", STORAGE, {}, {})
    # Nothing can pull into a non-TPC WebDAV endpoint: same site first, then by load and name.
    assert [s.storage for s in ranked] == ["desy_dav", "local", "eos_no_tpc", "pic_dav"]
    ranked = steps.rank_sources(sources, "pic_root", STORAGE, {}, {"eos_no_tpc": 5})
    # The XRootD source is pulled by PIC's server, however busy; then PIC's other endpoint (same
    # site), then the rest by load and name.
    assert [s.storage for s in ranked] == ["eos_no_tpc", "pic_dav", "desy_dav", "local"]


def test_remote_failures_count_against_the_destination() -> None:
    assert {"endpoint_unavailable", "transfer_timeout", "auth_failed"} <= steps.ENDPOINT_FAILURES
    assert steps.PAUSE_AT_ONCE <= steps.ENDPOINT_FAILURES


def test_refused_credentials_pause_the_endpoint_at_the_first_failure() -> None:
    assert FailureCount(failures_to_open=5).record_failure(at_once=True)
    assert not FailureCount(failures_to_open=5).record_failure(at_once=False)


def test_a_copy_the_reaper_is_deleting_is_waited_for_not_made_again() -> None:
    from common.catalogue import ReplicaTask

    task = ReplicaTask("f", 1, "00000001", "deleting", "f", True, 3, ())
    assert steps.action(task) == "wait"
