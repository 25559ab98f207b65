"""README.md's Python blocks run as written, each against a fresh database of the test server.

Each ```python block runs in a fresh interpreter with `DATABASE_URL` set to a database of its own,
migrated with the repository's migrations/ (the README's examples use the Doc Server's tables), and
with its working directory a temporary one holding a copy of migrations/. A block that defines a
WSGI `app` then gets one request for `/` and one for `/health/live`, both expected to answer 200.
A block that cannot run anywhere but in production is preceded in README.md by
`<!-- not run: <reason> -->` and skipped with that reason.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pgops import Migrator
from pgtest import ROOT, PgServer, pgops_env

README = ROOT / "README.md"

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)\s*(?P<info>[^`]*)$")
_NOT_RUN = re.compile(r"^\s*<!--\s*not run:\s*(?P<reason>.*?)\s*-->\s*$")

# Run in the child: the block as if it were a file whose line numbers are README's (so a traceback
# names the README line), then one request to a WSGI app the block defined.
_RUNNER = """
import sys
import pgtest
path, readme, first = sys.argv[1], sys.argv[2], int(sys.argv[3])
code = "\\n" * (first - 1) + open(path, encoding="utf-8").read()
namespace = {"__name__": "__main__"}
exec(compile(code, readme, "exec"), namespace)
app = namespace.get("app")
if callable(app):
    for route in ("/", "/health/live"):
        reply = pgtest.wsgi_call(app, route)
        assert reply.status == 200, f"app answered {reply.status} to GET {route}: {reply.body!r}"
"""


@dataclasses.dataclass(frozen=True)
class Block:
    """One fenced Python block of a Markdown file."""

    line: int  # the opening fence's line, 1-based
    code: str  # dedented; its first line is the fence's next line
    skip: str | None  # the reason given by a `<!-- not run: ... -->` marker just before the fence


def python_blocks(text: str) -> list[Block]:
    """Return the ```python blocks of Markdown text, with their line numbers and skip markers."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence = opening["fence"]
        end = i + 1
        while end < len(lines) and lines[end].strip() != fence:
            end += 1
        if opening["info"].split()[:1] == ["python"]:
            previous = next((line for line in reversed(lines[:i]) if line.strip()), "")
            marker = _NOT_RUN.match(previous)
            if marker and not marker["reason"]:
                raise ValueError(f"line {i + 1}: `<!-- not run: -->` needs a reason after the colon")
            code = textwrap.dedent("\n".join(lines[i + 1 : end]) + "\n")
            blocks.append(Block(i + 1, code, marker["reason"] if marker else None))
        i = end + 1
    return blocks


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def numbered(block: Block) -> str:
    """Return the block's code with README's line numbers, for a failure message."""
    return "\n".join(f"{block.line + n:4}  {line}" for n, line in enumerate(block.code.splitlines(), 1))


def test_python_blocks_are_found() -> None:
    """The README has Python blocks, and the indented one in a list item is among them."""
    assert len(BLOCKS) >= 5
    assert any("pool.current_lsn()" in block.code for block in BLOCKS)
    assert all(not block.code.startswith((" ", "\t")) for block in BLOCKS)


def test_markers_and_fences_are_read_as_documented() -> None:
    """A marker skips only the next block, with its reason; other languages and nested fences are left out."""
    text = textwrap.dedent(
        """\
        <!-- not run: needs gunicorn -->

        ```python
        import gunicorn
        ```

        ````markdown
        ```python
        not a block of this file
        ```
        ````

        - a list item:

          ```python
          x = 1
          ```
        ```sh
        python -m pgops status
        ```
        """
    )
    blocks = python_blocks(text)
    assert blocks == [Block(3, "import gunicorn\n", "needs gunicorn"), Block(15, "x = 1\n", None)]
    with pytest.raises(ValueError, match="needs a reason"):
        python_blocks("<!-- not run: -->\n```python\npass\n```\n")


@pytest.mark.parametrize("block", BLOCKS, ids=[f"line{block.line}" for block in BLOCKS])
def test_readme_block_runs(
    block: Block, pg_server: PgServer, dbname: str, pgvector: None, tmp_path: Path
) -> None:
    """The block runs to the end, exit 0, against a fresh database migrated with migrations/ (pgvector)."""
    if block.skip:
        pytest.skip(f"README.md:{block.line} is marked not run: {block.skip}")
    shutil.copytree(ROOT / "migrations", tmp_path / "migrations")
    Migrator(pg_server.dsn(dbname), str(tmp_path / "migrations")).migrate()
    script = tmp_path / "block.py"
    script.write_text(block.code, encoding="utf-8")
    # Only the variables set here reach the block, never the caller's own; pgtest is on the path.
    env = pgops_env(pg_server.url(dbname), {"PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])})
    done = subprocess.run(
        [sys.executable, "-c", _RUNNER, str(script), str(README), str(block.line + 1)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    status = done.returncode
    assert status == 0, (
        f"README.md:{block.line}: the block failed (exit {status})\n{numbered(block)}\n"
        f"--- stdout ---\n{done.stdout}--- stderr ---\n{done.stderr}"
    )


def error_rows(text: str) -> list[tuple[str, list[str], str]]:
    """Return README's error table as (class, parents, exit code) rows, in their order."""
    section = text.split("\n## Errors\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`"):
            parents = re.findall(r"`([\w.]+)`", cells[1])
            rows.append((cells[0].strip("`"), parents, cells[3]))
    return rows


def test_readme_error_table_is_the_error_tree() -> None:
    # Every exception class pgops exports is in the table, with its true parents and CLI exit code.
    import builtins

    import psycopg2.errors
    import psycopg2.pool

    import pgops

    rows = error_rows(README.read_text(encoding="utf-8"))
    exported = {name for name in pgops.__all__ if isinstance(getattr(pgops, name), type)}
    errors = {name for name in exported if issubclass(getattr(pgops, name), Exception)}
    assert {name for name, _, _ in rows} == errors
    where = {"psycopg2": psycopg2, "psycopg2.pool": psycopg2.pool, "psycopg2.errors": psycopg2.errors}
    for name, parents, exit_code in rows:
        kind = getattr(pgops, name)
        for parent in parents:
            module, _, attr = parent.rpartition(".")
            base = getattr(where[module], attr) if module else getattr(pgops, attr, None)
            base = base or getattr(builtins, attr)
            assert issubclass(kind, base), f"README says {name} is a {parent}"
        if exit_code:
            code = next((code for base, code in pgops._EXIT_CODES if issubclass(kind, base)), 1)
            assert code == int(exit_code), f"README's exit code for {name}"
