"""One address in front of several proxy replicas: a TCP round-robin balancer for tests.

What a Kubernetes Service does with `sessionAffinity: None` (kube-proxy picks an endpoint per
connection) made deterministic: each new client connection goes to the next backend in turn, or to
the backend a test pinned for it. Bytes are copied both ways untouched (half-closes included); the
balancer never reads HTTP. It records which backend each connection went to, by the client's
address, so a test can say exactly which replica served a request.

    with TcpBalancer([("127.0.0.1", a.port), ("127.0.0.1", b.port)]) as lb:
        lb.pin(0)                                  # the next connection goes to backend 0
        conn = http.client.HTTPConnection(lb.host_ip, lb.port); conn.connect()
        ...
        lb.backend_of(conn.sock.getsockname())     # 0, once the connection has been accepted
        lb.counts                                  # connections per backend
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Sequence

BUFFER = 256 * 1024


class TcpBalancer:
    def __init__(self, backends: Sequence[tuple[str, int]], host: str = "127.0.0.1"):
        assert backends, "a balancer needs at least one backend"
        self.backends = list(backends)
        self.host_ip = host
        self.port = 0
        self._lock = threading.Lock()
        self._next = 0
        self._pinned: int | None = None
        self._counts = [0] * len(self.backends)
        self._by_client: dict[tuple[str, int], int] = {}
        self._accepted = threading.Condition(self._lock)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task] = set()

    @property
    def host(self) -> str:
        return f"{self.host_ip}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    # ---- what the tests read and steer

    @property
    def counts(self) -> list[int]:
        """Client connections each backend was given so far."""
        with self._lock:
            return list(self._counts)

    def pin(self, backend: int) -> None:
        """The next client connection goes to `backend`; round-robin resumes after it."""
        assert 0 <= backend < len(self.backends)
        with self._lock:
            self._pinned = backend

    def backend_of(self, client: tuple[str, int], timeout: float = 10.0) -> int:
        """The backend the connection from `client` (the client socket's getsockname()) went to;
        waits (bounded) for the balancer to accept it, since connect() returns before accept()."""
        key = (client[0], client[1])
        with self._accepted:
            if not self._accepted.wait_for(lambda: key in self._by_client, timeout):
                raise AssertionError(f"the balancer accepted no connection from {key} within {timeout} s")
            return self._by_client[key]

    # ---- running

    def start(self) -> TcpBalancer:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(asyncio.start_server(self._serve, self.host_ip, 0))
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as e:  # noqa: BLE001 - reported to start()
                failure.append(e)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="tcp-balancer", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            raise failure[0]
        assert self.port, "the balancer did not start"
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is None or not loop.is_running():
            return

        async def shutdown() -> None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(10)

    def __enter__(self) -> TcpBalancer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- the loop's side

    def _choose(self, client: tuple[str, int]) -> int:
        with self._lock:
            if self._pinned is not None:
                index, self._pinned = self._pinned, None
                self._next = (index + 1) % len(self.backends)
            else:
                index = self._next
                self._next = (index + 1) % len(self.backends)
            self._counts[index] += 1
            self._by_client[client] = index
            self._accepted.notify_all()
            return index

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        peer = writer.get_extra_info("peername")
        index = self._choose((peer[0], peer[1]))
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.backends[index])
            except OSError:
                return  # as a Service whose endpoint just went away: the client sees a reset/close
            try:
                await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
            finally:
                up_writer.close()
        except asyncio.CancelledError:
            pass
        finally:
            writer.close()
            self._tasks.discard(task)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF, then half-close the other side (HTTP/1.1 clients may shut down writing)."""
    try:
        while data := await reader.read(BUFFER):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        with contextlib.suppress(Exception):
            writer.transport.abort()
