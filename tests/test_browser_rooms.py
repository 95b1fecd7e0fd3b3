"""The chat page's rooms and tabs in headless Chromium: many rooms, many tabs, one stream.

Four tabs of one browser on rooms a and b hold ONE stream on the node: a
SharedWorker's, or (when SharedWorker is missing; forced here with
``?transport=broadcast``) the stream of the tab that holds the leader lock,
relayed over a BroadcastChannel. A message in b while a is shown raises b's
unread count in every tab. Closing tabs keeps the shared stream; closing the
tab that holds the broadcast stream hands it to another, which resumes from
the last cursor: nothing posted meanwhile is lost. Screenshots at desktop and
phone width are saved under tmp_path and copied to /work/screenshots when that
directory exists. Skipped locally without chromium; in CI a missing chromium fails.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from browser import DESKTOP, PHONE, chromium, text_of, watch_dialogs
from playwright.async_api import BrowserContext, Page
from probes import async_wait_for, require_tool

WAIT_MS = 15000
CONNECTED = "document.getElementById('state').dataset.state === 'connected'"
SCREENSHOTS = Path("/work/screenshots")

pytestmark = pytest.mark.browser


def text_is(selector: str, value: str) -> str:
    return (f"document.querySelector({json.dumps(selector)}) !== null && "
            f"document.querySelector({json.dumps(selector)}).textContent === {json.dumps(value)}")


def unread_is(room: str, value: str) -> str:
    return text_is(f"#room-list li[data-room={room}] .unread", value)


def log_has(text: str) -> str:
    return ("Array.from(document.querySelectorAll('#log li[data-id] .text'))"
            f".some(function (e) {{ return e.textContent === {json.dumps(text)}; }})")


def stream_rooms(node: Any) -> list[list[str]]:
    return [sorted(s.info()["rooms"]) for s in node.hub.streams()]


def keep_screenshots(tmp_path: Path, *names: str) -> None:
    """Copies for the project's notes, when the checkout has a place for them."""
    if SCREENSHOTS.is_dir():
        for name in names:
            shutil.copy(tmp_path / name, SCREENSHOTS / name)


async def open_tab(context: BrowserContext, url: str) -> Page:
    page = await context.new_page()
    await page.goto(url)
    await page.wait_for_function(CONNECTED, timeout=WAIT_MS)
    return page


async def join_b_and_back_to_a(page: Page) -> None:
    """Join room b from the room list's form, then go back to a: no reload either time."""
    await page.fill("#join-room", "b")
    await page.click("#join button")
    await page.wait_for_function(text_is("#room-name", "#b"), timeout=WAIT_MS)
    assert page.url.split("?")[0].endswith("/rooms/b")
    await page.click("#room-list a[data-room=a]")
    await page.wait_for_function(text_is("#room-name", "#a"), timeout=WAIT_MS)
    assert page.url.split("?")[0].endswith("/rooms/a")


@pytest.mark.gen_test(timeout=120)
async def test_four_tabs_share_one_stream_through_a_shared_worker(start_node) -> None:
    exe = require_tool("chromium")
    node = await start_node()
    async with chromium(exe) as browser:
        context = await browser.new_context(viewport=DESKTOP, bypass_csp=True)
        try:
            first = await open_tab(context, node.url + "/rooms/a")
            dialogs = watch_dialogs(first)
            await join_b_and_back_to_a(first)
            tabs = [first] + [await open_tab(context, node.url + "/rooms/a") for _ in range(3)]
            for tab in tabs:
                assert await tab.get_attribute("body", "data-transport") == "shared"
                # Every tab lists both rooms (the joined list is the browser's, not the tab's).
                assert await tab.locator("#room-list li").count() == 2

            # One stream on the node for the four tabs, on both rooms; the admin view agrees.
            await async_wait_for(lambda: stream_rooms(node) == [["a", "b"]], 10, what="one stream on a, b")
            status = json.loads((await node.fetch("/admin/api/status")).body)
            assert [sorted(c["rooms"]) for c in status["clients"]["listed"]] == [["a", "b"]]
            stream_id = node.hub.streams()[0].id

            # A message in b while a is shown: b's unread count rises in every tab, and the title.
            assert (await node.post("b", "in b while a is shown", nick="bob")).code == 201
            for tab in tabs:
                await tab.wait_for_function(unread_is("b", "1"), timeout=WAIT_MS)
                assert (await tab.title()).startswith("(1) #a")
            assert (await node.post("a", "in a, shown", nick="bob")).code == 201
            for tab in tabs:
                await tab.wait_for_function(log_has("in a, shown"), timeout=WAIT_MS)
                assert await text_of(tab, "#room-list li[data-room=a] .unread") == ""

            # Tabs close, the worker (and its one stream) stays while any tab remains.
            await tabs[0].close()
            await tabs[1].close()
            assert (await node.post("b", "after two tabs closed", nick="bob")).code == 201
            for tab in tabs[2:]:
                await tab.wait_for_function(unread_is("b", "2"), timeout=WAIT_MS)
            assert node.hub.client_count == 1 and node.hub.streams()[0].id == stream_id

            # Switching to b shows its history in place; reading it there clears b's unread
            # count in the other tab too.
            reader, other = tabs[2], tabs[3]
            await reader.click("#room-list a[data-room=b]")
            await reader.wait_for_function(text_is("#room-name", "#b"), timeout=WAIT_MS)
            await reader.wait_for_function(log_has("in b while a is shown") + " && " +
                                           log_has("after two tabs closed"), timeout=WAIT_MS)
            assert reader.url.endswith("/rooms/b")
            assert await text_of(reader, "#room-list li[data-room=b] .unread") == ""
            await other.wait_for_function(unread_is("b", ""), timeout=WAIT_MS)
            assert (await other.title()).startswith("#a")
            assert node.hub.client_count == 1
            assert dialogs == []
        finally:
            await context.close()


