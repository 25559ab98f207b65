"""pgops.ThreadedConnectionPool as a drop-in for psycopg2's pool, and what shapes each pooled connection.

The programs here are written against psycopg2.pool's API, as users have them; several run against
psycopg2's own pool too, to show that the same code gives the same answers (or, where psycopg2's pool
gives up at once, that pgops waits).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import psycopg2
import psycopg2.extensions
import psycopg2.extras
import psycopg2.pool
import pytest

import pgops
from pgbouncer import PgBouncer
from pgops import ConfigError, Pool, PoolConfig, PoolError, PoolTimeout, ThreadedConnectionPool
from pgtest import PgServer, scalar, wait_until

PoolFactory = Callable[..., Any]
BOTH: list[PoolFactory] = [psycopg2.pool.ThreadedConnectionPool, ThreadedConnectionPool]


@pytest.fixture
def tpool(dsn: str) -> Iterator[ThreadedConnectionPool]:
    """A drop-in pool of 1 to 3 connections on the test's own database."""
    pool = ThreadedConnectionPool(1, 3, dsn, acquire_timeout=5.0)
    try:
        yield pool
    finally:
        if not pool.closed:
            pool.closeall()


def close(pool: Any) -> None:
    if not pool.closed:
        pool.closeall()


# -- programs written for psycopg2's pool ------------------------------------------------------------


def counter_program(pool: Any, threads: int, each: int) -> int:
    """Threads that take a connection, add to a counter table, commit and give it back; returns the total."""
    conn = pool.getconn()
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS counter (n int)")
    conn.commit()
    pool.putconn(conn)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(each):
                conn = pool.getconn()
                try:
                    with conn.cursor() as cur:
                        cur.execute("INSERT INTO counter VALUES (1)")
                    conn.commit()
                finally:
                    pool.putconn(conn)
        except BaseException as exc:  # reported below
            errors.append(exc)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    if errors:
        raise errors[0]
    conn = pool.getconn()
    total = scalar(conn, "SELECT count(*) FROM counter")
    pool.putconn(conn)
    return int(total)


@pytest.mark.parametrize("factory", BOTH, ids=["psycopg2", "pgops"])
def test_the_same_program_counts_the_same_on_both_pools(factory: PoolFactory, dsn: str) -> None:
    """A psycopg2-pool program with as many threads as connections gives the same total on both."""
    pool = factory(1, 4, dsn)
    try:
        assert counter_program(pool, threads=4, each=25) == 100
    finally:
        close(pool)


def test_more_threads_than_connections_wait_instead_of_failing(dsn: str) -> None:
    """psycopg2's pool raises 'connection pool exhausted'; pgops' makes the extra threads wait."""
    theirs = psycopg2.pool.ThreadedConnectionPool(1, 2, dsn)
    try:
        with pytest.raises(psycopg2.pool.PoolError, match="exhausted"):
            counter_program(theirs, threads=12, each=20)
    finally:
        theirs.closeall()
    ours = ThreadedConnectionPool(1, 2, dsn)
    try:
        before = counter_program(ours, threads=1, each=0)
        assert counter_program(ours, threads=12, each=20) == before + 240
        assert ours.stats()["requests_queued"] > 0
        assert ours.stats()["pool_size"] <= 2
    finally:
        ours.closeall()


def test_it_is_psycopg2_pool_and_pgops_pool(tpool: ThreadedConnectionPool) -> None:
    """isinstance holds for psycopg2's classes and for pgops.Pool; psycopg2's attributes are there."""
    assert isinstance(tpool, psycopg2.pool.ThreadedConnectionPool)
    assert isinstance(tpool, psycopg2.pool.AbstractConnectionPool)
    assert isinstance(tpool, Pool)
    assert (tpool.minconn, tpool.maxconn, tpool.closed) == (1, 3, False)
    with tpool.connection() as conn:  # pgops' API works on it too
        assert scalar(conn, "SELECT 1") == 1
    assert tpool.health().status == "healthy"


