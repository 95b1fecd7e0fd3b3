"""The resume cursor of a multi-room stream: every room's last id in one compact ``id:``.

Pure: no I/O. A plain EventSource sends back the last ``id:`` it saw, so a
stream over many rooms must fit all of their positions in one id. The form:

    m<base>.<tag><delta>_<seq>.<tag><delta>_<seq>...

``base`` is a millisecond time; each entry is a room's 4-character tag (a
hash of its name), its last id's milliseconds minus ``base`` and its
sequence number, all in base 62. A room at the very start (``0-0``) is its
tag alone. 32 rooms take about 390 bytes. Entries are matched to rooms by
tag, so a cursor resumed with another room list resumes the rooms it names.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_INDEX = {c: i for i, c in enumerate(ALPHABET)}
TAG_CHARS = 4
MAX_CURSOR_CHARS = 2048
_ENTRY = re.compile(rf"([0-9A-Za-z]{{{TAG_CHARS}}})(?:([0-9A-Za-z]{{1,12}})_([0-9A-Za-z]{{1,12}}))?")
_U64 = (1 << 64) - 1

Key = tuple[int, int]  # an id as (ms, seq); (0, 0) is "from the start"


class BadCursor(ValueError):
    """Not a cursor this server wrote."""


def b62(n: int) -> str:
    if n == 0:
        return "0"
    out = []
    while n:
        n, r = divmod(n, 62)
        out.append(ALPHABET[r])
    return "".join(reversed(out))


def unb62(s: str) -> int:
    n = 0
    for c in s:
        n = n * 62 + _INDEX[c]
    return n


def tag(room: str) -> str:
    """A room's 4-character tag (62^4 values: two of 32 rooms share one about once in 30,000
    room sets, in which case the stream refuses the set rather than mix them up)."""
    n = int.from_bytes(hashlib.sha1(room.encode()).digest()[:8], "big") % (62 ** TAG_CHARS)
    return b62(n).rjust(TAG_CHARS, "0")


class Encoder:
    """Builds the cursor of one stream as its rooms move; only the moved room is re-encoded."""

    __slots__ = ("_entries", "_order", "base", "positions")

    def __init__(self, positions: Mapping[str, Key]) -> None:
        self.positions = dict(positions)
        started = [ms for ms, _ in self.positions.values() if ms > 0]
        self.base = min(started) if started else 0
        self._order = list(self.positions)
        self._entries = {room: self._entry(room, key) for room, key in self.positions.items()}

    def _entry(self, room: str, key: Key) -> str:
        ms, seq = key
        if ms == 0 and seq == 0:
            return tag(room)
        if ms < self.base:  # cannot happen for ids that only grow; kept exact regardless
            self.base = ms
            self._entries = {r: self._entry(r, k) for r, k in self.positions.items()}
        return f"{tag(room)}{b62(ms - self.base)}_{b62(seq)}"

    def advance(self, room: str, key: Key) -> str:
        """Record ``key`` as ``room``'s position; returns the cursor after it."""
        self.positions[room] = key
        self._entries[room] = self._entry(room, key)
        return self.cursor()

    def cursor(self) -> str:
        return f"m{b62(self.base)}." + ".".join(self._entries[r] for r in self._order)


def looks_like(value: str) -> bool:
    return value.startswith("m") and "." in value


def decode(cursor: str, rooms: Iterable[str]) -> dict[str, Key]:
    """Each of ``rooms`` the cursor names, with its position. Raises BadCursor."""
    if len(cursor) > MAX_CURSOR_CHARS or not looks_like(cursor):
        raise BadCursor("not a multi-room cursor")
    head, *entries = cursor.split(".")
    try:
        base = unb62(head[1:])
    except KeyError:
        raise BadCursor("bad cursor base") from None
    by_tag = {tag(r): r for r in rooms}
    out: dict[str, Key] = {}
    for entry in entries:
        m = _ENTRY.fullmatch(entry)
        if m is None:
            raise BadCursor(f"bad cursor entry {entry[:20]!r}")
        room = by_tag.get(m[1])
        if room is None:
            continue  # a room this stream no longer asks for
        if m[2] is None:
            out[room] = (0, 0)
            continue
        ms, seq = base + unb62(m[2]), unb62(m[3])
        if ms > _U64 or seq > _U64:
            raise BadCursor("cursor position out of range")
        out[room] = (ms, seq)
    return out


def id_of(key: Key) -> str:
    return f"{key[0]}-{key[1]}"
