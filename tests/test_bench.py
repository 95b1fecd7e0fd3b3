"""Tests for rtchat/bench/: its parsers and maths in isolation, then whole runs
against a real rtchat node on a free port (memory broker, started as a process).

Every run goes through ``python -m rtchat.bench`` so stdout is checked to be
exactly one JSON object and stderr to be free of tracebacks and warnings.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import selectors
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from probes import async_wait_for

from rtchat.bench.clients import PAYLOAD_RE, StreamProtocol, Subscriber, id_order_key, make_text
from rtchat.bench.options import Options, parse_args
from rtchat.bench.report import latency_summary, percentile
from rtchat.bench.run import Bench
from rtchat.bench.wire import (
    ChunkedDecoder,
    ProtocolError,
    SseEvent,
    SseParser,
    UsageError,
    build_post,
    parse_target,
)

ROOT = Path(__file__).resolve().parent.parent
NODE_START_TIMEOUT = 30.0
BENCH_TIMEOUT = 120.0
# The bench sends from one address far faster than the default per-client limit.
UNLIMITED = {"RTCHAT_LIMITS__RATE__MESSAGES_PER_SECOND": "100000",
             "RTCHAT_LIMITS__RATE__BURST": "100000"}


# --------------------------------------------------------------------------
# The SSE parser
# --------------------------------------------------------------------------


def feed_all(parser: SseParser, pieces: list[bytes]) -> list[SseEvent]:
    events: list[SseEvent] = []
    for piece in pieces:
        events.extend(parser.feed(piece))
    return events


def test_sse_parser_reads_id_event_and_data() -> None:
    events = SseParser().feed(b'id: 1-0\nevent: message\ndata: {"a":1}\n\n')
    assert events == [SseEvent(b"message", b'{"a":1}', b"1-0")]


def test_sse_parser_defaults_event_type_and_has_no_id_when_none_given() -> None:
    assert SseParser().feed(b"data: x\n\n") == [SseEvent(b"message", b"x", None)]


def test_sse_parser_joins_data_lines_and_strips_one_space_only() -> None:
    events = SseParser().feed(b"data:a\ndata:  b\ndata\n\n")
    assert events == [SseEvent(b"message", b"a\n b\n", None)]


def test_sse_parser_skips_comments_and_blocks_without_data() -> None:
    parser = SseParser()
    events = parser.feed(b"retry: 1500\n\n: ping\n\nevent: presence\n\ndata: y\n\n")
    assert events == [SseEvent(b"message", b"y", None)]  # event type reset after an empty block
    assert parser.comments == 1
    assert parser.retry_ms == 1500


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_sse_parser_accepts_every_line_ending(eol: bytes) -> None:
    stream = eol.join([b"id: 7", b"event: reset", b"data: z", b"", b"data: w", b"", b""])
    assert SseParser().feed(stream) == [SseEvent(b"reset", b"z", b"7"), SseEvent(b"message", b"w",
                                                                                 None)]


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_sse_parser_gives_the_same_events_when_fed_byte_by_byte(eol: bytes) -> None:
    stream = b"\xef\xbb\xbf" + eol.join(
        [b"retry: 10", b"", b": hi", b"id: 1-1", b"data: one", b"data: two", b"", b"id: 1-2",
         b"event: message", b"data: three", b"", b""])
    whole = SseParser().feed(stream)
    assert whole == [SseEvent(b"message", b"one\ntwo", b"1-1"),
                     SseEvent(b"message", b"three", b"1-2")]
    assert feed_all(SseParser(), [stream[i:i + 1] for i in range(len(stream))]) == whole


def test_sse_parser_keeps_the_last_valid_retry_and_ignores_one_not_all_digits() -> None:
    # The SSE spec: a retry field whose value is not only ASCII digits is ignored.
    parser = SseParser()
    parser.feed(b"retry: 2500\n\nretry: 1.5\n\nretry: soon\n\nretry:\n\nretry: -1\n\n")
    assert parser.retry_ms == 2500
    parser.feed(b"retry:700\n")
    assert parser.retry_ms == 700


def test_sse_parser_keeps_the_last_event_id_across_events() -> None:
    parser = SseParser()
    events = parser.feed(b"id: 5-0\ndata: a\n\ndata: b\n\n")
    assert [e.id for e in events] == [b"5-0", None]
    assert parser.last_event_id == b"5-0"


def test_sse_parser_holds_an_incomplete_event_until_its_blank_line() -> None:
    parser = SseParser()
    assert parser.feed(b"id: 1-0\ndata: par") == []
    assert parser.feed(b"tial\n") == []
    assert parser.feed(b"\n") == [SseEvent(b"message", b"partial", b"1-0")]


# --------------------------------------------------------------------------
# Chunked transfer coding
# --------------------------------------------------------------------------


def test_chunked_decoder_decodes_chunks_and_finishes_on_the_last() -> None:
    body = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nTrailer: x\r\n\r\n"
    decoder = ChunkedDecoder()
    assert decoder.feed(body) == b"hello, world"
    assert decoder.done


def test_chunked_decoder_byte_by_byte() -> None:
    body = b"1a\r\n" + b"a" * 26 + b"\r\n3\r\nxyz\r\n0\r\n\r\n"
    decoder = ChunkedDecoder()
    out = b"".join(decoder.feed(body[i:i + 1]) for i in range(len(body)))
    assert out == b"a" * 26 + b"xyz"
    assert decoder.done


def test_chunked_decoder_rejects_garbage() -> None:
    with pytest.raises(ProtocolError):
        ChunkedDecoder().feed(b"zz\r\n")
    with pytest.raises(ProtocolError):
        ChunkedDecoder().feed(b"2\r\nabXY")


# --------------------------------------------------------------------------
# Percentiles and the message token
# --------------------------------------------------------------------------


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 90) == 90.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 51) == 3.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None


def test_latency_summary_sorts_and_handles_empty() -> None:
    assert latency_summary([3.0, 1.0, 2.0]) == {"p50": 2.0, "p90": 3.0, "p99": 3.0,
                                                      "max": 3.0}
    assert latency_summary([]) == {"p50": None, "p90": None, "p99": None, "max": None}


def test_message_token_survives_json_and_is_padded() -> None:
    text = make_text("0123abcd", 3, 41, 100, 1700000000.25)
    assert len(text) == 100
    data = json.dumps({"id": "1-0", "text": text}).encode()
    m = PAYLOAD_RE.search(data)
    assert m is not None
    assert m.groups() == (b"0123abcd", b"3", b"41", b"1700000000.250000")
    assert len(make_text("0123abcd", 0, "s", 0, 1.0)) > 0  # never shorter than the token


def test_id_order_key_orders_rtchat_and_nchan_ids() -> None:
    assert id_order_key(b"1700000000000-2") < id_order_key(b"1700000000000-10")
    assert id_order_key(b"1700000001:0") > id_order_key(b"1700000000:9")
    assert id_order_key(b"abc") == ()


def make_subscriber(room: int = 0, room_messages: int = 10) -> Subscriber:
    target = parse_target("http://127.0.0.1:1/rooms/r/events")
    return Subscriber(0, [room], target, [room_messages] * (room + 1), b"0123abcd", array("d"))


def event(seq: int | str, room: int = 0, run: str = "0123abcd",
          id: bytes | None = None) -> SseEvent:
    return SseEvent(b"message", json.dumps({"text": make_text(run, room, seq, 60, 100.0)}).encode(),
                    id)


def test_subscriber_counts_duplicates_order_and_strays() -> None:
    sub = make_subscriber()
    for seq in (0, 2, 1, 2):
        sub.on_event(event(seq), now=100.5)
    sub.on_event(event(3, room=1), now=100.5)        # another room's message
    sub.on_event(event(4, run="ffffffff"), now=100.5)  # another run's message
    sub.on_event(event("s"), now=100.5)              # the sync message
    sub.on_event(SseEvent(b"reset", b"{}", None), now=100.5)
    assert (sub.delivered, sub.duplicates, sub.out_of_order) == (3, 1, 1)
    assert (sub.misrouted, sub.foreign, sub.resets, sub.synced) == (1, 1, 1, True)
    assert bytes(sub.seen[0][:4]) == b"\x01\x01\x01\x00"
    assert list(sub.latencies) == [500.0, 500.0, 500.0]


def test_subscriber_judges_order_by_server_ids_when_present() -> None:
    sub = make_subscriber()
    # The server stored 1 before 0 (concurrent sends): ids say that order is right.
    sub.on_event(event(1, id=b"5-0"), now=100.0)
    sub.on_event(event(0, id=b"5-1"), now=100.0)
    sub.on_event(event(2, id=b"4-9"), now=100.0)
    assert (sub.delivered, sub.out_of_order) == (3, 1)


def test_many_room_subscriber_judges_each_room_by_its_own_sequence() -> None:
    # A stream of rooms 2 and 0 (of 3); its ids are opaque cursors, not an order.
    sub = Subscriber(0, [2, 0], parse_target("http://h:1/events?rooms=r2,r0"), [4, 5, 6],
                     b"0123abcd", array("d"), order_by_ids=False)
    for seq, room, cursor in ((0, 2, b"mZ.a"), (0, 0, b"mA.b"), (1, 2, b"m0.c"), (2, 0, b"m1.d"),
                              (1, 0, b"m9.e"), (1, 2, b"mz.f"), (5, 2, b"mz.g"), (5, 0, b"mz.h")):
        sub.on_event(event(seq, room=room, id=cursor), now=100.5)
    sub.on_event(event(0, room=1), now=100.5)  # room 1 is not on this stream
    # Room 0 got 0, 2, 1 (one out of order); room 2 got 0, 1, 1 again (a duplicate), 5;
    # room 0 has only 4 messages, so its seq 5 is misrouted like room 1's message.
    assert (sub.delivered, sub.duplicates, sub.out_of_order, sub.misrouted) == (6, 1, 1, 2)
    assert [bytes(seen) for seen in sub.seen] == [b"\x01\x01\x00\x00\x00\x01",
                                                  b"\x01\x01\x01\x00"]
    assert not sub.synced
    sub.on_event(event("s", room=2), now=100.5)
    sub.on_event(event("s", room=1), now=100.5)  # another stream's sync does not count
    assert not sub.synced
    sub.on_event(event("s", room=0), now=100.5)
    assert sub.synced


def test_rooms_per_stream_options() -> None:
    opts = parse_args(["--url", "http://h:1", "--rooms", "5", "--rooms-per-stream", "3"])
    assert (opts.rooms, opts.rooms_per_stream) == (5, 3)
    assert opts.sub_url == "{url}/events?rooms={rooms}"  # the default for several rooms
    mine = parse_args(["--url", "http://h:1", "--rooms", "2", "--rooms-per-stream", "2",
                       "--sub-url", "{url}/multi?r={rooms}"])
    assert mine.sub_url == "{url}/multi?r={rooms}"
    one = parse_args(["--url", "http://h:1", "--rooms", "5"])
    assert (one.rooms_per_stream, one.sub_url) == (1, "{url}/rooms/{room}/events")
    with pytest.raises(UsageError, match="--rooms-per-stream 6 is more than --rooms 5"):
        parse_args(["--url", "http://h:1", "--rooms", "5", "--rooms-per-stream", "6"])
    with pytest.raises(UsageError, match=r"needs a --sub-url with \{rooms\}"):
        parse_args(["--url", "http://h:1", "--rooms", "2", "--rooms-per-stream", "2",
                    "--sub-url", "{url}/rooms/{room}/events"])


def stream_requests(*args: str) -> list[bytes]:
    """The GET each client of a run would open its stream with, first connection and resume."""
    bench = Bench(parse_args(["--url", "http://127.0.0.1:8080", "--room-prefix", "p-",
                              "--header", "X-A: 1", *args]), lambda line: None)
    bench._make_subscribers()
    requests = [bench.stream_request(s) for s in bench.subs]
    bench.subs[0].last_event_id = b"5-1"
    return [*requests, bench.stream_request(bench.subs[0])]


def test_one_room_per_stream_sends_the_same_requests_as_before() -> None:
    # Byte for byte what the bench sent before streams could carry several rooms.
    head = b"Host: 127.0.0.1:8080\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n" \
           b"User-Agent: rtchat-bench\r\nX-A: 1\r\n"
    before = [b"GET /rooms/p-0/events HTTP/1.1\r\n" + head + b"\r\n",
              b"GET /rooms/p-1/events HTTP/1.1\r\n" + head + b"\r\n",
              b"GET /rooms/p-0/events HTTP/1.1\r\n" + head + b"\r\n",
              b"GET /rooms/p-0/events HTTP/1.1\r\n" + head + b"Last-Event-ID: 5-1\r\n\r\n"]
    assert stream_requests("--clients", "3", "--rooms", "2") == before
    assert stream_requests("--clients", "3", "--rooms", "2", "--rooms-per-stream", "1") == before


def test_client_i_streams_rooms_i_to_i_plus_r_minus_1_on_one_get() -> None:
    requests = stream_requests("--clients", "6", "--rooms", "5", "--rooms-per-stream", "3")
    paths = [r.split(b" ", 2)[1] for r in requests]
    assert paths == [b"/events?rooms=p-0,p-1,p-2", b"/events?rooms=p-1,p-2,p-3",
                     b"/events?rooms=p-2,p-3,p-4", b"/events?rooms=p-3,p-4,p-0",
                     b"/events?rooms=p-4,p-0,p-1", b"/events?rooms=p-0,p-1,p-2",
                     b"/events?rooms=p-0,p-1,p-2"]
    assert requests[-1].endswith(b"X-A: 1\r\nLast-Event-ID: 5-1\r\n\r\n")


class FakeTransport:
    def __init__(self) -> None:
        self.written = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("pieces", [1, 3])
def test_a_stream_with_a_content_length_ends_after_its_body(pieces: int) -> None:
    # nginx's "come back later" answer: a short body on a connection kept alive. The stream
    # ends there (the client reconnects), though the connection stays open.
    body = b"retry: 3000\n: no node can take this stream now\n"
    answer = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
              b"Content-Length: %d\r\nConnection: keep-alive\r\n\r\n%b" % (len(body), body))

    async def go() -> tuple[bool, int, int | None]:
        sub = make_subscriber()
        proto = StreamProtocol(sub, b"GET / HTTP/1.1\r\n\r\n", lambda p: None, lambda: None)
        transport = FakeTransport()
        proto.connection_made(transport)  # type: ignore[arg-type]
        step = -(-len(answer) // pieces)
        for at in range(0, len(answer), step):
            assert not transport.closed
            proto.data_received(answer[at:at + step])
        assert proto._sse.comments == 1
        return transport.closed, sub.other_events, sub.retry_ms  # kept for the reconnect

    assert asyncio.run(go()) == (True, 0, 3000)


def test_an_empty_stream_with_content_length_0_ends_at_once() -> None:
    async def go() -> bool:
        proto = StreamProtocol(make_subscriber(), b"", lambda p: None, lambda: None)
        transport = FakeTransport()
        proto.connection_made(transport)  # type: ignore[arg-type]
        proto.data_received(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                            b"Content-Length: 0\r\n\r\n")
        return transport.closed

    assert asyncio.run(go())


def test_options_are_made_from_the_command_line_by_name() -> None:
    assert parse_args(["--url", "http://h:1"]) == Options(urls=("http://h:1",))  # defaults agree
    opts = parse_args(["--url", "http://a:1", "--url", "http://b:2", "--clients", "7",
                       "--messages", "9", "--rate", "0", "--rooms", "3", "--pub-format", "raw",
                       "--body-bytes", "5", "--connect-timeout", "2", "--connect-concurrency",
                       "4", "--settle-seconds", "1", "--sync-timeout", "0", "--publishers", "2",
                       "--request-timeout", "3", "--hold-seconds", "0.5", "--max-send-seconds",
                       "6", "--reconnect", "--reconnect-delay", "0.2", "--room-prefix", "p-",
                       "-q", "--sub-url", "{url}/s/{room}", "--pub-url", "{url}/p/{room}"])
    assert opts == Options(
        urls=("http://a:1", "http://b:2"), clients=7, messages=9, rate=0.0, rooms=3,
        sub_url="{url}/s/{room}", pub_url="{url}/p/{room}", pub_format="raw", body_bytes=5,
        connect_timeout=2.0, connect_concurrency=4, settle_seconds=1.0, sync_timeout=0.0,
        publishers=2, request_timeout=3.0, hold_seconds=0.5, max_send_seconds=6.0,
        reconnect=True, reconnect_delay=0.2, room_prefix="p-", quiet=True)
    # Without --url the templates must not use {url}; the one base URL is then "".
    direct = parse_args(["--sub-url", "http://h:1/s/{room}", "--pub-url", "http://h:1/p/{room}"])
    assert direct.urls == ("",)
    with pytest.raises(UsageError, match="--url is required"):
        parse_args([])
    with pytest.raises(UsageError, match="--room-prefix"):
        parse_args(["--url", "http://h:1", "--room-prefix", ""])  # given empty: not the default
    with pytest.raises(UsageError, match="--connect-timeout must be greater than 0"):
        parse_args(["--url", "http://h:1", "--connect-timeout", "0"])


def test_parse_target_fills_host_header_and_path() -> None:
    t = parse_target("http://127.0.0.1:8080/rooms/a/events?x=1")
    assert (t.host, t.port, t.path, t.host_header) == ("127.0.0.1", 8080, "/rooms/a/events?x=1",
                                                       "127.0.0.1:8080")
    t = parse_target("http://[::1]/sub")
    assert (t.host, t.port, t.host_header) == ("::1", 80, "[::1]")
    with pytest.raises(UsageError):
        parse_target("ftp://example/")


def test_build_post_formats() -> None:
    target = parse_target("http://h:1/rooms/r/messages")
    raw = build_post(target, "raw", "hi there")
    assert raw.endswith(b"\r\n\r\nhi there") and b"Content-Length: 8\r\n" in raw
    form = build_post(target, "form", "a b")
    assert form.endswith(b"nick=bench&text=a+b")
    js = build_post(target, "json", "x")
    assert json.loads(js.split(b"\r\n\r\n", 1)[1]) == {"nick": "bench", "text": "x"}
    assert js.startswith(b"POST /rooms/r/messages HTTP/1.1\r\nHost: h:1\r\n")


# --------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------


def run_bench(*args: str, module: tuple[str, ...] = ("rtchat.bench",),
              timeout: float = BENCH_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-W", "error", "-m", *module, *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def report_of(proc: subprocess.CompletedProcess[str]) -> dict:
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout  # exactly one JSON object, nothing else
    return json.loads(lines[0])


@pytest.mark.parametrize("args", [
    ["--url", "http://127.0.0.1:1", "--clients", "-1"],
    ["--url", "http://127.0.0.1:1", "--clients", "lots"],
    ["--url", "http://127.0.0.1:1", "--rooms", "0"],
    ["--url", "http://127.0.0.1:1", "--rate", "-5"],
    ["--url", "http://127.0.0.1:1", "--pub-format", "xml"],
    ["--url", "ftp://127.0.0.1:1"],
    ["--url", "http://127.0.0.1:1", "--sub-url", "not a url"],
    ["--clients", "5"],  # no --url, and the default templates need one
    ["--url", "http://127.0.0.1:1", "--clients", "10000000"],  # more than RLIMIT_NOFILE allows
    ["--url", "http://127.0.0.1:1", "--unknown-flag"],
    ["--url", "http://127.0.0.1:1", "--rooms", "2", "--rooms-per-stream", "3"],  # R > K
    ["--url", "http://127.0.0.1:1", "--rooms-per-stream", "0"],
    ["--url", "http://127.0.0.1:1", "--rooms", "3", "--rooms-per-stream", "2",
     "--sub-url", "{url}/rooms/{room}/events"],  # several rooms, but a one-room template
])
def test_bad_arguments_exit_2_without_traceback(args: list[str]) -> None:
    proc = run_bench(*args)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "rtchat bench: error:" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_exits_0_and_names_the_templates() -> None:
    proc = run_bench("--help")
    assert proc.returncode == 0
    assert "--sub-url" in proc.stdout and "{url}/rooms/{room}/events" in proc.stdout


def test_rtchat_bench_subcommand_dispatches_to_the_bench() -> None:
    proc = run_bench("bench", "--url", "http://127.0.0.1:1", "--rooms", "0", module=("rtchat",))
    assert proc.returncode == 2
    assert "rtchat bench: error: --rooms must be at least 1" in proc.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_refused_streams_are_connect_errors_not_a_crash() -> None:
    port = free_port()
    report = report_of(run_bench("--url", f"http://127.0.0.1:{port}", "--clients", "3",
                                 "--messages", "2", "--rate", "0", "-q"))
    assert report["connect_errors"] == 3
    assert report["connected"] == 0
    assert report["expected"] == 0
    assert report["sent"] == 2 and report["acked"] == 0


# --------------------------------------------------------------------------
# Against a real node
# --------------------------------------------------------------------------


def wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + NODE_START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"rtchat exited with {proc.returncode}: {log.read_text()}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"rtchat did not answer /healthz in {NODE_START_TIMEOUT}s: "
                         f"{log.read_text()}")


@contextlib.contextmanager
def running_node(tmp: Path, env: dict[str, str]) -> Iterator[str]:
    port = free_port()
    log = tmp / f"rtchat-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rtchat", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT), "RTCHAT_SHUTDOWN__DRAIN_SECONDS": "0",
                 **env},
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Factory: ``start_node(**env)`` runs an rtchat node and returns its base URL."""
    with contextlib.ExitStack() as stack:
        def start(**env: str) -> str:
            return stack.enter_context(running_node(tmp_path, env))
        yield start


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One node without a send rate limit, shared by the clean runs."""
    with running_node(tmp_path_factory.mktemp("node"), UNLIMITED) as url:
        yield url


def test_clean_run_delivers_every_message_to_every_client(node: str) -> None:
    proc = run_bench("--url", node, "--clients", "5", "--messages", "50", "--rate", "500",
                     "--hold-seconds", "0.01")
    report = report_of(proc)
    assert "bench: holding 5 streams" in proc.stderr  # the line compare.py waits for
    assert (report["sent"], report["acked"]) == (50, 50)
    assert report["expected"] == 250
    assert report["delivered"] == 250
    assert (report["lost"], report["duplicates"], report["out_of_order"]) == (0, 0, 0)
    assert report["connect_errors"] == 0 and report["connected"] == 5
    assert report["synced"] is True
    assert report["status_counts"] == {"201": 50}
    lat = report["latency_ms"]
    assert 0 <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert report["deliveries_per_second"] > 0
    assert report["cpu_seconds"] >= 0 and report["cpu_percent"] >= 0
    assert report["connect_seconds"] >= 0


def test_rooms_and_several_urls_split_expected_per_room(node: str) -> None:
    # 7 clients over 2 rooms: room 0 has 4, room 1 has 3; 41 messages: 21 to room 0, 20 to room 1.
    report = report_of(run_bench("--url", node, "--url", node + "/", "--clients", "7",
                                 "--rooms", "2", "--messages", "41", "--rate", "0",
                                 "--pub-format", "form", "--body-bytes", "300", "-q"))
    assert report["sent"] == report["acked"] == 41
    assert report["expected"] == 21 * 4 + 20 * 3
    assert report["delivered"] == report["expected"]
    assert (report["lost"], report["duplicates"], report["misrouted"]) == (0, 0, 0)


def test_streams_on_a_silent_room_are_counted_as_lost(node: str) -> None:
    # Subscribers listen to "<room>-quiet", messages go to "<room>": every delivery is missing.
    report = report_of(run_bench("--url", node, "--sub-url", "{url}/rooms/{room}-quiet/events",
                                 "--clients", "4", "--messages", "20", "--rate", "0",
                                 "--sync-timeout", "0", "--settle-seconds", "0.5", "-q"))
    assert report["acked"] == 20
    assert report["expected"] == 80
    assert report["delivered"] == 0
    assert report["lost"] == 80


def test_send_time_limit_leaves_the_rest_unsent(node: str) -> None:
    # 1,000 messages at 10/s would take 100 s; the limit stops new sends after 0.3 s.
    report = report_of(run_bench("--url", node, "--clients", "2", "--messages", "1000",
                                 "--rate", "10", "--max-send-seconds", "0.3", "-q"))
    assert 1 <= report["sent"] < 1000
    assert report["unsent"] == 1000 - report["sent"]
    assert report["acked"] == report["sent"]
    assert report["expected"] == report["delivered"] == 2 * report["acked"]
    assert report["lost"] == 0


def test_missing_room_path_is_a_connect_error(node: str) -> None:
    report = report_of(run_bench("--url", node, "--sub-url", "{url}/no/such/{room}",
                                 "--clients", "2", "--messages", "0", "-q"))
    assert report["connect_errors"] == 2
    assert report["connect_error_kinds"] == {"http_404": 2}


def test_refused_sends_do_not_count_as_expected(start_node: Callable[..., str]) -> None:
    # A tight per-client rate limit (burst 10, 1/s) refuses most of a fast burst of 60 sends.
    url = start_node(RTCHAT_LIMITS__RATE__MESSAGES_PER_SECOND="1", RTCHAT_LIMITS__RATE__BURST="10")
    report = report_of(run_bench("--url", url, "--clients", "3", "--messages", "60",
                                 "--rate", "0", "--publishers", "2", "-q"))
    assert report["sent"] == 60
    assert 0 < report["acked"] < 60
    assert report["status_counts"].get("429", 0) == 60 - report["acked"]
    assert report["send_errors"] == 60 - report["acked"]
    assert report["expected"] == report["acked"] * 3
    assert report["delivered"] == report["expected"]
    assert report["lost"] == 0


def admin_json(url: str, path: str, method: str = "GET") -> dict:
    req = urllib.request.Request(url + path, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.loads(resp.read())


def read_stderr_until(proc: subprocess.Popen[bytes], marker: bytes, timeout: float) -> bytes:
    assert proc.stderr is not None
    seen = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stderr, selectors.EVENT_READ)
        while marker not in seen:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sel.select(remaining):
                raise AssertionError(f"no {marker!r} from the bench in {timeout}s: {seen!r}")
            chunk = os.read(proc.stderr.fileno(), 65536)
            if not chunk:
                raise AssertionError(f"bench ended before {marker!r}: {seen!r}")
            seen += chunk
    return seen


def kick_while_sending(node: str, args: list[str], pick: Callable[[list[dict]], list[str]],
                       wait_for_sent: bool = False) -> dict:
    """Run the bench (``--reconnect``) on ``node``; once it sends (and, with
    ``wait_for_sent``, once some messages went through), the admin API disconnects the
    streams ``pick`` chooses from the listed clients. The bench's report."""
    proc = subprocess.Popen(
        [sys.executable, "-W", "error", "-m", "rtchat.bench", "--url", node, *args,
         "--reconnect", "--reconnect-delay", "0.05"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        head = read_stderr_until(proc, b"bench: sending", BENCH_TIMEOUT)
        kicked = pick(admin_json(node, "/admin/api/status")["clients"]["listed"])
        if wait_for_sent:
            head += read_stderr_until(proc, b"bench: sent ", BENCH_TIMEOUT)
        for client_id in kicked:
            assert admin_json(node, f"/admin/api/clients/{client_id}/disconnect",
                              method="POST") == {"disconnected": client_id}
        out, err = proc.communicate(timeout=BENCH_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return report_of(subprocess.CompletedProcess(proc.args, proc.returncode, out.decode(),
                                                 (head + err).decode()))


def test_reconnect_resumes_kicked_streams_without_loss(node: str) -> None:
    # 3 streams; while messages are being sent, the admin API kicks every one of
    # them; with --reconnect they come back with Last-Event-ID and miss nothing.
    def pick(listed: list[dict]) -> list[str]:
        kicked = [c["id"] for c in listed if c["room"] == "kick-0"]
        assert len(kicked) == 3
        return kicked

    report = kick_while_sending(node, ["--clients", "3", "--messages", "150", "--rate", "50",
                                       "--room-prefix", "kick-"], pick)
    assert report["disconnects"] == 3
    assert report["reconnects"] == 3
    assert report["acked"] == 150
    assert report["expected"] == report["delivered"] == 450
    assert (report["lost"], report["duplicates"], report["out_of_order"]) == (0, 0, 0)


class TimedBench(Bench):
    """A bench that notes, per client, when its stream was lost (and the ``retry:`` it held
    then) and when it began to reopen it."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.lost: dict[int, tuple[float, int | None]] = {}
        self.reopening: dict[int, float] = {}

    def _on_lost(self, proto: StreamProtocol) -> None:
        sub = proto.sub
        if not (proto.closing or self.stopping) and sub.protocol is proto:
            self.lost.setdefault(sub.index, (time.monotonic(), sub.retry_ms))
        super()._on_lost(proto)

    async def _open(self, sub: Subscriber, timeout: float) -> str | None:
        if sub.index in self.lost:
            self.reopening.setdefault(sub.index, time.monotonic())
        return await super()._open(sub, timeout)


def test_reconnect_waits_the_retry_the_server_sent(start_node: Callable[..., str]) -> None:
    # The node sends "retry: <500..1500>" (1000 ms, jittered +-50%) in every stream's head;
    # a kicked stream waits that long, as EventSource does, not the 0.01 s --reconnect-delay.
    url = start_node(**UNLIMITED, RTCHAT_SSE__RETRY_MS="1000")
    opts = parse_args(["--url", url, "--clients", "3", "--messages", "150", "--rate", "50",
                       "--reconnect", "--reconnect-delay", "0.01", "--room-prefix", "retry-"])

    async def go() -> tuple[TimedBench, dict]:
        loop = asyncio.get_running_loop()
        bench = TimedBench(opts, lambda line: None)
        run = loop.create_task(bench.run())
        await async_wait_for(lambda: bench.first_send_wall or run.done(), BENCH_TIMEOUT,
                             "the bench to start sending", interval=0.01)
        assert bench.first_send_wall, run.exception() if run.done() else "not sending"
        status = await loop.run_in_executor(None, admin_json, url, "/admin/api/status")
        kicked = [c["id"] for c in status["clients"]["listed"] if c["room"] == "retry-0"]
        assert len(kicked) == 3
        for client_id in kicked:
            await loop.run_in_executor(
                None, lambda c=client_id: admin_json(url, f"/admin/api/clients/{c}/disconnect",
                                                     method="POST"))
        return bench, await asyncio.wait_for(run, BENCH_TIMEOUT)

    bench, report = asyncio.run(go())
    assert (report["disconnects"], report["reconnects"]) == (3, 3)
    assert (report["lost"], report["duplicates"], report["out_of_order"]) == (0, 0, 0)
    assert sorted(bench.lost) == sorted(bench.reopening) == [0, 1, 2]
    for index, (lost_at, retry_ms) in bench.lost.items():
        assert retry_ms is not None and 500 <= retry_ms <= 1500, retry_ms
        waited = bench.reopening[index] - lost_at
        assert retry_ms / 1000 - 0.02 <= waited <= retry_ms / 1000 + 0.5, (retry_ms, waited)


def expected_deliveries(clients: int, rooms: int, per_stream: int, messages: int) -> int:
    """The exact ``expected`` of a clean run: per message, the streams carrying its room."""
    carried = [0] * rooms
    for i in range(clients):
        for k in range(per_stream):
            carried[(i + k) % rooms] += 1
    return sum(carried[j % rooms] for j in range(messages))


def test_many_rooms_per_stream_deliver_every_message_once_in_order(node: str) -> None:
    # 7 streams of 3 rooms each over 5 rooms; 53 messages sent as fast as 8 publishers go.
    report = report_of(run_bench("--url", node, "--clients", "7", "--rooms", "5",
                                 "--rooms-per-stream", "3", "--messages", "53", "--rate", "0",
                                 "--body-bytes", "120", "-q"))
    # Rooms 0..4 are carried by 4, 5, 5, 4, 3 streams and get 11, 11, 11, 10, 10 messages.
    assert expected_deliveries(7, 5, 3, 53) == 11 * 4 + 11 * 5 + 11 * 5 + 10 * 4 + 10 * 3 == 224
    assert (report["sent"], report["acked"], report["connected"]) == (53, 53, 7)
    assert report["rooms_per_stream"] == 3
    assert report["synced"] is True
    assert report["expected"] == 224
    assert report["delivered"] == 224
    assert (report["lost"], report["duplicates"], report["out_of_order"]) == (0, 0, 0)
    assert (report["misrouted"], report["foreign"], report["connect_errors"]) == (0, 0, 0)


def test_one_room_per_stream_keeps_the_report_shape(node: str) -> None:
    report = report_of(run_bench("--url", node, "--clients", "2", "--messages", "4", "--rate",
                                 "0", "--rooms-per-stream", "1", "-q"))
    assert "rooms_per_stream" not in report
    assert report["expected"] == report["delivered"] == 8


def test_many_room_streams_resume_with_their_cursor_without_loss(node: str) -> None:
    # 4 streams of 2 rooms (of 3) are kicked while messages flow; each comes back with the
    # last cursor it saw as Last-Event-ID and misses nothing in either room.
    def pick(listed: list[dict]) -> list[str]:
        kicked = [c["id"] for c in listed if c["rooms"][0].startswith("mkick-")]
        assert len(kicked) == 4 and all(len(c["rooms"]) == 2 for c in listed
                                        if c["id"] in kicked)
        return kicked

    # Some messages go through first, so each stream resumes from a real cursor.
    report = kick_while_sending(node, ["--clients", "4", "--rooms", "3", "--rooms-per-stream",
                                       "2", "--messages", "300", "--rate", "75",
                                       "--room-prefix", "mkick-"], pick, wait_for_sent=True)
    assert report["disconnects"] == 4
    assert report["reconnects"] == 4
    assert report["acked"] == 300
    assert report["expected"] == expected_deliveries(4, 3, 2, 300)
    assert report["delivered"] == report["expected"]
    assert (report["lost"], report["duplicates"], report["out_of_order"]) == (0, 0, 0)
    assert report["resets"] == 0
