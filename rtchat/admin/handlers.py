"""The admin handlers: the page, its script, its status JSON, its live event stream, the
disconnect action.

Every handler here but the script's (which holds no data) runs
:meth:`AdminAccess.prepare` first: HTTP Basic with
``admin.username``/``admin.password`` (401 with a challenge otherwise, failed
logins throttled per client with 429), or, with no password configured,
loopback clients only (403 otherwise). With ``admin.enabled: false`` these
routes do not exist at all (404).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from tornado.iostream import StreamClosedError

from rtchat import sse
from rtchat.admin.access import (
    REALM,
    LoginThrottle,
    basic_credentials,
    credentials_match,
    is_loopback,
)
from rtchat.admin.sampler import ThroughputSampler
from rtchat.admin.status import build_status
from rtchat.broker.base import Ban
from rtchat.handlers.base import (
    ApiError,
    ApiHandler,
    AppContext,
    BaseHandler,
    PageHandler,
    ScriptHandler,
    package_script,
)
from rtchat.identity import COOKIE, AuthError, bearer
from rtchat.proxies import has_forwarding
from rtchat.ratelimit import RateLimiter

MAX_BAN_SECONDS = 366 * 86400
EVENTS_INTERVAL = 1.0  # seconds between status snapshots on /admin/api/events
EVENTS_RETRY_MS = 2000

log = logging.getLogger("rtchat.admin")


@dataclass
class AdminContext:
    """The admin pages' own state, one per app: the throughput sampler and the login throttle."""

    sampler: ThroughputSampler
    logins: LoginThrottle


class AdminAccess(BaseHandler):
    """Authorization for every admin handler, and the headers its refusals need."""

    admin: AdminContext
    frame_ancestors = "'none'"  # the disconnect button must not be clickable from any frame

    def initialize(self, ctx: AppContext, admin: AdminContext) -> None:  # type: ignore[override]
        super().initialize(ctx)
        self.admin = admin

    def prepare(self) -> None:
        super().prepare()
        self.admin.sampler.start()  # lazily, in case make_app ran before the loop did
        self.authorize()

    # Who is acting: the Basic user, the token's sub, or "loopback"; every action logs it.
    who = ""

    def authorize(self) -> None:
        cfg = self.ctx.cfg.admin
        client = self.client_address
        if self._admin_token():
            return
        if not cfg.password and not cfg.password_hash:
            # Loopback alone is not enough: a proxy on this host makes every client loopback.
            if not is_loopback(self.peer_address) or has_forwarding(self.request.headers):
                raise self.reject(403, "admin_loopback_only",
                                  "no admin password is configured, so admin answers only to "
                                  "direct loopback clients (not through a proxy)")
            # And only by a loopback name: a DNS-rebinding page in a local browser reaches
            # 127.0.0.1 too, but under its own host name.
            host = self.request.host_name.lower().strip("[]")
            if host != "localhost" and not is_loopback(host):
                raise self.reject(403, "admin_loopback_only",
                                  "with no admin password, open admin as http://localhost/ or "
                                  "http://127.0.0.1/, not by another host name")
            self.who = "loopback"
            return
        # A shut-out client is refused before its credentials are even looked at.
        wait = self.admin.logins.wait(client)
        if wait > 0:
            raise self._throttled(wait)
        given = basic_credentials(self.request.headers.get("Authorization"))
        if given is None:  # the browser's first request: a challenge, not a failed login
            raise self.reject(401, "unauthorized", "admin needs a username and password")
        if not credentials_match(given, cfg.username, cfg.password, cfg.password_hash):
            wait = self.admin.logins.failed(client)
            if wait > 0:
                raise self._throttled(wait)
            raise self.reject(401, "unauthorized", "wrong admin username or password")
        self.who = given[0]

    def _admin_token(self) -> bool:
        """A JWT with ``admin: true`` (auth.mode jwt) opens the admin API too."""
        auth = self.ctx.auth
        if auth.mode != "jwt":
            return False
        token = bearer(self.request.headers.get("Authorization")) or self.get_cookie(COOKIE)
        if not token:
            return False
        try:
            identity = auth.verify(token)
        except AuthError as e:
            raise self.reject(401, "unauthorized", str(e),
                              headers={"WWW-Authenticate": 'Bearer realm="rtchat"'}) from None
        if not identity.admin:
            raise self.reject(403, "not_admin", "this token does not carry admin: true")
        self.who = f"token:{identity.user}"
        return True

    def acted(self, action: str, target: str, **details: Any) -> None:
        extra = "".join(f" {k}={v!r}" for k, v in details.items())
        log.info("admin %s by %s from %s: %s%s", action, self.who, self.client_address, target, extra)

    def _throttled(self, wait: float) -> ApiError:
        return self.reject(429, "admin_login_rate_limited", "too many failed logins; try again later",
                           retry_after=RateLimiter.retry_after(wait))

    def set_default_headers(self) -> None:
        super().set_default_headers()
        self.set_header("Cache-Control", "no-store")
        # The disconnect button must not be clickable from someone else's frame (pages get
        # a whole policy with this frame-ancestors in render_page).
        self.set_header("X-Frame-Options", "DENY")
        self.set_header("Content-Security-Policy", "frame-ancestors 'none'")

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        # send_error cleared the headers; the challenge and Retry-After go back on here.
        if status_code == 401:
            self.set_header("WWW-Authenticate", f'Basic realm="{REALM}", charset="UTF-8"')
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, ApiError) and exc.retry_after is not None:
            self.set_header("Retry-After", str(exc.retry_after))
        super().write_error(status_code, **kwargs)

    async def status(self) -> dict[str, Any]:
        return await build_status(self.ctx.hub, self.admin.sampler, self.ctx.version)


