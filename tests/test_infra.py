"""Tests of the test infrastructure itself: servers, per-test databases, lifecycle, authentication."""

from __future__ import annotations

import contextlib
import os

import psycopg2
import psycopg2.extensions
import pytest

from pgtest import LocalServer, PgServer, scalar, temporary_database, wait_until
from standby import StandbyServer, current_wal_lsn, fence, ha_dsn, unfence

# Names of the databases handed to the two "fresh database" tests, in the order they ran.
_seen_databases: list[str] = []


def _database_exists(server: PgServer, name: str) -> bool:
    """Tell whether database name exists on server."""
    with contextlib.closing(server.admin_connect()) as conn:
        return bool(scalar(conn, "SELECT count(*) FROM pg_database WHERE datname = %s", (name,)))


def _user_tables(conn: psycopg2.extensions.connection) -> object:
    """Count tables outside the system schemas."""
    return scalar(
        conn,
        "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relkind IN ('r', 'p', 'v', 'm') "
        "AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%%'",
    )


def test_session_server_answers(pg_server: PgServer) -> None:
    with contextlib.closing(pg_server.admin_connect()) as conn:
        assert scalar(conn, "SELECT 1") == 1
        assert conn.autocommit


@pytest.mark.parametrize("run", [1, 2])
def test_each_test_gets_a_fresh_empty_database(
    run: int, pg_server: PgServer, admin: psycopg2.extensions.connection, dbname: str
) -> None:
    assert dbname.startswith("pgops_test_")
    assert scalar(admin, "SELECT current_database()") == dbname
    assert _user_tables(admin) == 0
    if _seen_databases:  # the previous run's database is gone, not reused
        previous = _seen_databases[-1]
        assert previous != dbname
        assert not _database_exists(pg_server, previous)
    with admin.cursor() as cur:
        cur.execute("CREATE TABLE leftover (id int)")
    _seen_databases.append(dbname)


def test_dsn_and_url_reach_the_test_database(dsn: str, db_url: str, dbname: str) -> None:
    for target in (dsn, db_url):
        with contextlib.closing(psycopg2.connect(target)) as conn:
            assert scalar(conn, "SELECT current_database()") == dbname


def test_temporary_database_is_dropped_even_with_open_connections(pg_server: PgServer) -> None:
    with temporary_database(pg_server) as name:
        assert _database_exists(pg_server, name)
        leaked = psycopg2.connect(pg_server.dsn(name))  # never closed by the "test"
    try:
        assert not _database_exists(pg_server, name)
        with pytest.raises(psycopg2.OperationalError):
            scalar(leaked, "SELECT 1")
    finally:
        leaked.close()


def test_own_server_survives_stop_crash_and_restart(own_server: LocalServer) -> None:
    def answers() -> bool:
        with contextlib.closing(psycopg2.connect(own_server.dsn(connect_timeout=2))) as conn:
            return scalar(conn, "SELECT 1") == 1

    port = own_server.port
    first_pid = own_server.postmaster_pid
    assert first_pid is not None
    assert answers()

    own_server.stop("fast")
    assert not own_server.is_running()
    assert own_server.postmaster_pid is None
    with pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(own_server.dsn(connect_timeout=2))

    own_server.start()
    assert answers()

    conn = own_server.admin_connect()
    own_server.crash()
    assert not own_server.is_running()
    with pytest.raises(psycopg2.OperationalError):
        scalar(conn, "SELECT 1")
    conn.close()

    own_server.start()
    assert answers()
    own_server.restart()
    assert answers()
    assert own_server.port == port
    assert own_server.postmaster_pid not in (None, first_pid)


def _local(pg_server: PgServer, request: pytest.FixtureRequest) -> LocalServer:
    """Return the session server if it is a LocalServer, else a server of the test's own."""
    if isinstance(pg_server, LocalServer):
        return pg_server
    own: LocalServer = request.getfixturevalue("own_server")  # PGOPS_TEST_DSN: its setup is unknown
    return own


