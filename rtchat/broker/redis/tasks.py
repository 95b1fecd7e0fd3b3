"""The asyncio plumbing both Redis brokers share, apart from what any one part owns.

``start`` runs a task in the background and keeps it until it is done (the
loop itself holds tasks only weakly); ``stop_tasks`` ends a closing broker's
monitor and background tasks; ``shared`` lets a crowd asking the same read at
once share one round trip.
Knows no Redis: only tasks and futures.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def start(coro: Coroutine[Any, Any, None], name: str, running: set[asyncio.Future[None]]
          ) -> asyncio.Task[None]:
    """``coro`` as a task, held in ``running`` until it is done."""
    task = asyncio.get_running_loop().create_task(coro, name=name)
    running.add(task)
    task.add_done_callback(running.discard)
    return task


async def stop_tasks(monitor: asyncio.Task[None] | None,
                     background: set[asyncio.Future[None]]) -> None:
    """A closing broker's tasks: its monitor cancelled and waited for, its background
    tasks (unsubscribes, rollbacks) cancelled."""
    if monitor is not None:
        monitor.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await monitor
    for task in list(background):
        task.cancel()


async def shared(inflight: dict[str, asyncio.Future[T]], key: str,
                 read: Callable[[], Awaitable[T]]) -> T:
    """``read()``, or the answer of the same read already in flight for ``key``: a crowd
    asking the same thing at once (a storm of reconnects asking a room's presence) costs
    one round trip and one pooled connection, not one each. Only for reads whose answer
    may be a moment old."""
    task = inflight.get(key)
    if task is None:
        task = asyncio.ensure_future(read())
        inflight[key] = task

        def done(t: asyncio.Future[T]) -> None:
            if inflight.get(key) is t:
                del inflight[key]
            if not t.cancelled():
                t.exception()  # retrieved here too: every waiter may have gone

        task.add_done_callback(done)
    return await asyncio.shield(task)  # one caller going away cancels nobody else's read
