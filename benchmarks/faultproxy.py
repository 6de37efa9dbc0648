"""A small TCP proxy on 127.0.0.1 that makes the network between the tool and Label Studio unreliable.

It forwards every connection to an upstream port and, for a seeded-random share of HTTP exchanges (one
request and its response on a connection: HTTP/1.1 keep-alive carries many, and ``httpx`` never pipelines),
injects one fault:

* ``delay``: the request is held back for a while before it is forwarded (a slow or congested link);
* ``truncate``: the request reaches the server, the response is cut off part-way and the connection closed
  (a proxy or link that dies mid-answer);
* ``reset``: the request reaches the server, then the client's connection is reset (``SO_LINGER`` 0, an RST)
  before any of the answer arrives: the worst case for a call that is not idempotent, since the work was done;
* ``bad_gateway``: the request is not forwarded; the client gets ``502 Bad Gateway`` (a reverse proxy whose
  upstream is restarting).

``on_response`` lets a scenario act at an exact point: it is called with the request line when the answer to
a request starts to arrive, before the client sees any of it, and a true result drops that answer (the client
is reset) -- e.g. to kill the server right after it committed an import. Stdlib only; threads; the proxy stops
when told to or after ``max_lifetime_s``, whichever comes first.
"""

from __future__ import annotations

import random
import select
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing_extensions import Self

FAULTS = ("delay", "truncate", "reset", "bad_gateway")
CHUNK = 65536  # bytes per recv: a multipart upload of 100 pictures crosses in a few dozen reads
POLL_S = 0.2  # how often an idle thread looks at the stop flag: stop() returns within this
MAX_LIFETIME_S = 900.0  # a proxy left running by a crashed scenario still goes away within a quarter hour
BAD_GATEWAY = (b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nContent-Length: 11\r\n"
               b"Connection: close\r\n\r\nBad Gateway")


@dataclass(frozen=True)
class FaultPlan:
    """Which share of exchanges gets which fault (the shares add up to at most 1)."""

    delay: float = 0.0
    truncate: float = 0.0
    reset: float = 0.0
    bad_gateway: float = 0.0
    delay_s: tuple[float, float] = (0.2, 1.0)  # a held-back request waits this long, uniform: slow, not dead

    def __post_init__(self) -> None:
        shares = [self.delay, self.truncate, self.reset, self.bad_gateway]
        if min(shares) < 0 or sum(shares) > 1:
            raise ValueError(f"fault shares must be >= 0 and add up to at most 1, got {shares}")

    def draw(self, rng: random.Random) -> str | None:
        """The fault for one exchange, or None."""
        u = rng.random()
        for kind in FAULTS:
            share = getattr(self, kind)
            if u < share:
                return kind
            u -= share
        return None


def reset(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN: the peer's next read or write fails with 'connection reset'."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class FaultProxy:
    """``127.0.0.1:<free port>`` -> ``upstream_host:upstream_port``, with faults per :class:`FaultPlan`."""

    def __init__(self, upstream_port: int, plan: FaultPlan | None = None, seed: int = 0,
                 on_response: Callable[[str], bool] | None = None, max_lifetime_s: float = MAX_LIFETIME_S,
                 upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.plan = plan or FaultPlan()
        self.on_response = on_response
        self.max_lifetime_s = max_lifetime_s
        self.faults: Counter[str] = Counter()  # injected faults by kind ("dropped": by on_response)
        self.exchanges = 0
        self.connections = 0
        self.upstream_refused = 0  # connections the proxy could not forward: the server was down
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def injected(self) -> int:
        return sum(self.faults.values())

    def start(self) -> Self:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        listener.settimeout(POLL_S)
        self._listener, self.port = listener, listener.getsockname()[1]
        self._spawn(self._accept_loop, time.monotonic() + self.max_lifetime_s)
        return self

    def stop(self) -> None:
        """Stop accepting, close every connection, wait for the threads (each notices within POLL_S)."""
        self._stop.set()
        for thread in list(self._threads):
            thread.join(timeout=5 * POLL_S)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def counters(self) -> dict:
        """What was done, for a scenario's detail."""
        with self._lock:
            return {"connections": self.connections, "exchanges": self.exchanges,
                    "upstream_refused": self.upstream_refused, "faults": dict(sorted(self.faults.items()))}

    # --- internals ----------------------------------------------------------------------------------
    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _count(self, fault: str) -> None:
        with self._lock:
            self.faults[fault] += 1

    def _accept_loop(self, deadline: float) -> None:
        assert self._listener is not None
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                try:
                    client, _ = self._listener.accept()
                except TimeoutError:
                    continue
                with self._lock:
                    self.connections += 1
                self._threads = [t for t in self._threads if t.is_alive()]
                self._spawn(self._serve, client)
        finally:
            self._stop.set()  # a proxy past its lifetime stops its connections too
            self._listener.close()

    def _serve(self, client: socket.socket) -> None:
        """Relay one connection, exchange by exchange, until either side closes or the proxy stops."""
        try:
            upstream = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            with self._lock:
                self.upstream_refused += 1
            reset(client)
            return
        try:
            self._relay(client, upstream)
        except OSError:
            pass  # a side went away: the other one is closed below, as a real middlebox would
        finally:
            client.close()
            upstream.close()

    def _relay(self, client: socket.socket, upstream: socket.socket) -> None:
        answering = True  # the previous exchange's answer has started: the next client bytes open a new one
        fault: str | None = None
        request_line = ""
        answer_started = False
        while not self._stop.is_set():
            readable, _, _ = select.select([client, upstream], [], [], POLL_S)
            if client in readable:
                data = client.recv(CHUNK)
                if not data:
                    return
                if answering:  # a new request
                    answering, answer_started = False, False
                    request_line = data.split(b"\r\n", 1)[0].decode("latin-1")
                    with self._lock:
                        self.exchanges += 1
                        fault = self.plan.draw(self._rng)
                        delay = self._rng.uniform(*self.plan.delay_s)
                    if fault == "bad_gateway":
                        self._count(fault)
                        client.sendall(BAD_GATEWAY)
                        return
                    if fault == "delay":
                        self._count(fault)
                        self._stop.wait(delay)
                upstream.sendall(data)
            if upstream in readable:
                data = upstream.recv(CHUNK)
                if not data:
                    return
                answering = True
                if not answer_started:
                    answer_started = True
                    if self.on_response is not None and self.on_response(request_line):
                        self._count("dropped")
                        reset(client)
                        return
                    if fault == "reset":
                        self._count(fault)
                        reset(client)
                        return
                    if fault == "truncate":
                        self._count(fault)
                        with self._lock:
                            cut = self._rng.randrange(len(data))
                        client.sendall(data[:cut])
                        return
                client.sendall(data)
