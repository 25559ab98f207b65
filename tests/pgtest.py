"""Throwaway PostgreSQL clusters, ``python -m pgops`` runners and polling helpers for the pgops tests."""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, urlencode
from wsgiref.util import setup_testing_defaults
from wsgiref.validate import validator

import psycopg2
import psycopg2.extensions
import psycopg2.sql

SYSTEM_USER = "pgops-test"
"""Unprivileged system account that runs the cluster when the tests run as root."""

SUPERUSER = "postgres"
"""Database superuser created by initdb."""

# AF_UNIX paths are limited to 108 bytes (104 on macOS) including the terminating NUL.
_MAX_SOCKET_PATH = 100

_START_TIMEOUT = 60.0
_STOP_MODES = ("smart", "fast", "immediate")

ROOT = Path(__file__).resolve().parent.parent
"""The checkout under test: first on the PYTHONPATH of every pgops subprocess."""

CLI_TIMEOUT = 120.0
"""Seconds a ``python -m pgops`` run may take before the test fails (generous: CI machines are slow)."""

FAKE_PASSWORD = "Zebra-Distinct-Pw-8431"
"""A password tests write into DSNs; run_pgops fails any run whose output shows it."""

# Variables of the parent environment that could change what pgops or libpq does, or carry a password.
_CLEARED = ("DATABASE_", "PGOPS_", "DB_RETRY_", "POOL_", "APP_NAME", "PG")


class PostgresNotFound(RuntimeError):
    """No PostgreSQL server binaries (initdb, pg_ctl, postgres) could be located."""


class PgServer(Protocol):
    """What every session server offers to fixtures and tests, local or external."""

    @property
    def password(self) -> str | None:
        """The superuser's password, or None when the DSN carries none."""
        ...

    def dsn(self, dbname: str = "postgres", **kw: Any) -> str:
        """Return a key=value DSN for dbname."""
        ...

    def url(self, dbname: str = "postgres") -> str:
        """Return a postgresql:// URL for dbname."""
        ...

    def admin_connect(self, dbname: str = "postgres") -> psycopg2.extensions.connection:
        """Return an autocommit superuser connection to dbname."""
        ...


def wait_until(
    predicate: Callable[[], object],
    timeout: float = 10.0,
    interval: float = 0.02,
    message: str = "condition not met",
) -> Any:
    """Poll predicate until it returns something truthy (returned) or fail with message after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"{message} (waited {timeout:.1f}s)")
        time.sleep(min(interval, remaining))


def run_bounded(fn: Callable[[], Any], bound: float) -> Any:
    """Run fn in a thread and return its result or exception, failing if it outlasts bound.

    A thread, so that the code before the fix (which blocks for as long as the stall lasts) fails
    the test instead of hanging it; the proxy's close at teardown then lets the thread end.
    """
    outcome: list[Any] = []

    def target() -> None:
        try:
            outcome.append(fn())
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(bound)
    assert outcome, f"still blocked after {bound:.1f} s"
    return outcome[0]


def write(directory: Path, name: str, text: str | bytes) -> Path:
    """Write one migration file (text as UTF-8 without newline translation, or raw bytes)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8", newline="")
    return path


def scalar(conn: psycopg2.extensions.connection, query: str, args: tuple[Any, ...] = ()) -> Any:
    """Return the first column of the first row of query."""
    with conn.cursor() as cur:
        cur.execute(query, args)
        row = cur.fetchone()
        assert row is not None
        return row[0]


def relation_exists(conn: psycopg2.extensions.connection, name: str) -> bool:
    """Tell whether a table, index or view called name (schema-qualified or not) exists."""
    return scalar(conn, "SELECT to_regclass(%s) IS NOT NULL", (name,)) is True


