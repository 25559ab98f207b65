"""Retry: delays, classification against real server errors, and a pool that survives restarts."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable, Iterator

import psycopg2
import psycopg2.extensions
import pytest

import pgops
from pgops import CannotConnect, Pool, PoolTimeout, RetryPolicy, is_retryable, retry, retry_call
from pgtest import LocalServer, free_port, wait_until

FAST = RetryPolicy(max_attempts=30, initial_delay=0.05, max_delay=0.5)


def server_error(admin: psycopg2.extensions.connection, sqlstate: str) -> psycopg2.Error:
    """Return the exception psycopg2 raises for a server error with this SQLSTATE."""
    try:
        with admin.cursor() as cur:
            cur.execute(f"DO $$ BEGIN RAISE EXCEPTION 'test' USING ERRCODE = '{sqlstate}'; END $$")
    except psycopg2.Error as exc:
        assert exc.pgcode == sqlstate
        return exc
    raise AssertionError("no error raised")


RETRYABLE = [
    "08000",
    "08003",
    "08006",
    "08001",
    "08004",
    "40001",
    "40P01",
    "53300",
    "55P03",
    "57P01",
    "57P02",
]
RETRYABLE += ["57P03", "25006"]
NOT_RETRYABLE = ["08007", "28000", "28P01", "3D000", "42P01", "42601", "42501", "22012", "22P02", "23505"]
NOT_RETRYABLE += ["23503", "P0001", "57014", "XX000"]


@pytest.mark.parametrize("sqlstate", RETRYABLE)
def test_retryable_sqlstates(admin: psycopg2.extensions.connection, sqlstate: str) -> None:
    """Connection, serialization, deadlock, capacity, lock and shutdown errors are retried."""
    assert is_retryable(server_error(admin, sqlstate))


@pytest.mark.parametrize("sqlstate", NOT_RETRYABLE)
def test_non_retryable_sqlstates(admin: psycopg2.extensions.connection, sqlstate: str) -> None:
    """Authentication, missing database, syntax, data and constraint errors are not retried."""
    assert not is_retryable(server_error(admin, sqlstate))


def test_connect_errors_are_classified_by_cause(pg_server: LocalServer, dbname: str) -> None:
    """A refused connection is retryable; a wrong password or a missing database is not."""
    with pytest.raises(psycopg2.OperationalError) as refused:
        psycopg2.connect(host="127.0.0.1", port=free_port(), dbname="x", user="x", connect_timeout=2)
    assert refused.value.pgcode is None and is_retryable(refused.value)
    if pg_server.password is None:
        pytest.skip("the session server has no password")
    with pytest.raises(psycopg2.OperationalError) as wrong_password:
        psycopg2.connect(pg_server.dsn(dbname).replace(pg_server.password, "not-the-password"))
    assert not is_retryable(wrong_password.value)
    with pytest.raises(psycopg2.OperationalError) as no_database:
        psycopg2.connect(pg_server.dsn("pgops_no_such_database"))
    assert not is_retryable(no_database.value)


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            'connection to server at "db", port 5432 failed: FATAL:  the database system is starting up',
            True,
        ),
        (
            'connection to server at "db", port 5432 failed: FATAL:  the database system is shutting down',
            True,
        ),
        ('connection to server at "db", port 5432 failed: timeout expired', True),
        ("server closed the connection unexpectedly", True),
        ('connection to server at "db" failed: FATAL:  password authentication failed for user "app"', False),
        ('connection to server at "db" failed: FATAL:  database "docs" does not exist', False),
        ('connection to server at "db" failed: FATAL:  role "app" does not exist', False),
        (
            'connection to server on socket "/tmp/.s.PGSQL.5432" failed: fe_sendauth: no password supplied',
            False,
        ),
    ],
)
def test_connect_messages_without_sqlstate(message: str, expected: bool) -> None:
    """libpq's connect-time messages, which carry no SQLSTATE, are classified by their words."""
    assert is_retryable(psycopg2.OperationalError(message)) is expected


