"""A loopback TCP proxy in front of the S3 test server that can freeze one upload mid-write.

`HoldingProxy(upstream_port, pattern, skip)` forwards bytes both ways unchanged, except for
requests whose request line matches `pattern` (a bytes regex, e.g. the PUT of a checkpoint file):
after the requests for `skip` different objects have passed, the first time one for another
object arrives, the proxy forwards its request line, headers and the first half of the
body bytes that came with them, then stops forwarding that connection and sets `held`. From
then on every request for the same object (the client's retries) is held the same way, without
forwarding anything. The client is left waiting for a response with its upload half sent: a
write in progress, which the test can interrupt (SIGKILL the writer), then `release()` closes
the held connections. Everything else, and every connection after `release()`, passes through.

`HoldingProxy(upstream_port, pattern, fail=N)` injects errors instead: the first N requests
matching `pattern` are answered by the proxy itself with `503 Slow Down` (S3's throttling error,
which clients treat as transient), their body read and dropped, nothing forwarded, and the
connection closed; `failed` counts them and `failures_done` is set after the N-th. Later
requests pass through.

The S3 client reaches the proxy through the storage URI's `endpoint_override` query parameter
(see `uri`).
"""
from __future__ import annotations

import re
import socket
import threading

SLOW_DOWN = (b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code>"
             b"<Message>Please reduce your request rate.</Message><RequestId>holding-proxy</RequestId></Error>")


class HoldingProxy:
    def __init__(self, upstream_port: int, pattern: bytes, skip: int = 0, fail: int = 0) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self._fail = fail  # error-injection mode: matching requests still to answer with 503
        self.failed = 0
        self.failures_done = threading.Event()
        self.pattern = re.compile(pattern)
        self._skip = skip  # matching objects still to let through before one is held
        self._passed: set[bytes] = set()
        self.held = threading.Event()
        self.held_path: bytes | None = None  # the request target of the held upload
        self._released = False
        self._lock = threading.Lock()
        self._held_socks: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def uri(self, bucket_path: str) -> str:
        """`s3://bucket_path` through this proxy (plain HTTP)."""
        return f"s3://{bucket_path}?endpoint_override=127.0.0.1:{self.port}&scheme=http"

    def release(self) -> None:
        """Close the held connections; pass everything through from now on."""
        with self._lock:
            self._released = True
            for sock in self._held_socks:
                _close(sock)

    def close(self) -> None:
        self.release()
        _close(self._listener)

    # -- internals ------------------------------------------------------------------------------

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                _close(client)
                continue
            done = _Countdown(2, lambda c=client, s=server: (_close(c), _close(s)))
            threading.Thread(target=self._pump_requests, args=(client, server, done), daemon=True).start()
            threading.Thread(target=_pump, args=(server, client, done), daemon=True).start()

    def _pump_requests(self, client: socket.socket, server: socket.socket, done: _Countdown) -> None:
        """Client -> server, holding a matching request (see the module docstring)."""
        while True:
            try:
                data = client.recv(1 << 16)
            except OSError:
                break
            if not data:
                break
            failing_at = self._fail_offset(data)
            if failing_at is not None:
                try:
                    server.sendall(data[:failing_at])  # the end of an earlier request, if any
                    _answer_slow_down(client, data[failing_at:])
                except OSError:
                    pass
                _close(client)
                _close(server)
                return
            held_at = self._hold_offset(data)
            try:
                server.sendall(data if held_at is None else data[:held_at])
            except OSError:
                break
            if held_at is not None:
                with self._lock:
                    if not self._released:
                        self._held_socks += [client, server]
                        self.held.set()
                        return  # frozen until release() shuts both sockets down
                break
        _half_close(server)
        done.tick()

    def _fail_offset(self, data: bytes) -> int | None:
        """Error-injection mode: where a matching request to fail starts in `data`, or None."""
        with self._lock:
            if self.failed >= self._fail:
                return None
            match = self.pattern.search(data)
            if match is None:
                return None
            self.failed += 1
            if self.failed == self._fail:
                self.failures_done.set()
            return match.start()

    def _hold_offset(self, data: bytes) -> int | None:
        """Where to stop forwarding `data`, or None to forward it all."""
        with self._lock:
            if self._released or self._fail:  # error-injection mode never holds
                return None
            match = self.pattern.search(data)
            if match is None:
                return None
            target = data[match.start():].split(b" ", 2)[1].split(b"?", 1)[0]
            if target in self._passed or (self.held_path is None and len(self._passed) < self._skip):
                self._passed.add(target)
                return None
            if self.held_path is None:
                self.held_path = target
                head_end = data.find(b"\r\n\r\n", match.start())
                if head_end < 0:
                    return len(data)
                body = len(data) - (head_end + 4)
                return head_end + 4 + body // 2
            return match.start() if target == self.held_path else None


def _answer_slow_down(client: socket.socket, received: bytes) -> None:
    """Read the rest of the request that starts `received` (headers, then Content-Length bytes
    of body unless the client waits for `100 Continue`) and answer it with 503 SlowDown."""
    while b"\r\n\r\n" not in received:
        more = client.recv(1 << 16)
        if not more:
            return
        received += more
    head, body = received.split(b"\r\n\r\n", 1)
    headers = {k.strip().lower(): v.strip() for k, _, v in
               (line.partition(b":") for line in head.split(b"\r\n")[1:])}
    if headers.get(b"expect", b"").lower() != b"100-continue":
        remaining = int(headers.get(b"content-length", b"0")) - len(body)
        while remaining > 0:
            more = client.recv(min(remaining, 1 << 16))
            if not more:
                return
            remaining -= len(more)
    client.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                   b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(SLOW_DOWN), SLOW_DOWN))


def _pump(src: socket.socket, dst: socket.socket, done: _Countdown) -> None:
    """Copy `src` to `dst` until `src` ends, then end `dst`'s sending side."""
    while True:
        try:
            data = src.recv(1 << 16)
            if not data:
                break
            dst.sendall(data)
        except OSError:
            break
    _half_close(dst)
    done.tick()


class _Countdown:
    """Calls `action` once `tick()` was called `count` times (both directions of a connection ended)."""

    def __init__(self, count: int, action) -> None:
        self._count, self._action, self._lock = count, action, threading.Lock()

    def tick(self) -> None:
        with self._lock:
            self._count -= 1
            last = self._count == 0
        if last:
            self._action()


def _half_close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