class AdminPageHandler(AdminAccess, PageHandler):
    """``GET /admin``: the page's shell and the current snapshot as JSON.

    Everything on the page is drawn by one script, ``/static/admin.js``, from
    that snapshot and then from each one on ``/admin/api/events``: one render
    path, so a new column is one edit.
    """

    async def get(self) -> None:
        self.render_page("admin.html", status=await self.status())


class AdminStatusHandler(AdminAccess, ApiHandler):
    """``GET /admin/api/status``: the snapshot the page renders from."""

    async def get(self) -> None:
        self.write_json(await self.status())


class AdminEventsHandler(AdminAccess, ApiHandler):
    """``GET /admin/api/events``: a ``status`` event with a fresh snapshot every second.

    The wait between snapshots is woken when the client goes, so a closed page
    costs nothing after its connection drops.
    """

    _gone: asyncio.Event | None = None

    async def get(self) -> None:
        self._gone = asyncio.Event()
        for name, value in sse.HEADERS:
            self.set_header(name, value)
        self.write(sse.retry(EVENTS_RETRY_MS))
        try:
            while not self._gone.is_set():
                self.write(sse.json_event("status", await self.status()))
                await self.flush()
                try:
                    await asyncio.wait_for(self._gone.wait(), EVENTS_INTERVAL)
                except asyncio.TimeoutError:
                    pass
        except StreamClosedError:
            pass

    def on_connection_close(self) -> None:
        if self._gone is not None:
            self._gone.set()


class ClientDisconnectHandler(AdminAccess, ApiHandler):
    """``POST /admin/api/clients/<id>/disconnect``: end exactly that client's stream.

    The client may reconnect (it resumes with Last-Event-ID); this is a kick, not a ban.
    """

    def post(self, client_id: str) -> None:
        if not self.origin_allowed():
            raise self.reject(403, "forbidden_origin", "cross-origin admin actions are not allowed")
        if not self.ctx.hub.disconnect(client_id):
            raise self.reject(404, "unknown_client", f"no client {client_id!r} on this node")
        self.acted("disconnect", client_id)
        self.write_json({"disconnected": client_id})