def history(
    conn: psycopg2.extensions.connection, schema: str = "public", table: str = "migration_history"
) -> list[tuple[int, str]] | None:
    """Return (version, status) rows of the history table, or None when it does not exist."""
    if not relation_exists(conn, f'"{schema}"."{table}"'):
        return None
    with conn.cursor() as cur:
        cur.execute(
            psycopg2.sql.SQL("SELECT version, status FROM {} ORDER BY version").format(
                psycopg2.sql.Identifier(schema, table)
            )
        )
        return [(int(v), s) for v, s in cur.fetchall()]


def applied(*versions: int) -> list[tuple[int, str]]:
    """Return the history rows expected when exactly these versions are applied."""
    return [(v, "applied") for v in versions]


def simple_set(directory: Path, count: int, *, down: bool = True) -> None:
    """Write migrations 1..count, each creating table t<version>, with down files dropping them."""
    for v in range(1, count + 1):
        write(directory, f"{v:04d}_table_{v}.sql", f"CREATE TABLE t{v} (id int);\n")
        if down:
            write(directory, f"{v:04d}_table_{v}.down.sql", f"DROP TABLE t{v};\n")


@contextlib.contextmanager
def locked_table(
    dsn: str, admin: psycopg2.extensions.connection, name: str, mode: str
) -> Iterator[psycopg2.extensions.connection]:
    """Create table name and yield another session whose open transaction holds it LOCKed IN mode MODE.

    The test releases the lock by rolling that session back; it is closed afterwards either way.
    """
    with admin.cursor() as cur:
        cur.execute(psycopg2.sql.SQL("CREATE TABLE {} (id int)").format(psycopg2.sql.Identifier(name)))
    blocker = psycopg2.connect(dsn)
    try:
        with blocker.cursor() as cur:
            lock = psycopg2.sql.SQL("LOCK TABLE {} IN " + mode + " MODE")  # mode: one of PostgreSQL's words
            cur.execute(lock.format(psycopg2.sql.Identifier(name)))
        yield blocker
    finally:
        blocker.close()


# -- python -m pgops ----------------------------------------------------------------------------------


def pgops_env(database_url: str | None = None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return the environment of a pgops subprocess that imports this checkout.

    The parent's environment without anything that configures pgops or libpq (or carries a
    password), this checkout first on PYTHONPATH, no ~/.pgpass, DATABASE_URL as given (None: unset),
    then extra on top.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(_CLEARED)}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["PGPASSFILE"] = os.devnull
    if database_url is not None:
        env["DATABASE_URL"] = database_url
    env.update(extra or {})
    return env


def pgops_argv(*args: str) -> list[str]:
    """Return the argv of ``python -m pgops ARGS``.

    A child inherits an ignored SIGINT (this process may be a background job), and Python then
    installs no Ctrl-C handler: in that case a launcher restores Python's default one first.
    """
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        return [sys.executable, "-m", "pgops", *args]
    launcher = (
        "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "runpy.run_module('pgops', run_name='__main__', alter_sys=True)"
    )
    return [sys.executable, "-c", launcher, *args]


def check_output(proc: subprocess.CompletedProcess[str] | Any, secrets: Sequence[str]) -> None:
    """Assert that a finished pgops run printed no traceback and none of the secrets."""
    assert "Traceback" not in proc.stderr, proc.stderr
    for secret in secrets:
        assert secret not in proc.stdout, proc.stdout
        assert secret not in proc.stderr, proc.stderr


def secrets_of(server: PgServer) -> list[str]:
    """Return the server's password as a secret to look for, when it has one."""
    return [server.password] if server.password and len(server.password) >= 4 else []


