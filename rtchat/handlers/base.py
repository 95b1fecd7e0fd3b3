"""Handler bases: the shared context, client identity, the response policy, two error renderers.

``PageHandler`` errors render ``error.html`` for people; ``ApiHandler`` errors
are JSON ``{"error", "message"}`` for programs. Neither ever shows a traceback.

Every response carries ``nosniff`` and ``Referrer-Policy`` and no ``Server``
banner; pages add a Content-Security-Policy whose script nonce is fresh per
response. A ``Host`` outside ``http.allowed_hosts`` is 421 (DNS rebinding).
Origins in ``http.allowed_origins`` get CORS on the API and the streams.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jinja2
import tornado.web
from tornado import httputil

from rtchat.broker.base import BrokerUnavailable
from rtchat.config import Config
from rtchat.hub import Hub
from rtchat.identity import COOKIE, Authenticator, AuthError, Identity
from rtchat.messages import valid_room
from rtchat.metrics import Metrics
from rtchat.proxies import ProxyTrust, has_forwarding
from rtchat.ratelimit import RateLimiter
from rtchat.server import ServerState

log = logging.getLogger("rtchat.web")


@dataclass
class AppContext:
    """Everything handlers need, built once in ``main()`` and passed via ``initialize``."""

    cfg: Config
    hub: Hub
    metrics: Metrics
    templates: jinja2.Environment
    send_limiter: RateLimiter
    read_limiter: RateLimiter
    version: str
    trust: ProxyTrust
    auth: Authenticator
    server: ServerState = field(default_factory=ServerState)
    # Told once: requests arrive through a proxy whose forwarded addresses are not believed.
    warned_untrusted_proxy: bool = False


class ApiError(tornado.web.HTTPError):
    """An API refusal with a machine-readable ``code``, optional ``Retry-After`` and headers."""

    def __init__(self, status: int, code: str, message: str, retry_after: int | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(status, log_message=None, reason=None)
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.headers = headers or {}


_DEFAULT_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                  405: "method_not_allowed", 413: "payload_too_large", 421: "misdirected_request",
                  422: "unprocessable",
                  429: "rate_limited", 503: "unavailable"}
_DEFAULT_PORTS = {"http": 80, "https": 443}
CORS_METHODS = "GET, POST, OPTIONS"
CORS_HEADERS = "Content-Type, Last-Event-ID, Idempotency-Key, Authorization"
CORS_MAX_AGE = "600"
# Probes come by address, not by name; they are exempt from the Host check.
HOST_CHECK_EXEMPT = ("/healthz", "/readyz")


_date = [0, ""]  # the second and its Date header, formatted once a second


def http_date() -> str:
    now = int(time.time())
    if now != _date[0]:
        _date[:] = [now, httputil.format_timestamp(now)]
    return _date[1]


def origin_key(origin: str) -> tuple[str, str, int] | None:
    """``(scheme, host, port)`` of an origin or URL, default ports filled in; None if malformed."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    return scheme, parts.hostname.lower(), port or _DEFAULT_PORTS[scheme]


