"""The Redis broker: publish on the master, subscribe on a replica, and never lose the thread.

Owns everything rtchat does with Redis, and is the only module that imports
``redis``:

* **Publishing** runs one Lua script on the master: read the room's last id,
  ``XADD`` to ``<prefix>room:<room>`` (``MAXLEN ~ history.size``, fields
  nick, text, ts, node, prev), refresh the stream's TTL and ``PUBLISH`` the
  stored entry on ``<prefix>ch:<room>``. With replicas, the same connection
  then sends ``WAIT 1 <replica_ack_timeout_ms>`` (with Sentinel: ``WAIT`` for
  every replica online at the last check, see ``publish``). Nothing is ever
  written to a replica (Redis would accept a PUBLISH there and deliver it to
  nobody).
* **History** (``history``, ``read_since``) is read from the master, or from
  the subscription endpoint while the master is down.
* **Delivery**: one pub/sub connection per node, RESP2 (the RESP3 + hiredis
  pub/sub path of redis-py 8 has leaked memory; the soak test watches RSS),
  on the least-lagged healthy replica, or on the master. It never reconnects
  by itself. Each room keeps the id it last delivered; a live message whose
  ``prev`` is not that id is preceded by the missing ones, read from the
  stream, and duplicates are dropped. All delivery happens in the reader
  task, so the ``deliver`` callback sees each room's messages in order.
* **Health**: every ``health_interval_seconds`` each endpoint gets ``PING``
  and ``INFO replication``, and a probe published on the master must come
  back on the node's own subscription within ``max_replica_lag_seconds``.
  A lost connection counts at once; lag, link and probe trouble must last
  two checks. A failing subscription moves to the next healthy endpoint and
  replays, for every room, what it missed from the stream.
* **Sentinel**: the master and replicas come from Sentinel, re-read every
  few checks; a replica promoted from our master is followed at once.
* **Cluster state**: a TTL'd heartbeat per node (``<prefix>node:<id>``) and
  per-room presence hashes (``<prefix>presence:<room>``, field = node id).

It knows the Broker protocol and the config, never tornado or the hub.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import (
    BusyLoadingError,
    NoScriptError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from rtchat.broker.base import (
    BrokerStatus,
    BrokerUnavailable,
    Deliver,
    EndpointStatus,
    Failover,
    NodeStats,
    Presence,
    Published,
    Replay,
    replay_is_complete,
)
from rtchat.config import Config, RedisConfig, mask_url
from rtchat.messages import Message, id_key, valid_id

log = logging.getLogger("rtchat.broker.redis")

SOCKET_TIMEOUT = 1.0  # no request ever waits longer than this on one Redis call
POOL_SIZE = 64  # connections per client; a burst beyond waits (up to SOCKET_TIMEOUT) for one
READ_POLL = 1.0  # the pub/sub reader wakes at least this often
FAILOVER_HISTORY = 50
SENTINEL_REFRESH_CHECKS = 3  # re-read the topology every this many health checks
SWITCH_BACK_CHECKS = 3  # clean checks in a row before leaving the master for a replica
CATCH_UP_PER_ROOM = 0.005  # seconds a switch allows per room for its catch-up read
_ZERO = (0, 0)

# KEYS[1] room stream. ARGV: maxlen, ttl, channel, nick, text, ts, node, body.
# Returns {id, prev}. The PUBLISH payload is "<id>\n<prev>\n<body JSON>".
PUBLISH_SCRIPT = """
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local prev = ''
if last[1] then prev = last[1][1] end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*',
  'nick', ARGV[4], 'text', ARGV[5], 'ts', ARGV[6], 'node', ARGV[7], 'prev', prev)
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('PUBLISH', ARGV[3], id .. '\\n' .. prev .. '\\n' .. ARGV[8])
return {id, prev}
"""


def _error_text(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _lost_connection(e: BaseException) -> bool:
    """A connection that broke or was refused (not: loading, or our own pool being busy)."""
    if not isinstance(e, (RedisConnectionError, OSError)) or isinstance(e, BusyLoadingError):
        return False
    text = str(e)
    return "No connection available" not in text and "Too many connections" not in text


def _client(url: str, name: str, retry: Retry, socket_timeout: float = SOCKET_TIMEOUT
            ) -> aioredis.Redis:
    """A RESP2 client with short timeouts on a bounded pool that queues a burst briefly."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=POOL_SIZE, timeout=SOCKET_TIMEOUT, decode_responses=True,
        protocol=2, socket_timeout=socket_timeout, socket_connect_timeout=SOCKET_TIMEOUT,
        health_check_interval=0, retry=retry, client_name=name, driver_info=None)
    return aioredis.Redis.from_pool(pool)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _same_host(a: str, b: str) -> bool:
    # A hostname and an address cannot be compared without resolving; assume a match.
    return a == b or not (_is_ip(a) and _is_ip(b))


@dataclass
class _Check:
    """One health check's raw result."""

    ok: bool
    hard: bool = False
    error: str | None = None
    ping_ms: float | None = None
    info: dict[str, Any] = field(default_factory=dict)


class EndpointHealth:
    """One Redis server (the master or a replica): its clients and what the checks saw."""

    def __init__(self, url: str, configured_role: str, node_id: str) -> None:
        self.url = url
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 6379
        self.configured_role = configured_role
        # One retry on a dropped connection (a restarted server, CLIENT KILL), never on a
        # timeout: a slow server must show up as slow.
        self.client = _client(url, f"rtchat:{node_id}",
                              Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)))
        self._writer: aioredis.Redis | None = None
        self._node_id = node_id
        # What the last check saw.
        self.checked = False
        self.reachable: bool | None = None
        self.role: str | None = None
        self.master_link_status: str | None = None
        self.master_host: str | None = None
        self.master_port: int | None = None
        self.offset: int | None = None
        self.replid = ""
        self.replid2 = ""
        self.second_offset = -1
        self.connected_replicas: int | None = None
        self.lag_bytes: int | None = None
        self.lag_seconds: float | None = None
        self.ping_ms: float | None = None
        self.probe_ms: float | None = None
        self.last_error: str | None = None
        self.problem: str | None = None  # this check's trouble, if any
        self.hard_down = False  # connection lost: counts at once
        self.bad_checks = 0  # checks in a row with soft trouble (lag, link, probe, timeout)
        self.bad_since = 0.0  # when that run of trouble began
        self.soft_down = False  # trouble held for two checks and a health interval
        self.good_checks = 0  # clean checks in a row

    @property
    def label(self) -> str:
        return mask_url(self.url)

    @property
    def healthy(self) -> bool:
        return self.checked and bool(self.reachable) and not self.hard_down and not self.soft_down

    def writer(self, wait_ms: int) -> aioredis.Redis:
        """The publishing client: no retries at all, so a script never runs twice."""
        if self._writer is None:
            self._writer = _client(self.url, f"rtchat-pub:{self._node_id}", Retry(NoBackoff(), 0),
                                   socket_timeout=SOCKET_TIMEOUT + wait_ms / 1000.0)
        return self._writer

    def note_failure(self, e: BaseException) -> None:
        """A command failed outside the health check (e.g. a publish)."""
        self.last_error = _error_text(e)
        if _lost_connection(e):
            self.reachable = False
            self.hard_down = True
            self.good_checks = 0

    def snapshot(self, subscribed: bool) -> EndpointStatus:
        return EndpointStatus(
            url=self.label, configured_role=self.configured_role,
            reachable=self.reachable, role=self.role,
            master_link_status=self.master_link_status, lag_bytes=self.lag_bytes,
            lag_seconds=None if self.lag_seconds is None else round(self.lag_seconds, 3),
            ping_ms=None if self.ping_ms is None else round(self.ping_ms, 3),
            probe_ms=None if self.probe_ms is None else round(self.probe_ms, 3),
            last_error=self.last_error, healthy=self.healthy, subscribed=subscribed,
        )

    async def aclose(self) -> None:
        for client in (self.client, self._writer):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.aclose()


