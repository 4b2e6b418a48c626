"""The xrootd backend against a real XRootD server (tests/xrootd_fixtures.py): atomic verified
copies, third-party copy, and every failure classified with nothing left behind.

Faults are real: ``site-ro`` is exported read-only, ``site-full`` is a 4 MiB tmpfs, the server is
stopped in the middle of an upload, and a stored file is corrupted behind the server's back (with
its modification time kept, the server goes on reporting the adler32 it cached in the file's
``user.XrdCks.adler32`` attribute: a server that genuinely reports a checksum its bytes do not
have)."""

# The fixtures imported from xrootd_fixtures reappear as test parameters:
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from common.config import StorageEndpoint
from common.errors import Permanent, Retryable, SpoolError
from common.storage import is_temp_name as posix_is_temp_name
from common.storage.devserver import LocalXrootd
from common.storage.interface import StorageBackend
from common.storage.xrootd import XrootdStorage, temp_name_for
from common.storage.xrootd_auth import _Token
from common.storage.xrootd_errors import classify
from tests.storage_fixtures import adler
from tests.xrootd_fixtures import remote_dir, xrootd_server  # noqa: F401


def storage(server: LocalXrootd, site: str, **kw: object) -> XrootdStorage:
    return XrootdStorage(site, StorageEndpoint(backend="xrootd", url=server.root_url(site), **kw))  # type: ignore[arg-type]


def leftovers(server: LocalXrootd, site: str, directory: str) -> list[str]:
    """Every name below ``directory`` of ``site`` on the server's disk (finals and temporaries)."""
    root = server.path(site, directory)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def flip_byte(path: Path, offset: int = 10, *, keep_mtime: bool) -> None:
    """Corrupt one byte of a stored file behind the server's back."""
    before = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
    if keep_mtime:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    else:  # a second later at least: the server's cached checksum is then stale and recomputed
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 2_000_000_000))


# -- classification, without a server ---------------------------------------------------------------
def status(code: int, errno: int = 0, message: str = "") -> SimpleNamespace:
    return SimpleNamespace(
        ok=False, code=code, errno=errno, message=f"[ERROR] {message}", status=1, shellcode=54
    )


CLASSIFIED = [
    # (code, server errno, message, side, class, reason)
    (400, 3011, "Unable to open /a; no such file or directory", "source", Permanent, "source_missing"),
    (304, 0, "not found", "source", Permanent, "source_missing"),
    (400, 3011, "Unable to open /a; no such file or directory", "destination", Retryable, "storage_io_error"),
    (400, 3009, "Unable to write /a; no space left on device", "destination", Retryable, "disk_full"),
    (400, 3021, "over quota", "destination", Retryable, "disk_full"),
    (
        400,
        3005,
        "[ERROR] Local error: no space left on device:  (destination)",
        "destination",
        Retryable,
        "disk_full",
    ),
    (400, 3025, "read-only file system", "destination", Retryable, "destination_not_writable"),
    (
        400,
        3005,
        "Unable to create /a; file path marked read/only",
        "destination",
        Retryable,
        "destination_not_writable",
    ),
    (400, 3005, "Unable to create /a; some other failure", "destination", Retryable, "storage_io_error"),
    (400, 3007, "I/O error", "destination", Retryable, "storage_io_error"),
    (400, 3007, "I/O error", "source", Retryable, "source_io_error"),
    (400, 3010, "not authorized", "destination", Retryable, "auth_failed"),
    (400, 3030, "authentication failed", "source", Retryable, "auth_failed"),
    (204, 0, "Auth failed", "destination", Retryable, "auth_failed"),
    (203, 0, "Login failed", "destination", Retryable, "auth_failed"),
    (206, 0, "Operation expired", "destination", Retryable, "endpoint_unavailable"),
    (102, 0, "Socket error", "destination", Retryable, "endpoint_unavailable"),
    (104, 0, "Socket disconnected", "destination", Retryable, "endpoint_unavailable"),
    (107, 0, "Stream disconnect", "destination", Retryable, "endpoint_unavailable"),
    (108, 0, "Connection error", "destination", Retryable, "endpoint_unavailable"),
    (110, 0, "TLS error", "destination", Retryable, "endpoint_unavailable"),
    (108, 0, "Connection error", "source", Retryable, "source_io_error"),
    (400, 3012, "internal server error", "destination", Retryable, "endpoint_unavailable"),
    (400, 3024, "overloaded", "destination", Retryable, "endpoint_unavailable"),
    (400, 3034, "request timed out", "destination", Retryable, "transfer_timeout"),
    (208, 0, "threshold exceeded", "destination", Retryable, "transfer_timeout"),
    (305, 0, "CheckSum error", "destination", Retryable, "checksum_mismatch"),
    (400, 3019, "checksum error", "destination", Retryable, "checksum_mismatch"),
    (402, 28, "Local error: no space left on device", "destination", Retryable, "disk_full"),
    (402, 30, "Local error: read-only file system", "destination", Retryable, "destination_not_writable"),
    (402, 2, "Local error: no such file or directory", "source", Permanent, "source_missing"),
    (402, 5, "Local error: input/output error", "source", Retryable, "source_io_error"),
    (2, 0, "Unknown error", "destination", Retryable, "storage_io_error"),
]


