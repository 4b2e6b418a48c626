"""PostgreSQL TLS: libpq's ``sslmode`` / ``sslrootcert`` / ``sslcert`` / ``sslkey`` (URL or catalogue
settings) reach asyncpg as its ``ssl`` argument, and a server without TLS under ``sslmode=require``
is one clear line, never a traceback (the shared server runs without TLS); against a private server
with TLS started here, verify-full connects encrypted and a wrong CA or name is refused in one line."""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from bench.chaos.broker import free_port
from common.catalogue import Catalogue
from common.catalogue.engine import create_engine, ssl_argument
from common.config import CatalogueSettings, load_settings
from common.errors import ConfigError
from tests.catalogue_fixtures import PG_URL
from tests.conftest import write_config
from tests.tls_fixtures import make_pki

REPO = Path(__file__).resolve().parent.parent


def test_each_sslmode_gives_asyncpg_the_checks_libpq_would_make(tmp_path: Path) -> None:
    make_pki(tmp_path)
    ca = str(tmp_path / "ca.pem")
    assert ssl_argument({}) is None  # asyncpg's own default
    assert ssl_argument({"sslmode": "disable"}) is False
    assert ssl_argument({"sslmode": "prefer"}) == "prefer"
    required = ssl_argument({"sslmode": "require"})
    assert isinstance(required, ssl.SSLContext) and required.verify_mode == ssl.CERT_NONE
    with_root = ssl_argument({"sslmode": "require", "sslrootcert": ca})
    assert isinstance(with_root, ssl.SSLContext) and with_root.verify_mode == ssl.CERT_REQUIRED
    assert not with_root.check_hostname
    full = ssl_argument({"sslmode": "verify-full", "sslrootcert": ca})
    assert isinstance(full, ssl.SSLContext) and full.verify_mode == ssl.CERT_REQUIRED and full.check_hostname
    client = ssl_argument(
        {"sslmode": "verify-ca", "sslrootcert": ca, "sslcert": str(tmp_path / "client.pem"),
         "sslkey": str(tmp_path / "client.key")}
    )  # fmt: skip
    assert isinstance(client, ssl.SSLContext) and not client.check_hostname
    with pytest.raises(ConfigError, match="sslmode 'sometimes'"):
        ssl_argument({"sslmode": "sometimes"})
    with pytest.raises(ConfigError, match="No such file"):
        ssl_argument({"sslmode": "verify-full", "sslrootcert": str(tmp_path / "missing.pem")})


async def test_the_ssl_context_reaches_asyncpgs_connect(tmp_path: Path) -> None:
    make_pki(tmp_path)
    url = (
        f"postgresql+asyncpg://u@db.example:5432/spool?sslmode=verify-full&sslrootcert={tmp_path / 'ca.pem'}"
    )
    engine = create_engine(url)
    # libpq's keys left the URL (asyncpg would refuse them as unknown keyword arguments) ...
    assert "sslmode" not in engine.url.query and "sslrootcert" not in engine.url.query
    seen: dict[str, Any] = {}

    class Stop(Exception):
        pass

    def capture(_dialect: Any, _record: Any, _cargs: Any, cparams: dict[str, Any]) -> None:
        seen.update(cparams)
        raise Stop

    # ... and ``ssl`` is among the arguments asyncpg.connect is called with (captured in place of
    # the listener that would call it; event listeners run in the order they were added).
    ours = list(engine.sync_engine.dialect.dispatch.do_connect)
    for listener in ours:
        event.remove(engine.sync_engine, "do_connect", listener)
    event.listen(engine.sync_engine, "do_connect", capture)
    with pytest.raises(Stop):
        async with engine.connect():
            pass
    await engine.dispose()
    assert isinstance(seen["ssl"], ssl.SSLContext) and seen["ssl"].check_hostname
    assert seen["ssl"].verify_mode == ssl.CERT_REQUIRED and "sslmode" not in seen


def test_catalogue_settings_fold_into_the_url_and_conflicts_are_refused(tmp_path: Path) -> None:
    folded = CatalogueSettings(
        url="postgresql://u@h/db", sslmode="verify-full", sslrootcert=tmp_path / "ca.pem"
    )
    assert "sslmode=verify-full" in folded.url and "sslrootcert=" in folded.url
    with pytest.raises(ValueError, match="give it once"):
        CatalogueSettings(url="postgresql://u@h/db?sslmode=disable", sslmode="require")
    with pytest.raises(ValueError, match="PostgreSQL"):
        CatalogueSettings(url="sqlite:///x.db", sslmode="require")


