"""The pages in a real browser: headless Chromium loads /admin and the chat page from a live node.

Each test saves screenshots under its tmp_path (desktop and phone width).
Skipped locally without chromium; in CI a missing chromium fails.
"""

import json

import pytest
from browser import DESKTOP, PHONE, chromium, text_of, watch_dialogs
from probes import require_tool
from sse_client import SSEClient

XSS_NICK = "<script>alert(1)</script>"
XSS_AGENT = '<img src=x onerror="alert(2)">'
WAIT_MS = 10000

pytestmark = pytest.mark.browser


def text_is(selector: str, value: str) -> str:
    """A page predicate: the element's text equals ``value`` (both given as JSON)."""
    return (f"document.querySelector({json.dumps(selector)}) !== null && "
            f"document.querySelector({json.dumps(selector)}).textContent === {json.dumps(value)}")


LIVE = "document.getElementById('live').dataset.mode === 'live'"


@pytest.mark.gen_test(timeout=90)
async def test_admin_page_counts_a_new_client_live_and_shows_markup_as_text(start_node, tmp_path) -> None:
    exe = require_tool("chromium")
    node = await start_node(**{"node.id": "browser-node"})
    client = None
    async with chromium(exe) as browser:
        page = await browser.new_page(viewport=DESKTOP, bypass_csp=True)
        dialogs = watch_dialogs(page)
        try:
            await page.goto(node.url + "/admin")
            await page.wait_for_function(LIVE, timeout=WAIT_MS)
            assert await text_of(page, "#node-clients") == "0"
            assert await text_of(page, "#node-id") == "browser-node"
            assert await page.locator("#clients-empty").is_visible()
            assert await page.locator("#redis-embedded").is_visible()

            # A stream connects: the live page counts it and lists it, markup shown as text.
            client = await SSEClient.open(node.url, "lobby", nick=XSS_NICK,
                                          headers={"User-Agent": XSS_AGENT})
            await page.wait_for_function(text_is("#node-clients", "1"), timeout=WAIT_MS)
            await page.wait_for_function(text_is("#client-rows td[data-label=nick]", XSS_NICK),
                                         timeout=WAIT_MS)
            assert await text_of(page, "#client-rows td[data-label='user agent']") == XSS_AGENT
            assert await page.locator("#client-rows script, #client-rows img").count() == 0
            assert await page.locator("#topology g.box").count() == 2
            await page.screenshot(path=str(tmp_path / "admin-desktop.png"), full_page=True)

            # Server-rendered with that client already there: still text, still no script run.
            await page.reload()
            await page.wait_for_function(LIVE, timeout=WAIT_MS)
            assert await text_of(page, "#client-rows td[data-label=nick]") == XSS_NICK
            assert await page.locator("#client-rows script, #client-rows img").count() == 0
            await page.set_viewport_size(PHONE)
            await page.screenshot(path=str(tmp_path / "admin-phone.png"), full_page=True)
            # Usable at phone width: the disconnect button is on screen, not scrolled off sideways.
            box = await page.locator("#client-rows button.kick").bounding_box()
            assert box is not None and box["x"] + box["width"] <= PHONE["width"]

            # The disconnect button ends that stream; the count goes back to 0.
            await page.click("#client-rows button.kick")
            await client.until_closed()
            await page.wait_for_function(text_is("#node-clients", "0"), timeout=WAIT_MS)
            assert "Disconnected" in await text_of(page, "#action-msg")
            assert dialogs == []
        finally:
            await page.close()
            if client is not None:
                await client.aclose()
    assert (await node.fetch("/healthz")).code == 200


