"""PostgreSQL operations for Python services: a pool, retries, migrations, schema checks and health.

pgops is one module on top of psycopg2.  Copy the file into a project, install it with pip, run it as
``python -m pgops`` or mount its WSGI health app.  Sections, in data-flow order:

    Errors -> Config -> Retry -> Pool -> Migrations -> Schema checks -> Health -> CLI

Everything logs to ``logging.getLogger("pgops")``; nothing here configures logging or prints, except
the CLI at the bottom.  Passwords are redacted from every repr, log line and error message.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import dataclasses
import errno
import functools
import io
import itertools
import json
import logging
import math
import os
import random
import re
import select
import selectors
import signal
import socket
import sys
import threading
import time
import traceback
import types
import weakref
from collections.abc import Callable, Container, Iterable, Iterator, Mapping, Sequence

import psycopg2
import psycopg2.errors
import psycopg2.extensions
import psycopg2.pool
import psycopg2.sql

__version__ = "0.3.0"

__all__ = [
    "BadMigration",
    "CannotConnect",
    "ChecksumMismatch",
    "CommitUnknown",
    "ConfigError",
    "DirtyDatabase",
    "HealthApp",
    "LockTimeout",
    "Migration",
    "MigrationError",
    "MigrationFailed",
    "MigrationStatus",
    "Migrator",
    "PgOpsError",
    "Pool",
    "PoolClosed",
    "PoolConfig",
    "PoolError",
    "PoolHealth",
    "PoolTimeout",
    "ReadOnlyError",
    "RetryPolicy",
    "SchemaReport",
    "ThreadedConnectionPool",
    "TooManyRequests",
    "check_schema",
    "create_app",
    "is_retryable",
    "load_migrations",
    "main",
    "make_server",
    "migration_checksum",
    "mount",
    "redact_dsn",
    "retry",
    "retry_call",
    "serve",
    "set_testing",
]

# What only the type checker needs stays out of the import every `pgops` command pays for (annotations
# are strings here): importing typing alone costs a CLI run about 5 ms. Type checkers take a
# TYPE_CHECKING of the module's own as True, as they do typing's.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, TypeVar
    from wsgiref.simple_server import WSGIServer

    _T = TypeVar("_T")
    _WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
    _Response = tuple[str, list[tuple[str, str]], bytes]
    _Sample = tuple[str, Mapping[str, str], float]  # suffix, labels, value
    _Family = tuple[str, str, str, Iterable[_Sample]]
    _regex = re.compile
else:

    def _regex(pattern, flags=0):
        return _LazyPattern(pattern, flags)


_logger = logging.getLogger("pgops")  # a fixed name: under python -m, __name__ is __main__
# Without it, an application that configures no logging gets pgops' warnings as bare stderr lines
# from Python's last-resort handler; with logging configured, records propagate as usual.
_logger.addHandler(logging.NullHandler())


class _LazyPattern:
    """A regular expression compiled when first used (``_regex``): a CLI run compiles only what it needs.

    Compiling them all at import cost every command about 3 ms, for patterns most never use. Each
    attribute (``match``, ``sub``...) is looked up on the compiled pattern once and then kept on the
    instance, so later calls cost what they cost on the pattern itself.
    """

    def __init__(self, pattern: str, flags: int) -> None:
        self._args = (pattern, flags)

    def __getattr__(self, name: str) -> Any:
        value = getattr(re.compile(*self._args), name)  # re caches: a second attribute compiles nothing
        setattr(self, name, value)
        return value

    def __repr__(self) -> str:
        return f"<lazy {re.compile(*self._args)!r}>"


# ================================================================================================
# Errors
# ================================================================================================


class PgOpsError(Exception):
    """Root of every error pgops raises on its own account."""


class ConfigError(PgOpsError, ValueError):
    """A configuration value (argument, environment variable, DSN) is invalid."""


class PoolError(PgOpsError, psycopg2.pool.PoolError):
    """A pool error; also psycopg2's PoolError, so ``except PoolError`` code keeps working."""


class PoolTimeout(PoolError):
    """No connection could be handed out within the acquire timeout."""


class PoolClosed(PoolError):
    """The pool has been closed."""


class TooManyRequests(PoolError):
    """More callers were already waiting than max_waiting allows; not retried (a retry adds to the queue)."""


class CannotConnect(PgOpsError, psycopg2.OperationalError):
    """The server refused us for a reason that waiting will not fix (authentication, missing database)."""


class CommitUnknown(PgOpsError, psycopg2.OperationalError):
    """The connection was lost during COMMIT: the transaction may or may not have been committed."""


class ReadOnlyError(PgOpsError, psycopg2.errors.ReadOnlySqlTransaction):
    """A write on a read pool (``read_only=True``, DATABASE_READ_URL); never retried."""

    pgcode = "25006"  # as the server's error said: read_only_sql_transaction


class MigrationError(PgOpsError):
    """Root of the migration errors."""


class BadMigration(MigrationError):
    """A migration file is unusable: its name, a duplicate version, its encoding or its content."""


class ChecksumMismatch(MigrationError):
    """An applied migration's file changed, or disappeared, since it was applied."""


class LockTimeout(MigrationError):
    """Another runner held the migration lock for longer than the lock timeout."""


class DirtyDatabase(MigrationError):
    """A migration failed half-way (no-transaction file); run repair before migrating again."""


class MigrationFailed(MigrationError):
    """A migration's SQL failed; the message says where (path:line:col) and why."""

    def __init__(
        self,
        message: str,
        *,
        version: int | None = None,
        path: str | None = None,
        line: int | None = None,
        column: int | None = None,
        sqlstate: str | None = None,
    ) -> None:
        super().__init__(message)
        self.version = version
        self.path = path
        self.line = line
        self.column = column
        self.sqlstate = sqlstate


# ================================================================================================
# Config
# ================================================================================================

# Where a password may sit in a DSN.  Each pattern reads it the way libpq does AND the way a person
# who forgot to quote or percent-encode it may have meant it: redaction may hide a little more than
# the password, never less.
# URL user info: libpq stops it at the first '@' or '/', so an unencoded '@', '/', '#' or '?' in a
# password splits it into host, port or database; a person meant everything up to the last '@'.
_URL_PASSWORD = _regex(r"(?P<head>^\s*[A-Za-z][A-Za-z0-9+.-]*://[^:/@]*:)(?P<pw>.*)(?=@)", re.DOTALL)
# URL query: libpq ends a value at '&' only ('#' is no fragment to it); a person who wrote '&' in a
# password meant it to go on up to the next "&key=".
_QUERY_PASSWORD = _regex(r"(?P<head>[?&]password=)(?P<pw>.*?)(?=&[^&=]*=|\Z)", re.IGNORECASE | re.DOTALL)
# key=value: a value is quoted ('...', to the end when unterminated), backslash-escaped or plain, and
# ends at whitespace; a person who wrote a space in it meant it to go on up to the next " key=".
_KV_PASSWORD = _regex(
    r"(?P<head>\bpassword\s*=\s*)"
    r"(?P<pw>(?:'(?:[^'\\]|\\.)*(?:'|\Z)|\\.|.)*?)(?=(?<!\\)\s+[A-Za-z_]\w*\s*=|\s*\Z)",
    re.IGNORECASE | re.DOTALL,
)
# A person who wrote an unbalanced quote into a password meant it up to the next " key=", not to the end.
_KV_WORDS = _regex(r"\bpassword\s*=\s*(?P<pw>.*?)(?=\s+[A-Za-z_]\w*\s*=|\s*\Z)", re.IGNORECASE | re.DOTALL)
_IS_URL = _regex(r"^\s*[A-Za-z][A-Za-z0-9+.-]*://")
_QUOTED = _regex(r"\"(?P<double>[^\"]*)\"|'(?P<single>[^']*)'")  # how libpq and repr() quote values
_CUTS = _regex(r"[\s@/:?&=,'\"\\%\[\]]+")  # where libpq may cut a password written unencoded
_MIN_PIECE = 4  # shorter pieces go only where quoted (see _scrub): "app" or "5432" is no secret alone
_KV_ESCAPE = _regex(r"\\(.)|'", re.DOTALL)


def _password_patterns(dsn: str) -> tuple[re.Pattern[str], ...]:
    return (_URL_PASSWORD, _QUERY_PASSWORD) if _IS_URL.match(dsn) else (_KV_PASSWORD,)


def _password_spans(dsn: str) -> list[tuple[int, int]]:
    """Return where in *dsn* a password may be written (see the patterns above)."""
    return [m.span("pw") for pattern in _password_patterns(dsn) for m in pattern.finditer(dsn)]


def redact_dsn(dsn: str) -> str:
    """Return *dsn* with its password replaced by ``***`` (URL and key=value forms)."""
    for pattern in _password_patterns(dsn):
        dsn = pattern.sub(r"\g<head>***", dsn)
    return dsn


def _dsn_secrets(dsn: str) -> list[str]:
    """Return the password strings of *dsn*, as written and as libpq reads them, longest first."""
    from urllib.parse import quote, unquote

    found = [dsn[start:end] for start, end in _password_spans(dsn)]
    if not _IS_URL.match(dsn):
        found += [m.group("pw") for m in _KV_WORDS.finditer(dsn)]
    # As libpq reads them: URL-decoded, or unquoted and unescaped; and exactly what libpq took.
    found += [unquote(s) for s in found] + [_KV_ESCAPE.sub(lambda m: m.group(1) or "", s) for s in found]
    with contextlib.suppress(psycopg2.ProgrammingError, UnicodeDecodeError):
        found.append(psycopg2.extensions.parse_dsn(dsn).get("password") or "")
    found += [quote(s, safe="") for s in found]  # and URL-encoded, as a URL built from them holds them
    # libpq may cut an unencoded password at these characters into a host, a port, a database or a
    # parameter and quote one piece in an error (possibly with a quote mark inside): each longer
    # piece is a secret of its own.
    found += [piece for s in found for piece in _CUTS.split(s) if len(piece) >= _MIN_PIECE]
    return sorted({s for s in found if len(s) >= 2}, key=len, reverse=True)


def _scrub(text: str | BaseException, dsn: str = "", *, body: bool = False) -> str:
    """Return *text*, or an error's message, as one line without any piece of *dsn*'s password.

    The one scrubber of every log line, error message and response body.  Each password string goes
    (see _dsn_secrets), and so does a shorter quoted value (libpq quotes the host, port or token it
    complains about) when it overlaps where the DSN may hold a password.  *body* makes it fit for an
    HTTP response: no DSN at all (not even redacted), an error's type in front, 500 characters of text.
    """
    scrubbed = str(text)
    spans = _password_spans(dsn)
    secrets = _dsn_secrets(dsn) if spans else []

    def in_password(value: str) -> bool:
        if any(value in secret for secret in secrets):
            return True
        start = dsn.find(value)
        while start >= 0:
            if any(start < end and begin < start + len(value) for begin, end in spans):
                return True
            start = dsn.find(value, start + 1)
        return False

    def hide(match: re.Match[str]) -> str:
        value = match.group("double") if match.group("double") is not None else match.group("single")
        quote = match.group(0)[0]
        return f"{quote}***{quote}" if value and in_password(value) else match.group(0)

    for secret in secrets:  # whole strings first: hiding a quoted piece could break one up
        scrubbed = scrubbed.replace(secret, "***")
    scrubbed = _QUOTED.sub(hide, scrubbed)
    if body and dsn:
        redacted = redact_dsn(dsn)
        for form in (repr(redacted), redacted, dsn):
            scrubbed = scrubbed.replace(form, "<dsn>")
    line = " ".join(scrubbed.split())
    if body:
        line = line[:500]
    if not isinstance(text, BaseException):
        return line
    return f"{type(text).__name__}: {line}" if body else line or type(text).__name__


def _check_dsn(dsn: str, what: str = "dsn") -> None:
    """Raise ConfigError unless libpq can parse *dsn* (called *what* in messages)."""
    if not isinstance(dsn, str) or not dsn.strip():
        raise ConfigError(f"{what} is empty; pass a libpq URL such as postgresql://user@host/dbname")
    problem: str | None = None
    try:
        params = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError as exc:
        problem = _scrub(exc, dsn)
    except UnicodeDecodeError:  # a %XX escape decoded to bytes psycopg2 cannot read back as text
        problem = "a percent-encoded value does not decode to UTF-8"
    # Raised here, not in the except block: a __context__ would carry libpq's text, which may quote
    # the password.
    if problem is not None:
        raise ConfigError(
            f"{what} {redact_dsn(dsn)!r} is not a valid libpq URL or key=value string: {problem}"
        )
    # libpq parses but does not check ports until it connects, and then the error looks transient.
    for port in str(params.get("port", "")).split(","):
        port = port.strip()
        if port and not (re.fullmatch(r"[0-9]{1,5}", port) and 1 <= int(port) <= 65535):
            shown = _scrub(repr(port), dsn)
            hint = "" if shown == repr(port) else "; write / and @ in a URL password as %2F and %40"
            raise ConfigError(f"{what} {redact_dsn(dsn)!r} has port {shown}; a port is 1 to 65535{hint}")


# Keywords of psycopg2.connect() that are not libpq parameters, and where each belongs instead.
_NOT_LIBPQ = {
    "dsn": "pass the DSN as dsn",
    "connection_factory": "pass it as connection_factory",
    "cursor_factory": "pass it as cursor_factory",
    "async": "an asynchronous connection cannot be pooled",
    "async_": "an asynchronous connection cannot be pooled",
}
# libpq parameters that say which server and database to reach: a read pool's come from read_dsn.
_ADDRESS = frozenset({"host", "hostaddr", "port", "dbname", "service"})
# psycopg2's isolation levels by name, as set_session() takes them.
_ISOLATION_LEVELS = {
    "READ UNCOMMITTED": psycopg2.extensions.ISOLATION_LEVEL_READ_UNCOMMITTED,
    "READ COMMITTED": psycopg2.extensions.ISOLATION_LEVEL_READ_COMMITTED,
    "REPEATABLE READ": psycopg2.extensions.ISOLATION_LEVEL_REPEATABLE_READ,
    "SERIALIZABLE": psycopg2.extensions.ISOLATION_LEVEL_SERIALIZABLE,
}


def _merge_dsn(dsn: str | None, kwargs: Mapping[str, Any], what: str) -> str:
    """Merge libpq keyword arguments into *dsn* as psycopg2.connect() does; ConfigError if libpq balks."""
    problem: str | None = None
    try:
        return str(psycopg2.extensions.make_dsn(dsn, **kwargs))
    except psycopg2.ProgrammingError as exc:
        problem = _scrub(exc, psycopg2.extensions.make_dsn(password=kwargs.get("password", "")))
    raise ConfigError(f"{what}: {problem}")  # outside the except block: no __context__ with libpq's text


def _isolation_level(value: object) -> int | None:
    """Return psycopg2's number for an isolation level given by number or name (None: the server's)."""
    if value is None or (isinstance(value, str) and value.strip().upper() == "DEFAULT"):
        return None
    if isinstance(value, str) and " ".join(value.upper().split()) in _ISOLATION_LEVELS:
        return _ISOLATION_LEVELS[" ".join(value.upper().split())]
    if isinstance(value, int) and not isinstance(value, bool) and value in _ISOLATION_LEVELS.values():
        return value
    hint = "; for autocommit pass autocommit=True" if value == 0 else ""
    raise ConfigError(
        f"isolation_level={value!r} is not an isolation level; use 'READ COMMITTED', "
        f"'REPEATABLE READ', 'SERIALIZABLE' or psycopg2.extensions.ISOLATION_LEVEL_*{hint}"
    )


# Preset numbers come from the original Doc Server, for these fields:
_PRESET_FIELDS = (
    "min_size",
    "max_size",
    "acquire_timeout",
    "max_lifetime",
    "idle_timeout",
    "test_before_acquire",
)
_PRESETS: dict[str, tuple[int, int, float, float, float, bool]] = {
    "development": (2, 10, 10.0, 1800.0, 300.0, True),
    "production": (5, 100, 30.0, 3600.0, 600.0, True),
    "high_traffic": (10, 200, 30.0, 3600.0, 300.0, True),
    "testing": (1, 5, 5.0, 300.0, 60.0, False),
}


@dataclasses.dataclass(frozen=True, repr=False)
class PoolConfig:
    """Settings of a Pool; times in float seconds, 0 turns a limit off."""

    dsn: str
    min_size: int = 5
    max_size: int = 100
    acquire_timeout: float = 30.0
    max_lifetime: float = 3600.0
    idle_timeout: float = 600.0
    test_before_acquire: bool = True
    application_name: str = "pgops"
    max_waiting: int = 0
    leak_threshold: float = 0.0
    monitor_interval: float = 60.0
    register_vector: bool = True
    connect_timeout: float = 5.0
    name: str = "default"
    read_dsn: str = ""
    read_only: bool = False
    max_replica_lag: float = 30.0
    configure: Callable[[psycopg2.extensions.connection], object] | None = None
    reset: Callable[[psycopg2.extensions.connection], object] | None = None
    autocommit: bool = False
    isolation_level: int | str | None = None
    connect_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)
    connection_factory: type[psycopg2.extensions.connection] | None = None
    cursor_factory: type[psycopg2.extensions.cursor] | None = None
    # The dsn with connect_kwargs merged in: what pools connect to, and what messages are scrubbed of.
    _conninfo: str = dataclasses.field(init=False, repr=False, compare=False, default="")
    # from_env's environment variable of each field it read, which a message about the value names.
    _names: dataclasses.InitVar[Mapping[str, str]] = types.MappingProxyType({})

    def __post_init__(self, _names: Mapping[str, str]) -> None:
        def name(field: str) -> str:
            return _names.get(field, field)

        _check_dsn(self.dsn, name("dsn"))
        self._check_connections()
        if self.read_dsn:
            _check_dsn(self.read_dsn, name("read_dsn"))
            if self.read_only:
                raise ConfigError(
                    f"{name('read_dsn')} is for a primary pool, which opens its read pool from it; "
                    "a read_only pool connects to its dsn"
                )
        if not isinstance(self.name, str) or not self.name.strip() or not self.name.isprintable():
            raise ConfigError(f"name={self.name!r} is not a pool name; use a short word such as 'default'")
        _check_int(name("min_size"), self.min_size, minimum=0)
        _check_int(name("max_size"), self.max_size, minimum=1)
        _check_int(name("max_waiting"), self.max_waiting, minimum=0)
        if self.min_size > self.max_size:
            low, high = name("min_size"), name("max_size")
            raise ConfigError(
                f"{low}={self.min_size!r} is greater than {high}={self.max_size!r}; "
                f"raise {high} or lower {low}"
            )
        _check_seconds(name("acquire_timeout"), self.acquire_timeout, positive=True)
        _check_seconds("connect_timeout", self.connect_timeout, positive=True)
        for f in ("max_lifetime", "idle_timeout", "leak_threshold", "monitor_interval", "max_replica_lag"):
            _check_seconds(name(f), getattr(self, f), positive=False)
        if not isinstance(self.application_name, str):
            raise ConfigError(f"application_name={self.application_name!r} is not a string")

    def _check_connections(self) -> None:
        """Check what shapes each connection (hooks, defaults, kwargs, factories) and merge the kwargs."""
        for hook in ("configure", "reset"):
            if getattr(self, hook) is not None and not callable(getattr(self, hook)):
                raise ConfigError(f"{hook}={getattr(self, hook)!r} is not callable; pass f(conn)")
        if not isinstance(self.autocommit, bool):
            raise ConfigError(f"autocommit={self.autocommit!r} is not True or False")
        level = _isolation_level(self.isolation_level)
        if level is not None and self.autocommit:
            raise ConfigError(
                f"isolation_level={self.isolation_level!r} with autocommit=True: an isolation level "
                "applies to transactions, and in autocommit each statement is its own; drop one of them"
            )
        object.__setattr__(self, "isolation_level", level)
        for field, base in (
            ("connection_factory", psycopg2.extensions.connection),
            ("cursor_factory", psycopg2.extensions.cursor),
        ):
            value = getattr(self, field)
            if value is not None and not (isinstance(value, type) and issubclass(value, base)):
                raise ConfigError(f"{field}={value!r} is not a subclass of {base.__module__}.{base.__name__}")
        kwargs = self.connect_kwargs
        if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
            raise ConfigError(f"connect_kwargs must map libpq parameter names to values, not {kwargs!r}")
        for key in kwargs:
            if key in _NOT_LIBPQ:
                raise ConfigError(f"connect_kwargs has {key!r}; {_NOT_LIBPQ[key]}")
        object.__setattr__(self, "connect_kwargs", types.MappingProxyType(dict(kwargs)))
        conninfo = self.dsn
        if kwargs:
            conninfo = _merge_dsn(self.dsn, kwargs, "connect_kwargs are not libpq parameters")
            _check_dsn(conninfo, "dsn with connect_kwargs")
        object.__setattr__(self, "_conninfo", conninfo)  # the dsn with connect_kwargs: what connects

    def __repr__(self) -> str:
        def shown(field: str) -> str:
            value = getattr(self, field)
            if field == "connect_kwargs":
                value = {k: "***" if k == "password" else v for k, v in value.items()}
            return f"{field}={redact_dsn(value) if field.endswith('dsn') else value!r}"

        fields = [f.name for f in dataclasses.fields(self) if f.init]
        return f"PoolConfig({', '.join(shown(name) for name in fields)})"

    __str__ = __repr__

    @classmethod
    def preset(cls, name: str, *, dsn: str, **overrides: Any) -> PoolConfig:
        """Return the named preset (development, production, high_traffic, testing) for *dsn*."""
        if name not in _PRESETS:
            raise ConfigError(f"unknown pool preset {name!r}; use one of {', '.join(_PRESETS)}")
        return cls(dsn=dsn, **{**dict(zip(_PRESET_FIELDS, _PRESETS[name], strict=True)), **overrides})

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> PoolConfig:
        """Build a config from DATABASE_URL, DATABASE_READ_URL, POOL_* and APP_NAME (default os.environ)."""
        environ = os.environ if environ is None else environ
        overrides = {k: v for k, v in overrides.items() if k != "dsn" or v}  # a blank dsn: DATABASE_URL's
        # What an operator must fix first is named first: the URL, the preset, then the numbers.
        if not (overrides.get("dsn") or environ.get("DATABASE_URL", "").strip()):
            raise ConfigError(
                "DATABASE_URL is not set; set it to a libpq URL such as postgresql://user@host/db"
            )
        preset = environ.get("POOL_PRESET", "production").strip() or "production"
        if preset not in _PRESETS:
            raise ConfigError(f"POOL_PRESET={preset!r} is not a preset; use one of {', '.join(_PRESETS)}")
        return cls.preset(preset, **_env_values(cls, environ, overrides))


