"""Connections that never finish their request head are closed (slowloris, half-open clients),
and the proxy keeps serving everybody else meanwhile."""

from __future__ import annotations

import http.client
import socket

import pytest
import yaml

from proxyproc import ProxyProcess

IO_TIMEOUT = 30.0  # far longer than the proxy's header_timeout below: a hang fails the test


@pytest.fixture(scope="module")
def slow_proxy(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slow")
    (tmp / "connectors").mkdir()
    (tmp / "tokens.yaml").write_text(yaml.safe_dump({"tokens": [{"token": "t" * 20, "subject": "s", "connectors": ["*"]}]}))
    proxy = ProxyProcess(tmp, tmp / "connectors", tmp / "tokens.yaml",
                         extra=("--set", "header_timeout=2", "--set", "keepalive_timeout=2")).start()
    yield proxy
    proxy.stop()


def closed_by_the_proxy(conn: socket.socket) -> bool:
    conn.settimeout(IO_TIMEOUT)
    try:
        while conn.recv(4096):
            pass
        return True  # EOF: the proxy closed it
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@pytest.mark.parametrize("sent", [b"", b"GET /v2/ HTTP/1.1\r\nHost: x\r\n", b"G"])
def test_a_connection_without_a_complete_head_is_closed(slow_proxy, sent):
    with socket.create_connection(("127.0.0.1", slow_proxy.port), timeout=IO_TIMEOUT) as conn:
        conn.sendall(sent)
        # Meanwhile everybody else is served (on a connection of its own: a pooled one may have
        # been closed for idling, which is the point of this module).
        other = http.client.HTTPConnection("127.0.0.1", slow_proxy.port, timeout=IO_TIMEOUT)
        other.request("GET", "/healthz")
        assert other.getresponse().status == 200
        other.close()
        assert closed_by_the_proxy(conn)


def test_an_idle_kept_alive_connection_is_closed_after_its_answer(slow_proxy):
    with socket.create_connection(("127.0.0.1", slow_proxy.port), timeout=IO_TIMEOUT) as conn:
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        head = b""
        while b"ok\n" not in head:
            head += conn.recv(4096)
        assert head.startswith(b"HTTP/1.1 200")
        assert closed_by_the_proxy(conn)
