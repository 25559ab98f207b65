"""`python -m pgops demo` and `serve`: end to end, as a user runs them."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

import pgops
import pgtest
from pgtest import ROOT, pgops_argv, pgops_env, run_in_checkout, run_pgops


def postgres_processes_under(path: str) -> list[int]:
    """Return pids of running processes whose command line mentions *path*."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if path in cmdline and "postgres" in cmdline:
                pids.append(int(entry.name))
    return pids


def test_demo_runs_end_to_end_and_leaves_nothing_running() -> None:
    """The demo migrates, loads and searches embeddings, reports, serves 2 s, exits 0, stops PostgreSQL."""
    pytest.importorskip("pgserver")
    done = run_pgops("demo", "--seconds", "2", "--port", "0", "--documents", "50", timeout=300)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "applied 0002_documents.sql" in out
    assert "inserted 50 documents with 3072-dimension embeddings" in out
    assert "guide/0000.md  0.0" in out  # the noisy copy's nearest neighbour is the original
    assert '"status": "pass"' in out and "serving /health/live" in out
    assert "Traceback" not in done.stderr
    data_dir = out.split("pgvector in ", 1)[1].split()[0]
    assert not Path(data_dir).exists()
    assert postgres_processes_under(data_dir) == []


# The demo as it runs where pgserver has no wheel (Python 3.13+) or is not installed.
WITHOUT_PGSERVER = (
    "import sys; sys.modules['pgserver'] = None; import pgops; sys.exit(pgops.main(sys.argv[1:]))"
)


def test_demo_without_any_postgresql_says_what_to_install(tmp_path: Path) -> None:
    """Without pgserver and with no initdb/pg_config on PATH, the demo names the fixes in one line, exit 2."""
    done = run_in_checkout([sys.executable, "-c", WITHOUT_PGSERVER, "demo"], env={"PATH": str(tmp_path)})
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "pgops: error: the demo needs PostgreSQL: pip install pgserver (Python 3.10 to 3.12; from a "
        "checkout: pip install '.[embedded]'), or install the PostgreSQL server so that initdb and pg_ctl "
        "are on PATH or in `pg_config --bindir`"
    )


def test_no_message_points_at_an_unpublished_package() -> None:
    """No file tells users to install the embedded extra by the package's name: pgops is not on PyPI."""
    files = [ROOT / name for name in ("README.md", "pyproject.toml", "tox.ini", "pgops.py", ".ci/run")]
    files += sorted([*(ROOT / "tests").glob("*.py"), *(ROOT / "bench").glob("*")])
    unpublished = "pgops" + "[embedded]"  # in two parts, so that this file does not match itself
    assert [f.name for f in files if unpublished in f.read_text(encoding="utf-8")] == []


STARTED = re.compile(
    r"^starting a throwaway PostgreSQL from (\S+)( as the system user 'postgres')? in (\S+) ", re.M
)


def test_demo_falls_back_to_the_system_postgresql() -> None:
    """Without pgserver the demo runs on the system's initdb/pg_ctl, exits 0 and removes the cluster."""
    bindir = pgops._system_bindir()
    if bindir is None:
        pytest.skip("no system PostgreSQL (initdb and pg_ctl on PATH or in pg_config --bindir)")
    as_root = os.geteuid() == 0
    if as_root:
        import pwd

        try:
            pwd.getpwnam("postgres")  # the account the demo runs the server as
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' account to run the server")
    demo = ["demo", "--seconds", "1", "--port", "0", "--documents", "20"]
    done = run_in_checkout([sys.executable, "-c", WITHOUT_PGSERVER, *demo], timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    started = STARTED.search(out)
    assert started is not None, out
    assert started[1] == bindir and bool(started[2]) == as_root
    if _has_vector_extension():
        assert "inserted 20 documents with 3072-dimension embeddings" in out
        assert "guide/0000.md  0.0" in out
    else:
        assert re.search(
            r"^pgvector is not installed for this PostgreSQL \d+: skipping the migrations", out, re.M
        )
        assert "ran 16 pooled transactions from 16 threads" in out
        assert "0 applied or recorded, 3 pending" in out
    assert '"status": "pass"' in out and "serving /health/live" in out and "PostgreSQL stopped" in out
    assert "Traceback" not in done.stderr
    data_dir = started[3]
    assert not Path(data_dir).exists()
    assert postgres_processes_under(data_dir) == []


def _has_vector_extension() -> bool:
    """Tell whether pgvector is installed for the system's PostgreSQL (pg_config --sharedir)."""
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        return False
    sharedir = subprocess.run([pg_config, "--sharedir"], capture_output=True, text=True, check=True).stdout
    return (Path(sharedir.strip()) / "extension" / "vector.control").exists()


def test_serve_command_answers_probes_and_stops_on_sigterm(dsn: str, tmp_path: Path) -> None:
    """`pgops serve --port 0` answers /health/ready, and SIGTERM stops it with exit 0."""
    log = tmp_path / "serve.log"
    env = pgops_env(dsn, {"POOL_PRESET": "testing"})
    with log.open("wb") as out:
        proc = subprocess.Popen(
            pgops_argv("serve", "--port", "0", "--dir", str(tmp_path / "none")),
            cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
        )  # fmt: skip
    try:
        line = pgtest.wait_until(
            lambda: next((x for x in log.read_text().splitlines() if x.startswith("serving ")), None),
            timeout=60,
            message="serve did not start",
        )
        base = line.rsplit(" ", 1)[1]

        def ready() -> bool:
            try:
                with urllib.request.urlopen(base + "/health/ready", timeout=5) as response:
                    return bool(response.status == 200 and json.load(response)["status"] == "pass")
            except OSError:
                return False

        pgtest.wait_until(ready, timeout=30, message="ready never answered 200")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in log.read_text()
