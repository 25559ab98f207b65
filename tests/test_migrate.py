"""API-level tests of the migrator: files, splitting, checksums, locking, applying, rollback and repair."""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hypothesis
import hypothesis.strategies as st
import psycopg2
import psycopg2.extensions
import psycopg2.sql
import pytest

import pgops
from pgops import (
    BadMigration,
    ChecksumMismatch,
    DirtyDatabase,
    LockTimeout,
    MigrationError,
    MigrationFailed,
    Migrator,
    _parse_migration_name,
    _split_sql,
    load_migrations,
    migration_checksum,
)
from pgtest import (
    PgServer,
    applied,
    free_port,
    history,
    locked_table,
    relation_exists,
    scalar,
    simple_set,
    wait_until,
    write,
)

Conn = psycopg2.extensions.connection

# One migration that exercises every way a semicolon can hide inside a statement.
TRICKY_SQL = """\
-- a comment; with a semicolon
/* a block comment; /* nested; */ still a comment; */
CREATE TABLE "semi;colon" (id int PRIMARY KEY, note text);
INSERT INTO "semi;colon" VALUES (1, 'a;b'), (2, E'it\\'s; escaped'), (3, 'it''s; doubled');
CREATE FUNCTION add_one(x int) RETURNS int AS $$
BEGIN
    RETURN x + 1; -- inside a dollar quote
END;
$$ LANGUAGE plpgsql;
CREATE FUNCTION tagged() RETURNS text AS $fn$ SELECT 'x;$$;y'::text $fn$ LANGUAGE sql;
CREATE FUNCTION atomic_two() RETURNS int LANGUAGE sql
BEGIN ATOMIC
    SELECT CASE WHEN true THEN 1 ELSE 0 END;
    SELECT 2;
END;
DO $do$ BEGIN INSERT INTO "semi;colon" VALUES (4, 'from do;'); END $do$;
"""


# -- helpers ------------------------------------------------------------------------------------


def statements(text: str) -> list[str]:
    """Return the non-blank pieces of _split_sql(text), stripped."""
    return [piece.strip() for piece in _split_sql(text) if piece.strip()]


@pytest.fixture
def holder(pg_server: PgServer, dbname: str) -> Iterator[Conn]:
    """An autocommit connection with application_name 'holder-app', for holding locks."""
    conn = psycopg2.connect(pg_server.dsn(dbname, application_name="holder-app"))
    conn.autocommit = True
    try:
        yield conn
    finally:
        conn.close()


def hold_migration_lock(conn: Conn, migrator: Migrator) -> int:
    """Take the migrator's advisory lock on conn as another runner would; return conn's backend pid."""
    with conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_lock(%s, %s)", (pgops._LOCK_CLASS, migrator._lock_key))
    return int(scalar(conn, "SELECT pg_backend_pid()"))


# -- file names, checksums, splitting --------------------------------------------------------------


@pytest.mark.parametrize(
    ("filename", "expected"),
    [
        ("0001_init.sql", (1, "init", False)),
        ("0001_init.down.sql", (1, "init", True)),
        ("42_add-users_table.sql", (42, "add-users_table", False)),
        ("000000123_x.sql", (123, "x", False)),
    ],
)
def test_parse_migration_name_accepts_numbered_files(filename: str, expected: tuple[int, str, bool]) -> None:
    """A numbered file name parses into (version, description, is_down)."""
    assert _parse_migration_name(filename) == expected


@pytest.mark.parametrize(
    "filename",
    ["001-init.sql", "init.sql", "V1__init.sql", "0001_.sql", "0001_two words.sql", "0001_a.b.sql"],
)
def test_parse_migration_name_rejects_bad_names(filename: str) -> None:
    """A name that is not NNNN_description.sql raises BadMigration naming the file."""
    with pytest.raises(BadMigration, match=repr(filename).replace(".", r"\.")):
        _parse_migration_name(filename)


