"""The pool against a real server: waiting, fairness, state on return, healing, recycling and metrics."""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Iterator

import psycopg2
import psycopg2.extensions
import psycopg2.extras
import psycopg2.pool
import pytest

import pgops
from pgops import CannotConnect, Pool, PoolClosed, PoolTimeout
from pgtest import PgServer, run_in_checkout, wait_until


@pytest.fixture
def pool(dsn: str) -> Iterator[Pool]:
    """A small pool on the test's own database."""
    with Pool(dsn, min_size=1, max_size=4, acquire_timeout=5.0, application_name="pgops-test") as p:
        yield p


def backend_pids(admin: psycopg2.extensions.connection, app: str = "pgops-test") -> list[int]:
    """Return the pids of the server sessions opened by the pool under test."""
    with admin.cursor() as cur:
        cur.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s", (app,))
        return [row[0] for row in cur.fetchall()]


def select_one(conn: psycopg2.extensions.connection) -> int:
    """Run SELECT 1 on a connection."""
    with conn.cursor() as cur:
        cur.execute("SELECT 1")
        row = cur.fetchone()
        assert row is not None
        return int(row[0])


def test_many_threads_share_few_connections(pool: Pool) -> None:
    """32 threads x 100 checkouts over 4 connections: no error, and the counters add up."""
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(100):
                with pool.connection() as conn:
                    select_one(conn)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    stats = pool.stats()
    assert stats["requests_num"] == 3200
    assert stats["queries_num"] == 3200
    assert stats["queries_errors"] == 0
    assert stats["requests_errors"] == 0
    assert stats["pool_size"] <= 4
    assert stats["pool_in_use"] == 0
    assert stats["requests_waiting"] == 0
    assert stats["connections_num"] == stats["pool_size"]
    histogram = pool.wait_histogram()
    assert histogram["count"] == 3200
    assert histogram["buckets"][-1] == (float("inf"), 3200)


def test_exhausted_pool_waits_then_times_out_with_its_state(dsn: str) -> None:
    """With every connection out, getconn waits, then raises PoolTimeout describing the pool."""
    with Pool(dsn, min_size=0, max_size=2, acquire_timeout=0.3) as pool:
        held = [pool.getconn(), pool.getconn()]
        with pytest.raises(PoolTimeout) as info:
            pool.getconn()
        message = str(info.value)
        assert (
            "total 2" in message and "in use 2" in message and "idle 0" in message and "waiting 0" in message
        )
        assert isinstance(info.value, psycopg2.pool.PoolError)
        for conn in held:
            pool.putconn(conn)
        assert pool.stats()["requests_errors"] == 1


@pytest.mark.parametrize(
    ("options", "wait"),
    [({"acquire_timeout": 10.0}, {}), ({}, {"timeout": float("inf")})],
    ids=["acquire_timeout", "timeout=inf"],
)
def test_waiter_gets_a_connection_returned_while_it_waits(
    dsn: str, options: dict[str, float], wait: dict[str, float]
) -> None:
    """A caller blocked on a full pool is served as soon as a connection comes back; getconn(timeout=inf)
    waits as long as it takes."""
    with Pool(dsn, min_size=0, max_size=1, **options) as pool:
        conn = pool.getconn()
        got: list[psycopg2.extensions.connection] = []
        waiter = threading.Thread(target=lambda: got.append(pool.getconn(**wait)))
        waiter.start()
        wait_until(lambda: pool.stats()["requests_waiting"] == 1, message="waiter not queued")
        pool.putconn(conn)
        waiter.join(10)
        assert got == [conn]
        pool.putconn(got[0])


def test_waiters_are_served_first_come_first_served(dsn: str) -> None:
    """Queued callers receive connections in the order they asked."""
    with Pool(dsn, min_size=0, max_size=1, acquire_timeout=10.0) as pool:
        conn = pool.getconn()
        order: list[int] = []

        def wait_for_turn(n: int) -> None:
            c = pool.getconn()
            order.append(n)
            pool.putconn(c)

        threads = []
        for n in range(5):
            t = threading.Thread(target=wait_for_turn, args=(n,))
            t.start()
            threads.append(t)
            wait_until(
                lambda n=n: pool.stats()["requests_waiting"] == n + 1, message=f"waiter {n} not queued"
            )
        pool.putconn(conn)
        for t in threads:
            t.join(10)
        assert order == [0, 1, 2, 3, 4]


