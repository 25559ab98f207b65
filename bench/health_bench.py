"""Health endpoint cost: in process against a trivial WSGI app, and over HTTP with wrk against gunicorn.

1. In process: calls per second of a cached ``GET /health/ready`` on ``HealthApp`` against a WSGI app
   that only answers ``200 ok``; both called directly with the same environ. Target: at most 2x.
2. Over HTTP: ``wrk -t2 -c32 -d10s`` against ``gunicorn 'pgops:create_app()'`` (2 sync workers,
   cache TTL 5 s) on /health/ready: requests/s, p99 latency, and the database work it caused, counted
   on the server as transactions in pg_stat_database (each check is one; a connection check before
   a check is another). Target: at most one check per TTL per worker.

The server is a throwaway LocalServer (tests/pgtest.py) on 127.0.0.1; wrk is Debian's package.
Results are printed as markdown and never asserted in tests.

    python bench/health_bench.py [--calls 200000] [--seconds 10]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import pgops  # noqa: E402
from pgtest import LocalServer, free_port, wait_until  # noqa: E402

ENVIRON = {
    "REQUEST_METHOD": "GET",
    "PATH_INFO": "/health/ready",
    "SERVER_NAME": "bench",
    "SERVER_PORT": "80",
    "wsgi.url_scheme": "http",
}


def trivial(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """The cheapest useful WSGI answer."""
    body = b'{"status": "pass"}'
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def calls_per_second(app: Callable[..., Iterable[bytes]], calls: int) -> float:
    """Call *app* for /health/ready *calls* times and return the rate."""

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        pass

    start = time.perf_counter()
    for _ in range(calls):
        b"".join(app(dict(ENVIRON), start_response))
    return calls / (time.perf_counter() - start)


def in_process(dsn: str, calls: int, rounds: int = 5) -> tuple[float, float]:
    """Return the best rates (trivial, cached ready) over interleaved rounds."""
    with pgops.Pool(dsn, min_size=1, max_size=2) as pool:
        app = pgops.HealthApp(pool, cache_ttl=3600)
        assert b"pass" in b"".join(app(dict(ENVIRON), lambda *a: None))  # fills the cache
        best_trivial = best_ready = 0.0
        for _ in range(rounds):
            best_trivial = max(best_trivial, calls_per_second(trivial, calls))
            best_ready = max(best_ready, calls_per_second(app, calls))
    return best_trivial, best_ready


def transactions(server: LocalServer, dbname: str) -> int:
    with contextlib.closing(server.admin_connect()) as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_stat_clear_snapshot()")
        cur.execute("SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s", (dbname,))
        row = cur.fetchone()
        return int(row[0]) if row else 0


def over_http(server: LocalServer, dbname: str, seconds: int) -> dict[str, str]:
    """Run wrk against gunicorn serving create_app() and return its figures."""
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DATABASE_URL": server.dsn(dbname),
        "POOL_PRESET": "testing",
        "PGOPS_HEALTH_CACHE_TTL": "5",
    }
    cmd = [
        sys.executable,
        "-m",
        "gunicorn",
        "--workers",
        "2",
        "--bind",
        f"127.0.0.1:{port}",
        "pgops:create_app()",
    ]
    with tempfile.TemporaryDirectory() as cwd:  # no ./migrations there
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}/health/ready"

            def up() -> bool:
                try:
                    with urllib.request.urlopen(url, timeout=2) as response:
                        return response.status == 200
                except OSError:
                    return False

            wait_until(up, timeout=60, message="gunicorn did not come up")
            before = transactions(server, dbname)
            out = subprocess.run(
                ["wrk", "-t2", "-c32", f"-d{seconds}s", "--latency", url],
                capture_output=True, text=True, check=True, timeout=seconds + 60,
            ).stdout  # fmt: skip
            after = transactions(server, dbname)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    figures = {"wrk": out}
    for line in out.splitlines():
        parts = line.split()
        if line.startswith("Requests/sec:"):
            figures["rps"] = parts[1]
        elif parts[:1] == ["99%"]:
            figures["p99"] = parts[1]
        elif "requests in" in line:
            figures["requests"] = parts[0]
    figures["transactions"] = str(after - before)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--seconds", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pgops-health-bench-") as tmp:
        server = LocalServer(Path(tmp) / "pg")
        try:
            server.start()
            with contextlib.closing(server.admin_connect()) as conn, conn.cursor() as cur:
                cur.execute("CREATE DATABASE bench")
            rate_trivial, rate_ready = in_process(server.dsn("bench"), args.calls)
            print("| in process | calls/s | µs/call | ratio |")
            print("|---|---:|---:|---:|")
            for name, rate in (("trivial WSGI app", rate_trivial), ("cached /health/ready", rate_ready)):
                print(f"| {name} | {rate:,.0f} | {1e6 / rate:.2f} | {rate_trivial / rate:.2f}x |")
            if shutil.which("wrk") is None:
                print("\nwrk not found (apt-get install wrk): HTTP part skipped")
                return 0
            figures = over_http(server, "bench", args.seconds)
            requests = int(figures.get("requests", "0"))
            per_10k = int(figures["transactions"]) / requests * 10_000 if requests else float("nan")
            print(f"\n| gunicorn, 2 workers, TTL 5 s, wrk -c32 {args.seconds} s | value |")
            print("|---|---:|")
            print(f"| requests/s | {figures.get('rps')} |")
            print(f"| p99 latency | {figures.get('p99')} |")
            print(f"| requests | {requests:,} |")
            print(f"| database transactions (checks + connection checks) | {figures['transactions']} |")
            print(f"| database transactions per 10,000 requests | {per_10k:.2f} |")
            budget = 2 * (args.seconds / 5 + 1)
            print(f"| budget: one check per TTL per worker (+1 at start) | {budget:.0f} |")
        finally:
            server.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
