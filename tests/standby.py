"""Streaming hot standbys of a LocalServer, promotion and write fencing, for failover tests."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from typing import Any

import psycopg2.extensions

from pgtest import SUPERUSER, LocalServer, scalar, wait_until

_WAIT_TIMEOUT = 30.0


class StandbyServer(LocalServer):
    """A hot standby streaming from a running primary LocalServer, cloned with pg_basebackup.

    It has its own port and socket directory but the primary's superuser and password (the base
    backup copies the roles).  start(), stop(), crash() and cleanup() work as for any LocalServer;
    once started it is in recovery until promote().
    """

    def __init__(
        self, primary: LocalServer, base_dir: str | os.PathLike[str], *, port: int | None = None
    ) -> None:
        """Clone the running primary into base_dir (pg_basebackup -R); call start() to run the standby."""
        self.primary = primary
        self.name = f"pgops_standby_{secrets.token_hex(4)}"
        super().__init__(base_dir, port=port)
        self.password = primary.password

    def _initdb(self) -> None:
        """Take a base backup of the primary instead of initdb, then give the copy its own address."""
        # The same binaries as the primary: a base backup needs the same major version anyway.
        self.bindir, self.bin_source = self.primary.bindir, self.primary.bin_source
        self.data_dir.mkdir(mode=0o700)  # postgres refuses a data directory open to others
        self._chown(self.data_dir)
        self._chown(self.socket_dir)
        self._run(
            "pg_basebackup",
            "-D", str(self.data_dir),
            "-h", str(self.primary.socket_dir),
            "-p", str(self.primary.port),
            "-U", SUPERUSER,
            "-R",  # standby.signal and primary_conninfo (over the primary's trusted socket)
            "-X", "stream",
            "-c", "fast",
            "--no-sync",
            timeout=120,
        )  # fmt: skip
        # The primary's log came along with its data directory; this server starts its own.
        self.log_path.unlink(missing_ok=True)
        settings = {
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "hot_standby": "on",
            # The walreceiver's application_name, so that the primary's pg_stat_replication names us.
            "cluster_name": f"'{self.name}'",
        }
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\n# pgops standby settings\n")
            conf.writelines(f"{k} = {v}\n" for k, v in settings.items())

    def in_recovery(self) -> bool:
        """Tell whether the standby is still in recovery (not promoted), over a new connection."""
        with contextlib.closing(self.admin_connect()) as conn:
            return scalar(conn, "SELECT pg_is_in_recovery()") is True

    def promote(self, timeout: float = _WAIT_TIMEOUT) -> None:
        """Promote the standby to a primary and wait until it accepts writes."""
        self._run(
            "pg_ctl", "promote", "-w", "-t", str(int(timeout)), "-D", str(self.data_dir), timeout=timeout + 10
        )
        wait_until(lambda: not self.in_recovery(), timeout=timeout, message=f"{self!r} still in recovery")

    def wait_streaming(self, primary: LocalServer | None = None, timeout: float = _WAIT_TIMEOUT) -> None:
        """Wait until primary (default: the one cloned) shows this standby streaming (pg_stat_replication)."""
        source = self.primary if primary is None else primary
        with contextlib.closing(source.admin_connect()) as conn:

            def streaming() -> bool:
                query = "SELECT state FROM pg_stat_replication WHERE application_name = %s"
                with conn.cursor() as cur:
                    cur.execute(query, (self.name,))
                    return cur.fetchall() == [("streaming",)]

            wait_until(streaming, timeout=timeout, message=f"{self!r} not streaming from {source!r}")

    def wait_replayed(self, lsn: str, timeout: float = _WAIT_TIMEOUT) -> None:
        """Wait until the standby has replayed the WAL up to lsn (e.g. the primary's pg_current_wal_lsn())."""
        with contextlib.closing(self.admin_connect()) as conn:

            def replayed() -> bool:
                return scalar(conn, "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)) is True

            wait_until(replayed, timeout=timeout, message=f"{self!r} has not replayed up to {lsn}")

    def __repr__(self) -> str:
        """Describe the standby and its primary without the password."""
        data_dir = str(self.data_dir)
        return f"StandbyServer(port={self.port}, primary_port={self.primary.port}, data_dir={data_dir!r})"


def current_wal_lsn(server: LocalServer) -> str:
    """Return the primary's current WAL write position (pg_current_wal_lsn()) as text."""
    with contextlib.closing(server.admin_connect()) as conn:
        return str(scalar(conn, "SELECT pg_current_wal_lsn()::text"))


def _read_only_setting(server: LocalServer) -> str:
    """Return default_transaction_read_only as a new connection sees it."""
    with contextlib.closing(server.admin_connect()) as conn:
        return str(scalar(conn, "SHOW default_transaction_read_only"))


def _set_read_only(server: LocalServer, statement: str, expected: str, timeout: float) -> None:
    """Run an ALTER SYSTEM statement, reload, and wait until new connections see expected."""
    with contextlib.closing(server.admin_connect()) as conn:  # ALTER SYSTEM is allowed even when read-only
        with conn.cursor() as cur:
            cur.execute(statement)
            cur.execute("SELECT pg_reload_conf()")
    wait_until(
        lambda: _read_only_setting(server) == expected,
        timeout=timeout,
        message=f"default_transaction_read_only not {expected} on {server!r}",
    )


def fence(server: LocalServer, timeout: float = _WAIT_TIMEOUT) -> None:
    """Make a running server refuse writes in new sessions (default_transaction_read_only), not stopping it.

    A session may still opt out (SET, BEGIN READ WRITE); libpq's target_session_attrs=read-write skips it.
    """
    _set_read_only(server, "ALTER SYSTEM SET default_transaction_read_only = on", "on", timeout)


def unfence(server: LocalServer, timeout: float = _WAIT_TIMEOUT) -> None:
    """Undo fence(): new sessions on server may write again."""
    _set_read_only(server, "ALTER SYSTEM RESET default_transaction_read_only", "off", timeout)


def drain_writes(server: LocalServer, timeout: float = _WAIT_TIMEOUT) -> None:
    """Wait until no session on server holds a transaction id: every write begun before a fence is over.

    A transaction that wrote before the fence may still commit after it; its commit must be in the WAL
    the standby replays before promotion, or an acknowledged write would be lost.
    """
    query = "SELECT count(*) FROM pg_stat_activity WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid()"
    with contextlib.closing(server.admin_connect()) as conn:
        wait_until(lambda: scalar(conn, query) == 0, timeout=timeout, message="writes still in flight")


def fail_over(primary: LocalServer, standby: StandbyServer, timeout: float = _WAIT_TIMEOUT) -> None:
    """A planned failover that loses no acknowledged write: fence the primary, let the writes begun
    before the fence finish, wait until the standby has replayed everything, promote it."""
    fence(primary, timeout)
    drain_writes(primary, timeout)
    standby.wait_replayed(current_wal_lsn(primary), timeout)
    standby.promote(timeout)


@contextlib.contextmanager
def streaming_standby(primary: LocalServer, base_dir: str | os.PathLike[str]) -> Iterator[StandbyServer]:
    """A hot standby of the running primary in base_dir, started and streaming; removed afterwards."""
    standby = StandbyServer(primary, base_dir)
    try:
        standby.start()
        standby.wait_streaming(primary)
        yield standby
    finally:
        standby.cleanup()


def ha_dsn(*servers: LocalServer, dbname: str = "postgres", **kw: Any) -> str:
    """Return a libpq multi-host key=value DSN over TCP to servers, in order, with extra parameters kw.

    The servers must share the superuser password, as a primary and its standbys do.
    """
    if not servers:
        raise ValueError("ha_dsn needs at least one server")
    passwords = {server.password for server in servers}
    if len(passwords) != 1:
        raise ValueError("ha_dsn: the servers have different superuser passwords")
    params: dict[str, Any] = {
        "host": ",".join(server.host for server in servers),
        "port": ",".join(str(server.port) for server in servers),
        "user": SUPERUSER,
        "password": servers[0].password,
        "dbname": dbname,
    }
    params.update(kw)
    return str(psycopg2.extensions.make_dsn(**params))