@pytest.mark.parametrize("how", ["dsn", "dsn=", "kwargs"])
def test_constructor_takes_psycopg2_connect_arguments(pg_server: PgServer, dbname: str, how: str) -> None:
    """A DSN by position or keyword, or libpq keywords alone, as psycopg2.connect() takes them."""
    params = psycopg2.extensions.parse_dsn(pg_server.dsn(dbname))
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = {}
    if how == "dsn":
        args = (pg_server.dsn(dbname),)
    elif how == "dsn=":
        kwargs = {"dsn": pg_server.dsn(dbname)}
    else:
        kwargs = dict(params)
    pool = ThreadedConnectionPool(0, 2, *args, **kwargs)
    try:
        conn = pool.getconn()
        assert scalar(conn, "SELECT current_database()") == dbname
        pool.putconn(conn)
        password = params.get("password")
        if password:
            assert password not in repr(pool) and password not in repr(pool.config)
    finally:
        pool.closeall()


def test_keyed_connections_as_psycopg2_keeps_them(tpool: ThreadedConnectionPool) -> None:
    """getconn(key) returns the connection lent under key; putconn by key or by connection frees it."""
    w1 = tpool.getconn("w1")
    assert tpool.getconn("w1") is w1
    w2 = tpool.getconn("w2")
    assert w2 is not w1
    plain = tpool.getconn()
    assert plain not in (w1, w2)
    tpool.putconn(key="w1")  # by key alone
    tpool.putconn(w2)  # by connection: its key is found
    tpool.putconn(plain)
    assert tpool.stats()["pool_in_use"] == 0
    again = tpool.getconn("w1")  # the key is free again: any connection
    tpool.putconn(again, "w1")
    with pytest.raises(PoolError, match="no connection is lent under key 'w9'"):
        tpool.putconn(key="w9")
    with pytest.raises(PoolError, match="needs the connection or the key"):
        tpool.putconn()


def test_two_threads_asking_for_one_key_share_its_connection(tpool: ThreadedConnectionPool) -> None:
    """Like psycopg2's pool, which holds its lock across getconn: one key, one connection."""
    got: list[Any] = []
    barrier = threading.Barrier(4)

    def take() -> None:
        barrier.wait()
        got.append(tpool.getconn("shared"))

    threads = [threading.Thread(target=take) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(got) == 4 and all(conn is got[0] for conn in got)
    tpool.putconn(key="shared")
    assert tpool.stats()["pool_in_use"] == 0


def test_putconn_close_true_closes_it_and_the_pool_opens_another(tpool: ThreadedConnectionPool) -> None:
    """close=True: the connection is closed at once, counted as neither lost nor bad."""
    conn = tpool.getconn()
    tpool.putconn(conn, close=True)
    assert conn.closed
    stats = tpool.stats()
    assert (stats["connections_lost"], stats["returns_bad"], stats["pool_in_use"]) == (0, 0, 0)
    wait_until(lambda: tpool.stats()["pool_available"] >= 1, message="pool did not refill to minconn")
    fresh = tpool.getconn()
    assert fresh is not conn and scalar(fresh, "SELECT 1") == 1
    tpool.putconn(fresh)


def test_closeall_closes_lent_connections_too(dsn: str) -> None:
    """As psycopg2's closeall(): every connection, lent or idle, is closed; a second closeall raises."""
    pool = ThreadedConnectionPool(2, 3, dsn)
    lent = pool.getconn()
    idle = pool.getconn()
    pool.putconn(idle)
    pool.closeall()
    assert pool.closed and lent.closed and idle.closed
    with pytest.raises(psycopg2.pool.PoolError, match="closed"):
        pool.getconn()
    with pytest.raises(psycopg2.pool.PoolError, match="already closed"):
        pool.closeall()
    pool.putconn(lent)  # giving back a closed connection after closeall is harmless


def test_connection_returned_in_a_transaction_is_rolled_back_quietly(
    tpool: ThreadedConnectionPool, caplog: pytest.LogCaptureFixture
) -> None:
    """getconn, write, putconn without commit: rolled back, at DEBUG and counted, as psycopg2 does."""
    conn = tpool.getconn()
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE t (n int)")
    conn.commit()
    tpool.putconn(conn)
    with caplog.at_level(logging.DEBUG, logger="pgops"):
        conn = tpool.getconn()
        with conn.cursor() as cur:
            cur.execute("INSERT INTO t VALUES (1)")
        tpool.putconn(conn)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("rolling back" in r.getMessage() for r in caplog.records)
    assert tpool.stats()["returns_rolled_back"] == 1
    conn = tpool.getconn()
    assert conn.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE
    assert scalar(conn, "SELECT count(*) FROM t") == 0
    tpool.putconn(conn)


def test_pool_settings_go_by_keyword_and_libpq_settings_to_libpq(dsn: str) -> None:
    """acquire_timeout= sets the pool's wait; options= and connect_timeout= reach libpq."""
    pool = ThreadedConnectionPool(
        0, 1, dsn, acquire_timeout=0.3, options="-c statement_timeout=1234", connect_timeout="7"
    )
    try:
        conn = pool.getconn()
        assert scalar(conn, "SHOW statement_timeout") == "1234ms"
        assert conn.get_dsn_parameters()["connect_timeout"] == "7"
        assert pool.config.connect_timeout == 7.0
        with pytest.raises(PoolTimeout):
            pool.getconn()
        pool.putconn(conn)
    finally:
        pool.closeall()


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((), {"async_": True}, "asynchronous connection cannot be pooled"),
        ((), {"no_such_option": 1}, 'invalid connection option "no_such_option"'),
        (("a", "b", "c", "d"), {}, "at most 3 arguments"),
    ],
)
def test_bad_constructor_arguments_say_what_is_wrong(
    dsn: str, args: tuple[Any, ...], kwargs: dict[str, Any], message: str
) -> None:
    """Every refusal is one line naming the argument; nothing connects."""
    with pytest.raises((ConfigError, TypeError), match=message):
        ThreadedConnectionPool(0, 1, *(args or (dsn,)), **kwargs)


