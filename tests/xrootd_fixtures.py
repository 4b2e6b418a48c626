"""A real XRootD server for the remote-storage tests (``common/storage/devserver.py``).

One server per test session: two sites (``site-a``, ``site-b``) over root:// and https with
third-party copy, a read-only export and a small full one. Tests keep to their own sub-directory
(``remote_dir``), so they never see each other's files. Without ``xrootd`` installed the tests skip
and say why, except on CI (``CI=true``) or with ``SPOOL_TEST_XROOTD_REQUIRED=1``, where they fail:
``.ci/services.sh xrootd`` installs it there.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from common.storage.devserver import LocalXrootd, XrootdUnavailable

XROOTD_REQUIRED = os.environ.get("SPOOL_TEST_XROOTD_REQUIRED") == "1" or os.environ.get("CI") == "true"


@pytest.fixture(scope="session")
def xrootd_server() -> Iterator[LocalXrootd]:
    server = LocalXrootd()
    try:
        server.start()
    except XrootdUnavailable as exc:
        server.cleanup()
        if XROOTD_REQUIRED:
            raise
        pytest.skip(str(exc))
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def remote_dir() -> str:
    """A sub-directory name of this test's own, to use below any site."""
    return f"t{uuid.uuid4().hex[:10]}"
