"""`python -m pgops demo` and `serve`: end to end, as a user runs them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

import pgtest

ROOT = Path(__file__).resolve().parent.parent


def pgops_env(**extra: str) -> dict[str, str]:
    """Return an environment that imports the pgops under test."""
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


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
    done = subprocess.run(
        [sys.executable, "-m", "pgops", "demo", "--seconds", "2", "--port", "0", "--documents", "50"],
        cwd=ROOT, env=pgops_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
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


def test_demo_without_pgserver_says_what_to_install() -> None:
    """Without the embedded extra, the demo prints one line naming it and exits 2."""
    script = "import sys; sys.modules['pgserver'] = None; import pgops; sys.exit(pgops.main(['demo']))"
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=pgops_env(), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert (
        done.stderr.strip()
        == "pgops: error: the demo needs the embedded PostgreSQL: pip install 'pgops[embedded]'"
    )


def test_serve_command_answers_probes_and_stops_on_sigterm(dsn: str, tmp_path: Path) -> None:
    """`pgops serve --port 0` answers /health/ready, and SIGTERM stops it with exit 0."""
    log = tmp_path / "serve.log"
    env = pgops_env(DATABASE_URL=dsn, POOL_PRESET="testing")
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pgops", "serve", "--port", "0", "--dir", str(tmp_path / "none")],
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
