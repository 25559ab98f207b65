"""Property tests (hypothesis): env parsing, file names, statement splitting, checksums, Prometheus text."""

from __future__ import annotations

import math
import re
from typing import Any
from urllib.parse import quote

import psycopg2
import psycopg2.extensions
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from pgops import (
    BadMigration,
    ConfigError,
    PoolConfig,
    RetryPolicy,
    _parse_migration_name,
    _render_prometheus,
    _scrub,
    _split_sql,
    migration_checksum,
    redact_dsn,
)

# Bounded and deterministic enough for CI: no example database written into the checkout.
PROPERTY = settings(max_examples=200, deadline=None, database=None)

DSN = "postgresql://app@db.internal:5432/docs"
BIGINT_MAX = 2**63 - 1

# -- environment parsing ---------------------------------------------------------------------------

NUMBERS = st.one_of(
    st.integers(min_value=-(10**6), max_value=10**25).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(
        ["nan", "inf", "-inf", "Infinity", "1e3", "1e400", "1_000", "0x10", "+7", "-0", "٣", "2.5"]
    ),
)
BOOLEANS = st.sampled_from(["true", "False", "YES", "no", "1", "0", "on", "Off", "maybe", "t", "y"])
ENV_TEXT = st.one_of(
    st.text(max_size=30),
    NUMBERS,
    BOOLEANS,
    st.tuples(st.sampled_from(["", " ", "\t", "\n"]), NUMBERS, st.sampled_from(["", " ", "\n"])).map("".join),
)


def python_int(raw: str) -> int | None:
    """Return what int() makes of the stripped text, or None."""
    try:
        return int(raw.strip())
    except ValueError:
        return None