@contextlib.contextmanager
def full_queue(dsn: str) -> Iterator[Pool]:
    """A pool of one connection, lent, with max_waiting=1 and one caller already waiting."""
    with Pool(dsn, min_size=0, max_size=1, acquire_timeout=10.0, max_waiting=1) as pool:
        held = pool.getconn()
        waiter = threading.Thread(target=lambda: pool.putconn(pool.getconn()))
        waiter.start()
        try:
            wait_until(lambda: pool.stats()["requests_waiting"] == 1, message="waiter not queued")
            yield pool
        finally:
            pool.putconn(held)
            waiter.join(10)


def test_max_waiting_caps_the_queue(dsn: str) -> None:
    """Beyond max_waiting queued callers, getconn fails at once."""
    with full_queue(dsn) as pool:
        with pytest.raises(pgops.TooManyRequests, match="too many requests waiting") as caught:
            pool.getconn()
        assert isinstance(caught.value, psycopg2.pool.PoolError)
        assert not isinstance(caught.value, PoolTimeout)
        assert not pgops.is_retryable(caught.value)  # a retry would only add to the queue


def test_a_caller_requeued_after_a_failed_check_is_never_turned_away(dsn: str) -> None:
    """max_waiting turns away new requests only: a caller whose connection failed its check queues again."""
    with full_queue(dsn) as pool:
        start = time.monotonic()
        with pytest.raises(PoolTimeout):  # queued, then timed out: not TooManyRequests
            pool._take(start, 0.2, first=False)


def test_connection_block_commits_and_rolls_back(pool: Pool, admin: psycopg2.extensions.connection) -> None:
    """connection() commits on a clean exit and rolls back when the block raises."""
    with admin.cursor() as cur:
        cur.execute("CREATE TABLE t (n int)")
    with pool.connection() as conn, conn.cursor() as cur:
        cur.execute("INSERT INTO t VALUES (1)")
    with pytest.raises(RuntimeError), pool.connection() as conn:
        with conn.cursor() as cur:
            cur.execute("INSERT INTO t VALUES (2)")
        raise RuntimeError("boom")
    with admin.cursor() as cur:
        cur.execute("SELECT array_agg(n) FROM t")
        assert cur.fetchone() == ([1],)
    assert pool.stats()["pool_in_use"] == 0


def test_connection_returned_in_aborted_transaction_is_rolled_back(pool: Pool) -> None:
    """A connection given back inside a failed transaction is rolled back and stays usable."""
    conn = pool.getconn()
    with pytest.raises(psycopg2.errors.DivisionByZero), conn.cursor() as cur:
        cur.execute("SELECT 1/0")
    assert conn.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_INERROR
    pool.putconn(conn)
    assert conn.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_IDLE
    again = pool.getconn()
    assert select_one(again) == 1
    pool.putconn(again)
    stats = pool.stats()
    assert stats["queries_errors"] == 1
    assert stats["connections_lost"] == 0


def test_autocommit_left_on_is_reset(pool: Pool) -> None:
    """A connection returned in autocommit mode goes back to transactional mode."""
    conn = pool.getconn()
    conn.autocommit = True
    pool.putconn(conn)
    again = pool.getconn()
    assert again.autocommit is False
    pool.putconn(again)


def test_closed_connection_is_discarded_and_replaced(pool: Pool) -> None:
    """A connection closed by its user is dropped on return and the pool refills."""
    conn = pool.getconn()
    conn.close()
    pool.putconn(conn)
    assert pool.stats()["connections_lost"] == 1
    with pool.connection() as fresh:
        assert fresh is not conn
        assert select_one(fresh) == 1


