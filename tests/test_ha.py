"""The pool on HA PostgreSQL: a primary that stops taking writes, failover to a promoted standby, a write pool
that lands on a standby, read pools with read-your-writes, and what pgops sends through a transaction pooler.

Every topology is real: a streaming standby made with pg_basebackup -R (tests/standby.py), fencing with
default_transaction_read_only, `pg_ctl promote`, PgBouncer in transaction mode (tests/pgbouncer.py).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
from collections.abc import Callable, Iterator

import psycopg2
import psycopg2.errors
import psycopg2.extensions
import pytest

import pgops
import pgtest
from netproxy import Proxy
from pgbouncer import PgBouncer
from pgops import HealthApp, Pool, PoolConfig, RetryPolicy
from pgtest import LocalServer, PgServer, run_bounded, scalar, wait_until
from standby import StandbyServer, current_wal_lsn, fail_over, fence, ha_dsn

# Enough attempts to outlast a failover, fast first retries; the deadline keeps a broken run finite.
FAILOVER_RETRY = RetryPolicy(max_attempts=200, initial_delay=0.01, max_delay=0.2, deadline=60)


def _insert(value: int) -> Callable[[psycopg2.extensions.connection], None]:
    def write(conn: psycopg2.extensions.connection) -> None:
        with conn.cursor() as cur:
            cur.execute("INSERT INTO writes (id) VALUES (%s)", (value,))

    return write


def _make_table(server: LocalServer) -> None:
    with contextlib.closing(server.admin_connect()) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE writes (id bigint PRIMARY KEY)")


def _ids(server: LocalServer) -> set[int]:
    with contextlib.closing(server.admin_connect()) as conn, conn.cursor() as cur:
        cur.execute("SELECT id FROM writes")
        return {row[0] for row in cur.fetchall()}


def _in_recovery(conn: psycopg2.extensions.connection) -> bool:
    return bool(scalar(conn, "SELECT pg_is_in_recovery()"))


class _Writers:
    """Threads that write unique ids through pool.run(retry=...) until stopped; they record what happened."""

    def __init__(self, pool: Pool, count: int = 4) -> None:
        self.pool = pool
        self.acknowledged: list[int] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._next = iter(range(1, 10**9))
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(count)]

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                value = next(self._next)
            try:
                self.pool.run(_insert(value), retry=FAILOVER_RETRY)
            except Exception as exc:
                self.errors.append(exc)
                return
            with self._lock:
                self.acknowledged.append(value)

    def __enter__(self) -> _Writers:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(FAILOVER_RETRY.deadline or 60)

    def count(self) -> int:
        with self._lock:
            return len(self.acknowledged)


# -- a primary that stops taking writes ----------------------------------------------------------


def test_writes_follow_a_fenced_primary_to_the_promoted_standby(
    ha_pair: tuple[LocalServer, StandbyServer],
) -> None:
    """Fenced primary (read-only, still up) + promoted standby: the pool lets go of the fenced server.

    Its connections fail writes with 25006; each is discarded, its siblings are checked, and new ones go
    through the multi-host DSN (target_session_attrs=read-write) to the new primary: no caller error,
    no acknowledged write lost.
    """
    primary, standby = ha_pair
    _make_table(primary)
    dsn = ha_dsn(primary, standby, target_session_attrs="read-write")
    with Pool(dsn, min_size=4, max_size=4, acquire_timeout=30) as pool:
        pool.wait(timeout=30)
        with _Writers(pool) as writers:
            wait_until(lambda: writers.count() >= 50, timeout=30, message="writes before the fence")
            fail_over(primary, standby)
            promoted_at = writers.count()
            wait_until(
                lambda: writers.count() >= promoted_at + 50, timeout=30, message="writes after promote"
            )
        assert writers.errors == []
        assert pool.stats()["connections_read_only"] >= 1
        with pool.connection() as conn:
            assert not _in_recovery(conn)
            assert scalar(conn, "SELECT inet_server_port()") == standby.port
    missing = set(writers.acknowledged) - _ids(standby)
    assert missing == set()


def test_writes_through_pgbouncer_follow_it_to_the_promoted_standby(
    ha_pair: tuple[LocalServer, StandbyServer], pgbouncer: Callable[..., PgBouncer]
) -> None:
    """Through PgBouncer (transaction mode): fenced primary, standby promoted, PgBouncer repointed and
    reloaded. Writes carry on with no caller error; once the pool's connections reach the new primary
    through the same PgBouncer, the pool is healthy again (it had warned: through a pooler to a read-only
    server)."""
    primary, standby = ha_pair
    _make_table(primary)
    bouncer = pgbouncer("transaction", pool_size=4, server=primary)
    with Pool(bouncer.dsn(), min_size=4, max_size=4, acquire_timeout=30) as pool:
        pool.wait(timeout=30)
        with _Writers(pool) as writers:
            wait_until(lambda: writers.count() >= 50, timeout=30, message="writes before the fence")
            fail_over(primary, standby)
            bouncer.repoint(standby)
            promoted_at = writers.count()
            wait_until(lambda: writers.count() >= promoted_at + 50, timeout=30, message="after promote")
            # (All 4 connections are busy, so health is not "healthy": utilization is over 95 %.)
            wait_until(
                lambda: not any("where writes fail" in r for r in pool.health().reasons),
                timeout=30,
                message="no longer degraded for the read-only server",
            )
        assert writers.errors == []
    missing = set(writers.acknowledged) - _ids(standby)
    assert missing == set()


def test_a_read_only_transaction_of_the_caller_keeps_its_connection(
    dsn: str, admin: psycopg2.extensions.connection
) -> None:
    """25006 from the caller's own READ ONLY transaction is no reason to discard the connection."""
    with admin.cursor() as cur:
        cur.execute("CREATE TABLE writes (id bigint PRIMARY KEY)")
    with Pool(dsn, min_size=1, max_size=1) as pool:
        pool.wait(timeout=30)
        with pool.connection() as conn:
            pid = conn.info.backend_pid
            conn.readonly = True
            with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction), conn.cursor() as cur:
                cur.execute("INSERT INTO writes VALUES (1)")
        pool.run(_insert(2))  # the same connection, back to read-write
        with pool.connection() as conn:
            assert conn.info.backend_pid == pid
        assert pool.stats()["connections_read_only"] == 0


