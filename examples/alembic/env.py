"""Alembic environment: online migrations against DATABASE_URL or sqlalchemy.url.

A caller that already holds a SQLAlchemy connection (a test, an app that
migrates at startup) can pass it as ``config.attributes["connection"]``.
"""

from __future__ import annotations

import logging.config
import os
from typing import Any

from alembic import context
from sqlalchemy import create_engine, event, pool

config = context.config
if config.config_file_name is not None:
    logging.config.fileConfig(config.config_file_name, disable_existing_loggers=False)

# The kms tables are not SQLAlchemy models; with your own models, set this to
# their MetaData and exclude the kms_ tables from autogenerate (include_object).
target_metadata = None


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()
        return
    url = os.environ.get("DATABASE_URL") or config.get_main_option("sqlalchemy.url")
    assert url, "set DATABASE_URL or sqlalchemy.url"
    engine = create_engine(url, poolclass=pool.NullPool)
    if engine.dialect.name == "sqlite":
        # sqlite3 runs DDL outside transactions unless told otherwise; SQLAlchemy's
        # documented recipe makes the whole upgrade one transaction, as on PostgreSQL.
        @event.listens_for(engine, "connect")
        def on_connect(dbapi_connection: Any, connection_record: Any) -> None:
            dbapi_connection.isolation_level = None

        @event.listens_for(engine, "begin")
        def on_begin(conn: Any) -> None:
            conn.exec_driver_sql("begin immediate")

    with engine.connect() as connection:
        context.configure(
            connection=connection, target_metadata=target_metadata, transactional_ddl=True
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


def run_migrations_offline() -> None:
    url = os.environ.get("DATABASE_URL") or config.get_main_option("sqlalchemy.url")
    context.configure(url=url, target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
