"""PoolConfig and RetryPolicy: presets, environment parsing, validation and password redaction."""

from __future__ import annotations

import dataclasses

import pytest

import pgops
from pgops import ConfigError, PoolConfig, RetryPolicy, redact_dsn

DSN = "postgresql://app:Sup3rSecretPw@db.internal:5432/docs"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("development", (2, 10, 10.0, 1800.0, 300.0, True)),
        ("production", (5, 100, 30.0, 3600.0, 600.0, True)),
        ("high_traffic", (10, 200, 30.0, 3600.0, 300.0, True)),
        ("testing", (1, 5, 5.0, 300.0, 60.0, False)),
    ],
)
def test_presets_carry_the_doc_server_numbers(name: str, expected: tuple[object, ...]) -> None:
    """Each preset has the original Doc Server's sizes and timeouts."""
    cfg = PoolConfig.preset(name, dsn=DSN)
    got = (
        cfg.min_size,
        cfg.max_size,
        cfg.acquire_timeout,
        cfg.max_lifetime,
        cfg.idle_timeout,
        cfg.test_before_acquire,
    )
    assert got == expected


def test_from_env_reads_every_variable() -> None:
    """from_env applies POOL_* and APP_NAME over the chosen preset."""
    env = {
        "DATABASE_URL": DSN,
        "POOL_PRESET": "development",
        "POOL_MIN_CONNECTIONS": "3",
        "POOL_MAX_CONNECTIONS": "7",
        "POOL_ACQUIRE_TIMEOUT": "2.5",
        "POOL_MAX_LIFETIME": "0",
        "POOL_IDLE_TIMEOUT": "45",
        "APP_NAME": "docs-api",
    }
    cfg = PoolConfig.from_env(env)
    assert (cfg.min_size, cfg.max_size, cfg.acquire_timeout) == (3, 7, 2.5)
    assert (cfg.max_lifetime, cfg.idle_timeout, cfg.application_name) == (0.0, 45.0, "docs-api")
    assert cfg.test_before_acquire is True


def test_from_env_defaults_to_production() -> None:
    """Without POOL_PRESET the production preset applies."""
    assert PoolConfig.from_env({"DATABASE_URL": DSN}) == PoolConfig.preset("production", dsn=DSN)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"POOL_MAX_CONNECTIONS": "abc"}, "DATABASE_URL is not set"),
        ({"DATABASE_URL": DSN, "POOL_PRESET": "bogus", "POOL_MAX_CONNECTIONS": "x"}, "POOL_PRESET='bogus'"),
        (
            {"DATABASE_URL": DSN, "DATABASE_READ_URL": DSN, "POOL_MAX_CONNECTIONS": "2"},
            "DATABASE_READ_URL is for a primary pool",
        ),
    ],
)
def test_from_env_names_what_to_fix_first(env: dict[str, str], message: str) -> None:
    """The URL, then the preset, then the numbers; read_only with DATABASE_READ_URL names the variable."""
    with pytest.raises(ConfigError, match=message):
        PoolConfig.from_env(env, **({"read_only": True} if "DATABASE_READ_URL" in env else {}))


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"POOL_MAX_CONNECTIONS": "abc"}, ["POOL_MAX_CONNECTIONS", "'abc'", "not an integer"]),
        ({"POOL_MIN_CONNECTIONS": "1.5"}, ["POOL_MIN_CONNECTIONS", "'1.5'"]),
        ({"POOL_ACQUIRE_TIMEOUT": "soon"}, ["POOL_ACQUIRE_TIMEOUT", "'soon'"]),
        ({"POOL_ACQUIRE_TIMEOUT": "0"}, ["POOL_ACQUIRE_TIMEOUT", "greater than 0"]),
        ({"POOL_ACQUIRE_TIMEOUT": "nan"}, ["POOL_ACQUIRE_TIMEOUT", "'nan'"]),
        ({"POOL_MAX_LIFETIME": "-1"}, ["POOL_MAX_LIFETIME", "at least 0"]),
        ({"POOL_IDLE_TIMEOUT": "inf"}, ["POOL_IDLE_TIMEOUT", "'inf'"]),
        ({"POOL_MAX_CONNECTIONS": "0"}, ["POOL_MAX_CONNECTIONS", "at least 1"]),
        (
            {"POOL_MIN_CONNECTIONS": "9", "POOL_MAX_CONNECTIONS": "3"},
            ["POOL_MIN_CONNECTIONS", "POOL_MAX_CONNECTIONS"],
        ),
        ({"POOL_PRESET": "turbo"}, ["POOL_PRESET", "'turbo'", "production"]),
        ({"DATABASE_URL": ""}, ["DATABASE_URL", "not set"]),
        ({"DATABASE_URL": "host=db password=Sup3rSecretPw bogus"}, ["DATABASE_URL", "password=***"]),
    ],
)
def test_bad_environment_values_name_the_variable(env: dict[str, str], names: list[str]) -> None:
    """Every bad value raises ConfigError naming the variable and the value, never the password."""
    full = {"DATABASE_URL": DSN, **env}
    with pytest.raises(ConfigError) as info:
        PoolConfig.from_env(full)
    message = str(info.value)
    for name in names:
        assert name in message
    assert "Sup3rSecretPw" not in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"DB_RETRY_MAX_ATTEMPTS": "many"}, "DB_RETRY_MAX_ATTEMPTS"),
        ({"DB_RETRY_MAX_ATTEMPTS": "0"}, "DB_RETRY_MAX_ATTEMPTS"),
        ({"DB_RETRY_INITIAL_DELAY": "x"}, "DB_RETRY_INITIAL_DELAY"),
        ({"DB_RETRY_MAX_DELAY": "-3"}, "DB_RETRY_MAX_DELAY"),
        ({"DB_RETRY_MULTIPLIER": "0.5"}, "DB_RETRY_MULTIPLIER"),
        ({"DB_RETRY_JITTER": "maybe"}, "DB_RETRY_JITTER"),
    ],
)
def test_bad_retry_environment_values_name_the_variable(env: dict[str, str], name: str) -> None:
    """A bad DB_RETRY_* value raises ConfigError naming it."""
    with pytest.raises(ConfigError, match=name):
        RetryPolicy.from_env(env)