def test_readonly_true_makes_a_read_pool(dsn: str) -> None:
    """readonly=True (psycopg2's name) lends READ ONLY connections; a write raises ReadOnlyError."""
    pool = ThreadedConnectionPool(0, 1, dsn, readonly=True)
    try:
        conn = pool.getconn()
        with pytest.raises(pgops.ReadOnlyError), conn.cursor() as cur:
            cur.execute("CREATE TABLE nope (n int)")
        pool.putconn(conn)
    finally:
        pool.closeall()


# -- factories: connection_factory and cursor_factory as psycopg2.connect() takes them -------------


def sql_logger(name: str) -> tuple[logging.Logger, list[str]]:
    """A logger for LoggingConnection.initialize() and the list of the lines it receives."""
    logged: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            logged.append(record.getMessage())

    logger = logging.getLogger(name)
    logger.addHandler(Collect())
    logger.setLevel(logging.DEBUG)
    return logger, logged


def test_cursor_factory_is_used_and_still_counted(dsn: str) -> None:
    """cursor_factory=RealDictCursor gives dict rows, and the pool still counts the statements."""
    pool = ThreadedConnectionPool(0, 1, dsn, cursor_factory=psycopg2.extras.RealDictCursor)
    try:
        conn = pool.getconn()
        with conn.cursor() as cur:
            cur.execute("SELECT 1 AS one")
            assert cur.fetchone() == {"one": 1}
        pool.putconn(conn)
        assert pool.stats()["queries_num"] == 1
        conn = pool.getconn()  # the clean path: kept, not reset
        assert isinstance(conn.cursor(), psycopg2.extras.RealDictCursor)
        pool.putconn(conn)
        assert pool.stats()["connections_num"] == 1
    finally:
        pool.closeall()


def test_connection_factory_keeps_its_own_cursor(dsn: str) -> None:
    """LoggingConnection, initialized in configure(), logs through its LoggingCursor as it would alone."""
    logger, logged = sql_logger("test_dropin.sql")
    pool = ThreadedConnectionPool(
        0,
        1,
        dsn,
        connection_factory=psycopg2.extras.LoggingConnection,
        configure=lambda conn: conn.initialize(logger),
    )
    try:
        conn = pool.getconn()
        assert isinstance(conn, psycopg2.extras.LoggingConnection)
        with conn.cursor() as cur:
            assert isinstance(cur, psycopg2.extras.LoggingCursor)
            cur.execute("SELECT 42")
        pool.putconn(conn)
        assert any("SELECT 42" in line for line in logged)
        assert pool.stats()["queries_num"] == 1
    finally:
        pool.closeall()


# -- configure, reset and connection defaults (pgops.Pool and the drop-in alike) -------------------


