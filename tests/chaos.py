"""The soak's driver: a pooled read/write workload under chaos, then proof that nothing was lost or leaked.

``run_soak(server, seconds)`` takes a started LocalServer (tests/pgtest.py), creates a database and a
table on it, and runs:

* **the workload** — ``threads`` (16) callers, each in a loop of one operation at a time through
  ``pool.run(fn, retry=RetryPolicy(...))``: 70% writes (insert a row whose id the client made up; the
  id counts as *acknowledged* only once ``pool.run`` has returned) and 30% reads (fetch an
  acknowledged id, which must be there, or count one caller's rows).  Writes are idempotent
  (``ON CONFLICT (id) DO NOTHING``) and reads are reads, so both run with ``idempotent=True``:
  ``pool.run`` re-runs the whole transaction when the connection breaks, even during COMMIT, when
  the first attempt may have committed already (``CommitUnknown``).  A retry that finds its row
  present is counted as an *ambiguous commit*.
* **chaos** — every few seconds (``fault_gap``, at random), the next kind of a fixed rotation
  (shuffled each round, so every kind comes once per round) of:
  ``terminate`` (pg_terminate_backend of a random subset of the pool's sessions),
  ``restart`` (``pg_ctl stop -m fast``, then start), ``crash`` (``pg_ctl stop -m immediate``, then
  start: crash recovery), and ``migrate`` (write the next numbered migration, then run two
  ``Migrator(pool, ...).migrate()`` concurrently, as two replicas starting up, in the background;
  half the time the next fault follows within 0.1 s, so that it hits them mid-run).  A migrate
  attempt that fails while a fault overlaps it is a *fault-induced migrate error*; it is retried once
  the server is back.  Any other migrate failure is an error.
* **recovery time** of each server fault — from ``start()`` returning to the end of the first
  successful pooled operation afterwards.  The next fault waits until that is measured.

At the end chaos stops, the workload stops, the pool settles (nothing in use, and back to
``min_size`` once ``idle_timeout`` has passed), and the invariants are checked: no caller error, every
acknowledged write present, no read of an acknowledged id that missed, no connection in use, the pool
at min_size with as many server sessions as it counts, every migration applied, ``pool.health()``
healthy and ``/health/detailed`` (HealthApp, called in-process) "pass".  ``SoakResult.table()`` is a
markdown summary and ``SoakResult.failures()`` lists the invariants that did not hold.

It lives beside the tests so that tests/test_soak.py (a 20 s run) needs nothing from bench/;
``python bench/soak.py --minutes 5`` is the long run's command line around it.  Every loop has a
deadline and every thread is joined; nothing here asserts timings.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import random
import secrets
import shutil
import statistics
import tempfile
import threading
import time
import traceback
import uuid
from pathlib import Path

import psycopg2
import psycopg2.extensions

import pgtest
from pgops import HealthApp, Migration, Migrator, Pool, RetryPolicy
from pgtest import LocalServer

APP_NAME = "pgops-soak"
"""application_name of the pool's sessions: the terminate fault picks its victims by it."""

FAULT_KINDS = ("terminate", "restart", "crash", "migrate")
"""Every kind of fault; each round of chaos injects each of them once, in a shuffled order."""

SERVER_FAULTS = ("restart", "crash")
"""The faults that stop the server; recovery time is measured after each."""

WRITE_RATIO = 0.7
MIGRATE_REPLICAS = 2  # concurrent Migrator runs per migrate fault, like replicas starting together

POOL_MIN = 4
POOL_MAX = 20  # 16 callers, two migrators and a health check fit without starving anyone for long
IDLE_TIMEOUT = 2.0  # short, so the pool shrinks back to min_size while the run settles
MAX_LIFETIME = 15.0  # recycling happens during the run too
ACQUIRE_TIMEOUT = 5.0

RETRY = RetryPolicy(max_attempts=10, initial_delay=0.05, max_delay=1.0, multiplier=2.0, deadline=30.0)
"""The callers' policy.  An outage lasts about a second or two (pg_ctl stop, start, crash recovery):
an attempt that starts during it waits for a connection (up to ACQUIRE_TIMEOUT) rather than failing,
so a few attempts cover it; 10 attempts and 30 s leave a wide margin without hiding a stuck pool."""

