"""Pool overhead benchmark: pgops.Pool against a raw psycopg2 connection and the usual peers.

Scenarios (each a separate column of the result table):

* ``SELECT 1``: check out a connection, run ``SELECT 1`` and fetch the row, commit, return it.  Every
  contender does the same three round trips (``BEGIN``, ``SELECT 1``, ``COMMIT``).
* ``bare``: check out a connection and return it at once; no round trip.

each at 1 thread and at 16 threads sharing at most 4 connections.

Contenders, all in one process and interleaved: every round runs every contender once per scenario in
a freshly shuffled order, and the table reports the median over rounds.

* ``raw psycopg2`` — the floor: dedicated connections and no pool.  At 1 thread, one connection.  At
  16 threads there cannot be 16 dedicated connections over a cap of 4, so the floor is 4 threads, each
  with its own connection, doing the same total number of operations: the cost of the work itself
  without any waiting or sharing.  It has no ``bare`` figure (there is nothing to check out), so the
  ``bare`` columns are relative to the bare Semaphore-plus-list instead.
* ``Semaphore + list`` — ``threading.Semaphore(4)`` guarding a list of 4 raw connections: the least a
  pool that waits can do.
* ``psycopg2 ThreadedConnectionPool`` behind a ``Semaphore(4)`` so that callers wait (alone it raises).
* ``psycopg_pool.ConnectionPool`` (psycopg 3), min_size = max_size = 4.
* ``SQLAlchemy QueuePool(creator, pool_size=4, max_overflow=0)`` over psycopg2.
* ``pgops.Pool`` with min_size = max_size = 4 and every other setting at its default: query metrics on
  (they cannot be turned off), ``test_before_acquire`` on, pgvector registration on.
* ``psycopg 3, dedicated`` — a reference, not a contender: a raw psycopg 3 connection, to tell how much
  of psycopg_pool's figure is the psycopg 3 driver rather than the pool.

Every pool is created once, filled and warmed up before the first round, and stays open throughout.

The server is a throwaway cluster (tests/pgtest.py ``LocalServer``) reached over its unix socket by
default (``--tcp`` for 127.0.0.1): the socket has the shortest round trip, so the pool's own cost is
the largest share of each operation.  The client process pins itself to one CPU (``--cpu N``; by
default the least busy CPU over half a second, ``--cpu none`` turns pinning off) *before* starting
the server, so pg_ctl, the postmaster and every backend it
forks inherit that affinity; the postmaster and its children are then pinned explicitly as well and
the result is checked and printed.  Client threads and server backends thus share one CPU, as in the
issue's measurements.

Timing: worker threads are created first and released together by a barrier; the clock runs from the
release to the last thread's end.  Two figures per measurement, each divided by the operations done:

* wall-clock time — the issue's measure, and what callers feel, but it grows whenever another program
  takes the pinned CPU;
* CPU time of the client process plus every server process (postmaster and children, from
  /proc/<pid>/schedstat) — barely moved by other load, so on a busy machine it is the steadier of the
  two.  With client and server on one otherwise idle CPU the two agree.

Ratios are medians of per-round ratios (each contender against the base measured in the same round),
so a slow spell that hits one round does not skew the comparison.

Nothing here is asserted anywhere: results depend on the machine and its load.  Run it on a quiet
machine, and run it twice if the per-round ranges are wide.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import psycopg2
import psycopg2.extensions
import psycopg2.pool
import psycopg_pool
import sqlalchemy
import sqlalchemy.pool

_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(_ROOT), str(_ROOT / "tests")]

import pgops  # noqa: E402
from pgtest import LocalServer  # noqa: E402

POOL_SIZE = 4
MANY_THREADS = 16
BARE_OPS_FACTOR = 10  # bare checkouts are ~10x cheaper than a SELECT 1 round trip set
FLOOR = "raw psycopg2 (floor)"
SEMAPHORE = "Semaphore + list"
PGOPS = "pgops.Pool"
DROPIN = "pgops.ThreadedConnectionPool (drop-in)"
PSYCOPG2_POOL = "psycopg2 ThreadedConnectionPool + Semaphore"
PSYCOPG3_POOL = "psycopg_pool ConnectionPool"
SQLALCHEMY_POOL = "SQLAlchemy QueuePool"
PEERS = (PSYCOPG2_POOL, PSYCOPG3_POOL, SQLALCHEMY_POOL)
TARGETS = {"SELECT 1, 1 thread": 1.2, f"SELECT 1, {MANY_THREADS} threads": 1.6}
DROPIN_TARGET = 1.05  # the drop-in against pgops.Pool

Loop = Callable[[int, int], None]
"""Run n operations as worker number i: ``loop(i, n)``."""


# -- contenders ------------------------------------------------------------------------------------


def _select_one(conn: psycopg2.extensions.connection) -> None:
    """One transaction on a psycopg2 connection: SELECT 1, fetch, commit."""
    with conn.cursor() as cur:
        cur.execute("SELECT 1")
        cur.fetchone()
    conn.commit()


@dataclass
class Contender:
    """One way of getting a connection: its loops per scenario kind and how to tear it down."""

    name: str
    query: Loop
    bare: Loop | None
    close: Callable[[], None]
    floor: bool = False  # dedicated connections: at most POOL_SIZE threads share the work
    reference: bool = False  # shown for interpretation, not a contender


def raw_psycopg2(dsn: str) -> Contender:
    """The floor: one dedicated psycopg2 connection per worker thread (at most POOL_SIZE of them)."""
    conns = [psycopg2.connect(dsn) for _ in range(POOL_SIZE)]

    def query(i: int, n: int) -> None:
        conn = conns[i]
        for _ in range(n):
            _select_one(conn)

    return Contender(FLOOR, query, None, lambda: _close_all(conns), floor=True)


def raw_psycopg3(dsn: str) -> Contender:
    """Reference: dedicated psycopg 3 connections, to separate the driver's cost from psycopg_pool's."""
    conns = [psycopg.connect(dsn) for _ in range(POOL_SIZE)]

    def query(i: int, n: int) -> None:
        conn = conns[i]
        for _ in range(n):
            conn.execute("SELECT 1").fetchone()
            conn.commit()

    return Contender("psycopg 3 dedicated (ref.)", query, None, lambda: _close_all(conns), True, True)


def semaphore_list(dsn: str) -> Contender:
    """A bare Semaphore plus a list of raw connections: the least a waiting pool can do."""
    conns = [psycopg2.connect(dsn) for _ in range(POOL_SIZE)]
    free = list(conns)
    sem = threading.Semaphore(POOL_SIZE)

    def query(i: int, n: int) -> None:
        for _ in range(n):
            sem.acquire()
            conn = free.pop()  # list.pop/append are atomic under the GIL
            try:
                _select_one(conn)
            finally:
                free.append(conn)
                sem.release()

    def bare(i: int, n: int) -> None:
        for _ in range(n):
            sem.acquire()
            conn = free.pop()
            free.append(conn)
            sem.release()

    return Contender(SEMAPHORE, query, bare, lambda: _close_all(conns))


def psycopg2_threaded(dsn: str) -> Contender:
    """psycopg2's ThreadedConnectionPool behind a Semaphore, so that callers wait instead of failing."""
    pool = psycopg2.pool.ThreadedConnectionPool(POOL_SIZE, POOL_SIZE, dsn)
    sem = threading.Semaphore(POOL_SIZE)

    def query(i: int, n: int) -> None:
        for _ in range(n):
            sem.acquire()
            try:
                conn = pool.getconn()
                try:
                    _select_one(conn)
                finally:
                    pool.putconn(conn)
            finally:
                sem.release()

    def bare(i: int, n: int) -> None:
        for _ in range(n):
            sem.acquire()
            pool.putconn(pool.getconn())
            sem.release()

    return Contender(PSYCOPG2_POOL, query, bare, pool.closeall)


