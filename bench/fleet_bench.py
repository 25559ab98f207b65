"""Fleet migrations: many `python -m pgops migrate` processes at once, direct and behind PgBouncer.

Each round applies the same folder of migrations to a fresh database in three ways:

- 1 process, direct connection: the baseline wall time;
- 20 processes at once, direct (every Kubernetes replica's init container starting together);
- 8 processes at once through PgBouncer in transaction mode, pool_size 4 (DATABASE_URL at the pooler).

The folder has 30 migrations (--migrations): each records its version in a `ran` table, some sleep
0.2-0.5 s, and one is a `-- pgops: no-transaction` CREATE INDEX CONCURRENTLY. After each run the
script checks, on a direct connection: each migration ran exactly once (`ran` and the history table),
how many advisory locks are left in the database, and whether a direct `migrate` right after exits 0
without waiting. It reports wall time against the single process, the exit codes seen and those checks.

The server is a throwaway LocalServer (tests/pgtest.py) on 127.0.0.1, PgBouncer the system's binary run
by tests/pgbouncer.py (skipped, with the reason, when it is not installed). Results are never asserted.

    python bench/fleet_bench.py [--rounds 3] [--migrations 30] [--direct 20] [--bouncer 8] [--pool-size 4]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from pgbouncer import PgBouncer, find_pgbouncer  # noqa: E402
from pgtest import LocalServer, temporary_database  # noqa: E402

SLOW = {4: 0.2, 9: 0.5, 14: 0.3, 19: 0.4, 24: 0.2, 28: 0.5}  # version: seconds of pg_sleep
CONCURRENT = 16  # the no-transaction CREATE INDEX CONCURRENTLY


def write_migrations(directory: Path, count: int) -> None:
    """Write migrations 1..count, each inserting its version into `ran` (created by the first)."""
    directory.mkdir(parents=True)
    first = "CREATE TABLE ran (version int NOT NULL);\nINSERT INTO ran VALUES (1);\n"
    (directory / "0001_ran.sql").write_text(first)
    for v in range(2, count + 1):
        if v == CONCURRENT:
            text = (
                "-- pgops: no-transaction\n"
                "CREATE INDEX CONCURRENTLY IF NOT EXISTS ran_version ON ran (version);\n"
                f"INSERT INTO ran VALUES ({v});\n"
            )
            name = f"{v:04d}_ran_index.sql"
        elif v in SLOW:
            text = f"SELECT pg_sleep({SLOW[v]});\nINSERT INTO ran VALUES ({v});\n"
            name = f"{v:04d}_slow.sql"
        else:
            text = f"CREATE TABLE t{v} (id int);\nINSERT INTO ran VALUES ({v});\n"
            name = f"{v:04d}_step.sql"
        (directory / name).write_text(text)


def pgops_env(database_url: str) -> dict[str, str]:
    """The environment of one migrate process: this checkout's pgops, DATABASE_URL, nothing else of ours."""
    cleared = ("DATABASE_URL", "PGOPS_", "DB_RETRY_", "POOL_", "APP_NAME", "PG")
    env = {k: v for k, v in os.environ.items() if not k.startswith(cleared)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # let Python cache pgops' bytecode, as an install would
    env["PYTHONPATH"] = str(ROOT)
    env["DATABASE_URL"] = database_url
    return env


@dataclass
class Outcome:
    """What one scenario did over the rounds."""

    seconds: list[float] = field(default_factory=list)
    exits: collections.Counter[int] = field(default_factory=collections.Counter)
    exactly_once: int = 0
    locks_left: list[int] = field(default_factory=list)
    rerun_clean: int = 0
    rounds: int = 0
    first_error: str = ""


def run_migrators(
    url: str, directory: Path, n: int, lock_timeout: float
) -> tuple[float, list[tuple[int, str]]]:
    """Start n migrate processes at once; return the wall time until the last exits, and (code, stderr)."""
    command = [sys.executable, "-m", "pgops", "migrate", "-q", "--dir", str(directory)]
    command += ["--lock-timeout", str(lock_timeout)]
    env = pgops_env(url)
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(n)
    ]
    results = []
    try:
        for proc in procs:
            _, stderr = proc.communicate(timeout=lock_timeout + 120)
            results.append((proc.returncode, stderr))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return time.perf_counter() - started, results


def check(server: LocalServer, db: str, count: int) -> tuple[bool, int]:
    """Return (each migration ran once and is recorded applied, advisory locks left in db)."""
    with contextlib.closing(server.admin_connect(db)) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
        locks = int((cur.fetchone() or (0,))[0])
        cur.execute("SELECT to_regclass('ran') IS NOT NULL AND to_regclass('migration_history') IS NOT NULL")
        if not (cur.fetchone() or (False,))[0]:
            return False, locks
        cur.execute("SELECT version, count(*) FROM ran GROUP BY 1 ORDER BY 1")
        ran = cur.fetchall()
        cur.execute("SELECT version, status FROM migration_history ORDER BY 1")
        history = [(int(v), s) for v, s in cur.fetchall()]
    versions = range(1, count + 1)
    once = ran == [(v, 1) for v in versions] and history == [(v, "applied") for v in versions]
    return once, locks