@pytest.mark.parametrize(
    ("raw", "expected"), [("1", True), ("yes", True), ("TRUE", True), ("0", False), ("no", False)]
)
def test_retry_jitter_accepts_usual_booleans(raw: str, expected: bool) -> None:
    """DB_RETRY_JITTER takes true/false, 1/0 and yes/no."""
    assert RetryPolicy.from_env({"DB_RETRY_JITTER": raw}).jitter is expected


def test_retry_policy_from_env() -> None:
    """DB_RETRY_* fill a RetryPolicy; max attempts counts every attempt."""
    policy = RetryPolicy.from_env(
        {
            "DB_RETRY_MAX_ATTEMPTS": "3",
            "DB_RETRY_INITIAL_DELAY": "0.5",
            "DB_RETRY_MAX_DELAY": "4",
            "DB_RETRY_MULTIPLIER": "3",
            "DB_RETRY_JITTER": "false",
        }
    )
    assert policy == RetryPolicy(
        max_attempts=3, initial_delay=0.5, max_delay=4.0, multiplier=3.0, jitter=False
    )
    assert list(policy.delays()) == [0.5, 1.5]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_size": 5, "max_size": 2},
        {"max_size": 0},
        {"acquire_timeout": 0},
        {"acquire_timeout": -1.0},
        {"idle_timeout": -5},
        {"max_waiting": -1},
        {"min_size": "3"},
        {"leak_threshold": float("inf")},
    ],
)
def test_construction_validates(kwargs: dict[str, object]) -> None:
    """Impossible settings are refused when the config is built."""
    with pytest.raises(ConfigError):
        PoolConfig(dsn=DSN, **kwargs)  # type: ignore[arg-type]


def test_config_is_frozen_and_replaceable() -> None:
    """Configs are frozen; dataclasses.replace makes a validated copy."""
    cfg = PoolConfig(dsn=DSN)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.max_size = 3  # type: ignore[misc]
    assert dataclasses.replace(cfg, max_size=50).max_size == 50
    with pytest.raises(ConfigError):
        dataclasses.replace(cfg, max_size=1, min_size=2)


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        ("postgresql://app:Sup3rSecretPw@db/docs", "postgresql://app:***@db/docs"),
        (
            "postgres://app:Sup3rSecretPw@h1:5432,h2:5433/docs?sslmode=require",
            "postgres://app:***@h1:5432,h2:5433/docs?sslmode=require",
        ),
        (
            "postgresql://app@db/docs?password=Sup3rSecretPw&sslmode=require",
            "postgresql://app@db/docs?password=***&sslmode=require",
        ),
        ("host=db user=app password=Sup3rSecretPw dbname=docs", "host=db user=app password=*** dbname=docs"),
        ("host=db password='Sup3r Secret Pw' dbname=docs", "host=db password=*** dbname=docs"),
        ("host=db PASSWORD = Sup3rSecretPw", "host=db PASSWORD = ***"),
        ("postgresql://app@db/docs", "postgresql://app@db/docs"),
        ("postgresql://app:ab#cd@db/docs", "postgresql://app:***@db/docs"),
        ("postgresql://app:ab?cd@db/docs?sslmode=require", "postgresql://app:***@db/docs?sslmode=require"),
    ],
)
def test_redact_dsn(dsn: str, expected: str) -> None:
    """The password is replaced in URL and key=value forms; the rest stays readable."""
    assert redact_dsn(dsn) == expected


def test_repr_and_str_never_show_the_password() -> None:
    """repr() and str() of a config redact the DSN's password."""
    cfg = PoolConfig(dsn=DSN)
    for text in (repr(cfg), str(cfg), repr(PoolConfig(dsn="host=db password=Sup3rSecretPw"))):
        assert "Sup3rSecretPw" not in text
        assert "***" in text


def test_invalid_dsn_is_a_config_error_without_the_password() -> None:
    """A DSN libpq cannot parse raises ConfigError; the message does not echo the password."""
    with pytest.raises(ConfigError) as info:
        PoolConfig(dsn="host=db password=Sup3rSecretPw junk")
    assert "Sup3rSecretPw" not in str(info.value)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, pgops.PgOpsError)