def python_float(raw: str) -> float | None:
    """Return what float() makes of the stripped text when finite, or None."""
    try:
        value = float(raw.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


# variable -> (field, parser, smallest valid value, strictly greater than the smallest?)
POOL_VARS: dict[str, tuple[str, Any, float, bool]] = {
    "POOL_MIN_CONNECTIONS": ("min_size", python_int, 0, False),
    "POOL_MAX_CONNECTIONS": ("max_size", python_int, 1, False),
    "POOL_ACQUIRE_TIMEOUT": ("acquire_timeout", python_float, 0, True),
    "POOL_MAX_LIFETIME": ("max_lifetime", python_float, 0, False),
    "POOL_IDLE_TIMEOUT": ("idle_timeout", python_float, 0, False),
}


@PROPERTY
@given(var=st.sampled_from(sorted(POOL_VARS)), raw=ENV_TEXT)
def test_pool_env_parses_to_the_number_or_names_the_variable(var: str, raw: str) -> None:
    """Any text in a POOL_* variable gives the number it spells, or a ConfigError naming the variable."""
    field, parse, smallest, strict = POOL_VARS[var]
    default = PoolConfig.preset("development", dsn=DSN)
    expected = getattr(default, field) if not raw.strip() else parse(raw)
    valid = expected is not None and (expected > smallest if strict else expected >= smallest)
    if valid and field == "min_size":
        valid = expected <= default.max_size
    if valid and field == "max_size":
        valid = expected >= default.min_size
    try:
        config = PoolConfig.from_env({"DATABASE_URL": DSN, "POOL_PRESET": "development", var: raw})
    except ConfigError as exc:
        assert not valid, exc
        assert var in str(exc)
        assert "\n" not in str(exc)  # the value is shown with repr(): one line
        return
    assert valid
    assert getattr(config, field) == expected


RETRY_VARS: dict[str, tuple[str, Any, float, bool]] = {
    "DB_RETRY_MAX_ATTEMPTS": ("max_attempts", python_int, 1, False),
    "DB_RETRY_INITIAL_DELAY": ("initial_delay", python_float, 0, False),
    "DB_RETRY_MAX_DELAY": ("max_delay", python_float, 0, False),
    "DB_RETRY_MULTIPLIER": ("multiplier", python_float, 1, False),
}


def python_bool(raw: str) -> bool | None:
    """Return the documented meaning of a DB_RETRY_JITTER value, or None."""
    value = raw.strip().lower()
    return (
        True
        if value in ("1", "true", "yes", "on")
        else False
        if value in ("0", "false", "no", "off")
        else None
    )


@PROPERTY
@given(var=st.sampled_from([*sorted(RETRY_VARS), "DB_RETRY_JITTER"]), raw=ENV_TEXT)
def test_retry_env_parses_to_the_number_or_names_the_variable(var: str, raw: str) -> None:
    """Any text in a DB_RETRY_* variable gives the value it spells, or a ConfigError naming the variable."""
    if var == "DB_RETRY_JITTER":
        field, expected = "jitter", (True if not raw.strip() else python_bool(raw))
        valid = expected is not None
    else:
        field, parse, smallest, _ = RETRY_VARS[var]
        expected = getattr(RetryPolicy(), field) if not raw.strip() else parse(raw)
        valid = expected is not None and expected >= smallest
    try:
        policy = RetryPolicy.from_env({var: raw})
    except ConfigError as exc:
        assert not valid, exc
        assert var in str(exc)
        assert "\n" not in str(exc)
        return
    assert valid
    assert getattr(policy, field) == expected


# -- migration file names --------------------------------------------------------------------------

DESCRIPTION = st.from_regex(r"[A-Za-z0-9_-]{1,30}", fullmatch=True)
# An independent statement of the documented name: digits, '_', [A-Za-z0-9_-]+, optional .down, .sql.
NAME = re.compile(r"([0-9]+)_([A-Za-z0-9_-]+)(\.down)?\.sql")


@PROPERTY
@given(
    version=st.integers(min_value=0, max_value=BIGINT_MAX),
    padding=st.integers(min_value=0, max_value=6),
    description=DESCRIPTION,
    down=st.booleans(),
)
def test_valid_migration_names_round_trip(version: int, padding: int, description: str, down: bool) -> None:
    """A name built from a version (zero-padded), a description and an optional .down parses back."""
    name = f"{version:0{len(str(version)) + padding}d}_{description}{'.down' if down else ''}.sql"
    assert _parse_migration_name(name) == (version, description, down)


NAME_PARTS = st.sampled_from(
    ["0001", "1", "00", "_", "-", "a", "Z", "9", ".down", ".sql", ".SQL", " ", "\n", "é", "٣", ".", "/", "x"]
)


# Names one part away from valid: each part drawn from good and bad choices.
NEAR_VALID = st.builds(
    "{}{}{}{}{}{}".format,
    st.sampled_from(["0001", "1", "", "x1", "٣", "0" * 25 + "7", str(BIGINT_MAX), str(BIGINT_MAX + 1)]),
    st.sampled_from(["_", "-", "", "__"]),
    st.sampled_from(["init", "a-b_c", "", "bad name", "é", "a.b", "_"]),
    st.sampled_from(["", ".down", ".DOWN", ".down.down"]),
    st.sampled_from([".sql", ".SQL", "sql", ""]),
    st.sampled_from(["", "\n", " ", ".bak", "\x00"]),
)


@PROPERTY
@given(name=st.one_of(st.text(max_size=25), st.lists(NAME_PARTS, max_size=8).map("".join), NEAR_VALID))
@example(name="0001_init.sql\n")  # a regex ending in $ would accept the newline
@example(name="٣_init.sql")  # not ASCII digits
@example(name=f"{BIGINT_MAX + 1}_init.sql")  # beyond the history table's bigint
def test_any_file_name_parses_as_the_pattern_says_or_raises_bad_migration(name: str) -> None:
    """A file name parses exactly when it fits the documented pattern; otherwise BadMigration names it."""
    match = NAME.fullmatch(name)
    fits = match is not None and int(match[1]) <= BIGINT_MAX
    try:
        parsed = _parse_migration_name(name)
    except BadMigration as exc:
        assert not fits, exc
        assert repr(name) in str(exc)
        return
    assert fits and match is not None
    assert parsed == (int(match[1]), match[2], match[3] is not None)


# -- statement splitting ---------------------------------------------------------------------------

SQLISH = st.lists(st.sampled_from([*"ab;'\"$-/*()\n \\eE_1", "$$", "$x$", "--", "/*", "*/"])).map("".join)


@PROPERTY
@given(text=st.one_of(st.text(), SQLISH))
def test_split_sql_pieces_join_back_to_the_text(text: str) -> None:
    """Joining the pieces gives back any input, and every piece but the last ends with a semicolon."""
    pieces = _split_sql(text)
    assert "".join(pieces) == text
    assert all(piece.endswith(";") for piece in pieces[:-1])
    assert all(pieces)


CHARS = st.text(alphabet=st.sampled_from(list("abc XYZ;:,.()0'\"$\\\n\t-*/é€")), max_size=20)
PLAIN = st.text(alphabet=st.sampled_from(list("abc XYZ;:,.0$é€\n\t")), max_size=20)  # no quotes, */, --
WORD = st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True).filter(
    lambda w: w.upper() not in ("BEGIN", "ATOMIC", "CASE", "END")
)