@dataclass(eq=False)
class _RoomState:
    """A subscribed room: the id this node last delivered ("" = the room was empty)."""

    room: str
    ready: asyncio.Future[None]
    last: str | None = None  # None until the first subscription confirmed it
    key: tuple[int, int] = _ZERO
    sent_on: _Subscription | None = None  # the subscription its SUBSCRIBE went out on


_PROBE = object()  # the expectation token of the probe channel's confirmation


class _Subscription:
    """One pub/sub connection on one endpoint, and the task that reads it.

    Never reconnects by itself: a lost connection marks it dead and the
    broker opens a new one, with catch-up from the stream.
    """

    def __init__(self, broker: RedisBroker, endpoint: EndpointHealth) -> None:
        self.broker = broker
        self.endpoint = endpoint
        # A Retry that handles no error at all: even with 0 retries, redis-py's PubSub
        # would reconnect and resubscribe in its failure handler before re-raising.
        self.client = aioredis.Redis.from_url(
            endpoint.url, decode_responses=True, protocol=2, socket_timeout=SOCKET_TIMEOUT,
            socket_connect_timeout=SOCKET_TIMEOUT, health_check_interval=0,
            retry=Retry(NoBackoff(), 0, supported_errors=()),
            client_name=f"rtchat-sub:{broker.node_id}", driver_info=None)
        self.pubsub = self.client.pubsub()
        # Per channel, what each pending SUBSCRIBE/UNSUBSCRIBE reply belongs to, in order.
        self.expect: dict[str, deque[Any]] = {}
        self.task: asyncio.Task[None] | None = None
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.initial = 0
        self.dead: str | None = None
        self.probe_confirmed = False
        self.probes_out: deque[float] = deque(maxlen=1000)  # send times not yet seen back
        self.record: dict[str, Any] | None = None  # the failover this subscription completes

    @property
    def alive(self) -> bool:
        return self.dead is None

    async def open(self, rooms: list[_RoomState]) -> None:
        """Connect, SUBSCRIBE the probe channel and ``rooms``, start reading."""
        channels = [self.broker.probe_channel]
        self.expect[self.broker.probe_channel] = deque([_PROBE])
        for state in rooms:
            ch = self.broker.channel(state.room)
            channels.append(ch)
            self.expect.setdefault(ch, deque()).append(state)
            state.sent_on = self
        self.initial = len(channels)
        await self.pubsub.subscribe(*channels)
        self.task = asyncio.create_task(self._read(), name=f"redis-sub-{self.endpoint.label}")

    async def send(self, command: str, state: _RoomState | None, room: str) -> None:
        """SUBSCRIBE (``state`` given) or UNSUBSCRIBE one room; the reader matches the reply."""
        ch = self.broker.channel(room)
        self.expect.setdefault(ch, deque()).append(state)
        if state is not None:
            state.sent_on = self
        try:
            if command == "SUBSCRIBE":
                await self.pubsub.subscribe(ch)
            else:
                await self.pubsub.unsubscribe(ch)
        except (RedisError, OSError) as e:
            self.kill(f"connection lost: {_error_text(e)}")
            raise

    def kill(self, reason: str) -> None:
        """Mark dead (first reason wins) and wake the broker's monitor."""
        if self.dead is None:
            self.dead = reason
            if not self.opened.done():
                self.opened.set_exception(BrokerUnavailable(reason))
                self.opened.exception()  # retrieved: whoever waits sees it through the future
            self.broker.wake_monitor()

    async def _read(self) -> None:
        pubsub = self.pubsub
        handle = self.broker.handle_pubsub
        try:
            while self.dead is None:
                conn = pubsub.connection
                if conn is None or not conn.is_connected:
                    # redis-py would reconnect and resubscribe silently, skipping catch-up.
                    raise RedisConnectionError("pub/sub connection closed")
                msg = await pubsub.get_message(timeout=READ_POLL)
                if msg is not None:
                    await handle(self, msg)
        except asyncio.CancelledError:
            raise
        except (RedisError, OSError, BrokerUnavailable) as e:
            self.kill(f"connection lost: {_error_text(e)}")
        except Exception as e:  # a bug must not leave a silent subscription behind
            log.exception("pub/sub reader on %s failed", self.endpoint.label)
            self.kill(f"reader failed: {_error_text(e)}")

    async def close(self) -> None:
        """Stop reading and drop the connection. Safe while the reader is mid-read."""
        if self.dead is None:
            self.dead = "closed"
        if not self.opened.done():
            self.opened.cancel()
        task = self.task
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        # The reader is gone, so nothing else touches the connection now.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.pubsub.aclose(), SOCKET_TIMEOUT)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.client.aclose(), SOCKET_TIMEOUT)


