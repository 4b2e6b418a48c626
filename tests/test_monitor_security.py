"""Issue 16, class 9 (the monitor's part): it listens on 127.0.0.1 unless told otherwise; beyond
this host it needs a token, which then guards /api/status, the dashboard and /metrics; every answer
carries security headers; idle, trickled or half-sent requests are cut within a bound; request
heads are bounded. ``spool status`` sends the token."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from common.config import MonitorSettings, load_settings
from common.errors import ConfigError
from common.messages import FileFailed
from daemons.monitor.handlers import make_web
from daemons.monitor.handlers import service as monitor_service
from daemons.monitor.report import Observed
from daemons.monitor.steps import MonitorState, Thresholds
from daemons.monitor.web import WebServer, is_loopback
from tests.browser_fixtures import browser  # noqa: F401  (the fixture)
from tests.conftest import running, wait_for
from tests.monitor_fixtures import monitor_config, publish_many, resources_of

TOKEN = "s3cret-token-0123456789abcdef"
PATHS = ["/", "/api/status", "/dashboard.js", "/dashboard.css", "/metrics"]
REPO = Path(__file__).resolve().parent.parent


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture
async def server(request: pytest.FixtureRequest) -> AsyncIterator[WebServer]:
    """A monitor's web side on a free local port (``request.param``: WebServer keywords)."""
    kwargs: dict[str, Any] = getattr(request, "param", {})
    web = WebServer(CollectorRegistry(), lambda: {"source": "monitor", "text": "<b>x</b>"}, **kwargs)
    await web.start("127.0.0.1", 0)
    try:
        yield web
    finally:
        await web.stop()


async def _get(web: WebServer, path: str, headers: dict[str, str] | None = None, method: str = "GET") -> Any:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, f"http://127.0.0.1:{web.port}{path}", headers=headers or {}) as response,
    ):
        await response.read()
        return response


# --- the token -----------------------------------------------------------------------------------
WITH_TOKEN = [{"token": TOKEN, "request_timeout": 5.0}]


@pytest.mark.parametrize("server", WITH_TOKEN, indirect=True)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        f"Bearer {TOKEN[:-1]}",
        f"Bearer {TOKEN}x",
        f"Bearer {TOKEN.upper()}",
        f"Token {TOKEN}",
        TOKEN,
        f"Bearer  {TOKEN[1:]}",
        _basic("admin", "wrong"),
        _basic(TOKEN, ""),
        "Basic !!!notbase64",
        "Basic " + base64.b64encode(TOKEN.encode()).decode(),
        f"Bearer {TOKEN}\u00e9",
    ],
    ids=lambda v: repr(v)[:30],
)
async def test_without_the_right_token_every_path_answers_401(server, path, authorization):
    headers = {} if authorization is None else {"Authorization": authorization}
    try:
        response = await _get(server, path, headers)
    except (ValueError, aiohttp.ClientError):
        return  # the client itself refused to send a non-Latin-1 header: nothing reached the monitor
    assert response.status == 401
    challenges = response.headers.getall("WWW-Authenticate")
    assert any(c.startswith("Bearer") for c in challenges) and any(c.startswith("Basic") for c in challenges)
    assert TOKEN not in (await _text_of(server, path, headers))


async def _text_of(web: WebServer, path: str, headers: dict[str, str]) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{web.port}{path}", headers=headers) as response,
    ):
        return await response.text()


@pytest.mark.parametrize("server", WITH_TOKEN, indirect=True)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "authorization", [f"Bearer {TOKEN}", f"bearer {TOKEN}", _basic("anyone", TOKEN), _basic("", TOKEN)]
)
async def test_with_the_token_every_path_answers(server, path, authorization):
    response = await _get(server, path, {"Authorization": authorization})
    assert response.status == 200


@pytest.mark.parametrize("server", WITH_TOKEN, indirect=True)
async def test_the_token_in_the_query_string_is_not_accepted(server):
    """A token in a URL ends up in histories and proxy logs: only the header counts."""
    assert (await _get(server, f"/api/status?token={TOKEN}")).status == 401