def psycopg3_pool(dsn: str) -> Contender:
    """psycopg_pool.ConnectionPool (psycopg 3) with its documented context manager."""
    pool = psycopg_pool.ConnectionPool(dsn, min_size=POOL_SIZE, max_size=POOL_SIZE, open=True)
    pool.wait()

    def query(i: int, n: int) -> None:
        for _ in range(n):
            with pool.connection() as conn:  # commits on clean exit
                conn.execute("SELECT 1").fetchone()

    def bare(i: int, n: int) -> None:
        for _ in range(n):
            pool.putconn(pool.getconn())

    return Contender(PSYCOPG3_POOL, query, bare, pool.close)


def sqlalchemy_queue_pool(dsn: str) -> Contender:
    """SQLAlchemy's QueuePool over psycopg2, filled to its size before use."""

    def creator() -> Any:  # a psycopg2 connection; SQLAlchemy types it as its own DBAPI protocol
        return psycopg2.connect(dsn)

    pool = sqlalchemy.pool.QueuePool(creator, pool_size=POOL_SIZE, max_overflow=0)
    for conn in [pool.connect() for _ in range(POOL_SIZE)]:
        conn.close()

    def query(i: int, n: int) -> None:
        for _ in range(n):
            conn = pool.connect()
            try:
                cur = conn.cursor()
                cur.execute("SELECT 1")
                cur.fetchone()
                cur.close()
                conn.commit()
            finally:
                conn.close()  # back to the pool (reset: rollback)

    def bare(i: int, n: int) -> None:
        for _ in range(n):
            pool.connect().close()

    return Contender(SQLALCHEMY_POOL, query, bare, pool.dispose)