class BaseHandler(tornado.web.RequestHandler):
    ctx: AppContext
    _client: str | None = None
    _identity: Identity | None = None
    _identified = False
    # Who may frame this handler's pages; None = ``http.frame_ancestors``.
    frame_ancestors: str | None = None
    # Origins in http.allowed_origins may call this handler from a browser (CORS).
    cors = False

    # Every response starts with these (``clear``); subclasses' ``set_default_headers`` add.
    default_headers = {"Content-Type": "text/html; charset=UTF-8",
                       "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin"}

    def initialize(self, ctx: AppContext) -> None:
        self.ctx = ctx

    def clear(self) -> None:
        """RequestHandler.clear without its per-response costs: no ``Server`` banner to add
        and take off again, the Date formatted once a second, the defaults set at once."""
        headers = httputil.HTTPHeaders(self.default_headers)
        headers["Date"] = http_date()
        self._headers = headers
        self.set_default_headers()
        self._write_buffer: list[bytes] = []
        self._status_code = 200
        self._reason = "OK"

    def prepare(self) -> Any:
        self.check_host()

    def check_host(self) -> None:
        allowed = self.ctx.cfg.http.allowed_hosts
        if not allowed or self.request.path in HOST_CHECK_EXEMPT:
            return
        host = self.request.host_name.lower()  # without the port
        if host not in allowed and "*" not in allowed:
            raise self.reject(421, "unknown_host", f"this server does not answer for host {host!r}")

    @property
    def peer_address(self) -> str:
        """The TCP peer, whatever the headers say."""
        return self.request.remote_ip or ""

    @property
    def client_address(self) -> str:
        """The client: the TCP peer, or the address a trusted proxy forwarded (rtchat.proxies)."""
        if self._client is None:
            headers = self.request.headers
            self._client = self.ctx.trust.client(self.peer_address, headers)
            if (not self.ctx.warned_untrusted_proxy and self._client == self.peer_address
                    and has_forwarding(headers)):
                self.ctx.warned_untrusted_proxy = True
                log.warning("requests from %s carry forwarding headers that are not believed "
                            "(http.xheaders is %s, http.trusted_proxies %s): rate limits count "
                            "that peer as one client", self.peer_address,
                            "on" if self.ctx.cfg.http.xheaders else "off",
                            list(self.ctx.cfg.http.trusted_proxies) or "loopback")
        return self._client

    @property
    def client_protocol(self) -> str:
        return self.ctx.trust.protocol(self.peer_address, self.request.headers, self.request.protocol)

    def set_cors_headers(self) -> None:
        """CORS for a listed origin; ``Vary: Origin`` on every answer that could carry it."""
        if not self.cors or not self.ctx.cfg.http.allowed_origins:
            return
        self.set_header("Vary", "Origin")
        origin = self.listed_origin()
        if origin is not None:
            self.set_header("Access-Control-Allow-Origin", origin)
            self.set_header("Access-Control-Allow-Credentials", "true")
            self.set_header("Access-Control-Expose-Headers", "Retry-After")

    def reject(self, status: int, code: str, message: str, retry_after: int | None = None,
               headers: dict[str, str] | None = None) -> ApiError:
        """Count a refusal by reason and build the error to raise."""
        self.ctx.metrics.rejected.labels(reason=code).inc()
        return ApiError(status, code, message, retry_after, headers)

    @property
    def identity(self) -> Identity | None:
        """Who is speaking (``auth.mode``); None when anonymous. Raises 401 when required
        and missing or invalid."""
        if not self._identified:
            try:
                self._identity = self.ctx.auth.identify(
                    self.request.headers, self.get_cookie(COOKIE),
                    self.get_query_argument("token", None), self.ctx.trust.trusts(self.peer_address))
            except AuthError as e:
                raise self.reject(401, "unauthorized", str(e),
                                  headers={"WWW-Authenticate": 'Bearer realm="rtchat"'}) from None
            self._identified = True
        return self._identity

    def authorize_room(self, room: str) -> Identity | None:
        """The speaker in ``room``: 401 without a required identity, 403 for a room the
        token does not allow or a banned user (an address in anonymous mode)."""
        identity = self.identity
        if identity is not None and not identity.may_enter(room):
            raise self.reject(403, "room_forbidden", f"you may not enter room {room!r}")
        ban = self.ctx.hub.banned(identity.user if identity is not None else self.client_address)
        if ban is not None:
            raise self.reject(403, "banned", f"banned: {ban.reason}" if ban.reason else "banned")
        return identity

    def take_read_token(self) -> None:
        """Reads (history, presence, stream opens) have their own per-client token bucket."""
        wait = self.ctx.read_limiter.take(self.client_address)
        if wait > 0:
            raise self.reject(429, "read_rate_limited", "too many reads; slow down",
                              retry_after=RateLimiter.retry_after(wait))

    def listed_origin(self) -> str | None:
        """The request's Origin when it is one of ``http.allowed_origins`` (scheme, host, port)."""
        origin = self.request.headers.get("Origin")
        if origin is None:
            return None
        key = origin_key(origin)
        if key is None:
            return None
        if any(origin_key(o) == key for o in self.ctx.cfg.http.allowed_origins):
            return origin.strip()
        return None

    def origin_allowed(self) -> bool:
        """CSRF check: no Origin header, the same origin, or one listed in ``http.allowed_origins``."""
        origin = self.request.headers.get("Origin")
        if origin is None:
            return True
        if self.listed_origin() is not None:
            return True
        key = origin_key(origin)
        return key is not None and key == origin_key(f"{self.client_protocol}://{self.request.host}")

    def render_page(self, name: str, **context: Any) -> None:
        template = self.ctx.templates.get_template(name)
        nonce = secrets.token_urlsafe(16)
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Content-Security-Policy", self.page_policy(nonce))
        self.finish(template.render(version=self.ctx.version, csp_nonce=nonce, **context))

    def page_policy(self, nonce: str) -> str:
        return ("default-src 'self'; "
                f"script-src 'self' 'nonce-{nonce}'; "
                "style-src 'self' 'unsafe-inline'; "
                "img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
                f"form-action 'self'; "
                f"frame-ancestors {self.frame_ancestors or self.ctx.cfg.http.frame_ancestors}")

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        # Refusals and a broker that is down are answers, not server faults; anything else
        # is logged once, server side.
        if isinstance(value, (tornado.web.HTTPError, BrokerUnavailable)):
            return
        super().log_exception(typ, value, tb)


