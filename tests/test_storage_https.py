"""The https (WebDAV) backend against the real XRootD server's XrdHttp (tests/xrootd_fixtures.py).

Where the local server cannot play a part (a redirect to a foreign host, a token it would check,
a source that stalls a third-party copy), a tiny aiohttp HTTPS server of the test's own plays it:
a real HTTP server on a real socket, answering what dCache or a broken peer would answer.
"""

# ruff: noqa: F811  (the xrootd fixtures are imported, then named as parameters)

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import ssl
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from common.config import StorageEndpoint
from common.errors import Permanent, Retryable, SpoolError
from common.storage.devserver import LocalXrootd, XrootdUnavailable
from common.storage.https import HttpsStorage, parse_adler32_digest
from common.storage.https_errors import exception_error, status_error, tpc_failure_error
from common.storage.tempfiles import is_temp_name, temp_name_for
from common.storage.webdav_xml import UnsafeXml, parse_multistatus
from tests.storage_fixtures import adler
from tests.xrootd_fixtures import XROOTD_REQUIRED, remote_dir, xrootd_server  # noqa: F401  (fixtures)


def _write(path: Path, data: bytes) -> tuple[Path, int, str]:
    path.write_bytes(data)
    return path, len(data), adler(data)


def _files_below(directory: Path) -> list[str]:
    """Every file left below ``directory`` on the server's disk (final names and temporaries)."""
    if not directory.exists():
        return []
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


# -- classification tables (no server) -------------------------------------------------------------
@pytest.mark.parametrize(
    ("status", "body", "side", "cls", "reason"),
    [
        (401, "", "destination", Retryable, "auth_failed"),
        (403, "", "source", Retryable, "auth_failed"),
        (403, "", "metadata", Retryable, "auth_failed"),
        (403, "Permission denied", "destination", Retryable, "auth_failed"),
        (507, "", "destination", Retryable, "disk_full"),
        (413, "", "destination", Retryable, "disk_full"),
        (
            500,
            "No write pools online for [net=10.42.0.74,protocol=Http/1]",
            "destination",
            Retryable,
            "disk_full",
        ),
        (
            500,
            "Internal problem: REPLICA user quota exceeded for uid=99999",
            "destination",
            Retryable,
            "disk_full",
        ),
        (
            500,
            "Unable to create /site-ro/x; file path marked read/only",
            "destination",
            Retryable,
            "destination_not_writable",
        ),
        (
            400,
            "Unable to create /site-ro/x; file path marked read/only",
            "destination",
            Retryable,
            "destination_not_writable",
        ),
        (405, "", "destination", Retryable, "destination_not_writable"),
        (409, "", "destination", Retryable, "destination_not_writable"),
        (404, "", "source", Permanent, "source_missing"),
        (410, "", "source", Permanent, "source_missing"),
        (400, "Unable to open /site-a/x; no such file or directory", "source", Permanent, "source_missing"),
        (404, "", "destination", Retryable, "storage_io_error"),
        (500, "", "destination", Retryable, "endpoint_unavailable"),
        (502, "", "destination", Retryable, "endpoint_unavailable"),
        (503, "", "metadata", Retryable, "endpoint_unavailable"),
        (599, "", "metadata", Retryable, "endpoint_unavailable"),
        (504, "", "destination", Retryable, "transfer_timeout"),
        (408, "", "source", Retryable, "transfer_timeout"),
        (504, "", "metadata", Retryable, "endpoint_unavailable"),
        (500, "", "source", Retryable, "source_io_error"),
        (503, "", "source", Retryable, "source_io_error"),
        (418, "", "source", Retryable, "source_io_error"),
        (400, "", "destination", Retryable, "storage_io_error"),
        (500, "no write pools online", "source", Retryable, "source_io_error"),  # body rules: writes
    ],
)
def test_http_statuses_map_to_reasons(status: int, body: str, side: Any, cls: type, reason: str) -> None:
    err = status_error(status, body, side=side, what="PUT https://h/x")
    assert type(err) is cls and err.reason == reason
    assert f"HTTP {status}" in err.message


@pytest.mark.parametrize(
    ("exc", "side", "transfer", "reason"),
    [
        (ConnectionRefusedError(111, "Connection refused"), "destination", False, "endpoint_unavailable"),
        (aiohttp.ServerDisconnectedError(), "destination", True, "endpoint_unavailable"),
        (ConnectionResetError(104, "reset"), "source", True, "source_io_error"),
        (TimeoutError(), "destination", True, "transfer_timeout"),
        (TimeoutError(), "source", True, "transfer_timeout"),
        (TimeoutError(), "metadata", False, "endpoint_unavailable"),
        (ssl.SSLCertVerificationError("certificate verify failed"), "metadata", False, "auth_failed"),
    ],
)
def test_client_exceptions_map_to_reasons(exc: BaseException, side: Any, transfer: bool, reason: str) -> None:
    err = exception_error(exc, side=side, what="GET https://h/x", transfer=transfer)
    assert isinstance(err, Retryable) and err.reason == reason


