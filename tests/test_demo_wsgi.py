"""The demo's keep-alive WSGI server (poolwatch/_demo/wsgi.py), with real sockets."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import pytest

from poolwatch._demo.wsgi import WSGIServer


def _app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    if environ["PATH_INFO"] == "/fail":
        raise RuntimeError("the application failed")
    body = environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Connection", "close")])
    return [
        f"{environ['REQUEST_METHOD']} {environ['PATH_INFO']} {environ['QUERY_STRING']} ".encode(),
        environ.get("HTTP_X_AMZ_TARGET", "-").encode(),
        b" ",
        body,
    ]


def _threads() -> set[str]:
    return {t.name for t in threading.enumerate()}


def test_one_connection_serves_every_request_with_a_content_length() -> None:
    accepted = []
    with WSGIServer(_app) as server:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        try:
            for i in range(3):
                connection.request(
                    "POST", f"/tables/%7Bx%7D?n={i}", body=b"{}", headers={"X-Amz-Target": "Put"}
                )
                response = connection.getresponse()
                assert (response.status, response.read()) == (
                    200,
                    f"POST /tables/{{x}} n={i} Put {{}}".encode(),
                )
                assert response.getheader("Content-Length") == str(
                    len(f"POST /tables/{{x}} n={i} Put {{}}")
                )
                assert response.getheader("Connection") is None  # the app's "close" is not ours
                accepted.append(connection.sock.getsockname() if connection.sock else None)
            assert server.open_connections == 1
        finally:
            connection.close()
    assert len(set(accepted)) == 1 and None not in accepted  # one socket, three requests


def test_an_application_error_is_a_500_and_the_connection_lives_on() -> None:
    with WSGIServer(_app) as server:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        try:
            connection.request("GET", "/fail")
            response = connection.getresponse()
            assert (response.status, response.read()) == (500, b"error\n")
            connection.request("GET", "/ok")
            assert connection.getresponse().read() == b"GET /ok  - "
        finally:
            connection.close()


def test_a_client_asking_to_close_is_answered_and_closed() -> None:
    with WSGIServer(_app) as server, socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        received = b""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and (chunk := sock.recv(65536)):
            received += chunk
        head, _, body = received.partition(b"\r\n\r\n")
        assert b"Connection: close" in head and b"Content-Length: 10" in head
        assert body == b"GET /x  - "


def test_limits_are_enforced() -> None:
    with WSGIServer(_app, max_connections=1, max_body=4) as server:
        first = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        second = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        try:
            first.request("POST", "/big", body=b"12345")
            response = first.getresponse()
            assert (response.status, response.read()) == (413, b"413 Request Entity Too Large\n")
            first.close()
            deadline = time.monotonic() + 5
            while server.open_connections and time.monotonic() < deadline:
                time.sleep(0.01)
            first.request("GET", "/held")  # reconnects: the one connection allowed
            assert first.getresponse().read() == b"GET /held  - "
            second.request("GET", "/refused")
            response = second.getresponse()
            assert (response.status, response.read()) == (503, b"")
        finally:
            first.close()
            second.close()


def test_stop_closes_idle_keep_alive_connections_and_joins_their_threads() -> None:
    before = _threads()
    server = WSGIServer(_app, idle_timeout=60.0).start()
    connections = [
        http.client.HTTPConnection("127.0.0.1", server.port, timeout=5) for _ in range(3)
    ]
    for connection in connections:
        connection.request("GET", "/")
        connection.getresponse().read()
    assert server.open_connections == 3
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 2  # not the 60 s idle timeout
    assert server.open_connections == 0
    assert _threads() - before == set()
    for connection in connections:
        with pytest.raises((ConnectionError, http.client.HTTPException)):
            connection.request("GET", "/")
            connection.getresponse()
        connection.close()