class RedisBroker:
    """The Broker protocol on Redis: master publisher, replica subscriber, failover."""

    kind = "redis"

    def __init__(self, cfg: Config, node_id: str) -> None:
        self.cfg = cfg
        self.rc: RedisConfig = cfg.broker.redis
        self.node_id = node_id
        prefix = self.rc.key_prefix
        self._prefix = prefix
        self._channel_prefix = f"{prefix}ch:"
        self.probe_channel = f"{prefix}probe:{node_id}"
        self._node_key = f"{prefix}node:{node_id}"
        interval = self.rc.health_interval_seconds
        self._interval = interval
        self._check_timeout = min(SOCKET_TIMEOUT, max(0.5, interval))
        self._heartbeat_ttl = max(3, math.ceil(3 * interval))
        self._subscribe_timeout = max(3.0, 3 * interval)
        self._wait_ms = self.rc.replica_ack_timeout_ms
        self._deliver: Deliver | None = None
        self._node_stats: NodeStats | None = None
        self._started = False
        self._closed = False
        self._master: EndpointHealth | None = None
        self._replicas: list[EndpointHealth] = []
        self._sentinel: Sentinel | None = None
        self._sentinel_error: str | None = None
        self._topology_dirty = False
        self._checks = 0
        self._master_samples: deque[tuple[float, int]] = deque(maxlen=256)
        self._expected_replicas: int | None = None
        self._replica_drop_seen = False
        self._sub: _Subscription | None = None
        self._lost_from: str | None = None  # the endpoint a dead subscription was on
        self._lost_reason = ""
        self._sub_lock = asyncio.Lock()
        self._rooms: dict[str, _RoomState] = {}
        self._presence: dict[str, dict[str, int]] = {}
        self._failovers: deque[dict[str, Any]] = deque(maxlen=FAILOVER_HISTORY)
        self._failover_count = 0
        self._monitor: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Event | None = None
        self._script_sha = ""
        self._master_down_logged = False
        self._background: set[asyncio.Future[None]] = set()

    # -- names -------------------------------------------------------------------

    def channel(self, room: str) -> str:
        return self._channel_prefix + room

    def _stream_key(self, room: str) -> str:
        return f"{self._prefix}room:{room}"

    def _presence_key(self, room: str) -> str:
        return f"{self._prefix}presence:{room}"

    # -- lifecycle -----------------------------------------------------------------

    async def start(self, deliver: Deliver, node_stats: NodeStats) -> None:
        """Check every endpoint once, subscribe, then keep watching in the background.

        Does not fail when Redis is down: ``readiness()`` says so, and the
        monitor connects as soon as it can.
        """
        if self._started:
            return
        self._deliver = deliver
        self._node_stats = node_stats
        self._wakeup = asyncio.Event()
        self._script_sha = _sha1(PUBLISH_SCRIPT)
        rc = self.rc
        if rc.sentinel is not None:
            hosts = []
            for hp in rc.sentinel.hosts:
                host, _, port = hp.rpartition(":")
                hosts.append((host, int(port)))
            self._sentinel = Sentinel(hosts, sentinel_kwargs={
                "socket_timeout": SOCKET_TIMEOUT, "socket_connect_timeout": SOCKET_TIMEOUT,
                "password": rc.sentinel.password, "decode_responses": True, "protocol": 2,
                "retry": Retry(NoBackoff(), 0), "driver_info": None})
        else:
            self._master = EndpointHealth(rc.master, "master", self.node_id)
            self._replicas = [EndpointHealth(u, "replica", self.node_id) for u in rc.replicas]
        self._started = True
        await self._tick()
        self._monitor = asyncio.create_task(self._monitor_loop(), name="redis-broker-monitor")

    async def close(self) -> None:
        """Stop the monitor and the subscription, leave the cluster view, close clients."""
        if self._closed:
            return
        self._closed = True
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._monitor
            self._monitor = None
        for task in list(self._background):
            task.cancel()
        endpoints = self._endpoints()
        sub, self._sub = self._sub, None
        if sub is not None:
            await sub.close()
        for state in self._rooms.values():
            if not state.ready.done():
                state.ready.cancel()
        master = self._master
        if master is not None and self._started and master.reachable:
            # A graceful leave: this node's clients drop off presence at once.
            with contextlib.suppress(Exception):
                async with master.client.pipeline(transaction=False) as pipe:
                    pipe.delete(self._node_key)
                    for room in self._presence:
                        pipe.hdel(self._presence_key(room), self.node_id)
                    await asyncio.wait_for(pipe.execute(), SOCKET_TIMEOUT)
        for ep in endpoints:
            await ep.aclose()
        if self._sentinel is not None:
            for s in self._sentinel.sentinels:
                with contextlib.suppress(Exception):
                    await s.aclose()

    def wake_monitor(self) -> None:
        """Run the next health check now: a connection was lost, the master refused a write."""
        if self._wakeup is not None:
            self._wakeup.set()

    # -- publishing ----------------------------------------------------------------------

    def _has_replicas(self) -> bool:
        return bool(self._replicas)

    async def publish(self, room: str, nick: str, text: str) -> Published:
        """Store and announce one message on the master; see the module docstring.

        ``replicated`` is None without replicas (or with ``replica_ack_timeout_ms: 0``).
        Otherwise it says whether ``WAIT`` saw the message on one replica or, with
        Sentinel, on every replica the master had online at the last check: Sentinel
        may promote any of them, and a manual failover of a live master can promote
        one that has not applied a write another replica already acknowledged.
        """
        if not self._started or self._closed:
            raise BrokerUnavailable("broker not running")
        master = self._master
        if master is None:
            raise BrokerUnavailable(self._sentinel_error or "no Redis master known")
        wait = 0
        if self._wait_ms > 0 and self._has_replicas():
            wait = max(1, self._expected_replicas or 1) if self._sentinel is not None else 1
        ts = time.time()
        body = json.dumps({"nick": nick, "text": text, "ts": ts, "node": self.node_id},
                          ensure_ascii=False, separators=(",", ":"))
        args = (self.cfg.history.size, self.cfg.history.ttl_seconds, self.channel(room), nick,
                text, repr(ts), self.node_id, body)
        writer = master.writer(self._wait_ms)
        try:
            result = await self._run_publish(writer, room, args, wait)
            if isinstance(result[0], NoScriptError):
                # A restarted (or new) master has an empty script cache; nothing ran.
                await writer.script_load(PUBLISH_SCRIPT)
                result = await self._run_publish(writer, room, args, wait)
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            master.note_failure(e)
            self.wake_monitor()
            raise BrokerUnavailable(f"Redis master unavailable: {_error_text(e)}") from None
        stored = result[0]
        if isinstance(stored, Exception):
            master.note_failure(stored)
            if isinstance(stored, ResponseError) and "READONLY" in str(stored):
                self._topology_dirty = True  # the master was demoted: ask Sentinel now
            self.wake_monitor()
            raise BrokerUnavailable(f"Redis master refused the write: {_error_text(stored)}")
        msg = Message(id=str(stored[0]), room=room, nick=nick, text=text, ts=ts,
                      node=self.node_id, prev=str(stored[1]))
        if not wait:
            return Published(msg, None)
        acks = result[1]
        return Published(msg, isinstance(acks, int) and acks >= wait)

    async def _run_publish(self, writer: aioredis.Redis, room: str, args: tuple[Any, ...],
                           wait: int) -> list[Any]:
        # EVALSHA and WAIT must share a connection: WAIT counts that connection's writes.
        async with writer.pipeline(transaction=False) as pipe:
            pipe.evalsha(self._script_sha, 1, self._stream_key(room), *args)
            if wait:
                pipe.execute_command("WAIT", wait, self._wait_ms)
            return await pipe.execute(raise_on_error=False)

    # -- history ---------------------------------------------------------------------

    def _read_endpoints(self) -> list[EndpointHealth]:
        """Where to read history: the master, then the subscription endpoint.

        A master known to be down goes last, so reads do not wait on it first.
        """
        master = self._master
        sub = self._sub
        eps: list[EndpointHealth] = []
        if master is not None and master.reachable is not False:
            eps.append(master)
        if sub is not None and sub.endpoint not in eps:
            eps.append(sub.endpoint)
        if master is not None and master not in eps:
            eps.append(master)
        return eps

    async def _read(self, eps: Iterable[EndpointHealth], fn: Any) -> Any:
        last: BaseException | None = None
        for ep in eps:
            try:
                return await fn(ep.client)
            except (RedisError, OSError, asyncio.TimeoutError) as e:
                last = e
                ep.note_failure(e)
        reason = _error_text(last) if last is not None else "no Redis endpoint"
        raise BrokerUnavailable(f"cannot read from Redis: {reason}")

    def _message(self, room: str, entry: Any) -> Message:
        mid, fields = entry
        return Message(id=mid, room=room, nick=fields.get("nick", ""),
                       text=fields.get("text", ""), ts=float(fields.get("ts") or 0.0),
                       node=fields.get("node", ""), prev=fields.get("prev", ""))

    async def history(self, room: str, limit: int) -> list[Message]:
        if limit <= 0:
            return []
        key = self._stream_key(room)
        entries = await self._read(
            self._read_endpoints(), lambda c: c.xrevrange(key, "+", "-", count=limit))
        return [self._message(room, e) for e in reversed(entries)]

    async def read_since(self, room: str, last_id: str) -> Replay:
        """Every message after ``last_id``; ``truncated`` unless the ``prev`` chain proves no gap.

        ``ValueError`` for a malformed id.
        """
        if not valid_id(last_id):
            raise ValueError(f"not a message id: {last_id!r}")
        key = self._stream_key(room)

        async def read(client: aioredis.Redis) -> list[Any]:
            # One MULTI, so the three reads see the same stream.
            async with client.pipeline(transaction=True) as pipe:
                pipe.xrange(key, "(" + last_id, "+")
                pipe.xrange(key, "-", "+", count=1)
                pipe.xrevrange(key, "+", "-", count=1)
                return await pipe.execute()

        after, first, newest = await self._read(self._read_endpoints(), read)
        msgs = [self._message(room, e) for e in after]
        oldest = first[0][0] if first else ""
        ok = replay_is_complete(last_id, msgs[0].prev if msgs else None,
                                newest[0][0] if newest else None)
        return Replay(msgs, truncated=not ok, oldest=oldest)

    # -- subscriptions ---------------------------------------------------------------------

    async def subscribe(self, room: str) -> None:
        """Start delivery for ``room``; returns once Redis confirmed the SUBSCRIBE.

        Messages stored before this returns may be delivered too (the caller
        drops ids it already has). Raises BrokerUnavailable when no endpoint
        confirms in time; the room is then not subscribed.
        """
        if not self._started or self._closed:
            raise BrokerUnavailable("broker not running")
        state = self._rooms.get(room)
        if state is None:
            state = _RoomState(room, asyncio.get_running_loop().create_future())
            self._rooms[room] = state
            async with self._sub_lock:
                sub = self._sub
                if sub is not None and sub.alive:
                    if state.sent_on is not sub and self._rooms.get(room) is state:
                        # (A switch that ran meanwhile may have subscribed it already.)
                        with contextlib.suppress(RedisError, OSError):
                            await sub.send("SUBSCRIBE", state, room)
                elif self._choose(exclude=None) is None:
                    # Nothing to subscribe on: say so now rather than after a timeout.
                    if self._rooms.get(room) is state:
                        del self._rooms[room]
                    raise BrokerUnavailable("no healthy Redis endpoint to subscribe on")
                else:
                    self.wake_monitor()
        try:
            await asyncio.wait_for(asyncio.shield(state.ready), self._subscribe_timeout)
        except asyncio.CancelledError:
            if not state.ready.cancelled():
                self._forget(state)  # our caller gave up
                raise
            raise BrokerUnavailable("unsubscribed while subscribing") from None
        except asyncio.TimeoutError:
            self._forget(state)
            raise BrokerUnavailable("no Redis endpoint confirmed the subscription") from None

    def _forget(self, state: _RoomState) -> None:
        """Roll back a subscribe that did not complete."""
        if self._rooms.get(state.room) is state and not state.ready.done():
            task = asyncio.ensure_future(self.unsubscribe(state.room))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def unsubscribe(self, room: str) -> None:
        """Stop delivery for ``room`` (its messages still in flight are dropped)."""
        state = self._rooms.pop(room, None)
        if state is None:
            return
        if not state.ready.done():
            state.ready.cancel()
        async with self._sub_lock:
            sub = self._sub
            if sub is not None and sub.alive:
                with contextlib.suppress(RedisError, OSError):
                    await sub.send("UNSUBSCRIBE", None, room)

    async def handle_pubsub(self, sub: _Subscription, msg: dict[str, Any]) -> None:
        """Called by the reader for every pub/sub reply, in order. May await history reads."""
        kind = msg["type"]
        channel = msg["channel"]
        if kind == "message":
            if channel == self.probe_channel:
                self._on_probe(sub, msg["data"])
                return
            state = self._rooms.get(channel[len(self._channel_prefix):])
            if state is None or state.last is None:
                return  # unsubscribed, or not yet confirmed: not ours to deliver
            await self._deliver_live(sub, state, msg["data"])
        elif kind in ("subscribe", "unsubscribe"):
            queue = sub.expect.get(channel)
            token = queue.popleft() if queue else None
            if queue is not None and not queue:
                del sub.expect[channel]
            if kind == "subscribe":
                await self._on_confirmed(sub, channel, token)

    async def _on_confirmed(self, sub: _Subscription, channel: str, token: Any) -> None:
        if token is _PROBE:
            sub.probe_confirmed = True
        elif isinstance(token, _RoomState) and self._rooms.get(token.room) is token:
            if token.last is None:
                await self._init_room(sub, token)
            else:
                recovered = await self._catch_up(sub, token)
                if sub.record is not None:
                    sub.record["recovered"] += recovered
            if not token.ready.done():
                token.ready.set_result(None)
        if sub.initial > 0:
            sub.initial -= 1
            if sub.initial == 0 and not sub.opened.done():
                sub.opened.set_result(None)

    async def _init_room(self, sub: _Subscription, state: _RoomState) -> None:
        """A new room: everything after the stream's current end gets delivered."""
        key = self._stream_key(state.room)
        eps = self._read_endpoints()
        if sub.endpoint not in eps:
            eps.append(sub.endpoint)
        newest = await self._read(eps, lambda c: c.xrevrange(key, "+", "-", count=1))
        state.last = newest[0][0] if newest else ""
        state.key = id_key(state.last) if state.last else _ZERO

    async def _catch_up(self, sub: _Subscription, state: _RoomState) -> int:
        """After a switch: deliver what the room got since its last delivered id."""
        eps = self._read_endpoints()
        if sub.endpoint not in eps:
            eps.append(sub.endpoint)
        missed = await self._range(eps, state, "+")
        n = 0
        for m in missed:
            if m.key > state.key:
                self._emit(state, m)
                n += 1
        return n

    async def _range(self, eps: list[EndpointHealth], state: _RoomState, end: str
                     ) -> list[Message]:
        key = self._stream_key(state.room)
        start = "(" + state.last if state.last else "-"
        entries = await self._read(eps, lambda c: c.xrange(key, start, end))
        return [self._message(state.room, e) for e in entries]

    async def _deliver_live(self, sub: _Subscription, state: _RoomState, data: str) -> None:
        try:
            mid, prev, body = data.split("\n", 2)
            key = id_key(mid)
            fields = json.loads(body)
            msg = Message(id=mid, room=state.room, nick=fields["nick"], text=fields["text"],
                          ts=float(fields["ts"]), node=fields["node"], prev=prev)
        except (ValueError, KeyError, TypeError):
            # Not from our script: someone else publishes on our channel. Not a failover.
            log.warning("ignored a malformed message on %s", self.channel(state.room))
            return
        if key <= state.key:
            return  # a duplicate: delivered already (catch-up or gap fill)
        if prev != state.last:
            # Missed something: the stream has it (this endpoint applied the XADD
            # before it passed on the PUBLISH), so fill the gap up to this message.
            eps = [sub.endpoint, *(e for e in self._read_endpoints() if e is not sub.endpoint)]
            for m in await self._range(eps, state, mid):
                if state.key < m.key < key:
                    self._emit(state, m)
        self._emit(state, msg, key)

    def _emit(self, state: _RoomState, msg: Message, key: tuple[int, int] | None = None) -> None:
        state.last = msg.id
        state.key = key if key is not None else msg.key
        deliver = self._deliver
        if deliver is not None:
            try:
                deliver(msg)
            except Exception:
                log.exception("deliver callback failed for %s in %s", msg.id, msg.room)

    def _on_probe(self, sub: _Subscription, data: str) -> None:
        try:
            sent = float(data)
        except ValueError:
            return
        sub.endpoint.probe_ms = max(0.0, (time.monotonic() - sent) * 1000.0)
        out = sub.probes_out
        while out and out[0] <= sent:
            out.popleft()

    def _probe_overdue(self, sub: _Subscription) -> bool:
        out = sub.probes_out
        return bool(out) and time.monotonic() - out[0] > self.rc.max_replica_lag_seconds

    # -- health, failover -----------------------------------------------------------------

    def _endpoints(self) -> list[EndpointHealth]:
        eps = [self._master] if self._master is not None else []
        eps += [r for r in self._replicas if r is not self._master]
        sub = self._sub
        if sub is not None and sub.endpoint not in eps:
            eps.append(sub.endpoint)
        return eps

    async def _monitor_loop(self) -> None:
        loop = asyncio.get_running_loop()
        wakeup = self._wakeup
        assert wakeup is not None
        next_at = loop.time() + self._interval
        while not self._closed:
            try:
                await asyncio.wait_for(wakeup.wait(), max(0.0, next_at - loop.time()))
                # Woken early: a short pause, so a burst of wake-ups is one check.
                await asyncio.sleep(min(0.05, self._interval / 4))
            except asyncio.TimeoutError:
                pass
            wakeup.clear()
            next_at = loop.time() + self._interval
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("Redis health check failed")

    async def _tick(self) -> None:
        """One round: check endpoints, follow the topology, probe, switch, heartbeat."""
        self._checks += 1
        if self._sentinel is not None and (
                self._master is None or self._topology_dirty
                or self._checks % SENTINEL_REFRESH_CHECKS == 1
                or not (self._master.reachable and self._master.role == "master")):
            self._topology_dirty = False
            await self._refresh_topology()
        eps = self._endpoints()
        results = await asyncio.gather(*(self._check(ep) for ep in eps))
        # Apply every result at once, with no await in between, so publishes never see
        # a master's replica count from a different moment than the replicas' roles.
        now = asyncio.get_running_loop().time()
        for ep, res in zip(eps, results, strict=True):
            self._apply(ep, res, now)
        self._judge(now)
        if self._sentinel is not None:
            self._follow_promotion()
        await self._send_probe()
        await self._maybe_switch()
        await self._heartbeat()

    async def _check(self, ep: EndpointHealth) -> _Check:
        loop = asyncio.get_running_loop()

        async def run() -> _Check:
            t0 = loop.time()
            await ep.client.ping()
            ping_ms = (loop.time() - t0) * 1000.0
            info = await ep.client.info("replication")
            return _Check(ok=True, ping_ms=ping_ms, info=info)

        try:
            return await asyncio.wait_for(run(), self._check_timeout)
        except BusyLoadingError:
            return _Check(ok=False, error="loading the dataset")
        except (RedisTimeoutError, asyncio.TimeoutError):
            return _Check(ok=False, error="timeout")
        except (RedisError, OSError) as e:
            return _Check(ok=False, hard=_lost_connection(e), error=_error_text(e))

    def _apply(self, ep: EndpointHealth, res: _Check, now: float) -> None:
        ep.checked = True
        if not res.ok:
            # A timeout or an error reply leaves "reachable" as it was: it is trouble that
            # must last two checks. A lost connection is down at once.
            ep.last_error = res.error
            ep.problem = res.error
            ep.hard_down = res.hard
            if res.hard or ep.reachable is None:
                ep.reachable = False
                ep.ping_ms = None
            return
        info = res.info
        ep.reachable = True
        ep.hard_down = False
        ep.problem = None
        ep.ping_ms = res.ping_ms
        ep.role = "master" if info.get("role") == "master" else "replica"
        ep.replid = str(info.get("master_replid", ""))
        ep.replid2 = str(info.get("master_replid2", ""))
        ep.second_offset = _int(info.get("second_repl_offset"), -1)
        if ep.role == "master":
            ep.master_link_status = None
            ep.master_host = ep.master_port = None
            ep.offset = _int(info.get("master_repl_offset"), 0)
            ep.connected_replicas = sum(
                1 for k, v in info.items()
                if k.startswith("slave") and isinstance(v, dict) and v.get("state") == "online")
            ep.lag_bytes = ep.lag_seconds = None
        else:
            ep.master_link_status = str(info.get("master_link_status", "down"))
            ep.master_host = str(info.get("master_host", ""))
            ep.master_port = _int(info.get("master_port"), 0)
            ep.offset = _int(info.get("slave_repl_offset", info.get("master_repl_offset")), 0)
            ep.connected_replicas = None
            if ep.master_link_status != "up":
                down = info.get("master_link_down_since_seconds")
                ep.lag_seconds = float(down) if isinstance(down, (int, float)) and down >= 0 \
                    else None
            ep.lag_bytes = None

    def _judge(self, now: float) -> None:
        """Turn this round's raw results into health, lag and the replica count to expect."""
        master = self._master
        max_lag = self.rc.max_replica_lag_seconds
        if master is not None and master.reachable and master.role == "master" \
                and master.offset is not None:
            self._master_samples.append((now, master.offset))
            # How many replicas WAIT must hear from (with Sentinel). Fewer online than
            # before must be seen twice: the one that left may be being promoted.
            count = master.connected_replicas or 0
            expected = self._expected_replicas
            if expected is None or count >= expected or self._replica_drop_seen:
                self._expected_replicas = count
                self._replica_drop_seen = False
            else:
                self._replica_drop_seen = True
                self._topology_dirty = True
                self.wake_monitor()
            if self._master_down_logged:
                log.warning("Redis master %s reachable again", master.label)
                self._master_down_logged = False
        elif master is not None and master.checked and not master.reachable \
                and not self._master_down_logged:
            log.warning("Redis master %s unreachable: %s", master.label, master.last_error)
            self._master_down_logged = True
        sub = self._sub
        for ep in self._endpoints():
            if not ep.reachable:
                ep.bad_checks = ep.good_checks = 0
                ep.soft_down = False
                continue
            problem = ep.problem
            if problem is None and ep is not master:
                problem = self._replica_problem(ep, master, now, max_lag)
            if problem is None and ep is master and ep.role != "master":
                problem = "the master is a replica"
            if problem is None and sub is not None and sub.endpoint is ep and sub.alive \
                    and self._probe_overdue(sub):
                problem = f"delivery probe overdue (> {max_lag:g}s)"
            if problem is None:
                ep.bad_checks = 0
                ep.soft_down = False
                ep.good_checks += 1
            else:
                if ep.bad_checks == 0:
                    ep.bad_since = now
                ep.bad_checks += 1
                ep.good_checks = 0
                ep.problem = problem
                # Two checks in a row, and a health interval apart: extra checks that a
                # wake-up brought on must not make a blip look lasting.
                ep.soft_down = ep.bad_checks >= 2 and now - ep.bad_since >= self._interval * 0.9

    def _replica_problem(self, ep: EndpointHealth, master: EndpointHealth | None, now: float,
                         max_lag: float) -> str | None:
        if ep.role == "master":
            ep.lag_bytes = ep.lag_seconds = None
            return "not a replica (role: master)"
        if ep.master_link_status != "up":
            return f"master_link_status: {ep.master_link_status}"
        if master is not None and master.reachable and master.role == "master":
            if ep.master_port != master.port or not _same_host(ep.master_host or "", master.host):
                return f"replicates {ep.master_host}:{ep.master_port}, not the master"
            newest = master.offset or 0
            ep.lag_bytes = max(0, newest - (ep.offset or 0))
            # Lag in seconds: since when has the master held data this replica lacks?
            lag = 0.0
            if ep.offset is not None and ep.offset < newest:
                for t, off in self._master_samples:
                    if off > ep.offset:
                        lag = now - t
                        break
            ep.lag_seconds = lag
        else:
            ep.lag_bytes = None
            ep.lag_seconds = None
        if ep.lag_seconds is not None and ep.lag_seconds > max_lag:
            return f"lagging {ep.lag_seconds:.1f}s (> {max_lag:g}s)"
        return None

    def _choose(self, exclude: EndpointHealth | None) -> EndpointHealth | None:
        """The endpoint to subscribe on: the least-lagged healthy replica, else the master."""
        master = self._master
        replicas = [r for r in self._replicas
                    if r is not master and r is not exclude and r.healthy
                    and r.role == "replica" and r.bad_checks == 0]
        replicas.sort(key=lambda r: (r.lag_seconds or 0.0, r.lag_bytes or 0,
                                     r.ping_ms if r.ping_ms is not None else math.inf))
        master_ok = master is not None and master is not exclude and master.healthy
        if self.rc.subscribe_from == "replica":
            if replicas:
                return replicas[0]
            if master_ok:
                return master
        else:
            if master_ok:
                return master
            if replicas:
                return replicas[0]
        if exclude is not None and exclude.healthy and exclude.bad_checks == 0:
            return exclude  # nothing else: the same endpoint again beats no endpoint
        return None

    async def _maybe_switch(self) -> None:
        sub = self._sub
        if sub is not None and sub.alive:
            ep = sub.endpoint
            if not ep.healthy:
                target = self._choose(exclude=ep)
                if target is not None and target is not ep:
                    await self._switch(target, ep.problem or "unhealthy")
                return
            master = self._master
            if self.rc.subscribe_from == "replica":
                # On the master only for want of a replica: go back once one holds steady.
                if ep is master or ep.role == "master":
                    best = self._choose(exclude=ep)
                    if best is not None and best is not master \
                            and best.good_checks >= SWITCH_BACK_CHECKS:
                        await self._switch(best, "a replica is healthy again")
            elif master is not None and ep is not master and master.healthy \
                    and master.good_checks >= SWITCH_BACK_CHECKS:
                await self._switch(master, "the master is healthy again")
            return
        if sub is not None:
            self._lost_from, self._lost_reason = sub.endpoint.url, sub.dead or "lost"
            await self._drop_subscription(sub)
            target = self._choose(exclude=sub.endpoint)
        else:
            target = self._choose(exclude=None)
        if target is not None:
            await self._switch(target, self._lost_reason or "no subscription")
        elif sub is not None:
            log.warning("subscription on %s lost (%s); no healthy endpoint to move to",
                        sub.endpoint.label, self._lost_reason)

    async def _drop_subscription(self, sub: _Subscription) -> None:
        async with self._sub_lock:
            if self._sub is sub:
                self._sub = None
        sub.endpoint.probe_ms = None
        await sub.close()
        await self._retire_if_orphan(sub.endpoint)

    async def _retire_if_orphan(self, ep: EndpointHealth) -> None:
        """Close an endpoint the topology dropped once the subscription has left it."""
        if ep not in self._endpoints():
            await ep.aclose()

    async def _switch(self, target: EndpointHealth, reason: str) -> bool:
        """Move the subscription to ``target``: resubscribe every room and replay what was missed."""
        async with self._sub_lock:
            old = self._sub
            from_url = old.endpoint.url if old is not None else self._lost_from
            if old is not None:
                self._sub = None
                old.endpoint.probe_ms = None
                await old.close()
                await self._retire_if_orphan(old.endpoint)
            sub = _Subscription(self, target)
            if from_url is not None:
                sub.record = {"at": time.time(), "from": mask_url(from_url),
                              "to": target.label, "reason": reason, "recovered": 0}
            try:
                await asyncio.wait_for(sub.open(list(self._rooms.values())), SOCKET_TIMEOUT * 2)
                # Each room's catch-up is one XRANGE, read in turn as its SUBSCRIBE is
                # confirmed: the budget grows with the rooms, so a busy node can switch.
                budget = max(5.0, self._interval * 3) + CATCH_UP_PER_ROOM * len(self._rooms)
                await asyncio.wait_for(asyncio.shield(sub.opened), budget)
            except (RedisError, OSError, BrokerUnavailable, asyncio.TimeoutError) as e:
                await sub.close()
                target.note_failure(e)
                target.soft_down = True  # until a clean check
                self._lost_from = from_url
                self._lost_reason = reason
                log.warning("cannot subscribe on %s: %s", target.label, _error_text(e))
                return False
            except BaseException:  # cancelled (close() stops the monitor mid-switch)
                await asyncio.shield(sub.close())
                raise
            self._sub = sub
            self._lost_from, self._lost_reason = None, ""
        record = sub.record
        if record is None:
            log.info("subscribed on %s (%d rooms)", target.label, len(self._rooms))
        else:
            self._failovers.append(record)
            self._failover_count += 1
            log.warning("subscription moved from %s to %s (%s); %d messages recovered from history",
                        record["from"], record["to"], reason, record["recovered"])
        return True

    async def _send_probe(self) -> None:
        sub = self._sub
        master = self._master
        if sub is None or not sub.alive or not sub.probe_confirmed or master is None:
            return
        if not master.reachable:
            return
        sent = time.monotonic()
        try:
            await asyncio.wait_for(master.client.publish(self.probe_channel, repr(sent)),
                                   self._check_timeout)
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            master.note_failure(e)
            return
        sub.probes_out.append(sent)

    # -- Sentinel -----------------------------------------------------------------------------

    def _endpoint_for(self, host: str, port: int, role: str) -> EndpointHealth:
        for ep in self._endpoints():
            if ep.port == port and ep.host == host:
                return ep
        base = urlsplit(self.rc.master)
        userinfo = base.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@{host}:{port}" if userinfo else f"{host}:{port}"
        url = urlunsplit((base.scheme, netloc, base.path, base.query, ""))
        return EndpointHealth(url, role, self.node_id)

    async def _refresh_topology(self) -> None:
        """Ask every Sentinel for the master and its replicas; follow a promotion."""
        sentinel = self._sentinel
        assert sentinel is not None and self.rc.sentinel is not None
        service = self.rc.sentinel.service
        async def ask(s: aioredis.Redis) -> tuple[Any, Any]:
            # All Sentinels at once, so unreachable ones cost one timeout, not one each.
            addr = await asyncio.wait_for(s.sentinel_get_master_addr_by_name(service),
                                          self._check_timeout)
            found = await asyncio.wait_for(s.sentinel_slaves(service), self._check_timeout)
            return addr, found

        answers: list[tuple[str, int]] = []
        replicas: list[dict[str, Any]] | None = None
        errors = []
        results = await asyncio.gather(*(ask(s) for s in sentinel.sentinels),
                                       return_exceptions=True)
        for res in results:
            if isinstance(res, (RedisError, OSError, asyncio.TimeoutError)):
                errors.append(_error_text(res))
            elif isinstance(res, BaseException):
                raise res
            else:
                addr, found = res
                if addr:
                    answers.append((str(addr[0]), int(addr[1])))
                if replicas is None:
                    replicas = list(found)
        if not answers:
            self._sentinel_error = "no Sentinel knows the master" + (
                f" ({errors[0]})" if errors else "")
            return
        self._sentinel_error = None
        votes = Counter(answers)
        majority = votes.most_common(1)[0][0]
        for addr in sorted(votes, key=lambda a: a != majority):
            if await self._consider_master(addr, addr == majority):
                break
        if replicas is None:
            return  # no Sentinel listed the replicas this time: keep what we know
        master = self._master
        keep: list[EndpointHealth] = []
        for r in replicas:
            host, port = str(r.get("ip")), int(r.get("port") or 0)
            if master is not None and master.host == host and master.port == port:
                continue
            keep.append(self._endpoint_for(host, port, "replica"))
        for ep in keep:
            ep.configured_role = "replica"
        old = [r for r in self._replicas if r not in keep and r is not master]
        self._replicas = keep
        sub = self._sub
        for ep in old:
            if sub is None or sub.endpoint is not ep:
                await ep.aclose()

    async def _consider_master(self, addr: tuple[str, int], majority: bool) -> bool:
        """Switch the master to ``addr`` if it is one and supersedes the current master."""
        current = self._master
        if current is not None and (current.host, current.port) == addr:
            return True
        ep = self._endpoint_for(addr[0], addr[1], "master")
        try:
            return await self._decide_master(ep, current, majority)
        finally:
            if ep not in self._endpoints():
                await ep.aclose()  # made just for this look and not taken on

    async def _decide_master(self, ep: EndpointHealth, current: EndpointHealth | None,
                             majority: bool) -> bool:
        res = await self._check(ep)
        if not res.ok or res.info.get("role") != "master":
            return False
        self._apply(ep, res, asyncio.get_running_loop().time())
        if current is None:
            self._set_master(ep, "discovered through Sentinel")
            return True
        if _promoted_from(ep, current):
            self._set_master(ep, "replica promoted (Sentinel)")
            return True
        if _promoted_from(current, ep):
            return False  # a stale master that Sentinel has not demoted yet
        if not (current.reachable and current.role == "master") or majority:
            self._set_master(ep, "Sentinel reports a new master")
            return True
        return False

    def _follow_promotion(self) -> None:
        """A replica promoted from our master takes over at once: writes to the old one die."""
        current = self._master
        if current is None:
            return
        for ep in self._replicas:
            if ep.reachable and ep.role == "master" and _promoted_from(ep, current):
                self._set_master(ep, "replica promoted")
                self._topology_dirty = True
                self.wake_monitor()
                return

    def _set_master(self, ep: EndpointHealth, reason: str) -> None:
        old = self._master
        if old is ep:
            return
        self._master = ep
        ep.configured_role = "master"
        self._replicas = [r for r in self._replicas if r is not ep]
        if old is not None:
            old.configured_role = "replica"
            self._replicas.append(old)
        self._master_samples.clear()
        self._expected_replicas = None
        self._replica_drop_seen = False
        log.warning("Redis master is now %s (was %s): %s", ep.label,
                    old.label if old is not None else "unknown", reason)

    # -- cluster state: heartbeats and presence -------------------------------------------------

    async def _heartbeat(self) -> None:
        master = self._master
        if master is None or not master.reachable:
            return
        stats: dict[str, Any] = {}
        if self._node_stats is not None:
            try:
                stats = dict(self._node_stats())
            except Exception:
                log.exception("node_stats() failed")
        sub = self._sub
        stats.update(id=self.node_id, last_seen=time.time(),
                     endpoint=sub.endpoint.label if sub is not None and sub.alive else None)
        ttl = self._heartbeat_ttl
        try:
            async with master.client.pipeline(transaction=False) as pipe:
                pipe.set(self._node_key, json.dumps(stats, default=str), ex=ttl)
                for room, nicks in self._presence.items():
                    pkey = self._presence_key(room)
                    pipe.hset(pkey, self.node_id, json.dumps(nicks))
                    pipe.expire(pkey, ttl)
                await asyncio.wait_for(pipe.execute(), self._check_timeout)
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            master.note_failure(e)

    async def set_presence(self, room: str, nicks: Mapping[str, int]) -> None:
        """Record this node's clients in ``room``; kept locally and rewritten every heartbeat."""
        counts = {n: int(c) for n, c in nicks.items() if c > 0}
        if counts:
            self._presence[room] = counts
        else:
            self._presence.pop(room, None)
        master = self._master
        if master is None:
            return
        pkey = self._presence_key(room)
        try:
            async with master.client.pipeline(transaction=False) as pipe:
                if counts:
                    pipe.hset(pkey, self.node_id, json.dumps(counts))
                    pipe.expire(pkey, self._heartbeat_ttl)
                else:
                    pipe.hdel(pkey, self.node_id)
                await pipe.execute()
        except (RedisError, OSError) as e:
            log.debug("presence for %s not written now: %s", room, e)

    async def presence(self, room: str) -> Presence:
        """Presence summed over nodes whose heartbeat is alive (a dead node's clients drop off)."""
        pkey = self._presence_key(room)

        async def read(client: aioredis.Redis) -> tuple[dict[str, str], list[str]]:
            fields = await client.hgetall(pkey)
            others = [n for n in fields if n != self.node_id]
            if not others:
                return fields, []
            async with client.pipeline(transaction=False) as pipe:
                for n in others:
                    pipe.exists(f"{self._prefix}node:{n}")
                alive = await pipe.execute()
            return fields, [n for n, a in zip(others, alive, strict=True) if a]

        fields, alive = await self._read(self._read_endpoints(), read)
        total: Counter[str] = Counter(self._presence.get(room, {}))
        for node in alive:
            try:
                counts = json.loads(fields[node])
                total.update({str(k): int(v) for k, v in counts.items()})
            except (ValueError, TypeError, AttributeError):
                continue
        dead = [n for n in fields if n != self.node_id and n not in alive]
        master = self._master
        if dead and master is not None and master.reachable:
            with contextlib.suppress(RedisError, OSError):
                await master.client.hdel(pkey, *dead)
        return Presence(count=sum(total.values()), nicks=sorted(n for n in total if n))

    async def cluster_nodes(self) -> list[dict[str, Any]]:
        """Every node with a live heartbeat; this node alone when Redis cannot answer."""
        pattern = f"{self._prefix}node:*"

        async def read(client: aioredis.Redis) -> list[Any]:
            keys = [k async for k in client.scan_iter(match=pattern, count=500)]
            return await client.mget(keys) if keys else []

        try:
            values = await self._read(self._read_endpoints(), read)
        except BrokerUnavailable:
            stats = dict(self._node_stats()) if self._node_stats is not None else {}
            sub = self._sub
            stats.update(id=self.node_id, last_seen=time.time(),
                         endpoint=sub.endpoint.label if sub is not None else None)
            return [stats]
        nodes = []
        for v in values:
            if v is None:
                continue
            try:
                nodes.append(json.loads(v))
            except ValueError:
                continue
        return sorted(nodes, key=lambda n: str(n.get("id", "")))

    # -- reporting ---------------------------------------------------------------------------

    def readiness(self) -> list[str]:
        if not self._started or self._closed:
            return ["broker not started"]
        reasons = []
        master = self._master
        if master is None:
            reasons.append(f"master unknown: {self._sentinel_error or 'not discovered yet'}")
        elif not master.reachable:
            reasons.append("master unreachable")
        elif master.bad_checks >= 2:
            reasons.append(f"master not responding ({master.problem})")
        elif master.role == "replica":
            reasons.append("master is a replica (read-only)")
        sub = self._sub
        if sub is None or not sub.alive:
            reasons.append("no endpoint delivers")
        elif self._probe_overdue(sub):
            reasons.append("no endpoint delivers (delivery probe overdue)")
        return reasons

    def status(self) -> BrokerStatus:
        sub = self._sub
        sub_ep = sub.endpoint if sub is not None and sub.alive else None
        master = self._master
        return BrokerStatus(
            backend="redis",
            master=master.label if master is not None else None,
            subscribed_endpoint=sub_ep.label if sub_ep is not None else None,
            endpoints=tuple(ep.snapshot(ep is sub_ep) for ep in self._endpoints()),
            failovers=tuple(Failover(at=r["at"], from_=r["from"], to=r["to"], reason=r["reason"],
                                     recovered=r["recovered"]) for r in self._failovers),
            failover_count=self._failover_count,
        )


def _promoted_from(new: EndpointHealth, old: EndpointHealth) -> bool:
    """``new`` is a master promoted from a replica of ``old`` (it carries old's replication id)."""
    return (new.role == "master" and bool(old.replid) and new.replid2 == old.replid
            and new.second_offset > 0 and new.replid != old.replid)


def _int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()
