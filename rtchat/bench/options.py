"""The command line of ``rtchat bench``, and ``Options``, the run's settings made from it.

Each setting is written once, as a field of ``Options`` that carries its
flag, default and help (``_flag``); ``build_parser`` is generated from the
fields, and ``parse_args`` builds ``Options`` from the parsed namespace by
name. A new flag is one new field. Checks that argparse cannot express
(ranges, templates that need ``--url``) raise ``UsageError``.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from rtchat.bench.wire import UsageError, fill, header_lines, parse_target

DEFAULT_SUB_URL = "{url}/rooms/{room}/events"
DEFAULT_MULTI_SUB_URL = "{url}/events?rooms={rooms}"  # with --rooms-per-stream above 1
DEFAULT_PUB_URL = "{url}/rooms/{room}/messages"


def _flag(*flags: str, default: Any, help: str, cli_default: Any = None, **argparse_kw: Any
          ) -> Any:
    """An ``Options`` field and its command-line flag. ``cli_default`` is what argparse starts
    from when it differs from the field's (``--url`` appends to a list)."""
    spec = {"default": default if cli_default is None else cli_default, "help": help,
            **argparse_kw}
    return field(default=default, metadata={"flags": flags, "argparse": spec})


@dataclass(frozen=True)
class Options:
    """One run's settings. ``urls`` is never empty (``("",)`` with no ``--url``)."""

    urls: tuple[str, ...] = _flag(
        "--url", default=(), cli_default=[], action="append", metavar="URL",
        help="server base URL; repeat to spread clients round-robin over several")
    clients: int = _flag("--clients", type=int, default=10, metavar="N",
                         help="SSE streams (default 10)")
    messages: int = _flag("--messages", type=int, default=100, metavar="M",
                          help="messages in total, across rooms (default 100)")
    rate: float = _flag("--rate", type=float, default=50.0, metavar="R",
                        help="messages per second; 0 = as fast as the publishers go (default 50)")
    rooms: int = _flag("--rooms", type=int, default=1, metavar="K", help="rooms (default 1)")
    rooms_per_stream: int = _flag(
        "--rooms-per-stream", type=int, default=1, metavar="R",
        help="rooms on each stream, at most --rooms: client i streams rooms i, i+1, ... i+R-1 "
             "(mod K) on one connection (default 1)")
    # Absent unless given: the default depends on --rooms-per-stream.
    sub_url: str = _flag("--sub-url", default=DEFAULT_SUB_URL, cli_default=argparse.SUPPRESS,
                         metavar="TEMPLATE",
                         help="stream URL template with {url} and {room}, or {rooms} (the "
                              f"stream's rooms, comma-separated) (default {DEFAULT_SUB_URL}; "
                              f"{DEFAULT_MULTI_SUB_URL} with --rooms-per-stream above 1)")
    pub_url: str = _flag("--pub-url", default=DEFAULT_PUB_URL, metavar="TEMPLATE",
                         help=f"publish URL template (default {DEFAULT_PUB_URL})")
    pub_format: str = _flag("--pub-format", choices=("json", "form", "raw"), default="json",
                            help="POST body: JSON {nick,text}, form-encoded, or the bare text "
                                 "(default json)")
    body_bytes: int = _flag("--body-bytes", type=int, default=100, metavar="B",
                            help="message text size in bytes (default 100)")
    connect_timeout: float = _flag("--connect-timeout", type=float, default=10.0, metavar="S",
                                   help="per stream: connect and response headers (default 10)")
    connect_concurrency: int = _flag("--connect-concurrency", type=int, default=100, metavar="C",
                                     help="streams being opened at once (default 100)")
    settle_seconds: float = _flag(
        "--settle-seconds", type=float, default=5.0, metavar="S",
        help="after the last send, wait at most this long for stragglers (default 5)")
    sync_timeout: float = _flag(
        "--sync-timeout", type=float, default=10.0, metavar="S",
        help="before measuring, publish a sync message per room until every stream "
             "has one, for at most S seconds; 0 skips it (default 10)")
    publishers: int = _flag("--publishers", type=int, default=8, metavar="P",
                            help="keep-alive publish connections (default 8)")
    request_timeout: float = _flag("--request-timeout", type=float, default=10.0, metavar="S",
                                   help="per publish request (default 10)")
    hold_seconds: float = _flag(
        "--hold-seconds", type=float, default=0.0, metavar="S",
        help="keep the streams open and idle this long before publishing (default 0)")
    max_send_seconds: float = _flag(
        "--max-send-seconds", type=float, default=0.0, metavar="S",
        help="stop starting new sends S seconds after the first; the rest are "
             "reported as unsent (default 0: no limit)")
    reconnect: bool = _flag("--reconnect", action="store_true", default=False,
                            help="reopen a stream the server closed, with Last-Event-ID, "
                                 "after the last retry: the server sent, as EventSource does")
    reconnect_delay: float = _flag(
        "--reconnect-delay", type=float, default=0.1, metavar="S",
        help="delay before a reconnect while no stream has sent a retry: (default 0.1)")
    room_prefix: str = _flag(
        # Absent unless given, so an empty --room-prefix "" is an error, not the default.
        "--room-prefix", default="", cli_default=argparse.SUPPRESS, metavar="P",
        help="room names are P0, P1, ... (default bench-<random run id>-)")
    headers: tuple[str, ...] = _flag(
        "--header", default=(), cli_default=[], action="append", metavar="'NAME: VALUE'",
        help="an extra request header on every stream and send; repeat for more "
             "(e.g. 'Authorization: Bearer <token>')")
    quiet: bool = _flag("-q", "--quiet", action="store_true", default=False,
                        help="no progress on stderr")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def build_parser(prog: str = "rtchat bench") -> argparse.ArgumentParser:
    p = _Parser(
        prog=prog,
        description="Open N SSE clients, post M messages at R/s, print one JSON report.",
        epilog="Against another server: --sub-url '{url}/sub/{room}' --pub-url '{url}/pub/{room}' "
               "--pub-format raw (nchan). Only the JSON report goes to stdout.",
    )
    for f in fields(Options):
        p.add_argument(*f.metadata["flags"], dest=f.name, **f.metadata["argparse"])
    return p


