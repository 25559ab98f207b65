"""Failover benchmark: what writers on a pgops.Pool see when the primary is fenced or stopped and its
streaming standby is promoted, and what read-your-writes tokens cost on a read pool.

Every round of every scenario gets a fresh primary and a hot standby streaming from it
(tests/pgtest.py ``LocalServer``, tests/standby.py ``StandbyServer``), both on 127.0.0.1, and removes
them afterwards, even after an error or Ctrl-C.

**fenced primary** — W writer threads (``--writers``, 8) share a pool of ``--pool-size`` (4)
connections; each loops inserting one row with a unique id (a plain INSERT into a primary key, so a
transaction committed twice would show up as a 23505 error) and records every acknowledged id, the
server port it landed on (``inet_server_port()``) and every error that reached it, with the time.
After ``--steady`` (1 s) of writes: ``fence(primary)`` (default_transaction_read_only on + reload),
wait until no transaction that began before the fence still holds a transaction id on the primary
(one could otherwise commit after the LSN below is read), wait until the standby has replayed the
primary's ``pg_current_wal_lsn()``, ``promote()`` the standby, keep writing ``--after`` (3 s) from
the end of promote(), stop. Variants:

- (a) direct: a libpq multi-host DSN (primary, standby) with ``target_session_attrs=read-write``,
  ``pool.run(insert, retry=RetryPolicy(max_attempts=50, initial_delay=0.02, max_delay=0.5,
  deadline=30))``;
- (b) the same DSN without retry: ``with pool.connection() as conn: insert``;
- (c) through PgBouncer (transaction mode, default_pool_size = ``--pool-size``) pointed at the
  primary, with retry.  PgBouncer has no target_session_attrs, so right after promote() the bench
  rewrites the port of the ``*`` line in its [databases] section to the standby's and sends RELOAD
  on its admin console (``PgBouncer.repoint()`` in tests/pgbouncer.py), as a failover script or an
  operator would.

**stopped primary** — variant (a) only: ``primary.stop("immediate")`` instead of the fence (no wait
for replay: promotion replays what the standby received), then promote and write as above.
Replication is asynchronous, so a commit acknowledged just before the stop may never have reached
the standby; such losses are counted like any other ("missing"), but are not pgops' doing.

Reported per round: how long promote() took (``pg_ctl promote -w`` plus pgtest's wait for
``pg_is_in_recovery()`` to turn false); the time from the end of promote() to the first write
acknowledged by the new primary (the row is looked up there afterwards), also counted from the
moment a probe (a connection to the standby polling ``pg_is_in_recovery()`` every 2 ms) saw
recovery end, and to the first acknowledgement on the new primary of the last of the W writers; the
write gap (last acknowledgement by the old primary to first by the new one); the errors that reached
callers; the failed attempts (every retry pgops logged, by SQLSTATE, plus the caller errors);
acknowledged writes and how many of them are missing on the new primary (must be 0; in brackets
those the new primary itself had acknowledged, the rest being the old primary's); and the pool's
``connections_read_only`` counter (connections discarded because their server stopped taking
writes) and its ``health()`` when the writers stop.  A negative time means the first write landed
before promote() returned.

**read your writes** — a pool on the primary with ``read_dsn`` on the standby (``pool.replica``).
``--ryw`` (300) times: insert a row through ``pool.run``, ``token = pool.current_lsn()``, read the
row through ``pool.read_connection(after=token)``; and as many times, interleaved: insert, then read
it through ``pool.replica.connection()`` with no token.  Reported: stale reads (row not found) of
each kind, the read pool's ``reads_waited`` and ``reads_fallback``, and the read latencies (from the
end of the insert's commit to the end of the read: for the token read that includes current_lsn()'s
round trip) with the token read's extra over the plain replica read at the median and p99.

Every WARNING record of the ``pgops`` logger is counted (by message) and reported per variant; the
records are kept off the terminal unless ``-v``.

    python bench/failover_bench.py               # 3 rounds, about two minutes
    python bench/failover_bench.py --quick       # 1 round, shorter phases: does it run?
    python bench/failover_bench.py --rounds 5 --writers 16 --scenarios fenced

Needs the system's PgBouncer for variant (c) (``apt-get install pgbouncer``; skipped, with the
reason, when missing).  Nothing here is asserted anywhere: results depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extensions

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import pgops  # noqa: E402
from pgbouncer import PgBouncer, find_pgbouncer  # noqa: E402
from pgtest import LocalServer, scalar  # noqa: E402
from standby import StandbyServer, current_wal_lsn, drain_writes, fence, ha_dsn, streaming_standby  # noqa: E402

POLICY = pgops.RetryPolicy(max_attempts=50, initial_delay=0.02, max_delay=0.5, deadline=30)
POLICY_TEXT = "RetryPolicy(max_attempts=50, initial_delay=0.02, max_delay=0.5, deadline=30)"
EVENTS = (
    "CREATE TABLE failover_events (id bigint PRIMARY KEY, writer int NOT NULL, "
    "at timestamptz NOT NULL DEFAULT clock_timestamp())"
)
INSERT = "INSERT INTO failover_events (id, writer) VALUES (%s, %s) RETURNING inet_server_port()"
RYW_TABLE = "CREATE TABLE ryw_events (id bigint PRIMARY KEY)"
ERROR_PAUSE = 0.001  # a caller that got an error calls again after this (a service's next request)
PROBE_INTERVAL = 0.002
RYW_WARM_UP = 10

FENCED = "fenced primary"
STOPPED = "stopped primary"
VARIANTS = {
    "a": "(a) direct, multi-host read-write DSN, retry",
    "b": "(b) direct, multi-host read-write DSN, no retry",
    "c": "(c) PgBouncer (transaction), repointed + RELOAD, retry",
}


# -- servers ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def ha_pair(table: str) -> Iterator[tuple[LocalServer, StandbyServer]]:
    """A fresh primary with `table` and a hot standby streaming from it; both removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="pgops-failover-bench-") as base:
        primary = LocalServer(Path(base) / "primary")
        try:
            primary.start()
            with contextlib.closing(primary.admin_connect()) as conn, conn.cursor() as cur:
                cur.execute(table)
            with streaming_standby(primary, Path(base) / "standby") as standby:
                yield primary, standby
        finally:
            primary.cleanup()


