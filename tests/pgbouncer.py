"""A throwaway PgBouncer in front of a test PostgreSQL, for tests and benchmarks of pgops behind a pooler.

PgBouncer runs in the foreground as a child of this process (never daemonized), so its pid is ours to
stop; it listens on 127.0.0.1 on a free port, lets clients in without checking a password (auth_type
trust) and logs into the server with the superuser password from its [databases] line. As root it runs as
pgtest.SYSTEM_USER, since PgBouncer refuses to run as root.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import psycopg2
import psycopg2.extensions

import pgtest
from pgtest import PgServer

DEBIAN_PATH = "/usr/sbin/pgbouncer"
"""Where Debian's package installs the binary (not on a normal user's PATH)."""

POOL_MODES = ("session", "transaction", "statement")
_START_TIMEOUT = 30.0
_STOP_TIMEOUT = 10.0


def find_pgbouncer() -> str | None:
    """Return the pgbouncer binary: the first on PATH, else Debian's /usr/sbin/pgbouncer, else None."""
    found = shutil.which("pgbouncer")
    if found:
        return found
    if os.path.isfile(DEBIAN_PATH) and os.access(DEBIAN_PATH, os.X_OK):
        return DEBIAN_PATH
    return None


class PgBouncerNotFound(RuntimeError):
    """No pgbouncer binary on PATH or at /usr/sbin/pgbouncer."""