def test_terminated_backends_are_detected_and_replaced(
    dsn: str, admin: psycopg2.extensions.connection
) -> None:
    """After pg_terminate_backend of every pool session, the next checkouts all succeed."""
    with Pool(dsn, min_size=3, max_size=3, application_name="pgops-test") as pool:
        pool.wait(10)
        conns = [pool.getconn() for _ in range(3)]
        for conn in conns:
            select_one(conn)
            pool.putconn(conn)
        pids = backend_pids(admin)
        assert len(pids) == 3
        with admin.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", (pids,))
        wait_until(lambda: backend_pids(admin) == [], message="backends still alive")
        # The connections were used within the last 0.5 s: no routine check would catch them,
        # but the first lost one marks its siblings as suspect.
        for _ in range(10):
            with pool.connection() as conn:
                assert select_one(conn) == 1
        assert pool.stats()["connections_lost"] == 3


def test_test_before_acquire_catches_dead_idle_connections(
    dsn: str, admin: psycopg2.extensions.connection
) -> None:
    """An idle connection killed on the server is never handed out: the check replaces it."""
    with Pool(dsn, min_size=1, max_size=1, application_name="pgops-test") as pool:
        pool.wait(10)
        with admin.cursor() as cur:
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", (backend_pids(admin),)
            )
        wait_until(lambda: backend_pids(admin) == [], message="backend still alive")
        wait_until(
            lambda: time.monotonic() - pool._idle[0]._pgops_last_used > pgops._RECENTLY_USED,  # type: ignore[attr-defined]
            message="connection still counts as recently used",
        )
        with pool.connection() as conn:
            assert select_one(conn) == 1
        assert pool.stats()["connections_lost"] == 1


def test_max_lifetime_recycles_connections(dsn: str, admin: psycopg2.extensions.connection) -> None:
    """Connections older than max_lifetime are closed and replaced."""
    with Pool(dsn, min_size=2, max_size=2, max_lifetime=0.3, application_name="pgops-test") as pool:
        pool.wait(10)
        first = set(backend_pids(admin))
        wait_until(
            lambda: not first & set(backend_pids(admin)) and pool.stats()["connections_num"] >= 4,
            message="connections not recycled",
        )
        with pool.connection() as conn:
            assert select_one(conn) == 1


def test_idle_timeout_shrinks_to_min_size(dsn: str) -> None:
    """Connections idle past idle_timeout above min_size are closed."""
    with Pool(dsn, min_size=1, max_size=4, idle_timeout=0.3) as pool:
        conns = [pool.getconn() for _ in range(4)]
        for conn in conns:
            pool.putconn(conn)
        assert pool.stats()["pool_size"] == 4
        wait_until(lambda: pool.stats()["pool_size"] == 1, message="pool did not shrink to min_size")


