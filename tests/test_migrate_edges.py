"""Migrator edge cases: a server that never answers, odd directory entries, a user without CREATE,
a file that releases the lock, COPY from the client, signals, out-of-range targets, a different file
under an applied version."""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import psycopg2.extensions
import psycopg2.sql
import pytest

import pgops
from pgops import (
    BadMigration,
    CannotConnect,
    ChecksumMismatch,
    ConfigError,
    LockTimeout,
    Migrator,
    load_migrations,
)
from pgtest import (
    FAKE_PASSWORD,
    PgServer,
    applied,
    history,
    locked_table,
    relation_exists,
    run_pgops,
    scalar,
    simple_set,
    spawn_pgops,
    temporary_role,
    wait_until,
    write,
)

Conn = psycopg2.extensions.connection


# -- a server that accepts connections and never answers --------------------------------------------


@contextlib.contextmanager
def silent_server() -> Iterator[int]:
    """Yield the port of a TCP server on 127.0.0.1 that accepts connections and never says a word."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            held.append(conn)

    thread = threading.Thread(target=accept, name="silent-server", daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        thread.join(timeout=10)
        for conn in held:
            conn.close()
        listener.close()


@pytest.mark.parametrize(
    ("command", "timeout"),
    [
        (["status"], "in the DSN"),
        (["migrate"], "in the DSN"),
        (["validate"], "in the DSN"),
        (["status"], "PGCONNECT_TIMEOUT"),
        (["migrate"], "default"),
    ],
)
def test_cli_gives_up_on_a_server_that_never_answers(
    mdir: Path, tmp_path: Path, command: list[str], timeout: str
) -> None:
    """A server that accepts TCP and never answers ends in exit 6 after connect_timeout, not a hang."""
    simple_set(mdir, 1)
    env = {"DB_RETRY_MAX_ATTEMPTS": "1"}
    with silent_server() as port:
        url = f"postgresql://pgops:{FAKE_PASSWORD}@127.0.0.1:{port}/db"
        if timeout == "in the DSN":
            url += "?connect_timeout=2"
        elif timeout == "PGCONNECT_TIMEOUT":
            env["PGCONNECT_TIMEOUT"] = "2"
        started = time.monotonic()
        proc = run_pgops(*command, "--dir", str(mdir), database_url=url, env=env, cwd=tmp_path, timeout=90)
        elapsed = time.monotonic() - started
    assert proc.returncode == 6, proc.stderr
    assert proc.stdout == ""
    [line] = proc.stderr.splitlines()
    assert line.startswith("pgops: error: cannot connect to 'postgresql://pgops:***@127.0.0.1"), line
    assert "timeout expired" in line
    if timeout == "default":
        assert 9.0 <= elapsed < 40.0  # the documented 10 s, with room for a loaded machine
    else:
        assert elapsed < 9.0  # the 2 s asked for, not the default


def test_migrator_connect_timeout_bounds_every_call(mdir: Path) -> None:
    """Migrator(connect_timeout=2) raises CannotConnect on a silent server instead of waiting for ever."""
    simple_set(mdir, 1)
    with silent_server() as port:
        migrator = Migrator(f"host=127.0.0.1 port={port} dbname=db user=pgops", str(mdir), connect_timeout=2)
        for call in (migrator.status, migrator.pending, migrator.migrate):
            started = time.monotonic()
            with pytest.raises(CannotConnect, match="timeout expired"):
                call()
            assert time.monotonic() - started < 9.0


# -- directory entries that look like migrations ------------------------------------------------------


@pytest.mark.parametrize("kind", ["directory", "dangling symbolic link"])
def test_a_non_file_named_like_a_migration_is_an_error(dsn: str, admin: Conn, mdir: Path, kind: str) -> None:
    """A folder or a broken link named NNNN_x.sql is refused by name, not skipped (and nothing runs)."""
    simple_set(mdir, 1)
    write(mdir, "0003_later.sql", "CREATE TABLE later (id int);\n")
    entry = mdir / "0002_hidden.sql"
    if kind == "directory":
        entry.mkdir()
    else:
        entry.symlink_to(mdir / "gone.sql")
    with pytest.raises(BadMigration, match=kind.removeprefix("dangling ")) as info:
        load_migrations(str(mdir))
    assert str(entry) in str(info.value)
    with pytest.raises(BadMigration):
        Migrator(dsn, str(mdir)).migrate()
    assert any(str(entry) in problem for problem in Migrator(dsn, str(mdir)).validate())
    assert history(admin) is None


# -- a user without CREATE on the history table's schema ----------------------------------------------


@pytest.fixture
def migration_user(pg_server: PgServer, admin: Conn, dbname: str) -> Iterator[str]:
    """A login role with a password and no CREATE anywhere, owner of schema app; yields its TCP DSN."""
    password = secrets.token_urlsafe(12)
    with temporary_role(admin, "pgops_deployer_", password=password) as name, admin.cursor() as cur:
        cur.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")  # PostgreSQL 15's default, everywhere
        cur.execute(
            psycopg2.sql.SQL("CREATE SCHEMA app AUTHORIZATION {}").format(psycopg2.sql.Identifier(name))
        )
        yield pg_server.dsn(dbname, user=name, password=password)


@pytest.mark.parametrize("schema", ["public", "ops"])
def test_a_user_without_create_migrates_once_the_history_table_exists(
    dsn: str, admin: Conn, mdir: Path, migration_user: str, schema: str
) -> None:
    """The owner makes the history table once; a deployer without CREATE then migrates and repairs."""
    write(mdir, "0001_setup.sql", "SELECT 1;\n")
    Migrator(dsn, str(mdir), schema=schema).migrate()  # the owner, once
    table = psycopg2.sql.Identifier(schema, "migration_history")
    deployer = psycopg2.extensions.parse_dsn(migration_user)["user"]
    with admin.cursor() as cur:
        cur.execute(
            psycopg2.sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(
                psycopg2.sql.Identifier(schema), psycopg2.sql.Identifier(deployer)
            )
        )
        cur.execute(
            psycopg2.sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON {} TO {}").format(
                table, psycopg2.sql.Identifier(deployer)
            )
        )
    write(mdir, "0002_app.sql", "CREATE TABLE app.things (id int);\n")
    migrator = Migrator(migration_user, str(mdir), schema=schema)
    assert [m.version for m in migrator.migrate()] == [2]
    assert migrator.repair() == []
    assert relation_exists(admin, "app.things")
    assert (
        scalar(admin, psycopg2.sql.SQL("SELECT applied_by FROM {} WHERE version = 2").format(table))
        == deployer
    )


# -- a migration that releases the migration lock -------------------------------------------------------


@pytest.fixture
def gate(dsn: str, admin: Conn) -> Iterator[Conn]:
    """Table gate, locked ACCESS EXCLUSIVE by another session's open transaction until it rolls back."""
    with locked_table(dsn, admin, "gate", "ACCESS EXCLUSIVE") as blocker:
        yield blocker


