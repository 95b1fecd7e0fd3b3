"""The chat message: its fields, ids, validation of user input, and JSON.

Pure: no I/O, no tornado, no redis. A message id is a Redis stream entry id
``"<ms>-<seq>"``; both brokers make ids of that form, strictly increasing
per room, so ids compare as ``(ms, seq)`` tuples.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

ROOM_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_ID_RE = re.compile(r"^\d{1,20}-\d{1,20}$")
# Control characters other than tab and newline have no place in a nick.
_NICK_BAD = re.compile(r"[\x00-\x1f\x7f]")


class InvalidMessage(ValueError):
    """User input that cannot become a message; ``code`` is the HTTP-facing reason."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


def valid_room(room: str) -> bool:
    return ROOM_RE.match(room) is not None


def valid_nick(nick: str, max_chars: int) -> bool:
    """1 to ``max_chars`` characters, none of them control characters."""
    return 0 < len(nick) <= max_chars and _NICK_BAD.search(nick) is None


def valid_id(message_id: str) -> bool:
    return _ID_RE.match(message_id) is not None


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

    @property
    def key(self) -> tuple[int, int]:
        return id_key(self.id)

    def public_json(self) -> str:
        """The JSON clients see (one line: JSON escapes newlines); ``prev`` stays internal."""
        return json.dumps(
            {"id": self.id, "room": self.room, "nick": self.nick, "text": self.text,
             "ts": self.ts, "node": self.node},
            ensure_ascii=False, separators=(",", ":"),
        )

    def public_dict(self) -> dict[str, object]:
        return {"id": self.id, "room": self.room, "nick": self.nick, "text": self.text,
                "ts": self.ts, "node": self.node}


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
    if nick is None or nick == "":
        nick = "anonymous"
    if not isinstance(nick, str):
        raise InvalidMessage("bad_nick", "'nick' must be a string")
    nick = nick.strip()
    if not valid_nick(nick, max_nick_chars):
        raise InvalidMessage(
            "bad_nick", f"'nick' must be 1-{max_nick_chars} printable characters")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidMessage("bad_text", "'text' is not valid unicode") from None
    return nick, text