class AdminActionHandler(AdminAccess, ApiHandler):
    """The admin actions that take a JSON body; refused cross-origin like every admin action."""

    def prepare(self) -> None:
        super().prepare()
        if self.request.method != "GET" and not self.origin_allowed():
            raise self.reject(403, "forbidden_origin", "cross-origin admin actions are not allowed")

    def body_json(self) -> dict[str, Any]:
        if not self.request.body:
            return {}
        try:
            data = json.loads(self.request.body)
        except (ValueError, RecursionError):
            raise self.reject(400, "bad_json", "the body is not valid JSON") from None
        if not isinstance(data, dict):
            raise self.reject(400, "bad_json", "the body must be a JSON object")
        return data

    def reason(self, data: dict[str, Any]) -> str:
        reason = data.get("reason", "")
        if not isinstance(reason, str) or len(reason) > 200:
            raise self.reject(400, "bad_reason", "'reason' must be text of at most 200 characters")
        return reason.strip()


class ClientKickHandler(AdminActionHandler):
    """``POST /admin/api/clients/<id>/kick`` ``{"reason"}``: the stream ends with
    ``event: kicked``, and the chat page does not reconnect by itself."""

    def post(self, client_id: str) -> None:
        reason = self.reason(self.body_json()) or "kicked by an admin"
        if not self.ctx.hub.kick(client_id, reason):
            raise self.reject(404, "unknown_client", f"no client {client_id!r} on this node")
        self.acted("kick", client_id, reason=reason)
        self.write_json({"kicked": client_id, "reason": reason})


class UserBanHandler(AdminActionHandler):
    """``POST /admin/api/users/<user>/ban`` ``{"duration_seconds", "reason"}`` bans a user id
    (an address in anonymous mode) on every node; ``DELETE`` lifts it."""

    async def post(self, user: str) -> None:
        data = self.body_json()
        seconds = data.get("duration_seconds")
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) \
                or not 0 < seconds <= MAX_BAN_SECONDS:
            raise self.reject(400, "bad_duration",
                              f"'duration_seconds' must be a number from 1 to {MAX_BAN_SECONDS}")
        reason = self.reason(data)
        ban = Ban(user=user, until=time.time() + float(seconds), reason=reason, by=self.who)
        kicked = await self.ctx.hub.ban(ban)  # BrokerUnavailable: 503
        self.acted("ban", user, seconds=seconds, reason=reason)
        self.write_json({**ban.to_dict(), "kicked_here": kicked})

    async def delete(self, user: str) -> None:
        if not await self.ctx.hub.unban(user):
            raise self.reject(404, "not_banned", f"{user!r} is not banned")
        self.acted("unban", user)
        self.write_json({"unbanned": user})


class BansHandler(AdminActionHandler):
    """``GET /admin/api/bans``: every ban in force, cluster-wide."""

    def get(self) -> None:
        self.write_json({"bans": [b.to_dict() for b in self.ctx.hub.bans()]})


def admin_routes(ctx: AppContext) -> list[tuple[str, type, dict[str, Any]]]:
    """The admin route table; ``make_app`` adds it only when ``admin.enabled`` is on."""
    sampler = ThroughputSampler(ctx.hub)
    sampler.start()
    args = {"ctx": ctx, "admin": AdminContext(sampler=sampler, logins=LoginThrottle())}
    return [
        (r"/admin/?", AdminPageHandler, args),
        (r"/admin/api/status", AdminStatusHandler, args),
        (r"/admin/api/events", AdminEventsHandler, args),
        (r"/admin/api/clients/([^/]+)/disconnect", ClientDisconnectHandler, args),
        (r"/admin/api/clients/([^/]+)/kick", ClientKickHandler, args),
        (r"/admin/api/users/([^/]+)/ban", UserBanHandler, args),
        (r"/admin/api/bans", BansHandler, args),
        (r"/static/admin\.js", ScriptHandler,
         {"ctx": ctx, "body": package_script("admin", "static", "admin.js")}),
    ]
