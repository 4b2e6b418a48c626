"""A vhost of a test's own with a second, real RabbitMQ user: Spool's trust rests on the AMQP
``user_id`` the broker validates, so "someone else published this" is tested with someone else.

``guest`` (Spool's user in the tests) gets every permission on the vhost; the outsider may write
anything to it and configure / read only queues named after itself. Both go afterwards.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import quote

import aio_pika
import aiohttp

from tests.conftest import AMQP_URL

MANAGEMENT = "http://127.0.0.1:15672/api"
GUEST = {"Authorization": aiohttp.encode_basic_auth("guest", "guest")}


@asynccontextmanager
async def private_vhost(tag: str, prefix: str = "spool-trust") -> AsyncIterator[dict[str, str]]:
    """``{"name", "outsider", "password"}`` of a fresh vhost and its outsider user."""
    name, outsider, password = f"{prefix}-{tag}", f"outsider-{tag}", uuid.uuid4().hex
    everything = {"configure": ".*", "write": ".*", "read": ".*"}
    vhost = quote(name, safe="")
    async with aiohttp.ClientSession(headers=GUEST, raise_for_status=True) as http:
        await http.put(f"{MANAGEMENT}/vhosts/{vhost}")
        await http.put(f"{MANAGEMENT}/permissions/{vhost}/guest", json=everything)
        await http.put(f"{MANAGEMENT}/users/{outsider}", json={"password": password, "tags": ""})
        await http.put(
            f"{MANAGEMENT}/permissions/{vhost}/{outsider}",
            json={"configure": f"^{outsider}", "write": ".*", "read": f"^{outsider}"},
        )
        try:
            yield {"name": name, "outsider": outsider, "password": password}
        finally:
            async with aiohttp.ClientSession(headers=GUEST) as cleanup:
                await cleanup.delete(f"{MANAGEMENT}/vhosts/{vhost}")
                await cleanup.delete(f"{MANAGEMENT}/users/{outsider}")


def on_vhost(config: Path, vhost: str) -> Path:
    """Point a test configuration written by ``conftest.write_config`` at ``vhost``."""
    url = f"{AMQP_URL.rstrip('/')}/{quote(vhost, safe='')}"
    text = config.read_text()
    assert f'url = "{AMQP_URL}"' in text
    config.write_text(text.replace(f'url = "{AMQP_URL}"', f'url = "{url}"'))
    return config


async def connect_as(url: str, user: str, password: str) -> aio_pika.abc.AbstractConnection:
    parsed = aio_pika.connection.make_url(url)
    return await aio_pika.connect(str(parsed.with_user(user).with_password(password)))
