"""The migration verbs users know from Flyway, dbmate and alembic, run as real ``python -m pgops``
processes against a real PostgreSQL: rollback of the newest migration, baseline, repeatable
migrations, ``new`` with its down file, status that shows problems, global options, ``-q``."""

from __future__ import annotations

import json
import os
import pty
import subprocess
from pathlib import Path
from typing import Any

import psycopg2.extensions
import pytest

from pgtest import (
    PgServer,
    applied,
    check_output,
    history,
    pgops_argv,
    pgops_env,
    relation_exists,
    run_pgops,
    scalar,
    secrets_of,
    simple_set,
    write,
)
from test_cli import APPLIED_LINE

Conn = psycopg2.extensions.connection
Run = Any


def states(cli: Run) -> list[tuple[int | None, str, str]]:
    """Return (version, description, state) of every row of `status --json`."""
    proc = cli("status", "--json")
    assert proc.returncode == 0, proc.stderr
    return [(r["version"], r["description"], r["state"]) for r in json.loads(proc.stdout)]


def view_body(admin: Conn, name: str) -> str:
    return str(scalar(admin, "SELECT pg_get_viewdef(%s::regclass)", (name,)))


# -- rollback ------------------------------------------------------------------------------------


def test_rollback_without_a_target_reverts_the_newest_only(cli: Run, admin: Conn, mdir: Path) -> None:
    """`rollback` alone reverts one migration, the newest, each time; with none left it exits 2."""
    simple_set(mdir, 3)
    assert cli("migrate").returncode == 0
    proc = cli("rollback")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].startswith("reverted 0003_table_3.sql (")
    assert proc.stdout.splitlines()[-1] == "reverted 1 migration(s); now at version 2"
    assert history(admin) == applied(1, 2)
    assert not relation_exists(admin, "t3") and relation_exists(admin, "t2")
    assert cli("rollback").returncode == 0
    assert cli("rollback").returncode == 0
    assert history(admin) == []
    proc = cli("rollback")
    assert proc.returncode == 2
    assert "nothing to roll back" in proc.stderr


