"""Tests of ``python -m pgops``, each command run as a real subprocess against a real PostgreSQL."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import psycopg2
import psycopg2.extensions
import psycopg2.sql
import pytest

import pgops
from pgtest import (
    CLI_TIMEOUT,
    FAKE_PASSWORD,
    PgServer,
    applied,
    check_output,
    free_port,
    history,
    relation_exists,
    run_pgops,
    scalar,
    secrets_of,
    simple_set,
    spawn_pgops,
    wait_until,
    write,
)

Conn = psycopg2.extensions.connection
Run = Callable[..., subprocess.CompletedProcess[str]]

APPLIED_LINE = re.compile(r"^applied (\d+_[A-Za-z0-9_-]+\.sql) \((\d+\.\d) ms\)$", re.MULTILINE)


# -- migrate -------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["key=value", "url"])
def test_migrate_prints_one_line_per_migration_and_a_summary(
    pg_server: PgServer, dsn: str, db_url: str, admin: Conn, mdir: Path, form: str
) -> None:
    """migrate applies every file, printing each with its time in ms and a final summary; rerun is a no-op."""
    simple_set(mdir, 3)
    url = dsn if form == "key=value" else db_url
    first = run_pgops("migrate", "--dir", str(mdir), database_url=url, secrets=secrets_of(pg_server))
    assert first.returncode == 0, first.stderr
    assert [name for name, _ in APPLIED_LINE.findall(first.stdout)] == [
        "0001_table_1.sql",
        "0002_table_2.sql",
        "0003_table_3.sql",
    ]
    assert re.search(r"^applied 3 migration\(s\) in \d+ ms; now at version 3$", first.stdout, re.MULTILINE)
    assert history(admin) == applied(1, 2, 3)
    again = run_pgops("migrate", "--dir", str(mdir), database_url=url, secrets=secrets_of(pg_server))
    assert again.returncode == 0, again.stderr
    assert APPLIED_LINE.findall(again.stdout) == []
    assert "applied 0 migration(s)" in again.stdout and "already up to date" in again.stdout
    assert history(admin) == applied(1, 2, 3)


def test_dsn_option_and_migrations_dir_variable(
    pg_server: PgServer, dsn: str, admin: Conn, mdir: Path, tmp_path: Path
) -> None:
    """--dsn replaces DATABASE_URL and PGOPS_MIGRATIONS_DIR replaces --dir."""
    simple_set(mdir, 1)
    proc = run_pgops(
        "migrate",
        "--dsn",
        dsn,
        env={"PGOPS_MIGRATIONS_DIR": str(mdir)},
        cwd=tmp_path,
        secrets=secrets_of(pg_server),
    )
    assert proc.returncode == 0, proc.stderr
    assert history(admin) == applied(1)


def test_default_directory_is_migrations_in_the_working_directory(
    pg_server: PgServer, dsn: str, admin: Conn, mdir: Path
) -> None:
    """Without --dir or PGOPS_MIGRATIONS_DIR, ./migrations is used."""
    simple_set(mdir, 2)
    proc = run_pgops("migrate", database_url=dsn, cwd=mdir.parent, secrets=secrets_of(pg_server))
    assert proc.returncode == 0, proc.stderr
    assert history(admin) == applied(1, 2)


def test_eight_concurrent_processes_apply_each_migration_exactly_once(
    pg_server: PgServer, dbname: str, dsn: str, admin: Conn, mdir: Path, tmp_path: Path
) -> None:
    """Eight `migrate` processes racing over 40 migrations apply each exactly once, and all exit 0."""
    write(
        mdir,
        "0001_ledger.sql",
        "CREATE TABLE ledger (version int PRIMARY KEY);\nCREATE TABLE t1 (id int);\n"
        "INSERT INTO ledger VALUES (1);\n",
    )
    for v in range(2, 41):  # a second apply would fail twice over: table exists, duplicate key
        write(
            mdir, f"{v:04d}_step_{v}.sql", f"CREATE TABLE t{v} (id int);\nINSERT INTO ledger VALUES ({v});\n"
        )
    # A starting gate: hold the lock until all eight runners are polling for it, then let them race.
    key = pgops.Migrator(dsn, str(mdir))._lock_key
    gate = psycopg2.connect(pg_server.dsn(dbname, application_name="starting-gate"))
    gate.autocommit = True
    gate.cursor().execute("SELECT pg_advisory_lock(%s, %s)", (pgops._LOCK_CLASS, key))
    command = ("migrate", "--dir", str(mdir), "--lock-timeout", "120")
    procs = [spawn_pgops(*command, database_url=dsn, cwd=tmp_path) for _ in range(8)]
    results = []
    try:

        def waiting_runners() -> int:
            """Count runners idle after giving up a try for the lock: each has found it taken."""
            return int(
                scalar(
                    admin,
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgops-migrate' "
                    "AND datname = current_database() AND state = 'idle' AND query = 'ROLLBACK'",
                )
            )

        wait_until(
            lambda: waiting_runners() == 8 or any(p.poll() is not None for p in procs),
            timeout=CLI_TIMEOUT,
            message="the eight runners never all waited for the lock",
        )
        assert scalar(gate, "SELECT pg_advisory_unlock(%s, %s)", (pgops._LOCK_CLASS, key)) is True
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=CLI_TIMEOUT * 2)
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    finally:
        gate.close()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for result in results:
        assert result.returncode == 0, result.stderr
        check_output(result, secrets_of(pg_server))
        assert result.stderr == ""  # waiting for the others is normal: logged at INFO, not shown
    names = [name for result in results for name, _ in APPLIED_LINE.findall(result.stdout)]
    assert sorted(names) == sorted(p.name for p in mdir.iterdir())
    assert len(names) == 40
    assert history(admin) == applied(*range(1, 41))
    assert scalar(admin, "SELECT count(*) FROM ledger") == 40
    assert scalar(admin, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == 0


def test_dollar_quotes_and_semicolons_in_strings(cli: Run, admin: Conn, mdir: Path) -> None:
    """Function bodies in dollar quotes, E'' strings, quoted identifiers and comments survive the CLI."""
    write(
        mdir,
        "0001_functions.sql",
        "-- setup; with a semicolon in a comment\n"
        'CREATE TABLE "odd;name" (note text);\n'
        "INSERT INTO \"odd;name\" VALUES ('a;b'), (E'c\\';d'), ('e''f;g');\n"
        "CREATE FUNCTION shout(t text) RETURNS text AS $body$\n"
        "BEGIN\n"
        "    RETURN upper(t) || ';'; /* ; */\n"
        "END;\n"
        "$body$ LANGUAGE plpgsql;\n"
        "CREATE FUNCTION plain() RETURNS text LANGUAGE sql AS $$ SELECT 'x;y' $$;\n",
    )
    write(
        mdir,
        "0002_atomic.sql",
        "CREATE FUNCTION twice(x int) RETURNS int LANGUAGE sql\nBEGIN ATOMIC\n  SELECT x * 2;\nEND;\n",
    )
    proc = cli("migrate")
    assert proc.returncode == 0, proc.stderr
    assert scalar(admin, "SELECT string_agg(note, '|' ORDER BY note) FROM \"odd;name\"") == "a;b|c';d|e'f;g"
    assert scalar(admin, "SELECT shout('hi') || plain() || twice(21)") == "HI;x;y42"


def test_create_index_concurrently_in_a_no_transaction_file(cli: Run, admin: Conn, mdir: Path) -> None:
    """A `-- pgops: no-transaction` file can run CREATE INDEX CONCURRENTLY; the index is valid."""
    write(mdir, "0001_items.sql", "CREATE TABLE items (id int, name text);\n")
    write(
        mdir,
        "0002_items_name.sql",
        "-- pgops: no-transaction\nCREATE INDEX CONCURRENTLY items_name ON items (name);\n",
    )
    proc = cli("migrate")
    assert proc.returncode == 0, proc.stderr
    assert scalar(admin, "SELECT indisvalid FROM pg_index WHERE indexrelid = 'items_name'::regclass") is True
    assert history(admin) == applied(1, 2)


def test_failure_on_line_3_exits_1_and_leaves_nothing(cli: Run, admin: Conn, mdir: Path) -> None:
    """A migration failing on line 3 exits 1 with path:3:col on stderr, and nothing of it remains."""
    write(mdir, "0001_fine.sql", "CREATE TABLE fine (id int);\n")
    path = write(
        mdir,
        "0002_broken.sql",
        "CREATE TABLE made_on_line_1 (id int);\nINSERT INTO made_on_line_1 VALUES (1);\n"
        "INSERT INTO made_on_line_1 VALUES ('not a number');\n",
    )
    proc = cli("migrate")
    assert proc.returncode == 1
    assert f"{path}:3:36: 22P02 invalid input syntax for type integer" in proc.stderr
    assert "applied 0001_fine.sql" in proc.stdout
    assert not relation_exists(admin, "made_on_line_1")
    assert history(admin) == applied(1)
    status = json.loads(cli("status", "--json").stdout)
    assert [(row["version"], row["state"]) for row in status] == [(1, "applied"), (2, "pending")]


def test_failed_no_transaction_file_exits_5_until_repair(cli: Run, admin: Conn, mdir: Path) -> None:
    """A failed no-transaction file exits 1, then migrate exits 5 until repair; the fixed file applies."""
    path = write(
        mdir,
        "0001_index.sql",
        "-- pgops: no-transaction\nCREATE TABLE IF NOT EXISTS nt (id int);\nSELECT 1/0;\n",
    )
    failed = cli("migrate")
    assert failed.returncode == 1
    assert f"{path}:3:1: 22012 division by zero" in failed.stderr
    assert history(admin) == [(1, "failed")]
    for _ in range(2):
        dirty = cli("migrate")
        assert dirty.returncode == 5
        assert "repair" in dirty.stderr
    assert cli("validate").returncode == 4
    state = json.loads(cli("status", "--json").stdout)
    assert state[0]["state"] == "failed" and f"{path}:3:1" in state[0]["error"]
    write(
        mdir,
        "0001_index.sql",
        "-- pgops: no-transaction\nCREATE TABLE IF NOT EXISTS nt (id int);\n"
        "CREATE INDEX CONCURRENTLY nt_id ON nt (id);\n",
    )
    assert cli("migrate").returncode == 5  # fixing the file is not enough
    repaired = cli("repair")
    assert repaired.returncode == 0, repaired.stderr
    assert "removed the failed row of migration 1" in repaired.stdout
    fixed = cli("migrate")
    assert fixed.returncode == 0, fixed.stderr
    assert history(admin) == applied(1)
    assert relation_exists(admin, "nt_id")
    nothing = cli("repair")
    assert nothing.returncode == 0 and "repair: nothing to do" in nothing.stdout


# -- refusals ------------------------------------------------------------------------------------


def test_drift_makes_validate_exit_4_and_migrate_refuse(cli: Run, admin: Conn, mdir: Path) -> None:
    """Editing an applied file makes validate exit 4 and migrate refuse with 4, both naming the file."""
    simple_set(mdir, 2)
    assert cli("migrate").returncode == 0
    ok = cli("validate")
    assert ok.returncode == 0 and "migrations valid" in ok.stdout
    edited = write(mdir, "0001_table_1.sql", "CREATE TABLE t1 (id bigint);\n")
    write(mdir, "0003_table_3.sql", "CREATE TABLE t3 (id int);\n")
    invalid = cli("validate")
    assert invalid.returncode == 4
    assert str(edited) in invalid.stderr
    refused = cli("migrate")
    assert refused.returncode == 4
    assert str(edited) in refused.stderr
    assert not relation_exists(admin, "t3")
    assert history(admin) == applied(1, 2)
    status = cli("status")
    assert status.returncode == 0
    assert re.search(r"^1\s+table_1\s+changed\b", status.stdout, re.MULTILINE)


@pytest.mark.parametrize(
    ("count", "code", "message"),
    [
        (3, 4, "applied migration 2 (table_2) has no file"),
        (2, 0, "migration 2 (table_2) is applied but newer than every file here"),
    ],
    ids=["below-the-newest-file-is-refused", "newer-than-every-file-is-a-warning"],
)
def test_an_applied_file_that_is_gone(cli: Run, mdir: Path, count: int, code: int, message: str) -> None:
    """An applied migration whose file is gone below the newest file is lost: validate and migrate exit 4
    naming the version.  Above every file (a newer release's) it only warns, and both exit 0."""
    simple_set(mdir, count, down=False)
    assert cli("migrate").returncode == 0
    (mdir / "0002_table_2.sql").unlink()
    for command in ("validate", "migrate"):
        proc = cli(command)
        assert proc.returncode == code, proc.stderr
        assert message in proc.stderr


@pytest.mark.parametrize(
    "rewrite",
    [
        lambda t: t.replace("\n", "\r\n"),
        lambda t: "\ufeff" + t,
        lambda t: "\ufeff" + t.replace("\n", "\r\n"),
    ],
    ids=["crlf", "bom", "bom+crlf"],
)
def test_crlf_and_bom_changes_are_not_drift(cli: Run, mdir: Path, rewrite: Callable[[str], str]) -> None:
    """Only line endings or a BOM changed: validate exits 0 and migrate has nothing to do."""
    text = "-- a table\nCREATE TABLE a (id int);\nINSERT INTO a VALUES (1);\n"
    write(mdir, "0001_a.sql", text)
    assert cli("migrate").returncode == 0
    write(mdir, "0001_a.sql", rewrite(text))
    assert cli("validate").returncode == 0
    again = cli("migrate")
    assert again.returncode == 0 and "already up to date" in again.stdout


def test_lock_held_by_another_runner_exits_3_naming_it(
    cli: Run, pg_server: PgServer, dbname: str, admin: Conn, mdir: Path
) -> None:
    """With the lock held elsewhere, migrate --lock-timeout 1 exits 3 naming the holder's pid and app."""
    simple_set(mdir, 1)
    key = pgops.Migrator(pg_server.dsn(dbname), str(mdir))._lock_key
    holder = psycopg2.connect(pg_server.dsn(dbname, application_name="holder-app"))
    try:
        holder.autocommit = True
        pid = scalar(holder, "SELECT pg_backend_pid()")
        holder.cursor().execute("SELECT pg_advisory_lock(%s, %s)", (pgops._LOCK_CLASS, key))
        proc = cli("migrate", "--lock-timeout", "1")
        assert proc.returncode == 3
        assert f"pid {pid} " in proc.stderr
        assert "holder-app" in proc.stderr
        assert "--lock-timeout" in proc.stderr
        assert history(admin) is None
        for command in ("rollback", "repair"):
            extra = ["--to", "0", "--yes"] if command == "rollback" else []
            assert cli(command, *extra, "--lock-timeout", "0.5").returncode == 3
    finally:
        holder.close()
    assert cli("migrate", "--lock-timeout", "30").returncode == 0


def test_out_of_order_is_refused_unless_allowed(cli: Run, admin: Conn, mdir: Path) -> None:
    """A new version below the highest applied exits 4 naming it; --allow-out-of-order applies it."""
    write(mdir, "0001_a.sql", "CREATE TABLE a (id int);\n")
    write(mdir, "0003_c.sql", "CREATE TABLE c (id int);\n")
    assert cli("migrate").returncode == 0
    late = write(mdir, "0002_b.sql", "CREATE TABLE b (id int);\n")
    refused = cli("migrate")
    assert refused.returncode == 4
    assert str(late) in refused.stderr and "--allow-out-of-order" in refused.stderr
    assert cli("validate").returncode == 4
    assert history(admin) == applied(1, 3)
    allowed = cli("migrate", "--allow-out-of-order")
    assert allowed.returncode == 0, allowed.stderr
    assert "applied 0002_b.sql" in allowed.stdout
    assert history(admin) == applied(1, 2, 3)


@pytest.mark.parametrize(
    ("files", "named"),
    [
        ({"0001_a.sql": "SELECT 1;", "0001_b.sql": "SELECT 2;"}, ["0001_a.sql", "0001_b.sql"]),
        ({"0001_a.sql": "SELECT 1;", "001-init.sql": "SELECT 1;"}, ["001-init.sql"]),
        ({"init.sql": "SELECT 1;"}, ["init.sql"]),
        ({"0001_a.sql": ""}, ["0001_a.sql"]),
        ({"0001_a.sql": "SELECT 1;", "0002_b.sql": b"SELECT '\xe9t\xe9';"}, ["0002_b.sql"]),
    ],
    ids=["duplicate", "dashed-name", "no-number", "empty", "latin1"],
)
@pytest.mark.parametrize("command", ["migrate", "validate", "status"])
def test_bad_files_exit_4_naming_them(
    cli: Run, admin: Conn, mdir: Path, files: dict[str, str | bytes], named: list[str], command: str
) -> None:
    """Duplicate versions, bad names, empty and non-UTF-8 files stop migrate with exit 4, and validate
    too except for an empty file (a fresh template is pending, not bad); status shows them as problems
    with exit 0."""
    for name, text in files.items():
        write(mdir, name, text)
    proc = cli(command)
    empty = files.get(named[0]) == ""
    if command == "status" or (command == "validate" and empty):
        assert proc.returncode == 0, proc.stderr
        assert ("problem(s):" in proc.stdout) is not empty
        output = proc.stdout
    else:
        assert proc.returncode == 4
        output = proc.stderr
    if not (empty and command != "migrate"):
        for name in named:
            assert str(mdir / name) in output or repr(name) in output
    assert history(admin) is None


@pytest.mark.parametrize(("target", "left"), [(0, []), (1, [1])])
def test_rollback_runs_down_files_newest_first(
    cli: Run, admin: Conn, mdir: Path, target: int, left: list[int]
) -> None:
    """rollback --to V reverts every version above V, newest first, and removes their history rows."""
    simple_set(mdir, 3)
    assert cli("migrate").returncode == 0
    proc = cli("rollback", "--to", str(target), "--yes")
    assert proc.returncode == 0, proc.stderr
    reverted = re.findall(r"^reverted (\S+\.sql) \(\d+\.\d ms\)$", proc.stdout, re.MULTILINE)
    assert reverted == [f"{v:04d}_table_{v}.sql" for v in (3, 2, 1) if v > target]
    assert f"now at version {target}" in proc.stdout
    assert history(admin) == applied(*left)
    assert [v for v in (1, 2, 3) if relation_exists(admin, f"t{v}")] == left


def test_rollback_without_a_down_file_changes_nothing(cli: Run, admin: Conn, mdir: Path) -> None:
    """rollback exits 4 naming the migration without .down.sql, before reverting anything."""
    simple_set(mdir, 3)
    (mdir / "0002_table_2.down.sql").unlink()
    assert cli("migrate").returncode == 0
    proc = cli("rollback", "--to", "0", "--yes")
    assert proc.returncode == 4
    assert str(mdir / "0002_table_2.sql") in proc.stderr
    assert "reverted" not in proc.stdout
    assert history(admin) == applied(1, 2, 3)
    assert relation_exists(admin, "t3")


def test_dry_run_applies_nothing(cli: Run, admin: Conn, mdir: Path) -> None:
    """migrate --dry-run lists the pending files and creates nothing, not even the history table."""
    simple_set(mdir, 2)
    proc = cli("migrate", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert re.findall(r"^would apply (\S+)$", proc.stdout, re.MULTILINE) == [
        "0001_table_1.sql",
        "0002_table_2.sql",
    ]
    assert "nothing was changed" in proc.stdout
    assert history(admin) is None
    assert not relation_exists(admin, "t1")


def test_target_stops_at_a_version(cli: Run, admin: Conn, mdir: Path) -> None:
    """migrate --target 2 applies versions 1 and 2 only."""
    simple_set(mdir, 3)
    proc = cli("migrate", "--target", "2")
    assert proc.returncode == 0, proc.stderr
    assert "now at version 2" in proc.stdout
    assert history(admin) == applied(1, 2)


# -- status --------------------------------------------------------------------------------------


def test_status_table_and_json(cli: Run, mdir: Path) -> None:
    """status prints a table and --json prints a parseable list with one object per migration."""
    simple_set(mdir, 2)
    assert cli("migrate", "--target", "1").returncode == 0
    table = cli("status")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["version", "description", "state", "applied", "at", "ms"]
    assert re.match(r"^1\s+table_1\s+applied\s+\d{4}-\d\d-\d\dT\S+\s+\d+\.\d$", lines[1])
    assert re.match(r"^2\s+table_2\s+pending$", lines[2])
    assert lines[-1] == "1 applied or recorded, 1 pending"
    proc = cli("status", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [(r["version"], r["description"], r["state"]) for r in rows] == [
        (1, "table_1", "applied"),
        (2, "table_2", "pending"),
    ]
    assert isinstance(rows[0]["applied_at"], str) and rows[0]["execution_ms"] >= 0
    assert rows[0]["applied_by"]
    assert rows[1]["applied_at"] is None


# -- new -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("existing", "expected"),
    [
        ([], "0001_add_users.sql"),
        (["007_x.sql"], "008_add_users.sql"),
        (["0001_a.sql", "0002_b.sql", "0002_b.down.sql"], "0003_add_users.sql"),
        (["1_a.sql", "00009_b.sql"], "00010_add_users.sql"),
        (["99_a.sql"], "100_add_users.sql"),
    ],
)
def test_new_writes_the_next_number_padded_to_the_widest(
    mdir: Path, tmp_path: Path, existing: list[str], expected: str
) -> None:
    """`new NAME` creates the next version, zero-padded like the widest existing file, and its down file,
    and prints both paths."""
    for name in existing:
        write(mdir, name, "SELECT 1;\n")
    proc = run_pgops("new", "add_users", "--dir", str(mdir), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    down = expected.replace(".sql", ".down.sql")
    assert proc.stdout.splitlines() == [str(mdir / expected), str(mdir / down)]
    assert (mdir / expected).is_file()
    assert (mdir / down).is_file()
    assert pgops._parse_migration_name(expected)[1] == "add_users"


def test_new_creates_the_directory(tmp_path: Path) -> None:
    """`new` creates a missing migrations directory and needs no database."""
    target = tmp_path / "fresh" / "migrations"
    proc = run_pgops("new", "init", "--dir", str(target), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (target / "0001_init.sql").is_file()


@pytest.mark.parametrize("name", ["two words", "semi;colon", "a/b", "dot.name", ""])
def test_new_rejects_a_bad_name_with_exit_2(mdir: Path, tmp_path: Path, name: str) -> None:
    """`new` with a name that is not letters, digits, '_' or '-' exits 2 and writes nothing."""
    proc = run_pgops("new", name, "--dir", str(mdir), cwd=tmp_path)
    assert proc.returncode == 2
    assert "pgops: error:" in proc.stderr
    assert list(mdir.iterdir()) == []


# -- connection, configuration and secrets ---------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://pgops:{pw}@127.0.0.1:{port}/nowhere",
        "host=127.0.0.1 port={port} user=pgops password={pw} dbname=nowhere",
    ],
    ids=["url", "key=value"],
)
@pytest.mark.parametrize(
    "args",
    [["migrate"], ["migrate", "-v"], ["status", "--json"], ["validate"], ["rollback", "--to", "0", "--yes"]],
)
def test_unreachable_database_exits_6_without_the_password(
    mdir: Path, tmp_path: Path, url: str, args: list[str]
) -> None:
    """A closed port exits 6 with a one-line error that shows the DSN redacted, never its password."""
    simple_set(mdir, 1)
    database_url = url.format(pw=FAKE_PASSWORD, port=free_port())
    proc = run_pgops(
        *args[:1],
        "--dir",
        str(mdir),
        *args[1:],
        database_url=database_url,
        env={"DB_RETRY_MAX_ATTEMPTS": "1"},
        cwd=tmp_path,
    )
    assert proc.returncode == 6
    assert "cannot connect" in proc.stderr
    assert "***" in proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize(
    "command", [["migrate"], ["status"], ["validate"], ["rollback", "--to", "0", "--yes"], ["repair"]]
)
def test_missing_database_url_exits_2(mdir: Path, tmp_path: Path, command: list[str]) -> None:
    """Without DATABASE_URL or --dsn every database command exits 2 saying what to set."""
    simple_set(mdir, 1)
    proc = run_pgops(*command, "--dir", str(mdir), cwd=tmp_path)
    assert proc.returncode == 2
    assert "DATABASE_URL" in proc.stderr


def test_unparseable_dsn_exits_2_without_the_password(mdir: Path, tmp_path: Path) -> None:
    """A DATABASE_URL libpq cannot parse exits 2, and the password in it is not echoed."""
    simple_set(mdir, 1)
    proc = run_pgops(
        "migrate",
        "--dir",
        str(mdir),
        database_url=f"host=127.0.0.1 password={FAKE_PASSWORD} nonsense",
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "pgops: error:" in proc.stderr


@pytest.mark.parametrize("args", [[], ["migrate", "--target", "x"], ["frobnicate"], ["baseline"]])
def test_usage_errors_exit_2(tmp_path: Path, args: list[str]) -> None:
    """A missing command, a bad option value or an unknown command exits 2 with usage on stderr."""
    proc = run_pgops(*args, cwd=tmp_path)
    assert proc.returncode == 2
    assert "usage:" in proc.stderr


def test_missing_directory_exits_2(cli: Run, mdir: Path) -> None:
    """A migrations directory that does not exist exits 2 naming it."""
    mdir.rmdir()
    proc = cli("migrate")
    assert proc.returncode == 2
    assert str(mdir) in proc.stderr


def test_verbose_shows_sql_but_never_the_password(
    pg_server: PgServer, db_url: str, admin: Conn, mdir: Path
) -> None:
    """With -v every command logs at DEBUG (the SQL too), and the real password shows nowhere."""
    if not pg_server.password:
        pytest.skip("the test server has no password to look for")
    simple_set(mdir, 2)
    write(mdir, "0003_fails.sql", "CREATE TABLE verbose_marker (id int);\nSELECT 1/0;\n")
    secrets = secrets_of(pg_server)

    def run(*args: str, url: str = db_url) -> subprocess.CompletedProcess[str]:
        return run_pgops(*args[:1], "--dir", str(mdir), "-v", *args[1:], database_url=url, secrets=secrets)

    failed = run("migrate")
    assert failed.returncode == 1
    assert "CREATE TABLE verbose_marker" in failed.stderr  # the SQL at DEBUG
    assert "DEBUG" in failed.stderr
    (mdir / "0003_fails.sql").unlink()
    for args in (
        ["migrate"],
        ["status"],
        ["status", "--json"],
        ["validate"],
        ["repair"],
        ["migrate", "--dry-run"],
    ):
        assert run(*args).returncode == 0
    assert run("rollback", "--to", "1").returncode == 0
    wrong = db_url.replace(pg_server.password, "not-" + pg_server.password[::-1])
    denied = run("status", url=wrong)
    assert denied.returncode == 6
    assert "password authentication failed" in denied.stderr
    dsn_form = pg_server.dsn(admin.info.dbname)
    assert run("migrate", url=dsn_form).returncode == 0
    assert history(admin) == applied(1, 2)