@pytest.mark.parametrize(
    ("text", "remote_side", "cls", "reason"),
    [
        (
            'Remote side failed with status code 404; error message: "Unable to open /a; no such file"',
            "source",
            Permanent,
            "source_missing",
        ),
        ("Remote side failed with status code 503", "source", Retryable, "source_io_error"),
        ("Remote side failed with status code 507", "destination", Retryable, "disk_full"),
        ("Remote side failed with status code 403", "destination", Retryable, "auth_failed"),
        (
            "Error when interacting with local filesystem: Unable to write /site-full/x; "
            "no space left on device (code=28)",
            "source",
            Retryable,
            "disk_full",
        ),
        ("Unable to open /site-a/x; no such file or directory", "destination", Permanent, "source_missing"),
        ("Transfer timed out", "source", Retryable, "transfer_timeout"),
        ("something unforeseen", "source", Retryable, "storage_io_error"),
    ],
)
def test_third_party_failure_lines_map_to_reasons(
    text: str, remote_side: Any, cls: type, reason: str
) -> None:
    err = tpc_failure_error(text, remote_side=remote_side, what="COPY https://h/x")
    assert type(err) is cls and err.reason == reason


def test_error_texts_blank_bearer_tokens() -> None:
    err = status_error(403, "denied for Authorization: Bearer s3cr3t-token", side="destination", what="PUT x")
    assert "s3cr3t" not in err.message and "<redacted>" in err.message
    exc = aiohttp.ClientPayloadError("broken at url='https://pool.example:2880/f?authz=s3cr3t&x=1'")
    err = exception_error(exc, side="source", what="GET https://door/f", transfer=True)
    assert "s3cr3t" not in err.message and "https://pool.example:2880/f?<redacted>" in err.message


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (["adler32=0a1b2c3d"], "0a1b2c3d"),
        (["ADLER32=A1B2C3"], "00a1b2c3"),
        (["md5=HUXZLQLMuI/KZ5KDcJPcOA==, adler32=deadbeef"], "deadbeef"),
        (["md5=HUXZLQLMuI/KZ5KDcJPcOA==", "Adler32=12345678"], "12345678"),
        (["adler32=3q2+7w=="], "deadbeef"),  # base64 of the 4 bytes
        (["md5=HUXZLQLMuI/KZ5KDcJPcOA=="], None),
        ([], None),
        (["adler32=not-a-checksum!"], None),
    ],
)
def test_digest_header_is_read_leniently(headers: list[str], expected: str | None) -> None:
    assert parse_adler32_digest(headers) == expected


def test_multistatus_refuses_doctype_and_oversize_and_reads_quota() -> None:
    bomb = (
        b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;">]>'
        b'<D:multistatus xmlns:D="DAV:"><D:response><D:href>&lol2;</D:href></D:response></D:multistatus>'
    )
    with pytest.raises(UnsafeXml, match="DOCTYPE"):
        parse_multistatus(bomb)
    with pytest.raises(UnsafeXml, match="exceeds"):
        parse_multistatus(b"<x/>" * 100, max_bytes=50)
    with pytest.raises(UnsafeXml, match="well-formed"):
        parse_multistatus(b"<D:multistatus")
    quota = (
        b'<?xml version="1.0"?><D:multistatus xmlns:D="DAV:"><D:response><D:href>/base/</D:href>'
        b"<D:propstat><D:prop><D:quota-available-bytes>123456</D:quota-available-bytes>"
        b"<D:resourcetype><D:collection/></D:resourcetype></D:prop>"
        b"<D:status>HTTP/1.1 200 OK</D:status></D:propstat>"
        b"<D:propstat><D:prop><D:getcontentlength/></D:prop><D:status>HTTP/1.1 404 Not Found</D:status>"
        b"</D:propstat></D:response>"
        b"<D:response><D:href>https://h/base/a%20b</D:href><D:propstat><D:prop>"
        b"<D:getcontentlength>7</D:getcontentlength></D:prop><D:status>HTTP/1.1 200 OK</D:status>"
        b"</D:propstat></D:response></D:multistatus>"
    )
    base, file = parse_multistatus(quota)
    assert (base.path, base.is_dir, base.quota_available) == ("/base/", True, 123456)
    assert (file.path, file.is_dir, file.size) == ("/base/a b", False, 7)


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    "relpath", ["../x", "a/../../x", "/etc/passwd", "a//b", "a/./b", "", "a/\x00b", "a/"]
)
async def test_paths_outside_the_base_are_refused_before_any_request(relpath: str) -> None:
    # Nothing listens at this port: a request would fail with endpoint_unavailable instead.
    ep = StorageEndpoint(backend="https", url=f"davs://127.0.0.1:{_closed_port()}/base")
    backend = HttpsStorage("x", ep)
    try:
        for call in (
            backend.stat(relpath),
            backend.delete(relpath),
            backend.download(relpath, Path("/nonexistent/x"), size=1, adler32="00000001"),
        ):
            with pytest.raises(Permanent) as info:
                await call
            assert info.value.reason == "path_outside_area"
        with pytest.raises(Permanent, match="path_outside_area"):
            backend.url(relpath if relpath not in ("", "a/") else "..")
    finally:
        await backend.aclose()


async def test_urls_are_percent_encoded_and_temporaries_follow_the_posix_convention() -> None:
    ep = StorageEndpoint(backend="https", url="davs://127.0.0.1:1/base/")
    backend = HttpsStorage("x", ep)
    assert backend.url("a b/c%d?e#f") == "davs://127.0.0.1:1/base/a%20b/c%25d%3Fe%23f"
    assert backend.url("") == "davs://127.0.0.1:1/base"
    assert backend.local_path("a") is None
    assert is_temp_name(temp_name_for("file.fits"))
    assert "127.0.0.1" in repr(backend)
    await backend.aclose()


async def test_connection_refused_is_endpoint_unavailable() -> None:
    ep = StorageEndpoint(backend="https", url=f"https://127.0.0.1:{_closed_port()}/base")
    backend = HttpsStorage("x", ep)
    try:
        with pytest.raises(Retryable) as info:
            await backend.stat("a")
        assert info.value.reason == "endpoint_unavailable"
    finally:
        await backend.aclose()