RECOVERY_PATIENCE = 30.0  # seconds a server fault may take to see a successful operation again
MIGRATE_PATIENCE = 60.0  # seconds a migrate job keeps retrying fault-induced failures
SETTLE_TIMEOUT = IDLE_TIMEOUT + 20.0
JOIN_TIMEOUT = 60.0  # a caller in pool.run finishes within RETRY.deadline plus one acquire timeout

_logger = logging.getLogger("pgops.soak")


@dataclasses.dataclass
class SoakResult:
    """What a soak run did and what it found; ``failures()`` lists the invariants that did not hold."""

    seed: int
    threads: int
    seconds: float  # requested workload duration
    elapsed: float = 0.0  # actual duration of the workload (chaos included)
    reads: int = 0
    writes: int = 0  # acknowledged writes
    attempts: int = 0  # transaction attempts (calls of fn by pool.run), reads and writes
    ambiguous_commits: int = 0  # a retried write found its row: an earlier attempt had committed
    caller_errors: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    error_samples: list[str] = dataclasses.field(default_factory=list)
    faults: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    backends_terminated: int = 0
    migrations_written: int = 0
    migrate_runs: int = 0  # successful Migrator.migrate() calls
    # Versions Migrator reported applied (on_done), by any run, also one that failed afterwards.
    applied_versions: list[int] = dataclasses.field(default_factory=list)
    migrate_fault_errors: int = 0  # migrate attempts that failed because a fault overlapped them
    migrate_fault_samples: list[str] = dataclasses.field(default_factory=list)
    migrate_errors: list[str] = dataclasses.field(default_factory=list)
    pending_migrations: list[str] = dataclasses.field(default_factory=list)
    recoveries: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    unrecovered: list[str] = dataclasses.field(default_factory=list)
    acknowledged: int = 0
    rows_present: int = 0
    lost_writes: int = 0
    lost_samples: list[str] = dataclasses.field(default_factory=list)
    read_misses: int = 0
    unacknowledged_rows: int = 0  # rows whose insert raised to its caller (committed, then unknown)
    settle_seconds: float | None = None
    pool_in_use: int = -1
    pool_size: int = -1
    pool_min: int = POOL_MIN
    server_sessions: int = -1
    pool_health: str = "unknown"
    pool_health_reasons: tuple[str, ...] = ()
    detailed_status: str = "unknown"
    detailed_http: str = ""
    stats: dict[str, int | float] = dataclasses.field(default_factory=dict)
    threads_alive: list[str] = dataclasses.field(default_factory=list)
    harness_errors: list[str] = dataclasses.field(default_factory=list)

    @property
    def total_caller_errors(self) -> int:
        """Return the number of pool.run calls that raised to their caller."""
        return sum(self.caller_errors.values())

    @property
    def migrations_unreported(self) -> int:
        """Return migrations applied (not pending) that no run reported: each committed just as a fault
        cut its run off (the connection lost during COMMIT), so that the run raised instead."""
        applied = self.migrations_written - len(self.pending_migrations)
        return max(0, applied - len(set(self.applied_versions)))

    @property
    def leaked_connections(self) -> int:
        """Return connections in use after settling, plus sessions above min_size or unaccounted for."""
        if self.pool_in_use < 0 or self.pool_size < 0:
            return -1
        surplus = max(0, self.pool_size - self.pool_min)
        orphans = abs(self.server_sessions - self.pool_size) if self.server_sessions >= 0 else 0
        return self.pool_in_use + surplus + orphans

    def failures(self) -> list[str]:
        """Return one line per invariant that did not hold (empty when the run passed)."""
        found: list[str] = []
        if self.total_caller_errors:
            found.append(f"{self.total_caller_errors} errors reached callers: {dict(self.caller_errors)}")
        if self.lost_writes:
            found.append(f"{self.lost_writes} acknowledged writes are missing, e.g. {self.lost_samples[:3]}")
        if self.read_misses:
            found.append(f"{self.read_misses} reads did not find an acknowledged row")
        if self.pool_in_use != 0:
            found.append(f"{self.pool_in_use} connections still in use after settling")
        if self.pool_size != self.pool_min:
            found.append(f"pool size {self.pool_size} is not back to min_size {self.pool_min}")
        if self.server_sessions != self.pool_size:
            found.append(f"the server has {self.server_sessions} pool sessions, the pool {self.pool_size}")
        if self.pool_health != "healthy":
            found.append(f"pool health is {self.pool_health}: {'; '.join(self.pool_health_reasons)}")
        if self.detailed_status != "pass":
            found.append(f"/health/detailed says {self.detailed_status!r} ({self.detailed_http})")
        missing = [kind for kind in FAULT_KINDS if not self.faults[kind]]
        if missing:
            found.append(f"no fault of kind {', '.join(missing)} was injected")
        if self.migrate_errors:
            found.append(f"migrate failed without a fault: {self.migrate_errors[:3]}")
        if self.pending_migrations:
            found.append(f"migrations left pending: {self.pending_migrations}")
        twice = sorted({v for v in self.applied_versions if self.applied_versions.count(v) > 1})
        if twice:
            found.append(f"migrations applied more than once: {twice}")
        if self.migrations_unreported > self.migrate_fault_errors:
            found.append(
                f"{self.migrations_unreported} migrations applied but never reported, "
                f"with only {self.migrate_fault_errors} runs cut off by a fault"
            )
        if self.unrecovered:
            found.append(f"no successful operation after: {self.unrecovered}")
        if self.threads_alive:
            found.append(f"threads still running: {self.threads_alive}")
        found.extend(f"harness: {line}" for line in self.harness_errors)
        return found

    @property
    def ok(self) -> bool:
        """Tell whether every invariant held."""
        return not self.failures()

    def table(self) -> str:
        """Return the summary as a markdown table."""
        ops = self.reads + self.writes
        rate = ops / self.elapsed if self.elapsed else 0.0
        retries = self.attempts - ops - self.total_caller_errors
        faults = ", ".join(f"{kind} {self.faults[kind]}" for kind in FAULT_KINDS)
        rows: list[tuple[str, str]] = [
            ("duration", f"{self.elapsed:.1f} s ({self.threads} threads, seed {self.seed})"),
            ("operations", f"{ops} ({rate:.0f}/s): {self.reads} reads, {self.writes} writes"),
            ("retried attempts", f"{max(retries, 0)} (transactions re-run by pool.run)"),
            ("errors seen by callers", self._errors_cell()),
            ("faults injected", f"{sum(self.faults.values())}: {faults}"),
            ("backends terminated", str(self.backends_terminated)),
            (
                "migrations",
                f"{self.migrations_written} written, {len(self.applied_versions)} reported applied "
                f"({self.migrations_unreported} committed as a fault cut their run off) by "
                f"{self.migrate_runs} runs; {self.migrate_fault_errors} fault-induced migrate errors "
                f"(retried), {len(self.migrate_errors)} other; {len(self.pending_migrations)} pending",
            ),
        ]
        for kind in SERVER_FAULTS:
            rows.append((f"recovery after {kind} (start → first op)", _spread(self.recoveries.get(kind, []))))
        rows += [
            (
                "lost writes",
                f"{self.lost_writes} of {self.acknowledged} acknowledged ({self.rows_present} rows)",
            ),
            ("reads missing an acknowledged row", str(self.read_misses)),
            ("ambiguous commits (retry found its row)", str(self.ambiguous_commits)),
            (
                "leaked connections",
                f"{self.leaked_connections} (in use {self.pool_in_use}, pool size {self.pool_size}, "
                f"min {self.pool_min}, server sessions {self.server_sessions}; settled in "
                f"{_seconds(self.settle_seconds)})",
            ),
            (
                "final health",
                f"pool.health() {self.pool_health}; /health/detailed {self.detailed_status} "
                f"({self.detailed_http})",
            ),
            (
                "pool counters",
                ", ".join(
                    f"{k} {self.stats.get(k, 0)}"
                    for k in ("connections_num", "connections_errors", "connections_lost", "returns_bad")
                ),
            ),
            ("result", "PASS" if self.ok else "FAIL"),
        ]
        lines = ["| metric | value |", "|---|---|"]
        lines += [f"| {name} | {value.replace('|', '/')} |" for name, value in rows]
        return "\n".join(lines)

    def _errors_cell(self) -> str:
        """Return the caller-errors cell: the total, then each kind with its count."""
        if not self.caller_errors:
            return "0"
        kinds = ", ".join(f"{k} ×{n}" for k, n in self.caller_errors.most_common())
        return f"{self.total_caller_errors}: {kinds}"