def test_other_exceptions_are_not_retried() -> None:
    """Plain Python errors and pgops' own fatal connect error are not retryable."""
    assert not is_retryable(ValueError("x"))
    assert not is_retryable(CannotConnect("no"))
    assert is_retryable(psycopg2.InterfaceError("connection already closed"))


def test_delays_without_jitter_grow_and_cap() -> None:
    """Delay n is min(max_delay, initial * multiplier**n); there are max_attempts - 1 of them."""
    policy = RetryPolicy(max_attempts=6, initial_delay=1.0, max_delay=10.0, multiplier=3.0, jitter=False)
    assert list(policy.delays()) == [1.0, 3.0, 9.0, 10.0, 10.0]


@pytest.mark.parametrize("rand", [0.0, 0.25, 0.999])
def test_full_jitter_scales_the_capped_delay(rand: float) -> None:
    """Full jitter draws uniformly between zero and the capped exponential delay."""
    policy = RetryPolicy(max_attempts=4, initial_delay=2.0, max_delay=5.0)
    assert list(policy.delays(rand=lambda: rand)) == [2.0 * rand, 4.0 * rand, 5.0 * rand]


def test_huge_attempt_numbers_do_not_overflow() -> None:
    """The backoff stays at max_delay for attempt numbers far past any float range."""
    policy = RetryPolicy(max_attempts=10, initial_delay=1.0, max_delay=7.0, multiplier=10.0, jitter=False)
    assert policy.backoff(100_000) == 7.0


def retryable_error() -> psycopg2.OperationalError:
    """Return a retryable error without a server (a refused connection's message)."""
    return psycopg2.OperationalError("could not connect: Connection refused")


def failing(times: int, then: object = "ok") -> Callable[[], object]:
    """Return a function that raises a retryable error *times* times, then returns *then*."""
    calls = {"n": 0}

    def fn() -> object:
        calls["n"] += 1
        if calls["n"] <= times:
            raise retryable_error()
        return then

    return fn


def test_retry_call_sleeps_the_policy_delays() -> None:
    """retry_call sleeps between attempts exactly the policy's delays, never for real here."""
    slept: list[float] = []
    policy = RetryPolicy(max_attempts=4, initial_delay=0.5, multiplier=2.0, jitter=False)
    assert retry_call(failing(3), policy=policy, sleep=slept.append) == "ok"
    assert slept == [0.5, 1.0, 2.0]


def test_last_error_is_reraised_unchanged() -> None:
    """When attempts run out, the very last exception object propagates."""
    errors: list[BaseException] = []

    def fn() -> None:
        errors.append(retryable_error())
        raise errors[-1]

    with pytest.raises(psycopg2.OperationalError) as info:
        retry_call(fn, policy=RetryPolicy(max_attempts=3), sleep=lambda s: None)
    assert len(errors) == 3 and info.value is errors[-1]


def test_non_retryable_error_is_raised_at_once() -> None:
    """A non-retryable error is not retried."""
    calls: list[int] = []

    def fn() -> None:
        calls.append(1)
        raise ValueError("bad input")

    with pytest.raises(ValueError):
        retry_call(fn, policy=RetryPolicy(max_attempts=5), sleep=lambda s: None)
    assert calls == [1]


def test_deadline_is_never_overshot() -> None:
    """No sleep starts that would end past the deadline; the error is raised instead."""
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    policy = RetryPolicy(
        max_attempts=100, initial_delay=1.0, multiplier=2.0, max_delay=100, jitter=False, deadline=10
    )
    with pytest.raises(psycopg2.OperationalError):
        retry_call(failing(1000), policy=policy, sleep=sleep, clock=lambda: now[0])
    assert slept == [1.0, 2.0, 4.0]
    assert now[0] <= 10