# -- against the real server -----------------------------------------------------------------------
Make = Callable[..., HttpsStorage]


@pytest.fixture
async def make(xrootd_server: LocalXrootd) -> AsyncIterator[Make]:
    made: list[HttpsStorage] = []

    def _make(
        site: str, *, url: str | None = None, backend: dict[str, Any] | None = None, **ep: Any
    ) -> HttpsStorage:
        ep.setdefault("ca_path", xrootd_server.ca_file)
        endpoint = StorageEndpoint(
            backend="https", url=url or f"davs://127.0.0.1:{xrootd_server.https_port}/{site}", **ep
        )
        b = HttpsStorage(site, endpoint, **(backend or {}))
        made.append(b)
        return b

    yield _make
    for b in made:
        await b.aclose()


async def test_round_trip_upload_stat_list_download_delete(
    make: Make,
    xrootd_server: LocalXrootd,
    remote_dir: str,
    tmp_path: Path,
) -> None:
    a = make("site-a", ca_path=xrootd_server.ca_dir)  # a hashed CA directory works as well as a file
    data = os.urandom(300_000)
    local, size, adler = _write(tmp_path / "f", data)
    rel = f"{remote_dir}/run 1/f.fits"  # a space: percent-encoded in the request

    done = await a.upload(local, f"{remote_dir}/x/f.fits", size=size, adler32=adler)
    assert (done.size, done.adler32, done.mode) == (size, adler, "local")
    assert xrootd_server.path("site-a", f"{remote_dir}/x/f.fits").read_bytes() == data
    st = await a.stat(f"{remote_dir}/x/f.fits", checksum=True)
    assert st is not None and (st.size, st.adler32) == (size, adler)
    assert await a.stat(f"{remote_dir}/x/none") is None

    # Idempotent redelivery: the same copy again is a success; a different file is replaced.
    # Files from precheck_bytes up are looked for first and not sent again; smaller ones are.
    on_disk = xrootd_server.path("site-a", f"{remote_dir}/x/f.fits")
    first = on_disk.stat()
    looks_first = make("site-a", backend={"precheck_bytes": 0})
    await looks_first.upload(local, f"{remote_dir}/x/f.fits", size=size, adler32=adler)
    assert (on_disk.stat().st_ino, on_disk.stat().st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    await a.upload(local, f"{remote_dir}/x/f.fits", size=size, adler32=adler)
    assert on_disk.stat().st_ino != first.st_ino and on_disk.read_bytes() == data
    other, osize, oadler = _write(tmp_path / "g", os.urandom(1000))
    await a.upload(other, f"{remote_dir}/x/f.fits", size=osize, adler32=oadler)
    assert xrootd_server.path("site-a", f"{remote_dir}/x/f.fits").read_bytes() == other.read_bytes()
    await a.upload(local, f"{remote_dir}/x/f.fits", size=size, adler32=adler)

    await a.upload(local, f"{remote_dir}/y/z/g", size=size, adler32=adler)
    stray = xrootd_server.path("site-a", f"{remote_dir}/y/{temp_name_for('g')}")
    stray.write_bytes(b"partial")  # a temporary of a copy in progress elsewhere: not listed
    listed = sorted([(f.relpath, f.size) async for f in a.list(remote_dir)])
    assert listed == [(f"{remote_dir}/x/f.fits", size), (f"{remote_dir}/y/z/g", size)]
    assert [f.relpath async for f in a.list(f"{remote_dir}/y/z/g")] == [f"{remote_dir}/y/z/g"]
    assert [f async for f in a.list(f"{remote_dir}/none")] == []
    assert await a.free_space() is None  # XrdHttp gives no RFC 4331 quota

    out = tmp_path / "down" / "f"
    done = await a.download(f"{remote_dir}/x/f.fits", out, size=size, adler32=adler)
    assert out.read_bytes() == data and done.adler32 == adler
    assert sorted(os.listdir(out.parent)) == ["f"]  # the local temporary is gone

    assert await a.delete(f"{remote_dir}/x/f.fits") is True
    assert await a.delete(f"{remote_dir}/x/f.fits") is False
    assert not xrootd_server.path("site-a", f"{remote_dir}/x/f.fits").exists()
    # XrdHttp 5.5 does not decode a MOVE's Destination: a name needing escapes would land under
    # its encoded spelling; the backend sees that and says so instead of reporting a copy.
    with pytest.raises(Retryable) as info:
        await a.upload(local, rel, size=size, adler32=adler)
    assert info.value.reason == "storage_io_error" and "not there" in info.value.message


async def test_third_party_copy_pull_and_push(
    make: Make,
    xrootd_server: LocalXrootd,
    remote_dir: str,
    tmp_path: Path,
) -> None:
    a = make("site-a", tpc=True)
    b = make("site-b", tpc=True)
    b_push = make("site-b", tpc=True, backend={"tpc_mode": "push"})
    local, size, adler = _write(tmp_path / "f", os.urandom(2_000_000))
    await a.upload(local, f"{remote_dir}/f", size=size, adler32=adler)
    assert b.can_pull_from(a)

    pulled = await b.copy_from(a, f"{remote_dir}/f", f"{remote_dir}/pulled/f", size=size, adler32=adler)
    pushed = await b_push.copy_from(a, f"{remote_dir}/f", f"{remote_dir}/pushed/f", size=size, adler32=adler)
    assert (pulled.mode, pushed.mode) == ("tpc", "tpc")
    for name in ("pulled/f", "pushed/f"):
        assert xrootd_server.path("site-b", f"{remote_dir}/{name}").read_bytes() == local.read_bytes()
    assert _files_below(xrootd_server.path("site-b", remote_dir)) == ["pulled/f", "pushed/f"]


async def test_copy_is_streamed_through_the_node_when_either_side_has_no_tpc(
    make: Make,
    xrootd_server: LocalXrootd,
    remote_dir: str,
    tmp_path: Path,
) -> None:
    a = make("site-a", tpc=False)
    b = make("site-b", tpc=True)
    local, size, adler = _write(tmp_path / "f", os.urandom(100_000))
    await a.upload(local, f"{remote_dir}/f", size=size, adler32=adler)
    assert not b.can_pull_from(a)
    done = await b.copy_from(a, f"{remote_dir}/f", f"{remote_dir}/g", size=size, adler32=adler)
    assert done.mode == "streamed"
    assert xrootd_server.path("site-b", f"{remote_dir}/g").read_bytes() == local.read_bytes()


async def test_wrong_expected_checksum_is_checksum_mismatch_and_nothing_is_left(
    make: Make,
    xrootd_server: LocalXrootd,
    remote_dir: str,
    tmp_path: Path,
) -> None:
    a = make("site-a", tpc=True)
    b = make("site-b", tpc=True)
    local, size, adler = _write(tmp_path / "f", os.urandom(100_000))
    wrong = "00000001"
    with pytest.raises(Retryable) as info:
        await a.upload(local, f"{remote_dir}/f", size=size, adler32=wrong)
    assert info.value.reason == "checksum_mismatch" and adler in info.value.message
    assert _files_below(xrootd_server.path("site-a", remote_dir)) == []

    await a.upload(local, f"{remote_dir}/good", size=size, adler32=adler)
    with pytest.raises(Retryable) as info:
        await b.copy_from(a, f"{remote_dir}/good", f"{remote_dir}/f", size=size, adler32=wrong)
    assert info.value.reason == "checksum_mismatch"
    assert _files_below(xrootd_server.path("site-b", remote_dir)) == []

    # Downloading: the server's copy itself is not the expected file -> that source is corrupt.
    out = tmp_path / "out"
    with pytest.raises(Permanent) as perm:
        await a.download(f"{remote_dir}/good", out, size=size, adler32=wrong)
    assert perm.value.reason == "source_corrupt"
    assert os.listdir(tmp_path) == ["f"]


async def test_read_only_and_full_exports_answer_their_reasons_and_leave_nothing(
    make: Make,
    xrootd_server: LocalXrootd,
    remote_dir: str,
    tmp_path: Path,
) -> None:
    ro = make("site-ro", tpc=True)
    full = make("site-full", tpc=True)
    a = make("site-a", tpc=True)
    small, ssize, sadler = _write(tmp_path / "small", os.urandom(10_000))
    big, bsize, badler = _write(tmp_path / "big", os.urandom(xrootd_server.full_bytes + 1024 * 1024))

    with pytest.raises(Retryable) as info:
        await ro.upload(small, f"{remote_dir}/f", size=ssize, adler32=sadler)
    assert info.value.reason == "destination_not_writable"
    with pytest.raises(Retryable) as info:
        await ro.copy_from(a, f"{remote_dir}/none", f"{remote_dir}/f", size=ssize, adler32=sadler)
    assert info.value.reason == "destination_not_writable"
    assert _files_below(xrootd_server.path("site-ro")) == []

    # A PUT that runs out of space: XrdHttp closes the connection without an answer; the server
    # still answers afterwards, so it is a storage error there, not an outage.
    with pytest.raises(Retryable) as info:
        await full.upload(big, f"{remote_dir}/big", size=bsize, adler32=badler)
    assert info.value.reason == "storage_io_error", info.value
    assert _files_below(xrootd_server.path("site-full", remote_dir)) == []
    # A third-party copy that runs out of space says so in its marker stream.
    await a.upload(big, f"{remote_dir}/big", size=bsize, adler32=badler)
    with pytest.raises(Retryable) as info:
        await full.copy_from(a, f"{remote_dir}/big", f"{remote_dir}/big", size=bsize, adler32=badler)
    assert info.value.reason == "disk_full", info.value
    assert _files_below(xrootd_server.path("site-full", remote_dir)) == []


async def test_missing_source_is_permanent_source_missing(
    make: Make,
    xrootd_server: LocalXrootd,
    remote_dir: str,
    tmp_path: Path,
) -> None:
    a = make("site-a", tpc=True)
    b = make("site-b", tpc=True)
    b_push = make("site-b", tpc=True, backend={"tpc_mode": "push"})
    b_streamed = make("site-b", tpc=False)
    for attempt in (
        a.download(f"{remote_dir}/none", tmp_path / "out", size=1, adler32="00000001"),
        b.copy_from(a, f"{remote_dir}/none", f"{remote_dir}/f", size=1, adler32="00000001"),
        b_push.copy_from(a, f"{remote_dir}/none", f"{remote_dir}/f", size=1, adler32="00000001"),
        b_streamed.copy_from(a, f"{remote_dir}/none", f"{remote_dir}/f", size=1, adler32="00000001"),
    ):
        with pytest.raises(Permanent) as info:
            await attempt
        assert info.value.reason == "source_missing", info.value
    assert _files_below(xrootd_server.path("site-b", remote_dir)) == []
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
async def test_server_stopped_mid_upload_is_retryable_and_leaves_no_final_file(
    make: Make,
    xrootd_server: LocalXrootd,
    remote_dir: str,
    tmp_path: Path,
) -> None:
    a = make("site-a")
    local, size, adler = _write(tmp_path / "big", os.urandom(300 * 1024 * 1024))
    directory = xrootd_server.path("site-a", remote_dir)
    task = asyncio.create_task(a.upload(local, f"{remote_dir}/big", size=size, adler32=adler))
    try:
        for _ in range(2000):  # until the temporary is being written
            temps = [p for p in directory.glob(".*") if p.stat().st_size > 0] if directory.exists() else []
            if temps or task.done():
                break
            await asyncio.sleep(0.005)
        assert not task.done(), "the upload finished before the server could be stopped"
        await asyncio.to_thread(xrootd_server.stop)
        with pytest.raises(Retryable) as info:
            await task
        assert info.value.reason in ("endpoint_unavailable", "storage_io_error"), info.value
    finally:
        await asyncio.to_thread(xrootd_server.start)
    assert not (directory / "big").exists()


# -- a tiny HTTPS server of the test's own ---------------------------------------------------------
@dataclass
class Tiny:
    """A real aiohttp HTTPS server: redirects, token checks, and a source that stalls."""

    port: int = 0
    seen: list[tuple[str, str, str | None]] = field(default_factory=list)  # method, path, Authorization
    redirect_to: str = ""
    door_to: str = ""
    good_token: str = "good-token"

    def url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.port}{path}"


