"""Fixtures giving each test a real PostgreSQL: the session server, a fresh database, or its own server."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg2.extensions
import pytest

import pgtest
from pgbouncer import PgBouncer, PgBouncerNotFound, find_pgbouncer
from pgtest import (
    ExternalServer,
    LocalServer,
    PgServer,
    PostgresNotFound,
    run_pgops,
    secrets_of,
    temporary_database,
)
from standby import StandbyServer, streaming_standby

CompletedRun = subprocess.CompletedProcess[str]


def in_ci() -> bool:
    """Tell whether we run under CI, where a missing database is an error rather than a skip."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _local_server(base_dir: Path) -> LocalServer:
    """Create and start a LocalServer in base_dir, skipping the test outside CI if PostgreSQL is absent."""
    try:
        server = LocalServer(base_dir)
    except PostgresNotFound as exc:
        if in_ci():
            raise
        pytest.skip(str(exc))
    try:
        server.start()
    except BaseException:
        server.cleanup()
        raise
    return server


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgServer]:
    """The session's PostgreSQL: PGOPS_TEST_DSN if set, else a LocalServer started once."""
    external = os.environ.get("PGOPS_TEST_DSN")
    if external:
        server = ExternalServer(external)
        with contextlib.closing(server.admin_connect()) as conn, conn.cursor() as cur:
            cur.execute("SELECT 1")
        yield server
        return
    local = _local_server(tmp_path_factory.mktemp("pg-session"))
    try:
        yield local
    finally:
        local.cleanup()


@pytest.fixture(scope="session")
def has_pgvector(pg_server: PgServer) -> bool:
    """True when `CREATE EXTENSION vector` is possible on the session server."""
    with contextlib.closing(pg_server.admin_connect()) as conn:
        return pgtest.has_pgvector(conn)


@pytest.fixture
def pgvector(has_pgvector: bool) -> None:
    """Skip the test when the session server cannot `CREATE EXTENSION vector`."""
    if not has_pgvector:
        pytest.skip("this PostgreSQL has no pgvector")


@pytest.fixture
def dbname(pg_server: PgServer) -> Iterator[str]:
    """Name of a fresh, empty database for this test alone, dropped (WITH FORCE) afterwards."""
    with temporary_database(pg_server) as name:
        yield name


@pytest.fixture
def dsn(pg_server: PgServer, dbname: str) -> str:
    """Key=value DSN of this test's own database."""
    return pg_server.dsn(dbname)


@pytest.fixture
def db_url(pg_server: PgServer, dbname: str) -> str:
    """postgresql:// URL of this test's own database."""
    return pg_server.url(dbname)


@pytest.fixture
def admin(pg_server: PgServer, dbname: str) -> Iterator[psycopg2.extensions.connection]:
    """Autocommit superuser connection to this test's own database."""
    conn = pg_server.admin_connect(dbname)
    try:
        yield conn
    finally:
        conn.close()


@pytest.fixture
def vector_admin(pgvector: None, admin: psycopg2.extensions.connection) -> psycopg2.extensions.connection:
    """admin, in a database where `CREATE EXTENSION vector` has run (skips the test without pgvector)."""
    with admin.cursor() as cur:
        cur.execute("CREATE EXTENSION vector")
    return admin


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[LocalServer]:
    """A running LocalServer for this test alone, which it may stop, restart or crash."""
    server = _local_server(tmp_path / "pg")
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def ha_pair(tmp_path: Path) -> Iterator[tuple[LocalServer, StandbyServer]]:
    """A fresh primary LocalServer and a hot standby streaming from it, for this test alone.

    Either may be stopped, crashed, fenced or promoted; both are removed afterwards, the standby first.
    """
    primary = _local_server(tmp_path / "primary")
    try:
        with streaming_standby(primary, tmp_path / "standby") as standby:
            yield primary, standby
    finally:
        primary.cleanup()


@pytest.fixture
def mdir(tmp_path: Path) -> Path:
    """An empty migrations directory for this test."""
    path = tmp_path / "migrations"
    path.mkdir()
    return path


@pytest.fixture
def cli(pg_server: PgServer, dsn: str, mdir: Path, tmp_path: Path) -> Callable[..., CompletedRun]:
    """Run ``python -m pgops COMMAND --dir mdir ARGS`` on this test's database (DATABASE_URL), in tmp_path."""

    def run(
        command: str, *rest: str, database_url: str | None = dsn, env: dict[str, str] | None = None
    ) -> CompletedRun:
        return run_pgops(
            command,
            "--dir",
            str(mdir),
            *rest,
            database_url=database_url,
            env=env,
            cwd=tmp_path,
            secrets=secrets_of(pg_server),
        )

    return run


@pytest.fixture
def pgbouncer(pg_server: PgServer) -> Iterator[Callable[..., PgBouncer]]:
    """Factory `make(pool_mode="transaction", pool_size=4, server=None, **kw)` of running PgBouncers in front
    of the session server (or *server*); each is stopped after the test. Skips when pgbouncer is missing
    (raises in CI)."""
    binary = find_pgbouncer()
    if binary is None:
        if in_ci():
            raise PgBouncerNotFound("pgbouncer not installed: apt-get install pgbouncer (.ci/run does it)")
        pytest.skip("pgbouncer not installed: apt-get install pgbouncer")
    made: list[PgBouncer] = []

    def make(
        pool_mode: str = "transaction", pool_size: int = 4, server: PgServer | None = None, **kw: Any
    ) -> PgBouncer:
        bouncer = PgBouncer(
            server or pg_server, pool_mode=pool_mode, pool_size=pool_size, binary=binary, **kw
        )
        made.append(bouncer)
        bouncer.start()
        return bouncer

    try:
        yield make
    finally:
        for bouncer in made:
            bouncer.cleanup()