UrlOf = Callable[[str], str]


def scenario(
    server: LocalServer,
    outcome: Outcome,
    url_of: UrlOf,
    directory: Path,
    n: int,
    count: int,
    lock_timeout: float,
) -> None:
    """One round of one scenario on a fresh database."""
    with temporary_database(server, prefix="fleet_bench_") as db:
        seconds, results = run_migrators(url_of(db), directory, n, lock_timeout)
        outcome.rounds += 1
        outcome.seconds.append(seconds)
        for code, stderr in results:
            outcome.exits[code] += 1
            if code != 0 and not outcome.first_error:
                outcome.first_error = f"exit {code}: {(stderr.strip().splitlines() or [''])[-1][:300]}"
        once, locks = check(server, db, count)
        outcome.exactly_once += once
        outcome.locks_left.append(locks)
        # A direct run right after exits 0 at once: it must not wait for a lock left on a pooled connection.
        _, rerun = run_migrators(server.url(db), directory, 1, lock_timeout=5)
        code, stderr = rerun[0]
        outcome.rerun_clean += code == 0 and "waiting" not in stderr


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--migrations", type=int, default=30)
    parser.add_argument("--direct", type=int, default=20, help="concurrent processes on direct connections")
    parser.add_argument("--bouncer", type=int, default=8, help="concurrent processes through PgBouncer")
    parser.add_argument("--pool-size", type=int, default=4, help="PgBouncer default_pool_size")
    parser.add_argument(
        "--ignore-options",
        action="store_true",
        help="let PgBouncer ignore the `options` startup parameter (by default it refuses it, as shipped)",
    )
    parser.add_argument("--lock-timeout", type=float, default=300.0)
    args = parser.parse_args()
    if args.migrations < CONCURRENT:
        parser.error(f"--migrations must be at least {CONCURRENT}")
    binary = find_pgbouncer()
    with tempfile.TemporaryDirectory(prefix="pgops-fleet-bench-") as tmp:
        directory = Path(tmp) / "migrations"
        write_migrations(directory, args.migrations)
        server = LocalServer(Path(tmp) / "pg")
        bouncer: PgBouncer | None = None
        try:
            server.start()
            scenarios: dict[str, tuple[UrlOf, int]] = {
                "1 process, direct": (server.url, 1),
                f"{args.direct} processes, direct": (server.url, args.direct),
            }
            if binary is not None:
                ignored = "extra_float_digits,options" if args.ignore_options else "extra_float_digits"
                bouncer = PgBouncer(
                    server,
                    pool_mode="transaction",
                    pool_size=args.pool_size,
                    ignore_startup_parameters=ignored,
                    binary=binary,
                )
                bouncer.start()
                label = f"{args.bouncer} processes, PgBouncer transaction pool {args.pool_size}"
                scenarios[label] = (bouncer.url, args.bouncer)
            outcomes = {label: Outcome() for label in scenarios}
            for _ in range(args.rounds):
                for label, (url_of, n) in scenarios.items():  # interleaved, so drift hits every scenario
                    outcome = outcomes[label]
                    scenario(server, outcome, url_of, directory, n, args.migrations, args.lock_timeout)
            report(args, outcomes, binary)
        finally:
            if bouncer is not None:
                bouncer.cleanup()
            server.cleanup()
    return 0


def report(args: argparse.Namespace, outcomes: dict[str, Outcome], binary: str | None) -> None:
    version = "not installed: apt-get install pgbouncer"
    if binary is not None:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
        version = (out.stdout.splitlines() or ["?"])[0]
    slept = sum(SLOW.values())
    print(
        f"{args.migrations} migrations ({len(SLOW)} sleeping {slept:.1f} s in all, "
        "1 CREATE INDEX CONCURRENTLY), "
        f"{args.rounds} round(s), median wall time; PostgreSQL on 127.0.0.1; {version}"
        + ("" if not args.ignore_options else "; PgBouncer ignores `options`")
        + "\n"
    )
    print("| scenario | wall s | vs 1 process | exit codes (code×count) | exactly once | advisory locks left "
          "| direct rerun 0, no wait |")  # fmt: skip
    print("|---|---:|---:|---|---:|---:|---:|")
    base = statistics.median(next(iter(outcomes.values())).seconds)
    for label, o in outcomes.items():
        wall = statistics.median(o.seconds)
        exits = ", ".join(f"{code}×{count}" for code, count in sorted(o.exits.items()))
        print(
            f"| {label} | {wall:.2f} | {wall / base:.2f}x | {exits} | {o.exactly_once}/{o.rounds} "
            f"| {sum(o.locks_left)} (max {max(o.locks_left)}) | {o.rerun_clean}/{o.rounds} |"
        )
    errors = [(label, o.first_error) for label, o in outcomes.items() if o.first_error]
    if errors:
        print("\nfirst failure per scenario:")
        for label, error in errors:
            print(f"- {label}: {error}")


if __name__ == "__main__":
    sys.exit(main())