class RecoveryProbe(threading.Thread):
    """Poll pg_is_in_recovery() on the standby over one connection; note when it first answers false.

    The moment noted is when the first query answering false was sent: recovery ended before that,
    and after the previous query (PROBE_INTERVAL plus a round trip earlier).
    """

    def __init__(self, standby: StandbyServer) -> None:
        """Connect to standby now (before the promotion); start() to poll."""
        super().__init__(name="recovery-probe", daemon=True)
        self.conn = standby.admin_connect()
        self.stop_event = threading.Event()
        self.ended_at: float | None = None

    def run(self) -> None:
        """Poll until recovery ends or stop_event is set."""
        try:
            while not self.stop_event.is_set():
                sent = time.monotonic()
                if scalar(self.conn, "SELECT pg_is_in_recovery()") is False:
                    self.ended_at = sent
                    return
                time.sleep(PROBE_INTERVAL)
        finally:
            self.conn.close()


# -- pgops' log --------------------------------------------------------------------------------------


class WarningCounter(logging.Handler):
    """Counts the pgops logger's WARNING records by message, and its retries by SQLSTATE."""

    def __init__(self) -> None:
        """An empty counter; attach it to the `pgops` logger."""
        super().__init__(logging.WARNING)
        self.messages: collections.Counter[str] = collections.Counter()
        self.retries: collections.Counter[str] = collections.Counter()

    def emit(self, record: logging.LogRecord) -> None:
        """Count one record (logging holds this handler's lock)."""
        message = str(record.msg)
        self.messages[message] += 1
        if message.startswith("retrying ") and isinstance(record.args, tuple) and len(record.args) > 3:
            self.retries[str(record.args[3])] += 1  # retry_call's "(sqlstate %s: ...)"

    def take(self) -> tuple[collections.Counter[str], collections.Counter[str]]:
        """Return (messages, retries) counted since the last take(), and start again from zero."""
        with self.lock:  # type: ignore[union-attr]
            taken = self.messages, self.retries
            self.messages, self.retries = collections.Counter(), collections.Counter()
        return taken


