"""Hostile clients that spend a node's memory, time and descriptors (SPEC: Hostile clients).

Each test runs a real node, attacks it from loopback source addresses other
than 127.0.0.1 (see hostile_clients), and keeps a bystander on 127.0.0.1: a
normal client that must get every message posted during the attack, once,
in order. Its latency is printed (``-s``), never asserted. What is asserted
is the resource bound: RSS read from /proc, connections closed within their
timeout plus a margin, CPU time that does not spin, answers that come at once.

Counts and times are small so the module runs in about a minute on two
cores; the configured limits are scaled down with them (header timeout 2 s,
write timeout 1-3 s, 64 KiB per stream) so each bound keeps its meaning.
Memory bounds are N x the per-connection cap + 40 MiB, the constant covering
the connections' own bookkeeping and the room's history.
"""

from __future__ import annotations

import asyncio
import re
import stat
import sys
import time
from typing import Any

import pytest
from hostile_clients import (
    Bystander,
    HttpConn,
    RawConn,
    RssSampler,
    attacker_address,
    basic_auth,
    close_all,
    close_times,
    connect,
    cpu_seconds,
    fd_count,
    http_once,
    mib,
    node_peers,
    open_many,
    open_slow_streams,
    poll_all,
    slowloris,
    sse_messages,
    stream_request,
    wait_all_closed,
)
from probes import async_wait_for, http_get, require_tool, wait_for
from sse_client import SSEClient

KIB = 1024
MIB = 1 << 20
# The bound every memory test holds the node to: N x the per-stream cap, plus this.
RSS_CONSTANT = 40 * MIB
FAST_SENDS = {"limits.rate.messages_per_second": 100000, "limits.rate.burst": 100000}


def node_env(settings: dict[str, Any]) -> dict[str, str]:
    """``{"sse.max_buffer_bytes": 65536}`` -> ``{"RTCHAT_SSE__MAX_BUFFER_BYTES": "65536"}``."""
    env = {}
    for key, value in settings.items():
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, (list, tuple)):
            value = "[" + ", ".join(map(str, value)) + "]"
        env["RTCHAT_" + key.upper().replace(".", "__")] = str(value)
    return env


def warm_up(port: int) -> None:
    """A few requests of each kind, so lazily loaded code is in RSS before the baseline."""
    for path in ("/healthz", "/readyz", "/rooms/warm/messages?limit=5", "/rooms/warm/presence",
                 "/metrics"):
        http_get(f"http://127.0.0.1:{port}{path}")


def held(pid: int, conns: list[RawConn]) -> list[RawConn]:
    """The connections the node still holds a descriptor for."""
    peers = node_peers(pid)
    return [c for c in conns if c.local in peers]


def clients_connected(port: int) -> float:
    status, body = http_get(f"http://127.0.0.1:{port}/metrics")
    match = re.search(rb"^rtchat_clients_connected (\S+)$", body, re.M) if status == 200 else None
    return float(match.group(1)) if match else -1.0


def wait_streams(port: int, n: int, timeout: float = 20.0) -> None:
    wait_for(lambda: clients_connected(port) >= n, timeout, f"{n} streams open on the node",
             interval=0.1)


def assert_rss_bound(sampler: RssSampler, n: int, per_stream: int, what: str) -> None:
    bound = n * per_stream + RSS_CONSTANT
    growth = (sampler.peak_kib - sampler.baseline_kib) * KIB
    print(f"{what}: RSS {sampler.baseline_kib / 1024:.0f} MiB -> peak {sampler.peak_kib / 1024:.0f} MiB "
          f"(+{mib(growth):.0f} MiB; bound +{mib(bound):.0f} MiB = {n} x {per_stream // KIB} KiB + "
          f"{mib(RSS_CONSTANT):.0f} MiB)")
    assert growth <= bound, (
        f"{what}: node RSS grew {mib(growth):.0f} MiB, over the bound of {mib(bound):.0f} MiB "
        f"({n} x {per_stream // KIB} KiB + {mib(RSS_CONSTANT):.0f} MiB)")


# -- 1, 2: streams that read slowly or never --------------------------------------------------------

def test_slow_readers_are_closed_memory_stays_bounded_and_they_resume_losslessly(spawn_node) -> None:
    n, buffer_bytes, probe = 300, 64 * KIB, 6.0
    node = spawn_node(env=node_env({**FAST_SENDS, "sse.max_buffer_bytes": buffer_bytes,
                                    "sse.write_timeout_seconds": 3}))
    pid = node.proc.pid
    warm_up(node.port)
    with RssSampler(pid) as rss:
        slow = open_slow_streams(node.port, "flood", n, per_address=50)
        try:
            wait_streams(node.port, n)
            # ~4,000-byte messages at ~45/s into the room of 300 clients reading ~2 KiB/s each.
            with Bystander(node.port, room="flood", rate=45, text_bytes=4000) as bystander:
                start = time.monotonic()
                all_closed_at = None
                for tick in range(int(probe * 10)):
                    for conn in slow:
                        conn.poll(max_bytes=205)  # 205 bytes per 0.1 s: ~2 KiB/s
                    if all_closed_at is None and tick % 5 == 0 and not held(pid, slow):
                        all_closed_at = time.monotonic() - start
                    time.sleep(0.1)
            report = bystander.report
            # Closed by the node within the probe, or at the latest a write timeout after it.
            deadline = time.monotonic() + 3 + 2
            while (still := held(pid, slow)) and time.monotonic() < deadline:
                for conn in slow:
                    conn.poll(max_bytes=205)
                time.sleep(0.1)
            when = f"at {all_closed_at:.1f} s" if all_closed_at else "not during the probe"
            print(f"slow readers: {n - len(still)}/{n} closed by the node; all gone {when}")
        finally:
            tracked = slow[:150:50]  # one per source address, resumed below
            close_all(c for c in slow if c not in tracked)
    assert_rss_bound(rss, n, buffer_bytes, f"{n} slow readers")
    assert not still, f"{len(still)} of {n} slow streams still open {probe + 5:.0f} s into the probe"

    # Each slow client resumes from the last message it got whole, and misses nothing.
    posted = report.posted

    async def resume(conn: RawConn) -> None:
        status, seen = sse_messages(bytes(conn.received))
        conn.close()
        assert status == 200
        ids = [m["id"] for m in seen]
        assert ids == posted[:len(ids)], "the slow client's own messages were not in order"
        client = await SSEClient.open(node.url, "flood", last_event_id=ids[-1] if ids else "0-0")
        try:
            rest = await client.messages(len(posted) - len(ids), timeout=20)
        finally:
            await client.aclose()
        assert [m["id"] for m in rest] == posted[len(ids):], "the resumed stream lost messages"

    async def resume_all() -> None:
        await asyncio.gather(*(resume(c) for c in tracked))

    asyncio.run(resume_all())
    report.check()