def test_a_write_pool_on_a_standby_warns_once_and_is_degraded(
    ha_pair: tuple[LocalServer, StandbyServer], caplog: pytest.LogCaptureFixture
) -> None:
    """A DSN that reaches a standby (no target_session_attrs): one WARNING naming the fix, health degraded."""
    _primary, standby = ha_pair
    caplog.set_level(logging.WARNING, logger="pgops")
    with Pool(standby.dsn(), min_size=3, max_size=3) as pool:
        pool.wait(timeout=30)
        warnings = [
            r.getMessage() for r in caplog.records if "target_session_attrs=read-write" in r.getMessage()
        ]
        assert len(warnings) == 1, warnings
        assert "standby" in warnings[0]
        health = pool.health()
        assert health.status == "degraded"
        assert any("target_session_attrs=read-write" in reason for reason in health.reasons)
        # Writes fail as they must, and the connection is kept: another would reach the same standby.
        with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction), pool.connection() as conn:
            with conn.cursor() as cur:
                cur.execute("CREATE TABLE t (x int)")
        assert pool.stats()["connections_read_only"] == 0


def test_a_fenced_server_makes_the_pool_degraded_until_writable_again(
    own_server: LocalServer, caplog: pytest.LogCaptureFixture
) -> None:
    """One server, fenced: its connections are discarded, new ones are read-only too (degraded, one warning);
    unfenced, the pool is healthy again."""
    _make_table(own_server)
    caplog.set_level(logging.INFO, logger="pgops")
    with Pool(own_server.dsn(), min_size=2, max_size=2) as pool:
        pool.wait(timeout=30)
        fence(own_server)
        with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
            pool.run(_insert(1))
        wait_until(lambda: pool.health().status == "degraded", timeout=30, message="degraded")
        assert "default_transaction_read_only" in " ".join(pool.health().reasons)
        with contextlib.closing(own_server.admin_connect()) as conn, conn.cursor() as cur:
            cur.execute("ALTER SYSTEM RESET default_transaction_read_only")
            cur.execute("SELECT pg_reload_conf()")

        def written() -> bool:
            try:
                pool.run(_insert(2))
            except psycopg2.errors.ReadOnlySqlTransaction:
                return False
            return True

        wait_until(written, timeout=30, message="writes after unfencing")
        # Asked again at checkouts every 2 s: one taking writes makes the pool healthy.
        wait_until(
            lambda: pool.run(lambda conn: None) is None and pool.health().status == "healthy",
            timeout=30,
            message="healthy again",
        )
    assert any("takes writes again" in r.getMessage() for r in caplog.records)