@pytest.mark.parametrize("server", [{"token": TOKEN, "metrics_public": True}], indirect=True)
async def test_metrics_public_opens_metrics_only(server):
    assert (await _get(server, "/metrics")).status == 200
    for path in ("/", "/api/status", "/dashboard.js"):
        assert (await _get(server, path)).status == 401


async def test_without_a_token_on_loopback_every_path_answers(server):
    for path in PATHS:
        assert (await _get(server, path)).status == 200


# --- headers -------------------------------------------------------------------------------------
SECURITY = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _assert_secure(headers: Any) -> None:
    for name, value in SECURITY.items():
        assert headers.get(name) == value, (name, dict(headers))
    csp = headers["Content-Security-Policy"]
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp


@pytest.mark.parametrize("server", [{}, {"token": TOKEN}], indirect=True, ids=["open", "token"])
@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", p) for p in PATHS] + [("GET", "/nope"), ("POST", "/api/status"), ("DELETE", "/"), ("HEAD", "/")],
)
async def test_every_answer_carries_the_security_headers(server, method, path):
    for headers in ({}, {"Authorization": f"Bearer {TOKEN}"}):
        _assert_secure((await _get(server, path, headers, method)).headers)


async def test_a_malformed_request_is_answered_400(server):
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /api/status HTTP/1.1\r\nHost: x\r\nBad Header Without Colon\r\n\r\n")
    await writer.drain()
    head = await asyncio.wait_for(reader.read(4096), timeout=5)
    writer.close()
    assert head.split(b" ")[1] == b"400"
    assert b"X-Content-Type-Options: nosniff" in head and b"Content-Security-Policy" in head


def test_the_dashboard_has_no_inline_script_or_style():
    from daemons.monitor.dashboard import PAGE, SCRIPT

    assert "<script>" not in PAGE and "<style" not in PAGE and "style=" not in PAGE
    assert '<script src="dashboard.js"></script>' in PAGE
    assert "style=" not in SCRIPT and "eval(" not in SCRIPT


# --- slow, idle and oversized requests ----------------------------------------------------------
TIMEOUT = 1.0
QUICK = [{"request_timeout": TIMEOUT}]


async def _cut_after(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, trickle: bytes | None
) -> float:
    """Seconds until the server closed the connection, while ``trickle`` is sent a byte every 0.3 s."""
    started = time.monotonic()

    async def send() -> None:
        for byte in trickle or b"":
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.3)

    sender = asyncio.create_task(send())
    try:
        while await asyncio.wait_for(reader.read(65536), timeout=30):
            pass
    finally:
        sender.cancel()
        writer.close()
    return time.monotonic() - started


@pytest.mark.parametrize("server", QUICK, indirect=True)
@pytest.mark.parametrize(
    "trickle",
    [
        None,  # connects and says nothing
        b"GET /api/status HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200,  # slowloris: a header byte at a time
        b"G" * 300,  # a request line that never ends
    ],
    ids=["idle", "slowloris", "endless-line"],
)
async def test_a_slow_or_idle_client_is_cut_within_the_bound(server, trickle):
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    elapsed = await _cut_after(reader, writer, trickle)
    assert elapsed < TIMEOUT + 2.5
    assert (await _get(server, "/api/status")).status == 200  # everyone else still served


@pytest.mark.parametrize("server", QUICK, indirect=True)
async def test_an_idle_keep_alive_connection_is_cut_after_its_answer(server):
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /api/status HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    elapsed = await _cut_after(reader, writer, None)
    assert elapsed < TIMEOUT + 2.5


@pytest.mark.parametrize("server", QUICK, indirect=True)
async def test_a_half_sent_body_is_not_waited_for(server):
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"POST /api/status HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"x" * 10)
    await writer.drain()
    elapsed = await _cut_after(reader, writer, b"y" * 100)
    assert elapsed < TIMEOUT + 3.5


@pytest.mark.parametrize("server", [{"request_timeout": 30.0}], indirect=True)
async def test_connections_beyond_the_bound_are_closed_at_once(server):
    from daemons.monitor.web import MAX_CONNECTIONS

    held = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(MAX_CONNECTIONS)]
    try:
        await asyncio.sleep(0.2)  # the server has taken them all
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(100), timeout=5) == b""  # closed, not served
        assert time.monotonic() - started < 2
        writer.close()
    finally:
        for _, w in held:
            w.close()
    await asyncio.sleep(0.2)
    assert (await _get(server, "/api/status")).status == 200  # room again


