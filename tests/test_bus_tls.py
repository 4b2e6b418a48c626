"""TLS to RabbitMQ against a private node with a TLS listener (and its management API over https),
certificates generated at test time: a daemon connects with ``amqps://`` and handles a message;
a wrong CA, a name the certificate does not hold and a missing client certificate are refused with
one clear line. Without ``rabbitmq-server`` the tests skip, except on CI (``CI=true``): fail."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.chaos.broker import PrivateBroker, available, free_port
from common.bus.connection import connect
from common.bus.management import ManagementClient, ManagementUnreachable, endpoint_for
from common.catalogue import Catalogue
from common.config import BusSettings, Settings, load_settings
from common.errors import ConfigError, Retryable
from daemons.ingest.handlers import service as ingest_service
from tests.cli_fixtures import spool
from tests.conftest import running, wait_for, write_config
from tests.tls_fixtures import make_pki

DATASET = "lst1.20261123.run012345.dl0"
pytestmark = pytest.mark.integration


class TlsBroker(PrivateBroker):
    """The chaos harness's private node, plus a TLS listener on 127.0.0.1 and 127.0.0.2 that asks
    for a client certificate, and the management API over https."""

    def __init__(self, base: Path, tag: str, pki: Path) -> None:
        super().__init__(base, tag)
        self.pki = pki
        self.tls_port = self.https_port = 0

    def _prepare(self) -> None:
        super()._prepare()
        self.tls_port, self.https_port = free_port(), free_port()
        p = self.pki
        (self.dir / "rabbitmq.conf").write_text(
            "loopback_users = none\n"
            f"listeners.ssl.1 = 127.0.0.1:{self.tls_port}\n"
            f"listeners.ssl.2 = 127.0.0.2:{self.tls_port}\n"
            f"ssl_options.cacertfile = {p / 'ca.pem'}\n"
            f"ssl_options.certfile = {p / 'server.pem'}\n"
            f"ssl_options.keyfile = {p / 'server.key'}\n"
            "ssl_options.verify = verify_peer\n"
            "ssl_options.fail_if_no_peer_cert = true\n"
            f"management.ssl.port = {self.https_port}\n"
            "management.ssl.ip = 127.0.0.1\n"
            f"management.ssl.cacertfile = {p / 'ca.pem'}\n"
            f"management.ssl.certfile = {p / 'server.pem'}\n"
            f"management.ssl.keyfile = {p / 'server.key'}\n"
        )
        (self.dir / "enabled_plugins").write_text("[rabbitmq_management].\n")


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    why = available()
    if why is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the TLS tests must run on CI: {why}")
        pytest.skip(why)
    base = tmp_path_factory.mktemp("tls")
    make_pki(base / "pki")
    node = TlsBroker(base, os.urandom(4).hex(), base / "pki")
    node.start()
    try:
        yield node
    finally:
        node.close()


def _bus(node: TlsBroker, host: str = "127.0.0.1", **tls: object) -> BusSettings:
    pki = node.pki
    given = {"tls_ca": pki / "ca.pem", "tls_cert": pki / "client.pem", "tls_key": pki / "client.key", **tls}
    return BusSettings.model_validate(
        {"url": f"amqps://guest:guest@{host}:{node.tls_port}/", "connect_timeout": 10, **given}
    )


@pytest.fixture
def tls_config(tmp_path: Path, tag: str, tls_broker: TlsBroker) -> Path:
    state = tmp_path / "state"
    (state / "landing").mkdir(parents=True)
    config = write_config(tmp_path / "spool.toml", state, tag)
    pki = tls_broker.pki
    text = config.read_text().replace(
        "[bus]\n",
        "[bus]\n"
        f'tls_ca = "{pki / "ca.pem"}"\ntls_cert = "{pki / "client.pem"}"\ntls_key = "{pki / "client.key"}"\n',
    )
    text = text.replace(
        'url = "amqp://guest:guest@127.0.0.1:5672/"',
        f'url = "amqps://guest:guest@127.0.0.1:{tls_broker.tls_port}/"',
    )
    text = text.replace(
        "http_port = 0", f'http_port = 0\nmanagement_url = "https://127.0.0.1:{tls_broker.https_port}"'
    )
    config.write_text(text)
    return config


async def test_a_daemon_over_amqps_handles_a_message_announced_over_amqps(tls_config: Path) -> None:
    settings = load_settings(tls_config)
    assert settings.bus.url.startswith("amqps://")
    landing = settings.landing_areas["lst1"]
    (landing / "a.dat").write_bytes(b"over tls")
    async with running([ingest_service], settings):
        sent = spool(tls_config, "ingest", str(landing / "a.dat"), "-d", DATASET)
        assert sent.returncode == 0, sent.stderr
        catalogue = await Catalogue.open(settings.catalogue.url)
        try:
            await wait_for(lambda: _registered(catalogue))
        finally:
            await catalogue.close()
    # The management API over https, verified with the same CA (spool status reads it).
    async with ManagementClient(endpoint_for(settings.bus, settings.monitor.management_url)) as api:
        snapshot = await api.snapshot([settings.queue("ingest")])
    assert settings.queue("ingest") in snapshot.queues


async def _registered(catalogue: Catalogue) -> bool:
    return len(await catalogue.queries.list_files()) == 1


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"tls_ca": "wrong-ca.pem"}, "certificate verify failed"),
        ({"host": "127.0.0.2"}, "certificate verify failed"),  # the certificate names 127.0.0.1, localhost
    ],
)
async def test_a_broker_certificate_not_trusted_is_refused_in_one_line(
    tls_broker: TlsBroker, change: dict[str, str], expected: str
) -> None:
    host = change.get("host", "127.0.0.1")
    tls = {"tls_ca": tls_broker.pki / change["tls_ca"]} if "tls_ca" in change else {}
    with pytest.raises(Retryable) as refused:
        await connect(_bus(tls_broker, host, **tls))
    assert refused.value.reason == "broker_tls_failed"
    assert expected in refused.value.message and "\n" not in refused.value.message
    assert "guest:***@" in refused.value.message  # the password is never shown


async def test_the_name_check_can_be_turned_off_but_the_ca_check_cannot(tls_broker: TlsBroker) -> None:
    connection = await connect(_bus(tls_broker, "127.0.0.2", tls_check_hostname=False))
    await connection.close()
    with pytest.raises(Retryable, match="certificate verify failed"):
        await connect(
            _bus(tls_broker, "127.0.0.2", tls_check_hostname=False, tls_ca=tls_broker.pki / "wrong-ca.pem")
        )


async def test_a_missing_client_certificate_is_refused_by_the_broker(tls_broker: TlsBroker) -> None:
    bus = _bus(tls_broker, tls_cert=None, tls_key=None)
    with pytest.raises(Retryable) as refused:
        await connect(bus)
    # TLS 1.3: the client's handshake ends before the broker checks its certificate; the broker's
    # alert ("certificate required") usually arrives as the reason, sometimes only as the reset.
    if refused.value.reason == "broker_tls_failed":
        assert "certificate required" in refused.value.message
    else:
        assert refused.value.reason == "broker_unreachable", refused.value
    assert "\n" not in refused.value.message


def test_the_cli_says_a_wrong_ca_in_one_line(tls_config: Path, tls_broker: TlsBroker) -> None:
    text = tls_config.read_text().replace(
        str(tls_broker.pki / "ca.pem"), str(tls_broker.pki / "wrong-ca.pem")
    )
    tls_config.write_text(text)
    done = spool(tls_config, "dead", "list")
    assert (
        done.returncode == 3
        and "broker_tls_failed" in done.stderr
        and "certificate verify failed" in done.stderr
    )
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


async def test_management_api_with_a_wrong_ca_is_unreachable_in_one_line(
    tls_config: Path, tls_broker: TlsBroker
) -> None:
    settings = load_settings(tls_config)
    bus = settings.bus.model_copy(update={"tls_ca": tls_broker.pki / "wrong-ca.pem"})
    async with ManagementClient(endpoint_for(bus, settings.monitor.management_url)) as api:
        with pytest.raises(ManagementUnreachable, match="certificate verify failed"):
            await api.snapshot([settings.queue("ingest")])


def test_tls_settings_are_checked_when_loaded(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="amqps"):
        load_settings(None, bus={"url": "amqp://g:g@h/", "tls_ca": str(tmp_path / "ca.pem")})
    with pytest.raises(ConfigError, match="tls_key needs tls_cert"):
        load_settings(None, bus={"url": "amqps://g:g@h/", "tls_key": str(tmp_path / "k")})
    with pytest.raises(ConfigError, match="no_verify_ssl"):
        load_settings(None, bus={"url": "amqps://g:g@h/?no_verify_ssl=1"})
    missing = Settings(bus={"url": "amqps://g:g@h/", "tls_ca": str(tmp_path / "nope.pem")})  # type: ignore[arg-type]
    from common.bus.tls import client_context

    with pytest.raises(ConfigError, match=r"nope\.pem"):
        client_context(missing.bus)