def test_each_retry_logs_one_warning(
    caplog: pytest.LogCaptureFixture, admin: psycopg2.extensions.connection
) -> None:
    """Every retry logs one WARNING with the attempt, the delay and the SQLSTATE."""
    caplog.set_level(logging.WARNING, logger="pgops")
    error = server_error(admin, "40001")
    calls = {"n": 0}

    def fn() -> str:
        calls["n"] += 1
        if calls["n"] < 3:
            raise error
        return "done"

    policy = RetryPolicy(max_attempts=3, initial_delay=0.25, jitter=False)
    assert retry_call(fn, policy=policy, sleep=lambda s: None) == "done"
    lines = [r.getMessage() for r in caplog.records if r.name == "pgops"]
    assert len(lines) == 2
    assert "attempt 1 of 3" in lines[0] and "40001" in lines[0] and "0.250 s" in lines[0]
    assert "attempt 2 of 3" in lines[1] and "0.500 s" in lines[1]


def test_decorator_retries_and_keeps_the_name() -> None:
    """@retry(policy) retries the decorated function and keeps its metadata."""
    slept: list[float] = []
    fn = failing(2, then=42)

    @retry(RetryPolicy(max_attempts=3, jitter=False, initial_delay=0.1), sleep=slept.append)
    def answer() -> object:
        """Return the answer."""
        return fn()

    assert answer() == 42
    assert answer.__name__ == "answer" and answer.__doc__ == "Return the answer."
    assert slept == [0.1, 0.2]


def test_testing_switch_makes_delays_zero() -> None:
    """set_testing() turns every delay into zero, keeping the attempts."""
    slept: list[float] = []
    pgops.set_testing(True)
    try:
        assert retry_call(failing(2), policy=RetryPolicy(max_attempts=3), sleep=slept.append) == "ok"
    finally:
        pgops.set_testing(False)
    assert slept == [0.0, 0.0]


@pytest.mark.parametrize("before", [False, True])
def test_testing_switch_as_a_context_manager_restores_what_was_set(before: bool) -> None:
    """`with set_testing():` makes delays zero inside the block and restores the earlier setting after it."""
    slept: list[float] = []
    policy = RetryPolicy(max_attempts=2, initial_delay=0.5, jitter=False)
    pgops.set_testing(before)
    try:
        with pgops.set_testing():
            assert retry_call(failing(1), policy=policy, sleep=slept.append) == "ok"
        assert retry_call(failing(1), policy=policy, sleep=slept.append) == "ok"
    finally:
        pgops.set_testing(False)
    assert slept == [0.0, 0.0 if before else 0.5]


def test_retry_call_passes_every_keyword_of_the_function_on() -> None:
    """The wrapped function is positional-only, so a keyword named fn reaches it, like its other arguments."""

    def fetch(table: str, *, fn: str) -> tuple[str, str]:
        return table, fn

    assert retry_call(fetch, "documents", fn="count") == ("documents", "count")


# -- the pool under real faults ----------------------------------------------------------------


@pytest.fixture
def server_db(own_server: LocalServer) -> str:
    """A database on the test's own server, with a table for writes; returns its DSN."""
    with contextlib.closing(own_server.admin_connect()) as conn, conn.cursor() as cur:
        cur.execute("CREATE DATABASE app")
    with contextlib.closing(own_server.admin_connect("app")) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE writes (id bigint PRIMARY KEY)")
    return own_server.dsn("app")


def count_rows(server: LocalServer) -> int:
    """Return how many rows the writes table holds."""
    with contextlib.closing(server.admin_connect("app")) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM writes")
        row = cur.fetchone()
        assert row is not None
        return int(row[0])


def test_pool_created_while_server_is_down_connects_when_it_starts(
    own_server: LocalServer, server_db: str
) -> None:
    """Creating a pool does not fail while the server is down; the first query waits for it."""
    own_server.stop()
    with Pool(server_db, min_size=2, max_size=4, acquire_timeout=60) as pool:
        assert pool.stats()["pool_available"] == 0
        starter = threading.Timer(2.0, own_server.start)
        starter.start()
        try:
            assert pool.run(lambda conn: conn.cursor().execute("SELECT 1")) is None
        finally:
            starter.join()
        assert pool.stats()["connections_errors"] >= 1
        wait_until(lambda: pool.stats()["pool_size"] == 2, message="pool not refilled to min_size")


