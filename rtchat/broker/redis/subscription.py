"""One pub/sub connection on one endpoint, the task that reads it, and the delivery probe.

Owns: the connection (RESP2: the RESP3 + hiredis pub/sub path of redis-py 8
has leaked memory; the soak test watches RSS), the order in which pending
``SUBSCRIBE``/``UNSUBSCRIBE`` replies are expected per channel (each
carries the caller's token back), the count of the first subscriptions
still unconfirmed, and the probe: the send times not yet seen back and the
measured master -> subscriber time, which it writes into its endpoint's
health record.

With ``sharded`` (Redis Cluster) it speaks ``SSUBSCRIBE``/``SUNSUBSCRIBE``
and probes with ``SPUBLISH``; a ``sunsubscribe`` nobody asked for (the
server dropped the channel because its slot moved to another shard) is
passed to the listener's ``on_dropped``.

It never reconnects by itself: a lost connection marks it dead and the
``Listener`` is told, so the broker opens a new one with catch-up. It knows
channels and opaque tokens, never rooms, history or the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from rtchat.broker.base import BrokerUnavailable
from rtchat.broker.redis.endpoint import SOCKET_TIMEOUT, EndpointHealth, error_text

log = logging.getLogger("rtchat.broker.redis")


_PROBE = object()  # the expectation token of the probe channel's confirmation


class Listener(Protocol):
    """What a subscription calls back, from its reader task, in the order Redis replied."""

    async def on_message(self, sub: Subscription, channel: str, data: str) -> None:
        """A message on a subscribed channel (never the probe's). May await history reads."""

    async def on_confirmed(self, sub: Subscription, token: object) -> int:
        """``SUBSCRIBE`` confirmed for the channel given with ``token``. Returns how many
        messages it replayed (summed in ``replayed``)."""

    def on_dead(self, sub: Subscription) -> None:
        """The subscription died (first time only). Must not block."""


class ShardListener(Listener, Protocol):
    """A sharded subscription's listener also hears of channels the server dropped."""

    def on_dropped(self, sub: Subscription, channel: str) -> None:
        """The server unsubscribed ``channel`` (its slot left this shard). Must not block."""


class Subscription:
    """One pub/sub connection on one endpoint, and the task that reads it."""

    def __init__(self, endpoint: EndpointHealth, probe_channel: str, client_name: str,
                 listener: Listener, sharded: bool = False) -> None:
        self.endpoint = endpoint
        self.sharded = sharded
        self._kind = "s" if sharded else ""  # message types: "smessage", "ssubscribe", ...
        self._probe_channel = probe_channel
        self._listener = listener
        # A Retry that handles no error at all: even with 0 retries, redis-py's PubSub
        # would reconnect and resubscribe in its failure handler before re-raising.
        # No socket timeout: the reader waits for the next message without a timer (a
        # timer per message was a fifth of the reading); a silent endpoint is found by
        # the probe, and the commands sent here are bounded by ``_write``.
        self._client = aioredis.Redis.from_url(
            endpoint.url, decode_responses=True, protocol=2, socket_timeout=None,
            socket_connect_timeout=SOCKET_TIMEOUT, health_check_interval=0,
            retry=Retry(NoBackoff(), 0, supported_errors=()),
            client_name=client_name, driver_info=None)
        self._pubsub = self._client.pubsub()
        # Per channel, what each pending SUBSCRIBE/UNSUBSCRIBE reply belongs to, in order.
        self._expect: dict[str, deque[object]] = {}
        self._task: asyncio.Task[None] | None = None
        self._opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._initial = 0  # first subscriptions not yet confirmed
        self._probe_confirmed = False
        self._probes_out: deque[float] = deque(maxlen=1000)  # send times not yet seen back
        self.dead: str | None = None  # why it died; None while alive
        self.replayed = 0  # messages the listener replayed as subscriptions were confirmed

    @property
    def alive(self) -> bool:
        return self.dead is None

    @property
    def can_probe(self) -> bool:
        """Alive, and the probe channel is subscribed: a probe sent now can come back."""
        return self.dead is None and self._probe_confirmed

    async def open(self, channels: Sequence[tuple[str, object]]) -> None:
        """Connect, ``SUBSCRIBE`` the probe channel and ``channels`` (each with its token),
        start reading. ``wait_opened`` returns once every one is confirmed."""
        names = [self._probe_channel]
        self._expect[self._probe_channel] = deque([_PROBE])
        for ch, token in channels:
            names.append(ch)
            self._expect.setdefault(ch, deque()).append(token)
        self._initial = len(names)
        if self.sharded:
            # One SSUBSCRIBE per channel: one command may only name channels of one slot.
            for name in names:
                await self._write(self._pubsub.ssubscribe(name))
        else:
            await self._write(self._pubsub.subscribe(*names))
        self._task = asyncio.create_task(self._read(), name=f"redis-sub-{self.endpoint.label}")

    async def wait_opened(self) -> None:
        """Until every channel given to ``open`` is confirmed; ``BrokerUnavailable`` if it died."""
        await asyncio.shield(self._opened)

    async def subscribe(self, channel: str, token: object) -> None:
        """``SUBSCRIBE`` one channel; ``token`` comes back through ``on_confirmed``."""
        await self._send(channel, token, subscribe=True)

    async def unsubscribe(self, channel: str) -> None:
        await self._send(channel, None, subscribe=False)

    async def _send(self, channel: str, token: object, subscribe: bool) -> None:
        self._expect.setdefault(channel, deque()).append(token)
        pubsub = self._pubsub
        try:
            if self.sharded:
                await self._write(pubsub.ssubscribe(channel) if subscribe
                                  else pubsub.sunsubscribe(channel))
            else:
                await self._write(pubsub.subscribe(channel) if subscribe
                                  else pubsub.unsubscribe(channel))
        except (RedisError, OSError) as e:  # a timeout (TimeoutError) included
            self.kill(f"connection lost: {error_text(e)}")
            raise

    @staticmethod
    async def _write(command: Any) -> None:
        """Send a command; its reply comes to the reader. At most SOCKET_TIMEOUT."""
        await asyncio.wait_for(command, SOCKET_TIMEOUT)

    def kill(self, reason: str) -> None:
        """Mark dead (first reason wins) and tell the listener."""
        if self.dead is None:
            self.dead = reason
            if not self._opened.done():
                self._opened.set_exception(BrokerUnavailable(reason))
                self._opened.exception()  # retrieved: whoever waits sees it through the future
            self._listener.on_dead(self)

    # -- the probe -------------------------------------------------------------------

    async def send_probe(self, master: EndpointHealth, timeout: float) -> None:
        """Publish a probe on the master; it must come back on this subscription."""
        if not self.can_probe or not master.reachable:
            return
        sent = time.monotonic()
        try:
            if self.sharded:
                publish = master.client.execute_command("SPUBLISH", self._probe_channel,
                                                         repr(sent))
            else:
                publish = master.client.publish(self._probe_channel, repr(sent))
            await asyncio.wait_for(publish, timeout)
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            master.note_failure(e)
            return
        self.probe_sent(sent)

    def probe_sent(self, sent: float) -> None:
        """A probe carrying ``sent`` (``time.monotonic()``) was published on the master."""
        self._probes_out.append(sent)

    def probe_overdue(self, max_lag: float) -> bool:
        """A probe sent more than ``max_lag`` seconds ago has not come back."""
        out = self._probes_out
        return bool(out) and time.monotonic() - out[0] > max_lag

    def _on_probe(self, data: str) -> None:
        try:
            sent = float(data)
        except ValueError:
            return
        self.endpoint.probe_ms = max(0.0, (time.monotonic() - sent) * 1000.0)
        out = self._probes_out
        while out and out[0] <= sent:
            out.popleft()

    # -- the reader ------------------------------------------------------------------

    async def _read(self) -> None:
        """Read replies straight from the connection, without ``PubSub.get_message``'s
        retry wrapper and per-read timer: with no socket timeout the read waits for the
        next reply, however long. A dead subscription's reader is cancelled by ``close``."""
        pubsub = self._pubsub
        try:
            while self.dead is None:
                conn = pubsub.connection
                if conn is None or not conn.is_connected:
                    # redis-py would reconnect and resubscribe silently, skipping catch-up.
                    raise RedisConnectionError("pub/sub connection closed")
                reply = await conn.read_response(disconnect_on_error=False, push_request=True)
                msg = await pubsub.handle_message(reply)
                if msg is not None:
                    await self._handle(msg)
        except asyncio.CancelledError:
            raise
        except (RedisError, OSError, BrokerUnavailable) as e:
            self.kill(f"connection lost: {error_text(e)}")
        except Exception as e:  # a bug must not leave a silent subscription behind
            log.exception("pub/sub reader on %s failed", self.endpoint.label)
            self.kill(f"reader failed: {error_text(e)}")

    async def _handle(self, msg: dict[str, Any]) -> None:
        """Every pub/sub reply, in order. May await the listener's history reads."""
        kind = msg["type"]
        channel = msg["channel"]
        if self._kind:
            if not kind.startswith(self._kind):
                return  # not a shard channel's reply (none is ever subscribed)
            kind = kind[1:]
        if kind == "message":
            data = msg["data"]
            if channel == self._probe_channel:
                self._on_probe(data)
                return
            await self._listener.on_message(self, channel, data)
        elif kind in ("subscribe", "unsubscribe"):
            queue = self._expect.get(channel)
            if queue is None and kind == "unsubscribe" and self.sharded:
                # Not ours: the server dropped the channel, its slot moved away.
                dropped = getattr(self._listener, "on_dropped", None)
                if dropped is not None:
                    dropped(self, channel)
                return
            token = queue.popleft() if queue else None
            if queue is not None and not queue:
                del self._expect[channel]
            if kind == "subscribe":
                if token is _PROBE:
                    self._probe_confirmed = True
                elif token is not None:
                    self.replayed += await self._listener.on_confirmed(self, token)
                if self._initial > 0:
                    self._initial -= 1
                    if self._initial == 0 and not self._opened.done():
                        self._opened.set_result(None)

    async def close(self) -> None:
        """Stop reading and drop the connection. Safe while the reader is mid-read."""
        if self.dead is None:
            self.dead = "closed"
        if not self._opened.done():
            self._opened.cancel()
        task = self._task
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        # The reader is gone, so nothing else touches the connection now.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._pubsub.aclose(), SOCKET_TIMEOUT)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._client.aclose(), SOCKET_TIMEOUT)