def test_leak_warning_shows_where_the_connection_was_taken(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A connection held past leak_threshold logs one warning with the checkout stack."""
    caplog.set_level(logging.WARNING, logger="pgops")
    with Pool(dsn, min_size=0, max_size=1, leak_threshold=0.2) as leaky:
        conn = leaky.getconn()  # the line the warning must point at
        wait_until(
            lambda: any("possible leak" in r.getMessage() for r in caplog.records), message="no leak warning"
        )
        leaky.putconn(conn)
    leaks = [r for r in caplog.records if "possible leak" in r.getMessage()]
    assert len(leaks) == 1
    assert "test_leak_warning_shows_where_the_connection_was_taken" in leaks[0].getMessage()


def test_closed_pool_raises_pool_closed(dsn: str) -> None:
    """getconn on a closed pool raises PoolClosed; a connection returned after close is closed."""
    pool = Pool(dsn, min_size=0, max_size=1)
    conn = pool.getconn()
    pool.close()
    with pytest.raises(PoolClosed):
        pool.getconn()
    pool.putconn(conn)
    assert conn.closed


def test_close_wakes_waiters_with_pool_closed(dsn: str) -> None:
    """Callers waiting when the pool closes get PoolClosed instead of waiting out their timeout."""
    pool = Pool(dsn, min_size=0, max_size=1, acquire_timeout=30.0)
    conn = pool.getconn()
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            pool.getconn()
        except BaseException as exc:
            errors.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    wait_until(lambda: pool.stats()["requests_waiting"] == 1, message="waiter not queued")
    pool.close()
    waiter.join(10)
    assert len(errors) == 1 and isinstance(errors[0], PoolClosed)
    pool.putconn(conn)


def test_foreign_connection_is_refused(pool: Pool, dsn: str) -> None:
    """putconn refuses a connection that the pool did not give out, and a double return."""
    with contextlib.closing(psycopg2.connect(dsn)) as stranger, pytest.raises(psycopg2.pool.PoolError):
        pool.putconn(stranger)
    conn = pool.getconn()
    pool.putconn(conn)
    with pytest.raises(pgops.PoolError, match="already returned"):
        pool.putconn(conn)


def test_application_name_is_set(pool: Pool) -> None:
    """Every connection carries the configured application_name."""
    with pool.connection() as conn, conn.cursor() as cur:
        cur.execute("SHOW application_name")
        assert cur.fetchone() == ("pgops-test",)


def test_health_follows_utilization_and_success_rate(dsn: str) -> None:
    """health() turns degraded above 80% use and unhealthy above 95% use or under 90% success."""
    with Pool(dsn, min_size=0, max_size=10) as pool:
        assert pool.health().status == "healthy"
        held = [pool.getconn() for _ in range(9)]
        health = pool.health()
        assert health.status == "degraded" and "utilization 90%" in health.reasons[0]
        held.append(pool.getconn())
        assert pool.health().status == "unhealthy"
        for conn in held:
            pool.putconn(conn)
        for n in range(30):
            with contextlib.suppress(psycopg2.Error), pool.connection() as conn, conn.cursor() as cur:
                cur.execute("SELECT 1/0" if n % 3 == 0 else "SELECT 1")
        health = pool.health()
        assert health.status == "unhealthy"
        assert health.success_rate is not None and health.success_rate < 0.9


def test_monitor_logs_status(dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    """The monitor thread logs the pool's status every monitor_interval seconds."""
    caplog.set_level(logging.INFO, logger="pgops")
    with Pool(dsn, min_size=1, max_size=2, monitor_interval=0.1):
        wait_until(
            lambda: any(r.getMessage().startswith("pool 'default' healthy") for r in caplog.records),
            message="no status",
        )


def test_pgvector_types_are_registered(dsn: str, vector_admin: psycopg2.extensions.connection) -> None:
    """With the extension present, vector values come back as pgvector values through the pool."""
    with Pool(dsn, min_size=0, max_size=1) as pool, pool.connection() as conn, conn.cursor() as cur:
        cur.execute("SELECT '[1,2,3]'::vector")
        row = cur.fetchone()
        assert row is not None
        value = row[0]
        assert [float(x) for x in (value.to_list() if hasattr(value, "to_list") else value)] == [
            1.0,
            2.0,
            3.0,
        ]


def test_password_never_logged_or_shown(
    pg_server: object, dbname: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The DSN's password appears in no log record (DEBUG), repr, stats or PoolTimeout message."""
    password = pg_server.password  # type: ignore[attr-defined]
    assert password
    caplog.set_level(logging.DEBUG, logger="pgops")
    dsn = pg_server.url(dbname)  # type: ignore[attr-defined]
    texts: list[str] = []
    with Pool(dsn, min_size=1, max_size=1, acquire_timeout=0.2, monitor_interval=0.05) as pool:
        conn = pool.getconn()
        try:
            pool.getconn()
        except PoolTimeout as exc:
            texts += [str(exc), repr(exc)]
        pool.putconn(conn)
        texts += [repr(pool), repr(pool.config), str(pool.stats()), repr(pool.health())]
    bad = dsn.replace(password, password + "-wrong")
    with Pool(bad, min_size=1, max_size=1, acquire_timeout=2) as pool:
        with pytest.raises(pgops.CannotConnect) as info:
            pool.getconn()
        texts += [str(info.value), repr(info.value), repr(pool)]
    texts += [record.getMessage() for record in caplog.records]
    texts += [str(record.exc_info) for record in caplog.records if record.exc_info]
    assert any("started for" in t for t in texts)
    for text in texts:
        assert password not in text


def test_session_characteristics_do_not_leak_to_the_next_borrower(pool: Pool) -> None:
    """Read-only, isolation level, deferrable and cursor_factory set by one caller are reset on return."""
    conn = pool.getconn()
    conn.set_session(readonly=True, isolation_level="SERIALIZABLE", deferrable=True)
    conn.cursor_factory = psycopg2.extras.DictCursor
    pool.putconn(conn)
    again = pool.getconn()
    assert (again.readonly, again.isolation_level, again.deferrable) == (None, None, None)
    with again.cursor() as cur:
        cur.execute("SHOW transaction_read_only")
        assert cur.fetchone() == ("off",)
        assert type(cur).__name__ == "_Cursor"
    pool.putconn(again)


@pytest.mark.parametrize("name", ["nosuchdb", "no such db"])
def test_missing_database_fails_fast_even_with_a_space_in_its_name(pg_server: PgServer, name: str) -> None:
    """A database that does not exist raises CannotConnect at once instead of waiting out the timeout."""
    with Pool(pg_server.dsn(name), min_size=0, max_size=1, acquire_timeout=30) as pool:
        start = time.monotonic()
        with pytest.raises(CannotConnect, match="does not exist"):
            pool.getconn()
        assert time.monotonic() - start < 15  # the defect waited all 30 s


_WARN_ONCE = """
import psycopg2, pgops
calls = []
def flaky():
    calls.append(1)
    if len(calls) == 1:
        raise psycopg2.OperationalError("server closed the connection unexpectedly")
pgops.set_testing()
pgops.retry_call(flaky, policy=pgops.RetryPolicy(max_attempts=2))
"""


@pytest.mark.parametrize("configured", [False, True])
def test_warnings_reach_stderr_only_when_the_application_configures_logging(configured: bool) -> None:
    """Without logging configured a pgops warning prints nothing; with basicConfig it is printed."""
    script = ("import logging; logging.basicConfig()\n" if configured else "") + _WARN_ONCE
    proc = run_in_checkout([sys.executable, "-c", script], timeout=60)
    assert proc.returncode == 0, proc.stderr
    if configured:
        assert "WARNING:pgops:retrying flaky after attempt 1 of 2" in proc.stderr
    else:
        assert proc.stderr == ""


# What a system without select.poll, fork or os.dup of a socket (Windows) leaves pgops to work with.
_WITHOUT_POSIX = """
import os, select, sys, time
import random, selectors, socket, threading  # the standard library as it is imported there
import psycopg2
del select.poll
del os.register_at_fork
def no_dup(fd):
    raise OSError("os.dup of a socket handle is not supported")
os.dup = no_dup
import pgops
assert isinstance(pgops._readiness(0), pgops._SelectPoll)
other = psycopg2.connect(sys.argv[1])
other.autocommit = True
with pgops.Pool(sys.argv[1], min_size=1, max_size=1, test_before_acquire=False) as pool:
    with pool.connection() as conn:
        pid = conn.info.backend_pid
    other.cursor().execute("SELECT pg_terminate_backend(%s)", (pid,))
    deadline = time.monotonic() + 10
    while not pgops._SelectPoll(conn.fileno()).poll(0):  # the server's goodbye has arrived
        assert time.monotonic() < deadline, "the terminated session never said goodbye"
        time.sleep(0.01)
    with pool.connection() as conn:  # used just now and unchecked: only the socket check can tell
        assert conn.info.backend_pid != pid
        conn.cursor().execute("SELECT 1")
    assert pool.stats()["connections_lost"] == 1
    conn = pool.getconn()
    pgops._cut(conn)  # what the watchdog does to a stalled connection
    try:
        conn.cursor().execute("SELECT 1")
    except psycopg2.OperationalError:
        pass
    else:
        raise AssertionError("a cut-off connection still answered")
    pool.putconn(conn)
    with pool.connection() as conn:
        conn.cursor().execute("SELECT 1")
print("ok")
"""


def test_pool_works_without_poll_fork_or_dup(dsn: str) -> None:
    """Where select.poll, fork and os.dup of a socket are missing (Windows), the pool still heals."""
    proc = run_in_checkout([sys.executable, "-c", _WITHOUT_POSIX, dsn])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "ok\n"
