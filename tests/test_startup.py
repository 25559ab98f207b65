"""Start-up cost: what ``import pgops`` and a ``pgops migrate`` run import (issue 14, item 7).

A deploy runs ``pgops migrate`` on every release, mostly with nothing to do, so each module it loads
for nothing is paid on every run. The figures live in bench/migrate_bench.py; these tests only keep
modules that no migration command needs out of the import.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pgops
from pgtest import run_in_checkout, run_pgops, write

# Imported by pgops for other commands, or for the type checker only: typing (about 5 ms a run),
# shutil (argparse's terminal width: 5 ms with bz2, lzma and fnmatch), the health server's modules,
# the demo's tempfile, hmac for a health token, psycopg2.extras for cursor factories.
NOT_FOR_MIGRATE = frozenset(
    {
        "typing",
        "shutil",
        "wsgiref.simple_server",
        "http.server",
        "socketserver",
        "tempfile",
        "hmac",
        "psycopg2.extras",
    }
)


def imported_by(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> set[str]:
    """Run ``python -X importtime ARGS`` on this checkout and return the modules it imported."""
    proc = run_in_checkout([sys.executable, "-X", "importtime", *args], env=env, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return {
        line.rsplit("|", 1)[1].strip()
        for line in proc.stderr.splitlines()
        if line.startswith("import time:") and "imported package" not in line
    }


def test_import_pgops_leaves_out_typing_argparse_and_the_health_server() -> None:
    """A library import loads neither typing, argparse nor anything only some commands use."""
    modules = imported_by("-c", "import pgops")
    assert "psycopg2" in modules
    assert modules & (NOT_FOR_MIGRATE | {"argparse"}) == set()


def test_migrate_imports_only_what_it_needs(dsn: str, mdir: Path, tmp_path: Path) -> None:
    """`pgops migrate`, applying and then with nothing to do, imports nothing it does not use."""
    write(mdir, "0001_first.sql", "CREATE TABLE first (id int);\n")
    write(mdir, "0002_second.sql", "INSERT INTO first VALUES (1);\n")
    for _ in range(2):
        modules = imported_by(
            "-m", "pgops", "migrate", "--dir", str(mdir), env={"DATABASE_URL": dsn}, cwd=tmp_path
        )
        assert {"argparse", "hashlib"} <= modules  # what it does need, so the listing is read right
        assert modules & NOT_FOR_MIGRATE == set()


def test_help_is_wrapped_to_the_columns_variable(tmp_path: Path) -> None:
    """Help text wraps to $COLUMNS, as argparse does by itself through shutil."""
    for columns in (50, 150):
        proc = run_pgops("migrate", "--help", env={"COLUMNS": str(columns)}, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        widest = max(len(line) for line in proc.stdout.splitlines())
        assert columns - 30 < widest <= columns - 2


def test_lazy_patterns_work_as_compiled_ones() -> None:
    """A pattern compiled on first use matches, substitutes and splits as re.compile's does."""
    lazy = pgops._regex(r"(?P<word>a+)", re.IGNORECASE)
    eager = re.compile(r"(?P<word>a+)", re.IGNORECASE)
    assert "match" not in vars(lazy)  # nothing compiled yet
    assert lazy.match("AAb").span() == eager.match("AAb").span()
    assert lazy.search("xyz") is None
    assert lazy.sub("-", "xaAyA") == "x-y-"
    assert [m.group("word") for m in lazy.finditer("a b AA")] == ["a", "AA"]
    assert lazy.split("xay") == eager.split("xay")
    assert (lazy.pattern, lazy.flags) == (eager.pattern, eager.flags)
    assert "match" in vars(lazy)  # kept: the next call goes to the compiled pattern directly
    assert "(?P<word>a+)" in repr(lazy)
