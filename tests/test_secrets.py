"""Secret hygiene: no password shows in any output, log line, error, repr or response of pgops.

One test drives everything with three passwords: the session server's real one (so that every
command and route succeeds), a wrong one (authentication failures) and one for a port where nothing
listens (connection failures, retries, pool timeouts).  It collects every piece of text pgops
produces -- stdout and stderr of every CLI command with and without ``-v``, the DEBUG records of
the ``pgops`` logger, str/repr/traceback of every error, the repr of every object, every response
body and header -- and then looks for each password, its URL-encoded forms and a distinctive core
(which also catches JSON- or repr-escaped copies) in all of it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import re
import secrets
import signal
import subprocess
import traceback
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import pytest

from pgops import (
    CannotConnect,
    ConfigError,
    DirtyDatabase,
    HealthApp,
    MigrationFailed,
    Migrator,
    Pool,
    PoolConfig,
    PoolTimeout,
    RetryPolicy,
    check_schema,
    create_app,
)
from pgtest import (
    ExternalServer,
    PgServer,
    Reply,
    free_port,
    pgops_argv,
    pgops_env,
    run_pgops,
    wait_until,
    wsgi_call,
)

TOKEN = "secrets-test-token-" + secrets.token_hex(4)
# Distinctive, with characters that must be quoted in a key=value DSN and encoded in a URL; no quote
# or backslash, so that a leak cannot hide behind repr() escaping.  The cores are what any copy of
# the password keeps, however it was escaped.
WRONG_CORE = "Quokka" + secrets.token_hex(4)
WRONG = f"Wr0ng pa55 @/:%ü-{WRONG_CORE}"
AWAY_CORE = "Narwhal" + secrets.token_hex(4)
AWAY = f"Aw@y/pw {AWAY_CORE}?#&="

MIGRATIONS = {
    "0001_things.sql": "CREATE TABLE things (id int PRIMARY KEY, note text);\n"
    "INSERT INTO things VALUES (1, 'one');\n",
    "0001_things.down.sql": "DROP TABLE things;\n",
    "0002_note_index.sql": "CREATE INDEX things_note ON things (note);\n",
    "0002_note_index.down.sql": "DROP INDEX things_note;\n",
    "schema.json": json.dumps({"tables": ["things"], "columns": {"things.id": "integer"}}),
}

TRANSACTION_FAILURE = "CREATE TABLE whole (id int);\nSELECT no_such_column FROM things;\n"  # rolled back
NO_TRANSACTION_FAILURE = "-- pgops: no-transaction\nCREATE TABLE IF NOT EXISTS half (id int);\nSELECT 1/0;\n"


@dataclasses.dataclass(frozen=True)
class Secret:
    """A password and the strings that would betray it."""

    label: str
    password: str
    core: str

    def forms(self) -> set[str]:
        """Return the password as written, URL-encoded (both ways), JSON-escaped, and its core."""
        return {
            self.password,
            quote(self.password, safe=""),
            quote_plus(self.password, safe=""),
            json.dumps(self.password)[1:-1],
            self.core,
        }


class Evidence:
    """Every piece of text pgops produced during the test, labelled by where it came from."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, label: str, text: object) -> None:
        """Record one piece of text (anything else is recorded as its str and its repr)."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        self.items.append((label, text if isinstance(text, str) else f"{text!s} {text!r}"))

    def error(self, label: str, exc: BaseException) -> None:
        """Record an error as str, repr, its attributes and its formatted traceback."""
        self.add(f"{label}: str", str(exc))
        self.add(f"{label}: repr", repr(exc))
        self.add(f"{label}: attributes", repr(vars(exc)))
        self.add(f"{label}: traceback", "".join(traceback.format_exception(exc)))

    def leaks(self, found: list[Secret]) -> list[str]:
        """Return 'label: form' for every secret form found in any recorded text."""
        return [
            f"{label}: {secret.label} as {form!r} in {text[:300]!r}"
            for label, text in self.items
            for secret in found
            for form in secret.forms()
            if form in text
        ]


# -- CLI -------------------------------------------------------------------------------------------


def run_cli(
    evidence: Evidence, label: str, args: list[str], url: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m pgops ARGS`` with DATABASE_URL=url and record both output streams."""
    proc = run_pgops(*args, database_url=url, env=env, cwd=cwd)
    name = f"cli {label} {' '.join(args)}"
    evidence.add(f"{name}: stdout", proc.stdout)
    evidence.add(f"{name}: stderr", proc.stderr)
    return proc