def capture_logs(verbose: bool) -> WarningCounter:
    """Attach a WarningCounter to the `pgops` logger; show its records only when verbose."""
    counter = WarningCounter()
    logger = logging.getLogger("pgops")
    logger.addHandler(counter)
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        logger.setLevel(logging.INFO)
    else:
        logger.setLevel(logging.WARNING)
        logger.propagate = False  # pgops' own NullHandler keeps the last-resort handler quiet
    return counter


# -- writers ---------------------------------------------------------------------------------------

Call = Callable[[int, int], int]
"""call(id, writer) inserts the row and returns the port of the server that committed it."""


def make_call(pool: pgops.Pool, retry: pgops.RetryPolicy | None) -> Call:
    """One write: pool.run(insert, retry=retry), or a plain `with pool.connection()` without retry."""

    def call(key: int, writer: int) -> int:
        def insert(conn: psycopg2.extensions.connection) -> int:
            with conn.cursor() as cur:
                cur.execute(INSERT, (key, writer))
                row = cur.fetchone()
            assert row is not None
            return int(row[0])

        if retry is None:
            with pool.connection() as conn:
                return insert(conn)
        return pool.run(insert, retry=retry)

    return call


@dataclass
class WriterLog:
    """What one writer saw: (time, id, server port) per acknowledged write, (time, kind) per error."""

    acks: list[tuple[float, int, int]] = field(default_factory=list)
    errors: list[tuple[float, str]] = field(default_factory=list)


def error_kind(exc: BaseException) -> str:
    """Exception class plus SQLSTATE when there is one."""
    code = getattr(exc, "pgcode", None)
    return f"{type(exc).__name__} {code}" if code else type(exc).__name__


def writer_loop(call: Call, number: int, log: WriterLog, stop: threading.Event) -> None:
    """Insert rows with ids of this writer's own until stop is set, logging every outcome."""
    n = 0
    while not stop.is_set():
        n += 1
        key = number * 1_000_000_000 + n
        try:
            port = call(key, number)
        except Exception as exc:
            log.errors.append((time.monotonic(), error_kind(exc)))
            time.sleep(ERROR_PAUSE)
        else:
            log.acks.append((time.monotonic(), key, port))


# -- one failover ------------------------------------------------------------------------------------


@dataclass
class FailoverRun:
    """The figures of one failover."""

    scenario: str
    variant: str
    promote_s: float = 0.0  # how long promote() took
    first_new: float | None = None  # end of promote() -> first ack on the new primary
    first_new_recovery: float | None = None  # recovery seen ended -> first ack on the new primary
    all_back: float | None = None  # end of promote() -> last writer's first ack on the new primary
    gap: float | None = None  # last ack on the old primary -> first ack on the new one
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    retries: collections.Counter[str] = field(default_factory=collections.Counter)
    acked: int = 0
    acked_new: int = 0
    missing: int = 0
    missing_new: int = 0  # of which the new primary itself had acknowledged
    first_row_found: bool | None = None
    read_only: int = 0
    health: str = ""  # pool.health() at the end of the run, with its reasons
    warnings: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def failed_attempts(self) -> int:
        """Every attempt that failed: those pgops retried (it logs each) and those that reached a caller."""
        return sum(self.retries.values()) + sum(self.errors.values())


def failover_run(
    scenario: str, variant: str, args: argparse.Namespace, counter: WarningCounter, bouncer_binary: str | None
) -> FailoverRun:
    """One failover under W writers; see the module docstring."""
    run = FailoverRun(scenario, variant)
    with ha_pair(EVENTS) as (primary, standby):
        bouncer: PgBouncer | None = None
        try:
            if variant == "c":
                bouncer = PgBouncer(
                    primary, pool_mode="transaction", pool_size=args.pool_size, binary=bouncer_binary
                )
                bouncer.start()
                dsn = bouncer.dsn("postgres")
            else:
                dsn = ha_dsn(primary, standby, target_session_attrs="read-write")
            logs = [WriterLog() for _ in range(args.writers)]
            counts = writes_through_failover(run, primary, standby, bouncer, dsn, logs, args, counter)
            run.read_only = int(counts["connections_read_only"])
            check_new_primary(run, standby, logs)
        finally:
            if bouncer is not None:
                bouncer.cleanup()
    return run