def dollar_quoted(tag: str, body: str) -> str:
    """Return body in $tag$ quotes (the body never holds the closing delimiter)."""
    return f"${tag}${body.replace('$', '')}${tag}$"


def block_comment(outer: str, inner: str, nested: bool) -> str:
    """Return a block comment, nested one level deep when asked."""
    clean = [t.replace("*", "").replace("/", "") for t in (outer, inner)]
    return f"/* {clean[0]} /* {clean[1]} */ */" if nested else f"/* {clean[0]}{clean[1]} */"


FRAGMENT = st.one_of(
    WORD,
    st.integers(min_value=0, max_value=10**6).map(str),
    CHARS.map(lambda s: "'" + s.replace("'", "''") + "'"),  # standard string: backslashes are plain
    CHARS.map(lambda s: "E'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"),  # escape string
    CHARS.map(lambda s: '"' + s.replace('"', '""') + '"'),  # quoted identifier
    st.builds(dollar_quoted, st.sampled_from(["", "body", "_x1"]), CHARS),
    PLAIN.map(lambda s: "-- " + s.replace("\n", " ") + "\n"),
    st.builds(block_comment, PLAIN, PLAIN, st.booleans()),
    CHARS.map(lambda s: "(" + re.sub(r"['\"$()\\\-/*]", "", s) + ")"),  # psql keeps ';' in parentheses
    st.lists(WORD.map(lambda w: f"SELECT {w}"), min_size=1, max_size=3).map(
        lambda body: "BEGIN ATOMIC " + "; ".join(body) + "; END"
    ),
    st.just("CASE WHEN a THEN 1 ELSE 2 END"),
)
STATEMENT = st.lists(FRAGMENT, min_size=1, max_size=6).map(" ".join)


@PROPERTY
@given(statements=st.lists(STATEMENT.map(lambda s: "CREATE " + s), min_size=1, max_size=6))
def test_split_sql_never_splits_inside_quotes_dollar_quotes_identifiers_or_comments(
    statements: list[str],
) -> None:
    """Semicolons in strings, dollar quotes, identifiers, comments and bodies never split a statement."""
    text = "".join(statement + ";\n" for statement in statements)
    pieces = _split_sql(text)
    assert len(pieces) == len(statements) + 1  # the last piece is the final newline
    assert pieces[0] == statements[0] + ";"
    assert [p.lstrip("\n") for p in pieces[1:-1]] == [s + ";" for s in statements[1:]]
    assert pieces[-1] == "\n"


# -- checksums -------------------------------------------------------------------------------------

# What a UTF-8 file can hold (no surrogates), without CR and BOM, which the variants add.
TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\ufeff"), max_size=200
)


