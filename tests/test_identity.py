"""Identity: JWT and trusted-proxy headers, room permissions, kick and ban.

Real nodes, real tokens (PyJWT with keys made here), real Redis for the
cluster-wide ban. Every refusal is a clear 401/403, never a 500.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from probes import async_wait_for
from sse_client import SSEClient

SECRET = "a-test-secret-that-is-long-enough-for-hs256"
FAST = {"limits.rate.burst": 10000, "limits.rate.messages_per_second": 10000}
JWT = {"auth.mode": "jwt", "auth.jwt.secret": SECRET, **FAST}


def body(r: Any) -> dict[str, Any]:
    return json.loads(r.body)


def token(sub: str = "ann", name: str | None = "Ann", ttl: float = 3600, key: Any = SECRET,
          alg: str = "HS256", **claims: Any) -> str:
    now = int(time.time())
    payload: dict[str, Any] = {"sub": sub, "iat": now, "exp": now + ttl, **claims}
    if name is not None:
        payload["name"] = name
    return jwt.encode(payload, key, algorithm=alg)


def bearer(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


async def post(node: Any, room: str, text: str, headers: dict[str, str] | None = None,
               nick: str = "body-nick") -> Any:
    return await node.fetch(f"/rooms/{room}/messages", "POST", {"nick": nick, "text": text}, headers)


# -- jwt mode ------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_every_room_endpoint_needs_a_token(start_node) -> None:
    node = await start_node(**JWT)
    for method, path in (("POST", "/rooms/lobby/messages"), ("GET", "/rooms/lobby/messages"),
                         ("GET", "/rooms/lobby/presence"), ("GET", "/rooms/lobby")):
        r = await node.fetch(path, method, {"text": "x"} if method == "POST" else None)
        assert r.code == 401, path
        assert r.headers["WWW-Authenticate"].startswith("Bearer"), path
    stream = await SSEClient.open(node.url, "lobby")
    assert stream.status == 401 and stream.headers["www-authenticate"].startswith("Bearer")
    await stream.aclose()
    assert (await node.fetch("/healthz")).code == 200  # not a room endpoint


@pytest.mark.gen_test(timeout=30)
async def test_the_token_names_the_speaker_never_the_body(start_node) -> None:
    node = await start_node(**JWT)
    tok = token("u-123", "Ann")
    listener = await SSEClient.open(node.url, "lobby", path=f"/rooms/lobby/events?token={tok}")
    try:
        assert listener.status == 200
        r = await post(node, "lobby", "hi", bearer(tok), nick="admin")
        assert r.code == 201, r.body
        got = (await listener.messages(1))[0]
        assert (got["nick"], got["user"], got["text"]) == ("Ann", "u-123", "hi")
        # The cookie works as well as the header; a token without a name speaks as its sub.
        r = await post(node, "lobby", "by cookie", {"Cookie": f"rtchat_token={token('bob', None)}"})
        assert r.code == 201
        got = (await listener.messages(1))[0]
        assert (got["nick"], got["user"]) == ("bob", "bob")
        history = body(await node.fetch("/rooms/lobby/messages", headers=bearer(tok)))["messages"]
        assert [(m["nick"], m["user"]) for m in history] == [("Ann", "u-123"), ("bob", "bob")]
        presence = body(await node.fetch("/rooms/lobby/presence", headers=bearer(tok)))
        assert presence["nicks"] == ["Ann"]  # the listener, by its token's name
    finally:
        await listener.aclose()


@pytest.mark.gen_test(timeout=30)
async def test_rooms_claim_limits_where_a_token_may_go(start_node) -> None:
    node = await start_node(**JWT)
    tok = token(rooms=["team-*", "lobby"])
    assert (await post(node, "team-red", "ok", bearer(tok))).code == 201
    assert (await post(node, "lobby", "ok", bearer(tok))).code == 201
    for room in ("general", "team"):
        r = await post(node, room, "no", bearer(tok))
        assert r.code == 403 and body(r)["error"] == "room_forbidden"
        assert (await node.fetch(f"/rooms/{room}/messages", headers=bearer(tok))).code == 403
        stream = await SSEClient.open(node.url, room, headers=bearer(tok))
        assert stream.status == 403
        await stream.aclose()


@pytest.mark.gen_test(timeout=30)
async def test_bad_tokens_are_401_never_500(start_node) -> None:
    node = await start_node(**JWT, **{"auth.jwt.issuer": "https://auth.example",
                                      "auth.jwt.audience": "rtchat", "auth.jwt.leeway_seconds": 0})
    good = {"iss": "https://auth.example", "aud": "rtchat"}
    assert (await post(node, "r", "ok", bearer(token(**good)))).code == 201
    header = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
    claims = base64.urlsafe_b64encode(json.dumps(
        {"sub": "eve", "exp": int(time.time()) + 600, **good}).encode()).rstrip(b"=").decode()
    bad = {
        "expired": token(ttl=-60, **good),
        "not yet valid": token(nbf=int(time.time()) + 600, **good),
        "wrong signature": token(key="another-secret-that-is-long-enough-for-hs256", **good),
        "alg none": f"{header}.{claims}.",
        "wrong issuer": token(iss="https://evil.example", aud="rtchat"),
        "wrong audience": token(iss="https://auth.example", aud="other"),
        "no exp": jwt.encode({"sub": "ann", **good}, SECRET, algorithm="HS256"),
        "no sub": jwt.encode({"exp": int(time.time()) + 60, **good}, SECRET, algorithm="HS256"),
        "garbage": "not.a.token",
        "empty bearer": "",
    }
    for what, tok in bad.items():
        r = await post(node, "r", what, bearer(tok))
        assert r.code == 401, (what, r.code, r.body)
        assert "error" in body(r)
        stream = await SSEClient.open(node.url, "r", path=f"/rooms/r/events?token={tok}")
        assert stream.status == 401, what
        await stream.aclose()
    assert [m["text"] for m in body(await node.fetch(
        "/rooms/r/messages", headers=bearer(token(**good))))["messages"]] == ["ok"]


def _pem_keys(kind: str) -> tuple[Any, bytes, str]:
    if kind == "RS256":
        private: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif kind == "ES256":
        private = ec.generate_private_key(ec.SECP256R1())
    else:
        private = ed25519.Ed25519PrivateKey.generate()
    public = private.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public, kind


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
@pytest.mark.gen_test(timeout=30)
async def test_asymmetric_keys_and_no_algorithm_confusion(start_node, tmp_path: Path, alg: str) -> None:
    private, public_pem, _ = _pem_keys(alg)
    key_file = tmp_path / "public.pem"
    key_file.write_bytes(public_pem)
    node = await start_node(**FAST, **{"auth.mode": "jwt", "auth.jwt.algorithms": [alg],
                                      "auth.jwt.public_key_file": str(key_file)})
    assert (await post(node, "r", "signed", bearer(token(key=private, alg=alg)))).code == 201
    # An HS256 token whose secret is the public key text: the classic confusion attack.
    forged = jwt.api_jws.PyJWS().encode(
        json.dumps({"sub": "eve", "exp": int(time.time()) + 600}).encode(),
        b"x" * 32, algorithm="HS256")
    # (Signed with a stand-in key: PyJWT refuses to HMAC with a PEM; the node must refuse
    # any HS token anyway, whatever its key.)
    r = await post(node, "r", "forged", bearer(forged))
    assert r.code == 401
    r = await post(node, "r", "hs", bearer(token()))
    assert r.code == 401


@pytest.mark.gen_test(timeout=30)
async def test_a_jwks_file_picks_the_key_by_kid(start_node, tmp_path: Path) -> None:
    private, _, _ = _pem_keys("RS256")
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))
    jwk.update({"kid": "k1", "alg": "RS256", "use": "sig"})
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk]}))
    node = await start_node(**FAST, **{"auth.mode": "jwt", "auth.jwt.algorithms": ["RS256"],
                                      "auth.jwt.jwks_file": str(jwks)})
    now = int(time.time())
    signed = jwt.encode({"sub": "ann", "exp": now + 60}, private, algorithm="RS256",
                        headers={"kid": "k1"})
    assert (await post(node, "r", "ok", bearer(signed))).code == 201
    unknown = jwt.encode({"sub": "ann", "exp": now + 60}, private, algorithm="RS256",
                         headers={"kid": "k9"})
    assert (await post(node, "r", "no", bearer(unknown))).code == 401


@pytest.mark.gen_test(timeout=30)
async def test_a_stream_ends_when_its_token_expires_and_resumes_with_a_new_one(start_node) -> None:
    node = await start_node(**JWT, **{"auth.jwt.leeway_seconds": 0})
    short = token(ttl=2)
    stream = await SSEClient.open(node.url, "exp", path=f"/rooms/exp/events?token={short}")
    assert stream.status == 200
    writer = token("writer", "W")
    assert (await post(node, "exp", "before", bearer(writer))).code == 201
    last = (await stream.messages(1))[0]["id"]
    await stream.until_closed(timeout=6)  # closed by the node at expiry
    await stream.aclose()
    assert (await post(node, "exp", "while away", bearer(writer))).code == 201
    again = await SSEClient.open(node.url, "exp", path=f"/rooms/exp/events?token={token()}",
                                 last_event_id=last)
    try:
        assert [m["text"] for m in await again.messages(1)] == ["while away"]
    finally:
        await again.aclose()


def test_token_command_prints_only_a_token_the_node_accepts(tmp_path: Path) -> None:
    conf = tmp_path / "c.yaml"
    conf.write_text(f"auth: {{mode: jwt, jwt: {{secret: '{SECRET}'}}}}\n")
    out = subprocess.run(
        [sys.executable, "-m", "rtchat", "token", "--config", str(conf), "--sub", "ann",
         "--name", "Ann", "--rooms", "team-*", "--ttl", "1h", "--admin"],
        capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("\n") == 1
    claims = jwt.decode(out.stdout.strip(), SECRET, algorithms=["HS256"])
    assert (claims["sub"], claims["name"], claims["rooms"], claims["admin"]) == (
        "ann", "Ann", ["team-*"], True)
    assert 3500 < claims["exp"] - time.time() <= 3600
    bad = subprocess.run([sys.executable, "-m", "rtchat", "token", "--sub", "ann",
                          "--config", str(tmp_path / "missing.yaml")],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_config_refuses_mixed_algorithms_and_short_secrets(tmp_path: Path) -> None:
    for text, key in (
        ("auth: {mode: jwt, jwt: {algorithms: [HS256, RS256], secret: '" + SECRET + "'}}",
         "auth.jwt.algorithms"),
        ("auth: {mode: jwt, jwt: {secret: short}}", "auth.jwt.secret"),
        ("auth: {mode: jwt}", "auth.jwt.secret"),
        ("auth: {mode: jwt, jwt: {algorithms: [RS256]}}", "auth.jwt"),
        ("auth: {mode: jwt, jwt: {algorithms: [RS256], public_key_file: /nonexistent.pem}}",
         "auth.jwt.public_key_file"),
    ):
        conf = tmp_path / "c.yaml"
        conf.write_text(text + "\n")
        out = subprocess.run([sys.executable, "-m", "rtchat", "check-config", str(conf)],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 2, text
        assert key in out.stderr and "Traceback" not in out.stderr, out.stderr


# -- header mode ------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_header_mode_believes_only_trusted_proxies(start_node) -> None:
    trusted = await start_node(**FAST, **{"auth.mode": "header", "http.xheaders": True})
    who = {"X-Forwarded-User": "u-9", "X-Forwarded-Preferred-Username": "Nine"}
    r = await post(trusted, "lobby", "via proxy", who, nick="someone-else")
    assert r.code == 201
    msg = body(await trusted.fetch("/rooms/lobby/messages", headers=who))["messages"][0]
    assert (msg["nick"], msg["user"]) == ("Nine", "u-9")
    missing = await post(trusted, "lobby", "no header")
    assert missing.code == 401
    untrusted = await start_node(**FAST, **{"auth.mode": "header", "http.xheaders": True,
                                           "http.trusted_proxies": ["10.9.9.9/32"]})
    r = await post(untrusted, "lobby", "forged", who)
    assert r.code == 401


# -- admin: tokens, kick, ban ---------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_admin_api_takes_an_admin_token_and_logs_who_acted(start_node, caplog) -> None:
    node = await start_node(**JWT, **{"admin.password": "pw", "logging.level": "info"})
    assert (await node.fetch("/admin/api/status", headers=bearer(token(admin=True)))).code == 200
    assert (await node.fetch("/admin/api/status", headers=bearer(token()))).code == 403
    assert (await node.fetch("/admin/api/status", headers=bearer(token(ttl=-60)))).code == 401
    listener = await SSEClient.open(node.url, "k", path=f"/rooms/k/events?token={token('bob')}")
    await async_wait_for(lambda: node.hub.client_count == 1)
    client_id = node.hub.streams()[0].id
    with caplog.at_level("INFO", logger="rtchat.admin"):
        r = await node.fetch(f"/admin/api/clients/{client_id}/kick", "POST",
                             {"reason": "be nice"}, bearer(token("root", admin=True)))
    assert r.code == 200, r.body
    events = await listener.until_closed(timeout=5)
    assert [(e.event, e.json()) for e in events if e.event == "kicked"] == [
        ("kicked", {"reason": "be nice"})]
    await listener.aclose()
    assert any("kick by token:root" in rec.getMessage() for rec in caplog.records)
    assert (await node.fetch("/admin/api/clients/nope/kick", "POST", {},
                             bearer(token(admin=True)))).code == 404


@pytest.mark.gen_test(timeout=30)
async def test_a_ban_refuses_sends_and_streams_and_ends_open_ones(start_node) -> None:
    node = await start_node(**JWT)
    admin = bearer(token("root", admin=True))
    eve = token("eve", "Eve")
    stream = await SSEClient.open(node.url, "b", path=f"/rooms/b/events?token={eve}")
    await async_wait_for(lambda: node.hub.client_count == 1)
    r = await node.fetch("/admin/api/users/eve/ban", "POST",
                         {"duration_seconds": 60, "reason": "spam"}, admin)
    assert r.code == 200 and body(r)["user"] == "eve"
    events = await stream.until_closed(timeout=5)
    assert [e.json() for e in events if e.event == "kicked"] == [{"reason": "spam"}]
    await stream.aclose()
    sent = await post(node, "b", "again", bearer(eve))
    assert sent.code == 403 and body(sent)["error"] == "banned"
    again = await SSEClient.open(node.url, "b", path=f"/rooms/b/events?token={eve}")
    assert again.status == 403
    await again.aclose()
    assert (await post(node, "b", "others may", bearer(token("ann")))).code == 201
    bans = body(await node.fetch("/admin/api/bans", headers=admin))["bans"]
    assert [(b["user"], b["reason"], b["by"]) for b in bans] == [("eve", "spam", "token:root")]
    for bad in ({"duration_seconds": 0}, {"duration_seconds": "1h"}, {"reason": 5}):
        r = await node.fetch("/admin/api/users/x/ban", "POST", bad, admin)
        assert r.code == 400, bad
    assert (await node.fetch("/admin/api/users/eve/ban", "DELETE", None, admin)).code == 200
    assert (await post(node, "b", "back", bearer(eve))).code == 201
    assert (await node.fetch("/admin/api/users/eve/ban", "DELETE", None, admin)).code == 404


@pytest.mark.gen_test(timeout=30)
async def test_anonymous_bans_name_an_address(start_node) -> None:
    node = await start_node(**FAST)
    r = await node.fetch("/admin/api/users/127.0.0.1/ban", "POST", {"duration_seconds": 1})
    assert r.code == 200
    assert (await node.post("lobby", "from the banned address")).code == 403
    deadline = time.monotonic() + 5
    while (await node.post("lobby", "after expiry")).code != 201:
        assert time.monotonic() < deadline, "the ban never expired"
        await asyncio.sleep(0.1)


@pytest.mark.gen_test(timeout=60)
async def test_a_ban_set_on_one_node_holds_on_the_other(start_node, start_redis) -> None:
    redis = start_redis()
    shared = {**JWT, "broker.backend": "redis", "broker.redis.master": redis.url,
              "broker.redis.subscribe_from": "master", "broker.redis.health_interval_seconds": 0.2}
    a = await start_node(**shared, **{"node.id": "node-a"})
    b = await start_node(**shared, **{"node.id": "node-b"})
    eve = token("eve", "Eve")
    on_b = await SSEClient.open(b.url, "x", path=f"/rooms/x/events?token={eve}")
    assert on_b.status == 200
    r = await a.fetch("/admin/api/users/eve/ban", "POST", {"duration_seconds": 60, "reason": "r"},
                      bearer(token("root", admin=True)))
    assert r.code == 200, r.body
    events = await on_b.until_closed(timeout=5)  # node B kicks its own stream of eve's
    assert any(e.event == "kicked" for e in events)
    await on_b.aclose()
    assert (await post(b, "x", "via b", bearer(eve))).code == 403
    bans = body(await b.fetch("/admin/api/bans", headers=bearer(token("root", admin=True))))
    assert [x["user"] for x in bans["bans"]] == ["eve"]


@pytest.mark.gen_test(timeout=30)
async def test_a_query_token_never_reaches_the_access_log(start_node, caplog) -> None:
    node = await start_node(**JWT)
    secret_looking = token(ttl=-60)  # refused, so logged at WARNING with its URL
    with caplog.at_level("INFO", logger="tornado.access"):
        stream = await SSEClient.open(node.url, "l", path=f"/rooms/l/events?token={secret_looking}")
        await stream.aclose()
    lines = [r.getMessage() for r in caplog.records if r.name == "tornado.access"]
    assert any("/rooms/l/events?token=********" in line for line in lines), lines
    assert not any(secret_looking in line for line in lines)
