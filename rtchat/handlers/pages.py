"""The chat page: recent history rendered in, live messages over EventSource; and the
script that shares one stream between all of a browser's chat tabs."""

from __future__ import annotations

from pathlib import Path

import tornado.web

from rtchat.broker.base import FROM_START, BrokerUnavailable
from rtchat.handlers.base import AppContext, BaseHandler, PageHandler
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
            max_message_bytes=self.ctx.cfg.limits.max_message_bytes,
            max_nick_chars=self.ctx.cfg.limits.max_nick_chars,
            # Who the page speaks as when identity is on (the nick box then shows this instead).
            me={"user": speaker.user, "name": speaker.name} if speaker is not None else None,
        )


class ChatWorkerHandler(BaseHandler):
    """``GET /static/chat-worker.js``: the stream-sharing script, run as a SharedWorker (or in
    a page where SharedWorker is missing).

    Served from this origin because the page's policy lets workers load from 'self' only.
    It holds no data, so it needs no identity. Revalidated on every load (an ETag,
    ``no-cache``) so an upgrade never leaves a tab talking to an old worker.
    """

    def initialize(self, ctx: AppContext, body: bytes) -> None:  # type: ignore[override]
        super().initialize(ctx)
        self.body = body

    def get(self) -> None:
        self.set_header("Content-Type", "text/javascript; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        self.finish(self.body)


def chat_worker_script() -> bytes:
    """The script, shipped inside the package (``rtchat/static/chat-worker.js``)."""
    return (Path(__file__).resolve().parent.parent / "static" / "chat-worker.js").read_bytes()
