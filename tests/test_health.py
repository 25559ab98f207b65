"""Tests of the health endpoints, the Prometheus text, mount() and the servers, against a real PostgreSQL."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
import secrets
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg2.extensions
import pytest
from prometheus_client.parser import text_string_to_metric_families

import pgtest
from pgops import (
    ConfigError,
    HealthApp,
    Migrator,
    Pool,
    _render_prometheus,
    create_app,
    make_server,
    mount,
    redact_dsn,
    serve,
)
from pgtest import ROOT, pgops_env

MODULE = create_app.__module__  # what gunicorn and waitress load: follows the import above
ROUTES = ("/health/live", "/health/ready", "/health/detailed", "/metrics")
PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"
TOKEN = "s3cret-token-" + secrets.token_hex(4)


call = pgtest.wsgi_call


def metrics(text: str) -> dict[str, Any]:
    """Parse Prometheus text into {family name: family}."""
    return {family.name: family for family in text_string_to_metric_families(text)}


def sample(families: dict[str, Any], name: str, **labels: str) -> float:
    """Return the value of one sample, found by its full name and labels."""
    for family in families.values():
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise AssertionError(f"no sample {name} {labels}")


@dataclasses.dataclass
class Migration:
    """Stand-in for a pending migration: what HealthApp reads from one."""

    version: int
    description: str


class FakeMigrator:
    """Stand-in for Migrator (not a database mock): pending() returns the given migrations or raises."""

    def __init__(self, *pending: Migration, error: Exception | None = None) -> None:
        self.items = list(pending)
        self.error = error

    def pending(self) -> list[Migration]:
        """Return the pending migrations, or raise the configured error."""
        if self.error is not None:
            raise self.error
        return list(self.items)


@pytest.fixture
def pool(dsn: str) -> Iterator[Pool]:
    """A small pool on this test's database."""
    with Pool(dsn, min_size=1, max_size=4, acquire_timeout=5, monitor_interval=0) as p:
        yield p


def frozen() -> float:
    """A clock that stands still, so that a cached check never expires during a test."""
    return 1000.0


@pytest.fixture
def app(pool: Pool) -> HealthApp:
    """A HealthApp whose cached check never expires, so each test sees one check unless it says otherwise."""
    return HealthApp(pool, cache_ttl=60.0, clock=frozen)


# -- routes ----------------------------------------------------------------------------------------


def test_live_never_touches_the_database(app: HealthApp, pool: Pool) -> None:
    """Liveness answers 200 without a database check or a connection request."""
    before = pool.stats()["requests_num"]
    reply = call(app, "/health/live")
    assert reply.status == 200
    assert reply.json() == {"status": "pass"}
    assert reply.headers["Cache-Control"] == "no-store"
    assert app.checks_run == 0
    assert pool.stats()["requests_num"] == before


def test_first_ready_request_runs_a_real_check(app: HealthApp) -> None:
    """The first readiness request after start checks the database instead of a pre-seeded verdict."""
    assert app.checks_run == 0
    reply = call(app, "/health/ready")
    assert reply.status == 200
    assert reply.json()["status"] == "pass"
    assert reply.headers["Cache-Control"] == "max-age=60"
    assert app.checks_run == 1


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/health/live", "application/json"),
        ("/health/ready", "application/json"),
        ("/health/detailed", "application/health+json"),
        ("/metrics", PROMETHEUS),
        ("/nowhere", "application/json"),
    ],
)
def test_every_response_has_content_type_and_length(app: HealthApp, path: str, content_type: str) -> None:
    """Each route sets Content-Type and a Content-Length that matches the body."""
    reply = call(app, path)
    assert reply.headers["Content-Type"] == content_type
    assert int(reply.headers["Content-Length"]) == len(reply.body) > 0
    if content_type != PROMETHEUS:
        reply.json()


@pytest.mark.parametrize("path", [*ROUTES, "/nowhere"])
def test_head_returns_the_headers_of_get_without_a_body(app: HealthApp, path: str) -> None:
    """HEAD answers with GET's status and headers and an empty body."""
    get = call(app, path)
    head = call(app, path, method="HEAD")
    assert head.body == b""
    assert head.status == get.status
    assert head.headers["Content-Type"] == get.headers["Content-Type"]
    assert int(head.headers["Content-Length"]) > 0


@pytest.mark.parametrize("path", ["/", "/health", "/health/", "/health/livez", "/metrics/x", "/HEALTH/LIVE"])
def test_unknown_paths_are_404_json(app: HealthApp, path: str) -> None:
    """A path that is not a route answers 404 with a JSON body."""
    reply = call(app, path)
    assert reply.status == 404
    assert reply.json()["error"] == "not found"


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
@pytest.mark.parametrize("path", ROUTES)
def test_other_methods_are_405_with_allow(app: HealthApp, path: str, method: str) -> None:
    """Methods other than GET and HEAD answer 405 with an Allow header and run no check."""
    reply = call(app, path, method=method)
    assert reply.status == 405
    assert reply.headers["Allow"] == "GET, HEAD"
    assert reply.json()["error"] == "method not allowed"
    assert app.checks_run == 0


