"""Publishing: one Lua script (``publish.lua``) on the master, then ``WAIT`` for replicas.

The script reads the room's last id, ``XADD``s to ``<prefix>room:<room>``
(``MAXLEN ~ history.size``, fields nick, text, ts, node, prev), refreshes
the stream's TTL and ``PUBLISH``es the stored entry on ``<prefix>ch:<room>``.
With an idempotency key it first looks the key up, and answers with the
key's first message instead of storing again (KeyConflict for other
content); a send that got 503 after the script ran is made safe by its
retry finding the key.
With replicas, the same connection then sends ``WAIT``. Sends that arrive
together share one pipeline and one ``WAIT`` (group commit). Nothing is ever
written to a replica: Redis would accept a PUBLISH there and deliver it to
nobody. Owns the script text and its SHA; which endpoint is the master, and
how many acknowledgements to wait for, are the caller's.

In a Redis Cluster the script announces with ``SPUBLISH`` (``publish_command``)
and the caller routes each send to its slot's master; a ``MOVED``/``ASK``
answer (the script did not run) comes back as ``Redirected`` for the caller to
follow, an ``ASK`` by sending again with ``asking=True``.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import AskError, MovedError, NoScriptError, RedisError, ResponseError

from rtchat.broker.base import BrokerUnavailable, KeyConflict, Published, content_digest
from rtchat.broker.redis.endpoint import EndpointHealth, error_text
from rtchat.broker.redis.keys import Keys
from rtchat.broker.redis.tasks import start
from rtchat.messages import Message


class MasterReadOnly(BrokerUnavailable):
    """The master refused the write as a read-only replica: it was demoted."""


class Redirected(BrokerUnavailable):
    """A cluster node answered ``MOVED`` or ``ASK``: the script did not run; send it to
    ``host:port`` (with ``ASKING`` first when ``ask``)."""

    def __init__(self, reason: str, host: str, port: int, ask: bool) -> None:
        super().__init__(reason)
        self.host = host
        self.port = port
        self.ask = ask


@functools.cache
def publish_script() -> str:
    """The text of ``publish.lua``, shipped next to this module."""
    return resources.files(__package__).joinpath("publish.lua").read_text(encoding="utf-8")


@dataclass
class _Send:
    """One send waiting for its batch."""

    room: str
    nick: str
    text: str
    user: str
    key: str | None
    ts: float
    keys: list[str]
    args: tuple[Any, ...]
    done: asyncio.Future[Published] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())


class Publisher:
    """Stores and announces messages for one node, with group commit.

    Sends that arrive while a batch is at the master go together in the next
    one: one pipeline of scripts and one shared ``WAIT``, so concurrent sends
    cost one round trip instead of two each. Each still gets its own id and
    its own answer, and none is answered before the master stored it.
    """

    MAX_BATCH = 256  # sends in one pipeline at most; the rest go in the next

    def __init__(self, keys: Keys, history_size: int, ttl_seconds: int, wait_ms: int,
                 dedup_seconds: int = 300, publish_command: str = "PUBLISH") -> None:
        self._keys = keys
        self._publish_command = publish_command
        self._dedup_seconds = dedup_seconds
        self._size = history_size
        self._ttl = ttl_seconds
        self.wait_ms = wait_ms
        self._script = publish_script()
        self._sha = hashlib.sha1(self._script.encode("utf-8")).hexdigest()
        self._pending: dict[tuple[EndpointHealth, int, bool], list[_Send]] = {}
        self._flushing: set[tuple[EndpointHealth, int, bool]] = set()
        self._flushes: set[asyncio.Future[None]] = set()  # their tasks, held until done
        self.batches = 0  # pipelines sent (sends / batches = the mean batch size)
        self.sends = 0

    async def publish(self, master: EndpointHealth, room: str, nick: str, text: str,
                      wait: int, key: str | None = None, user: str = "",
                      asking: bool = False) -> Published:
        """Store and announce one message; ``WAIT`` for ``wait`` replicas (0 = don't).

        Raises ``BrokerUnavailable`` (``MasterReadOnly`` for a demoted master); the
        failure is noted on ``master``'s health record. ``KeyConflict`` when ``key``
        was used in this room for other content. ``asking``: each script follows an
        ``ASKING`` (a cluster slot being imported by ``master``).
        """
        node = self._keys.node_id
        ts = time.time()
        fields: dict[str, Any] = {"nick": nick, "text": text, "ts": ts, "node": node}
        if user:
            fields["user"] = user
        body = json.dumps(fields, ensure_ascii=False, separators=(",", ":"))
        args = (self._size, self._ttl, self._keys.channel(room), nick, text, repr(ts), node, body,
                content_digest(nick, text, user) if key is not None else "", self._dedup_seconds,
                user, self._publish_command)
        keys = [self._keys.stream(room)]
        if key is not None:
            keys.append(self._keys.idempotency(room, key))
        send = _Send(room, nick, text, user, key, ts, keys, args)
        group = (master, wait, asking)
        self._pending.setdefault(group, []).append(send)
        if group not in self._flushing:
            self._flushing.add(group)
            start(self._flush(group), "redis-publish", self._flushes)
        return await asyncio.shield(send.done)  # a cancelled caller leaves its batch whole

    async def _flush(self, group: tuple[EndpointHealth, int, bool]) -> None:
        """Send batches for ``group`` until none is waiting; one batch at a time."""
        master, wait, asking = group
        try:
            while self._pending.get(group):
                sends = self._pending[group][:self.MAX_BATCH]
                del self._pending[group][:len(sends)]
                await self._commit(master, wait, sends, asking)
        finally:
            self._flushing.discard(group)
            if not self._pending.get(group):
                self._pending.pop(group, None)

    async def _commit(self, master: EndpointHealth, wait: int, sends: list[_Send],
                      asking: bool = False) -> None:
        writer = master.writer(self.wait_ms)
        self.batches += 1
        self.sends += len(sends)
        try:
            results = await self._run(writer, sends, wait, asking)
            retry = [i for i, r in enumerate(results[:len(sends)]) if isinstance(r, NoScriptError)]
            if retry:
                # A restarted (or new) master has an empty script cache; those did not run.
                await writer.script_load(self._script)
                again = await self._run(writer, [sends[i] for i in retry], wait, asking)
                for n, i in enumerate(retry):
                    results[i] = again[n]
                if wait:
                    results[len(sends)] = again[len(retry)]
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            master.note_failure(e)
            failure = BrokerUnavailable(f"Redis master unavailable: {error_text(e)}")
            for send in sends:
                _settle(send.done, error=failure)
            return
        acks = results[len(sends)] if wait else None
        for send, stored in zip(sends, results, strict=False):
            _settle(send.done, *self._answer(master, send, stored, wait, acks))

    def _answer(self, master: EndpointHealth, send: _Send, stored: Any, wait: int, acks: Any
                ) -> tuple[Published | None, BaseException | None]:
        if isinstance(stored, AskError):  # MOVED too: a MovedError is an AskError
            host, port = stored.node_addr
            return None, Redirected(f"Redis Cluster redirect: {error_text(stored)}", host, port,
                                    ask=not isinstance(stored, MovedError))
        if isinstance(stored, Exception):
            master.note_failure(stored)
            refused = f"Redis master refused the write: {error_text(stored)}"
            if isinstance(stored, ResponseError) and "READONLY" in str(stored):
                return None, MasterReadOnly(refused)
            return None, BrokerUnavailable(refused)
        state = int(stored[2])
        if state == 2:
            return None, KeyConflict(send.key)
        msg = Message(id=str(stored[0]), room=send.room, nick=send.nick, text=send.text,
                      ts=float(stored[3]), node=str(stored[4]), prev=str(stored[1]),
                      user=send.user)
        replicated = (isinstance(acks, int) and acks >= wait) if wait else None
        return Published(msg, replicated, state == 1), None

    async def _run(self, writer: aioredis.Redis, sends: list[_Send], wait: int,
                   asking: bool = False) -> list[Any]:
        # The scripts and WAIT must share a connection: WAIT counts that connection's writes.
        async with writer.pipeline(transaction=False) as pipe:
            for send in sends:
                if asking:
                    pipe.execute_command("ASKING")
                pipe.evalsha(self._sha, len(send.keys), *send.keys, *send.args)
            if wait:
                pipe.execute_command("WAIT", wait, self.wait_ms)
            results = await pipe.execute(raise_on_error=False)
        if asking:  # one answer per script, then WAIT's: drop the ASKING answers
            return [*results[1:2 * len(sends):2], *results[2 * len(sends):]]
        return results


def _settle(done: asyncio.Future[Published], result: Published | None = None,
            error: BaseException | None = None) -> None:
    if done.done():
        return
    if error is not None:
        done.set_exception(error)
        done.exception()  # retrieved here: a caller that went away must not leave it unseen
    else:
        done.set_result(result)  # type: ignore[arg-type]
