"""A TCP proxy on loopback that delays every reply from the upstream server (latency injection,
for tests and benchmarks)."""

from __future__ import annotations

import heapq
import itertools
import socket
import threading
import time
from typing import List, Optional, Tuple


class LatencyProxy:
    """Forwards 127.0.0.1:<port> to ``upstream``; bytes coming back are held ``delay`` seconds.

    Requests go through at once, replies leave in order ``delay`` after they arrived, so every
    round trip through the proxy costs ``delay`` more (pipelined replies are not serialized).
    """

    def __init__(self, upstream_port: int, delay: float) -> None:
        self.upstream_port = upstream_port
        self.delay = delay
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self._closed = threading.Event()
        self._sockets: List[socket.socket] = []
        self._heap: List[Tuple[float, int, socket.socket, bytes]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> LatencyProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        threading.Thread(target=self._deliver, daemon=True).start()
        return self

    def close(self) -> None:
        self._closed.set()
        for sock in [self._listener, *self._sockets]:
            try:
                sock.close()
            except OSError:
                pass
        with self._cond:
            self._cond.notify_all()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                client.close()
                continue
            self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, self.delay), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, delay: Optional[float]) -> None:
        while not self._closed.is_set():
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                for sock in (src, dst):
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                return
            if delay is None:
                try:
                    dst.sendall(data)
                except OSError:
                    return
            else:
                with self._cond:
                    heapq.heappush(self._heap, (time.monotonic() + delay, next(self._seq), dst, data))
                    self._cond.notify()

    def _deliver(self) -> None:
        while not self._closed.is_set():
            with self._cond:
                while not self._heap and not self._closed.is_set():
                    self._cond.wait(0.5)
                if self._closed.is_set():
                    return
                due, _, dst, data = self._heap[0]
                wait = due - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                heapq.heappop(self._heap)
            try:
                dst.sendall(data)
            except OSError:
                pass