def pgops_pool(dsn: str) -> Contender:
    """pgops.Pool at its defaults (metrics on) apart from the size."""
    pool = pgops.Pool(dsn, min_size=POOL_SIZE, max_size=POOL_SIZE)
    pool.wait()

    def query(i: int, n: int) -> None:
        for _ in range(n):
            with pool.connection() as conn, conn.cursor() as cur:  # commits on clean exit
                cur.execute("SELECT 1")
                cur.fetchone()

    def bare(i: int, n: int) -> None:
        for _ in range(n):
            pool.putconn(pool.getconn())

    return Contender(PGOPS, query, bare, pool.close)


def pgops_dropin(dsn: str) -> Contender:
    """pgops.ThreadedConnectionPool used as psycopg2's pool is (getconn, commit, putconn), no Semaphore."""
    pool = pgops.ThreadedConnectionPool(POOL_SIZE, POOL_SIZE, dsn)
    pool.wait()

    def query(i: int, n: int) -> None:
        for _ in range(n):
            conn = pool.getconn()
            try:
                _select_one(conn)
            finally:
                pool.putconn(conn)

    def bare(i: int, n: int) -> None:
        for _ in range(n):
            pool.putconn(pool.getconn())

    return Contender(DROPIN, query, bare, pool.closeall)


FACTORIES: tuple[Callable[[str], Contender], ...] = (
    raw_psycopg2,
    semaphore_list,
    psycopg2_threaded,
    psycopg3_pool,
    sqlalchemy_queue_pool,
    pgops_pool,
    pgops_dropin,
    raw_psycopg3,
)


def _close_all(conns: list[psycopg2.extensions.connection] | list[psycopg.Connection]) -> None:
    """Close every connection in conns."""
    for conn in conns:
        conn.close()


# -- scenarios and timing --------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """What is measured: the kind of operation, the caller threads and the operations in total."""

    kind: str  # "query" or "bare"
    threads: int
    ops: int

    @property
    def label(self) -> str:
        """Column title, e.g. 'SELECT 1, 16 threads'."""
        what = "SELECT 1" if self.kind == "query" else "bare"
        return f"{what}, {self.threads} thread{'s' if self.threads > 1 else ''}"