@pytest.mark.parametrize(("code", "errno", "message", "side", "cls", "reason"), CLASSIFIED)
def test_each_xrootd_status_class_maps_to_its_reason(
    code: int, errno: int, message: str, side: str, cls: type[SpoolError], reason: str
) -> None:
    err = classify(status(code, errno, message), side=side, what="root://h:1//base/f")  # type: ignore[arg-type]
    assert type(err) is cls and err.reason == reason
    assert err.message.startswith("root://h:1//base/f: ")


def test_classified_messages_never_carry_a_token() -> None:
    err = classify(status(400, 3010, "denied /a?authz=Bearer%20s3cr3t&x=1"), side="destination", what="u")
    assert "s3cr3t" not in str(err) and "authz=***" in str(err)


def test_temporary_names_are_the_posix_backends_convention() -> None:
    name = temp_name_for("f.dat")
    assert posix_is_temp_name(name) and name.startswith(".f.dat.")


def test_token_is_reread_when_its_file_changes(tmp_path: Path) -> None:
    token_file = write(tmp_path, "token", b"first\n")
    token = _Token(token_file)
    assert token.cgi() == "authz=Bearer%20first"
    token_file.write_text("second/+=")
    os.utime(token_file, ns=(0, token_file.stat().st_mtime_ns + 1_000_000))
    assert token.cgi() == "authz=Bearer%20second%2F%2B%3D"


ESCAPES = ["", "/etc/passwd", "../x", "a/../../x", "a//b", "./a", "a/.", "a\x00b", "a?authz=x", "a\nb"]


@pytest.mark.parametrize("bad", ESCAPES)
async def test_path_escapes_are_refused_before_any_connection(bad: str, tmp_path: Path) -> None:
    # Port 1: nothing listens; a request would take seconds to fail as endpoint_unavailable.
    ep = XrootdStorage("nowhere", StorageEndpoint(backend="xrootd", url="root://127.0.0.1:1//base", tpc=True))
    local = write(tmp_path, "f", b"x")
    started = time.monotonic()
    calls = [
        ep.stat(bad), ep.delete(bad), ep.upload(local, bad, size=1, adler32=adler(b"x")),
        ep.download(bad, tmp_path / "g", size=1, adler32=adler(b"x")),
        ep.copy_from(ep, "ok", bad, size=1, adler32=adler(b"x")),
        ep.copy_from(ep, bad, "ok", size=1, adler32=adler(b"x")),
    ]  # fmt: skip
    for call in calls:
        with pytest.raises(Permanent) as err:
            await call
        assert err.value.reason == "path_outside_area"
    with pytest.raises(Permanent):
        ep.url(bad)
    assert time.monotonic() - started < 1.0


