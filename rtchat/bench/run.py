"""One benchmark run: open the streams, sync, publish on schedule, settle, report.

Owns the run's sequence and its counters (what was sent, acknowledged,
how long each phase took, the bench's own CPU). The clients, the wire and
the report's maths live beside it.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import ssl
import time
from array import array
from collections import Counter
from collections.abc import Callable
from typing import Any

from rtchat.bench.clients import PublishConnection, StreamProtocol, Subscriber, make_text
from rtchat.bench.options import Options
from rtchat.bench.report import Timings, build_report
from rtchat.bench.wire import Target, build_get, build_post, fill, header_lines, parse_target


class Bench:
    """One benchmark run; ``await run()`` returns the report dict.

    ``subscriber_class`` and ``stream_protocol`` are what each client is made of; a scenario
    that needs more of a client (which node served it, when each delivery came) subclasses
    them.
    """

    subscriber_class: type[Subscriber] = Subscriber
    stream_protocol: type[StreamProtocol] = StreamProtocol

    def __init__(self, opts: Options, log: Callable[[str], None]) -> None:
        self.opts = opts
        self.headers = header_lines(opts.headers)  # the same extra lines on every request
        self.log = log
        self.run_id = secrets.token_hex(4)
        prefix = opts.room_prefix or f"bench-{self.run_id}-"
        self.rooms = [f"{prefix}{k}" for k in range(opts.rooms)]
        # Messages j = 0..M-1 go to room j % K as that room's sequence number j // K.
        self.room_messages = [len(range(k, opts.messages, opts.rooms)) for k in range(opts.rooms)]
        self.acked = [bytearray(n) for n in self.room_messages]
        self.latencies = array("d")
        self.publish_ms = array("d")
        self.statuses: Counter[str] = Counter()
        self.sent = 0
        self.subs: list[Subscriber] = []
        self.open_streams: set[StreamProtocol] = set()
        self.connect_errors: Counter[str] = Counter()
        self.stopping = False
        self.reconnect_tasks: set[asyncio.Task[None]] = set()
        self.last_send_done = 0.0
        self.first_send_wall = 0.0
        self.activity = asyncio.Event()  # set whenever a stream receives events or closes
        self._goal: list[int] = []
        self._settle_cursor = 0
        self._ssl_context: ssl.SSLContext | None = None
        self.send_cpu_percent = 0.0  # the bench's CPU while sending and settling

    # -- streams ----------------------------------------------------------

    def _make_subscribers(self) -> None:
        opts = self.opts
        n_urls, n_rooms = len(opts.urls), opts.rooms
        run = self.run_id.encode()
        # A {rooms} stream's ids are resume cursors, not an order: judge order by sequence.
        order_by_ids = "{rooms}" not in opts.sub_url
        for i in range(opts.clients):
            rooms = [(i + k) % n_rooms for k in range(opts.rooms_per_stream)]
            url = opts.urls[(i // n_rooms) % n_urls]
            target = parse_target(fill(opts.sub_url, url, self.rooms[rooms[0]],
                                       ",".join(self.rooms[r] for r in rooms)))
            self.subs.append(self.subscriber_class(i, rooms, target, self.room_messages, run,
                                        self.latencies, order_by_ids))

    def stream_request(self, sub: Subscriber) -> bytes:
        """The GET that opens (or, with its last event id, resumes) ``sub``'s stream."""
        return build_get(sub.target, sub.last_event_id, self.headers)

    async def _open(self, sub: Subscriber, timeout: float) -> str | None:
        """Open one stream for ``sub``; returns None or the error kind."""
        loop = asyncio.get_running_loop()
        host, port, use_ssl = sub.target.address
        proto = self.stream_protocol(sub, self.stream_request(sub), self._on_lost, self.activity.set)
        deadline = loop.time() + timeout
        try:
            await asyncio.wait_for(loop.create_connection(
                lambda: proto, host, port, ssl=self._ssl() if use_ssl else None), timeout)
            self.open_streams.add(proto)
            await asyncio.wait_for(proto.headers_done, max(0.001, deadline - loop.time()))
        except (TimeoutError, asyncio.TimeoutError):
            self._drop(proto)
            return "timeout"
        except ConnectionError as e:
            self._drop(proto)
            return str(e) if str(e).startswith(("http_", "not_")) else type(e).__name__
        except OSError as e:
            self._drop(proto)
            return type(e).__name__
        sub.protocol = proto
        sub.connected = True
        if proto.closed.done():  # it ended between its headers and now: count that drop
            self._on_lost(proto)
        return None

    def _ssl(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context

    def _drop(self, proto: StreamProtocol) -> None:
        """Abandon a stream that failed to open; its future must not log an unretrieved error."""
        proto.closing = True
        if proto.transport is not None:
            proto.transport.close()
        if not proto.headers_done.done():
            proto.headers_done.cancel()

    def _on_lost(self, proto: StreamProtocol) -> None:
        self.open_streams.discard(proto)
        self.activity.set()
        sub = proto.sub
        if proto.closing or self.stopping or sub.protocol is not proto:
            return
        sub.protocol = None
        sub.disconnects += 1
        if self.opts.reconnect:
            task = asyncio.get_running_loop().create_task(self._reconnect(sub))
            self.reconnect_tasks.add(task)
            task.add_done_callback(self.reconnect_tasks.discard)

    def reconnect_delay(self, sub: Subscriber) -> float:
        """Seconds to wait before reopening ``sub``'s stream: as EventSource does, the last
        ``retry:`` its streams were given, else ``--reconnect-delay``."""
        if sub.retry_ms is not None:
            return sub.retry_ms / 1000.0
        return self.opts.reconnect_delay

    async def _reconnect(self, sub: Subscriber) -> None:
        while not self.stopping:
            await asyncio.sleep(self.reconnect_delay(sub))
            if self.stopping:
                return
            if await self._open(sub, self.opts.connect_timeout) is None:
                sub.reconnects += 1
                return

    async def _connect_all(self) -> float:
        self._make_subscribers()
        gate = asyncio.Semaphore(self.opts.connect_concurrency)
        done = 0
        last_log = time.monotonic()

        async def one(sub: Subscriber) -> None:
            nonlocal done, last_log
            async with gate:
                error = await self._open(sub, self.opts.connect_timeout)
            if error is not None:
                sub.error = error
                self.connect_errors[error] += 1
            done += 1
            if time.monotonic() - last_log > 2:
                last_log = time.monotonic()
                self.log(f"{done}/{len(self.subs)} streams opened")

        t0 = time.monotonic()
        if self.subs:
            self.log(f"opening {len(self.subs)} streams over {len(self.opts.urls)} URL(s), "
                     f"{self.opts.rooms} room(s)")
            await asyncio.gather(*(one(s) for s in self.subs))
        elapsed = time.monotonic() - t0
        connected = sum(s.connected for s in self.subs)
        errors = ", ".join(f"{k}: {v}" for k, v in self.connect_errors.most_common(5))
        self.log(f"{connected}/{len(self.subs)} streams open in {elapsed:.2f}s"
                 + (f" (errors: {errors})" if errors else ""))
        return elapsed

    # -- publishing ---------------------------------------------------------

    def _pub_targets(self) -> list[list[Target]]:
        return [[parse_target(fill(self.opts.pub_url, url, room)) for room in self.rooms]
                for url in self.opts.urls]

    async def _sync(self, pool: list[PublishConnection], targets: list[list[Target]]) -> bool:
        """Publish a sync message per room until every open stream has one of each of its
        rooms (or time is up)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.opts.sync_timeout
        attempt = 0
        while True:
            waiting = {room for s in self.subs if s.protocol is not None for room in s.unsynced}
            if not waiting:
                return True
            if loop.time() >= deadline:
                return False
            attempt += 1
            rooms = sorted(waiting)
            for i in range(0, len(rooms), len(pool)):
                batch = rooms[i:i + len(pool)]
                await asyncio.gather(*(self._send_sync(pool[j], targets[j % len(targets)][room],
                                                       room) for j, room in enumerate(batch)))
            wake = min(deadline, loop.time() + min(1.0, 0.1 * attempt))
            while loop.time() < wake:
                if all(s.unsynced.isdisjoint(waiting) for s in self.subs
                       if s.protocol is not None):
                    break
                await asyncio.sleep(0.02)

    async def _send_sync(self, conn: PublishConnection, target: Target, room: int) -> None:
        text = make_text(self.run_id, room, "s", self.opts.body_bytes, time.time())
        try:
            await conn.post(build_post(target, self.opts.pub_format, text, self.headers))
        except Exception:  # a failed sync send is simply sent again on the next round
            pass

    async def _publish_all(self, pool: list[PublishConnection],
                           targets: list[list[Target]]) -> tuple[float, float]:
        """Send every message on schedule; returns (first send start, last ack) loop times."""
        loop = asyncio.get_running_loop()
        opts = self.opts
        t0 = loop.time()
        cutoff = t0 + opts.max_send_seconds if opts.max_send_seconds > 0 else None
        self.first_send_wall = time.time()
        next_index = 0

        # On many-room streams order is judged by our sequence numbers, so a room's sends must
        # not overlap (two POSTs in flight to one room may be stored either way round): a
        # room's message n is sent once its message n - 1 has had its answer.
        in_turn = opts.rooms_per_stream > 1
        turn = [0] * opts.rooms  # per room: the sequence number that may be sent now
        waiting: dict[tuple[int, int], asyncio.Future[None]] = {}

        async def wait_turn(room: int, seq: int) -> None:
            if turn[room] < seq:  # message seq - 1 was taken before us: it will call done_turn
                ready = waiting[room, seq] = loop.create_future()
                await ready

        def done_turn(room: int, seq: int) -> None:
            turn[room] = max(turn[room], seq + 1)
            ready = waiting.pop((room, seq + 1), None)
            if ready is not None and not ready.done():
                ready.set_result(None)

        async def worker(w: int) -> None:
            nonlocal next_index
            conn = pool[w]
            row = targets[w % len(targets)]
            while next_index < opts.messages:
                if cutoff is not None and loop.time() >= cutoff:
                    return
                j = next_index
                next_index += 1
                room, seq = j % opts.rooms, j // opts.rooms
                try:
                    if not await send(conn, row, j, room, seq):
                        return
                finally:
                    if in_turn:
                        done_turn(room, seq)

        async def send(conn: PublishConnection, row: list[Target], j: int, room: int,
                       seq: int) -> bool:
            """Send message ``j`` on schedule; False once the send time is up."""
            if opts.rate > 0:
                delay = t0 + j / opts.rate - loop.time()
                if cutoff is not None:
                    delay = min(delay, cutoff - loop.time())
                if delay > 0:
                    await asyncio.sleep(delay)
                if cutoff is not None and loop.time() >= cutoff:
                    return False
            if in_turn:
                await wait_turn(room, seq)
                if cutoff is not None and loop.time() >= cutoff:
                    return False
            started = time.time()
            request = build_post(row[room], opts.pub_format,
                                 make_text(self.run_id, room, seq, opts.body_bytes, started),
                                 self.headers)
            self.sent += 1
            try:
                status = await conn.post(request)
            except (TimeoutError, asyncio.TimeoutError):
                self.statuses["timeout"] += 1
                return True
            except Exception as e:  # any failed send is counted by kind, never fatal
                self.statuses[type(e).__name__] += 1
                return True
            self.publish_ms.append((time.time() - started) * 1000.0)
            self.statuses[str(status)] += 1
            if 200 <= status < 300:
                self.acked[room][seq] = 1
            self.last_send_done = loop.time()
            return True

        workers = min(opts.publishers, max(1, opts.messages))
        if opts.messages:
            rate = f"{opts.rate:g}/s" if opts.rate else "full speed"
            self.log(f"sending {opts.messages} messages at {rate} over {workers} connection(s)")
        await asyncio.gather(*(worker(w) for w in range(workers)))
        return t0, loop.time()

    async def _settle(self) -> None:
        """Wait until every stream has every acknowledged message of its rooms, or the deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.opts.settle_seconds
        self._goal = [a.count(1) for a in self.acked]
        self._settle_cursor = 0
        while not self._settled():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self.activity.clear()
            try:
                await asyncio.wait_for(self.activity.wait(), remaining)
            except (TimeoutError, asyncio.TimeoutError):
                return

    def _settled(self) -> bool:
        """Amortised O(1): a stream once complete stays complete (deliveries only grow)."""
        subs, goal, reconnect = self.subs, self._goal, self.opts.reconnect
        while self._settle_cursor < len(subs):
            s = subs[self._settle_cursor]
            if (s.connected and s.delivered < sum(goal[room] for room in s.rooms)
                    and (s.protocol is not None or reconnect)):
                return False
            self._settle_cursor += 1
        return True

    async def _progress(self, total: int) -> None:
        while True:
            await asyncio.sleep(2)
            delivered = sum(s.delivered for s in self.subs)
            open_now = sum(s.protocol is not None for s in self.subs)
            self.log(f"sent {self.sent}/{total}, delivered {delivered}, {open_now} streams open")

    # -- the whole run ------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        opts = self.opts
        wall0, cpu0 = time.monotonic(), os.times()
        loop = asyncio.get_running_loop()
        pool = [PublishConnection(parse_target(fill(opts.pub_url, opts.urls[w % len(opts.urls)],
                                                    self.rooms[0])).address, opts.request_timeout)
                for w in range(opts.publishers)]
        targets = self._pub_targets()
        progress: asyncio.Task[None] | None = None
        synced: bool | None = None
        sync_seconds = send_seconds = 0.0
        try:
            connect_seconds = await self._connect_all()
            if opts.sync_timeout > 0 and any(s.connected for s in self.subs):
                t = time.monotonic()
                synced = await self._sync(pool, targets)
                sync_seconds = time.monotonic() - t
                self.log(f"sync {'done' if synced else 'TIMED OUT'} in {sync_seconds:.2f}s")
            if opts.hold_seconds > 0:
                open_now = sum(s.protocol is not None for s in self.subs)
                self.log(f"holding {open_now} streams for {opts.hold_seconds:g}s")
                await asyncio.sleep(opts.hold_seconds)
            progress = loop.create_task(self._progress(opts.messages))
            send_wall0, send_cpu0 = time.monotonic(), os.times()
            first_send, last_ack = await self._publish_all(pool, targets)
            send_seconds = last_ack - first_send
            if opts.messages:
                self.log(f"sent {self.sent} in {send_seconds:.2f}s; settling")
            await self._settle()
            if opts.messages:
                self.log("done: settled")
            send_cpu1 = os.times()
            send_cpu = ((send_cpu1.user - send_cpu0.user) + (send_cpu1.system - send_cpu0.system))
            send_wall = time.monotonic() - send_wall0
            self.send_cpu_percent = round(100.0 * send_cpu / send_wall, 1) if send_wall else 0.0
        finally:
            if progress is not None:
                progress.cancel()
                try:
                    await progress
                except asyncio.CancelledError:
                    pass
            await self._shutdown(pool)
        cpu1 = os.times()
        wall = time.monotonic() - wall0
        cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
        return build_report(self, Timings(connect_seconds, sync_seconds, send_seconds, wall, cpu),
                            synced)

    async def _shutdown(self, pool: list[PublishConnection]) -> None:
        self.stopping = True
        for task in list(self.reconnect_tasks):
            task.cancel()
        if self.reconnect_tasks:
            await asyncio.gather(*self.reconnect_tasks, return_exceptions=True)
        streams = list(self.open_streams)
        for proto in streams:
            proto.closing = True
            if proto.transport is not None:
                proto.transport.close()
        if streams:
            await asyncio.wait([p.closed for p in streams], timeout=10)
        await asyncio.gather(*(c.close() for c in pool), return_exceptions=True)