@pytest.fixture
async def tiny(xrootd_server: LocalXrootd) -> AsyncIterator[Tiny]:
    state = Tiny()

    async def handle(request: web.Request) -> web.StreamResponse:
        state.seen.append((request.method, request.path, request.headers.get("Authorization")))
        kind, _, rest = request.path.lstrip("/").partition("/")
        if kind == "redirect":
            return web.Response(status=302, headers={"Location": state.redirect_to + rest})
        if kind.startswith("site-") and state.door_to:  # a door: every request to a pool node
            return web.Response(status=307, headers={"Location": state.door_to + request.path_qs})
        if kind in ("quota", "bomb") and request.method == "PROPFIND":  # what dCache answers
            doctype = '<!DOCTYPE d [<!ENTITY a "aaaaaaaaaa">]>' if kind == "bomb" else ""
            body = (
                f'<?xml version="1.0" encoding="utf-8"?>{doctype}<d:multistatus xmlns:d="DAV:">'
                f"<d:response><d:href>/{kind}/</d:href><d:propstat><d:prop>"
                "<d:quota-available-bytes>987654321</d:quota-available-bytes>"
                "<d:quota-used-bytes>12345</d:quota-used-bytes></d:prop>"
                "<d:status>HTTP/1.1 200 OK</d:status></d:propstat></d:response></d:multistatus>"
            )
            return web.Response(status=207, text=body, content_type="application/xml")
        if kind == "loop":
            return web.Response(status=307, headers={"Location": request.path})
        if kind == "auth":
            auth = request.headers.get("Authorization")
            if auth is None:
                return web.Response(status=401, text="no credentials")
            if auth != f"Bearer {state.good_token}":
                return web.Response(status=403, text=f"permission denied for {auth}")  # echoes it
            return web.Response(status=404)
        if kind == "stall":  # a source that sends a little, then nothing
            size = 50 * 1024 * 1024
            if request.method == "HEAD":
                return web.Response(headers={"Content-Length": str(size)})
            resp = web.StreamResponse(headers={"Content-Length": str(size)})
            await resp.prepare(request)
            await resp.write(b"x" * 65536)
            await asyncio.sleep(3600)
            return resp
        return web.Response(status=404)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(xrootd_server.pki / "host.pem", xrootd_server.pki / "host.key")
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    state.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield state
    finally:
        await runner.cleanup()