def test_acquire_during_outage_times_out_with_the_connection_error(
    own_server: LocalServer, server_db: str
) -> None:
    """While the server is away, getconn fails after acquire_timeout with the last connection error."""
    own_server.stop()
    with Pool(server_db, min_size=1, max_size=2, acquire_timeout=0.5) as pool:
        with pytest.raises(PoolTimeout) as info:
            pool.getconn()
        assert "last connection error" in str(info.value)
        assert "Connection refused" in str(info.value) or "could not connect" in str(info.value)
        assert pool.health().status == "unhealthy"


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_restart_under_load_reaches_no_caller(own_server: LocalServer, server_db: str, mode: str) -> None:
    """8 threads of idempotent writes through pool.run(retry=...) see no error across a restart."""
    errors: list[BaseException] = []
    acked: list[int] = []
    stop = threading.Event()
    counter = iter(range(1, 10**9))
    lock = threading.Lock()

    with Pool(server_db, min_size=2, max_size=8, acquire_timeout=10, test_before_acquire=False) as pool:

        def writer() -> None:
            while not stop.is_set():
                with lock:
                    n = next(counter)

                def insert(conn: psycopg2.extensions.connection, n: int = n) -> None:
                    with conn.cursor() as cur:
                        cur.execute("INSERT INTO writes VALUES (%s) ON CONFLICT DO NOTHING", (n,))

                try:
                    pool.run(insert, retry=FAST, idempotent=True)
                except BaseException as exc:
                    errors.append(exc)
                    return
                with lock:
                    acked.append(n)

        threads = [threading.Thread(target=writer) for _ in range(8)]
        for t in threads:
            t.start()
        try:
            wait_until(lambda: len(acked) >= 200, timeout=30, message="no progress before the fault")
            own_server.stop(mode)
            before = len(acked)
            own_server.start()
            wait_until(lambda: len(acked) >= before + 200, timeout=30, message="throughput did not resume")
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        assert errors == []
        assert pool.stats()["connections_lost"] + pool.stats()["connections_errors"] >= 1
    assert count_rows(own_server) >= len(acked)


def test_terminated_transaction_is_retried_whole(own_server: LocalServer, server_db: str) -> None:
    """pg_terminate_backend in the middle of a transaction: pool.run re-runs it and it commits once."""
    attempts: list[int] = []

    def transfer(conn: psycopg2.extensions.connection) -> None:
        with conn.cursor() as cur:
            cur.execute("INSERT INTO writes VALUES (%s)", (len(attempts) + 1,))
            cur.execute("SELECT pg_backend_pid()")
            row = cur.fetchone()
            assert row is not None
            attempts.append(row[0])
            if len(attempts) == 1:
                with contextlib.closing(own_server.admin_connect()) as admin, admin.cursor() as acur:
                    acur.execute("SELECT pg_terminate_backend(%s)", (row[0],))
            cur.execute("INSERT INTO writes VALUES (100)")

    with Pool(server_db, min_size=1, max_size=2) as pool:
        pool.run(transfer, retry=FAST)
    assert len(attempts) == 2
    with contextlib.closing(own_server.admin_connect("app")) as conn, conn.cursor() as cur:
        cur.execute("SELECT array_agg(id ORDER BY id) FROM writes")
        assert cur.fetchone() == ([2, 100],)


@pytest.fixture
def bad_dsns(pg_server: LocalServer, dbname: str) -> Iterator[dict[str, str]]:
    """DSNs with a wrong password and with a missing database."""
    if pg_server.password is None:
        pytest.skip("the session server has no password")
    yield {
        "password": pg_server.dsn(dbname).replace(pg_server.password, "Wr0ng-Pa55word"),
        "database": pg_server.dsn("pgops_missing_database"),
    }


