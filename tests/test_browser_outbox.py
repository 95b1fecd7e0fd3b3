"""The chat page's outbox in headless Chromium: nothing typed is lost or shown twice.

Messages typed while the network is down wait in the page's outbox
(localStorage), shown as pending; they survive a reload and are sent, in
order, once the network is back, each under the idempotency key it got
when typed. A send whose answer is lost on the way back is stored once all
the same. A 4xx other than 429 marks the message failed, with the reason.
Skipped locally without chromium; in CI a missing chromium fails.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from browser import DESKTOP, chromium, watch_dialogs
from playwright.async_api import Page, Request, Response, Route
from probes import async_wait_for, require_tool

WAIT_MS = 15000
TEXTS = ["first, typed offline", "second, typed offline", "third, typed offline"]
CONNECTED = "document.getElementById('state').dataset.state === 'connected'"

pytestmark = pytest.mark.browser


def count_is(selector: str, n: int) -> str:
    return f"document.querySelectorAll({json.dumps(selector)}).length === {n}"


async def texts(page: Page, selector: str) -> list[str]:
    return await page.locator(selector).all_text_contents()


async def stored_texts(node: Any, room: str) -> list[str]:
    r = await node.fetch(f"/rooms/{room}/messages?limit=100")
    assert r.code == 200
    return [m["text"] for m in json.loads(r.body)["messages"]]


async def outbox(page: Page, room: str) -> list[dict[str, Any]]:
    raw = await page.evaluate(f"localStorage.getItem({json.dumps('rtchat.outbox.' + room)})")
    return json.loads(raw) if raw else []


async def type_message(page: Page, text: str) -> None:
    await page.fill("#text", text)
    await page.click("#send-button")


DELIVERED = "#log li[data-id] .text"
PENDING = "#log li.pending .text"


@pytest.mark.gen_test(timeout=120)
async def test_messages_typed_offline_survive_the_tab_and_a_reload_and_arrive_once_in_order(
        start_node, tmp_path) -> None:
    exe = require_tool("chromium")
    node = await start_node()
    room = "outbox"
    url = f"{node.url}/rooms/{room}"
    answers: list[tuple[int, dict[str, Any]]] = []

    async def on_response(response: Response) -> None:
        if response.request.method == "POST":
            answers.append((response.status, await response.json()))

    async with chromium(exe) as browser:
        context = await browser.new_context(viewport=DESKTOP, bypass_csp=True)
        page = await context.new_page()
        try:
            await page.goto(url)
            await page.wait_for_function(CONNECTED, timeout=WAIT_MS)
            await page.fill("#nick", "ann")

            # The network goes down; three messages are typed. Each waits, shown as pending.
            await context.set_offline(True)
            for text in TEXTS:
                await type_message(page, text)
            await page.wait_for_function(count_is("#log li.pending", 3), timeout=WAIT_MS)
            assert await texts(page, PENDING) == TEXTS
            assert await page.input_value("#text") == ""
            await page.wait_for_function(
                "document.getElementById('error').textContent.startsWith('Network error')",
                timeout=WAIT_MS)
            keys = [e["key"] for e in await outbox(page, room)]
            assert len(set(keys)) == 3 and all(len(k) == 20 for k in keys)
            assert await stored_texts(node, room) == []

            # The tab goes away while offline (a reload would only get the browser's error
            # page; in headless Chromium the old page's requests during that failed
            # navigation escape the offline emulation): only the outbox remains.
            await page.close()

            # Back online, but sends still do not get through: the first one reaches the
            # node, whose answer is lost on the way back; the rest are cut before it.
            posts: list[Request] = []

            async def lossy(route: Route) -> None:
                posts.append(route.request)
                if len(posts) == 1:
                    await route.fetch()  # stored on the node; the page never hears of it
                await route.abort("internetdisconnected")

            await context.route("**/rooms/outbox/messages", lossy)
            await context.set_offline(False)
            page = await context.new_page()
            dialogs = watch_dialogs(page)
            page.on("response", on_response)
            await page.goto(url)
            await page.wait_for_function(CONNECTED, timeout=WAIT_MS)

            # The stream brings the first message; it is shown once, and no longer pending.
            await page.wait_for_function(count_is(DELIVERED, 1), timeout=WAIT_MS)
            await async_wait_for(lambda: len(posts) >= 3, 20, what="the page to retry its send")
            assert await texts(page, DELIVERED) == TEXTS[:1]
            assert await texts(page, PENDING) == TEXTS[1:]
            assert await stored_texts(node, room) == TEXTS[:1]

            # A reload while sends still fail: the same, and the page tries again.
            tries = len(posts)
            await page.reload()
            await page.wait_for_function(CONNECTED, timeout=WAIT_MS)
            assert await texts(page, DELIVERED) == TEXTS[:1]
            assert await texts(page, PENDING) == TEXTS[1:]
            await async_wait_for(lambda: len(posts) > tries, 20, what="a try after the reload")
            # Every try was the first message, under the key it got when typed: in order.
            tried = {(json.loads(r.post_data or "{}")["text"], r.headers.get("idempotency-key"))
                     for r in posts}
            assert tried == {(TEXTS[0], keys[0])}

            # The network is back for good: the retry learns its id (a duplicate), then the
            # other two go, in order. Each is on screen once; no pending mark is left.
            await context.unroute("**/rooms/outbox/messages", lossy)
            await page.wait_for_function(
                count_is(DELIVERED, 3) + " && " + count_is("#log li.queued", 0), timeout=WAIT_MS)
            assert await texts(page, DELIVERED) == TEXTS
            assert await outbox(page, room) == []
            assert [status for status, _ in answers] == [201, 201, 201]
            assert [bool(body.get("duplicate")) for _, body in answers] == [True, False, False]
            assert await stored_texts(node, room) == TEXTS
            assert (await page.text_content("#error") or "") == ""

            # And after one more reload, still each exactly once.
            await page.reload()
            await page.wait_for_function(CONNECTED, timeout=WAIT_MS)
            assert await texts(page, "#log li .text") == TEXTS
            await page.screenshot(path=str(tmp_path / "outbox-delivered.png"))
            assert dialogs == []
        finally:
            await context.close()


@pytest.mark.gen_test(timeout=90)
async def test_a_message_over_the_size_limit_shows_as_failed_with_the_reason(start_node, tmp_path) -> None:
    exe = require_tool("chromium")
    node = await start_node(**{"limits.max_message_bytes": 40})
    room = "too-big"
    statuses: list[int] = []
    async with chromium(exe) as browser:
        context = await browser.new_context(viewport=DESKTOP, bypass_csp=True)
        page = await context.new_page()
        page.on("response", lambda r: statuses.append(r.status) if r.request.method == "POST" else None)
        try:
            await page.goto(f"{node.url}/rooms/{room}")
            await page.wait_for_function(CONNECTED, timeout=WAIT_MS)
            await type_message(page, "x" * 41)
            await page.wait_for_function(count_is("#log li.failed", 1), timeout=WAIT_MS)
            reason = await page.text_content("#log li.failed .reason") or ""
            assert "longer than 40 bytes" in reason, reason
            assert await page.text_content("#log li.failed .text") == "x" * 41
            assert statuses == [413]

            # A failed message does not hold up the ones after it.
            await type_message(page, "short enough")
            await page.wait_for_function(count_is(DELIVERED, 1), timeout=WAIT_MS)
            assert await texts(page, DELIVERED) == ["short enough"]
            assert await stored_texts(node, room) == ["short enough"]
            assert statuses == [413, 201]  # never retried

            # The failure is kept across a reload until dismissed.
            await page.reload()
            await page.wait_for_function(CONNECTED, timeout=WAIT_MS)
            assert "longer than 40 bytes" in (await page.text_content("#log li.failed .reason") or "")
            await page.screenshot(path=str(tmp_path / "outbox-failed.png"))
            await page.click("#log li.failed button.dismiss")
            await page.wait_for_function(count_is("#log li.queued", 0), timeout=WAIT_MS)
            assert await outbox(page, room) == []
            assert statuses == [413, 201]
        finally:
            await context.close()