async def test_redirects_are_followed_only_to_trusted_hosts(
    make: Make,
    tiny: Tiny,
    xrootd_server: LocalXrootd,
    remote_dir: str,
    tmp_path: Path,
) -> None:
    a = make("site-a")
    local, size, adler = _write(tmp_path / "f", os.urandom(5000))
    await a.upload(local, f"{remote_dir}/f", size=size, adler32=adler)
    # The tiny server stands for a dCache door sending clients to a pool node ("localhost" here).
    tiny.redirect_to = f"https://localhost:{xrootd_server.https_port}/site-a/"
    door = make("door", url=tiny.url("/redirect"), redirect_hosts=["localhost"])
    st = await door.stat(f"{remote_dir}/f", checksum=True)
    assert st is not None and st.adler32 == adler
    done = await door.download(f"{remote_dir}/f", tmp_path / "out", size=size, adler32=adler)
    assert done.size == size and (tmp_path / "out").read_bytes() == local.read_bytes()

    # A door that sends every request on with 307 (dCache's way for PUT): the body is sent again.
    tiny.door_to = f"https://localhost:{xrootd_server.https_port}"
    door_all = make("site-a", url=tiny.url("/site-a"), redirect_hosts=["localhost"])
    big, bsize, badler = _write(tmp_path / "big", os.urandom(3_000_000))
    await door_all.upload(big, f"{remote_dir}/via-door/f", size=bsize, adler32=badler)
    assert xrootd_server.path("site-a", f"{remote_dir}/via-door/f").read_bytes() == big.read_bytes()
    assert {m for m, p, _ in tiny.seen if p.startswith("/site-a/")} >= {"PUT", "HEAD", "MOVE", "MKCOL"}

    untrusting = make("door2", url=tiny.url("/redirect"))  # localhost is not in redirect_hosts
    with pytest.raises(Retryable) as info:
        await untrusting.stat(f"{remote_dir}/f")
    assert info.value.reason == "endpoint_unavailable" and "redirect to https://localhost refused" in str(
        info.value
    )
    tiny.redirect_to = f"http://127.0.0.1:{xrootd_server.https_port}/site-a/"  # a downgrade to http
    with pytest.raises(Retryable, match=r"redirect to http://127\.0\.0\.1 refused"):
        await door.stat(f"{remote_dir}/f")
    looping = make("loop", url=tiny.url("/loop"))
    with pytest.raises(Retryable, match="more than 5 redirects"):
        await looping.stat("f")