# -- read pools ----------------------------------------------------------------------------------


@pytest.fixture
def ha_pool(ha_pair: tuple[LocalServer, StandbyServer]) -> Iterator[tuple[Pool, LocalServer, StandbyServer]]:
    """A pool on the primary whose read pool (read_dsn) is on the standby, with the writes table."""
    primary, standby = ha_pair
    _make_table(primary)
    standby.wait_replayed(current_wal_lsn(primary))
    with Pool(primary.dsn(), read_dsn=standby.dsn(), min_size=2, max_size=4) as pool:
        pool.wait(timeout=30)
        assert pool.replica is not None
        pool.replica.wait(timeout=30)
        yield pool, primary, standby


def test_read_pool_reads_on_the_standby_and_refuses_writes_at_once(
    ha_pool: tuple[Pool, LocalServer, StandbyServer],
) -> None:
    pool, _primary, standby = ha_pool
    replica = pool.replica
    assert replica is not None and replica.name == "default-read" and replica.config.read_only
    with pool.read_connection() as conn:
        assert _in_recovery(conn)
        assert scalar(conn, "SELECT inet_server_port()") == standby.port
    attempts = 0

    def write(conn: psycopg2.extensions.connection) -> None:
        nonlocal attempts
        attempts += 1
        _insert(1)(conn)

    with pytest.raises(pgops.ReadOnlyError) as caught:
        replica.run(write, retry=RetryPolicy(max_attempts=5, initial_delay=0.01))
    assert attempts == 1
    assert isinstance(caught.value, psycopg2.errors.ReadOnlySqlTransaction)
    assert "'default-read' is a read pool" in str(caught.value)
    assert not pgops.is_retryable(caught.value)
    assert replica.stats()["connections_read_only"] == 0
    with pool.read_connection() as conn:  # the connection is fine for reads
        assert scalar(conn, "SELECT count(*) FROM writes") == 0


def test_read_pool_on_a_primary_still_refuses_writes(own_server: LocalServer) -> None:
    """A read pool that lands on a primary (prefer-standby with no standby up) is still READ ONLY."""
    _make_table(own_server)
    with Pool(own_server.dsn(), read_only=True, min_size=1, max_size=1) as reads:
        with pytest.raises(pgops.ReadOnlyError):
            reads.run(_insert(1))
        with reads.connection() as conn:
            assert not _in_recovery(conn)
    assert _ids(own_server) == set()


def test_read_your_writes_with_a_token(ha_pool: tuple[Pool, LocalServer, StandbyServer]) -> None:
    """300 writes, each read back through the read pool with its token: none is missed."""
    pool, _primary, _standby = ha_pool
    stale = 0
    for value in range(1, 301):
        pool.run(_insert(value))
        token = pool.current_lsn()
        with pool.read_connection(after=token) as conn:
            found = scalar(conn, "SELECT count(*) FROM writes WHERE id = %s", (value,))
        stale += found != 1
    assert stale == 0
    assert pool.replica is not None
    stats = pool.replica.stats()
    assert stats["reads_waited"] + stats["reads_fallback"] <= 300


def test_a_token_the_replica_has_not_replayed_falls_back_to_the_primary(
    ha_pool: tuple[Pool, LocalServer, StandbyServer],
) -> None:
    """Replay paused on the standby: a token read waits `wait` seconds, then reads on the primary."""
    pool, _primary, standby = ha_pool
    assert pool.replica is not None
    with contextlib.closing(standby.admin_connect()) as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_wal_replay_pause()")
    pool.run(_insert(7))
    token = pool.current_lsn()
    with pool.read_connection(after=token, wait=0.2) as conn:
        assert not _in_recovery(conn)
        assert scalar(conn, "SELECT count(*) FROM writes WHERE id = 7") == 1
    assert pool.replica.stats()["reads_fallback"] == 1
    with contextlib.closing(standby.admin_connect()) as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_wal_replay_resume()")
    with pool.read_connection(after=token, wait=30) as conn:
        assert _in_recovery(conn)
        assert scalar(conn, "SELECT count(*) FROM writes WHERE id = 7") == 1


