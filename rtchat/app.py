"""The web application: one route table, templates, and the handler context."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import jinja2
import tornado.web

from rtchat import __version__
from rtchat.admin.handlers import admin_routes
from rtchat.config import Config
from rtchat.handlers.base import AppContext, NotFoundHandler, ScriptHandler, package_script
from rtchat.handlers.events import EventStreamHandler
from rtchat.handlers.health import HealthHandler, MetricsHandler, ReadyHandler
from rtchat.handlers.messages import MessagesHandler, PresenceHandler
from rtchat.handlers.pages import ChatPageHandler
from rtchat.hub import Hub
from rtchat.identity import Authenticator
from rtchat.metrics import Metrics
from rtchat.proxies import ProxyTrust
from rtchat.ratelimit import RateLimiter
from rtchat.server import ServerState

ROOM = r"([^/]+)"


def templates_dir() -> Path:
    """Installed: ``rtchat/templates``; in a source checkout: the top-level ``templates/``."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "templates", here.parent / "templates"):
        if (candidate / "chat.html").is_file():
            return candidate
    raise FileNotFoundError("rtchat templates not found (is the package installed correctly?)")


def make_templates() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )


_TOKEN_IN_QUERY = re.compile(r"(?<=[?&]token=)[^&]*")
access_log = logging.getLogger("tornado.access")


def log_request(handler: tornado.web.RequestHandler) -> None:
    """Tornado's access line, with a ``?token=`` (a bearer credential) masked."""
    status = handler.get_status()
    method = access_log.info if status < 400 else access_log.warning if status < 500 \
        else access_log.error
    request = handler.request
    uri = _TOKEN_IN_QUERY.sub("********", request.uri or "")
    method("%d %s %s (%s) %.2fms", status, request.method, uri, request.remote_ip,
           1000.0 * request.request_time())


def make_app(cfg: Config, hub: Hub, metrics: Metrics,
             server: ServerState | None = None) -> tornado.web.Application:
    limits = cfg.limits
    ctx = AppContext(
        cfg=cfg,
        hub=hub,
        metrics=metrics,
        templates=make_templates(),
        send_limiter=RateLimiter(limits.rate.messages_per_second, limits.rate.burst),
        read_limiter=RateLimiter(limits.read_rate.requests_per_second, limits.read_rate.burst),
        version=__version__,
        trust=ProxyTrust.from_config(cfg.http.xheaders, cfg.http.trusted_proxies),
        auth=Authenticator(cfg.auth),
        server=server or ServerState(),
    )
    args = {"ctx": ctx}
    routes: list[tornado.web.URLSpec | tuple] = [
        (r"/", ChatPageHandler, args),
        (rf"/rooms/{ROOM}", ChatPageHandler, args),
        (rf"/rooms/{ROOM}/events", EventStreamHandler, args),
        (r"/events", EventStreamHandler, args),
        (rf"/rooms/{ROOM}/messages", MessagesHandler, args),
        (rf"/rooms/{ROOM}/presence", PresenceHandler, args),
        (r"/healthz", HealthHandler, args),
        (r"/readyz", ReadyHandler, args),
        (r"/metrics", MetricsHandler, args),
        # The stream-sharing script, run as a SharedWorker (or in a page without one).
        (r"/static/chat-worker\.js", ScriptHandler,
         {"ctx": ctx, "body": package_script("static", "chat-worker.js")}),
    ]
    if cfg.admin.enabled:  # disabled: the routes do not exist, so /admin is a plain 404
        routes += admin_routes(ctx)
    return tornado.web.Application(
        routes,
        default_handler_class=NotFoundHandler,
        default_handler_args=args,
        compress_response=False,  # never gzip an event stream
        log_function=log_request,
    )
