"""Who may use the admin pages: HTTP Basic credentials, the loopback rule, the login throttle.

Pure decisions, no HTTP framework: the handlers pass in the Authorization
header and the client address (the forwarded one only from a trusted proxy,
see rtchat.proxies) and turn the verdict into a status code. Passwords are
checked against ``admin.password`` or an scrypt ``admin.password_hash``
(``rtchat hash-password`` makes one), always in constant time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable

from rtchat.proxies import is_loopback
from rtchat.ratelimit import RateLimiter

__all__ = ["REALM", "LoginThrottle", "basic_credentials", "credentials_match", "hash_password",
           "is_loopback", "password_matches"]

REALM = "rtchat admin"
FAILED_LOGINS_PER_MINUTE = 10


# scrypt cost: 2^14 x 8 x 1 takes ~50 ms and 16 MiB here; the throttle bounds how often.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 14, 8, 1


def hash_password(password: str, salt: bytes | None = None) -> str:
    """``scrypt$<n>$<r>$<p>$<salt>$<hash>`` (base64), for ``admin.password_hash``."""
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                            dklen=32)
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def password_matches(password: str, encoded: str) -> bool:
    """Whether ``password`` hashes to ``encoded`` (made by :func:`hash_password`)."""
    try:
        _, n, r, p, salt, digest = encoded.split("$")
        expected = base64.b64decode(digest, validate=True)
        given = hashlib.scrypt(password.encode("utf-8"), salt=base64.b64decode(salt, validate=True),
                               n=int(n), r=int(r), p=int(p), dklen=len(expected),
                               maxmem=256 * 1024 * 1024)
    except (ValueError, binascii.Error):
        return False
    return hmac.compare_digest(given, expected)


def basic_credentials(header: str | None) -> tuple[str, str] | None:
    """``(user, password)`` from an ``Authorization: Basic ...`` header; None if absent or malformed."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic" or not token.strip():
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    user, sep, password = decoded.partition(":")
    if not sep:
        return None
    return user, password


def credentials_match(given: tuple[str, str], username: str, password: str | None,
                      password_hash: str | None = None) -> bool:
    """Constant-time comparison of both parts; both are always compared."""
    user_ok = hmac.compare_digest(given[0].encode("utf-8"), username.encode("utf-8"))
    if password_hash:
        password_ok = password_matches(given[1], password_hash)
    else:
        password_ok = hmac.compare_digest(given[1].encode("utf-8"), (password or "").encode("utf-8"))
    return user_ok & password_ok


class LoginThrottle:
    """Failed admin logins per client address: ``per_minute`` of them, then the client is shut
    out until its next attempt is due, even with the right password (or brute force would
    still learn it from the one answer that is not refused)."""

    MAX_TRACKED = 10000  # shut-out clients remembered at most; expired ones are swept first

    def __init__(self, per_minute: int = FAILED_LOGINS_PER_MINUTE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._limiter = RateLimiter(per_minute / 60.0, per_minute, clock)
        self._shut_out: dict[str, float] = {}  # client -> when it may try again

    def wait(self, client: str) -> float:
        """Seconds until ``client`` may try to log in again; 0.0 when it may now."""
        until = self._shut_out.get(client)
        if until is None:
            return 0.0
        left = until - self._clock()
        if left <= 0:
            del self._shut_out[client]
            return 0.0
        return left

    def failed(self, client: str) -> float:
        """Count a failed login. Returns how long ``client`` is now shut out (0.0 if not)."""
        wait = self._limiter.take(client)
        if wait > 0:
            now = self._clock()
            if len(self._shut_out) >= self.MAX_TRACKED:
                self._shut_out = {k: v for k, v in self._shut_out.items() if v > now}
            self._shut_out[client] = now + wait
        return wait