def test_trailing_slash_is_accepted(app: HealthApp) -> None:
    """A route with a trailing slash is the same route."""
    assert call(app, "/health/live/").status == 200


# -- detailed --------------------------------------------------------------------------------------


def test_detailed_follows_the_health_check_draft(pool: Pool) -> None:
    """Detailed health is application/health+json with status, version, serviceId and checks."""
    app = HealthApp(pool, service="docs", version="9.9.9")
    reply = call(app, "/health/detailed")
    assert reply.status == 200
    assert reply.headers["Content-Type"] == "application/health+json"
    assert reply.headers["Cache-Control"] == "max-age=5"
    body = reply.json()
    assert body["status"] == "pass"
    assert body["version"] == "9.9.9"
    assert body["serviceId"] == "docs"
    assert body["description"]
    assert "output" not in body
    assert set(body["checks"]) == {"postgres:responseTime", "postgres:connections", "uptime"}
    for items in body["checks"].values():
        for item in items:
            assert item["status"] == "pass"
            assert {"componentType", "observedValue", "observedUnit", "time"} <= set(item)
    response_time = body["checks"]["postgres:responseTime"][0]
    assert response_time["componentType"] == "datastore"
    assert response_time["observedUnit"] == "ms"
    assert response_time["observedValue"] >= 0
    connections = body["checks"]["postgres:connections"][0]
    assert connections["observedValue"] == 0
    assert connections["poolMax"] == 4
    assert 0 <= connections["utilization"] <= 1
    assert body["checks"]["uptime"][0]["observedUnit"] == "s"


def test_pool_verdict_maps_to_the_connections_check(pool: Pool) -> None:
    """A pool more than 95% in use is unhealthy: the connections check fails and detailed answers 503."""
    app = HealthApp(pool, clock=frozen)
    assert call(app, "/health/ready").status == 200  # the check itself needs a connection
    held = [pool.getconn() for _ in range(pool.config.max_size)]
    try:
        reply = call(app, "/health/detailed")
        assert reply.status == 503
        connections = reply.json()["checks"]["postgres:connections"][0]
        assert connections["status"] == "fail"
        assert connections["observedValue"] == 4
        assert "utilization" in connections["output"]
        assert call(app, "/health/ready").status == 200  # cached: busy is not "not ready"
    finally:
        for conn in held:
            pool.putconn(conn)
    assert call(app, "/health/detailed").json()["status"] == "pass"


# -- migrations ------------------------------------------------------------------------------------


def test_pending_migration_makes_ready_fail_and_detailed_warn(pool: Pool) -> None:
    """With a migration pending, ready answers 503 naming it, detailed warns, metrics count it."""
    app = HealthApp(pool, migrator=FakeMigrator(Migration(2, "add_index")))
    ready = call(app, "/health/ready")
    assert ready.status == 503
    assert ready.json()["status"] == "fail"
    assert any("2 add_index" in reason for reason in ready.json()["reasons"])
    detailed = call(app, "/health/detailed")
    assert detailed.status == 200
    assert detailed.json()["status"] == "warn"
    check = detailed.json()["checks"]["migrations:pending"][0]
    assert (check["status"], check["observedValue"]) == ("warn", 1)
    families = metrics(call(app, "/metrics").body.decode())
    assert families["pgops_migrations_pending"].type == "gauge"
    assert sample(families, "pgops_migrations_pending") == 1
    assert app.checks_run == 1


def test_a_changed_repeatable_migration_does_not_make_ready_fail(pool: Pool, dsn: str, mdir: Path) -> None:
    """Readiness waits for versioned migrations only: during a rollout, two releases see each other's
    repeatable files as changed, and neither should go unready for it."""
    pgtest.write(mdir, "0001_items.sql", "CREATE TABLE items (id int);\n")
    pgtest.write(mdir, "R__v.sql", "CREATE OR REPLACE VIEW v AS SELECT id FROM items;\n")
    Migrator(dsn, str(mdir)).migrate()
    pgtest.write(mdir, "R__v.sql", "CREATE OR REPLACE VIEW v AS SELECT id, 1 AS one FROM items;\n")
    pgtest.write(mdir, "0002_more.sql", "SELECT 1;\n")
    assert [m.name for m in Migrator(dsn, str(mdir)).pending()] == ["0002_more.sql", "R__v.sql"]
    ready = call(HealthApp(pool, migrator=Migrator(pool, str(mdir))), "/health/ready")
    assert ready.status == 503
    assert ready.json()["reasons"] == ["migrations: 1 pending: 2 more"]
    Migrator(dsn, str(mdir)).migrate(target=1)
    assert call(HealthApp(pool, migrator=Migrator(pool, str(mdir))), "/health/ready").status == 503
    (mdir / "0002_more.sql").unlink()
    assert [m.name for m in Migrator(dsn, str(mdir)).pending()] == ["R__v.sql"]
    assert call(HealthApp(pool, migrator=Migrator(pool, str(mdir))), "/health/ready").status == 200