@pytest.mark.parametrize("token", ["", "0/", "1/2/3", "not an lsn", "0/16B3748; DROP TABLE writes"])
def test_a_bad_token_is_refused_before_anything_is_sent(dsn: str, token: str) -> None:
    with Pool(dsn, min_size=0, max_size=1) as pool:
        with pytest.raises(pgops.ConfigError, match="is not a WAL position"):
            with pool.read_connection(after=token):
                pass
        assert pool.stats()["requests_num"] == 0


def test_read_connection_without_a_read_pool_uses_the_pool(dsn: str) -> None:
    with Pool(dsn, min_size=1, max_size=1) as pool:
        token = pool.current_lsn()
        with pool.read_connection(after=token) as conn:
            assert scalar(conn, "SELECT 1") == 1
        assert pool.replica is None


# -- health of read pools ------------------------------------------------------------------------


def test_health_of_a_read_pool_on_a_standby(ha_pair: tuple[LocalServer, StandbyServer]) -> None:
    """A read pool on a standby is ready; with replay paused and writes behind it, lag makes it not ready."""
    primary, standby = ha_pair
    _make_table(primary)
    with Pool(standby.dsn(), read_only=True, name="reads", max_replica_lag=0.5, min_size=1) as reads:
        app = HealthApp(reads, cache_ttl=0)
        ready = pgtest.wsgi_call(app, "/health/ready")
        assert ready.status == 200, ready.body
        metrics = pgtest.wsgi_call(app, "/metrics").body.decode()
        assert 'pgops_replication_lag_seconds{pool="reads"} ' in metrics
        assert 'pgops_pool_size{pool="reads"} ' in metrics
        with contextlib.closing(standby.admin_connect()) as conn, conn.cursor() as cur:
            cur.execute("SELECT pg_wal_replay_pause()")

        def lagging() -> pgtest.Reply | None:
            with contextlib.closing(primary.admin_connect()) as conn, conn.cursor() as cur:
                cur.execute("INSERT INTO writes VALUES (txid_current())")
            reply = pgtest.wsgi_call(app, "/health/ready")
            return reply if reply.status == 503 else None

        reply = wait_until(lagging, timeout=30, message="ready turns 503 on lag")
        assert "replication lag" in reply.json()["reasons"][0]
        assert "max_replica_lag=0.5 s" in reply.json()["reasons"][0]
        detailed = pgtest.wsgi_call(app, "/health/detailed").json()
        assert detailed["checks"]["postgres:replicationLag"][0]["status"] == "warn"
        with contextlib.closing(standby.admin_connect()) as conn, conn.cursor() as cur:
            cur.execute("SELECT pg_wal_replay_resume()")
        wait_until(
            lambda: pgtest.wsgi_call(app, "/health/ready").status == 200, timeout=30, message="ready again"
        )


def test_health_of_a_pool_with_a_read_pool(ha_pool: tuple[Pool, LocalServer, StandbyServer]) -> None:
    """One app reports both pools: componentId per pool in detailed, a pool label on every pool metric."""
    pool, _primary, _standby = ha_pool
    app = HealthApp(pool, cache_ttl=0)
    assert pgtest.wsgi_call(app, "/health/ready").status == 200
    detailed = pgtest.wsgi_call(app, "/health/detailed").json()
    ids = [entry["componentId"] for entry in detailed["checks"]["postgres:responseTime"]]
    assert ids == ["default", "default-read"]
    assert detailed["checks"]["postgres:responseTime"][1]["status"] == "pass"  # in recovery is its job
    metrics = pgtest.wsgi_call(app, "/metrics").body.decode()
    assert metrics.count("# TYPE pgops_pool_size gauge") == 1
    assert 'pgops_pool_size{pool="default"} ' in metrics
    assert 'pgops_pool_size{pool="default-read"} ' in metrics
    assert 'pgops_acquire_wait_seconds_bucket{pool="default-read",le="+Inf"} ' in metrics
    for line in metrics.splitlines():
        if line.startswith(("pgops_pool_", "pgops_checkouts", "pgops_connections", "pgops_queries")):
            assert '{pool="' in line, line
            name, value = line.split("} ")
            if not name.split("{")[0].endswith("seconds_total"):
                assert value.isdigit(), line  # counts are integers, as they were unlabelled


