"""The chat message: its fields, ids, validation of user input, and JSON.

Pure: no I/O, no tornado, no redis. A message id is a Redis stream entry id
``"<ms>-<seq>"``; both brokers make ids of that form, strictly increasing
per room, so ids compare as ``(ms, seq)`` tuples.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass

# Every rule here is matched whole (fullmatch) and in ASCII: "lobby\n" is not "lobby",
# and "١٢٣" (Arabic-Indic digits) is not a number.
# Room names and idempotency keys: 1-64 of A-Z a-z 0-9 _ -.
ROOM_RE = KEY_RE = re.compile(r"[A-Za-z0-9_-]{1,64}", re.ASCII)
_ID_RE = re.compile(r"([0-9]{1,20})-([0-9]{1,20})", re.ASCII)
_DIGITS_RE = re.compile(r"[0-9]{1,20}", re.ASCII)
_U64_MAX = (1 << 64) - 1
# Unicode categories no nick may hold: controls, format (zero-width, bidi), surrogates,
# private use, line and paragraph separators.
_NICK_BAD_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Zl", "Zp"})
# Text may hold newlines, tabs and emoji (whose joiners are Cf), but not other controls,
# lone surrogates, or the bidi embeddings, overrides and isolates that reorder what others see.
_TEXT_BAD = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff\u202a-\u202e\u2066-\u2069]")


class InvalidMessage(ValueError):
    """User input that cannot become a message; ``code`` is the HTTP-facing reason."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


def valid_room(room: str) -> bool:
    return ROOM_RE.fullmatch(room) is not None


def valid_key(key: str) -> bool:
    """An idempotency key: 1-64 of A-Z a-z 0-9 _ -."""
    return KEY_RE.fullmatch(key) is not None


def normalize_nick(nick: str, max_chars: int) -> str | None:
    """The nick as stored (NFKC, trimmed), or None when it is not acceptable.

    Acceptable: 1 to ``max_chars`` characters after normalisation, none in the
    categories Cc, Cf, Cs, Co, Zl, Zp, and at least one visible character.
    """
    nick = unicodedata.normalize("NFKC", nick)
    visible = False
    for ch in nick:  # before trimming: str.strip() would drop a trailing NEL or U+2029
        category = unicodedata.category(ch)
        if category in _NICK_BAD_CATEGORIES:
            return None
        if category[0] != "Z":
            visible = True
    nick = nick.strip()
    return nick if visible and len(nick) <= max_chars else None


def valid_nick(nick: str, max_chars: int) -> bool:
    return normalize_nick(nick, max_chars) is not None


def valid_id(message_id: str) -> bool:
    """``<ms>-<seq>``, ASCII digits, each part within the 64-bit range Redis uses."""
    m = _ID_RE.fullmatch(message_id)
    return m is not None and int(m[1]) <= _U64_MAX and int(m[2]) <= _U64_MAX


def parse_limit(raw: str) -> int | None:
    """A whole number of ASCII digits, or None."""
    return int(raw) if _DIGITS_RE.fullmatch(raw) else None


def id_key(message_id: str) -> tuple[int, int]:
    """The sortable form of a message id. ``ValueError`` if malformed."""
    ms, _, seq = message_id.partition("-")
    return int(ms), int(seq)


@dataclass(frozen=True, slots=True)
class Message:
    """A stored chat message. ``prev`` is the id of the room's message before it ("" if none)."""

    id: str
    room: str
    nick: str
    text: str
    ts: float
    node: str
    prev: str = ""
    user: str = ""  # the verified speaker's id (jwt/header identity); "" when anonymous

    @property
    def key(self) -> tuple[int, int]:
        return id_key(self.id)

    def public_json(self) -> str:
        """The JSON clients see (one line: JSON escapes newlines); ``prev`` stays internal."""
        return json.dumps(self.public_dict(), ensure_ascii=False, separators=(",", ":"))

    def public_dict(self) -> dict[str, object]:
        """``user`` appears only for a verified speaker, so anonymous messages read as ever."""
        d: dict[str, object] = {"id": self.id, "room": self.room, "nick": self.nick,
                                "text": self.text, "ts": self.ts, "node": self.node}
        if self.user:
            d["user"] = self.user
        return d


def validate_input(
    nick: object, text: object, max_nick_chars: int, max_message_bytes: int
) -> tuple[str, str]:
    """Check a send request's fields; returns ``(nick, text)`` or raises :class:`InvalidMessage`."""
    if text is None:
        raise InvalidMessage("missing_text", "'text' is required")
    if not isinstance(text, str):
        raise InvalidMessage("bad_text", "'text' must be a string")
    if text.strip() == "":
        raise InvalidMessage("empty_text", "'text' must not be empty")
    if len(text.encode("utf-8", "surrogatepass")) > max_message_bytes:
        raise InvalidMessage(
            "message_too_large", f"'text' is longer than {max_message_bytes} bytes", status=413)
    if _TEXT_BAD.search(text) is not None:
        raise InvalidMessage(
            "bad_text", "'text' must not hold control characters, lone surrogates or bidi overrides")
    if nick is None or nick == "":
        nick = "anonymous"
    if not isinstance(nick, str):
        raise InvalidMessage("bad_nick", "'nick' must be a string")
    normalized = normalize_nick(nick, max_nick_chars)
    if normalized is None:
        raise InvalidMessage(
            "bad_nick", f"'nick' must be 1-{max_nick_chars} characters with a visible one, "
                        "and no control, format or separator characters")
    return normalized, text
