"""Migrations for fleets (issue 11): many `migrate` processes at once, directly and behind a real PgBouncer."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import psycopg2.extensions

from pgbouncer import PgBouncer
from pgtest import scalar

Conn = psycopg2.extensions.connection
MakeBouncer = Callable[..., PgBouncer]


def test_transaction_pooler_sends_its_own_backend_key(pgbouncer: MakeBouncer, dbname: str) -> None:
    """Through transaction mode, the BackendKeyData pid is PgBouncer's, not the server's backend."""
    bouncer = pgbouncer("transaction")
    with contextlib.closing(bouncer.connect(dbname)) as conn:
        assert scalar(conn, "SELECT current_database()") == dbname
        assert conn.info.backend_pid != scalar(conn, "SELECT pg_backend_pid()")