def test_checksum_ignores_bom_and_crlf() -> None:
    """The checksum is the same with a BOM, with CRLF line ends, or both, and differs on real changes."""
    text = "CREATE TABLE a (id int);\nINSERT INTO a VALUES (1);\n"
    crlf = text.replace("\n", "\r\n")
    base = migration_checksum(text)
    assert migration_checksum("\ufeff" + text) == base
    assert migration_checksum(crlf) == base
    assert migration_checksum("\ufeff" + crlf) == base
    assert migration_checksum(text.replace("1", "2")) != base
    assert len(base) == 64 and int(base, 16) >= 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("SELECT 1; SELECT 2;", ["SELECT 1;", "SELECT 2;"]),
        ("SELECT 1; SELECT 2", ["SELECT 1;", "SELECT 2"]),
        ("SELECT 'a;b'; SELECT 2;", ["SELECT 'a;b';", "SELECT 2;"]),
        ("SELECT 'it''s;'; SELECT 2;", ["SELECT 'it''s;';", "SELECT 2;"]),
        ("SELECT E'it\\'s;'; SELECT 2;", ["SELECT E'it\\'s;';", "SELECT 2;"]),
        ("SELECT e'\\\\'; SELECT 2;", ["SELECT e'\\\\';", "SELECT 2;"]),
        ("SELECT 'a\\'; SELECT 2;", ["SELECT 'a\\';", "SELECT 2;"]),  # standard strings: no escapes
        ('CREATE TABLE "a;b" (x int); SELECT 2;', ['CREATE TABLE "a;b" (x int);', "SELECT 2;"]),
        ('SELECT "a"";b" FROM t; SELECT 2;', ['SELECT "a"";b" FROM t;', "SELECT 2;"]),
        ("SELECT $$a;b$$; SELECT 2;", ["SELECT $$a;b$$;", "SELECT 2;"]),
        ("SELECT $x$ $$; $x$; SELECT 2;", ["SELECT $x$ $$; $x$;", "SELECT 2;"]),
        ("SELECT $a$ $b$ ; $b$ $a$; SELECT 2;", ["SELECT $a$ $b$ ; $b$ $a$;", "SELECT 2;"]),
        ("PREPARE p AS SELECT $1; SELECT 2;", ["PREPARE p AS SELECT $1;", "SELECT 2;"]),
        ("SELECT a$b$c FROM t; SELECT 2;", ["SELECT a$b$c FROM t;", "SELECT 2;"]),
        ("SELECT 1 -- no; split\n; SELECT 2;", ["SELECT 1 -- no; split\n;", "SELECT 2;"]),
        ("SELECT /* a; /* b; */ c; */ 1; SELECT 2;", ["SELECT /* a; /* b; */ c; */ 1;", "SELECT 2;"]),
        (
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; SELECT 2; END; SELECT 3;",
            [
                "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; SELECT 2; END;",
                "SELECT 3;",
            ],
        ),
        (
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql\nbegin atomic\n"
            "  SELECT CASE WHEN true THEN 1 ELSE 2 END;\nend; SELECT 3;",
            [
                "CREATE FUNCTION f() RETURNS int LANGUAGE sql\nbegin atomic\n"
                "  SELECT CASE WHEN true THEN 1 ELSE 2 END;\nend;",
                "SELECT 3;",
            ],
        ),
        ("BEGIN; SELECT 1; END;", ["BEGIN;", "SELECT 1;", "END;"]),
        (
            "CREATE RULE r AS ON INSERT TO a DO ALSO (INSERT INTO b VALUES (1); DELETE FROM c); SELECT 2;",
            [
                "CREATE RULE r AS ON INSERT TO a DO ALSO (INSERT INTO b VALUES (1); DELETE FROM c);",
                "SELECT 2;",
            ],
        ),
        ("SELECT (1)); SELECT 2;", ["SELECT (1));", "SELECT 2;"]),  # a stray ')' does not go negative
        ("SELECT 'unterminated; SELECT 2;", ["SELECT 'unterminated; SELECT 2;"]),
    ],
)
def test_split_sql_does_not_split_inside_quotes_or_comments(text: str, expected: list[str]) -> None:
    """Semicolons in strings, identifiers, dollar quotes, comments and BEGIN ATOMIC bodies end nothing."""
    pieces = _split_sql(text)
    assert "".join(pieces) == text
    assert statements(text) == expected


def test_split_sql_pieces_join_back_to_the_tricky_migration() -> None:
    """The tricky migration splits into its six statements, which join back to the exact text."""
    pieces = _split_sql(TRICKY_SQL)
    assert "".join(pieces) == TRICKY_SQL
    starts = [p.split("*/")[-1].strip().split()[0] for p in pieces if p.strip()]
    assert starts == ["CREATE", "INSERT", "CREATE", "CREATE", "CREATE", "DO"]


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(st.text(alphabet=st.sampled_from(list("ab;'\"$-/*\n\\E x")), max_size=60))
def test_split_sql_pieces_always_join_back(text: str) -> None:
    """For any text, however malformed, the pieces concatenate to the input."""
    assert "".join(_split_sql(text)) == text


# -- loading files -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("files", "named"),
    [
        ({"001-init.sql": "SELECT 1;"}, ["001-init.sql"]),
        ({"0001_a.sql": "SELECT 1;", "init.sql": "SELECT 1;"}, ["init.sql"]),
        ({"0001_a.sql": "SELECT 1;", "0001_b.sql": "SELECT 2;"}, ["0001_a.sql", "0001_b.sql"]),
        ({"1_a.sql": "SELECT 1;", "001_b.sql": "SELECT 2;"}, ["1_a.sql", "001_b.sql"]),
        ({"0001_a.sql": b"SELECT '\xff\xfe';"}, ["0001_a.sql"]),
        ({"0001_a.sql": "SELECT 1;", "0002_b.down.sql": "SELECT 1;"}, ["0002_b.down.sql"]),
    ],
    ids=[
        "dash",
        "no-number",
        "duplicate",
        "duplicate-padding",
        "latin1",
        "orphan-down",
    ],
)
def test_load_migrations_rejects_bad_files_naming_them(
    mdir: Path, files: dict[str, str | bytes], named: list[str]
) -> None:
    """A bad name, duplicate version, non-UTF-8 or orphan down file is named (an empty file is not
    refused here: only when it is about to run)."""
    for name, text in files.items():
        write(mdir, name, text)
    with pytest.raises(BadMigration) as info:
        load_migrations(str(mdir))
    for name in named:
        assert name in str(info.value)
    assert isinstance(info.value, MigrationError)


def test_load_migrations_reads_versions_markers_and_down_files(mdir: Path) -> None:
    """Files load in numeric order with their down file and no-transaction marker; others are ignored."""
    write(mdir, "10_ten.sql", "SELECT 10;")
    write(mdir, "9_nine.sql", "\ufeff-- comment\n-- pgops: no-transaction\nSELECT 9;")
    write(mdir, "9_nine.down.sql", "SELECT -9;")
    write(mdir, "README.md", "not a migration")
    (mdir / "sub.sql").mkdir()  # a directory, not a file
    migrations = load_migrations(str(mdir))
    assert [(m.version, m.description, m.transactional) for m in migrations] == [
        (9, "nine", False),
        (10, "ten", True),
    ]
    assert migrations[0].down_path == str(mdir / "9_nine.down.sql")
    assert migrations[1].down_path is None
    assert migrations[0].name == "9_nine.sql"
    assert not migrations[0].sql.startswith("\ufeff")


