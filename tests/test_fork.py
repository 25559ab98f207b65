"""A pool and a health app used across os.fork(): multiprocessing, gunicorn --preload and a bare fork."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg2
import psycopg2.extensions
import pytest

import pgtest
from pgops import Pool, create_app
from pgtest import wait_until
from test_health import running

ROOT = Path(__file__).resolve().parent.parent
MODULE = create_app.__module__  # what gunicorn loads: follows the import above

pytestmark = [
    pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX"),
    # Python 3.12+ warns about forking a process that has threads (the pool's worker): that is the point.
    pytest.mark.filterwarnings("ignore:.*use of fork\\(\\) may lead to deadlocks:DeprecationWarning"),
]


def backend_pid(conn: psycopg2.extensions.connection) -> int:
    """Return the pid of the server process behind conn."""
    return int(pgtest.scalar(conn, "SELECT pg_backend_pid()"))


def parent_backends(pool: Pool, count: int) -> set[int]:
    """Check out count connections at once and return their backend pids."""
    conns = [pool.getconn() for _ in range(count)]
    try:
        return {backend_pid(c) for c in conns}
    finally:
        for c in conns:
            pool.putconn(c)


# -- a bare fork -------------------------------------------------------------------------------------


def run_in_child(child: Callable[[], dict[str, object]]) -> dict[str, object]:
    """Fork; in the child call child() and send back its JSON result; return it (or the child's error)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 0
        try:
            os.close(read_end)
            result = child()
        except BaseException as exc:
            result, code = {"error": repr(exc)}, 1
        try:
            os.write(write_end, json.dumps(result).encode())
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()  # until the child exits
    _pid, status = os.waitpid(pid, 0)
    result = json.loads(data) if data else {"error": "no answer"}
    result["exit"] = os.waitstatus_to_exitcode(status)
    return dict(result)


def test_child_opens_its_own_connections_and_never_touches_the_parents(dsn: str) -> None:
    """A forked child cannot use or close the parent's connections, and has a working pool of its own."""
    with Pool(dsn, min_size=2, max_size=4, acquire_timeout=10, monitor_interval=0) as pool:
        pool.wait(timeout=30)
        before = parent_backends(pool, 2)
        opened = pool.stats()["connections_num"]
        lent = pool.getconn()  # lent at the fork: the child's copy must stay unusable
        lent_pid = backend_pid(lent)

        def child() -> dict[str, object]:
            # Nothing is opened and no worker runs until the child asks: a child that never uses
            # the pool costs the server nothing.
            idle = {
                "size": pool.stats()["pool_size"],
                "workers": sum(t.name.startswith("pgops-pool") for t in threading.enumerate()),
            }
            try:
                backend_pid(lent)
                used = "answered"
            except psycopg2.Error:
                used = "refused"
            lent.close()  # the worst a child can do: before the fix, a Terminate on the parent's session
            pool.putconn(lent)  # quietly ignored
            pids = [pool.run(backend_pid) for _ in range(3)]
            stats = pool.stats()
            pool.close()
            return {
                "idle": idle,
                "used": used,
                "pids": pids,
                "lost": stats["connections_lost"],
                "size": stats["pool_size"],
            }

        result = run_in_child(child)
        assert result["exit"] == 0, result
        assert result["idle"] == {"size": 0, "workers": 0}
        assert result["used"] == "refused"
        child_pids = set(result["pids"])  # type: ignore[arg-type]
        assert child_pids and not child_pids & (before | {lent_pid})
        assert result["lost"] == 0
        # The parent is unaffected: its lent connection and its idle ones answer on the same backends.
        assert backend_pid(lent) == lent_pid
        pool.putconn(lent)
        assert parent_backends(pool, 2) == before
        stats = pool.stats()
        assert stats["connections_lost"] == 0
        assert stats["connections_num"] == opened


# -- multiprocessing ---------------------------------------------------------------------------------

_shared_pool: Pool | None = None  # set before the fork, so that the workers inherit it


def _task(n: int) -> tuple[int, int, int]:
    """Run one query through the inherited pool: (os pid, backend pid, n * 2 computed by the server)."""
    assert _shared_pool is not None

    def query(conn: psycopg2.extensions.connection) -> tuple[int, int]:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_backend_pid(), %s * 2", (n,))
            row = cur.fetchone()
            assert row is not None
            return int(row[0]), int(row[1])

    backend, doubled = _shared_pool.run(query)
    return os.getpid(), backend, doubled


def test_multiprocessing_fork_workers_use_their_own_connections(dsn: str) -> None:
    """multiprocessing fork workers each query through their own connections; the parent keeps its own."""
    global _shared_pool
    with Pool(dsn, min_size=2, max_size=4, acquire_timeout=10, monitor_interval=0) as pool:
        pool.wait(timeout=30)
        before = parent_backends(pool, 2)
        _shared_pool = pool
        try:
            with multiprocessing.get_context("fork").Pool(4) as workers:
                results = workers.map_async(_task, range(40)).get(timeout=120)
        finally:
            _shared_pool = None
        assert [doubled for _os, _backend, doubled in results] == [n * 2 for n in range(40)]
        owner: dict[int, int] = {}
        for os_pid, backend, _doubled in results:
            assert os_pid != os.getpid()
            assert owner.setdefault(backend, os_pid) == os_pid, "two processes shared one backend"
        assert not set(owner) & before
        assert parent_backends(pool, 2) == before
        assert pool.stats()["connections_lost"] == 0


# -- gunicorn --preload ------------------------------------------------------------------------------


def fetch(url: str) -> int:
    """GET url and return the status code (error statuses included)."""
    try:
        with urllib.request.urlopen(url, timeout=20) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as exc:
        with exc:
            return int(exc.code)


def client_socket_inodes(server_port: int) -> dict[int, str]:
    """Map the local port of each established 127.0.0.1 connection to server_port to its socket inode."""
    found: dict[int, str] = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        (local, port), (_remote, remote_port), state = fields[1].split(":"), fields[2].split(":"), fields[3]
        if local == "0100007F" and int(remote_port, 16) == server_port and state == "01":
            found[int(port, 16)] = fields[9]
    return found


def socket_inodes_of(pid: int) -> set[str]:
    """Return the inodes of the sockets process pid holds open."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


def children_of(pid: int) -> list[int]:
    """Return the pids of pid's child processes."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


@pytest.fixture
def gunicorn_preload(dsn: str, tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes], Path, str]]:
    """gunicorn --preload -w 4 'pgops:create_app()' on a free port: (base URL, process, log, APP_NAME)."""
    pytest.importorskip("gunicorn")
    port = pgtest.free_port()
    app_name = f"pgops-fork-{os.getpid()}"
    (tmp_path / "migrations").mkdir()  # empty: ready also runs the migrator's query on a pool connection
    environ = {
        "DATABASE_URL": dsn,
        "POOL_PRESET": "testing",
        "POOL_MIN_CONNECTIONS": "1",
        "APP_NAME": app_name,
        "PGOPS_HEALTH_CACHE_TTL": "0",  # every request runs a database check
        "PGOPS_MIGRATIONS_DIR": str(tmp_path / "migrations"),
    }
    cmd = [sys.executable, "-m", "gunicorn", "--preload", "--workers", "4", "--timeout", "20",
           "--bind", f"127.0.0.1:{port}", f"{MODULE}:create_app()"]  # fmt: skip
    log = tmp_path / "gunicorn.log"
    with running(cmd, environ, log) as proc:
        yield f"http://127.0.0.1:{port}", proc, log, app_name


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads socket owners from Linux /proc")
def test_gunicorn_preload_workers_answer_health_on_their_own_backends(
    gunicorn_preload: tuple[str, subprocess.Popen[bytes], Path, str], admin: psycopg2.extensions.connection
) -> None:
    """gunicorn --preload -w 4: concurrent ready/detailed all 200, no worker timeout, no shared backend."""
    base, proc, log, app_name = gunicorn_preload
    params = admin.get_dsn_parameters()
    if params.get("host") != "127.0.0.1":
        pytest.skip("finds socket owners of connections to a server on 127.0.0.1 only")
    server_port = int(params["port"])

    def up() -> bool:
        assert proc.poll() is None, log.read_text(errors="replace")
        try:
            return fetch(base + "/health/live") == 200
        except OSError:
            return False

    wait_until(up, timeout=60, interval=0.1, message="gunicorn did not start")
    workers = wait_until(lambda: len(children_of(proc.pid)) == 4 and children_of(proc.pid), timeout=60)
    statuses: list[int | str] = []

    def hammer() -> None:
        for i in range(25):
            try:
                statuses.append(fetch(base + ("/health/ready" if i % 2 else "/health/detailed")))
            except OSError as exc:
                statuses.append(repr(exc))

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    text = log.read_text(errors="replace")
    assert statuses == [200] * 200, text
    assert "WORKER TIMEOUT" not in text
    assert sorted(children_of(proc.pid)) == sorted(workers), "a worker was replaced"
    # Each backend's client socket is held by exactly one process, and every worker has its own.
    with admin.cursor() as cur:
        cur.execute("SELECT client_port FROM pg_stat_activity WHERE application_name = %s", (app_name,))
        ports = [row[0] for row in cur.fetchall()]
    inodes = client_socket_inodes(server_port)
    held = {pid: socket_inodes_of(pid) for pid in [proc.pid, *workers]}
    owners = {port: [pid for pid, socks in held.items() if inodes.get(port) in socks] for port in ports}
    assert all(len(pids) == 1 for pids in owners.values()), owners
    assert set(workers) <= {pids[0] for pids in owners.values()}, owners
