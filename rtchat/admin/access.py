"""Who may use the admin pages: HTTP Basic credentials, the loopback rule, the login throttle.

Pure decisions, no HTTP framework: the handlers pass in the Authorization
header and the client address (already the forwarded one when
``http.xheaders`` is on) and turn the verdict into a status code.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import time
from collections.abc import Callable

from rtchat.ratelimit import RateLimiter

REALM = "rtchat admin"
FAILED_LOGINS_PER_MINUTE = 10


def is_loopback(address: str) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback; False for anything unparsable."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


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


def credentials_match(given: tuple[str, str], username: str, password: str) -> bool:
    """Constant-time comparison of both parts; both are always compared."""
    user_ok = hmac.compare_digest(given[0].encode("utf-8"), username.encode("utf-8"))
    password_ok = hmac.compare_digest(given[1].encode("utf-8"), password.encode("utf-8"))
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