def test_configure_runs_once_on_every_new_connection(dsn: str) -> None:
    """configure(conn) sees each new connection before anyone else; its session settings stay."""
    seen: list[int] = []

    def configure(conn: psycopg2.extensions.connection) -> None:
        seen.append(conn.info.backend_pid)
        with conn.cursor() as cur:
            cur.execute("SET search_path TO configured, public")
        conn.commit()

    with Pool(dsn, min_size=2, max_size=2, configure=configure) as pool:
        pool.wait(10)
        conns = [pool.getconn() for _ in range(2)]
        assert sorted(c.info.backend_pid for c in conns) == sorted(seen)
        assert all(scalar(c, "SHOW search_path") == "configured, public" for c in conns)
        for conn in conns:
            pool.putconn(conn)
        with pool.connection() as conn:
            assert scalar(conn, "SHOW search_path") == "configured, public"
        assert len(seen) == 2


@pytest.mark.parametrize("failure", ["raises", "leaves a transaction"])
def test_a_failing_configure_discards_the_connection_and_says_why(
    dsn: str, failure: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A configure that fails fails the caller at once, is counted, and is logged at WARNING once."""

    def configure(conn: psycopg2.extensions.connection) -> None:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
        if failure == "raises":
            raise RuntimeError("no such type: vector3")

    expected = "no such type: vector3" if failure == "raises" else "left the connection inside a transaction"
    with (
        caplog.at_level(logging.DEBUG, logger="pgops"),
        Pool(dsn, min_size=0, max_size=1, configure=configure, acquire_timeout=10) as pool,
    ):
        for _ in range(3):
            with pytest.raises(pgops.CannotConnect, match=expected):
                pool.getconn()
        assert pool.stats()["connections_errors"] >= 3
        assert pool.stats()["connections_num"] == pool.stats()["connections_errors"]
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and "configure" in r.getMessage()]
    assert len(warnings) == 1


def test_reset_runs_on_every_return_and_a_failing_one_discards(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """reset(conn) runs after the caller is done; when it raises, the connection is not lent again."""
    calls: list[int] = []
    fail = threading.Event()

    def reset(conn: psycopg2.extensions.connection) -> None:
        calls.append(conn.info.backend_pid)
        with conn.cursor() as cur:
            cur.execute("RESET search_path")
        conn.commit()
        if fail.is_set():
            raise RuntimeError("reset failed on purpose")

    with Pool(dsn, min_size=1, max_size=1, reset=reset) as pool:
        with pool.connection() as conn:
            with conn.cursor() as cur:
                cur.execute("SET search_path TO elsewhere")
            first = conn.info.backend_pid
        with pool.connection() as conn:
            assert conn.info.backend_pid == first  # kept
            assert scalar(conn, "SHOW search_path") == '"$user", public'
        assert calls == [first, first]
        fail.set()
        with caplog.at_level(logging.WARNING, logger="pgops"):
            for _ in range(2):
                with pool.connection() as conn:
                    pid = conn.info.backend_pid
        assert pool.stats()["returns_bad"] == 2
        with pool.connection() as conn:
            assert conn.info.backend_pid not in (first, pid)
    assert len([r for r in caplog.records if "reset(conn) failed" in r.getMessage()]) == 1


def test_autocommit_pool_lends_autocommit_connections(dsn: str) -> None:
    """autocommit=True: every lent connection is in autocommit, and is put back so on return."""
    with Pool(dsn, min_size=1, max_size=1, autocommit=True, test_before_acquire=True) as pool:
        with pool.connection() as conn:
            assert conn.autocommit
            with conn.cursor() as cur:
                cur.execute("CREATE TABLE a (n int)")
                cur.execute("INSERT INTO a VALUES (1)")
            conn.autocommit = False  # a caller that changes it and leaves a transaction open
            with conn.cursor() as cur:
                cur.execute("INSERT INTO a VALUES (2)")
        conn = pool.getconn()
        assert (
            conn.autocommit and conn.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE
        )
        with conn.cursor() as cur:
            cur.execute("VACUUM a")  # only possible outside a transaction
        assert scalar(conn, "SELECT count(*) FROM a") == 2  # the with block committed the second insert
        pool.putconn(conn)


def test_autocommit_pool_checks_connections_without_leaving_autocommit(dsn: str) -> None:
    """The pool's own check of an idle connection (test_before_acquire) keeps it in autocommit."""
    with Pool(dsn, min_size=1, max_size=1, autocommit=True) as pool:
        pool.wait(10)
        conn = pool.getconn()
        pool.putconn(conn)
        conn._pgops_last_used -= 10  # type: ignore[attr-defined]  # old enough to be checked
        again = pool.getconn()
        assert again is conn and again.autocommit
        pool.putconn(again)


def test_isolation_level_default_is_restored_on_return(dsn: str) -> None:
    """isolation_level='SERIALIZABLE' is each transaction's level, whatever the previous borrower set."""
    with Pool(dsn, min_size=1, max_size=1, isolation_level="serializable") as pool:
        with pool.connection() as conn:
            assert scalar(conn, "SHOW transaction_isolation") == "serializable"
            conn.rollback()
            conn.isolation_level = psycopg2.extensions.ISOLATION_LEVEL_READ_COMMITTED
            assert scalar(conn, "SHOW transaction_isolation") == "read committed"
        with pool.connection() as conn:
            assert scalar(conn, "SHOW transaction_isolation") == "serializable"


def test_connect_kwargs_reach_libpq_and_stay_secret(dsn: str) -> None:
    """connect_kwargs are libpq parameters on every connection; a password among them is never shown."""
    params = psycopg2.extensions.parse_dsn(dsn)
    password = params.pop("password", None)
    rest = psycopg2.extensions.make_dsn(**params)
    kwargs = {"options": "-c statement_timeout=4321"}
    if password:
        kwargs["password"] = password
    with Pool(rest, min_size=0, max_size=1, connect_kwargs=kwargs) as pool:
        with pool.connection() as conn:
            assert scalar(conn, "SHOW statement_timeout") == "4321ms"
        if password:
            assert password not in repr(pool.config) and password not in repr(pool)
            assert "'password': '***'" in repr(pool.config)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"configure": "SET x"}, "configure='SET x' is not callable"),
        ({"reset": 3}, "reset=3 is not callable"),
        ({"autocommit": "yes"}, "autocommit='yes' is not True or False"),
        ({"isolation_level": "snapshot"}, "isolation_level='snapshot' is not an isolation level"),
        ({"isolation_level": 0}, "for autocommit pass autocommit=True"),
        ({"isolation_level": "SERIALIZABLE", "autocommit": True}, "drop one of them"),
        ({"connect_kwargs": {"dsn": "x"}}, "connect_kwargs has 'dsn'"),
        ({"connect_kwargs": {"sslmood": "require"}}, "connect_kwargs are not libpq parameters"),
        ({"connection_factory": dict}, "connection_factory=<class 'dict'> is not a subclass"),
        ({"cursor_factory": psycopg2.extensions.connection}, "cursor_factory=.* is not a subclass"),
    ],
)
def test_bad_connection_settings_are_refused_up_front(
    dsn: str, overrides: dict[str, Any], message: str
) -> None:
    """Each bad setting is one ConfigError naming it, before any connection is made."""
    with pytest.raises(ConfigError, match=message):
        PoolConfig(dsn=dsn, **overrides)