_CHECKS: tuple[tuple[str, str, float, str], ...] = (
    # (field, comparison, bound, message)
    ("clients", ">=", 0, "--clients must be 0 or more"),
    ("messages", ">=", 0, "--messages must be 0 or more"),
    ("rate", ">=", 0, "--rate must be 0 (unpaced) or more"),
    ("rooms", ">=", 1, "--rooms must be at least 1"),
    ("rooms_per_stream", ">=", 1, "--rooms-per-stream must be at least 1"),
    ("body_bytes", ">=", 0, "--body-bytes must be 0 or more"),
    ("connect_timeout", ">", 0, "--connect-timeout must be greater than 0"),
    ("connect_concurrency", ">=", 1, "--connect-concurrency must be at least 1"),
    ("settle_seconds", ">=", 0, "--settle-seconds must be 0 or more"),
    ("sync_timeout", ">=", 0, "--sync-timeout must be 0 or more"),
    ("publishers", ">=", 1, "--publishers must be at least 1"),
    ("request_timeout", ">", 0, "--request-timeout must be greater than 0"),
    ("hold_seconds", ">=", 0, "--hold-seconds must be 0 or more"),
    ("max_send_seconds", ">=", 0, "--max-send-seconds must be 0 or more"),
    ("reconnect_delay", ">=", 0, "--reconnect-delay must be 0 or more"),
)


def parse_args(argv: Sequence[str]) -> Options:
    """``Options`` from a command line; ``UsageError`` for anything wrong with it."""
    parsed = vars(build_parser().parse_args(list(argv)))
    given = Options(**parsed)
    for name, op, bound, message in _CHECKS:
        value = getattr(given, name)
        if not (value > bound if op == ">" else value >= bound):
            raise UsageError(message)
    if given.rooms_per_stream > given.rooms:
        raise UsageError(f"--rooms-per-stream {given.rooms_per_stream} is more than "
                         f"--rooms {given.rooms}: a stream's rooms must be distinct")
    if given.rooms_per_stream > 1:
        if "sub_url" not in parsed:
            given = replace(given, sub_url=DEFAULT_MULTI_SUB_URL)
        elif "{rooms}" not in given.sub_url:
            raise UsageError("--rooms-per-stream above 1 needs a --sub-url with {rooms}")
    for flag, template in (("--sub-url", given.sub_url), ("--pub-url", given.pub_url)):
        if "{url}" in template and not given.urls:
            raise UsageError(f"--url is required: {flag} {template!r} uses {{url}}")
    if "room_prefix" in parsed and not re.fullmatch(r"[A-Za-z0-9_-]{1,40}", given.room_prefix):
        raise UsageError("--room-prefix must be 1-40 characters of letters, digits, '_' and '-'")
    header_lines(given.headers)
    urls = tuple(given.urls) or ("",)
    for url in given.urls:
        parse_target(url)
    # Every template must give a valid URL for every base URL.
    for url in urls:
        parse_target(fill(given.sub_url, url, "room"))
        parse_target(fill(given.pub_url, url, "room"))
    return replace(given, urls=urls, headers=tuple(given.headers))
