"""Migration speed: pgops against yoyo-migrations and the floor, as ratios in one run.

For each workload (500 migrations that each CREATE a table, and 500 that each INSERT one row) every
contender applies all of them to a fresh, empty database; then each CLI re-runs with nothing to do.

- floor: one psycopg2 connection: take an advisory lock, then per migration BEGIN, the file's SQL,
  an INSERT into a history table, COMMIT. The least any correct migrator can do.
- pgops API: ``Migrator(dsn, dir).migrate()``; pgops CLI: ``python -m pgops migrate``.
- yoyo API: ``backend.apply_migrations(backend.to_apply(read_migrations(dir)))`` under its lock;
  yoyo CLI: ``yoyo apply --batch``.
- no-op floor: ``python -c "import psycopg2; psycopg2.connect(...)"``, what any CLI run must pay.

The server is a throwaway LocalServer (tests/pgtest.py) over TCP on 127.0.0.1. Each figure is the
median of --rounds runs; contenders run interleaved in each round. Results are never asserted in tests.

    python bench/migrate_bench.py [--count 500] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psycopg2

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import pgops  # noqa: E402
from pgtest import LocalServer  # noqa: E402

WORKLOADS = {
    "DDL (CREATE TABLE each)": "CREATE TABLE t{n} (id bigint PRIMARY KEY, body text);\n",
    "insert-only (INSERT each)": "INSERT INTO ledger (n) VALUES ({n});\n",
}


def write_migrations(directory: Path, count: int, template: str) -> None:
    """Write *count* numbered migrations (the first creates the ledger table the inserts use)."""
    directory.mkdir()
    (directory / "0000_ledger.sql").write_text("CREATE TABLE ledger (n int PRIMARY KEY);\n")
    for n in range(1, count + 1):
        (directory / f"{n:04d}_step.sql").write_text(template.format(n=n))


def fresh_database(server: LocalServer, name: str) -> str:
    """Create an empty database and return its DSN (dropping an older one of that name)."""
    with contextlib.closing(server.admin_connect()) as conn, conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        cur.execute(f"CREATE DATABASE {name}")
    return server.dsn(name)


def url_of(server: LocalServer, name: str) -> str:
    return f"postgresql://postgres:{server.password}@127.0.0.1:{server.port}/{name}"


def floor(dsn: str, directory: Path) -> None:
    """Apply the folder the cheapest correct way: one connection, lock, BEGIN/file/history/COMMIT."""
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    cur = conn.cursor()
    cur.execute("SELECT pg_advisory_lock(1)")
    cur.execute("CREATE TABLE IF NOT EXISTS history (version int PRIMARY KEY, checksum text)")
    for path in sorted(directory.glob("*.sql")):
        text = path.read_text()
        cur.execute("BEGIN")
        cur.execute(text)
        checksum = pgops.migration_checksum(text)
        cur.execute("INSERT INTO history VALUES (%s, %s)", (int(path.name[:4]), checksum))
        cur.execute("COMMIT")
    cur.execute("SELECT pg_advisory_unlock(1)")
    conn.close()


def yoyo_api(url: str, directory: Path) -> None:
    from yoyo import get_backend, read_migrations

    backend = get_backend(url)
    migrations = read_migrations(str(directory))
    with backend.lock():
        backend.apply_migrations(backend.to_apply(migrations))
    backend.connection.close()


def run_cli(args: list[str]) -> None:
    # Let Python cache pgops' bytecode as an installed package has it; otherwise every run recompiles it.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = str(ROOT)
    subprocess.run(args, check=True, env=env, capture_output=True, timeout=900)


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_workload(server: LocalServer, directory: Path, rounds: int) -> dict[str, list[float]]:
    """Return seconds per contender for a full apply and for the CLI no-op re-runs."""
    yoyo = str(Path(sys.executable).with_name("yoyo"))
    times: dict[str, list[float]] = {}
    for _ in range(rounds):
        runs: dict[str, Callable[[], None]] = {}
        dsn = fresh_database(server, "b_floor")
        runs["floor"] = lambda dsn=dsn: floor(dsn, directory)
        dsn = fresh_database(server, "b_pgops_api")
        runs["pgops API"] = lambda dsn=dsn: pgops.Migrator(dsn, str(directory)).migrate() and None
        cli_dsn = fresh_database(server, "b_pgops_cli")
        runs["pgops CLI"] = lambda cli_dsn=cli_dsn: run_cli(
            [sys.executable, "-m", "pgops", "migrate", "-q", "--dsn", cli_dsn, "--dir", str(directory)]
        )
        fresh_database(server, "b_yoyo_api")
        runs["yoyo API"] = lambda: yoyo_api(url_of(server, "b_yoyo_api"), directory)
        fresh_database(server, "b_yoyo_cli")
        yoyo_url = url_of(server, "b_yoyo_cli")
        runs["yoyo CLI"] = lambda yoyo_url=yoyo_url: run_cli(
            [yoyo, "apply", "--batch", "--database", yoyo_url, str(directory)]
        )
        for name, fn in runs.items():
            times.setdefault(name, []).append(timed(fn))
        noop = {
            "no-op floor (connect)": lambda cli_dsn=cli_dsn: run_cli(
                [sys.executable, "-c", f"import psycopg2; psycopg2.connect({cli_dsn!r}).close()"]
            ),
            "no-op pgops CLI": runs["pgops CLI"],
            "no-op yoyo CLI": runs["yoyo CLI"],
        }
        for name, fn in noop.items():
            times.setdefault(name, []).append(timed(fn))
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pgops-migrate-bench-") as tmp:
        server = LocalServer(Path(tmp) / "pg")
        try:
            server.start()
            print(f"{args.count} migrations, median of {args.rounds} rounds, PostgreSQL on 127.0.0.1 (TCP)\n")
            print("| workload | contender | seconds | ratio |")
            print("|---|---|---:|---:|")
            for label, template in WORKLOADS.items():
                directory = Path(tmp) / f"m{len(label)}"
                write_migrations(directory, args.count, template)
                times = bench_workload(server, directory, args.rounds)
                medians = {name: statistics.median(values) for name, values in times.items()}
                for name, seconds in medians.items():
                    base = medians["no-op floor (connect)"] if name.startswith("no-op") else medians["floor"]
                    print(f"| {label} | {name} | {seconds:.3f} | {seconds / base:.2f}x |")
        finally:
            server.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