def test_max_waiting_comes_from_the_environment(dsn: str) -> None:
    """POOL_MAX_WAITING sets max_waiting; a bad value names the variable."""
    assert PoolConfig.from_env({"DATABASE_URL": dsn, "POOL_MAX_WAITING": "7"}).max_waiting == 7
    with pytest.raises(ConfigError, match="POOL_MAX_WAITING=-1 must be at least 0"):
        PoolConfig.from_env({"DATABASE_URL": dsn, "POOL_MAX_WAITING": "-1"})


def test_connection_defaults_through_pgbouncer_leave_no_session_state(
    pgbouncer: Callable[..., PgBouncer], dbname: str
) -> None:
    """Autocommit and isolation defaults, and the drop-in, work through a transaction pooler without
    leaving a session SET on a server connection that other clients share."""
    bouncer = pgbouncer("transaction", pool_size=1)
    url = bouncer.dsn(dbname)
    with Pool(url, min_size=1, max_size=2, autocommit=True) as pool:
        for _ in range(5):
            with pool.connection() as conn:
                assert conn.autocommit
                assert scalar(conn, "SELECT 1") == 1
    with Pool(url, min_size=1, max_size=2, isolation_level="REPEATABLE READ") as pool:
        with pool.connection() as conn:  # in BEGIN ISOLATION LEVEL ..., not a session SET
            assert scalar(conn, "SHOW transaction_isolation") == "repeatable read"
    dropin = ThreadedConnectionPool(1, 2, url)
    try:
        conn = dropin.getconn()
        assert scalar(conn, "SELECT 1") == 1
        dropin.putconn(conn)  # rolled back quietly, through the pooler
    finally:
        dropin.closeall()
    # One server connection served all of them: it carries none of their settings.
    plain = psycopg2.connect(url)
    try:
        plain.autocommit = True
        assert scalar(plain, "SHOW default_transaction_isolation") == "read committed"
        assert scalar(plain, "SHOW transaction_isolation") == "read committed"
    finally:
        plain.close()


