"""``bus.urls``: the nodes of one RabbitMQ cluster, checked when the configuration is loaded (no
broker needed); and ``bus.quorum_initial_group_size`` reaching the work queues' arguments."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.bus.topology import work_queue_arguments
from common.config import BusSettings, Settings, load_settings
from common.errors import ConfigError

N1, N2, N3 = (f"amqp://spool:pw@rabbit{n}.example:5672/spool" for n in (1, 2, 3))


def test_urls_default_to_url_alone() -> None:
    bus = BusSettings()
    assert bus.urls == [] and bus.broker_urls() == [bus.url]


def test_urls_make_url_their_first_and_are_all_tried() -> None:
    bus = BusSettings(urls=[N1, N2, N3])
    assert bus.url == N1
    assert bus.broker_urls() == [N1, N2, N3]
    assert bus.user == "spool" and bus.trusted_users() == {"spool"}
    assert BusSettings(url=N2, urls=[N1, N2]).url == N1  # url may repeat one of them


def test_the_environment_gives_urls_comma_separated_or_as_json(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "spool.toml"
    path.write_text("[bus]\nexchange = 'spool'\n")
    monkeypatch.setenv("SPOOL_BUS__URLS", f" {N1}, {N2},{N3} ")
    assert load_settings(path).bus.broker_urls() == [N1, N2, N3]
    monkeypatch.setenv("SPOOL_BUS__URLS", f'["{N2}", "{N3}"]')
    assert load_settings(path).bus.url == N2
    # A file that names one broker in url and an environment that names the cluster: which one
    # was meant is not guessed.
    path.write_text("[bus]\nurl = 'amqp://guest:guest@localhost:5672/'\n")
    with pytest.raises(ConfigError, match="url is not one of urls"):
        load_settings(path)


@pytest.mark.parametrize(
    ("given", "error"),
    [
        ({"url": "amqp://guest:guest@elsewhere:5672/", "urls": [N1, N2]}, "url is not one of urls"),
        ({"urls": [N1, N2.replace("spool:pw", "other:pw")]}, "differs from"),
        ({"urls": [N1, N2.replace(":pw@", ":other@")]}, "differs from"),
        ({"urls": [N1, N2.replace("/spool", "/other")]}, "differs from"),
        ({"urls": [N1, N2.replace("amqp://", "amqps://")]}, "differs from"),
        ({"urls": [N1, "http://rabbit2.example:5672/spool"]}, "not an amqp:// or amqps:// URL"),
        ({"urls": [N1, N1]}, "given twice"),
        ({"urls": [N1, N2], "tls_ca": "/etc/ca.pem"}, "use amqps://"),
        ({"urls": [N1 + "?cafile=/x.pem", N2 + "?cafile=/x.pem"]}, "TLS options in url"),
        ({"quorum_initial_group_size": 0}, "greater than or equal to 1"),
    ],
)
def test_urls_of_another_cluster_or_breaking_a_rule_are_refused(given: dict, error: str) -> None:
    with pytest.raises(ValueError, match=error) as refused:
        BusSettings.model_validate(given)
    assert ":pw@" not in str(refused.value)  # a password never ends up in the message


def test_a_bad_urls_in_the_file_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "spool.toml"
    path.write_text(f'[bus]\nurls = ["{N1}", "amqp://spool:pw@rabbit2.example:5672/other"]\n')
    with pytest.raises(ConfigError, match=r"bus: .*differs from"):
        load_settings(path)


def test_the_initial_group_size_is_a_queue_argument_only_when_set() -> None:
    assert "x-quorum-initial-group-size" not in work_queue_arguments(Settings(), "ingest")
    settings = Settings(bus=BusSettings(quorum_initial_group_size=3))
    for daemon in ("ingest", "monitor"):
        assert work_queue_arguments(settings, daemon)["x-quorum-initial-group-size"] == 3


def test_broker_setup_gives_each_user_every_node_of_a_cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from common.bus.broker_setup import SecretsDir, write_user_files
    from common.bus.permissions import daemon_grant

    config = tmp_path / "spool.toml"
    config.write_text(f'[bus]\nurls = ["{N1}", "{N2}"]\n')
    settings = load_settings(config)
    secrets = SecretsDir(tmp_path / "secrets")
    secrets.prepare()
    grants = [daemon_grant(settings, "ingest")]
    passwords = write_user_files(settings, grants, secrets)
    user = grants[0].user
    key, _, value = secrets.env_file(user).read_text().strip().partition("=")
    assert key == "SPOOL_BUS__URLS"
    # What the daemon of that user loads: the file's nodes, with its own credentials.
    monkeypatch.setenv(key, value.strip("'"))
    bus = load_settings(config).bus
    assert [u.split("@")[1] for u in bus.broker_urls()] == [
        "rabbit1.example:5672/spool",
        "rabbit2.example:5672/spool",
    ]
    assert bus.user == user and bus.url.startswith(f"amqp://{user}:") and user != "spool"
    assert passwords[user] and "pw@" not in bus.url