# -- against the server -----------------------------------------------------------------------------
async def test_upload_stat_download_list_delete_round_trip(
    xrootd_server: LocalXrootd, remote_dir: str, tmp_path: Path
) -> None:
    ep = storage(xrootd_server, "site-a")
    assert isinstance(ep, StorageBackend)
    data = os.urandom(20 * 1024 * 1024 + 123)  # several requests, the last one short
    src = write(tmp_path, "src", data)
    rel = f"{remote_dir}/night/run1.dat"
    done = await ep.upload(src, rel, size=len(data), adler32=adler(data))
    assert (done.relpath, done.size, done.adler32) == (rel, len(data), adler(data))
    assert xrootd_server.path("site-a", rel).read_bytes() == data
    assert leftovers(xrootd_server, "site-a", remote_dir) == ["night/run1.dat"]

    st = await ep.stat(rel, checksum=True)
    assert st is not None and (st.size, st.adler32) == (len(data), adler(data))
    assert await ep.stat(f"{remote_dir}/nope") is None
    assert await ep.stat(remote_dir) is None  # a directory is not a file

    out = tmp_path / "back" / "run1.dat"
    await ep.download(rel, out, size=len(data), adler32=adler(data))
    assert out.read_bytes() == data
    assert [p.name for p in out.parent.iterdir()] == ["run1.dat"]

    # A copy in progress (a temporary) is not listed.
    (xrootd_server.path("site-a", remote_dir) / "night" / temp_name_for("run2.dat")).write_bytes(b"partial")
    small = write(tmp_path, "small", b"abc")
    await ep.upload(small, f"{remote_dir}/small", size=3, adler32=adler(b"abc"))
    listed = sorted((f.relpath, f.size) for f in [x async for x in ep.list(remote_dir)])
    assert listed == [(rel, len(data)), (f"{remote_dir}/small", 3)]
    assert [f.relpath async for f in ep.list(f"{remote_dir}/night")] == [rel]
    assert [f async for f in ep.list(f"{remote_dir}/absent")] == []

    free = await ep.free_space()
    assert free is not None and free > 0
    assert ep.url(rel) == f"{xrootd_server.root_url('site-a')}/{rel}"
    assert ep.local_path(rel) is None

    assert await ep.delete(rel) is True
    assert await ep.delete(rel) is False
    assert await ep.stat(rel) is None
    assert not xrootd_server.path("site-a", rel).exists()
    await ep.aclose()


async def test_full_export_reports_its_small_free_space(xrootd_server: LocalXrootd) -> None:
    free = await storage(xrootd_server, "site-full").free_space()
    assert free is not None and free <= xrootd_server.full_bytes


async def test_redelivered_upload_of_a_file_already_there_is_a_no_op(
    xrootd_server: LocalXrootd, remote_dir: str, tmp_path: Path
) -> None:
    ep = storage(xrootd_server, "site-a")
    data = os.urandom(100_000)
    src = write(tmp_path, "src", data)
    rel = f"{remote_dir}/f"
    await ep.upload(src, rel, size=len(data), adler32=adler(data))
    inode = xrootd_server.path("site-a", rel).stat().st_ino
    await ep.upload(src, rel, size=len(data), adler32=adler(data))
    assert xrootd_server.path("site-a", rel).stat().st_ino == inode
    assert leftovers(xrootd_server, "site-a", remote_dir) == ["f"]


async def test_wrong_expected_checksum_is_a_mismatch_and_leaves_nothing(
    xrootd_server: LocalXrootd, remote_dir: str, tmp_path: Path
) -> None:
    ep = storage(xrootd_server, "site-a")
    data = os.urandom(300_000)
    src = write(tmp_path, "src", data)
    with pytest.raises(Retryable) as err:
        await ep.upload(src, f"{remote_dir}/f", size=len(data), adler32="00000001")
    assert err.value.reason == "checksum_mismatch"
    assert adler(data) in err.value.message  # what the server reported
    assert leftovers(xrootd_server, "site-a", remote_dir) == []


async def test_third_party_copy_between_sites(
    xrootd_server: LocalXrootd, remote_dir: str, tmp_path: Path
) -> None:
    a, b = storage(xrootd_server, "site-a"), storage(xrootd_server, "site-b", tpc=True)
    data = os.urandom(3 * 1024 * 1024 + 7)
    await a.upload(write(tmp_path, "src", data), f"{remote_dir}/f", size=len(data), adler32=adler(data))
    assert b.can_pull_from(a)
    done = await b.copy_from(
        a, f"{remote_dir}/f", f"{remote_dir}/copy/f", size=len(data), adler32=adler(data)
    )
    assert done.mode == "tpc"
    assert xrootd_server.path("site-b", f"{remote_dir}/copy/f").read_bytes() == data
    assert leftovers(xrootd_server, "site-b", remote_dir) == ["copy/f"]


