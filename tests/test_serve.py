"""The built-in health server under load, slow clients and SIGTERM: real sockets, real processes."""

from __future__ import annotations

import collections
import contextlib
import http.client
import resource
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import pgtest
from pgops import ConfigError, HealthApp, Pool, make_server, serve
from pgtest import pgops_env, run_in_checkout

CLIENT_TIMEOUT = 10.0  # generous: a loaded CI machine answers in milliseconds, a kubelet waits 1 s


@pytest.fixture
def app(dsn: str) -> Iterator[HealthApp]:
    """A HealthApp on a small pool of this test's database."""
    with Pool(dsn, min_size=1, max_size=2, acquire_timeout=5, monitor_interval=0) as pool:
        yield HealthApp(pool)


@contextlib.contextmanager
def serving(app: Any, **options: Any) -> Iterator[int]:
    """Run serve(app, port=0, **options) on a thread; yield its port; shut it down at the end."""
    servers: list[Any] = []
    started = threading.Event()

    def ready(server: Any) -> None:
        servers.append(server)
        started.set()

    thread = threading.Thread(
        target=serve, args=(app,), kwargs={"port": 0, "ready": ready, **options}, daemon=True
    )
    thread.start()
    assert started.wait(timeout=30), "serve() did not start"
    try:
        yield servers[0].server_port
    finally:
        servers[0].shutdown()
        thread.join(timeout=60)
    assert not thread.is_alive()


def get(port: int, path: str = "/health/live") -> tuple[int, dict[str, str], bytes]:
    """Send GET path on a new connection; return status, headers and the whole body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=CLIENT_TIMEOUT)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, dict(response.headers), response.read()
    finally:
        conn.close()


def simultaneously(count: int, call: Callable[[], Any]) -> list[Any]:
    """Run call() on count threads released together; return each result or the exception it raised."""
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = call()
        except Exception as exc:  # a refused or timed-out request is a result to report
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


@contextlib.contextmanager
def open_files(needed: int) -> Iterator[None]:
    """Raise this process's soft limit on open files to at least needed for the block, or skip."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"needs {needed} open files; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def closed_by_peer(sock: socket.socket) -> bool:
    """Tell whether the server has closed this (non-blocking) client socket."""
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def test_200_simultaneous_probes_are_all_answered(app: HealthApp) -> None:
    """200 connections opened at once to /health/live each get 200: none refused, none timed out."""
    with serving(app) as port:
        results = simultaneously(200, lambda: get(port)[0])
    assert collections.Counter(map(repr, results)) == {"200": 200}


def test_half_sent_requests_hold_no_threads_and_are_closed_by_the_read_timeout(app: HealthApp) -> None:
    """600 half-sent requests leave threads under the cap, live still answers, and they are closed."""
    count, cap = 600, 64  # make_server's default max_threads
    before = threading.active_count()
    server = make_server(app, "127.0.0.1", 0)
    serving_thread = threading.Thread(target=server.serve_forever, daemon=True)
    serving_thread.start()
    clients: list[socket.socket] = []
    try:
        with open_files(2 * count + 200):  # each connection is two descriptors in this process
            for _ in range(count):
                sock = socket.create_connection(("127.0.0.1", server.server_port), timeout=CLIENT_TIMEOUT)
                clients.append(sock)
                sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Ag")
            # Accepted after the 600 (one listen queue, in order): the server has taken them all.
            assert get(server.server_port)[0] == 200
            threads = threading.active_count()
            assert threads <= before + 2 + cap, f"{threads} threads for {count} half-sent requests"
            for sock in clients:
                sock.setblocking(False)
            pgtest.wait_until(
                lambda: all(closed_by_peer(sock) for sock in clients),
                timeout=5.0 + 60,  # the default read timeout, and a margin for a loaded machine
                interval=0.2,
                message="half-sent requests were not closed by the read timeout",
            )
            assert get(server.server_port)[0] == 200
    finally:
        for sock in clients:
            sock.close()
        server.shutdown()
        server.server_close()
        serving_thread.join(timeout=30)


