"""Session state and migrations: every file starts from the same session, and none of it leaks out.

A migration may SET search_path (pg_dump's output does, through set_config), SET ROLE, PREPARE, or
RESET ALL. Whatever one file sets must not change where the next file's objects land, whether the
files are applied in one run or one per run; pgops' own lock_timeout must hold in every file; and
nothing a migration sets may reach the connections an application gets from its pool.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import psycopg2.extensions
import psycopg2.sql
import pytest

import pgops
import pgtest
from pgops import MigrationFailed, Migrator
from pgtest import locked_table, scalar, write

Conn = psycopg2.extensions.connection

# Each file leaves something behind in its session for the next one to trip over.
LEAKY_FILES = {
    "0001_audit.sql": "CREATE SCHEMA audit;\nSET search_path = audit, public;\nPREPARE probe AS SELECT 1;\n",
    "0002_users.sql": "CREATE TABLE users (id int);\nPREPARE probe AS SELECT 2;\n",
    # What every pg_dump output starts with.
    "0003_dumped.sql": "SELECT pg_catalog.set_config('search_path', '', false);\n"
    "CREATE TABLE public.dumped (id int);\n",
    "0004_orders.sql": "CREATE TABLE orders (id int);\n",
}


def tables_in(conn: Conn, schema: str) -> list[str]:
    """Return the names of the tables in *schema*, sorted."""
    with conn.cursor() as cur:
        cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = %s ORDER BY 1", (schema,))
        return [name for (name,) in cur.fetchall()]


def session_state(conn: Conn) -> tuple[str, str, str, int]:
    """Return (search_path, current_user, lock_timeout, prepared statements) of a connection's session."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT current_setting('search_path'), current_user::text, current_setting('lock_timeout'), "
            "(SELECT count(*) FROM pg_prepared_statements)"
        )
        row = cur.fetchone()
    assert row is not None
    return row[0], row[1], row[2], int(row[3])


@pytest.mark.parametrize("batching", ["one run", "one file per run"])
@pytest.mark.parametrize("source", ["dsn", "pool"])
def test_every_file_starts_from_the_same_session_however_runs_are_batched(
    dsn: str, admin: Conn, mdir: Path, source: str, batching: str
) -> None:
    """search_path, set_config and PREPARE in one file change nothing for the next, in one run or four."""
    for name, text in LEAKY_FILES.items():
        write(mdir, name, text)
    with pgops.Pool(dsn, min_size=1, max_size=1, acquire_timeout=5.0, monitor_interval=0) as pool:
        before = pool.run(session_state)
        migrator = Migrator(pool if source == "pool" else dsn, str(mdir))
        if batching == "one run":
            assert [m.version for m in migrator.migrate()] == [1, 2, 3, 4]
        else:
            for version in range(1, 5):
                assert [m.version for m in migrator.migrate(target=version)] == [version]
        # The application's connection saw none of it.
        assert pool.run(session_state) == before
    assert tables_in(admin, "public") == ["dumped", "migration_history", "orders", "users"]
    assert tables_in(admin, "audit") == []


@pytest.fixture
def role(admin: Conn) -> Iterator[str]:
    """A role without login for this test, dropped with what it owns afterwards."""
    with pgtest.temporary_role(admin, "pgops_owner_") as name:
        yield name


