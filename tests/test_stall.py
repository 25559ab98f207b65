"""A network that stalls (traffic held by a TCP proxy, not refused): pool and health checks stay bounded."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2.extensions
import pytest

import pgops
import pgtest
from netproxy import Proxy
from pgops import HealthApp, Migrator, Pool, PoolTimeout
from pgtest import PgServer, run_bounded, wait_until

# The bounds below are the requirement (the defect blocked for as long as the stall lasted), with a
# margin generous enough for a loaded CI machine.
MARGIN = 5.0


@pytest.fixture
def proxy(pg_server: PgServer, dbname: str) -> Iterator[Proxy]:
    """A proxy in front of the session server, closed (dropping its connections) after the test."""
    params = psycopg2.extensions.parse_dsn(pg_server.dsn(dbname))
    host = params.get("host", "")
    if not host or host.startswith("/") or "," in host:
        pytest.skip("the test server is not reachable over a single TCP host")
    with Proxy(host, int(params.get("port", 5432))) as p:
        yield p


@pytest.fixture
def proxied_dsn(pg_server: PgServer, dbname: str, proxy: Proxy) -> str:
    """A DSN of this test's database through the proxy."""
    return pg_server.dsn(dbname, host="127.0.0.1", port=proxy.port)


def not_recently_used() -> None:
    """Let the pool's idle connections age past the window in which they skip the check."""
    time.sleep(pgops._RECENTLY_USED + 0.1)


def test_getconn_on_a_stalled_connection_raises_pool_timeout_in_time(proxy: Proxy, proxied_dsn: str) -> None:
    """getconn(timeout=2) on a stalled idle connection cuts it off, counts it, and times out in time."""
    with Pool(proxied_dsn, min_size=1, max_size=2, connect_timeout=2, monitor_interval=0) as pool:
        pool.wait(timeout=30)
        not_recently_used()
        proxy.hold()  # new connections are held too, so the pool has nothing to hand out
        result = run_bounded(lambda: pool.getconn(timeout=2), 2 + MARGIN)
        assert isinstance(result, PoolTimeout), result
        stats = pool.stats()
        assert stats["connections_stalled"] == 1
        assert stats["requests_errors"] == 1
        proxy.release()
        with pool.connection(timeout=30) as conn:
            assert pgtest.scalar(conn, "SELECT 1") == 1
        assert pool.stats()["connections_stalled"] == 1


def test_getconn_replaces_a_stalled_connection_when_it_can(
    proxy: Proxy, proxied_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A stalled connection is discarded with a warning, and getconn hands out one that answers."""
    with Pool(proxied_dsn, min_size=1, max_size=2, monitor_interval=0) as pool:
        pool.wait(timeout=30)
        not_recently_used()
        proxy.hold(new_connections=False)  # the pool can open a new connection meanwhile
        # The check gets half of the 4 s; the other half is for the new connection.
        conn = run_bounded(lambda: pool.getconn(timeout=4), 4 + MARGIN)
        assert not isinstance(conn, BaseException), conn
        try:
            assert pgtest.scalar(conn, "SELECT 1") == 1
        finally:
            pool.putconn(conn)
        assert pool.stats()["connections_stalled"] == 1
        assert "did not answer in time" in caplog.text


def test_health_check_on_a_stalled_query_answers_within_ready_timeout(proxy: Proxy, proxied_dsn: str) -> None:
    """A ready check whose query stalls answers 503 in time, and the next request can start a new check."""
    # test_before_acquire off: the connection is lent unchecked, so it is the check's own query that stalls.
    with Pool(proxied_dsn, min_size=1, max_size=2, connect_timeout=2, test_before_acquire=False) as pool:
        pool.wait(timeout=30)
        app = HealthApp(pool, cache_ttl=0, ready_timeout=2)
        assert pgtest.wsgi_call(app, "/health/ready").status == 200
        proxy.hold()
        for attempt in (1, 2):
            reply = run_bounded(lambda: pgtest.wsgi_call(app, "/health/ready"), 2 + MARGIN)
            assert reply.status == 503, reply.body
            assert "no answer within ready_timeout=2 s" in reply.json()["reasons"][0]
            assert app.checks_run == 1 + attempt
        assert pool.stats()["connections_stalled"] >= 1
        scrape = pgtest.wsgi_call(app, "/metrics").body.decode()
        assert '\npgops_connections_stalled_total{pool="default"} 1\n' in scrape
        proxy.release()
        wait_until(
            lambda: pgtest.wsgi_call(app, "/health/ready").status == 200, timeout=30, message="ready not back"
        )


def test_returning_a_connection_inside_a_transaction_on_a_stalled_network_ends_in_time(
    proxy: Proxy, proxied_dsn: str
) -> None:
    """putconn's rollback of a connection returned mid-transaction is cut off at connect_timeout."""
    with Pool(proxied_dsn, min_size=1, max_size=2, connect_timeout=2, monitor_interval=0) as pool:
        conn = pool.getconn(timeout=30)
        assert pgtest.scalar(conn, "SELECT 1") == 1  # now inside a transaction
        proxy.hold()
        assert run_bounded(lambda: pool.putconn(conn), 2 + MARGIN) is None
        stats = pool.stats()
        assert (stats["connections_stalled"], stats["pool_in_use"]) == (1, 0)


class HoldingMigrator:
    """A real Migrator whose pending() stalls the network first (a stand-in only for the timing)."""

    def __init__(self, migrator: Migrator, proxy: Proxy) -> None:
        self.migrator, self.proxy = migrator, proxy

    def pending(self) -> list[Any]:
        """Hold the proxy, then ask the real migrator, which takes a pool connection of its own."""
        self.proxy.hold()
        return self.migrator.pending()


def test_health_check_bounds_the_migrators_pool_connection_too(
    proxy: Proxy, proxied_dsn: str, mdir: Path
) -> None:
    """A stall during migrator.pending() still ends the whole check within ready_timeout."""
    pgtest.write(mdir, "0001_init.sql", "CREATE TABLE t (id int);")
    with Pool(proxied_dsn, min_size=1, max_size=2, connect_timeout=2) as pool:
        pool.wait(timeout=30)
        migrator = HoldingMigrator(Migrator(pool, str(mdir)), proxy)
        app = HealthApp(pool, migrator=migrator, cache_ttl=0, ready_timeout=2)
        reply = run_bounded(lambda: pgtest.wsgi_call(app, "/health/ready"), 2 + MARGIN)
        assert reply.status == 503, reply.body
        assert reply.json()["reasons"][0].startswith("migrations: no answer within ready_timeout=2 s")
        assert pool.stats()["connections_stalled"] == 1


def test_connections_get_keepalive_defaults_unless_the_dsn_sets_them(dsn: str) -> None:
    """New connections get TCP keepalives and tcp_user_timeout; a value in the DSN wins."""
    with Pool(dsn + " keepalives_idle=7", min_size=0, max_size=1) as pool, pool.connection() as conn:
        params = conn.get_dsn_parameters()
    assert params["keepalives"] == "1"
    assert params["keepalives_idle"] == "7"
    assert params["keepalives_interval"] == "10"
    assert params["keepalives_count"] == "3"
    assert params["tcp_user_timeout"] == "30000"