def test_streams_that_never_read_are_evicted_by_the_write_timeout(spawn_node) -> None:
    n, buffer_bytes, write_timeout, probe = 2000, 64 * KIB, 2.0, 5.0
    node = spawn_node(env=node_env({**FAST_SENDS, "sse.max_buffer_bytes": buffer_bytes,
                                    "sse.write_timeout_seconds": write_timeout}))
    pid = node.proc.pid
    warm_up(node.port)
    with RssSampler(pid) as rss:
        stuck = open_slow_streams(node.port, "flood", n, per_address=50)
        try:
            wait_streams(node.port, n, timeout=30)
            # ~21 KB/s per stream for 5 s: more than the kernel takes for a client with a 4 KiB
            # window and an Internet MSS (~80 KB), and less than max_buffer_bytes on top of
            # that. So each stream's write stalls with the node holding under its byte cap:
            # only the write timeout can close it.
            gone_at: dict[tuple[str, int], float] = {}

            def note_evictions(since: float) -> int:
                remaining = {c.local for c in held(pid, stuck)}
                now = time.monotonic() - since
                for conn in stuck:
                    if conn.local not in remaining:
                        gone_at.setdefault(conn.local, now)
                return len(remaining)

            with Bystander(node.port, room="flood", rate=20, text_bytes=1000) as bystander:
                started = time.monotonic()
                while time.monotonic() - started < probe:  # the attack lasts as long as the posting
                    note_evictions(started)
                    time.sleep(0.25)
            stopped = time.monotonic() - started
            while note_evictions(started) and time.monotonic() - started < stopped + write_timeout + 4:
                time.sleep(0.25)
        finally:
            close_all(stuck)
    times = sorted(gone_at.values())
    print(f"never-reading streams: {len(times)}/{n} evicted, {times[0]:.1f}-{times[-1]:.1f} s into "
          f"the posting (it stopped at {stopped:.1f} s)" if times
          else f"never-reading streams: none of {n} evicted")
    assert_rss_bound(rss, n, buffer_bytes, f"{n} never-reading streams")
    assert len(times) == n, (
        f"{n - len(times)} of {n} never-reading streams still open {write_timeout + 4:.0f} s after "
        f"the last message (sse.write_timeout_seconds={write_timeout})")
    assert times[-1] <= stopped + write_timeout + 4
    bystander.report.check()


def test_a_slow_reader_that_keeps_making_progress_is_not_closed_by_the_write_timeout(
        spawn_node) -> None:
    """The write timeout is for a socket that takes nothing, not for one that takes little:
    a burst within max_buffer_bytes, read steadily at ~24 KB/s, arrives whole on one stream."""
    write_timeout, burst, size = 1.0, 40, 4000
    node = spawn_node(env=node_env({**FAST_SENDS, "sse.write_timeout_seconds": write_timeout}))
    pid = node.proc.pid  # sse.max_buffer_bytes: the default 256 KiB, above the ~160 KB burst

    async def post_burst() -> list[str]:
        conn = HttpConn(node.port)
        ids = []
        for i in range(burst):
            r = await conn.request("POST", "/rooms/burst/messages",
                                   body={"nick": "b", "text": f"{i:04d} " + "x" * (size - 5)})
            assert r.status == 201
            ids.append(r.json()["id"])
        conn.close()
        return ids

    with Bystander(node.port) as bystander:
        (reader,) = open_slow_streams(node.port, "burst", 1)
        try:
            wait_for(lambda: b"\r\n\r\n" in reader.received or reader.poll(), 5, "the stream's head")
            ids = asyncio.run(post_burst())
            start = time.monotonic()
            gone_at = None
            got: list[dict[str, Any]] = []
            # ~7 s at full speed; the bound leaves room for a loaded machine, whose reader
            # polls less often (it stops as soon as everything arrived).
            while time.monotonic() - start < 25 and len(got) < burst:
                reader.poll(max_bytes=2400)  # 2,400 bytes every 0.1 s: always some progress
                if reader.local not in node_peers(pid):
                    gone_at = time.monotonic() - start
                    break
                got = sse_messages(bytes(reader.received))[1]
                time.sleep(0.1)
            took = time.monotonic() - start
        finally:
            reader.close()
    print(f"steady slow reader: {len(got)}/{burst} messages in {took:.1f} s; the node "
          + (f"closed it {gone_at:.1f} s in" if gone_at is not None else "kept it open"))
    assert gone_at is None, (f"a stream reading ~24 KB/s was closed {gone_at:.1f} s into a "
                             f"{burst * size // 1000} KB burst (write timeout {write_timeout} s)")
    assert [m["id"] for m in got] == ids
    bystander.report.check()


