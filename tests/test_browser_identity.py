"""The chat page with identity on (auth.mode: jwt), in headless Chromium.

The page takes its token from the ``rtchat_token`` cookie an app sets: it
shows who you are instead of a nick box, sends without a nick, and the node
stores the token's name and user. An admin kick ends the shared stream with
a reason the page shows, and the page does not come back by itself (only a
reload, which is the person coming back on purpose, opens it again).
Skipped locally without chromium; in CI a missing chromium fails.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time

import jwt
import pytest
from browser import DESKTOP, chromium, text_of, watch_dialogs
from playwright.async_api import Request
from probes import async_wait_for, require_tool

SECRET = "a-browser-test-secret-long-enough-for-hs256"
JWT = {"auth.mode": "jwt", "auth.jwt.secret": SECRET}
WAIT_MS = 15000
CONNECTED = "document.getElementById('state').dataset.state === 'connected'"

pytestmark = pytest.mark.browser


def token(sub: str, name: str, ttl: float = 3600) -> str:
    now = int(time.time())
    return jwt.encode({"sub": sub, "name": name, "iat": now, "exp": now + ttl}, SECRET, algorithm="HS256")


def bearer(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


def log_has(text: str) -> str:
    return ("Array.from(document.querySelectorAll('#log li[data-id] .text'))"
            f".some(function (e) {{ return e.textContent === {json.dumps(text)}; }})")


@pytest.mark.gen_test(timeout=90)
async def test_with_a_token_cookie_the_page_shows_who_you_are_and_sends_as_them(start_node) -> None:
    exe = require_tool("chromium")
    node = await start_node(**JWT)
    tok = token("u-ann", "Ann")
    posts: list[Request] = []
    async with chromium(exe) as browser:
        anonymous = await browser.new_context(viewport=DESKTOP)
        context = await browser.new_context(viewport=DESKTOP, bypass_csp=True)
        try:
            refused = await (await anonymous.new_page()).goto(node.url + "/rooms/team")
            assert refused is not None and refused.status == 401  # no token, no page

            await context.add_cookies([{"name": "rtchat_token", "value": tok, "url": node.url}])
            page = await context.new_page()
            dialogs = watch_dialogs(page)
            page.on("request", lambda r: posts.append(r) if r.method == "POST" else None)
            await page.goto(node.url + "/rooms/team")
            await page.wait_for_function(CONNECTED, timeout=WAIT_MS)
            assert await text_of(page, "#me-name") == "Ann"
            assert await page.locator("#nick").count() == 0  # no free nick box
            # The shared stream got the cookie too: it speaks as Ann.
            await async_wait_for(lambda: node.hub.client_count == 1, 10, what="the stream")
            stream = node.hub.streams()[0]
            assert (stream.nick, stream.user) == ("Ann", "u-ann")

            await page.fill("#text", "hello as Ann")
            await page.click("#send-button")
            await page.wait_for_function(log_has("hello as Ann"), timeout=WAIT_MS)
            assert await text_of(page, "#log li[data-id] .nick") == "Ann"
            assert [json.loads(r.post_data or "{}") for r in posts] == [{"text": "hello as Ann"}]
            r = await node.fetch("/rooms/team/messages", headers=bearer(tok))
            stored = json.loads(r.body)["messages"]
            assert [(m["nick"], m["user"], m["text"]) for m in stored] == [("Ann", "u-ann", "hello as Ann")]

            # Someone else's message arrives named by their token.
            assert (await node.fetch("/rooms/team/messages", "POST", {"nick": "admin", "text": "hi Ann"},
                                     bearer(token("u-bob", "Bob")))).code == 201
            await page.wait_for_function(log_has("hi Ann"), timeout=WAIT_MS)
            assert await page.locator("#log li[data-id] .nick").all_text_contents() == ["Ann", "Bob"]
            assert dialogs == []
        finally:
            await context.close()
            await anonymous.close()


@pytest.mark.gen_test(timeout=90)
async def test_a_kicked_user_sees_the_reason_and_the_page_does_not_reconnect(start_node) -> None:
    exe = require_tool("chromium")
    # A short retry, so that the window watched below spans many would-be reconnects.
    node = await start_node(**JWT, **{"admin.password": "pw", "sse.retry_ms": 300})
    admin = {"Authorization": "Basic " + base64.b64encode(b"admin:pw").decode()}
    async with chromium(exe) as browser:
        context = await browser.new_context(viewport=DESKTOP, bypass_csp=True)
        try:
            await context.add_cookies([{"name": "rtchat_token", "value": token("u-eve", "Eve"),
                                        "url": node.url}])
            pages = [await context.new_page() for _ in range(2)]
            for page in pages:
                await page.goto(node.url + "/rooms/team")
                await page.wait_for_function(CONNECTED, timeout=WAIT_MS)
            await async_wait_for(lambda: node.hub.client_count == 1, 10, what="one shared stream")
            client_id = node.hub.streams()[0].id

            r = await node.fetch(f"/admin/api/clients/{client_id}/kick", "POST", {"reason": "be nice"},
                                 admin)
            assert r.code == 200, r.body
            for page in pages:
                await page.locator("#kicked").wait_for(state="visible", timeout=WAIT_MS)
                assert "be nice" in await text_of(page, "#kicked")
                await page.wait_for_function(
                    "document.getElementById('state').dataset.state === 'kicked'", timeout=WAIT_MS)
            await async_wait_for(lambda: node.hub.client_count == 0, 10, what="the stream to end")
            # Watched for ten times the retry the stream asked for: nothing comes back.
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline:
                assert node.hub.client_count == 0, "the page reconnected after a kick"
                await asyncio.sleep(0.05)
            assert "be nice" in await text_of(pages[0], "#kicked")

            # A reload is the person coming back on purpose: the stream opens again.
            await pages[0].reload()
            await pages[0].wait_for_function(CONNECTED, timeout=WAIT_MS)
            await async_wait_for(lambda: node.hub.client_count == 1, 10, what="the stream after a reload")
            assert await pages[0].locator("#kicked").is_hidden()
        finally:
            await context.close()