def _seconds(value: float | None) -> str:
    """Return a duration in seconds for the table, or a dash when there is none."""
    return "—" if value is None else f"{value:.2f} s"


def _spread(values: list[float]) -> str:
    """Return 'n faults: min / median / max' of durations in seconds, shown in ms."""
    if not values:
        return "—"
    ms = [v * 1000.0 for v in values]
    return f"{len(ms)}×: min {min(ms):.0f} ms, median {statistics.median(ms):.0f} ms, max {max(ms):.0f} ms"


def _describe(exc: BaseException) -> str:
    """Return 'Class[sqlstate]' for an exception, the key caller errors are counted by."""
    code = getattr(exc, "pgcode", None) or getattr(exc, "sqlstate", None)
    return f"{type(exc).__name__}[{code}]" if code else type(exc).__name__


def _one_line(exc: BaseException) -> str:
    """Return an exception as one short line: class, SQLSTATE and message."""
    return f"{_describe(exc)}: {' '.join(str(exc).split())[:300]}"


class _Soak:
    """The shared state of one run: workload threads, the chaos thread and migrate jobs."""

    def __init__(
        self, server: LocalServer, seconds: float, threads: int, seed: int, fault_gap: tuple[float, float]
    ) -> None:
        """Prepare a run on *server*; nothing touches the server before setup()."""
        self.server = server
        self.seconds = seconds
        self.threads = threads
        self.fault_gap = fault_gap
        self.result = SoakResult(seed=seed, threads=threads, seconds=seconds)
        self.lock = threading.Lock()
        self.rng = random.Random(f"{seed}-chaos")
        self.stop_workers = threading.Event()
        self.stop_chaos = threading.Event()
        self.server_up = threading.Event()
        self.server_up.set()
        self.epoch = 0  # bumped at the start and at the end of every fault
        self.acked: list[str] = []
        self.failed_ids: set[str] = set()
        self.awaiting: tuple[str, float] | None = None  # (fault kind, when start() returned)
        self.dbname = f"soak_{secrets.token_hex(4)}"
        self.migrations_dir = Path(tempfile.mkdtemp(prefix="pgops-soak-migrations-"))
        self.migrate_jobs: list[threading.Thread] = []
        self.pool: Pool | None = None

    # -- set-up --------------------------------------------------------------------------------

    def setup(self) -> Pool:
        """Create the database, the table and the pool."""
        with contextlib.closing(self.server.admin_connect()) as conn, conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{self.dbname}"')
        with contextlib.closing(self.server.admin_connect(self.dbname)) as conn, conn.cursor() as cur:
            cur.execute(
                "CREATE TABLE soak_items (id text PRIMARY KEY, worker int NOT NULL, payload text NOT NULL,"
                " created_at timestamptz NOT NULL DEFAULT clock_timestamp())"
            )
            cur.execute("CREATE INDEX soak_items_worker ON soak_items (worker)")
        self.pool = Pool(
            self.server.dsn(self.dbname),
            min_size=POOL_MIN,
            max_size=POOL_MAX,
            acquire_timeout=ACQUIRE_TIMEOUT,
            idle_timeout=IDLE_TIMEOUT,
            max_lifetime=MAX_LIFETIME,
            application_name=APP_NAME,
            monitor_interval=0.0,
        )
        self.pool.wait(timeout=30.0)
        return self.pool

    def teardown(self) -> None:
        """Close the pool, drop the database (when the server runs) and remove the migrations."""
        if self.pool is not None:
            self.pool.close()
        if self.server.is_running():
            try:
                pgtest.drop_database(self.server, self.dbname)
            except psycopg2.Error as exc:
                _logger.warning("could not drop %s: %s", self.dbname, exc)
        shutil.rmtree(self.migrations_dir, ignore_errors=True)

    def harness_error(self, where: str, exc: BaseException) -> None:
        """Record a failure of the soak's own machinery (not of pgops' callers)."""
        with self.lock:
            self.result.harness_errors.append(f"{where}: {_one_line(exc)}")
        _logger.error("%s failed:\n%s", where, "".join(traceback.format_exception(exc)))

    # -- workload ------------------------------------------------------------------------------

    def worker(self, index: int) -> None:
        """Run reads and writes one at a time until told to stop."""
        rng = random.Random(f"{self.result.seed}-worker-{index}")
        try:
            while not self.stop_workers.is_set():
                if rng.random() < WRITE_RATIO:
                    self.write(index)
                else:
                    self.read(index, rng)
        except BaseException as exc:  # a bug in the harness, not an error pool.run raised
            self.harness_error(f"worker {index}", exc)

    def write(self, index: int) -> None:
        """Insert one row with a fresh client-made id; acknowledge the id once pool.run returns."""
        assert self.pool is not None
        item_id = f"{index}-{uuid.uuid4()}"
        calls = 0

        def insert(conn: psycopg2.extensions.connection) -> int:
            nonlocal calls
            calls += 1
            with conn.cursor() as cur:
                cur.execute(
                    "INSERT INTO soak_items (id, worker, payload) VALUES (%s, %s, %s) "
                    "ON CONFLICT (id) DO NOTHING",
                    (item_id, index, "x" * 32),
                )
                return int(cur.rowcount)

        try:
            inserted = self.pool.run(insert, retry=RETRY, idempotent=True)
        except Exception as exc:
            self.caller_error("write", exc, calls)
            with self.lock:
                self.failed_ids.add(item_id)
            return
        done = time.monotonic()
        with self.lock:
            self.acked.append(item_id)
            self.result.writes += 1
            self.result.attempts += calls
            if inserted == 0:
                if calls > 1:
                    self.result.ambiguous_commits += 1
                else:
                    self.result.harness_errors.append(f"id {item_id!r} existed before its first insert")
        self.succeeded(done)

    def read(self, index: int, rng: random.Random) -> None:
        """Fetch an acknowledged row by id (it must be there) or count one worker's rows."""
        assert self.pool is not None
        with self.lock:
            item_id = (
                self.acked[rng.randrange(len(self.acked))] if self.acked and rng.random() < 0.7 else None
            )
        calls = 0

        def select(conn: psycopg2.extensions.connection) -> int:
            nonlocal calls
            calls += 1
            with conn.cursor() as cur:
                if item_id is not None:
                    cur.execute("SELECT count(*) FROM soak_items WHERE id = %s", (item_id,))
                else:
                    cur.execute("SELECT count(*) FROM soak_items WHERE worker = %s", (index,))
                row = cur.fetchone()
                return int(row[0]) if row else -1

        try:
            found = self.pool.run(select, retry=RETRY, idempotent=True)  # a read: safe to re-run
        except Exception as exc:
            self.caller_error("read", exc, calls)
            return
        done = time.monotonic()
        with self.lock:
            self.result.reads += 1
            self.result.attempts += calls
            if item_id is not None and found != 1:
                self.result.read_misses += 1
                self.result.lost_samples.append(f"read miss {item_id}")
        self.succeeded(done)

    def caller_error(self, op: str, exc: Exception, calls: int) -> None:
        """Count an error that pool.run raised to its caller, despite the retry policy."""
        with self.lock:
            self.result.caller_errors[f"{op} {_describe(exc)}"] += 1
            self.result.attempts += calls
            if len(self.result.error_samples) < 10:
                state = "up" if self.server_up.is_set() else "down"
                self.result.error_samples.append(
                    f"{op} after {calls} attempts (server {state}, epoch {self.epoch}): {_one_line(exc)}"
                )
        _logger.error("%s raised to its caller after %d attempts: %s", op, calls, _one_line(exc))

    def succeeded(self, done: float) -> None:
        """Note a successful operation that ended at *done*: it ends a pending recovery measurement."""
        if self.awaiting is None:  # racy fast path; checked again under the lock
            return
        with self.lock:
            if self.awaiting is not None and done >= self.awaiting[1]:
                kind, since = self.awaiting
                self.result.recoveries.setdefault(kind, []).append(done - since)
                self.awaiting = None

    # -- chaos ---------------------------------------------------------------------------------

    def chaos(self) -> None:
        """Inject one fault every few seconds until the duration is over and every kind has occurred."""
        deadline = time.monotonic() + self.seconds
        hard_deadline = deadline + 120.0  # the first round must complete even on a slow machine
        pending: list[str] = []
        kind = ""
        try:
            while not self.stop_chaos.is_set():
                gap = self.rng.uniform(*self.fault_gap)
                if kind == "migrate" and self.rng.random() < 0.5:
                    gap = self.rng.uniform(0.0, 0.1)  # let the next fault hit the migrators mid-run
                if self.stop_chaos.wait(gap):
                    return
                now = time.monotonic()
                everything_once = all(self.result.faults[k] for k in FAULT_KINDS)
                if (now >= deadline and everything_once) or now >= hard_deadline:
                    return
                if not pending:
                    pending = list(FAULT_KINDS)
                    self.rng.shuffle(pending)
                kind = pending.pop()
                _logger.info("chaos: %s", kind)
                with self.lock:
                    self.result.faults[kind] += 1
                if kind == "terminate":
                    self.terminate()
                elif kind == "migrate":
                    self.start_migrate()
                else:
                    self.server_fault(kind)
        except BaseException as exc:
            self.harness_error("chaos", exc)
            self.ensure_server_up()

    def bump_epoch(self) -> None:
        """Mark the start or end of a fault, so that a migrate attempt can tell it overlapped one."""
        with self.lock:
            self.epoch += 1

    def terminate(self) -> None:
        """Terminate a random, non-empty subset of the pool's server sessions."""
        with contextlib.closing(self.server.admin_connect(self.dbname)) as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = %s AND pid <> pg_backend_pid()",
                (APP_NAME,),
            )
            pids = [int(row[0]) for row in cur.fetchall()]
            victims = [pid for pid in pids if self.rng.random() < 0.5] or pids[:1]
            self.bump_epoch()
            try:
                killed = 0
                for pid in victims:
                    cur.execute("SELECT pg_terminate_backend(%s)", (pid,))
                    row = cur.fetchone()
                    killed += bool(row and row[0])
            finally:
                self.bump_epoch()
        with self.lock:
            self.result.backends_terminated += killed

    def server_fault(self, kind: str) -> None:
        """Stop the server (fast for restart, immediate for crash), start it, and time the recovery."""
        self.server_up.clear()
        self.bump_epoch()
        try:
            if kind == "restart":
                self.server.stop("fast")
            else:
                self.server.crash()
        finally:
            self.ensure_server_up()
            self.bump_epoch()
        since = time.monotonic()
        with self.lock:
            self.awaiting = (kind, since)
        # Wait for the measurement, so that faults never overlap a recovery still in progress.
        deadline = since + RECOVERY_PATIENCE
        while self.awaiting is not None and time.monotonic() < deadline and not self.stop_chaos.is_set():
            time.sleep(0.01)
        with self.lock:
            if self.awaiting is not None:
                self.result.unrecovered.append(f"{kind} at {since:.1f}")
                self.awaiting = None

    def ensure_server_up(self) -> None:
        """Start the server if it is not running (three tries); mark it up."""
        for attempt in range(3):
            try:
                self.server.start()
                break
            except Exception as exc:
                if attempt == 2:
                    self.harness_error("server start", exc)
                    self.stop_chaos.set()
                    self.stop_workers.set()
                    return
                time.sleep(1.0)
        self.server_up.set()

    # -- migrations ----------------------------------------------------------------------------

    def start_migrate(self) -> None:
        """Write the next numbered migration and run MIGRATE_REPLICAS migrators at once, in the background.

        The previous jobs finish first: each migrate fault is a new deploy whose replicas all see the
        same files.  A runner that listed its files before a newer one was written and applied would
        find an applied version without a file, which Migrator refuses (ChecksumMismatch), as it does
        for an older replica in a rolling deploy; that is a separate question, not a fault.
        """
        _join_all(self.migrate_jobs, MIGRATE_PATIENCE + 10.0)
        with self.lock:
            self.result.migrations_written += 1
            version = self.result.migrations_written
        if version % 2:
            name = f"{version:04d}_add_column_c{version}.sql"
            sql = f"ALTER TABLE soak_items ADD COLUMN IF NOT EXISTS c{version} int;\n"
        else:
            name = f"{version:04d}_create_side_table_{version}.sql"
            sql = f"CREATE TABLE IF NOT EXISTS soak_side_{version} (id int PRIMARY KEY, note text);\n"
        (self.migrations_dir / name).write_text(f"-- soak migration {version}\n{sql}", encoding="utf-8")
        for replica in range(MIGRATE_REPLICAS):
            job = threading.Thread(
                target=self.migrate_job, args=(version, replica), name=f"soak-migrate-{version}-{replica}"
            )
            job.daemon = True
            job.start()
            self.migrate_jobs.append(job)

    def applied(self, migration: Migration, elapsed: float) -> None:
        """Count a migration Migrator reports applied: its transaction committed."""
        with self.lock:
            self.result.applied_versions.append(migration.version)

    def migrate_job(self, version: int, replica: int) -> None:
        """Run migrate until it succeeds; retry failures that a fault overlapped, once the server is back."""
        assert self.pool is not None
        deadline = time.monotonic() + MIGRATE_PATIENCE
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self.server_up.wait(remaining):
                    with self.lock:
                        self.result.migrate_errors.append(f"job {version}/{replica}: gave up at its deadline")
                    return
                epoch = self.epoch
                try:
                    Migrator(self.pool, str(self.migrations_dir), lock_timeout=30.0).migrate(
                        on_done=self.applied
                    )
                except Exception as exc:
                    overlapped = self.epoch != epoch or not self.server_up.is_set()
                    with self.lock:
                        if overlapped and time.monotonic() < deadline:
                            self.result.migrate_fault_errors += 1
                            if len(self.result.migrate_fault_samples) < 10:
                                self.result.migrate_fault_samples.append(_one_line(exc))
                        else:
                            self.result.migrate_errors.append(f"job {version}/{replica}: {_one_line(exc)}")
                            return
                    time.sleep(0.05)
                    continue
                with self.lock:
                    self.result.migrate_runs += 1
                return
        except BaseException as exc:
            self.harness_error(f"migrate job {version}/{replica}", exc)

    # -- the end -------------------------------------------------------------------------------

    def settle(self) -> None:
        """Wait for nothing in use and the pool back at min_size, then count the server's sessions."""
        assert self.pool is not None
        started = time.monotonic()
        deadline = started + SETTLE_TIMEOUT
        while True:
            stats = self.pool.stats()
            if stats["pool_in_use"] == 0 and stats["pool_size"] == stats["pool_min"]:
                self.result.settle_seconds = time.monotonic() - started
                break
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        self.result.pool_in_use = int(stats["pool_in_use"])
        self.result.pool_size = int(stats["pool_size"])
        self.result.pool_min = int(stats["pool_min"])
        # A closed connection's backend exits asynchronously: give the count a few seconds to agree.
        sessions = -1
        session_deadline = time.monotonic() + 10.0
        with contextlib.closing(self.server.admin_connect(self.dbname)) as conn, conn.cursor() as cur:
            while True:
                cur.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (APP_NAME,))
                row = cur.fetchone()
                sessions = int(row[0]) if row else -1
                if sessions == self.result.pool_size or time.monotonic() >= session_deadline:
                    break
                time.sleep(0.05)
        self.result.server_sessions = sessions

    def verify_writes(self) -> None:
        """Compare the acknowledged ids with the table: every one must be there."""
        with contextlib.closing(self.server.admin_connect(self.dbname)) as conn, conn.cursor() as cur:
            cur.execute("SELECT id FROM soak_items")
            present = {str(row[0]) for row in cur.fetchall()}
        acked = set(self.acked)
        lost = sorted(acked - present)
        result = self.result
        result.acknowledged = len(acked)
        result.rows_present = len(present)
        result.lost_writes = len(lost)
        result.lost_samples.extend(lost[:10])
        result.unacknowledged_rows = len(present - acked)
        strangers = present - acked - self.failed_ids
        if strangers:
            result.harness_errors.append(f"{len(strangers)} rows nobody wrote, e.g. {sorted(strangers)[:3]}")

    def verify_health(self) -> None:
        """Check migrations, pool.health() and HealthApp's /health/detailed, called in-process."""
        assert self.pool is not None
        migrator = Migrator(self.pool, str(self.migrations_dir))
        self.result.pending_migrations = [m.name for m in migrator.pending()]
        app = HealthApp(self.pool, migrator=migrator, cache_ttl=0.0)
        reply = pgtest.wsgi_call(app, "/health/detailed")
        body = reply.body
        self.result.detailed_http = str(reply.status)
        try:
            self.result.detailed_status = str(json.loads(body).get("status"))
        except ValueError:
            self.result.detailed_status = f"unparsable body {body[:100]!r}"
        if self.result.detailed_status != "pass":
            self.result.detailed_http += f" {body.decode(errors='replace')[:500]}"
        health = self.pool.health()
        self.result.pool_health = health.status
        self.result.pool_health_reasons = health.reasons
        # The checks above borrowed connections: they must have been returned too.
        stats = self.pool.stats()
        self.result.stats = dict(stats)
        if stats["pool_in_use"]:
            self.result.pool_in_use = int(stats["pool_in_use"])