async def test_without_tpc_the_copy_is_streamed_through_this_node(
    xrootd_server: LocalXrootd, remote_dir: str, tmp_path: Path
) -> None:
    a, b = storage(xrootd_server, "site-a"), storage(xrootd_server, "site-b", tpc=False)
    data = os.urandom(500_000)
    await a.upload(write(tmp_path, "src", data), f"{remote_dir}/f", size=len(data), adler32=adler(data))
    assert not b.can_pull_from(a)
    done = await b.copy_from(a, f"{remote_dir}/f", f"{remote_dir}/f", size=len(data), adler32=adler(data))
    assert done.mode == "streamed"
    assert xrootd_server.path("site-b", f"{remote_dir}/f").read_bytes() == data


async def test_a_server_reporting_a_checksum_its_bytes_do_not_have_fails_the_copy(
    xrootd_server: LocalXrootd, remote_dir: str, tmp_path: Path
) -> None:
    """The source's server still reports the good (cached) adler32 but serves a corrupted byte:
    the destination's server computes the real one, the copy is refused and removed."""
    a, b = storage(xrootd_server, "site-a"), storage(xrootd_server, "site-b", tpc=True)
    data = os.urandom(200_000)
    await a.upload(write(tmp_path, "src", data), f"{remote_dir}/f", size=len(data), adler32=adler(data))
    assert (await a.stat(f"{remote_dir}/f", checksum=True)).adler32 == adler(data)  # type: ignore[union-attr]
    flip_byte(xrootd_server.path("site-a", f"{remote_dir}/f"), keep_mtime=True)
    assert (await a.stat(f"{remote_dir}/f", checksum=True)).adler32 == adler(data)  # type: ignore[union-attr]
    with pytest.raises(Retryable) as err:
        await b.copy_from(a, f"{remote_dir}/f", f"{remote_dir}/f", size=len(data), adler32=adler(data))
    assert err.value.reason == "checksum_mismatch"
    assert leftovers(xrootd_server, "site-b", remote_dir) == []


async def test_a_corrupted_source_is_reported_as_such(
    xrootd_server: LocalXrootd, remote_dir: str, tmp_path: Path
) -> None:
    a, b = storage(xrootd_server, "site-a"), storage(xrootd_server, "site-b", tpc=True)
    data = os.urandom(200_000)
    rel = f"{remote_dir}/f"
    await a.upload(write(tmp_path, "src", data), rel, size=len(data), adler32=adler(data))
    stored = xrootd_server.path("site-a", rel)
    flip_byte(stored, keep_mtime=False)
    st = await a.stat(rel, checksum=True)
    assert st is not None and st.adler32 == adler(stored.read_bytes()) != adler(data)
    with pytest.raises(Permanent) as err:
        await b.copy_from(a, rel, rel, size=len(data), adler32=adler(data))
    assert err.value.reason == "source_corrupt"
    assert leftovers(xrootd_server, "site-b", remote_dir) == []
    with pytest.raises(Permanent) as err2:  # downloaded bytes are checked too, the server asked why
        await a.download(rel, tmp_path / "out", size=len(data), adler32=adler(data))
    assert err2.value.reason == "source_corrupt"
    assert list(tmp_path.glob("*out*")) == []


async def test_a_download_whose_bytes_differ_from_the_servers_checksum_is_a_transfer_error(
    xrootd_server: LocalXrootd, remote_dir: str, tmp_path: Path
) -> None:
    """The server's (cached) checksum is the expected one but the bytes received are not: not the
    copy's fault as far as anyone can tell, so it is retried (source_io_error), not condemned."""
    a = storage(xrootd_server, "site-a")
    data = os.urandom(200_000)
    rel = f"{remote_dir}/f"
    await a.upload(write(tmp_path, "src", data), rel, size=len(data), adler32=adler(data))
    flip_byte(xrootd_server.path("site-a", rel), keep_mtime=True)
    with pytest.raises(Retryable) as err:
        await a.download(rel, tmp_path / "out", size=len(data), adler32=adler(data))
    assert err.value.reason == "source_io_error"
    assert list(tmp_path.glob("*out*")) == []