@pytest.mark.gen_test(timeout=90)
async def test_admin_page_polls_when_event_stream_fails(start_node, tmp_path) -> None:
    exe = require_tool("chromium")
    node = await start_node()
    client = None
    async with chromium(exe) as browser:
        page = await browser.new_page(viewport=DESKTOP, bypass_csp=True)
        try:
            await page.route("**/admin/api/events", lambda route: route.abort())
            await page.goto(node.url + "/admin")
            await page.wait_for_function(
                "document.getElementById('live').dataset.mode === 'polling'", timeout=WAIT_MS)
            client = await SSEClient.open(node.url, "polled", nick="pat")
            await page.wait_for_function(text_is("#node-clients", "1"), timeout=WAIT_MS)
            assert await text_of(page, "#client-rows td[data-label=nick]") == "pat"
            assert await text_of(page, "#live") == "polling"
        finally:
            await page.close()
            if client is not None:
                await client.aclose()


@pytest.mark.gen_test(timeout=90)
async def test_admin_page_with_a_password_goes_live_with_the_browsers_credentials(start_node) -> None:
    exe = require_tool("chromium")
    node = await start_node(**{"admin.password": "pw-for-browser"})
    async with chromium(exe) as browser:
        context = await browser.new_context(
            http_credentials={"username": "admin", "password": "pw-for-browser"})
        page = await context.new_page()
        try:
            response = await page.goto(node.url + "/admin")
            assert response is not None and response.status == 200
            await page.wait_for_function(LIVE, timeout=WAIT_MS)  # the EventSource got in too
        finally:
            await context.close()


@pytest.mark.gen_test(timeout=90)
async def test_chat_page_two_tabs_see_each_others_messages(start_node, tmp_path) -> None:
    exe = require_tool("chromium")
    node = await start_node()
    async with chromium(exe) as browser:
        context = await browser.new_context(viewport=DESKTOP, bypass_csp=True)
        try:
            one, two = await context.new_page(), await context.new_page()
            dialogs_one, dialogs_two = watch_dialogs(one), watch_dialogs(two)
            for page in (one, two):
                await page.goto(node.url + "/rooms/browser-room")
                await page.wait_for_function(
                    "document.getElementById('state').dataset.state === 'connected'", timeout=WAIT_MS)
            await one.fill("#nick", "ann")
            await one.fill("#text", "hello from tab one")
            await one.click("#send-button")
            await two.wait_for_function(
                text_is("#log li:last-child .text", "hello from tab one"), timeout=WAIT_MS)
            assert await text_of(two, "#log li:last-child .nick") == "ann"
            await one.wait_for_function(
                text_is("#log li:last-child .text", "hello from tab one"), timeout=WAIT_MS)
            assert await one.input_value("#text") == ""  # sent, so cleared

            await two.fill("#nick", "bob")
            await two.fill("#text", XSS_NICK)
            await two.click("#send-button")
            await one.wait_for_function(text_is("#log li:last-child .text", XSS_NICK), timeout=WAIT_MS)
            assert await one.locator("#log script").count() == 0
            await one.screenshot(path=str(tmp_path / "chat-tab-one.png"))
            await two.set_viewport_size(PHONE)
            await two.screenshot(path=str(tmp_path / "chat-tab-two-phone.png"))
            assert dialogs_one == [] and dialogs_two == []
        finally:
            await context.close()


@pytest.mark.gen_test(timeout=90)
async def test_chat_page_comes_back_after_a_node_refused_its_stream(start_node, tmp_path) -> None:
    """EventSource gives up on a 503 (a full or draining node); the page tries again itself."""
    exe = require_tool("chromium")
    node = await start_node(**{"limits.max_clients": 1})
    blocker = await SSEClient.open(node.url, "full")
    async with chromium(exe) as browser:
        page = await browser.new_page(viewport=DESKTOP, bypass_csp=True)
        try:
            await page.goto(node.url + "/rooms/full")
            state = "document.getElementById('state').dataset.state"
            await page.wait_for_function(f"{state} === 'reconnecting'", timeout=WAIT_MS)
            await blocker.aclose()  # room on the node again
            await page.wait_for_function(f"{state} === 'connected'", timeout=WAIT_MS)
            r = await node.post("full", "after the refusal")
            assert r.code == 201
            await page.wait_for_function(text_is("#log li:last-child .text", "after the refusal"),
                                         timeout=WAIT_MS)
            await page.screenshot(path=str(tmp_path / "chat-reconnected.png"))
        finally:
            await page.close()
