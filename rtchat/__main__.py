"""The ``rtchat`` command: run a node, check a config, or run the load generator.

Builds the object graph (config -> broker -> hub -> app -> server), serves,
and on SIGTERM/SIGINT drains in a fixed order: readiness off, streams closed
spread over ``shutdown.drain_seconds``, server stopped, broker closed, exit 0.
Signal handlers only set a flag.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import logging
import os
import signal
import sys
from collections.abc import Sequence

from rtchat import __version__
from rtchat import config as config_mod

log = logging.getLogger("rtchat")

EXIT_USAGE = 2

# The collector's full pass walks every live object: about 80 ms per 5,000 open streams
# on a 2-core machine, and by default it runs each time the heap has grown by a quarter,
# several times while a crowd of clients connects. Streams and connections hold no
# reference cycles (they are freed the moment they close), so full passes can be ten
# times rarer than the default (700, 10, 10); young objects are collected as before.
GC_THRESHOLDS = (700, 10, 100)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "check-config":
        return check_config(args[1:])
    if args and args[0] == "token":
        return token(args[1:])
    if args and args[0] == "hash-password":
        return hash_password(args[1:])
    if args and args[0] == "bench":
        from rtchat import bench

        return bench.main(args[1:])
    return run(args)


def _load_checked(path: str | None, overrides: dict[str, object] | None = None
                  ) -> config_mod.Config:
    """The config, with what only a built part can check (the auth keys) checked too."""
    from rtchat.identity import Authenticator

    cfg = config_mod.load(path, os.environ, overrides)
    Authenticator(cfg.auth)
    return cfg


def token(args: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="rtchat token",
        description="Print a token signed with the configured HS secret (auth.jwt.secret), "
                    "for development and tests. Only the token goes to stdout.")
    parser.add_argument("--config", help="YAML config file (default: $RTCHAT_CONFIG)")
    parser.add_argument("--sub", required=True, help="the user id")
    parser.add_argument("--name", help="the display name (default: the user id)")
    parser.add_argument("--rooms", help="comma-separated room-name globs allowed (default: all)")
    parser.add_argument("--ttl", default="1h", help="lifetime: 90s, 30m, 1h, 7d (default 1h)")
    parser.add_argument("--admin", action="store_true", help="may use the admin API")
    ns = parser.parse_args(args)
    ttl = _duration(ns.ttl)
    if ttl is None:
        print(f"rtchat token: --ttl {ns.ttl!r}: give a number with s, m, h or d", file=sys.stderr)
        return EXIT_USAGE
    from rtchat.identity import Authenticator

    try:
        cfg = config_mod.load(ns.config or os.environ.get(config_mod.CONFIG_ENV), os.environ)
        auth = Authenticator(cfg.auth if cfg.auth.mode == "jwt"
                             else dataclasses.replace(cfg.auth, mode="jwt"))
        rooms = [r.strip() for r in ns.rooms.split(",") if r.strip()] if ns.rooms else None
        print(auth.mint(ns.sub, ns.name, rooms, ttl, admin=ns.admin))
    except config_mod.ConfigError as e:
        print(f"rtchat: invalid config: {e}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def _duration(text: str) -> float | None:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip().lower()
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
    try:
        value = float(number) * units[unit]
    except ValueError:
        return None
    return value if value > 0 else None


def check_config(args: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="rtchat check-config",
        description="Validate a config file (with RTCHAT_* overrides) and print the effective config.")
    parser.add_argument("path", help="YAML config file")
    ns = parser.parse_args(args)
    try:
        cfg = _load_checked(ns.path)
    except config_mod.ConfigError as e:
        print(f"rtchat: invalid config: {e}", file=sys.stderr)
        return EXIT_USAGE
    sys.stdout.write(config_mod.dump(cfg))
    return 0


def hash_password(args: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="rtchat hash-password",
        description="Print an scrypt hash for admin.password_hash. Reads the password from "
                    "standard input (one line), or asks for it twice on a terminal.")
    parser.parse_args(args)
    from rtchat.admin.access import hash_password as make_hash

    if sys.stdin.isatty():
        import getpass

        password = getpass.getpass("admin password: ")
        if getpass.getpass("again: ") != password:
            print("rtchat: the two passwords differ", file=sys.stderr)
            return EXIT_USAGE
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("rtchat: an empty password is no password", file=sys.stderr)
        return EXIT_USAGE
    print(make_hash(password))
    return 0


def run(args: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="rtchat",
        description="Run an rtchat node. Subcommands: 'rtchat check-config PATH', "
                    "'rtchat token ...', 'rtchat hash-password', 'rtchat bench ...'.")
    parser.add_argument("--config", help="YAML config file (default: $RTCHAT_CONFIG, else built-in)")
    parser.add_argument("--host", help="listen address (overrides http.host)")
    parser.add_argument("--port", type=int, help="listen port (overrides http.port)")
    parser.add_argument("--version", action="version", version=f"rtchat {__version__}")
    ns = parser.parse_args(args)
    overrides: dict[str, object] = {}
    if ns.host is not None:
        overrides["http.host"] = ns.host
    if ns.port is not None:
        overrides["http.port"] = ns.port
    path = ns.config or os.environ.get(config_mod.CONFIG_ENV) or None
    try:
        cfg = _load_checked(path, overrides)
    except config_mod.ConfigError as e:
        print(f"rtchat: invalid config: {e}", file=sys.stderr)
        return EXIT_USAGE

    from rtchat import log as log_mod

    log_mod.setup(cfg.logging.level, cfg.logging.format)
    _use_uvloop()
    try:
        return asyncio.run(serve(cfg, path))
    except OSError as e:
        log.error("cannot serve on %s:%s: %s", cfg.http.host, cfg.http.port, e.strerror or e)
        return 1


def _use_uvloop() -> None:
    try:
        import uvloop  # optional: rtchat[fast]
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _tune_gc() -> None:
    """What start-up built lives as long as the process: the collector need never walk it
    again (``gc.freeze``). Full passes become rarer (``GC_THRESHOLDS``)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def serve(cfg: config_mod.Config, path: str | None) -> int:
    from rtchat.node import build_node

    node = build_node(cfg)
    hub = node.hub
    log.info("starting node %s (rtchat %s, %s broker, config %s)",
             hub.node_id, __version__, hub.broker_kind, path or "built-in defaults")
    sockets = _bind(cfg)
    ports = sorted({s.getsockname()[1] for s in sockets})
    # Before the hub starts, so its first heartbeat already names the real address.
    hub.address = f"{_public_host(cfg.http.host)}:{ports[0]}"
    try:
        await node.start(sockets)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    log.info("listening on http://%s:%s", cfg.http.host, ",".join(map(str, ports)))
    _tune_gc()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()

    log.info("draining: readiness off, closing %d streams over %.1fs",
             hub.client_count, cfg.shutdown.drain_seconds)
    hub.draining = True
    await hub.drain(cfg.shutdown.drain_seconds)
    node.server.stop()
    await node.server.close_all_connections()
    await hub.close()
    log.info("stopped")
    return 0


def _public_host(host: str) -> str:
    """The host others can reach this node by: the bind address, or the hostname for a wildcard."""
    import socket

    return socket.gethostname() if host in ("", "0.0.0.0", "::", "*") else host


def _bind(cfg: config_mod.Config) -> list:
    from tornado.netutil import bind_sockets

    host = cfg.http.host
    return bind_sockets(cfg.http.port, None if host in ("", "0.0.0.0", "*") else host,
                        backlog=4096)


if __name__ == "__main__":
    sys.exit(main())
