"""Publishing: one Lua script (``publish.lua``) on the master, then ``WAIT`` for replicas.

The script reads the room's last id, ``XADD``s to ``<prefix>room:<room>``
(``MAXLEN ~ history.size``, fields nick, text, ts, node, prev), refreshes
the stream's TTL and ``PUBLISH``es the stored entry on ``<prefix>ch:<room>``.
With an idempotency key it first looks the key up, and answers with the
key's first message instead of storing again (KeyConflict for other
content); a send that got 503 after the script ran is made safe by its
retry finding the key.
With replicas, the same connection then sends ``WAIT``. Nothing is ever
written to a replica: Redis would accept a PUBLISH there and deliver it to
nobody. Owns the script text and its SHA; which endpoint is the master, and
how many acknowledgements to wait for, are the caller's.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import time
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError, ResponseError

from rtchat.broker.base import BrokerUnavailable, KeyConflict, Published, content_digest
from rtchat.broker.redis.endpoint import EndpointHealth, error_text
from rtchat.broker.redis.keys import Keys
from rtchat.messages import Message


class MasterReadOnly(BrokerUnavailable):
    """The master refused the write as a read-only replica: it was demoted."""


@functools.cache
def publish_script() -> str:
    """The text of ``publish.lua``, shipped next to this module."""
    return resources.files(__package__).joinpath("publish.lua").read_text(encoding="utf-8")


class Publisher:
    """Stores and announces messages for one node."""

    def __init__(self, keys: Keys, history_size: int, ttl_seconds: int, wait_ms: int,
                 dedup_seconds: int = 300) -> None:
        self._keys = keys
        self._dedup_seconds = dedup_seconds
        self._size = history_size
        self._ttl = ttl_seconds
        self.wait_ms = wait_ms
        self._script = publish_script()
        self._sha = hashlib.sha1(self._script.encode("utf-8")).hexdigest()

    async def publish(self, master: EndpointHealth, room: str, nick: str, text: str,
                      wait: int, key: str | None = None, user: str = "") -> Published:
        """Store and announce one message; ``WAIT`` for ``wait`` replicas (0 = don't).

        Raises ``BrokerUnavailable`` (``MasterReadOnly`` for a demoted master); the
        failure is noted on ``master``'s health record. ``KeyConflict`` when ``key``
        was used in this room for other content.
        """
        node = self._keys.node_id
        ts = time.time()
        fields: dict[str, Any] = {"nick": nick, "text": text, "ts": ts, "node": node}
        if user:
            fields["user"] = user
        body = json.dumps(fields, ensure_ascii=False, separators=(",", ":"))
        args = (self._size, self._ttl, self._keys.channel(room), nick, text, repr(ts), node, body,
                content_digest(nick, text, user) if key is not None else "", self._dedup_seconds,
                user)
        keys = [self._keys.stream(room)]
        if key is not None:
            keys.append(self._keys.idempotency(room, key))
        writer = master.writer(self.wait_ms)
        try:
            result = await self._run(writer, keys, args, wait)
            if isinstance(result[0], NoScriptError):
                # A restarted (or new) master has an empty script cache; nothing ran.
                await writer.script_load(self._script)
                result = await self._run(writer, keys, args, wait)
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            master.note_failure(e)
            raise BrokerUnavailable(f"Redis master unavailable: {error_text(e)}") from None
        stored = result[0]
        if isinstance(stored, Exception):
            master.note_failure(stored)
            refused = f"Redis master refused the write: {error_text(stored)}"
            if isinstance(stored, ResponseError) and "READONLY" in str(stored):
                raise MasterReadOnly(refused)
            raise BrokerUnavailable(refused)
        state = int(stored[2])
        if state == 2:
            raise KeyConflict(key)
        msg = Message(id=str(stored[0]), room=room, nick=nick, text=text,
                      ts=float(stored[3]), node=str(stored[4]), prev=str(stored[1]), user=user)
        duplicate = state == 1
        if not wait:
            return Published(msg, None, duplicate)
        acks = result[1]
        return Published(msg, isinstance(acks, int) and acks >= wait, duplicate)

    async def _run(self, writer: aioredis.Redis, keys: list[str], args: tuple[Any, ...],
                   wait: int) -> list[Any]:
        # EVALSHA and WAIT must share a connection: WAIT counts that connection's writes.
        async with writer.pipeline(transaction=False) as pipe:
            pipe.evalsha(self._sha, len(keys), *keys, *args)
            if wait:
                pipe.execute_command("WAIT", wait, self.wait_ms)
            return await pipe.execute(raise_on_error=False)