def run_pgops(
    *args: str,
    database_url: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    stdin: Any = subprocess.DEVNULL,
    secrets: Sequence[str] = (),
    timeout: float = CLI_TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m pgops ARGS`` to its end (see run_in_checkout) and return it after check_output.

    Every run is checked for a traceback and for secrets and FAKE_PASSWORD in its output.
    """
    proc = run_in_checkout(
        pgops_argv(*args), database_url=database_url, env=env, cwd=cwd, stdin=stdin, timeout=timeout
    )
    check_output(proc, [*secrets, FAKE_PASSWORD])
    return proc


def run_in_checkout(
    argv: Sequence[str],
    *,
    database_url: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    stdin: Any = subprocess.DEVNULL,
    timeout: float = CLI_TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    """Run argv (a Python command line) to its end with pgops_env(database_url, env), in cwd (default
    ROOT), and return it with its output as text; its exit status is for the caller to check."""
    return subprocess.run(
        argv,
        env=pgops_env(database_url, env),
        cwd=cwd or ROOT,
        stdin=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def spawn_pgops(
    *args: str, database_url: str | None = None, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> subprocess.Popen[str]:
    """Start ``python -m pgops ARGS`` as a process of its own (env: see pgops_env), its output piped."""
    return subprocess.Popen(
        pgops_argv(*args),
        env=pgops_env(database_url, env),
        cwd=cwd or ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@dataclasses.dataclass
class Reply:
    """A response as a test client saw it."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """Return the body decoded as JSON."""
        return json.loads(self.body)


def wsgi_call(
    app: Any, path: str, method: str = "GET", headers: dict[str, str] | None = None, query: str = ""
) -> Reply:
    """Call a WSGI app in-process through wsgiref.validate and return what it answered."""
    environ: dict[str, Any] = {}
    setup_testing_defaults(environ)
    environ.update(REQUEST_METHOD=method, PATH_INFO=path, QUERY_STRING=query)
    for name, value in (headers or {}).items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    seen: dict[str, Any] = {}

    def start_response(status: str, response_headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        seen.update(status=status, headers=response_headers)
        return lambda data: None

    result: Any = validator(app)(environ, start_response)
    try:
        body = b"".join(result)
    finally:
        result.close()  # the validator insists
    return Reply(int(seen["status"].split()[0]), dict(seen["headers"]), body)


def _pgserver_bindir() -> Path | None:
    """Return the bin directory of the pgserver wheel without importing it (its import warns)."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or spec.origin is None:
        return None
    bindir = Path(spec.origin).parent / "pginstall" / "bin"
    return bindir if (bindir / "pg_ctl").exists() else None


def _pg_config_bindir() -> Path | None:
    """Return `pg_config --bindir` when it holds a server (initdb and pg_ctl)."""
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        return None
    try:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    bindir = Path(out.stdout.strip())
    return bindir if (bindir / "initdb").exists() and (bindir / "pg_ctl").exists() else None


def find_bindir() -> tuple[Path, str]:
    """Return (bindir, source) for PostgreSQL binaries: pgserver first, then pg_config, then PATH."""
    bindir = _pgserver_bindir()
    if bindir is not None:
        return bindir, "pgserver"
    bindir = _pg_config_bindir()
    if bindir is not None:
        return bindir, "pg_config"
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl:
        return Path(os.path.realpath(initdb)).parent, "PATH"
    raise PostgresNotFound(
        "no PostgreSQL server binaries found: pip install 'pgserver>=0.1.4' (extra 'test'), "
        "install the server package that provides initdb and pg_ctl, or set PGOPS_TEST_DSN"
    )


_bindir_copies: dict[Path, Path] = {}


def _reachable_bindir(bindir: Path) -> Path:
    """Return a bindir the unprivileged server user can reach, copying the installation if needed.

    tox keeps its virtualenvs under a private (0700) .tox directory, so pgserver's binaries inside
    one cannot be run by another user; a copy of the installation (bin, lib, share) under a fresh
    world-traversable temporary directory can.  Removed at exit.
    """
    if all(p.stat().st_mode & stat.S_IXOTH for p in [bindir, *bindir.parents]):
        return bindir
    if bindir not in _bindir_copies:
        holder = Path(tempfile.mkdtemp(prefix="pgops-pginstall-"))
        holder.chmod(0o755)
        # Keep the wheel's layout: its binaries find their libraries at $ORIGIN/../../../pgserver.libs.
        prefix = bindir.parent
        package = prefix.parent
        shutil.copytree(prefix, holder / package.name / prefix.name, symlinks=True)
        libs = package.parent / f"{package.name}.libs"
        if libs.is_dir():
            shutil.copytree(libs, holder / libs.name, symlinks=True)
        for root, dirs, _files in os.walk(holder):
            for name in dirs:
                (Path(root) / name).chmod(0o755)
        atexit.register(shutil.rmtree, holder, ignore_errors=True)
        _bindir_copies[bindir] = holder / package.name / prefix.name / bindir.name
    return _bindir_copies[bindir]


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on host that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _pid_alive(pid: int) -> bool:
    """Tell whether a process with this pid exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_postmaster_of(pid: int, data_dir: Path) -> bool:
    """Tell whether pid is a postgres process started with -D data_dir (guards against pid reuse)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        try:
            out = subprocess.run(["ps", "-o", "command=", "-p", str(pid)], capture_output=True, check=False)
        except OSError:
            return False
        args = out.stdout.split()
    return str(data_dir).encode() in args and any(a.endswith(b"postgres") for a in args[:1])


def _ensure_system_user(name: str) -> tuple[int, int]:
    """Return (uid, gid) of system account name, creating it (root only) if missing."""
    import pwd

    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        shell = "/usr/sbin/nologin" if os.path.exists("/usr/sbin/nologin") else "/bin/false"
        cmd = ["useradd", "--system", "--no-create-home", "--user-group", "--shell", shell, name]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        # exit status 9: created concurrently by another process
        if proc.returncode not in (0, 9):
            raise RuntimeError(f"could not create system user {name!r}: {proc.stderr.strip()}") from None
        entry = pwd.getpwnam(name)
    return entry.pw_uid, entry.pw_gid


def _allow_traversal(path: Path) -> None:
    """Add search (x) permission for others to path and its ancestors so another user can reach it."""
    for p in (path, *path.parents):
        mode = p.stat().st_mode
        if not mode & 0o001:
            p.chmod(mode | 0o001)


def quote_ident(conn: psycopg2.extensions.connection, name: str) -> str:
    """Return name quoted as an SQL identifier."""
    return psycopg2.sql.Identifier(name).as_string(conn)


def has_pgvector(conn: psycopg2.extensions.connection) -> bool:
    """Tell whether the server behind conn can `CREATE EXTENSION vector`."""
    with conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'")
        return cur.fetchone() is not None


@contextlib.contextmanager
def temporary_role(
    admin: psycopg2.extensions.connection, prefix: str, *, password: str | None = None
) -> Iterator[str]:
    """Create a role (a login role when given a password), yield its name, then drop it and what it owns."""
    name = f"{prefix}{secrets.token_hex(4)}"
    ident = psycopg2.sql.Identifier(name)
    with admin.cursor() as cur:
        if password is None:
            cur.execute(psycopg2.sql.SQL("CREATE ROLE {}").format(ident))
        else:
            cur.execute(psycopg2.sql.SQL("CREATE ROLE {} LOGIN PASSWORD %s").format(ident), (password,))
    try:
        yield name
    finally:
        with admin.cursor() as cur:
            cur.execute(psycopg2.sql.SQL("DROP OWNED BY {}").format(ident))
            cur.execute(psycopg2.sql.SQL("DROP ROLE {}").format(ident))


@contextlib.contextmanager
def temporary_database(server: PgServer, prefix: str = "pgops_test_") -> Iterator[str]:
    """Create an empty database on server, yield its name, and drop it (forcefully) afterwards."""
    name = f"{prefix}{secrets.token_hex(6)}"
    with contextlib.closing(server.admin_connect()) as conn:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(psycopg2.sql.SQL("CREATE DATABASE {}").format(psycopg2.sql.Identifier(name)))
    try:
        yield name
    finally:
        drop_database(server, name)


def drop_database(server: PgServer, name: str) -> None:
    """Drop database name, terminating any sessions still connected to it."""
    ident = psycopg2.sql.Identifier(name)
    with contextlib.closing(server.admin_connect()) as conn:
        conn.autocommit = True
        with conn.cursor() as cur:
            if conn.server_version >= 130000:
                cur.execute(psycopg2.sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))
            else:
                cur.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = %s AND pid <> pg_backend_pid()",
                    (name,),
                )
                cur.execute(psycopg2.sql.SQL("DROP DATABASE IF EXISTS {}").format(ident))


