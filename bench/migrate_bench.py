"""Migration speed: pgops against yoyo-migrations and the floor, as ratios in one run.

For each workload (--count migrations, 200 by default, that each CREATE a table, or each INSERT one
row) every contender applies all of them to a fresh, empty database; then each CLI re-runs with
nothing to do (--noop-runs times per round).

- floor: one psycopg2 connection: take an advisory lock, then per migration BEGIN, the file's SQL,
  an INSERT into a history table, COMMIT. The least any correct migrator can do.
- pgops API: ``Migrator(dsn, dir).migrate()``; pgops CLI: ``python -m pgops migrate``.
- yoyo API: ``backend.apply_migrations(backend.to_apply(read_migrations(dir)))`` under its lock;
  yoyo CLI: ``yoyo apply --batch``.
- no-op floor: ``python -c "import psycopg2; psycopg2.connect(...)"``, what any CLI run must pay.

Start-up counts for a CLI, so every command runs with its bytecode cached as an installed package
has it: pgops.py is copied into a scratch site folder and compiled there (as pip does on install),
the commands run with PYTHONDONTWRITEBYTECODE=1 from that folder (so that ``-m pgops`` cannot pick
up the checkout's pgops.py, and nothing is recompiled or written while timed), and the script checks
that pgops, psycopg2 and yoyo each have an up-to-date .pyc before it starts.

Two ratios are the issue's targets (issue 14): a no-op ``pgops migrate`` at most 1.5x the bare
connect, and the insert-only workload through the pgops CLI at most 2x the in-process floor. Both
are printed last, as medians of the per-round ratios, with yoyo's for comparison, and for the no-op
also as a ratio of client CPU time (user + system of the command), which moves less than wall time
when other programs share the machine.

The server is a throwaway LocalServer (tests/pgtest.py) over TCP on 127.0.0.1. Each figure is the
median of --rounds runs; contenders run interleaved in each round. Results are never asserted in tests.

    python bench/migrate_bench.py [--count 200] [--rounds 5] [--noop-runs 5]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import py_compile
import resource
import shutil
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


def install(site: Path) -> dict[str, str]:
    """Put pgops.py into *site* compiled as pip installs it; return the environment to run commands in.

    PYTHONDONTWRITEBYTECODE=1: a command that found no valid .pyc would compile its source on every
    run and write nothing, which check_bytecode() rules out beforehand.
    """
    site.mkdir()
    shutil.copy2(ROOT / "pgops.py", site / "pgops.py")
    py_compile.compile(str(site / "pgops.py"), doraise=True)  # timestamp-checked, like pip's compileall
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(PYTHONPATH=str(site), PYTHONDONTWRITEBYTECODE="1")
    return env


def check_bytecode(env: dict[str, str], cwd: Path) -> None:
    """Fail unless pgops (the site folder's), psycopg2 and yoyo each load from an up-to-date .pyc."""
    # python -v says "# <pyc> matches <source>" for each module whose cached bytecode it uses.
    verbose = subprocess.run(
        [sys.executable, "-v", "-c", "import pgops, psycopg2, yoyo"],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
    ).stderr
    site = env["PYTHONPATH"]
    for source in (
        os.path.join(site, "pgops.py"),
        os.path.join(os.path.dirname(psycopg2.__file__), "__init__.py"),
        os.path.join(os.path.dirname(importlib.util.find_spec("yoyo").origin or ""), "__init__.py"),
    ):
        if f" matches {source}\n" not in verbose:
            raise SystemExit(f"{source} does not load from cached bytecode; run compileall on its folder")


def run_cli(args: list[str], env: dict[str, str], cwd: Path) -> None:
    subprocess.run(args, check=True, env=env, cwd=cwd, capture_output=True, timeout=900)


def cpu_seconds() -> float:
    """Return the CPU time of this process and of its finished children: the client side of a run."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def timed(fn: Callable[[], None]) -> tuple[float, float]:
    """Return the wall time and the client's CPU time of one call (in process or a command's)."""
    cpu, start = cpu_seconds(), time.perf_counter()
    fn()
    return time.perf_counter() - start, cpu_seconds() - cpu


def bench_workload(
    server: LocalServer, directory: Path, rounds: int, noop_runs: int, env: dict[str, str], cwd: Path
) -> list[dict[str, tuple[float, float]]]:
    """Return, per round, (wall, CPU) seconds per contender for a full apply and the CLI no-op re-runs."""
    yoyo = str(Path(sys.executable).with_name("yoyo"))
    results: list[dict[str, tuple[float, float]]] = []
    for _ in range(rounds):
        runs: dict[str, Callable[[], None]] = {}
        dsn = fresh_database(server, "b_floor")
        runs["floor"] = lambda dsn=dsn: floor(dsn, directory)
        dsn = fresh_database(server, "b_pgops_api")
        runs["pgops API"] = lambda dsn=dsn: pgops.Migrator(dsn, str(directory)).migrate() and None
        cli_dsn = fresh_database(server, "b_pgops_cli")
        args = ["migrate", "-q", "--dsn", cli_dsn, "--dir", str(directory)]
        pgops_cli = [sys.executable, "-m", "pgops", *args]
        runs["pgops CLI"] = lambda cmd=pgops_cli: run_cli(cmd, env, cwd)
        fresh_database(server, "b_yoyo_api")
        runs["yoyo API"] = lambda: yoyo_api(url_of(server, "b_yoyo_api"), directory)
        fresh_database(server, "b_yoyo_cli")
        yoyo_cli = [yoyo, "apply", "--batch", "--database", url_of(server, "b_yoyo_cli"), str(directory)]
        runs["yoyo CLI"] = lambda cmd=yoyo_cli: run_cli(cmd, env, cwd)
        times = {name: timed(fn) for name, fn in runs.items()}
        connect = [sys.executable, "-c", f"import psycopg2; psycopg2.connect({cli_dsn!r}).close()"]
        noop = {
            "no-op floor (connect)": lambda cmd=connect: run_cli(cmd, env, cwd),
            "no-op pgops CLI": runs["pgops CLI"],
            "no-op yoyo CLI": runs["yoyo CLI"],
        }
        samples: dict[str, list[tuple[float, float]]] = {}
        for _ in range(noop_runs):  # interleaved, so that a noisy moment hits all three alike
            for name, fn in noop.items():
                samples.setdefault(name, []).append(timed(fn))
        for name, values in samples.items():
            times[name] = statistics.median(w for w, _ in values), statistics.median(c for _, c in values)
        results.append(times)
    return results


def base_of(name: str) -> str:
    return "no-op floor (connect)" if name.startswith("no-op") else "floor"


def ratio(
    results: list[dict[str, tuple[float, float]]], name: str, cpu: bool = False
) -> tuple[float, float, float]:
    """Return the median, lowest and highest of the per-round ratios of *name* to its base."""
    ratios = [r[name][cpu] / r[base_of(name)][cpu] for r in results]
    return statistics.median(ratios), min(ratios), max(ratios)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200, help="migrations per workload (default 200)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--noop-runs", type=int, default=5, help="no-op runs per CLI and round (default 5)")
    args = parser.parse_args()
    targets: list[tuple[str, str, str, float]] = []
    with tempfile.TemporaryDirectory(prefix="pgops-migrate-bench-") as tmp:
        env = install(Path(tmp) / "site")
        check_bytecode(env, Path(tmp))
        server = LocalServer(Path(tmp) / "pg")
        try:
            server.start()
            print(
                f"{args.count} migrations, median of {args.rounds} rounds ({args.noop_runs} no-op runs "
                "each), PostgreSQL on 127.0.0.1 (TCP), bytecode cached\n"
            )
            print("| workload | contender | seconds | ratio (median of rounds) | range |")
            print("|---|---|---:|---:|---:|")
            for label, template in WORKLOADS.items():
                directory = Path(tmp) / f"m{len(label)}"
                write_migrations(directory, args.count, template)
                results = bench_workload(server, directory, args.rounds, args.noop_runs, env, Path(tmp))
                for name in results[0]:
                    seconds = statistics.median(r[name][0] for r in results)
                    mid, low, high = ratio(results, name)
                    print(f"| {label} | {name} | {seconds:.3f} | {mid:.2f}x | {low:.2f}-{high:.2f}x |")
                if label.startswith("insert-only"):
                    targets += [
                        ("no-op migrate vs bare connect", "pgops CLI", "no-op pgops CLI", 1.5),
                        ("", "yoyo CLI", "no-op yoyo CLI", 0.0),
                        (f"{args.count} insert-only via CLI vs floor", "pgops CLI", "pgops CLI", 2.0),
                        ("", "yoyo CLI", "yoyo CLI", 0.0),
                    ]
                    insert_results = results
        finally:
            server.cleanup()
    # A no-op run is start-up, CPU-bound on both sides: the CPU time ratio moves less than the wall
    # time one when other programs share the machine. (Not for an apply: the in-process floor's CPU
    # leaves out the server's work, which is most of it.)
    print("\nIssue 14 targets (insert-only folder), wall time:")
    for what, who, name, limit in targets:
        mid, low, high = ratio(insert_results, name)
        cpu = (
            f" [CPU time {ratio(insert_results, name, cpu=True)[0]:.2f}x]" if name.startswith("no-op") else ""
        )
        verdict = f"target <= {limit}x: {'met' if mid <= limit else 'NOT met'}" if limit else "for comparison"
        print(f"  {what:38s} {who:10s} {mid:.2f}x (rounds {low:.2f}-{high:.2f}x){cpu}  {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