# -- found in review: each of these failed before its fix ----------------------------------------


def test_isolation_level_pool_through_pgbouncer_keeps_its_checked_connections(
    pgbouncer: Callable[..., PgBouncer], dbname: str
) -> None:
    """The check of an idle connection (SELECT 1 in autocommit) must not trip over the pool's
    isolation_level behind a pooler: no connection is thrown away as lost."""
    bouncer = pgbouncer("transaction", pool_size=2)
    with Pool(bouncer.dsn(dbname), min_size=2, max_size=2, isolation_level="SERIALIZABLE") as pool:
        pool.wait(10)
        for _ in range(4):
            conns = [pool.getconn() for _ in range(2)]
            for conn in conns:
                conn._pgops_last_used -= 10  # type: ignore[attr-defined]  # checked at the next checkout
                pool.putconn(conn)
                conn._pgops_last_used -= 10  # type: ignore[attr-defined]
        with pool.connection() as conn:
            assert scalar(conn, "SHOW transaction_isolation") == "serializable"
        stats = pool.stats()
        assert (stats["connections_lost"], stats["connections_num"]) == (0, 2)


def test_logging_connection_initialized_after_getconn_as_psycopg2_programs_do(dsn: str) -> None:
    """A psycopg2 program calls initialize() after getconn(); the pool must connect before that."""
    logger, logged = sql_logger("test_dropin.late")
    pool = ThreadedConnectionPool(1, 2, dsn, connection_factory=psycopg2.extras.LoggingConnection)
    try:
        conn = pool.getconn()
        conn.initialize(logger)
        with conn.cursor() as cur:
            cur.execute("SELECT 7")
        conn.commit()
        pool.putconn(conn)
        assert any("SELECT 7" in line for line in logged)
        assert pool.stats()["queries_num"] >= 1
    finally:
        pool.closeall()