def test_a_pool_whose_read_pool_is_down_stays_ready_and_reads_on_the_primary(
    ha_pool: tuple[Pool, LocalServer, StandbyServer],
) -> None:
    """The read pool's server gone: ready stays 200 (detailed warns, naming the read pool), and reads
    turn to the primary instead of waiting for the read pool."""
    pool, primary, standby = ha_pool
    assert pool.replica is not None
    app = HealthApp(pool, cache_ttl=0, ready_timeout=2)
    standby.stop("immediate")
    for _ in range(3):  # the first waits up to the read pool's connect_timeout, the others not at all
        with pool.read_connection() as conn:
            assert scalar(conn, "SELECT inet_server_port()") == primary.port
    assert pool.replica.stats()["reads_fallback"] >= 3
    assert pgtest.wsgi_call(app, "/health/ready").status == 200
    detailed = pgtest.wsgi_call(app, "/health/detailed")
    assert detailed.status == 200
    body = detailed.json()
    assert body["status"] == "warn"
    entries = {e["componentId"]: e for e in body["checks"]["postgres:responseTime"]}
    assert entries["default"]["status"] == "pass"
    assert entries["default-read"]["status"] == "warn"
    assert "postgres:responseTime default-read: " in body["output"]
    assert standby.password not in detailed.body.decode()


def test_a_token_read_lends_a_connection_with_no_transaction_open(
    ha_pool: tuple[Pool, LocalServer, StandbyServer],
) -> None:
    """After the replay check the caller may still choose its isolation level or autocommit."""
    pool, _primary, _standby = ha_pool
    pool.run(_insert(1))
    token = pool.current_lsn()
    with pool.read_connection(after=token, wait=30) as conn:
        assert conn.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE
        conn.set_session(isolation_level="REPEATABLE READ")
        assert scalar(conn, "SHOW transaction_isolation") == "repeatable read"
        assert scalar(conn, "SELECT count(*) FROM writes WHERE id = 1") == 1


def test_a_read_pool_refuses_writes_in_autocommit_too(own_server: LocalServer) -> None:
    """psycopg2 does not make autocommit statements READ ONLY; a read pool's connections do, however often
    autocommit is switched, by whichever call, over several checkouts of the same connection."""
    _make_table(own_server)

    def switches(conn: psycopg2.extensions.connection) -> Iterator[None]:
        conn.autocommit = True
        yield
        conn.autocommit = False
        conn.autocommit = True
        yield
        conn.autocommit = False
        conn.set_session(autocommit=True)
        yield
        conn.autocommit = False
        conn.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT)
        yield

    refused = 0
    with Pool(own_server.dsn(), read_only=True, min_size=1, max_size=1) as reads:
        for _checkout in range(3):
            with reads.connection() as conn:
                for _ in switches(conn):
                    assert scalar(conn, "SHOW transaction_read_only") == "on"
                    with pytest.raises(pgops.ReadOnlyError) as caught, conn.cursor() as cur:
                        cur.execute("INSERT INTO writes VALUES (1)")
                    assert caught.value.pgcode == "25006"
                    refused += 1
    assert refused == 12
    assert _ids(own_server) == set()


def test_a_checkout_object_used_twice_takes_a_connection_each_time(dsn: str) -> None:
    with Pool(dsn, min_size=2, max_size=2) as pool:
        checkout = pool.connection()
        with checkout as first:
            pass
        other = pool.getconn()
        with checkout as second:
            assert second is not other
        pool.putconn(other)
        assert pool.stats()["pool_in_use"] == 0
        assert first is not None


