"""A fault-injecting HTTP proxy for the object-store tests: it stands between the S3 client and the real
server (tests/s3server.py), passes every request through byte for byte (the client's signature covers the
Host header, which is passed on as sent), and spoils the ranged GETs it is told to: a 503 or a throttling
answer, a body cut off halfway with the connection closed, a body that stalls, or a slow link.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
import urllib.parse
from collections import Counter, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}
ERRORS = {"503": (503, "ServiceUnavailable"), "slowdown": (503, "SlowDown"), "500": (500, "InternalError")}


class FaultProxy:
    """`with FaultProxy(upstream) as proxy:` a proxy on 127.0.0.1 (`proxy.endpoint`); `proxy.spoil(*faults)`
    queues faults for the next ranged GETs, one each ("503", "slowdown", "500", "cut", "stall"); `proxy.rate`
    (bytes per second) slows every body down; `proxy.injected` counts what was done."""

    def __init__(self, upstream: str, stall_seconds: float = 3.0) -> None:
        url = urllib.parse.urlsplit(upstream)
        self.upstream = (url.hostname, url.port)
        self.stall_seconds = stall_seconds
        self.rate: float | None = None
        self.faults: deque[str] = deque()
        self.injected: Counter[str] = Counter()
        self.ranged_gets = 0
        self._lock = threading.Lock()

    def spoil(self, *faults: str) -> None:
        with self._lock:
            self.faults.extend(faults)

    def _next_fault(self) -> str | None:
        with self._lock:
            self.ranged_gets += 1
            return self.faults.popleft() if self.faults else None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FaultProxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = bytearray()
                    while (size := int(self.rfile.readline().split(b";")[0], 16)):
                        out += self.rfile.read(size)
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b""):
                        pass
                    return bytes(out)
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def _handle(self) -> None:
                body = self._body()
                ranged = self.command == "GET" and "Range" in self.headers
                fault = proxy._next_fault() if ranged else None
                if fault in ERRORS:
                    status, code = ERRORS[fault]
                    proxy.injected[fault] += 1
                    text = f"<Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(text)))
                    self.end_headers()
                    self.wfile.write(text)
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body or None, headers=headers)
                answer = conn.getresponse()
                data = answer.read()
                conn.close()
                self.send_response(answer.status, answer.reason)
                for k, v in answer.getheaders():
                    if k.lower() not in HOP_BY_HOP and (k.lower() != "content-length" or self.command == "HEAD"):
                        self.send_header(k, v)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command == "HEAD":
                    return
                if fault in ("cut", "stall") and len(data) > 1:
                    proxy.injected[fault] += 1
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    if fault == "stall":
                        time.sleep(proxy.stall_seconds)
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if proxy.rate is None:
                    self.wfile.write(data)
                    return
                step = 64 * 1024
                for i in range(0, len(data), step):
                    self.wfile.write(data[i : i + step])
                    time.sleep(step / proxy.rate)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