async def test_token_is_sent_reread_when_changed_and_never_shown(
    make: Make, tiny: Tiny, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("first-token\n")
    backend = make("tok", url=tiny.url("/auth"), token_file=token_file)
    tiny.good_token = "first-token"
    assert await backend.stat("f") is None  # accepted (the server then says: no such file)
    assert tiny.seen[-1][2] == "Bearer first-token"

    token_file.write_text("second-token\n")
    os.utime(token_file, ns=(1, 1))  # a different mtime whatever the clock's resolution
    tiny.good_token = "second-token"
    assert await backend.stat("f") is None
    assert tiny.seen[-1][2] == "Bearer second-token"

    # A token the server refuses: auth_failed, and the token appears nowhere we produce.
    tiny.good_token = "another"
    with capture_logs() as logs:
        errors: list[SpoolError] = []
        attempts = (
            backend.stat("f"),
            backend.delete("f"),
            backend.download("f", tmp_path / "o", size=1, adler32="00000001"),
        )
        for attempt in attempts:
            with pytest.raises(Retryable) as info:
                await attempt
            errors.append(info.value)
    assert {e.reason for e in errors} == {"auth_failed"}
    shown = " ".join([*(str(e) for e in errors), *(repr(e) for e in errors), str(logs), repr(backend)])
    assert "second-token" not in shown and "first-token" not in shown

    no_token = make("anon", url=tiny.url("/auth"))
    with pytest.raises(Retryable) as info:
        await no_token.stat("f")
    assert info.value.reason == "auth_failed" and "401" in info.value.message

    token_file.unlink()
    with pytest.raises(Retryable) as info:
        await backend.stat("f")
    assert info.value.reason == "auth_failed"


@pytest.mark.parametrize("limit", ["stall", "deadline"])
async def test_stalled_or_overdue_third_party_copy_is_cancelled_as_transfer_timeout(
    limit: str,
    make: Make,
    tiny: Tiny,
    xrootd_server: LocalXrootd,
    remote_dir: str,
) -> None:
    source = make("slow", url=tiny.url("/stall"), tpc=True)
    if limit == "stall":
        dest = make("site-b", tpc=True, backend={"stall_seconds": 2.0})
    else:
        dest = make("site-b", tpc=True, transfer_timeout_floor=2.0, backend={"stall_seconds": 600.0})
    started = asyncio.get_running_loop().time()
    with pytest.raises(Retryable) as info:
        await dest.copy_from(source, "f", f"{remote_dir}/f", size=1000, adler32="00000001")
    assert info.value.reason == "transfer_timeout", info.value
    assert asyncio.get_running_loop().time() - started < 30
    assert any(m == "GET" and p == "/stall/f" for m, p, _ in tiny.seen)  # the server did pull
    assert _files_below(xrootd_server.path("site-b", remote_dir)) == []


def test_token_holder_repr_hides_the_token(tmp_path: Path) -> None:
    from common.storage.https_auth import _BearerToken

    (tmp_path / "t").write_text("zzz-secret")
    holder = _BearerToken(tmp_path / "t")
    assert holder.value() == "zzz-secret" and "zzz-secret" not in repr(holder)


# -- bearer tokens checked by a real server: XrdHttp with the macaroons plugin ---------------------
MACAROON_SECRET = b"spool-test-macaroon-secret-of-48-bytes-long....."
MACAROON_SITE = "spooltest"


class MacaroonXrootd(LocalXrootd):
    """A second server whose exports need a bearer token (a macaroon) to be written: anonymous
    clients may read ``site-a`` only (``acc.authdb``); a valid macaroon grants what it names."""

    def _config(self) -> str:
        assert self.base is not None
        secret = self.base / "macaroon-secret"
        secret.write_text(base64.b64encode(MACAROON_SECRET).decode() + "\n")
        authdb = self.base / "authdb"
        authdb.write_text("u * /site-a lr\n")
        return super()._config() + (
            f"all.sitename {MACAROON_SITE}\n"
            "ofs.authorize 1\n"
            "ofs.authlib libXrdMacaroons.so\n"
            f"macaroons.secretkey {secret}\n"
            f"acc.authdb {authdb}\n"
        )


def mint_macaroon(path: str, activities: str, *, key: bytes = MACAROON_SECRET, hours: float = 1.0) -> str:
    from pymacaroons import Macaroon

    before = datetime.now(UTC) + timedelta(hours=hours)
    m = Macaroon(location=MACAROON_SITE, identifier=os.urandom(8).hex(), key=key)
    m.add_first_party_caveat(f"activity:{activities}")
    m.add_first_party_caveat(f"path:{path}")
    m.add_first_party_caveat(f"before:{before:%Y-%m-%dT%H:%M:%SZ}")
    return str(m.serialize())


@pytest.fixture(scope="module")
def macaroon_server(xrootd_server: LocalXrootd) -> Iterator[MacaroonXrootd]:
    pytest.importorskip("pymacaroons")
    if not Path("/usr/lib/x86_64-linux-gnu/libXrdMacaroons-5.so").exists() and not XROOTD_REQUIRED:
        pytest.skip("libXrdMacaroons is not installed (xrootd-server-plugins)")
    base = Path(tempfile.mkdtemp(prefix="spool-xrootd-mac-"))
    # The same CA as the session's server: each trusts the other in third-party copies.
    shutil.copytree(xrootd_server.pki, base / "pki")
    server = MacaroonXrootd(base=base)
    try:
        server.start()
    except XrootdUnavailable as exc:
        server.cleanup()
        shutil.rmtree(base, ignore_errors=True)
        if XROOTD_REQUIRED:
            raise
        pytest.skip(str(exc))
    try:
        yield server
    finally:
        server.cleanup()
        shutil.rmtree(base, ignore_errors=True)


def _token_backend(server: LocalXrootd, site: str, token_file: Path | None, **ep: Any) -> HttpsStorage:
    endpoint = StorageEndpoint(
        backend="https",
        url=f"davs://127.0.0.1:{server.https_port}/{site}",
        ca_path=server.ca_file,
        token_file=token_file,
        **ep,
    )
    return HttpsStorage(site, endpoint)


async def test_a_token_the_server_accepts_writes_a_wrong_or_missing_one_is_auth_failed(
    macaroon_server: MacaroonXrootd, remote_dir: str, tmp_path: Path
) -> None:
    local, size, adler = _write(tmp_path / "f", os.urandom(50_000))
    token_file = tmp_path / "token"
    forged = mint_macaroon("/site-a", "UPLOAD,MANAGE,DELETE,DOWNLOAD,READ_METADATA", key=b"x" * 48)
    token_file.write_text(forged + "\n")
    backend = _token_backend(macaroon_server, "site-a", token_file)
    anonymous = _token_backend(macaroon_server, "site-a", None)
    try:
        with capture_logs() as logs, pytest.raises(Retryable) as info:
            await backend.upload(local, f"{remote_dir}/f", size=size, adler32=adler)
        assert info.value.reason == "auth_failed", info.value
        assert forged not in f"{info.value} {info.value!r} {logs} {backend!r}"
        with pytest.raises(Retryable) as info:
            await anonymous.upload(local, f"{remote_dir}/f", size=size, adler32=adler)
        assert info.value.reason == "auth_failed"
        assert _files_below(macaroon_server.path("site-a", remote_dir)) == []

        # The token file is renewed (by an external agent): the same backend uses the new token.
        token_file.write_text(mint_macaroon("/site-a", "UPLOAD,MANAGE,DELETE,DOWNLOAD,READ_METADATA") + "\n")
        os.utime(token_file, ns=(1, 1))
        done = await backend.upload(local, f"{remote_dir}/f", size=size, adler32=adler)
        assert done.adler32 == adler
        assert macaroon_server.path("site-a", f"{remote_dir}/f").read_bytes() == local.read_bytes()
        assert await backend.delete(f"{remote_dir}/f") is True
    finally:
        await backend.aclose()
        await anonymous.aclose()


async def test_third_party_copy_hands_the_source_token_to_the_pulling_server(
    macaroon_server: MacaroonXrootd,
    xrootd_server: LocalXrootd,
    remote_dir: str,
    tmp_path: Path,
) -> None:
    local, size, adler = _write(tmp_path / "f", os.urandom(500_000))
    token_file = tmp_path / "token"
    token_file.write_text(mint_macaroon("/site-b", "UPLOAD,MANAGE,DELETE,DOWNLOAD,READ_METADATA,LIST") + "\n")
    # site-b of the token server: nothing without the token, not even reading.
    source = _token_backend(macaroon_server, "site-b", token_file, tpc=True)
    dest = _token_backend(xrootd_server, "site-a", None, tpc=True)
    try:
        await source.upload(local, f"{remote_dir}/f", size=size, adler32=adler)
        done = await dest.copy_from(source, f"{remote_dir}/f", f"{remote_dir}/g", size=size, adler32=adler)
        assert done.mode == "tpc"
        assert xrootd_server.path("site-a", f"{remote_dir}/g").read_bytes() == local.read_bytes()

        token_file.write_text(mint_macaroon("/elsewhere", "DOWNLOAD,READ_METADATA") + "\n")
        os.utime(token_file, ns=(2, 2))
        with pytest.raises(Retryable) as info:
            await dest.copy_from(source, f"{remote_dir}/f", f"{remote_dir}/h", size=size, adler32=adler)
        assert info.value.reason == "auth_failed", info.value
        assert _files_below(xrootd_server.path("site-a", remote_dir)) == ["g"]
    finally:
        await source.aclose()
        await dest.aclose()


async def test_a_cancelled_upload_leaves_no_temporary(
    make: Make, xrootd_server: LocalXrootd, remote_dir: str, tmp_path: Path
) -> None:
    a = make("site-a")
    local, size, adler = _write(tmp_path / "big", os.urandom(200 * 1024 * 1024))
    directory = xrootd_server.path("site-a", remote_dir)
    task = asyncio.create_task(a.upload(local, f"{remote_dir}/big", size=size, adler32=adler))
    for _ in range(2000):
        if task.done() or (directory.exists() and any(p.stat().st_size > 0 for p in directory.glob(".*"))):
            break
        await asyncio.sleep(0.005)
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await a.aclose()  # waits for the temporary's removal
    assert _files_below(directory) == []


async def test_an_untrusted_server_certificate_is_auth_failed(
    xrootd_server: LocalXrootd, remote_dir: str
) -> None:
    # The system's CAs do not know the test CA: the TLS handshake refuses the server.
    endpoint = StorageEndpoint(backend="https", url=f"https://127.0.0.1:{xrootd_server.https_port}/site-a")
    backend = HttpsStorage("untrusted", endpoint)
    try:
        with pytest.raises(Retryable) as info:
            await backend.stat(f"{remote_dir}/f")
        assert info.value.reason == "auth_failed", info.value
    finally:
        await backend.aclose()


def _client_certificate(server: LocalXrootd, directory: Path, name: str) -> None:
    """A client certificate ``CN=name`` signed by the test CA, written to cert.pem / key.pem."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    (directory / "client.cnf").write_text("extendedKeyUsage=clientAuth\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", "new.key",
            "-out", "new.csr")  # fmt: skip
    ca, ca_key = str(server.ca_file), str(server.pki / "ca.key")
    openssl("x509", "-req", "-in", "new.csr", "-CA", ca, "-CAkey", ca_key, "-CAserial", "ca.srl",
            "-CAcreateserial", "-days", "1", "-extfile", "client.cnf", "-out", "new.pem")  # fmt: skip
    os.replace(directory / "new.key", directory / "key.pem")
    os.replace(directory / "new.pem", directory / "cert.pem")


async def test_the_client_certificate_is_presented(xrootd_server: LocalXrootd, tmp_path: Path) -> None:
    """A server that requires a client certificate (X.509 auth, as grid sites do) gets ours."""
    subjects: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peercert") if request.transport else None
        subjects.append(str(dict(x[0] for x in peer["subject"])["commonName"]) if peer else "")
        return web.Response(status=404)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(xrootd_server.ca_file))
    ctx.load_cert_chain(xrootd_server.pki / "host.pem", xrootd_server.pki / "host.key")
    ctx.verify_mode = ssl.CERT_REQUIRED
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    url = f"https://127.0.0.1:{port}/base"
    shutil.copy(xrootd_server.pki / "host.pem", tmp_path / "cert.pem")
    shutil.copy(xrootd_server.pki / "host.key", tmp_path / "key.pem")
    with_cert = HttpsStorage(
        "cert",
        StorageEndpoint(
            backend="https",
            url=url,
            ca_path=xrootd_server.ca_file,
            cert=tmp_path / "cert.pem",
            key=tmp_path / "key.pem",
        ),
    )
    without = HttpsStorage("nocert", StorageEndpoint(backend="https", url=url, ca_path=xrootd_server.ca_file))
    try:
        assert await with_cert.stat("f") is None
        assert subjects == ["localhost"]
        with pytest.raises(Retryable) as info:
            await without.stat("f")
        # TLS 1.3 refuses a missing client certificate after the handshake: the client sees only
        # a closed connection, which cannot be told from an outage.
        assert info.value.reason == "endpoint_unavailable"
        assert subjects == ["localhost"]

        # The certificate is renewed in place (a grid proxy): the next connection presents it.
        _client_certificate(xrootd_server, tmp_path, "renewed")
        assert await with_cert.stat("f") is None
        assert subjects == ["localhost", "renewed"]
    finally:
        await with_cert.aclose()
        await without.aclose()
        await runner.cleanup()


async def test_posix_endpoints_copy_to_and_from_https_straight_through_this_node(
    make: Make, xrootd_server: LocalXrootd, remote_dir: str, tmp_path: Path
) -> None:
    from common.storage.posix import PosixStorage

    (tmp_path / "posix").mkdir()
    posix = PosixStorage("local", tmp_path / "posix")
    b = make("site-b", tpc=True)
    data = os.urandom(700_000)
    _, size, adler = _write(tmp_path / "posix" / "f", data)
    try:
        assert not b.can_pull_from(posix)
        up = await b.copy_from(posix, "f", f"{remote_dir}/f", size=size, adler32=adler)
        assert up.mode == "local"
        assert xrootd_server.path("site-b", f"{remote_dir}/f").read_bytes() == data
        down = await posix.copy_from(b, f"{remote_dir}/f", "back/f", size=size, adler32=adler)
        assert (tmp_path / "posix" / "back" / "f").read_bytes() == data and down.adler32 == adler
    finally:
        await posix.aclose()


async def test_a_download_that_stops_moving_is_transfer_timeout_and_leaves_nothing(
    make: Make, tiny: Tiny, tmp_path: Path
) -> None:
    stalled = make("slow", url=tiny.url("/stall"), backend={"stall_seconds": 1.0})
    with pytest.raises(Retryable) as info:
        await stalled.download("f", tmp_path / "out" / "f", size=50 * 1024 * 1024, adler32="00000001")
    assert info.value.reason == "transfer_timeout", info.value
    overdue = make(
        "slow", url=tiny.url("/stall"), transfer_timeout_floor=1.0, backend={"stall_seconds": 60.0}
    )
    with pytest.raises(Retryable) as info:
        await overdue.download("f", tmp_path / "out" / "f", size=1000, adler32="00000001")
    assert info.value.reason == "transfer_timeout", info.value
    assert os.listdir(tmp_path / "out") == []


async def test_free_space_is_the_servers_quota_and_a_doctype_answer_is_refused(
    make: Make, tiny: Tiny
) -> None:
    assert await make("quota", url=tiny.url("/quota")).free_space() == 987654321
    assert [m for m, p, _ in tiny.seen] == ["PROPFIND"]
    with pytest.raises(Retryable) as info:
        await make("bomb", url=tiny.url("/bomb")).free_space()
    assert info.value.reason == "storage_io_error" and "DOCTYPE" in info.value.message