def test_a_read_pool_that_could_not_connect_tries_again_by_itself(
    ha_pair: tuple[LocalServer, StandbyServer],
) -> None:
    """min_size=0 and the standby down: reads turn to the primary, and the read pool, which no read waits
    in, still tries its server again, so reads come back to the standby once it is up."""
    primary, standby = ha_pair
    standby.stop("fast")
    with Pool(primary.dsn(), read_dsn=standby.dsn(), min_size=0, max_size=2, connect_timeout=1) as pool:
        assert pool.replica is not None
        for _ in range(2):
            with pool.read_connection() as conn:
                assert scalar(conn, "SELECT inet_server_port()") == primary.port
        assert pool.replica.stats()["reads_fallback"] == 2
        standby.start()

        def on_standby() -> bool:
            with pool.read_connection() as conn:
                return bool(scalar(conn, "SELECT inet_server_port()") == standby.port)

        wait_until(on_standby, timeout=30, message="reads back on the standby")


def test_the_degraded_state_ends_when_its_connections_are_gone(own_server: LocalServer) -> None:
    """Fenced while a second connection opened, unfenced, the surplus connection trimmed as idle: the pool
    is not left degraded."""
    _make_table(own_server)
    with Pool(own_server.dsn(), min_size=1, max_size=2, idle_timeout=1) as pool:
        pool.wait(timeout=30)
        first = pool.getconn()
        fence(own_server)
        second = pool.getconn()  # a new connection, to a read-only server
        assert any("where writes fail" in reason for reason in pool.health().reasons)
        with contextlib.closing(own_server.admin_connect()) as conn, conn.cursor() as cur:
            cur.execute("ALTER SYSTEM RESET default_transaction_read_only")
            cur.execute("SELECT pg_reload_conf()")
        pool.putconn(second)
        pool.putconn(first)
        wait_until(lambda: pool.stats()["pool_size"] == 1, timeout=30, message="surplus trimmed")
        ids = itertools.count(1)
        wait_until(
            lambda: pool.run(_insert(next(ids))) is None and pool.health().status == "healthy",
            timeout=30,
            message="healthy again",
        )


def test_a_standalone_read_pool_waits_for_a_token_then_says_so(
    ha_pair: tuple[LocalServer, StandbyServer],
) -> None:
    primary, standby = ha_pair
    _make_table(primary)
    with (
        Pool(primary.dsn(), min_size=1, max_size=1) as writes,
        Pool(standby.dsn(), read_only=True, min_size=1, max_size=1) as reads,
    ):
        writes.run(_insert(1))
        with reads.read_connection(after=writes.current_lsn(), wait=30) as conn:
            assert scalar(conn, "SELECT count(*) FROM writes") == 1
        with contextlib.closing(standby.admin_connect()) as conn, conn.cursor() as cur:
            cur.execute("SELECT pg_wal_replay_pause()")
        writes.run(_insert(2))
        with pytest.raises(pgops.PoolTimeout, match="has not replayed"):
            with reads.read_connection(after=writes.current_lsn(), wait=0.1):
                pass


@pytest.mark.parametrize(
    ("lsn", "start"),
    [("0/301A018", "0/301A000"), ("0/3000028", "0/3000000"), ("0/301A030", "0/301A030"), ("1/18", "1/0")],
)
def test_a_token_just_past_a_page_header_is_the_page_start(lsn: str, start: str) -> None:
    """A standby's replay stops at a page start until more WAL comes; a token must not point past it."""
    assert pgops._page_start(lsn, 8192) == start


def test_replay_lag_counts_from_when_unreplayed_wal_was_first_seen(dsn: str) -> None:
    """Lag is how long received WAL has waited: an old last commit alone (an idle primary, then WAL with
    no commit such as VACUUM) is no lag."""
    now = [100.0]
    with Pool(dsn, min_size=0, max_size=1) as pool:
        app = HealthApp(pool, clock=lambda: now[0])
        assert app._replay_lag("r", True, 1000, 1000, 80.0) == 0.0  # all replayed; last commit 80 s ago
        assert app._replay_lag("r", True, 2000, 1000, 80.0) == 0.0  # just received
        now[0] = 103.0
        assert app._replay_lag("r", True, 3000, 1500, 83.0) == 3.0  # the WAL seen at 100 still waits
        now[0] = 104.0
        assert app._replay_lag("r", True, 3000, 2500, 84.0) == 1.0  # that is replayed; 3000 seen at 103
        assert app._replay_lag("r", True, 3000, 3000, 84.0) == 0.0
        now[0] = 110.0  # the WAL receiver gone (the primary restarting, say) since 104
        assert app._replay_lag("r", False, None, 3000, 90.0) == 6.0
        now[0] = 112.0
        assert app._replay_lag("r", True, 5000, 4000, 92.0) == 0.0
        now[0] = 113.0
        assert app._replay_lag("r", True, 200, 100, 93.0) == 0.0  # received went back: a new timeline
        assert app._replay_lag("s", False, None, 3000, 84.0) == 84.0  # never seen streaming: commit age


