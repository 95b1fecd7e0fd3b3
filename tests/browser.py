"""Headless Chromium for tests: the system browser driven by playwright, never a downloaded one.

Pages are opened with ``bypass_csp=True`` where a test evaluates its own
script in them (playwright's ``wait_for_function`` is an eval, which the
pages' Content-Security-Policy rightly forbids); tests/hostile checks the
pages under their real policy.

``async with chromium(path) as browser`` launches ``/usr/bin/chromium`` (from
``require_tool("chromium")``) with flags that keep it off the network, and
closes it on every exit path. ``watch_dialogs(page)`` records any
alert/confirm/prompt a page opens, so a test can assert that none did.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from playwright.async_api import Browser, Dialog, Page, async_playwright

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 900}


@contextlib.asynccontextmanager
async def chromium(executable: str) -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=executable, args=FLAGS, headless=True)
        try:
            yield browser
        finally:
            await browser.close()


def watch_dialogs(page: Page) -> list[str]:
    """Every dialog the page opens, dismissed at once; an XSS ``alert`` would land here."""
    opened: list[str] = []
    tasks: set[asyncio.Task[Any]] = set()

    def on_dialog(dialog: Dialog) -> None:
        opened.append(f"{dialog.type}: {dialog.message}")
        task = asyncio.ensure_future(dialog.dismiss())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    page.on("dialog", on_dialog)
    return opened


async def text_of(page: Page, selector: str) -> str:
    return (await page.locator(selector).first.text_content()) or ""