def test_tcp_requires_the_password(
    pg_server: PgServer, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = _local(pg_server, request)
    monkeypatch.delenv("PGPASSWORD", raising=False)
    no_passfile = os.devnull

    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(server.dsn(password="wrong-" + server.password, passfile=no_passfile))
    with pytest.raises(psycopg2.OperationalError, match="no password supplied"):
        psycopg2.connect(server.dsn(password="", passfile=no_passfile))

    # The unix socket is trusted, so tests can always get in as the superuser.
    with contextlib.closing(psycopg2.connect(server.socket_dsn(passfile=no_passfile))) as conn:
        assert scalar(conn, "SELECT current_user") == "postgres"


def test_local_server_listens_on_loopback_only(pg_server: PgServer, request: pytest.FixtureRequest) -> None:
    server = _local(pg_server, request)
    with contextlib.closing(server.admin_connect()) as conn:
        assert scalar(conn, "SHOW listen_addresses") == "127.0.0.1"
        assert scalar(conn, "SHOW fsync") == "off"
        assert int(str(scalar(conn, "SHOW max_connections"))) >= 200
    assert len(str(server.socket_dir / f".s.PGSQL.{server.port}")) < 107


def test_pgvector_with_pgserver_binaries(
    pg_server: PgServer, has_pgvector: bool, admin: psycopg2.extensions.connection
) -> None:
    if isinstance(pg_server, LocalServer) and pg_server.bin_source == "pgserver":
        assert has_pgvector, "pgserver ships pgvector"
    if not has_pgvector:
        pytest.skip("pgvector is not installed on this server")
    with admin.cursor() as cur:
        cur.execute("CREATE EXTENSION vector")
        cur.execute("SELECT '[1,2,3]'::vector(3)::text")
        assert cur.fetchone() == ("[1,2,3]",)


def test_wait_until_returns_the_value_or_fails_with_the_message() -> None:
    calls: list[int] = []

    def third_time() -> int | None:
        calls.append(1)
        return len(calls) if len(calls) >= 3 else None

    assert wait_until(third_time, timeout=5) == 3
    with pytest.raises(AssertionError, match="never true"):
        wait_until(lambda: False, timeout=0.05, message="never true")


# -- the streaming-standby harness (tests/standby.py, the ha_pair fixture) ------------------------------


def _write_is_refused_as_read_only(conn: psycopg2.extensions.connection) -> None:
    """Assert that a write on conn fails with SQLSTATE 25006 (read_only_sql_transaction)."""
    with pytest.raises(psycopg2.Error) as caught, conn.cursor() as cur:
        cur.execute("CREATE TABLE must_not_exist (id int)")
    assert caught.value.pgcode == "25006", caught.value


def _server_port(dsn: str) -> object:
    """Connect with dsn, check that the session may write, and return the server's port."""
    with contextlib.closing(psycopg2.connect(dsn)) as conn:
        assert scalar(conn, "SHOW transaction_read_only") == "off"
        return scalar(conn, "SELECT inet_server_port()")


def test_standby_replays_what_the_primary_writes(ha_pair: tuple[LocalServer, StandbyServer]) -> None:
    primary, standby = ha_pair
    with contextlib.closing(primary.admin_connect()) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE ha_probe (id int PRIMARY KEY, note text)")
        cur.execute("INSERT INTO ha_probe VALUES (1, 'written on the primary')")
    standby.wait_replayed(current_wal_lsn(primary))
    with contextlib.closing(standby.admin_connect()) as conn:
        assert scalar(conn, "SELECT note FROM ha_probe WHERE id = 1") == "written on the primary"


def test_standby_refuses_writes_until_promoted(ha_pair: tuple[LocalServer, StandbyServer]) -> None:
    primary, standby = ha_pair
    assert standby.port != primary.port
    assert standby.password == primary.password
    with contextlib.closing(standby.admin_connect()) as conn:
        assert scalar(conn, "SELECT pg_is_in_recovery()") is True
        _write_is_refused_as_read_only(conn)

    standby.promote()
    with contextlib.closing(standby.admin_connect()) as conn:
        assert scalar(conn, "SELECT pg_is_in_recovery()") is False
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE promoted (id int)")
            cur.execute("INSERT INTO promoted VALUES (1)")
        assert scalar(conn, "SELECT count(*) FROM promoted") == 1


def test_fence_makes_new_sessions_read_only_until_unfenced(
    ha_pair: tuple[LocalServer, StandbyServer],
) -> None:
    primary, _standby = ha_pair
    pid = primary.postmaster_pid
    fence(primary)
    with contextlib.closing(primary.admin_connect()) as conn:
        assert scalar(conn, "SELECT pg_is_in_recovery()") is False
        _write_is_refused_as_read_only(conn)
    assert primary.postmaster_pid == pid  # fenced, not stopped

    unfence(primary)
    with contextlib.closing(primary.admin_connect()) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE unfenced (id int)")
    assert primary.postmaster_pid == pid


def test_read_write_ha_dsn_follows_fence_and_promotion(ha_pair: tuple[LocalServer, StandbyServer]) -> None:
    primary, standby = ha_pair
    # Both orders, so that neither "first host" nor "last host" can pass for "the writable one".
    orders = [(primary, standby), (standby, primary)]
    dsns = [ha_dsn(*servers, target_session_attrs="read-write", connect_timeout=5) for servers in orders]
    for dsn in dsns:
        assert "host=127.0.0.1,127.0.0.1" in dsn
        assert _server_port(dsn) == primary.port

    fence(primary)
    for dsn in dsns:  # mid-failover: no host takes writes
        with pytest.raises(psycopg2.OperationalError):
            psycopg2.connect(dsn)

    standby.promote()
    for dsn in dsns:
        assert _server_port(dsn) == standby.port
    with contextlib.closing(psycopg2.connect(ha_dsn(primary, standby, dbname="template1"))) as conn:
        assert scalar(conn, "SELECT current_database()") == "template1"