def waiting_at_gate(admin: Conn) -> bool:
    """Tell whether a pgops-migrate session is waiting for a lock (the gate)."""
    return bool(
        scalar(
            admin,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgops-migrate' "
            "AND wait_event_type = 'Lock' AND datname = current_database()",
        )
    )


def test_a_file_that_unlocks_all_still_keeps_other_runners_out(
    dsn: str, admin: Conn, mdir: Path, gate: Conn, caplog: pytest.LogCaptureFixture
) -> None:
    """pg_advisory_unlock_all() in a file lets no other runner in, and the lock is taken again after it."""
    caplog.set_level(logging.WARNING, logger="pgops")
    write(mdir, "0001_unlock.sql", "SELECT pg_advisory_unlock_all();\nSELECT count(*) FROM gate;\n")
    write(mdir, "0002_after.sql", "CREATE TABLE after_unlock (id int);\n")
    first = Migrator(dsn, str(mdir), statement_lock_timeout=120)
    second = Migrator(dsn, str(mdir), lock_timeout=0, statement_lock_timeout=0.2)
    with concurrent.futures.ThreadPoolExecutor(1) as executor:
        future = executor.submit(first.migrate)
        try:
            wait_until(
                lambda: future.done() or waiting_at_gate(admin), timeout=30, message="never at the gate"
            )
            assert not future.done()
            pgops.set_testing(True)
            with pytest.raises(LockTimeout):
                second.migrate()
        finally:
            pgops.set_testing(False)
            gate.rollback()
        assert [m.version for m in future.result(timeout=60)] == [1, 2]
    assert history(admin) == applied(1, 2)
    # Taken again after the file: the final unlock found it held (else it logs an error).
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert scalar(admin, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == 0


def test_a_no_transaction_file_that_unlocks_all_changes_nothing(
    dsn: str, admin: Conn, mdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """pgops holds no session lock for pg_advisory_unlock_all() to drop: the run goes on, quietly."""
    caplog.set_level(logging.WARNING, logger="pgops")
    write(mdir, "0001_unlock.sql", "-- pgops: no-transaction\nSELECT pg_advisory_unlock_all();\n")
    write(mdir, "0002_after.sql", "CREATE TABLE after_unlock (id int);\n")
    assert [m.version for m in Migrator(dsn, str(mdir)).migrate()] == [1, 2]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert history(admin) == applied(1, 2)
    assert scalar(admin, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == 0


def test_a_no_transaction_file_running_elsewhere_keeps_other_runners_waiting(
    dsn: str, admin: Conn, mdir: Path, gate: Conn, caplog: pytest.LogCaptureFixture
) -> None:
    """While one runner's no-transaction file runs, its claim keeps every other runner out: they wait,
    past their lock_timeout (a renewed lease is progress), and then find nothing left to do."""
    caplog.set_level(logging.INFO, logger="pgops")
    write(
        mdir,
        "0001_unlock.sql",
        "-- pgops: no-transaction\nSELECT pg_advisory_unlock_all();\nSELECT count(*) FROM gate;\n",
    )
    write(mdir, "0002_after.sql", "CREATE TABLE after_unlock (id int);\n")
    first = Migrator(dsn, str(mdir), statement_lock_timeout=120, lease_timeout=0.6)
    second = Migrator(dsn, str(mdir), lock_timeout=0.5)
    with concurrent.futures.ThreadPoolExecutor(2) as executor:
        future = executor.submit(first.migrate)
        try:
            wait_until(lambda: future.done() or waiting_at_gate(admin), timeout=30, message="never at gate")
            assert not future.done()
            started = time.monotonic()
            waiting = executor.submit(second.migrate)
            # Three times its lock_timeout, with the first runner's lease renewed meanwhile: still waiting.
            wait_until(
                lambda: waiting.done() or time.monotonic() - started > 1.5,
                timeout=30,
                message="the second runner never started",
            )
            assert not waiting.done()
            assert any("waiting for migration 1 (unlock)" in r.getMessage() for r in caplog.records)
            assert not relation_exists(admin, "after_unlock")
        finally:
            gate.rollback()
        assert [m.version for m in future.result(timeout=60)] == [1, 2]
        assert waiting.result(timeout=60) == []
    assert history(admin) == applied(1, 2)


# -- COPY from or to the client -----------------------------------------------------------------------


@pytest.mark.parametrize("marker", ["", "-- pgops: no-transaction\n"], ids=["transaction", "no-transaction"])
@pytest.mark.parametrize(
    ("copy", "words", "remedy"),
    [
        ("COPY t (id) FROM stdin;\n1\n2\n\\.\n", "COPY FROM STDIN", "INSERT"),
        ("copy (SELECT 1) to\n  stdout WITH (FORMAT csv);\n", "COPY TO STDOUT", "remove it"),
    ],
    ids=["from-stdin", "to-stdout"],
)
def test_copy_with_the_client_is_refused_before_anything_runs(
    dsn: str, admin: Conn, mdir: Path, marker: str, copy: str, words: str, remedy: str
) -> None:
    """COPY FROM STDIN (pg_dump's data) or TO STDOUT is refused naming path:line, before any file runs."""
    write(mdir, "0001_table.sql", "CREATE TABLE t (id int);\n")
    path = write(mdir, "0002_load.sql", f"{marker}INSERT INTO t VALUES (0);\n{copy}")
    line = 3 if marker else 2
    with pytest.raises(BadMigration) as info:
        Migrator(dsn, str(mdir)).migrate()
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: ")
    assert words in message
    assert remedy in message
    assert history(admin) is None
    assert not relation_exists(admin, "t")


# -- Ctrl-C and SIGTERM -----------------------------------------------------------------------------


def sleepers(admin: Conn) -> int:
    """Return how many sessions of this database run the migration's pg_sleep."""
    return int(
        scalar(
            admin,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND state = 'active' "
            "AND query LIKE '%%pg_sleep(60)%%' AND pid <> pg_backend_pid()",
        )
    )


@pytest.mark.parametrize(
    ("signum", "code", "word"), [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")]
)
def test_a_signal_cancels_the_running_statement_and_rolls_back(
    dsn: str, admin: Conn, mdir: Path, tmp_path: Path, signum: int, code: int, word: str
) -> None:
    """Ctrl-C or SIGTERM during a long statement cancels it at once, rolls back, and exits 130 or 143."""
    write(mdir, "0001_first.sql", "CREATE TABLE first (id int);\n")
    write(mdir, "0002_slow.sql", "CREATE TABLE slow_marker (id int);\nSELECT pg_sleep(60);\n")
    proc = spawn_pgops("migrate", "--dir", str(mdir), database_url=dsn, cwd=tmp_path)
    try:
        wait_until(lambda: proc.poll() is not None or sleepers(admin), timeout=60, message="no pg_sleep")
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=20)  # the defect waited for the whole minute
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == code, err
    assert err.splitlines() == [f"pgops: {word}"]
    assert out.startswith("applied 0001_first.sql")
    assert not relation_exists(admin, "slow_marker")
    assert history(admin) == applied(1)
    assert scalar(admin, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == 0
    wait_until(lambda: sleepers(admin) == 0, timeout=10, message="a backend still runs the pg_sleep")


# -- targets out of range -----------------------------------------------------------------------------


def test_targets_out_of_range_are_config_errors_and_change_nothing(dsn: str, admin: Conn, mdir: Path) -> None:
    """Negative targets, and rollback above the current version or to one not applied, are ConfigErrors."""
    for version in (1, 3, 5):
        write(mdir, f"{version:04d}_v{version}.sql", f"CREATE TABLE v{version} (id int);\n")
        write(mdir, f"{version:04d}_v{version}.down.sql", f"DROP TABLE v{version};\n")
    migrator = Migrator(dsn, str(mdir))
    assert [m.version for m in migrator.migrate()] == [1, 3, 5]
    with pytest.raises(ConfigError, match="-5"):
        migrator.migrate(target=-5)
    with pytest.raises(ConfigError, match="-1"):
        migrator.rollback(-1)
    with pytest.raises(ConfigError, match="at version 5"):
        migrator.rollback(99)
    with pytest.raises(ConfigError, match="nearest below is 3"):
        migrator.rollback(4)
    assert history(admin) == applied(1, 3, 5)
    assert [m.version for m in migrator.rollback(3)] == [5]
    assert migrator.rollback(3) == []  # already there
    assert history(admin) == applied(1, 3)


# -- another file under an applied version -----------------------------------------------------------


def test_another_file_under_an_applied_version_is_a_conflict_not_an_edit(
    dsn: str, admin: Conn, mdir: Path
) -> None:
    """A new file that reuses an applied version is named as a different migration, and repair refuses it."""
    simple_set(mdir, 2)
    migrator = Migrator(dsn, str(mdir))
    migrator.migrate()
    checksums = scalar(admin, "SELECT array_agg(checksum ORDER BY version) FROM migration_history")
    (mdir / "0002_table_2.sql").unlink()
    (mdir / "0002_table_2.down.sql").unlink()
    other = write(mdir, "0002_add_index.sql", "CREATE INDEX t1_id ON t1 (id);\n")
    assert [(r.version, r.state) for r in migrator.status()] == [(1, "applied"), (2, "conflict")]
    [problem] = migrator.validate()
    assert str(other) in problem
    assert "different migration" in problem
    assert "'table_2'" in problem
    assert "above 2" in problem
    assert "repair" not in problem
    for call in (migrator.migrate, migrator.repair):
        with pytest.raises(ChecksumMismatch, match="different migration"):
            call()
    assert scalar(admin, "SELECT array_agg(checksum ORDER BY version) FROM migration_history") == checksums
    assert not relation_exists(admin, "t1_id")


def test_an_edited_file_is_still_a_change_that_repair_accepts(dsn: str, mdir: Path) -> None:
    """The same file name with new text stays 'changed', and repair accepts it as before."""
    simple_set(mdir, 1)
    migrator = Migrator(dsn, str(mdir))
    migrator.migrate()
    path = write(mdir, "0001_table_1.sql", "CREATE TABLE t1 (id int); -- noted\n")
    assert [r.state for r in migrator.status()] == ["changed"]
    assert migrator.repair() == [f"accepted the changed checksum of {str(path)!r}"]
    assert os.path.exists(path)