def writes_through_failover(
    run: FailoverRun,
    primary: LocalServer,
    standby: StandbyServer,
    bouncer: PgBouncer | None,
    dsn: str,
    logs: list[WriterLog],
    args: argparse.Namespace,
    counter: WarningCounter,
) -> dict[str, int | float]:
    """Write, fence or stop the primary, promote the standby, write on; return the pool's stats()."""
    pool = pgops.Pool(dsn, min_size=args.pool_size, max_size=args.pool_size, name=f"failover-{run.variant}")
    stop = threading.Event()
    threads: list[threading.Thread] = []
    probe: RecoveryProbe | None = None
    try:
        pool.wait()
        counter.take()  # from here on, this run's records only
        call = make_call(pool, None if run.variant == "b" else POLICY)
        threads = [
            threading.Thread(target=writer_loop, args=(call, i + 1, logs[i], stop), daemon=True)
            for i in range(args.writers)
        ]
        for thread in threads:
            thread.start()
        time.sleep(args.steady)
        if run.scenario == FENCED:
            fence(primary)
            drain_writes(primary)
            standby.wait_replayed(current_wal_lsn(primary))
        else:
            primary.stop("immediate")
        probe = RecoveryProbe(standby)
        probe.start()
        began = time.monotonic()
        standby.promote()
        promoted_at = time.monotonic()
        run.promote_s = promoted_at - began
        if bouncer is not None:
            bouncer.repoint(standby)
        time.sleep(max(0.0, promoted_at + args.after - time.monotonic()))
        stop.set()
        for thread in threads:
            thread.join(pool.config.acquire_timeout + 35)  # a call waits at most that long
        stats = pool.stats()
        health = pool.health()
        run.health = health.status + "".join(f": {reason}" for reason in health.reasons)
    finally:
        stop.set()
        if probe is not None:
            probe.stop_event.set()
            probe.join(5)
        pool.close()
    run.warnings, run.retries = counter.take()
    run.errors.update(kind for log in logs for _, kind in log.errors)
    summarize_acks(run, logs, standby.port, promoted_at, probe.ended_at)
    return stats


def summarize_acks(
    run: FailoverRun, logs: list[WriterLog], new_port: int, promoted_at: float, recovery_end: float | None
) -> None:
    """Fill the timings from the writers' acknowledgements."""
    run.acked = sum(len(log.acks) for log in logs)
    new = [[t for t, _key, port in log.acks if port == new_port] for log in logs]
    old = [t for log in logs for t, _key, port in log.acks if port != new_port]
    run.acked_new = sum(len(times) for times in new)
    firsts = [times[0] for times in new if times]
    if firsts:
        run.first_new = min(firsts) - promoted_at
        if recovery_end is not None:
            run.first_new_recovery = min(firsts) - recovery_end
        if len(firsts) == len(new):
            run.all_back = max(firsts) - promoted_at
        if old:
            run.gap = min(firsts) - max(old)


def check_new_primary(run: FailoverRun, standby: StandbyServer, logs: list[WriterLog]) -> None:
    """Look every acknowledged id up on the new primary: count the missing, find the first new write."""
    acked = [key for log in logs for _t, key, _port in log.acks]
    first = min(((t, key) for log in logs for t, key, port in log.acks if port == standby.port), default=None)
    with contextlib.closing(standby.admin_connect()) as conn, conn.cursor() as cur:
        cur.execute("SELECT id FROM failover_events WHERE id = ANY(%s)", (acked,))
        found = {int(row[0]) for row in cur.fetchall()}
    missing = set(acked) - found
    run.missing = len(missing)
    run.missing_new = sum(
        1 for log in logs for _t, key, port in log.acks if key in missing and port == standby.port
    )
    run.first_row_found = None if first is None else first[1] in found


# -- read your writes --------------------------------------------------------------------------------