def test_clients_that_never_read_a_big_answer_are_closed_and_memory_stays_bounded(
        spawn_node) -> None:
    """History answers are ~4 MB at the default limits (1000 x 4 KiB); a client that asks and
    never reads must not pin that in the node: it is held to what a stream may hold, and
    closed once its socket takes nothing for the write timeout (as nginx's send_timeout)."""
    n, buffer_bytes, write_timeout, margin = 100, 64 * KIB, 2.0, 4.0
    node = spawn_node(env=node_env({**FAST_SENDS, "sse.max_buffer_bytes": buffer_bytes,
                                    "sse.write_timeout_seconds": write_timeout}))
    pid = node.proc.pid

    async def fill() -> int:
        conn = HttpConn(node.port)
        for i in range(1000):
            r = await conn.request("POST", "/rooms/big/messages",
                                   body={"nick": "filler", "text": f"{i:04d} " + "f" * 3995})
            assert r.status == 201
        size = (await conn.request("GET", "/rooms/big/messages?limit=1000")).size
        conn.close()
        return size

    answer_size = asyncio.run(fill())
    warm_up(node.port)
    request = b"GET /rooms/big/messages?limit=1000 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with RssSampler(pid) as rss, Bystander(node.port) as bystander:
        # 50 per address: within the read burst and the stream and connection caps.
        stuck = open_many(node.port, n, per_address=50, rcvbuf=4096, mss=1460, request=request)
        try:
            sent = time.monotonic()
            remaining = stuck
            while remaining and time.monotonic() - sent < write_timeout + margin:
                time.sleep(0.25)
                remaining = held(pid, stuck)
            took = time.monotonic() - sent
        finally:
            close_all(stuck)
    print(f"{n} never-read answers of {answer_size / 1e6:.1f} MB: the node holds {len(remaining)} "
          f"of them {took:.1f} s on")
    assert_rss_bound(rss, n, buffer_bytes, f"{n} never-read {answer_size / 1e6:.0f} MB answers")
    assert not remaining, (f"{len(remaining)} of {n} connections whose answer nobody reads still "
                           f"open {took:.0f} s on (write timeout {write_timeout} s)")
    bystander.report.check()


# -- 3: slowloris, silent and idle connections ------------------------------------------------------

