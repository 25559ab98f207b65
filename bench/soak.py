"""Soak test: a pooled read/write workload under chaos, then proof that nothing was lost or leaked.

``python bench/soak.py --minutes 5`` (or ``--seconds 90``) starts a throwaway PostgreSQL
(tests/pgtest.py ``LocalServer``) and runs the soak of tests/chaos.py on it: callers reading and
writing through one pool while sessions are terminated, the server restarts and crashes, and
migrations run concurrently; tests/chaos.py says what runs and which invariants are checked.  A
markdown summary is printed; the exit status is 1 when an invariant fails.

The driver lives under tests/ so that tests/test_soak.py (a 20 s run) needs nothing from bench/.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
for _path in (str(_ROOT / "tests"), str(_ROOT)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import pgops  # noqa: E402
from chaos import run_soak  # noqa: E402
from pgtest import LocalServer  # noqa: E402


@contextlib.contextmanager
def _server(base: Path) -> Iterator[LocalServer]:
    """Start a LocalServer under *base*; stop it and delete its files afterwards."""
    server = LocalServer(base)
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run a soak on a throwaway server, print the summary; 1 if an invariant failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0] if __doc__ else None)
    duration = parser.add_mutually_exclusive_group()
    duration.add_argument("--minutes", type=float, help="workload duration in minutes")
    duration.add_argument("--seconds", type=float, help="workload duration in seconds (default 60)")
    parser.add_argument("--threads", type=int, default=16, help="caller threads (default 16)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v: pgops warnings, -vv: info")
    args = parser.parse_args(argv)
    seconds = args.minutes * 60.0 if args.minutes is not None else (args.seconds or 60.0)
    if seconds <= 0 or args.threads < 1:
        parser.error("the duration and --threads must be positive")
    level = {0: logging.ERROR, 1: logging.WARNING}.get(args.verbose, logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(threadName)s %(name)s %(levelname)s %(message)s")
    base = Path(tempfile.mkdtemp(prefix="pgops-soak-"))
    try:
        with _server(base / "pg") as server:
            print(f"soak: {seconds:.0f} s, {args.threads} threads, pgops {pgops.__version__}, {server!r}")
            result = run_soak(server, seconds, threads=args.threads, seed=args.seed)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(result.table())
    for sample in result.error_samples:
        print(f"caller error: {sample}")
    for sample in result.migrate_fault_samples[:3]:
        print(f"fault-induced migrate error: {sample}")
    failures = result.failures()
    for line in failures:
        print(f"FAILED: {line}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
