"""Bans, cluster-wide: one hash on the master, read back by every node each health round.

Owns ``<prefix>bans`` (user -> JSON ``{until, reason, by}``) and this node's
copy of it. Sends and new streams check the copy (no round trip per send);
a ban set through any node reaches every other within one health interval,
and the hub then ends the banned user's open streams. Expired entries are
dropped by the reader that finds them.
"""

from __future__ import annotations

import json
import logging
import time

from redis.exceptions import RedisError

from rtchat.broker.base import Ban, BrokerUnavailable
from rtchat.broker.redis.endpoint import EndpointHealth, error_text
from rtchat.broker.redis.keys import Keys

log = logging.getLogger("rtchat.broker.redis")


class BanList:
    def __init__(self, keys: Keys) -> None:
        self._key = keys.bans
        self._bans: dict[str, Ban] = {}

    def get(self, user: str) -> Ban | None:
        ban = self._bans.get(user)
        return ban if ban is not None and ban.until > time.time() else None

    def all(self) -> list[Ban]:
        now = time.time()
        return sorted((b for b in self._bans.values() if b.until > now), key=lambda b: b.until)

    async def add(self, master: EndpointHealth | None, ban: Ban) -> None:
        if master is None:
            raise BrokerUnavailable("no Redis master known")
        payload = json.dumps({"until": ban.until, "reason": ban.reason, "by": ban.by})
        try:
            await master.client.hset(self._key, ban.user, payload)
        except (RedisError, OSError) as e:
            raise BrokerUnavailable(f"cannot store the ban: {error_text(e)}") from None
        self._bans[ban.user] = ban

    async def remove(self, master: EndpointHealth | None, user: str) -> bool:
        if master is None:
            raise BrokerUnavailable("no Redis master known")
        try:
            removed = await master.client.hdel(self._key, user)
        except (RedisError, OSError) as e:
            raise BrokerUnavailable(f"cannot lift the ban: {error_text(e)}") from None
        known = self._bans.pop(user, None) is not None
        return bool(removed) or known

    async def refresh(self, master: EndpointHealth) -> None:
        """Read every ban from the master; keep the last copy when it cannot answer."""
        try:
            raw = await master.client.hgetall(self._key)
        except (RedisError, OSError) as e:
            log.debug("bans not refreshed: %s", error_text(e))
            return
        now = time.time()
        bans: dict[str, Ban] = {}
        expired = []
        for user, payload in raw.items():
            try:
                data = json.loads(payload)
                ban = Ban(user, float(data["until"]), str(data.get("reason", "")),
                          str(data.get("by", "")))
            except (ValueError, KeyError, TypeError):
                continue
            if ban.until > now:
                bans[user] = ban
            else:
                expired.append(user)
        self._bans = bans
        if expired:
            try:
                await master.client.hdel(self._key, *expired)
            except (RedisError, OSError):
                pass