# -- several pools in one process ----------------------------------------------------------------


def test_pool_names_in_threads_errors_and_repr(dsn: str) -> None:
    with Pool(dsn, name="orders", min_size=1, max_size=1, acquire_timeout=0.2) as pool:
        pool.wait(timeout=30)
        assert any(t.name == "pgops-pool-orders" for t in threading.enumerate())
        assert "'orders'" in repr(pool)
        with pool.connection():
            with pytest.raises(pgops.PoolTimeout, match="pool 'orders'"):
                pool.getconn()


def test_config_of_read_pools_from_the_environment(pg_server: PgServer) -> None:
    url = pg_server.url()
    config = PoolConfig.from_env(
        {"DATABASE_URL": url, "DATABASE_READ_URL": url, "POOL_MAX_REPLICA_LAG": "2.5"}
    )
    assert config.read_dsn == url and config.max_replica_lag == 2.5
    assert pg_server.password is not None
    assert pg_server.password not in repr(config)
    assert "read_dsn='postgresql://postgres:***@" in repr(config)
    with pytest.raises(pgops.ConfigError, match=r"^DATABASE_READ_URL 'postgresql://.*' has port"):
        PoolConfig.from_env({"DATABASE_URL": url, "DATABASE_READ_URL": "postgresql://u:secret@h:99999/d"})
    with pytest.raises(pgops.ConfigError, match=r"POOL_MAX_REPLICA_LAG=-1\.0 must be at least 0"):
        PoolConfig.from_env({"DATABASE_URL": url, "POOL_MAX_REPLICA_LAG": "-1"})
    with pytest.raises(pgops.ConfigError, match="name=''"):
        PoolConfig(dsn=url, name="")
    with pytest.raises(pgops.ConfigError, match="read_dsn is for a primary pool"):
        PoolConfig(dsn=url, read_dsn=url, read_only=True)


# -- through a transaction pooler ----------------------------------------------------------------


def test_session_characteristics_in_autocommit_are_refused_through_a_pooler(
    pgbouncer: Callable[..., PgBouncer], dbname: str, admin: psycopg2.extensions.connection
) -> None:
    """psycopg2 sends readonly in autocommit as a session SET, which PgBouncer would leave on a shared server
    connection: refused up front, and 40 later writes by other checkouts all succeed."""
    with admin.cursor() as cur:
        cur.execute("CREATE TABLE writes (id bigint PRIMARY KEY)")
    bouncer = pgbouncer("transaction", pool_size=2)
    with Pool(bouncer.dsn(dbname), min_size=2, max_size=4) as pool:
        with pool.connection() as conn:
            conn.autocommit = True
            with pytest.raises(pgops.PoolError, match="through a connection pooler"):
                conn.readonly = True
            assert conn.readonly is None
            with pytest.raises(pgops.PoolError, match="through a connection pooler"):
                conn.set_session(readonly=True)
            conn.autocommit = False
            conn.readonly = True  # a transaction: psycopg2 sends BEGIN READ ONLY
            with pytest.raises(pgops.PoolError, match="through a connection pooler"):
                conn.autocommit = True
            with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction), conn.cursor() as cur:
                cur.execute("INSERT INTO writes VALUES (0)")
        failed = 0
        for value in range(1, 41):
            try:
                pool.run(_insert(value))
            except psycopg2.errors.ReadOnlySqlTransaction:
                failed += 1
        assert failed == 0
        assert pool.stats()["connections_read_only"] == 0
    with admin.cursor() as cur:
        cur.execute("SELECT count(*) FROM writes")
        assert cur.fetchone() == (40,)