# -- applying ------------------------------------------------------------------------------------


def test_migrate_twice_in_one_process_is_a_no_op_the_second_time(dsn: str, admin: Conn, mdir: Path) -> None:
    """A second migrate() on the same Migrator applies nothing and leaves history unchanged."""
    simple_set(mdir, 3)
    migrator = Migrator(dsn, str(mdir))
    assert [m.version for m in migrator.pending()] == [1, 2, 3]
    assert [m.version for m in migrator.migrate()] == [1, 2, 3]
    assert migrator.migrate() == []
    assert Migrator(dsn, str(mdir)).migrate() == []
    assert migrator.pending() == []
    assert history(admin) == applied(1, 2, 3)
    assert all(relation_exists(admin, f"t{v}") for v in (1, 2, 3))
    assert scalar(admin, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == 0


def test_migrate_reports_each_applied_migration(dsn: str, mdir: Path) -> None:
    """on_done is called once per migration, in order, with a non-negative duration."""
    simple_set(mdir, 2)
    seen: list[tuple[str, float]] = []
    Migrator(dsn, str(mdir)).migrate(on_done=lambda m, ms: seen.append((m.name, ms)))
    assert [name for name, _ in seen] == ["0001_table_1.sql", "0002_table_2.sql"]
    assert all(ms >= 0 for _, ms in seen)


def test_migrate_up_to_a_target(dsn: str, admin: Conn, mdir: Path) -> None:
    """migrate(target=2) applies versions 1 and 2 only; a later migrate() applies the rest."""
    simple_set(mdir, 4)
    migrator = Migrator(dsn, str(mdir))
    assert [m.version for m in migrator.migrate(target=2)] == [1, 2]
    assert history(admin) == applied(1, 2)
    assert [m.version for m in migrator.migrate()] == [3, 4]


def test_dry_run_applies_nothing_and_creates_no_history(dsn: str, admin: Conn, mdir: Path) -> None:
    """migrate(dry_run=True) returns the pending list without creating any table."""
    simple_set(mdir, 3)
    migrator = Migrator(dsn, str(mdir))
    assert [m.version for m in migrator.migrate(dry_run=True)] == [1, 2, 3]
    assert [m.version for m in migrator.migrate(target=2, dry_run=True)] == [1, 2]
    assert history(admin) is None
    assert not relation_exists(admin, "t1")


def test_migrator_over_a_pool_returns_its_connection(dsn: str, admin: Conn, mdir: Path) -> None:
    """Over a one-connection Pool every Migrator call gives the connection back, clean and unlocked."""
    simple_set(mdir, 2)
    with pgops.Pool(dsn, min_size=0, max_size=1, acquire_timeout=5.0) as pool:
        migrator = Migrator(pool, str(mdir))
        assert [m.version for m in migrator.migrate()] == [1, 2]
        assert migrator.migrate() == []  # would time out if the first call had kept the connection
        assert [r.state for r in migrator.status()] == ["applied", "applied"]
        assert migrator.validate() == []
        assert pool.stats()["pool_in_use"] == 0
        with pool.connection() as conn:
            assert not conn.autocommit
            assert scalar(conn, "SELECT count(*) FROM t1") == 0
    assert history(admin) == applied(1, 2)
    assert scalar(admin, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == 0


@pytest.mark.parametrize("marker", ["", "-- pgops: no-transaction\n"], ids=["transaction", "no-transaction"])
def test_tricky_sql_applies_statement_by_statement(dsn: str, admin: Conn, mdir: Path, marker: str) -> None:
    """The tricky migration applies cleanly in a transaction and in autocommit, with the same result."""
    if admin.server_version < 140000:
        pytest.skip("BEGIN ATOMIC needs PostgreSQL 14")
    write(mdir, "0001_tricky.sql", marker + TRICKY_SQL)
    assert [m.version for m in Migrator(dsn, str(mdir)).migrate()] == [1]
    assert history(admin) == applied(1)
    assert scalar(admin, "SELECT string_agg(note, '|' ORDER BY id) FROM \"semi;colon\"") == (
        "a;b|it's; escaped|it's; doubled|from do;"
    )
    assert scalar(admin, "SELECT add_one(1) + atomic_two()") == 4
    assert scalar(admin, "SELECT tagged()") == "x;$$;y"


@pytest.mark.parametrize("marker", ["", "-- pgops: no-transaction\n"], ids=["transaction", "no-transaction"])
def test_rule_with_several_actions_in_parentheses(dsn: str, admin: Conn, mdir: Path, marker: str) -> None:
    """A CREATE RULE whose parenthesised actions hold semicolons is sent as one statement, as psql does."""
    write(
        mdir,
        "0001_rule.sql",
        marker + "CREATE TABLE a (id int);\nCREATE TABLE b (id int);\n"
        "CREATE RULE a_copy AS ON INSERT TO a DO ALSO (\n"
        "    INSERT INTO b VALUES (new.id);\n    INSERT INTO b VALUES (new.id * 10);\n);\n",
    )
    Migrator(dsn, str(mdir)).migrate()
    admin.cursor().execute("INSERT INTO a VALUES (4)")
    assert scalar(admin, "SELECT array_agg(id ORDER BY id) FROM b") == [4, 40]


def test_create_index_concurrently_in_a_no_transaction_file(dsn: str, admin: Conn, mdir: Path) -> None:
    """CREATE INDEX CONCURRENTLY works in a no-transaction file and leaves a valid index."""
    write(
        mdir,
        "0001_items.sql",
        "CREATE TABLE items (id int, name text);\nINSERT INTO items VALUES (1, 'a');\n",
    )
    write(
        mdir,
        "0002_items_index.sql",
        "-- builds without blocking writes\n-- pgops: no-transaction\n"
        "CREATE INDEX CONCURRENTLY items_name ON items (name);\n"
        "CREATE UNIQUE INDEX CONCURRENTLY items_id ON items (id);\n",
    )
    Migrator(dsn, str(mdir)).migrate()
    assert history(admin) == applied(1, 2)
    valid = scalar(admin, "SELECT array_agg(indisvalid) FROM pg_index WHERE indrelid = 'items'::regclass")
    assert valid == [True, True]


def test_create_index_concurrently_in_a_transactional_file_fails_cleanly(
    dsn: str, admin: Conn, mdir: Path
) -> None:
    """Without the marker, CREATE INDEX CONCURRENTLY fails with 25001 and its file leaves nothing."""
    write(
        mdir, "0001_items.sql", "CREATE TABLE items (id int);\nCREATE INDEX CONCURRENTLY i ON items (id);\n"
    )
    with pytest.raises(MigrationFailed) as info:
        Migrator(dsn, str(mdir)).migrate()
    assert info.value.sqlstate == "25001"
    assert info.value.line == 2
    assert not relation_exists(admin, "items")
    assert history(admin) == []


# -- failures ------------------------------------------------------------------------------------


def test_failing_migration_leaves_nothing_and_reports_its_position(dsn: str, admin: Conn, mdir: Path) -> None:
    """A failure on line 3 reports path:3:col with SQLSTATE and rolls back the whole file."""
    write(mdir, "0001_ok.sql", "CREATE TABLE ok (id int);\n")
    path = write(
        mdir,
        "0002_broken.sql",
        "CREATE TABLE first_t (id int);\nINSERT INTO first_t VALUES (1);\nSELECT * FROM no_such_table;\n",
    )
    write(mdir, "0003_later.sql", "CREATE TABLE later (id int);\n")
    migrator = Migrator(dsn, str(mdir))
    with pytest.raises(MigrationFailed) as info:
        migrator.migrate()
    failure = info.value
    assert str(failure).startswith(f"{path}:3:15: 42P01 ")
    assert "no_such_table" in str(failure)
    assert (failure.version, failure.path, failure.line, failure.column, failure.sqlstate) == (
        2,
        str(path),
        3,
        15,
        "42P01",
    )
    assert not relation_exists(admin, "first_t")
    assert not relation_exists(admin, "later")
    assert history(admin) == applied(1)  # the earlier migration stays; nothing of 0002 or after
    assert [r.state for r in migrator.status()] == ["applied", "pending", "pending"]


@pytest.mark.parametrize(
    ("text", "line", "column"),
    [
        ("SELECT 1;\nSELECT 1/0;\n", 2, 1),
        ("SELECT 1;\n       SELECT 1/0;\n", 2, 8),
        ("SELECT 1; -- comment\n/* note */ SELECT 1/0;\n", 2, 12),
        ("SELECT 1;\n\n-- why\n\nSELECT\n  1/0;\n", 5, 1),
    ],
)
@pytest.mark.parametrize("marker", ["", "-- pgops: no-transaction\n"], ids=["transaction", "no-transaction"])
def test_runtime_error_reports_the_line_of_its_statement(
    dsn: str, mdir: Path, text: str, line: int, column: int, marker: str
) -> None:
    """An error without a server position (division by zero) points at the start of its statement."""
    path = write(mdir, "0001_divide.sql", marker + text)
    line += marker.count("\n")
    with pytest.raises(MigrationFailed) as info:
        Migrator(dsn, str(mdir)).migrate()
    assert (info.value.line, info.value.column, info.value.sqlstate) == (line, column, "22012")
    assert str(info.value).startswith(f"{path}:{line}:{column}: 22012 division by zero")


def test_failure_message_carries_detail_and_hint(dsn: str, mdir: Path) -> None:
    """The detail and hint of the server's error are part of the message."""
    write(
        mdir,
        "0001_dup.sql",
        "CREATE TABLE u (id int PRIMARY KEY);\nINSERT INTO u VALUES (1);\nINSERT INTO u VALUES (1);\n",
    )
    with pytest.raises(MigrationFailed, match=r":3:1: 23505 .*\(detail: Key \(id\)=\(1\) already exists\.\)"):
        Migrator(dsn, str(mdir)).migrate()
    write(mdir, "0001_dup.sql", "SELECT nosuchfunction(1);\n")
    with pytest.raises(MigrationFailed, match=r":1:8: 42883 .*\(hint: "):
        Migrator(dsn, str(mdir)).migrate()


def test_failed_no_transaction_file_makes_the_database_dirty_until_repair(
    dsn: str, admin: Conn, mdir: Path
) -> None:
    """A failing no-transaction file leaves a failed row; migrate refuses until repair; then it applies."""
    path = write(
        mdir,
        "0001_concurrent.sql",
        "-- pgops: no-transaction\nCREATE TABLE IF NOT EXISTS nt (id int);\nSELECT 1/0;\n",
    )
    migrator = Migrator(dsn, str(mdir))
    with pytest.raises(MigrationFailed, match=rf"^{path}:3:1: 22012"):
        migrator.migrate()
    assert history(admin) == [(1, "failed")]
    assert scalar(admin, "SELECT progress FROM migration_history") == 1
    (row,) = migrator.status()
    assert row.state == "failed" and row.error is not None and f"{path}:3:1" in row.error
    assert any("failed" in problem for problem in migrator.validate())
    with pytest.raises(DirtyDatabase, match="repair"):
        migrator.migrate()
    write(mdir, "0001_concurrent.sql", "-- pgops: no-transaction\nCREATE TABLE IF NOT EXISTS nt (id int);\n")
    with pytest.raises(DirtyDatabase):
        migrator.migrate()  # fixing the file is not enough: repair says the partial work was dealt with
    assert migrator.repair() == ["removed the failed row of migration 1 (concurrent)"]
    assert [m.version for m in migrator.migrate()] == [1]
    assert history(admin) == applied(1)
    assert migrator.repair() == []


def test_a_running_row_is_called_cut_off_only_when_its_lease_was_read(
    dsn: str, admin: Conn, mdir: Path
) -> None:
    """validate() reads no lease (it takes no lock): it does not claim one ran out; migrate does."""
    write(mdir, "0001_concurrent.sql", "-- pgops: no-transaction\nCREATE TABLE IF NOT EXISTS nt (id int);\n")
    migrator = Migrator(dsn, str(mdir))
    migrator.migrate()
    admin.cursor().execute("UPDATE migration_history SET status = 'running', lease_until = NULL")
    (problem,) = migrator.validate()
    assert "marked running" in problem and "its lease was not read" in problem
    assert "lease has run out" not in problem
    with pytest.raises(DirtyDatabase, match=r"marked running .* and its lease has run out"):
        migrator.migrate()
    admin.cursor().execute("UPDATE migration_history SET status = 'failed', error = E'first\\nsecond'")
    (problem,) = migrator.validate()
    assert "is failed in public.migration_history: first second;" in problem  # one line, as all problems


def retried_behind(
    run: Callable[[], list[pgops.Migration]],
    blocker: Conn,
    caplog: pytest.LogCaptureFixture,
    while_blocked: Callable[[], None],
) -> list[pgops.Migration]:
    """Run *run* while *blocker* holds a lock it needs: once a 55P03 retry is logged, check
    *while_blocked* (what the failed attempt left), release the lock and return what *run* returned."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(run)
        wait_until(
            lambda: future.done() or any("55P03" in r.getMessage() for r in caplog.records),
            timeout=30,
            message="no lock_timeout retry was logged",
        )
        assert not future.done()
        while_blocked()
        blocker.rollback()
        result: list[pgops.Migration] = future.result(timeout=60)
        return result


def test_statement_lock_timeout_is_retried_until_the_table_is_free(
    dsn: str, admin: Conn, mdir: Path, busy_table: Conn, caplog: pytest.LogCaptureFixture
) -> None:
    """DDL waiting behind a lock times out (55P03), rolls back, and is retried until the lock is gone."""
    caplog.set_level(logging.WARNING, logger="pgops")
    write(
        mdir, "0001_alter_busy.sql", "CREATE TABLE side (id int);\nALTER TABLE busy ADD COLUMN note text;\n"
    )
    migrator = Migrator(dsn, str(mdir), statement_lock_timeout=0.2)

    def rolled_back() -> None:
        assert not relation_exists(admin, "side")  # the failed attempt was rolled back

    assert [m.version for m in retried_behind(migrator.migrate, busy_table, caplog, rolled_back)] == [1]
    assert scalar(admin, "SELECT count(*) FROM information_schema.columns WHERE table_name = 'busy'") == 2
    assert history(admin) == applied(1)


def test_rollback_retries_a_down_file_that_hit_the_statement_lock_timeout(
    dsn: str, admin: Conn, mdir: Path, busy_table: Conn, caplog: pytest.LogCaptureFixture
) -> None:
    """A down file waiting behind a lock times out (55P03), rolls back, and is retried as migrate's are."""
    caplog.set_level(logging.WARNING, logger="pgops")
    write(mdir, "0001_side.sql", "CREATE TABLE side (id int);\n")
    write(mdir, "0001_side.down.sql", "DROP TABLE side;\nALTER TABLE busy ADD COLUMN note text;\n")
    migrator = Migrator(dsn, str(mdir), statement_lock_timeout=0.2)
    migrator.migrate()  # busy's lock does not stand in its way

    def rolled_back() -> None:
        assert relation_exists(admin, "side")  # the failed attempt was rolled back

    assert [m.version for m in retried_behind(migrator.rollback, busy_table, caplog, rolled_back)] == [1]
    assert not relation_exists(admin, "side")
    assert scalar(admin, "SELECT count(*) FROM information_schema.columns WHERE table_name = 'busy'") == 2
    assert history(admin) == []


@pytest.fixture
def busy_table(dsn: str, admin: Conn) -> Iterator[Conn]:
    """Table busy, share-locked by an open transaction until the test rolls it back."""
    with locked_table(dsn, admin, "busy", "ACCESS SHARE") as blocker:
        yield blocker


def test_blocked_no_transaction_statement_is_retried_alone(
    dsn: str, admin: Conn, mdir: Path, busy_table: Conn, caplog: pytest.LogCaptureFixture
) -> None:
    """In a no-transaction file only the statement that hit lock_timeout is retried, not the whole file."""
    caplog.set_level(logging.WARNING, logger="pgops")
    write(
        mdir,
        "0001_alter_busy.sql",
        "-- pgops: no-transaction\nCREATE TABLE side (id int);\nALTER TABLE busy ADD COLUMN note text;\n",
    )
    # statement_lock_timeout applies to no-transaction files too (a session SET around them).
    migrator = Migrator(dsn, str(mdir), statement_lock_timeout=0.2)

    def running() -> None:
        assert history(admin) == [(1, "running")]

    applied_now = retried_behind(migrator.migrate, busy_table, caplog, running)
    assert [m.version for m in applied_now] == [1]  # CREATE TABLE side ran once
    assert history(admin) == applied(1)
    assert relation_exists(admin, "side")


def test_no_transaction_file_still_blocked_after_retries_is_marked_failed(
    dsn: str, admin: Conn, mdir: Path, busy_table: Conn
) -> None:
    """When the lock never comes, the no-transaction file fails with 55P03 at its line and a failed row."""
    path = write(
        mdir, "0001_alter_busy.sql", "-- pgops: no-transaction\nALTER TABLE busy ADD COLUMN note text;\n"
    )
    migrator = Migrator(dsn, str(mdir), statement_lock_timeout=0.2)
    pgops.set_testing(True)  # no sleeps between the attempts
    try:
        with pytest.raises(MigrationFailed) as info:
            migrator.migrate()
    finally:
        pgops.set_testing(False)
    assert info.value.sqlstate == "55P03"
    assert str(info.value).startswith(f"{path}:2:1: 55P03 ")
    assert history(admin) == [(1, "failed")]
    with pytest.raises(DirtyDatabase):
        migrator.migrate()


# -- refusing before applying --------------------------------------------------------------------


def test_drift_and_missing_files_are_refused_before_anything_is_applied(
    dsn: str, admin: Conn, mdir: Path
) -> None:
    """A changed or deleted applied file shows in status and validate, and migrate refuses up front."""
    simple_set(mdir, 3)
    migrator = Migrator(dsn, str(mdir))
    migrator.migrate()
    changed = write(mdir, "0002_table_2.sql", "CREATE TABLE t2 (id bigint);\n")
    (mdir / "0003_table_3.sql").unlink()
    (mdir / "0003_table_3.down.sql").unlink()
    write(mdir, "0004_table_4.sql", "CREATE TABLE t4 (id int);\n")
    assert [(r.version, r.state) for r in migrator.status()] == [
        (1, "applied"),
        (2, "changed"),
        (3, "missing"),
        (4, "pending"),
    ]
    problems = migrator.validate()
    assert len(problems) == 2
    assert str(changed) in problems[0]
    assert "applied migration 3 (table_3) has no file" in problems[1]
    with pytest.raises(ChecksumMismatch) as info:
        migrator.migrate()
    assert str(changed) in str(info.value)
    assert not relation_exists(admin, "t4")
    assert history(admin) == applied(1, 2, 3)


@pytest.mark.parametrize("change", ["crlf", "bom", "both"])
def test_line_endings_and_bom_are_not_drift(dsn: str, mdir: Path, change: str) -> None:
    """Rewriting applied files with CRLF line ends or a BOM changes nothing for validate or migrate."""
    text = "-- comment\nCREATE TABLE a (id int);\nINSERT INTO a VALUES (1);\n"
    write(mdir, "0001_a.sql", text)
    migrator = Migrator(dsn, str(mdir))
    migrator.migrate()
    if change in ("crlf", "both"):
        text = text.replace("\n", "\r\n")
    if change in ("bom", "both"):
        text = "\ufeff" + text
    write(mdir, "0001_a.sql", text)
    assert migrator.validate() == []
    assert migrator.migrate() == []
    assert [r.state for r in migrator.status()] == ["applied"]


def test_repair_accepts_a_changed_checksum(dsn: str, mdir: Path) -> None:
    """After repair a deliberately edited applied file is no longer drift."""
    path = write(mdir, "0001_a.sql", "CREATE TABLE a (id int);\n")
    migrator = Migrator(dsn, str(mdir))
    migrator.migrate()
    write(mdir, "0001_a.sql", "CREATE TABLE a (id int); -- documented\n")
    assert migrator.validate() != []
    assert migrator.repair() == [f"accepted the changed checksum of {str(path)!r}"]
    assert migrator.validate() == []
    assert migrator.migrate() == []


def test_out_of_order_pending_version_is_refused_unless_allowed(dsn: str, admin: Conn, mdir: Path) -> None:
    """A pending version below the highest applied is refused, and applied with allow_out_of_order."""
    write(mdir, "0001_a.sql", "CREATE TABLE a (id int);\n")
    write(mdir, "0003_c.sql", "CREATE TABLE c (id int);\n")
    Migrator(dsn, str(mdir)).migrate()
    late = write(mdir, "0002_b.sql", "CREATE TABLE b (id int);\n")
    write(mdir, "0004_d.sql", "CREATE TABLE d (id int);\n")
    with pytest.raises(MigrationError, match="allow-out-of-order") as info:
        Migrator(dsn, str(mdir)).migrate()
    assert str(late) in str(info.value)
    assert any(str(late) in problem for problem in Migrator(dsn, str(mdir)).validate())
    assert history(admin) == applied(1, 3)
    assert [m.version for m in Migrator(dsn, str(mdir), allow_out_of_order=True).migrate()] == [2, 4]
    assert history(admin) == applied(1, 2, 3, 4)


# -- locking -------------------------------------------------------------------------------------


def test_lock_timeout_names_the_holder(dsn: str, admin: Conn, mdir: Path, holder: Conn) -> None:
    """While another session holds the lock, migrate gives up after lock_timeout naming its pid and app."""
    simple_set(mdir, 1)
    migrator = Migrator(dsn, str(mdir), lock_timeout=0.5)
    pid = hold_migration_lock(holder, migrator)
    with pytest.raises(LockTimeout) as info:
        migrator.migrate()
    assert f"pid {pid} " in str(info.value)
    assert "'holder-app'" in str(info.value)
    assert history(admin) is None
    with pytest.raises(LockTimeout):
        migrator.rollback(0)
    with pytest.raises(LockTimeout):
        migrator.repair()


def test_migrate_waits_for_the_lock_and_then_applies(dsn: str, admin: Conn, mdir: Path, holder: Conn) -> None:
    """A runner waiting for the lock proceeds as soon as the holder releases it."""
    simple_set(mdir, 2)
    migrator = Migrator(dsn, str(mdir), lock_timeout=60)
    hold_migration_lock(holder, migrator)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(migrator.migrate)
        wait_until(
            lambda: scalar(
                admin,
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgops-migrate' "
                "AND datname = current_database()",
            ),
            timeout=30,
            message="the migrator never connected",
        )
        assert not future.done()
        assert history(admin) is None
        assert scalar(holder, "SELECT pg_advisory_unlock(%s, %s)", (pgops._LOCK_CLASS, migrator._lock_key))
        assert [m.version for m in future.result(timeout=60)] == [1, 2]
    assert history(admin) == applied(1, 2)


def test_concurrent_migrators_in_threads_apply_each_migration_once(dsn: str, admin: Conn, mdir: Path) -> None:
    """Four Migrators racing in threads apply each of ten migrations exactly once between them."""
    write(
        mdir, "0001_log.sql", "CREATE TABLE once (version int PRIMARY KEY);\nINSERT INTO once VALUES (1);\n"
    )
    for v in range(2, 11):
        write(mdir, f"{v:04d}_m{v}.sql", f"INSERT INTO once VALUES ({v});\n")
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(Migrator(dsn, str(mdir), lock_timeout=60).migrate) for _ in range(4)]
        results = [f.result(timeout=120) for f in futures]
    assert sorted(m.version for result in results for m in result) == list(range(1, 11))
    assert history(admin) == applied(*range(1, 11))
    assert scalar(admin, "SELECT count(*) FROM once") == 10


def test_schema_and_table_options_keep_history_there(dsn: str, admin: Conn, mdir: Path, holder: Conn) -> None:
    """With schema='ops', table='history' the history lives in ops.history and has its own lock."""
    simple_set(mdir, 2)
    migrator = Migrator(dsn, str(mdir), schema="ops", table="history")
    default = Migrator(dsn, str(mdir), lock_timeout=0.2)
    assert migrator._lock_key != default._lock_key
    hold_migration_lock(holder, default)  # another history table's lock does not block this one
    assert [m.version for m in migrator.migrate()] == [1, 2]
    assert history(admin, "ops", "history") == applied(1, 2)
    assert history(admin) is None
    assert [r.state for r in migrator.status()] == ["applied", "applied"]
    assert [r.state for r in Migrator(dsn, str(mdir)).status()] == ["pending", "pending"]
    assert [m.version for m in migrator.rollback(1)] == [2]
    assert history(admin, "ops", "history") == applied(1)


def test_odd_schema_and_table_names_are_quoted(dsn: str, admin: Conn, mdir: Path) -> None:
    """History names needing quotes (case, spaces, a double quote) work because they are quoted."""
    simple_set(mdir, 2)
    migrator = Migrator(dsn, str(mdir), schema="Ops Schema", table='Migration "History"')
    assert [m.version for m in migrator.migrate(target=1)] == [1]
    assert [r.state for r in migrator.status()] == ["applied", "pending"]
    assert [m.version for m in migrator.migrate()] == [2]  # the history was found again, not re-created
    assert [m.version for m in migrator.rollback(1)] == [2]
    with admin.cursor() as cur:
        cur.execute('SELECT version FROM "Ops Schema"."Migration ""History"""')
        assert cur.fetchall() == [(1,)]


# -- rollback ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("target", "left"), [(0, []), (1, [1]), (2, [1, 2]), (3, [1, 2, 3])])
def test_rollback_runs_down_files_newest_first(
    dsn: str, admin: Conn, mdir: Path, target: int, left: list[int]
) -> None:
    """rollback(target) runs the .down.sql of every version above target, newest first."""
    admin.cursor().execute("CREATE TABLE down_log (seq serial, version int)")
    for v in (1, 2, 3):
        write(mdir, f"{v:04d}_t{v}.sql", f"CREATE TABLE t{v} (id int);\n")
        marker = "-- pgops: no-transaction\n" if v == 2 else ""
        write(
            mdir,
            f"{v:04d}_t{v}.down.sql",
            f"{marker}DROP TABLE t{v};\nINSERT INTO down_log (version) VALUES ({v});\n",
        )
    migrator = Migrator(dsn, str(mdir))
    migrator.migrate()
    reverted = migrator.rollback(target)
    expected = [v for v in (3, 2, 1) if v > target]
    assert [m.version for m in reverted] == expected
    with admin.cursor() as cur:
        cur.execute("SELECT version FROM down_log ORDER BY seq")
        assert [v for (v,) in cur.fetchall()] == expected
    assert history(admin) == applied(*left)
    assert [v for v in (1, 2, 3) if relation_exists(admin, f"t{v}")] == left
    assert [m.version for m in migrator.migrate()] == expected[::-1]  # and they can be applied again


def test_rollback_without_a_down_file_is_refused_before_doing_anything(
    dsn: str, admin: Conn, mdir: Path
) -> None:
    """If any migration to revert lacks a .down.sql, rollback changes nothing and names that file."""
    simple_set(mdir, 3)
    (mdir / "0002_table_2.down.sql").unlink()
    migrator = Migrator(dsn, str(mdir))
    migrator.migrate()
    with pytest.raises(BadMigration) as info:
        migrator.rollback(0)
    assert str(mdir / "0002_table_2.sql") in str(info.value)
    assert history(admin) == applied(1, 2, 3)
    assert relation_exists(admin, "t3")
    assert [m.version for m in migrator.rollback(2)] == [3]


def test_failing_down_file_leaves_that_version_applied(dsn: str, admin: Conn, mdir: Path) -> None:
    """A down file that fails is rolled back with its history change and reported with its own path."""
    simple_set(mdir, 2)
    down = write(mdir, "0001_table_1.down.sql", "DROP TABLE t1;\nDROP TABLE no_such_table;\n")
    migrator = Migrator(dsn, str(mdir))
    migrator.migrate()
    with pytest.raises(MigrationFailed, match=rf"^{down}:2:"):
        migrator.rollback(0)
    assert history(admin) == applied(1)
    assert relation_exists(admin, "t1") and not relation_exists(admin, "t2")


# -- odds and ends -------------------------------------------------------------------------------


def test_repr_and_errors_never_show_the_password(pg_server: PgServer, dbname: str, mdir: Path) -> None:
    """The Migrator's repr and a connection error show the DSN with its password redacted."""
    secret = "Distinct-Secret-8812"
    port = free_port()
    url = f"postgresql://someone:{secret}@127.0.0.1:{port}/{dbname}"
    simple_set(mdir, 1)
    migrator = Migrator(url, str(mdir))
    assert secret not in repr(migrator)
    with pytest.raises(pgops.CannotConnect) as info:
        migrator.migrate()
    assert secret not in str(info.value)
    assert "***" in str(info.value)
    if pg_server.password:
        real = Migrator(pg_server.dsn(dbname), str(mdir))
        assert pg_server.password not in repr(real)


@pytest.mark.parametrize(
    "kwargs", [{"lock_timeout": -1}, {"statement_lock_timeout": 0}, {"lock_timeout": float("nan")}]
)
def test_bad_options_raise_config_error(dsn: str, mdir: Path, kwargs: dict[str, Any]) -> None:
    """Negative or non-finite timeouts are rejected when the Migrator is built."""
    with pytest.raises(pgops.ConfigError):
        Migrator(dsn, str(mdir), **kwargs)


def test_missing_directory_is_a_config_error(dsn: str, tmp_path: Path) -> None:
    """A migrations directory that does not exist raises ConfigError naming it."""
    with pytest.raises(pgops.ConfigError, match="nowhere"):
        Migrator(dsn, str(tmp_path / "nowhere")).migrate()


def test_status_before_any_migration_creates_nothing(dsn: str, admin: Conn, mdir: Path) -> None:
    """status(), pending() and validate() on a fresh database report pending files and create no table."""
    simple_set(mdir, 2)
    migrator = Migrator(dsn, str(mdir))
    assert [(r.version, r.description, r.state) for r in migrator.status()] == [
        (1, "table_1", "pending"),
        (2, "table_2", "pending"),
    ]
    assert migrator.validate() == []
    assert history(admin) is None


def test_newer_applied_migrations_are_future_not_drift(dsn: str, admin: Conn, tmp_path: Path) -> None:
    """An older release (fewer files) runs fine past versions a newer release applied, and says so."""
    newer, older = tmp_path / "newer", tmp_path / "older"
    newer.mkdir()
    older.mkdir()
    simple_set(newer, 3)
    simple_set(older, 2)
    Migrator(dsn, str(newer)).migrate()
    old = Migrator(dsn, str(older))
    assert old.migrate() == []
    assert old.validate() == []
    states = [(row.version, row.state) for row in old.status()]
    assert states == [(1, "applied"), (2, "applied"), (3, "future")]
    with pytest.raises(pgops.BadMigration, match="3 are applied but have no file"):
        old.rollback(1)
    assert history(admin) == applied(1, 2, 3)


def test_missing_file_below_the_newest_is_still_refused(dsn: str, tmp_path: Path) -> None:
    """An applied version whose file vanished from the middle of the folder is drift."""
    simple_set(tmp_path, 3)
    Migrator(dsn, str(tmp_path)).migrate()
    (tmp_path / "0002_table_2.sql").unlink()
    (tmp_path / "0002_table_2.down.sql").unlink()
    with pytest.raises(pgops.ChecksumMismatch, match="applied migration 2"):
        Migrator(dsn, str(tmp_path)).migrate()


def test_failed_no_transaction_down_file_marks_the_migration_failed(
    dsn: str, admin: Conn, mdir: Path
) -> None:
    """A down file that fails half-way leaves a 'failed' row, so nobody mistakes it for applied."""
    write(mdir, "0001_two.sql", "CREATE TABLE a1 (id int);\nCREATE TABLE a2 (id int);\n")
    down = "-- pgops: no-transaction\nDROP TABLE a1;\nSELECT 1/0;\nDROP TABLE a2;\n"
    write(mdir, "0001_two.down.sql", down)
    migrator = Migrator(dsn, str(mdir))
    migrator.migrate()
    with pytest.raises(MigrationFailed, match=r"0001_two\.down\.sql:3:"):
        migrator.rollback(0)
    assert history(admin) == [(1, "failed")]
    assert "rollback failed" in scalar(admin, "SELECT error FROM migration_history WHERE version = 1")
    assert migrator.validate() != []
    with pytest.raises(DirtyDatabase):
        migrator.migrate()
