"""A catalogue of bad inputs: each is refused with one clear line, its documented code, and no change.

Every case runs against a real database that already holds an applied migration with rows, and the
database is fingerprinted (schemas, relations, columns, indexes, functions, types, extensions, every
table's rows and every sequence's position, in one query) before and after: a refused input changes
nothing.  Command-line cases run ``python -m pgops`` as a subprocess with a clean environment; HTTP
cases call the WSGI HealthApp in-process through ``wsgiref.validate``.

What counts as "one line": pgops prints exactly one ``pgops: error: ...`` line on stderr and nothing
on stdout.  Usage errors that argparse itself detects (unknown command, missing or malformed option
value) follow the argparse convention instead: a ``usage:`` block (which argparse may wrap over
several lines) and then exactly one ``pgops COMMAND: error: ...`` line.  That two-part form is
accepted only for cases marked ``usage=True``, that is only where argparse does the refusing.

Decisions recorded here:
- APP_NAME has no bad values: PostgreSQL truncates application_name to 63 bytes and replaces
  non-ASCII characters, so pgops passes any string through (no case below).
- A 50 MB migration is applied like any other when it holds SQL (PostgreSQL takes statements up to
  1 GB); pgops must scan it in linear time.  A 50 MB file holding only a comment is refused like
  every file without a statement.
- A transactional migration with its own BEGIN/COMMIT/ROLLBACK/END/ABORT/START TRANSACTION/PREPARE
  TRANSACTION is refused before anything runs (exit 4, naming path:line); SAVEPOINT, RELEASE,
  ROLLBACK TO, BEGIN ATOMIC bodies and PL/pgSQL blocks are fine, and so is anything in a file
  marked ``-- pgops: no-transaction``.
- HTTP error bodies say what went wrong ("not found", "method not allowed", the Authorization
  scheme to use) without echoing the request's path, method or headers back.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg2.extensions
import pytest
from psycopg2 import sql

from pgops import HealthApp, Migrator, Pool
from pgtest import PgServer, Reply, run_pgops, write, wsgi_call

Conn = psycopg2.extensions.connection

TOKEN = "bad-inputs-token-5c1d"
MB50 = 50 * 1024 * 1024
ONE_ATTEMPT = {"DB_RETRY_MAX_ATTEMPTS": "1"}  # a refused connection fails at once

# Names only from user schemas: pg_catalog, information_schema, pg_toast and pg_temp_N are left out.
_USER = "NOT IN ('pg_catalog', 'information_schema') AND {0} NOT LIKE 'pg\\_%'"
CATALOG = f"""
SELECT concat_ws(E'\\n',
    'schemas: ' || (SELECT string_agg(nspname, ' ' ORDER BY nspname) FROM pg_namespace
                    WHERE nspname {_USER.format("nspname")}),
    'relations: ' || (SELECT string_agg(format('%s.%s(%s)', n.nspname, c.relname, c.relkind), ' '
                                        ORDER BY n.nspname, c.relname)
                      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                      WHERE n.nspname {_USER.format("n.nspname")}),
    'columns: ' || (SELECT string_agg(format('%s.%s.%s %s %s %s', table_schema, table_name, column_name,
                                             data_type, is_nullable, column_default),
                                      ' ' ORDER BY table_schema, table_name, ordinal_position)
                    FROM information_schema.columns WHERE table_schema {_USER.format("table_schema")}),
    'indexes: ' || (SELECT string_agg(indexdef, ' ' ORDER BY indexdef) FROM pg_indexes
                    WHERE schemaname {_USER.format("schemaname")}),
    'functions: ' || (SELECT string_agg(p.oid::regprocedure::text, ' ' ORDER BY p.oid::regprocedure::text)
                      FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                      WHERE n.nspname {_USER.format("n.nspname")}),
    'types: ' || (SELECT string_agg(format_type(t.oid, NULL), ' ' ORDER BY format_type(t.oid, NULL))
                  FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
                  WHERE n.nspname {_USER.format("n.nspname")}),
    'extensions: ' || (SELECT string_agg(extname || ' ' || extversion, ' ' ORDER BY extname)
                       FROM pg_extension))