def _env_values(cls: type[Any], environ: Mapping[str, str], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Return the fields of *cls* that _ENV_VARIABLES sets from *environ*, then *overrides*.

    Each parser names its variable in its error; under ``_names`` go the variables of the fields not
    overridden, so that the config's own checks (a range, min <= max) name what an operator sets.
    """
    fields = {f.name for f in dataclasses.fields(cls)}
    table = [(var, field, parse) for var, field, parse in _ENV_VARIABLES if field in fields]
    values: dict[str, Any] = {}
    for var, field, parse in table:
        raw = environ.get(var)
        if raw is not None and raw.strip():
            values[field] = parse(var, raw)
    names = {field: var for var, field, _ in table if field not in overrides}
    return {**values, **overrides, "_names": names}


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} is not an integer")
    if value < minimum:
        raise ConfigError(f"{name}={value!r} must be at least {minimum}")


def _check_seconds(name: str, value: object, *, positive: bool) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ConfigError(f"{name}={value!r} is not a finite number of seconds")
    if value < 0 or (positive and value == 0):
        raise ConfigError(f"{name}={value!r} must be {'greater than 0' if positive else 'at least 0'}")


def _env_text(var: str, raw: str) -> str:
    return raw.strip()


def _env_int(var: str, raw: str) -> int:
    try:
        return int(raw.strip())
    except ValueError:
        raise ConfigError(f"{var}={raw!r} is not an integer") from None


def _env_float(var: str, raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ConfigError(f"{var}={raw!r} is not a number") from None
    if not math.isfinite(value):
        raise ConfigError(f"{var}={raw!r} is not a finite number")
    return value


def _env_bool(var: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{var}={raw!r} is not a boolean; use true/false, 1/0 or yes/no")


# What from_env reads: each environment variable, the PoolConfig or RetryPolicy field it sets, and
# the parser of its text.
_ENV_VARIABLES: tuple[tuple[str, str, Callable[[str, str], Any]], ...] = (
    ("DATABASE_URL", "dsn", _env_text),
    ("DATABASE_READ_URL", "read_dsn", _env_text),
    ("APP_NAME", "application_name", _env_text),
    ("POOL_MIN_CONNECTIONS", "min_size", _env_int),
    ("POOL_MAX_CONNECTIONS", "max_size", _env_int),
    ("POOL_ACQUIRE_TIMEOUT", "acquire_timeout", _env_float),
    ("POOL_MAX_LIFETIME", "max_lifetime", _env_float),
    ("POOL_IDLE_TIMEOUT", "idle_timeout", _env_float),
    ("POOL_MAX_REPLICA_LAG", "max_replica_lag", _env_float),
    ("POOL_MAX_WAITING", "max_waiting", _env_int),
    ("DB_RETRY_MAX_ATTEMPTS", "max_attempts", _env_int),
    ("DB_RETRY_INITIAL_DELAY", "initial_delay", _env_float),
    ("DB_RETRY_MAX_DELAY", "max_delay", _env_float),
    ("DB_RETRY_MULTIPLIER", "multiplier", _env_float),
    ("DB_RETRY_JITTER", "jitter", _env_bool),
)


# ================================================================================================
# Retry
# ================================================================================================

_RETRY_SQLSTATES = frozenset({"40001", "40P01", "53300", "55P03", "57P01", "57P02", "57P03", "25006"})
# Connect-time errors carry no SQLSTATE in psycopg2, so these are recognised by libpq's words.
_FATAL_CONNECT = _regex(
    r"password authentication failed|authentication failed|no password supplied|"
    # The server quotes the name ("no such db"), so a name may hold spaces.
    r'no pg_hba\.conf entry|(?:role|database) (?:".*"|\S+) does not exist|'
    r"password is required|SSL required|certificate|"
    r"invalid \S+ value|invalid port number|invalid connection option",  # libpq rejecting a DSN option
    re.IGNORECASE,
)
_testing = False


def set_testing(enabled: bool = True) -> contextlib.AbstractContextManager[Any]:
    """Make every retry delay zero (for a project's own test suite); attempts stay as configured.

    It takes effect at once; as ``with set_testing():`` (like stamina's) the block's end undoes it.
    """
    global _testing
    previous, _testing = _testing, enabled
    restore = contextlib.ExitStack()  # nothing runs unless it is entered and left
    restore.callback(set_testing, previous)
    return restore


@dataclasses.dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how patiently to retry: total attempts, capped exponential delays, full jitter."""

    max_attempts: int = 5
    initial_delay: float = 1.0
    max_delay: float = 30.0
    multiplier: float = 2.0
    jitter: bool = True
    deadline: float | None = None
    # from_env's environment variable of each field it read, which a message about the value names.
    _names: dataclasses.InitVar[Mapping[str, str]] = types.MappingProxyType({})

    def __post_init__(self, _names: Mapping[str, str]) -> None:
        _check_int(_names.get("max_attempts", "max_attempts"), self.max_attempts, minimum=1)
        _check_seconds(_names.get("initial_delay", "initial_delay"), self.initial_delay, positive=False)
        _check_seconds(_names.get("max_delay", "max_delay"), self.max_delay, positive=False)
        multiplier = self.multiplier
        if not (isinstance(multiplier, (int, float)) and math.isfinite(multiplier) and multiplier >= 1):
            name = _names.get("multiplier", "multiplier")
            raise ConfigError(f"{name}={self.multiplier!r} must be a finite number of at least 1")
        if self.deadline is not None:
            _check_seconds("deadline", self.deadline, positive=True)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> RetryPolicy:
        """Build a policy from DB_RETRY_* (*environ*: default os.environ); a bad value names the variable."""
        environ = os.environ if environ is None else environ
        return cls(**_env_values(cls, environ, overrides))

    def backoff(self, retry_number: int, rand: Callable[[], float] = random.random) -> float:
        """Return the sleep before retry *retry_number* (0-based): capped exponential, full jitter."""
        # Guard the power against overflow: past the cap the exponent no longer matters.
        exponent = min(retry_number, 1024)
        try:
            ceiling = min(self.max_delay, self.initial_delay * self.multiplier**exponent)
        except OverflowError:
            ceiling = self.max_delay
        return ceiling * rand() if self.jitter else ceiling

    def delays(self, rand: Callable[[], float] = random.random) -> Iterator[float]:
        """Yield the max_attempts - 1 sleeps between attempts."""
        for n in range(self.max_attempts - 1):
            yield self.backoff(n, rand)


def _sqlstate(exc: BaseException) -> str | None:
    code = getattr(exc, "pgcode", None)
    return code if isinstance(code, str) and code else None


def is_retryable(exc: BaseException) -> bool:
    """Tell whether retrying the operation that raised *exc* can succeed (SQLSTATE-aware)."""
    if isinstance(exc, (CannotConnect, CommitUnknown, ReadOnlyError, TooManyRequests)):
        return False
    if isinstance(exc, PoolTimeout):
        # The pool already waited; another attempt after a backoff may find the server back.
        return True
    code = _sqlstate(exc)
    if code is not None:
        if code.startswith("08"):
            return code != "08007"  # transaction_resolution_unknown: the commit may have happened
        return code in _RETRY_SQLSTATES
    if isinstance(exc, psycopg2.OperationalError):
        return not _FATAL_CONNECT.search(str(exc))
    # "connection already closed" from a connection the server dropped earlier.
    return isinstance(exc, psycopg2.InterfaceError)


def retry_call(
    fn: Callable[..., _T],
    /,
    *args: Any,
    policy: RetryPolicy | None = None,
    sleep: Callable[[float], None] = time.sleep,
    retry_on: Callable[[BaseException], bool] = is_retryable,
    clock: Callable[[], float] = time.monotonic,
    rand: Callable[[], float] = random.random,
    **kwargs: Any,
) -> _T:
    """Call ``fn(*args, **kwargs)``, retrying retryable errors; the last error is re-raised unchanged.

    *fn* is positional-only, so any keyword but the options (``fn`` too) is passed on to it.
    """
    policy = policy or RetryPolicy()
    start = clock()
    attempt = 1
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if attempt >= policy.max_attempts or not retry_on(exc):
                raise
            delay = 0.0 if _testing else policy.backoff(attempt - 1, rand)
            if policy.deadline is not None and clock() - start + delay >= policy.deadline:
                raise
            _logger.warning(
                "retrying %s after attempt %d of %d failed (sqlstate %s: %s); sleeping %.3f s",
                getattr(fn, "__qualname__", "call"),
                attempt,
                policy.max_attempts,
                _sqlstate(exc) or getattr(exc, "sqlstate", None) or "none",
                _scrub(exc)[:200],
                delay,
            )
            sleep(delay)
            attempt += 1


def retry(
    policy: RetryPolicy | None = None, **options: Any
) -> Callable[[Callable[..., _T]], Callable[..., _T]]:
    """Decorate a function so that calls to it go through retry_call with *policy*."""

    def decorate(fn: Callable[..., _T]) -> Callable[..., _T]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> _T:
            call = functools.update_wrapper(functools.partial(fn, *args, **kwargs), fn)
            return retry_call(call, policy=policy, **options)

        return wrapper

    return decorate


# ================================================================================================
# Pool
# ================================================================================================

_RECENTLY_USED = 0.5  # seconds: a connection used this recently is handed out without a check
_RECONNECT_FIRST_DELAY = 0.05
_RECONNECT_MAX_DELAY = 0.5  # keeps the pool back within a second of the server accepting again
_LIFETIME_JITTER = 0.1  # connections expire up to 10% early so that they do not all expire at once
_HEALTH_WINDOW = 60.0  # seconds of query counts that health() judges the success rate on
_HEALTH_MIN_QUERIES = 20
_TICK_MIN, _TICK_MAX = 0.05, 1.0  # seconds between the worker's maintenance rounds (see Pool._tick)
_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# A validation check gets at least this long, so that a caller whose wait left almost no time does not
# cut off, and throw away, a healthy connection; getconn may overrun its timeout by about this much.
_CHECK_MIN_TIME = 0.25
# libpq connection defaults (unless the DSN sets them) so that the kernel notices a peer that is gone
# (a partition, a host that died) within about a minute: keepalive probes after 30 s idle, and data
# the server has not acknowledged for 30 s ends the connection.  They cannot notice a path whose far
# side keeps acknowledging (a stalled proxy): the watchdog bounds the pool's own checks for that.
_TCP_DEFAULTS = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,  # milliseconds
}

# What pgops asks a new connection, in one round trip: whether a pooler stands between (its made-up
# backend pid differs from the server's), and whether the server takes writes.
_PROBE = "SELECT pg_backend_pid(), pg_is_in_recovery(), current_setting('transaction_read_only') = 'on'"
# Asked of a connection whose server may have stopped taking writes (see Pool._writable_before).
_WRITABLE = "SELECT current_setting('transaction_read_only') = 'off'"
# The server's WAL position: what a standby has replayed, or what a primary has written.
_WAL_POSITION = (
    "CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_insert_lsn() END"
)
_READ_ONLY_SQLSTATE = "25006"  # read_only_sql_transaction: also what a standby answers to a write
_READ_ONLY_WAIT = (0.002, 0.05)  # first and longest pause while a replica catches up with a token
_READ_ONLY_QUIET = 10.0  # seconds: one warning per episode of connections discarded as read-only
_NUDGE_EVERY = 1.0  # seconds between connection attempts of a read pool that reads turn away from
_READ_ONLY_RECHECK = 2.0  # seconds between asking a read-only server of a write pool if it takes writes
# Why a connection was discarded, counted as connections_<why>, and the warning that says so.
_DISCARDED = {
    "lost": "broken connection; the pool opens a new one",
    "stalled": "connection that did not answer in time (a stalled network?); the pool opens a new one",
    "read_only": "connection to a server that takes no writes (SQLSTATE 25006: a fenced or demoted primary, "
    "or a standby); checking the others and reconnecting through the DSN (with "
    "target_session_attrs=read-write libpq skips read-only servers)",
}
_LSN = _regex(r"[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}\Z")
_STATUS_IDLE = psycopg2.extensions.TRANSACTION_STATUS_IDLE
_STATUS_IN_TRANSACTION = (
    psycopg2.extensions.TRANSACTION_STATUS_INTRANS,
    psycopg2.extensions.TRANSACTION_STATUS_INERROR,
)


def _counting(base: type[psycopg2.extensions.cursor]) -> type[psycopg2.extensions.cursor]:
    """Return a subclass of the cursor class *base* that counts and times its statements.

    The counts live on the pooled connection (see _Connection).  Any cursor class can be counted
    (RealDictCursor, LoggingCursor ...): its own execute() runs inside.  One class per base.
    """
    if base in _counted:
        return _counted[base]
    # On the hot path: the base methods are bound once, and execute() has no finally block.
    base_execute, base_executemany = base.execute, base.executemany

    def execute(self: Any, query: Any, vars: Any = None) -> Any:
        conn: Any = self.connection
        start = time.perf_counter()
        try:
            result = base_execute(self, query, vars)
        except BaseException as exc:
            conn._pgops_errors += 1
            conn._pgops_queries += 1
            conn._pgops_ms += (time.perf_counter() - start) * 1000.0
            if _refused_write(exc):
                _on_refused_write(conn, exc)
            raise
        conn._pgops_queries += 1
        conn._pgops_ms += (time.perf_counter() - start) * 1000.0
        return result

    def executemany(self: Any, query: Any, vars_list: Any) -> Any:
        conn: Any = self.connection
        start = time.perf_counter()
        try:
            return base_executemany(self, query, vars_list)
        except BaseException as exc:
            conn._pgops_errors += 1
            if _refused_write(exc):
                _on_refused_write(conn, exc)
            raise
        finally:
            conn._pgops_queries += 1
            conn._pgops_ms += (time.perf_counter() - start) * 1000.0

    name = "_Cursor" if base is psycopg2.extensions.cursor else f"_Counting{base.__name__}"
    counted = type(name, (base,), {"execute": execute, "executemany": executemany, "__module__": __name__})
    return _counted.setdefault(base, counted)


_counted: dict[type[psycopg2.extensions.cursor], type[psycopg2.extensions.cursor]] = {}


_Cursor = _counting(psycopg2.extensions.cursor)  # the cursor class of pooled connections


class _Connection(psycopg2.extensions.connection):
    """A psycopg2 connection that carries the pool's bookkeeping and counts its queries."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _live_connections.add(self)  # at once: a fork from now on must find it
        self.cursor_factory = _Cursor
        now = time.monotonic()
        self._pgops_pool: Pool | None = None
        self._pgops_expires = math.inf
        self._pgops_last_used = now
        self._pgops_checked_out = now
        self._pgops_stack: list[str] | None = None
        self._pgops_lent = False
        self._pgops_queries = 0
        self._pgops_errors = 0
        self._pgops_ms = 0.0
        self._pgops_poll = _readiness(self.fileno())  # polled at each checkout for the server's goodbye
        self._pgops_guarded: Pool | None = None  # lent by this pool under _deadline() (see _lend)
        self._pgops_stalled = False  # cut off by the watchdog: never hand it out again
        self._pgops_inherited = False  # opened by the parent of this (forked) process: never touch it
        self._pgops_refused_write = False  # a statement failed with 25006: its server may take no writes
        self._pgops_read_only_server = False  # its server took no writes when it connected
        self._pgops_seen_writable = now  # when its server was last known to take writes (or examined)


class _SelectPoll:
    """select.poll's one method for one socket, made of select.select: for Windows, which has no poll().

    Windows' select() takes socket handles of any value; POSIX select() fails on descriptors past
    1024, so poll() is used wherever it exists (Linux, macOS, the BSDs).
    """

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def poll(self, timeout: float) -> list[int]:
        readable, _, _ = select.select([self._fd], [], [], timeout)
        return readable


def _readiness(fd: int) -> Any:
    """Return an object whose poll(0) tells at once whether *fd* has something to read."""
    if not hasattr(select, "poll"):
        return _SelectPoll(fd)
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return poller


def _refused_write(exc: BaseException) -> bool:
    """Tell whether *exc* says the transaction or the server takes no writes (25006, recovery)."""
    code = getattr(exc, "pgcode", None)
    return code == _READ_ONLY_SQLSTATE or (code == "55000" and "recovery is in progress" in str(exc))


def _on_refused_write(conn: _Connection, exc: BaseException) -> None:
    """Flag a connection whose write was refused, for putconn; on a read pool, say why at once."""
    pool = conn._pgops_pool or conn._pgops_guarded
    if pool is not None and pool.config.read_only:
        raise ReadOnlyError(
            f"pool {pool.config.name!r} is a read pool (read_only=True, DATABASE_READ_URL): its "
            f"transactions are READ ONLY; run writes on the primary pool ({_scrub(exc)})"
        ) from exc
    conn._pgops_refused_write = True


_CHARACTERISTICS = ("readonly", "isolation_level", "deferrable")  # psycopg2's, besides autocommit
# psycopg2's own descriptors of autocommit and the characteristics, which the classes below wrap.
_SESSION: dict[str, Any] = {
    name: vars(psycopg2.extensions.connection)[name] for name in ("autocommit", *_CHARACTERISTICS)
}


class _ReadPoolConnection(_Connection):
    """A read pool's direct connection: read-only in autocommit too.

    psycopg2 puts ``readonly`` only in BEGIN: switching autocommit on with readonly already set sends
    nothing, so autocommit statements would run READ WRITE.  Here readonly is set again once
    autocommit is on, which makes psycopg2 send ``SET default_transaction_read_only TO on`` (a
    session SET, fine on a direct connection; psycopg2 undoes it when autocommit goes off).
    """

    def _set_autocommit(self, value: bool) -> None:
        readonly = _SESSION["readonly"].__get__(self)
        if value and readonly is not None and not self.autocommit:
            _SESSION["readonly"].__set__(self, None)  # not in autocommit: nothing is sent
            _SESSION["autocommit"].__set__(self, True)
            _SESSION["readonly"].__set__(self, readonly)  # in autocommit: SET default_transaction_read_only
        else:
            _SESSION["autocommit"].__set__(self, value)

    autocommit = property(_SESSION["autocommit"].__get__, _set_autocommit)

    def set_session(self, *args: Any, **kwargs: Any) -> None:
        # psycopg2's (isolation_level, readonly, deferrable, autocommit): autocommit last, through the
        # property above, so that it sees the readonly just set.
        autocommit = kwargs.pop("autocommit", args[3] if len(args) > 3 else None)
        super().set_session(*args[:3], **kwargs)
        if autocommit is not None:
            self.autocommit = bool(autocommit)

    def set_isolation_level(self, level: Any) -> None:
        if level == psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT:
            self.autocommit = True
        else:
            super().set_isolation_level(level)


def _is_default(value: object) -> bool:
    return value is None or (isinstance(value, str) and value.lower() == "default")


def _refuse_session_set(what: str) -> PoolError:
    return PoolError(
        f"{what} on a connection through a connection pooler: psycopg2 would send a session-level "
        "SET default_transaction_..., which a transaction pooler (PgBouncer) leaves on a server "
        "connection its other clients share; keep autocommit=False for it (psycopg2 then sends "
        "BEGIN READ ONLY / ISOLATION LEVEL ...), use SET LOCAL, or connect directly"
    )


def _guarded(name: str) -> Any:
    """Return a property for psycopg2's session characteristic *name* that is refused in autocommit."""

    def set_value(conn: _BehindPooler, value: Any) -> None:
        if conn.autocommit:  # psycopg2 sends a SET for it, even for the default
            raise _refuse_session_set(f"{name}={value!r} with autocommit=True")
        _SESSION[name].__set__(conn, value)

    return property(_SESSION[name].__get__, set_value)


class _BehindPooler(_Connection):
    """A pooled connection through a connection pooler: psycopg2 must send no session-level SET.

    psycopg2 applies readonly, isolation_level and deferrable with ``SET default_transaction_...``
    while autocommit is on, and sends ``SET ... TO DEFAULT`` when autocommit goes off again.  Through
    a transaction pooler each of those runs on whichever server connection is free and stays there
    for the pooler's other clients, so here they are refused before anything is sent.  With
    autocommit off psycopg2 puts them in BEGIN, which is safe.
    """

    def _characteristics(self) -> bool:
        """Tell whether any session characteristic is set (not the server's default)."""
        return not all(_is_default(_SESSION[name].__get__(self)) for name in _CHARACTERISTICS)

    def _set_autocommit(self, value: bool) -> None:
        if value and self._characteristics():
            raise _refuse_session_set("autocommit=True with readonly, isolation_level or deferrable set")
        _SESSION["autocommit"].__set__(self, value)

    autocommit = property(_SESSION["autocommit"].__get__, _set_autocommit)

    readonly = _guarded("readonly")
    isolation_level = _guarded("isolation_level")
    deferrable = _guarded("deferrable")

    def set_session(
        self,
        isolation_level: Any = None,
        readonly: Any = None,
        deferrable: Any = None,
        autocommit: Any = None,
    ) -> None:
        in_autocommit = self.autocommit if autocommit is None else bool(autocommit)
        given = any(v is not None for v in (isolation_level, readonly, deferrable))
        if in_autocommit and (given or (autocommit and self._characteristics())):
            raise _refuse_session_set(
                "set_session() of readonly, isolation_level or deferrable in autocommit"
            )
        super().set_session(isolation_level, readonly, deferrable, autocommit)

    def set_isolation_level(self, level: Any) -> None:
        if level == psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT and self._characteristics():
            raise _refuse_session_set("set_isolation_level(ISOLATION_LEVEL_AUTOCOMMIT) with readonly set")
        super().set_isolation_level(level)


def _factory_cursor(kind: type[psycopg2.extensions.connection]) -> type[psycopg2.extensions.cursor] | None:
    """Return the default cursor class of psycopg2.extras' connection factories (in *kind*'s MRO)."""
    import psycopg2.extras as extras

    known: dict[type[psycopg2.extensions.connection], type[psycopg2.extensions.cursor]] = {
        extras.MinTimeLoggingConnection: extras.MinTimeLoggingCursor,
        extras.LoggingConnection: extras.LoggingCursor,
        extras.RealDictConnection: extras.RealDictCursor,
        extras.DictConnection: extras.DictCursor,
        extras.NamedTupleConnection: extras.NamedTupleCursor,
    }
    return next((known[base] for base in kind.__mro__ if base in known), None)


def _connection_class(
    kind: type[_Connection], factory: type[psycopg2.extensions.connection] | None
) -> type[_Connection]:
    """Return *kind* (_Connection or a variant) on top of a user's connection_factory, if any.

    One class per pair, so that a connection can change between them (``conn.__class__ = ...``).
    """
    if factory is None or issubclass(kind, factory):
        return kind
    if (kind, factory) not in _combined:
        combined = type(f"{kind.__name__}[{factory.__name__}]", (kind, factory), {"__module__": __name__})
        _combined.setdefault((kind, factory), combined)
    return _combined[kind, factory]


_combined: dict[tuple[type[_Connection], type[psycopg2.extensions.connection]], type[_Connection]] = {}


# What the pool sets back on every return, which configure() and reset() must leave alone.
_SESSION_SETTINGS = ("autocommit", "readonly", "isolation_level", "deferrable", "cursor_factory")

# Fork safety (see _after_fork_in_child): every pooled connection of this process, so that a forked
# child finds all of them, including one lent or being handed over when the fork happened; the
# pools and health apps to reset in a child; and the connections a child inherited, kept referenced
# for good because freeing one would close it (a Terminate message on the parent's session), and
# psycopg2 may wait forever there on a lock that a thread of the parent held at the fork.
_live_connections: weakref.WeakSet[_Connection] = weakref.WeakSet()
_pools: weakref.WeakSet[Pool] = weakref.WeakSet()
_health_apps: weakref.WeakSet[HealthApp] = weakref.WeakSet()
_inherited: list[_Connection] = []
_locked_for_fork: list[Pool] = []  # by _before_fork, until the fork is done
# How long a fork waits for a connection being opened, whose socket the child could not find.
_FORK_WAIT = 1.0


class _Waiter:
    """A caller queued for a connection; woken with either a connection or an error."""

    __slots__ = ("_event", "conn", "error", "start")

    def __init__(self, start: float) -> None:
        # A pre-acquired plain lock is the cheapest one-shot event in the stdlib.
        self._event = threading.Lock()
        self._event.acquire()
        self.conn: _Connection | None = None
        self.error: BaseException | None = None
        self.start = start  # when the request was made: the wait is recorded when it is served

    def wake(self) -> None:
        self._event.release()

    def wait(self, timeout: float) -> bool:
        return self._event.acquire(timeout=min(max(timeout, 0.0), threading.TIMEOUT_MAX))


class _Watchdog:
    """One thread for the whole process that cuts off connections whose deadline passes.

    Once libpq has sent a query it blocks in poll() and recv() with no timeout of its own, and a
    network path that holds traffic (rather than refusing it) keeps it there for as long as the far
    side keeps acknowledging: keepalives and tcp_user_timeout never fire.  Shutting the socket down
    from another thread makes the blocked read return at once with an error, so the caller gets an
    OperationalError and the pool discards the connection.  A guard costs a dict entry under a lock,
    and one thread serves every pool, so a bounded check needs no thread of its own.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._deadlines: dict[_Connection, float] = {}
        self._next = math.inf  # when the thread wakes next
        self._thread: threading.Thread | None = None

    def guard(self, conn: _Connection, deadline: float) -> None:
        """Cut *conn* off at *deadline* (time.monotonic()) unless release() comes first."""
        with self._cond:
            self._deadlines[conn] = deadline
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pgops-watchdog", daemon=True)
                self._thread.start()
            elif deadline < self._next:
                self._cond.notify()

    def release(self, conn: _Connection) -> bool:
        """Stop guarding *conn*; tell whether it was cut off (then it must be discarded).

        Once this returns the watchdog never touches *conn* again, so it may be closed or lent.
        """
        with self._cond:
            self._deadlines.pop(conn, None)
        return conn._pgops_stalled

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                for conn in [c for c, deadline in self._deadlines.items() if deadline <= now]:
                    del self._deadlines[conn]
                    try:
                        _cut(conn)  # under the lock: release() waits, so the socket cannot close meanwhile
                    except Exception:  # one odd connection must not end the thread that bounds them all
                        _logger.exception("could not cut off a stalled connection")
                self._next = min(self._deadlines.values(), default=math.inf)
                self._cond.wait(None if self._next == math.inf else self._next - now)


def _libpq_defaults(dsn: str, application_name: str, connect_timeout: float) -> dict[str, Any]:
    """Return the libpq parameters pgops adds to *dsn*: application_name, connect_timeout, TCP defaults.

    Only what the DSN does not set: an explicit default would override the DSN, and for
    connect_timeout also PGCONNECT_TIMEOUT, which libpq reads only for a parameter not passed.
    """
    given = psycopg2.extensions.parse_dsn(dsn)
    kwargs: dict[str, Any] = {"application_name": application_name}
    if "connect_timeout" not in given and not os.environ.get("PGCONNECT_TIMEOUT", "").strip():
        kwargs["connect_timeout"] = max(1, math.ceil(connect_timeout))
    if "service" not in given:  # a service file may set them: an explicit default would override it
        kwargs.update((k, v) for k, v in _TCP_DEFAULTS.items() if k not in given)
        if psycopg2.extensions.libpq_version() < 120000:
            kwargs.pop("tcp_user_timeout", None)  # libpq 12 added it; older ones reject the DSN
    return kwargs


def _cut(conn: _Connection) -> None:
    """Shut down *conn*'s socket, so that a read blocked on it returns, without closing the descriptor."""
    if conn.closed:
        return
    conn._pgops_stalled = True
    # shutdown() acts on the socket itself, on every system (a descriptor on POSIX, a socket handle on
    # Windows); detach() hands libpq's descriptor back unclosed, and it stays valid until the pool
    # closes the connection.  A server that ended the session just now may have left libpq without
    # one: nothing to cut then.
    try:
        sock = socket.socket(fileno=conn.fileno())
    except (OSError, psycopg2.Error):
        return
    try:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
    finally:
        sock.detach()


_watchdog = _Watchdog()


@dataclasses.dataclass(frozen=True)
class PoolHealth:
    """The pool's verdict: healthy, degraded or unhealthy, with the reasons for anything but healthy."""

    status: str
    reasons: tuple[str, ...]
    utilization: float
    success_rate: float | None


class _Checkout:
    """The context manager returned by Pool.connection(); with *conn*, for one already taken."""

    __slots__ = ("_conn", "_pool", "_timeout")

    def __init__(
        self, pool: Pool, timeout: float | None, conn: psycopg2.extensions.connection | None = None
    ) -> None:
        self._pool = pool
        self._timeout = timeout
        self._conn = conn

    def __enter__(self) -> psycopg2.extensions.connection:
        if self._conn is None:
            self._conn = self._pool._checkout(self._timeout)
        return self._conn

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        conn = self._conn
        assert conn is not None
        try:
            if exc_type is None:
                if not conn.closed:
                    try:
                        conn.commit()
                    except psycopg2.Error as error:
                        # Without a SQLSTATE, or with a lost connection's, the outcome is unknown.
                        code = _sqlstate(error)
                        if code is not None and not code.startswith(("08", "57P")):
                            raise  # a definite failure, such as a serialization failure at commit
                        raise CommitUnknown(
                            "the connection was lost during COMMIT, so the transaction may or may not "
                            f"have been committed ({_scrub(error)}); re-run it only if it is idempotent"
                        ) from error
            elif not conn.closed:
                # The original exception matters more; putconn discards a broken connection.
                with contextlib.suppress(psycopg2.Error):
                    conn.rollback()
        finally:
            self._conn = None  # a second `with` on the same object takes a connection of its own
            self._pool._return(conn)


class Pool:
    """A thread-safe connection pool that waits when busy, validates, recycles and heals."""

    def __init__(self, config: PoolConfig | str, **overrides: Any) -> None:
        if isinstance(config, str):
            config = PoolConfig(dsn=config, **overrides)
        elif overrides:
            config = dataclasses.replace(config, **overrides)
        self.config = config
        self.name = config.name
        self._connect_kwargs = _libpq_defaults(
            config._conninfo, config.application_name, config.connect_timeout
        )
        # What each lent connection is reset to on return (psycopg2's values for them).
        self._readonly: bool | None = True if config.read_only else None
        self._autocommit = config.autocommit
        self._isolation_level: int | None = config.isolation_level  # type: ignore[assignment]
        self._connection_kind = _connection_class(_Connection, config.connection_factory)
        # The counting cursor class; with a connection_factory and no cursor_factory, the factory's
        # own default cursor, found on the first connection (see _set_cursor_class).
        base = config.cursor_factory or (
            psycopg2.extensions.cursor if config.connection_factory is None else None
        )
        self._cursor_class = None if base is None else _counting(base)
        self._reset_warned = False  # a failing reset(conn) is logged at WARNING once
        # Nothing to do on a plain checkout or return beyond the common checks (see getconn, putconn).
        self._plain_lend = not config.leak_threshold
        self._plain_return = config.reset is None
        self._closed = False
        self._start()
        self._start_worker()
        _pools.add(self)
        _logger.info(
            "pool %r started for %s (min %d, max %d%s)",
            self.name,
            redact_dsn(config.dsn),
            config.min_size,
            config.max_size,
            ", read only" if config.read_only else "",
        )
        # The read pool of DATABASE_READ_URL, on standbys: see read_connection().
        self.replica: Pool | None = None
        if config.read_dsn:
            # connect_kwargs that read_dsn sets itself, or that say which server to reach, stay the
            # primary's.  Reads run in READ ONLY transactions at the server's isolation level: a
            # standby refuses SERIALIZABLE, and a pooler refuses read-only autocommit.
            given = psycopg2.extensions.parse_dsn(config.read_dsn)
            kwargs = {k: v for k, v in config.connect_kwargs.items() if k not in given and k not in _ADDRESS}
            self.replica = Pool(
                config,
                dsn=config.read_dsn,
                read_dsn="",
                read_only=True,
                name=f"{config.name}-read",
                connect_kwargs=kwargs,
                autocommit=False,
                isolation_level=None,
            )

    def _start(self) -> None:
        """Set up an empty pool: fresh locks, counters and a worker not yet started (also after a fork)."""
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)  # the worker sleeps on it
        self._changed = threading.Condition(self._lock)  # wait() sleeps on it
        self._idle: collections.deque[_Connection] = collections.deque()
        self._waiters: collections.deque[_Waiter] = collections.deque()
        self._in_use: set[_Connection] = set()
        self._size = 0  # open connections plus the one being opened
        self._connecting = False  # the worker is opening a connection (see _before_fork)
        self._bounds: dict[int, float] = {}  # thread ident -> deadline, set by _deadline()
        self._fatal: CannotConnect | None = None
        self._last_error: str | None = None
        self._failures = 0
        self._outage_started = 0.0
        self._suspect_before = 0.0  # idle connections last used before this are checked first
        # Connections whose server was not known to take writes at this time are asked before they are
        # lent: set when one was discarded because its server stopped taking writes (its siblings may
        # point there too), and every _READ_ONLY_RECHECK seconds while the pool is on a read-only server.
        self._writable_before = -math.inf
        self._read_only_reason: str | None = None  # a pool for writes connected to a read-only server
        self._read_only_warned = -math.inf  # when a discard as read-only was last logged as a warning
        self._nudged = False  # the worker is to try one connection though nobody waits (see _nudge)
        self._last_nudge = -math.inf
        self._counters = dict.fromkeys(
            (
                "requests_num",
                "requests_queued",
                "requests_errors",
                "returns_bad",
                "returns_rolled_back",
                "connections_num",
                "connections_errors",
                "connections_lost",
                "connections_stalled",
                "connections_read_only",
                "queries_num",
                "queries_errors",
            ),
            0,
        )
        self._times = dict.fromkeys(("requests_wait_ms", "connections_ms", "usage_ms", "queries_ms"), 0.0)
        self._wait_counts = [0] * (len(_WAIT_BUCKETS) + 1)
        self._wait_sum = 0.0
        # (time, queries, errors) samples; the first is the baseline health() counts from.
        self._window = collections.deque([(time.monotonic(), 0, 0)])
        if self.config.read_only:
            self._counters.update(reads_waited=0, reads_fallback=0)  # see read_connection()
        name = f"pgops-pool-{self.config.name}"
        self._worker = threading.Thread(target=self._run_worker, name=name, daemon=True)

    def _start_worker(self) -> None:
        """Start the worker unless it runs or the pool is closed (lock held, or before sharing the pool)."""
        if not self._closed and self._worker.ident is None:
            self._worker.start()

    def __repr__(self) -> str:
        return (
            f"<Pool {self.name!r} {redact_dsn(self.config.dsn)!r} size={self._size} idle={len(self._idle)} "
            f"in_use={len(self._in_use)} waiting={len(self._waiters)}{' closed' if self._closed else ''}>"
        )

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        """Tell whether close() has been called."""
        return self._closed

    # -- checkout ------------------------------------------------------------------------------

    def connection(
        self, timeout: float | None = None
    ) -> contextlib.AbstractContextManager[psycopg2.extensions.connection]:
        """Lend a connection for a ``with`` block: commit on clean exit, roll back on error, return it."""
        return _Checkout(self, timeout)

    def run(
        self,
        fn: Callable[[psycopg2.extensions.connection], _T],
        *,
        retry: RetryPolicy | None = None,
        idempotent: bool = False,
    ) -> _T:
        """Run ``fn(conn)`` in a transaction; with *retry*, re-run the whole transaction on retryable errors.

        A connection lost during COMMIT raises CommitUnknown: the transaction may have been committed,
        so it is re-run only when the caller says it is *idempotent*.
        """

        def attempt() -> _T:
            with self.connection() as conn:
                return fn(conn)

        def retryable(exc: BaseException) -> bool:
            return is_retryable(exc) or (idempotent and isinstance(exc, CommitUnknown))

        attempt.__qualname__ = getattr(fn, "__qualname__", "transaction")
        return attempt() if retry is None else retry_call(attempt, policy=retry, retry_on=retryable)

    @contextlib.contextmanager
    def read_connection(
        self, after: str | None = None, *, timeout: float | None = None, wait: float = 1.0
    ) -> Iterator[psycopg2.extensions.connection]:
        """Lend a connection for reads: from the read pool (``replica``) when there is one, else this pool.

        With *after*, a token from current_lsn() taken after a write committed, the read sees that
        write: the replica's connection is lent once its server has replayed the token, waiting up to
        *wait* seconds; if it has not, or the read pool cannot reach its server, a connection of this
        (primary) pool is lent instead.  On a standalone read pool (``read_only=True``) there is no
        primary to turn to: a token not replayed in time raises PoolTimeout.
        """
        if after is not None and not (isinstance(after, str) and _LSN.match(after)):
            raise ConfigError(
                f"after={after!r} is not a WAL position such as '0/16B3748'; pass current_lsn()"
            )
        _check_seconds("wait", wait, positive=False)
        reads = self.replica or (self if self.config.read_only else None)
        conn = None if reads is None else self._read_from(reads, after, timeout, wait)
        checkout = (
            self.connection(timeout) if reads is None or conn is None else _Checkout(reads, timeout, conn)
        )
        with checkout as lent:
            yield lent

    def _read_from(
        self, reads: Pool, after: str | None, timeout: float | None, wait: float
    ) -> _Connection | None:
        """Take a connection of the read pool *reads* whose server has replayed *after*, or None.

        None means: read on this (primary) pool instead.  With a primary to turn to, the read pool is
        given at most its connect_timeout to lend a connection, and none while it cannot connect.
        """
        fallback = reads is not self  # a primary to turn to
        if fallback and reads._unreachable():
            reads._nudge()
            reads._count_fallback("cannot reach its server")
            return None
        if fallback:
            # Not the caller's whole time: the primary can answer meanwhile.
            limit = reads.config.connect_timeout
            timeout = min(limit, reads.config.acquire_timeout if timeout is None else timeout)
        try:
            conn: _Connection = reads._checkout(timeout)  # type: ignore[assignment]
        except (PoolTimeout, CannotConnect) as exc:
            if not fallback:
                raise
            reads._count_fallback(_scrub(exc, reads.config._conninfo))
            return None
        if after is None:
            return conn
        try:
            problem = reads._replay_problem(conn, after, wait)
        except BaseException:
            reads._return(conn)
            raise
        if problem is None:
            return conn
        reads._return(conn)  # a broken or cut-off connection is discarded there
        if not fallback:
            raise problem
        reads._count_fallback(_scrub(problem, reads.config._conninfo))
        return None

    def _replay_problem(self, conn: _Connection, lsn: str, wait: float) -> BaseException | None:
        """Wait for *conn*'s server to replay *lsn*; return None once it has, else the error saying why not.

        Bounded like the pool's own checks: on a network that stalls the watchdog cuts *conn* off.
        """
        _watchdog.guard(conn, time.monotonic() + wait + self.config.connect_timeout)
        try:
            replayed = self._replayed(conn, lsn, wait)
        except psycopg2.Error as exc:
            return exc
        finally:
            stalled = _watchdog.release(conn)
        if stalled:  # cut off just after it answered: unusable all the same
            return psycopg2.OperationalError(f"pool {self.name!r}: its server did not answer in time")
        if replayed:
            return None
        return PoolTimeout(
            f"pool {self.name!r}: its server has not replayed {lsn} after wait={wait:g} s; "
            "read from the primary pool (the one with read_dsn), which turns to the primary then"
        )

    def _unreachable(self) -> bool:
        """Tell whether the pool has no connection and its last attempt to open one failed."""
        with self._lock:
            return self._failures > 0 and not self._idle and not self._in_use

    def _nudge(self) -> None:
        """Have the worker try to open one connection, at most once a second, though nobody waits.

        Reads turned away from an unreachable read pool never queue in it, so without this a read pool
        with min_size=0, or one that met a fatal error, would never try its server again.
        """
        with self._lock:
            now = time.monotonic()
            if now - self._last_nudge < _NUDGE_EVERY or self._closed:
                return
            self._last_nudge = now
            self._nudged = True
            self._start_worker()
            self._wakeup.notify()

    def _count_fallback(self, why: str) -> None:
        with self._lock:
            self._counters["reads_fallback"] += 1
        _logger.debug("pool %r: reading on the primary instead: %s", self.name, why)

    def current_lsn(self) -> str:
        """Return the server's WAL position now: after a write commits, a token for read_connection()."""
        with self.connection() as conn:
            row = _fetch_one(conn, f"SELECT ({_WAL_POSITION})::text, current_setting('wal_block_size')::int")
        return _page_start(row[0], row[1]) if row and row[0] else "0/0"

    def _replayed(self, conn: _Connection, lsn: str, wait: float) -> bool:
        """Tell whether *conn*'s server has replayed *lsn* (or is a primary past it), waiting up to *wait* s.

        On a direct connection it asks in autocommit and lends the connection with no transaction
        open: replay only moves forward, so whatever the caller runs next sees the write.  Through
        a pooler the question opens the caller's transaction, so that the answer and the reads come
        from the same server connection.
        """
        query = f"SELECT {_WAL_POSITION} >= '{lsn}'::pg_lsn"  # lsn matched _LSN
        ask = _fetch_one if isinstance(conn, _BehindPooler) else _autocommit_query
        deadline = time.monotonic() + wait
        pause, longest = _READ_ONLY_WAIT
        waited = False
        while True:
            row = ask(conn, query)
            if row and row[0]:
                with self._lock:
                    self._counters["reads_waited"] += waited
                return True
            conn.rollback()
            if time.monotonic() + pause > deadline:
                return False
            waited = True
            time.sleep(pause)
            pause = min(2 * pause, longest)

    def getconn(self, timeout: float | None = None) -> psycopg2.extensions.connection:
        """Take a connection, waiting up to *timeout* (default acquire_timeout) for one to be free.

        Give it back with putconn(); ``with pool.connection()`` does both, and commits.
        """
        start = time.monotonic()
        first = True
        while True:
            conn = self._take(start, timeout, first)
            first = False
            now = time.monotonic()
            # The plainest case inline (every cycle of a busy pool): a connection given back less than
            # _RECENTLY_USED ago, nothing to watch for, and a quiet socket.  Anything else takes the
            # full check below, which asks all of this again.
            if (
                now - conn._pgops_last_used <= _RECENTLY_USED
                and conn._pgops_last_used >= self._suspect_before
                and now < conn._pgops_expires
                and conn._pgops_seen_writable >= self._writable_before
                and self._plain_lend
                and not self._bounds
                and not conn.closed
                and not conn._pgops_poll.poll(0)
            ):
                conn._pgops_lent = True
                conn._pgops_checked_out = now
                return conn
            problem = self._check_out_problem(conn, now, self._deadline_for(start, timeout))
            if problem is None:
                return self._lend(conn, now)
            self._discard(conn, problem)

    _checkout = getconn  # for pgops' own callers, whatever getconn a subclass has (ThreadedConnectionPool)

    def _deadline_for(self, start: float, timeout: float | None) -> float:
        """Return when a request made at *start* runs out of time, _deadline() included."""
        deadline = start + (self.config.acquire_timeout if timeout is None else timeout)
        if self._bounds:
            deadline = min(deadline, self._bounds.get(threading.get_ident(), math.inf))
        return deadline

    def _lend(self, conn: _Connection, now: float) -> _Connection:
        conn._pgops_lent = True
        conn._pgops_checked_out = now
        if self.config.leak_threshold:
            conn._pgops_stack = traceback.format_stack(limit=12)[:-2]
        if self._bounds:
            bound = self._bounds.get(threading.get_ident())
            if bound is not None:
                # Off the plain path in putconn, which must take the connection back from the
                # watchdog first: no test on the hot path for this rare case.
                conn._pgops_pool = None
                conn._pgops_guarded = self
                _watchdog.guard(conn, bound)
        return conn

    @contextlib.contextmanager
    def _deadline(self, seconds: float) -> Iterator[None]:
        """Bound what this thread does with this pool inside the block to *seconds* in total.

        Every getconn() in the block waits at most until the deadline, and every connection it lends
        is cut off by the watchdog if still in use then, so even a query on a stalled network ends.
        """
        ident = threading.get_ident()
        self._bounds[ident] = time.monotonic() + seconds
        try:
            yield
        finally:
            del self._bounds[ident]

    def _take(self, start: float, timeout: float | None, first: bool) -> _Connection:
        """Pop an idle connection, or queue and wait for one (first come, first served).

        *first* is False for a caller whose connection failed its check: its request was counted
        and served once already, so it is not counted again and goes back to the front of the queue.
        """
        with self._lock:
            if self._closed:
                raise PoolClosed("the pool is closed")
            if first:
                self._counters["requests_num"] += 1
            elif time.monotonic() >= self._deadline_for(start, timeout):
                raise self._timed_out(start)  # a connection failed its check and took the time left
            if self._idle and not self._waiters:  # the common case: one lock, no queue
                conn = self._idle.pop()
                self._in_use.add(conn)
                if first:
                    self._wait_counts[0] += 1
                return conn
            self._start_worker()  # the first request of a forked child (whose pool has no idle one)
            # A caller whose connection failed its check was already served once: never turned away.
            if first and self.config.max_waiting and len(self._waiters) >= self.config.max_waiting:
                self._counters["requests_errors"] += 1
                raise TooManyRequests(
                    f"too many requests waiting; {self._state()} (max_waiting={self.config.max_waiting}); "
                    "raise max_waiting (POOL_MAX_WAITING) or max_size, or shed this request"
                )
            waiter = _Waiter(start)
            self._waiters.append(waiter) if first else self._waiters.appendleft(waiter)
            self._counters["requests_queued"] += first
            if self._size < self.config.max_size:
                self._wakeup.notify()  # the worker can open one more; at max_size a return serves us
        try:
            handed = waiter.wait(self._deadline_for(start, timeout) - time.monotonic())
        except BaseException:
            self._abandon(waiter)  # interrupted (KeyboardInterrupt): leave no ghost in the queue
            raise
        if not handed:
            with self._lock:
                # The connection may have been handed over just as the wait timed out: then keep it.
                if waiter.conn is None and waiter.error is None:
                    self._waiters.remove(waiter)
                    raise self._timed_out(start)
        if waiter.error is not None:
            with self._lock:
                self._counters["requests_errors"] += 1
            raise waiter.error
        assert waiter.conn is not None  # its wait was recorded by _hand_over
        return waiter.conn

    def _timed_out(self, start: float) -> PoolTimeout:
        """Count a request that ran out of time and return its error (lock held)."""
        waited = time.monotonic() - start
        self._counters["requests_errors"] += 1
        self._record_wait(waited)
        return PoolTimeout(f"no connection available after {waited:.2f} s; {self._state()}")

    def _abandon(self, waiter: _Waiter) -> None:
        """Take an interrupted waiter out of the queue, passing on a connection it was given."""
        with self._lock:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            conn, waiter.conn = waiter.conn, None
            if conn is not None:
                self._in_use.discard(conn)
                self._hand_over(conn)

    def _record_wait(self, seconds: float) -> None:
        """Add one acquire wait to the histogram (lock held)."""
        self._wait_counts[bisect.bisect_left(_WAIT_BUCKETS, seconds)] += 1  # the first bound >= seconds
        self._wait_sum += seconds
        self._times["requests_wait_ms"] += seconds * 1000.0

    def _state(self) -> str:
        """Describe the pool for an error message, like HikariCP (lock held)."""
        in_use = len(self._in_use)
        text = (
            f"pool {self.name!r} ({redact_dsn(self.config.dsn)}): total {self._size}, in use {in_use}, "
            f"idle {len(self._idle)}, waiting {len(self._waiters)}, max {self.config.max_size}"
        )
        if self._last_error:
            text += f"; last connection error: {self._last_error}"
        return text

    def _check_out_problem(self, conn: _Connection, now: float, deadline: float) -> str | None:
        """Return why *conn* must not be handed out (closed, expired, failed its check), or None.

        *deadline* is when the caller's time runs out; the check takes at most half of what is left.
        """
        if conn.closed:
            return "lost"
        if now >= conn._pgops_expires:
            return "expired"
        if conn._pgops_seen_writable < self._writable_before:
            return self._writable_problem(conn, now, deadline)
        last = conn._pgops_last_used
        # A server that ends a session (terminate, shutdown, crash) sends an error and closes the
        # socket: a zero-timeout poll sees that in under a microsecond, without a round trip.
        if (
            last < self._suspect_before
            or (self.config.test_before_acquire and now - last > _RECENTLY_USED)
            or conn._pgops_poll.poll(0)
        ):
            # The check may take half of what is left of the caller's time, so that a caller whose
            # connection stalls has the other half to get another one; and no longer than a server
            # is given to accept a connection, since a new one is what replaces this one.
            return _bounded(conn, self._check_deadline(now, deadline), _select_one)
        return None

    def _check_deadline(self, now: float, deadline: float) -> float:
        """Return when a check of a connection must end: half the caller's time left, within bounds."""
        return now + max(min((deadline - now) / 2, self.config.connect_timeout), _CHECK_MIN_TIME)

    def _writable_problem(self, conn: _Connection, now: float, deadline: float) -> str | None:
        """Ask whether *conn*'s server takes writes; return None, "read_only", "lost" or "stalled".

        While the pool is degraded because it connected to a read-only server, such a connection is
        kept either way: the pool has warned, and a new connection would reach that server again.
        Once one of them takes writes (unfenced, promoted, a pooler pointed elsewhere), so does the pool.
        """
        problem = _bounded(conn, self._check_deadline(now, deadline), _writable)
        if problem not in (None, "read_only"):
            return problem
        conn._pgops_seen_writable = now
        if not conn._pgops_read_only_server:
            return problem
        if problem is None:
            conn._pgops_read_only_server = False
            self._note_server(in_recovery=False, read_only=False, pooled=False)
            return None
        return None if self._read_only_reason is not None else problem

    # -- return --------------------------------------------------------------------------------

    def putconn(self, conn: psycopg2.extensions.connection, *, close: bool = False) -> None:
        """Give back a connection from getconn(); with *close*, the pool closes it and opens another.

        A connection returned inside a transaction is rolled back; its autocommit, readonly and
        isolation_level go back to the pool's defaults, and reset(conn) runs if configured.
        """
        pooled: Any = conn
        try:
            owner = pooled._pgops_pool
        except AttributeError:  # not a pooled connection at all
            owner = None
        if owner is not self:
            self._put_unusual(pooled, close)
            return
        if not pooled._pgops_lent:
            # Checked before anything touches the connection: it may already be lent to someone else.
            raise PoolError("this connection was already returned to the pool")
        pooled._pgops_lent = False
        now = time.monotonic()
        pooled._pgops_stack = None
        clean = (
            not pooled.closed
            and pooled.get_transaction_status() == _STATUS_IDLE
            and pooled.autocommit is self._autocommit
            and pooled.readonly is self._readonly
            and pooled.isolation_level == self._isolation_level
            and pooled.deferrable is None
            and pooled.cursor_factory is self._cursor_class
            and now < pooled._pgops_expires
            and not pooled._pgops_refused_write
            and self._plain_return
            and not close
        )
        try:
            problem = None if clean else "closed" if close else self._return_problem(pooled, now)
        except BaseException:  # interrupted in rollback or reset(): the slot must not be lost
            self._discard(pooled, "closed")
            raise
        with self._lock:
            self._in_use.discard(pooled)
            self._times["usage_ms"] += (now - pooled._pgops_checked_out) * 1000.0
            if problem is None and not self._closed:
                pooled._pgops_last_used = now
                if self._waiters:
                    self._hand_over(pooled)
                else:
                    self._idle.append(pooled)
                return
            if problem == "bad":
                self._counters["returns_bad"] += 1
            self._fold_queries(pooled)  # in this critical section, so counters never step back
        self._discard(pooled, problem if problem and not self._closed else "closed", in_use=False)

    _return = putconn  # for pgops' own callers, whatever putconn a subclass has (ThreadedConnectionPool)

    def _put_unusual(self, conn: Any, close: bool) -> None:
        """Take back a connection that is not plainly this pool's, or refuse it."""
        if getattr(conn, "_pgops_inherited", False):
            # Lent when this process was forked (under _deadline() or not): the parent's session,
            # which the child never touches.  Its descriptor here is /dev/null; it stays in _inherited.
            conn._pgops_lent = False
        elif getattr(conn, "_pgops_guarded", None) is self:
            # Lent under _deadline(): the watchdog lets go first, so that it never cuts off a
            # connection lent to someone else.
            conn._pgops_guarded = None
            conn._pgops_pool = self
            if _watchdog.release(conn):
                _close_quietly(conn)  # cut off, perhaps between two queries: discarded as stalled
            Pool.putconn(self, conn, close=close)
        else:
            raise PoolError(
                "this connection does not belong to this pool; return it to the pool that gave it"
            )

    def _return_problem(self, conn: _Connection, now: float) -> str | None:
        """Bring a returned connection back to a clean idle state, or say why it must be discarded."""
        if conn.closed:
            return "stalled" if conn._pgops_stalled else "lost"
        status = conn.get_transaction_status()
        if status != _STATUS_IDLE:
            if status not in _STATUS_IN_TRANSACTION:
                _logger.warning(
                    "discarding a connection returned in a bad state (transaction status %s)", status
                )
                return "bad"
            # As psycopg2's pool does, quietly: getconn, SELECT, putconn is a common way to read.
            _logger.debug("pool %r: rolling back a connection returned inside a transaction", self.name)
            with self._lock:
                self._counters["returns_rolled_back"] += 1
            # Bounded like a check: on a stalled network the rollback would never return.
            problem = _bounded(conn, now + self.config.connect_timeout, _Connection.rollback)
            if problem is not None:
                return problem
        if now >= conn._pgops_expires or self._closed:
            return "expired" if not self._closed else "closed"
        if self.config.reset is not None:
            _watchdog.guard(conn, now + self.config.connect_timeout)  # bounded like a check
            try:
                error = self._hook_error("reset", conn)
            finally:
                stalled = _watchdog.release(conn)
            if stalled:
                return "stalled"
            if error is not None:
                self._reset_failed(error)
                return "bad"
        if conn.autocommit:
            conn.autocommit = False
        # Session characteristics set through psycopg2 live on the object: the next borrower must
        # not inherit a read-only or serializable connection. (SET commands are the caller's to undo.)
        # With autocommit off, psycopg2 sends nothing for this: it puts them in the next BEGIN.
        conn.set_session(
            isolation_level=self._isolation_level if self._isolation_level is not None else "default",
            readonly=self._readonly or "default",
            deferrable="default",
        )
        if self._autocommit:
            conn.autocommit = True
        conn.cursor_factory = self._cursor_class  # type: ignore[assignment]
        if conn._pgops_refused_write:
            conn._pgops_refused_write = False
            # The caller's own READ ONLY transaction, or a server that stopped taking writes?  (Not
            # asked while the pool is degraded for the read-only server this connection was opened to.)
            if not (conn._pgops_read_only_server and self._read_only_reason is not None):
                return self._writable_problem(conn, now, self._deadline_for(now, None))
        return None

    def _hook_error(self, hook: str, conn: _Connection) -> BaseException | None:
        """Run the configure or reset callback on *conn*; return what went wrong, or None.

        The callback must leave the connection idle (outside a transaction), as psycopg_pool asks.
        """
        # Compared with what the connection had before the callback, not with the pool's defaults:
        # reset() runs before the pool puts back what the borrower changed.
        before = [getattr(conn, name) for name in _SESSION_SETTINGS]
        try:
            getattr(self.config, hook)(conn)
        except Exception as exc:
            return exc
        if conn.get_transaction_status() != _STATUS_IDLE:
            return PoolError(
                f"{hook}() left the connection inside a transaction; end it with conn.commit() "
                "(or conn.rollback()) before returning"
            )
        changed = next(
            (n for n, v in zip(_SESSION_SETTINGS, before, strict=True) if getattr(conn, n) != v), None
        )
        if changed is not None:
            return PoolError(
                f"{hook}() changed the connection's {changed}, which the pool sets back on every return; "
                f"pass {changed}= to the pool instead"
            )
        return None

    def _reset_failed(self, error: BaseException) -> None:
        """Log a failed reset(conn): at WARNING the first time, then at DEBUG (each is counted)."""
        with self._lock:
            first, self._reset_warned = not self._reset_warned, True
        _logger.log(
            logging.WARNING if first else logging.DEBUG,
            "pool %r: reset(conn) failed, discarding the connection: %s",
            self.name,
            _scrub(error, self.config._conninfo),
        )

    def _fold_queries(self, conn: _Connection) -> None:
        """Move a departing connection's query counters into the pool's totals (lock held)."""
        self._counters["queries_num"] += conn._pgops_queries
        self._counters["queries_errors"] += conn._pgops_errors
        self._times["queries_ms"] += conn._pgops_ms
        conn._pgops_queries = conn._pgops_errors = 0
        conn._pgops_ms = 0.0

    def _query_totals(self) -> tuple[int, int, float]:
        """Return (queries, errors, ms) so far (lock held).

        Live connections keep their own counts, so returning one costs no bookkeeping; they are
        summed here, and folded into the totals when a connection is closed.
        """
        live = [*self._idle, *self._in_use]
        return (
            self._counters["queries_num"] + sum(c._pgops_queries for c in live),
            self._counters["queries_errors"] + sum(c._pgops_errors for c in live),
            self._times["queries_ms"] + sum(c._pgops_ms for c in live),
        )

    def _hand_over(self, conn: _Connection) -> None:
        """Give a ready connection to the first waiter, or keep it idle (lock held)."""
        if self._waiters:
            waiter = self._waiters.popleft()
            waiter.conn = conn
            self._in_use.add(conn)
            # Recorded here, under the lock this thread holds anyway: the waiter then needs no lock
            # of its own, which with many threads on few connections would cost a switch per handoff.
            self._record_wait(time.monotonic() - waiter.start)
            waiter.wake()
        else:
            self._idle.append(conn)

    def _fail_waiters(self, error: BaseException) -> None:
        """Wake every waiter with *error* instead of a connection (lock held)."""
        while self._waiters:
            waiter = self._waiters.popleft()
            waiter.error = error
            waiter.wake()

    def _discard(self, conn: _Connection, reason: str, *, in_use: bool = True) -> None:
        """Close a connection that must not be used again and let the worker replace it."""
        with self._lock:
            if in_use:
                self._in_use.discard(conn)
            self._fold_queries(conn)
            self._size -= 1
            if reason in _DISCARDED:
                self._counters[f"connections_{reason}"] += 1
            if reason in ("lost", "stalled"):
                # If one connection died, its siblings may have too (a server restart, a network
                # that stalls): check them all.
                self._suspect_before = time.monotonic()
            first_read_only = False
            if reason == "read_only":
                # Its siblings were opened to the same server (a fenced or demoted primary, a standby):
                # check them before they are lent; new connections go through the DSN, which with
                # target_session_attrs=read-write finds the server that takes writes now.
                now = self._writable_before = time.monotonic()
                first_read_only = now - self._read_only_warned > _READ_ONLY_QUIET
                if first_read_only:
                    self._read_only_warned = now
            self._wakeup.notify()
        if reason in _DISCARDED:
            level = logging.DEBUG if reason == "read_only" and not first_read_only else logging.WARNING
            _logger.log(level, "pool %r: discarding a %s", self.name, _DISCARDED[reason])
        else:
            _logger.debug("closing a connection (%s)", reason)
        _close_quietly(conn)

    # -- worker: connecting, recycling, monitoring ---------------------------------------------

    def _run_worker(self) -> None:
        """Open connections on demand, recycle old and idle ones, watch for leaks, log status."""
        tick = self._tick()
        next_maintenance = time.monotonic() + tick
        next_monitor = time.monotonic() + (self.config.monitor_interval or math.inf)
        while True:
            with self._lock:
                while not self._closed and not self._wants_connection():
                    remaining = next_maintenance - time.monotonic()
                    if remaining <= 0:
                        break
                    self._wakeup.wait(remaining)
                if self._closed:
                    return
                wants = self._wants_connection()
                if wants:
                    self._nudged = False
                    self._size += 1
                    self._connecting = True
            if wants:
                self._add_connection()
            now = time.monotonic()
            if now >= next_maintenance:
                self._maintain(now)
                next_maintenance = now + tick
            if now >= next_monitor:
                self._log_status()
                next_monitor = now + self.config.monitor_interval

    def _tick(self) -> float:
        """Return the seconds between maintenance rounds, fine enough for the pool's shortest limit.

        A leak is then reported at most half a leak_threshold late, an idle connection closed a quarter
        of idle_timeout late, an expired one a tenth of max_lifetime; no more often than _TICK_MIN (a
        tiny setting must not make a busy loop), and at least every _TICK_MAX for the health window.
        """
        config = self.config
        limits = [config.leak_threshold / 2, config.idle_timeout / 4, config.max_lifetime / 10]
        return min(_TICK_MAX, max(_TICK_MIN, min((x for x in limits if x > 0), default=_TICK_MAX)))

    def _wants_connection(self) -> bool:
        """Tell whether the worker should open one more connection now (lock held).

        After a fatal error (authentication, a missing database) the worker stops filling to min_size,
        as retrying alone cannot help; but a waiting caller (or a nudge) still gets an attempt, so a
        fix (a rotated password, a created database) works without a restart and the caller hears the
        server's answer of now, not a stale error.  If it fails again, _connect_failed fails the waiters.
        """
        if self._size >= self.config.max_size:
            return False
        if self._waiters or self._nudged:
            return True
        return self._fatal is None and self._size < self.config.min_size

    def _add_connection(self) -> None:
        """Open one connection (a slot is already reserved) and hand it over; back off on failure."""
        start = time.monotonic()
        try:
            conn = self._open()
        except Exception as exc:
            self._connect_failed(exc, start)
            return
        with self._lock:
            self._counters["connections_num"] += 1
            self._times["connections_ms"] += (time.monotonic() - start) * 1000.0
            if self._failures:
                _logger.info(
                    "connected again after %d failed attempts (%.1f s)",
                    self._failures,
                    time.monotonic() - self._outage_started,
                )
            self._failures = 0
            self._fatal = None
            self._last_error = None
            self._connecting = False
            closed = self._closed
            if not closed:
                self._hand_over(conn)
            else:
                self._size -= 1
            self._changed.notify_all()
        if closed:
            _close_quietly(conn)

    def _open(self) -> _Connection:
        """Open and prepare one connection (called without the pool lock)."""
        raw = psycopg2.connect(
            self.config._conninfo, connection_factory=self._connection_kind, **self._connect_kwargs
        )
        conn: _Connection = raw
        try:
            # Queries after the connect: a network that stalls now must not hold the worker forever.
            # The user's configure() is bounded too, like everything the worker does.
            _watchdog.guard(conn, time.monotonic() + self.config.connect_timeout)
            error = None
            try:
                pooled, in_recovery, read_only = _probe(conn)
                self._apply_defaults(conn, pooled)
                if self.config.configure is not None:
                    error = self._hook_error("configure", conn)
                if error is None and self.config.register_vector:
                    _register_vector(conn)
            finally:
                stalled = _watchdog.release(conn)
            if stalled:
                raise psycopg2.OperationalError(
                    f"the server did not answer within connect_timeout={self.config.connect_timeout:g} s"
                )
            if error is not None:  # the connection is not lent; the failure is counted and logged once
                if is_retryable(error):  # the connection dropped meanwhile, say: the pool tries again
                    raise error
                message = _scrub(error, self.config._conninfo)
                raise PoolError(f"configure(conn) failed: {message}") from error
            self._set_cursor_class(conn)
            conn._pgops_read_only_server = read_only
            self._note_server(in_recovery, read_only, pooled)
            now = time.monotonic()
            conn._pgops_pool = self
            conn._pgops_last_used = now
            if self.config.max_lifetime:
                jitter = 1.0 - _LIFETIME_JITTER * random.random()
                conn._pgops_expires = now + self.config.max_lifetime * jitter
        except BaseException:
            _close_quietly(conn)
            raise
        return conn

    def _apply_defaults(self, conn: _Connection, pooled: bool) -> None:
        """Give a new connection its class, cursor class, readonly, isolation level and autocommit."""
        factory = self.config.connection_factory
        if pooled:  # the same object, refusing session-level SETs from now on
            conn.__class__ = _connection_class(_BehindPooler, factory)
        elif self._readonly:  # read-only in autocommit too
            conn.__class__ = _connection_class(_ReadPoolConnection, factory)
        # With autocommit off psycopg2 sends nothing for these: it puts them in each BEGIN.
        if self._readonly:
            conn.readonly = True
        if self._isolation_level is not None:
            conn.isolation_level = self._isolation_level
        if self._autocommit:
            conn.autocommit = True  # refused through a pooler with readonly set: a session SET

    def _set_cursor_class(self, conn: _Connection) -> None:
        """Give a new connection the pool's counted cursor class.

        With a connection_factory and no cursor_factory, that is the factory's own default cursor
        (LoggingConnection's LoggingCursor, say): known for psycopg2.extras' factories, else learnt
        from the first connection that can make a cursor at connect time.  Cursors of a factory that
        cannot (it needs a call after getconn()) are left as they are, and not counted.
        """
        if self._cursor_class is None:
            base = _factory_cursor(type(conn))
            if base is None:  # a factory of its own: ask it, if it can make a cursor yet
                conn.cursor_factory = None  # type: ignore[assignment]
                try:
                    base = type(conn.cursor())
                except psycopg2.Error:
                    _logger.debug("pool %r: its connection_factory's cursors are not counted", self.name)
                    return
            self._cursor_class = _counting(base)
        conn.cursor_factory = self._cursor_class

    def _note_server(self, in_recovery: bool, read_only: bool, pooled: bool) -> None:
        """Warn once when a pool meant for writes connects to a server that takes none."""
        if self.config.read_only:
            return
        reason = None
        if read_only:
            what = "a standby (in recovery)" if in_recovery else "a server with default_transaction_read_only"
            fix = (
                "point the pooler at the primary"
                if pooled
                else "add target_session_attrs=read-write to the DSN so that libpq connects only to a "
                "server that takes writes"
            )
            reason = f"connected{' through a pooler' if pooled else ''} to {what}, where writes fail; {fix}"
        with self._lock:
            before, self._read_only_reason = self._read_only_reason, reason
        if reason is not None and before is None:
            _logger.warning("pool %r %s", self.name, reason)
        elif reason is None and before is not None:
            _logger.info("pool %r connected to a server that takes writes again", self.name)

    def _connect_failed(self, exc: Exception, start: float) -> None:
        """Record a failed connection attempt; fail waiters at once if waiting cannot help."""
        message = _scrub(exc, self.config._conninfo)
        fatal = not is_retryable(exc)
        with self._lock:
            self._size -= 1
            self._connecting = False
            self._changed.notify_all()  # for _before_fork()
            self._counters["connections_num"] += 1
            self._counters["connections_errors"] += 1
            self._last_error = message
            if self._failures == 0:
                self._outage_started = start
                dsn = redact_dsn(self.config.dsn)
                _logger.warning("pool %r cannot connect to %s: %s", self.name, dsn, message)
            else:
                _logger.debug("still cannot connect (attempt %d): %s", self._failures + 1, message)
            self._failures += 1
            if fatal:
                # Authentication failures and missing databases do not heal by waiting: fail fast.
                self._fatal = CannotConnect(f"cannot connect to {redact_dsn(self.config.dsn)!r}: {message}")
                self._fail_waiters(self._fatal)
                return
            delay = min(_RECONNECT_MAX_DELAY, _RECONNECT_FIRST_DELAY * 2 ** min(self._failures - 1, 16))
            # New waiters notify the worker; that must not cut the backoff short during an outage.
            until = time.monotonic() + delay * (0.5 + 0.5 * random.random())
            while not self._closed and (remaining := until - time.monotonic()) > 0:
                self._wakeup.wait(remaining)

    def _maintain(self, now: float) -> None:
        """Close expired and surplus idle connections, warn about leaks, keep the health window."""
        to_close: list[_Connection] = []
        with self._lock:
            idle_timeout = self.config.idle_timeout
            keep: collections.deque[_Connection] = collections.deque()
            # Oldest-used first (the idle deque is used as a stack), so surplus trimming hits them.
            for conn in self._idle:
                surplus = self._size - len(to_close) > self.config.min_size
                if now >= conn._pgops_expires or (
                    idle_timeout and surplus and now - conn._pgops_last_used > idle_timeout
                ):
                    to_close.append(conn)
                    self._fold_queries(conn)
                else:
                    keep.append(conn)
            self._idle = keep
            self._size -= len(to_close)
            leaks = (
                [c for c in self._in_use if c._pgops_stack is not None] if self.config.leak_threshold else []
            )
            queries, errors, _ms = self._query_totals()
            self._window.append((now, queries, errors))
            # Keep one sample at or before the window's start: it is the baseline health() counts from.
            while len(self._window) > 1 and self._window[1][0] <= now - _HEALTH_WINDOW:
                self._window.popleft()
            if to_close:
                self._wakeup.notify()
        for conn in to_close:
            _logger.debug("closing a connection past its lifetime or idle timeout")
            _close_quietly(conn)
        for conn in leaks:
            stack = conn._pgops_stack
            if stack is not None and now - conn._pgops_checked_out > self.config.leak_threshold:
                conn._pgops_stack = None  # one warning per checkout
                _logger.warning(
                    "connection held for more than %.1f s, possible leak; checked out at:\n%s",
                    self.config.leak_threshold,
                    "".join(stack).rstrip(),
                )
        if self._read_only_reason is not None and now - self._writable_before >= _READ_ONLY_RECHECK:
            # Ask again at the next checkout of each connection whether its server takes writes now.
            with self._lock:
                self._writable_before = now
                left = any(c._pgops_read_only_server for c in (*self._idle, *self._in_use))
            if not left:  # trimmed or recycled: the next connection's probe tells
                self._note_server(in_recovery=False, read_only=False, pooled=False)

    def _log_status(self) -> None:
        health = self.health()
        stats = self.stats()
        level = {"healthy": logging.INFO, "degraded": logging.WARNING}.get(health.status, logging.ERROR)
        _logger.log(
            level,
            "pool %r %s: %d in use of %d (max %d), %d waiting%s",
            self.name,
            health.status,
            stats["pool_size"] - stats["pool_available"],
            stats["pool_size"],
            stats["pool_max"],
            stats["requests_waiting"],
            "; " + "; ".join(health.reasons) if health.reasons else "",
        )

    # -- observation ---------------------------------------------------------------------------

    def stats(self) -> dict[str, int | float]:
        """Return the pool's gauges and cumulative counters (psycopg_pool's names, units in the key)."""
        with self._lock:
            result: dict[str, int | float] = {
                "pool_min": self.config.min_size,
                "pool_max": self.config.max_size,
                "pool_size": self._size,
                "pool_available": len(self._idle),
                "pool_in_use": len(self._in_use),
                "requests_waiting": len(self._waiters),
                **self._counters,
                **{k: round(v, 3) for k, v in self._times.items()},
            }
            queries, errors, ms = self._query_totals()
        result.update(queries_num=queries, queries_errors=errors, queries_ms=round(ms, 3))
        return result

    def wait_histogram(self) -> dict[str, Any]:
        """Return the acquire-wait histogram: cumulative (upper bound s, count) buckets, sum and count."""
        with self._lock:
            cumulative = list(itertools.accumulate(self._wait_counts))
            total_seconds = self._wait_sum
        buckets = list(zip((*_WAIT_BUCKETS, math.inf), cumulative, strict=True))
        return {"buckets": buckets, "sum": total_seconds, "count": cumulative[-1]}

    def health(self) -> PoolHealth:
        """Judge the pool: degraded above 80% use or under 95% query success, unhealthy past 95%/90%."""
        cannot_connect = self._unreachable()
        with self._lock:
            utilization = len(self._in_use) / self.config.max_size
            queries, errors, _ms = self._query_totals()
            oldest = self._window[0]
            fatal, last_error = self._fatal, self._last_error
            read_only_reason = self._read_only_reason
        found: list[tuple[str, str]] = []  # (degraded or unhealthy, why), in the order judged
        if cannot_connect or fatal is not None:
            found.append(("unhealthy", f"no connection possible: {last_error}"))
        elif read_only_reason is not None:
            found.append(("degraded", read_only_reason))
        if utilization > 0.95:
            found.append(("unhealthy", f"utilization {utilization:.0%} is above 95%"))
        elif utilization > 0.80:
            found.append(("degraded", f"utilization {utilization:.0%} is above 80%"))
        success_rate: float | None = None
        recent = queries - oldest[1]
        if recent >= _HEALTH_MIN_QUERIES:
            success_rate = 1.0 - (errors - oldest[2]) / recent
            if success_rate < 0.90:
                found.append(("unhealthy", f"query success rate {success_rate:.1%} is under 90%"))
            elif success_rate < 0.95:
                found.append(("degraded", f"query success rate {success_rate:.1%} is under 95%"))
        levels = {level for level, _ in found}
        status = "unhealthy" if "unhealthy" in levels else "degraded" if levels else "healthy"
        return PoolHealth(status, tuple(reason for _, reason in found), utilization, success_rate)

    # -- lifecycle -----------------------------------------------------------------------------

    def wait(self, timeout: float | None = None) -> None:
        """Block until min_size connections are open; raise PoolTimeout (or CannotConnect) if not."""
        deadline = time.monotonic() + (self.config.acquire_timeout if timeout is None else timeout)
        with self._lock:
            self._start_worker()  # a forked child's pool starts it on first use
            while len(self._idle) + len(self._in_use) < self.config.min_size:
                if self._closed:
                    raise PoolClosed("the pool is closed")
                if self._fatal is not None:
                    raise self._fatal
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise PoolTimeout(f"pool not filled to min_size={self.config.min_size}; {self._state()}")
                self._changed.wait(min(remaining, 0.1))

    def close(self, timeout: float = 5.0) -> None:
        """Close idle connections, fail waiters, stop the worker; connections in use close on return."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            idle = list(self._idle)
            self._idle.clear()
            self._size -= len(idle)
            for conn in idle:
                self._fold_queries(conn)
            self._fail_waiters(PoolClosed("the pool was closed while waiting for a connection"))
            self._wakeup.notify_all()
            self._changed.notify_all()
        for conn in idle:
            _close_quietly(conn)
        if self._worker.ident is not None and threading.current_thread() is not self._worker:
            self._worker.join(timeout)
        if self.replica is not None:
            self.replica.close(timeout)
        _logger.info("pool %r closed for %s", self.name, redact_dsn(self.config.dsn))


class ThreadedConnectionPool(Pool, psycopg2.pool.ThreadedConnectionPool):  # type: ignore[override]
    """psycopg2's ThreadedConnectionPool, made of pgops.Pool: change the import, keep the code.

    The constructor and methods are psycopg2's: ``(minconn, maxconn, *args, **kwargs)`` with
    psycopg2.connect()'s arguments, ``getconn(key=None)``, ``putconn(conn=None, key=None,
    close=False)``, ``closeall()``, ``closed``, ``minconn``, ``maxconn``.  It is a pgops.Pool too:
    getconn waits up to acquire_timeout when every connection is lent (psycopg2's pool raises at
    once), connections are validated, recycled and replaced, and stats(), health(), HealthApp and
    connection() work as on any pool.  Keyword arguments that name a PoolConfig setting
    (acquire_timeout, max_lifetime, configure, autocommit ...) set it; the rest go to libpq.
    """

    def __init__(self, minconn: int, maxconn: int, *args: Any, **kwargs: Any) -> None:
        Pool.__init__(self, _dropin_config(minconn, maxconn, args, kwargs))

    def _start(self) -> None:
        super()._start()
        self._keyed: dict[Any, _Connection] = {}  # key -> connection lent under it
        self._key_of: dict[int, Any] = {}  # id(connection) -> its key

    @property
    def minconn(self) -> int:  # type: ignore[override]
        """min_size, by psycopg2's name."""
        return self.config.min_size

    @property
    def maxconn(self) -> int:  # type: ignore[override]
        """max_size, by psycopg2's name."""
        return self.config.max_size

    def getconn(self, key: Any = None) -> psycopg2.extensions.connection:
        """Take a connection, waiting up to acquire_timeout; with *key*, the one lent under that key."""
        if key is None:
            return Pool.getconn(self)
        with self._lock:
            conn = None if self._closed else self._keyed.get(key)
        if conn is not None:
            return conn
        taken: Any = Pool.getconn(self)  # raises PoolClosed on a closed pool
        with self._lock:
            closed = self._closed  # closeall() may have run meanwhile
            conn = taken if closed else self._keyed.setdefault(key, taken)
            if conn is taken and not closed:
                self._key_of[id(taken)] = key
        if closed or conn is not taken:  # closed meanwhile, or another thread took this key
            Pool.putconn(self, taken)
        if closed:
            raise PoolClosed("the pool is closed")
        return conn

    def _open(self) -> _Connection:
        conn: Any = self._connect()  # psycopg2's hook, which subclasses of its pool override
        if conn.get_transaction_status() in _STATUS_IN_TRANSACTION:
            conn.commit()  # the override's own set-up (a SET, say), kept as psycopg2's pool keeps it
        return conn  # type: ignore[no-any-return]

    def _connect(self, key: Any = None) -> psycopg2.extensions.connection:
        """Open one connection for the pool (psycopg2's hook: override it and call super()._connect())."""
        return Pool._open(self)

    def putconn(
        self, conn: psycopg2.extensions.connection | None = None, key: Any = None, close: bool = False
    ) -> None:
        """Give back a connection (or the one lent under *key*); with *close*, close it for good."""
        if self._keyed or key is not None or conn is None:
            conn = self._unkey(conn, key)
        Pool.putconn(self, conn, close=close)

    def _unkey(self, conn: psycopg2.extensions.connection | None, key: Any) -> psycopg2.extensions.connection:
        """Forget the key a connection was lent under; return the connection."""
        with self._lock:
            if key is None:
                if conn is None:
                    raise PoolError("putconn() needs the connection or the key it was lent under")
                key = self._key_of.get(id(conn))
                if key is None:
                    return conn  # lent without a key
            keyed = self._keyed.get(key)
            if keyed is None and self._closed:  # closeall() forgot the keys: the pool takes it as closed
                if conn is None:
                    raise PoolClosed("the pool is closed")
                return conn
            if keyed is None or (conn is not None and conn is not keyed):
                raise PoolError(f"no connection is lent under key {key!r}; pass the key getconn() took")
            del self._keyed[key]
            del self._key_of[id(keyed)]
            return keyed

    def closeall(self) -> None:
        """Close the pool and every connection, lent ones included, as psycopg2's closeall() does."""
        if self._closed:
            raise PoolError("the pool is already closed")
        self.close()
        with self._lock:
            lent = list(self._in_use)
            self._keyed, self._key_of = {}, {}
        for conn in lent:
            _close_quietly(conn)