@pytest.mark.parametrize("source", ["dsn", "pool"])
def test_set_role_in_a_file_ends_with_that_file(
    dsn: str, admin: Conn, mdir: Path, role: str, source: str
) -> None:
    """A file that SETs ROLE owns its own objects; the next file and the history row are the user's own."""
    me = scalar(admin, "SELECT current_user::text")
    write(
        mdir,
        "0001_as_owner.sql",
        f'CREATE SCHEMA app AUTHORIZATION "{role}";\nSET ROLE "{role}";\nCREATE TABLE app.owned (id int);\n',
    )
    write(mdir, "0002_mine.sql", "CREATE TABLE app_mine (id int);\n")
    with pgops.Pool(dsn, min_size=1, max_size=1, acquire_timeout=5.0, monitor_interval=0) as pool:
        migrator = Migrator(pool if source == "pool" else dsn, str(mdir))
        assert [m.version for m in migrator.migrate()] == [1, 2]
        assert pool.run(lambda conn: scalar(conn, "SELECT current_user::text")) == me
    owners = "SELECT tableowner::text FROM pg_tables WHERE tablename = %s"
    assert scalar(admin, owners, ("owned",)) == role
    assert scalar(admin, owners, ("app_mine",)) == me
    with admin.cursor() as cur:
        cur.execute("SELECT version, applied_by FROM migration_history ORDER BY version")
        assert cur.fetchall() == [(1, me), (2, me)]


@pytest.fixture
def busy(dsn: str, admin: Conn) -> Iterator[Conn]:
    """Table busy, share-locked by another session's open transaction until the test rolls it back."""
    with locked_table(dsn, admin, "busy", "ACCESS SHARE") as blocker:
        yield blocker


@pytest.mark.parametrize("marker", ["", "-- pgops: no-transaction\n"], ids=["transaction", "no-transaction"])
@pytest.mark.parametrize("reset", ["RESET ALL", "RESET lock_timeout", "SET lock_timeout = DEFAULT"])
def test_pgops_lock_timeout_outlives_a_reset_in_the_file(
    dsn: str, admin: Conn, mdir: Path, busy: Conn, marker: str, reset: str
) -> None:
    """After a file's RESET ALL, DDL on a locked table still times out (55P03) instead of waiting for ever."""
    write(mdir, "0001_reset.sql", f"{marker}{reset};\nALTER TABLE busy ADD COLUMN note text;\n")
    migrator = Migrator(dsn, str(mdir), statement_lock_timeout=0.2)
    pgops.set_testing(True)  # no sleeps between the lock_timeout retries
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as executor:
            future = executor.submit(migrator.migrate)
            try:
                # Generous: the five attempts take about a second; the defect waits for ever.
                error = future.exception(timeout=60)
            except concurrent.futures.TimeoutError:
                busy.rollback()  # let the stuck migration finish, so that the test can end
                future.exception(timeout=60)
                pytest.fail("the migration waited for the table lock although lock_timeout was set")
    finally:
        pgops.set_testing(False)
    assert isinstance(error, MigrationFailed), error
    assert error.sqlstate == "55P03"
    busy.rollback()
    assert scalar(admin, "SELECT count(*) FROM information_schema.columns WHERE table_name = 'busy'") == 1
    if marker:  # a no-transaction file's failure is recorded for repair
        assert scalar(admin, "SELECT status FROM migration_history WHERE version = 1") == "failed"
    else:
        assert scalar(admin, "SELECT count(*) FROM migration_history") == 0


def test_a_pool_connection_never_runs_a_migration(dsn: str, admin: Conn, mdir: Path) -> None:
    """With Migrator(pool) migrations run on a dedicated connection; the pool only serves status reads."""
    write(
        mdir,
        "0001_who.sql",
        "CREATE TABLE who AS SELECT pg_backend_pid() AS pid, current_setting('application_name') AS app;\n",
    )
    with pgops.Pool(dsn, min_size=1, max_size=1, acquire_timeout=5.0, monitor_interval=0) as pool:
        pool_pid = pool.run(lambda conn: scalar(conn, "SELECT pg_backend_pid()"))
        migrator = Migrator(pool, str(mdir))
        assert [m.version for m in migrator.migrate()] == [1]
        assert [r.state for r in migrator.status()] == ["applied"]
        assert migrator.pending() == []
        assert pool.run(lambda conn: scalar(conn, "SELECT pg_backend_pid()")) == pool_pid
        assert pool.stats()["pool_in_use"] == 0
    with admin.cursor() as cur:
        cur.execute("SELECT pid, app FROM who")
        migration_pid, app = cur.fetchone() or (0, "")
    assert migration_pid != pool_pid
    assert app == "pgops-migrate"
