"""PostgreSQL TLS: libpq's ``sslmode`` / ``sslrootcert`` / ``sslcert`` / ``sslkey`` (URL or catalogue
settings) reach asyncpg as its ``ssl`` argument, and a server without TLS under ``sslmode=require``
is one clear line, never a traceback. (The shared server runs without TLS.)"""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from common.catalogue import Catalogue
from common.catalogue.engine import create_engine, ssl_argument
from common.config import CatalogueSettings, load_settings
from common.errors import ConfigError
from tests.catalogue_fixtures import PG_URL
from tests.conftest import write_config
from tests.test_bus_tls import make_pki

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


async def test_sslmode_require_against_a_server_without_tls_is_one_line() -> None:
    url = PG_URL + ("&" if "?" in PG_URL else "?") + "sslmode=require"
    try:
        with pytest.raises(ConfigError, match="does not offer TLS, and sslmode=require requires it"):
            await Catalogue.open(url)
    except OSError as exc:  # no server at all
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"PostgreSQL not reachable: {exc}")


def test_the_cli_says_it_in_one_line(tmp_path: Path, tag: str) -> None:
    state = tmp_path / "state"
    (state / "landing").mkdir(parents=True)
    config = write_config(
        tmp_path / "spool.toml", state, tag, catalogue=f'url = "{PG_URL}"\nsslmode = "require"'
    )
    assert load_settings(config).catalogue.url.endswith("sslmode=require")
    done = subprocess.run(
        [sys.executable, "-m", "common.cli", "--config", str(config), "ls"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and "does not offer TLS" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