def cli_session(evidence: Evidence, label: str, url: str, mdir: Path, tmp_path: Path, verbose: bool) -> None:
    """Run every CLI command once with the real password and check that each one succeeded."""
    v = ["-v"] if verbose else []
    d = ["--dir", str(mdir), *v]
    logged = ""
    for args in (
        ["migrate", *d],
        ["migrate", "--dry-run", *d],
        ["status", *d],
        ["status", "--json", *d],
        ["validate", *d],
        ["rollback", "--to", "0", "--yes", *d],
        ["repair", *d],
        ["new", "add_more", "--dir", str(tmp_path / f"new-{label}-{len(evidence.items)}"), *v],
    ):
        proc = run_cli(evidence, label, args, url, tmp_path)
        assert proc.returncode == 0, proc.stderr
        logged += proc.stderr
    assert ("DEBUG" in logged) == verbose  # -v logs SQL and connections at DEBUG


def cli_failures(evidence: Evidence, url: str, password: str, mdir: Path, tmp_path: Path) -> None:
    """With the real password: a failing migration (exit 1), a dirty database (exit 5), then repair."""
    run = functools.partial(run_cli, evidence, "real failures")
    assert run(["migrate", "--dir", str(mdir), "-v"], url, tmp_path).returncode == 0
    broken = mdir / "0003_broken.sql"
    broken.write_text(TRANSACTION_FAILURE)
    failed = run(["migrate", "--dir", str(mdir), "-v"], url, tmp_path)
    assert failed.returncode == 1 and "42703" in failed.stderr
    broken.write_text(NO_TRANSACTION_FAILURE)
    assert run(["migrate", "--dir", str(mdir), "-v"], url, tmp_path).returncode == 1
    assert run(["migrate", "--dir", str(mdir), "-v"], url, tmp_path).returncode == 5
    assert run(["validate", "--dir", str(mdir), "-v"], url, tmp_path).returncode == 4
    broken.unlink()
    assert run(["repair", "--dir", str(mdir), "-v"], url, tmp_path).returncode == 0
    assert run(["status", "--json", "--dir", str(mdir), "-v"], url, tmp_path).returncode == 0
    for bad in bad_dsns(password, url):
        proc = run(["status", "--dir", str(mdir), "--dsn", bad], url, tmp_path)
        assert proc.returncode == 2, proc.stderr


def cli_refused(
    evidence: Evidence, label: str, url: str, mdir: Path, tmp_path: Path, code: int | None
) -> None:
    """Run every database command with -v against a DSN that cannot work; each exits with *code*."""
    env = {"DB_RETRY_MAX_ATTEMPTS": "2", "DB_RETRY_INITIAL_DELAY": "0.01"}  # one retry, logged
    commands = [
        ["migrate"],
        ["migrate", "--dry-run"],
        ["status"],
        ["status", "--json"],
        ["validate"],
        ["rollback", "--to", "0", "--yes"],
        ["repair"],
    ]
    with ThreadPoolExecutor(max_workers=4) as workers:
        procs = list(
            workers.map(
                lambda args: run_cli(evidence, label, [*args, "--dir", str(mdir), "-v"], url, tmp_path, env),
                commands,
            )
        )
    for proc in procs:
        assert code is None or proc.returncode == code, proc.stderr
        assert "pgops: error: " in proc.stderr


# -- HTTP ------------------------------------------------------------------------------------------


def call(app: Any, path: str, method: str = "GET", authorization: str | None = None) -> Reply:
    """Call a WSGI app in-process, with an Authorization header when one is given."""
    return wsgi_call(app, path, method, {} if authorization is None else {"Authorization": authorization})


ROUTES: list[tuple[str, str, str | None]] = [
    ("GET", "/health/live", None),
    ("GET", "/health/ready", None),
    ("GET", "/health/detailed", None),
    ("GET", "/health/detailed", f"Bearer {TOKEN}"),
    ("GET", "/metrics", None),
    ("GET", "/metrics", f"Bearer {TOKEN}"),
    ("HEAD", "/health/ready", None),
    ("GET", "/nowhere", None),
    ("POST", "/health/ready", None),
]