@pytest.mark.gen_test(timeout=150)
async def test_without_shared_worker_one_tab_holds_the_stream_and_hands_it_on_losing_nothing(
        start_node) -> None:
    exe = require_tool("chromium")
    node = await start_node()
    url = node.url + "/rooms/a?transport=broadcast"
    async with chromium(exe) as browser:
        context = await browser.new_context(viewport=DESKTOP, bypass_csp=True)
        try:
            first = await open_tab(context, url)
            await join_b_and_back_to_a(first)
            assert first.url.endswith("/rooms/a?transport=broadcast")  # the flag survives a switch
            tabs = [first] + [await open_tab(context, url) for _ in range(3)]
            for tab in tabs:
                assert await tab.get_attribute("body", "data-transport") == "broadcast"
            await async_wait_for(lambda: stream_rooms(node) == [["a", "b"]], 10, what="one stream on a, b")
            leaders = [t for t in tabs if await t.get_attribute("body", "data-leader") == "1"]
            assert len(leaders) == 1
            leader = leaders[0]

            assert (await node.post("b", "before the hand-off", nick="bob")).code == 201
            for tab in tabs:
                await tab.wait_for_function(unread_is("b", "1"), timeout=WAIT_MS)

            # The leader tab closes while streams cannot get through: messages are posted
            # with no stream open anywhere. The next leader resumes from the last cursor.
            async def refuse(route: Any) -> None:
                await route.abort()

            events = re.compile(r"/events\?")
            await context.route(events, refuse)
            await leader.close()
            rest = [t for t in tabs if t is not leader]
            await async_wait_for(lambda: node.hub.client_count == 0, 10, what="the leader's stream to end")
            assert (await node.post("b", "while nobody held the stream", nick="bob")).code == 201
            assert (await node.post("a", "in a, during the hand-off", nick="bob")).code == 201
            await context.unroute(events, refuse)

            await async_wait_for(lambda: stream_rooms(node) == [["a", "b"]], 20,
                                 what="the next leader's stream")
            for tab in rest:
                await tab.wait_for_function(unread_is("b", "2"), timeout=WAIT_MS)
                await tab.wait_for_function(log_has("in a, during the hand-off"), timeout=WAIT_MS)
                await tab.wait_for_function(CONNECTED, timeout=WAIT_MS)
            assert [await t.get_attribute("body", "data-leader") for t in rest].count("1") == 1
            assert node.hub.client_count == 1
        finally:
            await context.close()


@pytest.mark.gen_test(timeout=120)
async def test_each_tab_on_its_own_stream_as_the_last_fallback(start_node) -> None:
    exe = require_tool("chromium")
    node = await start_node()
    async with chromium(exe) as browser:
        context = await browser.new_context(viewport=DESKTOP, bypass_csp=True)
        try:
            tabs = [await open_tab(context, node.url + "/rooms/solo?transport=tab") for _ in range(2)]
            assert [await t.get_attribute("body", "data-transport") for t in tabs] == ["tab", "tab"]
            await async_wait_for(lambda: node.hub.client_count == 2, 10, what="a stream per tab")
            assert (await node.post("solo", "to each tab", nick="bob")).code == 201
            for tab in tabs:
                await tab.wait_for_function(log_has("to each tab"), timeout=WAIT_MS)
        finally:
            await context.close()


LINKS = ("see https://example.com/a?b=1&c=2, javascript:alert(1) and "
         "<a href='https://evil.example'>markup</a> or http://example.org/wiki/Foo_(bar).")