def _dropin_config(minconn: int, maxconn: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> PoolConfig:
    """Make a PoolConfig of psycopg2.pool's constructor arguments (see ThreadedConnectionPool)."""
    if len(args) > 3:
        raise TypeError(
            f"ThreadedConnectionPool() takes minconn, maxconn and at most 3 arguments of "
            f"psycopg2.connect() (dsn, connection_factory, cursor_factory), not {len(args)}"
        )
    positional = dict(zip(("dsn", "connection_factory", "cursor_factory"), args, strict=False))
    for name in positional:
        if name in kwargs:
            raise TypeError(f"ThreadedConnectionPool() got {name} both by position and by keyword")
    kwargs = {**positional, **kwargs}
    pool_fields = {f.name for f in dataclasses.fields(PoolConfig) if f.init} - {"dsn", "min_size", "max_size"}
    options = {name: kwargs.pop(name) for name in list(kwargs) if name in pool_fields}
    if "readonly" in kwargs:  # psycopg2's name for what a pool of read-only connections has
        options["read_only"] = bool(kwargs.pop("readonly"))
    if isinstance(options.get("connect_timeout"), str):  # libpq takes text; the pool bounds its checks by it
        try:
            options["connect_timeout"] = float(options["connect_timeout"])
        except ValueError:
            raise ConfigError(f"connect_timeout={options['connect_timeout']!r} is not a number") from None
    dsn = kwargs.pop("dsn", None) or ""
    for name in ("async", "async_"):
        if kwargs.get(name):
            raise ConfigError(f"{name}=True: an asynchronous connection cannot be pooled")
        kwargs.pop(name, None)
    if kwargs:
        dsn = _merge_dsn(dsn or None, kwargs, "ThreadedConnectionPool()")
    if not dsn.strip():
        # psycopg2.connect() with no DSN takes libpq's defaults and PG* variables; PoolConfig wants a
        # DSN, so it gets one that sets only what pgops sets on every connection anyway.
        dsn = psycopg2.extensions.make_dsn(application_name=options.get("application_name", "pgops"))
    return PoolConfig(dsn=dsn, min_size=minconn, max_size=maxconn, **options)


def _bounded(conn: _Connection, deadline: float, action: Callable[[_Connection], Any]) -> str | None:
    """Run ``action(conn)``, cut off by the watchdog at *deadline*.

    Return None, what the action returned (a problem), "lost" (an error) or "stalled" (cut off).
    """
    _watchdog.guard(conn, deadline)
    try:
        problem = action(conn)
    except psycopg2.Error:
        problem = "lost"
    finally:
        stalled = _watchdog.release(conn)
    return "stalled" if stalled else problem if isinstance(problem, str) else None


def _autocommit_query(conn: _Connection, query: str) -> tuple[Any, ...]:
    """Make one round trip in autocommit (no transaction to roll back) and return its row.

    A read pool's connection is READ ONLY through psycopg2, and a pool may have an isolation level:
    those are taken off around the query.
    """
    if conn.autocommit:  # an autocommit pool's connection: nothing to switch
        return _fetch_one(conn, query)
    # Set while autocommit is off, psycopg2 would send them as session SETs once it is on (refused
    # behind a pooler): taken off first, with autocommit off, when psycopg2 sends nothing for them.
    saved = {name: value for name in _CHARACTERISTICS if (value := _SESSION[name].__get__(conn)) is not None}
    for name in saved:
        setattr(conn, name, None)
    conn.autocommit = True
    row = _fetch_one(conn, query)
    conn.autocommit = False
    for name, value in saved.items():
        setattr(conn, name, value)
    return row


def _fetch_one(conn: psycopg2.extensions.connection, query: str) -> tuple[Any, ...]:
    """Run *query* with a plain cursor (not the pool's counted one) and return its first row."""
    cur = psycopg2.extensions.cursor(conn)
    cur.execute(query)
    return (cur.fetchone() if cur.description is not None else None) or ()


def _page_start(lsn: str, block_size: int) -> str:
    """Return *lsn* moved back over a WAL page header it points just past, as text.

    pg_current_wal_insert_lsn() at the start of an empty page points past the page's header (24 bytes,
    40 at the start of a segment), where no record ends; a standby's replay position stops at the page
    start until more WAL comes, so the token would never be reached.
    """
    high, _, low = lsn.partition("/")
    position = int(high, 16) << 32 | int(low, 16)
    if position % block_size in (24, 40):
        position -= position % block_size
    return f"{position >> 32:X}/{position & 0xFFFFFFFF:X}"


def _select_one(conn: _Connection) -> None:
    """Make one round trip."""
    _autocommit_query(conn, "SELECT 1")


def _writable(conn: _Connection) -> str | None:
    """Return "read_only" when *conn*'s server takes no writes now (fenced, demoted, a standby)."""
    return None if _autocommit_query(conn, _WRITABLE)[0] else "read_only"


def _probe(conn: _Connection) -> tuple[bool, bool, bool]:
    """Return (through a pooler, the server is in recovery, the server takes no writes) for *conn*."""
    pid, in_recovery, read_only = _autocommit_query(conn, _PROBE)
    return pid != conn.info.backend_pid, bool(in_recovery), bool(read_only)


def _close_quietly(conn: psycopg2.extensions.connection) -> None:
    try:
        conn.close()
    except Exception:  # a broken socket may complain; the connection is gone either way
        _logger.debug("error closing a connection", exc_info=True)


def _register_vector(conn: psycopg2.extensions.connection) -> None:
    """Register pgvector's types on *conn* when the package is importable and the extension exists."""
    try:
        from pgvector.psycopg2 import register_vector
    except ImportError:
        return
    # ProgrammingError: the extension is not installed in this database (yet).
    with contextlib.suppress(psycopg2.ProgrammingError):
        register_vector(conn)
    conn.rollback()


def _before_fork() -> None:
    """Hold every pool's lock across a fork, once none is opening a connection (waiting up to 1 s).

    A connection that libpq is still opening is in no list yet, so a child could not disown it; and
    with the locks held no thread is half-way through moving a connection between lists.
    """
    for pool in list(_pools):
        if not pool._lock.acquire(timeout=_FORK_WAIT):
            continue  # never deadlock a fork (say, from a log handler run under the lock)
        _locked_for_fork.append(pool)
        until = time.monotonic() + _FORK_WAIT
        while pool._connecting and (left := until - time.monotonic()) > 0:
            pool._changed.wait(left)


def _after_fork_in_parent() -> None:
    while _locked_for_fork:
        _locked_for_fork.pop()._lock.release()


def _after_fork_in_child() -> None:
    """Disown the parent's connections in a forked child, and give its pools and health apps fresh state.

    Parent and child share every socket after a fork: if both used one, each would read the other's
    results, and a child closing one would end the parent's session.  So the child points each
    inherited descriptor at /dev/null (nothing it does reaches the server, and a close writes
    nowhere), keeps the objects in _inherited, and its pools start empty with a worker of their own.
    """
    global _watchdog
    _locked_for_fork.clear()  # those locks are replaced below, held as they are
    _watchdog = _Watchdog()  # its thread and whatever it guarded stayed in the parent
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        for conn in list(_live_connections):
            conn._pgops_inherited = True
            conn._pgops_pool = None
            _inherited.append(conn)
            # One connection that cannot be disowned (no descriptor left) must not keep the pools
            # below from being reset.
            with contextlib.suppress(OSError, psycopg2.Error):
                if not conn.closed:
                    os.dup2(devnull, conn.fileno(), inheritable=False)
    finally:
        os.close(devnull)
    _live_connections.clear()
    for pool in list(_pools):
        # The parent's connections stay the parent's.  The worker starts on the child's first request
        # (or wait()), not here: a child that never uses the pool (a multiprocessing worker, a
        # preexec_fn before exec) opens no connections and starts no thread inside the fork hook.
        pool._start()
    for app in list(_health_apps):
        app._after_fork()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(
        before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child
    )


# ================================================================================================
# Migrations
# ================================================================================================

# \Z, not $: a name ending in a newline is not a migration file.
_MIGRATION_FILE = re.compile(r"^(?P<version>[0-9]+)_(?P<description>[A-Za-z0-9_-]+)(?P<down>\.down)?\.sql\Z")
# Flyway's repeatable migrations: re-applied whenever their text changes, after the versioned ones.
_REPEATABLE_FILE = re.compile(r"^R__(?P<description>[A-Za-z0-9_-]+)(?P<down>\.down)?\.sql\Z")
_BASELINE = "baseline"  # the checksum column of the row that `baseline V` writes (never a sha256 digest)
_NO_TRANSACTION = re.compile(r"^--\s*pgops:\s*no-transaction\s*$", re.IGNORECASE)
_MAX_VERSION = 2**63 - 1  # the history table's version column is a bigint
_LOCK_CLASS = 0x7067_6F70  # "pgop": the first key of every pgops advisory lock
_ATOMIC = re.compile(r"\s+ATOMIC\b", re.IGNORECASE)
_SPACES = re.compile(r"\s+")
_WORD = re.compile(r"[\w$]+")  # what _is_word_char accepts, as a run
_DOLLAR_TAG = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$")
_COMMENT_EDGE = re.compile(r"/\*|\*/")
_QUOTE_OR_ESCAPE = re.compile(r"['\\]")
# First words of statements that start or end a transaction (PREPARE TRANSACTION is checked apart).
_TRANSACTION_CONTROL = frozenset({"BEGIN", "START", "COMMIT", "END", "ROLLBACK", "ABORT"})
_FIRST_WORDS = re.compile(r"([A-Za-z_][\w$]*)(?:\s+([A-Za-z_][\w$]*))?(?:\s+([A-Za-z_][\w$]*))?")
_COPY_STDIO = re.compile(r"\b(FROM\s+STDIN|TO\s+STDOUT)\b", re.IGNORECASE)
_LOCK_REPORT_EVERY = 10.0  # seconds between "waiting for ..." lines
# Seconds of waiting logged at INFO, not WARNING: replicas that start together wait for each other as a
# matter of course, and twenty warnings per deploy would teach operators to ignore them.
_LOCK_QUIET = 10.0
_LOCK_RETRY = RetryPolicy(max_attempts=5, initial_delay=0.5, max_delay=5.0)  # for lock_not_available
_CONNECT_TIMEOUT = 10.0  # seconds; libpq's own default is to wait for ever
_ANNOUNCE_AFTER = 1.0  # seconds: a migration still running then is announced ("applying ... ...")
_LEASE_TIMEOUT = 30.0  # seconds a claim on a no-transaction file lives unless its runner renews it
# SQL pieces of a no-transaction file's claim: its lease's new end (parameter: lease_timeout), and
# "this row is still this runner's claim" (parameters: version, runner).
_LEASE_END = "pg_catalog.clock_timestamp() + %s * interval '1 second'"
_CLAIMED = "version = %s AND runner = %s AND status = 'running'"
_progress = logging.getLogger("pgops.progress")  # "applying ...": the CLI shows it by default
# What DISCARD ALL does, less pg_advisory_unlock_all() (harmless now that the lock is transaction-level,
# but a user's session lock is not ours to drop). Run in the transaction of every migration file on a
# direct connection, so that each starts from the session the connection began with, whatever the
# files before it set (search_path, role, prepared statements, temporary tables) and however runs are
# batched. RESET ALL goes back to the connection's startup values, which hold pgops' lock_timeout.
_RESET_SESSION = (
    "SET SESSION AUTHORIZATION DEFAULT; RESET ALL; DEALLOCATE ALL; CLOSE ALL; UNLISTEN *; "
    "DISCARD PLANS; DISCARD SEQUENCES; DISCARD TEMP"
)
# Behind a connection pooler the server session is shared with other clients: only what puts it back
# to its defaults, inside the file's transaction. DEALLOCATE ALL would drop statements the pooler
# prepared for others, DISCARD TEMP their temporary tables.
_RESET_POOLED = "SET SESSION AUTHORIZATION DEFAULT; RESET ALL"


@dataclasses.dataclass(frozen=True)
class Migration:
    """One numbered SQL file (and its optional .down.sql), as load_migrations() read and checked it.

    An R__name.sql file is repeatable: applied again whenever its text changes.
    """

    version: int
    # An R__name.sql file's version is negative: the key of its history row, made from its name.
    description: str
    path: str
    checksum: str
    transactional: bool
    sql: str = dataclasses.field(repr=False)
    down_path: str | None = None
    repeatable: bool = False  # an R__name.sql file
    empty: bool = False  # no SQL statement yet (a fresh template of `new`): refused when it is due

    @property
    def name(self) -> str:
        """Return the file name without directory."""
        return os.path.basename(self.path)


@dataclasses.dataclass(frozen=True)
class MigrationStatus:
    """One row of ``status()``: a file, a history row, or both, and ``state``, how the two stand together
    (not the history table's ``status`` column: applied, failed or running, what the row records)."""

    version: int | None  # None for a repeatable migration
    description: str
    # applied, pending, failed, running, changed (edited since), conflict (another file under its
    # version), missing (file gone), future (newer than every file), baseline (the row `baseline`
    # wrote), below-baseline (a file at or under it, never run); a repeatable: applied, pending,
    # outdated (changed since it was last applied), missing; invalid: a file that cannot be used (two
    # under one version, bad content), which validate() names
    state: str
    applied_at: str | None = None
    execution_ms: float | None = None
    applied_by: str | None = None
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class _Row:
    """One row of the history table, by its columns; ``status`` is the column (applied, failed, running)."""

    description: str
    checksum: str
    status: str
    applied_at: Any = None  # a datetime; None when read under the lock, which needs no timestamps
    execution_ms: float | None = None
    applied_by: str | None = None
    error: str | None = None
    # Read under the lock only: which runner wrote it, and whether its lease is live (None: not read).
    runner: str | None = None
    live: bool | None = None


def _normalize_sql(text: str) -> str:
    """Return migration text as it is checksummed and run: BOM removed, CRLF turned into LF."""
    return text.removeprefix("\ufeff").replace("\r\n", "\n")


def migration_checksum(text: str) -> str:
    """Return the sha256 hex digest of normalized migration text (line endings do not count)."""
    import hashlib

    return hashlib.sha256(_normalize_sql(text).encode("utf-8")).hexdigest()


def _parse_migration_name(filename: str) -> tuple[int, str, bool]:
    """Return (version, description, is_down) of a migration file name, or raise BadMigration."""
    match = _MIGRATION_FILE.match(filename)
    if match is None:
        raise BadMigration(
            f"migration file name {filename!r} is not NNNN_description.sql "
            "(digits, an underscore, then letters, digits, '_' or '-'); rename it"
        )
    version = int(match["version"])
    if version > _MAX_VERSION:
        raise BadMigration(
            f"migration file name {filename!r} has version {version}, above the largest the history "
            f"table holds ({_MAX_VERSION}); renumber it"
        )
    return version, match["description"], match["down"] is not None


def _read_migration(
    path: str, version: int, description: str, repeatable: bool = False, down_path: str | None = None
) -> Migration:
    """Read and check a migration file as UTF-8 text; raise BadMigration naming it if it cannot be used."""
    with open(path, "rb") as fh:
        data = fh.read()
    try:
        text = _normalize_sql(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        utf16 = ", it looks like UTF-16" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise BadMigration(
            f"migration {path!r} is not valid UTF-8 (byte {exc.start}{utf16}); save it as UTF-8"
        ) from None
    if "\x00" in text:
        # UTF-16 without a byte order mark decodes as UTF-8 with a NUL after every ASCII character.
        wide = text.count("\x00") * 4 >= len(text)
        remedy = "it looks like UTF-16; save it as UTF-8" if wide else "remove it"
        raise BadMigration(f"migration {path!r} contains a NUL byte at offset {text.index(chr(0))}; {remedy}")
    statements = [(code, end) for _start, end, code in _scan_sql(text) if code >= 0]  # used twice
    transactional = _transactional(text)
    _refuse_statements(text, path, statements, transactional)
    if repeatable and not transactional:
        raise BadMigration(
            f"repeatable migration {path!r} says no-transaction; a repeatable migration runs in one "
            "transaction: remove the marker, or make it a numbered migration"
        )
    checksum = migration_checksum(text)
    return Migration(
        version, description, path, checksum, transactional, text, down_path, repeatable, not statements
    )


def _transactional(text: str) -> bool:
    """Tell whether a migration runs in one transaction: yes, unless a first line says no-transaction."""
    return not any(_NO_TRANSACTION.match(line.strip()) for line in text.split("\n", 5)[:5])


def _refuse_statements(text: str, path: str, statements: list[tuple[int, int]], transactional: bool) -> None:
    """Raise BadMigration naming path:line for a statement that copies from or to the client, or that
    begins or ends a transaction in a *transactional* migration.

    COPY FROM STDIN wants the rows sent by the client after the statement (psql reads them from the
    lines that follow, as in pg_dump's output); pgops sends SQL only, so the server would wait for
    data that never comes. COPY TO STDOUT would stream rows back to no one.

    pgops runs a transactional file and its history row in one transaction: a COMMIT inside would
    commit part of the file on its own, and a failure after it would leave that part applied and
    unrecorded. SAVEPOINT, RELEASE and ROLLBACK TO are fine; PL/pgSQL bodies are in dollar quotes,
    which the scanner skips, and a statement never starts with the BEGIN ATOMIC of a SQL-standard body.
    """
    for i, end in statements:
        words = _FIRST_WORDS.match(text, i)
        first, second, third = (w.upper() if w else "" for w in words.groups()) if words else ("", "", "")
        stdio = _COPY_STDIO.search(text, i, end) if first == "COPY" else None
        if stdio is not None:
            what = _SPACES.sub(" ", stdio.group(1)).upper()
            remedy = (
                "load the rows with INSERT statements, or COPY FROM a file on the server"
                if what == "FROM STDIN"
                else "remove it (a migration's output goes nowhere)"
            )
            raise BadMigration(
                f"{path}:{_position(text, i)[0]}: {_first_line(text, i)!r} is COPY {what}, which a migration "
                f"cannot use (pgops sends the file's SQL, and no data after it); {remedy}"
            )
        if transactional and (
            (first == "PREPARE" and second == "TRANSACTION")
            or (
                first in _TRANSACTION_CONTROL
                and not (first == "BEGIN" and second == "ATOMIC")
                and not (first == "ROLLBACK" and "TO" in (second, third))
            )
        ):
            raise BadMigration(
                f"{path}:{_position(text, i)[0]}: {_first_line(text, i)!r} is transaction control in a "
                "migration that pgops runs in one transaction (a COMMIT would commit part of it); remove it, "
                "or put '-- pgops: no-transaction' in the file's first lines to run it statement by statement"
            )


def _first_line(text: str, i: int) -> str:
    """Return the line starting at *i*, cut to 60 characters, to quote a statement in a message."""
    line = text[i:].split("\n", 1)[0].strip()
    return line if len(line) <= 60 else line[:57] + "..."


def load_migrations(directory: str) -> list[Migration]:
    """Read and check every migration in *directory*: versioned ones by version, then repeatable ones
    by name; raise BadMigration naming the first file that cannot be used."""
    return _scan_migrations(directory, strict=True).migrations


@dataclasses.dataclass
class _Folder:
    """A migrations folder as _scan_migrations read it."""

    migrations: list[Migration]  # those that can be used: versioned by version, then repeatable by name
    problems: list[str]  # what is wrong with the others, one line each
    # Versions (with a description) of well-named files that cannot be used: two under one version,
    # or bad content. status shows them as 'invalid', not as missing or changed.
    invalid: dict[int, str]


def _scan_migrations(directory: str, strict: bool = False) -> _Folder:
    """Read every migration in *directory*, whatever is wrong with some of them; *strict*: raise
    BadMigration naming the first file that cannot be used."""
    if not os.path.isdir(directory):
        problem = "is not a directory" if os.path.exists(directory) else "does not exist"
        raise ConfigError(
            f"migrations directory {directory!r} {problem}; pass --dir or set PGOPS_MIGRATIONS_DIR"
        )
    problems: list[str] = []
    invalid: dict[int, str] = {}
    ups: dict[int, list[tuple[str, str, bool]]] = {}
    downs: dict[int, list[str]] = {}
    for filename in sorted(os.listdir(directory)):
        path = os.path.join(directory, filename)
        if not filename.lower().endswith(".sql"):
            continue
        if not os.path.isfile(path):
            if _MIGRATION_FILE.match(filename) is None and _REPEATABLE_FILE.match(filename) is None:
                continue  # a folder such as archive.sql
            # Skipping it would hide a migration, and a later real file would then look out of order.
            problems.append(f"migration {path!r} {_not_a_file(path)}; make it a regular file or remove it")
            continue
        named = _REPEATABLE_FILE.match(filename)
        try:
            if named is not None:
                description, is_down = named["description"], named["down"] is not None
                version = _repeatable_key(description)
                if is_down:
                    raise BadMigration(
                        f"repeatable migration {path!r} cannot have a down file (it is applied again "
                        "whenever it changes); remove it"
                    )
            else:
                version, description, is_down = _parse_migration_name(filename)
        except BadMigration as exc:
            problems.append(str(exc))
            continue
        if is_down:
            downs.setdefault(version, []).append(path)
        else:
            ups.setdefault(version, []).append((path, description, named is not None))
    for version, paths in [*((v, [u[0] for u in f]) for v, f in ups.items()), *downs.items()]:
        if len(paths) > 1:
            problems.append(
                f"migration version {version} is used twice: {paths[0]!r} and {paths[1]!r}; renumber one"
            )
    for version, paths in downs.items():
        if version not in ups:
            problems.append(f"down migration {paths[0]!r} has no matching up migration {version}")
    migrations: list[Migration] = []
    # Versioned files by version, then repeatable ones by name.
    for version, found in sorted(ups.items(), key=lambda item: (item[0] < 0, max(item[0], 0), item[1][0][0])):
        path, description, repeatable = found[0]
        if len(found) > 1 or len(downs.get(version, ())) > 1:
            invalid[version] = description
            continue
        try:
            migration = _read_migration(path, version, description, repeatable, downs.get(version, [None])[0])
        except (BadMigration, OSError) as exc:
            unreadable = (
                f"migration {path!r} cannot be read ({getattr(exc, 'strerror', None) or exc}); fix it"
            )
            problems.append(str(exc) if isinstance(exc, BadMigration) else unreadable)
            invalid[version] = description
            continue
        migrations.append(migration)
    if strict and problems:
        raise BadMigration(problems[0])
    return _Folder(migrations, problems, invalid)


def _repeatable_key(description: str) -> int:
    """Return the history table's version for a repeatable migration: negative, made from its name."""
    import hashlib

    digest = hashlib.sha256(description.encode("utf-8")).digest()
    return -1 - (int.from_bytes(digest[:8], "big") >> 1)


def _refuse_empty(migrations: Iterable[Migration]) -> None:
    """Raise BadMigration naming the first of *migrations*, about to run, that has no SQL statement."""
    empty = next((m.path for m in migrations if m.empty), None)
    if empty is not None:
        raise BadMigration(f"migration {empty!r} has no SQL statement; add one or delete the file")


def _not_a_file(path: str) -> str:
    """Say what a path that is not a regular file is, for an error message."""
    if not os.path.exists(path):  # listed but not there: a dangling symbolic link
        return f"is a symbolic link to {os.readlink(path)!r}, which does not exist"
    return "is a directory" if os.path.isdir(path) else "is not a regular file"


def _scan_sql(text: str) -> Iterator[tuple[int, int, int]]:
    """Yield (start, end, code) for each statement of *text*; the pieces cover the text exactly.

    *code* is where the statement's first word is, after blanks and comments; -1 for a piece with
    nothing to run (blanks, comments, a lone semicolon).

    Semicolons inside quotes, dollar quotes, quoted identifiers, comments, parentheses and BEGIN
    ATOMIC bodies do not end a statement, as in psql.
    """
    n = len(text)
    start = i = 0
    code = -1
    atomic = parens = 0
    while i < n:
        c = text[i]
        if c == "-" and text.startswith("--", i):
            end = text.find("\n", i)
            i = n if end < 0 else end + 1
            continue
        if c == "/" and text.startswith("/*", i):
            i = _skip_comment(text, i)
            continue
        if c.isspace():
            spaces = _SPACES.match(text, i)
            i = spaces.end() if spaces else i + 1
            continue
        if code < 0 and c != ";":  # a semicolon alone ends an empty statement: nothing to run
            code = i
        prev = text[i - 1] if i else " "
        if c == "'":
            escapes = prev in "eE" and (i < 2 or not _is_word_char(text[i - 2]))
            i = _skip_quoted(text, i, "'", escapes)
        elif c == '"':
            i = _skip_quoted(text, i, '"', False)
        elif c == "$" and not _is_word_char(prev):
            match = _DOLLAR_TAG.match(text, i)
            if match:
                end = text.find(match.group(0), match.end())
                i = n if end < 0 else end + len(match.group(0))
            else:
                i += 1
        elif _is_word_char(c) and not _is_word_char(prev):
            run = _WORD.match(text, i)
            word_end = run.end() if run else i + 1
            word = text[i:word_end].upper()
            if (word == "BEGIN" and _ATOMIC.match(text, word_end)) or (atomic and word == "CASE"):
                atomic += 1
            elif atomic and word == "END":
                atomic -= 1
            i = word_end
        elif c in "()":  # psql does not end a statement inside parentheses (CREATE RULE ... DO (a; b))
            parens = parens + 1 if c == "(" else max(parens - 1, 0)
            i += 1
        elif c == ";" and not atomic and not parens:
            yield start, i + 1, code
            start, code, i = i + 1, -1, i + 1
        else:
            i += 1
    if start < n:
        yield start, n, code


def _is_word_char(c: str) -> bool:
    return c.isalnum() or c in "_$"


def _skip_quoted(text: str, i: int, quote: str, escapes: bool) -> int:
    """Return the index after the string or identifier that opens at *i*."""
    # Found with find() and a regex rather than a character loop: a 50 MB literal takes milliseconds.
    n = len(text)
    i += 1
    while True:
        if escapes:
            found = _QUOTE_OR_ESCAPE.search(text, i)
            end = n if found is None else found.start()
        else:
            end = text.find(quote, i)
            end = n if end < 0 else end
        if end >= n:
            return n
        if text[end] == "\\" or text.startswith(quote, end + 1):  # an escape, or a doubled quote
            i = end + 2
        else:
            return end + 1


def _skip_comment(text: str, i: int) -> int:
    """Return the index after the block comment that opens at *i* (they nest, as in PostgreSQL)."""
    depth, i = 1, i + 2
    while depth:
        edge = _COMMENT_EDGE.search(text, i)
        if edge is None:
            return len(text)
        depth, i = depth + (1 if edge.group() == "/*" else -1), edge.end()
    return i


def _split_sql(text: str) -> list[str]:
    """Split SQL text into statements; joining the pieces gives back the text."""
    return [text[start:end] for start, end, _ in _scan_sql(text)]


def _position(text: str, offset: int) -> tuple[int, int]:
    """Return the 1-based (line, column) of a character offset in *text*."""
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


def _statements(migration: Migration) -> Iterator[tuple[int, int, str]]:
    """Yield each statement of a migration's SQL with its offset and its first word's, logged at DEBUG."""
    text = migration.sql
    for start, end, code in _scan_sql(text):
        if code >= 0:
            _logger.debug("%s: %s", migration.name, text[start:end].strip())
            yield start, code, text[start:end]


def _state(
    version: int, migration: Migration | None, row: _Row | None, newest_file: int, floor: int | None
) -> str:
    """Judge a usable file and the history row of its version together: its MigrationStatus.state.

    The one place that tells pending from applied, drift from dirt, for every caller. *newest_file*
    is _newest_file's answer, *floor* _baseline_version's.
    """
    if row is None:
        return "below-baseline" if floor is not None and 0 <= version <= floor else "pending"
    if row.status != "applied":
        return row.status  # failed or running: dirty
    if row.checksum == _BASELINE:
        return "baseline"
    if migration is None:
        # Newer than every file: a newer deploy got here first (Flyway's "future" migrations).
        return "future" if version > newest_file else "missing"
    if migration.checksum == row.checksum:
        return "applied"
    if version < 0:
        return "outdated"  # a repeatable migration changed since it was last applied: changing is its job
    # The applied file was edited, or another migration (another description) took its number.
    return "changed" if migration.description == row.description else "conflict"


def _states(
    files: Iterable[Migration], history: Mapping[int, _Row], invalid: Mapping[int, str] | None = None
) -> Iterator[tuple[int, Migration | None, _Row | None, str]]:
    """Yield (version, file, row, state) for every version of the files and the history, versioned
    ones by version, then the repeatable ones; with *invalid* (versions of files that cannot be
    used), those too, as 'invalid'."""
    by_version = {m.version: m for m in files}
    newest_file, floor = _newest_file(by_version.values()), _baseline_version(history)
    invalid = invalid or {}
    for version in sorted(
        by_version.keys() | history.keys() | invalid.keys(), key=lambda v: (v < 0, max(v, 0))
    ):
        migration, row = by_version.get(version), history.get(version)
        state = "invalid" if version in invalid else _state(version, migration, row, newest_file, floor)
        yield version, migration, row, state


def _newest_file(files: Iterable[Migration]) -> int:
    """Return the highest version among the versioned files (0 when there is none)."""
    return max((m.version for m in files if not m.repeatable), default=0)


def _newest_applied(history: Mapping[int, _Row]) -> int:
    """Return the highest version in the history (a baseline counts; repeatable rows do not)."""
    return max((v for v in history if v >= 0), default=0)


def _baseline_version(history: Mapping[int, _Row]) -> int | None:
    """Return the version that `baseline` recorded, or None."""
    return next(
        (v for v, row in history.items() if row.checksum == _BASELINE and row.status == "applied"), None
    )


def _due(
    files: Sequence[Migration], history: Mapping[int, _Row], target: int | None = None
) -> list[Migration]:
    """Return what migrate applies, in order: the versioned files pending up to *target*, then the
    repeatable ones new or changed since they were last applied, unless *target* is below the newest file.

    No repeatable one while the history holds versions newer than every file here: an older release
    during a rollout must not put its older views and functions back over the newer release's.
    """
    newest_file, floor = _newest_file(files), _baseline_version(history)
    newer = any(v > newest_file and row.checksum != _BASELINE for v, row in history.items())
    repeat = (target is None or target >= newest_file) and not newer
    return [
        m
        for m in files
        if (repeat if m.repeatable else target is None or m.version <= target)
        and _state(m.version, m, history.get(m.version), newest_file, floor) in ("pending", "outdated")
    ]


def _failure(migration: Migration, exc: psycopg2.Error, offset: int, code: int) -> MigrationFailed:
    """Turn a server error in a statement starting at *offset* (its first word at *code*) into a
    path:line:col report."""
    diag = exc.diag
    text = migration.sql
    try:
        position = int(diag.statement_position or 0)
    except ValueError:
        position = 0
    # Without a server position (runtime errors), point at the statement's first word, not at the
    # blank lines and comments that the piece starts with.
    offset = offset + position - 1 if position > 0 else code
    line, column = _position(text, min(offset, len(text)))
    sqlstate = exc.pgcode
    message = diag.message_primary or _scrub(exc)
    # No SQLSTATE: the connection broke (server gone), which the report should not dress up as SQL.
    report = f"{migration.path}:{line}:{column}: {sqlstate or 'connection lost:'} {message}"
    for label, extra in (("detail", diag.message_detail), ("hint", diag.message_hint)):
        if extra:
            report += f" ({label}: {' '.join(extra.split())})"
    return MigrationFailed(
        report, version=migration.version, path=migration.path, line=line, column=column, sqlstate=sqlstate
    )


def _fingerprint(
    history: Mapping[int, _Row], previous: tuple[int, int, int] | None = None, added: int = 0
) -> tuple[int, int, int]:
    """Return (rows, newest version, rows not applied) of a history, as Migrator._locked_history asks
    the server; with *previous*, that fingerprint after applying version *added*.

    Reading every row before every migration made a run quadratic (500 migrations: 3.4 ms each
    instead of 0.6). The fingerprint sees every row added or removed (rollback removes the newest
    first, repair only rows not applied) and every change of status: all that decides what runs next.
    """
    if previous is not None:
        rows, newest, bad = previous
        return rows + 1, max(newest, added), bad
    bad = sum(1 for row in history.values() if row.status != "applied")
    return len(history), max(history, default=0), bad


def _worth_reconnecting(exc: BaseException) -> bool:
    """Tell whether a failed connect may succeed if tried again as it was (a refused option may not)."""
    return is_retryable(exc) and "unsupported startup parameter" not in str(exc)


class _Wait:
    """A runner's wait for other runners: quiet at first, and bounded by the time they show no progress."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.reset()

    def reset(self) -> None:
        """Start afresh: the runner got the lock, and its next wait is a new one."""
        self.started = self.progressed = time.monotonic()
        self.seen: object = object()  # equal to no progress that pause() is shown
        self.reported = -math.inf

    def pause(self, what: str, progress: object) -> None:
        """Sleep a little before the next try, or raise LockTimeout once *progress* stood still too long.

        *progress* is what the other runner shows of its work (its transaction, its statement count,
        or a new object() while its statement runs): while it changes, that runner is getting on,
        and a fleet waiting behind it waits on.
        """
        now = time.monotonic()
        if progress != self.seen:
            self.seen, self.progressed = progress, now
        waited, stalled = now - self.started, now - self.progressed
        if stalled >= self.timeout:
            raise LockTimeout(
                f"gave up after {waited:.1f} s waiting for {what}, {stalled:.1f} s of it without progress; "
                "wait for that run to finish, or raise --lock-timeout"
            )
        if waited - self.reported >= _LOCK_REPORT_EVERY:
            level = logging.WARNING if waited >= _LOCK_QUIET else logging.INFO
            _logger.log(level, "waiting for %s (%.0f s so far)", what, waited)
            self.reported = waited
        time.sleep(min(0.05 + random.random() * 0.25, max(self.timeout - stalled, 0.01)))


class _Announcer:
    """Announce a migration still running after _ANNOUNCE_AFTER seconds, from one thread started on demand.

    An operator reading a Job's log then sees what it is waiting on; quick migrations stay quiet.
    """

    def __init__(self, verb: str) -> None:
        self._verb = verb
        self._cond = threading.Condition()
        self._current: tuple[str, float] | None = None  # name, when to announce it
        self._closed = False
        self._thread: threading.Thread | None = None

    def __enter__(self) -> _Announcer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    @contextlib.contextmanager
    def running(self, name: str) -> Iterator[None]:
        """Announce *name* if the block is still running after _ANNOUNCE_AFTER seconds."""
        with self._cond:
            # No notify: the thread looks at least every _ANNOUNCE_AFTER seconds, and waking it for
            # every migration would cost a thread switch each (a run of 500 small ones: 50 ms).
            self._current = (name, time.monotonic() + _ANNOUNCE_AFTER)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pgops-progress", daemon=True)
                self._thread.start()
        try:
            yield
        finally:
            with self._cond:
                self._current = None

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                if self._current is None:
                    self._cond.wait(_ANNOUNCE_AFTER)
                    continue
                name, due = self._current
                if time.monotonic() < due:
                    self._cond.wait(due - time.monotonic())
                    continue
                _progress.info("%s %s ...", self._verb, name)
                self._current = None


class Migrator:
    """Apply numbered SQL files once each and in order, each in its own transaction under an advisory lock.

    Correct through a transaction pooler (PgBouncer) by construction: each migration's transaction
    takes a transaction-level advisory lock and reads the history again before it applies anything,
    so nothing depends on a server session lasting from one transaction to the next, and no lock can
    be left behind on a pooled server connection. A file that cannot run in a transaction
    (``-- pgops: no-transaction``) is claimed by its history row, with a lease that its runner renews:
    other runners wait while the lease lives and refuse to go on (dirty) once it has run out.
    """

    def __init__(
        self,
        pool_or_dsn: Pool | str,
        directory: str = "migrations",
        *,
        schema: str = "public",
        table: str = "migration_history",
        lock_timeout: float = 60.0,
        statement_lock_timeout: float = 5.0,
        allow_out_of_order: bool = False,
        connect_retry: RetryPolicy | None = None,
        application_name: str = "pgops-migrate",
        connect_timeout: float = _CONNECT_TIMEOUT,
        lease_timeout: float = _LEASE_TIMEOUT,
    ) -> None:
        if isinstance(pool_or_dsn, str):
            _check_dsn(pool_or_dsn)
        _check_seconds("lock_timeout", lock_timeout, positive=False)
        _check_seconds("statement_lock_timeout", statement_lock_timeout, positive=True)
        _check_seconds("connect_timeout", connect_timeout, positive=True)
        _check_seconds("lease_timeout", lease_timeout, positive=True)
        self._source = pool_or_dsn
        self.directory = directory
        self.schema, self.table = schema, table
        self.lock_timeout = lock_timeout
        self.statement_lock_timeout = statement_lock_timeout
        self.allow_out_of_order = allow_out_of_order
        self.connect_retry = connect_retry or RetryPolicy(max_attempts=1)
        self.application_name = application_name
        self.connect_timeout = connect_timeout
        self.lease_timeout = lease_timeout
        self._history = psycopg2.sql.Identifier(schema, table)
        self._active: psycopg2.extensions.connection | None = None  # the migration connection, for cancel
        # Per session (_session): a pooler between pgops and the server; the history table checked;
        # this run's name in the history's runner column.
        self._pooled = False
        self._history_ready = False
        self._runner = ""
        self._sent = 0  # statements of the current no-transaction file sent to the server
        self._at_version = 0  # the database's version when migrate() last found nothing more to do
        self._checked: dict[int, _Row] = {}  # the history as this runner last checked it
        self._print: tuple[int, int, int] = (0, 0, 0)  # and its _fingerprint
        self._warned: set[int] = set()  # repeatable rows without a file, warned about in this session
        import zlib

        self._lock_key = zlib.crc32(f"{schema}.{table}".encode()) & 0x7FFF_FFFF

    @property
    def _dsn(self) -> str:
        return self._source.config._conninfo if isinstance(self._source, Pool) else self._source

    @property
    def where(self) -> str:
        """Say where the migrations go, for messages: the DSN (password redacted) and the history table."""
        return f"{redact_dsn(self._dsn)!r} ({self.schema}.{self.table})"

    def __repr__(self) -> str:
        return f"<Migrator {self.directory!r} -> {self.where}>"

    # -- connections ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def connection(self) -> Iterator[psycopg2.extensions.connection]:
        """Lend a connection for reading, as status() and validate() read: the pool's, else a new one
        (with the migrator's connect_timeout and retries), closed afterwards."""
        pool = self._source if isinstance(self._source, Pool) else None
        conn = self._connect() if pool is None else pool.getconn()
        try:
            yield conn
        finally:
            if pool is None:
                _close_quietly(conn)
            else:
                with contextlib.suppress(psycopg2.Error):
                    conn.rollback()
                pool.putconn(conn)

    def _connect(self) -> psycopg2.extensions.connection:
        """Open a connection of the migrator's own, with its lock_timeout and connect_timeout."""
        dsn = self._dsn
        kwargs = self._connect_kwargs(dsn)
        opened = self._open(dsn, kwargs)
        if isinstance(opened, str) and "unsupported startup parameter" in opened:
            # PgBouncer refuses startup options it is not told to ignore. Every migration's transaction
            # sets lock_timeout itself (SET LOCAL): the startup option is only a second line of defence.
            _logger.debug("the server refused pgops' startup options (a pooler?); retrying without")
            kwargs.pop("options", None)
            opened = self._open(dsn, kwargs)
        if not isinstance(opened, str):
            return opened
        if "unsupported startup parameter" in opened:
            opened += (
                "; add it to the pooler's ignore_startup_parameters, or set PGOPS_MIGRATE_URL to a direct "
                "connection"
            )
        raise CannotConnect(f"cannot connect to {redact_dsn(dsn)!r}: {opened}")

    def _open(self, dsn: str, kwargs: dict[str, Any]) -> psycopg2.extensions.connection | str:
        """Connect, or return why not: one line with no password in it.

        A string, not an exception: the caller raises its error outside any except block, so that
        libpq's text (which may quote the password) is not kept in __context__.
        """
        try:
            conn: psycopg2.extensions.connection = retry_call(
                psycopg2.connect, dsn, policy=self.connect_retry, retry_on=_worth_reconnecting, **kwargs
            )
            return conn
        except psycopg2.OperationalError as exc:
            return _scrub(exc, dsn)

    def _connect_kwargs(self, dsn: str) -> dict[str, Any]:
        """Return the libpq parameters pgops adds to *dsn*: _libpq_defaults and lock_timeout.

        lock_timeout goes in the startup options, which makes it the session's default: the reset
        before each file (RESET ALL) keeps it, and so does a RESET ALL inside a file. libpq reads
        PGOPTIONS only when options is not passed, so pgops keeps the user's options ahead of its own.
        """
        kwargs = _libpq_defaults(dsn, self.application_name, self.connect_timeout)
        options = psycopg2.extensions.parse_dsn(dsn).get("options", os.environ.get("PGOPTIONS", ""))
        lock_timeout_ms = math.ceil(self.statement_lock_timeout * 1000)
        kwargs["options"] = f"{options} -c lock_timeout={lock_timeout_ms}".strip()
        return kwargs

    @contextlib.contextmanager
    def _session(self) -> Iterator[psycopg2.extensions.cursor]:
        """Lend a cursor on an autocommit connection of the migrator's own, for migrate, rollback, repair.

        Never a pool connection, even with a Pool: what the migrations set in their session must not
        reach the application. A pooler between pgops and PostgreSQL shows itself here: the backend
        pid that libpq was given at connect time (PgBouncer makes one up) is not the server's.
        """
        conn = self._connect()
        try:
            conn.autocommit = True
            (pid,) = _fetch_one(conn, "SELECT pg_catalog.pg_backend_pid()")
            self._pooled = pid != conn.info.backend_pid
            if self._pooled:
                _logger.info("a connection pooler sits between pgops and PostgreSQL")
            self._history_ready = False
            self._warned = set()
            self._checked = {}  # the files may have changed since the last run
            self._runner = f"{socket.gethostname()}:{os.getpid()}:{random.getrandbits(16):04x}"
            self._active = conn
            yield conn.cursor()
        finally:
            self._active = None
            _close_quietly(conn)

    def cancel(self) -> None:
        """Ask the server to cancel the statement that migrate, rollback or repair is running.

        Safe from any thread (a signal watcher, say); the run then fails with MigrationFailed (57014).
        """
        conn = self._active
        if conn is not None and not conn.closed:
            with contextlib.suppress(psycopg2.Error):
                conn.cancel()

    # -- the lock ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self, cur: psycopg2.extensions.cursor, wait: _Wait) -> Iterator[dict[int, _Row]]:
        """Run a block in a transaction that holds the migration lock, with the history read inside it.

        The block may COMMIT itself (a migration folds it into its last round trip); what is still
        open at the end is committed, and an error rolls all of it back.
        """
        conn = cur.connection
        try:
            yield self._locked_history(cur, wait)
        except BaseException:
            if not conn.closed and conn.info.transaction_status != _STATUS_IDLE:
                with contextlib.suppress(psycopg2.Error):
                    cur.execute("ROLLBACK")
            raise
        if conn.info.transaction_status != _STATUS_IDLE:
            cur.execute("COMMIT")

    def _locked_history(self, cur: psycopg2.extensions.cursor, wait: _Wait) -> dict[int, _Row]:
        """BEGIN, take the migration lock for the transaction, and read the history, waiting for others.

        It waits while another transaction holds the lock, and while another runner's no-transaction
        file holds a live lease. READ COMMITTED whatever the database's default: the history must be
        read with a snapshot taken after the lock was granted, which a REPEATABLE READ transaction
        took before it. For the same reason the lock is taken by one statement and the history's
        fingerprint read by the next (each statement of a READ COMMITTED transaction has a snapshot
        of its own), all in one round trip with the session reset and lock_timeout. The first tells
        the second whether it got the lock in a setting local to the transaction (pg_locks would
        tell too, at a cost that grows with every lock on a busy server).
        """
        reset = _RESET_POOLED if self._pooled else _RESET_SESSION
        timeout = f"{math.ceil(self.statement_lock_timeout * 1000)}ms"
        while True:
            fingerprint = (
                ", count(*)::int, coalesce(max(version), 0), "
                "count(*) FILTER (WHERE status <> 'applied')::int FROM {}"
                if self._checked
                else ""
            )
            cur.execute(
                self._sql(
                    f"BEGIN ISOLATION LEVEL READ COMMITTED; {reset}; SET LOCAL lock_timeout = %s; "
                    "SELECT pg_catalog.set_config('pgops.locked', "
                    "pg_catalog.pg_try_advisory_xact_lock(%s, %s)::text, true); "
                    "SELECT pg_catalog.current_setting('pgops.locked')::boolean" + fingerprint
                ),
                (timeout, _LOCK_CLASS, self._lock_key),
            )
            row = cur.fetchone()
            busy: tuple[str, object] | None
            if row is not None and row[0]:
                if self._ensure_history(cur):
                    cur.execute("COMMIT")  # the table stays, whatever becomes of the first migration
                    continue
                if self._checked and tuple(row[1:]) == self._print:
                    return self._checked  # as this runner left it and checked it: nothing is running
                history = self._history_rows(cur, known=True)
                self._print = _fingerprint(history)
                busy = self._live_lease(history)
                if busy is None:
                    wait.reset()
                    return history
            else:
                busy = self._lock_holder(cur)
            cur.execute("ROLLBACK")
            wait.pause(*busy)

    def _lock_holder(self, cur: psycopg2.extensions.cursor) -> tuple[str, object]:
        """Describe the session that holds the migration lock in this database, and its progress."""
        cur.execute(
            "SELECT a.pid, a.application_name, a.backend_start, l.virtualtransaction, "
            "a.state = 'active' AND a.wait_event_type IS DISTINCT FROM 'Lock' "
            "FROM pg_catalog.pg_locks l JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.granted AND l.classid = %s AND l.objid = %s "
            "AND l.objsubid = 2 AND l.database = "
            "(SELECT oid FROM pg_catalog.pg_database WHERE datname = pg_catalog.current_database())",
            (_LOCK_CLASS, self._lock_key),
        )
        row = cur.fetchone()
        lock = f"the migration lock on {self.schema}.{self.table}"
        if row is None:
            return f"{lock} (another session has just released it)", None
        since = row[2].isoformat(timespec="seconds") if row[2] is not None else "unknown"
        holder = f"pid {row[0]} (application_name {row[1]!r}, connected since {since})"
        # A holder running a statement (not waiting for a lock) is at work: that is progress too.
        return f"{lock}, held by {holder}", object() if row[4] else (row[0], row[3])

    def _live_lease(self, history: dict[int, _Row]) -> tuple[str, object] | None:
        """Describe another runner's no-transaction file whose lease is live, and its progress; or None."""
        for version, row in history.items():
            if row.status == "running" and row.live:  # a live lease is renewed by a runner at work: progress
                return (
                    f"migration {version} ({row.description}), running without a transaction in {row.runner}",
                    object(),
                )
        return None

    # -- history -------------------------------------------------------------------------------

    def _ensure_history(self, cur: psycopg2.extensions.cursor) -> bool:
        """Create the history table, and its schema, if missing; give an older table the lease columns.

        Only what is missing: CREATE ... IF NOT EXISTS checks the CREATE privilege before it looks,
        and a migration user rarely has it on the schema (PostgreSQL 15 took it from PUBLIC on public).
        Once per session, under the migration lock; return whether anything was changed.
        """
        if self._history_ready:
            return False
        cur.execute(
            "SELECT to_regnamespace(format('%%I', %s::text)) IS NOT NULL, t IS NOT NULL, "
            "(SELECT count(*) FROM pg_catalog.pg_attribute WHERE attrelid = t "
            "AND attname IN ('runner', 'lease_until') AND NOT attisdropped) "
            "FROM to_regclass(format('%%I.%%I', %s::text, %s::text)) AS t",
            (self.schema, self.schema, self.table),
        )
        schema_exists, table_exists, lease_columns = cur.fetchone() or (False, False, 0)
        if not table_exists:
            if not schema_exists:
                schema = psycopg2.sql.Identifier(self.schema)
                cur.execute(psycopg2.sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(schema))
            create = (
                "CREATE TABLE IF NOT EXISTS {} (version bigint PRIMARY KEY, description text NOT NULL, "
                "checksum text NOT NULL, status text NOT NULL CHECK (status IN ('applied', 'failed', "
                "'running')), applied_at timestamptz NOT NULL DEFAULT now(), execution_ms double precision, "
                "applied_by text NOT NULL DEFAULT current_user, error text, "
                "progress integer NOT NULL DEFAULT 0, runner text, lease_until timestamptz)"
            )
            cur.execute(self._sql(create))
        elif lease_columns < 2:  # a table made by pgops 0.1, before no-transaction files were leased
            self._add_lease_columns(cur)
        self._history_ready = True
        return not table_exists or lease_columns < 2

    def _add_lease_columns(self, cur: psycopg2.extensions.cursor) -> None:
        """Give a history table from pgops 0.1 its runner and lease_until columns, or say who must."""
        alter = self._sql(
            "ALTER TABLE {} ADD COLUMN IF NOT EXISTS runner text, "
            "ADD COLUMN IF NOT EXISTS lease_until timestamptz"
        )
        try:
            cur.execute(alter)
            return
        except psycopg2.Error as exc:
            reason = _scrub(exc)
        raise MigrationError(
            f"{self.schema}.{self.table} needs two new columns and this user could not add them ({reason}); "
            f"have the table's owner run: {alter.as_string(cur)}; then migrate again"
        )

    def _sql(self, text: str) -> psycopg2.sql.Composed:
        """Return the statement *text* with its ``{}`` made the history table, quoted as identifiers."""
        return psycopg2.sql.SQL(text).format(self._history)

    def _history_rows(self, cur: psycopg2.extensions.cursor, *, known: bool = False) -> dict[int, _Row]:
        """Return the history rows by version.

        Without *known*, an absent table reads as an empty history. With it (under the lock, once
        _ensure_history has run) each row also holds its runner and whether its lease is live: read
        in the same statement, so that a row and its lease are seen at one moment.
        """
        if not known:
            cur.execute("SELECT to_regclass(%s)", (self._history.as_string(cur),))
            row = cur.fetchone()
            if row is None or row[0] is None:
                return {}
        # Under the lock this runs before every migration: only what the decisions need, no timestamps.
        columns = (
            "applied_at, execution_ms, applied_by, error"
            if not known
            else "NULL, NULL, NULL, error, runner, coalesce(lease_until > clock_timestamp(), false)"
        )
        cur.execute(
            self._sql(f"SELECT version, description, checksum, status, {columns} FROM {{}} ORDER BY version")
        )
        return {int(r[0]): _Row(*r[1:]) for r in cur.fetchall()}

    # -- reading -------------------------------------------------------------------------------

    def _read(self, *, strict: bool = True) -> tuple[_Folder, dict[int, _Row]]:
        """Read the files (*strict*: refusing a bad one, as migrate does), then the history, unlocked."""
        return _scan_migrations(self.directory, strict), self._read_history()

    def _read_history(self) -> dict[int, _Row]:
        """Read the history through a lent connection, without the lock."""
        with self.connection() as conn:
            return self._history_rows(conn.cursor())

    def _problems(
        self, files: list[Migration], history: Mapping[int, _Row], invalid: Container[int] = ()
    ) -> tuple[list[str], list[str], list[str]]:
        """Return what stops a migrate: dirty rows, drift (changed, conflicting and missing files) and
        pending files out of order. Future rows and repeatable rows without a file are logged.

        Versions in *invalid* have a file that cannot be used, reported as such: not judged for drift.
        """
        dirty: list[str] = []
        drift: list[str] = []
        where = f"{self.schema}.{self.table}"
        for version, migration, row, state in _states(files, history):
            if row is None or (version in invalid and state not in ("failed", "running")):
                continue
            if state == "running":
                runner = f" by {row.runner}" if row.runner else ""
                # Under the lock a live lease is waited for, never reported; read without it, unknown.
                why = (
                    " and its lease has run out: it ran without a transaction and was cut off part-way (if "
                    "that runner is still at work, it lost touch with the database: wait for it); check "
                    "what it did, then run repair"
                    if row.live is False
                    else ": a no-transaction file that a runner may still be applying (its lease was "
                    "not read), or one cut off part-way; if no runner is at work, check what it did, then "
                    "run repair"
                )
                dirty.append(
                    f"migration {version} ({row.description}) is marked running{runner} in {where}{why}"
                )
            elif state == "failed":
                error = f": {_scrub(row.error)}" if row.error else ""  # one line, as every problem
                dirty.append(
                    f"migration {version} ({row.description}) is failed in {where}{error}; fix its SQL, "
                    "undo what it did, then run repair"
                )
            elif state == "missing" and version < 0:
                if version not in self._warned:
                    self._warned.add(version)  # once per run, not once per repeatable applied
                    _logger.warning(
                        "repeatable migration R__%s.sql was applied but has no file here; repair forgets it",
                        row.description,
                    )
            elif state == "future":  # a newer deploy's, or this is an older replica: not ours to judge
                _logger.warning(
                    "migration %d (%s) is applied but newer than every file here", version, row.description
                )
            elif state == "missing":
                drift.append(
                    f"applied migration {version} ({row.description}) has no file in {self.directory!r}; "
                    "restore it"
                )
            elif state == "changed" and migration is not None:
                drift.append(
                    f"migration {migration.path!r} changed after it was applied (checksum "
                    f"{row.checksum[:12]} in the database, {migration.checksum[:12]} on disk); "
                    "restore the file, or run repair to accept it"
                )
            elif state == "conflict" and migration is not None:
                drift.append(
                    f"migration {migration.path!r} is a different migration from the one applied as "
                    f"version {version} ({row.description!r}, not {migration.description!r}); give the file "
                    f"a version above {_newest_applied(history)}, or restore the file of {row.description!r}"
                )
        highest = _newest_applied(history)
        order = [
            f"pending migration {m.path!r} is older than applied version {highest}; renumber it above "
            f"{highest}, or pass --allow-out-of-order"
            for m in _due(files, history)
            if not m.repeatable and m.version < highest and not self.allow_out_of_order
        ]
        return dirty, drift, order

    def _refuse_unsafe(self, files: list[Migration], history: Mapping[int, _Row]) -> None:
        """Raise what _problems finds first: DirtyDatabase, ChecksumMismatch, or MigrationError (order)."""
        dirty, drift, order = self._problems(files, history)
        for problems, error in (
            (dirty[:1], DirtyDatabase),
            (drift, ChecksumMismatch),
            (order, MigrationError),
        ):
            if problems:
                raise error("; ".join(problems))

    def status(self) -> list[MigrationStatus]:
        """Return every migration and its state, as MigrationStatus.state lists them.

        Files that cannot be used are left out rather than refused: validate() names them.
        """
        folder, history = self._read(strict=False)
        rows: list[MigrationStatus] = []
        for version, migration, row, state in _states(folder.migrations, history, folder.invalid):
            description = folder.invalid.get(version) or (migration.description if migration else "")
            row = row or _Row(description, "", "")
            at = row.applied_at.isoformat(timespec="seconds") if row.applied_at is not None else None
            shown = version if version >= 0 else None  # None: a repeatable migration
            extra = (row.execution_ms, row.applied_by, row.error)
            rows.append(MigrationStatus(shown, row.description, state, at, *extra))
        # Versioned migrations by version, then repeatable ones by name.
        return sorted(rows, key=lambda r: (r.version is None, r.version or 0, r.description))

    def pending(self) -> list[Migration]:
        """Return what migrate() would apply: versioned migrations in order, then repeatable ones."""
        folder, history = self._read()
        return _due(folder.migrations, history)

    def validate(self) -> list[str]:
        """Return what would stop migrate (bad files, drift, missing files, failed runs); empty when all
        is well. A pending file with no statement yet (a fresh ``new``) is not a problem here."""
        folder, history = self._read(strict=False)
        dirty, drift, order = self._problems(folder.migrations, history, folder.invalid)
        return folder.problems + drift + dirty + order

    # -- applying ------------------------------------------------------------------------------

    def migrate(
        self,
        target: int | None = None,
        dry_run: bool = False,
        *,
        on_done: Callable[[Migration, float], None] | None = None,
    ) -> list[Migration]:
        """Apply pending migrations up to *target* (all by default) and return those applied.

        Repeatable migrations (R__name.sql) new or changed since last applied follow the versioned
        ones, in name order, unless a *target* below the newest file stops short of them.
        *on_done(migration, ms)* is called after each one is applied.
        """
        if target is not None and target < 0:
            raise ConfigError(
                f"target version {target} is negative; pass a migration's version, or none for all"
            )
        files = load_migrations(self.directory)
        if dry_run or any(m.empty for m in files):
            # An empty file due is refused before the session, which would create the history table.
            history = self._read_history()
            if dry_run:
                self._refuse_unsafe(files, history)
            _refuse_empty(due := _due(files, history, target))
            if dry_run:
                return due
        by_version = {m.version: m for m in files}
        with self._session() as cur, _Announcer("applying") as announcer:
            wait = _Wait(self.lock_timeout)
            # The versioned migrations, then the repeatable ones: each step applies one, or None.
            steps = [functools.partial(self._apply_next, cur, files, target, wait, announcer)]
            if target is None or target >= _newest_file(files):
                steps.append(functools.partial(self._apply_next, cur, files, target, wait, announcer, set()))
            return self._run_steps(steps, by_version, "applied", on_done)

    def _run_steps(
        self,
        steps: Sequence[Callable[[], tuple[Migration, float] | None]],
        running: Mapping[int, Migration],
        verb: str,
        on_done: Callable[[Migration, float], None] | None,
    ) -> list[Migration]:
        """Call each step until it returns None; return the migrations the steps applied or reverted.

        A step whose transactional file (in *running*, by version) timed out waiting for a table lock
        (55P03) left nothing behind: it runs again. A no-transaction file retries its statement itself.
        """

        def rolled_back_whole(exc: BaseException) -> bool:
            if not isinstance(exc, MigrationFailed) or exc.sqlstate != "55P03" or exc.version is None:
                return False
            return exc.version in running and running[exc.version].transactional

        done: list[Migration] = []
        for step in steps:
            while (result := retry_call(step, policy=_LOCK_RETRY, retry_on=rolled_back_whole)) is not None:
                migration, elapsed = result
                _logger.info("%s migration %s (%.1f ms)", verb, migration.name, elapsed)
                done.append(migration)
                if on_done is not None:
                    on_done(migration, elapsed)
        return done

    def _apply_next(
        self,
        cur: psycopg2.extensions.cursor,
        files: list[Migration],
        target: int | None,
        wait: _Wait,
        announcer: _Announcer,
        repeated: set[int] | None = None,
    ) -> tuple[Migration, float] | None:
        """Apply the next versioned migration due in one locked transaction, or with *repeated* the next
        repeatable one not in it (each once per run); None when there is none.

        A repeatable row changes in place (its checksum), which the history's fingerprint does not
        see: for those the history is read in full each time.
        """
        if repeated is not None:
            self._checked = {}
        with self._transaction(cur, wait) as history:
            due = [m for m in _due(files, history, target) if m.repeatable == (repeated is not None)]
            due = [m for m in due if m.version not in (repeated or ())]
            if history is not self._checked:  # else: as this runner left it, and checked then
                self._refuse_unsafe(files, history)
                _refuse_empty(due)
            if not due:
                self._at_version = _newest_applied(history)  # with other runners, maybe above ours
                return None
            migration = due[0]
            elapsed = self._apply(cur, migration, announcer)
            if repeated is not None:
                repeated.add(migration.version)
            elif migration.transactional:  # else its row holds its progress: read and check it again
                # The history as the next read will find it unless another runner changes it meanwhile.
                history[migration.version] = _Row(migration.description, migration.checksum, "applied")
                self._checked, self._print = history, _fingerprint(history, self._print, migration.version)
            else:
                self._checked = {}
            return migration, elapsed

    def _apply(
        self, cur: psycopg2.extensions.cursor, migration: Migration, announcer: _Announcer, down: bool = False
    ) -> float:
        """Run a migration's SQL as its first lines ask and record it applied (a *down* file: reverted),
        announced if it runs long; return how long it took, in ms."""
        started = time.perf_counter()
        with announcer.running(migration.name):
            run = self._run_in_transaction if migration.transactional else self._run_statements
            run(cur, migration, down)
        return (time.perf_counter() - started) * 1000.0

    def _run_in_transaction(self, cur: psycopg2.extensions.cursor, migration: Migration, down: bool) -> None:
        """Run the SQL in the locked transaction, record it, and COMMIT; an error rolls all of it back."""
        started = time.perf_counter()
        for start, code, statement in _statements(migration):
            try:
                cur.execute(statement)
            except psycopg2.Error as exc:
                raise _failure(migration, exc, start, code) from None
        change, values = self._history_change(migration, down, (time.perf_counter() - started) * 1000.0)
        # The history change is made as the connecting user, whatever role the file set, and what the
        # file set for the session is undone before COMMIT makes it stick: behind a transaction pooler
        # the server session goes to other clients next. One round trip with the change and COMMIT.
        reset_and_commit = psycopg2.sql.SQL("SET SESSION AUTHORIZATION DEFAULT; RESET ALL; {}; COMMIT")
        cur.execute(reset_and_commit.format(change), values)

    def _run_statements(self, cur: psycopg2.extensions.cursor, migration: Migration, down: bool) -> None:
        """Claim a no-transaction file, then run it statement by statement, outside the lock.

        The claim, a 'running' history row naming this runner with a lease that a thread renews, is
        committed in the locked transaction that read the history: one runner claims a file, and the
        others wait while its lease lives. Before each statement and at the end the runner checks
        that the claim is still its own, a fencing token: if repair removed it, nothing more runs.
        """
        started = time.perf_counter()
        if down:
            claim = (
                "UPDATE {} SET status = 'running', runner = %s, progress = 0, error = NULL, "
                f"lease_until = {_LEASE_END} WHERE version = %s"
            )
            values: tuple[Any, ...] = (self._runner, self.lease_timeout, migration.version)
        else:
            claim = (
                "INSERT INTO {} (version, description, checksum, status, runner, lease_until) VALUES "
                f"(%s, %s, %s, 'running', %s, {_LEASE_END})"
            )
            values = (migration.version, migration.description, migration.checksum)
            values += (self._runner, self.lease_timeout)
        # The lease is renewed on a connection of its own, opened before the claim, from a thread: a
        # runner that cannot open it (a role's CONNECTION LIMIT, say) claims nothing, instead of
        # letting its lease lapse while it works and the others call the database dirty.
        renewer, stop = self._connect(), threading.Event()
        renew = threading.Thread(
            target=self._renew, args=(migration.version, renewer, stop), name="pgops-lease", daemon=True
        )
        self._sent = 0
        try:
            cur.execute(self._sql(claim + "; COMMIT"), values)
            renew.start()
            try:
                if not self._pooled:  # outside a transaction, a pooled session would be someone else's
                    cur.execute(_RESET_SESSION)
                self._run_each(cur, migration, down)
            finally:
                stop.set()
                renew.join()
            ms = (time.perf_counter() - started) * 1000.0
            cur.execute(*self._history_change(migration, down, ms, claimed=True))
            if cur.rowcount != 1:
                raise self._claim_lost(migration)
        except BaseException as exc:
            self._abandon(cur, migration, down, exc)
            raise
        finally:
            _close_quietly(renewer)

    def _history_change(
        self, migration: Migration, down: bool, ms: float, *, claimed: bool = False
    ) -> tuple[psycopg2.sql.Composable, tuple[Any, ...]]:
        """Return the statement and parameters that record a migration as applied, or as reverted.

        *claimed*: a no-transaction file, whose row this runner claimed; the change needs the claim.
        """
        where = _CLAIMED if claimed else "version = %s"
        key: tuple[Any, ...] = (migration.version, self._runner) if claimed else (migration.version,)
        if down:
            return self._sql(f"DELETE FROM {{}} WHERE {where}"), key
        if claimed:
            sql = f"UPDATE {{}} SET status = 'applied', execution_ms = %s, lease_until = NULL WHERE {where}"
            return self._sql(sql), (ms, *key)
        sql = (
            "INSERT INTO {} (version, description, checksum, status, execution_ms, runner) "
            "VALUES (%s, %s, %s, 'applied', %s, %s)"
        )
        if migration.repeatable:  # applied again: the row of its last application is replaced
            sql += (
                " ON CONFLICT (version) DO UPDATE SET description = EXCLUDED.description, "
                "checksum = EXCLUDED.checksum, applied_at = now(), execution_ms = EXCLUDED.execution_ms, "
                "applied_by = current_user, runner = EXCLUDED.runner"
            )
        values = (migration.version, migration.description, migration.checksum, ms, self._runner)
        return self._sql(sql), values

    def _renew(self, version: int, conn: psycopg2.extensions.connection, stop: threading.Event) -> None:
        """Extend the lease every third of lease_timeout; if the claim is gone, cancel the statement."""
        conn.autocommit = True
        renew = self._sql(f"UPDATE {{}} SET lease_until = {_LEASE_END} WHERE {_CLAIMED}")
        renewed = time.monotonic()
        while not stop.wait(self.lease_timeout / 3):
            try:
                if conn.closed:
                    conn = self._connect()
                    conn.autocommit = True
                cur = conn.cursor()
                cur.execute(renew, (self.lease_timeout, version, self._runner))
                if cur.rowcount == 0 and not stop.is_set():
                    _logger.error("the claim on migration %d is gone (repair?); cancelling it", version)
                    self.cancel()
                    return
                renewed = time.monotonic()
            except (psycopg2.Error, PgOpsError) as exc:
                # Past two thirds of the lease the others are about to see the file as abandoned.
                late = time.monotonic() - renewed > self.lease_timeout * 2 / 3
                _logger.log(
                    logging.ERROR if late else logging.WARNING,
                    "could not renew the claim on migration %d (%s)%s",
                    version,
                    _scrub(exc),
                    "; other runners will soon take it for abandoned" if late else "",
                )
                _close_quietly(conn)

    def _fence(self, cur: psycopg2.extensions.cursor, migration: Migration, done: int) -> None:
        """Check that this runner still holds its claim on *migration*, and record its progress."""
        fence = f"UPDATE {{}} SET progress = %s, lease_until = {_LEASE_END} WHERE {_CLAIMED}"
        cur.execute(self._sql(fence), (done, self.lease_timeout, migration.version, self._runner))
        if cur.rowcount != 1:
            raise self._claim_lost(migration)

    def _claim_lost(self, migration: Migration) -> MigrationFailed:
        return MigrationFailed(
            f"{migration.path}: this run's claim on migration {migration.version} is gone (repair removed "
            "it, or its lease ran out while the run was cut off); it stopped part-way: check what it did, "
            "then run repair",
            version=migration.version,
            path=migration.path,
        )

    def _abandon(
        self, cur: psycopg2.extensions.cursor, migration: Migration, down: bool, exc: BaseException
    ) -> None:
        """After a no-transaction file stopped: give the claim back if nothing ran, else end its lease.

        Either way the other runners stop waiting at once: for the file (nothing ran), or to refuse
        to go on (dirty) rather than run a half-done file again.
        """
        if self._sent == 0:  # stopped before its first statement: as if it had never been claimed
            release = (
                f"UPDATE {{}} SET status = 'applied', lease_until = NULL WHERE {_CLAIMED}"
                if down
                else f"DELETE FROM {{}} WHERE {_CLAIMED}"
            )
            with contextlib.suppress(psycopg2.Error):
                cur.execute(self._sql(release), (migration.version, self._runner))
            return
        state = "running"  # what the row says when the connection is gone, and with it the lease's end
        end_lease = (
            "UPDATE {} SET lease_until = pg_catalog.clock_timestamp() WHERE version = %s AND runner = %s"
        )
        with contextlib.suppress(psycopg2.Error):
            cur.execute(self._sql(end_lease + " RETURNING status"), (migration.version, self._runner))
            row = cur.fetchone()
            if row is None or row[0] == "applied":
                return  # done after all, or repair took the row: nothing is left half-way
            state = row[0]
        if isinstance(exc, MigrationFailed) and exc.sqlstate not in (None, "57014"):
            return  # a statement failed: its report says so, and the row says 'failed'
        _logger.error(
            "%s ran without a transaction and was cut off part-way; it is left %s in %s.%s: check what "
            "it did, then run repair",
            migration.path,
            state,
            self.schema,
            self.table,
        )

    def _run_each(self, cur: psycopg2.extensions.cursor, migration: Migration, down: bool) -> None:
        """Run the statements of a no-transaction file; on failure mark its history row failed."""
        for done, (start, code, statement) in enumerate(_statements(migration)):
            self._fence(cur, migration, done)
            try:
                self._sent += 1
                # In autocommit a statement that timed out waiting for a lock did nothing: retry it.
                retry_call(
                    cur.execute, statement, policy=_LOCK_RETRY, retry_on=lambda e: _sqlstate(e) == "55P03"
                )
            except psycopg2.Error as exc:
                failure = _failure(migration, exc, start, code)
                error = f"{'rollback failed: ' if down else ''}{failure}"
                # Up or down, part of the file has run: the row says so, and migrate refuses until
                # repair. If the connection is gone the row stays 'running', which is just as dirty.
                with contextlib.suppress(psycopg2.Error):
                    failed = self._sql(f"UPDATE {{}} SET status = 'failed', error = %s WHERE {_CLAIMED}")
                    cur.execute(failed, (error, migration.version, self._runner))
                raise failure from None

    def rollback(
        self, target: int | None = None, *, on_done: Callable[[Migration, float], None] | None = None
    ) -> list[Migration]:
        """Revert applied migrations above *target* with their .down.sql files, newest first.

        Without a target, the newest applied migration alone (dbmate's rollback, alembic's
        ``downgrade -1``). The version the database is now at is in ``at_version`` afterwards.
        *on_done(migration, ms)* is called after each one is reverted. A down file that times out
        waiting for a table lock (55P03) is rolled back and tried again, as migrate does.
        """
        if target is not None and target < 0:
            raise ConfigError(f"cannot roll back to version {target}; pass an applied version, or 0 for all")
        files = {m.version: m for m in load_migrations(self.directory)}
        downs: dict[int, Migration] = {}  # by version: those still to run, all read before the first runs
        end: int | None = None  # where the rollback ends: *target*, checked under the lock

        def revert_one(
            cur: psycopg2.extensions.cursor, wait: _Wait, announcer: _Announcer
        ) -> tuple[Migration, float] | None:
            nonlocal end
            with self._transaction(cur, wait) as history:
                self._refuse_unsafe(list(files.values()), history)
                if end is None:
                    end = _rollback_target(target, history)
                    self._at_version = max(end, 0)
                    downs.update(self._down_files(end, files, history))
                version = max((v for v in history if v > end), default=None)
                if version is None:
                    return None
                if version not in downs:
                    # Rollback takes the lock once per version: a migrate in between re-applied it.
                    raise MigrationError(
                        f"migration {version} was applied by another run during this rollback; "
                        "stop the migrate runs, then run rollback again"
                    )
                elapsed = self._apply(cur, downs[version], announcer, down=True)
            del downs[version]
            return files[version], elapsed

        with self._session() as cur, _Announcer("reverting") as announcer:
            wait = _Wait(self.lock_timeout)
            done = self._run_steps(
                [functools.partial(revert_one, cur, wait, announcer)], downs, "reverted", on_done
            )
            if done:
                self._forget_repeatables(cur, wait)
        return done

    def _forget_repeatables(self, cur: psycopg2.extensions.cursor, wait: _Wait) -> None:
        """Forget every repeatable migration after a rollback, so that the next migrate applies them again.

        A down file may have dropped what they made (a view on a dropped table goes with CASCADE);
        they are written to run again, and nothing tells which ones a rollback touched.
        """
        with self._transaction(cur, wait):
            cur.execute(self._sql("DELETE FROM {} WHERE version < 0"))
            if cur.rowcount:
                _logger.info(
                    "forgot %d repeatable migration(s): the next migrate applies them again", cur.rowcount
                )

    def _down_files(
        self, target: int, files: dict[int, Migration], history: dict[int, _Row]
    ) -> dict[int, Migration]:
        """Return the down migration of every version above *target*: all read and checked before any runs."""
        victims = sorted(v for v in history if v > target)
        unknown = [str(v) for v in victims if v not in files]
        if unknown:
            raise BadMigration(
                f"cannot roll back to {target}: migration(s) {', '.join(unknown)} are applied but "
                f"have no file in {self.directory!r}; roll back from the release that has them"
            )
        missing = [files[v].path for v in victims if files[v].down_path is None]
        if missing:
            raise BadMigration(
                f"cannot roll back to {target}: no .down.sql for {', '.join(map(repr, missing))}; "
                "write them first"
            )
        downs = {v: _read_migration(files[v].down_path or "", v, files[v].description) for v in victims}
        _refuse_empty(downs.values())
        return downs

    @property
    def at_version(self) -> int:
        """The database's version when the last migrate() ended, or where the last rollback() went."""
        return self._at_version

    def baseline(self, version: int) -> None:
        """Record that the database is already at *version*: files up to it are never run.

        For a database made before pgops (Flyway's baseline, alembic's stamp). Refused once the
        history records any migration. The row has checksum 'baseline'; status() shows it as
        ``baseline`` and the files at or under it as ``below-baseline``.
        """
        if not 0 <= version <= _MAX_VERSION:
            raise ConfigError(f"baseline version {version} is out of range; pass a version of 0 or more")
        migration = next((m for m in load_migrations(self.directory) if m.version == version), None)
        if migration is None:
            # Else the next file `new` writes could be numbered at or under V, and never run.
            raise ConfigError(
                f"cannot baseline at version {version}: there is no migration {version} in "
                f"{self.directory!r}; baseline at the version of an existing file (one that creates the "
                "schema as it is, for new databases), so that newer files are numbered above it"
            )
        with self._session() as cur, self._transaction(cur, _Wait(self.lock_timeout)) as history:
            recorded = sorted(v for v in history if v >= 0)
            if recorded:
                raise ConfigError(
                    f"cannot baseline {self.schema}.{self.table} at {version}: it already records "
                    f"migration(s) {recorded[0]}..{recorded[-1]}; baseline is for a database pgops has "
                    "not migrated yet"
                )
            cur.execute(*self._history_change(dataclasses.replace(migration, checksum=_BASELINE), False, 0.0))
        self._at_version = version
        _logger.info("baseline: %s.%s is now at version %d", self.schema, self.table, version)

    def repair(self) -> list[str]:
        """Remove failed and running rows and accept changed checksums; return what was done.

        Also forgets repeatable migrations whose file is gone. A baseline row is left as it is.
        """
        files = load_migrations(self.directory)
        actions: list[str] = []
        with self._session() as cur, self._transaction(cur, _Wait(self.lock_timeout)) as history:
            states = list(_states(files, history))
            if any(state == "conflict" for *_, state in states):
                # Accepting its checksum would mark another migration applied without running it.
                drift = self._problems(files, history)[1]
                raise ChecksumMismatch("; ".join(drift) + "; repair accepts edits, not other migrations")
            delete, accept = (
                "DELETE FROM {} WHERE version = %s",
                "UPDATE {} SET checksum = %s WHERE version = %s",
            )
            for version, migration, row, state in states:
                if row is not None and state in ("failed", "running"):
                    cur.execute(self._sql(delete), (version,))
                    actions.append(f"removed the {state} row of migration {version} ({row.description})")
                elif row is not None and state == "missing" and version < 0:
                    cur.execute(self._sql(delete), (version,))
                    actions.append(
                        f"forgot repeatable migration R__{row.description}.sql, whose file is gone"
                    )
                elif state == "changed" and migration is not None:
                    cur.execute(self._sql(accept), (migration.checksum, version))
                    actions.append(f"accepted the changed checksum of {migration.path!r}")
        for action in actions:
            _logger.info("repair: %s", action)
        return actions


def _rollback_target(target: int | None, history: Mapping[int, _Row]) -> int:
    """Return where a rollback ends: *target* checked, or the version below the newest applied one.

    Raise ConfigError unless it is 0 or an applied version, at or above any baseline.
    """
    current = _newest_applied(history)
    floor = _baseline_version(history)
    if target is None:
        if not any(v >= 0 for v in history):
            raise ConfigError("nothing to roll back: no migration is applied")
        if current == floor:
            raise ConfigError(
                f"nothing to roll back: the database is at its baseline, version {floor} (files up to it "
                "were never run by pgops)"
            )
        # Below the newest; -1 when that is version 0 (a file 0000_x.sql): "--to 0" would keep it.
        return max((v for v in history if 0 <= v < current), default=-1 if current == 0 else 0)
    if floor is not None and target < floor:
        raise ConfigError(
            f"cannot roll back to version {target}: the database was baselined at {floor} and pgops never "
            f"ran the files below it; pass {floor} or above"
        )
    if target == 0 or target in history:
        return target
    if target > current:
        raise ConfigError(
            f"cannot roll back to version {target}: the database is at version {current}; "
            "pass an applied version below it, or 0 to revert everything"
        )
    below = max((v for v in history if 0 <= v < target), default=0)
    raise ConfigError(
        f"cannot roll back to version {target}: it is not applied; pass an applied version "
        f"(the nearest below is {below}), or 0 to revert everything"
    )


# ================================================================================================
# Schema checks
# ================================================================================================

_VECTOR_INDEX_LIMITS = {"vector": 2000, "halfvec": 4000}  # HNSW / IVFFlat dimension limits
_TYPE_ALIASES = {
    "int": "integer",
    "int4": "integer",
    "int8": "bigint",
    "bool": "boolean",
    "timestamptz": "timestamp with time zone",
    "timestamp": "timestamp without time zone",
    "float8": "double precision",
    "float4": "real",
}


@dataclasses.dataclass(frozen=True)
class SchemaReport:
    """What check_schema found: ``ok`` when there are no problems; notes are advice, not failures."""

    problems: tuple[str, ...]
    notes: tuple[str, ...] = ()
    extensions: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Tell whether nothing is wrong."""
        return not self.problems


def _normal_type(name: str) -> str:
    """Spell a type the way format_type() does: varchar(n) -> character varying(n), int -> integer."""
    name = " ".join(name.lower().split())
    name = re.sub(r"^varchar\b", "character varying", name)
    return _TYPE_ALIASES.get(name, name)


def _split_name(name: str) -> tuple[str, str]:
    """Split ``table.column`` (or ``schema.table.column``) into a regclass text and a column."""
    table, _, column = name.rpartition(".")
    if not table:
        raise ConfigError(f"column {name!r} must be written as table.column")
    return table, column


def _pgvector_version(extensions: Mapping[str, str]) -> tuple[int, ...]:
    version = extensions.get("vector", "0")
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def _vector_advice(column: str, kind: str, dims: int, extensions: Mapping[str, str]) -> str | None:
    """Return why an HNSW/IVFFlat index is impossible for this column, and what to do, or None."""
    if dims <= _VECTOR_INDEX_LIMITS[kind]:
        return None
    remedy = (
        f"index a half-precision expression instead: CREATE INDEX ON {column.rpartition('.')[0]} USING hnsw "
        f"(({column.rpartition('.')[2]}::halfvec({dims})) halfvec_cosine_ops)"
    )
    if kind == "halfvec" or dims > _VECTOR_INDEX_LIMITS["halfvec"]:
        remedy = "store a reduced-dimension copy of the embedding and index that"
    elif _pgvector_version(extensions) < (0, 7):
        remedy = f"upgrade pgvector to 0.7 or later (installed: {extensions.get('vector')}), then {remedy}"
    return (
        f"{column} is {kind}({dims}): HNSW and IVFFlat indexes support at most {_VECTOR_INDEX_LIMITS[kind]} "
        f"dimensions for {kind}, so only exact search works; {remedy}"
    )


def check_schema(
    conn: psycopg2.extensions.connection,
    *,
    extensions: Sequence[str] = (),
    tables: Sequence[str] = (),
    columns: Mapping[str, str] | None = None,
    indexes: Sequence[str] = (),
    ann: Sequence[str] = (),
) -> SchemaReport:
    """Check extensions, tables, column types (pgvector dimensions included) and indexes.

    ``columns`` maps ``table.column`` to a type such as ``vector(3072)`` or ``varchar(255)``; ``ann``
    lists vector columns that must be indexable with HNSW/IVFFlat (otherwise that is only a note).
    """
    problems: list[str] = []
    notes: list[str] = []
    with conn.cursor() as cur:
        cur.execute("SELECT extname, extversion FROM pg_extension")
        installed = {str(name): str(version) for name, version in cur.fetchall()}
        for name in extensions:
            if name not in installed:
                cur.execute("SELECT 1 FROM pg_available_extensions WHERE name = %s", (name,))
                how = f"run CREATE EXTENSION {name}"
                if not cur.fetchone():
                    how = f"install the {name} extension on the server, then {how}"
                problems.append(f"extension {name!r} is not installed in this database; {how}")
        for table in tables:
            cur.execute("SELECT to_regclass(%s)", (table,))
            row = cur.fetchone()
            if row is None or row[0] is None:
                problems.append(f"table {table!r} does not exist; apply the migrations that create it")
        for name, expected in (columns or {}).items():
            table, column = _split_name(name)
            cur.execute(
                "SELECT format_type(a.atttypid, a.atttypmod), t.typname, a.atttypmod FROM pg_attribute a "
                "JOIN pg_type t ON t.oid = a.atttypid "
                "WHERE a.attrelid = to_regclass(%s) AND a.attname = %s "
                "AND a.attnum > 0 AND NOT a.attisdropped",
                (table, column),
            )
            found = cur.fetchone()
            if found is None:
                problems.append(f"column {name!r} does not exist; expected {expected}")
                continue
            actual, typname, typmod = str(found[0]), str(found[1]), int(found[2])
            if _normal_type(actual) != _normal_type(expected):
                problems.append(_type_problem(name, actual, expected))
            if typname in _VECTOR_INDEX_LIMITS and typmod > 0:
                advice = _vector_advice(name, typname, typmod, installed)
                if advice:  # a problem only for a column that must be indexable
                    (problems if name in ann else notes).append(advice)
        for index in indexes:
            cur.execute("SELECT c.relkind FROM pg_class c WHERE c.oid = to_regclass(%s)", (index,))
            row = cur.fetchone()
            if row is None or row[0] not in ("i", "I"):
                problems.append(f"index {index!r} does not exist; apply the migration that creates it")
    conn.rollback()
    return SchemaReport(tuple(problems), tuple(notes), installed)


def _type_problem(name: str, actual: str, expected: str) -> str:
    pattern = re.compile(r"(vector|halfvec)\((\d+)\)")
    got, wanted = pattern.fullmatch(actual), pattern.fullmatch(expected)
    if got and wanted:
        have, want = got.group(2), wanted.group(2)
        return (
            f"column {name!r} is {actual} but {expected} is expected: {have} dimensions stored, {want} "
            f"expected; the embedding model and the column disagree: re-embed and ALTER the column to "
            f"{expected}, or use a model that produces {have} dimensions"
        )
    return f"column {name!r} is {actual} but {expected} is expected; write a migration that alters it"


def _load_schema_spec(directory: str) -> dict[str, Any] | None:
    """Read ``schema.json`` beside the migrations (the expectations validate checks), if there is one."""
    path = os.path.join(directory, "schema.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            spec = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"schema spec {path!r} is not readable JSON: {_scrub(exc)}") from None
    allowed = {"extensions", "tables", "columns", "indexes", "ann", "comment"}
    if not isinstance(spec, dict) or set(spec) - allowed:
        raise ConfigError(f"schema spec {path!r} must be an object with keys among {sorted(allowed)}")
    spec.pop("comment", None)
    return spec


# ================================================================================================
# Health
# ================================================================================================

_JSON, _HEALTH_JSON = "application/json", "application/health+json"
_STATUS_OF_POOL = {"healthy": "pass", "degraded": "warn", "unhealthy": "fail"}
_RANK = {"pass": 0, "warn": 1, "fail": 2}
_REASONS = {200: "OK", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed"}
_REASONS.update({500: "Internal Server Error", 503: "Service Unavailable"})
# The health check's question: in recovery?  And on a standby: is its WAL receiver running, how far
# has it received and replayed WAL (bytes), and how old is the last commit it replayed (seconds).
_SERVER_CHECK = (
    "SELECT pg_is_in_recovery(), EXISTS (SELECT FROM pg_stat_wal_receiver), "
    "pg_wal_lsn_diff(pg_last_wal_receive_lsn(), '0/0')::bigint, "
    "pg_wal_lsn_diff(pg_last_wal_replay_lsn(), '0/0')::bigint, "
    "EXTRACT(EPOCH FROM clock_timestamp() - pg_last_xact_replay_timestamp())::float8"
)
_ID = "componentId"
# Errors a database check reports as "not ready"; anything else is a bug and answers 500.
_CHECK_ERRORS = (psycopg2.Error, PgOpsError, OSError)


@dataclasses.dataclass(frozen=True)
class _Check:
    """One database check, shared by every request within the cache TTL."""

    at: float  # clock() when it finished
    time: str  # ISO 8601, UTC
    error: str | None  # sanitized: why the database did not answer
    response_ms: float
    in_recovery: bool = False
    pending: tuple[str, ...] | None = None  # pending migrations; None when not asked
    migrations_error: str | None = None
    name: str = "default"  # the pool's
    read_only: bool = False  # a read pool: in recovery is what it is for; its lag counts instead
    lag: float | None = None  # seconds the server's replay is behind; None on a primary
    max_lag: float = 0.0  # the pool's max_replica_lag (0: no limit)
    replica: _Check | None = None  # the check of the pool's read pool

    @property
    def lagging(self) -> bool:
        return self.read_only and self.max_lag > 0 and self.lag is not None and self.lag > self.max_lag

    def problems(self, *, details: bool = True) -> list[str]:
        """Return why the service is not ready (empty when it is); without *details*, in generic words."""
        if self.error is not None:
            return [f"database: {self.error if details else 'not reachable'}"]
        found: list[str] = []
        if self.in_recovery and not self.read_only:
            found.append("database: the server is in recovery (read-only)")
        if self.lagging:
            found.append(
                f"database: replication lag {self.lag:.1f} s is over max_replica_lag={self.max_lag:g} s"
            )
        if self.migrations_error is not None:
            found.append(f"migrations: {self.migrations_error if details else 'cannot be checked'}")
        elif self.pending:
            names = f": {', '.join(self.pending)}" if details else ""
            found.append(f"migrations: {len(self.pending)} pending{names}")
        return found  # a read pool's problems only warn: reads turn to the primary


class _Flight:
    """A database check in progress, which other requests wait for instead of starting their own."""

    __slots__ = ("done", "result")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: _Check | None = None


class HealthApp:
    """A WSGI app serving /health/live, /health/ready, /health/detailed and /metrics for a Pool.

    Ready, detailed and metrics share one database check, cached for *cache_ttl* seconds and run
    single flight: at most one check per TTL, however many requests arrive.  *migrator* is anything
    with ``pending()``; a pending migration makes the service not ready ("warn" in detailed).  With
    *token*, detailed shows only its status and /metrics answers 401 without ``Authorization: Bearer``.
    """

    def __init__(
        self,
        pool: Pool,
        *,
        migrator: Any = None,
        cache_ttl: float = 5.0,
        service: str = "pgops",
        version: str = __version__,
        token: str | None = None,
        ready_timeout: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        _check_seconds("cache_ttl", cache_ttl, positive=False)
        _check_seconds("ready_timeout", ready_timeout, positive=True)
        if token is not None and (not isinstance(token, str) or not token.strip()):
            # The value is not echoed: a token of the wrong type may still be the secret.
            raise ConfigError("token must be a non-blank string, or None for no token")
        self.pool, self.migrator, self.token = pool, migrator, token
        self.cache_ttl, self.ready_timeout = cache_ttl, ready_timeout
        self.service, self.version = service, version
        self.checks_run = 0  # database checks started, for tests and pgops_health_checks_total
        self._clock = clock
        self._started, self._start_time = clock(), time.time()
        self._lock = threading.Lock()
        self._last: _Check | None = None
        self._flight: _Flight | None = None
        # Per read pool: (when first seen, position) of WAL its server had received and not replayed.
        self._unreplayed: dict[str, collections.deque[tuple[float, int]]] = {}
        self._streamed: dict[str, float] = {}  # per read pool: when its WAL receiver was last seen running
        _health_apps.add(self)
        self._ready_response: tuple[_Check, _Response] | None = None
        self._failing = False
        self._max_age = f"max-age={int(cache_ttl)}"
        self._routes: dict[str, Callable[[dict[str, Any]], _Response]] = {
            "/health/live": lambda environ: _respond(200, {"status": "pass"}),
            "/health/ready": self._ready,
            "/health/detailed": self._detailed,
            "/metrics": self._metrics,
        }

    def _after_fork(self) -> None:
        """Start afresh in a forked child: a thread of the parent may have held the lock or led a check."""
        self._lock = threading.Lock()
        self._flight = None

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        """Answer one request (WSGI); HEAD gets the headers of GET and no body."""
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO") or "/"
        route = self._routes.get(path) or self._routes.get(path.rstrip("/"))
        try:
            if route is None:
                status, headers, body = _respond(404, {"status": "fail", "error": "not found"})
            elif method not in ("GET", "HEAD"):
                status, headers, body = _respond(405, {"status": "fail", "error": "method not allowed"})
                headers.append(("Allow", "GET, HEAD"))
            else:
                status, headers, body = route(environ)
        except Exception:
            _logger.exception("health endpoint %r failed", path)
            status, headers, body = _respond(500, {"status": "fail", "error": "internal error; see the log"})
        start_response(status, headers)
        return [] if method == "HEAD" else [body]

    def _ready(self, environ: dict[str, Any]) -> _Response:
        check = self._check()
        rendered = self._ready_response
        # Probes hit ready most: answer from the response rendered for this check, not a new one.
        if rendered is None or rendered[0] is not check:
            # With a token the details (the driver's own words) are for /health/detailed only.
            problems = check.problems(details=self.token is None)
            body: dict[str, Any] = {"status": "fail" if problems else "pass", "time": check.time}
            if problems:
                body["reasons"] = problems
            rendered = self._ready_response = (
                check,
                _respond(503 if problems else 200, body, cache=self._max_age),
            )
        status, headers, data = rendered[1]
        return status, list(headers), data

    def _detailed(self, environ: dict[str, Any]) -> _Response:
        checks = self._checks(self._check())
        body: dict[str, Any] = {"status": _worst(checks)}
        if self._authorized(environ):
            body.update(version=self.version, serviceId=self.service, checks=checks)
            body["description"] = f"health of {self.service} and its PostgreSQL pool"
            notes = [
                f"{name}{f' {c.get(_ID)}' if len(entries) > 1 else ''}: {c['output']}"
                for name, entries in checks.items()
                for c in entries
                if "output" in c
            ]
            if notes:
                body["output"] = "; ".join(notes)
        vary = [("Vary", "Authorization")] if self.token else []
        code = 503 if body["status"] == "fail" else 200
        return _respond(code, body, content_type=_HEALTH_JSON, cache=self._max_age, extra=vary)

    def _metrics(self, environ: dict[str, Any]) -> _Response:
        if not self._authorized(environ):
            challenge = [("WWW-Authenticate", 'Bearer realm="pgops"')]
            body = {"status": "fail", "error": "send Authorization: Bearer <token>"}
            return _respond(401, body, extra=challenge)
        check = self._check()
        status = _worst(self._checks(check))
        by_status = [("", {"status": s}, s == status) for s in _RANK]
        took, uptime = check.response_ms / 1000.0, self._clock() - self._started
        pools = [self.pool, *([self.pool.replica] if self.pool.replica is not None else [])]
        families = _pool_families(pools)
        lags = [(c.name, c.lag) for c in (check, check.replica) if c is not None and c.lag is not None]
        if lags:
            lag_text = "Seconds the read pool's server is behind the primary in replaying its WAL."
            lag_samples = [("", {"pool": name}, lag) for name, lag in lags]
            families.append(("pgops_replication_lag_seconds", "gauge", lag_text, lag_samples))
        families += [
            _family("pgops_up", "1 when the last database check passed.", check.error is None),
            ("pgops_health_status", "gauge", "1 for the current health status.", by_status),
            _family("pgops_check_duration_seconds", "Seconds the last database check took.", took),
            _family("pgops_health_checks_total", "Database checks run.", self.checks_run),
            _family("pgops_uptime_seconds", "Seconds since the health app started.", uptime),
            _family("pgops_start_time_seconds", "Unix time the health app started.", self._start_time),
            _family("pgops_info", "Service and version.", 1, service=self.service, version=self.version),
        ]
        if self.migrator is not None and check.pending is not None:
            pending = len(check.pending)
            families.append(_family("pgops_migrations_pending", "Migrations not applied yet.", pending))
        text = _render_prometheus(families).encode()
        return _respond(200, text, content_type="text/plain; version=0.0.4; charset=utf-8")

    def _authorized(self, environ: dict[str, Any]) -> bool:
        if self.token is None:
            return True
        scheme, _, given = str(environ.get("HTTP_AUTHORIZATION", "")).strip().partition(" ")
        # WSGI passes headers as latin-1 decoded text: compare the bytes sent, in constant time.
        sent = given.strip().encode("latin-1", "replace")
        import hmac  # only needed with a token

        return scheme.lower() == "bearer" and hmac.compare_digest(sent, self.token.encode())

    def _checks(self, check: _Check) -> dict[str, list[dict[str, Any]]]:
        """Build the health+json "checks" from the database checks and the pools' own verdicts."""
        now = _iso(time.time())
        checks: dict[str, list[dict[str, Any]]] = {"postgres:responseTime": [], "postgres:connections": []}
        for pool, result in ((self.pool, check), (self.pool.replica, check.replica)):
            if pool is None or result is None:
                continue
            for key, entry in (
                ("postgres:responseTime", _server_entry(result)),
                ("postgres:connections", _pool_entry(pool, now)),
            ):
                if result is check.replica and entry["status"] == "fail":
                    entry["status"] = "warn"  # reads turn to the primary meanwhile
                checks[key].append(entry)
            if result.read_only and result.error is None:
                lag: dict[str, Any] = {"componentId": result.name, "componentType": "datastore"}
                lag.update(observedValue=result.lag or 0.0, observedUnit="s", status="pass", time=result.time)
                if result.lagging:
                    lag.update(status="warn", output=f"over max_replica_lag={result.max_lag:g} s")
                checks.setdefault("postgres:replicationLag", []).append(lag)
        if self.migrator is not None:
            mig: dict[str, Any] = {"componentType": "component", "status": "pass", "time": check.time}
            if check.migrations_error is not None:
                mig.update(status="fail", output=check.migrations_error)
            elif check.pending is None:
                mig.update(status="warn", output="not checked: the database did not answer")
            else:
                mig.update(observedValue=len(check.pending), observedUnit="migrations")
                if check.pending:
                    mig.update(status="warn", output=f"pending: {', '.join(check.pending)}")
            checks["migrations:pending"] = [mig]
        uptime = round(self._clock() - self._started, 3)
        checks["uptime"] = [{"componentType": "system", "observedValue": uptime, "observedUnit": "s"}]
        checks["uptime"][0].update(status="pass", time=now)
        return checks

    def _check(self) -> _Check:
        """Return the cached database check, running one (single flight) once it is cache_ttl old."""
        last = self._last  # a fresh result needs no lock: reading one reference is atomic
        if last is not None and self._clock() - last.at < self.cache_ttl:
            return last
        with self._lock:
            last = self._last
            if last is not None and self._clock() - last.at < self.cache_ttl:
                return last
            flight, leader = self._flight, self._flight is None
            if flight is None:
                flight = self._flight = _Flight()
                self.checks_run += 1
        if not leader:
            # Share the check in flight, waiting a bounded time so a hung server cannot pile up probes.
            patience = 2 * self.ready_timeout + 1.0
            if flight.done.wait(patience) and flight.result is not None:
                return flight.result
            message = f"a database check is still running after {patience:.1f} s"
            if flight.done.is_set():
                message = "the database check failed unexpectedly; see the log"
            return _Check(self._clock(), _iso(time.time()), message, patience * 1000.0, name=self.pool.name)
        try:
            flight.result = self._run_check()
            with self._lock:
                self._last = flight.result
        finally:
            with self._lock:
                self._flight = None
            flight.done.set()
        return flight.result

    def _run_check(self) -> _Check:
        """Ask the server whether it answers and is writable, then ask the migrator what is pending.

        All of it, the migrator's own pool connection included, ends within ready_timeout: the pool
        cuts off a connection still in use at the deadline, so a stalled network cannot hold the check.
        """
        began = time.monotonic()
        pending, migrations_error = None, None
        replica = self.pool.replica
        with contextlib.ExitStack() as bounds:
            for pool in (self.pool, replica):
                if pool is not None:
                    bounds.enter_context(pool._deadline(self.ready_timeout))
            check = self._check_server(self.pool, began)
            if check.error is None and self.migrator is not None:
                try:
                    # Versioned migrations only: two releases during a rollout see each other's
                    # repeatable files as changed, and neither should go unready for it.
                    due = self.migrator.pending()
                    pending = tuple(_migration_name(m) for m in due if not getattr(m, "repeatable", False))
                except _CHECK_ERRORS as exc:
                    migrations_error = self._check_error(exc, began, self.pool)
            replica_check = None if replica is None else self._check_server(replica, began)
        check = dataclasses.replace(
            check, at=self._clock(), pending=pending, migrations_error=migrations_error, replica=replica_check
        )
        # Log changes only: probes arrive every few seconds.
        problems = check.problems()
        if problems and not self._failing:
            _logger.warning("health check failing: %s", "; ".join(problems))
        elif not problems and self._failing:
            _logger.info("health check passes again")
        self._failing = bool(problems)
        return check

    def _check_server(self, pool: Pool, began: float) -> _Check:
        """Ask *pool*'s server whether it answers, is in recovery, and how far its replay is behind."""
        start = self._clock()
        error, row = None, None
        if pool is self.pool.replica and pool._unreachable():
            # Not ready_timeout of waiting for every check while it is down: its last error.
            pool._nudge()
            with pool._lock:
                last_error = pool._last_error
            error = (
                f"cannot connect: {_scrub(last_error or 'no connection', pool.config._conninfo, body=True)}"
            )
        else:
            try:
                with pool.connection(timeout=self.ready_timeout) as conn, conn.cursor() as cur:
                    timeout_ms = max(1, int(self.ready_timeout * 1000))
                    cur.execute("SET LOCAL statement_timeout = %s", (timeout_ms,))
                    cur.execute(_SERVER_CHECK)
                    row = cur.fetchone()
            except _CHECK_ERRORS as exc:
                error = self._check_error(exc, began, pool)
        elapsed_ms = (self._clock() - start) * 1000.0
        in_recovery, lag = bool(row and row[0]), None
        if row and in_recovery:
            lag = self._replay_lag(pool.name, *row[1:])
        config = pool.config
        return _Check(
            self._clock(),
            _iso(time.time()),
            error,
            elapsed_ms,
            in_recovery,
            name=config.name,
            read_only=config.read_only,
            lag=lag,
            max_lag=config.max_replica_lag,
        )

    def _replay_lag(
        self, name: str, receiving: bool, received: int | None, replayed: int | None, commit_age: float | None
    ) -> float | None:
        """Return how long WAL a standby has received has waited to be replayed (seconds, None: unknown).

        The oldest position received and not yet replayed is remembered from check to check with the
        time it was first seen: the lag is how long ago that was (0 when all is replayed), so an idle
        primary and WAL without commits (VACUUM, CHECKPOINT) cause no false lag.  A standby whose WAL
        receiver is not running is cut off from its primary: at least as far behind as the time since
        its receiver was last seen (or, never seen streaming, the age of its last replayed commit).
        """
        now = self._clock()
        seen = self._unreplayed.setdefault(name, collections.deque())
        if replayed is not None:
            while seen and seen[0][1] <= replayed:
                seen.popleft()
        waiting = now - seen[0][0] if seen else 0.0
        if not receiving or received is None or replayed is None:
            streamed = self._streamed.get(name)
            if streamed is None:  # never seen streaming (archive recovery): its last commit's age
                return None if commit_age is None else max(0.0, commit_age)
            return max(waiting, now - streamed)  # cut off since then: at least that far behind
        self._streamed[name] = now
        if seen and received < seen[-1][1]:
            seen.clear()  # received went back: a restarted standby or a new timeline
        if received > (replayed or 0) and (not seen or seen[-1][1] < received):
            seen.append((now, received))
        return now - seen[0][0] if seen else 0.0

    def _check_error(self, exc: BaseException, began: float, pool: Pool) -> str:
        """Describe why a check failed; say so when it ran out of time (a cut-off reads as a lost server)."""
        text = _scrub(exc, pool.config._conninfo, body=True)
        if time.monotonic() - began >= self.ready_timeout:
            return f"no answer within ready_timeout={self.ready_timeout:g} s ({text})"
        return text


def _server_entry(check: _Check) -> dict[str, Any]:
    """Return the health+json entry of one pool's database check (postgres:responseTime)."""
    db: dict[str, Any] = {"componentId": check.name, "componentType": "datastore", "status": "pass"}
    db.update(observedValue=round(check.response_ms, 3), observedUnit="ms", time=check.time)
    if check.error is not None:
        db.update(status="fail", output=check.error)
    elif check.in_recovery and not check.read_only:
        db.update(status="warn", output="the server is in recovery (read-only)")
    return db


def _pool_entry(pool: Pool, now: str) -> dict[str, Any]:
    """Return the health+json entry of one pool's own verdict (postgres:connections)."""
    health, stats = pool.health(), pool.stats()
    conns: dict[str, Any] = {"componentId": pool.name, "componentType": "datastore", "time": now}
    conns.update(observedValue=stats["pool_in_use"], observedUnit="connections")
    conns.update(status=_STATUS_OF_POOL.get(health.status, "fail"), utilization=round(health.utilization, 3))
    conns.update(poolSize=stats["pool_size"], poolMin=stats["pool_min"], poolMax=stats["pool_max"])
    conns.update(waiting=stats["requests_waiting"])
    if health.reasons:
        conns["output"] = _scrub("; ".join(health.reasons), pool.config._conninfo, body=True)
    return conns


def _worst(checks: Mapping[str, list[dict[str, Any]]]) -> str:
    statuses = (c["status"] for items in checks.values() for c in items)
    return max(statuses, key=_RANK.__getitem__, default="pass")


def _iso(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def _migration_name(migration: Any) -> str:
    version = getattr(migration, "version", None)
    return str(migration) if version is None else f"{version} {getattr(migration, 'description', '')}".strip()


def _respond(
    code: int, body: Any, *, content_type: str = _JSON, cache: str = "no-store", extra: Any = ()
) -> _Response:
    """Return (status, headers, body) for *body*: bytes as they are, anything else as JSON."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = [("Content-Type", content_type), ("Content-Length", str(len(data))), ("Cache-Control", cache)]
    return f"{code} {_REASONS[code]}", [*headers, *extra], data


# pool.stats() key -> the help text of its metric, which _pool_metric() names (README lists them all).
_POOL_GAUGES = {
    "pool_min": "Minimum number of connections the pool keeps open.",
    "pool_max": "Maximum number of connections the pool may open.",
    "pool_size": "Connections open or being opened.",
    "pool_available": "Idle connections ready to be handed out.",
    "pool_in_use": "Connections lent to callers.",
    "requests_waiting": "Callers waiting for a connection.",
}
_POOL_COUNTERS = {
    "requests_num": "Connection checkouts asked of the pool, served or not.",
    "requests_queued": "Checkouts that had to wait for a connection.",
    "requests_errors": "Checkouts that failed, timed out or were refused.",
    "returns_bad": "Connections returned in a bad state.",
    "returns_rolled_back": "Connections returned inside a transaction, which the pool rolled back.",
    "connections_num": "Connection attempts to the server.",
    "connections_errors": "Failed connection attempts.",
    "connections_lost": "Connections found broken and discarded.",
    "connections_stalled": "Connections cut off and discarded because they did not answer in time.",
    "connections_read_only": "Connections discarded because their server stopped taking writes (25006).",
    "reads_waited": "Reads with a token that waited for the replica to replay it.",
    "reads_fallback": "Reads with a token that the replica had not replayed in time, sent to the primary.",
    "queries_num": "Statements executed on pooled connections.",
    "queries_errors": "Statements that failed.",
    "requests_wait_ms": "Time callers waited for a connection.",
    "connections_ms": "Time spent opening connections.",
    "usage_ms": "Time connections spent lent to callers.",
    "queries_ms": "Time spent executing statements.",
}


def _pool_metric(key: str, counter: bool) -> str:
    """Name the metric of a pool.stats() key: requests_num -> pgops_checkouts_total, for one.

    A counter ends in _total instead of stats()' _num, and its milliseconds are given as seconds
    (usage_ms -> pgops_usage_seconds_total); a gauge is its key (pool_size -> pgops_pool_size).
    Checkouts, not "requests": a pool's requests_num counts callers asking it for a connection, and
    pgops_requests_total would read like the HTTP requests a service counts under that name.
    """
    name = "pgops_" + key.replace("requests_", "checkouts_")
    if counter:
        unit = "_seconds" if name.endswith("_ms") else ""
        name = name.removesuffix("_num").removesuffix("_ms") + unit + "_total"
    return name


def _pool_families(pools: Sequence[Pool]) -> list[_Family]:
    """Return the metric families of the pools' stats() and wait_histogram(), labelled by pool name."""
    stats = [(pool.name, pool.stats()) for pool in pools]
    families: list[_Family] = []
    for kind, table in (("gauge", _POOL_GAUGES), ("counter", _POOL_COUNTERS)):
        for key, text in table.items():
            samples: list[_Sample] = [
                ("", {"pool": pool}, values[key] / 1000.0 if key.endswith("_ms") else values[key])
                for pool, values in stats
                if key in values
            ]
            if samples:
                families.append((_pool_metric(key, kind == "counter"), kind, text, samples))
    samples = []
    for pool in pools:
        histogram = pool.wait_histogram()
        label = {"pool": pool.name}
        samples += [("_bucket", {**label, "le": _number(le)}, count) for le, count in histogram["buckets"]]
        samples += [("_sum", label, histogram["sum"]), ("_count", label, histogram["count"])]
    text = "Time callers waited for a connection."
    families.append(("pgops_acquire_wait_seconds", "histogram", text, samples))
    return families


def _family(name: str, text: str, value: float, **labels: str) -> _Family:
    """Return a family of one sample: a counter when the name ends in _total, else a gauge."""
    return (name, "counter" if name.endswith("_total") else "gauge", text, [("", labels, value)])


def _render_prometheus(families: Iterable[_Family]) -> str:
    """Render ``(name, type, help, [(suffix, labels, value), ...])`` families as Prometheus text 0.0.4."""
    lines: list[str] = []
    for name, kind, text, samples in families:
        lines += [f"# HELP {name} {_escape(text)}", f"# TYPE {name} {kind}"]
        lines += (f"{name}{suffix}{_labels(labels)} {_number(value)}" for suffix, labels, value in samples)
    return "\n".join(lines) + "\n"


def _labels(labels: Mapping[str, str]) -> str:
    pairs = ",".join(f'{key}="{_escape(value, quote=True)}"' for key, value in labels.items())
    return "{" + pairs + "}" if pairs else ""


def _escape(text: str, *, quote: bool = False) -> str:
    """Escape a HELP text, or with *quote* a label value, as the text format requires."""
    text = text.replace("\\", r"\\").replace("\n", r"\n")
    return text.replace('"', r"\"") if quote else text


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(int(value))  # int() turns True into 1
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return "NaN" if math.isnan(value) else repr(value)


def mount(
    app: _WSGIApp, health_app: _WSGIApp, prefixes: Iterable[str] = ("/health/", "/metrics")
) -> _WSGIApp:
    """Return a WSGI app sending *prefixes* to *health_app* and every other path to *app*, untouched."""
    prefixes = tuple(prefixes)

    def routed(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = str(environ.get("PATH_INFO", ""))
        for prefix in prefixes:
            # "/health/" covers a subtree; "/metrics" covers itself, not "/metricsfoo".
            if path.startswith(prefix) if prefix.endswith("/") else path in (prefix, prefix + "/"):
                return health_app(environ, start_response)
        return app(environ, start_response)

    return routed


def create_app(environ: Mapping[str, str] | None = None) -> HealthApp:
    """Build a HealthApp from DATABASE_URL, POOL_*, PGOPS_MIGRATIONS_DIR and PGOPS_HEALTH_* (os.environ).

    Its pool holds 1 to 2 connections (POOL_MIN_CONNECTIONS / POOL_MAX_CONNECTIONS change that): it
    is for a process that serves health only.  Next to an application with a pool of its own, mount
    ``HealthApp(app_pool)`` instead, and the checks borrow one of its connections for a moment.
    """
    environ = os.environ if environ is None else environ
    migrations = environ.get("PGOPS_MIGRATIONS_DIR", "").strip()
    if not migrations and os.path.isdir("migrations"):
        migrations = "migrations"  # ./migrations when there is one; else no migrations to watch
    return _health_app(environ, migrations)


def _health_app(
    environ: Mapping[str, str], migrations: str, *, dsn: str | None = None, cache_ttl: float | None = None
) -> HealthApp:
    """Return create_app's app, watching *migrations* ('': none); `pgops serve` passes its options."""
    if cache_ttl is None:
        raw_ttl = environ.get("PGOPS_HEALTH_CACHE_TTL", "").strip()
        cache_ttl = _env_float("PGOPS_HEALTH_CACHE_TTL", raw_ttl) if raw_ttl else 5.0
        if cache_ttl < 0:
            raise ConfigError(f"PGOPS_HEALTH_CACHE_TTL={raw_ttl!r} must be at least 0")
    token = environ.get("PGOPS_HEALTH_TOKEN")
    if token is not None and not token.strip():
        # A blank token must not turn authentication off without a word.
        raise ConfigError(
            f"PGOPS_HEALTH_TOKEN={token!r} is blank; set it to a secret token, or unset it to serve "
            "details without one"
        )
    # The pool connects in the background: a database that is down does not stop start-up.
    pool = Pool(PoolConfig.from_env(environ, dsn=dsn, **_health_pool_sizes(environ)))
    migrator = Migrator(pool, migrations) if migrations else None
    return HealthApp(pool, migrator=migrator, cache_ttl=cache_ttl, token=token and token.strip())


def _health_pool_sizes(environ: Mapping[str, str]) -> dict[str, int]:
    """Return create_app's pool bounds: 1 to 2 connections, unless POOL_MIN/MAX_CONNECTIONS say otherwise.

    Its checks run one at a time (single flight), each on one connection: a preset's production
    sizes would hold 5 connections per gunicorn worker for nothing.  One stays open so that a probe
    does not wait for a new connection; the second is a spare for a check cut off at ready_timeout.
    """
    raw_min = environ.get("POOL_MIN_CONNECTIONS", "").strip()
    raw_max = environ.get("POOL_MAX_CONNECTIONS", "").strip()
    if raw_min and raw_max:
        return {}
    if raw_min:
        return {"max_size": max(2, _env_int("POOL_MIN_CONNECTIONS", raw_min))}
    if raw_max:
        return {"min_size": min(1, _env_int("POOL_MAX_CONNECTIONS", raw_max))}
    return {"min_size": 1, "max_size": 2}


# The built-in server's limits.  A kubelet probe gives up after 1 s, so a connection must never sit in
# a short listen queue (socketserver's default of 5 made 200 simultaneous probes time out) and a slow
# client must never hold a thread: one thread reads the request heads of every connection, and only a
# complete request is given a handler thread.
_BACKLOG = 1024  # listen() queue; Linux caps it at net.core.somaxconn (4096 since 5.4)
_READ_TIMEOUT = 5.0  # seconds a client has to send its request head, then for each read or write
_MAX_THREADS = 64  # requests answered at once
_QUEUED_PER_THREAD = 4  # complete requests that may wait for a thread; past that: 503 at once
_MAX_WAITING = 512  # connections still sending their head; past that the oldest is closed
_MAX_HEAD = 65536  # bytes of request line and headers
_STOP_TIMEOUT = 10.0  # seconds serve() lets requests in flight finish after SIGTERM (Kubernetes: 30)


class _Replay(io.RawIOBase):
    """A socket's input with the bytes already read from it put back in front."""

    def __init__(self, head: bytes, sock: socket.socket) -> None:
        super().__init__()
        self._head = memoryview(head)
        self._sock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if not self._head:
            return self._sock.recv_into(buffer)
        n = min(len(buffer), len(self._head))
        buffer[:n] = self._head[:n]
        self._head = self._head[n:]
        return n


class _Workers:
    """Run jobs on at most *limit* threads, started on demand; up to *queued* more jobs wait in line."""

    def __init__(self, limit: int, queued: int) -> None:
        self.limit, self.queued = limit, queued
        self._jobs: collections.deque[Callable[[], None]] = collections.deque()
        self._threads = 0
        self._changed = threading.Condition()

    def submit(self, job: Callable[[], None]) -> bool:
        """Queue *job*, starting a thread for it if fewer than *limit* run; False when the line is full."""
        with self._changed:
            if len(self._jobs) >= self.queued:
                return False
            self._jobs.append(job)
            start = self._threads < self.limit
            if start:
                self._threads += 1
        if start:
            try:
                threading.Thread(target=self._work, name="pgops-http", daemon=True).start()
            except RuntimeError:  # "can't start new thread": a running or later thread takes the job
                _logger.warning("cannot start a health server thread; %d running", self._threads)
                self._finished()
        return True

    def _work(self) -> None:
        while True:
            with self._changed:
                if not self._jobs:
                    break
                job = self._jobs.popleft()
            job()  # never raises: the server's answer() catches and logs
        self._finished()

    def _finished(self) -> None:
        with self._changed:
            self._threads -= 1
            self._changed.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to *timeout* seconds until every job has run; tell whether they all have."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._jobs and not self._threads, timeout)


@dataclasses.dataclass
class _Head:
    """A connection still sending its request line and headers."""

    address: Any
    deadline: float
    data: bytearray = dataclasses.field(default_factory=bytearray)


class _Connections:
    """The accepted connections of one server: their heads read on one thread, requests on _Workers.

    *answer(sock, address, head)* serves one complete request on a worker thread, never raising, and
    closes the socket.  A connection that has not sent its whole head within *read_timeout* seconds
    of being accepted is closed, so slow or stalled clients cost a socket each, not a thread.
    """

    def __init__(
        self, answer: Callable[[socket.socket, Any, bytes], None], *, read_timeout: float, max_threads: int
    ) -> None:
        self._answer, self._read_timeout = answer, read_timeout
        self.workers = _Workers(max_threads, queued=_QUEUED_PER_THREAD * max_threads)
        self._lock = threading.Lock()
        self._accepted: list[tuple[socket.socket, Any]] = []  # from the accept loop, not yet read
        self._waiting: dict[socket.socket, _Head] = {}  # oldest first: deadlines come in order
        self._empty = threading.Event()
        self._empty.set()
        self.refused = 0  # requests answered 503 for want of a thread
        self._quiet_until = 0.0
        self._closing = False
        self._selector = selectors.DefaultSelector()
        self._wakeup, self._waker = socket.socketpair()
        self._wakeup.setblocking(False)
        self._selector.register(self._wakeup, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._run, name="pgops-http-heads", daemon=True)
        self._thread.start()

    def add(self, sock: socket.socket, address: Any) -> None:
        """Take an accepted connection (from the accept loop): read its head, then answer it."""
        with self._lock:
            self._accepted.append((sock, address))
            self._empty.clear()
        self._wake()

    def drain(self, timeout: float) -> bool:
        """Wait up to *timeout* seconds for every connection to be answered; tell whether they were."""
        deadline = time.monotonic() + timeout
        # Heads first: a complete one becomes a worker's job before the connection leaves _waiting.
        heads_done = self._empty.wait(timeout)
        return self.workers.wait_idle(max(0.0, deadline - time.monotonic())) and heads_done

    def close(self) -> None:
        """Stop reading heads and close the connections that have not sent one."""
        self._closing = True
        self._wake()
        self._thread.join()
        for sock in [*self._waiting, *(sock for sock, _ in self._accepted)]:
            sock.close()
        self._waiting.clear()
        self._accepted.clear()
        self._selector.close()
        self._wakeup.close()
        self._waker.close()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # a full socketpair already holds a wake-up
            self._waker.send(b"x")

    def _run(self) -> None:
        while not self._closing:
            oldest = next(iter(self._waiting.values()), None)
            timeout = None if oldest is None else max(0.0, oldest.deadline - time.monotonic())
            for key, _ in self._selector.select(timeout):
                if key.fileobj is self._wakeup:
                    with contextlib.suppress(OSError):
                        self._wakeup.recv(4096)
                else:
                    self._read(key.fileobj)  # type: ignore[arg-type]
            self._take_accepted()
            self._expire(time.monotonic())
            with self._lock:
                if not self._accepted and not self._waiting:
                    self._empty.set()

    def _take_accepted(self) -> None:
        with self._lock:
            accepted, self._accepted = self._accepted, []
        deadline = time.monotonic() + self._read_timeout
        for sock, address in accepted:
            if len(self._waiting) >= _MAX_WAITING:
                oldest, head = next(iter(self._waiting.items()))
                _logger.debug("%d heads waiting: closed the oldest, %s", _MAX_WAITING, head.address)
                self._forget(oldest).close()
            sock.setblocking(False)
            self._waiting[sock] = _Head(address, deadline)
            self._selector.register(sock, selectors.EVENT_READ)

    def _read(self, sock: socket.socket) -> None:
        head = self._waiting[sock]
        try:
            chunk = sock.recv(_MAX_HEAD)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # reset by the client
            chunk = b""
        if not chunk:
            self._forget(sock).close()
            return
        start = max(0, len(head.data) - 3)
        head.data += chunk
        if head.data.find(b"\n\r\n", start) >= 0 or head.data.find(b"\n\n", start) >= 0:
            self._forget(sock)
            self._dispatch(sock, head.address, bytes(head.data))
        elif len(head.data) > _MAX_HEAD:
            _logger.debug("closed %s: request head over %d bytes", head.address, _MAX_HEAD)
            self._forget(sock).close()

    def _dispatch(self, sock: socket.socket, address: Any, head: bytes) -> None:
        if not self.workers.submit(functools.partial(self._answer, sock, address, head)):
            self.refused += 1
            now = time.monotonic()
            if now >= self._quiet_until:  # one warning a minute, not one per request, under a flood
                self._quiet_until = now + 60.0
                _logger.warning(
                    "health server busy: %d requests running and %d waiting; answered 503 (%d so far)",
                    self.workers.limit,
                    self.workers.queued,
                    self.refused,
                )
            with contextlib.suppress(OSError):
                sock.send(_BUSY_REPLY)  # non-blocking; a few hundred bytes fit in any send buffer
            sock.close()

    def _expire(self, now: float) -> None:
        while self._waiting:
            sock, head = next(iter(self._waiting.items()))
            if head.deadline > now:
                break
            _logger.debug("closed %s: no complete request within %.1f s", head.address, self._read_timeout)
            self._forget(sock).close()

    def _forget(self, sock: socket.socket) -> socket.socket:
        del self._waiting[sock]
        self._selector.unregister(sock)
        return sock


def _busy_reply() -> bytes:
    """Return the raw HTTP response to a request the server has no thread for."""
    extra = [("Retry-After", "1"), ("Connection", "close")]
    status, headers, body = _respond(503, {"status": "fail", "error": "busy; retry later"}, extra=extra)
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers)
    return f"HTTP/1.0 {status}\r\n{lines}\r\n".encode("latin-1") + body


_BUSY_REPLY = _busy_reply()


def make_server(
    app: _WSGIApp,
    host: str = "127.0.0.1",
    port: int = 3001,
    *,
    backlog: int = _BACKLOG,
    read_timeout: float = _READ_TIMEOUT,
    max_threads: int = _MAX_THREADS,
) -> WSGIServer:
    """Return a threaded wsgiref server bound to host:port (port 0 picks one: see server_port).

    *backlog* is the listen() queue.  One thread reads the request heads of all connections; a
    client that has not sent its head *read_timeout* seconds after connecting is closed, and each
    later read or write has the same timeout.  At most *max_threads* requests run at once, 4 per
    thread more wait in line, and past that the server answers 503 with ``Retry-After`` at once.
    """
    _check_int("backlog", backlog, minimum=1)
    _check_seconds("read_timeout", read_timeout, positive=True)
    _check_int("max_threads", max_threads, minimum=1)
    # Imported here: http.server and socketserver cost the CLI's other commands ~40 ms at start-up.
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

    class RequestHandler(WSGIRequestHandler):
        """wsgiref's handler, reading the head already received and logging to the pgops logger."""

        timeout = read_timeout  # StreamRequestHandler.setup() puts it on the socket

        def __init__(self, request: Any, client_address: Any, server: Any, head: bytes = b"") -> None:
            self.head = head
            super().__init__(request, client_address, server)

        def setup(self) -> None:
            super().setup()
            self.rfile.close()  # left open, its reference would keep the socket open after close()
            self.rfile = io.BufferedReader(_Replay(self.head, self.connection))

        def log_message(self, format: str, *args: Any) -> None:
            _logger.debug("%s %s", self.address_string(), format % args)

    class Server(WSGIServer):
        request_queue_size = backlog
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        def __init__(self) -> None:
            # Before binding: a failed bind() calls server_close(), which closes these.
            self.connections = _Connections(self.answer, read_timeout=read_timeout, max_threads=max_threads)
            super().__init__((host, port), RequestHandler)

        def process_request(self, request: Any, client_address: Any) -> None:
            self.connections.add(request, client_address)  # no thread until its whole head is in

        def answer(self, sock: socket.socket, address: Any, head: bytes) -> None:
            try:
                RequestHandler(sock, address, self, head)
            except Exception:
                self.handle_error(sock, address)
            finally:
                self.shutdown_request(sock)

        def handle_error(self, request: Any, client_address: Any) -> None:
            _logger.debug("error serving %s", client_address, exc_info=True)  # mostly clients going away

        def server_close(self) -> None:
            super().server_close()
            self.connections.close()

    server = Server()
    server.set_app(app)
    return server


def serve(
    app: _WSGIApp,
    host: str = "127.0.0.1",
    port: int = 3001,
    *,
    ready: Callable[[WSGIServer], None] | None = None,
    stop_timeout: float = _STOP_TIMEOUT,
    backlog: int = _BACKLOG,
    read_timeout: float = _READ_TIMEOUT,
    max_threads: int = _MAX_THREADS,
) -> None:
    """Serve *app* until SIGTERM or SIGINT (main thread only) or ``server.shutdown()``, then return.

    To stop, the server closes its listening socket (new connections are refused), lets the requests
    in flight finish for up to *stop_timeout* seconds, and returns.  wsgiref with the limits
    make_server() describes: fine for probes, scrapes and a sidecar; for heavy traffic run
    ``create_app`` under gunicorn or waitress.  *ready* is called with the bound server before serving.
    """
    _check_seconds("stop_timeout", stop_timeout, positive=False)
    server = make_server(app, host, port, backlog=backlog, read_timeout=read_timeout, max_threads=max_threads)
    connections: _Connections = server.connections  # type: ignore[attr-defined]  # make_server's Server
    previous: dict[signal.Signals, Any] = {}

    def stop(signum: int, frame: Any) -> None:
        _logger.info("received %s; stopping the health server", signal.Signals(signum).name)
        # shutdown() waits for serve_forever(), which runs in this very thread: call it from another.
        threading.Thread(target=server.shutdown, daemon=True).start()

    try:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, stop)
        _logger.info("serving health on http://%s:%d/health/ready", host, server.server_port)
        if ready is not None:
            ready(server)
        server.serve_forever()
        server.socket.close()  # refuse new connections while those accepted finish
        if not connections.drain(stop_timeout):
            _logger.warning(
                "health requests still running %.1f s after the stop; returning without them "
                "(a larger stop_timeout waits longer)",
                stop_timeout,
            )
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.server_close()
        _logger.info("health server stopped")


# ================================================================================================
# CLI
# ================================================================================================

if TYPE_CHECKING:
    import argparse  # for the annotations only: `import pgops` must not pay for argparse

    _Command = Callable[[argparse.Namespace, Mapping[str, str]], int]

_EXIT_OK, _EXIT_FAILED, _EXIT_USAGE, _EXIT_LOCK, _EXIT_INVALID, _EXIT_DIRTY, _EXIT_CONNECT = range(7)
_EXIT_INTERRUPTED, _EXIT_TERMINATED = 128 + signal.SIGINT, 128 + signal.SIGTERM  # as a shell reports them


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that the same cleanup runs."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated


@contextlib.contextmanager
def _cancel_on_signals(migrator: Migrator) -> Iterator[None]:
    """On SIGINT or SIGTERM, cancel the statement the migrator runs, so that it rolls back at once.

    psycopg2 waits for the server inside libpq, where Python runs no signal handler until the
    statement ends (a pg_sleep(60) would make Ctrl-C wait a minute). The C-level handler still writes
    the signal's number to the wakeup fd: a thread reading it asks the server to cancel, the statement
    fails at once, and the KeyboardInterrupt (or _Terminated) raised next rolls back and unlocks.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signals are delivered to the main thread only; main() called from a thread has none
        return
    # A socket pair, not a pipe: Windows takes only a socket as the wakeup fd.
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    previous_term = signal.getsignal(signal.SIGTERM)
    if previous_term == signal.SIG_DFL:  # an ignored SIGTERM stays ignored
        signal.signal(signal.SIGTERM, _raise_terminated)
    watcher = threading.Thread(
        target=_cancel_on_wakeup, args=(reader, migrator), name="pgops-signals", daemon=True
    )
    watcher.start()
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.set_wakeup_fd(previous_fd)
        writer.close()  # the watcher reads end-of-file and returns
        watcher.join()
        reader.close()


def _cancel_on_wakeup(reader: socket.socket, migrator: Migrator) -> None:
    """Cancel the migrator's statement each time SIGINT or SIGTERM arrives, until the writer closes."""
    while data := reader.recv(64):
        if signal.SIGINT in data or signal.SIGTERM in data:
            migrator.cancel()


# An expected error's documented exit code: the first kind it is, else _EXIT_FAILED.
_EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (ConfigError, _EXIT_USAGE),
    (LockTimeout, _EXIT_LOCK),
    (DirtyDatabase, _EXIT_DIRTY),
    (CannotConnect, _EXIT_CONNECT),
    (PoolTimeout, _EXIT_CONNECT),
    (MigrationFailed, _EXIT_FAILED),
    (MigrationError, _EXIT_INVALID),  # bad files, drift, out-of-order versions
    (psycopg2.OperationalError, _EXIT_CONNECT),
)


def _migrator(args: argparse.Namespace, environ: Mapping[str, str]) -> Migrator:
    """Return a migration command's Migrator, on --dsn, else PGOPS_MIGRATE_URL, else DATABASE_URL.

    PGOPS_MIGRATE_URL comes before DATABASE_URL so that an application whose DATABASE_URL points at
    a connection pooler migrates over a direct connection, with the same environment.
    """
    source, dsn = "--dsn", args.dsn
    for name in ("PGOPS_MIGRATE_URL", "DATABASE_URL"):
        if not dsn:
            source, dsn = name, environ.get(name, "").strip()
    if not dsn:
        raise ConfigError("no database given; pass --dsn or set PGOPS_MIGRATE_URL or DATABASE_URL")
    _check_dsn(dsn, source)  # a bad one named as given
    return Migrator(
        dsn,
        args.dir,
        lock_timeout=args.lock_timeout,
        allow_out_of_order=args.allow_out_of_order,
        connect_retry=RetryPolicy.from_env(environ),
    )


def _say(args: argparse.Namespace, text: str) -> None:
    """Print one line of a command's report, unless -q asked for errors only."""
    if not args.quiet:
        print(text, flush=True)


def _print_applied(args: argparse.Namespace, verb: str) -> Callable[[Migration, float], None]:
    return lambda migration, ms: _say(args, f"{verb} {migration.name} ({ms:.1f} ms)")


def _cmd_migrate(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    migrator = _migrator(args, environ)
    started = time.perf_counter()
    if args.dry_run:
        pending = migrator.migrate(target=args.target, dry_run=True)
        for migration in pending:
            print(f"would apply {migration.name}")  # the answer asked for: shown even with -q
        _say(args, f"dry run: {len(pending)} migration(s) would be applied; nothing was changed")
        return _EXIT_OK
    with _cancel_on_signals(migrator):
        applied = migrator.migrate(target=args.target, on_done=_print_applied(args, "applied"))
    total = (time.perf_counter() - started) * 1000.0
    # The database's version, not the newest this process applied: runners take turns.
    where = f"; now at version {migrator.at_version}" if applied else "; already up to date"
    _say(args, f"applied {len(applied)} migration(s) in {total:.0f} ms{where}")
    return _EXIT_OK


def _cmd_status(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    migrator = _migrator(args, environ)
    rows = migrator.status()
    problems = migrator.validate()  # files status had to leave out, drift, dirty rows: said, not refused
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in rows], indent=2))
        for problem in problems:
            print(f"pgops: problem: {problem}", file=sys.stderr)
    else:
        _print_status(rows, problems)
    return _EXIT_OK


def _print_status(rows: list[MigrationStatus], problems: Sequence[str] = ()) -> None:
    table = [("version", "description", "state", "applied at", "ms")]
    for r in rows:
        ms = f"{r.execution_ms:.1f}" if r.execution_ms else ""
        version = "R" if r.version is None else str(r.version)  # a repeatable migration
        table.append((version, r.description, r.state, r.applied_at or "", ms))
    widths = [max(len(row[i]) for row in table) for i in range(5)]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    pending = sum(r.state in ("pending", "outdated") for r in rows)
    print(f"{len(rows) - pending} applied or recorded, {pending} pending")
    if problems:
        print(f"{len(problems)} problem(s):")
        for problem in problems:
            print(f"  {problem}")


def _cmd_validate(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    migrator = _migrator(args, environ)
    problems = migrator.validate()
    spec = _load_schema_spec(args.dir)
    if spec is not None and not problems:
        pending = migrator.pending()
        if pending:
            _say(args, f"schema check skipped: {len(pending)} migration(s) pending")
        else:
            with migrator.connection() as conn:
                report = check_schema(conn, **spec)
            problems += report.problems
            for note in report.notes:
                _say(args, f"note: {note}")
    for problem in problems:
        print(f"pgops: {problem}", file=sys.stderr)
    if problems:
        return _EXIT_INVALID
    _say(args, "migrations valid" + (" and schema as expected" if spec is not None else ""))
    return _EXIT_OK


def _cmd_rollback(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    migrator = _migrator(args, environ)
    if args.to == 0 and not args.yes:
        _confirm_everything(migrator)
    with _cancel_on_signals(migrator):
        reverted = migrator.rollback(args.to, on_done=_print_applied(args, "reverted"))
    # rollback() ends only at 0 or an applied version: that is where the database is now.
    _say(args, f"reverted {len(reverted)} migration(s); now at version {migrator.at_version}")
    return _EXIT_OK


def _confirm_everything(migrator: Migrator) -> None:
    """Ask on the terminal before `rollback --to 0` reverts every migration; without one, ask for --yes."""
    where = migrator.where
    if not sys.stdin.isatty():
        raise ConfigError(
            f"rollback --to 0 reverts every applied migration in {where}; pass --yes to confirm "
            "(stdin is not a terminal, so pgops cannot ask)"
        )
    # The question goes to stderr, which a redirected stdout (`> rollback.log`) does not hide.
    print(f"rollback --to 0 reverts every applied migration in {where}.", file=sys.stderr)
    print("Type 'yes' to go on: ", end="", file=sys.stderr, flush=True)
    if sys.stdin.readline().strip().lower() != "yes":
        raise ConfigError("rollback --to 0 not confirmed; nothing was reverted")


def _cmd_baseline(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    migrator = _migrator(args, environ)
    with _cancel_on_signals(migrator):
        migrator.baseline(args.version)
    _say(args, f"baselined at version {args.version}: migrate will not run the files up to it")
    return _EXIT_OK


def _cmd_repair(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    migrator = _migrator(args, environ)
    with _cancel_on_signals(migrator):
        actions = migrator.repair()
    for action in actions:
        _say(args, action)
    _say(args, f"repair: {len(actions)} change(s)" if actions else "repair: nothing to do")
    return _EXIT_OK


def _cmd_new(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    if not re.fullmatch(r"[A-Za-z0-9_-]+", args.name):
        raise ConfigError(f"migration name {args.name!r} may only hold letters, digits, '_' and '-'")
    if os.path.exists(args.dir) and not os.path.isdir(args.dir):
        raise ConfigError(f"migrations directory {args.dir!r} is not a directory; pass --dir with a folder")
    os.makedirs(args.dir, exist_ok=True)
    versions = [match["version"] for match in map(_MIGRATION_FILE.match, os.listdir(args.dir)) if match]
    number = max(map(int, versions), default=0) + 1
    width = max(map(len, versions), default=4)  # as wide as the widest existing file
    path = os.path.join(args.dir, f"{number:0{width}d}_{args.name}.sql")
    down = path.removesuffix(".sql") + ".down.sql"
    try:
        # The longer name first: a name too long for the file system leaves no half of the pair.
        with open(down, "x", encoding="utf-8") as fh:
            fh.write(
                f"-- undo {os.path.basename(path)}: what `pgops rollback` runs; delete this file if the\n"
                "-- change cannot be undone (rollback then refuses to go below it).\n"
            )
        with open(path, "x", encoding="utf-8") as fh:
            fh.write(f"-- {args.name}: write the change below; one transaction unless the next line says\n")
            fh.write("-- otherwise ('-- pgops: no-transaction' as one of the first lines).\n")
    except OSError as exc:
        if exc.errno != errno.ENAMETOOLONG:
            raise
        shown = args.name if len(args.name) <= 40 else args.name[:37] + "..."
        raise ConfigError(
            f"migration name {shown!r} ({len(args.name)} characters) is too long for a file name in "
            f"{args.dir!r}; shorten it"
        ) from None
    print(path)
    print(down)
    return _EXIT_OK


def _cmd_serve(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    if args.dsn:
        _check_dsn(args.dsn, "--dsn")  # a bad one named as given, not as the DATABASE_URL it replaces
    migrations = args.dir if os.path.isdir(args.dir) else ""  # none to watch: the pool's health only
    app = _health_app(environ, migrations, dsn=args.dsn, cache_ttl=args.cache_ttl)
    try:
        serve(app, args.host, args.port, ready=_announce)
    except OSError as exc:  # from bind(): a port in use, an address not on this host
        raise ConfigError(f"cannot listen on {args.host!r} port {args.port}: {exc.strerror or exc}") from None
    finally:
        app.pool.close()
    return _EXIT_OK


def _announce(server: WSGIServer) -> None:
    host, routes = str(server.server_address[0]), "/health/live, /health/ready, /health/detailed and /metrics"
    print(f"serving {routes} on http://{host}:{server.server_port}", flush=True)


def _cmd_demo(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    import importlib
    import tempfile
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pgserver warns about XDG_RUNTIME_DIR on servers
            pgserver = importlib.import_module("pgserver")
    except ImportError:  # no wheel for this Python (3.13+) or not installed: the system's PostgreSQL
        return _demo_on_system_postgres(args)
    with tempfile.TemporaryDirectory(prefix="pgops-demo-") as data:
        print(f"starting an embedded PostgreSQL with pgvector in {data}", flush=True)
        server = pgserver.get_server(data, cleanup_mode="stop")
        try:
            _demo(str(server.get_uri()), args)
        finally:
            server.cleanup()
            print("embedded PostgreSQL stopped", flush=True)
    return _EXIT_OK


def _demo_on_system_postgres(args: argparse.Namespace) -> int:
    """Run the demo on a throwaway cluster made with the system's initdb and pg_ctl, then remove it."""
    import tempfile

    bindir = _system_bindir()
    if bindir is None:
        raise ConfigError(
            "the demo needs PostgreSQL: pip install pgserver (Python 3.10 to 3.12; from a checkout: "
            "pip install '.[embedded]'), or install the PostgreSQL server so that initdb and pg_ctl are "
            "on PATH or in `pg_config --bindir`"
        )
    run_as = _demo_account()
    with tempfile.TemporaryDirectory(prefix="pgops-demo-") as data:
        if run_as is not None:
            os.chown(data, *run_as)  # stays 0700: only that account (and root) can reach the socket
        who = "" if run_as is None else " as the system user 'postgres'"
        print(f"starting a throwaway PostgreSQL from {bindir}{who} in {data} (no pgserver)", flush=True)
        cluster, log = os.path.join(data, "pgdata"), os.path.join(data, "postgres.log")
        run = functools.partial(_demo_postgres, bindir, run_as, os.path.join(data, "commands.log"))
        run("initdb", "-D", cluster, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync")
        # A Unix socket in the private directory and no TCP port: no other user can connect.
        quoted = data.replace("'", "''")
        with open(os.path.join(cluster, "postgresql.conf"), "a", encoding="utf-8") as conf:
            conf.write(f"listen_addresses = ''\nunix_socket_directories = '{quoted}'\n")
            conf.write("port = 5432\nfsync = off\n")
        dsn = psycopg2.extensions.make_dsn(host=data, port=5432, user="postgres", dbname="postgres")
        try:
            run("pg_ctl", "start", "-w", "-t", "60", "-D", cluster, "-l", log)
            _demo(dsn, args)
        finally:
            run("pg_ctl", "stop", "-m", "fast", "-w", "-D", cluster, check=False)
            print("PostgreSQL stopped", flush=True)
    return _EXIT_OK


def _system_bindir() -> str | None:
    """Return the directory of the system's initdb and pg_ctl: `pg_config --bindir`, else PATH."""
    import shutil
    import subprocess

    pg_config, found = shutil.which("pg_config"), ""
    if pg_config is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):  # check=True: a failure raises
            found = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=30, check=True
            ).stdout.strip()
    if found and all(shutil.which(prog, path=found) for prog in ("initdb", "pg_ctl")):
        return found
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl:
        return os.path.dirname(os.path.realpath(initdb))
    return None


def _demo_account() -> tuple[int, int] | None:
    """Return (uid, gid) of the 'postgres' account when running as root (initdb refuses root), else None."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    import pwd

    try:
        entry = pwd.getpwnam("postgres")  # made by every distribution's server package
    except KeyError:
        raise ConfigError(
            "the demo runs PostgreSQL as the system user 'postgres' when started as root (initdb refuses "
            "root), and there is no such user; run the demo as an ordinary user"
        ) from None
    return entry.pw_uid, entry.pw_gid


def _demo_postgres(
    bindir: str, run_as: tuple[int, int] | None, log: str, prog: str, *args: str, check: bool = True
) -> None:
    """Run initdb or pg_ctl from *bindir* (as *run_as*), output appended to *log*; on failure say why."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}  # no PGDATA, PGPORT, ...
    account: dict[str, Any] = {}
    if run_as is not None:
        account = {"user": run_as[0], "group": run_as[1], "extra_groups": []}
    # Output to a file, not a pipe, which the server could inherit and hold open; a session of its
    # own, so that Ctrl-C reaches only the demo, which then stops the server.
    with open(log, "a", encoding="utf-8") as out:
        try:
            done = subprocess.run(
                [os.path.join(bindir, prog), *args],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                cwd=os.path.dirname(log), start_new_session=True, check=False, timeout=120, **account,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            raise ConfigError(f"{prog} in {bindir!r} did not finish within 120 s") from None
    if check and done.returncode != 0:
        lines: list[str] = []
        for path in (log, os.path.join(os.path.dirname(log), "postgres.log")):  # pg_ctl start's server log
            with contextlib.suppress(OSError), open(path, encoding="utf-8", errors="replace") as fh:
                lines += [line.strip() for line in fh if line.strip()]
        # The server's own complaint says more than pg_ctl's summary ("could not start server").
        serious = [line for line in lines if re.search(r"\b(FATAL|PANIC|ERROR|error):", line)]
        reason = (serious or lines or [f"exit status {done.returncode}"])[-1]
        raise ConfigError(f"{prog} in {bindir!r} failed: {reason}")


def _demo(dsn: str, args: argparse.Namespace) -> None:
    """Migrate, load documents with 3072-d embeddings through the pool, search, report, serve."""
    with Pool(dsn, min_size=2, max_size=8, application_name="pgops-demo", monitor_interval=0) as pool:
        migrator = Migrator(pool, args.dir)
        with pool.connection() as conn, conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'")
            has_vector, major = cur.fetchone() is not None, conn.server_version // 10000
        if has_vector:
            migrator.migrate(on_done=_print_applied(args, "applied"))
            _demo_documents(pool, args)
        else:
            print(
                f"pgvector is not installed for this PostgreSQL {major}: skipping the migrations in "
                f"{args.dir!r} (they create the vector extension) and the embedding search; to see them, "
                f"install it (Debian/Ubuntu: apt install postgresql-{major}-pgvector; macOS: brew install "
                "pgvector)"
            )
            _on_16_threads(pool, _demo_query)
            print("ran 16 pooled transactions from 16 threads")
        print("\nmigration status:")
        _print_status(migrator.status())
        print("\npool stats:", json.dumps(pool.stats()))
        watched = migrator if has_vector else None  # pending migrations would fail the health check
        app = HealthApp(pool, migrator=watched, cache_ttl=args.cache_ttl, service="pgops-demo")
        detailed = _call_wsgi(app, "/health/detailed")
        print("\nGET /health/detailed:", json.dumps(json.loads(detailed), indent=2))

        def ready(server: WSGIServer) -> None:
            _announce(server)
            if args.seconds:
                timer = threading.Timer(args.seconds, server.shutdown)
                timer.daemon = True
                timer.start()
            print("until " + (f"{args.seconds:g} s have passed" if args.seconds else "Ctrl-C"), flush=True)

        serve(app, args.host, args.port, ready=ready)


def _demo_query(conn: psycopg2.extensions.connection) -> None:
    """Keep a pooled connection busy for a moment, so that 16 threads share 8 connections."""
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM generate_series(1, 100000)")


def _on_16_threads(pool: Pool, work: Callable[[psycopg2.extensions.connection], object]) -> None:
    """Run pool.run(work) from 16 threads at once, twice as many as the pool's connections, and wait."""
    workers = [threading.Thread(target=pool.run, args=(work,)) for _ in range(16)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


def _demo_documents(pool: Pool, args: argparse.Namespace) -> None:
    """Load documents with 3072-d embeddings through the pool and search them from 16 threads."""
    rng = random.Random(7)
    kinds = ["rust", "jupyter", "cilium", "talos", "solana", "ebpf"]
    vectors = [[rng.gauss(0.0, 1.0) for _ in range(3072)] for _ in range(args.documents)]
    docs = [
        (kinds[n % len(kinds)], f"guide/{n:04d}.md", f"document {n}", _vector_text(v), 500 + n)
        for n, v in enumerate(vectors)
    ]

    def load(conn: psycopg2.extensions.connection) -> None:
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO documents (doc_type, source_name, doc_path, content, embedding, "
                "token_count) VALUES (%s, 'demo', %s, %s, %s::vector, %s) ON CONFLICT DO NOTHING",
                docs,
            )

    started = time.perf_counter()
    pool.run(load, retry=RetryPolicy(max_attempts=3, initial_delay=0.2))
    took = time.perf_counter() - started
    print(f"inserted {len(docs)} documents with 3072-dimension embeddings in {took:.2f} s")
    query = _vector_text([x + rng.gauss(0.0, 0.1) for x in vectors[0]])

    def nearest(conn: psycopg2.extensions.connection) -> list[tuple[Any, ...]]:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT doc_path, embedding <=> %s::vector AS distance FROM documents "
                "ORDER BY embedding <=> %s::vector LIMIT 3",
                (query, query),
            )
            return cur.fetchall()

    _on_16_threads(pool, nearest)
    print("exact nearest neighbours of a noisy copy of guide/0000.md (cosine distance):")
    for path, distance in pool.run(nearest):
        print(f"  {path}  {distance:.4f}")


def _vector_text(values: list[float]) -> str:
    """Spell a vector as pgvector's text input, so the demo needs no numpy."""
    return "[" + ",".join(f"{x:.6g}" for x in values) + "]"


def _call_wsgi(app: _WSGIApp, path: str) -> bytes:
    """Call a WSGI app in-process for GET *path* and return the body."""
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "SERVER_NAME": "demo", "SERVER_PORT": "0"}
    return b"".join(app(environ, lambda status, headers, exc_info=None: None))


def _parser() -> argparse.ArgumentParser:
    import argparse

    def common_options(p: argparse.ArgumentParser) -> None:
        """Add the options every command takes: before the command (like git) or after it."""
        p.add_argument(
            "--dsn",
            help="libpq URL or key=value string (default: $DATABASE_URL; migration commands read "
            "$PGOPS_MIGRATE_URL first); connecting gives up after "
            f"connect_timeout seconds: the DSN's, else $PGCONNECT_TIMEOUT, else {_CONNECT_TIMEOUT:g}",
        )
        p.add_argument("--dir", help="migrations folder (default: $PGOPS_MIGRATIONS_DIR or ./migrations)")
        p.add_argument("-v", "--verbose", action="count", help="more log output (-v: SQL too)")
        p.add_argument("-q", "--quiet", action="store_true", help="print errors only")

    # Given a width, argparse does not import shutil (and bz2, lzma, fnmatch with it): 5 ms a command.
    fmt = functools.partial(argparse.HelpFormatter, width=_help_width())
    # After the command, an option that is not given must not undo the one given before it.
    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS, formatter_class=fmt)
    common_options(common)
    description = __doc__.splitlines()[0] if __doc__ else None
    parser = argparse.ArgumentParser(prog="pgops", description=description, formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"pgops {__version__}")
    common_options(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # What a command without these options makes its Migrator with (the Migrator's defaults).
    parser.set_defaults(lock_timeout=60.0, allow_out_of_order=False)

    def seconds(text: str) -> float:
        """Parse a number of seconds: finite, 0 or more."""
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value >= 0):
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (0 or more)")
        return value

    def port(text: str) -> int:
        """Parse a TCP port: 0 (any free one) to 65535."""
        if not re.fullmatch(r"[0-9]{1,5}", text.strip()) or int(text) > 65535:
            raise argparse.ArgumentTypeError(f"{text!r} is not a port (0 to 65535; 0 picks a free one)")
        return int(text)

    lock = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS, formatter_class=fmt)
    lock.add_argument(  # for the commands that take the migration lock; the others get 60 too (above)
        "--lock-timeout",
        type=seconds,
        metavar="SECONDS",
        help="give up when other runners show no progress for this long (default 60)",
    )

    def command(
        name: str, func: _Command, text: str, *more: argparse.ArgumentParser
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common, *more], help=text, description=text, formatter_class=fmt)
        p.set_defaults(func=func)
        return p

    p = command("migrate", _cmd_migrate, "apply pending migrations", lock)
    p.add_argument("--dry-run", action="store_true", help="list what would be applied; change nothing")
    p.add_argument("--target", type=int, metavar="V", help="apply up to version V only")
    p.add_argument(
        "--allow-out-of-order", action="store_true", help="apply versions older than the newest applied"
    )
    p = command("status", _cmd_status, "show applied and pending migrations")
    p.add_argument("--json", action="store_true", help="print JSON")
    command("validate", _cmd_validate, "check applied migrations against their files")
    text = "revert the newest migration, or those above --to V, with their .down.sql"
    p = command("rollback", _cmd_rollback, text, lock)
    p.add_argument(
        "--to", type=int, metavar="V", help="version to return to (0: everything; default: undo the newest)"
    )
    p.add_argument("--yes", action="store_true", help="confirm --to 0 without asking")
    p = command("baseline", _cmd_baseline, "record that the database is already at version V", lock)
    p.add_argument(
        "version", type=int, metavar="V", help="the version the database is at; files up to it never run"
    )
    command("repair", _cmd_repair, "remove failed history rows and accept changed checksums", lock)
    p = command("new", _cmd_new, "create the next numbered migration file")
    p.add_argument("name", help="description: letters, digits, '_' or '-'")
    for name, func, text in (
        ("serve", _cmd_serve, "serve /health/* and /metrics (wsgiref, threaded)"),
        ("demo", _cmd_demo, "run everything on a throwaway PostgreSQL (pgserver, else the system's)"),
    ):
        p = command(name, func, text)
        p.add_argument(
            "--host",
            default="127.0.0.1",
            help="address to bind (default 127.0.0.1, this host only; in a pod: 0.0.0.0 or the pod's IP)",
        )
        p.add_argument("--port", type=port, default=3001, help="port (default 3001; 0 picks a free one)")
        p.add_argument("--cache-ttl", type=seconds, metavar="SECONDS", help="health cache TTL (default 5)")
    p.set_defaults(cache_ttl=5.0)  # the demo's (serve's None reads $PGOPS_HEALTH_CACHE_TTL, else 5)
    p.add_argument(
        "--seconds", type=seconds, default=0, metavar="N", help="stop after N seconds (default: Ctrl-C)"
    )
    p.add_argument("--documents", type=int, default=300, metavar="N", help="documents to load (default 300)")
    return parser


def _help_width() -> int:
    """Return the width argparse wraps help to: shutil.get_terminal_size()'s columns, less 2."""
    columns = 0
    with contextlib.suppress(ValueError):
        columns = int(os.environ.get("COLUMNS", ""))
    if columns <= 0 and sys.__stdout__ is not None:
        with contextlib.suppress(OSError, ValueError):  # not a terminal, or no file descriptor
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
    return (columns if columns > 0 else 80) - 2


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run the ``pgops`` command line and return its exit code."""
    environ = os.environ if environ is None else environ
    args = _parser().parse_args(argv)
    args.dir = args.dir or environ.get("PGOPS_MIGRATIONS_DIR", "").strip() or "migrations"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("pgops: %(levelname)s: %(message)s"))
    _logger.addHandler(handler)
    # Warnings only by default (stdout already says what was applied); -v adds INFO and the SQL.
    # "applying NAME ..." for a slow migration shows by default: a Job's log then says what it waits on.
    levels = (_logger.level, _progress.level)
    _logger.setLevel(logging.ERROR if args.quiet else logging.DEBUG if args.verbose else logging.WARNING)
    _progress.setLevel(logging.ERROR if args.quiet else logging.INFO)
    try:
        code: int = args.func(args, environ)
        return code
    except (PgOpsError, psycopg2.Error, OSError) as exc:
        message = _scrub(exc)
        for dsn in (args.dsn, environ.get("PGOPS_MIGRATE_URL"), environ.get("DATABASE_URL")):
            message = _scrub(message, dsn or "")
        print(f"pgops: error: {message}", file=sys.stderr)
        return next((code for kind, code in _EXIT_CODES if isinstance(exc, kind)), _EXIT_FAILED)
    except KeyboardInterrupt as exc:  # the running statement was cancelled and rolled back
        if isinstance(exc, _Terminated):
            print("pgops: terminated", file=sys.stderr)
            return _EXIT_TERMINATED
        print("pgops: interrupted", file=sys.stderr)
        return _EXIT_INTERRUPTED
    finally:
        _logger.removeHandler(handler)
        _logger.setLevel(levels[0])
        _progress.setLevel(levels[1])


if __name__ == "__main__":
    # Under ``python -m pgops`` this file is __main__: let ``import pgops`` find it, not load it twice.
    sys.modules.setdefault("pgops", sys.modules[__name__])
    sys.exit(main())