@pytest.mark.parametrize("which", ["password", "database"])
def test_authentication_and_missing_database_fail_fast(bad_dsns: dict[str, str], which: str) -> None:
    """A wrong password or a missing database fails with one attempt, not after the acquire timeout."""
    with Pool(bad_dsns[which], min_size=0, max_size=2, acquire_timeout=120) as pool:
        with pytest.raises(CannotConnect) as info:
            pool.run(lambda conn: None, retry=RetryPolicy(max_attempts=5, initial_delay=30))
        assert pool.stats()["connections_num"] == 1
        message = str(info.value)
        assert "\n" not in message
        assert "Wr0ng-Pa55word" not in message and "Wr0ng-Pa55word" not in repr(info.value)
        assert ("password authentication failed" if which == "password" else "does not exist") in message


class CommitReplyLoss:
    """A TCP proxy to the server that once forwards a COMMIT, then drops the connection unanswered."""

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.armed = threading.Event()
        self.armed.set()
        self.sockets: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            server = socket.create_connection(self.upstream)
            self.sockets += [client, server]
            state = {"drop": False}
            threading.Thread(target=self._pump, args=(client, server, state, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, state, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, state: dict[str, bool], upstream: bool) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if upstream and self.armed.is_set() and b"COMMIT" in data:
                    self.armed.clear()
                    state["drop"] = True  # the COMMIT reaches the server; its answer never comes back
                elif not upstream and state["drop"]:
                    break
                dst.sendall(data)
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


@pytest.fixture
def lossy_dsn(dsn: str, admin: psycopg2.extensions.connection) -> Iterator[str]:
    """A DSN to the test database through a proxy that loses the reply to the first COMMIT."""
    with admin.cursor() as cur:
        cur.execute("CREATE TABLE transfers (id int PRIMARY KEY, note text)")
    params = psycopg2.extensions.parse_dsn(dsn)
    proxy = CommitReplyLoss(params.get("host", "127.0.0.1"), int(params.get("port", 5432)))
    try:
        yield psycopg2.extensions.make_dsn(dsn, port=proxy.port, sslmode="disable")
    finally:
        proxy.close()


def transfer_count(admin: psycopg2.extensions.connection) -> int:
    """Return how many transfer rows exist."""
    with admin.cursor() as cur:
        cur.execute("SELECT count(*) FROM transfers")
        row = cur.fetchone()
        assert row is not None
        return int(row[0])


def test_lost_commit_reply_is_not_retried_blindly(
    lossy_dsn: str, admin: psycopg2.extensions.connection
) -> None:
    """A connection lost during COMMIT raises CommitUnknown instead of running the transaction twice."""

    def transfer(conn: psycopg2.extensions.connection) -> None:
        with conn.cursor() as cur:
            cur.execute("INSERT INTO transfers VALUES (1, 'debit 100')")

    with Pool(lossy_dsn, min_size=1, max_size=1) as pool, pytest.raises(pgops.CommitUnknown):
        pool.run(transfer, retry=FAST)
    assert transfer_count(admin) == 1  # it was committed: a retry would have applied it twice


def test_idempotent_transaction_is_retried_after_a_lost_commit(
    lossy_dsn: str, admin: psycopg2.extensions.connection
) -> None:
    """With idempotent=True, pool.run re-runs a transaction whose COMMIT outcome is unknown."""
    attempts: list[int] = []

    def transfer(conn: psycopg2.extensions.connection) -> None:
        attempts.append(1)
        with conn.cursor() as cur:
            cur.execute("INSERT INTO transfers VALUES (1, 'debit 100') ON CONFLICT (id) DO NOTHING")

    with Pool(lossy_dsn, min_size=1, max_size=1) as pool:
        pool.run(transfer, retry=FAST, idempotent=True)
    assert len(attempts) == 2
    assert transfer_count(admin) == 1