@pytest.mark.gen_test(timeout=120)
async def test_messages_read_well_at_desktop_and_phone_width(start_node, tmp_path) -> None:
    exe = require_tool("chromium")
    node = await start_node(**{"limits.rate.burst": 1000, "limits.rate.messages_per_second": 1000})
    for room, nick, text in (("general", "ann", "Morning all 👋"),
                             ("general", "ann", "The build is green again 🎉"),
                             ("general", "bob", LINKS),
                             ("general", "bob", "and a long line " + "with many words " * 12),
                             ("general", "cy", "Schöne Grüße, ça va ? ✅ 🚀")):
        assert (await node.post(room, text, nick=nick)).code == 201
    async with chromium(exe) as browser:
        context = await browser.new_context(viewport=DESKTOP, bypass_csp=True)
        try:
            page = await open_tab(context, node.url + "/rooms/general")
            dialogs = watch_dialogs(page)
            for other in ("random", "ops"):
                await page.fill("#join-room", other)
                await page.click("#join button")
                await page.wait_for_function(text_is("#room-name", "#" + other), timeout=WAIT_MS)
            await page.click("#room-list a[data-room=general]")
            await page.wait_for_function(text_is("#room-name", "#general"), timeout=WAIT_MS)
            await page.wait_for_function(CONNECTED, timeout=WAIT_MS)
            await async_wait_for(lambda: stream_rooms(node) == [["general", "ops", "random"]], 10,
                                 what="one stream on three rooms")
            assert (await node.post("random", "over in random", nick="dee")).code == 201
            await page.wait_for_function(unread_is("random", "1"), timeout=WAIT_MS)
            await page.fill("#nick", "me")

            # Links: http(s) only, opened without a referrer or an opener; markup stays text.
            # The markup's URL is a link as text would be; the markup itself is not.
            anchors = page.locator("#log a")
            assert [await anchors.nth(i).get_attribute("href") for i in range(await anchors.count())] == [
                "https://example.com/a?b=1&c=2", "https://evil.example/", "http://example.org/wiki/Foo_(bar)"]
            assert await anchors.all_text_contents() == [
                "https://example.com/a?b=1&c=2", "https://evil.example", "http://example.org/wiki/Foo_(bar)"]
            for i in range(3):
                assert await anchors.nth(i).get_attribute("rel") == "noopener noreferrer"
                assert await anchors.nth(i).get_attribute("target") == "_blank"
            assert "javascript:alert(1)" in await text_of(page, "#log li[data-id]:nth-of-type(4) .text")
            # Grouping: ann's and bob's second lines sit under their first; one day separator.
            lines = page.locator("#log li[data-id]")
            assert [("grouped" in (await lines.nth(i).get_attribute("class") or "").split())
                    for i in range(5)] == [False, True, False, True, False]
            assert await page.locator("#log li.day").all_text_contents() == ["Today"]
            colours = [await page.locator("#log li[data-id] .nick").nth(i).evaluate(
                "e => getComputedStyle(e).color") for i in range(3)]
            assert colours[0] == colours[1] != colours[2]  # ann, ann, bob

            await page.screenshot(path=str(tmp_path / "chat-desktop.png"))
            await page.set_viewport_size(PHONE)
            # At 390 px: nothing wider than the screen, the send button and the rooms on it.
            assert await page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
            for selector in ("#send-button", "#room-list li[data-room=general]", "#text"):
                box = await page.locator(selector).bounding_box()
                assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"]
            await page.screenshot(path=str(tmp_path / "chat-phone.png"))

            # Scrolled up, a new message offers a jump instead of moving the view.
            for i in range(30):
                assert (await node.post("general", f"filler {i}", nick="bob")).code == 201
            await page.wait_for_function(log_has("filler 29"), timeout=WAIT_MS)
            await page.evaluate("document.getElementById('log').scrollTop = 0")
            assert (await node.post("general", "while you were reading", nick="ann")).code == 201
            await page.wait_for_function(
                "!document.getElementById('jump-button').hidden", timeout=WAIT_MS)
            assert await text_of(page, "#jump-button") == "1 new message ↓"
            await page.click("#jump-button")
            await page.wait_for_function("document.getElementById('jump-button').hidden", timeout=WAIT_MS)
            assert dialogs == []
        finally:
            await context.close()
    keep_screenshots(tmp_path, "chat-desktop.png", "chat-phone.png")


@pytest.mark.gen_test(timeout=90)
async def test_chat_page_shares_its_stream_under_its_content_security_policy(start_node) -> None:
    """No bypass: the worker script, the page's script and its links all run under the policy."""
    exe = require_tool("chromium")
    node = await start_node()
    async with chromium(exe) as browser:
        context = await browser.new_context(viewport=DESKTOP)  # the real policy
        console: list[str] = []
        try:
            pages = []
            for _ in range(2):
                page = await context.new_page()
                page.on("console", lambda m: console.append(m.text))
                await page.goto(node.url + "/rooms/csp-rooms")
                pages.append(page)
            await async_wait_for(lambda: node.hub.client_count == 1, 10, what="the shared stream")
            assert [await p.get_attribute("body", "data-transport") for p in pages] == ["shared"] * 2
            assert (await node.post("csp-rooms", "under policy https://example.com/")).code == 201
            for page in pages:
                await page.locator("#log a[href='https://example.com/']").wait_for(timeout=WAIT_MS)
            assert node.hub.client_count == 1
            assert [m for m in console if "Content Security Policy" in m or "Refused" in m] == []
        finally:
            await context.close()