class ExternalServer:
    """A server given by a DSN or URL (PGOPS_TEST_DSN); it cannot be stopped or restarted."""

    def __init__(self, dsn: str) -> None:
        """Wrap dsn, a libpq URL or key=value string naming any database on the server."""
        self._params: dict[str, str] = {}
        self._params = {k: v for k, v in psycopg2.extensions.parse_dsn(dsn).items() if k != "dbname"}
        self.password: str | None = self._params.get("password")

    def dsn(self, dbname: str = "postgres", **kw: Any) -> str:
        """Return a key=value DSN for dbname with extra libpq parameters kw."""
        return str(psycopg2.extensions.make_dsn(**{**self._params, "dbname": dbname, **kw}))

    def url(self, dbname: str = "postgres") -> str:
        """Return a postgresql:// URL for dbname."""
        params = dict(self._params)
        host, port = params.pop("host", ""), params.pop("port", "")
        user, password = params.pop("user", ""), params.pop("password", None)
        netloc = quote(user, safe="")
        if password is not None:
            netloc += ":" + quote(password, safe="")
        if netloc:
            netloc += "@"
        if host and "/" not in host:  # TCP host (or a comma list); socket directories go in the query
            netloc += host + (f":{port}" if port and "," not in host else "")
            if port and "," in host:
                params["port"] = port
        else:
            if host:
                params["host"] = host
            if port:
                params["port"] = port
        query = f"?{urlencode(params)}" if params else ""
        return f"postgresql://{netloc}/{quote(dbname, safe='')}{query}"

    def admin_connect(self, dbname: str = "postgres") -> psycopg2.extensions.connection:
        """Return an autocommit connection to dbname."""
        conn = psycopg2.connect(self.dsn(dbname))
        conn.autocommit = True
        return conn

    def __repr__(self) -> str:
        """Describe the server without its password."""
        return f"ExternalServer(host={self._params.get('host')!r}, port={self._params.get('port')!r})"


