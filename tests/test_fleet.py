"""Migrations for fleets (issue 11): many `migrate` processes at once, directly and behind a real PgBouncer.

Every `migrate` here is a real ``python -m pgops`` process; PgBouncer is the Debian package, run by
tests/pgbouncer.py. What is checked afterwards is the database itself: each migration's row in `ran`
(written by the migration, so a second run shows as a count of 2), the history table and pg_locks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extensions
import pytest

import pgops
from pgbouncer import PgBouncer
from pgtest import (
    PgServer,
    check_output,
    free_port,
    history,
    pgops_env,
    relation_exists,
    run_pgops,
    scalar,
    secrets_of,
    spawn_pgops,
    temporary_database,
    temporary_role,
    wait_until,
    write,
)

Conn = psycopg2.extensions.connection
MakeBouncer = Callable[..., PgBouncer]
Done = subprocess.CompletedProcess[str]

TIMEOUT = 120.0
FLEET = 8
ROUNDS = 3
MIGRATIONS = 20
SLOW_VERSION = 7  # pg_sleep(0.3), so that runners overlap
CONCURRENT_VERSION = 12  # -- pgops: no-transaction, CREATE INDEX CONCURRENTLY
LOCK_CLASS = 0x7067_6F70  # "pgop"
LOCK_KEY = zlib.crc32(b"public.migration_history") & 0x7FFF_FFFF
WITH_OPTIONS = "extra_float_digits,options"  # PgBouncer drops pgops' `-c lock_timeout=...` startup option
NO_TX = "-- pgops: no-transaction\n"


# -- helpers --------------------------------------------------------------------------------------


def fleet_set(directory: Path, count: int = MIGRATIONS) -> None:
    """Write migrations 1..count; each records its version in `ran`, which 0001 creates."""
    write(
        directory, "0001_ran.sql", "CREATE TABLE ran (version int NOT NULL);\nINSERT INTO ran VALUES (1);\n"
    )
    for v in range(2, count + 1):
        if v == SLOW_VERSION:
            write(directory, f"{v:04d}_slow.sql", f"SELECT pg_sleep(0.3);\nINSERT INTO ran VALUES ({v});\n")
        elif v == CONCURRENT_VERSION:
            write(
                directory,
                f"{v:04d}_ran_index.sql",
                f"{NO_TX}CREATE INDEX CONCURRENTLY IF NOT EXISTS ran_version ON ran (version);\n"
                f"INSERT INTO ran VALUES ({v});\n",
            )
        else:
            sql = f"CREATE TABLE t{v} (id int);\nINSERT INTO ran VALUES ({v});\n"
            write(directory, f"{v:04d}_step.sql", sql)


def applied(*versions: int) -> list[tuple[int, str]]:
    """History rows expected when exactly these versions are applied."""
    return [(v, "applied") for v in versions]


def assert_applied_once(conn: Conn, count: int = MIGRATIONS) -> None:
    """Each of migrations 1..count ran exactly once and is recorded as applied."""
    with conn.cursor() as cur:
        cur.execute("SELECT version, count(*) FROM ran GROUP BY 1 ORDER BY 1")
        assert cur.fetchall() == [(v, 1) for v in range(1, count + 1)]
    assert history(conn) == applied(*range(1, count + 1))


def advisory_locks(conn: Conn) -> int:
    """Advisory locks held in conn's database, by anyone."""
    return int(
        scalar(
            conn,
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
    )


def assert_no_advisory_locks(conn: Conn) -> None:
    """No advisory lock is left in conn's database (a closing direct session may take a moment to go)."""
    wait_until(lambda: advisory_locks(conn) == 0, timeout=5, message="an advisory lock was left behind")


def migrate(
    pg_server: PgServer, url: str | None, mdir: Path, cwd: Path, *args: str, env: dict[str, str] | None = None
) -> Done:
    """Run `migrate --dir mdir ARGS` to its end with DATABASE_URL=url (None: unset)."""
    return run_pgops("migrate", "--dir", str(mdir), *args, database_url=url, cwd=cwd, env=env,
                     secrets=secrets_of(pg_server))  # fmt: skip


def spawn(
    mdir: Path, *args: str, database_url: str | None, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """Start `migrate --dir mdir ARGS` as a process of its own, its output piped."""
    return spawn_pgops("migrate", "--dir", str(mdir), *args, database_url=database_url, env=env, cwd=cwd)


def finish(proc: subprocess.Popen[str], timeout: float = TIMEOUT) -> Done:
    """Wait for proc and return what it did."""
    stdout, stderr = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@contextlib.contextmanager
def reaped(procs: Sequence[subprocess.Popen[str]]) -> Iterator[None]:
    """Kill (by pid) and reap whichever of procs is still running when the block ends."""
    try:
        yield
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


def run_fleet(url: str, mdir: Path, cwd: Path, n: int = FLEET, *args: str) -> list[Done]:
    """Run n `migrate` processes at once against url and return them all, finished."""
    procs = [spawn(mdir, "--lock-timeout", "120", *args, database_url=url, cwd=cwd) for _ in range(n)]
    with reaped(procs):
        return [finish(proc, TIMEOUT * 2) for proc in procs]


def sleeping_backend(conn: Conn, marker: str) -> int | None:
    """Pid of the backend in conn's database now running a query that contains marker, if any."""
    pid = scalar(
        conn,
        "SELECT coalesce(max(pid), 0) FROM pg_stat_activity WHERE datname = current_database() "
        "AND state = 'active' AND pid <> pg_backend_pid() AND strpos(query, %s) > 0",
        (marker,),
    )
    return int(pid) or None


def migrate_fleet_rounds(
    pg_server: PgServer, url_of: Callable[[str], str], tmp_path: Path, rounds: int = ROUNDS
) -> None:
    """ROUNDS times, on a fresh database: FLEET runners at once through url_of(db), then the checks."""
    mdir = tmp_path / "migrations"
    fleet_set(mdir)
    for _ in range(rounds):
        with temporary_database(pg_server) as db:
            results = run_fleet(url_of(db), mdir, tmp_path)
            for result in results:
                check_output(result, secrets_of(pg_server))
                assert result.returncode == 0, result.stderr
            with contextlib.closing(pg_server.admin_connect(db)) as admin:
                assert_applied_once(admin)
                # Through a transaction pooler a session lock left on a server connection stays there.
                assert advisory_locks(admin) == 0
                direct = migrate(pg_server, pg_server.url(db), mdir, tmp_path)
                assert direct.returncode == 0, direct.stderr
                assert "already up to date" in direct.stdout
                assert "waiting" not in direct.stderr
                assert_no_advisory_locks(admin)


# -- the harness ------------------------------------------------------------------------------------


def test_transaction_pooler_sends_its_own_backend_key(pgbouncer: MakeBouncer, dbname: str) -> None:
    """Through transaction mode, the BackendKeyData pid is PgBouncer's, not the server's backend."""
    bouncer = pgbouncer("transaction")
    with contextlib.closing(bouncer.connect(dbname)) as conn:
        assert scalar(conn, "SELECT current_database()") == dbname
        assert conn.info.backend_pid != scalar(conn, "SELECT pg_backend_pid()")


def test_the_harness_pools_server_connections(pgbouncer: MakeBouncer, admin: Conn, dbname: str) -> None:
    """Ten clients in transaction mode share at most pool_size server connections; stop() ends PgBouncer."""
    bouncer = pgbouncer("transaction", pool_size=2)
    clients = [bouncer.connect(dbname, application_name="via-bouncer") for _ in range(10)]
    try:
        for conn in clients:
            assert scalar(conn, "SELECT 1") == 1
        servers = scalar(
            admin, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> "
            "pg_backend_pid() AND backend_type = 'client backend'",
        )  # fmt: skip
        assert 1 <= servers <= 2
    finally:
        for conn in clients:
            conn.close()
    pid = bouncer.pid
    assert pid is not None
    bouncer.stop()
    assert bouncer.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_the_harness_reports_a_pgbouncer_that_does_not_start(
    pg_server: PgServer, pgbouncer: MakeBouncer
) -> None:
    """A PgBouncer that exits at start-up raises RuntimeError with its log's tail, and leaves nothing behind.

    (The fixture is requested for its skip, or error in CI, when pgbouncer is missing.)"""
    bouncer = PgBouncer(pg_server, extra={"no_such_setting": "1"})
    try:
        with pytest.raises(RuntimeError, match="no_such_setting"):
            bouncer.start(timeout=10)
        assert bouncer.pid is None
    finally:
        bouncer.cleanup()
    assert not bouncer.dir.exists()


# -- many runners at once -------------------------------------------------------------------------


# Both PgBouncer configurations: as shipped (it refuses pgops' `-c lock_timeout=...` startup option, so
# pgops connects again without it) and ignoring `options`, as the measurements ran.
IGNORED = pytest.mark.parametrize(
    "ignored", ["extra_float_digits", WITH_OPTIONS], ids=["refuses-options", "ignores-options"]
)


@IGNORED
def test_fleet_through_transaction_mode_pgbouncer(
    pg_server: PgServer, pgbouncer: MakeBouncer, tmp_path: Path, ignored: str
) -> None:
    """8 runners through transaction-mode PgBouncer (pool 4), 3 rounds: all exit 0, each file runs once,
    no advisory lock is left on a pooled server connection, and a direct run right after never waits."""
    bouncer = pgbouncer("transaction", pool_size=4, ignore_startup_parameters=ignored)
    migrate_fleet_rounds(pg_server, bouncer.url, tmp_path)


@IGNORED
def test_fleet_through_session_mode_pgbouncer(
    pg_server: PgServer, pgbouncer: MakeBouncer, tmp_path: Path, ignored: str
) -> None:
    """8 runners through session-mode PgBouncer (pool 4: half of them queue in PgBouncer), 3 rounds."""
    bouncer = pgbouncer("session", pool_size=4, ignore_startup_parameters=ignored)
    migrate_fleet_rounds(pg_server, bouncer.url, tmp_path)


def test_fleet_direct(pg_server: PgServer, tmp_path: Path) -> None:
    """The same fleet on direct connections: the baseline the pooled runs must match."""
    migrate_fleet_rounds(pg_server, pg_server.url, tmp_path, rounds=1)


@IGNORED
def test_migrate_through_pgbouncer_with_or_without_options(
    pg_server: PgServer, pgbouncer: MakeBouncer, dbname: str, admin: Conn, tmp_path: Path, ignored: str
) -> None:
    """A PgBouncer that refuses the `options` startup parameter still migrates (pgops connects again
    without it, at once: the refusal is no transient error worth retries and warnings), and so does one
    that ignores it."""
    bouncer = pgbouncer("transaction", ignore_startup_parameters=ignored)
    mdir = tmp_path / "migrations"
    fleet_set(mdir, 3)
    proc = migrate(pg_server, bouncer.url(dbname), mdir, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "WARNING" not in proc.stderr
    assert_applied_once(admin, 3)
    assert_no_advisory_locks(admin)


# -- which database ------------------------------------------------------------------------------


def closed_url() -> str:
    """A URL on which nothing listens."""
    return f"postgresql://nobody@127.0.0.1:{free_port()}/nowhere?connect_timeout=2"


FAST_FAIL = {"DB_RETRY_MAX_ATTEMPTS": "1"}  # a wrongly chosen closed URL fails at once, not after retries


@pytest.mark.parametrize(
    ("database_url", "migrate_url", "dsn_option"),
    [("closed", "db", None), ("closed", "closed", "db"), ("db", None, None)],
    ids=["PGOPS_MIGRATE_URL-wins-over-DATABASE_URL", "--dsn-wins-over-both", "DATABASE_URL-alone"],
)
def test_which_database_migrate_uses(
    pg_server: PgServer,
    dsn: str,
    admin: Conn,
    mdir: Path,
    tmp_path: Path,
    database_url: str,
    migrate_url: str | None,
    dsn_option: str | None,
) -> None:
    """--dsn, then PGOPS_MIGRATE_URL (direct, while DATABASE_URL points at PgBouncer; here a closed
    port), then DATABASE_URL: only the test database makes the run succeed."""

    def url(which: str) -> str:
        return dsn if which == "db" else closed_url()

    fleet_set(mdir, 2)
    env = dict(FAST_FAIL) | ({"PGOPS_MIGRATE_URL": url(migrate_url)} if migrate_url else {})
    args = ("--dsn", url(dsn_option)) if dsn_option else ()
    proc = migrate(pg_server, url(database_url), mdir, tmp_path, *args, env=env)
    assert proc.returncode == 0, proc.stderr
    assert_applied_once(admin, 2)


def test_no_database_named_is_a_usage_error(mdir: Path, tmp_path: Path) -> None:
    """No --dsn, PGOPS_MIGRATE_URL or DATABASE_URL: exit 2 with one line naming all three."""
    fleet_set(mdir, 1)
    proc = run_pgops("migrate", "--dir", str(mdir), database_url=None, cwd=tmp_path, env=FAST_FAIL)
    assert proc.returncode == 2, proc.stderr
    assert "no database given; pass --dsn or set PGOPS_MIGRATE_URL or DATABASE_URL" in proc.stderr


# -- waiting for the lock -----------------------------------------------------------------------------


def hold_lock(pg_server: PgServer, db: str, name: str) -> Conn:
    """Return a session in db that holds the migration lock (session level), named name."""
    conn = psycopg2.connect(pg_server.dsn(db, application_name=name))
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_lock(%s, %s)", (LOCK_CLASS, LOCK_KEY))
    return conn


def test_the_lock_key_is_the_documented_one(dsn: str, mdir: Path) -> None:
    """The keys these tests hold are the ones the migrator takes."""
    assert pgops.Migrator(dsn, str(mdir))._lock_key == LOCK_KEY
    assert pgops._LOCK_CLASS == LOCK_CLASS


def test_lock_timeout_names_the_holder_in_the_same_database(
    pg_server: PgServer, dbname: str, mdir: Path, tmp_path: Path
) -> None:
    """With the keys held in another database and in this one, exit 3 names this database's holder."""
    fleet_set(mdir, 1)
    with temporary_database(pg_server) as other_db:
        other = hold_lock(pg_server, other_db, "holder-elsewhere")
        here = hold_lock(pg_server, dbname, "holder-here")
        try:
            other_pid, here_pid = other.info.backend_pid, here.info.backend_pid
            proc = migrate(pg_server, pg_server.url(dbname), mdir, tmp_path, "--lock-timeout", "1")
        finally:
            here.close()
            other.close()
    assert proc.returncode == 3, proc.stderr
    assert f"pid {here_pid}" in proc.stderr
    assert f"pid {other_pid}" not in proc.stderr


def waiting_runner(admin: Conn) -> bool:
    """Tell whether a pgops-migrate session in admin's database has asked about the advisory lock."""
    return bool(
        scalar(
            admin,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = 'pgops-migrate' AND query ILIKE '%%advisory%%'",
        )
    )


@pytest.mark.parametrize("verbosity", ["default", "-v"])
def test_waiting_for_the_lock_is_quiet_by_default(
    pg_server: PgServer, dbname: str, admin: Conn, mdir: Path, tmp_path: Path, verbosity: str
) -> None:
    """Waiting a little is normal in a fleet: no line at default verbosity, an INFO line with -v."""
    fleet_set(mdir, 2)
    holder = hold_lock(pg_server, dbname, "test-holder")
    args = ["-v"] if verbosity == "-v" else []
    proc = spawn(mdir, *args, database_url=pg_server.url(dbname), cwd=tmp_path)
    with reaped([proc]):
        try:
            wait_until(lambda: waiting_runner(admin) or proc.poll() is not None, timeout=TIMEOUT,
                       message="migrate never looked at the lock")  # fmt: skip
        finally:
            holder.close()
        result = finish(proc)
    assert result.returncode == 0, result.stderr
    assert_applied_once(admin, 2)
    if verbosity == "-v":
        assert "INFO: waiting for the migration lock" in result.stderr
    else:
        assert "waiting" not in result.stderr
        assert "WARNING" not in result.stderr


def test_a_long_wait_for_the_lock_becomes_a_warning(
    pg_server: PgServer, dbname: str, dsn: str, mdir: Path,
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Past _LOCK_QUIET seconds, waiting for the lock is logged at WARNING (before that, at INFO)."""
    monkeypatch.setattr(pgops, "_LOCK_QUIET", 0.5)
    caplog.set_level(logging.INFO, logger="pgops")
    fleet_set(mdir, 2)
    holder = hold_lock(pg_server, dbname, "test-holder")
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["applied"] = pgops.Migrator(dsn, str(mdir), lock_timeout=TIMEOUT).migrate()
        except BaseException as exc:  # reported by the assertions below
            outcome["error"] = exc

    runner = threading.Thread(target=run, name="migrate")
    runner.start()
    try:

        def warned() -> bool:
            return (
                any(
                    r.levelno == logging.WARNING and "waiting for the migration lock" in r.getMessage()
                    for r in caplog.records
                )
                or not runner.is_alive()
            )

        wait_until(warned, timeout=TIMEOUT, message="no WARNING while waiting for the lock")
    finally:
        holder.close()
        runner.join(TIMEOUT)
    assert "error" not in outcome, outcome
    assert [m.version for m in outcome["applied"]] == [1, 2]
    waits = [r for r in caplog.records if "waiting for the migration lock" in r.getMessage()]
    assert waits[0].levelno == logging.INFO
    assert any(r.levelno == logging.WARNING for r in waits)


# -- SIGTERM --------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["direct", "transaction-bouncer"])
def test_sigterm_cancels_a_transactional_migration(
    pg_server: PgServer, pgbouncer: MakeBouncer, dbname: str, admin: Conn, mdir: Path, tmp_path: Path,
    route: str,
) -> None:  # fmt: skip
    """SIGTERM during a file's pg_sleep(60): exit 143, `pgops: terminated`, nothing of the file, no lock,
    the statement gone from the server; a rerun applies it."""
    url = pg_server.url(dbname)
    if route != "direct":
        url = pgbouncer("transaction", ignore_startup_parameters=WITH_OPTIONS).url(dbname)
    fleet_set(mdir, 1)
    slow = write(mdir, "0002_sleepy.sql", "INSERT INTO ran VALUES (2);\nSELECT pg_sleep(60);\n")
    proc = spawn(mdir, database_url=url, cwd=tmp_path)
    with reaped([proc]):
        sleeper = wait_until(lambda: sleeping_backend(admin, "pg_sleep(60)") or proc.poll() is not None,
                             timeout=TIMEOUT, message="the migration never reached its pg_sleep")  # fmt: skip
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        result = finish(proc)
    assert result.returncode == 143, result.stderr
    assert "pgops: terminated" in result.stderr
    check_output(result, secrets_of(pg_server))
    wait_until(lambda: sleeping_backend(admin, "pg_sleep(60)") is None, timeout=10,
               message=f"backend {sleeper} still runs the cancelled pg_sleep")  # fmt: skip
    assert history(admin) == applied(1)
    assert scalar(admin, "SELECT count(*) FROM ran WHERE version = 2") == 0
    assert_no_advisory_locks(admin)
    write(mdir, slow.name, "INSERT INTO ran VALUES (2);\nSELECT pg_sleep(0);\n")
    again = migrate(pg_server, url, mdir, tmp_path)
    assert again.returncode == 0, again.stderr
    assert_applied_once(admin, 2)
    assert_no_advisory_locks(admin)


def test_sigterm_during_a_no_transaction_file_leaves_it_dirty(
    pg_server: PgServer, dbname: str, admin: Conn, mdir: Path, tmp_path: Path
) -> None:
    """A no-transaction file cut off by SIGTERM: exit 143 and an ERROR saying it was cut off and needs
    repair; the next migrate refuses at once (exit 5) instead of waiting for its lease."""
    url = pg_server.url(dbname)
    fleet_set(mdir, 1)
    write(mdir, "0002_sleepy.sql", f"{NO_TX}SELECT pg_sleep(60);\n")
    proc = spawn(mdir, database_url=url, cwd=tmp_path)
    with reaped([proc]):
        wait_until(lambda: sleeping_backend(admin, "pg_sleep(60)") or proc.poll() is not None,
                   timeout=TIMEOUT, message="the migration never reached its pg_sleep")  # fmt: skip
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        result = finish(proc)
    assert result.returncode == 143, result.stderr
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert any("cut off" in line and "repair" in line for line in errors), result.stderr
    wait_until(lambda: sleeping_backend(admin, "pg_sleep(60)") is None, timeout=10,
               message="the cancelled pg_sleep still runs")  # fmt: skip
    assert_no_advisory_locks(admin)
    assert scalar(admin, "SELECT status FROM migration_history WHERE version = 2") in ("running", "failed")
    again = migrate(pg_server, url, mdir, tmp_path, "-v")  # -v: a wait for the lease would be logged
    assert again.returncode == 5, again.stderr
    assert "repair" in again.stderr.splitlines()[-1]
    assert "waiting" not in again.stderr


# -- leases for no-transaction files ------------------------------------------------------------------


LEASE_SCRIPT = """
import sys
import pgops
pgops.Migrator(sys.argv[1], sys.argv[2], lease_timeout=2.0).migrate()
"""


def test_a_dead_runners_lease_expires_and_the_file_is_not_run_again(
    dsn: str, admin: Conn, mdir: Path, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """A runner SIGKILLed inside a no-transaction file: another runner waits while its lease is live
    (INFO `waiting for migration 2`), then raises DirtyDatabase without running the file again."""
    caplog.set_level(logging.INFO, logger="pgops")
    fleet_set(mdir, 1)
    write(mdir, "0002_sleepy.sql", f"{NO_TX}INSERT INTO ran VALUES (2);\nSELECT pg_sleep(60);\n")
    first = subprocess.Popen(
        [sys.executable, "-c", LEASE_SCRIPT, dsn, str(mdir)],
        env=pgops_env(), cwd=tmp_path, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    outcome: dict[str, Any] = {}

    def second_runner() -> None:
        try:
            runner = pgops.Migrator(dsn, str(mdir), lease_timeout=2.0, lock_timeout=TIMEOUT)
            outcome["applied"] = runner.migrate()
        except BaseException as exc:  # reported by the assertions below
            outcome["error"] = exc

    with reaped([first]):
        sleeper = wait_until(lambda: sleeping_backend(admin, "pg_sleep(60)") or first.poll() is not None,
                             timeout=TIMEOUT, message="the first runner never reached pg_sleep")  # fmt: skip
        assert first.poll() is None, first.communicate()
        second = threading.Thread(target=second_runner, name="second-runner")
        second.start()
        try:
            first.kill()
            first.communicate()
            scalar(admin, "SELECT pg_terminate_backend(%s)", (sleeper,))
        finally:
            second.join(TIMEOUT)
    assert not second.is_alive()
    assert isinstance(outcome.get("error"), pgops.DirtyDatabase), outcome
    waits = [r for r in caplog.records if "waiting for migration 2" in r.getMessage()]
    assert waits and waits[0].levelno == logging.INFO
    assert scalar(admin, "SELECT status FROM migration_history WHERE version = 2") == "running"
    assert scalar(admin, "SELECT count(*) FROM ran WHERE version = 2") == 1
    assert_no_advisory_locks(admin)


# -- progress and history -------------------------------------------------------------------------


@pytest.mark.parametrize("quiet", [False, True])
def test_a_slow_migration_is_announced_when_it_starts(
    pg_server: PgServer, dbname: str, admin: Conn, mdir: Path, tmp_path: Path, quiet: bool
) -> None:
    """A file running over about a second is announced (`applying 0002_slow`) unless -q; a fast one not."""
    fleet_set(mdir, 1)
    write(mdir, "0002_slow.sql", "SELECT pg_sleep(1.5);\nINSERT INTO ran VALUES (2);\n")
    write(mdir, "0003_fast.sql", "INSERT INTO ran VALUES (3);\n")
    args = ["-q"] if quiet else []
    proc = migrate(pg_server, pg_server.url(dbname), mdir, tmp_path, *args)
    assert proc.returncode == 0, proc.stderr
    assert_applied_once(admin, 3)
    assert ("applying 0002_slow" in proc.stderr) is not quiet
    assert "applying 0003_fast" not in proc.stderr
    assert "applying 0001_ran" not in proc.stderr


HISTORY_COLUMNS = (
    "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = 'public' "
    "AND table_name = 'migration_history' AND column_name IN ('runner', 'lease_until') ORDER BY 1"
)
NEW_COLUMNS = [("lease_until", "timestamp with time zone"), ("runner", "text")]

# The history table as pgops created it before issue 11.
OLD_HISTORY = """
CREATE TABLE public.migration_history (
    version bigint PRIMARY KEY,
    description text NOT NULL,
    checksum text NOT NULL,
    status text NOT NULL CHECK (status IN ('applied', 'failed', 'running')),
    applied_at timestamptz NOT NULL DEFAULT now(),
    execution_ms double precision,
    applied_by text NOT NULL DEFAULT current_user,
    error text,
    progress integer NOT NULL DEFAULT 0)
"""


def columns(admin: Conn) -> list[tuple[str, str]]:
    with admin.cursor() as cur:
        cur.execute(HISTORY_COLUMNS)
        return [(str(a), str(b)) for a, b in cur.fetchall()]


def test_history_has_runner_and_lease_columns(
    pg_server: PgServer, dbname: str, admin: Conn, mdir: Path, tmp_path: Path
) -> None:
    """A new history table has `runner text` and `lease_until timestamptz`."""
    fleet_set(mdir, 2)
    proc = migrate(pg_server, pg_server.url(dbname), mdir, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert columns(admin) == NEW_COLUMNS


def test_an_old_history_table_gains_the_new_columns(
    pg_server: PgServer, dbname: str, admin: Conn, mdir: Path, tmp_path: Path
) -> None:
    """A history table made by an older pgops gets the two columns, keeps its rows, and migrating goes on."""
    fleet_set(mdir, 3)
    first = (mdir / "0001_ran.sql").read_text(encoding="utf-8")
    with admin.cursor() as cur:
        cur.execute(OLD_HISTORY)
        cur.execute(first)
        cur.execute(
            "INSERT INTO migration_history (version, description, checksum, status) "
            "VALUES (1, 'ran', %s, 'applied')",
            (pgops.migration_checksum(first),),
        )
    proc = migrate(pg_server, pg_server.url(dbname), mdir, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert columns(admin) == NEW_COLUMNS
    assert_applied_once(admin, 3)


def test_an_old_history_table_of_another_owner_names_the_statement_to_run(
    pg_server: PgServer, dbname: str, admin: Conn, mdir: Path, tmp_path: Path
) -> None:
    """A deploy role that may write the old table but not alter it gets the exact ALTER for the owner."""
    fleet_set(mdir, 2)
    with admin.cursor() as cur:
        cur.execute(OLD_HISTORY)
    password = secrets.token_urlsafe(12)
    with temporary_role(admin, "pgops_deployer_", password=password) as role:
        with admin.cursor() as cur:
            cur.execute(f'GRANT SELECT, INSERT, UPDATE, DELETE ON migration_history TO "{role}"')
            cur.execute(f'GRANT CREATE ON SCHEMA public TO "{role}"')
        proc = migrate(pg_server, pg_server.dsn(dbname, user=role, password=password), mdir, tmp_path)
    assert proc.returncode == 4, proc.stderr
    assert "have the table's owner run: ALTER TABLE" in proc.stderr
    assert "ADD COLUMN IF NOT EXISTS lease_until timestamptz" in proc.stderr
    assert columns(admin) == [c for c in NEW_COLUMNS if c[0] not in ("runner", "lease_until")]
    assert not relation_exists(admin, "ran")


# -- what the review of the first design found ------------------------------------------------------


def test_a_repeatable_read_default_does_not_make_runners_apply_twice(
    pg_server: PgServer, tmp_path: Path
) -> None:
    """With default_transaction_isolation = repeatable read, a runner's snapshot would predate its lock:
    pgops' transactions are READ COMMITTED whatever the default, and the fleet still exits 0."""
    mdir = tmp_path / "migrations"
    fleet_set(mdir)
    for _ in range(2):
        with temporary_database(pg_server) as db:
            with contextlib.closing(pg_server.admin_connect()) as conn, conn.cursor() as cur:
                cur.execute(f"ALTER DATABASE \"{db}\" SET default_transaction_isolation = 'repeatable read'")
            for result in run_fleet(pg_server.url(db), mdir, tmp_path):
                assert result.returncode == 0, result.stderr
            with contextlib.closing(pg_server.admin_connect(db)) as admin:
                assert_applied_once(admin)


@pytest.mark.parametrize("marker", ["", NO_TX], ids=["transaction", "no-transaction"])
def test_runners_wait_behind_a_long_statement_longer_than_their_lock_timeout(
    pg_server: PgServer, dbname: str, admin: Conn, mdir: Path, tmp_path: Path, marker: str
) -> None:
    """A statement at work is progress: a runner with --lock-timeout 1 waits behind a 3 s migration of
    another runner, then finds nothing to do and exits 0."""
    fleet_set(mdir, 2)
    write(mdir, "0003_long.sql", f"{marker}SELECT pg_sleep(3);\n")
    url = pg_server.url(dbname)
    first = spawn(mdir, database_url=url, cwd=tmp_path)
    with reaped([first]):
        wait_until(lambda: sleeping_backend(admin, "pg_sleep(3)"), timeout=30, message="never ran")
        second = migrate(pg_server, url, mdir, tmp_path, "--lock-timeout", "1")
        done = finish(first)
    assert done.returncode == 0, done.stderr
    assert second.returncode == 0, second.stderr
    assert "already up to date" in second.stdout
    assert history(admin) == applied(1, 2, 3)


def test_a_files_session_settings_do_not_reach_other_clients_of_a_transaction_pooler(
    pg_server: PgServer, pgbouncer: MakeBouncer, dbname: str, mdir: Path, tmp_path: Path
) -> None:
    """A file's session-level SET is undone before its COMMIT: the pooler's server connection, which
    other clients get next, keeps its defaults, even when the next file fails (and with it the reset
    that starts its transaction)."""
    bouncer = pgbouncer("transaction", pool_size=1)
    write(
        mdir,
        "0001_leaky.sql",
        "SET search_path = leaked, public;\nSET work_mem = '7MB';\nCREATE TABLE a ();\n",
    )
    write(mdir, "0002_fails.sql", "SELECT 1 / 0;\n")
    proc = migrate(pg_server, bouncer.url(dbname), mdir, tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "22012" in proc.stderr
    with contextlib.closing(psycopg2.connect(bouncer.dsn(dbname))) as client:
        client.autocommit = True
        assert scalar(client, "SHOW search_path") == '"$user", public'
        assert scalar(client, "SHOW work_mem") != "7MB"


def test_a_runner_that_cannot_open_its_lease_connection_claims_nothing(
    pg_server: PgServer, dbname: str, admin: Conn, mdir: Path, tmp_path: Path
) -> None:
    """A no-transaction file needs a second connection to renew its lease; a role limited to one
    connection gets a clear error before the file is claimed, and the database is left clean."""
    fleet_set(mdir, 2)
    write(mdir, "0003_index.sql", f"{NO_TX}CREATE INDEX CONCURRENTLY ran_v ON ran (version);\n")
    password = secrets.token_urlsafe(12)
    with temporary_role(admin, "pgops_deployer_", password=password) as role:
        with admin.cursor() as cur:
            cur.execute(f'GRANT CREATE ON SCHEMA public TO "{role}"')
            cur.execute(f'ALTER ROLE "{role}" CONNECTION LIMIT 1')
        dsn = pg_server.dsn(dbname, user=role, password=password)
        proc = migrate(pg_server, dsn, mdir, tmp_path, env=FAST_FAIL)
        assert proc.returncode == 6, proc.stderr
        assert "too many connections" in proc.stderr
        assert history(admin) == applied(1, 2)  # 3 not claimed: no 'running' row to repair