@PROPERTY
@given(text=TEXT, crlf=st.lists(st.booleans(), min_size=1), bom=st.booleans())
def test_checksum_ignores_line_endings_and_a_byte_order_mark(text: str, crlf: list[bool], bom: bool) -> None:
    """CRLF instead of LF (on any lines) and a leading BOM do not change a migration's checksum."""
    lines = text.split("\n")
    endings = [("\r\n" if crlf[n % len(crlf)] else "\n") for n in range(len(lines) - 1)]
    variant = "".join(line + end for line, end in zip(lines[:-1], endings, strict=True)) + lines[-1]
    assert migration_checksum(("\ufeff" if bom else "") + variant) == migration_checksum(text)


@PROPERTY
@given(
    text=TEXT.filter(lambda t: any(not c.isspace() for c in t)),
    index=st.integers(min_value=0),
    other=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\ufeff").filter(
        lambda c: not c.isspace()
    ),
)
def test_checksum_changes_when_a_visible_character_changes(text: str, index: int, other: str) -> None:
    """Replacing one non-whitespace character with another changes the checksum."""
    visible = [i for i, c in enumerate(text) if not c.isspace()]
    at = visible[index % len(visible)]
    assume(text[at] != other)
    assert migration_checksum(text[:at] + other + text[at + 1 :]) != migration_checksum(text)


# -- Prometheus text -------------------------------------------------------------------------------

METRIC = st.from_regex(r"[a-zA-Z_:][a-zA-Z0-9_:]{0,15}", fullmatch=True).filter(
    lambda n: not n.endswith(("_total", "_count", "_sum", "_bucket", "_created", "_info", "_gsum", "_gcount"))
)
LABEL = st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_]{0,10}", fullmatch=True).filter(lambda n: not n.startswith("__"))
ODD_TEXT = st.one_of(
    st.text(max_size=30),
    st.lists(st.sampled_from([*'\\"\n{}=, #é€\t\r', "\\n", '\\"', "\U0001f512"]), max_size=30).map("".join),
)
VALUE = st.one_of(
    st.integers(min_value=-(2**53), max_value=2**53),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
)


@PROPERTY
@given(
    name=METRIC,
    # Parsers strip each line, so no format can carry whitespace at the ends of a HELP text (pgops'
    # help texts are constants); anything else in it must survive.
    help_text=ODD_TEXT.filter(lambda text: text == text.strip()),
    samples=st.lists(st.tuples(st.dictionaries(LABEL, ODD_TEXT, max_size=3), VALUE), min_size=1, max_size=4),
)
def test_prometheus_text_parses_back_with_the_same_labels_help_and_values(
    name: str, help_text: str, samples: list[tuple[dict[str, str], float]]
) -> None:
    """Any label values and help text survive rendering and prometheus_client's parser unchanged."""
    given = (name, "gauge", help_text, [("", labels, value) for labels, value in samples])
    text = _render_prometheus([given])
    families = list(text_string_to_metric_families(text))
    assert [f.name for f in families] == [name]
    family = families[0]
    assert family.type == "gauge"
    assert family.documentation == help_text
    assert [s.labels for s in family.samples] == [labels for labels, _ in samples]
    for parsed, (_, value) in zip(family.samples, samples, strict=True):
        assert parsed.name == name
        if math.isnan(float(value)):
            assert math.isnan(parsed.value)
        else:
            assert parsed.value == float(value)


# -- password redaction ----------------------------------------------------------------------------

PASSWORD = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=6, max_size=30
)


def dsn_with(password: str, form: str) -> str:
    """Return a URL or key=value DSN holding *password* (URL-encoded, or quoted by libpq's rules)."""
    if form == "url":
        return f"postgresql://app:{quote(password, safe='')}@db.internal:5432/docs"
    return str(psycopg2.extensions.make_dsn(host="db.internal", user="app", password=password, dbname="docs"))


