"""Fuzzing the HTTP API: any request line, headers, query or body gets an answer below 500.

A real node process takes a few hundred generated requests over raw sockets
(so nothing a client library would refuse to send is left out); after each
one it must still serve, and its log must hold no traceback.
"""

from __future__ import annotations

import os
import socket
import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from probes import http_get

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))

ROOMS = st.one_of(st.sampled_from(["lobby", "a", "x" * 64, "x" * 65, "lobby%0A", "%00", "..", ""]),
                  st.text(string.printable, max_size=20))
PATHS = st.one_of(
    st.builds(lambda r, tail: f"/rooms/{r}/{tail}", ROOMS,
              st.sampled_from(["messages", "events", "presence", ""])),
    st.sampled_from(["/", "/admin", "/admin/api/status", "/admin/api/clients/x/disconnect",
                     "/healthz", "/readyz", "/metrics", "/nowhere"]),
)
QUERY = st.one_of(
    st.just(""),
    st.builds(lambda k, v: f"?{k}={v}",
              st.sampled_from(["limit", "last_event_id", "nick", "x"]),
              st.one_of(st.sampled_from(["0", "-1", "1e9", "18446744073709551616-0", "%ff", "%00",
                                         "%ED%A0%80", "1-0", "0-0", "99999999999999999999"]),
                        st.text(string.ascii_letters + string.digits + "%-_.", max_size=30))),
)
HEADER_NAMES = st.sampled_from([
    "Content-Type", "Origin", "Last-Event-ID", "X-Real-IP", "X-Forwarded-For", "Forwarded",
    "Authorization", "Host", "Accept", "Idempotency-Key", "Transfer-Encoding", "Content-Encoding",
    "X-Anything"])
HEADER_VALUES = st.one_of(
    st.sampled_from(["application/json", "application/x-www-form-urlencoded", "text/plain",
                     "multipart/form-data; boundary=zz", "https://evil.example", "null",
                     "127.0.0.1", "Basic !!!", "Basic YWRtaW46", "gzip", "chunked",
                     f"{2**64}-1", "\u0661-0"]),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=40),
)
JSON_BODIES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
              st.text(max_size=30)),
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.sampled_from(["nick", "text", "key", "x"]),
                                               children, max_size=4)),
    max_leaves=12,
)


def _json(value: object) -> bytes:
    import json

    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


BODIES = st.one_of(
    st.just(b""),
    st.binary(max_size=200),
    JSON_BODIES.map(_json),
    st.integers(100, 3000).map(lambda n: b"[" * n),
    st.builds(lambda n, t: f"nick={n}&text={t}".encode(), st.text(max_size=10), st.text(max_size=20)),
)


def _request(method: str, target: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{k}: {v}" for k, v in headers if k.lower() not in ("host", "content-length")]
    lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogatepass") + body


def _status(port: int, raw: bytes) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(raw)
        head = b""
        while b"\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                break
            head += chunk
    assert head.startswith(b"HTTP/1.1 "), head[:80]
    return int(head.split(b" ", 2)[1])


def test_no_request_gets_a_500_or_a_traceback(spawn_node) -> None:
    node = spawn_node(env={
        "RTCHAT_LIMITS__RATE__BURST": "100000", "RTCHAT_LIMITS__READ_RATE__BURST": "100000",
        "RTCHAT_SSE__HEARTBEAT_SECONDS": "1"})
    statuses: list[int] = []

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.function_scoped_fixture])
    @given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "OPTIONS", "HEAD", "PATCH"]),
           path=PATHS, query=QUERY,
           headers=st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=5),
           body=BODIES)
    def one(method: str, path: str, query: str, headers: list[tuple[str, str]], body: bytes) -> None:
        # An event stream answers its head at once and stays open: the status line is enough.
        status = _status(node.port, _request(method, path + query, headers, body))
        statuses.append(status)
        assert status < 500, (method, path, query, headers, body[:60])

    one()
    assert len(statuses) >= EXAMPLES  # every generated case was sent and answered
    print(f"fuzz: {len(statuses)} requests, statuses {sorted(set(statuses))}")
    assert http_get(node.url + "/healthz")[0] == 200
    log = node.log()
    assert "Traceback" not in log, log[-3000:]
    assert "tornado.access: 500 " not in log
