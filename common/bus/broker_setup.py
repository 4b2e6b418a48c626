"""Carrying out ``spool broker setup``: passwords in files, ``rabbitmqctl`` commands, the HTTP API.

Passwords are never printed nor passed on a command line. Each user's lives in
``<secrets>/<user>.password`` (read when present, else generated, 32 random bytes): the printed
``rabbitmqctl add_user`` reads it on its standard input, ``--apply`` sends it over the management
API. Next to it ``<secrets>/<user>.env`` holds ``SPOOL_BUS__URL`` with that user's credentials, for
a systemd ``EnvironmentFile=`` or ``set -a; . file`` before ``spool``. Both files are created with
mode 0600 (never group- or world-readable), the directory with 0700; an existing password file
others can read is refused.
"""

from __future__ import annotations

import os
import secrets
import shlex
import stat
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from common.bus.management import ManagementClient, ManagementEndpoint
from common.bus.permissions import Grant
from common.config import Settings

SNIPPET_NAME = "spool-broker.toml"


class SecretsDir:
    """Where the users' password and environment files live."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def prepare(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        mode = stat.S_IMODE(self.directory.stat().st_mode)
        if mode & 0o007:
            raise ValueError(
                f"secrets directory {self.directory} is open to every user (mode {mode:o}): chmod o-rwx"
            )

    def password_file(self, user: str) -> Path:
        return self.directory / f"{user}.password"

    def env_file(self, user: str) -> Path:
        return self.directory / f"{user}.env"

    def password(self, user: str) -> str:
        """The user's password: from its file, else a new one written to it (mode 0600)."""
        path = self.password_file(user)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            return self._read(path)
        value = secrets.token_urlsafe(32)
        with os.fdopen(fd, "w") as out:
            out.write(value)
        return value

    def _read(self, path: Path) -> str:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with os.fdopen(fd) as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise ValueError(f"{path} is not a regular file")
            if info.st_mode & 0o077:
                raise ValueError(
                    f"{path} is readable by others (mode {stat.S_IMODE(info.st_mode):o}): chmod 600"
                )
            value = f.read(4096).strip()
        if not value or any(c in value for c in "\r\n"):
            raise ValueError(f"{path} must hold the password on one line")
        return value

    def write_private(self, path: Path, text: str) -> None:
        """Replace ``path`` with ``text``, mode 0600 from the first byte (a temporary, renamed)."""
        temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "w") as out:
                out.write(text)
            os.replace(temp, path)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise


def url_for(bus_url: str, user: str, password: str) -> str:
    """``bus.url`` with another user's credentials (host, port, vhost, scheme kept)."""
    parts = urlsplit(bus_url)
    host = parts.hostname or "localhost"
    host = f"[{host}]" if ":" in host else host
    port = f":{parts.port}" if parts.port else ""
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}{port}"
    return urlunsplit(parts._replace(netloc=netloc))


def write_user_files(settings: Settings, grants: Sequence[Grant], secrets_dir: SecretsDir) -> dict[str, str]:
    """Passwords (read or generated) and the ``.env`` file of every user; user -> password."""
    passwords: dict[str, str] = {}
    for grant in grants:
        password = secrets_dir.password(grant.user)
        passwords[grant.user] = password
        if settings.bus.urls:  # a cluster: every node, with this user's credentials
            urls = ",".join(url_for(u, grant.user, password) for u in settings.bus.urls)
            line = f"SPOOL_BUS__URLS='{urls}'\n"
        else:
            line = f"SPOOL_BUS__URL='{url_for(settings.bus.url, grant.user, password)}'\n"
        secrets_dir.write_private(secrets_dir.env_file(grant.user), line)
    return passwords


def vhost_of(settings: Settings) -> str:
    from urllib.parse import unquote

    path = urlsplit(settings.bus.url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def rabbitmqctl_script(settings: Settings, grants: Sequence[Grant], secrets_dir: SecretsDir) -> str:
    """A shell script of ``rabbitmqctl`` commands doing what ``--apply`` does (idempotent)."""
    vhost = vhost_of(settings)
    q = shlex.quote
    lines = [
        "#!/bin/sh",
        f"# spool broker setup: users and permissions on vhost {vhost!r}, exchange "
        f"{settings.bus.exchange!r}, queue prefix {settings.bus.queue_prefix!r}.",
        "# Passwords are read from the files on standard input, never from the command line.",
        "set -eu",
    ]
    if vhost != "/":
        lines.append(
            f"rabbitmqctl -q list_vhosts name | grep -qxF {q(vhost)} || rabbitmqctl add_vhost {q(vhost)}"
        )
    for g in grants:
        pw = q(str(secrets_dir.password_file(g.user)))
        lines += [
            "",
            f"# {g.user}: {g.role}",
            f"rabbitmqctl -q add_user {q(g.user)} < {pw} 2>/dev/null || "
            f"rabbitmqctl -q change_password {q(g.user)} < {pw}",
            f"rabbitmqctl -q set_user_tags {q(g.user)}" + (f" {q(g.tags)}" if g.tags else ""),
            f"rabbitmqctl -q set_permissions -p {q(vhost)} {q(g.user)} "
            f"{q(g.configure)} {q(g.write)} {q(g.read)}",
            f"rabbitmqctl -q set_topic_permissions -p {q(vhost)} {q(g.user)} {q(settings.bus.exchange)} "
            f"{q(g.topic_write)} {q(g.topic_read)}",
        ]
    operator_env = next((secrets_dir.env_file(g.user) for g in grants if g.role == "operator"), None)
    if operator_env is not None:
        lines += [
            "",
            "# Then declare every queue once, as the operator user (each daemon declares its own too):",
            f"#   (set -a; . {q(str(operator_env))}; spool broker declare)",
        ]
    return "\n".join(lines) + "\n"


async def apply(
    settings: Settings, grants: Sequence[Grant], passwords: dict[str, str], endpoint: ManagementEndpoint,
    *, api_timeout: float = 10.0,
) -> None:  # fmt: skip
    """Create the vhost and the users with their permissions through the management API.

    ``PUT`` everywhere: running it again resets passwords (from the files: unchanged), tags and
    permissions to what the configuration asks for.
    """
    vhost = quote(vhost_of(settings), safe="")
    exchange = settings.bus.exchange
    async with ManagementClient(endpoint, timeout=api_timeout) as api:
        await api.put(f"vhosts/{vhost}", {})
        for g in grants:
            user = quote(g.user, safe="")
            await api.put(f"users/{user}", {"password": passwords[g.user], "tags": g.tags})
            await api.put(
                f"permissions/{vhost}/{user}", {"configure": g.configure, "write": g.write, "read": g.read}
            )
            await api.put(
                f"topic-permissions/{vhost}/{user}",
                {"exchange": exchange, "write": g.topic_write, "read": g.topic_read},
            )