def test_requests_past_the_thread_cap_get_503_with_retry_after() -> None:
    """With every thread busy and the line full, one more request gets 503 and Retry-After at once."""
    release = threading.Event()
    inside: list[str] = []

    def slow(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        inside.append(environ["PATH_INFO"])
        release.wait(timeout=60)
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        return [b"ok"]

    threads, queued = 2, 2 * 4  # max_threads=2 lets 4 requests per thread wait in line
    before = threading.active_count()
    with serving(slow, max_threads=threads) as port:
        replies: list[Any] = []
        clients = [
            threading.Thread(target=lambda: replies.append(get(port, "/slow")), daemon=True)
            for _ in range(threads + queued + 1)
        ]
        try:
            for client in clients:
                client.start()
            pgtest.wait_until(lambda: replies, timeout=30, message="no request was refused")
            assert len(inside) <= threads
            assert threading.active_count() <= before + 2 + threads + len(clients)
        finally:
            release.set()
            for client in clients:
                client.join(timeout=60)
    status, headers, _ = replies[0]
    assert (status, headers["Retry-After"], headers["Content-Type"]) == (503, "1", "application/json")
    assert sorted(reply[0] for reply in replies) == [200] * (threads + queued) + [503]


@pytest.mark.parametrize(
    "options",
    [{"backlog": 0}, {"read_timeout": 0}, {"read_timeout": float("nan")}, {"max_threads": 0}],
)
def test_make_server_rejects_bad_limits(app: HealthApp, options: dict[str, Any]) -> None:
    """A limit that cannot work raises ConfigError naming it, before anything listens."""
    with pytest.raises(ConfigError, match=next(iter(options))):
        make_server(app, "127.0.0.1", 0, **options)


# A WSGI app whose /slow requests each wait for one line on stdin, so the test decides when they end.
SLOW_SERVER = """
import sys
import pgops

def app(environ, start_response):
    print("inside", flush=True)
    sys.stdin.readline()
    body = b"finished " * 20000
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]

pgops.serve(app, port=0, stop_timeout=float(sys.argv[1]),
            ready=lambda server: print("port", server.server_port, flush=True))
print("stopped", flush=True)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM is POSIX")
def test_sigterm_finishes_requests_in_flight_refuses_new_ones_and_exits_0(tmp_path: Path) -> None:
    """On SIGTERM a request in flight gets its whole response, new connections are refused, and the
    process exits 0 once a request that never ends has had stop_timeout seconds."""
    stop_timeout = 5.0
    log = tmp_path / "serve.log"
    env = pgops_env()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", SLOW_SERVER, str(stop_timeout)],
            cwd=tmp_path, env=env, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    assert proc.stdin is not None
    try:
        port = int(pgtest.wait_until(lambda: port_line(log), timeout=60, message="no port").split()[1])
        replies: list[Any] = []
        clients = [
            threading.Thread(target=lambda: replies.append(get_or_error(port, "/slow")), daemon=True)
            for _ in range(2)
        ]
        for client in clients:
            client.start()
        pgtest.wait_until(
            lambda: lines(log).count("inside") == 2, timeout=30, message="requests not in flight"
        )
        proc.send_signal(signal.SIGTERM)
        pgtest.wait_until(lambda: refused(port), timeout=30, message="new connections still accepted")
        proc.stdin.write(b"go\n")  # one request finishes; the other never does
        proc.stdin.flush()
        assert proc.wait(timeout=stop_timeout + 60) == 0, log.read_text()
        for client in clients:
            client.join(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdin.close()
    assert "stopped" in lines(log)
    finished = [reply for reply in replies if not isinstance(reply, Exception)]
    assert len(finished) == 1, replies
    assert finished[0][:2] == (200, b"finished " * 20000), "the response in flight was cut"
    assert "Traceback" not in log.read_text()


def lines(log: Path) -> list[str]:
    """Return the lines written to log so far."""
    return log.read_text().splitlines()


def port_line(log: Path) -> str | None:
    """Return the 'port N' line the server printed once listening, or None before."""
    return next((line for line in lines(log) if line.startswith("port ")), None)


def get_or_error(port: int, path: str) -> tuple[int, bytes] | Exception:
    """Return (status, body) for GET path, or the error that ended the exchange."""
    try:
        status, _, body = get(port, path)
        return status, body
    except (OSError, http.client.HTTPException) as exc:
        return exc


def refused(port: int) -> bool:
    """Tell whether a connection to port on 127.0.0.1 is refused."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT).close()
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        return False  # caught while the listening socket closes: ask again, it is refused next time
    return False


def test_importing_pgops_leaves_the_http_server_modules_unloaded() -> None:
    """`import pgops` loads no http.server, socketserver or wsgiref: the CLI's other commands pay nothing."""
    script = (
        "import sys, pgops\n"
        "names = ('http.server', 'socketserver', 'wsgiref.simple_server')\n"
        "print(sorted(name for name in names if name in sys.modules))"
    )
    out = run_in_checkout([sys.executable, "-c", script])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_make_server_on_a_busy_port_raises_oserror_and_leaves_no_thread(app: HealthApp) -> None:
    """Binding a port in use raises the OSError from bind() and leaves no reader thread running."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        before = threading.active_count()
        with pytest.raises(OSError):
            make_server(app, "127.0.0.1", taken.getsockname()[1])
    assert threading.active_count() == before