@dataclass
class RywRun:
    """The figures of one read-your-writes round."""

    token_ms: list[float] = field(default_factory=list)
    plain_ms: list[float] = field(default_factory=list)
    token_stale: int = 0
    plain_stale: int = 0
    waited: int = 0
    fallback: int = 0
    warnings: collections.Counter[str] = field(default_factory=collections.Counter)


def ryw_run(args: argparse.Namespace, counter: WarningCounter) -> RywRun:
    """--ryw token reads and as many plain replica reads, interleaved, each right after its own insert."""
    run = RywRun()
    with ha_pair(RYW_TABLE) as (primary, standby):
        pool = pgops.Pool(primary.dsn(), read_dsn=standby.dsn(), min_size=2, max_size=2, name="ryw")
        try:
            replica = pool.replica
            assert replica is not None
            pool.wait()
            replica.wait()
            counter.take()

            def insert(key: int) -> None:
                def fn(conn: psycopg2.extensions.connection) -> None:
                    with conn.cursor() as cur:
                        cur.execute("INSERT INTO ryw_events (id) VALUES (%s)", (key,))

                pool.run(fn)

            def seen(conn: psycopg2.extensions.connection, key: int) -> bool:
                with conn.cursor() as cur:
                    cur.execute("SELECT EXISTS (SELECT 1 FROM ryw_events WHERE id = %s)", (key,))
                    row = cur.fetchone()
                return bool(row and row[0])

            before: dict[str, int | float] = {}
            for i in range(2 * (args.ryw + RYW_WARM_UP)):
                if i == 2 * RYW_WARM_UP:
                    before = replica.stats()
                measured = i >= 2 * RYW_WARM_UP
                insert(i)
                start = time.perf_counter()
                if i % 2 == 0:
                    token = pool.current_lsn()
                    with pool.read_connection(after=token) as conn:
                        found = seen(conn, i)
                    if measured:
                        run.token_ms.append((time.perf_counter() - start) * 1000.0)
                        run.token_stale += not found
                else:
                    with replica.connection() as conn:
                        found = seen(conn, i)
                    if measured:
                        run.plain_ms.append((time.perf_counter() - start) * 1000.0)
                        run.plain_stale += not found
            after = replica.stats()
            run.waited = int(after["reads_waited"] - before["reads_waited"])
            run.fallback = int(after["reads_fallback"] - before["reads_fallback"])
        finally:
            pool.close()
    run.warnings, _retries = counter.take()
    return run


# -- report ------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by nearest rank."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def median_of(values: list[Any]) -> float | None:
    """Median of the values that are not None, or None."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def number(value: float | None) -> str:
    return "—" if value is None else f"{value:g}"


def kinds(counter: collections.Counter[str]) -> str:
    """`total (n kind, ...)`, or 0."""
    total = sum(counter.values())
    if not total:
        return "0"
    return f"{total} (" + ", ".join(f"{n} {kind}" for kind, n in counter.most_common()) + ")"


FAILOVER_COLUMNS = (
    "variant",
    "round",
    "promote() s",
    "1st write on new primary, s after promote()",
    "… after recovery ended",
    "all writers back, s after promote()",
    "write gap s",
    "caller errors",
    "failed attempts",
    "acked (on new)",
    "acked missing on new (of them acked by new)",
    "connections_read_only",
    "pool health at the end",
)


def failover_table(runs: list[FailoverRun]) -> str:
    """One markdown table: each variant's rounds, then its median row."""
    lines = [
        "| " + " | ".join(FAILOVER_COLUMNS) + " |",
        "|---|---:" + "|---:" * (len(FAILOVER_COLUMNS) - 3) + "|---|",
    ]
    variants = list(dict.fromkeys(r.variant for r in runs))
    for variant in variants:
        mine = [r for r in runs if r.variant == variant]
        for i, r in enumerate(mine, 1):
            found = "" if r.first_row_found in (None, True) else " (1st row NOT found)"
            retried = ", ".join(f"{n}×{code}" for code, n in r.retries.most_common())
            retried = f" (retried: {retried})" if retried else ""
            cells = (
                VARIANTS[variant],
                str(i),
                seconds(r.promote_s),
                seconds(r.first_new) + found,
                seconds(r.first_new_recovery),
                seconds(r.all_back),
                seconds(r.gap),
                kinds(r.errors),
                f"{r.failed_attempts}{retried}",
                f"{r.acked} ({r.acked_new})",
                f"{r.missing} ({r.missing_new})" if r.missing else "0",
                str(r.read_only),
                _short(r.health, 60),
            )
            lines.append("| " + " | ".join(cells) + " |")
        if len(mine) > 1:
            cells = (
                f"**{VARIANTS[variant]}**",
                "**median**",
                seconds(median_of([r.promote_s for r in mine])),
                seconds(median_of([r.first_new for r in mine])),
                seconds(median_of([r.first_new_recovery for r in mine])),
                seconds(median_of([r.all_back for r in mine])),
                seconds(median_of([r.gap for r in mine])),
                number(median_of([sum(r.errors.values()) for r in mine])),
                number(median_of([r.failed_attempts for r in mine])),
                f"{number(median_of([r.acked for r in mine]))} "
                f"({number(median_of([r.acked_new for r in mine]))})",
                number(median_of([r.missing for r in mine])),
                number(median_of([r.read_only for r in mine])),
                "",
            )
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