def test_rollback_everything_asks_on_a_terminal(
    pg_server: PgServer, dsn: str, admin: Conn, mdir: Path, tmp_path: Path
) -> None:
    """`rollback --to 0` on a terminal asks: anything but 'yes' reverts nothing (exit 2); 'yes' all."""
    simple_set(mdir, 2)
    assert run_pgops("migrate", "--dir", str(mdir), database_url=dsn).returncode == 0

    def answer(text: str) -> subprocess.CompletedProcess[str]:
        leader, follower = pty.openpty()
        try:
            os.write(leader, text.encode())
            proc = subprocess.run(
                pgops_argv("rollback", "--to", "0", "--dir", str(mdir)),
                env=pgops_env(dsn),
                cwd=tmp_path,
                stdin=follower,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
        finally:
            os.close(leader)
            os.close(follower)
        check_output(proc, secrets_of(pg_server))
        return proc

    proc = answer("no\n")
    assert proc.returncode == 2
    assert "every applied migration" in proc.stderr
    assert "not confirmed" in proc.stderr
    assert history(admin) == applied(1, 2)
    proc = answer("yes\n")
    assert proc.returncode == 0, proc.stderr
    assert history(admin) == []
    assert "now at version 0" in proc.stdout


# -- baseline ------------------------------------------------------------------------------------


def test_baseline_marks_an_existing_database_and_runs_only_newer_files(
    cli: Run, admin: Conn, mdir: Path
) -> None:
    """`baseline 2` on a database made before pgops: files 1-2 never run, 3 does; status shows it."""
    simple_set(mdir, 3)
    with admin.cursor() as cur:  # what the files 1 and 2 would have made, made some other way
        cur.execute("CREATE TABLE t1 (id int); CREATE TABLE t2 (id int)")
    proc = cli("baseline", "2")
    assert proc.returncode == 0, proc.stderr
    assert "baselined at version 2" in proc.stdout
    assert scalar(admin, "SELECT checksum FROM migration_history WHERE version = 2") == "baseline"
    assert states(cli) == [
        (1, "table_1", "below-baseline"),
        (2, "table_2", "baseline"),
        (3, "table_3", "pending"),
    ]
    assert cli("validate").returncode == 0
    proc = cli("migrate")
    assert proc.returncode == 0, proc.stderr
    assert [name for name, _ in APPLIED_LINE.findall(proc.stdout)] == ["0003_table_3.sql"]
    assert history(admin) == applied(2, 3)
    table = cli("status").stdout
    assert "baseline" in table and "below-baseline" in table
    proc = cli("baseline", "3")
    assert proc.returncode == 2
    assert "already records" in proc.stderr
    assert cli("rollback").returncode == 0  # reverts 3, down to the baseline
    assert history(admin) == applied(2, 3)[:1]
    proc = cli("rollback")
    assert proc.returncode == 2
    assert "baseline" in proc.stderr
    proc = cli("rollback", "--to", "1")
    assert proc.returncode == 2
    assert "baselined at 2" in proc.stderr
    assert relation_exists(admin, "t1") and relation_exists(admin, "t2")


# -- repeatable migrations -------------------------------------------------------------------------


def test_repeatable_migration_runs_after_the_versioned_ones_and_again_when_changed(
    cli: Run, admin: Conn, mdir: Path
) -> None:
    """R__name.sql runs after the versioned files, again only when its text changes, with one history row."""
    write(mdir, "0001_items.sql", "CREATE TABLE items (id int, price int);\n")
    write(mdir, "R__cheap.sql", "CREATE OR REPLACE VIEW cheap AS SELECT id FROM items WHERE price < 10;\n")
    proc = cli("migrate")
    assert proc.returncode == 0, proc.stderr
    assert [line.split()[1] for line in proc.stdout.splitlines()[:-1]] == ["0001_items.sql", "R__cheap.sql"]
    assert "price < 10" in view_body(admin, "cheap")
    assert states(cli) == [(1, "items", "applied"), (None, "cheap", "applied")]
    proc = cli("migrate")
    assert proc.returncode == 0 and "already up to date" in proc.stdout
    write(mdir, "0002_more.sql", "ALTER TABLE items ADD COLUMN name text;\n")
    write(
        mdir, "R__cheap.sql", "CREATE OR REPLACE VIEW cheap AS SELECT id, name FROM items WHERE price < 5;\n"
    )
    assert states(cli)[1:] == [(2, "more", "pending"), (None, "cheap", "outdated")]
    dry = cli("migrate", "--dry-run")
    assert dry.stdout.splitlines()[:2] == ["would apply 0002_more.sql", "would apply R__cheap.sql"]
    proc = cli("migrate")
    assert proc.returncode == 0, proc.stderr
    assert [line.split()[1] for line in proc.stdout.splitlines()[:-1]] == ["0002_more.sql", "R__cheap.sql"]
    assert "price < 5" in view_body(admin, "cheap")
    assert scalar(admin, "SELECT count(*) FROM migration_history WHERE version < 0") == 1
    assert cli("validate").returncode == 0


def test_a_failing_repeatable_migration_changes_nothing(cli: Run, admin: Conn, mdir: Path) -> None:
    """A repeatable file that fails exits 1 with path:line; its view and history row stay as they were."""
    write(mdir, "0001_items.sql", "CREATE TABLE items (id int);\n")
    write(mdir, "R__v.sql", "CREATE OR REPLACE VIEW v AS SELECT id FROM items;\n")
    assert cli("migrate").returncode == 0
    before = scalar(admin, "SELECT checksum FROM migration_history WHERE version < 0")
    write(mdir, "R__v.sql", "CREATE OR REPLACE VIEW v AS SELECT id FROM items;\nSELECT nope FROM items;\n")
    proc = cli("migrate")
    assert proc.returncode == 1
    assert f"{mdir / 'R__v.sql'}:2:" in proc.stderr
    assert scalar(admin, "SELECT checksum FROM migration_history WHERE version < 0") == before


def test_an_older_release_leaves_newer_repeatables_alone(cli: Run, admin: Conn, mdir: Path) -> None:
    """A runner whose files are older than the database (a rollout) does not put its older view back."""
    write(mdir, "0001_items.sql", "CREATE TABLE items (id int, price int);\n")
    write(mdir, "0002_more.sql", "SELECT 1;\n")
    write(mdir, "R__v.sql", "CREATE OR REPLACE VIEW v AS SELECT id FROM items WHERE price < 5;\n")
    assert cli("migrate").returncode == 0
    (mdir / "0002_more.sql").unlink()
    write(mdir, "R__v.sql", "CREATE OR REPLACE VIEW v AS SELECT id FROM items WHERE price < 10;\n")
    proc = cli("migrate")
    assert proc.returncode == 0, proc.stderr
    assert "price < 5" in view_body(admin, "v")


@pytest.mark.parametrize(
    ("name", "text", "named"),
    [
        ("R__v.sql", "-- pgops: no-transaction\nSELECT 1;\n", "no-transaction"),
        ("R__v.down.sql", "SELECT 1;\n", "cannot have a down file"),
    ],
    ids=["no-transaction", "down-file"],
)
def test_repeatable_migration_misuse_exits_4(
    cli: Run, admin: Conn, mdir: Path, name: str, text: str, named: str
) -> None:
    """A repeatable file marked no-transaction, or one with a down file, is refused before anything runs."""
    write(mdir, "0001_items.sql", "CREATE TABLE items (id int);\n")
    if name.endswith(".down.sql"):
        write(mdir, "R__v.sql", "SELECT 1;\n")
    write(mdir, name, text)
    proc = cli("migrate")
    assert proc.returncode == 4
    assert name in proc.stderr and named in proc.stderr
    assert history(admin) is None


def test_repair_forgets_a_repeatable_whose_file_is_gone(cli: Run, mdir: Path) -> None:
    """A repeatable file deleted after it ran shows as missing; migrate goes on; repair forgets it."""
    write(mdir, "0001_items.sql", "CREATE TABLE items (id int);\n")
    write(mdir, "R__v.sql", "CREATE OR REPLACE VIEW v AS SELECT id FROM items;\n")
    assert cli("migrate").returncode == 0
    (mdir / "R__v.sql").unlink()
    assert states(cli) == [(1, "items", "applied"), (None, "v", "missing")]
    assert cli("migrate").returncode == 0
    proc = cli("repair")
    assert proc.returncode == 0, proc.stderr
    assert "forgot repeatable migration R__v.sql" in proc.stdout
    assert states(cli) == [(1, "items", "applied")]


# -- new, and a fresh template ---------------------------------------------------------------------


def test_a_fresh_template_is_pending_until_it_has_sql(cli: Run, admin: Conn, mdir: Path) -> None:
    """`new` writes an up and a down template: status and validate show it pending, migrate refuses it
    with one line and runs nothing; with SQL in it, it applies; rollback refuses the empty down file."""
    simple_set(mdir, 1)
    assert cli("migrate").returncode == 0
    proc = cli("new", "add_users")
    up, down = (Path(line) for line in proc.stdout.splitlines())
    assert (up.name, down.name) == ("0002_add_users.sql", "0002_add_users.down.sql")
    write(mdir, "0003_later.sql", "CREATE TABLE later (id int);\n")
    write(mdir, "0003_later.down.sql", "DROP TABLE later;\n")
    assert states(cli)[1:] == [(2, "add_users", "pending"), (3, "later", "pending")]
    assert cli("validate").returncode == 0
    proc = cli("migrate")
    assert proc.returncode == 4
    assert f"'{up}' has no SQL statement" in proc.stderr
    assert history(admin) == applied(1)
    up.write_text(up.read_text() + "CREATE TABLE users (id int);\n")
    assert cli("migrate").returncode == 0
    assert history(admin) == applied(1, 2, 3)
    assert cli("rollback").returncode == 0
    proc = cli("rollback")
    assert proc.returncode == 4
    assert f"'{down}' has no SQL statement" in proc.stderr
    assert history(admin) == applied(1, 2)


# -- status --------------------------------------------------------------------------------------


def test_status_shows_the_state_and_lists_file_problems(cli: Run, admin: Conn, mdir: Path) -> None:
    """An orphan down file and a badly named file do not stop status: it lists them as problems (exit 0);
    validate exits 4 naming them; migrate refuses."""
    simple_set(mdir, 2)
    assert cli("migrate", "--target", "1").returncode == 0
    write(mdir, "0009_gone.down.sql", "SELECT 1;\n")
    write(mdir, "3-bad.sql", "SELECT 1;\n")
    proc = cli("status")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[1].split()[:3] == ["1", "table_1", "applied"]
    assert lines[2].split() == ["2", "table_2", "pending"]
    assert "2 problem(s):" in lines
    problems = "\n".join(lines[lines.index("2 problem(s):") :])
    assert "0009_gone.down.sql" in problems and "3-bad.sql" in problems
    proc = cli("status", "--json")
    assert proc.returncode == 0
    assert len(json.loads(proc.stdout)) == 2
    assert proc.stderr.count("pgops: problem: ") == 2
    proc = cli("validate")
    assert proc.returncode == 4
    assert "0009_gone.down.sql" in proc.stderr and "3-bad.sql" in proc.stderr
    assert cli("migrate").returncode == 4
    assert history(admin) == applied(1)


# -- global options, -q ------------------------------------------------------------------------------


def test_global_options_before_the_command(dsn: str, admin: Conn, mdir: Path, tmp_path: Path) -> None:
    """`pgops --dsn X --dir D migrate` works like git's and flyway's options; after the command they win."""
    simple_set(mdir, 1)
    proc = run_pgops("--dsn", dsn, "--dir", str(mdir), "migrate", database_url=None, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert history(admin) == applied(1)
    other = tmp_path / "other"
    other.mkdir()
    proc = run_pgops(
        "--dir", str(other), "status", "--dir", str(mdir), "--json", database_url=dsn, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert [r["state"] for r in json.loads(proc.stdout)] == ["applied"]
    proc = run_pgops(
        "-q", "--dsn", dsn, "--dir", str(mdir), "status", "--json", database_url=None, cwd=tmp_path
    )
    assert json.loads(proc.stdout)[0]["version"] == 1


def test_quiet_prints_errors_only(cli: Run, admin: Conn, mdir: Path) -> None:
    """-q: migrate, rollback and repair print nothing when all is well, and the one error line when not."""
    simple_set(mdir, 2)
    for args in (("migrate", "-q"), ("rollback", "-q"), ("repair", "-q"), ("validate", "-q")):
        proc = cli(*args)
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    assert history(admin) == applied(1)
    write(mdir, "0003_bad.sql", "SELECT nope;\n")
    proc = cli("migrate", "-q")
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.startswith("pgops: error: ") and proc.stderr.count("\n") == 1


# -- what a review found ---------------------------------------------------------------------------


def test_rollback_forgets_repeatables_so_migrate_makes_them_again(cli: Run, admin: Conn, mdir: Path) -> None:
    """A down file that drops what a repeatable made (CASCADE) does not leave it missing for good."""
    write(mdir, "0001_items.sql", "CREATE TABLE items (id int);\n")
    write(mdir, "0001_items.down.sql", "DROP TABLE items CASCADE;\n")
    write(mdir, "R__v.sql", "CREATE OR REPLACE VIEW v AS SELECT id FROM items;\n")
    assert cli("migrate").returncode == 0
    assert cli("rollback").returncode == 0
    assert not relation_exists(admin, "v")
    assert states(cli) == [(1, "items", "pending"), (None, "v", "pending")]
    assert cli("migrate").returncode == 0
    assert relation_exists(admin, "v")


def test_rollback_reverts_a_version_0_migration(cli: Run, admin: Conn, mdir: Path) -> None:
    """`rollback` with only 0000_x.sql applied reverts it (the newest), though `--to 0` keeps it."""
    write(mdir, "0000_zero.sql", "CREATE TABLE zero (id int);\n")
    write(mdir, "0000_zero.down.sql", "DROP TABLE zero;\n")
    assert cli("migrate").returncode == 0
    proc = cli("rollback")
    assert proc.returncode == 0, proc.stderr
    assert history(admin) == []
    assert not relation_exists(admin, "zero")


def test_baseline_needs_the_file_of_its_version(cli: Run, admin: Conn, mdir: Path) -> None:
    """`baseline 5` with no file 5 is refused (exit 2): `new` would number the next file under it."""
    write(mdir, "0001_a.sql", "SELECT 1;\n")
    proc = cli("baseline", "5")
    assert proc.returncode == 2
    assert "no migration 5" in proc.stderr
    assert history(admin) is None


def test_a_version_used_twice_is_invalid_not_missing(cli: Run, mdir: Path) -> None:
    """An applied version that gains a second file shows as invalid, and validate says "used twice",
    not that the applied file is missing."""
    simple_set(mdir, 2)
    assert cli("migrate").returncode == 0
    write(mdir, "2_other.sql", "SELECT 2;\n")
    assert [state for _v, _d, state in states(cli)] == ["applied", "invalid"]
    proc = cli("validate")
    assert proc.returncode == 4
    assert "used twice" in proc.stderr
    assert "no file" not in proc.stderr and "restore" not in proc.stderr


def test_an_applied_file_that_became_invalid_is_not_offered_to_repair(cli: Run, mdir: Path) -> None:
    """An applied file given a COMMIT is named with its line, not called "changed" with advice to repair."""
    simple_set(mdir, 1)
    assert cli("migrate").returncode == 0
    path = mdir / "0001_table_1.sql"
    path.write_text(path.read_text() + "COMMIT;\n")
    assert [state for _v, _d, state in states(cli)] == ["invalid"]
    proc = cli("validate")
    assert proc.returncode == 4
    assert "0001_table_1.sql:2:" in proc.stderr
    assert "repair" not in proc.stderr


def test_a_missing_repeatable_is_warned_about_once_per_run(cli: Run, mdir: Path) -> None:
    """One deleted repeatable file and several others due: one warning line, not one per repeatable."""
    write(mdir, "0001_items.sql", "CREATE TABLE items (id int);\n")
    for name in ("gone", "a", "b", "c"):
        write(mdir, f"R__{name}.sql", f"CREATE OR REPLACE VIEW {name} AS SELECT id FROM items;\n")
    assert cli("migrate").returncode == 0
    (mdir / "R__gone.sql").unlink()
    for name in ("a", "b", "c"):
        write(mdir, f"R__{name}.sql", f"CREATE OR REPLACE VIEW {name} AS SELECT id, 1 AS one FROM items;\n")
    proc = cli("migrate")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("R__gone.sql") == 1
