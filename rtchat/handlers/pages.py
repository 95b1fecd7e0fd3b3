"""The chat page: recent history rendered in, live messages over EventSource; and the
script that shares one stream between all of a browser's chat tabs."""

from __future__ import annotations

import tornado.web

from rtchat.broker.base import FROM_START, BrokerUnavailable
from rtchat.handlers.base import PageHandler
from rtchat.messages import valid_room

PAGE_HISTORY = 50


class ChatPageHandler(PageHandler):
    async def get(self, room: str = "lobby") -> None:
        if not valid_room(room):
            raise tornado.web.HTTPError(404)
        speaker = self.authorize_room(room)  # 401/403 pages in the jwt and header modes
        try:
            history = await self.ctx.hub.history(room, PAGE_HISTORY)
        except BrokerUnavailable:
            history = []  # the page still works; the stream catches up when the broker is back
        self.set_header("Cache-Control", "no-store")
        self.render_page(
            "chat.html",
            room=room,
            history=[m.public_dict() for m in history],
            # An empty room resumes "from the start": nothing posted after this render is missed.
            last_id=history[-1].id if history else FROM_START,
            max_nick_chars=self.ctx.cfg.limits.max_nick_chars,
            # Who the page speaks as when identity is on (the nick box then shows this instead).
            me={"user": speaker.user, "name": speaker.name} if speaker is not None else None,
        )