@pytest.mark.parametrize(
    "head",
    [
        b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 10_000 + b"\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(200)) + b"\r\n",
    ],
    ids=["long-line", "big-header", "many-headers"],
)
async def test_oversized_request_heads_are_refused(server, head):
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(head)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(4096), timeout=5)
    writer.close()
    assert answer.split(b" ")[1] in (b"400", b"413", b"414", b"431")
    assert (await _get(server, "/api/status")).status == 200


async def test_a_body_beyond_the_bound_is_refused(server):
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"POST /api/status HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n")
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(4096), timeout=5)
    writer.close()
    assert answer.split(b" ")[1] in (b"405", b"413")


# --- where it listens, and the token's source ----------------------------------------------------
@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("[::1]", True), ("localhost", True),
     ("0.0.0.0", False), ("::", False), ("", False), ("192.168.1.10", False), ("monitor.example.org", False),
     ("localhost.evil.org", False)],
)  # fmt: skip
def test_what_counts_as_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_the_default_is_loopback():
    assert MonitorSettings().http_host == "127.0.0.1"


def _settings(tmp_path: Path, **monitor: str) -> Any:
    return load_settings(monitor_config(tmp_path, "sec", **monitor))


def _make(settings: Any) -> WebServer:
    return make_web(settings, MonitorState(Thresholds(interval=1.0)), Observed())


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1", "monitor.example.org"])
def test_listening_beyond_this_host_without_a_token_is_refused_at_start(tmp_path, monkeypatch, host):
    monkeypatch.delenv("SPOOL_MONITOR_TOKEN", raising=False)
    with pytest.raises(ConfigError) as err:
        _make(_settings(tmp_path, http_host=json.dumps(host)))
    assert "monitor.http_host" in str(err.value) and "token" in str(err.value)


def test_listening_beyond_this_host_with_a_token_file_protects(tmp_path, monkeypatch):
    monkeypatch.delenv("SPOOL_MONITOR_TOKEN", raising=False)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    web = _make(_settings(tmp_path, http_host='"0.0.0.0"', token_file=json.dumps(str(token_file))))
    assert web.protected


def test_the_environment_token_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("SPOOL_MONITOR_TOKEN", TOKEN)
    settings = _settings(tmp_path, http_host='"0.0.0.0"', token_file='"/nonexistent"')
    assert settings.monitor.token() == TOKEN


@pytest.mark.parametrize(
    ("content", "why"),
    [(None, "No such file"), (b"", "16 to 1024"), (b"short\n", "16 to 1024"),
     (b"has spaces in the token", "16 to"), (b"\xff" * 40, "ASCII"), (b"x" * 5000, "16 to 1024"),
     ("dir", "regular file"), ("fifo", "regular file")],
    ids=["missing", "empty", "short", "spaces", "binary", "huge", "directory", "fifo"],
)  # fmt: skip
def test_an_unusable_token_file_is_one_line_naming_the_key_never_the_content(
    tmp_path, monkeypatch, content, why
):
    monkeypatch.delenv("SPOOL_MONITOR_TOKEN", raising=False)
    path = tmp_path / "token"
    if content == "dir":
        path.mkdir()
    elif content == "fifo":
        os.mkfifo(path)  # must not block the start
    elif content is not None:
        path.write_bytes(content)  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as err:
        MonitorSettings(token_file=path).token()
    message = str(err.value)
    assert "monitor.token_file" in message and why in message and "\n" not in message
    secret = content.decode(errors="ignore").strip() if isinstance(content, bytes) else ""
    assert not secret or secret not in message