class PageHandler(BaseHandler):
    """HTML pages: errors are a small page, never a traceback."""

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        message = self._reason
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, ApiError):
            message = exc.message
            for name, value in exc.headers.items():
                self.set_header(name, value)
        try:
            self.render_page("error.html", status=status_code, message=message)
        except Exception:  # a broken template must not hide the original error
            self.finish(f"{status_code} {message}")


class ApiHandler(BaseHandler):
    """JSON endpoints: errors are ``{"error": code, "message": text}``."""

    default_headers = {**BaseHandler.default_headers,
                       "Content-Type": "application/json; charset=utf-8"}

    def check_room(self, room: str) -> None:
        if not valid_room(room):
            raise self.reject(400, "bad_room", "room names are 1-64 of A-Z a-z 0-9 _ -")

    def prepare(self) -> Any:
        super().prepare()
        self.set_cors_headers()

    def options(self, *args: Any) -> None:
        """A CORS preflight: 204 with what may be asked, for a listed origin; 403 otherwise."""
        if not self.cors:
            raise tornado.web.HTTPError(405)
        if self.listed_origin() is None:
            raise self.reject(403, "forbidden_origin", "this origin may not call the API")
        self.set_header("Access-Control-Allow-Methods", CORS_METHODS)
        self.set_header("Access-Control-Allow-Headers", CORS_HEADERS)
        self.set_header("Access-Control-Max-Age", CORS_MAX_AGE)
        self.clear_header("Content-Type")
        self.set_status(204)
        self.finish()

    def write_json(self, payload: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(json.dumps(payload, ensure_ascii=False))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, BrokerUnavailable):  # any handler's broker call: 503, try again soon
            status_code = 503
            self.set_status(status_code)
            exc = self.reject(503, "broker_unavailable", exc.reason, retry_after=exc.retry_after)
        code = _DEFAULT_CODES.get(status_code, "error")
        message = self._reason
        if isinstance(exc, ApiError):
            code, message = exc.code, exc.message
            if exc.retry_after is not None:
                self.set_header("Retry-After", str(exc.retry_after))
            for name, value in exc.headers.items():
                self.set_header(name, value)
        elif status_code >= 500:
            code, message = "internal_error", "the server could not handle this request"
        self.clear_header("Content-Type")
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.set_cors_headers()  # send_error cleared them; a listed origin must see the error
        self.finish(json.dumps({"error": code, "message": message}))


class ScriptHandler(BaseHandler):
    """A script shipped in the package, served from this origin: the pages' policy loads
    scripts and workers from 'self' only. It holds no data, so it needs no login or
    identity. Revalidated on every load (an ETag, ``no-cache``), so an upgrade never
    leaves a page or a worker running an old script."""

    def initialize(self, ctx: AppContext, body: bytes) -> None:  # type: ignore[override]
        super().initialize(ctx)
        self.body = body

    def get(self) -> None:
        self.set_header("Content-Type", "text/javascript; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        self.finish(self.body)


def package_script(*parts: str) -> bytes:
    """A file under the installed ``rtchat`` package, e.g. ``("static", "chat-worker.js")``."""
    return Path(__file__).resolve().parent.parent.joinpath(*parts).read_bytes()


class NotFoundHandler(PageHandler):
    """Anything the route table does not know: 404, as JSON for API-looking paths."""

    def prepare(self) -> None:
        raise tornado.web.HTTPError(404)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        path = self.request.path
        if path.startswith("/admin/api/") or path.endswith(("/messages", "/events", "/presence")):
            ApiHandler.write_error(self, status_code, **kwargs)  # type: ignore[arg-type]
        else:
            super().write_error(status_code, **kwargs)
