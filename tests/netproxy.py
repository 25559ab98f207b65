"""A TCP forwarder on 127.0.0.1 that can hold traffic, for network-stall tests.

``hold()`` stops forwarding in both directions without closing anything: bytes sent to the proxy are
acknowledged by the kernel and then sit in its buffers, which is what a stalled network path (a
NAT table that dropped the flow, a proxy or load balancer that froze) looks like to a client.  TCP
keepalives do not fire through it, because the kernel on each side keeps answering.  New connections
are accepted but not forwarded either, unless ``hold(new_connections=False)`` stalls only the
connections open now.  ``release()`` forwards everything held and carries on; ``close()`` drops
every connection and stops listening.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from collections.abc import Iterator

_CHUNK = 65536
_POLL = 0.05  # seconds between looks at the hold/close flags


class Proxy:
    """Forward 127.0.0.1:port to (host, port), with hold(), release() and close()."""

    def __init__(self, target_host: str, target_port: int) -> None:
        """Start listening on a free 127.0.0.1 port and forwarding to the target."""
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._new_flow = True  # whether a new connection starts flowing
        self._flows: list[threading.Event] = []  # one per connection: set while it may forward
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self.accepted = 0
        self._start(self._accept_loop, "netproxy-accept")

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed.is_set() else "flowing" if self._new_flow else "held"
        return f"<Proxy 127.0.0.1:{self.port} -> {self.target[0]}:{self.target[1]} {state}>"

    def hold(self, *, new_connections: bool = True) -> None:
        """Stop forwarding: every byte, either way, waits for release(); new connections too unless told."""
        with self._lock:
            for flow in self._flows:
                flow.clear()
            if new_connections:
                self._new_flow = False

    def release(self) -> None:
        """Forward what was held and everything after it."""
        with self._lock:
            self._new_flow = True
            for flow in self._flows:
                flow.set()

    def close(self) -> None:
        """Stop listening and close every connection (both sides); idempotent."""
        self._closed.set()
        with self._lock:
            sockets, self._sockets = self._sockets, []
            for flow in self._flows:
                flow.set()  # wake pumps waiting for release, so that they see the close
        for sock in [self._listener, *sockets]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=10)

    # -- internals -------------------------------------------------------------------------------

    def _start(self, target: object, name: str, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)  # type: ignore[arg-type]
        self._threads.append(thread)
        thread.start()

    def _keep(self, sock: socket.socket) -> bool:
        """Register a socket for close(); False (and the socket closed) if the proxy is closing."""
        with self._lock:
            if not self._closed.is_set():
                self._sockets.append(sock)
                return True
        sock.close()
        return False

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # the listener was closed
            self.accepted += 1
            flow = threading.Event()
            with self._lock:
                if self._new_flow:
                    flow.set()
                self._flows.append(flow)
            if self._keep(client):
                self._start(self._pump, f"netproxy-{self.accepted}", client, flow)

    def _wait_flowing(self, flow: threading.Event) -> bool:
        """Wait while held; False once the proxy is closed."""
        while not flow.wait(_POLL):
            pass
        return not self._closed.is_set()

    def _pump(self, client: socket.socket, flow: threading.Event) -> None:
        """Copy bytes both ways between one client and its upstream connection until either side ends."""
        if not self._wait_flowing(flow):
            return
        try:
            upstream = socket.create_connection(self.target, timeout=10)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        if not self._keep(upstream):
            return
        peer = {client: upstream, upstream: client}
        try:
            while True:
                if not self._wait_flowing(flow):
                    return
                readable, _, _ = select.select(list(peer), [], [], _POLL)
                for sock in readable:
                    # Checked again per read: a hold() that came during select() holds this data too.
                    if not self._wait_flowing(flow):
                        return
                    data = sock.recv(_CHUNK)
                    if not data:
                        return
                    peer[sock].sendall(data)
        except OSError:
            return
        finally:
            for sock in (client, upstream):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()


@contextlib.contextmanager
def proxy_to(host: str, port: int) -> Iterator[Proxy]:
    """Run a Proxy to (host, port) for a with block, closing it afterwards."""
    proxy = Proxy(host, port)
    try:
        yield proxy
    finally:
        proxy.close()