def probe_app(evidence: Evidence, label: str, app: Any) -> dict[tuple[str, str, str | None], int]:
    """Call every route in-process, recording bodies and headers; return the statuses."""
    statuses = {}
    for method, path, authorization in ROUTES:
        reply = call(app, path, method, authorization)
        evidence.add(f"http {label} {method} {path} {authorization is not None}: body", reply.body)
        evidence.add(f"http {label} {method} {path}: headers", repr(reply.headers))
        statuses[(method, path, authorization)] = reply.status
    evidence.add(f"{label}: HealthApp repr", repr(app))
    return statuses


def fetch(url: str, method: str = "GET", authorization: str | None = None) -> Reply:
    """Send one HTTP request and return the reply, error statuses included."""
    headers = {} if authorization is None else {"Authorization": authorization}
    request = urllib.request.Request(url, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return Reply(response.status, dict(response.headers), response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return Reply(exc.code, dict(exc.headers), exc.read())


@contextlib.contextmanager
def serving(url: str, mdir: Path, log: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """Run ``python -m pgops serve -v --port 0`` and yield it with its base URL; SIGTERM it at the end."""
    env = pgops_env(url, {"PGOPS_HEALTH_TOKEN": TOKEN, "POOL_PRESET": "testing"})
    with log.open("wb") as out:
        proc = subprocess.Popen(
            pgops_argv("serve", "--port", "0", "--dir", str(mdir), "-v"),
            env=env,
            cwd=log.parent,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )
    try:

        def announced() -> str | None:
            if proc.poll() is not None:
                raise AssertionError(
                    f"serve exited with {proc.returncode}: {log.read_text(errors='replace')}"
                )
            match = re.search(r"on (http://127\.0\.0\.1:\d+)\n", log.read_text(errors="replace"))
            return match.group(1) if match else None

        yield proc, wait_until(announced, timeout=60, message="serve did not announce its address")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def serve_and_probe(evidence: Evidence, label: str, url: str, mdir: Path, tmp_path: Path) -> int:
    """Serve over HTTP, request every route, stop with SIGTERM; record everything and return the exit code."""
    log = tmp_path / f"serve-{label.replace(' ', '-')}.log"
    with serving(url, mdir, log) as (proc, base):
        for method, path, authorization in ROUTES:
            reply = fetch(base + path, method, authorization)
            evidence.add(f"serve {label} {method} {path} {authorization is not None}: body", reply.body)
            evidence.add(f"serve {label} {method} {path}: headers", repr(reply.headers))
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    evidence.add(f"serve {label}: output", log.read_text(errors="replace"))
    return code


# -- in-process ------------------------------------------------------------------------------------


def in_process_real(evidence: Evidence, label: str, dsn: str, mdir: Path) -> None:
    """Use every public object with the real password: config, pool, migrator, schema check, health app."""
    migrator = Migrator(dsn, str(mdir))
    evidence.add(f"{label}: Migrator(dsn)", migrator)
    evidence.add(f"{label}: migrate", migrator.migrate())
    config = PoolConfig.preset("testing", dsn=dsn, leak_threshold=0.05, monitor_interval=0.1)
    evidence.add(f"{label}: PoolConfig", config)
    evidence.add(f"{label}: PoolConfig.from_env", PoolConfig.from_env({"DATABASE_URL": dsn}))
    evidence.add(f"{label}: RetryPolicy", RetryPolicy.from_env({}))
    with Pool(config) as pool:
        pool.wait(timeout=30)
        evidence.add(f"{label}: Pool", pool)
        conn = pool.getconn()
        try:
            # Held past leak_threshold: the pool logs a leak warning with the checkout stack.
            wait_until(lambda: any("possible leak" in text for _, text in evidence.items), timeout=30)
        finally:
            pool.putconn(conn)
        with pool.connection() as conn, conn.cursor() as cur:
            cur.execute("SELECT 1")
            report = check_schema(conn, tables=["things", "absent"], columns={"things.id": "bigint"})
        evidence.add(f"{label}: SchemaReport", report)
        assert not report.ok
        evidence.add(f"{label}: PoolHealth", pool.health())
        evidence.add(f"{label}: stats", pool.stats())
        migrator = Migrator(pool, str(mdir))
        evidence.add(f"{label}: Migrator(pool)", migrator)
        evidence.add(f"{label}: status", migrator.status())
        evidence.add(f"{label}: pending", migrator.pending())
        app = HealthApp(pool, migrator=migrator, token=TOKEN, cache_ttl=0.0)
        statuses = probe_app(evidence, label, app)
        assert statuses[("GET", "/health/ready", None)] == 200
        assert statuses[("GET", "/metrics", f"Bearer {TOKEN}")] == 200
    evidence.add(f"{label}: Pool closed", pool)
    with Pool(dsn, min_size=1, max_size=1, acquire_timeout=0.2, monitor_interval=0) as pool:
        with pool.connection():
            with pytest.raises(PoolTimeout) as busy:
                pool.getconn()  # the only connection is lent out
        evidence.error(f"{label}: PoolTimeout (busy)", busy.value)
    migrator = Migrator(dsn, str(mdir))
    broken = mdir / "0003_broken.sql"
    broken.write_text(TRANSACTION_FAILURE)
    try:
        with pytest.raises(MigrationFailed) as failed:
            migrator.migrate()
        evidence.error(f"{label}: MigrationFailed", failed.value)
        broken.write_text(NO_TRANSACTION_FAILURE)
        with pytest.raises(MigrationFailed) as failed:
            migrator.migrate()
        evidence.error(f"{label}: MigrationFailed (no-transaction)", failed.value)
        with pytest.raises(DirtyDatabase) as dirty:
            migrator.migrate()
        evidence.error(f"{label}: DirtyDatabase", dirty.value)
    finally:
        broken.unlink()
    evidence.add(f"{label}: repair", migrator.repair())
    evidence.add(f"{label}: rollback", migrator.rollback(0))
    app = create_app({"DATABASE_URL": dsn, "PGOPS_HEALTH_TOKEN": TOKEN, "POOL_PRESET": "testing"})
    try:
        evidence.add(f"{label}: create_app pool", app.pool)
        probe_app(evidence, f"{label} create_app", app)
    finally:
        app.pool.close()


def in_process_failing(evidence: Evidence, label: str, dsn: str, mdir: Path, *, reachable: bool) -> None:
    """Use the pool, migrator and health app with a DSN that cannot connect; record every error."""
    config = PoolConfig(dsn=dsn, min_size=1, max_size=2, acquire_timeout=0.3, monitor_interval=0.1)
    evidence.add(f"{label}: PoolConfig", config)
    with Pool(config) as pool:
        evidence.add(f"{label}: Pool", pool)
        expected: tuple[type[Exception], ...] = (CannotConnect, PoolTimeout)
        with pytest.raises(expected) as waited:
            pool.wait(timeout=0.3)
        evidence.error(f"{label}: pool.wait", waited.value)
        with pytest.raises(expected) as taken:
            pool.getconn(timeout=0.3)
        evidence.error(f"{label}: pool.getconn", taken.value)
        if not reachable:
            assert isinstance(taken.value, PoolTimeout)
        with pytest.raises(expected) as ran:
            pool.run(lambda conn: None, retry=RetryPolicy(max_attempts=2, initial_delay=0.01))
        evidence.error(f"{label}: pool.run", ran.value)
        evidence.add(f"{label}: PoolHealth", pool.health())
        evidence.add(f"{label}: stats", pool.stats())
        migrator = Migrator(pool, str(mdir))
        app = HealthApp(pool, migrator=migrator, token=TOKEN, cache_ttl=60.0, ready_timeout=0.2)
        statuses = probe_app(evidence, label, app)
        assert statuses[("GET", "/health/ready", None)] == 503
    migrator = Migrator(dsn, str(mdir), connect_retry=RetryPolicy(max_attempts=2, initial_delay=0.01))
    evidence.add(f"{label}: Migrator", migrator)
    for name, action in (("status", migrator.status), ("migrate", migrator.migrate)):
        with pytest.raises(CannotConnect) as refused:
            action()
        evidence.error(f"{label}: Migrator.{name}", refused.value)
    app = create_app({"DATABASE_URL": dsn, "POOL_PRESET": "testing", "PGOPS_HEALTH_TOKEN": TOKEN})
    try:
        probe_app(evidence, f"{label} create_app", app)
    finally:
        app.pool.close()


def bad_dsns(password: str, url: str) -> list[str]:
    """Return DSNs that libpq or pgops refuse to parse, each holding *password*."""
    encoded = quote(password, safe="")
    host = "127.0.0.1"
    return [
        f"host={host} password='{password}' nonsense",
        f"host={host} password='{password}' colour=blue",
        f"postgresql://app:{encoded}@{host}:abc/db",
        f"postgresql://app:{encoded}@[::1/db",
        f"postgresql://app:%zz{encoded}@{host}/db",
        f"postgresql://app:{encoded}@{host}/db?colour=blue",
        *(
            [url.replace("@", "@[", 1), url + ("&" if "?" in url else "?") + "colour=blue"]
            if "://" in url
            else [f"{url} nonsense", f"{url} colour=blue"]
        ),
    ]


def config_errors(evidence: Evidence, label: str, password: str, url: str, mdir: Path) -> None:
    """Record the ConfigError of every constructor for DSNs that hold *password* and do not parse."""
    for n, dsn in enumerate(bad_dsns(password, url)):
        for name, build, argument in (
            ("PoolConfig", lambda d: PoolConfig(dsn=d), dsn),
            ("PoolConfig.from_env", PoolConfig.from_env, {"DATABASE_URL": dsn}),
            ("Pool", Pool, dsn),
            ("Migrator", lambda d: Migrator(d, str(mdir)), dsn),
            ("create_app", create_app, {"DATABASE_URL": dsn}),
        ):
            with pytest.raises(ConfigError) as refused:
                build(argument)
            evidence.error(f"{label}: bad dsn {n}: {name}", refused.value)


class _Keep(logging.Handler):
    """A handler that keeps every record, formatted with its traceback, on an Evidence."""

    def __init__(self, evidence: Evidence) -> None:
        super().__init__(logging.DEBUG)
        self.evidence = evidence
        self.setFormatter(logging.Formatter("%(levelname)s %(threadName)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.evidence.add(f"log {record.levelname}: args", repr(record.args))
        self.evidence.add(f"log {record.levelname}", self.format(record))


@contextlib.contextmanager
def capture_logs(evidence: Evidence) -> Iterator[None]:
    """Keep every DEBUG-and-above record of the pgops logger (worker threads included) on *evidence*."""
    logger = logging.getLogger("pgops")
    handler, level = _Keep(evidence), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


# -- the test --------------------------------------------------------------------------------------


def test_no_password_shows_in_any_output_log_error_repr_or_response(
    pg_server: PgServer, dbname: str, tmp_path: Path
) -> None:
    """No command, route, log record, error or repr shows the real, a wrong or an unreachable password."""
    mdir = tmp_path / "migrations"
    mdir.mkdir()
    for name, text in MIGRATIONS.items():
        (mdir / name).write_text(text)
    evidence = Evidence()
    found = [Secret("wrong password", WRONG, WRONG_CORE), Secret("unreachable password", AWAY, AWAY_CORE)]
    wrong_kv = pg_server.dsn(dbname, password=WRONG)
    away_kv = pg_server.dsn(dbname, password=AWAY, host="127.0.0.1", port=free_port())
    dsns = {
        "wrong url": ExternalServer(wrong_kv).url(dbname),
        "wrong key=value": wrong_kv,
        "unreachable url": ExternalServer(away_kv).url(dbname),
        "unreachable key=value": away_kv,
    }
    assert quote(WRONG, safe="") in dsns["wrong url"] and f"'{WRONG}'" in wrong_kv
    real = pg_server.password
    with capture_logs(evidence):
        if real:  # an external server without a password has no real password to leak
            found.append(Secret("real password", real, real))
            for label, dsn in (
                ("real url", pg_server.url(dbname)),
                ("real key=value", pg_server.dsn(dbname)),
            ):
                assert real in dsn
                for verbose in (False, True):
                    cli_session(evidence, f"{label}{' -v' if verbose else ''}", dsn, mdir, tmp_path, verbose)
                assert serve_and_probe(evidence, label, dsn, mdir, tmp_path) == 0
                in_process_real(evidence, label, dsn, mdir)
                config_errors(evidence, label, real, dsn, mdir)
            cli_failures(evidence, pg_server.url(dbname), real, mdir, tmp_path)
        for label, dsn in dsns.items():
            unreachable = label.startswith("unreachable")
            # Exit 6 (cannot connect), unless a server that checks no passwords lets the wrong one in.
            code = 6 if unreachable or real else None
            cli_refused(evidence, label, dsn, mdir, tmp_path, code)
            assert serve_and_probe(evidence, label, dsn, mdir, tmp_path) == 0
            if unreachable or real:  # without password checks the wrong password gets in
                in_process_failing(evidence, label, dsn, mdir, reachable=not unreachable)
        for secret in found[:2]:
            config_errors(evidence, secret.label, secret.password, dsns["wrong url"], mdir)
    assert any("password authentication failed" in text for _, text in evidence.items) or not real
    assert any("possible leak" in text for _, text in evidence.items) or not real
    leaks = evidence.leaks(found)
    assert not leaks, f"{len(leaks)} leaks, the first:\n" + "\n".join(leaks[:10])


# -- password shapes that libpq and people read differently ----------------------------------------
#
# Each shape writes a password the way people do without quoting or percent-encoding it.  libpq may
# cut such a password into a host, a port, a database or a query parameter and quote that piece in
# its errors; a person meant all of it.  None of it may show anywhere.

SHAPE_CORE = "Okapi" + secrets.token_hex(4)

# name -> (DSN template, the password as a person meant it, exit code of `status`)
SHAPES: dict[str, tuple[str, str, int]] = {
    # libpq stops the user info at '/': host 'app', port 'Sl4sh...', database 'rest@...'.
    "url-slash": ("postgresql://app:{pw}@{host}:{port}/{db}", f"Sl4sh{SHAPE_CORE}/rest", 2),
    # ...and with digits before the '/', a port it accepts and a host that does not resolve.
    "url-slash-digits": ("postgresql://app:{pw}@{host}:{port}/{db}", f"12/{SHAPE_CORE}", 6),
    # libpq stops the user info at the first '@': host 'ss#...@127.0.0.1', quoted in its error.
    "url-at-hash": ("postgresql://app:{pw}@{host}:{port}/{db}", f"p@ss#{SHAPE_CORE}", 6),
    # '#' is no fragment to libpq: it connects with the whole value (and is refused).
    "query-hash": ("postgresql://app@{host}:{port}/{db}?password={pw}", f"abc#{SHAPE_CORE}", 6),
    # libpq ends the value at '&' and quotes the rest as a parameter without '='.
    "query-ampersand": ("postgresql://app@{host}:{port}/{db}?password={pw}", f"abc&{SHAPE_CORE}", 2),
    # libpq quotes the whole token it cannot decode.
    "url-bad-percent": ("postgresql://app:{pw}@{host}:{port}/{db}", f"p%zz{SHAPE_CORE}", 2),
    # libpq decodes it, and psycopg2 cannot read the bytes back as text.
    "url-not-utf8": ("postgresql://app:{pw}@{host}:{port}/{db}", f"{SHAPE_CORE}%99", 2),
    "query-bad-percent": ("postgresql://app@{host}:{port}/{db}?password={pw}", f"%zz{SHAPE_CORE}", 2),
    "kv-escaped-space": (
        "host={host} port={port} user=app dbname={db} password={pw}",
        f"a\\ {SHAPE_CORE}",
        6,
    ),
    # libpq takes 'a' and quotes the rest as a keyword without '='.
    "kv-unquoted-space": ("host={host} port={port} user=app password={pw} dbname={db}", f"a {SHAPE_CORE}", 2),
    "kv-unterminated-quote-space": (
        "host={host} port={port} user=app password={pw} dbname={db}",
        f"'abc {SHAPE_CORE}",
        2,
    ),
}


def error_chain(evidence: Evidence, label: str, exc: BaseException) -> None:
    """Record an error and every error on its __cause__/__context__ chain."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        evidence.error(f"{label} (chain {len(seen)})", link)
        link = link.__cause__ or link.__context__


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_no_piece_of_an_unencoded_password_shows(
    pg_server: PgServer, dbname: str, tmp_path: Path, shape: str
) -> None:
    """repr, the pool's log lines, errors with their chains, CLI output and health bodies hide every shape."""
    template, password, code = SHAPES[shape]
    params = ExternalServer(pg_server.dsn(dbname)).dsn(dbname)
    server = psycopg2_params(params)
    if "/" in server["host"]:
        pytest.skip("the shapes need a TCP host")
    dsn = template.format(pw=password, host=server["host"], port=server["port"], db=dbname)
    evidence = Evidence()
    with capture_logs(evidence):
        try:
            config = PoolConfig.preset("testing", dsn=dsn, acquire_timeout=0.5, monitor_interval=0.1)
        except ConfigError as exc:
            error_chain(evidence, "PoolConfig", exc)
            config = None
        assert (config is None) == (code == 2), f"{shape}: expected exit {code}"
        migrator_of = functools.partial(
            Migrator, directory=str(tmp_path), connect_retry=RetryPolicy(max_attempts=1)
        )
        for name, build in (
            ("from_env", lambda: PoolConfig.from_env({"DATABASE_URL": dsn})),
            ("create_app", lambda: create_app({"DATABASE_URL": dsn, "PGOPS_HEALTH_TOKEN": TOKEN})),
            ("Migrator", lambda: migrator_of(dsn)),
        ):
            if config is None:
                with pytest.raises(ConfigError) as refused:
                    build()
                error_chain(evidence, name, refused.value)
        if config is not None:
            migrator = migrator_of(dsn)
            evidence.add("Migrator", migrator)
            with pytest.raises(CannotConnect) as refused:
                migrator.status()
            error_chain(evidence, "Migrator.status", refused.value)
            evidence.add("PoolConfig", config)
            with Pool(config) as pool:
                evidence.add("Pool", pool)
                with pytest.raises((CannotConnect, PoolTimeout)) as waited:
                    pool.getconn()
                error_chain(evidence, "getconn", waited.value)
                for token in (TOKEN, None):
                    app = HealthApp(pool, token=token, cache_ttl=60.0, ready_timeout=0.5)
                    statuses = probe_app(evidence, f"token {token is not None}", app)
                    assert statuses[("GET", "/health/ready", None)] == 503
    assert any("started for" in text for _, text in evidence.items) or config is None
    (tmp_path / "migrations").mkdir()
    proc = run_cli(evidence, shape, ["status", "-v"], dsn, tmp_path, {"DB_RETRY_MAX_ATTEMPTS": "1"})
    assert proc.returncode == code, proc.stderr
    leaks = evidence.leaks([Secret(shape, password, SHAPE_CORE)])
    assert not leaks, f"{len(leaks)} leaks, the first:\n" + "\n".join(leaks[:10])


def psycopg2_params(dsn: str) -> dict[str, str]:
    """Return the host and port of a key=value DSN (127.0.0.1 and 5432 when absent)."""
    import psycopg2.extensions

    parsed = psycopg2.extensions.parse_dsn(dsn)
    return {"host": parsed.get("host", "127.0.0.1"), "port": parsed.get("port", "5432")}


def test_ready_says_only_what_is_wrong_when_a_token_guards_the_details(
    pg_server: PgServer, dbname: str
) -> None:
    """With a token, /health/ready names what fails in generic words; the driver's text needs the token."""
    dsn = pg_server.dsn(dbname, password=WRONG, user="app")  # refused with or without password checks
    with Pool(dsn, min_size=1, max_size=1, acquire_timeout=0.5, monitor_interval=0) as pool:
        app = HealthApp(pool, token=TOKEN, cache_ttl=60.0, ready_timeout=0.5)
        ready = call(app, "/health/ready")
        detailed = call(app, "/health/detailed", authorization=f"Bearer {TOKEN}")
        open_app = HealthApp(pool, cache_ttl=60.0, ready_timeout=0.5)
        open_ready = call(open_app, "/health/ready")
    assert ready.status == 503 and ready.json()["reasons"] == ["database: not reachable"], ready.body
    assert "FATAL" not in ready.body.decode() and "<dsn>" not in ready.body.decode()
    # The details stay where the token guards them, and on an app without a token.
    assert detailed.status == 503 and b"FATAL" in detailed.body, detailed.body
    assert open_ready.status == 503 and b"FATAL" in open_ready.body, open_ready.body


@pytest.mark.parametrize(
    "documented",
    [create_app, PoolConfig.from_env, RetryPolicy.from_env],
    ids=["create_app", "PoolConfig.from_env", "RetryPolicy.from_env"],
)
def test_help_does_not_print_the_environment(documented: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """help() on a function that reads the environment shows no variable of it, DATABASE_URL included."""
    import pydoc

    monkeypatch.setenv("DATABASE_URL", f"postgresql://app:{WRONG_CORE}@db/docs")
    text = pydoc.render_doc(documented, renderer=pydoc.plaintext)
    assert "environ" in text  # the parameter is documented...
    assert WRONG_CORE not in text and "DATABASE_URL': " not in text  # ...its default is not the environment
