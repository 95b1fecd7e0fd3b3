"""Who is speaking: an identity from a JWT or from a trusted proxy's headers.

Owns the token rules (PyJWT does the cryptography: no hand-written JWT
code), the claims rtchat reads (``sub``, ``name``, ``rooms``, ``exp``,
``admin``), room permissions by glob, and minting development tokens. No
tornado: the web layer hands in the headers, the cookie, the query token
and whether the peer is a trusted proxy.

Algorithm families never mix: a node configured for HS* verifies with its
secret only, one configured for RS*/ES*/EdDSA with its public key (or JWKS)
only, so an HS-signed token cannot pass as signed by the public key.
"""

from __future__ import annotations

import fnmatch
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from rtchat.config import AuthConfig, ConfigError

HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
KEY_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "EdDSA"})
COOKIE = "rtchat_token"
MIN_SECRET_BYTES = 32


class AuthError(Exception):
    """No identity could be established (401). ``str()`` says why, for the client."""


@dataclass(frozen=True, slots=True)
class Identity:
    """A verified speaker. ``rooms`` None = every room; ``expires`` None = never (header mode)."""

    user: str
    name: str
    rooms: tuple[str, ...] | None = None
    admin: bool = False
    expires: float | None = None

    def may_enter(self, room: str) -> bool:
        return self.rooms is None or any(fnmatch.fnmatchcase(room, g) for g in self.rooms)


class Authenticator:
    """Turns a request's credentials into an :class:`Identity`, per ``auth.mode``."""

    def __init__(self, cfg: AuthConfig) -> None:
        self.mode = cfg.mode
        self._cfg = cfg
        self._key: Any = None
        self._jwks: jwt.PyJWKSet | None = None
        if cfg.mode == "jwt":
            self._load_keys()

    @property
    def required(self) -> bool:
        """Whether room endpoints need an identity (``jwt`` and ``header`` modes)."""
        return self.mode != "anonymous"

    def _load_keys(self) -> None:
        j = self._cfg.jwt
        algorithms = set(j.algorithms)
        if algorithms <= HMAC_ALGORITHMS:
            if not j.secret:
                raise ConfigError("auth.jwt.secret", "HS* algorithms need a secret "
                                  "(set RTCHAT_AUTH__JWT__SECRET)")
            if len(j.secret.encode("utf-8")) < MIN_SECRET_BYTES:
                raise ConfigError("auth.jwt.secret", f"must be at least {MIN_SECRET_BYTES} bytes "
                                  "(RFC 7518 3.2); e.g. python -c 'import secrets; "
                                  "print(secrets.token_urlsafe(32))'")
            self._key = j.secret
            return
        if j.jwks_file:
            self._jwks = jwt.PyJWKSet.from_json(_read("auth.jwt.jwks_file", j.jwks_file))
        elif j.public_key_file:
            pem = _read("auth.jwt.public_key_file", j.public_key_file)
            try:
                self._key = jwt.algorithms.get_default_algorithms()[sorted(algorithms)[0]] \
                    .prepare_key(pem)
            except Exception as e:  # cryptography says what is wrong with the PEM
                raise ConfigError("auth.jwt.public_key_file", f"not a usable public key: {e}") \
                    from None
        else:
            raise ConfigError("auth.jwt", f"{', '.join(sorted(algorithms))} need public_key_file "
                              "or jwks_file")

    def identify(self, headers: Mapping[str, str], cookie: str | None, query_token: str | None,
                 peer_trusted: bool) -> Identity | None:
        """The request's identity; None in anonymous mode. Raises AuthError (401)."""
        if self.mode == "anonymous":
            return None
        if self.mode == "header":
            return self._from_headers(headers, peer_trusted)
        token = bearer(headers.get("Authorization")) or cookie or query_token
        if not token:
            raise AuthError("a token is required (Authorization: Bearer, the rtchat_token "
                            "cookie, or ?token=)")
        return self.verify(token)

    def verify(self, token: str) -> Identity:
        j = self._cfg.jwt
        try:
            key = self._key
            if self._jwks is not None:
                key = self._signing_key(token)
            claims = jwt.decode(
                token, key, algorithms=list(j.algorithms), issuer=j.issuer, audience=j.audience,
                leeway=j.leeway_seconds,
                options={"require": ["exp", "sub"], "verify_aud": j.audience is not None})
        except jwt.PyJWTError as e:
            raise AuthError(f"invalid token: {e}") from None
        return _identity(claims)

    def _signing_key(self, token: str) -> Any:
        assert self._jwks is not None
        kid = jwt.get_unverified_header(token).get("kid")
        keys = self._jwks.keys
        if kid is not None:
            keys = [k for k in keys if k.key_id == kid]
        if not keys:
            raise jwt.InvalidKeyError("no key in the JWKS for this token")
        return keys[0].key

    def _from_headers(self, headers: Mapping[str, str], peer_trusted: bool) -> Identity:
        h = self._cfg.header
        if not peer_trusted:
            raise AuthError("identity headers are believed only from http.trusted_proxies")
        user = (headers.get(h.user) or "").strip()
        if not user:
            raise AuthError(f"the proxy sent no {h.user} header")
        name = (headers.get(h.name) or "").strip() or user
        return Identity(user=user, name=name)

    def mint(self, sub: str, name: str | None, rooms: list[str] | None, ttl_seconds: float,
             admin: bool = False) -> str:
        """A token signed with the configured HS secret (development and tests)."""
        j = self._cfg.jwt
        hmac = [a for a in j.algorithms if a in HMAC_ALGORITHMS]
        if not hmac or not j.secret:
            raise ConfigError("auth.jwt.secret", "minting needs an HS* algorithm and a secret")
        now = int(time.time())
        claims: dict[str, Any] = {"sub": sub, "iat": now, "exp": now + int(ttl_seconds)}
        if name:
            claims["name"] = name
        if rooms is not None:
            claims["rooms"] = rooms
        if admin:
            claims["admin"] = True
        if j.issuer:
            claims["iss"] = j.issuer
        if j.audience:
            claims["aud"] = j.audience
        return jwt.encode(claims, j.secret, algorithm=hmac[0])


def bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def _identity(claims: Mapping[str, Any]) -> Identity:
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub.strip() or len(sub) > 256:
        raise AuthError("invalid token: 'sub' must be a non-empty string")
    name = claims.get("name", sub)
    if not isinstance(name, str) or not name.strip():
        name = sub
    rooms = claims.get("rooms")
    if rooms is not None:
        if not isinstance(rooms, list) or not all(isinstance(g, str) for g in rooms):
            raise AuthError("invalid token: 'rooms' must be a list of room-name globs")
        rooms = tuple(rooms)
    exp = claims.get("exp")
    return Identity(user=sub, name=name.strip()[:64], rooms=rooms, admin=claims.get("admin") is True,
                    expires=float(exp) if isinstance(exp, (int, float)) else None)


def _read(key: str, path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(key, f"cannot read {path!r}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(key, f"{path!r} is not text") from None


def dumps_public(identity: Identity | None) -> str:
    """What the chat page is told about who it is (JSON for a data block)."""
    if identity is None:
        return "null"
    return json.dumps({"user": identity.user, "name": identity.name})