def _join_all(threads: list[threading.Thread], timeout: float) -> list[str]:
    """Join threads within a shared deadline; return the names of those still alive."""
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return [t.name for t in threads if t.is_alive()]


def run_soak(
    server: LocalServer,
    seconds: float,
    threads: int = 16,
    seed: int | None = None,
    fault_gap: tuple[float, float] = (1.0, 3.0),
) -> SoakResult:
    """Run the workload and chaos on a started *server* for about *seconds*, then check the invariants.

    The run lasts at least until one fault of each kind has been injected (and each server fault's
    recovery measured), so a short run still covers every kind.  The server is left running; the
    database the run created is dropped.
    """
    if seed is None:
        seed = secrets.randbelow(2**31)
    soak = _Soak(server, seconds, threads, seed, fault_gap)
    result = soak.result
    workers: list[threading.Thread] = []
    chaos: threading.Thread | None = None
    try:
        soak.setup()
        started = time.monotonic()
        for index in range(threads):
            worker = threading.Thread(target=soak.worker, args=(index,), name=f"soak-worker-{index}")
            worker.daemon = True
            workers.append(worker)
            worker.start()
        chaos = threading.Thread(target=soak.chaos, name="soak-chaos", daemon=True)
        chaos.start()
        chaos.join(seconds + 300.0)
        soak.stop_chaos.set()
        result.threads_alive += _join_all([chaos], 60.0)
        soak.ensure_server_up()
        result.threads_alive += _join_all(soak.migrate_jobs, MIGRATE_PATIENCE + 10.0)
        soak.stop_workers.set()
        result.threads_alive += _join_all(workers, JOIN_TIMEOUT)
        result.elapsed = time.monotonic() - started
        soak.settle()
        soak.verify_writes()
        soak.verify_health()
    except BaseException as exc:
        soak.harness_error("run_soak", exc)
        if not isinstance(exc, Exception):
            raise
    finally:
        soak.stop_chaos.set()
        soak.stop_workers.set()
        _join_all([*([chaos] if chaos else []), *soak.migrate_jobs, *workers], JOIN_TIMEOUT)
        with contextlib.suppress(Exception):
            soak.ensure_server_up()
        soak.teardown()
    return result
