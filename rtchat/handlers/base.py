"""Handler bases: the shared context, client identity, and the two error renderers.

``PageHandler`` errors render ``error.html`` for people; ``ApiHandler`` errors
are JSON ``{"error", "message"}`` for programs. Neither ever shows a traceback.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import jinja2
import tornado.web

from rtchat.broker.base import BrokerUnavailable
from rtchat.config import Config
from rtchat.hub import Hub
from rtchat.metrics import Metrics
from rtchat.ratelimit import RateLimiter

log = logging.getLogger("rtchat.web")


@dataclass
class AppContext:
    """Everything handlers need, built once in ``main()`` and passed via ``initialize``."""

    cfg: Config
    hub: Hub
    metrics: Metrics
    templates: jinja2.Environment
    send_limiter: RateLimiter
    version: str


class ApiError(tornado.web.HTTPError):
    """An API refusal with a machine-readable ``code`` and optional ``Retry-After``."""

    def __init__(self, status: int, code: str, message: str, retry_after: int | None = None) -> None:
        super().__init__(status, log_message=None, reason=None)
        self.code = code
        self.message = message
        self.retry_after = retry_after


_DEFAULT_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                  405: "method_not_allowed", 413: "payload_too_large", 429: "rate_limited",
                  503: "unavailable"}


class BaseHandler(tornado.web.RequestHandler):
    ctx: AppContext

    def initialize(self, ctx: AppContext) -> None:
        self.ctx = ctx

    @property
    def client_address(self) -> str:
        """The client: the remote address, or the forwarded one when ``http.xheaders`` is on."""
        return self.request.remote_ip or ""

    def reject(self, status: int, code: str, message: str, retry_after: int | None = None) -> ApiError:
        """Count a refusal by reason and build the error to raise."""
        self.ctx.metrics.rejected.labels(reason=code).inc()
        return ApiError(status, code, message, retry_after)

    def origin_allowed(self) -> bool:
        """CSRF check: no Origin header, the same origin, or one listed in ``http.allowed_origins``."""
        origin = self.request.headers.get("Origin")
        if origin is None:
            return True
        if origin.rstrip("/") in self.ctx.cfg.http.allowed_origins:
            return True
        return urlsplit(origin).netloc.lower() == self.request.host.lower()

    def render_page(self, name: str, **context: Any) -> None:
        template = self.ctx.templates.get_template(name)
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(template.render(version=self.ctx.version, **context))

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
        try:
            self.render_page("error.html", status=status_code, message=message)
        except Exception:  # a broken template must not hide the original error
            self.finish(f"{status_code} {message}")


class ApiHandler(BaseHandler):
    """JSON endpoints: errors are ``{"error": code, "message": text}``."""

    def set_default_headers(self) -> None:
        # JSON by default; and no Server banner (one header fewer to build and check per send).
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.clear_header("Server")

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
        elif status_code >= 500:
            code, message = "internal_error", "the server could not handle this request"
        self.clear_header("Content-Type")
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps({"error": code, "message": message}))


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