@PROPERTY
@given(password=PASSWORD, form=st.sampled_from(["key=value", "url"]))
def test_redact_dsn_removes_any_password(password: str, form: str) -> None:
    """Whatever the password holds, the redacted DSN contains neither it nor its URL-encoded form."""
    forms = {password, quote(password, safe="")}
    skeleton = dsn_with("", form)
    assume(not any(f in skeleton or f in "***" for f in forms))  # text the DSN holds anyway
    redacted = redact_dsn(dsn_with(password, form))
    for secret in forms:
        assert secret not in redacted, redacted
    assert "***" in redacted


# Passwords as people write them into DSNs without quoting or percent-encoding them: the characters
# that libpq reads differently from a person around a core that must never show.  Whatever libpq
# makes of such a DSN, neither the redacted DSN nor any scrubbed message may keep the core.
CORE = "Kq7Zebra"
PASSWORD_EDGE = st.text(alphabet=st.sampled_from("/@#?&= \\'\"%:+ab9"), max_size=8)
SHAPED: dict[str, Any] = {
    "url-encoded": lambda pw: f"postgresql://app:{quote(pw, safe='')}@db.internal:5432/docs",
    "url-raw": lambda pw: f"postgresql://app:{pw}@db.internal:5432/docs",
    "url-raw-query": lambda pw: f"postgresql://app:{pw}@db.internal/docs?sslmode=disable",
    "query-encoded": lambda pw: f"postgresql://app@db.internal/docs?password={quote(pw, safe='')}",
    "query-raw-last": lambda pw: f"postgresql://app@db.internal/docs?sslmode=disable&password={pw}",
    "query-raw-first": lambda pw: f"postgresql://app@db.internal/docs?password={pw}&sslmode=disable",
    "kv-quoted": lambda pw: dsn_with(pw, "key=value"),
    "kv-raw-last": lambda pw: f"host=db.internal user=app dbname=docs password={pw}",
    "kv-raw-first": lambda pw: f"password={pw} host=db.internal user=app dbname=docs",
}


def ambiguous(shape: str, password: str) -> bool:
    """Tell whether the raw password reads as a further parameter to a person too ("a b=c", "a&b=c")."""
    if shape.startswith("query-raw"):
        return re.search(r"&[^&=]*=", password) is not None
    if shape.startswith("kv-raw"):
        return re.search(r"\s[A-Za-z_]\w*\s*=", password) is not None
    return False


@PROPERTY
@given(before=PASSWORD_EDGE, after=PASSWORD_EDGE, shape=st.sampled_from(sorted(SHAPED)))
@example(before="Sec/", after="", shape="url-raw")
@example(before="p@ss#", after="", shape="url-raw")
@example(before="abc#", after="", shape="query-raw-first")
@example(before="a\\ ", after="", shape="kv-raw-first")
@example(before="a ", after="", shape="kv-raw-first")
@example(before="'abc ", after="", shape="kv-raw-first")
@example(before="p%zz", after="", shape="url-raw")
@example(before="", after="%99", shape="query-raw-first")
def test_no_password_shape_survives_redaction_or_scrubbing(before: str, after: str, shape: str) -> None:
    """redact_dsn, and _scrub on libpq's own error and on any text holding the password, drop the core."""
    password = before + CORE + after
    assume(not ambiguous(shape, password))
    dsn = SHAPED[shape](password)
    assert CORE not in redact_dsn(dsn), redact_dsn(dsn)
    taken = ""
    try:
        taken = psycopg2.extensions.parse_dsn(dsn).get("password", "")
    except (psycopg2.ProgrammingError, UnicodeDecodeError) as exc:  # the latter: %XX that is not UTF-8
        assert CORE not in _scrub(str(exc), dsn), (str(exc), _scrub(str(exc), dsn))
    # The DSN itself, the password as meant, as written into the DSN and as libpq took it.
    text = f"{dsn} | {password} | {quote(password, safe='')} | {taken}"
    assert CORE not in _scrub(text, dsn), _scrub(text, dsn)
