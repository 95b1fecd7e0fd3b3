"""The room API: send a message, read recent history, read presence."""

from __future__ import annotations

import json
from typing import Any

from tornado.iostream import StreamClosedError

from rtchat.broker.base import KeyConflict
from rtchat.handlers.base import ApiHandler
from rtchat.messages import InvalidMessage, Message, parse_limit, valid_key, validate_input
from rtchat.ratelimit import RateLimiter

FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")
HISTORY_PIECE = 64 * 1024  # characters of a history answer written before waiting for the socket


class RoomApiHandler(ApiHandler):
    cors = True


class MessagesHandler(RoomApiHandler):
    """``POST`` sends (201 once stored), ``GET`` reads recent history, oldest first."""

    async def post(self, room: str) -> None:
        self.check_room(room)
        limits = self.ctx.cfg.limits
        if not self.origin_allowed():
            raise self.reject(403, "forbidden_origin", "cross-origin sends are not allowed")
        speaker = self.authorize_room(room)
        # The token first: parsing is work, and a flood must not get it for free.
        wait = self.ctx.send_limiter.take(self.client_address)
        if wait > 0:
            raise self.reject(429, "rate_limited", "too many messages; slow down",
                              retry_after=RateLimiter.retry_after(wait))
        if len(self.request.body) > limits.max_body_bytes:
            raise self.reject(413, "body_too_large",
                              f"request body is larger than {limits.max_body_bytes} bytes")
        nick, text, body_key = self._fields()
        key = self._idempotency_key(body_key)
        if speaker is not None:
            nick = speaker.name  # who the token (or the proxy) says, never what the body says
        try:
            nick, text = validate_input(nick, text, limits.max_nick_chars, limits.max_message_bytes)
        except InvalidMessage as e:
            if speaker is not None and e.code == "bad_nick":
                nick, text = validate_input(speaker.user, text, limits.max_nick_chars,
                                            limits.max_message_bytes)
            else:
                raise self.reject(e.status, e.code, str(e)) from None
        user = speaker.user if speaker is not None else ""
        try:
            published = await self.ctx.hub.publish(room, nick, text, key, user)  # 503 if down
        except KeyConflict:
            raise self.reject(422, "idempotency_key_reused",
                              "this Idempotency-Key was already used in this room for another "
                              "message") from None
        body: dict[str, Any] = {"id": published.message.id}
        if published.replicated is not None:
            body["replicated"] = published.replicated
        if published.duplicate:
            body["duplicate"] = True  # the first answer again: nothing was stored twice
        self.write_json(body, status=201)

    def _idempotency_key(self, body_key: Any) -> str | None:
        """The send's key: the ``Idempotency-Key`` header, else ``key`` in the body."""
        key = self.request.headers.get("Idempotency-Key")
        if key is None:
            key = body_key
        if key is None or key == "":
            return None
        if not isinstance(key, str) or not valid_key(key):
            raise self.reject(400, "bad_idempotency_key",
                              "Idempotency-Key must be 1-64 of A-Z a-z 0-9 _ -")
        return key

    def _fields(self) -> tuple[Any, Any, Any]:
        ctype = self.request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype in FORM_TYPES:
            arg = self.get_body_argument
            return arg("nick", None), arg("text", None), arg("key", None, strip=False)
        if ctype not in ("", "application/json", "text/plain"):
            raise self.reject(415, "unsupported_media_type",
                              "send JSON {\"nick\", \"text\"} or a form")
        try:
            data = json.loads(self.request.body or b"")
        except (ValueError, UnicodeDecodeError, RecursionError):
            # RecursionError: nesting deeper than the parser goes is not JSON we take either.
            raise self.reject(400, "bad_json", "the body is not valid JSON") from None
        if not isinstance(data, dict):
            raise self.reject(400, "bad_json", "the body must be a JSON object")
        return data.get("nick"), data.get("text"), data.get("key")

    async def get(self, room: str) -> None:
        self.check_room(room)
        self.take_read_token()
        self.authorize_room(room)
        size = self.ctx.cfg.history.size
        limit = parse_limit(self.get_query_argument("limit", "50", strip=False))
        if limit is None or limit < 1:
            raise self.reject(400, "bad_limit", f"limit must be a whole number from 1 (at most {size} "
                                                "are kept)")
        limit = min(limit, size)  # asking for more than is kept gets what is kept
        history = await self.ctx.hub.history(room, limit)
        await self._write_messages(history)

    async def _write_messages(self, history: list[Message]) -> None:
        """``{"messages": [...]}``, written in pieces that each wait for the socket, so a
        client that does not read holds one piece of the node's memory, not the answer."""
        pieces = ['{"messages": [']
        pending = len(pieces[0])
        for i, msg in enumerate(history):
            item = json.dumps(msg.public_dict(), ensure_ascii=False)
            pieces.append(item if i == 0 else ", " + item)
            pending += len(item) + 2
            if pending >= HISTORY_PIECE:
                self.write("".join(pieces))
                pieces, pending = [], 0
                try:
                    await self.flush()
                except StreamClosedError:
                    return  # the client went (or the node gave up on a reader that stalled)
        pieces.append("]}")
        self.finish("".join(pieces))


class PresenceHandler(RoomApiHandler):
    async def get(self, room: str) -> None:
        self.check_room(room)
        self.take_read_token()
        self.authorize_room(room)
        presence = await self.ctx.hub.presence(room)
        self.write_json({"room": room, "count": presence.count,
                         "nicks": [n for n in presence.nicks if n]})