def run_threads(threads: int, loop: Loop, per_thread: int, cpu: CpuMeter) -> tuple[float, float]:
    """Run loop(i, per_thread) in `threads` threads released together; return (wall, CPU) seconds."""
    barrier = threading.Barrier(threads + 1)
    errors: list[BaseException] = []

    def target(i: int) -> None:
        barrier.wait()
        try:
            loop(i, per_thread)
        except BaseException as exc:  # re-raised in the main thread below
            errors.append(exc)

    workers = [threading.Thread(target=target, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    gc.collect()
    server_start = cpu.server()
    client_start = time.process_time()
    barrier.wait()
    start = time.perf_counter()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - start
    client_used = time.process_time() - client_start
    cpu_used = client_used + cpu.server() - server_start
    if errors:
        raise errors[0]
    return elapsed, cpu_used


def measure(contender: Contender, scenario: Scenario, cpu: CpuMeter) -> dict[str, float] | None:
    """Return {metric: µs per operation} of contender in scenario, or None when it has no such loop."""
    loop = contender.query if scenario.kind == "query" else contender.bare
    if loop is None:
        return None
    threads = min(scenario.threads, POOL_SIZE) if contender.floor else scenario.threads
    per_thread = scenario.ops // threads
    wall, cpu_used = run_threads(threads, loop, per_thread, cpu)
    ops = per_thread * threads
    return {"wall": wall / ops * 1e6, "cpu": cpu_used / ops * 1e6}


@dataclass
class Results:
    """Per-round µs/op of every contender in every scenario, for each metric (wall, cpu)."""

    samples: dict[tuple[str, str, str], list[float]] = field(default_factory=dict)

    def add(self, scenario: Scenario, name: str, figures: dict[str, float]) -> None:
        """Record one round's figures."""
        for metric, micros in figures.items():
            self.samples.setdefault((metric, scenario.label, name), []).append(micros)

    def median(self, metric: str, scenario: Scenario, name: str) -> float | None:
        """Median µs/op over rounds, or None when not measured."""
        values = self.samples.get((metric, scenario.label, name))
        return statistics.median(values) if values else None

    def ratios(self, metric: str, scenario: Scenario, name: str, base: str) -> list[float]:
        """Per-round ratios of name to base (both measured in the same round)."""
        values = self.samples.get((metric, scenario.label, name), [])
        bases = self.samples.get((metric, scenario.label, base), [])
        return [v / b for v, b in zip(values, bases, strict=False) if b > 0]

    def ratio(self, metric: str, scenario: Scenario, name: str, base: str) -> float | None:
        """Median of the per-round ratios, or None."""
        ratios = self.ratios(metric, scenario, name, base)
        return statistics.median(ratios) if ratios else None


def run_rounds(contenders: list[Contender], scenarios: list[Scenario], rounds: int, cpu: CpuMeter) -> Results:
    """Run every contender in every scenario once per round, in a shuffled order each round."""
    results = Results()
    for contender in contenders:  # warm-up, not recorded
        for scenario in scenarios:
            measure(contender, Scenario(scenario.kind, scenario.threads, max(scenario.ops // 10, 64)), cpu)
    for number in range(1, rounds + 1):
        order = [(s, c) for s in scenarios for c in contenders]
        random.shuffle(order)
        for scenario, contender in order:
            figures = measure(contender, scenario, cpu)
            if figures is not None:
                results.add(scenario, contender.name, figures)
        print(f"round {number}/{rounds} done", file=sys.stderr, flush=True)
    return results


class CpuMeter:
    """CPU seconds used so far by every process of the server (the client's come from process_time).

    The server's share comes from /proc/<pid>/schedstat (nanoseconds on the CPU) of the postmaster and
    its children, so it covers every backend of every contender; where /proc is missing, only the
    client is counted.  Unlike wall time, this hardly moves when other programs load the machine.
    """

    def __init__(self, postmaster: int | None) -> None:
        """Measure the client plus the server tree under postmaster (None: the client only)."""
        self.postmaster = postmaster
        self.covers_server = postmaster is not None and _schedstat_ns(postmaster) is not None

    def server(self) -> float:
        """CPU seconds of the server's processes so far (0.0 when not covered).

        Reading /proc costs the client some CPU: callers read the client's clock (time.process_time)
        after this at the start of a measurement and before it at the end, so that cost is not counted.
        """
        if not self.covers_server or self.postmaster is None:
            return 0.0
        pids = [self.postmaster, *_children(self.postmaster)]
        return sum(_schedstat_ns(pid) or 0 for pid in pids) / 1e9


def _schedstat_ns(pid: int) -> int | None:
    """Nanoseconds pid has run on a CPU (Linux /proc/<pid>/schedstat), or None."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


# -- report ----------------------------------------------------------------------------------------

METRICS = {
    "wall": "Wall-clock time per operation (the issue's measure)",
    "cpu": "CPU time per operation, client process plus every server process (robust to other load)",
}


def base_name(scenario: Scenario) -> str:
    """The contender a scenario's ratios are relative to: the raw floor, or Semaphore + list for bare."""
    return FLOOR if scenario.kind == "query" else SEMAPHORE


def table(results: Results, metric: str, contenders: list[Contender], scenarios: list[Scenario]) -> str:
    """Markdown table of one metric: one row per contender, one column per scenario."""
    header = ["contender", *(f"{s.label} (× {_short(base_name(s))})" for s in scenarios)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for contender in contenders:
        cells = [contender.name]
        cells += [_cell(results, metric, scenario, contender.name) for scenario in scenarios]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _short(name: str) -> str:
    """Short form of a base contender's name for column titles."""
    return "raw" if name == FLOOR else name


def _cell(results: Results, metric: str, scenario: Scenario, name: str) -> str:
    """One table cell: median µs/op and the median per-round ratio to the scenario's base."""
    micros = results.median(metric, scenario, name)
    if micros is None:
        return "—"
    ratio = results.ratio(metric, scenario, name, base_name(scenario))
    return f"{micros:.1f} µs ({ratio:.2f}×)" if ratio is not None else f"{micros:.1f} µs"


def pgops_summary(results: Results, metric: str, scenarios: list[Scenario]) -> str:
    """pgops' per-round ratio ranges, its standing against the targets and against every peer."""
    lines = []
    for scenario in scenarios:
        base = base_name(scenario)
        ratios = results.ratios(metric, scenario, PGOPS, base)
        if not ratios:
            continue
        mine = statistics.median(ratios)
        text = f"- {scenario.label}: {mine:.2f}× {_short(base)} (rounds {min(ratios):.2f}–{max(ratios):.2f})"
        target = TARGETS.get(scenario.label)
        if target is not None:
            text += f"; target ≤ {target}×: {'meets' if mine <= target else 'MISSES'}"
        dearer = [p for p in PEERS if (results.ratio(metric, scenario, p, base) or math.inf) <= mine]
        text += "; cheaper than every peer" if not dearer else f"; not cheaper than {', '.join(dearer)}"
        dropin = results.ratios(metric, scenario, DROPIN, PGOPS)
        if dropin:
            median = statistics.median(dropin)
            verdict = "meets" if median <= DROPIN_TARGET else "MISSES"
            text += f"; drop-in {median:.3f}× pgops.Pool (target ≤ {DROPIN_TARGET}×: {verdict})"
        lines.append(text)
    return "\n".join(lines)


# -- environment -----------------------------------------------------------------------------------


def least_busy_cpu(sample: float = 0.5) -> int:
    """The CPU (of those this process may use) that was least busy over `sample` seconds, from /proc/stat."""
    allowed = sorted(os.sched_getaffinity(0))
    try:
        before = _cpu_times()
        time.sleep(sample)
        after = _cpu_times()
    except (OSError, ValueError):
        return allowed[0]

    def busy(cpu: int) -> float:
        (b_busy, b_total), (a_busy, a_total) = before[cpu], after[cpu]
        return (a_busy - b_busy) / max(a_total - b_total, 1)

    return min((cpu for cpu in allowed if cpu in before and cpu in after), key=busy, default=allowed[0])


def _cpu_times() -> dict[int, tuple[int, int]]:
    """(busy, total) jiffies per CPU from /proc/stat."""
    times: dict[int, tuple[int, int]] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name != "cpu":
            values = [int(f) for f in fields]
            idle = values[3] + values[4]  # idle + iowait
            times[int(name[3:])] = (sum(values) - idle, sum(values))
    return times


def pin_client(cpu: int) -> str:
    """Pin this process (and so everything it starts later) to cpu; describe what was done."""
    if cpu < 0:
        return "no CPU pinning"
    if not hasattr(os, "sched_setaffinity"):
        return "no CPU pinning (sched_setaffinity is not available here)"
    os.sched_setaffinity(0, {cpu})
    return f"client pinned to CPU {cpu}"


def pin_server(pid: int | None, cpu: int) -> str:
    """Pin the postmaster and its current children to cpu (new backends inherit); report the result."""
    if cpu < 0 or pid is None or not hasattr(os, "sched_setaffinity"):
        return "server not pinned"
    pids = [pid, *_children(pid)]
    for each in pids:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(each, {cpu})
    pinned = sum(1 for each in pids if _affinity(each) == {cpu})
    return f"server pinned to CPU {cpu} ({pinned} of {len(pids)} processes verified, backends inherit)"


def _children(pid: int) -> list[int]:
    """Direct children of pid from /proc (Linux), or [] elsewhere."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _affinity(pid: int) -> set[int] | None:
    """CPU affinity of pid, or None when it cannot be read."""
    try:
        return os.sched_getaffinity(pid)
    except OSError:
        return None


def versions(dsn: str) -> str:
    """One line with the versions that matter for these figures."""
    with contextlib.closing(psycopg2.connect(dsn)) as conn:
        server = conn.server_version
    return (
        f"Python {platform.python_version()}, PostgreSQL {server // 10000}.{server % 100}, "
        f"psycopg2 {getattr(psycopg2, '__version__', '?').split()[0]}, psycopg {psycopg.__version__}, "
        f"psycopg_pool {psycopg_pool.__version__}, SQLAlchemy {sqlalchemy.__version__}, "
        f"pgops {pgops.__version__}{_revision()}, {os.cpu_count()} CPUs"
    )


def _revision() -> str:
    """' (git abc1234)' for the checkout pgops.py is imported from, '+ local changes' when it differs."""
    git = ["git", "-C", str(_ROOT)]
    try:
        head = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            [*git, "diff", "--quiet", "HEAD", "--", "pgops.py"], capture_output=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    if head.returncode != 0:
        return ""
    return f" (git {head.stdout.strip()}{' + local changes' if dirty.returncode == 1 else ''})"


@contextlib.contextmanager
def local_server(cpu: int) -> Iterator[tuple[LocalServer, str]]:
    """Start a throwaway server (inheriting the client's pinning), pin it, yield it; always clean up."""
    with tempfile.TemporaryDirectory(prefix="pgops-bench-") as base:
        server = LocalServer(base)
        try:
            server.start()
            yield server, pin_server(server.postmaster_pid, cpu)
        finally:
            server.cleanup()


# -- main ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=7, help="rounds over every contender (default 7)")
    parser.add_argument(
        "--ops", type=int, default=3200, help="SELECT 1 operations per measurement (bare: 10x; default 3200)"
    )
    parser.add_argument("--quick", action="store_true", help="3 rounds of 320 operations: a few seconds")
    parser.add_argument("--tcp", action="store_true", help="connect over TCP 127.0.0.1, not the socket")
    parser.add_argument(
        "--cpu", default="auto", help="CPU for client and server: a number, 'auto' (least busy), or 'none'"
    )
    args = parser.parse_args(argv)
    if args.cpu not in ("auto", "none") and not args.cpu.isdigit():
        parser.error(f"--cpu must be a CPU number, 'auto' or 'none', not {args.cpu!r}")
    if args.quick:
        args.rounds, args.ops = 3, 320
    if args.rounds < 1 or args.ops < MANY_THREADS:
        parser.error(f"--rounds must be at least 1 and --ops at least {MANY_THREADS}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the markdown tables."""
    args = parse_args(argv)
    cpu = -1 if args.cpu == "none" or not hasattr(os, "sched_setaffinity") else None
    if cpu is None:
        cpu = least_busy_cpu() if args.cpu == "auto" else int(args.cpu)
    client = pin_client(cpu)
    scenarios = [
        Scenario(kind, threads, args.ops * (BARE_OPS_FACTOR if kind == "bare" else 1))
        for kind in ("query", "bare")
        for threads in (1, MANY_THREADS)
    ]
    with local_server(cpu) as (server, server_pinning):
        dsn = server.dsn("postgres") if args.tcp else server.socket_dsn("postgres")
        about = versions(dsn)
        meter = CpuMeter(server.postmaster_pid)
        contenders = [factory(dsn) for factory in FACTORIES]
        try:
            results = run_rounds(contenders, scenarios, args.rounds, meter)
        finally:
            for contender in contenders:
                contender.close()
    transport = "TCP 127.0.0.1" if args.tcp else "unix socket"
    print(f"pool_bench: {args.rounds} rounds, {args.ops} SELECT 1 / {args.ops * BARE_OPS_FACTOR} bare ops")
    print(f"per measurement, max {POOL_SIZE} connections, {transport}; {client}; {server_pinning}.")
    print(f"{about}.")
    for metric, title in METRICS.items():
        if metric == "cpu" and not meter.covers_server:
            title += " (client only: no /proc here)"
        print(f"\n### {title}\n")
        print(table(results, metric, contenders, scenarios))
        print(f"\npgops.Pool ({metric}):")
        print(pgops_summary(results, metric, scenarios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