def _config_value(value: str) -> str:
    """Quote a value for a connection string in PgBouncer's [databases] section."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _server_params(server: PgServer) -> dict[str, str]:
    """Return host, port, user and password PgBouncer uses to log into server (from its DSN)."""
    params = psycopg2.extensions.parse_dsn(server.dsn("postgres"))
    out = {k: str(params[k]) for k in ("host", "port", "user", "password") if params.get(k)}
    out.setdefault("host", "127.0.0.1")
    out.setdefault("port", "5432")
    out.setdefault("user", os.environ.get("PGUSER") or pgtest.SUPERUSER)
    if "," in out["host"] or "," in out["port"]:
        raise ValueError("PgBouncer needs one server host, not a list")
    return out


_live: set[PgBouncer] = set()


class PgBouncer:
    """PgBouncer in front of server (a LocalServer or an ExternalServer), started by start()."""

    host = "127.0.0.1"

    def __init__(
        self,
        server: PgServer,
        *,
        pool_mode: str = "transaction",
        pool_size: int = 4,
        max_client_conn: int = 400,
        ignore_startup_parameters: str = "extra_float_digits",
        binary: str | None = None,
        extra: dict[str, str] | None = None,
    ) -> None:
        """Prepare a PgBouncer for server; nothing runs until start().

        extra: more [pgbouncer] settings (e.g. {"server_reset_query_always": "1"}).
        """
        if pool_mode not in POOL_MODES:
            raise ValueError(f"pool_mode must be one of {POOL_MODES}, not {pool_mode!r}")
        found = binary or find_pgbouncer()
        if found is None:
            raise PgBouncerNotFound("pgbouncer not installed: apt-get install pgbouncer")
        self.binary = found
        self.server = server
        self.pool_mode = pool_mode
        self.pool_size = pool_size
        self.max_client_conn = max_client_conn
        self.ignore_startup_parameters = ignore_startup_parameters
        self.extra = dict(extra or {})
        self.backend = _server_params(server)
        self.user = self.backend["user"]
        self.port = pgtest.free_port(self.host)
        self.proc: subprocess.Popen[bytes] | None = None
        self._run_as: tuple[int, int] | None = None
        if os.geteuid() == 0:  # "PgBouncer should not run as root"
            self._run_as = pgtest._ensure_system_user(pgtest.SYSTEM_USER)
        self.dir = Path(tempfile.mkdtemp(prefix="pgops-bouncer-"))
        self.config_path = self.dir / "pgbouncer.ini"
        self.log_path = self.dir / "pgbouncer.log"
        self._log: IO[bytes] | None = None

    # -- configuration ------------------------------------------------------------------------------

    def _write_config(self) -> None:
        """Write pgbouncer.ini and userlist.txt, readable only by the account that runs PgBouncer."""
        b = self.backend
        target = f"host={b['host']} port={b['port']} user={_config_value(b['user'])}"
        if "password" in b:
            target += f" password={_config_value(b['password'])}"
        settings = {
            "listen_addr": self.host,
            "listen_port": str(self.port),
            "unix_socket_dir": "",
            "auth_type": "trust",
            "auth_file": str(self.dir / "userlist.txt"),
            "admin_users": self.user,
            "pool_mode": self.pool_mode,
            "default_pool_size": str(self.pool_size),
            "min_pool_size": "0",
            "reserve_pool_size": "0",
            "max_client_conn": str(self.max_client_conn),
            "ignore_startup_parameters": self.ignore_startup_parameters,
            "server_login_retry": "1",
            "log_connections": "0",
            "log_disconnections": "0",
            "logfile": "",
            "pidfile": "",
            **self.extra,
        }
        config = f"[databases]\n* = {target}\n\n[pgbouncer]\n"
        config += "".join(f"{key} = {value}\n" for key, value in settings.items())
        password = b.get("password", "").replace('"', '""')
        userlist = f'"{self.user}" "{password}"\n'
        for path, text in ((self.config_path, config), (self.dir / "userlist.txt", userlist)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text)
            if self._run_as is not None:
                os.chown(path, *self._run_as)
        if self._run_as is not None:
            os.chown(self.dir, *self._run_as)

    # -- lifecycle ----------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """PgBouncer's pid while it runs, else None."""
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def start(self, timeout: float = _START_TIMEOUT) -> None:
        """Start PgBouncer and wait until a `SELECT 1` through it works (or raise with its log's tail)."""
        if self.pid is not None:
            return
        _live.add(self)
        for attempt in range(3):
            self._write_config()
            self._spawn()
            try:
                self.wait_ready(timeout)
                return
            except RuntimeError as exc:
                # Another process took the port between free_port() and the bind: pick another one.
                if attempt < 2 and "Address already in use" in str(exc):
                    self.stop()
                    self.port = pgtest.free_port(self.host)
                    continue
                self.stop()
                raise

    def _spawn(self) -> None:
        kwargs: dict[str, Any] = {}
        if self._run_as is not None:
            kwargs.update(user=self._run_as[0], group=self._run_as[1], extra_groups=[])
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "NOTIFY_SOCKET"))}
        if self._log is None:
            self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [self.binary, str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.dir,
            env=env,
            start_new_session=True,  # a Ctrl-C meant for pytest does not reach it first
            **kwargs,
        )

    def wait_ready(self, timeout: float = _START_TIMEOUT) -> None:
        """Wait until `SELECT 1` through PgBouncer works; raise RuntimeError with the log tail if not."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise RuntimeError(f"pgbouncer exited (status {code}){self.log_tail()}")
            try:
                with contextlib.closing(psycopg2.connect(self.dsn("postgres", connect_timeout=2))) as conn:
                    with conn.cursor() as cur:
                        cur.execute("SELECT 1")
                return
            except psycopg2.OperationalError as exc:
                if time.monotonic() >= deadline:
                    raise RuntimeError(
                        f"pgbouncer on port {self.port} not ready after {timeout:.1f}s: "
                        f"{str(exc).strip()}{self.log_tail()}"
                    ) from exc
                time.sleep(0.05)

    def stop(self) -> None:
        """Stop PgBouncer (SIGTERM: immediate shutdown; SIGKILL if it lingers) and wait for it."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(_STOP_TIMEOUT)
        if self._log is not None:
            self._log.close()
            self._log = None

    def cleanup(self) -> None:
        """Stop PgBouncer and remove its directory."""
        _live.discard(self)
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        """Return the end of PgBouncer's log, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return "\n--- pgbouncer log ---\n" + "\n".join(text)

    def __enter__(self) -> PgBouncer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def repoint(self, server: PgServer) -> None:
        """Point the `*` [databases] entry at *server* (same host, user and password) and RELOAD.

        Server connections opened before keep their server until they are released; new ones go to
        *server*. The config file is rewritten in place, so it keeps its owner and mode.
        """
        old = self.backend["port"]
        port = _server_params(server)["port"]
        entry = re.compile(rf"^(\* = host=\S+ port=){re.escape(old)}(?= )", re.MULTILINE)
        text, count = entry.subn(rf"\g<1>{port}", self.config_path.read_text())
        if count != 1:
            raise RuntimeError(f"no `* = host=... port={old}` line in {self.config_path}")
        with self.config_path.open("w") as f:
            f.write(text)
        self.backend["port"] = port
        with contextlib.closing(psycopg2.connect(self.dsn("pgbouncer"))) as admin:
            admin.autocommit = True
            with admin.cursor() as cur:
                cur.execute("RELOAD")

    # -- connecting ---------------------------------------------------------------------------------

    def dsn(self, dbname: str = "postgres", **kw: Any) -> str:
        """Return a key=value DSN through PgBouncer.

        PgBouncer trusts its clients, but the DSN carries the server's password as an application's
        would: without one, libpq looks for a password file and warns on stderr when it is not usable.
        """
        params: dict[str, Any] = {"host": self.host, "port": self.port, "user": self.user, "dbname": dbname}
        if "password" in self.backend:
            params["password"] = self.backend["password"]
        params.update(kw)
        return str(psycopg2.extensions.make_dsn(**params))

    def url(self, dbname: str = "postgres") -> str:
        """Return a postgresql:// URL through PgBouncer (with the password, like dsn())."""
        userinfo = quote(self.user, safe="")
        if "password" in self.backend:
            userinfo += ":" + quote(self.backend["password"], safe="")
        return f"postgresql://{userinfo}@{self.host}:{self.port}/{quote(dbname, safe='')}"

    def connect(self, dbname: str = "postgres", **kw: Any) -> psycopg2.extensions.connection:
        """Return an autocommit connection through PgBouncer."""
        conn = psycopg2.connect(self.dsn(dbname, **kw))
        conn.autocommit = True
        return conn

    def __repr__(self) -> str:
        """Describe the bouncer (no password)."""
        return f"PgBouncer(port={self.port}, pool_mode={self.pool_mode!r}, pool_size={self.pool_size})"


@atexit.register
def _stop_all() -> None:
    """Stop every PgBouncer still running when the interpreter exits (e.g. after Ctrl-C)."""
    for bouncer in list(_live):
        bouncer.cleanup()
