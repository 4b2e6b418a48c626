"""Alembic environment for the catalogue.

Normally driven from ``common.catalogue.engine.migrate``, which hands over an open connection (and
its transaction) in ``config.attributes["connection"]``. Without one, the URL in the
``sqlalchemy.url`` option is used: offline (``--sql``) it renders a script, online it opens an
async engine, so developers can run ``alembic`` commands against a scratch database.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import Connection

from common.catalogue.schema import metadata

config = context.config


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # ALTER TABLE on SQLite
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_async(url: str) -> None:
    from common.catalogue.engine import create_engine

    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_run)
    finally:
        await engine.dispose()


def main() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
    elif context.is_offline_mode():
        context.configure(
            url=config.get_main_option("sqlalchemy.url"), target_metadata=metadata, literal_binds=True
        )
        with context.begin_transaction():
            context.run_migrations()
    else:
        asyncio.run(_run_async(config.get_main_option("sqlalchemy.url") or ""))


main()