@pytest.mark.integration
async def test_spool_run_monitor_on_all_interfaces_without_a_token_exits_with_one_line(tmp_path, broker):
    config = monitor_config(tmp_path, "all", http_host='"0.0.0.0"')
    env = {k: v for k, v in os.environ.items() if k != "SPOOL_MONITOR_TOKEN"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "daemons", "--config", str(config), "run", "monitor",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, env=env,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    text = (out + err).decode()
    assert proc.returncode == 2, text
    assert "monitor.http_host" in text and "Traceback" not in text
    assert len([line for line in err.decode().splitlines() if "monitor.http_host" in line]) == 1


@pytest.mark.integration
async def test_spool_status_sends_the_token_to_a_protected_monitor(tmp_path, tag, broker, monkeypatch):
    monkeypatch.delenv("SPOOL_MONITOR_TOKEN", raising=False)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    config = monitor_config(tmp_path, tag, http_host='"0.0.0.0"', token_file=json.dumps(str(token_file)))
    settings = load_settings(config)
    from common.bus.topology import declare_topology

    channel = await broker.channel()
    await declare_topology(channel, settings)
    await channel.close()
    async with running([monitor_service], settings) as process:
        res = resources_of(process)
        failed = FileFailed(daemon="ingest", reason="disk_full", error="e", attempts=1)
        await publish_many(broker, settings, [failed])
        await wait_for(lambda: _is(res.state.events["file.failed"] == 1))
        assert (await _get(res.web, "/api/status")).status == 401
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "daemons", "--config", str(config), "status", "--json",
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
        wrong = {**os.environ, "SPOOL_MONITOR_TOKEN": "not-the-token-0123456789"}
        refused = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "daemons", "--config", str(config), "status", "--json",
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, env=wrong,
        )  # fmt: skip
        refused_out, _ = await asyncio.wait_for(refused.communicate(), timeout=120)
    assert proc.returncode == 0, err.decode()
    doc = json.loads(out)
    assert doc["source"] == "monitor" and doc["failures"][0]["reason"] == "disk_full"
    assert TOKEN not in out.decode() + err.decode()
    # With a wrong token: the direct view, saying why the monitor's was not had.
    direct = json.loads(refused_out)
    assert direct["source"] != "monitor" and "token was refused" in direct["monitor"]["error"]
    assert "not-the-token" not in refused_out.decode()


async def _is(value: bool) -> bool:
    return value


@pytest.mark.integration
async def test_the_protected_dashboard_works_in_chromium_under_its_csp(
    tmp_path,
    tag,
    broker,
    browser,  # noqa: F811  (the fixture imported above)
    monkeypatch,
):
    """A real browser: without the token the page is a 401; with it (Basic, as the browser's prompt
    sends it) the page, its script and its style load under the strict CSP and show the monitor."""
    monkeypatch.delenv("SPOOL_MONITOR_TOKEN", raising=False)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    config = monitor_config(tmp_path, tag, token_file=json.dumps(str(token_file)))
    settings = load_settings(config)
    from common.bus.topology import declare_topology

    channel = await broker.channel()
    await declare_topology(channel, settings)
    await channel.close()
    async with running([monitor_service], settings) as process:
        url = f"http://127.0.0.1:{resources_of(process).web.port}/"
        await asyncio.to_thread(browser.get, url)
        refused = await asyncio.to_thread(browser.execute_script, "return document.body.innerText")
        assert "as of" not in refused  # an empty page (behind the browser's login prompt) or the 401
        await asyncio.to_thread(browser.execute_cdp_cmd, "Network.enable", {})
        headers = {"headers": {"Authorization": _basic("operator", TOKEN)}}
        await asyncio.to_thread(browser.execute_cdp_cmd, "Network.setExtraHTTPHeaders", headers)
        await asyncio.to_thread(browser.get, url)
        page: dict[str, Any] = {}

        async def shows_the_monitor() -> bool:
            page.update(await asyncio.to_thread(browser.execute_script, READ))
            return "as of" in page["meta"] and "monitor" in page["daemons"]

        await wait_for(shows_the_monitor, timeout=60, interval=0.5)
    assert page["h1_size"] == "18.2px"  # dashboard.css applied (1.3em of 14px)


READ = """
return {
  meta: document.getElementById("meta").innerText,
  daemons: document.getElementById("daemons").innerText,
  h1_size: getComputedStyle(document.querySelector("h1")).fontSize,
};
"""
