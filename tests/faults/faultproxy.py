"""A small fault-injecting TCP proxy, put between the connector proxy and a real registry.

Every connection is forwarded byte for byte until the current fault says otherwise:
- `pass`: nothing happens;
- `stall_head`: the request reaches the registry but not a byte of the answer comes back;
- `stall_body:N`: the first N bytes of the answer come back, then nothing;
- `reset_body:N`: the first N bytes, then a TCP reset;
- `close_body:N`: the first N bytes, then a clean close (a registry killed mid-stream);
- `trickle:N`: the answer comes back N bytes at a time, each after a short pause.
Loopback only; every thread ends when the test stops the proxy.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

IO_TIMEOUT = 120.0


class FaultProxy:
    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.fault = "pass"
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.stopped = threading.Event()
        self.connections = 0
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def _accept(self) -> None:
        self.listener.settimeout(0.5)
        while not self.stopped.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                continue
            self.connections += 1
            upstream = socket.create_connection(self.target, timeout=IO_TIMEOUT)
            client.settimeout(IO_TIMEOUT)
            self._socks += [client, upstream]
            fault = self.fault
            threading.Thread(target=self._pipe, args=(client, upstream, "pass"), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, fault), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, fault: str) -> None:
        kind, _, n = fault.partition(":")
        limit = int(n) if n else 0
        sent = 0
        try:
            while not self.stopped.is_set():
                data = src.recv(65536)
                if not data:
                    break
                if kind == "stall_head":
                    self.stopped.wait(IO_TIMEOUT)
                    return
                if kind in ("stall_body", "reset_body", "close_body") and sent + len(data) >= limit:
                    dst.sendall(data[: max(0, limit - sent)])
                    if kind == "stall_body":
                        self.stopped.wait(IO_TIMEOUT)
                    elif kind == "reset_body":
                        dst.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    dst.close()
                    src.close()
                    return
                if kind == "trickle":
                    for i in range(0, len(data), limit):
                        dst.sendall(data[i:i + limit])
                        time.sleep(0.001)  # the fault itself: a slow sender
                else:
                    dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self) -> None:
        self.stopped.set()
        self.listener.close()
        for s in self._socks:
            try:
                s.close()
            except OSError:
                pass