def test_the_same_calls_work_on_a_direct_connection(dsn: str) -> None:
    with Pool(dsn, min_size=1, max_size=1) as pool:
        with pool.connection() as conn:
            conn.autocommit = True
            conn.readonly = True
            assert scalar(conn, "SHOW default_transaction_read_only") == "on"
        with pool.connection() as conn:  # reset on return, on the same session
            assert scalar(conn, "SHOW default_transaction_read_only") == "off"


def test_a_read_pool_through_a_pooler_reads_in_read_only_transactions(
    pgbouncer: Callable[..., PgBouncer], dbname: str
) -> None:
    bouncer = pgbouncer("transaction", pool_size=2)
    with Pool(bouncer.dsn(dbname), read_only=True, min_size=1, max_size=2, test_before_acquire=True) as reads:
        for _ in range(5):
            with reads.connection() as conn:
                assert scalar(conn, "SHOW transaction_read_only") == "on"
    with contextlib.closing(bouncer.connect(dbname)) as conn:  # the server connections took no session SET
        for _ in range(4):
            assert scalar(conn, "SHOW default_transaction_read_only") == "off"


def test_the_read_pool_password_appears_nowhere(
    pg_server: PgServer, dbname: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A read pool whose DATABASE_READ_URL has a wrong password: logs, errors, reprs and bodies hide it."""
    secret = "R3ad-Pool-S3cret-Xy"
    read_url = pg_server.url(dbname).replace(f":{pg_server.password}@", f":{secret}@")
    assert secret in read_url
    caplog.set_level(logging.DEBUG, logger="pgops")
    config = PoolConfig.from_env({"DATABASE_URL": pg_server.url(dbname), "DATABASE_READ_URL": read_url})
    with Pool(config, min_size=1, max_size=1, acquire_timeout=1) as pool:
        assert pool.replica is not None
        app = HealthApp(pool, cache_ttl=0, ready_timeout=1)
        ready = pgtest.wsgi_call(app, "/health/ready")
        assert ready.status == 200  # the read pool only warns
        with pytest.raises(pgops.CannotConnect) as caught:
            pool.replica.getconn()
        with pool.read_connection() as conn:  # turns to the primary
            assert scalar(conn, "SELECT 1") == 1
        texts = [
            repr(config),
            repr(pool),
            repr(pool.replica),
            str(caught.value),
            pgtest.wsgi_call(app, "/health/detailed").body.decode(),
            pgtest.wsgi_call(app, "/metrics").body.decode(),
            *(record.getMessage() for record in caplog.records),
        ]
    assert "password authentication failed" in str(caught.value)
    assert [text for text in texts if secret in text] == []


def test_a_token_read_on_a_stalled_replica_network_turns_to_the_primary(
    ha_pair: tuple[LocalServer, StandbyServer],
) -> None:
    """The read pool's network holds traffic during the replay check: the watchdog cuts the connection
    off, and the read goes to the primary instead of hanging for as long as the stall lasts."""
    primary, standby = ha_pair
    _make_table(primary)
    with Proxy(standby.host, standby.port) as proxy:
        read_dsn = standby.dsn(host="127.0.0.1", port=proxy.port)
        # test_before_acquire off: the read pool's connection is lent unchecked, so it is the replay check
        # that stalls.
        config = PoolConfig(
            primary.dsn(),
            read_dsn=read_dsn,
            min_size=1,
            max_size=1,
            connect_timeout=1,
            test_before_acquire=False,
        )
        with Pool(config) as pool:
            assert pool.replica is not None
            pool.replica.wait(timeout=30)
            pool.run(_insert(1))
            token = pool.current_lsn()
            with pool.read_connection(after=token, wait=30):
                pass
            proxy.hold()

            def read() -> object:
                with pool.read_connection(after=pool.current_lsn(), wait=0.5) as conn:
                    return scalar(conn, "SELECT inet_server_port()")

            # Bounded only so that a regression fails instead of hanging: the bound is not the point.
            assert run_bounded(read, 60) == primary.port
            assert pool.replica.stats()["reads_fallback"] >= 1
            proxy.release()