RYW_COLUMNS = (
    "round",
    "stale: token",
    "stale: no token",
    "reads_waited",
    "reads_fallback",
    "token read p50 / p99 ms",
    "plain replica read p50 / p99 ms",
    "token extra p50 / p99 ms",
)


def ryw_table(runs: list[RywRun], n: int) -> str:
    """One markdown table: each round, then the median row."""
    lines = ["| " + " | ".join(RYW_COLUMNS) + " |", "|---" + "|---:" * (len(RYW_COLUMNS) - 1) + "|"]

    def row(label: str, figures: list[float]) -> str:
        stale_t, stale_p, waited, fallback, t50, t99, p50, p99 = figures
        cells = (
            label,
            f"{stale_t:g}/{n}",
            f"{stale_p:g}/{n}",
            f"{waited:g}",
            f"{fallback:g}",
            f"{t50:.2f} / {t99:.2f}",
            f"{p50:.2f} / {p99:.2f}",
            f"{t50 - p50:+.2f} / {t99 - p99:+.2f}",
        )
        return "| " + " | ".join(cells) + " |"

    all_figures = []
    for i, r in enumerate(runs, 1):
        figures = [
            r.token_stale,
            r.plain_stale,
            r.waited,
            r.fallback,
            percentile(r.token_ms, 50),
            percentile(r.token_ms, 99),
            percentile(r.plain_ms, 50),
            percentile(r.plain_ms, 99),
        ]
        all_figures.append(figures)
        lines.append(row(str(i), figures))
    if len(runs) > 1:
        lines.append(
            row("**median**", [statistics.median(column) for column in zip(*all_figures, strict=True)])
        )
    return "\n".join(lines)


def warnings_table(labelled: list[tuple[str, list[collections.Counter[str]]]]) -> str:
    """pgops WARNING records per scenario and variant: per round, and the messages over all rounds."""
    lines = ["| scenario / variant | warnings per round | messages over all rounds (count × message) |"]
    lines.append("|---|---:|---|")
    for label, counters in labelled:
        total: collections.Counter[str] = collections.Counter()
        for c in counters:
            total.update(c)
        per_round = ", ".join(str(sum(c.values())) for c in counters)
        messages = "; ".join(f"{n} × `{_short(message)}`" for message, n in total.most_common()) or "—"
        lines.append(f"| {label} | {per_round} | {messages} |")
    return "\n".join(lines)


def _short(message: str, width: int = 90) -> str:
    message = " ".join(message.split())
    return message if len(message) <= width else message[: width - 1] + "…"


# -- main ----------------------------------------------------------------------------------------------

