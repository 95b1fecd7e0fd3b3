"""Looking at the real world from tests: tools on PATH, free ports, waiting on conditions.

One copy for every test module and fixture plugin. Waits poll a predicate
until it is truthy and fail naming what they waited for; nothing sleeps and
hopes.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, NoReturn

import pytest


def require_tool(name: str) -> str:
    """The tool's path; skip locally when it is missing, but fail in CI, where everything must run."""
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.path.exists(p)), None)
    if path is None:
        missing(f"{name} is not installed (.ci/run installs it; locally: apt-get install {name})")
    return path


def missing(message: str) -> NoReturn:
    """A test cannot run here: skip locally, but fail in CI (CI=true), where everything must run."""
    # The environment is read now, not at import: tests flip it.
    (pytest.fail if os.environ.get("CI", "").lower() == "true" else pytest.skip)(message)
    raise AssertionError("unreachable")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition", *,
             interval: float = 0.02, ignore: tuple[type[BaseException], ...] = ()) -> Any:
    """Poll ``predicate`` until truthy (exceptions in ``ignore`` count as not yet)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except ignore:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


async def async_wait_for(predicate: Callable[[], Any], timeout: float = 10.0,
                         what: str = "condition", *, interval: float = 0.02) -> Any:
    """``wait_for`` from inside the event loop: other tasks (clients, servers) run meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


async def async_poll(fetch: Callable[[], Any], check: Callable[[Any], Any], timeout: float,
                     what: str, *, describe: Callable[[Any], str] = repr,
                     interval: float = 0.1) -> Any:
    """Await ``fetch()`` until ``check`` holds for what it returns; return that. On timeout,
    fail naming ``what`` and showing the last value (through ``describe``)."""
    deadline = time.monotonic() + timeout
    while True:
        value = await fetch()
        if check(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last seen: "
                                 f"{describe(value)}")
        await asyncio.sleep(interval)


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """A GET (no proxies) that never raises for HTTP statuses; (0, b"") when nothing answers."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        body = e.read()
        e.close()
        return e.code, body
    except OSError:
        return 0, b""