def test_no_pending_migration_is_ready(pool: Pool) -> None:
    """With a migrator and nothing pending, ready passes and migrations:pending reports 0."""
    app = HealthApp(pool, migrator=FakeMigrator())
    assert call(app, "/health/ready").status == 200
    check = call(app, "/health/detailed").json()["checks"]["migrations:pending"][0]
    assert (check["status"], check["observedValue"]) == ("pass", 0)


def test_a_migrator_error_is_not_ready(pool: Pool) -> None:
    """A migrator that raises a pgops error makes ready 503 and fails the migrations check."""
    app = HealthApp(pool, migrator=FakeMigrator(error=ConfigError("no migrations folder 'x'")))
    ready = call(app, "/health/ready")
    assert ready.status == 503
    assert any("ConfigError" in reason for reason in ready.json()["reasons"])
    assert call(app, "/health/detailed").json()["checks"]["migrations:pending"][0]["status"] == "fail"


def test_unexpected_error_answers_500_and_logs_the_traceback(
    pool: Pool, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug inside the app answers 500 JSON without details; the traceback goes to the pgops log only."""
    app = HealthApp(pool, migrator=FakeMigrator(error=ZeroDivisionError("internal detail 42")))
    with caplog.at_level(logging.ERROR, logger="pgops"):
        reply = call(app, "/health/ready")
    assert reply.status == 500
    assert reply.json()["status"] == "fail"
    assert b"internal detail 42" not in reply.body
    assert b"Traceback" not in reply.body
    errors = [r for r in caplog.records if r.name == "pgops" and r.exc_info]
    assert errors and errors[0].exc_info is not None and errors[0].exc_info[0] is ZeroDivisionError


# -- token -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer wrong", f"Basic {TOKEN}", f"Bearer {TOKEN}x", TOKEN, f"Bearer {TOKEN[:-1]}"],
)
def test_token_hides_details_and_guards_metrics(pool: Pool, authorization: str | None) -> None:
    """Without the right bearer token detailed shows only its status and /metrics answers 401."""
    app = HealthApp(pool, token=TOKEN)
    headers = {} if authorization is None else {"Authorization": authorization}
    detailed = call(app, "/health/detailed", headers=headers)
    assert detailed.status == 200
    assert detailed.json() == {"status": "pass"}
    assert detailed.headers["Vary"] == "Authorization"
    denied = call(app, "/metrics", headers=headers)
    assert denied.status == 401
    assert denied.headers["WWW-Authenticate"].startswith("Bearer")
    assert denied.headers["Content-Type"] == "application/json"
    assert denied.json()["status"] == "fail"
    assert call(app, "/health/live", headers=headers).status == 200
    assert call(app, "/health/ready", headers=headers).status == 200


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_right_token_shows_details_and_metrics(pool: Pool, scheme: str) -> None:
    """With the right bearer token detailed has its checks and /metrics answers."""
    app = HealthApp(pool, token=TOKEN)
    headers = {"Authorization": f"{scheme} {TOKEN}"}
    assert "checks" in call(app, "/health/detailed", headers=headers).json()
    assert call(app, "/metrics", headers=headers).status == 200


def test_status_code_without_token_matches_the_full_answer(pool: Pool) -> None:
    """A failing service answers 503 to detailed with or without the token."""
    app = HealthApp(pool, token=TOKEN, migrator=FakeMigrator(error=ConfigError("broken")))
    anonymous = call(app, "/health/detailed")
    assert anonymous.status == 503
    assert anonymous.json() == {"status": "fail"}
    assert call(app, "/health/detailed", headers={"Authorization": f"Bearer {TOKEN}"}).status == 503


# -- metrics ---------------------------------------------------------------------------------------

GAUGES = [
    "pgops_pool_min",
    "pgops_pool_max",
    "pgops_pool_size",
    "pgops_pool_available",
    "pgops_pool_in_use",
    "pgops_checkouts_waiting",
    "pgops_up",
    "pgops_health_status",
    "pgops_check_duration_seconds",
    "pgops_uptime_seconds",
    "pgops_start_time_seconds",
    "pgops_info",
]
COUNTERS = [
    "pgops_checkouts_total",
    "pgops_checkouts_queued_total",
    "pgops_checkouts_errors_total",
    "pgops_returns_bad_total",
    "pgops_connections_total",
    "pgops_connections_errors_total",
    "pgops_connections_lost_total",
    "pgops_queries_total",
    "pgops_queries_errors_total",
    "pgops_checkouts_wait_seconds_total",
    "pgops_connections_seconds_total",
    "pgops_usage_seconds_total",
    "pgops_queries_seconds_total",
    "pgops_health_checks_total",
]


def test_metrics_parse_as_prometheus_text(pool: Pool) -> None:
    """/metrics is Prometheus text 0.0.4 that prometheus_client parses, with documented names and types."""
    service = 'svc "quoted" back\\slash\nnewline'
    app = HealthApp(pool, service=service, version="1.2.3", clock=frozen)
    with pool.connection() as conn, conn.cursor() as cur:
        cur.execute("SELECT 1")
    reply = call(app, "/metrics")
    assert reply.status == 200
    assert reply.headers["Content-Type"] == PROMETHEUS
    assert reply.headers["Cache-Control"] == "no-store"
    text = reply.body.decode()
    families = metrics(text)
    types = {name: family.type for name, family in families.items()}
    for name in GAUGES:
        assert types[name] == "gauge", name
    for name in COUNTERS:
        # prometheus_client names a counter family without its _total suffix.
        assert types[name.removesuffix("_total")] == "counter", name
        assert f"# TYPE {name} counter" in text
        assert sample(families, name) >= 0
    assert types["pgops_acquire_wait_seconds"] == "histogram"
    assert "pgops_migrations_pending" not in types
    assert all(name.startswith("pgops_") for name in types)
    assert "_ms" not in text
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            assert f"# HELP {line.split()[2]} " in text
    assert sample(families, "pgops_up") == 1
    assert sample(families, "pgops_health_status", status="pass") == 1
    assert sample(families, "pgops_health_status", status="fail") == 0
    assert sample(families, "pgops_info", service=service, version="1.2.3") == 1
    assert sample(families, "pgops_pool_max") == 4
    assert sample(families, "pgops_queries_total") >= 1
    buckets = [s for s in families["pgops_acquire_wait_seconds"].samples if s.name.endswith("_bucket")]
    assert buckets[-1].labels["le"] == "+Inf"
    assert [s.value for s in buckets] == sorted(s.value for s in buckets)
    assert sample(families, "pgops_acquire_wait_seconds_count") == buckets[-1].value >= 1
    assert sample(families, "pgops_acquire_wait_seconds_sum") >= 0


def test_every_metric_is_in_the_readme_table(pool: Pool) -> None:
    """Each family /metrics emits has a row in README's metrics table, and each row names a real one."""
    app = HealthApp(pool, migrator=FakeMigrator(), clock=frozen)
    text = call(app, "/metrics").body.decode()
    emitted = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    rows = re.findall(r"^\| ((?:`pgops_\w+`(?:, )?)+) \|", (ROOT / "README.md").read_text(), re.M)
    documented = {name for row in rows for name in re.findall(r"`(pgops_\w+)`", row)}
    assert emitted - documented == set()
    # Read pools add these; the rest must all be emitted above (a renamed metric leaves a stale row).
    read_pool_only = {
        "pgops_reads_waited_total",
        "pgops_reads_fallback_total",
        "pgops_replication_lag_seconds",
    }
    assert documented - emitted == read_pool_only


def test_render_prometheus_escapes_label_values_and_help() -> None:
    """Label values and help texts with backslashes, quotes and newlines read back unchanged."""
    odd = 'a\\b "c"\nd'
    text = _render_prometheus(
        [
            ("x_info", "gauge", "help \\ with\nnewline", [("", {"v": odd, "w": "plain"}, 1)]),
            ("x_total", "counter", "a counter", [("", {}, 2.5)]),
            (
                "x_seconds",
                "histogram",
                "h",
                [("_bucket", {"le": "+Inf"}, 3), ("_sum", {}, 0.5), ("_count", {}, 3)],
            ),
        ]
    )
    families = metrics(text)
    assert families["x_info"].samples[0].labels == {"v": odd, "w": "plain"}
    assert families["x_info"].documentation == "help \\ with\nnewline"
    assert families["x"].samples[0].value == 2.5
    assert families["x_seconds"].type == "histogram"
    assert text.endswith("\n")


def test_scrapes_reuse_the_cached_check(app: HealthApp) -> None:
    """Scrapes, ready and detailed within one TTL share a single database check."""
    for _ in range(5):
        assert call(app, "/metrics").status == 200
    call(app, "/health/ready")
    call(app, "/health/detailed")
    assert app.checks_run == 1
    assert sample(metrics(call(app, "/metrics").body.decode()), "pgops_health_checks_total") == 1


# -- single flight ---------------------------------------------------------------------------------


def _hammer(app: HealthApp, path: str, n: int) -> list[int]:
    """Send n concurrent requests from n real threads released together; return their status codes."""
    barrier = threading.Barrier(n, timeout=60)
    statuses: list[int] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            barrier.wait()
            statuses.append(call(app, path).status)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors[0]
    return statuses


def test_concurrent_ready_requests_run_one_check_per_ttl(pool: Pool) -> None:
    """200 simultaneous readiness probes run one database check per TTL and all get its answer."""
    now = [1000.0]
    app = HealthApp(pool, cache_ttl=5.0, clock=lambda: now[0])
    assert _hammer(app, "/health/ready", 200) == [200] * 200
    assert app.checks_run == 1
    now[0] += 4.9
    assert _hammer(app, "/health/ready", 200) == [200] * 200
    assert app.checks_run == 1
    now[0] += 0.1
    assert _hammer(app, "/health/detailed", 200) == [200] * 200
    assert app.checks_run == 2


class BlockingMigrator:
    """Stand-in for Migrator whose pending() blocks until released, to hold a check in flight."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def pending(self) -> list[Migration]:
        """Signal entry, wait for release, report nothing pending."""
        self.entered.set()
        assert self.release.wait(timeout=60)
        return []


def test_a_hung_check_fails_waiters_without_starting_another(pool: Pool) -> None:
    """A request that outwaits a hung check answers 503 and starts no second check of its own."""
    with pool.connection():
        pass  # a connection is open and idle: the leader's 0.1 s ready_timeout need not cover a connect
    migrator = BlockingMigrator()
    app = HealthApp(pool, migrator=migrator, ready_timeout=0.1, clock=frozen)
    first: list[int] = []
    leader = threading.Thread(target=lambda: first.append(call(app, "/health/ready").status))
    leader.start()
    try:
        assert migrator.entered.wait(timeout=30)
        reply = call(app, "/health/ready")
        assert reply.status == 503
        assert "still running" in reply.json()["reasons"][0]
        assert app.checks_run == 1
    finally:
        migrator.release.set()
        leader.join(timeout=30)
    assert first == [200]
    assert call(app, "/health/ready").status == 200
    assert app.checks_run == 1


def test_a_waiter_that_outwaits_a_hung_check_still_names_the_pool(dsn: str) -> None:
    """The answer made up for a waiter that gave up is about the same pool as the check it waited on."""
    with Pool(dsn, name="orders", min_size=1, max_size=2) as pool:
        with pool.connection():
            pass
        migrator = BlockingMigrator()
        app = HealthApp(pool, migrator=migrator, ready_timeout=0.1, clock=frozen)
        leader = threading.Thread(target=call, args=(app, "/health/detailed"))
        leader.start()
        try:
            assert migrator.entered.wait(timeout=30)
            reply = call(app, "/health/detailed")
        finally:
            migrator.release.set()
            leader.join(timeout=30)
    assert reply.status == 503
    (check,) = reply.json()["checks"]["postgres:responseTime"]
    assert check["componentId"] == "orders"


def test_zero_ttl_still_shares_the_check_in_flight(pool: Pool) -> None:
    """With cache_ttl=0 every request may check, but never more checks than requests."""
    app = HealthApp(pool, cache_ttl=0.0)
    assert _hammer(app, "/health/ready", 50) == [200] * 50
    assert 1 <= app.checks_run <= 50


# -- outages and secrets ---------------------------------------------------------------------------


def _assert_clean(bodies: list[bytes], dsn: str, password: str) -> None:
    """Assert that no body holds the password, the DSN (even redacted) or a traceback."""
    for body in bodies:
        text = body.decode()
        assert password not in text
        assert redact_dsn(dsn) not in text
        assert "password=" not in text
        assert "Traceback" not in text


def test_outage_fails_ready_and_detailed_until_the_server_is_back(own_server: pgtest.LocalServer) -> None:
    """A stopped server fails ready and detailed once the cache expires, live stays 200, a restart heals."""
    dsn = own_server.dsn()
    bodies: list[bytes] = []

    def get(path: str) -> pgtest.Reply:
        reply = call(app, path)
        bodies.append(reply.body)
        return reply

    with Pool(dsn, min_size=1, max_size=3, acquire_timeout=5, monitor_interval=0) as pool:
        app = HealthApp(pool, cache_ttl=0.2, ready_timeout=0.5)
        assert get("/health/ready").status == 200
        own_server.stop("fast")
        pgtest.wait_until(
            lambda: get("/health/ready").status == 503, timeout=30, message="ready did not fail"
        )
        assert get("/health/live").status == 200
        ready = get("/health/ready").json()
        assert ready["status"] == "fail" and ready["reasons"][0].startswith("database: ")
        detailed = get("/health/detailed")
        assert detailed.status == 503
        assert detailed.headers["Content-Type"] == "application/health+json"
        body = detailed.json()
        assert body["status"] == "fail"
        assert body["checks"]["postgres:responseTime"][0]["status"] == "fail"
        assert body["checks"]["postgres:responseTime"][0]["output"]
        assert body["output"]
        scrape = get("/metrics")
        assert sample(metrics(scrape.body.decode()), "pgops_up") == 0
        assert sample(metrics(scrape.body.decode()), "pgops_health_status", status="fail") == 1
        _assert_clean(bodies, dsn, own_server.password)
        own_server.start()
        pgtest.wait_until(
            lambda: get("/health/ready").status == 200, timeout=30, message="ready did not recover"
        )
        assert get("/health/detailed").json()["status"] == "pass"
        assert sample(metrics(get("/metrics").body.decode()), "pgops_up") == 1


def test_authentication_errors_leak_no_password_or_dsn(own_server: pgtest.LocalServer) -> None:
    """With a wrong password every route answers without the password, the DSN or a traceback."""
    wrong = "Wr0ng-" + secrets.token_hex(8)
    dsn = own_server.dsn(password=wrong)
    with Pool(dsn, min_size=1, max_size=2, acquire_timeout=5, monitor_interval=0) as pool:
        app = HealthApp(pool, cache_ttl=0.0, ready_timeout=1.0, migrator=FakeMigrator())
        replies = {path: call(app, path) for path in ROUTES}
    assert replies["/health/live"].status == 200
    assert replies["/health/ready"].status == 503
    reasons = " ".join(replies["/health/ready"].json()["reasons"])
    assert "CannotConnect" in reasons or "authentication" in reasons
    assert "<dsn>" in reasons or "authentication" in reasons
    assert replies["/health/detailed"].status == 503
    assert replies["/health/detailed"].json()["checks"]["migrations:pending"][0]["status"] == "warn"
    assert sample(metrics(replies["/metrics"].body.decode()), "pgops_up") == 0
    _assert_clean([r.body for r in replies.values()], dsn, wrong)


# -- mount -----------------------------------------------------------------------------------------


def test_mount_routes_health_paths_and_passes_others_untouched(app: HealthApp) -> None:
    """mount() sends /health/* and /metrics to the health app and everything else, as is, to the app."""
    seen: list[dict[str, Any]] = []
    answer = [b"from the app"]

    def inner(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        seen.append(environ)
        start_response("418 I'm a teapot", [("Content-Type", "text/plain"), ("X-App", "1")])
        return answer

    routed = mount(inner, app)
    for path in ("/", "/docs", "/health", "/healthz", "/metricsx", "/api/health/live"):
        reply = call(routed, path, method="POST")
        assert (reply.status, reply.body, reply.headers["X-App"]) == (418, b"from the app", "1"), path
        environ: dict[str, Any] = {"PATH_INFO": path, "REQUEST_METHOD": "POST"}
        assert routed(environ, lambda *a: None) is answer
        assert seen[-1] is environ
    for path in ROUTES:
        assert call(routed, path).status == 200, path
    assert call(routed, "/health/nowhere").status == 404
    assert call(routed, "/metrics/").status == 200


# -- create_app ------------------------------------------------------------------------------------


def test_create_app_reads_the_environment(dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """create_app builds pool, token and cache TTL from DATABASE_URL, POOL_* and PGOPS_HEALTH_*."""
    monkeypatch.chdir(tmp_path)  # no ./migrations here: no migrator
    environ = {
        "DATABASE_URL": dsn,
        "POOL_PRESET": "testing",
        "POOL_MAX_CONNECTIONS": "3",
        "PGOPS_HEALTH_TOKEN": TOKEN,
        "PGOPS_HEALTH_CACHE_TTL": "0.5",
    }
    app = create_app(environ)
    try:
        assert (app.token, app.cache_ttl, app.migrator) == (TOKEN, 0.5, None)
        assert app.pool.config.max_size == 3
        assert call(app, "/health/ready").status == 200
        assert call(app, "/health/detailed").json() == {"status": "pass"}
        assert call(app, "/metrics").status == 401
    finally:
        app.pool.close()


def test_create_app_holds_one_or_two_connections(
    dsn: str, admin: psycopg2.extensions.connection, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """create_app's pool (production preset) opens at most 2 backends under concurrent probes, not 5."""
    monkeypatch.chdir(tmp_path)  # no ./migrations here: no migrator
    app_name = f"pgops-health-{secrets.token_hex(4)}"
    app = create_app({"DATABASE_URL": dsn, "APP_NAME": app_name, "PGOPS_HEALTH_CACHE_TTL": "0"})
    try:
        assert (app.pool.config.min_size, app.pool.config.max_size) == (1, 2)
        statuses: list[int] = []

        def probe() -> None:
            for path in ("/health/ready", "/health/detailed", "/metrics") * 3:
                statuses.append(call(app, path).status)

        threads = [threading.Thread(target=probe) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert statuses == [200] * 72
        assert app.checks_run >= 2  # TTL 0: the requests ran checks of their own

        def backends() -> int:
            query = "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
            return int(pgtest.scalar(admin, query, (app_name,)))

        def settled() -> int | None:
            """Return the backends once all the pool opens are there (a production min_size: 5)."""
            n = backends()
            return n if n >= 1 and n == app.pool.stats()["pool_size"] else None

        opened = pgtest.wait_until(settled, timeout=30, message="the pool's backends never settled")
        assert 1 <= opened <= 2
        assert app.pool.stats()["connections_num"] <= 2
    finally:
        app.pool.close()


@pytest.mark.parametrize(
    ("variables", "sizes"),
    [
        ({}, (1, 2)),
        ({"POOL_PRESET": "high_traffic"}, (1, 2)),
        ({"POOL_MIN_CONNECTIONS": "3"}, (3, 3)),
        ({"POOL_MIN_CONNECTIONS": "0"}, (0, 2)),
        ({"POOL_MAX_CONNECTIONS": "1"}, (1, 1)),
        ({"POOL_MAX_CONNECTIONS": "10"}, (1, 10)),
        ({"POOL_MIN_CONNECTIONS": "4", "POOL_MAX_CONNECTIONS": "6"}, (4, 6)),
    ],
)
def test_create_app_pool_sizes_follow_pool_connections_variables(
    dsn: str, variables: dict[str, str], sizes: tuple[int, int]
) -> None:
    """POOL_MIN/MAX_CONNECTIONS override create_app's 1-2 bounds; one alone moves the other as needed."""
    app = create_app({"DATABASE_URL": dsn, **variables})
    try:
        assert (app.pool.config.min_size, app.pool.config.max_size) == sizes
    finally:
        app.pool.close()


@pytest.mark.parametrize("variable", ["POOL_MIN_CONNECTIONS", "POOL_MAX_CONNECTIONS"])
def test_create_app_names_a_bad_pool_size_variable(dsn: str, variable: str) -> None:
    """A bad POOL_MIN/MAX_CONNECTIONS stops create_app with a message naming the variable and value."""
    with pytest.raises(ConfigError, match=f"^{variable}='many' is not an integer$"):
        create_app({"DATABASE_URL": dsn, variable: "many"})


@pytest.mark.parametrize("ttl", ["abc", "-1", "nan"])
def test_create_app_rejects_a_bad_cache_ttl(dsn: str, ttl: str) -> None:
    """A bad PGOPS_HEALTH_CACHE_TTL stops start-up with a message naming the variable."""
    with pytest.raises(ConfigError, match="PGOPS_HEALTH_CACHE_TTL"):
        create_app({"DATABASE_URL": dsn, "PGOPS_HEALTH_CACHE_TTL": ttl})


def test_create_app_starts_while_the_database_is_down() -> None:
    """create_app succeeds with no server listening; ready answers 503 and live 200."""
    password = "Pa55-" + secrets.token_hex(8)
    url = f"postgresql://app:{password}@127.0.0.1:{pgtest.free_port()}/db"
    app = create_app({"DATABASE_URL": url, "POOL_PRESET": "testing"})
    try:
        assert call(app, "/health/live").status == 200
        ready = call(app, "/health/ready")
        assert ready.status == 503
        _assert_clean([ready.body, call(app, "/health/detailed").body], url, password)
    finally:
        app.pool.close()


@pytest.mark.parametrize(
    "kwargs",
    [{"cache_ttl": -1}, {"cache_ttl": float("inf")}, {"ready_timeout": 0}, {"token": ""}, {"token": " "}],
)
def test_health_app_rejects_bad_arguments(pool: Pool, kwargs: dict[str, Any]) -> None:
    """Invalid HealthApp arguments raise ConfigError."""
    with pytest.raises(ConfigError):
        HealthApp(pool, **kwargs)


# -- real servers ----------------------------------------------------------------------------------


def fetch(url: str, method: str = "GET", headers: dict[str, str] | None = None) -> pgtest.Reply:
    """Send one HTTP request and return the reply, error statuses included."""
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return pgtest.Reply(response.status, dict(response.headers), response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return pgtest.Reply(exc.code, dict(exc.headers), exc.read())


def test_make_server_serves_http_and_logs_to_the_pgops_logger(
    app: HealthApp, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    """make_server on port 0 serves every route over HTTP and logs request lines to pgops, not stderr."""
    caplog.set_level(logging.DEBUG, logger="pgops")
    server = make_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        assert fetch(base + "/health/live").status == 200
        ready = fetch(base + "/health/ready")
        assert (ready.status, json.loads(ready.body)["status"]) == (200, "pass")
        assert fetch(base + "/metrics").headers["Content-Type"] == PROMETHEUS
        missing = fetch(base + "/nowhere")
        assert (missing.status, json.loads(missing.body)) == (404, {"status": "fail", "error": "not found"})
        assert fetch(base + "/health/live", method="POST").status == 405
        head = fetch(base + "/health/detailed", method="HEAD")
        assert (head.status, head.body) == (200, b"")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=30)
    assert not thread.is_alive()
    pgtest.wait_until(
        lambda: any("GET /health/live" in r.getMessage() for r in caplog.records if r.name == "pgops"),
        timeout=10,
        message="request line not logged to pgops",
    )
    assert "GET /health/live" not in capfd.readouterr().err


def test_serve_returns_after_shutdown_from_another_thread(app: HealthApp) -> None:
    """serve() outside the main thread installs no signal handlers and returns once shut down."""
    handlers = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT))
    started = threading.Event()
    servers: list[Any] = []

    def on_ready(server: Any) -> None:
        servers.append(server)
        started.set()

    thread = threading.Thread(target=serve, args=(app,), kwargs={"port": 0, "ready": on_ready}, daemon=True)
    thread.start()
    assert started.wait(timeout=30)
    assert fetch(f"http://127.0.0.1:{servers[0].server_port}/health/live").status == 200
    servers[0].shutdown()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers


@contextlib.contextmanager
def running(cmd: list[str], environ: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run cmd beside log (no ./migrations there) with environ added; terminate it by pid at the end."""
    env = pgops_env(None, environ)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=log.parent, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Wait until url answers 200, failing early (with the log) if the process exits."""

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        try:
            return fetch(url).status == 200
        except OSError:  # not listening yet
            return False

    pgtest.wait_until(up, timeout=60, interval=0.1, message=f"{url} did not answer 200")


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM is POSIX")
def test_serve_stops_gracefully_on_sigterm(dsn: str, tmp_path: Path) -> None:
    """serve() in a main thread stops on SIGTERM, returns, and the process exits 0."""
    script = (
        f"import {MODULE} as m\n"
        "app = m.create_app()\n"
        "m.serve(app, port=0, ready=lambda server: print('port', server.server_port, flush=True))\n"
        "app.pool.close()\n"
        "print('stopped', flush=True)\n"
    )
    log = tmp_path / "serve.log"
    environ = {"DATABASE_URL": dsn, "POOL_PRESET": "testing"}
    with running([sys.executable, "-c", script], environ, log) as proc:
        line = pgtest.wait_until(
            lambda: next((x for x in log.read_text().splitlines() if x.startswith("port ")), None),
            timeout=60,
            message="serve() did not start",
        )
        base = f"http://127.0.0.1:{line.split()[1]}"
        wait_http(base + "/health/ready", proc, log)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()
    assert "stopped" in log.read_text()


@pytest.mark.parametrize("server", ["gunicorn", "waitress"])
def test_create_app_runs_under_gunicorn_and_waitress(server: str, dsn: str, tmp_path: Path) -> None:
    """gunicorn 'MODULE:create_app()' and waitress-serve --call MODULE:create_app serve every route."""
    pytest.importorskip(server)
    port = pgtest.free_port()
    cmd = {
        "gunicorn": [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", "1",
                     f"{MODULE}:create_app()"],
        "waitress": [sys.executable, "-m", "waitress", f"--listen=127.0.0.1:{port}", "--call",
                     f"{MODULE}:create_app"],
    }[server]  # fmt: skip
    environ = {"DATABASE_URL": dsn, "POOL_PRESET": "testing", "PGOPS_HEALTH_TOKEN": TOKEN}
    log = tmp_path / f"{server}.log"
    base = f"http://127.0.0.1:{port}"
    with running(cmd, environ, log) as proc:
        wait_http(base + "/health/ready", proc, log)
        assert fetch(base + "/health/live").status == 200
        assert json.loads(fetch(base + "/health/detailed").body) == {"status": "pass"}
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert json.loads(fetch(base + "/health/detailed", headers=auth).body)["checks"]
        assert fetch(base + "/metrics").status == 401
        scrape = fetch(base + "/metrics", headers=auth)
        assert scrape.headers["Content-Type"] == PROMETHEUS
        assert sample(metrics(scrape.body.decode()), "pgops_up") == 1
        head = fetch(base + "/health/ready", method="HEAD")
        assert (head.status, head.body) == (200, b"")
        assert fetch(base + "/nowhere").status == 404
    assert dsn not in log.read_text(errors="replace")