_live_servers: set[LocalServer] = set()


class LocalServer:
    """A throwaway PostgreSQL cluster in base_dir that a test may start, stop, restart and crash.

    TCP (127.0.0.1 only) needs the superuser password (scram-sha-256); the unix socket is trusted.
    """

    host = "127.0.0.1"
    user = SUPERUSER

    def __init__(self, base_dir: str | os.PathLike[str], *, port: int | None = None) -> None:
        """Create (initdb) a new cluster under base_dir; call start() to run it."""
        self.bindir, self.bin_source = find_bindir()
        self.base_dir = Path(base_dir).resolve()
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.base_dir / "data"
        self.log_path = self.data_dir / "postgres.log"
        self.password: str = secrets.token_urlsafe(18)
        self.port = port if port is not None else free_port(self.host)
        self._fixed_port = port is not None
        self._started_once = False
        self._last_pid: int | None = None  # kept in case the data directory (and postmaster.pid) vanishes
        self.socket_dir = self._make_socket_dir()
        self._run_as: tuple[int, int] | None = None
        if os.geteuid() == 0:  # postgres refuses to run as root
            self._run_as = _ensure_system_user(SYSTEM_USER)
            _allow_traversal(self.base_dir)
            self.bindir = _reachable_bindir(self.bindir)
        _live_servers.add(self)
        try:
            self._initdb()
        except BaseException:
            self.cleanup()
            raise

    # -- paths and commands ------------------------------------------------------------------------

    def _make_socket_dir(self) -> Path:
        """Create a short private directory for the unix socket (the data dir may be too deep)."""
        for parent in (None, "/tmp"):
            path = Path(tempfile.mkdtemp(prefix="pgops-", dir=parent))
            if len(str(path / f".s.PGSQL.{self.port}.lock")) <= _MAX_SOCKET_PATH:
                return path
            path.rmdir()
        raise RuntimeError("no directory short enough for a unix socket; set TMPDIR to a short path")

    def _chown(self, path: Path) -> None:
        """Hand path to the account that runs postgres."""
        if self._run_as is not None:
            os.chown(path, *self._run_as)

    def _run(self, prog: str, *args: str, check: bool = True, timeout: float = _START_TIMEOUT) -> str:
        """Run a PostgreSQL program (as the unprivileged account when root) and return its output."""
        cmd = [str(self.bindir / prog), *args]
        kwargs: dict[str, Any] = {}
        if self._run_as is not None:
            kwargs.update(user=self._run_as[0], group=self._run_as[1], extra_groups=[])
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C")
        # Temporary files, not pipes: the postmaster could otherwise inherit a pipe and hang run().
        with tempfile.TemporaryFile("w+") as out:
            proc = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                cwd=self.base_dir,
                env=env,
                timeout=timeout,
                check=False,
                **kwargs,
            )
            out.seek(0)
            output = out.read()
        if check and proc.returncode != 0:
            command = " ".join([prog, *args])
            status = proc.returncode
            raise RuntimeError(f"{command} failed (exit status {status}):\n{output}{self._log_tail()}")
        return output

    def _log_tail(self, lines: int = 30) -> str:
        """Return the end of the server log, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return "\n--- server log ---\n" + "\n".join(text)

    def _initdb(self) -> None:
        """Initialise the cluster with password auth over TCP and write the test configuration."""
        self.data_dir.mkdir()
        self._chown(self.data_dir)
        self._chown(self.socket_dir)
        pwfile = self.base_dir / f"pwfile-{secrets.token_hex(4)}"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.password + "\n")
        self._chown(pwfile)
        try:
            self._run(
                "initdb",
                "-D", str(self.data_dir),
                "-U", SUPERUSER,
                f"--pwfile={pwfile}",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            )  # fmt: skip
        finally:
            pwfile.unlink(missing_ok=True)
        settings = {
            "listen_addresses": f"'{self.host}'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "max_connections": "200",
            "shared_buffers": "32MB",
            # fsync off only risks data on an OS crash; crash tests kill processes, and they check that
            # no acknowledged commit is lost, so commits must reach the kernel before they are acked.
            "fsync": "off",
            "synchronous_commit": "on",
            "full_page_writes": "off",
            "logging_collector": "off",
            "password_encryption": "'scram-sha-256'",
            "lc_messages": "'C'",
            "log_line_prefix": "'%m [%p] %q%u@%d '",
        }
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\n# pgops test settings\n")
            conf.writelines(f"{k} = {v}\n" for k, v in settings.items())

    def _set_port(self, port: int) -> None:
        """Change the configured port (only while stopped)."""
        self.port = port
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write(f"port = {port}\n")

    # -- lifecycle ---------------------------------------------------------------------------------

    @property
    def postmaster_pid(self) -> int | None:
        """Return the postmaster's pid while the server runs, else None."""
        try:
            first = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
            pid = int(first)
        except (OSError, ValueError):
            return None
        return pid if _pid_alive(pid) else None

    def is_running(self) -> bool:
        """Tell whether the postmaster process is alive."""
        return self.postmaster_pid is not None

    def start(self, timeout: float = _START_TIMEOUT) -> None:
        """Start the server (after initdb, stop() or crash()) and wait until it accepts connections."""
        if self.is_running():
            return
        _live_servers.add(self)
        for attempt in range(3):
            try:
                self._run(
                    "pg_ctl", "start", "-w", "-t", str(int(timeout)),
                    "-D", str(self.data_dir), "-l", str(self.log_path),
                    timeout=timeout + 10,
                )  # fmt: skip
                break
            except RuntimeError as exc:
                # Another process took the port between free_port() and start: pick another one,
                # but only before first use, so that restarts keep the address tests rely on.
                first_start = not self._fixed_port and not self._started_once
                if attempt < 2 and first_start and "already in use" in str(exc):
                    self._set_port(free_port(self.host))
                    continue
                raise
        self._started_once = True
        self._last_pid = self.postmaster_pid
        self.wait_ready(timeout)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server with pg_ctl -m mode (smart, fast or immediate) and wait until it is gone."""
        if mode not in _STOP_MODES:
            raise ValueError(f"stop mode must be one of {_STOP_MODES}, not {mode!r}")
        if not self.is_running():
            return
        self._run("pg_ctl", "stop", "-w", "-t", "60", "-m", mode, "-D", str(self.data_dir), timeout=70)

    def crash(self) -> None:
        """Stop the server abruptly (immediate mode: no checkpoint, crash recovery on next start)."""
        self.stop("immediate")

    def restart(self, mode: str = "fast") -> None:
        """Stop (mode) and start the server again on the same port."""
        self.stop(mode)
        self.start()

    def wait_ready(self, timeout: float = _START_TIMEOUT) -> None:
        """Wait until the server answers `SELECT 1` over TCP with the password."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with contextlib.closing(psycopg2.connect(self.dsn(connect_timeout=2))) as conn:
                    with conn.cursor() as cur:
                        cur.execute("SELECT 1")
                return
            except psycopg2.OperationalError as exc:
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"server on port {self.port} not ready after {timeout:.1f}s: {exc}{self._log_tail()}"
                    ) from exc
                time.sleep(0.05)

    def cleanup(self) -> None:
        """Stop the server if it runs (immediately) and delete its files."""
        _live_servers.discard(self)
        with contextlib.suppress(Exception):
            self._kill()
        shutil.rmtree(self.base_dir / "data", ignore_errors=True)
        shutil.rmtree(self.socket_dir, ignore_errors=True)

    def _kill(self) -> None:
        """Stop immediately; fall back to SIGQUIT on our own postmaster if pg_ctl cannot do it."""
        if self.is_running():
            with contextlib.suppress(Exception):
                self.stop("immediate")
        pid = self._last_pid
        if pid is None or not _pid_alive(pid) or not _is_postmaster_of(pid, self.data_dir):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGQUIT)
        with contextlib.suppress(AssertionError):
            wait_until(lambda: not _pid_alive(pid), timeout=10, message="postmaster did not exit")

    # -- connecting --------------------------------------------------------------------------------

    def dsn(self, dbname: str = "postgres", **kw: Any) -> str:
        """Return a key=value DSN over TCP as the superuser, with extra libpq parameters kw."""
        params: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "user": SUPERUSER,
            "password": self.password,
            "dbname": dbname,
        }
        params.update(kw)
        return str(psycopg2.extensions.make_dsn(**params))

    def url(self, dbname: str = "postgres") -> str:
        """Return a postgresql:// URL over TCP as the superuser."""
        password = quote(self.password, safe="")
        return f"postgresql://{SUPERUSER}:{password}@{self.host}:{self.port}/{quote(dbname, safe='')}"

    def socket_dsn(self, dbname: str = "postgres", **kw: Any) -> str:
        """Return a key=value DSN over the unix socket (trusted, no password)."""
        params: dict[str, Any] = {"host": str(self.socket_dir), "port": self.port, "user": SUPERUSER}
        params.update(dbname=dbname, **kw)
        return str(psycopg2.extensions.make_dsn(**params))

    def admin_connect(self, dbname: str = "postgres") -> psycopg2.extensions.connection:
        """Return an autocommit superuser connection over TCP."""
        conn = psycopg2.connect(self.dsn(dbname))
        conn.autocommit = True
        return conn

    def __repr__(self) -> str:
        """Describe the server without its password."""
        return f"LocalServer(port={self.port}, data_dir={str(self.data_dir)!r}, bin={self.bin_source})"


@atexit.register
def _stop_all_servers() -> None:
    """Stop every LocalServer still running when the interpreter exits (e.g. after Ctrl-C)."""
    for server in list(_live_servers):
        server.cleanup()