@pytest.mark.integration  # the shared PostgreSQL
async def test_sslmode_require_against_a_server_without_tls_is_one_line() -> None:
    url = PG_URL + ("&" if "?" in PG_URL else "?") + "sslmode=require"
    try:
        with pytest.raises(ConfigError, match="does not offer TLS, and sslmode=require requires it"):
            await Catalogue.open(url)
    except OSError as exc:  # no server at all
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"PostgreSQL not reachable: {exc}")


@pytest.mark.integration  # the shared PostgreSQL
def test_the_cli_says_it_in_one_line(tmp_path: Path, tag: str) -> None:
    state = tmp_path / "state"
    (state / "landing").mkdir(parents=True)
    config = write_config(
        tmp_path / "spool.toml", state, tag, catalogue=f'url = "{PG_URL}"\nsslmode = "require"'
    )
    assert load_settings(config).catalogue.url.endswith("sslmode=require")
    done = subprocess.run(
        [sys.executable, "-m", "daemons", "--config", str(config), "ls"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and "does not offer TLS" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


def _pg_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else None


@pytest.fixture(scope="module")
def tls_postgres() -> Iterator[tuple[int, Path]]:
    """A private PostgreSQL with TLS on (the shared one is left alone): (port, directory with the
    PKI of ``make_pki``). initdb and start take about 2 s."""
    bindir = _pg_bin()
    if bindir is None:
        if os.environ.get("CI") == "true":
            pytest.fail("the PostgreSQL TLS test must run on CI: no initdb (apt-get install postgresql)")
        pytest.skip("no PostgreSQL server binaries (initdb)")
    base = Path(tempfile.mkdtemp(prefix="spool-pgtls-"))
    base.chmod(0o755)
    make_pki(base / "pki")
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root; the server must own its key
        as_user = ["runuser", "-u", "postgres", "--"]
        subprocess.run(["chown", "-R", "postgres", str(base)], check=True)
    port = free_port()
    data = base / "data"
    initdb = [str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"]
    subprocess.run([*as_user, *initdb], check=True, capture_output=True)
    options = (
        f"-p {port} -c listen_addresses=127.0.0.1,127.0.0.2 -c unix_socket_directories={base} -c ssl=on "
        f"-c ssl_cert_file={base / 'pki/server.pem'} -c ssl_key_file={base / 'pki/server.key'} -c fsync=off"
    )
    pg_ctl = [*as_user, str(bindir / "pg_ctl"), "-D", str(data)]
    subprocess.run(
        [*pg_ctl, "-o", options, "-w", "-l", str(base / "log"), "start"], check=True, capture_output=True
    )
    try:
        yield port, base / "pki"
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


async def test_verify_full_against_a_server_with_tls_connects_and_wrong_trust_is_refused(
    tls_postgres,
) -> None:
    port, pki = tls_postgres
    base = f"postgresql+asyncpg://postgres@127.0.0.1:{port}/postgres"
    catalogue = await Catalogue.open(f"{base}?sslmode=verify-full&sslrootcert={pki / 'ca.pem'}")
    try:
        # The session really is encrypted (the server says so).
        async with catalogue.engine.connect() as conn:
            on = await conn.exec_driver_sql("select ssl from pg_stat_ssl where pid = pg_backend_pid()")
            assert on.scalar() is True
    finally:
        await catalogue.close()
    with pytest.raises(ConfigError, match="certificate verify failed"):
        await Catalogue.open(f"{base}?sslmode=verify-full&sslrootcert={pki / 'wrong-ca.pem'}")
    other_name = f"postgresql+asyncpg://postgres@127.0.0.2:{port}/postgres"
    with pytest.raises(ConfigError, match="sslmode=verify-full"):
        await Catalogue.open(f"{other_name}?sslmode=verify-full&sslrootcert={pki / 'ca.pem'}")
    # verify-ca checks the chain, not the name; require encrypts without checking.
    for query in (f"sslmode=verify-ca&sslrootcert={pki / 'ca.pem'}", "sslmode=require"):
        opened = await Catalogue.open(f"{other_name}?{query}")
        await opened.close()