async def test_read_only_export_is_not_writable(
    xrootd_server: LocalXrootd, remote_dir: str, tmp_path: Path
) -> None:
    a, ro = storage(xrootd_server, "site-a"), storage(xrootd_server, "site-ro", tpc=True)
    data = b"x" * 1000
    src = write(tmp_path, "src", data)
    with pytest.raises(Retryable) as err:
        await ro.upload(src, f"{remote_dir}/f", size=len(data), adler32=adler(data))
    assert err.value.reason == "destination_not_writable"
    await a.upload(src, f"{remote_dir}/f", size=len(data), adler32=adler(data))
    with pytest.raises(Retryable) as err:
        await ro.copy_from(a, f"{remote_dir}/f", f"{remote_dir}/f", size=len(data), adler32=adler(data))
    assert err.value.reason == "destination_not_writable"
    assert leftovers(xrootd_server, "site-ro", remote_dir) == []


@pytest.mark.parametrize("how", ["upload", "tpc"])
async def test_full_export_is_disk_full_and_leaves_nothing(
    xrootd_server: LocalXrootd, remote_dir: str, tmp_path: Path, how: str
) -> None:
    a, full = storage(xrootd_server, "site-a"), storage(xrootd_server, "site-full", tpc=True)
    data = os.urandom(xrootd_server.full_bytes + 1024 * 1024)
    src = write(tmp_path, "src", data)
    with pytest.raises(Retryable) as err:
        if how == "upload":
            await full.upload(src, f"{remote_dir}/f", size=len(data), adler32=adler(data))
        else:
            await a.upload(src, f"{remote_dir}/f", size=len(data), adler32=adler(data))
            await full.copy_from(a, f"{remote_dir}/f", f"{remote_dir}/f", size=len(data), adler32=adler(data))
    assert err.value.reason == "disk_full"
    assert leftovers(xrootd_server, "site-full", remote_dir) == []


async def test_missing_source_is_permanent(
    xrootd_server: LocalXrootd, remote_dir: str, tmp_path: Path
) -> None:
    a, b = storage(xrootd_server, "site-a"), storage(xrootd_server, "site-b", tpc=True)
    for call in (
        b.copy_from(a, f"{remote_dir}/nope", f"{remote_dir}/f", size=10, adler32="00000001"),
        a.download(f"{remote_dir}/nope", tmp_path / "out", size=10, adler32="00000001"),
        b.upload(tmp_path / "nope", f"{remote_dir}/f", size=10, adler32="00000001"),
    ):
        with pytest.raises(Permanent) as err:
            await call
        assert err.value.reason == "source_missing"
    assert leftovers(xrootd_server, "site-b", remote_dir) == []
    assert list(tmp_path.iterdir()) == []


async def test_a_token_is_sent_but_never_shown(
    xrootd_server: LocalXrootd, remote_dir: str, tmp_path: Path
) -> None:
    token_file = write(tmp_path, "token", b"s3cr3t-token\n")
    ep = storage(xrootd_server, "site-a", token_file=token_file)
    data = b"hello"
    await ep.upload(write(tmp_path, "src", data), f"{remote_dir}/f", size=5, adler32=adler(data))
    assert xrootd_server.path("site-a", f"{remote_dir}/f").read_bytes() == data
    with pytest.raises(Permanent) as err:
        await ep.download(f"{remote_dir}/nope", tmp_path / "out", size=1, adler32="00000001")
    assert "s3cr3t" not in str(err.value) and "s3cr3t" not in ep.url("x") and "s3cr3t" not in repr(ep)


async def test_a_transfer_past_its_deadline_is_cancelled_and_cleaned_up(
    xrootd_server: LocalXrootd, remote_dir: str, tmp_path: Path
) -> None:
    # A deadline of 0.2 s whatever the size (the rate asked for is far beyond this machine).
    slow = {"min_rate": 1e12, "transfer_timeout_floor": 0.2}
    a = storage(xrootd_server, "site-a")
    data = os.urandom(128 * 1024 * 1024)
    src = write(tmp_path, "src", data)
    with pytest.raises(Retryable) as err:
        await storage(xrootd_server, "site-b", **slow).upload(
            src, f"{remote_dir}/f", size=len(data), adler32=adler(data)
        )
    assert err.value.reason == "transfer_timeout"
    assert leftovers(xrootd_server, "site-b", remote_dir) == []

    await a.upload(src, f"{remote_dir}/f", size=len(data), adler32=adler(data))
    b = storage(xrootd_server, "site-b", tpc=True, **slow)
    started = time.monotonic()
    with pytest.raises(Retryable) as err:
        await b.copy_from(a, f"{remote_dir}/f", f"{remote_dir}/f", size=len(data), adler32=adler(data))
    assert err.value.reason == "transfer_timeout"
    assert time.monotonic() - started < 20
    assert leftovers(xrootd_server, "site-b", remote_dir) == []