SCENARIOS = ("fenced", "stopped", "ryw")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per scenario and variant (default 3)")
    parser.add_argument("--writers", type=int, default=8, help="writer threads (default 8)")
    parser.add_argument("--pool-size", type=int, default=4, help="pgops pool min = max (and PgBouncer's)")
    parser.add_argument("--steady", type=float, default=1.0, help="seconds of writes before the fence/stop")
    parser.add_argument("--after", type=float, default=3.0, help="seconds of writes after promote()")
    parser.add_argument("--ryw", type=int, default=300, help="reads of each kind in read-your-writes")
    parser.add_argument("--variants", default="a,b,c", help="fenced-primary variants to run (default a,b,c)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"of {', '.join(SCENARIOS)}")
    parser.add_argument("--quick", action="store_true", help="1 round, shorter phases: does it run?")
    parser.add_argument("-v", "--verbose", action="store_true", help="show pgops' log records")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steady, args.after, args.ryw = 1, 0.5, 1.5, 50
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if not set(args.variants) <= set(VARIANTS) or not set(args.scenarios) <= set(SCENARIOS):
        parser.error(f"--variants must be a subset of a,b,c and --scenarios of {', '.join(SCENARIOS)}")
    if min(args.rounds, args.writers, args.pool_size, args.ryw) < 1 or min(args.steady, args.after) <= 0:
        parser.error("--rounds, --writers, --pool-size and --ryw must be at least 1, the phases positive")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the scenarios round after round and print one markdown table per scenario."""
    args = parse_args(argv)
    counter = capture_logs(args.verbose)
    binary = find_pgbouncer()
    variants = [v for v in args.variants if v != "c" or binary is not None]
    load_before = os.getloadavg()
    fenced: list[FailoverRun] = []
    stopped: list[FailoverRun] = []
    ryw: list[RywRun] = []
    for round_no in range(1, args.rounds + 1):  # rounds outermost, so drift hits every variant alike
        if "fenced" in args.scenarios:
            for variant in variants:
                fenced.append(failover_run(FENCED, variant, args, counter, binary))
                print(f"done: round {round_no}, {FENCED} {variant}", file=sys.stderr, flush=True)
        if "stopped" in args.scenarios:
            stopped.append(failover_run(STOPPED, "a", args, counter, binary))
            print(f"done: round {round_no}, {STOPPED} a", file=sys.stderr, flush=True)
        if "ryw" in args.scenarios:
            ryw.append(ryw_run(args, counter))
            print(f"done: round {round_no}, read your writes", file=sys.stderr, flush=True)
    load_after = os.getloadavg()
    report(args, binary, fenced, stopped, ryw, load_before, load_after)
    return 0


def report(
    args: argparse.Namespace,
    binary: str | None,
    fenced: list[FailoverRun],
    stopped: list[FailoverRun],
    ryw: list[RywRun],
    load_before: tuple[float, float, float],
    load_after: tuple[float, float, float],
) -> None:
    """Print the set-up, the tables and the warning counts."""
    print(
        f"failover_bench: {args.rounds} round(s), {args.writers} writers on a pgops pool of "
        f"{args.pool_size}, "
        f"{args.steady:g} s of writes before, {args.after:g} s after promote(); retry: {POLICY_TEXT}; "
        f"PostgreSQL on 127.0.0.1 (TCP); load average {load_before[0]:.2f} before, {load_after[0]:.2f} after"
    )
    if "c" in args.variants and binary is None:
        print("variant (c) skipped: pgbouncer not installed (apt-get install pgbouncer)")
    if fenced:
        print(f"\n### {FENCED}\n")
        print(failover_table(fenced))
    if stopped:
        print(f"\n### {STOPPED} (pg_ctl stop -m immediate)\n")
        print(failover_table(stopped))
    if ryw:
        print(f"\n### read your writes ({args.ryw} reads of each kind per round, interleaved)\n")
        print(ryw_table(ryw, args.ryw))
    print("\n### pgops WARNING records\n")
    labelled: list[tuple[str, list[collections.Counter[str]]]] = []
    for scenario, runs in ((FENCED, fenced), (STOPPED, stopped)):
        for variant in dict.fromkeys(r.variant for r in runs):
            counters = [r.warnings for r in runs if r.variant == variant]
            labelled.append((f"{scenario} {VARIANTS[variant]}", counters))
    if ryw:
        labelled.append(("read your writes", [r.warnings for r in ryw]))
    print(warnings_table(labelled))


if __name__ == "__main__":
    sys.exit(main())