def test_slowloris_and_silent_connections_are_closed_within_the_header_timeout(spawn_node) -> None:
    n, header_timeout, margin = 300, 2.0, 3.0
    node = spawn_node(env=node_env({"http.header_timeout_seconds": header_timeout,
                                    "http.idle_timeout_seconds": 30}))
    with Bystander(node.port) as bystander:
        # Keep-alive slowloris: one honest request, then the next head a byte at a time.
        again = open_many(node.port, 50, per_address=50, first_group=20,
                          request=b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        loris = slowloris(node.port, n, per_address=100)
        silent = open_many(node.port, n, per_address=100, first_group=10)
        try:
            wait_for(lambda: all(c.poll() or b"\r\n\r\n" in c.received for c in again), 5,
                     "the keep-alive slowloris' first answers", interval=0.01)
            assert all(c.status == 200 for c in again)
            for conn in again:  # the clock of each runs from here: its next head begins
                conn.received.clear()
                conn.opened_at = time.monotonic()
                conn.send(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: a")
            waited = wait_all_closed(loris + silent + again, header_timeout + margin + 1,
                                     trickle_every=1.0)
            still_loris = [c for c in loris + again if not c.closed]
            still_silent = [c for c in silent if not c.closed]
            held_by_node = len(held(node.proc.pid, loris + silent + again))
        finally:
            close_all(loris + silent + again)
    for name, conns in (("slowloris", loris), ("silent", silent), ("keep-alive slowloris", again)):
        times = close_times(conns)
        statuses = sorted({c.status for c in conns if c.status is not None})
        print(f"{name}: {len(times)}/{len(conns)} closed by the node"
              + (f", after {times[0]:.1f}-{times[-1]:.1f} s" if times else "")
              + f"; status lines seen: {statuses or 'none'}")
    print(f"waited {waited:.1f} s; the node still holds {held_by_node} of them")
    assert not still_loris and not still_silent, (
        f"{len(still_loris)} slowloris (of {n} + 50 keep-alive) and {len(still_silent)} silent "
        f"(of {n}) connections still open {header_timeout + margin + 1:.0f} s after their head "
        f"began (header timeout {header_timeout} s)")
    latest = max(close_times(loris + silent + again))
    assert latest <= header_timeout + margin, f"the last one closed after {latest:.1f} s"
    assert all(c.status in (None, 408) for c in loris + silent + again), \
        "only a 408 may precede the close"
    bystander.report.check()


def test_idle_keep_alive_connections_are_closed_after_the_idle_timeout(spawn_node) -> None:
    n, idle, margin = 50, 3.0, 2.5
    node = spawn_node(env=node_env({"http.header_timeout_seconds": 1.5,
                                    "http.idle_timeout_seconds": idle}))
    request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with Bystander(node.port) as bystander:
        conns = open_many(node.port, n, per_address=50, request=request)
        try:
            answered: dict[int, float] = {}

            def all_answered() -> bool:
                for i, conn in enumerate(conns):
                    conn.poll()
                    if i not in answered and b"\r\n\r\n" in conn.received:
                        answered[i] = time.monotonic()
                return len(answered) == n

            wait_for(all_answered, 5, "every keep-alive request to be answered", interval=0.01)
            assert all(c.status == 200 for c in conns)
            wait_all_closed(conns, idle + margin + 1)
        finally:
            close_all(conns)
    idle_for = sorted(c.closed_at - answered[i] for i, c in enumerate(conns) if c.closed)
    print(f"idle keep-alive: {len(idle_for)}/{n} closed"
          + (f" {idle_for[0]:.1f}-{idle_for[-1]:.1f} s after their answer" if idle_for else ""))
    assert len(idle_for) == n, f"{n - len(idle_for)} of {n} idle keep-alive connections still open " \
                               f"{idle + margin + 1:.0f} s after their answer (idle timeout {idle} s)"
    assert idle_for[-1] <= idle + margin
    # Idle between requests is idle_timeout, not the (shorter) header timeout of a first request.
    assert idle_for[0] >= idle * 0.8, f"closed after {idle_for[0]:.1f} s, before the idle timeout"
    bystander.report.check()


# -- 4: bodies: declared too large, or never finished ----------------------------------------------

def answer_to(port: int, i: int, request: bytes) -> tuple[int | None, float, bytes]:
    """Send ``request`` whole from attacker address ``i``; the status, the seconds it took to
    come (at most 3 s of waiting), and the answer's head."""
    conn = RawConn(connect(port, attacker_address(i)))
    try:
        conn.sock.setblocking(True)
        conn.sock.sendall(request)
        conn.sock.setblocking(False)
        start = time.monotonic()
        while time.monotonic() - start < 3 and b"\r\n\r\n" not in conn.received \
                and not conn.poll():
            time.sleep(0.01)
        return conn.status, time.monotonic() - start, conn.head()
    finally:
        conn.close()


def test_a_body_over_the_limit_is_413_at_once(spawn_node) -> None:
    node = spawn_node()  # limits.max_body_bytes 16384, http.body_timeout_seconds 30
    head = b"POST /rooms/r/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    cases = {
        # Declared too large, and nothing sent: the answer may not wait for the body.
        "Content-Length 1000000, no body": head + b"Content-Length: 1000000\r\n\r\n",
        # No length declared: 413 once the chunks pass the limit.
        "chunked, 20000 bytes": head + b"Transfer-Encoding: chunked\r\n\r\n"
                                + (b"2710\r\n" + b"a" * 10000 + b"\r\n") * 2,
    }
    got: dict[str, tuple[int | None, float, bytes]] = {}
    with Bystander(node.port) as bystander:
        for i, (name, request) in enumerate(cases.items()):
            status, took, answer = answer_to(node.port, i, request)
            got[name] = (status, took, answer[:80])
    for name, (status, took, _) in got.items():
        print(f"{name}: {status or 'no answer'} after {took:.2f} s")
    for name, (status, took, head_seen) in got.items():
        assert status == 413, f"{name}: no 413 within {took:.1f} s (got {head_seen!r})"
        assert took < 2.0
    bystander.report.check()


def test_stalled_uploads_are_closed_after_the_body_timeout_and_memory_stays_bounded(
        spawn_node) -> None:
    body_timeout, margin, max_body = 2.0, 3.0, 16384
    n_stall, n_trickle, n_big = 100, 50, 100
    node = spawn_node(env=node_env({"http.body_timeout_seconds": body_timeout,
                                    "limits.max_body_bytes": max_body}))
    pid = node.proc.pid
    warm_up(node.port)

    def post_head(length: int) -> bytes:
        return (f"POST /rooms/r/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n").encode()

    with RssSampler(pid) as rss, Bystander(node.port) as bystander:
        # Within the limit, but the body stops half way, or comes a byte at a time.
        stalled = open_many(node.port, n_stall, per_address=50,
                            request=post_head(max_body) + b'{"nick":"x","text":"' + b"a" * 8000)
        trickling = open_many(node.port, n_trickle, per_address=50, first_group=10,
                              request=post_head(max_body) + b'{"nick":"x","text":"')
        # Far over the limit: 900 KiB declared, as much sent as the sockets take.
        big = open_many(node.port, n_big, per_address=50, first_group=20,
                        request=post_head(900 * KIB))
        try:
            chunk = b"a" * 65536
            for conn in big:
                sent = 0
                try:
                    while sent < 512 * KIB:
                        sent += conn.sock.send(chunk)
                except OSError:  # the socket is full (or the node answered and closed it)
                    pass
            big_sent_at = time.monotonic()
            wait_all_closed(stalled + trickling, body_timeout + margin + 1, trickle_every=0.5,
                            trickle_to=trickling)
            poll_all(big)
            big_held = held(pid, big)
            big_answers = sorted({c.status for c in big if c.status is not None})
            big_elapsed = time.monotonic() - big_sent_at
        finally:
            close_all(stalled + trickling + big)
    for name, conns in (("stalled", stalled), ("trickling", trickling)):
        times = close_times(conns)
        print(f"{name} uploads: {len(times)}/{len(conns)} closed"
              + (f" after {times[0]:.1f}-{times[-1]:.1f} s" if times else "")
              + f"; answers {sorted({c.status for c in conns if c.status})}")
    print(f"900 KiB uploads: node holds {len(big_held)}/{n_big} {big_elapsed:.1f} s on; "
          f"answers {big_answers}")
    assert_rss_bound(rss, n_stall + n_trickle + n_big, max_body, "stalled uploads")
    for name, conns in (("stalled", stalled), ("trickling", trickling)):
        still = [c for c in conns if not c.closed]
        assert not still, (f"{len(still)} of {len(conns)} {name} uploads still open "
                           f"{body_timeout + margin + 1:.0f} s on (body timeout {body_timeout} s)")
        assert max(close_times(conns)) <= body_timeout + margin
        assert all(c.status in (None, 408) for c in conns), "only a 408 may precede the close"
    assert not big_held, f"the node still holds {len(big_held)} uploads declared over the limit"
    assert set(big_answers) <= {413}, f"uploads over the limit got {big_answers}"
    bystander.report.check()


# -- 5: heads over the limit ---------------------------------------------------------------------------

def test_a_request_head_over_the_limit_gets_a_431_status_line(spawn_node) -> None:
    limit = 8192
    node = spawn_node(env=node_env({"http.max_header_bytes": limit,
                                    "http.header_timeout_seconds": 10}))
    big_header = b"X-Big: " + b"h" * (limit + 4000) + b"\r\n"
    cases = {
        "header over the limit": b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + big_header + b"\r\n",
        "header over the limit, head unfinished": b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                                  + big_header,
        "many headers over the limit": b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                       + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 40)
                                                  for i in range(limit // 40)) + b"\r\n",
        "request line over the limit": b"GET /healthz?" + b"q" * (limit + 4000)
                                       + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        "head under the limit": b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Ok: "
                                + b"o" * (limit // 2) + b"\r\n\r\n",
    }
    expected = {"header over the limit": {431}, "header over the limit, head unfinished": {431},
                "many headers over the limit": {431},
                "request line over the limit": {414, 431}, "head under the limit": {200}}
    got: dict[str, tuple[int | None, float]] = {}
    with Bystander(node.port) as bystander:
        for i, (name, request) in enumerate(cases.items()):
            got[name] = answer_to(node.port, i, request)[:2]
    for name, (status, took) in got.items():
        print(f"{name}: {status or 'no status line'} after {took:.2f} s")
    for name, (status, took) in got.items():
        assert status in expected[name], f"{name}: got {status or 'no status line'}, " \
                                         f"want {sorted(expected[name])}"
        assert took < 2.0, f"{name}: the answer took {took:.1f} s"
    bystander.report.check()


# -- 6: out of file descriptors ------------------------------------------------------------------------

def test_out_of_file_descriptors_the_node_serves_on_without_spinning(spawn_node, tmp_path) -> None:
    nofile, n_idle, window = 256, 400, 3.0
    wrapper = tmp_path / "python-nofile"
    wrapper.write_text(f"#!/bin/sh\nulimit -n {nofile} || exit 99\nexec {sys.executable} \"$@\"\n")
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    # Timeouts long enough that the node does not free descriptors by itself meanwhile.
    node = spawn_node(python=str(wrapper), env=node_env({
        "http.header_timeout_seconds": 60, "http.idle_timeout_seconds": 60}))
    pid = node.proc.pid
    with open(f"/proc/{pid}/limits", encoding="ascii") as f:
        assert re.search(rf"Max open files\s+{nofile}\s", f.read()), "the node's fd limit is not set"

    async def scenario() -> dict[str, Any]:
        out: dict[str, Any] = {}
        health, ready = HttpConn(node.port), HttpConn(node.port)  # opened while there is room
        assert (await health.request("GET", "/healthz")).status == 200
        assert (await ready.request("GET", "/readyz")).status == 200
        log_mark = len(node.log())
        attack_started = time.monotonic()
        idle = await asyncio.to_thread(open_many, node.port, n_idle, per_address=100)
        try:
            await async_wait_for(lambda: fd_count(pid) >= nofile - 16, 10,
                                 "the node to run out of descriptors", interval=0.05)
            cpu0, t0 = cpu_seconds(pid), time.monotonic()
            await asyncio.sleep(window)  # measuring: CPU time over a window of exhaustion
            out["cpu_share"] = (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)
            out["log"] = node.log()[log_mark:]
            out["exhausted_for"] = time.monotonic() - attack_started
            out["fds"] = fd_count(pid)
            try:
                r = await health.request("GET", "/healthz", timeout=3)
                out["healthz"] = r.status
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
                out["healthz"] = f"{type(e).__name__}"
            try:
                r = await ready.request("GET", "/readyz", timeout=3)
                out["readyz"] = (r.status, r.body.decode(errors="replace"))
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
                out["readyz"] = (0, f"{type(e).__name__}")
        finally:
            close_all(idle)
        # With the idle ones gone, new connections are accepted again, and readiness is back.
        start = time.monotonic()

        async def fresh_ok() -> bool:
            try:
                return (await http_once(node.port, "GET", "/readyz", timeout=1)).status == 200
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
                return False

        out["recovered_after"] = None
        while time.monotonic() - start < 10:
            if await fresh_ok():
                out["recovered_after"] = time.monotonic() - start
                break
            await asyncio.sleep(0.1)
        health.close()
        ready.close()
        return out

    with Bystander(node.port) as bystander:
        out = asyncio.run(scenario())
    fd_lines = [line for line in out["log"].splitlines()
                if re.search(r"(?i)file descriptor|too many open files|EMFILE", line)]
    print(f"out of fds: node CPU {out['cpu_share']:.0%} of {window:.0f} s, {out['fds']} fds open, "
          f"{len(out['log'].splitlines())} log lines ({len(fd_lines)} about descriptors, "
          f"{out['log'].count('Traceback')} tracebacks); /healthz on an open connection: "
          f"{out['healthz']}; /readyz: {out['readyz'][0]} {out['readyz'][1][:120]}; accepting again "
          f"after {out['recovered_after']}")
    assert out["cpu_share"] < 0.5, f"the node spun: {out['cpu_share']:.0%} CPU while out of fds"
    assert "Traceback" not in out["log"], "tracebacks in the log while out of fds"
    assert 1 <= len(fd_lines) <= 2 + out["exhausted_for"], (
        f"{len(fd_lines)} log lines about descriptors in {out['exhausted_for']:.0f} s out of them "
        f"(want one line per interval, at least one)")
    assert out["healthz"] == 200, f"/healthz on an open keep-alive connection: {out['healthz']}"
    status, body = out["readyz"]
    assert status == 503 and "file descriptor" in body.lower(), f"/readyz said {status} {body[:200]}"
    assert out["recovered_after"] is not None, "no new connection accepted 10 s after fds were freed"
    bystander.report.check()


# -- 7: per-address caps and who the client is -------------------------------------------------------

def test_per_address_caps_on_streams_and_connections(spawn_node) -> None:
    max_streams, max_conns = 20, 30
    node = spawn_node(env=node_env({"limits.max_streams_per_address": max_streams,
                                    "limits.max_connections_per_address": max_conns}))
    pid = node.proc.pid

    def wait_heads(conns: list[RawConn], timeout: float = 5.0) -> None:
        wait_for(lambda: all(c.poll() or b"\r\n\r\n" in c.received for c in conns), timeout,
                 "every answer's head", interval=0.01)

    with Bystander(node.port) as bystander:
        # Streams from one address: the cap, then 429 with Retry-After.
        streams = open_many(node.port, max_streams + 5, per_address=1000, first_group=0,
                            request=stream_request("capped"))
        conns = open_many(node.port, max_conns, per_address=1000, first_group=1,
                          request=b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        extra: list[RawConn] = []
        try:
            wait_heads(streams)
            wait_heads(conns)
            stream_statuses = [c.status for c in streams]
            refused = [c for c in streams if c.status == 429]
            # One stream goes: the address may open one again.
            ok = [c for c in streams if c.status == 200]
            ok[0].close()
            wait_for(lambda: ok[0].local not in node_peers(pid), 5, "the closed stream to go")
            again = open_many(node.port, 1, per_address=1000, first_group=0,
                              request=stream_request("capped"))
            wait_heads(again)
            again_status = again[0].status
            streams += again  # closed with the rest
            # Connections from one address past the cap: each refused (429 and/or closed).
            conn_statuses = [c.status for c in conns]
            extra = open_many(node.port, 5, per_address=1000, first_group=1)
            time.sleep(0.5)  # give an answer-at-accept its chance before the request is sent
            for c in extra:
                if not c.poll():
                    c.send(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            wait_all_closed(extra, 3)
            extra_held = held(pid, extra)
            conns_held = held(pid, conns)
        finally:
            close_all(streams + conns + extra)
    print(f"{max_streams + 5} streams from one address: {stream_statuses}; after one closed: "
          f"{again_status}")
    print(f"{max_conns} connections: {sorted(set(conn_statuses))}; 5 more: "
          f"{[c.status for c in extra]}, {sum(c.closed for c in extra)} closed, "
          f"{len(extra_held)} still held by the node")
    assert stream_statuses.count(200) == max_streams and len(refused) == 5, stream_statuses
    for c in refused:
        head = c.head().decode().lower()
        assert "retry-after:" in head and b'"error"' in c.received, head
    assert again_status == 200, "a freed stream slot was not given back"
    assert conn_statuses == [200] * max_conns
    assert len(conns_held) == max_conns, "connections within the cap were closed"
    assert not any(c.status == 200 for c in extra), "connections over the cap were served"
    assert not extra_held and all(c.closed for c in extra), "connections over the cap were kept open"
    assert any(c.status == 429 for c in extra), "no 429 for connections over the cap"
    bystander.report.check()


def test_reads_over_the_read_rate_get_429(spawn_node) -> None:
    rps, burst, n = 2, 5, 12
    node = spawn_node(env=node_env({"limits.read_rate.requests_per_second": rps,
                                    "limits.read_rate.burst": burst}))

    async def hammer_api(path: str, group: int) -> tuple[list[int], float, list[Any]]:
        conn = HttpConn(node.port, attacker_address(group))
        start = time.monotonic()
        answers = [await conn.request("GET", path) for _ in range(n)]
        conn.close()
        return [r.status for r in answers], time.monotonic() - start, [
            (r.headers.get("retry-after"), r.json().get("error")) for r in answers if r.status == 429]

    def hammer_streams(group: int) -> tuple[list[int], float, list[Any]]:
        start = time.monotonic()
        statuses, refusals = [], []
        for _ in range(n):
            (conn,) = open_many(node.port, 1, first_group=group, request=stream_request("rr"))
            try:
                wait_for(lambda c=conn: c.poll() or b"\r\n\r\n" in c.received, 5, "a stream's head")
                statuses.append(conn.status)
                if conn.status == 429:
                    head = conn.head().decode().lower()
                    refusals.append(("retry-after:" in head, b'"error"' in conn.received))
            finally:
                conn.close()
        return statuses, time.monotonic() - start, refusals

    async def scenario() -> dict[str, Any]:
        return {
            "history": await hammer_api("/rooms/rr/messages?limit=10", 0),
            "presence": await hammer_api("/rooms/rr/presence", 1),
            "stream opens": await asyncio.to_thread(hammer_streams, 2),
        }

    with Bystander(node.port) as bystander:
        results = asyncio.run(scenario())
    for kind, (statuses, took, _) in results.items():
        print(f"{n} {kind} reads from one address in {took:.2f} s: {statuses}")
    for kind, (statuses, took, refusals) in results.items():
        allowed = burst + rps * took + 1
        assert statuses.count(200) <= allowed, f"{kind}: {statuses.count(200)} of {n} allowed " \
                                               f"(read_rate {rps}/s, burst {burst})"
        assert statuses.count(429) >= 1 and set(statuses) <= {200, 429}, f"{kind}: {statuses}"
        assert all(r[0] and r[1] for r in refusals), f"{kind}: 429 without Retry-After/JSON: {refusals}"
    bystander.report.check()


FORWARDED = ("X-Real-IP", "X-Forwarded-For", "Forwarded")


def forwarded(i: int, ip: str) -> dict[str, str]:
    name = FORWARDED[i % 3]
    return {name: f"for={ip}" if name == "Forwarded" else ip}


def test_forwarded_headers_from_untrusted_peers_are_ignored(spawn_node) -> None:
    rate, burst = 2, 5
    limited = {"http.xheaders": True, "http.trusted_proxies": ["10.9.9.9/32"],
               "limits.rate.messages_per_second": rate, "limits.rate.burst": burst}
    node = spawn_node(env=node_env({**limited, "admin.password": "s3cret"}))
    open_admin = spawn_node(env=node_env({"http.xheaders": True,
                                          "http.trusted_proxies": ["10.9.9.9/32"]}))

    async def scenario() -> dict[str, Any]:
        out: dict[str, Any] = {}
        sender = HttpConn(node.port, attacker_address(0))
        start = time.monotonic()
        sends = [await sender.request("POST", "/rooms/rot/messages", body={"nick": "m", "text": "t"},
                                      headers=forwarded(i, f"203.0.113.{i + 1}")) for i in range(40)]
        out["sends"] = ([r.status for r in sends], time.monotonic() - start)
        sender.close()
        admin = HttpConn(node.port, attacker_address(1))
        out["logins"] = [(await admin.request(
            "GET", "/admin/api/status",
            headers={**basic_auth("admin", f"guess{i}"), **forwarded(i, f"198.51.100.{i + 1}")})).status
            for i in range(15)]
        admin.close()
        forged = []
        for i in range(3):
            r = await http_once(open_admin.port, "GET", "/admin/api/status",
                                src=attacker_address(2), headers=forwarded(i, "127.0.0.1"))
            forged.append((FORWARDED[i], "loopback peer", r.status))
        out["forged"] = forged
        return out

    with Bystander(node.port, rate=1) as bystander:
        out = asyncio.run(scenario())
    statuses, took = out["sends"]
    print(f"40 sends rotating forwarded headers in {took:.1f} s: {statuses.count(201)} accepted, "
          f"{statuses.count(429)} refused (rate {rate}/s, burst {burst})")
    print(f"15 wrong admin logins rotating forwarded headers: {out['logins']}")
    print(f"forged forwarded 127.0.0.1 at the password-less admin: {out['forged']}")
    assert statuses.count(201) <= burst + rate * took + 1, "rotating forwarded headers escaped " \
                                                           "the send rate limit"
    assert 429 in out["logins"][:12], "rotating forwarded headers escaped the admin login throttle"
    assert all(s in (401, 403) for *_, s in out["forged"]), "a forged X-Real-IP opened the admin"
    bystander.report.check()


def test_forwarded_headers_from_a_trusted_proxy_are_believed(spawn_node) -> None:
    """The other side of the rule: loopback is trusted by default with xheaders on, so the
    forwarded clients behind it are told apart (a regression guard for the hardening)."""
    rate, burst = 2, 5
    node = spawn_node(env=node_env({"http.xheaders": True, "admin.password": "s3cret",
                                    "limits.rate.messages_per_second": rate,
                                    "limits.rate.burst": burst}))

    async def scenario() -> dict[str, Any]:
        out: dict[str, Any] = {}
        proxy = HttpConn(node.port, attacker_address(0))
        first = [(await proxy.request("POST", "/rooms/fw/messages", body={"nick": "a", "text": "t"},
                                      headers={"X-Real-IP": "203.0.113.1"})).status
                 for _ in range(burst + 3)]
        other = await proxy.request("POST", "/rooms/fw/messages", body={"nick": "b", "text": "t"},
                                    headers={"X-Real-IP": "203.0.113.2"})
        out["sends"] = (first, other.status)
        wrong = [(await proxy.request("GET", "/admin/api/status",
                                      headers={**basic_auth("admin", f"guess{i}"),
                                               "X-Real-IP": "198.51.100.66"})).status
                 for i in range(11)]
        right = basic_auth("admin", "s3cret")
        elsewhere = await proxy.request("GET", "/admin/api/status",
                                        headers={**right, "X-Real-IP": "198.51.100.77"})
        attacker = await proxy.request("GET", "/admin/api/status",
                                       headers={**right, "X-Real-IP": "198.51.100.66"})
        out["logins"] = (wrong, elsewhere.status, attacker.status)
        proxy.close()
        return out

    with Bystander(node.port, rate=1) as bystander:
        out = asyncio.run(scenario())
    print(f"behind a trusted proxy: sends as 203.0.113.1 {out['sends'][0]}, as 203.0.113.2 "
          f"{out['sends'][1]}; 11 wrong logins {out['logins'][0]}, the right password from another "
          f"address {out['logins'][1]}, from the attacker's {out['logins'][2]}")
    first, other = out["sends"]
    assert 429 in first and other == 201, "forwarded clients behind a trusted proxy share a bucket"
    wrong, elsewhere, attacker = out["logins"]
    assert wrong[-1] == 429, "11 wrong logins were not throttled"
    assert elsewhere == 200, "an attacker's failed logins locked the right credentials out elsewhere"
    assert attacker == 429, "the throttled address got in with the right password"
    bystander.report.check()


# -- 8: admin behind a proxy ---------------------------------------------------------------------------

def test_password_less_admin_refuses_requests_that_came_through_a_proxy(spawn_node) -> None:
    node = spawn_node()  # no admin.password, http.xheaders off

    async def scenario() -> dict[str, Any]:
        victim = await SSEClient.open(node.url, "victim")
        out: dict[str, Any] = {"proxied": []}
        try:
            status = await http_once(node.port, "GET", "/admin/api/status")
            out["plain"] = status.status
            listed = [c["id"] for c in status.json()["clients"]["listed"] if c["room"] == "victim"]
            assert len(listed) == 1
            victim_id = listed[0]
            for i, name in enumerate(FORWARDED):
                headers = forwarded(i, "203.0.113.9")
                for method, path in (("GET", "/admin"), ("GET", "/admin/api/status"),
                                     ("POST", f"/admin/api/clients/{victim_id}/disconnect")):
                    r = await http_once(node.port, method, path, headers=headers,
                                        body=b"" if method == "POST" else None)
                    out["proxied"].append((name, method, path.split("/")[-1], r.status))
            out["victim_alive_after_proxied"] = victim_id in [
                c["id"] for c in (await http_once(node.port, "GET", "/admin/api/status"))
                .json()["clients"]["listed"]]
            out["plain_disconnect"] = (await http_once(
                node.port, "POST", f"/admin/api/clients/{victim_id}/disconnect", body=b"")).status
        finally:
            await victim.aclose()
        return out

    with Bystander(node.port) as bystander:
        out = asyncio.run(scenario())
    print(f"admin without a password: plain loopback {out['plain']}; with forwarding headers "
          f"{out['proxied']}; plain disconnect {out['plain_disconnect']}")
    assert out["plain"] == 200, "plain loopback must still reach the password-less admin"
    refused = [p for p in out["proxied"] if p[3] not in (401, 403)]
    assert not refused, f"proxied requests reached the password-less admin: {refused}"
    assert out["victim_alive_after_proxied"], "a proxied request disconnected a client"
    assert out["plain_disconnect"] == 200
    bystander.report.check()


def test_default_node_behind_the_shipped_nginx_refuses_admin(spawn_node, tmp_path) -> None:
    require_tool("nginx")
    from lb_processes import NginxServer

    a, b = spawn_node(), spawn_node()  # the default config: no admin password
    nginx = NginxServer(tmp_path, (a.port, b.port))
    nginx.start()
    try:
        nginx.wait_ready()

        async def scenario() -> dict[str, Any]:
            victim = await SSEClient.open(a.url, "victim")
            try:
                status = (await http_once(a.port, "GET", "/admin/api/status")).json()
                (victim_id,) = [c["id"] for c in status["clients"]["listed"] if c["room"] == "victim"]
                answers = []
                for _ in range(2):  # both nodes, whichever nginx picks
                    for method, path in (("GET", "/admin"), ("GET", "/admin/api/status"),
                                         ("POST", f"/admin/api/clients/{victim_id}/disconnect")):
                        r = await http_once(nginx.port, method, path,
                                            body=b"" if method == "POST" else None)
                        answers.append((method, path.split("/")[-1], r.status))
                status = (await http_once(a.port, "GET", "/admin/api/status")).json()
                alive = victim_id in [c["id"] for c in status["clients"]["listed"]]
                return {"answers": answers, "alive": alive}
            finally:
                await victim.aclose()

        with Bystander(a.port) as bystander:
            out = asyncio.run(scenario())
    finally:
        nginx.stop()
    print(f"admin through the shipped nginx: {out['answers']}")
    refused = [x for x in out["answers"] if x[2] not in (401, 403)]
    assert not refused, f"the password-less admin answered through nginx: {refused}"
    assert out["alive"], "a client was disconnected through nginx"
    bystander.report.check()


# -- 9: read floods ------------------------------------------------------------------------------------

def test_a_read_flood_from_one_address_is_throttled_and_its_bytes_bounded(spawn_node) -> None:
    rps, burst, seconds, loops = 2, 6, 5.0, 4
    node = spawn_node(env=node_env({**FAST_SENDS, "limits.read_rate.requests_per_second": rps,
                                    "limits.read_rate.burst": burst}))

    async def fill() -> int:
        conn = HttpConn(node.port)
        for i in range(1000):
            r = await conn.request("POST", "/rooms/big/messages",
                                   body={"nick": "filler", "text": f"{i:04d} " + "f" * 995})
            assert r.status == 201
        size = (await conn.request("GET", "/rooms/big/messages?limit=1000")).size
        conn.close()
        return size

    async def history_loop(deadline: float, tally: dict[str, Any]) -> None:
        conn = HttpConn(node.port, attacker_address(0))
        while time.monotonic() < deadline:
            r = await conn.request("GET", "/rooms/big/messages?limit=1000")
            tally["bytes"] += r.size
            tally["answers"].append(r.status)
            if r.status == 429:
                tally["retry_after"] &= "retry-after" in r.headers
        conn.close()

    async def replay_loop(deadline: float, tally: dict[str, Any], target: int) -> None:
        while time.monotonic() < deadline:
            sock = await asyncio.to_thread(connect, node.port, attacker_address(0))
            reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 20)
            try:
                writer.write(stream_request("big", "last_event_id=0-0"))
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                status = int(head.split(b" ", 2)[1])
                tally["answers"].append(status)
                got = len(head)
                if status == 429:
                    tally["retry_after"] &= b"retry-after:" in head.lower()
                else:
                    end = min(deadline, time.monotonic() + 3)
                    while got < target and time.monotonic() < end:
                        try:
                            data = await asyncio.wait_for(reader.read(1 << 20), end - time.monotonic())
                        except asyncio.TimeoutError:
                            break
                        if not data:
                            break
                        got += len(data)
                tally["bytes"] += got
            finally:
                writer.close()

    async def scenario(answer_size: int) -> dict[str, Any]:
        tally: dict[str, Any] = {"bytes": 0, "answers": [], "retry_after": True}
        start = time.monotonic()
        deadline = start + seconds
        await asyncio.gather(*(history_loop(deadline, tally) for _ in range(loops)),
                             *(replay_loop(deadline, tally, answer_size) for _ in range(loops)))
        tally["took"] = time.monotonic() - start
        return tally

    answer_size = asyncio.run(fill())
    with Bystander(node.port) as bystander:
        tally = asyncio.run(scenario(answer_size))
    answers = tally["answers"]
    # Every allowed read may be a full answer; a few more may be in flight at the end.
    bound = (burst + rps * tally["took"] + 2 * loops) * answer_size * 1.1
    print(f"read flood for {tally['took']:.1f} s: {len(answers)} answers, {answers.count(200)} x 200, "
          f"{answers.count(429)} x 429; {mib(tally['bytes']):.1f} MiB received (bound "
          f"{mib(bound):.1f} MiB; one answer {answer_size / 1e6:.2f} MB)")
    after_burst = answers[burst:]
    assert after_burst.count(429) > after_burst.count(200), "the flood was not throttled"
    assert tally["retry_after"], "a 429 without Retry-After"
    assert tally["bytes"] <= bound, f"{mib(tally['bytes']):.0f} MiB sent to one address in " \
                                    f"{tally['took']:.0f} s (bound {mib(bound):.0f} MiB)"
    bystander.report.check()


# -- 10: rooms without end -----------------------------------------------------------------------------

def broker_room_count(broker: Any) -> int:
    """Rooms the memory broker holds state for (``room_count`` once it has one)."""
    count = getattr(broker, "room_count", None)
    if count is not None:
        return count() if callable(count) else int(count)
    return len(broker._rooms)


@pytest.mark.gen_test(timeout=60)
async def test_the_memory_broker_forgets_idle_rooms(start_node) -> None:
    n, ttl, conns = 10000, 1, 8
    node = await start_node(**{**FAST_SENDS, "history.ttl_seconds": ttl})
    broker = node.hub.broker

    async def flood(worker: int) -> int:
        conn = HttpConn(node.port, attacker_address(worker))
        ok = 0
        for i in range(worker, n, conns):
            r = await conn.request("POST", f"/rooms/flood-{i}/messages",
                                   body={"nick": "f", "text": "x"})
            ok += r.status == 201
        conn.close()
        return ok

    bystander = Bystander(node.port, rate=5)
    await asyncio.to_thread(bystander.__enter__)
    try:
        start = time.monotonic()
        accepted = sum(await asyncio.gather(*(flood(w) for w in range(conns))))
        took = time.monotonic() - start
        peak = broker_room_count(broker)
        forgotten_at = time.monotonic()
        try:
            # Only the bystander's room (posted to all along) may remain.
            await async_wait_for(lambda: broker_room_count(broker) <= 1, ttl + 10,
                                 "the flood's rooms to be forgotten", interval=0.1)
        except AssertionError:
            pass  # reported below
        left = broker_room_count(broker)
        forgotten_after = time.monotonic() - forgotten_at
    finally:
        await asyncio.to_thread(bystander.stop)
    print(f"{accepted} sends to {n} new rooms in {took:.1f} s: {peak} rooms held, {left} left "
          f"{forgotten_after:.1f} s later (ttl {ttl} s)")
    assert left <= 1, f"{left} rooms still held {forgotten_after:.0f} s after the flood (ttl {ttl} s)"
    assert accepted == n
    bystander.report.check()