@pytest.mark.slow
async def test_server_stopped_during_an_upload_is_retryable_and_leaves_no_final_file(
    xrootd_server: LocalXrootd, remote_dir: str, tmp_path: Path
) -> None:
    ep = storage(xrootd_server, "site-a")
    data = os.urandom(768 * 1024 * 1024)
    src = write(tmp_path, "src", data)
    rel = f"{remote_dir}/big"
    upload = asyncio.ensure_future(ep.upload(src, rel, size=len(data), adler32=adler(data)))
    try:
        await asyncio.sleep(0.5)
        assert not upload.done()
        await asyncio.to_thread(xrootd_server.stop)
        stopped = time.monotonic()
        with pytest.raises(Retryable) as err:
            await asyncio.wait_for(upload, 120)
        assert err.value.reason == "endpoint_unavailable"
        print(f"failed {time.monotonic() - stopped:.1f} s after the server stopped")
    finally:
        upload.cancel()
        await asyncio.to_thread(xrootd_server.restart)
    assert not xrootd_server.path("site-a", rel).exists()
    # The client keeps a broken connection for StreamErrorWindow seconds, then reconnects.
    restarted = time.monotonic()
    while True:
        try:
            assert await ep.stat(rel) is None  # the server answers again
            break
        except Retryable as exc:
            assert exc.reason == "endpoint_unavailable" and time.monotonic() - restarted < 30
            await asyncio.sleep(0.5)
    print(f"answered again {time.monotonic() - restarted:.1f} s after the restart")


async def test_an_empty_file_round_trips(xrootd_server: LocalXrootd, remote_dir: str, tmp_path: Path) -> None:
    ep = storage(xrootd_server, "site-a")
    await ep.upload(write(tmp_path, "empty", b""), f"{remote_dir}/empty", size=0, adler32=adler(b""))
    assert xrootd_server.path("site-a", f"{remote_dir}/empty").read_bytes() == b""
    await ep.download(f"{remote_dir}/empty", tmp_path / "back", size=0, adler32=adler(b""))
    assert (tmp_path / "back").read_bytes() == b""


async def test_a_copy_from_a_mounted_posix_endpoint_is_uploaded_from_its_file(
    xrootd_server: LocalXrootd, remote_dir: str, tmp_path: Path
) -> None:
    from common.storage.posix import PosixStorage

    area = tmp_path / "area"
    area.mkdir()
    data = os.urandom(100_000)
    (area / "f").write_bytes(data)
    posix = PosixStorage("disk", StorageEndpoint(root=area, small_copies="thread"))
    ep = storage(xrootd_server, "site-b", tpc=True)
    try:
        assert not ep.can_pull_from(posix)
        done = await ep.copy_from(posix, "f", f"{remote_dir}/f", size=len(data), adler32=adler(data))
    finally:
        await posix.aclose()
    assert done.mode == "local"
    assert xrootd_server.path("site-b", f"{remote_dir}/f").read_bytes() == data


async def test_a_directory_the_server_may_not_write_is_an_authorization_failure(
    xrootd_server: LocalXrootd, remote_dir: str, tmp_path: Path
) -> None:
    """The server answers EACCES on its disk as kXR_NotAuthorized, like a refused token."""
    locked = xrootd_server.path("site-a", f"{remote_dir}/locked")
    locked.mkdir(parents=True)
    owner = xrootd_server.path("site-a").stat()
    os.chown(locked, owner.st_uid, owner.st_gid)  # the server's user (xrootd when we are root)
    locked.chmod(0o555)
    try:
        with pytest.raises(Retryable) as err:
            await storage(xrootd_server, "site-a").upload(
                write(tmp_path, "f", b"abc"), f"{remote_dir}/locked/f", size=3, adler32=adler(b"abc")
            )
    finally:
        locked.chmod(0o755)
    assert err.value.reason == "auth_failed"
    assert list(locked.iterdir()) == []
