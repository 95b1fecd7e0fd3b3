"""Hostile input: what a client can put in a request, and what the node answers.

Each test is one row of the hardening review: the answer is a clear 4xx,
never a 500 or a traceback, nothing invalid is stored, and a bystander
stream keeps getting every message meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sse_client import SSEClient

from rtchat.admin.access import hash_password, password_matches
from rtchat.messages import normalize_nick, valid_id, valid_room


def body(response: Any) -> dict[str, Any]:
    return json.loads(response.body)


@contextlib.asynccontextmanager
async def bystander(node: Any, room: str = "bystander") -> AsyncIterator[list[str]]:
    """A client in ``room`` that must receive every message posted there while the block runs.

    The block posts through the returned list's owner: texts appended to the list are
    posted at the end, and every one must arrive once, in order.
    """
    client = await SSEClient.open(node.url, room)
    assert client.status == 200
    sent: list[str] = []
    try:
        yield sent
        for i in range(3):
            text = f"bystander-{i}"
            r = await node.post(room, text, headers={"X-Real-IP": "198.51.100.77"})
            assert r.code == 201, r.body
            sent.append(text)
        got: list[str] = []
        while len(got) < len(sent):
            event = await client.next_event(timeout=5)
            if event.event == "message":
                got.append(event.json()["text"])
        assert got == sent
    finally:
        await client.aclose()


@pytest.fixture
def traceback_watch(caplog: pytest.LogCaptureFixture) -> Any:
    """Fails the test if anything logged a traceback (an unhandled error)."""
    caplog.set_level(logging.INFO)
    yield caplog
    tracebacks = [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    assert not tracebacks, [r.getMessage() for r in tracebacks]


# -- pure rules -----------------------------------------------------------------


def test_rules_match_whole_and_in_ascii() -> None:
    assert valid_room("lobby") and not valid_room("lobby\n") and not valid_room("lob by")
    assert valid_id("1-0") and valid_id(f"{2**64 - 1}-{2**64 - 1}")
    for bad in (f"{2**64}-0", f"0-{2**64}", "1-0\n", "\u0661-0", "\uff11-0", "1-0 ", "-1-0"):
        assert not valid_id(bad), bad


@pytest.mark.parametrize("nick", [
    "\u202eadmin",  # right-to-left override
    "\u200b\u200b",  # zero-width only
    "ann\u0085",  # C1 control (NEL)
    "ann\u2028bob",  # line separator
    "ann\u2029",  # paragraph separator
    "\ud800ann",  # lone surrogate
    "\ue000",  # private use
    "   ",  # nothing visible
    "\u3000",  # ideographic space only
])
def test_nicks_that_are_refused(nick: str) -> None:
    assert normalize_nick(nick, 32) is None


def test_nicks_are_nfkc_normalised() -> None:
    assert normalize_nick("\uff21\uff2e\uff2e", 32) == "ANN"  # fullwidth letters
    assert normalize_nick("  ann  ", 32) == "ann"
    assert normalize_nick("Zoë 🙂", 32) == "Zoë 🙂"


# -- through a node -----------------------------------------------------------------


@pytest.mark.gen_test
async def test_bad_nicks_and_texts_are_400_and_nothing_is_stored(start_node, traceback_watch) -> None:
    node = await start_node(**{"limits.rate.burst": 1000})
    async with bystander(node):
        bad_bodies = [
            b'{"nick": "\\ud800", "text": "hi"}',  # lone surrogate nick
            b'{"nick": "ann", "text": "\\udc00"}',  # lone surrogate text
            b'{"nick": "\\u202eadmin", "text": "hi"}',
            b'{"nick": "\\u200b", "text": "hi"}',
            b'{"nick": "a\\u0085", "text": "hi"}',
            b'{"nick": "a\\u2028b", "text": "hi"}',
            b'{"nick": "ann", "text": "evil \\u202e txt"}',  # bidi override in text
            b'{"nick": "ann", "text": "bell \\u0007"}',  # control character in text
            b'{"nick": "ann", "text": "nul \\u0000"}',
        ]
        for raw in bad_bodies:
            r = await node.fetch("/rooms/lobby/messages", "POST", raw,
                                 {"Content-Type": "application/json"})
            assert r.code == 400, (raw, r.code, r.body)
            assert body(r)["error"] in ("bad_nick", "bad_text"), raw
        ok = await node.fetch("/rooms/lobby/messages", "POST",
                              json.dumps({"nick": "ann", "text": "line one\nline two\t🙂"}),
                              {"Content-Type": "application/json"})
        assert ok.code == 201
        history = await node.fetch("/rooms/lobby/messages?limit=100")
        assert history.code == 200
        assert [m["text"] for m in body(history)["messages"]] == ["line one\nline two\t🙂"]
        # A resume from before it works (a stored surrogate used to break every later read).
        resumed = await SSEClient.open(node.url, "lobby", last_event_id="0-0")
        assert resumed.status == 200
        event = await resumed.next_event(timeout=5)
        assert event.json()["text"] == "line one\nline two\t🙂"
        await resumed.aclose()


@pytest.mark.gen_test
async def test_unparsable_bodies_are_400_never_500(start_node, traceback_watch) -> None:
    node = await start_node(**{"limits.rate.burst": 1000, "limits.max_body_bytes": 16384})
    async with bystander(node):
        deep = b'{"text": ' + b"[" * 5000 + b"]" * 5000 + b"}"
        for raw, ctype in [
            (deep, "application/json"),
            (b"[" * 8000, "application/json"),
            (b'{"text": "\xff\xfe"}', "application/json"),  # bad UTF-8
            (b"nick=ann&text=%ff%fe", "application/x-www-form-urlencoded"),
            (b"text=%ED%A0%80", "application/x-www-form-urlencoded"),  # an encoded surrogate
        ]:
            r = await node.fetch("/rooms/lobby/messages", "POST", raw, {"Content-Type": ctype})
            assert r.code == 400, (raw[:40], r.code, r.body)
            assert "error" in body(r)
    history = await node.fetch("/rooms/lobby/messages?limit=10")
    assert body(history)["messages"] == []


@pytest.mark.gen_test
async def test_the_rate_limit_token_is_taken_before_parsing(start_node) -> None:
    node = await start_node(**{"limits.rate.burst": 3, "limits.rate.messages_per_second": 0.1})
    deep = b"[" * 5000
    codes = []
    for _ in range(6):
        r = await node.fetch("/rooms/lobby/messages", "POST", deep,
                             {"Content-Type": "application/json"})
        codes.append(r.code)
    assert codes == [400, 400, 400, 429, 429, 429]


@pytest.mark.gen_test
async def test_room_names_are_matched_whole(start_node) -> None:
    node = await start_node()
    async with bystander(node):
        for path in ("/rooms/lobby%0A/messages", "/rooms/lobby%0A/events",
                     "/rooms/lobby%0A/presence", "/rooms/lobb%C3%BD/messages"):
            method, payload = ("POST", {"nick": "a", "text": "x"}) if path.endswith("messages") \
                else ("GET", None)
            r = await node.fetch(path, method, payload)
            assert r.code in (400, 404), (path, r.code)
        assert (await node.fetch("/rooms/lobby%0A")).code == 404
    assert body(await node.fetch("/rooms/lobby/messages"))["messages"] == []


@pytest.mark.gen_test
async def test_resume_ids_must_be_ascii_digits_within_64_bits(start_node) -> None:
    node = await start_node()
    for bad in (f"{2**64}-0", "\u0661\u0662-0", "1-0\n", "99999999999999999999999-1"):
        client = await SSEClient.open(node.url, "lobby", query_last_event_id=bad)
        assert client.status == 400, bad
        assert json.loads(client.body)["error"] == "bad_last_event_id"
        await client.aclose()


@pytest.mark.gen_test(timeout=60)
async def test_a_huge_resume_id_on_redis_is_400_and_leaves_no_trace(start_node, start_redis) -> None:
    redis = start_redis()
    node = await start_node(**{"broker.backend": "redis", "broker.redis.master": redis.url,
                               "broker.redis.subscribe_from": "master"})
    async with bystander(node):
        client = await SSEClient.open(node.url, "lobby",
                                      last_event_id=f"{2**64 + 5}-0")
        assert client.status == 400
        assert b"rtchat:" not in client.body  # no Redis key in the answer
        await client.aclose()
    status = body(await node.fetch("/admin/api/status"))
    errors = [ep.get("last_error") for ep in status["redis"]["endpoints"]]
    assert not any(errors), errors


@pytest.mark.gen_test
async def test_history_limit_above_what_is_kept_is_clamped(start_node) -> None:
    node = await start_node(**{"history.size": 5, "limits.rate.burst": 100})
    for i in range(7):
        assert (await node.post("lobby", f"m{i}")).code == 201
    r = await node.fetch("/rooms/lobby/messages?limit=100000")
    assert r.code == 200
    assert [m["text"] for m in body(r)["messages"]] == [f"m{i}" for i in range(2, 7)]
    assert (await node.fetch("/rooms/lobby/messages?limit=0")).code == 400


# -- headers -------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_security_headers_on_every_response(start_node) -> None:
    node = await start_node()
    for path in ("/", "/rooms/lobby", "/rooms/lobby/messages", "/rooms/lobby/presence",
                 "/healthz", "/readyz", "/metrics", "/admin", "/nowhere", "/rooms/bad%20room"):
        r = await node.fetch(path)
        assert r.headers.get("X-Content-Type-Options") == "nosniff", path
        assert r.headers.get("Referrer-Policy") == "same-origin", path
        assert "Server" not in r.headers, (path, r.headers.get("Server"))
    page = await node.fetch("/rooms/lobby")
    csp = page.headers["Content-Security-Policy"]
    assert "frame-ancestors 'self'" in csp and "object-src 'none'" in csp
    nonce = csp.split("'nonce-")[1].split("'")[0]
    html = page.body.decode()
    # Every executable inline script carries the nonce; the JSON data blocks are not scripts.
    assert html.count("<script") == html.count(f'nonce="{nonce}"') + html.count(
        'type="application/json"')
    again = await node.fetch("/rooms/lobby")
    assert again.headers["Content-Security-Policy"] != csp  # a fresh nonce per response
    admin = await node.fetch("/admin")
    assert "frame-ancestors 'none'" in admin.headers["Content-Security-Policy"]
    assert admin.headers["X-Frame-Options"] == "DENY"


@pytest.mark.gen_test
async def test_frame_ancestors_follow_the_config(start_node) -> None:
    node = await start_node(**{"http.frame_ancestors": "https://intranet.example.com"})
    r = await node.fetch("/")
    assert "frame-ancestors https://intranet.example.com" in r.headers["Content-Security-Policy"]


@pytest.mark.gen_test
async def test_hosts_outside_allowed_hosts_are_421(start_node) -> None:
    node = await start_node(**{"http.allowed_hosts": ["chat.example.com", "127.0.0.1"]})
    async with bystander(node):
        for path in ("/", "/admin", "/rooms/lobby/messages", "/admin/api/status"):
            r = await node.fetch(path, headers={"Host": "rebind.attacker.example"})
            assert r.code == 421, path
        r = await node.fetch("/admin/api/clients/x/disconnect", "POST", b"",
                             headers={"Host": "rebind.attacker.example:8888"})
        assert r.code == 421
        r = await node.fetch("/", headers={"Host": "chat.example.com:8888"})
        assert r.code == 200
        # Probes come by address.
        r = await node.fetch("/healthz", headers={"Host": "10.1.2.3:8888"})
        assert r.code == 200


# -- CORS ---------------------------------------------------------------------------

ALLOWED = "https://chat.example.com"


@pytest.mark.gen_test
async def test_cors_preflight_and_answers_for_allowed_origins(start_node) -> None:
    node = await start_node(**{"http.allowed_origins": [ALLOWED, "http://localhost:3000"]})
    pre = await node.fetch("/rooms/lobby/messages", "OPTIONS", headers={
        "Origin": ALLOWED, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert pre.code == 204
    assert pre.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert "POST" in pre.headers["Access-Control-Allow-Methods"]
    assert "content-type" in pre.headers["Access-Control-Allow-Headers"].lower()
    assert int(pre.headers["Access-Control-Max-Age"]) > 0
    assert pre.headers["Vary"] == "Origin"
    assert pre.headers["Access-Control-Allow-Credentials"] == "true"

    sent = await node.post("lobby", "from the app", headers={"Origin": ALLOWED})
    assert sent.code == 201
    assert sent.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert sent.headers["Vary"] == "Origin"
    # A form POST from an allowed origin is stored AND readable by the page that sent it.
    form = await node.fetch("/rooms/lobby/messages", "POST", "nick=ann&text=form",
                            {"Origin": ALLOWED, "Content-Type": "application/x-www-form-urlencoded"})
    assert form.code == 201 and form.headers["Access-Control-Allow-Origin"] == ALLOWED
    # Errors too: a browser must be able to read why.
    bad = await node.fetch("/rooms/lobby/messages", "POST", b"{", {
        "Origin": ALLOWED, "Content-Type": "application/json"})
    assert bad.code == 400 and bad.headers["Access-Control-Allow-Origin"] == ALLOWED

    stream = await SSEClient.open(node.url, "lobby", headers={"Origin": ALLOWED})
    assert stream.status == 200
    assert stream.headers.get("access-control-allow-origin") == ALLOWED
    await stream.aclose()

    # Origins compare scheme, host and port.
    for other in ("http://chat.example.com", "https://chat.example.com:8443",
                  "https://evil.example", "http://localhost:3001", "null"):
        pre = await node.fetch("/rooms/lobby/messages", "OPTIONS", headers={
            "Origin": other, "Access-Control-Request-Method": "POST"})
        assert pre.code == 403, other
        assert "Access-Control-Allow-Origin" not in pre.headers
        assert pre.headers["Vary"] == "Origin"
        refused = await node.post("lobby", "csrf", headers={"Origin": other})
        assert refused.code == 403, other
    default_port = await node.post("lobby", "x", headers={"Origin": "https://chat.example.com:443"})
    assert default_port.code == 201


# -- admin passwords -------------------------------------------------------------------


def test_password_hashes_verify_and_differ_by_salt() -> None:
    one, two = hash_password("s3cret"), hash_password("s3cret")
    assert one != two and one.startswith("scrypt$")
    assert password_matches("s3cret", one) and password_matches("s3cret", two)
    assert not password_matches("s3cret!", one)
    assert not password_matches("s3cret", "scrypt$garbage")


def test_hash_password_command_prints_a_hash_the_config_accepts(tmp_path) -> None:
    out = subprocess.run([sys.executable, "-m", "rtchat", "hash-password"], input="pw-42\n",
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    hashed = out.stdout.strip()
    assert password_matches("pw-42", hashed)
    conf = tmp_path / "c.yaml"
    conf.write_text(f"admin: {{password_hash: '{hashed}'}}\n")
    check = subprocess.run([sys.executable, "-m", "rtchat", "check-config", str(conf)],
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
    assert hashed not in check.stdout  # masked like a password
    empty = subprocess.run([sys.executable, "-m", "rtchat", "hash-password"], input="\n",
                           capture_output=True, text=True, timeout=30)
    assert empty.returncode == 2 and "Traceback" not in empty.stderr


@pytest.mark.gen_test
async def test_admin_takes_a_password_hash(start_node) -> None:
    import base64

    node = await start_node(**{"admin.password_hash": hash_password("letmein")})

    def basic(user: str, password: str) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}

    assert (await node.fetch("/admin/api/status")).code == 401
    assert (await node.fetch("/admin/api/status", headers=basic("admin", "nope"))).code == 401
    assert (await node.fetch("/admin/api/status", headers=basic("admin", "letmein"))).code == 200


# -- the chat page under its real policy ---------------------------------------------------


@pytest.mark.gen_test(timeout=90)
async def test_chat_page_runs_under_its_content_security_policy(start_node) -> None:
    from browser import DESKTOP, chromium
    from probes import require_tool

    exe = require_tool("chromium")
    node = await start_node()
    async with chromium(exe) as browser:
        page = await browser.new_page(viewport=DESKTOP)  # the real policy: no bypass
        violations: list[str] = []
        page.on("console", lambda m: violations.append(m.text)
                if "Content Security Policy" in m.text else None)
        try:
            await page.goto(node.url + "/rooms/csp")
            # The page's own script runs: it opens its stream, and a message shows up.
            for _ in range(100):
                if node.hub.client_count:
                    break
                await asyncio.sleep(0.05)
            assert node.hub.client_count == 1
            assert (await node.post("csp", "under policy")).code == 201
            await page.get_by_text("under policy").wait_for(timeout=10000)
            assert violations == []
        finally:
            await page.close()


@pytest.mark.gen_test
async def test_password_less_admin_refuses_a_dns_rebinding_host(start_node) -> None:
    """A page on attacker.example rebound to 127.0.0.1 reaches the node from a local browser:
    with no password, admin answers only to a loopback host name."""
    node = await start_node()
    for host in ("attacker.example", "attacker.example:8888", "10.0.0.5"):
        r = await node.fetch("/admin/api/status", headers={"Host": host})
        assert r.code == 403, host
        r = await node.fetch("/admin/api/clients/x/disconnect", "POST", b"", headers={"Host": host})
        assert r.code == 403, host
    for host in ("localhost", "localhost:8888", "127.0.0.1:8888", "[::1]:8888"):
        r = await node.fetch("/admin/api/status", headers={"Host": host})
        assert r.code == 200, host