"""
# Tables, partitioned tables, materialized views and sequences: whose contents the fingerprint covers.
RELATIONS = f"""
SELECT n.nspname, c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname {_USER.format("n.nspname")} AND c.relkind IN ('r', 'p', 'm', 'S') ORDER BY 1, 2
"""
ROWS = (
    "SELECT format('%s: %s rows, md5 %s', {}, count(*), md5(string_agg(t::text, E'\\n' ORDER BY t::text))) "
    "FROM {} t"
)
SEQUENCE = "SELECT format('%s: at %s, called %s', {}, last_value, is_called) FROM {}"


def fingerprint(conn: Conn) -> str:
    """Return a text fingerprint of the schema and of every table's rows and every sequence's position.

    The catalog part and the contents of every relation are read by one query, composed from the
    list of relations (the server may lack libxml, so query_to_xml cannot do the dynamic part).
    """
    with conn.cursor() as cur:
        cur.execute(RELATIONS)
        parts = [sql.SQL(CATALOG)]
        for schema, name, kind in cur.fetchall():
            template = SEQUENCE if kind == "S" else ROWS
            label = sql.Literal(f"{schema}.{name}")
            parts.append(sql.SQL(template).format(label, sql.Identifier(schema, name)))
        query = sql.SQL("SELECT concat_ws(E'\\n', {})").format(
            sql.SQL(", ").join(sql.SQL("({})").format(part) for part in parts)
        )
        cur.execute(query)
        row = cur.fetchone()
    assert row is not None and row[0]
    return str(row[0])


def error_line(proc: subprocess.CompletedProcess[str], *, usage: bool) -> str:
    """Return the single error line of a refused run, asserting the output has no other content."""
    out = f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stdout + proc.stderr, out
    assert proc.stdout == "", out
    lines = proc.stderr.splitlines()
    if not usage:
        assert len(lines) == 1, out
        assert lines[0].startswith("pgops: error: "), out
        return lines[0]
    # argparse's convention, accepted for argparse-detected usage errors only: a usage block, possibly
    # wrapped over indented lines, then exactly one "PROG: error: ..." line.
    assert lines and lines[0].startswith("usage: pgops"), out
    assert all(line.startswith(" ") for line in lines[1:-1]), out
    assert re.match(r"^pgops(?: [a-z]+)?: error: ", lines[-1]), out
    return lines[-1]


BASE_SQL = """\
CREATE TABLE base (id serial PRIMARY KEY, note text NOT NULL);
CREATE INDEX base_note ON base (note);
INSERT INTO base (note) VALUES ('one'), ('two'), ('three');
CREATE FUNCTION base_count() RETURNS bigint LANGUAGE sql AS $$ SELECT count(*) FROM base $$;
"""


@pytest.fixture
def seeded(dsn: str, tmp_path: Path) -> Path:
    """A migrations folder whose first migration (a table with rows, an index, a function) is applied."""
    mdir = tmp_path / "migrations"
    mdir.mkdir()
    write(mdir, "0001_base.sql", BASE_SQL)
    write(mdir, "0001_base.down.sql", "DROP FUNCTION base_count();\nDROP TABLE base;\n")
    assert [m.version for m in Migrator(dsn, str(mdir)).migrate()] == [1]
    return mdir


# -- command line: environment, DSNs, migration files, arguments -----------------------------------


@dataclasses.dataclass(frozen=True)
class Cli:
    """One bad invocation and how it must be refused.

    Strings in args, env, url and names may use {dir} (the migrations folder), {file} (a regular
    file), {missing} (a folder that does not exist) and {dsn} (the test database's key=value DSN).
    """

    args: tuple[str, ...]
    code: int
    names: tuple[str, ...]  # what the error line must mention
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    files: dict[str, str | bytes] = dataclasses.field(default_factory=dict)
    make: Callable[[Path], None] | None = None  # writes generated files into the migrations folder
    url: str | None = "{dsn}"  # DATABASE_URL; None leaves it unset
    usage: bool = False  # refused by argparse: usage block plus one error line


def migrate(**kwargs: Any) -> Cli:
    """Return a `migrate --dir {dir}` case that must exit 4 (validation) unless told otherwise."""
    kwargs.setdefault("code", 4)
    return Cli(("migrate", "--dir", "{dir}"), **kwargs)


def serve(*extra: str, **kwargs: Any) -> Cli:
    """Return a `serve --port 0 --dir {dir}` case that must exit 2 before serving anything."""
    kwargs.setdefault("code", 2)
    return Cli(("serve", "--port", "0", "--dir", "{dir}", *extra), **kwargs)


def fifty_mb_comment(directory: Path) -> None:
    """Write a 50 MB migration that is one block comment and no statement."""
    with (directory / "0002_huge_comment.sql").open("w", encoding="utf-8") as fh:
        fh.write("/* generated padding, no statement follows\n")
        line = "x" * 1023 + "\n"
        for _ in range(MB50 // len(line)):
            fh.write(line)
        fh.write("*/\n")


def dangling_symlink(directory: Path) -> None:
    """Add a symbolic link named like a migration whose target does not exist."""
    (directory / "0002_link.sql").symlink_to("nowhere.sql")


def folder_like_a_migration(directory: Path) -> None:
    """Add a directory named like a migration."""
    (directory / "0002_folder.sql").mkdir()


def other_file_under_version_1(directory: Path) -> None:
    """Replace the applied 0001_base.sql with another migration under the same version."""
    (directory / "0001_base.sql").unlink()
    write(directory, "0001_other.sql", "CREATE TABLE other (id int);\n")


WRAPPED = "BEGIN;\nCREATE TABLE wrapped (id int);\nINSERT INTO base (note) VALUES ('wrapped');\nCOMMIT;\n"

CLI_CASES = [
    # Environment variables.
    pytest.param(
        migrate(env={"DB_RETRY_MAX_ATTEMPTS": "abc"}, code=2, names=("DB_RETRY_MAX_ATTEMPTS", "'abc'")),
        id="env-DB_RETRY_MAX_ATTEMPTS-abc",
    ),
    pytest.param(
        migrate(env={"DB_RETRY_MAX_ATTEMPTS": "0"}, code=2, names=("DB_RETRY_MAX_ATTEMPTS", "at least 1")),
        id="env-DB_RETRY_MAX_ATTEMPTS-zero",
    ),
    pytest.param(
        migrate(env={"DB_RETRY_MAX_ATTEMPTS": "2.5"}, code=2, names=("DB_RETRY_MAX_ATTEMPTS", "'2.5'")),
        id="env-DB_RETRY_MAX_ATTEMPTS-fraction",
    ),
    pytest.param(
        migrate(env={"DB_RETRY_INITIAL_DELAY": "-1"}, code=2, names=("DB_RETRY_INITIAL_DELAY", "at least 0")),
        id="env-DB_RETRY_INITIAL_DELAY-negative",
    ),
    pytest.param(
        migrate(env={"DB_RETRY_MAX_DELAY": "inf"}, code=2, names=("DB_RETRY_MAX_DELAY", "'inf'")),
        id="env-DB_RETRY_MAX_DELAY-infinite",
    ),
    pytest.param(
        migrate(env={"DB_RETRY_MULTIPLIER": "0.5"}, code=2, names=("DB_RETRY_MULTIPLIER", "at least 1")),
        id="env-DB_RETRY_MULTIPLIER-below-one",
    ),
    pytest.param(
        migrate(env={"DB_RETRY_JITTER": "maybe"}, code=2, names=("DB_RETRY_JITTER", "'maybe'")),
        id="env-DB_RETRY_JITTER-maybe",
    ),
    pytest.param(
        serve(env={"POOL_MAX_CONNECTIONS": "abc"}, names=("POOL_MAX_CONNECTIONS", "'abc'")),
        id="env-POOL_MAX_CONNECTIONS-abc",
    ),
    pytest.param(
        serve(env={"POOL_MIN_CONNECTIONS": "-1"}, names=("POOL_MIN_CONNECTIONS", "at least 0")),
        id="env-POOL_MIN_CONNECTIONS-negative",
    ),
    pytest.param(
        serve(
            env={"POOL_MIN_CONNECTIONS": "50", "POOL_MAX_CONNECTIONS": "10"},
            names=("POOL_MIN_CONNECTIONS", "POOL_MAX_CONNECTIONS"),
        ),
        id="env-POOL_MIN-above-POOL_MAX",
    ),
    pytest.param(
        serve(env={"POOL_ACQUIRE_TIMEOUT": "0"}, names=("POOL_ACQUIRE_TIMEOUT", "greater than 0")),
        id="env-POOL_ACQUIRE_TIMEOUT-zero",
    ),
    pytest.param(
        serve(env={"POOL_IDLE_TIMEOUT": "nan"}, names=("POOL_IDLE_TIMEOUT", "'nan'")),
        id="env-POOL_IDLE_TIMEOUT-nan",
    ),
    pytest.param(
        serve(env={"POOL_MAX_LIFETIME": "one hour"}, names=("POOL_MAX_LIFETIME", "'one hour'")),
        id="env-POOL_MAX_LIFETIME-words",
    ),
    pytest.param(
        serve(env={"POOL_PRESET": "turbo"}, names=("POOL_PRESET", "'turbo'", "production")),
        id="env-POOL_PRESET-unknown",
    ),
    pytest.param(
        serve(env={"PGOPS_HEALTH_CACHE_TTL": "soon"}, names=("PGOPS_HEALTH_CACHE_TTL", "'soon'")),
        id="env-PGOPS_HEALTH_CACHE_TTL-words",
    ),
    pytest.param(
        serve(env={"PGOPS_HEALTH_CACHE_TTL": "-5"}, names=("PGOPS_HEALTH_CACHE_TTL", "at least 0")),
        id="env-PGOPS_HEALTH_CACHE_TTL-negative",
    ),
    # A blank token would otherwise turn authentication off without a word.
    pytest.param(
        serve(env={"PGOPS_HEALTH_TOKEN": "   "}, names=("PGOPS_HEALTH_TOKEN", "blank")),
        id="env-PGOPS_HEALTH_TOKEN-blank",
    ),
    pytest.param(
        serve(env={"PGOPS_HEALTH_TOKEN": ""}, names=("PGOPS_HEALTH_TOKEN", "blank")),
        id="env-PGOPS_HEALTH_TOKEN-empty",
    ),
    pytest.param(
        migrate(url="garbage", code=2, names=("DATABASE_URL", "'garbage'")),
        id="env-DATABASE_URL-garbage",
    ),
    pytest.param(
        serve(url="garbage", names=("DATABASE_URL", "'garbage'")),
        id="env-DATABASE_URL-garbage-serve",
    ),
    pytest.param(
        migrate(url="   ", code=2, names=("DATABASE_URL", "--dsn")),
        id="env-DATABASE_URL-blank",
    ),
    # DSNs.
    pytest.param(
        migrate(url="host=127.0.0.1 nonsense", code=2, names=("DATABASE_URL", "nonsense")),
        id="dsn-key-value-unparseable",
    ),
    pytest.param(  # libpq reads 'Sec' as the port: it is not echoed, and the fix is named
        migrate(
            url="postgresql://app:Sec/ret@127.0.0.1/db", code=2, names=("DATABASE_URL", "port '***'", "%2F")
        ),
        id="dsn-url-slash-in-password",
    ),
    pytest.param(
        migrate(url="postgresql://app:p%99ss@127.0.0.1/db", code=2, names=("DATABASE_URL", "UTF-8")),
        id="dsn-url-percent-encoded-not-utf8",
    ),
    pytest.param(
        migrate(url="postgresql://[::1/db", code=2, names=("DATABASE_URL", "postgresql://[::1/db")),
        id="dsn-url-unclosed-ipv6-bracket",
    ),
    pytest.param(
        migrate(url="postgresql://app@127.0.0.1:abc/db", code=2, names=("DATABASE_URL", "port 'abc'")),
        id="dsn-url-port-letters",
    ),
    pytest.param(
        migrate(url="host=127.0.0.1 port=70000 dbname=db", code=2, names=("DATABASE_URL", "port '70000'")),
        id="dsn-key-value-port-too-big",
    ),
    pytest.param(
        migrate(url="host=127.0.0.1 colour=blue", code=2, names=("DATABASE_URL", '"colour"')),
        id="dsn-key-value-unknown-option",
    ),
    pytest.param(
        migrate(url="postgresql://127.0.0.1/db?colour=blue", code=2, names=("DATABASE_URL", '"colour"')),
        id="dsn-url-unknown-parameter",
    ),
    pytest.param(
        # libpq rejects the value only when connecting; retrying cannot help, so it must not retry
        # (a retry would log a warning line, which the one-line check would catch).
        migrate(
            url="{dsn} sslmode=bogus",
            env={"DB_RETRY_MAX_ATTEMPTS": "3", "DB_RETRY_INITIAL_DELAY": "0"},
            code=6,
            names=("cannot connect", "sslmode", "bogus"),
        ),
        id="dsn-bad-sslmode-not-retried",
    ),
    pytest.param(
        Cli(("status", "--dir", "{dir}", "--dsn", "garbage"), code=2, names=("--dsn", "'garbage'")),
        id="dsn-option-garbage",
    ),
    # Migration files.
    pytest.param(
        migrate(files={"001-init.sql": "SELECT 1;"}, names=("'001-init.sql'", "rename")), id="file-dashed"
    ),
    pytest.param(migrate(files={"init.sql": "SELECT 1;"}, names=("'init.sql'",)), id="file-no-number"),
    pytest.param(migrate(files={"0001_.sql": "SELECT 1;"}, names=("'0001_.sql'",)), id="file-no-description"),
    pytest.param(
        migrate(files={"0002_bad name.sql": "SELECT 1;"}, names=("'0002_bad name.sql'",)),
        id="file-space-in-name",
    ),
    pytest.param(
        migrate(files={"0002_upper.SQL": "SELECT 1;"}, names=("'0002_upper.SQL'",)), id="file-upper-ext"
    ),
    pytest.param(
        migrate(
            files={"99999999999999999999_big.sql": "SELECT 1;"}, names=("99999999999999999999", "renumber")
        ),
        id="file-version-above-bigint",
    ),
    pytest.param(
        migrate(
            files={"0002_latin1.sql": "SELECT 'café';".encode("latin-1")}, names=("0002_latin1.sql", "UTF-8")
        ),
        id="file-latin1",
    ),
    pytest.param(
        migrate(files={"0002_wide.sql": "SELECT 1;".encode("utf-16")}, names=("0002_wide.sql", "UTF-16")),
        id="file-utf16-with-bom",
    ),
    pytest.param(
        migrate(files={"0002_wide.sql": "SELECT 1;".encode("utf-16-le")}, names=("0002_wide.sql", "UTF-16")),
        id="file-utf16-without-bom",
    ),
    pytest.param(
        migrate(files={"0002_nul.sql": "SELECT 1;\n\x00\n"}, names=("0002_nul.sql", "NUL", "offset 10")),
        id="file-nul-byte",
    ),
    pytest.param(
        migrate(files={"0002_empty.sql": ""}, names=("0002_empty.sql", "no SQL statement")), id="file-empty"
    ),
    pytest.param(
        migrate(
            files={"0002_notes.sql": "-- only a note\n/* and /* a nested */ block */\n\n"},
            names=("0002_notes.sql", "no SQL statement"),
        ),
        id="file-comments-only",
    ),
    pytest.param(
        migrate(
            files={"0002_semis.sql": ";\n ; -- nothing\n;"}, names=("0002_semis.sql", "no SQL statement")
        ),
        id="file-semicolons-only",
    ),
    pytest.param(
        migrate(make=fifty_mb_comment, names=("0002_huge_comment.sql", "no SQL statement")),
        id="file-50MB-comment-only",
    ),
    pytest.param(
        migrate(
            files={"2_a.sql": "SELECT 1;", "002_b.sql": "SELECT 2;"}, names=("2_a.sql", "002_b.sql", "twice")
        ),
        id="file-duplicate-version",
    ),
    pytest.param(
        migrate(files={"01_again.sql": "SELECT 1;"}, names=("0001_base.sql", "01_again.sql", "twice")),
        id="file-duplicate-of-applied-version",
    ),
    pytest.param(
        migrate(files={"0002_gone.down.sql": "SELECT 1;"}, names=("0002_gone.down.sql", "no matching up")),
        id="file-orphan-down",
    ),
    pytest.param(
        migrate(
            files={"0002_wrapped.sql": WRAPPED}, names=("0002_wrapped.sql:1:", "'BEGIN;'", "no-transaction")
        ),
        id="file-begin-commit-wrapper",
    ),
    pytest.param(
        migrate(
            files={
                "0002_midway.sql": "CREATE TABLE early (id int);\n-- part one done\n  Commit ;\nSELECT 1;"
            },
            names=("0002_midway.sql:3:", "Commit", "no-transaction"),
        ),
        id="file-commit-midway",
    ),
    pytest.param(
        migrate(
            files={"0002_start.sql": "START TRANSACTION ISOLATION LEVEL SERIALIZABLE;\nSELECT 1;\nEND;\n"},
            names=("0002_start.sql:1:", "START TRANSACTION"),
        ),
        id="file-start-transaction-end",
    ),
    pytest.param(
        migrate(
            files={"0002_undo.sql": "CREATE TABLE undone (id int);\n/* give up */ ROLLBACK;\n"},
            names=("0002_undo.sql:2:", "ROLLBACK"),
        ),
        id="file-rollback",
    ),
    pytest.param(
        migrate(
            files={"0002_abort.sql": "INSERT INTO base (note) VALUES ('x');\nabort;\n"},
            names=("0002_abort.sql:2:", "abort"),
        ),
        id="file-abort",
    ),
    pytest.param(
        migrate(
            files={"0002_prepared.sql": "SELECT 1;\nPREPARE TRANSACTION 'pgops';\n"},
            names=("0002_prepared.sql:2:", "PREPARE TRANSACTION"),
        ),
        id="file-prepare-transaction",
    ),
    pytest.param(
        migrate(make=dangling_symlink, names=("0002_link.sql", "symbolic link", "'nowhere.sql'")),
        id="file-dangling-symlink",
    ),
    pytest.param(
        migrate(make=folder_like_a_migration, names=("0002_folder.sql", "is a directory")),
        id="file-directory-named-like-a-migration",
    ),
    pytest.param(
        migrate(
            files={"0002_load.sql": "-- from pg_dump\nCOPY base (note) FROM stdin;\nfour\nfive\n\\.\n"},
            names=("0002_load.sql:2:", "COPY FROM STDIN", "INSERT"),
        ),
        id="file-copy-from-stdin",
    ),
    pytest.param(
        migrate(
            files={"0002_dump.sql": "SELECT 1;\ncopy base to stdout;\n"},
            names=("0002_dump.sql:2:", "COPY TO STDOUT"),
        ),
        id="file-copy-to-stdout",
    ),
    pytest.param(
        migrate(make=other_file_under_version_1, names=("0001_other.sql", "different migration", "'base'")),
        id="file-other-migration-under-an-applied-version",
    ),
    pytest.param(
        Cli(
            ("rollback", "--to", "0", "--yes", "--dir", "{dir}"),
            files={"0001_base.down.sql": "DROP FUNCTION base_count();\nCOMMIT;\nDROP TABLE base;\n"},
            code=4,
            names=("0001_base.down.sql:2:", "COMMIT"),
        ),
        id="file-down-with-commit",
    ),
    pytest.param(
        Cli(
            ("validate", "--dir", "{dir}"),
            files={"schema.json": '{"tables": ["base"],'},
            code=2,
            names=("schema.json", "not readable JSON"),
        ),
        id="file-schema-json-truncated",
    ),
    pytest.param(
        Cli(
            ("validate", "--dir", "{dir}"),
            files={"schema.json": '{"tables": ["base"], "colums": {}}'},
            code=2,
            names=("schema.json", "keys among"),
        ),
        id="file-schema-json-unknown-key",
    ),
    # Command-line arguments.
    pytest.param(Cli(("frobnicate",), code=2, names=("'frobnicate'",), usage=True), id="cli-unknown-command"),
    pytest.param(Cli((), code=2, names=("COMMAND",), usage=True), id="cli-no-command"),
    pytest.param(
        Cli(("migrate", "--dir", "{dir}", "--colour"), code=2, names=("--colour",), usage=True),
        id="cli-unknown-option",
    ),
    pytest.param(
        Cli(
            ("migrate", "--dir", "{dir}", "--target", "abc"), code=2, names=("--target", "'abc'"), usage=True
        ),
        id="cli-target-abc",
    ),
    pytest.param(
        Cli(("rollback", "--to", "0", "--dir", "{dir}"), code=2, names=("every applied migration", "--yes")),
        id="cli-rollback-everything-unconfirmed",
    ),
    pytest.param(
        Cli(("baseline", "--dir", "{dir}"), code=2, names=("V",), usage=True),
        id="cli-baseline-without-version",
    ),
    pytest.param(
        Cli(("baseline", "one", "--dir", "{dir}"), code=2, names=("'one'",), usage=True),
        id="cli-baseline-word",
    ),
    pytest.param(
        Cli(("baseline", "1", "--dir", "{dir}"), code=2, names=("cannot baseline", "already records")),
        id="cli-baseline-on-a-migrated-database",
    ),
    pytest.param(
        Cli(("baseline", "7", "--dir", "{dir}"), code=2, names=("cannot baseline", "no migration 7")),
        id="cli-baseline-without-its-file",
    ),
    pytest.param(
        Cli(("rollback", "--dir", "{dir}", "--to", "last"), code=2, names=("--to", "'last'"), usage=True),
        id="cli-rollback-to-word",
    ),
    pytest.param(
        Cli(("migrate", "--dir", "{dir}", "--target", "-5"), code=2, names=("-5", "negative")),
        id="cli-target-negative",
    ),
    pytest.param(
        Cli(("rollback", "--dir", "{dir}", "--to", "-1"), code=2, names=("-1", "0 for all")),
        id="cli-rollback-to-negative",
    ),
    pytest.param(
        Cli(("rollback", "--dir", "{dir}", "--to", "99"), code=2, names=("99", "at version 1")),
        id="cli-rollback-to-above-the-current-version",
    ),
    pytest.param(
        Cli(
            ("migrate", "--dir", "{dir}", "--lock-timeout", "-1"),
            code=2,
            names=("--lock-timeout", "'-1'"),
            usage=True,
        ),
        id="cli-lock-timeout-negative",
    ),
    pytest.param(
        Cli(
            ("repair", "--dir", "{dir}", "--lock-timeout", "nan"),
            code=2,
            names=("--lock-timeout",),
            usage=True,
        ),
        id="cli-lock-timeout-nan",
    ),
    pytest.param(
        Cli(("serve", "--dir", "{dir}", "--port", "70000"), code=2, names=("--port", "'70000'"), usage=True),
        id="cli-serve-port-70000",
    ),
    pytest.param(
        Cli(("serve", "--dir", "{dir}", "--port", "-1"), code=2, names=("--port", "'-1'"), usage=True),
        id="cli-serve-port-negative",
    ),
    pytest.param(
        Cli(
            ("serve", "--dir", "{dir}", "--cache-ttl", "-1"),
            code=2,
            names=("--cache-ttl", "'-1'"),
            usage=True,
        ),
        id="cli-serve-cache-ttl-negative",
    ),
    pytest.param(
        serve("--host", "192.0.2.1", env={"POOL_PRESET": "testing"}, names=("'192.0.2.1'", "cannot listen")),
        id="cli-serve-host-not-on-this-machine",
    ),
    pytest.param(
        Cli(("demo", "--seconds", "-3"), code=2, names=("--seconds", "'-3'"), usage=True),
        id="cli-demo-seconds-negative",
    ),
    pytest.param(
        Cli(("new", "bad name", "--dir", "{dir}"), code=2, names=("'bad name'",)),
        id="cli-new-name-with-space",
    ),
    pytest.param(
        Cli(("new", "n" * 300, "--dir", "{dir}"), code=2, names=("300 characters", "too long", "shorten")),
        id="cli-new-name-300-characters",
    ),
    pytest.param(
        Cli(("new", "x", "--dir", "{file}"), code=2, names=("{file}", "not a directory")),
        id="cli-new-dir-is-a-file",
    ),
    pytest.param(
        Cli(("migrate", "--dir", "{file}"), code=2, names=("{file}", "not a directory")),
        id="cli-dir-is-a-file",
    ),
    pytest.param(
        Cli(("status", "--dir", "{missing}"), code=2, names=("{missing}", "does not exist")),
        id="cli-dir-missing",
    ),
]


def snapshot(directory: Path) -> dict[str, int]:
    """Return the migrations folder's file names and sizes (of links, not their targets)."""
    return {p.name: p.lstat().st_size for p in directory.iterdir()}


@pytest.mark.parametrize("case", CLI_CASES)
def test_bad_command_line_input_is_refused_in_one_line_and_changes_nothing(
    case: Cli, pg_server: PgServer, dsn: str, admin: Conn, seeded: Path, tmp_path: Path
) -> None:
    """A bad variable, DSN, file or argument exits with its documented code and one line naming it."""
    regular_file = tmp_path / "not-a-folder.sql"
    regular_file.write_text("SELECT 1;\n")
    values = {"dir": str(seeded), "file": str(regular_file), "missing": str(tmp_path / "nowhere"), "dsn": dsn}
    for name, content in case.files.items():
        write(seeded, name, content)
    if case.make is not None:
        case.make(seeded)
    files_before, before = snapshot(seeded), fingerprint(admin)
    env = {**ONE_ATTEMPT, **case.env}
    proc = run_pgops(
        *[arg.format(**values) for arg in case.args],
        database_url=None if case.url is None else case.url.format(**values),
        env={k: v.format(**values) for k, v in env.items()},
        cwd=tmp_path,
    )
    line = error_line(proc, usage=case.usage)
    assert proc.returncode == case.code, line
    for name in case.names:
        assert name.format(**values) in line, line
    if pg_server.password:
        assert pg_server.password not in proc.stdout + proc.stderr
    assert snapshot(seeded) == files_before
    assert fingerprint(admin) == before


# -- migrations that pgops applies although they look odd ------------------------------------------


def test_a_50_mb_migration_is_applied(dsn: str, admin: Conn, seeded: Path, tmp_path: Path) -> None:
    """A 50 MB file (one long string literal) is scanned, applied and reported in one line, not refused."""
    with (seeded / "0002_big.sql").open("w", encoding="utf-8") as fh:
        fh.write("CREATE TABLE big (body text NOT NULL);\nINSERT INTO big (body) VALUES ('")
        chunk = "it''s; -- not a comment /* nor this */ $$ " * 1000
        copies = -(-MB50 // len(chunk))  # rounded up: at least 50 MB
        for _ in range(copies):
            fh.write(chunk)
        fh.write("');\n")
    assert (seeded / "0002_big.sql").stat().st_size >= MB50
    proc = run_pgops("migrate", "--dir", str(seeded), database_url=dsn, env=ONE_ATTEMPT, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    # At most the announcement of a slow migration, never an error or a warning.
    assert proc.stderr in ("", "pgops: INFO: applying 0002_big.sql ...\n")
    assert re.match(r"^applied 0002_big\.sql \(\d+\.\d ms\)$", proc.stdout.splitlines()[0])
    with admin.cursor() as cur:
        cur.execute("SELECT length(body), body LIKE 'it''s; -- not%' FROM big")
        assert cur.fetchall() == [(copies * len(chunk.replace("''", "'")), True)]


SAFE_TRANSACTION_SQL = """\
-- Savepoints, SQL-standard bodies and PL/pgSQL blocks are not transaction control.
CREATE TABLE safe (id int PRIMARY KEY, note text);
SAVEPOINT before_rows;
INSERT INTO safe VALUES (1, 'dropped');
ROLLBACK TO SAVEPOINT before_rows;
INSERT INTO safe VALUES (2, 'kept');;
RELEASE SAVEPOINT before_rows;
CREATE FUNCTION safe_count() RETURNS bigint LANGUAGE sql
BEGIN ATOMIC
    SELECT count(*) FROM safe;
END;
DO $body$
BEGIN
    INSERT INTO safe VALUES (3, 'from a block; with END; inside');
END
$body$;
SELECT 'COMMIT; ROLLBACK;' AS not_control, "end" FROM (SELECT 1 AS "end") AS t;
"""


def test_safe_look_alikes_of_transaction_control_are_applied(
    dsn: str, admin: Conn, seeded: Path, tmp_path: Path
) -> None:
    """Savepoints, BEGIN ATOMIC, DO blocks, a stray ';' and no-transaction files with COMMIT all apply."""
    write(seeded, "0002_safe.sql", SAFE_TRANSACTION_SQL)
    write(
        seeded,
        "0003_own_transactions.sql",
        "-- pgops: no-transaction\nBEGIN;\nCREATE TABLE own (id int);\nCOMMIT;\n",
    )
    proc = run_pgops("migrate", "--dir", str(seeded), database_url=dsn, env=ONE_ATTEMPT, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    with admin.cursor() as cur:
        cur.execute("SELECT array_agg(id ORDER BY id), safe_count() FROM safe")
        assert cur.fetchone() == ([2, 3], 2)
        cur.execute("SELECT to_regclass('own') IS NOT NULL")
        assert cur.fetchone() == (True,)


# -- HTTP requests to the health app ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Http:
    """One bad request and the status (and error words) it must be answered with."""

    method: str
    path: str
    status: int
    error: str | None  # words the JSON body's "error" must hold; None for a normal answer
    query: str = ""
    authorization: str | None = None


def call(app: Any, case: Http) -> Reply:
    """Send one request to a WSGI app in-process through wsgiref.validate."""
    headers = {} if case.authorization is None else {"Authorization": case.authorization}
    return wsgi_call(app, case.path, case.method, headers, case.query)


NOT_ALLOWED, NOT_FOUND, NO_TOKEN = "method not allowed", "not found", "Authorization: Bearer"
BEARER = f"Bearer {TOKEN}"
# What a WSGI server hands over for a header sent as raw bytes 0x80-0xff: latin-1 decoded text.
HIGH_BYTES = bytes(range(0x80, 0x100)).decode("latin-1")

HTTP_CASES = [
    pytest.param(Http("POST", "/health/live", 405, NOT_ALLOWED), id="http-POST-live"),
    pytest.param(Http("PUT", "/health/ready", 405, NOT_ALLOWED), id="http-PUT-ready"),
    pytest.param(
        Http("DELETE", "/metrics", 405, NOT_ALLOWED, authorization=BEARER), id="http-DELETE-metrics"
    ),
    pytest.param(Http("PATCH", "/health/detailed", 405, NOT_ALLOWED), id="http-PATCH-detailed"),
    pytest.param(Http("OPTIONS", "/health/live", 405, NOT_ALLOWED), id="http-OPTIONS-live"),
    pytest.param(Http("TRACE", "/health/ready", 405, NOT_ALLOWED), id="http-TRACE-ready"),
    pytest.param(Http("POST", "/nowhere", 404, NOT_FOUND), id="http-POST-unknown-path"),
    pytest.param(Http("GET", "/", 404, NOT_FOUND), id="http-root"),
    pytest.param(Http("GET", "/health", 404, NOT_FOUND), id="http-health-without-route"),
    pytest.param(Http("GET", "/health/../metrics", 404, NOT_FOUND, authorization=BEARER), id="http-dot-dot"),
    pytest.param(Http("GET", "/health/live/../../metrics", 404, NOT_FOUND), id="http-dot-dot-twice"),
    pytest.param(Http("GET", "/health/live\x00", 404, NOT_FOUND), id="http-nul-in-path"),
    pytest.param(Http("GET", "/health/" + "a" * 10_000, 404, NOT_FOUND), id="http-10KB-path"),
    pytest.param(Http("HEAD", "/nowhere", 404, None), id="http-HEAD-unknown-path"),
    pytest.param(Http("HEAD", "/metrics", 401, None), id="http-HEAD-metrics-without-token"),
    pytest.param(
        Http("GET", "/health/live", 200, None, query="q=" + "x" * 10_240), id="http-10KB-query-live"
    ),
    pytest.param(
        Http("GET", "/metrics", 200, None, query="a=%00&b=" + "%ff" * 3_414, authorization=BEARER),
        id="http-10KB-query-metrics",
    ),
    pytest.param(Http("GET", "/metrics", 401, NO_TOKEN), id="http-metrics-no-authorization"),
    pytest.param(Http("GET", "/metrics", 401, NO_TOKEN, authorization="Basic dXNlcjpwdw=="), id="http-basic"),
    pytest.param(Http("GET", "/metrics", 401, NO_TOKEN, authorization="Bearer"), id="http-bearer-no-token"),
    pytest.param(
        Http("GET", "/metrics", 401, NO_TOKEN, authorization="Bearer " + "A" * 1_000_000),
        id="http-bearer-1MB",
    ),
    pytest.param(
        Http("GET", "/metrics", 401, NO_TOKEN, authorization="Bearer " + HIGH_BYTES),
        id="http-bearer-high-bytes",
    ),
    pytest.param(
        Http("GET", "/metrics", 401, NO_TOKEN, authorization="Bearer " + TOKEN[:-1] + "\u00e9"),
        id="http-bearer-non-ascii-last-char",
    ),
    pytest.param(
        Http("GET", "/metrics", 401, NO_TOKEN, authorization="Bearer \u2603\U0001f512"),
        id="http-bearer-beyond-latin-1",
    ),
    pytest.param(
        Http("GET", "/health/detailed", 200, None, authorization="Bearer " + HIGH_BYTES),
        id="http-detailed-bad-token-shows-status-only",
    ),
]


@pytest.fixture
def health(dsn: str, seeded: Path) -> Iterator[HealthApp]:
    """A HealthApp with a token and a real Migrator over a small pool on the seeded database."""
    with Pool(dsn, min_size=1, max_size=2, acquire_timeout=5, monitor_interval=0) as pool:
        yield HealthApp(pool, migrator=Migrator(pool, str(seeded)), token=TOKEN, cache_ttl=60.0)


@pytest.mark.parametrize("case", HTTP_CASES)
def test_bad_request_gets_its_status_and_a_one_line_json_error(
    case: Http, pg_server: PgServer, admin: Conn, health: HealthApp
) -> None:
    """A bad method, path, query string or Authorization header gets its status, JSON error and no change."""
    before = fingerprint(admin)
    reply = call(health, case)
    assert reply.status == case.status, reply
    assert reply.headers["Content-Type"].startswith(("application/", "text/plain"))
    assert b"Traceback" not in reply.body
    if pg_server.password:
        assert pg_server.password.encode() not in reply.body
    if case.status == 405:
        assert reply.headers["Allow"] == "GET, HEAD"
    if case.status == 401:
        assert reply.headers["WWW-Authenticate"].startswith("Bearer")
    if case.method == "HEAD":
        assert reply.body == b""
        assert int(reply.headers["Content-Length"]) > 0
    elif case.error is not None:
        assert b"\n" not in reply.body.strip()  # one line
        body = json.loads(reply.body)
        assert body["status"] == "fail"
        assert case.error in body["error"]
    elif case.path == "/health/detailed":
        assert json.loads(reply.body) == {"status": "pass"}  # the status only, no checks
    assert health.pool.stats()["pool_in_use"] == 0
    assert fingerprint(admin) == before