def test_dropin_without_a_dsn_uses_libpq_environment(
    pg_server: PgServer, dbname: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ThreadedConnectionPool(1, 2) with PGHOST, PGUSER ... set, as psycopg2.connect() takes them."""
    names = {
        "host": "PGHOST",
        "port": "PGPORT",
        "user": "PGUSER",
        "password": "PGPASSWORD",
        "dbname": "PGDATABASE",
    }
    for key, value in psycopg2.extensions.parse_dsn(pg_server.dsn(dbname)).items():
        if key in names:
            monkeypatch.setenv(names[key], value)
    for args in [(), ("",)]:
        pool = ThreadedConnectionPool(1, 2, *args)
        try:
            conn = pool.getconn()
            assert scalar(conn, "SELECT current_database()") == dbname
            pool.putconn(conn)
        finally:
            pool.closeall()


def test_connect_kwargs_do_not_redirect_the_read_pool(pg_server: PgServer, dbname: str) -> None:
    """An address in connect_kwargs is the primary's: the read pool goes where read_dsn says."""
    primary = pg_server.dsn("postgres")
    with Pool(
        primary, min_size=0, max_size=1, connect_kwargs={"dbname": dbname}, read_dsn=pg_server.dsn("postgres")
    ) as pool:
        with pool.connection() as conn:
            assert scalar(conn, "SELECT current_database()") == dbname
        with pool.read_connection() as conn:
            assert scalar(conn, "SELECT current_database()") == "postgres"
        assert pool.replica is not None
        assert pool.stats()["connections_num"] == 1 and pool.replica.stats()["reads_fallback"] == 0


def test_the_read_pool_reads_in_read_only_transactions_whatever_the_primary_pool_does(dsn: str) -> None:
    """autocommit and isolation_level stay with the primary pool: a standby refuses SERIALIZABLE and a
    pooler refuses read-only autocommit."""
    with Pool(dsn, min_size=0, max_size=1, autocommit=True, read_dsn=dsn) as pool:
        assert pool.replica is not None
        assert (pool.replica.config.autocommit, pool.replica.config.isolation_level) == (False, None)
        with pool.read_connection() as conn:
            assert not conn.autocommit and conn.readonly
        with pool.connection() as conn:
            assert conn.autocommit


def test_configure_must_not_change_what_the_pool_resets(dsn: str) -> None:
    """A configure() that sets autocommit would hold for one checkout only: refused, naming the fix."""

    def configure(conn: psycopg2.extensions.connection) -> None:
        conn.autocommit = True

    with Pool(dsn, min_size=0, max_size=1, configure=configure) as pool:
        with pytest.raises(
            pgops.CannotConnect, match=r"changed the connection's autocommit.*pass autocommit="
        ):
            pool.getconn()


def test_reset_is_judged_by_what_it_changed_not_by_what_the_borrower_left(dsn: str) -> None:
    """A pool with its own cursor_factory, and a borrower that left the session read-only: reset()
    changed neither, so the connection is kept (the pool puts them back after the callback)."""
    calls: list[int] = []

    def reset(conn: psycopg2.extensions.connection) -> None:
        calls.append(conn.info.backend_pid)

    factory = psycopg2.extras.RealDictCursor
    with Pool(dsn, min_size=1, max_size=1, reset=reset, cursor_factory=factory) as pool:
        with pool.connection() as conn:
            first = conn.info.backend_pid
        with pool.connection() as conn:
            conn.set_session(readonly=True, isolation_level="SERIALIZABLE", deferrable=True)
        with pool.connection() as conn:
            assert conn.info.backend_pid == first
            assert (conn.readonly, conn.deferrable) == (None, None)
            assert issubclass(conn.cursor_factory, factory)
        assert calls == [first] * 3
        assert (pool.stats()["returns_bad"], pool.stats()["connections_num"]) == (0, 1)


def test_a_subclass_overriding_psycopg2s_connect_hook_works(dsn: str) -> None:
    """The psycopg2 recipe: override _connect(key=None), call super()._connect(key), set the connection up."""

    class Tuned(ThreadedConnectionPool):
        def _connect(self, key: Any = None) -> Any:
            conn = super()._connect(key)
            with conn.cursor() as cur:
                cur.execute("SET search_path TO tuned, public")
            return conn

    pool = Tuned(1, 2, dsn)
    try:
        for _ in range(3):
            conn = pool.getconn()
            conn._pgops_last_used -= 10  # type: ignore[attr-defined]  # the check runs next time
            assert scalar(conn, "SHOW search_path") == "tuned, public"
            pool.putconn(conn)
        assert pool.stats()["connections_lost"] == 0
    finally:
        pool.closeall()


def test_keyed_getconn_on_a_closed_pool_raises(tpool: ThreadedConnectionPool) -> None:
    """After closeall() a key gives no connection back, and returning one by key says the pool is closed."""
    tpool.getconn("k")
    tpool.closeall()
    with pytest.raises(pgops.PoolClosed):
        tpool.getconn("k")
    with pytest.raises(pgops.PoolClosed):
        tpool.putconn(key="k")


def test_reset_is_skipped_on_a_closed_pool_and_an_interrupted_reset_keeps_the_books(dsn: str) -> None:
    """No user code runs on a connection about to be closed; a KeyboardInterrupt in reset loses no slot."""
    calls: list[int] = []
    interrupt = threading.Event()

    def reset(conn: psycopg2.extensions.connection) -> None:
        calls.append(1)
        if interrupt.is_set():
            raise KeyboardInterrupt

    with Pool(dsn, min_size=0, max_size=1, reset=reset, acquire_timeout=5) as pool:
        interrupt.set()
        conn = pool.getconn()
        with pytest.raises(KeyboardInterrupt):
            pool.putconn(conn)
        assert pool.stats()["pool_in_use"] == 0
        interrupt.clear()
        conn = pool.getconn()  # the slot is free again
        pool.close()
        calls.clear()
        pool.putconn(conn)
        assert calls == [] and conn.closed
